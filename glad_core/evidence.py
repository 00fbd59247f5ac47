"""Which differences a comparison table can tell apart: paired differences from a reference method, in
numbers, in words and as a forest plot, and accuracy against the training budget.

Each table has a reference (`reference_of`): zero-shot for Tables 1-3 and 5, row (a) (LoRA) for the
ablation. A method's difference from it is taken draw by draw from the bootstrap draws of both rows
(`glad_core.stats`: the same resampled test images for every method and seed), so its interval is a
paired bootstrap interval; the point estimate is the difference of the table's means. A difference
is distinguishable from 0 when its 95% interval excludes 0. Where the reference ran under several
settings, the one with the row's own setting is taken, else the first.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from . import stats
from .methods import ablation_rows
from .report import MISSING, _fmt, _objects, display_index, interval_text, method_labels, panels_of, save_figure

REFERENCE = "zeroshot"
_MATCH = ["dataset", "backbone", "shots", "split"]
PAIRED_COLUMNS = ["row", "dataset", "method", "descriptions", "backbone", "shots", "setting", "split", "reference",
                  "diff", "lo", "hi", "distinguishable", "boot"]


def reference_of(t: pd.DataFrame) -> str:
    """The reference method of a comparison table: row (a) of the ablation, zero-shot elsewhere."""
    return ablation_rows()["a"] if "row" in t.columns else REFERENCE


def paired_differences(t: pd.DataFrame, reference: str | None = None) -> pd.DataFrame:
    """Every other method's row minus the reference's row of the same dataset, backbone, shots and split
    (points): `diff`, its paired 95% interval `lo` / `hi` (NaN where either row has no draws), and
    `distinguishable` (the interval excludes 0; None without an interval)."""
    reference = reference or reference_of(t)
    if t.empty:
        return pd.DataFrame(columns=PAIRED_COLUMNS)
    t = t.assign(row=t["row"] if "row" in t.columns else "")
    refs = t[t["method"] == reference]
    rows = []
    for _, r in t[t["method"] != reference].iterrows():
        match = refs[(refs[_MATCH] == r[_MATCH]).all(axis=1)]
        if match.empty:
            continue
        same = match[match["setting"] == r["setting"]]
        ref = (same if len(same) else match).iloc[0]
        boot = None if r["boot"] is None or ref["boot"] is None else r["boot"] - ref["boot"]
        lo, hi = stats.interval(boot) if boot is not None else (math.nan, math.nan)
        rows.append({**{k: r[k] for k in PAIRED_COLUMNS[:8]}, "reference": reference, "diff": r["mean"] - ref["mean"],
                     "lo": lo, "hi": hi, "distinguishable": None if boot is None else stats.excludes_zero(lo, hi),
                     "boot": boot})
    out = pd.DataFrame(rows, columns=PAIRED_COLUMNS)
    out["boot"] = _objects(out["boot"], out.index)
    return out


def _difference_text(d: pd.Series) -> str:
    mark = " *" if d["distinguishable"] is True else ""
    return f"{_fmt(d['diff'], sign=True)} {interval_text(d['lo'], d['hi'], sign=True)}{mark}"


def display_paired(p: pd.DataFrame) -> pd.DataFrame:
    """Paired differences for reading: one row per setting and method, per split 'Δ [lo, hi]' in points,
    '*' where the interval excludes 0 ('—' without an interval)."""
    if p.empty:
        return pd.DataFrame()
    index = display_index(p if p["row"].ne("").any() else p.drop(columns="row"))
    cells = p.assign(method=method_labels(p), shown=[_difference_text(d) for _, d in p.iterrows()])
    w = cells.pivot_table(index=index, columns="split", values="shown", aggfunc="first", sort=False)
    return w[list(dict.fromkeys(p["split"]))]


def paired_note(p: pd.DataFrame) -> str:
    reference = p["reference"].iloc[0] if len(p) else REFERENCE
    return (f"Difference from {reference} in points, with its 95% paired bootstrap interval over the same test "
            f"images (seed means); * = the interval excludes 0, {MISSING} = records without per-image results.")


def _splits(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def paired_sentences(p: pd.DataFrame) -> list[str]:
    """One sentence per method and place (dataset or ablation row, and setting where it varies): on which
    splits it is indistinguishable from the reference, and on which it is above or below it (with numbers)."""
    if p.empty:
        return []
    out = []
    p = p.assign(label=method_labels(p))
    keys = ["row", "dataset", "backbone", "shots", "setting", "label"]
    varying = [k for k in ("backbone", "shots", "setting") if p[k].nunique() > 1]
    for k, g in p.groupby(keys, sort=False):
        key = dict(zip(keys, k))
        where = f"row ({key['row']})" if key["row"] else key["dataset"]
        where += "".join(f", {v}={key[v]}" for v in varying) if varying else ""
        reference = g["reference"].iloc[0]
        parts = []
        same = list(g.loc[g["distinguishable"].eq(False), "split"])
        if same:
            parts.append(f"is indistinguishable from {reference} on {_splits(same)} (the 95% paired "
                         f"interval{'s include' if len(same) > 1 else ' includes'} 0)")
        for verb, sign in (("above", 1), ("below", -1)):
            d = g[g["distinguishable"].eq(True) & (g["diff"] * sign > 0)]
            if len(d):
                parts.append(f"is {verb} {reference} on " + _splits(
                    [f"{s} ({_fmt(v, sign=True)} points, {interval_text(lo, hi, sign=True)})"
                     for s, v, lo, hi in zip(d["split"], d["diff"], d["lo"], d["hi"])]))
        unknown = list(g.loc[g["distinguishable"].isna(), "split"])
        if unknown:
            parts.append(f"has no paired interval on {_splits(unknown)} (records without per-image results)")
        out.append(f"{where}: {key['label']} " + "; it ".join(parts) + ".")
    return out


def forest_plot(p: pd.DataFrame, path: str | Path, title: str, max_lines: int = 40) -> Path:
    """Paired differences from the reference with their 95% intervals, one line per method, place and split
    (filled: the interval excludes 0), a vertical line at 0; beyond `max_lines` differences, those of the
    headline split only (`headline_splits`); saved as PNG at `path` (returned)."""
    if len(p) > max_lines:
        p = p[p["split"].isin(headline_splits(p))]
    p = p.assign(label=method_labels(p))
    place = p["row"].map(lambda r: f"({r})" if r else "") + p["dataset"].where(p["row"].eq(""), "")
    labels = (place + " · " + p["label"] + " · " + p["split"]).tolist()
    fig = Figure(figsize=(7.5, 1.2 + 0.28 * len(p)), layout="constrained")
    ax = fig.subplots()
    y = list(range(len(p)))[::-1]
    for yi, (_, d) in zip(y, p.iterrows()):
        color = "tab:blue" if d["distinguishable"] is True else "tab:gray"
        if not math.isnan(d["lo"]):
            ax.plot([d["lo"], d["hi"]], [yi, yi], color=color, lw=2)
        ax.plot(d["diff"], yi, "o", color=color, mfc=color if d["distinguishable"] is True else "white")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, labels, fontsize="small")
    ax.set_xlabel(f"difference from {p['reference'].iloc[0]} (points, 95% paired interval)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    return save_figure(fig, path)


def headline_splits(t: pd.DataFrame) -> list[str]:
    """The split a table's budget figure plots: HM, or the average over targets / domains, else every split."""
    splits = list(dict.fromkeys(t["split"]))
    return [s for s in ("hm", "average") if s in splits][:1] or splits


