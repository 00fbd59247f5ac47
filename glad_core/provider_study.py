"""MuGCP under each description provider on one base-to-novel grid, and where its AMG attends.

Each variant is a `method_settings` section of `mugcp` over the same parameters (`variant`):

    none       scp=false, vcp=false: no description is read; MuGCP is CoOp exactly
    class      descriptions=wordnet: WordNet glosses; a training image gets its own class's, a test
               image the gloss of the class the frozen zero-shot model predicts (no test label is read)
    retrieval  descriptions=<source>: human texts in training, the nearest training image's at test
    oracle     descriptions=<source>, oracle=true: test images get their own human texts (an upper
               bound: a human description names the object), recorded as kind "oracle"

The variants differ in their hyper-parameters, so each writes its own record (the record's name is
a digest of every parameter that changes it) and `descriptions.kind` says how its test images were
described (`EXPECTED_KIND`).
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageOps

from . import params as P
from .data import Datum, open_rgb
from .protocols import Cell
from .report import B2N_SPLITS, base_to_novel_comparison

PROVIDER_KEYS = ("scp", "vcp", "descriptions", "test_descriptions", "oracle")
EXPECTED_KIND = {"none": "", "class": "class", "retrieval": "retrieval", "oracle": "oracle"}


def variant(name: str, source: str = "tuxpaint") -> dict[str, Any]:
    """The provider settings of variant `name` (every key of `PROVIDER_KEYS`); `source`: the per-image texts."""
    if name not in EXPECTED_KIND:
        raise P.ParamError(f"unknown provider variant {name!r}; allowed: {list(EXPECTED_KIND)}")
    on = {"scp": True, "vcp": True, "test_descriptions": "auto", "oracle": False}
    return {"none": {**on, "scp": False, "vcp": False, "descriptions": ""},
            "class": {**on, "descriptions": "wordnet"},
            "retrieval": {**on, "descriptions": source},
            "oracle": {**on, "descriptions": source, "oracle": True}}[name]


def provider_cells(p: dict[str, Any], providers: Sequence[str], source: str = "tuxpaint") -> dict[str, list[Cell]]:
    """The mugcp cells (datasets x seeds) of each provider variant over the parameters `p` (its other
    `method_settings.mugcp` keys kept, the provider keys replaced)."""
    settings = dict(p.get("method_settings") or {})
    own = {k: v for k, v in settings.get("mugcp", {}).items() if k not in PROVIDER_KEYS}
    return {name: P.cells({**p, "methods": ["mugcp"],
                           "method_settings": {**settings, "mugcp": {**own, **variant(name, source)}}})
            for name in providers}


def _provider_of(df: pd.DataFrame, cells: dict[str, list[Cell]]) -> pd.Series:
    where = {str(c.record_path.resolve()): name for name, cs in cells.items() for c in cs}
    return df["record"].map(lambda r: where.get(str(Path(r).resolve())))


def provider_table(df: pd.DataFrame, cells: dict[str, list[Cell]]) -> pd.DataFrame:
    """Per dataset and provider variant: the record's provider kind, base / novel / HM (%, seed means; HM
    of the means, as the paper) and the number of seeds."""
    df = df.assign(provider=_provider_of(df, cells))
    rows = []
    for name in cells:
        for dataset, g in df[df["provider"] == name].groupby("dataset", sort=False):
            t = base_to_novel_comparison(g.drop(columns="provider")).set_index("split")
            rows.append({"dataset": dataset, "provider": name, "kind": g["descriptions"].iloc[0],
                         **{s: float(t.loc[s, "mean"]) for s in B2N_SPLITS}, "seeds": int(t.loc["base", "seeds"])})
    return pd.DataFrame(rows).set_index(["dataset", "provider"]).sort_index(level="dataset", sort_remaining=False)


def provider_records(df: pd.DataFrame, cells: dict[str, list[Cell]]) -> dict[str, list[dict]]:
    """The records of each provider variant, read from the rows of `report.run_grid`."""
    df = df.assign(provider=_provider_of(df, cells)).dropna(subset=["provider"])
    return {name: [json.loads(Path(r).read_text()) for r in dict.fromkeys(g["record"])]
            for name, g in df.groupby("provider", sort=False)}


def attention_maps(record: dict, n: int = 4, part: str = "base") -> tuple[list[Datum], torch.Tensor, list[str]]:
    """AMG's attention over the visual grid for `n` test images (one per class, in class order) of the
    `part` ("base" or "novel") classes of a mugcp base-to-novel record: its trained state reloaded, its
    provider rebuilt on its training split. Returns the images, the maps [n, H, W] (each sums to 1) and
    the descriptions the images were conditioned on."""
    from .datasets import fewshot, load_dataset, subsample_classes
    from .landscape import load_tuned, training_split

    method, preprocess = load_tuned(record)
    if not method.conditioned or not method.hp["vcp"]:
        raise ValueError("attention maps need a mugcp record with vcp on (its AMG); this one has none.")
    method.build_provider(training_split(record).train)
    p = record["params"]
    split = subsample_classes(fewshot(load_dataset(p["dataset"], p["data_root"]), p["shots"], p["seed"]), part)
    firsts = {d.label: d for d in reversed(split.test)}
    items = [firsts[k] for k in sorted(firsts)][:n]
    device = method.logit_scale.device
    method.keep_attention = True
    method.use_items(items, "test")
    try:
        with torch.no_grad(), method.inference():
            f = method.encode_image(torch.stack([preprocess(open_rgb(d.impath)) for d in items]).to(device))
            texts = method.texts(f, split.classnames, split.templates)
            method.class_features(split.classnames, split.templates, f)
    finally:
        method.keep_attention = False
    return items, method.attention, texts


def attention_figure(items: Sequence[Datum], maps: torch.Tensor, texts: Sequence[str], path: str | Path,
                     title: str = "Where AMG attends", size: int = 224) -> Path:
    """Each image (resized and centre-cropped to `size`, as the model sees it) with its attention map
    [H, W] over it as a heat map, titled by its class and description; saved as PNG at `path`."""
    fig = Figure(figsize=(2.6 * len(items), 3.2), layout="constrained")
    axes = fig.subplots(1, len(items), squeeze=False)[0]
    scale = {"vmin": float(maps.min()), "vmax": float(maps.max())}  # one colour scale for every image
    for ax, d, a, text in zip(axes, items, maps, texts):
        ax.imshow(ImageOps.fit(open_rgb(d.impath), (size, size), Image.Resampling.BICUBIC))
        heat = ax.imshow(a.numpy(), cmap="jet", alpha=0.45, extent=(0, size, size, 0), interpolation="bilinear",
                         **scale)
        ax.set_title(f"{d.classname}\n" + textwrap.shorten(text, 40, placeholder="…"), fontsize=8)
        ax.axis("off")
    fig.colorbar(heat, ax=axes.tolist(), shrink=0.7, label=f"attention (uniform: {1 / maps[0].numel():.4f})")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
