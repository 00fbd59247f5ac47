"""Batch runs (the job model glad_core/jobs.py, its command line glad_core/batch.py): the plan of parameter
files, shards, done / to do, conflicts, --explain.

Executing the plan's notebooks is tested in test_notebooks.py, on Dask in test_cluster.py.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_demo_plan_holds_every_demo_file_in_one_results_folder(tmp_path):
    """`make demo` plans params/demo/*.yaml together: two base-to-novel files (Fashion-MNIST, Tux Paint), the
    ablation, the transfer files and mini-PACS with clip art held out, one record each; MuGCP with Tux Paint's
    descriptions."""
    from glad_core import jobs as J

    jobs = J.plan(sorted((ROOT / "params" / "demo").glob("*.yaml")), {"results_dir": str(tmp_path)})
    assert len(jobs) == len({j.cell.record_path for j in jobs}) == 44  # 40 before mini-PACS's 4
    assert {j.cell.dataset for j in jobs if j.cell.protocol == "base_to_novel"} == {"clipart", "fashion_mnist",
                                                                                     "tuxpaint"}
    [mugcp] = [j for j in jobs if j.cell.train.method == "mugcp"]
    assert mugcp.cell.dataset == "tuxpaint" and mugcp.cell.train.hparams["descriptions"] == "tuxpaint"
    assert mugcp.cell.train.hparams["test_descriptions"] == "auto" and not mugcp.cell.train.hparams["oracle"]
    msdg = [j for j in jobs if j.cell.protocol == "multi_source_dg"]  # clip art held out of mini-PACS
    assert {(j.cell.dataset, j.cell.targets[0]) for j in msdg} == {("mini_pacs", "clip_art")}
    assert [j.cell.train.method for j in msdg] == ["zeroshot", "glad", "clipood", "clipood+guidg"]


def test_batch_rejects_a_bad_shard(capsys):
    from glad_core import batch

    assert batch.main([str(ROOT / "params" / "base_to_novel.yaml"), "--dry-run", "--shard", "4/4"]) == 2
    assert "0 <= i < n" in capsys.readouterr().err


def test_batch_shards_are_disjoint_complete_and_keep_shared_adapters_together(tmp_path):
    from glad_core import jobs as J

    files = [ROOT / "params" / f"{p}.yaml" for p in ("base_to_novel", "ablation", "cross_dataset",
                                                     "domain_generalization")]
    jobs = J.plan(files, {"results_dir": str(tmp_path)})
    keys = [str(j.cell.record_path) for j in jobs]
    assert len(keys) == len(set(keys)) == 231 + 2 * 2 * 3  # transfer: (zeroshot, glad) x 3 seeds, 2 protocols
    shards = [J.shard(jobs, i, 4) for i in range(4)]
    assert sum(len(s) for s in shards) == len(jobs)
    assert set().union(*({str(j.cell.record_path) for j in s} for s in shards)) == set(keys)
    assert J.shard(jobs, 1, 4) == shards[1]  # deterministic
    for s in shards:  # a cross-dataset cell and the domain-generalization cell sharing its adapter
        units = {j.unit for j in s}
        assert all(j.unit in units for j in jobs if j.unit in units)
    transfer = [j for j in jobs if j.cell.protocol != "base_to_novel" and j.cell.train.method == "glad"]
    assert len({j.unit for j in transfer}) == 3 and len(transfer) == 6


def test_batch_status_and_conflicts(tmp_path):
    from glad_core import jobs as J

    [job] = J.plan([{"datasets": ["tuxpaint"], "methods": ["zeroshot"], "results_dir": str(tmp_path)}])
    assert job.params["dataset"] == "tuxpaint" and "datasets" not in job.params  # one cell, flat
    assert not J.is_done(job) and not J.is_done(job, only_missing=True)
    job.cell.record_path.parent.mkdir(parents=True)
    job.cell.record_path.write_text("{}")
    assert J.is_done(job, only_missing=True) and not J.is_done(job)  # record, no executed notebook
    nb = nbformat.v4.new_notebook(metadata={"papermill": {"end_time": "2026-01-01T00:00:00", "exception": None}})
    nbformat.write(nb, job.output)
    assert J.is_done(job)
    with pytest.raises(J.BatchError, match="same record"):  # only what does not change the numbers
        J.plan([{"datasets": ["tuxpaint"], "device": d, "results_dir": str(tmp_path)} for d in ("cpu", "auto")])
    two = J.plan([{"datasets": ["tuxpaint"], "epochs": e, "results_dir": str(tmp_path)} for e in (1, 2)])
    assert len({j.cell.record_path for j in two}) == 2  # another value of a parameter is another record


def test_batch_explain_shows_each_methods_values_and_their_sources(tmp_path, capsys):
    """`--dry-run --explain`: one JSON line per method, every value it reads and where it came from."""
    import json

    from glad_core.batch import main

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"datasets": ["tuxpaint"], "methods": ["glad", "coop", "zeroshot"], "epochs": 3,
                                    "rank": 4, "method_settings": {"glad": {"lr": 0.004}}}))
    assert main([str(path), "--dry-run", "--explain", "--set", "batch_size=8"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["file"], d["method"]) for d in lines] == [(str(path), m) for m in ("glad", "coop", "zeroshot")]
    glad, coop, zeroshot = (d["params"] for d in lines)
    src = {d["method"]: d["sources"] for d in lines}
    assert set(src["glad"]) == set(glad) and set(src["coop"]) == set(coop)
    assert (glad["lr"], glad["epochs"], glad["batch_size"], glad["rank"], glad["alpha"]) == (0.004, 3, 8, 4, 0.5)
    assert (src["glad"]["lr"], src["glad"]["epochs"], src["glad"]["batch_size"], src["glad"]["rank"],
            src["glad"]["alpha"]) == ("method_settings", "file", "command line", "file", "method default")
    assert (coop["lr"], coop["epochs"], coop["weight_decay"]) == (0.002, 3, 5e-4)  # its recipe, but the flat epochs
    assert src["coop"]["lr"] == "method default" and "rank" not in coop  # a key it does not declare
    assert "alpha" not in coop and "rho" not in coop  # no step rule: coop does not read them
    assert set(zeroshot) == {"device", "precision", "num_workers", "eval_batch_size"}  # it trains nothing
    assert main([str(path), "--explain"]) == 2 and "add --dry-run" in capsys.readouterr().err
