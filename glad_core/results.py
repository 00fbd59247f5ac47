"""Results records as tidy pandas tables: one row per (cell, evaluated split), and seed summaries."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

CELL_KEYS = ["protocol", "dataset", "method", "descriptions", "backbone", "shots", "setting", "seed"]
#: Record parameters that neither name the cell nor change its numbers (see protocols.NOT_IDENTITY).
_NOT_SETTING = {"protocol", "dataset", "method", "backbone", "shots", "seed", "data_root", "device",
                "num_workers", "eval_batch_size"}


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
    records = []
    for path in sorted(Path(results_dir).rglob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(rec, dict) and "cell" in rec and "metrics" in rec:
            records.append((path, rec))
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
                         "descriptions": (rec.get("descriptions") or {}).get("kind", ""), "setting": setting,
                         "split": split, "acc": acc, "record": str(path)})
    return pd.DataFrame(rows, columns=CELL_KEYS + ["split", "acc", "record"])


def _group(rec: dict) -> tuple:
    return tuple(rec["cell"][k] for k in ("protocol", "dataset", "method", "backbone", "shots"))


def _variant(rec: dict) -> dict:
    return {k: json.dumps(v, default=str) for k, v in rec.get("params", {}).items() if k not in _NOT_SETTING}


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds (in %), with the number of seeds, per cell and split."""
    keys = [k for k in CELL_KEYS if k != "seed"] + ["split"]
    g = df.assign(acc=100 * df["acc"]).groupby(keys, sort=False)["acc"]
    out = g.agg(mean="mean", std="std", seeds="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out

