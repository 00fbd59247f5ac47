"""The bootstrap of glad_core.stats against closed forms and direct computations, and the evidence of records."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from glad_core import stats
from glad_core.stats import harmonic_mean

TEST = "0123456789abcdef"  # a test list's digest


def _bernoulli(n: int, p: float, seed: int = 0) -> np.ndarray:
    """n correctness bits with exactly round(p n) ones, in random order."""
    x = np.zeros(n, dtype=bool)
    x[: round(p * n)] = True
    return np.random.default_rng(seed).permutation(x)


@pytest.mark.parametrize("p", [0.3, 0.8])
def test_bootstrap_interval_matches_the_normal_approximation_of_a_bernoulli_accuracy(p):
    """At n = 5000 the percentile interval is p ± 1.96 sqrt(p (1 - p) / n) within Monte Carlo error (2000 draws:
    a few % of the width), and the draws' spread is the binomial one (the resampled count is Binomial(n, p))."""
    n = 5000
    draws = stats.resampled_accuracy(_bernoulli(n, p), TEST)
    lo, hi = stats.interval(draws)
    se = math.sqrt(p * (1 - p) / n)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.06)
    assert (lo + hi) / 2 == pytest.approx(p, abs=0.1 * se)
    assert draws.mean() == pytest.approx(p, abs=0.1 * se)
    assert draws.std() == pytest.approx(se, rel=0.05)


def test_paired_differences_against_a_naive_loop():
    """The vectorised draws of two methods on the same images equal a loop over the same resampled indices; the
    point estimate is the difference of accuracies; the paired interval is narrower than an unpaired one."""
    rng = np.random.default_rng(1)
    n = 37
    ref = rng.random(n) < 0.5
    method = ref.copy()
    method[rng.choice(n, 6, replace=False)] ^= True  # differs from the reference on 6 images
    both = stats.resampled_accuracy(np.stack([method, ref], axis=1), TEST, draws=300)
    naive = []
    for idx in stats.resample_indices(n, TEST, draws=300):
        for row in idx:
            naive.append(sum(method[i] for i in row) / n - sum(ref[i] for i in row) / n)
    np.testing.assert_allclose(both[:, 0] - both[:, 1], naive, atol=1e-12)
    assert both.shape == (300, 2) and method.mean() - ref.mean() == pytest.approx(
        float(np.mean(method) - np.mean(ref)))
    # alone, each vector gets the same draws as in the pair: pairing does not depend on what else is resampled
    np.testing.assert_array_equal(stats.resampled_accuracy(method, TEST, draws=300), both[:, 0])
    paired = stats.interval(both[:, 0] - both[:, 1])
    unpaired = stats.interval(stats.resampled_accuracy(method, TEST, draws=300)
                              - stats.resampled_accuracy(ref, "fedcba9876543210", draws=300))
    assert paired[1] - paired[0] < unpaired[1] - unpaired[0]


def test_identical_predictions_have_the_zero_interval_and_a_sure_gain_excludes_zero():
    x = _bernoulli(200, 0.4)
    a = stats.resampled_accuracy(np.stack([x, x], axis=1), TEST)
    assert stats.interval(a[:, 0] - a[:, 1]) == (0.0, 0.0) and not stats.excludes_zero(0.0, 0.0)
    better = x.copy()
    better[np.flatnonzero(~x)[:40]] = True  # right on 40 more images, wrong on none more
    d = stats.resampled_accuracy(np.stack([better, x], axis=1), TEST)
    lo, hi = stats.interval(d[:, 0] - d[:, 1])
    assert 0 < lo < 0.2 < hi and stats.excludes_zero(lo, hi)


def test_draws_are_reproducible_from_the_seed_and_distinct_test_lists_are_independent():
    x = _bernoulli(300, 0.5)
    again = stats.resampled_accuracy(x, TEST, seed=7)
    np.testing.assert_array_equal(again, stats.resampled_accuracy(x, TEST, seed=7))
    assert not np.array_equal(again, stats.resampled_accuracy(x, TEST, seed=8))
    other = stats.resampled_accuracy(x, "fedcba9876543210", seed=7)
    assert abs(np.corrcoef(again, other)[0, 1]) < 0.1


def test_hm_interval_from_the_same_draws():
    """HM draw by draw (the paper's HM of the draws' base and novel accuracies) against a loop."""
    base, novel = _bernoulli(120, 0.7, 1), _bernoulli(80, 0.4, 2)
    b, n = stats.resampled_accuracy(base, "aa" * 8, draws=500), stats.resampled_accuracy(novel, "bb" * 8, draws=500)
    hm = harmonic_mean(b, n)
    np.testing.assert_allclose(hm, [2 * x * y / (x + y) for x, y in zip(b, n)])
    assert harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(0.5, 0.25) == pytest.approx(1 / 3)
    lo, hi = stats.interval(hm)
    assert lo < harmonic_mean(base.mean(), novel.mean()) < hi


