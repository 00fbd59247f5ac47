"""The report (glad_core/report.py): tables of records against published numbers, their conventions, the
description provider beside each number, empty tables of an empty results folder."""
from __future__ import annotations

import pytest


def test_report_hm_is_the_hm_of_seed_averaged_base_and_novel():
    """The paper's convention, against a direct computation: HM(mean base, mean novel), not mean of HMs."""
    import pandas as pd

    from glad_core.report import base_to_novel_comparison

    rows = []
    for seed, (b, n) in enumerate([(0.9, 0.5), (0.6, 0.8)], 1):
        for split, acc in (("base", b), ("novel", n), ("hm", 2 * b * n / (b + n))):
            rows.append({"protocol": "base_to_novel", "dataset": "tuxpaint", "method": "glad", "descriptions": "",
                         "backbone": "x", "shots": 4, "setting": "", "seed": seed, "split": split, "acc": acc,
                         "record": f"r{seed}"})
    t = base_to_novel_comparison(pd.DataFrame(rows)).set_index("split")
    b, n = 100 * (0.9 + 0.6) / 2, 100 * (0.5 + 0.8) / 2
    assert t.loc["hm", "mean"] == pytest.approx(2 * b * n / (b + n))
    assert t.loc["hm", "mean"] != pytest.approx(100 * (2 * .9 * .5 / 1.4 + 2 * .6 * .8 / 1.4) / 2)


def test_report_tables_of_an_empty_results_folder_are_empty(tmp_path):
    """A fresh clone's report notebook (no records yet) shows empty tables, not an error."""
    from glad_core.report import paper_tables
    from glad_core.results import collect

    tables = paper_tables(collect(tmp_path))
    assert list(tables) == ["base_to_novel", "cross_dataset", "domain_generalization", "ablation",
                           "multi_source_dg"]
    assert all(t.empty for t in tables.values())


def test_report_shows_the_description_provider_beside_each_number(tmp_path):
    """Records carry `descriptions.kind`: `collect` exposes it ('' without a provider), the display labels the
    method with it, providers are never averaged together, and dataset averages cover only methods run on both."""
    import json

    from glad_core.report import base_to_novel_comparison, display_table
    from glad_core.results import collect

    def record(dataset, method, base, novel, provider=None, **params):
        rec = {"cell": {"protocol": "base_to_novel", "dataset": dataset, "method": method, "seed": 1, "shots": 4,
                        "backbone": "glad-mini"},
               "identity": {"protocol": "base_to_novel", "dataset": dataset, "method": method, **params},
               "metrics": {"base": base, "novel": novel, "hm": 2 * base * novel / (base + novel)}}
        if method == "mugcp":
            rec["method"] = {"info": {"descriptions": provider and {"kind": provider, "oracle": provider == "oracle"}},
                             "metrics": {}}
        path = tmp_path / dataset / method / f"{abs(hash(json.dumps(params, sort_keys=True)))}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))

    for dataset, shift in (("fashion_mnist", 0.0), ("tuxpaint", 0.1)):
        record(dataset, "glad", 0.5 + shift, 0.4 + shift)
        record(dataset, "cocoop", 0.6 + shift, 0.3 + shift)
    record("tuxpaint", "mugcp", 0.7, 0.6, "retrieval", descriptions="tuxpaint")
    record("tuxpaint", "mugcp", 0.9, 0.8, "oracle", descriptions="tuxpaint", oracle=True)
    record("tuxpaint", "mugcp", 0.5, 0.5, None, scp=False, vcp=False)
    df = collect(tmp_path)
    assert dict(zip(df["method"] + "/" + df["setting"], df["descriptions"])) == {
        "glad/": "", "cocoop/": "", "mugcp/descriptions=tuxpaint, oracle=True, scp=None, vcp=None": "oracle",
        "mugcp/descriptions=tuxpaint, oracle=None, scp=None, vcp=None": "retrieval",
        "mugcp/descriptions=None, oracle=None, scp=False, vcp=False": ""}
    t = base_to_novel_comparison(df)
    average = t[t["dataset"] == "average"]
    assert set(average["method"]) == {"glad", "cocoop"}  # mugcp ran on tuxpaint only
    glad = average.set_index("split").loc[average["method"].eq("glad").to_numpy()]
    assert glad.loc["base", "mean"] == pytest.approx(55.0) and glad.loc["novel", "mean"] == pytest.approx(45.0)
    shown = display_table(t)
    methods = list(dict.fromkeys(shown.index.get_level_values("method")))
    assert methods[:2] == ["glad", "cocoop"] and set(methods[2:]) == {"mugcp (oracle)", "mugcp (retrieval)", "mugcp"}
    rows = shown.xs("tuxpaint", level="dataset")
    assert rows.xs("mugcp (oracle)", level="method")[("base", "ours")].tolist() == ["90.00"]
