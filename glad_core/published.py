"""Published result tables (baselines from the literature), as tidy data frames.

The CSVs live in ``glad_core/published/``; ``glad_core/published/README.md`` says where
every number was read and what could not be found (notably: the GLAD paper's own tables).

    >>> from glad_core.published import published
    >>> published("base_to_novel").query("dataset == 'average'")
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

DATA_DIR = Path(__file__).resolve().parent / "published"

#: The 11 base-to-novel / cross-dataset datasets, in the usual CoOp order.
DATASETS = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
)
#: ImageNet (source) and its four shifted variants for domain generalisation.
DG_DATASETS = ("imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
AVERAGE = "average"

#: Documented columns of every table (the ``source``/``crosscheck`` keys refer to ``sources``).
COLUMNS = {
    "base_to_novel": ["method", "dataset", "base", "novel", "hm", "source", "crosscheck"],
    "cross_dataset": ["method", "dataset", "acc", "source", "crosscheck"],
    "domain_generalization": ["method", "dataset", "acc", "source", "crosscheck"],
    "ablation": ["row", "method", "base", "novel", "hm", "source"],
    "sources": ["key", "kind", "location", "table", "note"],
}
_NUMERIC = ("base", "novel", "hm", "acc")
TABLES = tuple(COLUMNS)


def published(table: str) -> pd.DataFrame:
    """Load one published table: ``base_to_novel``, ``cross_dataset``,
    ``domain_generalization``, ``ablation`` or ``sources`` (a trailing ``.csv`` is accepted).

    Accuracies are floats in percent; ``dataset == "average"`` rows are the averages the
    source reports (base-to-novel: mean over the 11 datasets for base/novel, HM of those two;
    cross-dataset: mean over the 10 targets; domain generalisation: mean over the 4 shifted sets).
    """
    name = table[:-4] if table.endswith(".csv") else table
    if name not in COLUMNS:
        raise KeyError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}")
    df = pd.read_csv(DATA_DIR / f"{name}.csv", dtype=str, keep_default_na=False)
    for col in _NUMERIC:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="raise").astype(float)
    return df

