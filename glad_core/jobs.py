"""The job model of batch runs: a plan of cells (`Job`: one executed notebook per cell), sharding, status,
and running jobs here one after another; `glad_core.batch` is its command line, `glad_core.cluster` runs
the same jobs on Dask workers."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import params as P
from .protocols import Cell

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = {"base_to_novel": "base_to_novel.ipynb", "cross_dataset": "cross_dataset.ipynb",
             "domain_generalization": "domain_generalization.ipynb", "multi_source_dg": "multi_source_dg.ipynb"}
REPORT = NOTEBOOK_DIR / "report.ipynb"


class BatchError(RuntimeError):
    """The plan cannot be run as asked (conflicting cells, missing kernel, bad shard)."""


@dataclass
class Job:
    """One cell and the notebook execution that produces its record."""

    cell: Cell
    params: dict[str, Any]  # flat parameters injected into the notebook (one dataset, method, seed)
    notebook: Path

    @property
    def output(self) -> Path:
        """The executed notebook, beside the record."""
        return self.cell.record_path.with_suffix(".ipynb")

    @property
    def unit(self) -> str:
        """Cells with the same trained adapter form one unit (the adapter path is unique otherwise)."""
        return str(self.cell.adapter_path())

    @property
    def label(self) -> str:
        c = self.cell
        held = f" held out {c.targets[0]}" if c.protocol == "multi_source_dg" else ""
        return f"{c.protocol} {c.dataset}{held} {c.train.method} seed {c.train.seed}"


def _absolute(p: dict[str, Any]) -> dict[str, Any]:
    """Paths made absolute, so the notebook (run in notebooks/) writes where the caller meant."""
    out = {**p, "results_dir": os.path.abspath(p["results_dir"])}
    if out["data_root"] is not None:
        out["data_root"] = os.path.abspath(os.path.expanduser(out["data_root"]))
    if out["pretrained"] is not None and os.path.exists(os.path.expanduser(out["pretrained"])):
        out["pretrained"] = os.path.abspath(os.path.expanduser(out["pretrained"]))
    return out


def plan(sources: Sequence[str | Path | dict[str, Any]], overrides: dict[str, Any] | None = None) -> list[Job]:
    """Every cell of the grids, one job each, deduplicated, with the cells of a unit adjacent."""
    jobs: dict[Path, Job] = {}
    for source in sources:
        p = _absolute(P.load(source, **(overrides or {})))
        flat = {k: v for k, v in p.items() if k not in P.GRID_KEYS}
        for cell in P.cells(p):
            one = {"dataset": cell.dataset, "method": cell.train.method, "seed": cell.train.seed}
            if cell.protocol == "multi_source_dg":
                one["held_out"] = cell.targets  # one held-out domain per job
            job = Job(cell, {**flat, **one}, NOTEBOOK_DIR / NOTEBOOKS[cell.protocol])
            seen = jobs.setdefault(cell.record_path, job)
            if seen.cell.params() != cell.params():
                diff = sorted(k for k, v in cell.params().items() if seen.cell.params()[k] != v)
                raise BatchError(f"two parameter sets write the same record {cell.record_path} with different "
                                 f"{diff}; give one of them its own results_dir")
    units: dict[str, list[Job]] = {}
    for job in jobs.values():
        units.setdefault(job.unit, []).append(job)
    return [job for unit in units.values() for job in unit]


def shard(jobs: list[Job], index: int, count: int) -> list[Job]:
    """Units index, index + count, ... of the plan (disjoint over index, together the whole plan)."""
    if not 0 <= index < count:
        raise BatchError(f"shard {index}/{count}: need 0 <= i < n")
    units = list(dict.fromkeys(job.unit for job in jobs))
    mine = set(units[index::count])
    return [job for job in jobs if job.unit in mine]


def _finished(notebook: Path) -> bool:
    """Whether an executed notebook ran to its end without error."""
    import nbformat

    try:
        meta = nbformat.read(notebook, as_version=4).metadata.get("papermill", {})
    except (OSError, ValueError):
        return False
    return meta.get("end_time") is not None and not meta.get("exception")


def is_done(job: Job, only_missing: bool = False) -> bool:
    """Record written (and, unless `only_missing`, its notebook executed without error)."""
    return job.cell.record_path.exists() and (only_missing or _finished(job.output))


def check_kernels(notebooks: Iterable[Path]) -> None:
    """Fail early, with the install command, when a notebook's kernel is not installed."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    for notebook in sorted(set(notebooks)):
        name = nbformat.read(notebook, as_version=4).metadata.kernelspec.name
        try:
            KernelSpecManager().get_kernel_spec(name)
        except NoSuchKernel:
            raise BatchError(f"{notebook.name} runs on the Jupyter kernel {name!r}, which is not installed; "
                             f"install it with: {sys.executable} -m ipykernel install --prefix {sys.prefix} "
                             f"--name {name}") from None


def execute(notebook: Path, output: Path, parameters: dict[str, Any]) -> None:
    """Execute `notebook` (in its folder) with `parameters` injected into `output`; raises on a failing cell."""
    import papermill as pm

    logging.getLogger("papermill").setLevel(logging.ERROR)  # cells get every key, declared in the notebook or not
    output.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(notebook), str(output), parameters=parameters, cwd=str(notebook.parent),
                        progress_bar=False,
                        extra_arguments=["--IPKernelApp.log_level=ERROR"])  # no per-cell kernel banner warnings


def todo(jobs: Sequence[Job], only_missing: bool = False) -> list[Job]:
    """The jobs not done yet, in plan order."""
    return [job for job in jobs if not is_done(job, only_missing)]


def failure(job: Job, error: BaseException) -> str:
    """The report of a failed cell, naming its executed notebook (which holds the traceback)."""
    why = f"{type(error).__name__}: {error}".splitlines()
    return f"FAILED {job.label}: {why[0] if why else ''}\n    see {job.output}"


def attempt(job: Job) -> str | None:
    """Execute one job; None when it succeeded, else its failure report."""
    try:
        execute(job.notebook, job.output, job.params)
    except Exception as e:  # a failed cell is reported; the others go on
        return failure(job, e)
    return None


def run(jobs: Sequence[Job], only_missing: bool = False, progress: bool = True) -> list[str]:
    """Execute every job not done, here, one after the other; returns one message per failed cell."""
    from tqdm.auto import tqdm

    pending = todo(jobs, only_missing)
    check_kernels(job.notebook for job in pending)
    failures: list[str] = []
    bar = tqdm(pending, desc="cells", unit="cell", disable=not progress)
    for job in bar:
        bar.set_postfix_str(job.label)
        msg = attempt(job)
        if msg:
            failures.append(msg)
            bar.write(msg, file=sys.stderr)
    bar.close()
    return failures


def report_path(results_dir: str | Path) -> Path:
    """Where the report of `results_dir` goes: `<results_dir>/report/report.md`, its notebook beside it."""
    return Path(results_dir).resolve() / "report" / "report.md"


def report(results_dir: str | Path) -> Path:
    """Execute the report notebook on every record under `results_dir`; returns the written report.md
    (report.html beside it: the executed notebook as one self-contained page)."""
    from .webpage import write_html

    out = report_path(results_dir).parent
    check_kernels([REPORT])
    execute(REPORT, out / REPORT.name, {"results_dir": str(out.parent), "out_dir": str(out)})
    write_html(out / REPORT.name)
    return report_path(results_dir)