def test_pack_round_trips_and_names_a_wrong_size():
    x = _bernoulli(13, 0.5)
    bits = stats.pack(x)
    assert len(bits) == 4 and stats.unpack(bits, 13).tolist() == x.tolist()
    with pytest.raises(ValueError, match="hold 8 images, the record says 13"):
        stats.unpack(bits[:2], 13)
    assert stats.mean_draws([np.ones(3), np.zeros(3)]).tolist() == [0.5] * 3 and stats.mean_draws([None]) is None


def _demo_data():
    from glad_core.debian import DemoDataUnavailable
    from glad_core.prepare import prepare_demo_data

    try:
        prepare_demo_data(names=["tuxpaint"])
    except DemoDataUnavailable as e:
        pytest.skip(f"demo data unavailable here: {e}")


def test_records_hold_per_image_evidence_intervals_and_budget(tiny_config, tmp_path):
    """A record's correctness bits give its accuracies, its intervals are reproducible from its bootstrap seed
    (HM's from the same draws of base and novel), and its budget counts what the fit did; a transfer cell that
    reuses an adapter reports the budget of the fit that wrote it."""
    from glad_core import params as P
    from glad_core.protocols import run_cell
    from glad_core.results import collect

    _demo_data()  # Tux Paint photos: 54 test images (30 base, 24 novel)
    common = {"datasets": ["tuxpaint"], "shots": 1, "epochs": 1, "batch_size": 4, "backbone": tiny_config,
              "pretrained": None, "device": "cpu", "results_dir": str(tmp_path)}
    b2n = {cell.train.method: run_cell(cell, progress=False)
           for cell in P.cells({**common, "protocol": "base_to_novel", "methods": ["zeroshot", "coop"]})}
    for rec in b2n.values():
        assert rec["bootstrap"] == {"seed": stats.SEED, "draws": stats.DRAWS, "level": stats.LEVEL}
        draws = {}
        for split in ("base", "novel"):
            bits = stats.unpack(rec["correct"][split], rec["test_sizes"][split])
            assert bits.mean() == pytest.approx(rec["metrics"][split])
            draws[split] = stats.resampled_accuracy(bits, rec["test_items"][split], rec["bootstrap"]["seed"],
                                                    rec["bootstrap"]["draws"])
            assert list(stats.interval(draws[split])) == rec["intervals"][split]
        assert list(stats.interval(harmonic_mean(draws["base"], draws["novel"]))) == rec["intervals"]["hm"]
        for split, (lo, hi) in rec["intervals"].items():
            assert lo <= rec["metrics"][split] <= hi
    assert b2n["zeroshot"]["test_items"] == b2n["coop"]["test_items"]  # the same images, in the same order
    assert {k: b2n["zeroshot"]["train"][k] for k in ("steps", "images_seen", "parameters")} == {
        "steps": 0, "images_seen": 0, "parameters": 0}
    coop = b2n["coop"]["train"]  # 1 shot of 5 base classes, batches of 4, the last incomplete one dropped
    assert (coop["steps"], coop["images_seen"]) == (1, 4) and coop["parameters"] == 4 * 64  # n_ctx x text width

    transfer = [run_cell(cell, progress=False) for protocol in ("cross_dataset", "domain_generalization")
                for cell in P.cells({**common, "protocol": protocol, "methods": ["coop"], "targets": ["tuxpaint"]})]
    trained, reused = (r["train"] for r in transfer)
    assert not trained["reused_adapter"] and reused["reused_adapter"]
    budget = {k: trained[k] for k in ("steps", "images_seen", "parameters", "seconds")}
    assert (budget["steps"], budget["images_seen"], budget["parameters"]) == (2, 8, 4 * 64)  # all 10 classes, drop_last
    assert {k: reused[k] for k in budget} == budget and reused["history"] == []
    assert set(transfer[0]["intervals"]) == {"tuxpaint", "average"}

    df = collect(tmp_path).set_index(["protocol", "method", "split"])
    row = df.loc[("base_to_novel", "coop", "base")]
    assert (row["n"], row["test"], row["correct"]) == (b2n["coop"]["test_sizes"]["base"],
                                                       b2n["coop"]["test_items"]["base"], b2n["coop"]["correct"]["base"])
    assert [row["lo"], row["hi"]] == b2n["coop"]["intervals"]["base"]
    assert (row["steps"], row["images_seen"], row["parameters"]) == (1, 4, 4 * 64)
    assert df.loc[("domain_generalization", "coop", "average"), "steps"] == 2


