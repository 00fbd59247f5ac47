"""Batch plans on Dask: a local cluster of worker processes, an existing scheduler, or SLURM jobs.

    python -m glad_core.batch params/*.yaml --workers 2                     # this machine, 2 processes
    python -m glad_core.batch params/*.yaml --scheduler tcp://host:8786     # an existing Dask cluster
    python -m glad_core.batch params/*.yaml --slurm --jobs 8 --gpus-per-job 1 --partition gpu

A cell is one Dask task executing its notebook (`glad_core.jobs.attempt`). Every worker, whichever cluster it
belongs to, is prepared by the worker plugin `CellWorker`: it runs one cell at a time (a `cell`
resource of 1, which every task asks for) and the kernels it starts use the worker's threads
(OMP_NUM_THREADS). On the clusters made here (local, SLURM), whose sibling workers all see the same
GPUs, each worker also takes one GPU of its own (CUDA_VISIBLE_DEVICES); the workers of an existing
cluster keep the GPUs they were given (`dask cuda worker` puts each worker's own GPU first).

The cells of a unit (one trained adapter) are submitted one after the other, each on the worker of
the previous one, so the adapter is trained once and then reused. A worker that dies mid-cell takes
its task with it; the scheduler runs the cell again on another worker. The dead worker's kernel
exits within a second (ipykernel watches its parent), before the new run has started its own kernel,
and records are written atomically by the cell, which returns an existing record as it is: every
record is written once, complete.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import dask
from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker

from . import jobs as J
from .jobs import BatchError, Job

CELL = "cell"  # the worker resource a cell occupies; every worker has one
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def visible_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The GPUs this process sees: CUDA_VISIBLE_DEVICES when set, else every device CUDA counts."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [g.strip() for g in environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def worker_index(name: Any) -> int | None:
    """A worker's index among its siblings: its name in a local cluster (0, 1, ...), the `-i` suffix
    that `dask worker --nworkers n` gives (SLURM jobs with several workers); None otherwise."""
    if isinstance(name, int):
        return name
    match = re.fullmatch(r".*-(\d+)", str(name))
    return int(match.group(1)) if match else None


def kernel_env(name: Any, nthreads: int, environ: Mapping[str, str], pin_gpu: bool = True) -> dict[str, str]:
    """Environment of the kernels a worker starts: its thread count and (`pin_gpu`), among several
    GPUs seen by all its siblings, its own."""
    env = {var: str(nthreads) for var in THREAD_VARS}
    gpus, index = visible_gpus(environ) if pin_gpu else [], worker_index(name)
    if len(gpus) > 1 and index is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    return env


class CellWorker(WorkerPlugin):
    """Prepares every worker of the cluster, present or joining later, for cells (see the module doc)."""

    name = "glad-cell-worker"

    def __init__(self, pin_gpus: bool) -> None:
        self.pin_gpus = pin_gpus

    async def setup(self, worker) -> None:
        os.environ.update(kernel_env(worker.name, worker.state.nthreads, os.environ, self.pin_gpus))
        await worker.set_resources(**{CELL: 1})


def _on_worker(task: Callable[[Job], str | None], job: Job) -> tuple[str, str | None]:
    """Run `task` on a worker: (the worker's address, the failure message or None)."""
    return get_worker().address, task(job)


def run(jobs: Sequence[Job], client: Client, only_missing: bool = False, progress: bool = True,
        task: Callable[[Job], str | None] = J.attempt, pin_gpus: bool = False) -> list[str]:
    """Every job not done, on the workers of `client`; returns one message per failed cell. `pin_gpus`:
    give each worker one of the GPUs it sees (for clusters whose workers all see the same ones).

    The first cell of every unit is submitted at once; each next cell of a unit when the previous one
    ended, to the same worker (to another if that one is gone)."""
    from tqdm.auto import tqdm

    todo = J.todo(jobs, only_missing)
    if task is J.attempt:
        J.check_kernels(job.notebook for job in todo)
    client.register_plugin(CellWorker(pin_gpus))
    units: dict[str, deque[Job]] = {}
    for job in todo:
        units.setdefault(job.unit, deque()).append(job)
    running: dict[str, Job] = {}
    pending = as_completed()

    def submit(job: Job, worker: str | None = None) -> None:
        where: dict[str, Any] = {"workers": [worker], "allow_other_workers": True} if worker else {}
        future = client.submit(_on_worker, task, job, key=f"{job.label} {uuid.uuid4().hex[:8]}", pure=False,
                               resources={CELL: 1}, priority=1 if worker else 0, **where)
        running[future.key] = job
        pending.add(future)

    for unit in units.values():
        submit(unit.popleft())
    failures: list[str] = []
    bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not progress)
    for future in pending:
        job = running.pop(future.key)
        try:
            worker, failure = future.result()
        except Exception as e:  # the task itself failed (e.g. its worker died too often)
            worker, failure = None, J.failure(job, e)
        future.release()
        bar.update()
        bar.set_postfix_str(job.label)
        if failure:
            failures.append(failure)
            bar.write(failure, file=sys.stderr)
        if units[job.unit]:
            submit(units[job.unit].popleft(), worker)
    bar.close()
    return failures


