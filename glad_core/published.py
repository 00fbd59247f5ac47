"""Published result tables: the GLAD paper's Tables 1-4, a few baselines it does not print, and the
GuiDG paper's appendix Table 8 (leave-one-domain-out on TerraIncognita, VLCS and PACS).

The CSVs live in ``glad_core/published/``; ``glad_core/published/README.md`` says where every
number was read, which other sources print the same number, and the paper's own inconsistencies.

    >>> from glad_core.published import published
    >>> published("base_to_novel").query("dataset == 'average' and method == 'glad'")
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
    "gain": ["table", "dataset", "split", "gain", "source"],
    "multi_source_dg": ["method", "label", "dataset", "domain", "acc", "source"],
    "sources": ["key", "kind", "location", "table", "note"],
}
_NUMERIC = ("base", "novel", "hm", "acc", "gain")
TABLES = tuple(COLUMNS)

#: The ``source`` key of the rows printed in the GLAD paper, per table (Tables 1-4; Gain is in
#: ``gain``, keyed by the table it belongs to). Rows with another source are not in GLAD's tables.
GLAD_SOURCES = {
    "base_to_novel": "glad_t1",
    "cross_dataset": "glad_t2",
    "domain_generalization": "glad_t3",
    "ablation": "glad_t4",
}


def published(table: str) -> pd.DataFrame:
    """Load one published table: ``base_to_novel``, ``cross_dataset``, ``domain_generalization``,
    ``ablation``, ``gain``, ``multi_source_dg`` or ``sources`` (a trailing ``.csv`` is accepted).

    Accuracies are floats in percent; ``dataset == "average"`` rows are the averages the source
    prints (base-to-novel: mean over the 11 datasets for base/novel, HM of those two;
    cross-dataset: mean over the 10 targets; domain generalisation: mean over the 4 shifted sets).
    ``gain`` is GLAD minus CLIP-LoRA as the paper prints it, in points, per table, dataset and
    split (``base``/``novel``/``hm`` for base-to-novel, ``acc`` for the transfer tables).
    ``multi_source_dg`` is GuiDG's appendix Table 8: accuracy on each held-out ``domain`` (DomainBed's
    folder names, as ``glad_core.domains``) and ``domain == "average"`` over the set's four domains,
    one decimal as printed; ``method`` is our method name, ``label`` the paper's row name.
    """
    name = table[:-4] if table.endswith(".csv") else table
    if name not in COLUMNS:
        raise KeyError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}")
    df = pd.read_csv(DATA_DIR / f"{name}.csv", dtype=str, keep_default_na=False)
    for col in _NUMERIC:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="raise").astype(float)
    return df
