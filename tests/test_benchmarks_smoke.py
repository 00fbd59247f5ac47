"""The benchmark scripts run end to end on a tiny model and write their rows (no timing checks).

Each runs as `python -m benchmarks.<script> --smoke` from the project root, as documented.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
MODEL = "glad-bench-tiny"
pytestmark = pytest.mark.benchmark
ROWS = ("1a", "1b", "1c", "2", "3", "4a", "4b", "4c", "5a", "5b", "5c", "6a", "6b", "7", "9a")


def _rows(text: str) -> dict[str, list[list[str]]]:
    """Table rows of the tiny model by row key, split into cells."""
    out: dict[str, list[list[str]]] = {}
    for line in text.splitlines():
        if line.startswith(f"| {MODEL} |"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            out.setdefault(cells[1], []).append(cells)
    return out


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m benchmarks.<name> *args` in the project root; fails the test on a non-zero exit."""
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_smoke_run_prints_every_row_and_writes_results(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = _script("run", "--quick", "--smoke", "--out", str(out))
    printed = _rows(proc.stdout)
    assert set(printed) >= set(ROWS), sorted(set(ROWS) - set(printed))

    text = out.read_text()
    for part in ("# Benchmarks", "- Machine:", "- Versions:", "- Threads:", "- Date:", "## Results", "## How to run",
                 "## Method", "| model | # | measurement | value | target | met | note |"):
        assert part in text, part
    written = _rows(text)
    assert set(written) == set(printed)
    for key, rows in written.items():
        for cells in rows:
            assert len(cells) == 7 and cells[5] in ("yes", "**no**", "n/a"), cells
    # structural checks, independent of timing: equal text features, first graph freed, GPU note
    assert all(cells[5] == "yes" for cells in written["4c"])
    assert written["6b"][0][5] == "yes"
    if not torch.cuda.is_available():
        assert "no GPU was available for this measurement" in written["7"][0][6]


@pytest.mark.parametrize("script, rows", [("mugcp", 3), ("guidg", 3), ("prompts", 4), ("deep_prompts", 8),
                                         ("feature_cache", 2), ("pipeline", 1)])
def test_method_benchmarks_smoke(script, rows, tmp_path):
    out = tmp_path / "rows.json"
    proc = _script(script, "--smoke", "--json", str(out))
    data = json.loads(out.read_text())
    written = [r for model_rows in (data.values() if isinstance(data, dict) else [data]) for r in model_rows]
    assert len(written) == rows
    for r in written:
        assert set(r) == {"what", "value", "target", "met", "note"} and r["met"] in (True, False, None), r
        assert r["what"] in proc.stdout  # printed as a table too
    if script == "prompts":  # structural, not timing: the batched call gives the loop's features and gradients
        equal = written[0]
        assert equal["met"] is True and float(equal["value"]) <= 1e-5, equal
        assert float(equal["note"].rsplit(" ", 1)[1]) <= 1e-4, equal  # gradients' max relative difference
    if script == "feature_cache":  # structural: the cached evaluation gives the uncached one's results
        assert written[0]["note"].endswith("same results: True"), written[0]


@pytest.mark.cluster
def test_cluster_smoke_times_the_grid_on_one_and_two_workers():
    """Local Dask clusters of 1 and 2 workers run the smoke grid's cells (sleeping 1 s) and empty cells."""
    proc = _script("cluster", "--smoke", "--empty", "10")
    lines = proc.stdout.splitlines()
    cells = len(yaml.safe_load((ROOT / "params" / "smoke" / "base_to_novel.yaml").read_text())["methods"])
    for w in (1, 2):
        [row] = [x for x in lines if x.startswith(f"| smoke (sleeping cells) grid, {cells} cells, {w} worker(s)")]
        per_minute = float(row.split("| ")[2].split(" cells/min")[0])
        assert 0 < per_minute <= 60 * w * 1.05, row  # cells sleep 1 s each: at most one per second and worker
        overhead_row = f"| scheduling overhead per empty cell, {w} worker(s) (10 cells)"
        [overhead] = [x for x in lines if x.startswith(overhead_row)]
        assert float(overhead.split("| ")[2].split(" ms")[0]) > 0, overhead
    assert any(x.startswith("| speed-up, 2 workers against 1 |") for x in lines)
    assert "cores; load average" in proc.stdout
