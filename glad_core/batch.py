"""Batch runs: every cell of parameter grids as a papermill execution of its protocol's notebook.

    python -m glad_core.batch params/demo/*.yaml --report              # run what is missing, then the report
    python -m glad_core.batch params/base_to_novel.yaml --dry-run      # the plan, done / todo
    python -m glad_core.batch params/base_to_novel.yaml --dry-run --explain   # what each method gets, and why
    python -m glad_core.batch params/base_to_novel.yaml --shard 0/4 --set data_root=/data
    python -m glad_core.batch params/*.yaml --workers 4 --set data_root=/data        # 4 worker processes
    python -m glad_core.batch params/*.yaml --slurm --jobs 8 --gpus-per-job 1 --dry-run   # the job script

Each cell (one dataset, method and seed; in multi_source_dg also one held-out domain) executes
`notebooks/<protocol>.ipynb` with the cell's flat parameters injected; the executed notebook is written
beside the cell's record (`shots16_seed1.ipynb` next to `shots16_seed1.json`), its figure too.

- Resume: a cell is done when its record exists and its executed notebook finished without error;
  `--only-missing` counts a record alone as done (e.g. cells run with `python -m glad_core run`).
  A cell whose record exists only re-renders its notebook; nothing is trained again.
- Failures: a failed cell is reported with its executed notebook (which holds the traceback) and
  the other cells go on; the exit code is 1 when any cell failed.
- Where: by default every cell runs in this process, one after another. `--workers N` (a local
  Dask cluster of N processes), `--scheduler tcp://host:port` (an existing Dask cluster) and `--slurm`
  (Dask workers in SLURM jobs) run cells side by side, one per worker at a time, a unit on one
  worker; a cell whose worker dies runs again on another (see glad_core.cluster).
- Sharding: `--shard i/n` (0 <= i < n) takes units i, i+n, i+2n, ... of the plan, so n machines
  (or one process per GPU, with CUDA_VISIBLE_DEVICES) never write the same cell. A unit is the
  cells that share one trained adapter (cross-dataset and domain-generalization cells of the same
  source and training parameters), so an adapter is trained once, on one shard.

`--report` then executes notebooks/report.ipynb on every record of the results folder, writing
`<results_dir>/report/report.md` (tables 1-4 beside the published numbers, figures) and the executed
notebook beside it.

Several parameter files form one plan; a cell named by two files is run once (two files giving
it different parameters are an error, since the record path would be shared).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from . import params as P
from .jobs import REPORT, BatchError, is_done, plan, report, report_path, run, shard

if TYPE_CHECKING:
    from .cluster import Slurm

def explain(sources: Sequence[str | Path], overrides: dict[str, Any]) -> None:
    """Print, per parameter file and method of its grid, one JSON object: the file, the method, every
    value it reads (`params`) and where each came from (`sources`; `glad_core.params.explain`)."""
    for source in sources:
        for line in P.explain(source, overrides):
            print(json.dumps({"file": str(source), **line}), flush=True)


def _parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs as parameter overrides (values read as YAML, as on the main command line)."""
    flags: list[str] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise P.ParamError(f"--set expects key=value, got {pair!r}")
        flags += [f"--{key}", value]
    return P.parse_overrides(flags)


def _add_cluster_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group(
        "where cells run (default: in this process, one after another; see glad_core.cluster)"
    ).add_mutually_exclusive_group()
    where.add_argument("--workers", metavar="N", help="a local Dask cluster of N worker processes with cores/N "
                       "threads each ('auto': one per visible GPU, else one per core)")
    where.add_argument("--scheduler", metavar="tcp://host:port",
                       help="the workers of an existing Dask cluster (sharing this results folder)")
    where.add_argument("--slurm", action="store_true",
                       help="Dask workers in SLURM jobs (dask-jobqueue); --dry-run prints the job script")
    slurm = parser.add_argument_group("SLURM jobs (with --slurm)")
    slurm.add_argument("--jobs", type=int, help="number of jobs (default 1)")
    slurm.add_argument("--partition", help="SLURM partition (-p)")
    slurm.add_argument("--account", help="SLURM account (-A)")
    slurm.add_argument("--cores-per-job", type=int, dest="cores", help="CPU cores per job (default 4)")
    slurm.add_argument("--gpus-per-job", type=int, dest="gpus",
                       help="GPUs per job, one worker each (default 0: one CPU worker per job)")
    slurm.add_argument("--memory-per-job", dest="memory", help="memory per job (default 16GB)")
    slurm.add_argument("--walltime", help="time limit per job, [days-]hh:mm:ss (default 01:00:00)")
    slurm.add_argument("--sbatch", action="append", dest="directives", metavar="OPTION",
                       help="one more #SBATCH line, e.g. --sbatch=--qos=long (repeatable)")


