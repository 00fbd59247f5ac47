"""Labelled image lists and the torch Dataset that reads them.

Every dataset in glad (the CoOp benchmarks, the ImageNet variants, the embedded demo sets and a
user's own folder) is reduced to a `Splits`: class names, prompt templates and three lists of
`Datum` (train / val / test), exactly the information CoOp's split files hold.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from PIL import Image


class ImageReadError(RuntimeError):
    """An image file could not be opened or decoded."""


@dataclass(frozen=True)
class Datum:
    """One labelled image: absolute path, integer label, class name, and its domain ("" when the
    dataset has a single domain; e.g. "sketch" in a multi-domain set, see `glad_core.domains`)."""

    impath: str
    label: int
    classname: str
    domain: str = ""


@dataclass
class Splits:
    """A dataset as train / val / test lists with class names and prompt templates."""

    name: str
    classnames: list[str]
    templates: list[str]
    train: list[Datum] = field(default_factory=list)
    val: list[Datum] = field(default_factory=list)
    test: list[Datum] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def with_lists(self, **lists: list[Datum]) -> "Splits":
        """A copy with some of train / val / test (and optionally classnames) replaced."""
        return replace(self, **lists)


def open_rgb(path: str) -> Image.Image:
    """Open an image as RGB; transparent pixels are composited on white. Errors name the file."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
                canvas.alpha_composite(im)
                return canvas.convert("RGB")
            return im.convert("RGB")
    except Exception as e:  # PIL raises several types for unreadable / truncated files
        raise ImageReadError(f"cannot read image {path!r}: {e}. Replace or delete the file "
                             "(and its line in the split file).") from e


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset of (image tensor, label) over a list of `Datum`."""

    def __init__(self, items: Sequence[Datum], transform: Callable | None = None):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        d = self.items[i]
        img = open_rgb(d.impath)
        return (self.transform(img) if self.transform else img), d.label


@dataclass(frozen=True)
class DatasetSpec:
    """Where a named dataset lives and how its classes are prompted.

    `folder` is relative to the data root (`--data-root`, or the cache's `data/` for demo sets);
    `image_dir` is relative to `folder`; `split_file` is a CoOp-format JSON inside `folder`
    ({"train"|"val"|"test": [[relative impath, label, classname], ...]}), or None for datasets
    that CoOp reads from class folders (ImageNet and its variants).
    """

    name: str
    folder: str
    image_dir: str
    split_file: str | None
    templates: tuple[str, ...]
    demo: bool = False
