"""Batch runs on Dask (glad_core.cluster), with real worker processes.

The smoke grid (glad-mini, Tux Paint, 1 shot, 1 epoch; zero-shot and LoRA) runs once in this process's
default way (one cell after another) and on a local cluster of 2 workers, once undisturbed and once
with a worker killed in the middle of a cell; the records must agree. Scheduling itself (units on one
worker, one cell per worker at a time, threads and GPUs of the kernels) is checked with cells that only
report where and when they ran.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import cloudpickle
import pytest

from glad_core import batch, cluster, jobs as J

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "smoke"
GRID = [str(SMOKE / "base_to_novel.yaml"), "--set", "methods=[zeroshot,lora]"]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers need not import this module


def _batch(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "glad_core.batch", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _records(results: Path) -> dict[str, dict]:
    """Every record under `results` by its path relative to it."""
    return {str(p.relative_to(results)): json.loads(p.read_text()) for p in sorted(results.rglob("*.json"))}


def _check_complete(results: Path, expected: dict[str, dict]) -> None:
    """The records of `expected` and no others, each complete with the same metrics, notebooks finished,
    no temporary file left."""
    got = _records(results)
    assert sorted(got) == sorted(expected)
    for path, record in got.items():
        assert record["metrics"] == expected[path]["metrics"], path
        assert record["params"] == {**expected[path]["params"]}, path
        assert record["finished"] and set(record["metrics"]) == {"base", "novel", "hm"}
        assert J._finished((results / path).with_suffix(".ipynb")), path
    assert not [p for p in results.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def sequential(jupyter_env, tmp_path_factory) -> dict[str, dict]:
    """The records of the smoke grid run the default way: in the batch process, one cell after another."""
    results = tmp_path_factory.mktemp("sequential")
    p = _batch([*GRID, "--set", f"results_dir={results}"], jupyter_env)
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, out + err
    records = _records(results)
    assert len(records) == 2
    return records


@pytest.mark.cluster
def test_a_cell_whose_worker_is_killed_runs_again_and_writes_its_record_once(jupyter_env, sequential, tmp_path):
    """Two workers write the sequential run's records, even when a worker dies in the middle of a cell."""
    import psutil

    p = _batch([*GRID, "--set", f"results_dir={tmp_path}", "--workers", "2"], jupyter_env)
    batch_process = psutil.Process(p.pid)
    deadline = time.monotonic() + 600
    kernel = None
    while kernel is None and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)
        try:
            kernel = next((c for c in batch_process.children(recursive=True)
                           if "ipykernel_launcher" in " ".join(c.cmdline())), None)
        except psutil.Error:  # a process ended while listed
            kernel = None
    assert kernel is not None, "no cell started"
    worker = kernel.parent()
    assert worker.pid != p.pid  # the kernel of a worker process, not of the batch
    written_before = set(_records(tmp_path))
    os.kill(worker.pid, signal.SIGKILL)
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, out + err
    assert len(written_before) < 2, "the kill came after every cell had finished"
    assert "all 2 cells done" in out and "2/2" in err  # one progress bar over the cells
    # the killed worker's kernel is gone: nobody else writes that cell's record later
    gone, alive = psutil.wait_procs([kernel], timeout=10)
    assert not alive, f"the kernel {kernel.pid} of the killed worker is still running"
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.json")}
    _check_complete(tmp_path, sequential)
    time.sleep(2)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.json")} == stamps  # no late writer


# ----------------------------------------------------------------------------- scheduling


def _where(log: Path, job: J.Job) -> None:
    """A cell that runs nothing: it writes where (worker), when, and with which kernel environment."""
    from distributed import get_worker

    start = time.time()
    time.sleep(0.3)
    entry = {"unit": job.unit, "label": job.label, "worker": get_worker().name, "start": start, "end": time.time(),
             "omp": os.environ.get("OMP_NUM_THREADS"), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}
    with open(log, "a") as f:
        f.write(json.dumps(entry) + "\n")


@pytest.fixture(scope="module")
def local_client():
    """A client of 2 local worker processes with 2 threads each, which see two (made-up) GPUs."""
    from distributed import Client, LocalCluster

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the workers inherit it: two GPUs to share out
        with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0") as lc, \
                Client(lc) as client:
            yield client


@pytest.mark.cluster
def test_units_stay_on_one_worker_and_each_worker_runs_one_cell_at_a_time(local_client, tmp_path):
    files = [SMOKE / f"{p}.yaml" for p in ("base_to_novel", "ablation", "cross_dataset", "domain_generalization")]
    jobs = J.plan(files, {"results_dir": str(tmp_path / "results"), "seeds": [1, 2]})
    units = {job.unit for job in jobs}
    assert len(jobs) == 20 and len(units) == 18  # two units of two cells: transfer cells sharing one adapter
    log = tmp_path / "log.jsonl"
    assert cluster.run(jobs, local_client, task=partial(_where, log), progress=False, pin_gpus=True) == []
    resources = {w["name"]: w["resources"] for w in local_client.scheduler_info()["workers"].values()}
    assert resources == {0: {"cell": 1}, 1: {"cell": 1}}
    ran = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(r["label"] for r in ran) == sorted(j.label for j in jobs)  # each cell once
    assert {r["worker"] for r in ran} == {0, 1}  # both workers had cells
    assert {(r["worker"], r["gpu"]) for r in ran} == {(0, "3"), (1, "5")}  # one GPU each
    assert {r["omp"] for r in ran} == {"2"}  # the kernels use the worker's threads
    for unit in units:  # a unit's cells on one worker, in plan order, one after the other
        cells = [r for r in ran if r["unit"] == unit]
        assert len({r["worker"] for r in cells}) == 1
        assert [r["label"] for r in sorted(cells, key=lambda r: r["start"])] == \
               [j.label for j in jobs if j.unit == unit]
    for worker in (0, 1):  # two threads, yet never two cells at once
        spans = sorted((r["start"], r["end"]) for r in ran if r["worker"] == worker)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


