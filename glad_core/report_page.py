"""The report page: `report.md` with every comparison table, its paired differences (`glad_core.evidence`),
its figures, and the published reference; above both the tables (`glad_core.report`) and the evidence."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import pandas as pd

from . import evidence
from .published import published
from .report import (B2N_SPLITS, CI, MISSING, TABLES, bar_chart, display_table, markdown_table, published_multi_source,
                     published_note, published_reference)


def figures(name: str, t: pd.DataFrame, out_dir: str | Path, number: int) -> dict[str, Path]:
    """A non-empty table's figures in `out_dir`: bars with intervals, the forest plot of its paired differences
    and accuracy against steps (`table<number>_<name>[_paired|_budget].png`), by kind."""
    stem = Path(out_dir) / f"table{number}_{name}"
    p = evidence.paired_differences(t)
    out = {"bars": bar_chart(t, stem.with_suffix(".png"), TABLES[name])}
    if len(p):
        out["paired"] = evidence.forest_plot(p, f"{stem}_paired.png", f"{TABLES[name]}: paired differences")
    out["budget"] = evidence.budget_chart(t, f"{stem}_budget.png", f"{TABLES[name]}: accuracy against steps")
    return out


def write_report(tables: Mapping[str, pd.DataFrame], out_dir: str | Path, records: int) -> Path:
    """Write `report.md` and the figures of every non-empty table (`figures`) into `out_dir`; returns the
    report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# GLAD reproduction report", "",
             f"{records} records. Reproduced accuracies are seed means ± std (%) with the 95% bootstrap "
             f"interval over test images (`{CI}`); `published` is the published number of the same setting "
             f"where one exists, `gap` = ours − published (points, {MISSING} = none). HM as the paper computes "
             f"it: of the seed- (and dataset-) averaged base and novel accuracies, its interval from the same "
             f"draws. `budget`: the mean over a row's records of optimizer steps, images seen, trained parameters "
             f"and training time. Each table is followed by every method's paired difference from its reference "
             f"(`glad_core.evidence`).", ""]
    for i, (name, t) in enumerate(tables.items(), 1):
        lines += [f"## {TABLES[name]}", ""]
        if t.empty:
            lines += ["No records.", ""]
            continue
        shown = figures(name, t, out_dir, i)
        p = evidence.paired_differences(t)
        lines += [markdown_table(display_table(t)), "", published_note(t), ""]
        if len(p):
            lines += [evidence.paired_note(p), "", markdown_table(evidence.display_paired(p)), ""]
            lines += [f"- {s}" for s in evidence.paired_sentences(p)] + [""]
        lines += [line for kind, png in shown.items() for line in (f"![{TABLES[name]}: {kind}]({png.name})", "")]
    lines += ["## Published reference: averages (ViT-B/16, 16 shots; GLAD paper, Tables 1-3)", ""]
    for name, ref in published_reference().items():
        lines += [f"### {TABLES[name]}", "", markdown_table(ref), ""]
    lines += [f"### {TABLES['ablation']}", "", markdown_table(published("ablation").set_index("row")[
        ["method", *B2N_SPLITS]]), ""]
    lines += [f"### {TABLES['multi_source_dg']}: average over held-out domains", "",
              markdown_table(published_multi_source()), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
