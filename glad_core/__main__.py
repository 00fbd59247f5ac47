"""Command line: `python -m glad_core {prepare,run,demo}`.

    python -m glad_core prepare                       # build glad-mini and the demo datasets
    python -m glad_core run params/demo/base_to_novel.yaml --epochs 2 --seeds 1
    python -m glad_core run --protocol base_to_novel --datasets eurosat --data-root $DATA \\
        --backbone glad-mini --methods zeroshot,lora,glad --shots 16 --epochs 5
    python -m glad_core demo                          # params/demo/*.yaml in batch, then the report
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from . import params as P


def user_errors() -> tuple[type[Exception], ...]:
    """Errors of bad input (parameters, data, weights), each with a message that names the fix."""
    from .data import ImageReadError
    from .datasets import DatasetError
    from .debian import DemoDataUnavailable
    from .models import WeightsError

    return P.ParamError, DatasetError, FileNotFoundError, WeightsError, DemoDataUnavailable, ImageReadError


def cmd_prepare() -> None:
    from .models import load_backbone
    from .prepare import prepare_demo_data

    t = time.perf_counter()
    load_backbone("glad-mini")
    print(f"glad-mini ready ({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    root = prepare_demo_data()
    print(f"demo datasets ready under {root} ({time.perf_counter() - t:.0f} s)")


def cmd_run(params: dict[str, Any]) -> list[dict]:
    from .protocols import run_cell

    cells = P.cells(params)
    records = []
    for i, cell in enumerate(cells, 1):
        print(f"[{i}/{len(cells)}] {cell.protocol} {cell.dataset} {cell.train.method} seed {cell.train.seed}",
              flush=True)
        rec = run_cell(cell)
        print("   " + "  ".join(f"{k} {100 * v:.2f}" for k, v in rec["metrics"].items())
              + f"   -> {cell.record_path}", flush=True)
        records.append(rec)
    return records


def cmd_demo() -> int:
    """Every cell of params/demo/ (four protocols and the ablation) as notebooks, then the report (glad-mini and
    the demo data built first where missing)."""
    from . import batch, jobs as J

    t = time.perf_counter()
    cmd_prepare()
    files = sorted(str(p) for p in (J.NOTEBOOK_DIR.parent / "params" / "demo").glob("*.yaml"))
    code = batch.main([*files, "--report"])
    report = J.report_path(P.load(files[0])["results_dir"])
    if report.exists():
        print("\n" + report.read_text())
        print(f"report (with figures): {report}\nnotebooks: {J.NOTEBOOK_DIR} (make lab)")
    print(f"demo took {(time.perf_counter() - t) / 60:.1f} min")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glad_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="build glad-mini and the demo datasets (idempotent)")
    sub.add_parser("run", help="run every cell of a parameter grid, writing records: "
                              "[params.yaml] [--key value ...] (see params/)")
    sub.add_parser("demo", help="the main job on the embedded default: params/demo/ in batch, then the report")
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command != "run" and rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "prepare":
            cmd_prepare()
        elif args.command == "run":  # the optional YAML file first, then `--key value` overrides
            path = rest.pop(0) if rest and not rest[0].startswith("--") else None
            overrides = P.parse_overrides(rest)
            cmd_run(P.load(path, **overrides) if path else P.validate(overrides))
        elif args.command == "demo":
            return cmd_demo()
    except user_errors() as e:  # bad input: one line naming the problem and the fix, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