SLURM_ARGS = {"jobs": "--jobs", "partition": "--partition", "account": "--account", "cores": "--cores-per-job",
              "gpus": "--gpus-per-job", "memory": "--memory-per-job", "walltime": "--walltime",
              "directives": "--sbatch"}  # glad_core.cluster.Slurm field: its option


def _slurm(args: argparse.Namespace) -> Slurm | None:
    """The SLURM options given, as glad_core.cluster.Slurm (None without --slurm)."""
    given = {k: getattr(args, k) for k in SLURM_ARGS if getattr(args, k) is not None}
    if not args.slurm:
        if given:
            raise BatchError(f"{', '.join(SLURM_ARGS[k] for k in given)}: SLURM options need --slurm")
        return None
    from .cluster import Slurm

    return Slurm(**given)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glad_core.batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("params", nargs="+", help="YAML parameter files (see params/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the plan with each cell's status (and the SLURM job script); run nothing")
    parser.add_argument("--explain", action="store_true",
                        help="with --dry-run: one JSON line per parameter file and method of the plan, every value "
                             "the method reads and its source (method default, file, method_settings, command line)")
    parser.add_argument("--shard", default="0/1", metavar="i/n", help="run units i, i+n, ... (0 <= i < n)")
    parser.add_argument("--only-missing", action="store_true",
                        help="count a cell as done when its record exists, even without its executed notebook")
    parser.add_argument("--report", action="store_true",
                        help="then execute notebooks/report.ipynb on the results folder (report/report.md)")
    parser.add_argument("--set", action="append", default=[], metavar="key=value", dest="sets",
                        help="override a parameter in every file (repeatable), e.g. --set epochs=2")
    parser.add_argument("--no-feature-cache", action="store_true",
                        help="encode test images every time instead of reusing the frozen image features kept "
                             "in <results_dir>/feature_cache (= --set feature_cache=false)")
    _add_cluster_args(parser)
    args = parser.parse_args(argv)
    try:
        overrides = {**_parse_sets(args.sets), **({"feature_cache": False} if args.no_feature_cache else {})}
        index, _, count = args.shard.partition("/")
        if not (index.isdigit() and count.isdigit()):
            raise BatchError(f"--shard expects i/n, e.g. 0/4, got {args.shard!r}")
        if args.explain:
            if not args.dry_run:
                raise BatchError("--explain shows the plan's values without running it: add --dry-run")
            explain(args.params, overrides)
            return 0
        slurm = _slurm(args)
        workers = int(args.workers) if args.workers and args.workers.isdigit() else args.workers  # or 'auto'
        jobs = shard(plan(args.params, overrides), int(index), int(count))
        done = [is_done(job, args.only_missing) for job in jobs]
        print(f"{len(jobs)} cells (shard {args.shard}): {sum(done)} done, {len(jobs) - sum(done)} to run", flush=True)
        if args.dry_run:
            for job, d in zip(jobs, done):
                print(f"{'done' if d else 'todo'}  {job.label:<60} {job.cell.record_path}")
            if slurm is not None:
                print(f"\nSLURM: {slurm.jobs} job(s), each running:\n{slurm.job_script()}")
            return 0
        if workers is None and args.scheduler is None and slurm is None:
            failures = run(jobs, args.only_missing)
        else:
            from . import cluster

            with cluster.connect(workers, args.scheduler, slurm) as client:
                failures = cluster.run(jobs, client, args.only_missing, pin_gpus=args.scheduler is None)
        for results_dir in dict.fromkeys(job.params["results_dir"] for job in jobs) if args.report else ():
            try:
                print(f"report: {report(results_dir)}", flush=True)
            except Exception as e:  # reported like a failed cell
                failures.append(f"FAILED report: {type(e).__name__}\n    see {report_path(results_dir).parent / REPORT.name}")
    except (P.ParamError, BatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if failures:
        print(f"\n{len(failures)} failed:", file=sys.stderr)
        print("\n".join(failures), file=sys.stderr)
        return 1
    print(f"all {len(jobs)} cells done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