def test_records_written_before_the_evidence_still_load(tmp_path):
    """Records without correctness, intervals or the new budget counts: NaN / None in `collect`."""
    from glad_core.results import collect

    rec = {"cell": {"protocol": "base_to_novel", "dataset": "tuxpaint", "method": "glad", "seed": 1, "shots": 1,
                    "backbone": "glad-mini"}, "params": {}, "metrics": {"base": 0.5, "novel": 0.25, "hm": 1 / 3},
           "test_sizes": {"base": 30, "novel": 24}, "train": {"steps": 2, "seconds": 1.5, "reused_adapter": False},
           "timings": {"eval_s": 3.0}, "device": "x86_64"}
    (tmp_path / "old.json").write_text(json.dumps(rec))
    moved = {**rec, "train": {"steps": 0, "seconds": 0.0, "reused_adapter": True}}  # reused, budget not recorded
    (tmp_path / "reused.json").write_text(json.dumps(moved))
    df = collect(tmp_path)
    old = df[df["record"].str.endswith("old.json")].set_index("split")
    assert old["lo"].isna().all() and old["hi"].isna().all() and old["correct"].isna().all()
    assert old.loc["base", "n"] == 30 and old.loc["base", "steps"] == 2 and old.loc["base", "train_s"] == 1.5
    assert old["images_seen"].isna().all() and old["parameters"].isna().all()
    assert df[df["record"].str.endswith("reused.json")]["steps"].isna().all()


def _record(root, dataset, method, seed, splits, evidence=True, steps=0, protocol="base_to_novel"):
    """A results record of per-image correctness `splits` ({split: bools}), HM added; without its bits when not
    `evidence` (as written before them)."""
    metrics = {k: float(np.mean(v)) for k, v in splits.items()}
    metrics["hm"] = float(harmonic_mean(metrics["base"], metrics["novel"]))
    rec = {"cell": {"protocol": protocol, "dataset": dataset, "method": method, "seed": seed, "shots": 1,
                    "backbone": "glad-mini"},
           "params": {"protocol": protocol, "dataset": dataset, "method": method, "seed": seed},
           "metrics": metrics, "test_sizes": {k: len(v) for k, v in splits.items()},
           "train": {"steps": steps, "images_seen": 4 * steps, "parameters": 50 * steps, "seconds": steps / 2,
                     "reused_adapter": False}, "timings": {"eval_s": 1.0}, "device": "cpu"}
    if evidence:
        rec["test_items"] = {k: stats.items_digest([_Item(f"{dataset}/{k}/{i}.png", 0) for i in range(len(v))])
                             for k, v in splits.items()}
        rec["correct"] = {k: stats.pack(v) for k, v in splits.items()}
    path = root / dataset / method / f"seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return rec


class _Item:
    def __init__(self, impath: str, label: int):
        self.impath, self.label = impath, label


