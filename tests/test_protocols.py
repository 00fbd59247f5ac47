"""Protocols (glad_core/protocols.py): a cell's record is its identity. The same parameters and seed give the
same record; a parameter the method reads trains anew beside the old record, one it does not read never does."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import cell_params, comparable
from glad_core import params as P
from glad_core.protocols import run_cell

pytestmark = pytest.mark.usefixtures("one_thread")


def test_same_parameters_and_seed_give_identical_records(tiny_config, data_root, tmp_path):
    records = []
    for run in ("a", "b"):
        params = cell_params(tiny_config, data_root, tmp_path / run, methods=["glad"], epochs=2)
        (cell,) = P.cells(params)
        rec = run_cell(cell, progress=False)
        records.append(comparable(rec))
    assert records[0]["metrics"] == records[1]["metrics"]  # exact float equality
    assert records[0] == records[1]


def test_a_changed_parameter_trains_anew_and_an_unchanged_one_is_reused(tiny_config, data_root, tmp_path):
    """The record's address names every parameter that changes it: alpha 0.5 -> 0.3 is a new record
    beside the old one; the same parameters again reuse the record without touching it."""
    cells = {}
    for alpha in (0.5, 0.3):
        (cells[alpha],) = P.cells(cell_params(tiny_config, data_root, tmp_path, alpha=alpha, epochs=1))
    first = run_cell(cells[0.5], progress=False)
    stamp = cells[0.5].record_path.stat().st_mtime_ns
    assert cells[0.3].record_path != cells[0.5].record_path and not cells[0.3].record_path.exists()
    second = run_cell(cells[0.3], progress=False)
    assert {first["params"]["alpha"], second["params"]["alpha"]} == {0.5, 0.3}
    assert cells[0.5].record_path.exists() and cells[0.3].record_path.exists()
    assert run_cell(cells[0.5], progress=False)["metrics"] == first["metrics"]
    assert cells[0.5].record_path.stat().st_mtime_ns == stamp  # read, not rerun
    # what does not change the numbers keeps the address: the device, evaluation batching, the data's place
    (same,) = P.cells(cell_params(tiny_config, data_root, tmp_path, alpha=0.5, epochs=1, eval_batch_size=7,
                                   device="auto"))
    assert same.record_path == cells[0.5].record_path
    from glad_core.results import collect
    df = collect(tmp_path)
    assert sorted(set(df["setting"])) == ["alpha=0.3", "alpha=0.5"]  # reported apart, never averaged


def test_a_knob_a_method_does_not_read_never_retrains_it(tmp_path):
    """The record's identity holds only what the method reads: alpha retrains glad (step rule gradreg), not
    coop or lora (no step rule); eval_batch_size only GuiDG with batch-averaged attention."""
    def paths(**kw: Any) -> dict[str, Path]:
        p = {"datasets": ["tuxpaint"], "methods": ["glad", "coop", "lora", "zeroshot"], "results_dir": str(tmp_path),
             **kw}
        return {c.train.method: c.record_path for c in P.cells(p)}

    before, after = paths(alpha=0.5), paths(alpha=0.3)
    assert before["glad"] != after["glad"]
    assert {m: before[m] == after[m] for m in ("coop", "lora", "zeroshot")} == {"coop": True, "lora": True,
                                                                                "zeroshot": True}
    assert paths(lr=0.004)["zeroshot"] == before["zeroshot"] and paths(lr=0.004)["coop"] != before["coop"]
    (lora_sam,) = P.cells({"datasets": ["tuxpaint"], "methods": ["lora"],
                           "method_settings": {"lora": {"step_rule": "sam"}}})
    assert "rho" in lora_sam.identity() and "alpha" in lora_sam.identity()  # read under a step rule

    def guidg(**kw: Any) -> Path:
        (cell,) = P.cells({"protocol": "multi_source_dg", "datasets": ["mini_pacs"], "held_out": ["sketch"],
                           "methods": ["guidg"], "results_dir": str(tmp_path), **kw})
        return cell.record_path

    assert guidg(eval_batch_size=64) != guidg()  # 36: the attention is averaged over each evaluation batch
    assert guidg(eval_batch_size=64, attention="image") == guidg(attention="image")  # per image: no effect
    assert guidg(kl_weight=1.0) == guidg()  # GuiDG's loss has no KL term
    assert paths(eval_batch_size=7, device="cpu", num_workers=1) == before  # never the numbers of these
