"""Notebooks and batch runs, end to end on the smoke parameters (params/smoke/: glad-mini, Tux Paint).

Every notebook is executed headlessly through papermill with its smoke parameters, writing into a
temporary results folder; its own assert cells check the invariants. Then nbval (`--nbval-lax`)
executes a copy of the notebook carrying the golden outputs of its `# NBVAL_CHECK_OUTPUT` cells
(tests/golden/<notebook>.ipynb) and compares them, sanitized by tests/nbval_sanitize.cfg. That second
execution reads the records of the first, so it costs a kernel start, not a training run.

After an intended change of the printed metrics, regenerate the golden outputs with
`GLAD_UPDATE_GOLDEN=1 pytest tests/test_notebooks.py` and review the diff of tests/golden/.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SMOKE = ROOT / "params" / "smoke"
GOLDEN = Path(__file__).resolve().parent / "golden"
SANITIZE = Path(__file__).resolve().parent / "nbval_sanitize.cfg"
CHECK = "# NBVAL_CHECK_OUTPUT"
# notebook -> its smoke parameter file (None: the report, which only reads records)
SMOKE_PARAMS = {"base_to_novel": "base_to_novel.yaml", "loss_landscape": "base_to_novel.yaml",
                "ablation": "ablation.yaml", "cross_dataset": "cross_dataset.yaml",
                "domain_generalization": "domain_generalization.yaml", "multi_source_dg": "multi_source_dg.yaml",
                "mugcp_providers": "mugcp_providers.yaml", "report": None}
# the notebook's own parameters on top of its file's: the landscape of base-to-novel's LoRA and GLAD cells (their
# records reused), on a 3 x 3 grid over 4 images, without the top Hessian eigenvalue (Hessian-vector products
# through glad-mini's convolutions take minutes on a CPU; test_landscape.py checks them on tiny towers of its kinds)
SMOKE_OVERRIDES = {"loss_landscape": {"methods": ["lora", "glad"], "grid_points": 3, "max_images": 4,
                                      "hessian_iters": 0}}
DEMO_DATA = ["tuxpaint", "clipart", "clipart10"]  # built by conftest.jupyter_env
OWN_RESULTS = {"mugcp_providers"}  # study notebooks (variants of a method): own results folder, not in the report


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """One results folder for the module: later notebooks reuse the records of earlier ones."""
    return tmp_path_factory.mktemp("results")


def _batch(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glad_core.batch", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def _smoke(name: str, results: Path) -> dict:
    """The smoke parameters of a notebook, results redirected."""
    if SMOKE_PARAMS[name] is None:
        return {"results_dir": str(results)}
    p = yaml.safe_load((SMOKE / SMOKE_PARAMS[name]).read_text())
    return {**p, **SMOKE_OVERRIDES.get(name, {}), "results_dir": str(results)}


# ----------------------------------------------------------------------------- batch


@pytest.mark.notebook
def test_batch_runs_every_cell_reports_a_failure_goes_on_and_resumes(jupyter_env, results, tmp_path):
    # a cell that fails (a standard dataset with no data), planned before the smoke cells
    failing = {"datasets": ["eurosat"], "methods": ["zeroshot"], "shots": 1, "backbone": "glad-mini",
               "data_root": str(tmp_path / "no-data")}
    (tmp_path / "failing.yaml").write_text(yaml.safe_dump(failing))
    grid = [str(tmp_path / "failing.yaml"), str(SMOKE / "base_to_novel.yaml"), "--set", f"results_dir={results}"]
    r = _batch(grid, jupyter_env)
    assert r.returncode == 1, r.stdout + r.stderr
    [failed] = results.glob("base_to_novel/eurosat/glad-mini/zeroshot/shots1_seed1_*.ipynb")
    assert "FAILED base_to_novel eurosat zeroshot seed 1" in r.stderr and str(failed) in r.stderr
    errors = [o for c in nbformat.read(failed, as_version=4).cells for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert errors and errors[0].ename == "DatasetError" and not failed.with_suffix(".json").exists()

    records = sorted(results.glob("base_to_novel/tuxpaint/glad-mini/*/shots1_seed1_*.json"))
    assert [p.parent.name for p in records] == ["cocoop", "coop", "glad", "lora", "zeroshot"]  # the others went on
    for record in records:
        executed = nbformat.read(record.with_suffix(".ipynb"), as_version=4)
        assert executed.metadata.papermill.exception is None
        injected = next(c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", []))
        assert f'method = "{record.parent.name}"' in injected.source and 'dataset = "tuxpaint"' in injected.source
        assert record.with_suffix(".png").stat().st_size > 0
    stamps = [p.with_suffix(".ipynb").stat().st_mtime_ns for p in records]

    again = _batch(grid[1:], jupyter_env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "5 cells (shard 0/1): 5 done, 0 to run" in again.stdout
    assert [p.with_suffix(".ipynb").stat().st_mtime_ns for p in records] == stamps  # nothing re-executed
    failed.unlink()  # leaves the module's results to the smoke cells


def test_batch_dry_run_lists_the_plan(jupyter_env, tmp_path):
    paper = [str(ROOT / "params" / f) for f in ("base_to_novel.yaml", "ablation.yaml")]
    r = _batch([*paper, "--dry-run", "--set", f"results_dir={tmp_path}"], jupyter_env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # 11 datasets x 3 seeds x (zeroshot, lora, glad) + (lora+sam, lora+gradreg, lora+alignnet, glad-nokl):
    # lora and glad once, their records shared by both files
    assert lines[0] == "231 cells (shard 0/1): 0 done, 231 to run"
    assert len(lines) == 232 and all(line.startswith("todo  ") for line in lines[1:])
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


# ----------------------------------------------------------------------------- notebooks


def _check_cells(nb: nbformat.NotebookNode) -> list:
    return [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(CHECK)]


@pytest.mark.notebook
@pytest.mark.parametrize("name", list(SMOKE_PARAMS))
def test_notebook(name, jupyter_env, results, tmp_path):
    import papermill as pm

    source = NOTEBOOKS / f"{name}.ipynb"
    nb = nbformat.read(source, as_version=4)
    nbformat.validate(nb)
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "store notebooks without outputs"
    assert _check_cells(nb), f"{name} has no {CHECK} cell"
    executed, check = tmp_path / "executed.ipynb", tmp_path / "check" / source.name
    check.parent.mkdir()
    if name in OWN_RESULTS:
        results = tmp_path / "results"
    if name == "report":  # every smoke record present whichever tests ran before, then the batch runs the report
        grids = sorted({str(SMOKE / f) for n, f in SMOKE_PARAMS.items() if f and n not in OWN_RESULTS})
        r = _batch([*grids, "--only-missing", "--report",
                    "--set", f"results_dir={results}"], jupyter_env)
        assert r.returncode == 0, r.stdout + r.stderr
        executed = results / "report" / source.name
        assert f"report: {results / 'report' / 'report.md'}" in r.stdout
    else:  # raises on any failing cell, the assert cells included
        pm.execute_notebook(str(source), str(executed), parameters=_smoke(name, results), cwd=str(NOTEBOOKS),
                            progress_bar=False)
    golden = GOLDEN / source.name
    if os.environ.get("GLAD_UPDATE_GOLDEN"):
        cells = _check_cells(nbformat.read(executed, as_version=4))
        for cell in cells:  # outputs only: no timestamps to churn the diff
            cell.metadata = {}
        out = nbformat.v4.new_notebook(cells=cells, metadata=nb.metadata)
        golden.parent.mkdir(exist_ok=True)
        nbformat.write(out, golden)
        pytest.skip(f"golden outputs written to {golden}")
    assert golden.exists(), f"no golden outputs for {name}: run GLAD_UPDATE_GOLDEN=1 pytest {__file__}"

    pm.execute_notebook(str(source), str(check), parameters=_smoke(name, results), prepare_only=True)
    stored = {c.id: c for c in nbformat.read(golden, as_version=4).cells}
    prepared = nbformat.read(check, as_version=4)
    for cell in _check_cells(prepared):
        assert cell.id in stored, f"{name}: check cell {cell.id} has no golden output; regenerate (see module doc)"
        cell.outputs, cell.execution_count = stored[cell.id].outputs, stored[cell.id].execution_count
    nbformat.write(prepared, check)
    r = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-sanitize-with", str(SANITIZE),
                        "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", str(check.parent), "-q", str(check)],
                       cwd=check.parent, env=jupyter_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{name}: outputs differ from {golden}\n{r.stdout[-6000:]}{r.stderr[-2000:]}"
    if name == "report":
        report = results / "report" / "report.md"
        assert report.exists() and "80.68" in report.read_text()  # GLAD's published Table 1 average
        paired = {"base_to_novel", "ablation"}  # the smoke tables with a reference (zero-shot; row a)
        tables = ["base_to_novel", "cross_dataset", "domain_generalization", "ablation", "multi_source_dg"]
        assert sorted(p.name for p in report.parent.glob("*.png")) == sorted(
            f"table{i}_{name}{kind}.png" for i, name in enumerate(tables, 1)
            for kind in ("", "_budget", *(["_paired"] if name in paired else [])))
        text = report.read_text()
        assert text.count("Difference from") == len(paired) and "95% CI" in text and "budget steps" in text
