"""Results records as tidy pandas tables: one row per (cell, evaluated split), and seed summaries."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pandas as pd

from . import stats
from .methods.base import NOT_IDENTITY

CELL_KEYS = ["protocol", "dataset", "method", "descriptions", "backbone", "shots", "setting", "seed"]
_NAMING = ("protocol", "dataset", "method", "backbone", "shots", "seed")  # the cell's name, not a setting


#: A record's budget (`budget`): optimizer steps, images seen by them, trained parameters, seconds of
#: training and of evaluation, and the device.
BUDGET = ["steps", "images_seen", "parameters", "train_s", "eval_s", "device"]
#: Per row, besides the cell keys: the split, its accuracy and 95% interval, and (evaluated splits) the
#: test size, the test list's digest and the per-image correctness (`glad_core.stats`).
EVIDENCE = ["split", "acc", "lo", "hi", "n", "test", "correct"]


def collect(results_dir: str | Path = "results") -> pd.DataFrame:
    """Every record under `results_dir` as rows: cell keys, `split` (base / novel / hm / a target), `acc`,
    its bootstrap interval `lo` / `hi` and, for an evaluated split (not hm or an average), `n`, `test` and
    `correct` (`EVIDENCE`; None or NaN in records written without them), then the record's `BUDGET`.

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
        intervals, cost = rec.get("intervals", {}), budget(rec)
        for split, acc in rec["metrics"].items():
            lo, hi = intervals.get(split, (float("nan"), float("nan")))
            rows.append({**{k: rec["cell"][k] for k in CELL_KEYS if k not in ("setting", "descriptions")},
                         "descriptions": (record_info(rec).get("descriptions") or {}).get("kind", ""),
                         "setting": setting,
                         "split": split, "acc": acc, "lo": lo, "hi": hi,
                         "n": rec.get("test_sizes", {}).get(split), "test": rec.get("test_items", {}).get(split),
                         "correct": rec.get("correct", {}).get(split), **cost, "record": str(path)})
    return pd.DataFrame(rows, columns=CELL_KEYS + EVIDENCE + BUDGET + ["record"])


def budget(rec: dict) -> dict:
    """A record's `BUDGET` (None where it was not recorded: images seen and parameters before they were,
    and every count of a record that reused an adapter without recording its fit's budget)."""
    train, timings = rec.get("train", {}), rec.get("timings", {})
    known = "images_seen" in train or not train.get("reused_adapter")
    return {"steps": train.get("steps") if known else None, "images_seen": train.get("images_seen"),
            "parameters": train.get("parameters"), "train_s": train.get("seconds") if known else None,
            "eval_s": timings.get("eval_s"), "device": rec.get("device")}


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
    """Mean and standard deviation over seeds (in %), with the number of seeds, per cell and split; the
    seed mean's bootstrap draws (`boot`, draw by draw; None unless every seed has draws) where `df` has
    them (`stats.record_draws`), and the mean `BUDGET` of the seeds' records (devices listed)."""
    keys = [k for k in CELL_KEYS if k != "seed"] + ["split"]
    g = df.assign(acc=100 * df["acc"]).groupby(keys, sort=False)
    out = g["acc"].agg(mean="mean", std="std", seeds="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    out["boot"] = [stats.mean_draws(list(b)) for _, b in g["boot"]] if "boot" in df.columns else None
    return out.join(budget_mean(g))


def budget_mean(groups) -> pd.DataFrame:
    """The mean `BUDGET` numbers of grouped rows (NaN where none was recorded), their devices joined."""
    numbers = [k for k in BUDGET if k != "device"]
    return pd.DataFrame([{**{k: pd.to_numeric(d[k], errors="coerce").mean() if k in d else float("nan")
                             for k in numbers},
                          "device": ", ".join(sorted(set(d["device"].dropna()))) if "device" in d else ""}
                         for _, d in groups], columns=BUDGET)


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
