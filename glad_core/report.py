"""Tables and figures of the notebooks: reproduced results beside published ones (paper Tables 1-4).

Reproduced numbers are seed means ± std in percent (`results.summarize`). Published numbers
(`glad_core.published`) are matched only where a run repeats the published setting: the paper's
datasets, ViT-B-16 at 16 shots, ImageNet as the source of the transfer tables, and for averages
the paper's full list of datasets (or targets). `gap` is ours minus published, in points.

A method is compared with the published column its registry entry names (`MethodInfo.published`:
`zeroshot` with CLIP, `lora` with the GLAD paper's CLIP-LoRA run, `glad` with GLAD, ...), and an
ablation row with the same row of the paper's Table 4.

HM follows the paper for every printed cell: per dataset, the HM of the seed-averaged base and novel
accuracies; in the average row, the HM of the dataset-averaged ones (never a mean of per-seed HMs;
the `std` of an HM cell is the spread of the per-seed HMs).
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
from matplotlib.figure import Figure

from . import params as P
from . import stats
from .protocols import PAPER_TARGETS, Cell, run_cell
from .published import DATASETS as PAPER_DATASETS
from .published import published
from .results import BUDGET, CELL_KEYS, budget_mean, collect, summarize
from .stats import harmonic_mean
from .methods import REGISTRY, ablation_rows, table_order
from .models import PAPER_BACKBONE

PAPER_SHOTS, PAPER_SOURCE = 16, "imagenet"
AVERAGE = "average"
REFERENCE_ROW = "-"  # the zero-shot model in the ablation table
B2N_SPLITS = ("base", "novel", "hm")
TABLES = {
    "base_to_novel": "Table 1: base-to-novel generalization",
    "cross_dataset": "Table 2: cross-dataset transfer",
    "domain_generalization": "Table 3: domain generalization",
    "ablation": "Table 4: ablation (base-to-novel, averaged over datasets)",
    "multi_source_dg": "Table 5: multi-source domain generalization (leave one domain out; GuiDG's Table 8)",
}
_SINGLE = {"datasets": "dataset", "methods": "method", "seeds": "seed"}
_COLUMNS = CELL_KEYS[:-1] + ["split", "mean", "std", "seeds", "lo", "hi", "published", "gap"] + BUDGET + ["boot"]
MISSING = "—"
CI = "95% CI"


# ----------------------------------------------------------------------------- running


def notebook_params(namespace: Mapping[str, Any], protocol: str) -> dict[str, Any]:
    """The validated flat parameters of a notebook (its parameters cell and papermill's injected one).

    A single `dataset` / `method` / `seed` that is not None (as glad_core.batch injects) replaces
    that grid axis's list.
    """
    p = {k: namespace[k] for k in P.SCHEMA if k in namespace}
    for grid, single in _SINGLE.items():
        if namespace.get(single) is not None:
            p[grid] = [namespace[single]]
    p = P.validate(p)
    if p["protocol"] != protocol:
        raise P.ParamError(f"parameter 'protocol' = {p['protocol']!r} is invalid: this notebook runs {protocol!r}")
    return p


def run_grid(cells: Sequence[Cell], progress: bool = True) -> pd.DataFrame:
    """Run every cell (a cell whose record exists is read, not rerun); their rows as `results.collect` gives."""
    if not cells:
        raise ValueError("the grid is empty: name at least one dataset, method and seed")
    for cell in cells:
        run_cell(cell, progress=progress)
    wanted = {str(c.record_path.resolve()) for c in cells}
    df = collect(cells[0].results_dir)
    return df[df["record"].map(lambda r: str(Path(r).resolve())).isin(wanted)].reset_index(drop=True)


def figure_path(cells: Sequence[Cell], name: str, kind: str = "") -> Path:
    """Where a notebook's figure goes: beside the record for one cell, else in the protocol's folder
    (`kind`, e.g. "paired", names a further figure of the same table: `<name>_<kind>.png`)."""
    suffix = f"_{kind}" if kind else ""
    if len(cells) == 1:
        path = cells[0].record_path
        return path.with_name(f"{path.stem}{suffix}.png")
    c = cells[0]
    return Path(c.results_dir) / c.protocol / "figures" / f"{name}{suffix}.png"


# ----------------------------------------------------------------------------- tables


def _published_ours(table: str) -> pd.DataFrame:
    """A published table's rows of the methods registered with its name (`MethodInfo.published`), under
    our names."""
    pub = published(table)
    ours = {i.published: i.name for i in REGISTRY.values() if i.published}
    return pub[pub["method"].isin(ours)].assign(method=lambda d: d["method"].map(ours))


def _published_long(table: str) -> pd.DataFrame:
    """A published table as rows (method in our names, dataset, split, published)."""
    pub = _published_ours(table)
    if table == "base_to_novel":
        return pub.melt(id_vars=["method", "dataset"], value_vars=list(B2N_SPLITS), var_name="split",
                        value_name="published")
    return pub.assign(split=pub["dataset"], dataset=PAPER_SOURCE, published=pub["acc"])[
        ["method", "dataset", "split", "published"]]


def _ordered(t: pd.DataFrame) -> pd.DataFrame:
    """Rows by dataset (first appearance, 'average' last), then method in table order (`MethodInfo.order`;
    methods not registered here last)."""
    datasets = {d: i for i, d in enumerate(dict.fromkeys(t["dataset"]))}
    order = {m: i for i, m in enumerate(table_order())}
    rank = t["dataset"].map(lambda d: len(datasets) if d == AVERAGE else datasets[d]) * (len(order) + 1) \
        + t["method"].map(lambda m: order.get(m, len(order)))
    return t.iloc[rank.argsort(kind="stable")].reset_index(drop=True)


def _paper_setting(t: pd.DataFrame) -> pd.Series:
    return (t["backbone"] == PAPER_BACKBONE[0]) & (t["shots"] == PAPER_SHOTS)


def _with_published(t: pd.DataFrame, pub: pd.DataFrame, on: list[str], comparable: pd.Series) -> pd.DataFrame:
    """Add `published` (where the run repeats the published setting) and `gap` = mean - published."""
    out = t.reset_index(drop=True).merge(pub, on=on, how="left")
    out.loc[~(comparable.to_numpy() & _paper_setting(out).to_numpy()), "published"] = float("nan")
    out["gap"] = out["mean"] - out["published"]
    return out


def _average_over_datasets(df: pd.DataFrame) -> pd.DataFrame:
    """Base-to-novel rows of a pseudo-dataset 'average' per method and seed: base and novel averaged
    over the datasets, hm their harmonic mean (the papers' convention). Seeds missing a dataset
    of their method are left out, so every average covers the same datasets."""
    keys = ["protocol", "method", "descriptions", "backbone", "shots", "setting"]
    rows = []
    for k, g in _with_draws(df)[df["split"].isin(["base", "novel"])].groupby(keys, sort=False):
        w = g.pivot_table(index="seed", columns=["split", "dataset"], values="acc").dropna()
        for seed, base, novel in zip(w.index, w["base"].mean(axis=1), w["novel"].mean(axis=1)):
            mine = g[(g["seed"] == seed) & g["dataset"].isin(w["base"].columns)]
            boot = {s: stats.mean_draws(list(mine.loc[mine["split"] == s, "boot"])) for s in ("base", "novel")}
            boot["hm"] = None if any(b is None for b in boot.values()) else harmonic_mean(boot["base"], boot["novel"])
            rows += [{**dict(zip(keys, k)), "dataset": AVERAGE, "seed": seed, "split": s, "acc": v, "boot": boot[s],
                      **budget_mean([(None, mine)]).iloc[0]}
                     for s, v in zip(B2N_SPLITS, (base, novel, harmonic_mean(base, novel)))]
    return pd.DataFrame(rows, columns=CELL_KEYS + ["split", "acc", "boot"] + BUDGET)


def _paper_hm(t: pd.DataFrame) -> pd.DataFrame:
    """HM cells as the paper prints them: the HM of the same row's (seed-averaged) base and novel means."""
    if not (t["split"] == "hm").any():  # no records (an empty report), nothing to recompute
        return t
    keys = [k for k in CELL_KEYS if k in t.columns and k != "seed"]
    wide = t.pivot_table(index=keys, columns="split", values="mean", sort=False)
    hm = {k: 100 * harmonic_mean(b / 100, n / 100) for k, b, n in zip(wide.index, wide["base"], wide["novel"])}
    out = t.copy()
    rows = out["split"] == "hm"
    out.loc[rows, "mean"] = [hm[k] for k in out.loc[rows, keys].itertuples(index=False, name=None)]
    boot = {(*k, s): b for k, s, b in zip(t[keys].itertuples(index=False, name=None), t["split"], t["boot"])}
    out["boot"] = _objects([harmonic_mean(boot[(*k, "base")], boot[(*k, "novel")])
                            if s == "hm" and boot[(*k, "base")] is not None and boot[(*k, "novel")] is not None
                            else (None if s == "hm" else b)
                            for k, s, b in zip(t[keys].itertuples(index=False, name=None), t["split"], t["boot"])],
                           out.index)
    return out


def _objects(values: Iterable, index: pd.Index) -> pd.Series:
    """A column of arbitrary objects (bootstrap draws, None), one per row."""
    return pd.Series(list(values), index=index, dtype=object)


def _with_draws(df: pd.DataFrame) -> pd.DataFrame:
    """Collected rows with their bootstrap draws (`stats.record_draws`, in %) as column `boot`."""
    return df if "boot" in df.columns else df.assign(boot=_objects(stats.record_draws(df), df.index))


def _with_intervals(t: pd.DataFrame) -> pd.DataFrame:
    """`lo` / `hi`: the 95% percentile interval of each row's draws (NaN without draws)."""
    bounds = [stats.interval(b) if b is not None else (float("nan"), float("nan")) for b in t["boot"]]
    return t.assign(lo=[b[0] for b in bounds], hi=[b[1] for b in bounds])


def _covers(df: pd.DataFrame, keys: list[str], column: str, expected: Iterable[str]) -> set[tuple]:
    """The groups (by `keys`) whose values of `column` are exactly `expected`."""
    expected = set(expected)
    return {k for k, g in df.groupby(keys, sort=False) if set(g[column]) == expected}


def _in(t: pd.DataFrame, keys: list[str], groups: set[tuple]) -> pd.Series:
    return pd.Series([k in groups for k in t[keys].itertuples(index=False, name=None)], index=t.index, dtype=bool)


def base_to_novel_comparison(df: pd.DataFrame) -> pd.DataFrame:
    """Table 1 as tidy rows: per dataset and method, the splits base / novel / hm with seed mean, std
    and count (%), published value and gap; plus 'average' rows over the datasets, for the methods run
    on every dataset of their backbone and shots (when there are several datasets)."""
    df = _with_draws(df[df["protocol"] == "base_to_novel"])
    t = summarize(df)
    keys = ["method", "backbone", "shots", "setting"]
    every = set().union(*(_covers(g, keys, "dataset", set(g["dataset"]))
                          for _, g in df.groupby(["backbone", "shots"], sort=False)))
    if df["dataset"].nunique() > 1:  # averages of the methods run on every dataset of their setting
        t = pd.concat([t, summarize(_average_over_datasets(df[_in(df, keys, every)]))], ignore_index=True)
    t = _paper_hm(t)
    full = _covers(df, keys, "dataset", PAPER_DATASETS)
    t = _ordered(t)
    comparable = (t["dataset"] != AVERAGE) | _in(t, keys, full)
    t = _with_published(t, _published_long("base_to_novel"), ["method", "dataset", "split"], comparable)
    return _with_intervals(t)[_COLUMNS]


def transfer_comparison(df: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """Table 2 (cross_dataset) or 3 (domain_generalization) as tidy rows: per source dataset and
    method, the splits (the source, each target, 'average' over targets) with seed mean, std and
    count (%), published value (source ImageNet only) and gap."""
    df = _with_draws(df[df["protocol"] == protocol])
    t = _ordered(summarize(df))
    keys = ["dataset", "method", "backbone", "shots", "setting"]
    targets = df[(df["split"] != df["dataset"]) & (df["split"] != AVERAGE)]
    full = _covers(targets, keys, "split", PAPER_TARGETS[protocol])
    comparable = (t["split"] != AVERAGE) | _in(t, keys, full)
    return _with_intervals(_with_published(t, _published_long(protocol), ["method", "dataset", "split"],
                                           comparable))[_COLUMNS]


def _average_over_domains(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of split 'average' per set, method and seed: the mean accuracy over the held-out domains, for
    seeds that held out every domain of their set (`params.domains_of`), as GuiDG's Table 8 averages."""
    keys = [k for k in CELL_KEYS if k != "seed"]
    rows = []
    for k, g in _with_draws(df).groupby(keys, sort=False):
        w = g.pivot_table(index="seed", columns="split", values="acc")
        every = P.domains_of(k[keys.index("dataset")])
        if set(every) <= set(w.columns):
            for seed, v in w[every].dropna().mean(axis=1).items():
                mine = g[(g["seed"] == seed) & g["split"].isin(every)]
                rows.append({**dict(zip(keys, k)), "seed": seed, "split": AVERAGE, "acc": v,
                             "boot": stats.mean_draws(list(mine["boot"])), **budget_mean([(None, mine)]).iloc[0]})
    return pd.DataFrame(rows, columns=CELL_KEYS + ["split", "acc", "boot"] + BUDGET)


def _domain_rank(datasets: pd.Series, domains: pd.Series) -> pd.Series:
    """Each domain's place in its set's definition (`params.domains_of`), 'average' after them all."""
    return pd.Series([len(P.domains_of(d)) if h == AVERAGE else P.domains_of(d).index(h)
                      for d, h in zip(datasets, domains)], index=domains.index)


def multi_source_comparison(df: pd.DataFrame) -> pd.DataFrame:
    """Leave-one-domain-out results as tidy rows (GuiDG's appendix Table 8): per set and method, one split
    per held-out domain and 'average' over the domains (rows that held out every domain of the set), with
    seed mean, std and count (%), the published value (PACS, VLCS, TerraIncognita at ViT-B-16, 16 shots)
    and gap."""
    df = _with_draws(df[df["protocol"] == "multi_source_dg"])
    t = summarize(pd.concat([df, _average_over_domains(df)], ignore_index=True))
    t = _ordered(t.iloc[_domain_rank(t["dataset"], t["split"]).argsort(kind="stable")])
    pub = _published_ours("multi_source_dg").rename(columns={"domain": "split", "acc": "published"})
    return _with_intervals(_with_published(t, pub[["method", "dataset", "split", "published"]],
                                           ["method", "dataset", "split"], pd.Series(True, index=t.index)))[_COLUMNS]


def ablation_comparison(df: pd.DataFrame) -> pd.DataFrame:
    """Table 4 as tidy rows: rows (a)-(e) of the ablation, and zero-shot as row '-', with base /
    novel / hm averaged over the datasets that every row of the same backbone and shots ran on
    (`datasets` of them), then over seeds; published value (the paper's Table 4) and gap."""
    row_of = {"zeroshot": REFERENCE_ROW, **{m: r for r, m in ablation_rows().items()}}
    df = _with_draws(df[(df["protocol"] == "base_to_novel") & df["method"].isin(row_of)])
    common = [g[g["dataset"].isin(set.intersection(*(set(m["dataset"]) for _, m in g.groupby("method"))))]
              for _, g in df.groupby(["backbone", "shots"], sort=False)]  # datasets every row ran on
    df = pd.concat(common) if common else df
    t = _paper_hm(summarize(_average_over_datasets(df)))
    t.insert(0, "row", t["method"].map(row_of))
    keys = ["method", "backbone", "shots", "setting"]
    counts = df.groupby(keys)["dataset"].nunique().rename("datasets").reset_index()
    t = t.merge(counts, on=keys, how="left")
    pub = published("ablation").melt(id_vars=["row"], value_vars=list(B2N_SPLITS), var_name="split",
                                     value_name="published")
    out = _with_published(t, pub, ["row", "split"], _in(t, keys, _covers(df, keys, "dataset", PAPER_DATASETS)))
    return _with_intervals(out).sort_values("row", kind="stable")[["row", "datasets"] + _COLUMNS].reset_index(drop=True)


def paper_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Tables 1-5 (tidy) from collected records, keyed as `TABLES`."""
    return {"base_to_novel": base_to_novel_comparison(df),
            "cross_dataset": transfer_comparison(df, "cross_dataset"),
            "domain_generalization": transfer_comparison(df, "domain_generalization"),
            "ablation": ablation_comparison(df),
            "multi_source_dg": multi_source_comparison(df)}


def _fmt(v: float, sign: bool = False) -> str:
    return MISSING if v is None or math.isnan(v) else (f"{v:+.2f}" if sign else f"{v:.2f}")


def method_labels(t: pd.DataFrame) -> pd.Series:
    """Each row's method with the kind of its description provider beside it ("mugcp (retrieval)")."""
    return t["method"] + t["descriptions"].map(lambda kind: f" ({kind})" if kind else "")


def interval_text(lo: float, hi: float, sign: bool = False) -> str:
    """'[lo, hi]' in points, '—' without an interval."""
    return MISSING if lo is None or math.isnan(lo) else f"[{_fmt(lo, sign)}, {_fmt(hi, sign)}]"


def _count(v: float) -> str:
    return MISSING if math.isnan(v) else f"{v:.0f}" if v < 1e4 else f"{v / 1e3:.1f}k" if v < 1e6 else f"{v / 1e6:.2f}M"


def _seconds(v: float) -> str:
    """Seconds in a fixed width (a printed table keeps its layout from run to run)."""
    return f"{MISSING:>9}" if math.isnan(v) else f"{v:7.1f} s"


def display_budget(t: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    """The mean budget of each display row's records: optimizer steps, images seen, trained parameters,
    training and evaluation seconds ('—' where not recorded)."""
    b = t.groupby(index, sort=False)[["steps", "images_seen", "parameters", "train_s", "eval_s"]].mean()
    out = pd.DataFrame({"steps": b["steps"].map(_count), "images seen": b["images_seen"].map(_count),
                        "parameters": b["parameters"].map(_count), "train": b["train_s"].map(_seconds),
                        "eval": b["eval_s"].map(_seconds)})
    out.columns = pd.MultiIndex.from_product([["budget"], out.columns])
    return out


def display_index(t: pd.DataFrame) -> list[str]:
    """The row labels of a displayed table: ablation row or dataset, the settings that vary, the method."""
    varying = [k for k in ("backbone", "shots", "setting") if t[k].nunique() > 1]
    return (["row"] if "row" in t.columns else ["dataset"]) + varying + ["method"]


def display_table(t: pd.DataFrame) -> pd.DataFrame:
    """A tidy comparison table for reading: one row per setting and method (with its description
    provider's kind, `method_labels`), and per split the columns `ours` ('mean ± std' over seeds),
    `95% CI` (bootstrap over test images of the seed mean), `published` and `gap` ('—' where there is
    none); then the rows' mean budget (`display_budget`)."""
    if t.empty:
        return pd.DataFrame()
    index = display_index(t) + ["seeds"] + (["datasets"] if "datasets" in t.columns else [])
    values = ["ours", CI, "published", "gap"]
    cells = t.assign(method=method_labels(t),
        ours=[_fmt(m) + (f" ± {s:.2f}" if n > 1 else "") for m, s, n in zip(t["mean"], t["std"], t["seeds"])],
        published=t["published"].map(_fmt), gap=t["gap"].map(lambda v: _fmt(v, sign=True)),
        **{CI: [interval_text(lo, hi) for lo, hi in zip(t["lo"], t["hi"])]})
    w = cells.pivot_table(index=index, columns="split", values=values, aggfunc="first", sort=False)
    splits = list(dict.fromkeys(t["split"]))
    w = w.swaplevel(axis=1).reindex(columns=pd.MultiIndex.from_product([splits, values]))
    return w.join(display_budget(cells, index))


def published_note(t: pd.DataFrame) -> str:
    """How many reproduced numbers have a published counterpart, and the note on GLAD's rows."""
    matched = int(t["published"].notna().sum()) if len(t) else 0
    return (f"{matched} of {len(t)} reproduced numbers have a published counterpart (same datasets, "
            f"{PAPER_BACKBONE[0]}, {PAPER_SHOTS} shots).")


def incomplete(t: pd.DataFrame) -> list[str]:
    """Settings of a comparison table that miss a split that others have (empty when complete)."""
    if t.empty:
        return []
    keys = [k for k in ("row", "dataset", "method", "backbone", "shots", "setting") if k in t.columns]
    counts = t.groupby(keys, sort=False)["split"].nunique()
    return [" / ".join(map(str, k)) for k, n in counts.items() if n < counts.max()]


# ----------------------------------------------------------------------------- figures


def panels_of(t: pd.DataFrame) -> tuple[pd.Series, list[str]]:
    """Each row's figure panel (its dataset, and backbone / shots / setting where those vary), and the panels."""
    panel_of = t["dataset"].astype(str)
    for key in ("backbone", "shots", "setting"):  # settings that vary get panels of their own
        if t[key].nunique() > 1:
            panel_of = panel_of + f", {key} " + t[key].astype(str)
    return panel_of, list(dict.fromkeys(panel_of))


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save `fig` as PNG at `path` (its folder made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def bar_chart(t: pd.DataFrame, path: str | Path, title: str) -> Path:
    """Grouped bars of a comparison table, saved as PNG at `path` (returned): one panel per dataset
    (and backbone / shots where those vary), methods along x, one bar per split (base / novel / hm, or
    source / targets / average) with the 95% bootstrap interval as error bar (none where a row has no
    interval); published values, where matched, as black ticks."""
    panel_of, panels = panels_of(t)
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    t = t.assign(method=method_labels(t))
    methods = list(dict.fromkeys(t["method"]))
    splits = list(dict.fromkeys(t["split"]))
    width = 0.8 / len(splits)
    fig = Figure(figsize=(max(4.5, 1.1 * len(methods) * max(1, len(splits) / 3)) * cols, 3.6 * rows),
                 layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        d = t[panel_of == panel]
        for j, split in enumerate(splits):
            s = d[d["split"] == split].set_index("method").reindex(methods)
            x = [i + (j - (len(splits) - 1) / 2) * width for i in range(len(methods))]
            err = [(s["mean"] - s["lo"]).fillna(0), (s["hi"] - s["mean"]).fillna(0)]
            ax.bar(x, s["mean"], width, yerr=err, capsize=2, label=split)
            ax.scatter(x, s["published"], marker="_", s=120, color="black", zorder=3,
                       label="published" if j == 0 and s["published"].notna().any() else None)
        ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right")
        ax.set_ylim(0, 100)
        ax.set_title(panel)
        ax.set_ylabel("accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small", ncols=min(len(splits) + 1, 4), loc="upper left")
    fig.suptitle(textwrap.fill(title, width=int(8 * fig.get_figwidth())))  # ~8 title characters per inch
    return save_figure(fig, path)


def guidance_table(g: pd.DataFrame) -> pd.DataFrame:
    """GuiDG's guidance per set, method and held-out domain (seed means; `results.guidance` rows): the
    accuracy (%) with batch-averaged and per-image attention weights, each source expert's own accuracy
    (%) and its mean attention weight."""
    if g.empty:
        return pd.DataFrame()
    keys = ["dataset", "method", "held_out"]
    g = g.iloc[_domain_rank(g["dataset"], g["held_out"]).argsort(kind="stable")]  # rows in the set's domain order
    m = g.groupby(keys + ["expert"], sort=False)[["expert_acc", "weight", "acc_batch", "acc_image"]].mean()
    m = m.reset_index()
    overall = 100 * m.groupby(keys, sort=False)[["acc_batch", "acc_image"]].first()
    overall.columns = pd.MultiIndex.from_product([["accuracy %"], ["batch weights", "per-image weights"]])
    experts = m.pivot_table(index=keys, columns="expert", values=["expert_acc", "weight"], sort=False)
    order = dict.fromkeys(e for d in dict.fromkeys(g["dataset"]) for e in P.domains_of(d) if e in set(g["expert"]))
    experts = experts.reindex(columns=pd.MultiIndex.from_product([["expert_acc", "weight"], list(order)]))
    experts = experts.rename(columns={"expert_acc": "expert accuracy %", "weight": "mean weight"}, level=0)
    experts["expert accuracy %"] *= 100
    return pd.concat([overall, experts], axis=1)


def attention_heatmap(g: pd.DataFrame, path: str | Path) -> Path:
    """Heat maps of the mean attention weight (seed mean) of each source expert (columns) per held-out domain
    (rows), one panel per set and guided method; saved as PNG at `path` (returned)."""
    panels = list(g.groupby(["dataset", "method"], sort=False))
    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    for ax, ((dataset, method), d) in zip(fig.subplots(1, len(panels), squeeze=False).ravel(), panels):
        w = d.pivot_table(index="held_out", columns="expert", values="weight")
        order = P.domains_of(dataset)
        w = w.reindex(index=[h for h in order if h in w.index], columns=[e for e in order if e in w.columns])
        image = ax.imshow(w.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis")
        for (i, j), v in pd.DataFrame(w.to_numpy(dtype=float)).stack().items():
            if not math.isnan(v):  # no expert of the held-out domain itself
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black")
        ax.set_xticks(range(w.shape[1]), w.columns, rotation=30, ha="right")
        ax.set_yticks(range(w.shape[0]), w.index)
        ax.set_xlabel("source expert")
        ax.set_ylabel("held-out domain")
        ax.set_title(f"{dataset}: {method}")
        fig.colorbar(image, ax=ax, shrink=0.8, label="mean attention weight")
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- report


def markdown_table(df: pd.DataFrame) -> str:
    """A data frame (flat or two-level columns) as a Markdown table."""
    flat = df.reset_index()
    header = [" ".join(str(p) for p in (c if isinstance(c, tuple) else (c,)) if str(p)) for c in flat.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) + " |"
              for row in flat.itertuples(index=False)]
    return "\n".join(lines)


def published_reference() -> dict[str, pd.DataFrame]:
    """The published averages of every table (ViT-B/16, 16 shots), GLAD's included, for context."""
    out = {}
    for name in ("base_to_novel", "cross_dataset", "domain_generalization"):
        pub = published(name)
        cols = list(B2N_SPLITS) if name == "base_to_novel" else ["acc"]
        out[name] = pub[pub["dataset"] == AVERAGE].set_index("method")[cols]
    return out


def published_multi_source() -> pd.DataFrame:
    """GuiDG's Table 8 averages: one row per method (its label), one column per set."""
    pub = published("multi_source_dg")
    pub = pub[pub["domain"] == AVERAGE]
    return pub.pivot_table(index="label", columns="dataset", values="acc", sort=False)
