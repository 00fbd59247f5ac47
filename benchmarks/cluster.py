"""Batch runs on Dask: cells per minute on a local cluster of 2 workers x 1 thread against 1 worker
x 1 thread (the speed-up; target >= 1.7 on 2 cores), and the scheduling overhead per cell.

    python -m benchmarks.cluster                  # the smoke grid, its 5 methods (a few minutes on 2 cores)
    python -m benchmarks.cluster --grid demo      # params/demo/base_to_novel.yaml: longer cells
    python -m benchmarks.cluster --smoke          # cells that sleep 1 s: checks the script in seconds

Each configuration gets a fresh local cluster (started before the clock starts) and a fresh results
folder, and runs the whole grid through `glad_core.cluster.run`, as `python -m glad_core.batch
--workers N` does: real notebook executions, one kernel per cell. One cell runs first, untimed, to
warm the file caches. The overhead is the wall time per empty cell (a task that returns at once)
over a few hundred of them, on the same clusters: submission, scheduling, the round trip of the
result and the bookkeeping of `run`. Other processes on the machine take cores from the workers:
the load average is printed with the numbers.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cloudpickle
from distributed import Client

from benchmarks.common import ROOT, parser
from glad_core import cluster
from glad_core import jobs as J

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this file
GRIDS = {"smoke": ROOT / "params" / "smoke" / "base_to_novel.yaml",
         "demo": ROOT / "params" / "demo" / "base_to_novel.yaml"}
TARGET = 1.7


def _empty(job: J.Job) -> None:
    """A cell that does nothing: what remains is the cost of scheduling it."""


def _sleep(job: J.Job) -> None:
    """A stand-in cell for --smoke: one second of waiting."""
    time.sleep(1.0)


@dataclass
class ClusterBench:
    """Wall times of one grid and of the empty cells, per number of workers (1 thread each)."""

    grid: str
    cells: int
    empty: int
    seconds: dict[int, float] = field(default_factory=dict)
    empty_seconds: dict[int, float] = field(default_factory=dict)

    def cells_per_minute(self, workers: int) -> float:
        return 60 * self.cells / self.seconds[workers]

    @property
    def speedup(self) -> float:
        return self.seconds[1] / self.seconds[2]

    def overhead_ms(self, workers: int) -> float:
        return 1000 * self.empty_seconds[workers] / self.empty

    def table(self) -> str:
        lines = ["| measurement | value | target | met |", "|---|---|---|---|"]
        for w in sorted(self.seconds):
            lines.append(f"| {self.grid} grid, {self.cells} cells, {w} worker(s) x 1 thread | "
                         f"{self.cells_per_minute(w):.2f} cells/min ({self.seconds[w]:.0f} s) | | |")
        met = "yes" if self.speedup >= TARGET else "**no**"
        lines.append(f"| speed-up, 2 workers against 1 | {self.speedup:.2f}x | >= {TARGET} | {met} |")
        for w in sorted(self.empty_seconds):
            lines.append(f"| scheduling overhead per empty cell, {w} worker(s) ({self.empty} cells) | "
                         f"{self.overhead_ms(w):.1f} ms | | |")
        return "\n".join(lines)


def _timed(jobs: Sequence[J.Job], client: Client, task: Callable[[J.Job], None] | None) -> float:
    t = time.perf_counter()
    failures = cluster.run(jobs, client, progress=False, **({"task": task} if task else {}))
    elapsed = time.perf_counter() - t
    if failures:
        raise RuntimeError("\n".join(failures))
    return elapsed


def measure(grid: str = "smoke", empty: int = 300, smoke: bool = False) -> ClusterBench:
    """Time the grid (the cells of its file, seed 1) and `empty` empty cells on 1 and 2 workers."""
    with tempfile.TemporaryDirectory() as tmp:
        def jobs(name: str, **overrides) -> list[J.Job]:
            return J.plan([GRIDS[grid]], {"seeds": [1], "results_dir": str(Path(tmp) / name), **overrides})

        cells = jobs("warm-up")
        if not smoke:  # file caches warm, before either configuration is timed
            failure = J.attempt(cells[0])
            if failure:
                raise RuntimeError(failure)
        bench = ClusterBench("smoke (sleeping cells)" if smoke else grid, len(cells), empty)
        for workers in (1, 2):
            with cluster.local_cluster(workers, threads=1) as lc, Client(lc) as client:
                client.wait_for_workers(workers)
                _timed(jobs(f"start{workers}", seeds=[0])[:1], client, _empty)  # workers import glad_core
                bench.seconds[workers] = _timed(jobs(f"grid{workers}"), client, _sleep if smoke else None)
                bench.empty_seconds[workers] = _timed(
                    jobs(f"empty{workers}", methods=["zeroshot"], seeds=list(range(empty))), client, _empty)
        return bench


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser(__doc__)
    cli.add_argument("--grid", choices=sorted(GRIDS), default="smoke", help="parameter file of the cells")
    cli.add_argument("--empty", type=int, default=300, help="empty cells for the scheduling overhead")
    cli.add_argument("--smoke", action="store_true", help="sleeping cells instead of notebooks: in seconds")
    args = cli.parse_args(argv)
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    bench = measure(args.grid, args.empty, args.smoke)
    print(bench.table())
    print(f"\n{cluster.cores()} cores; load average (1/5/15 min) at start {load}, "
          f"at end {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
