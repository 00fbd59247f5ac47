"""Results records as tidy pandas tables: one row per (cell, evaluated split), and seed summaries."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

CELL_KEYS = ["protocol", "dataset", "method", "backbone", "shots", "seed"]


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2 b n / (b + n), the base-to-novel summary (0 when both are 0)."""
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


def collect(results_dir: str | Path = "results") -> pd.DataFrame:
    """Every record under `results_dir` as rows: cell keys, `split` (base / novel / hm / a target), `acc`."""
    rows = []
    for path in sorted(Path(results_dir).rglob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if not isinstance(rec, dict) or "cell" not in rec or "metrics" not in rec:
            continue
        for split, acc in rec["metrics"].items():
            rows.append({**{k: rec["cell"][k] for k in CELL_KEYS}, "split": split, "acc": acc,
                         "record": str(path)})
    return pd.DataFrame(rows, columns=CELL_KEYS + ["split", "acc", "record"])


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds (in %), with the number of seeds, per cell and split."""
    keys = [k for k in CELL_KEYS if k != "seed"] + ["split"]
    g = df.assign(acc=100 * df["acc"]).groupby(keys, sort=False)["acc"]
    out = g.agg(mean="mean", std="std", seeds="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out