def _fail_lora(log: Path, job: J.Job) -> str | None:
    """A cell that runs nothing and fails for LoRA."""
    with open(log, "a") as f:
        f.write(job.label + "\n")
    return J.failure(job, ValueError("no data")) if job.cell.train.method == "lora" else None


@pytest.mark.cluster
def test_a_cell_failure_is_reported_and_the_others_go_on(local_client, tmp_path):
    jobs = J.plan([SMOKE / "base_to_novel.yaml"], {"results_dir": str(tmp_path)})
    log = tmp_path / "log.txt"
    failures = cluster.run(jobs, local_client, task=partial(_fail_lora, log), progress=False)
    [lora] = [j for j in jobs if j.cell.train.method == "lora"]
    assert failures == [f"FAILED base_to_novel tuxpaint lora seed 1: ValueError: no data\n    see {lora.output}"]
    assert sorted(log.read_text().split("\n")[:-1]) == sorted(j.label for j in jobs)  # all ran


def test_kernel_environment_per_worker():
    gpus = {"CUDA_VISIBLE_DEVICES": "2,4,6"}
    assert cluster.kernel_env(1, 3, gpus) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3",
                                              "OPENBLAS_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": "4"}
    assert cluster.kernel_env(4, 1, gpus)["CUDA_VISIBLE_DEVICES"] == "4"  # more workers than GPUs: shared
    assert cluster.kernel_env("SLURMCluster-3-2", 1, gpus)["CUDA_VISIBLE_DEVICES"] == "6"  # dask worker --nworkers
    assert "CUDA_VISIBLE_DEVICES" not in cluster.kernel_env("tcp://10.0.0.1:4000", 1, gpus)  # no index: all
    assert "CUDA_VISIBLE_DEVICES" not in cluster.kernel_env(1, 1, {"CUDA_VISIBLE_DEVICES": "7"})  # one GPU
    assert "CUDA_VISIBLE_DEVICES" not in cluster.kernel_env(1, 1, gpus, pin_gpu=False)  # dask cuda worker
    assert cluster.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


# ----------------------------------------------------------------------------- errors and SLURM


def test_an_unreachable_scheduler_is_a_clear_error(capsys, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    code = batch.main([*GRID, "--set", f"results_dir={tmp_path}", "--scheduler", address])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: cannot reach the Dask scheduler at {address}" in err and "dask scheduler" in err
    assert not list(tmp_path.iterdir())


def test_slurm_job_script_has_the_requested_resources(capsys, tmp_path):
    args = [*GRID, "--set", f"results_dir={tmp_path}", "--slurm", "--jobs", "3", "--partition", "gpu",
            "--account", "proj42", "--cores-per-job", "8", "--gpus-per-job", "2", "--memory-per-job", "32GB",
            "--walltime", "02:30:00", "--sbatch=--qos=long", "--dry-run"]
    assert batch.main(args) == 0
    out = capsys.readouterr().out
    script = out[out.index("#!"):]
    for line in ("#SBATCH -p gpu", "#SBATCH -A proj42", "#SBATCH --cpus-per-task=8", "#SBATCH -t 02:30:00",
                 "#SBATCH --gres=gpu:2", "#SBATCH --qos=long", "#SBATCH --mem=30G"):  # 32 GB = 29.8 GiB
        assert line in script.splitlines(), line
    assert "SLURM: 3 job(s)" in out
    command = script.strip().splitlines()[-1]
    assert f"{sys.executable} -m distributed.cli.dask_worker" in command
    assert "--nworkers 2" in command and "--nthreads 4" in command  # one worker per GPU, cores shared out
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--jobs", "2", "--cores-per-job", "2"], "--jobs, --cores-per-job: SLURM options need --slurm"),
    (["--slurm", "--gpus-per-job", "9", "--cores-per-job", "8"], "gpus per job = 9"),
    (["--slurm", "--walltime", "2 hours"], "walltime '2 hours'"),
    (["--slurm", "--jobs", "0"], "jobs = 0"),
    (["--workers", "two"], "--workers 'two'"),
])
def test_bad_cluster_options_are_clear_errors(args, message, capsys, tmp_path):
    assert batch.main([*GRID, "--set", f"results_dir={tmp_path}", *args]) == 2
    assert message in capsys.readouterr().err


def test_slurm_needs_sbatch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert batch.main([*GRID, "--set", f"results_dir={tmp_path / 'r'}", "--slurm"]) == 2
    assert "sbatch, which is not on PATH" in capsys.readouterr().err
