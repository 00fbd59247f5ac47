"""Results records as tidy pandas tables: one row per (cell, evaluated split), and seed summaries."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pandas as pd

from .methods.base import NOT_IDENTITY

CELL_KEYS = ["protocol", "dataset", "method", "descriptions", "backbone", "shots", "setting", "seed"]
_NAMING = ("protocol", "dataset", "method", "backbone", "shots", "seed")  # the cell's name, not a setting


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2 b n / (b + n), the base-to-novel summary (0 when both are 0)."""
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


def collect(results_dir: str | Path = "results") -> pd.DataFrame:
    """Every record under `results_dir` as rows: cell keys, `split` (base / novel / hm / a target), `acc`.

    `descriptions` is the kind of description provider the record's test images were described by
    (MuGCP's "retrieval", "class", "mllm", "oracle"; `descriptions.kind` of the record), '' for runs
    without one.

    `setting` names the parameters in which records of the same protocol, dataset, method, backbone
    and shots differ ("alpha=0.3, lr=0.002"; "" where they agree), so runs with other values are
    summarised apart, never averaged together."""
    records = list(_records(results_dir))
    groups: dict[tuple, list[dict]] = {}
    for _, rec in records:
        groups.setdefault(_group(rec), []).append(_variant(rec))
    rows = []
    for path, rec in records:
        variants = groups[_group(rec)]
        differing = sorted({k for v in variants for k in v if any(w.get(k) != v.get(k) for w in variants)})
        mine = _variant(rec)
        setting = ", ".join(f"{k}={json.loads(mine[k]) if k in mine else None}" for k in differing)
        for split, acc in rec["metrics"].items():
            rows.append({**{k: rec["cell"][k] for k in CELL_KEYS if k not in ("setting", "descriptions")},
                         "descriptions": (record_info(rec).get("descriptions") or {}).get("kind", ""),
                         "setting": setting,
                         "split": split, "acc": acc, "record": str(path)})
    return pd.DataFrame(rows, columns=CELL_KEYS + ["split", "acc", "record"])


def _records(results_dir: str | Path) -> Iterator[tuple[Path, dict]]:
    """Every results record under `results_dir` (JSON files with a cell and metrics), with its path."""
    for path in sorted(Path(results_dir).rglob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(rec, dict) and "cell" in rec and "metrics" in rec:
            yield path, rec


def _group(rec: dict) -> tuple:
    return tuple(rec["cell"][k] for k in ("protocol", "dataset", "method", "backbone", "shots"))


def _variant(rec: dict) -> dict:
    """The record's identity (`Cell.identity`: what changes its numbers) less what names the cell: the
    parameters that may set it apart (a leave-one-domain-out record's held-out domain is its split, not a
    setting)."""
    skip = {*_NAMING, *(("targets",) if rec["cell"]["protocol"] == "multi_source_dg" else ())}
    identity = rec.get("identity")
    if identity is None:  # a record written before identities were stored: its parameters that may matter
        identity = {k: v for k, v in rec.get("params", {}).items() if k not in NOT_IDENTITY}
    return {k: json.dumps(v, default=str) for k, v in identity.items() if k not in skip}


def record_info(rec: dict) -> dict:
    """The record's facts from its method (`Method.record_info`: MuGCP's description provider, ...)."""
    return (rec.get("method") or {}).get("info") or {}


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds (in %), with the number of seeds, per cell and split."""
    keys = [k for k in CELL_KEYS if k != "seed"] + ["split"]
    g = df.assign(acc=100 * df["acc"]).groupby(keys, sort=False)["acc"]
    out = g.agg(mean="mean", std="std", seeds="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def guidance(results_dir: str | Path = "results") -> pd.DataFrame:
    """The guided methods' leave-one-domain-out records (GuiDG; their `method.metrics` of the held-out domain)
    as rows, one per record and source expert:
    cell keys, `held_out`, `expert`, the expert's own accuracy on the held-out domain (`expert_acc`), its mean
    attention weight (`weight`), and the record's accuracy with batch-averaged and per-image weights."""
    rows = []
    for path, rec in _records(results_dir):
        held = next(iter(rec["metrics"]))
        g = ((rec.get("method") or {}).get("metrics") or {}).get(held)
        if rec["cell"]["protocol"] != "multi_source_dg" or not g or "experts" not in g:
            continue
        cell = {k: rec["cell"][k] for k in ("dataset", "method", "backbone", "shots", "seed")}
        for expert, acc in g["experts"].items():
            rows.append({**cell, "held_out": held, "expert": expert, "expert_acc": acc,
                         "weight": g["mean_weights"][expert], "acc_batch": g["acc_batch"],
                         "acc_image": g["acc_image"], "record": str(path)})
    return pd.DataFrame(rows, columns=["dataset", "method", "backbone", "shots", "seed", "held_out", "expert",
                                       "expert_acc", "weight", "acc_batch", "acc_image", "record"])
