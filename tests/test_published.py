"""The published tables parse, follow the documented schema, and are internally consistent.

The HM and average checks recompute derived columns from the transcribed ones, so they
are an independent check on the transcription (a mistyped digit almost always breaks one).
"""
from __future__ import annotations

import math

import pandas as pd
import pytest

from glad_core.published import AVERAGE, COLUMNS, DATA_DIR, DATASETS, DG_DATASETS, TABLES, published
from glad_core.results import harmonic_mean

TOL = 0.02  # after rounding to 2 decimals


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    return {t: published(t) for t in TABLES}


def test_every_table_file_exists_and_readme_documents_it():
    readme = (DATA_DIR / "README.md").read_text()
    for t in TABLES:
        assert (DATA_DIR / f"{t}.csv").is_file()
        assert f"{t}.csv" in readme


@pytest.mark.parametrize("table", TABLES)
def test_columns_are_as_documented(tables, table):
    assert list(tables[table].columns) == COLUMNS[table]


def test_loader_accepts_csv_suffix_and_rejects_unknown():
    assert published("cross_dataset.csv").equals(published("cross_dataset"))
    with pytest.raises(KeyError):
        published("table_5")


@pytest.mark.parametrize("table", ["base_to_novel", "cross_dataset", "domain_generalization", "ablation"])
def test_keys_values_and_sources(tables, table):
    df = tables[table]
    allowed = {"base_to_novel": set(DATASETS), "cross_dataset": set(DATASETS),
               "domain_generalization": set(DG_DATASETS), "ablation": set()}[table] | {AVERAGE}
    if "dataset" in df:
        assert set(df["dataset"]) <= allowed
        assert not df.duplicated(["method", "dataset"]).any()
    assert all(m == m.lower() and m.strip() for m in df["method"])
    for col in ("base", "novel", "hm", "acc"):
        if col in df:
            assert df[col].between(0, 100).all() and df[col].notna().all()
    keys = set(tables["sources"]["key"])
    assert set(df["source"]) <= keys
    if "crosscheck" in df:
        for cell in df["crosscheck"]:
            for tok in cell.split(";"):
                assert tok == "single-source" or tok.split("=")[0] in keys, tok


def test_hm_is_harmonic_mean_of_base_and_novel(tables):
    for table in ("base_to_novel", "ablation"):
        df = tables[table].dropna(subset=["base", "novel", "hm"])
        for r in df.itertuples():
            hm = round(harmonic_mean(r.base, r.novel), 2)
            assert math.isclose(hm, r.hm, abs_tol=TOL), (table, r.method, getattr(r, "dataset", r.row), hm, r.hm)


def test_base_to_novel_average_is_mean_over_the_11_datasets(tables):
    df = tables["base_to_novel"]
    checked = 0
    for method, g in df.groupby("method"):
        per = g[g["dataset"] != AVERAGE]
        avg = g[g["dataset"] == AVERAGE]
        if len(avg) == 0 or len(per) == 0:
            continue
        assert sorted(per["dataset"]) == sorted(DATASETS), method
        for col in ("base", "novel"):
            assert math.isclose(round(per[col].mean(), 2), avg[col].iloc[0], abs_tol=TOL), (method, col)
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("table,targets", [
    ("cross_dataset", [d for d in DATASETS if d != "imagenet"]),       # 10 targets, ImageNet is the source
    ("domain_generalization", [d for d in DG_DATASETS if d != "imagenet"]),  # 4 shifted variants
])
def test_transfer_average_is_mean_over_targets(tables, table, targets):
    df = tables[table]
    for method, g in df.groupby("method"):
        if AVERAGE not in set(g["dataset"]):
            continue
        acc = g.set_index("dataset")["acc"]
        assert set(targets) <= set(acc.index), method
        assert math.isclose(round(acc[targets].mean(), 2), acc[AVERAGE], abs_tol=TOL), method
