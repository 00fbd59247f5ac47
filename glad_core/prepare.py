"""Building the demo data, above the readers: the single-folder demo sets (`glad_core.demo_data`) and the
multi-domain mini-PACS (`glad_core.mini_pacs`). `python -m glad_core prepare` (and `demo`) call it; the
readers (`load_dataset`, `load_domains`) only read, and name this command when a set is missing.

    python -m glad_core.prepare [NAME ...] [--force]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Sequence

from . import mini_pacs
from .datasets import DEMO_DATASETS, demo_root
from .demo_data import build_demo_sets

DEMO_SETS = (*DEMO_DATASETS, mini_pacs.NAME)


def prepare_demo_data(force: bool = False, names: Iterable[str] | None = None) -> Path:
    """Build the demo sets `names` (default all of `DEMO_SETS`; each skipped when built, unless `force`);
    return the data root."""
    names = list(names or DEMO_SETS)
    unknown = sorted(set(names) - set(DEMO_SETS))
    if unknown:
        raise ValueError(f"unknown demo set(s) {', '.join(unknown)}; choose from {', '.join(DEMO_SETS)}")
    single = [n for n in names if n in DEMO_DATASETS]
    if single:
        build_demo_sets(single, force)
    if mini_pacs.NAME in names:
        mini_pacs.build_mini_pacs(demo_root(), force)
    return demo_root()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m glad_core.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"demo sets to build (default: all of {', '.join(DEMO_SETS)})")
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(DEMO_SETS))
    if unknown:
        parser.error(f"unknown demo set(s) {', '.join(unknown)}; choose from {', '.join(DEMO_SETS)}")
    print(prepare_demo_data(force=args.force, names=args.names or None))


if __name__ == "__main__":
    main()