def test_table_intervals_and_paired_differences_against_direct_computations(tmp_path):
    """Seed means, HM and paired differences of the tables' draws, computed directly from the records' bits;
    identical predictions differ by exactly [0, 0]; a record without bits shows '—'."""
    from glad_core import evidence, report
    from glad_core.results import collect

    rng = np.random.default_rng(3)
    zs = {"base": rng.random(60) < 0.5, "novel": rng.random(40) < 0.6}
    glad = {}
    for seed in (1, 2):
        _record(tmp_path, "tuxpaint", "zeroshot", seed, zs)
        base = zs["base"].copy()
        base[np.flatnonzero(~base)[: 6 + 3 * seed]] = True  # right on 9 / 12 more base images
        glad[seed] = {"base": base, "novel": zs["novel"]}
        _record(tmp_path, "tuxpaint", "glad", seed, glad[seed], steps=10)
    _record(tmp_path, "tuxpaint", "coop", 1, {"base": zs["base"], "novel": ~zs["novel"]}, evidence=False, steps=5)
    t = report.base_to_novel_comparison(collect(tmp_path)).set_index(["method", "split"])
    rec = json.loads((tmp_path / "tuxpaint" / "glad" / "seed1.json").read_text())
    tests = rec["test_items"]

    def draws(split, *vectors):  # the seed mean's bootstrap draws (%), every vector on the same resampled images
        return 100 * stats.resampled_accuracy(np.stack(vectors, axis=1), tests[split]).mean(axis=1)

    g = {s: draws(s, glad[1][s], glad[2][s]) for s in ("base", "novel")}
    z = {s: draws(s, zs[s], zs[s]) for s in ("base", "novel")}
    for split in ("base", "novel"):
        assert (t.loc[("glad", split), "lo"], t.loc[("glad", split), "hi"]) == pytest.approx(stats.interval(g[split]))
    hm = harmonic_mean(g["base"], g["novel"])
    assert (t.loc[("glad", "hm"), "lo"], t.loc[("glad", "hm"), "hi"]) == pytest.approx(stats.interval(hm))
    assert t.loc[("glad", "hm"), "lo"] < t.loc[("glad", "hm"), "mean"] < t.loc[("glad", "hm"), "hi"]
    assert np.isnan(t.loc[("coop", "base"), "lo"])
    assert t.loc[("glad", "base"), "steps"] == 10 and t.loc[("glad", "base"), "parameters"] == 500

    p = evidence.paired_differences(t.reset_index()).set_index(["method", "split"])
    assert set(p["reference"]) == {"zeroshot"}
    for split in ("base", "novel", "hm"):
        assert p.loc[("glad", split), "diff"] == pytest.approx(t.loc[("glad", split), "mean"]
                                                               - t.loc[("zeroshot", split), "mean"])
    direct = {"base": g["base"] - z["base"], "hm": hm - harmonic_mean(z["base"], z["novel"])}
    for split, d in direct.items():
        assert (p.loc[("glad", split), "lo"], p.loc[("glad", split), "hi"]) == pytest.approx(stats.interval(d))
    assert (p.loc[("glad", "novel"), "lo"], p.loc[("glad", "novel"), "hi"]) == (0.0, 0.0)  # identical predictions
    assert p.loc[("glad", "base"), "distinguishable"] and not p.loc[("glad", "novel"), "distinguishable"]
    assert p.loc[("coop", "base"), "distinguishable"] is None and np.isnan(p.loc[("coop", "base"), "lo"])

    shown = report.display_table(t.reset_index()).xs("tuxpaint", level="dataset")
    assert shown.xs("coop", level="method")[("base", report.CI)].tolist() == [report.MISSING]
    lo, hi = stats.interval(g["base"])
    assert shown.xs("glad", level="method")[("base", report.CI)].tolist() == [f"[{lo:.2f}, {hi:.2f}]"]
    assert shown.xs("glad", level="method")[("budget", "steps")].tolist() == ["10"]
    paired = evidence.display_paired(p.reset_index())
    assert paired.loc[("tuxpaint", "glad"), "novel"] == "+0.00 [+0.00, +0.00]"
    assert paired.loc[("tuxpaint", "glad"), "base"].endswith(" *") and paired.loc[("tuxpaint", "coop"), "base"].endswith(
        report.MISSING)
    words = evidence.paired_sentences(p.reset_index())
    assert any(s.startswith("tuxpaint: glad is indistinguishable from zeroshot on novel") for s in words)
    assert any(s.startswith("tuxpaint: coop has no paired interval") for s in words)


def test_the_ablation_is_compared_with_its_row_a(tmp_path):
    from glad_core import evidence, report
    from glad_core.methods import ablation_rows
    from glad_core.results import collect

    rng = np.random.default_rng(4)
    a = {"base": rng.random(30) < 0.5, "novel": rng.random(20) < 0.5}
    _record(tmp_path, "tuxpaint", ablation_rows()["a"], 1, a, steps=3)
    _record(tmp_path, "tuxpaint", ablation_rows()["b"], 1, a, steps=3)
    _record(tmp_path, "tuxpaint", "zeroshot", 1, {"base": ~a["base"], "novel": a["novel"]})
    p = evidence.paired_differences(report.ablation_comparison(collect(tmp_path)))
    assert set(p["reference"]) == {ablation_rows()["a"]} and set(p["row"]) == {"b", "-"}
    same = p[p["row"] == "b"]
    assert (same["diff"] == 0).all() and (same["lo"] == 0).all() and (same["hi"] == 0).all()


def test_figures_of_one_cell_do_not_overwrite_each_other(tmp_path):
    from glad_core import params as P
    from glad_core.report import figure_path

    [cell] = P.cells({"datasets": ["tuxpaint"], "methods": ["glad"], "results_dir": str(tmp_path)})
    paths = [figure_path([cell], "base_to_novel", kind) for kind in ("", "paired", "budget")]
    assert paths[0] == cell.record_path.with_suffix(".png") and len(set(paths)) == 3
    assert paths[1].name == cell.record_path.stem + "_paired.png"