def budget_chart(t: pd.DataFrame, path: str | Path, title: str) -> Path:
    """Accuracy (seed mean, 95% interval) against optimizer steps per method (mean over its records; symlog
    axis, zero-shot at 0), one panel per dataset (and setting where it varies), the table's headline split
    (`headline_splits`); saved as PNG at `path` (returned)."""
    splits = headline_splits(t)
    t = t[t["split"].isin(splits)].assign(method=method_labels(t[t["split"].isin(splits)]))
    panel_of, panels = panels_of(t)
    fig = Figure(figsize=(5.0 * min(len(panels), 3), 3.8 * math.ceil(len(panels) / 3)), layout="constrained")
    axes = fig.subplots(math.ceil(len(panels) / 3), min(len(panels), 3), squeeze=False).ravel()
    methods = list(dict.fromkeys(t["method"]))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, panel in zip(axes, panels):
        for _, d in t[panel_of == panel].iterrows():
            lo, hi = d["lo"], d["hi"]
            err = [[d["mean"] - lo], [hi - d["mean"]]] if not math.isnan(lo) else None
            steps = d["steps"] if not math.isnan(d["steps"]) else 0
            marker = "o" if len(splits) == 1 else f"${splits.index(d['split']) + 1}$"
            ax.errorbar(steps, d["mean"], yerr=err, fmt=marker, color=colors[d["method"]], capsize=3,
                        label=d["method"] if d["split"] == splits[0] else None)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(f"{splits[0] if len(splits) == 1 else 'accuracy'} (%)")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    return save_figure(fig, path)