@dataclass
class Slurm:
    """SLURM jobs of Dask workers (dask-jobqueue); one worker per GPU, or one per job without GPUs."""

    jobs: int = 1
    partition: str | None = None
    account: str | None = None
    cores: int = 4  # per job, shared by its workers
    gpus: int = 0  # per job
    memory: str = "16GB"  # per job
    walltime: str = "01:00:00"
    directives: list[str] = field(default_factory=list)  # more #SBATCH lines, e.g. "--qos=long"

    def __post_init__(self) -> None:
        for key in ("jobs", "cores"):
            if getattr(self, key) < 1:
                raise BatchError(f"SLURM {key} = {getattr(self, key)}: need at least 1")
        if not 0 <= self.gpus <= self.cores:
            raise BatchError(f"SLURM gpus per job = {self.gpus}: need 0 <= gpus <= cores per job ({self.cores}), "
                             "one worker per GPU with at least one core each")
        if not re.fullmatch(r"(\d+-)?\d+(:\d{2}){0,2}", self.walltime):
            raise BatchError(f"SLURM walltime {self.walltime!r}: expected [days-]hours:minutes:seconds, e.g. 04:00:00")

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of dask_jobqueue.SLURMCluster."""
        gres = [f"--gres=gpu:{self.gpus}"] if self.gpus else []
        return {"queue": self.partition, "account": self.account, "cores": self.cores, "memory": self.memory,
                "processes": max(1, self.gpus), "walltime": self.walltime, "job_name": "glad",
                "job_extra_directives": gres + list(self.directives)}

    def job_script(self) -> str:
        """The job script each SLURM job runs (the scheduler address filled in when the run starts)."""
        from dask_jobqueue import SLURMCluster

        return SLURMCluster.job_cls("tcp://<scheduler-address>:8786", name="glad-worker", **self.kwargs()).job_script()


def local_cluster(workers: int | str, threads: int | None = None) -> LocalCluster:
    """`workers` worker processes on this machine (`auto`: one per visible GPU, else one per core),
    each with `threads` threads (default: cores / workers)."""
    if workers == "auto":
        workers = len(visible_gpus()) or cores()
    if not isinstance(workers, int) or workers < 1:
        raise BatchError(f"--workers {workers!r}: expected a number >= 1 or 'auto'")
    with dask.config.set({"distributed.worker.profile.enabled": False}):  # no sampling beside the kernels
        return LocalCluster(n_workers=workers, threads_per_worker=threads or max(1, cores() // workers),
                            processes=True, dashboard_address=":0", silence_logs=logging.ERROR)


@contextmanager
def connect(workers: int | str | None = None, scheduler: str | None = None,
            slurm: Slurm | None = None, timeout: float = 10) -> Iterator[Client]:
    """A client of a new local cluster, of the scheduler at `scheduler`, or of new SLURM jobs."""
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError, ValueError) as e:
            raise BatchError(f"cannot reach the Dask scheduler at {scheduler} ({type(e).__name__}: {e}); check the "
                             "address, and that `dask scheduler` runs there with workers joined "
                             f"(`dask worker {scheduler}`)") from None
        with client:
            yield client
        return
    if slurm is not None:
        if shutil.which("sbatch") is None:
            raise BatchError("--slurm submits jobs with sbatch, which is not on PATH here; run the batch on a "
                             "SLURM login node (or use --workers / --scheduler)")
        from dask_jobqueue import SLURMCluster

        cluster = SLURMCluster(**slurm.kwargs())
        cluster.scale(jobs=slurm.jobs)
    else:
        cluster = local_cluster(workers if workers is not None else "auto")
    with cluster, Client(cluster) as client:
        yield client
