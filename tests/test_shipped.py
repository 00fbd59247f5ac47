"""Every notebook and benchmark script that ships is run by a test (on smoke settings).

`RUN_BY` names the test that runs each script and notebook. A file nobody lists fails here: add its
smoke test and list it. A benchmark module that a listed script imports (`benchmarks.common`,
`.timing`, `.memory`, the package itself) runs with that script.
"""
from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_TEST = "tests/test_notebooks.py::test_notebook"
SMOKE_TESTS = "tests/test_benchmarks_smoke.py"
RUN_BY = {
    **{f"notebooks/{name}.ipynb": NOTEBOOK_TEST
       for name in ("ablation", "base_to_novel", "cross_dataset", "domain_generalization", "loss_landscape",
                    "mugcp_providers", "multi_source_dg", "report")},
    "benchmarks/run.py": f"{SMOKE_TESTS}::test_smoke_run_prints_every_row_and_writes_results",
    "benchmarks/prompts.py": f"{SMOKE_TESTS}::test_method_benchmarks_smoke",
    "benchmarks/guidg.py": f"{SMOKE_TESTS}::test_method_benchmarks_smoke",
    "benchmarks/mugcp.py": f"{SMOKE_TESTS}::test_method_benchmarks_smoke",
    "benchmarks/deep_prompts.py": f"{SMOKE_TESTS}::test_method_benchmarks_smoke",
    "benchmarks/feature_cache.py": f"{SMOKE_TESTS}::test_method_benchmarks_smoke",
    "benchmarks/pipeline.py": f"{SMOKE_TESTS}::test_method_benchmarks_smoke",
    "benchmarks/cluster.py": f"{SMOKE_TESTS}::test_cluster_smoke_times_the_grid_on_one_and_two_workers",
}


def _test_function(node: str):
    path, name = node.split("::")
    module = importlib.import_module(Path(path).with_suffix("").as_posix().replace("/", "."))
    return module, getattr(module, name, None)


def _imported_benchmarks(script: Path) -> set[str]:
    """The `benchmarks/<module>.py` files a script imports (and the package's `__init__.py`)."""
    names = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("benchmarks."):
            names.add(node.module.split(".")[1])
    return {f"benchmarks/{n}.py" for n in names} | {"benchmarks/__init__.py"}


def test_every_notebook_and_benchmark_script_is_run_by_a_test():
    shipped = {p.relative_to(ROOT).as_posix() for p in
               [*(ROOT / "notebooks").glob("*.ipynb"), *(ROOT / "benchmarks").glob("*.py")]}
    covered = set(RUN_BY)
    for script in RUN_BY:
        if script.endswith(".py"):
            covered |= _imported_benchmarks(ROOT / script)
    missing = sorted(shipped - covered)
    assert not missing, f"run by no test: {missing}; give each a smoke test and list it in RUN_BY ({__file__})"
    assert not sorted(set(RUN_BY) - shipped), f"RUN_BY lists files that do not exist: {sorted(set(RUN_BY) - shipped)}"


@pytest.mark.parametrize("path", sorted(RUN_BY))
def test_the_listed_test_runs_the_file(path):
    """The test exists, and runs this file: a notebook through its smoke parameters, a script by name."""
    module, fn = _test_function(RUN_BY[path])
    assert fn is not None, f"{RUN_BY[path]} (listed for {path}) does not exist"
    stem = Path(path).stem
    if path.startswith("notebooks/"):
        assert stem in module.SMOKE_PARAMS, f"{NOTEBOOK_TEST} has no smoke parameters for {stem}"
    else:  # the test names the script: `_script("<stem>", ...)` or in its parametrization
        assert f'"{stem}"' in inspect.getsource(fn), f"{RUN_BY[path]} does not run benchmarks.{stem}"
