"""The standard few-shot benchmarks, the user's own datasets, few-shot sampling and base/novel splits.

Layout
------
Standard datasets are read exactly as CoOp's dataset classes read them, from one data root laid out
as in CoOp's DATASETS.md (https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md)::

    <data_root>/eurosat/2750/...             <data_root>/eurosat/split_zhou_EuroSAT.json
    <data_root>/imagenet/images/{train,val}/ <data_root>/imagenet/classnames.txt
    ...

Nine datasets come from CoOp's fixed split files (`split_zhou_<Name>.json`: paths relative to the
image folder, labels and class names, used as stored). FGVC-Aircraft is read from its own
`variants.txt` and `images_variant_{train,val,test}.txt`. ImageNet is read from class folders
(sorted wnids = labels, names from `classnames.txt`); as in CoOp its val list *is* the test list.
ImageNetV2, -Sketch, -A and -R are test-only (empty train and val). ImageNet-A and -R hold 200 of
the 1000 classes: like CoOp, their sorted wnid folders are relabelled 0..199 and the class list
holds only those 200 names, so a classifier built from `Splits.classnames` is 200-way. Each variant
reads its own `classnames.txt` (CoOp's layout) or, when absent, `<data_root>/imagenet/classnames.txt`.
Class names keep CoOp's spelling, underscores included (CoOp replaces "_" by " " when it builds
prompts). Templates are CoOp's `CUSTOM_TEMPLATES` (trainers/zsclip.py). Images in class folders are
listed sorted by name; CoOp lists them in `os.listdir` order, which depends on the file system, so
ImageNet's few-shot selections equal CoOp's only where that order is the sorted one. The split-file
datasets and FGVC-Aircraft have a fixed order and match exactly.

Few-shot sampling is Dassl's
----------------------------
`fewshot(splits, K, S)` selects the same items, in the same order, as CoOp's dataset classes do
for `DATASET.NUM_SHOTS=K` and `SEED=S` from the same split file:

* CoOp's train.py calls `set_random_seed(cfg.SEED)` (`random.seed`, numpy, torch) before
  `build_trainer`; the trainer builds the `DataManager`, which builds the dataset. With the split
  file present nothing in between draws from Python's `random` (`read_split` is deterministic).
* The dataset class then calls Dassl's `DatasetBase.generate_fewshot_dataset(train, num_shots=K)`
  and `generate_fewshot_dataset(val, num_shots=min(K, 4))`, in that order, on one random stream.
  ImageNet samples train only (its val is the test list).
* `generate_fewshot_dataset` groups items with `split_dataset_by_label` (a `defaultdict(list)`, so
  classes are visited in order of first appearance in the list, not sorted) and, per class, takes
  `random.sample(items, K)` when the class holds at least K items; a smaller class is kept whole, in
  list order and without a draw (`repeat=False`, its default and what CoOp's and GuiDG's dataset
  classes use), or, with `repeat=True`, sampled with replacement (`random.choices(items, k=K)`).

Here the stream is a private `random.Random(S)`, which yields what the module-level generator
yields after `random.seed(S)`, without touching global state. Base/novel subsampling
(`subsample_classes`) comes after few-shot sampling, as in CoOp/CoCoOp. Two CoOp quirks: its
`--seed 0` is ignored (`if args.seed:`), so CoOp's runs use seeds >= 1; and classes smaller than K
silently get fewer shots, which `fewshot` keeps (with a warning) unless `strict=True`; `repeat=True`
is Dassl's option of repeating their items instead.

The equivalence rests on Python's `random.Random(S)`, `sample` and `choices` drawing the same
numbers as in the Python CoOp ran on; tests/test_datasets.py checks it against a literal
transcription of Dassl's code on CoOp's published split files, and against the picks of Dassl's own
`generate_fewshot_dataset` (tests/data/originals).

Selections are cached like CoOp's `split_fewshot/shot_{K}-seed_{S}.pkl`, as
`split_fewshot/shot_{K}-seed_{S}.json` in the dataset's folder when it is writable, else under the
glad cache. The file holds indices into the train / val lists and a fingerprint of those lists; a
cache whose fingerprint no longer matches is resampled.
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import json
import math
import os
import random
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

from .data import DatasetSpec, Datum, Splits
from .io import write_json
from .paths import cache_dir


class DatasetError(ValueError):
    """A dataset cannot be found, read or sampled as asked; the message says what to do."""


LAYOUT_DOC = "CoOp's DATASETS.md (https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md)"
VAL_SHOTS = 4  # CoOp samples min(K, 4) validation images per class
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _spec(name: str, folder: str, image_dir: str, split_file: str | None, template: str) -> DatasetSpec:
    return DatasetSpec(name, folder, image_dir, split_file, (template,))


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (
    _spec("imagenet", "imagenet", "images", None, "a photo of a {}."),
    _spec("caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "a photo of a {}."),
    _spec("oxford_pets", "oxford_pets", "images", "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet."),
    _spec("stanford_cars", "stanford_cars", "", "split_zhou_StanfordCars.json", "a photo of a {}."),
    _spec("oxford_flowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
          "a photo of a {}, a type of flower."),
    _spec("food101", "food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food."),
    _spec("fgvc_aircraft", "fgvc_aircraft", "images", None, "a photo of a {}, a type of aircraft."),
    _spec("sun397", "sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}."),
    _spec("dtd", "dtd", "images", "split_zhou_DescribableTextures.json", "{} texture."),
    _spec("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}."),
    _spec("ucf101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}."),
    _spec("imagenetv2", "imagenetv2", "imagenetv2-matched-frequency-format-val", None, "a photo of a {}."),
    _spec("imagenet_sketch", "imagenet-sketch", "images", None, "a photo of a {}."),
    _spec("imagenet_a", "imagenet-adversarial", "imagenet-a", None, "a photo of a {}."),
    _spec("imagenet_r", "imagenet-rendition", "imagenet-r", None, "a photo of a {}."),
)}

# Where CoOp publishes each split file (links from its DATASETS.md).
SPLIT_URLS: dict[str, str] = {
    "caltech101": "https://drive.google.com/file/d/1hyarUivQE36mY6jSomru6Fjd-JzwcCzN/view?usp=sharing",
    "oxford_pets": "https://drive.google.com/file/d/1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs/view?usp=sharing",
    "stanford_cars": "https://drive.google.com/file/d/1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT/view?usp=sharing",
    "oxford_flowers": "https://drive.google.com/file/d/1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT/view?usp=sharing",
    "food101": "https://drive.google.com/file/d/1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl/view?usp=sharing",
    "sun397": "https://drive.google.com/file/d/1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq/view?usp=sharing",
    "dtd": "https://drive.google.com/file/d/1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x/view?usp=sharing",
    "eurosat": "https://drive.google.com/file/d/1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o/view?usp=sharing",
    "ucf101": "https://drive.google.com/file/d/1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y/view?usp=sharing",
}

# Datasets whose val list is the test list (CoOp evaluates ImageNet on val and samples train only).
VAL_IS_TEST = frozenset({"imagenet"})


# ----------------------------------------------------------------------------- registry


# The demo sets (built by `python -m glad_core prepare`, `glad_core.demo_data`; read here like any other).
DEMO_DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec("fashion_mnist", "fashion_mnist", "images", "split_glad_FashionMNIST.json",
                                 ("a photo of a {}, a type of clothing.",), demo=True),
    "clipart": DatasetSpec("clipart", "clipart", "images", "split_glad_Clipart.json",
                           ("a clip art of a {}.",), demo=True),
    "tuxpaint": DatasetSpec("tuxpaint", "tuxpaint", "images", "split_glad_TuxPaint.json",
                            ("a photo of a {}.",), demo=True),
    "clipart10": DatasetSpec("clipart10", "clipart10", "images", "split_glad_Clipart10.json",
                             ("a clip art of a {}.",), demo=True),
}


def demo_root() -> Path:
    """The data root of the demo sets: the cache's `data/` folder."""
    return cache_dir() / "data"


def _all_specs() -> dict[str, DatasetSpec]:
    """Standard datasets, then the demo sets."""
    return {**DATASETS, **{k: v for k, v in DEMO_DATASETS.items() if k not in DATASETS}}


def dataset_names() -> list[str]:
    """Names accepted by `load_dataset`: the standard benchmarks, then the demo sets."""
    return list(_all_specs())


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry for `name`; an unknown name lists the valid ones."""
    specs = _all_specs()
    if name not in specs:
        close = difflib.get_close_matches(name, specs, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DatasetError(f"unknown dataset {name!r}.{hint} Valid names: {', '.join(specs)}.")
    return specs[name]


def load_dataset(name: str, data_root: str | Path | None = None) -> Splits:
    """Load a registered dataset as train / val / test lists.

    `data_root` is the folder holding the standard datasets in CoOp's layout (e.g. the folder that
    contains `eurosat/`). Demo sets ignore it: they live under the cache's `data/` folder (`demo_root`),
    built there by `python -m glad_core prepare`.
    """
    spec = dataset_spec(name)
    if spec.demo:
        root = demo_root()
        if not (root / spec.folder / spec.split_file).is_file():
            raise DatasetError(not_built_message(name, root / spec.folder / spec.split_file))
    elif data_root is None:
        raise DatasetError(
            f"dataset {name!r} needs a data root: pass --data-root (data_root=...) pointing at the folder "
            f"that contains {spec.folder}/, laid out as in {LAYOUT_DOC}.")
    else:
        root = Path(os.path.abspath(os.path.expanduser(data_root)))
    folder = root / spec.folder
    if not folder.is_dir():
        raise DatasetError(_missing_folder_message(spec, root, folder))
    reader = _READERS.get(spec.name)  # demo sets cannot shadow these names (see _all_specs)
    if reader is not None:
        return reader(spec, folder)
    if spec.split_file is None:
        raise DatasetError(f"dataset {name!r} names no split file; cannot read {folder}.")
    split_path = folder / spec.split_file
    if not split_path.is_file():
        raise DatasetError(_missing_split_message(spec, split_path))
    return load_split_file(split_path, folder / spec.image_dir, spec.name, spec.templates)


def not_built_message(name: str, missing: Path) -> str:
    """The error of a demo set that is not built yet ({missing} absent), naming the command that builds it."""
    return (f"demo set {name!r} is not built ({missing} is missing): run `python -m glad_core prepare` "
            "(or `make prepare`) once to build the demo data.")


def _missing_folder_message(spec: DatasetSpec, root: Path, folder: Path) -> str:
    wanted = [f"{spec.image_dir}/" if spec.image_dir else "the image folders"]
    if spec.split_file:
        wanted.append(spec.split_file)
    if not root.is_dir():
        where = f" (the data root {root} itself does not exist)"
    elif root.name == spec.folder:
        where = f" (the data root looks like the dataset folder itself: pass its parent {root.parent})"
    else:
        where = ""
    return (f"dataset {spec.name!r} not found: folder {folder} does not exist{where}. Datasets are "
            f"expected in the layout of {LAYOUT_DOC}: {spec.folder}/ holding {' and '.join(wanted)}. "
            f"Pass as data root the folder that contains {spec.folder}/.")


def _missing_split_message(spec: DatasetSpec, split_path: Path) -> str:
    url = SPLIT_URLS.get(spec.name, "the Google Drive links in CoOp's DATASETS.md")
    return (f"split file missing: {split_path}. CoOp publishes {spec.split_file} (see {LAYOUT_DOC}; "
            f"direct link: {url}); download it into {split_path.parent}/.")


# ----------------------------------------------------------------------------- reading


def load_split_file(split_file: str | Path, image_dir: str | Path, name: str,
                    templates: Sequence[str], check_images: bool = True,
                    classnames: Sequence[str] | None = None, domain: str = "") -> Splits:
    """Read a CoOp-format split JSON ({"train"|"val"|"test": [[path, label, classname], ...]}).

    Paths are joined to `image_dir`; labels and class names are used as stored. With `classnames`
    the file must name its labels exactly so (a class may then have no image, as in one domain of
    a multi-domain set); without, the class list is read off the file. Items carry `domain`.
    """
    split_file = Path(split_file)
    try:
        raw = json.loads(split_file.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read split file {split_file}: {e}") from e
    lists: dict[str, list[Datum]] = {}
    for part in ("train", "val", "test"):
        entries = raw.get(part) if isinstance(raw, dict) else None
        if not isinstance(entries, list):
            raise DatasetError(f"split file {split_file} has no {part!r} list; expected CoOp's format "
                               '{"train": [[path, label, classname], ...], "val": [...], "test": [...]}.')
        try:
            lists[part] = [Datum(os.path.join(image_dir, rel), int(label), str(cname), domain)
                           for rel, label, cname in entries]
        except (TypeError, ValueError) as e:
            raise DatasetError(f"split file {split_file}: malformed {part!r} entry ({e}); each entry "
                               "must be [relative path, integer label, class name].") from e
    items = lists["train"] + lists["val"] + lists["test"]
    if check_images:
        _check_images(items, f"split file {split_file}")
    if classnames is None:
        return Splits(name, _classnames(items, str(split_file)), list(templates), **lists)
    wrong = next((d for d in items if not (0 <= d.label < len(classnames) and classnames[d.label] == d.classname)), None)
    if wrong is not None:
        raise DatasetError(f"split file {split_file} names label {wrong.label} {wrong.classname!r}, but the dataset's "
                           f"classes are {list(classnames)[:10]}{', ...' if len(classnames) > 10 else ''}. The file "
                           "belongs to another version of the data: delete it to split again.")
    return Splits(name, list(classnames), list(templates), **lists)


def _classnames(items: Iterable[Datum], source: str) -> list[str]:
    """Class names indexed by label; labels must be 0..n-1 with one name each."""
    names: dict[int, str] = {}
    for d in items:
        if names.setdefault(d.label, d.classname) != d.classname:
            raise DatasetError(f"{source}: label {d.label} is named both {names[d.label]!r} and {d.classname!r}.")
    if not names:
        raise DatasetError(f"{source} holds no images.")
    gaps = sorted(set(range(max(names) + 1)) - set(names))
    if min(names) < 0 or gaps:
        raise DatasetError(f"{source}: labels must run 0..{max(names)} without gaps; "
                           f"missing {gaps[:10]}" + (f", min label {min(names)}" if min(names) < 0 else ""))
    return [names[i] for i in range(len(names))]


def _check_images(items: Iterable[Datum], source: str, shown: int = 5) -> None:
    """Raise if any image path does not name an existing file (count and first few paths)."""
    paths = list(dict.fromkeys(d.impath for d in items))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(paths)} images named in {source} are missing, e.g. "
            f"{', '.join(missing[:shown])}. Check that the images sit where the layout of {LAYOUT_DOC} "
            "expects them (or that the paths are right).")


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path} is not a folder (layout: {LAYOUT_DOC}).")


def list_subdirs(path: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of `path`."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def list_files(path: Path, extensions: tuple[str, ...] | None = None) -> list[str]:
    """Sorted names of the non-hidden files of `path` (optionally only these extensions)."""
    return sorted(e.name for e in os.scandir(path) if e.is_file() and not e.name.startswith(".")
                  and (extensions is None or e.name.lower().endswith(extensions)))


def read_classnames(folder: Path) -> dict[str, str]:
    """wnid -> class name from `classnames.txt` (the folder's own, else imagenet/'s beside it)."""
    candidates = [folder / "classnames.txt", folder.parent / "imagenet" / "classnames.txt"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DatasetError(f"classnames.txt not found at {candidates[0]} (nor {candidates[1]}). CoOp's "
                           f"layout ({LAYOUT_DOC}) puts a copy of imagenet/classnames.txt in each ImageNet folder.")
    names: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            wnid, *words = line.strip().split(" ")
            names[wnid] = " ".join(words)
    return names


def _class_folder_items(image_dir: Path, folders: Sequence[str], labels: Sequence[int],
                        names: dict[str, str]) -> list[Datum]:
    """Items of class folders `image_dir/<folder>/*`, files sorted by name."""
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise DatasetError(f"{image_dir}: folders {unknown[:5]} are not listed in classnames.txt.")
    return [Datum(os.path.join(image_dir, f, im), y, names[f])
            for f, y in zip(folders, labels) for im in list_files(image_dir / f)]


def _read_imagenet(spec: DatasetSpec, folder: Path) -> Splits:
    """ImageNet: images/train and images/val class folders; val serves as val and test (as in CoOp)."""
    names = read_classnames(folder)
    train_dir, val_dir = folder / spec.image_dir / "train", folder / spec.image_dir / "val"
    _require_dir(train_dir, "ImageNet training images")
    _require_dir(val_dir, "ImageNet validation images")
    wnids = list_subdirs(train_dir)
    label = {w: i for i, w in enumerate(wnids)}
    val_wnids = list_subdirs(val_dir)
    extra = [w for w in val_wnids if w not in label]
    if extra:
        raise DatasetError(f"{val_dir}: class folders {extra[:5]} have no counterpart in {train_dir}.")
    train = _class_folder_items(train_dir, wnids, range(len(wnids)), names)
    test = _class_folder_items(val_dir, val_wnids, [label[w] for w in val_wnids], names)
    return Splits(spec.name, [names[w] for w in wnids], list(spec.templates), train=train, val=test, test=test)


def _read_imagenetv2(spec: DatasetSpec, folder: Path) -> Splits:
    """ImageNetV2: folders named by the label 0..999, in the order of classnames.txt."""
    names = read_classnames(folder)
    image_dir = folder / spec.image_dir
    _require_dir(image_dir, "ImageNetV2 images")
    missing = [str(y) for y in range(len(names)) if not (image_dir / str(y)).is_dir()]
    if missing:
        raise DatasetError(f"{image_dir}: {len(missing)} class folders missing, e.g. {missing[:5]}.")
    wnids = list(names)
    test = [Datum(os.path.join(image_dir, str(y), im), y, names[w])
            for y, w in enumerate(wnids) for im in list_files(image_dir / str(y))]
    return Splits(spec.name, [names[w] for w in wnids], list(spec.templates), test=test)


def _read_wnid_folders(spec: DatasetSpec, folder: Path) -> Splits:
    """ImageNet-Sketch / -A / -R: sorted wnid folders relabelled 0..n-1 (200 classes for -A and -R)."""
    names = read_classnames(folder)
    image_dir = folder / spec.image_dir
    _require_dir(image_dir, f"{spec.name} images")
    wnids = list_subdirs(image_dir)
    test = _class_folder_items(image_dir, wnids, range(len(wnids)), names)
    return Splits(spec.name, [names[w] for w in wnids], list(spec.templates), test=test)


def _read_aircraft(spec: DatasetSpec, folder: Path) -> Splits:
    """FGVC-Aircraft: variants.txt and images_variant_{train,val,test}.txt, as CoOp's FGVCAircraft."""
    variants = folder / "variants.txt"
    if not variants.is_file():
        raise DatasetError(f"{variants} not found: fgvc_aircraft/ must be the data/ folder of "
                           f"fgvc-aircraft-2013b (layout: {LAYOUT_DOC}).")
    classnames = [line.strip() for line in variants.read_text().splitlines() if line.strip()]
    label = {c: i for i, c in enumerate(classnames)}
    lists: dict[str, list[Datum]] = {}
    for part in ("train", "val", "test"):
        path = folder / f"images_variant_{part}.txt"
        if not path.is_file():
            raise DatasetError(f"{path} not found (fgvc-aircraft-2013b's data/ folder holds it).")
        items = []
        for line in path.read_text().splitlines():
            if line.strip():
                imid, *words = line.strip().split(" ")
                cname = " ".join(words)
                if cname not in label:
                    raise DatasetError(f"{path}: variant {cname!r} is not in {variants}.")
                items.append(Datum(os.path.join(folder, spec.image_dir, imid + ".jpg"), label[cname], cname))
        lists[part] = items
    _check_images(lists["train"] + lists["val"] + lists["test"], f"{folder}/images_variant_*.txt")
    return Splits(spec.name, classnames, list(spec.templates), **lists)


_READERS: dict[str, Callable[[DatasetSpec, Path], Splits]] = {
    "imagenet": _read_imagenet,
    "fgvc_aircraft": _read_aircraft,
    "imagenetv2": _read_imagenetv2,
    "imagenet_sketch": _read_wnid_folders,
    "imagenet_a": _read_wnid_folders,
    "imagenet_r": _read_wnid_folders,
}


# ----------------------------------------------------------------------------- user datasets


def load_folder_dataset(root: str | Path, name: str | None = None, template: str = "a photo of a {}.",
                        val_frac: float = 0.2, test_frac: float = 0.3, seed: int = 1,
                        split_file: str | Path | None = None) -> Splits:
    """A folder-per-class tree (`root/<class name>/<images>`) split per class, deterministically.

    Classes are the sorted folder names; each class's sorted images are shuffled with
    `random.Random(seed)` and cut into val, test and the rest train (fractions rounded per class).
    With `split_file`, an existing file is read instead (as CoOp does; delete it to re-split) and
    a new split is written there in CoOp's format, paths relative to `root`.
    """
    root = Path(os.path.abspath(os.path.expanduser(root)))
    name = name or root.name
    _check_template(template)
    if split_file is not None and Path(split_file).is_file():
        return load_split_file(split_file, root, name, [template])
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; expected {root}/<class name>/<image files>.")
    by_class = {c: [os.path.join(root, c, f) for f in list_files(root / c, IMAGE_EXTENSIONS)] for c in list_subdirs(root)}
    if not by_class:
        raise DatasetError(f"no class folders in {root}; expected {root}/<class name>/<image files>.")
    empty = [c for c, paths in by_class.items() if not paths]
    if empty:
        raise DatasetError(f"class folders without images ({', '.join(IMAGE_EXTENSIONS)}) in {root}: "
                           f"{empty[:10]}; add images or remove the folders.")
    splits = _split_by_class(by_class, name, template, val_frac, test_frac, seed, str(root))
    if split_file is not None:
        save_split_file(splits, split_file, root)
    return splits


def load_csv_dataset(csv_file: str | Path, name: str | None = None, template: str = "a photo of a {}.",
                     val_frac: float = 0.2, test_frac: float = 0.3, seed: int = 1,
                     image_root: str | Path | None = None) -> Splits:
    """A CSV of `path,label[,split]` rows (optional header); `label` is the class name.

    Relative paths are resolved against `image_root` (default: the CSV's folder). Classes are the
    sorted class names. Without a split column the rows are split as in `load_folder_dataset`;
    with one, every row must name train, val or test.
    """
    csv_file = Path(os.path.abspath(os.path.expanduser(csv_file)))
    name = name or csv_file.stem
    _check_template(template)
    base = os.path.abspath(os.path.expanduser(image_root)) if image_root is not None else str(csv_file.parent)
    try:
        with open(csv_file, newline="") as f:
            rows = [[c.strip() for c in row] for row in csv.reader(f) if any(c.strip() for c in row)]
    except OSError as e:
        raise DatasetError(f"cannot read CSV {csv_file}: {e}") from e
    if rows and rows[0][0].lower() == "path":
        rows = rows[1:]
    bad = [i for i, r in enumerate(rows, 1) if len(r) not in (2, 3) or not r[0] or not r[1]]
    if not rows or bad:
        raise DatasetError(f"{csv_file}: expected rows 'path,label[,split]'"
                           + (f"; malformed data rows {bad[:10]}" if bad else "; found no rows") + ".")
    with_split = {len(r) == 3 for r in rows}
    if with_split == {True, False}:
        raise DatasetError(f"{csv_file}: either every row or no row must have a split column.")
    splits_named = {r[2] for r in rows if len(r) == 3} - {"train", "val", "test"}
    if splits_named:
        raise DatasetError(f"{csv_file}: unknown split values {sorted(splits_named)}; use train, val or test.")
    paths = [os.path.join(base, r[0]) for r in rows]
    classes = sorted({r[1] for r in rows})
    label = {c: i for i, c in enumerate(classes)}
    items = [Datum(p, label[r[1]], r[1]) for p, r in zip(paths, rows)]
    _check_images(items, f"CSV {csv_file}")
    if with_split == {True}:
        lists = {part: [d for d, r in zip(items, rows) if r[2] == part] for part in ("train", "val", "test")}
        return Splits(name, classes, [template], **lists)
    by_class: dict[str, list[str]] = {c: [] for c in classes}
    for d in items:
        by_class[d.classname].append(d.impath)
    return _split_by_class(by_class, name, template, val_frac, test_frac, seed, str(csv_file))


def save_split_file(splits: Splits, split_file: str | Path, image_dir: str | Path) -> Path:
    """Write `splits` as a CoOp-format split JSON with paths relative to `image_dir`."""
    def rows(items: list[Datum]) -> list[list]:
        return [[Path(os.path.relpath(d.impath, image_dir)).as_posix(), d.label, d.classname] for d in items]
    return write_json(split_file, {"train": rows(splits.train), "val": rows(splits.val), "test": rows(splits.test)})


def _check_template(template: str) -> None:
    if "{}" not in template:
        raise DatasetError(f"prompt template {template!r} must contain '{{}}' where the class name goes.")


def _split_by_class(by_class: dict[str, list[str]], name: str, template: str, val_frac: float,
                    test_frac: float, seed: int, source: str) -> Splits:
    """Label the classes in order and cut each one into train / val / test (`split_per_class`)."""
    groups = [[Datum(p, label, cname) for p in paths] for label, (cname, paths) in enumerate(by_class.items())]
    train, val, test = split_per_class(groups, val_frac, test_frac, seed, source)
    return Splits(name, list(by_class), [template], train=train, val=val, test=test)


def split_per_class(groups: Sequence[Sequence[Datum]], val_frac: float, test_frac: float, seed: int,
                    source: str, min_train: int = 1) -> tuple[list[Datum], list[Datum], list[Datum]]:
    """Train, val and test lists from per-class item lists, deterministically.

    One `random.Random(seed)` shuffles the classes' lists in turn; each class gives its first
    round(n * val_frac) items to val, the next round(n * test_frac) to test and the rest to train
    (Python's round: halves go to the even number). A class left with fewer than `min_train`
    training items raises (`min_train=0` accepts empty classes).
    """
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise DatasetError(f"val_frac={val_frac} and test_frac={test_frac} must be in [0, 1) with a sum below 1.")
    rng = random.Random(seed)
    train, val, test, too_small = [], [], [], []
    for items in groups:
        items = list(items)
        rng.shuffle(items)
        n_val, n_test = round(len(items) * val_frac), round(len(items) * test_frac)
        if len(items) - n_val - n_test < min_train:
            too_small.append(f"{items[0].classname} ({len(items)})" if items else "a class (0)")
        val += items[:n_val]
        test += items[n_val:n_val + n_test]
        train += items[n_val + n_test:]
    if too_small:
        raise DatasetError(f"{source}: classes too small to keep a training image with val_frac={val_frac}, "
                           f"test_frac={test_frac}: {', '.join(too_small[:10])}. Add images or lower the fractions.")
    return train, val, test


# ----------------------------------------------------------------------------- few-shot sampling


def fewshot(splits: Splits, shots: int, seed: int, cache: str | Path | None = "auto",
            strict: bool = False, val_shots: int | None = None, repeat: bool = False) -> Splits:
    """K-shot train and min(K, 4)-shot val lists, selected exactly as Dassl's generate_fewshot_dataset.

    `shots < 1` returns `splits` unchanged (CoOp's "all data"). `cache`: "auto" (the dataset's
    `split_fewshot/` folder when writable, else the glad cache), a folder, or None (no cache).
    A class smaller than the shot count keeps all its items (Dassl's default), or with `repeat=True`
    is sampled with replacement (Dassl's option), with a warning; `strict=True` raises instead. Apply
    before `subsample_classes`, as CoOp does. `val_shots` replaces CoOp's min(K, 4) (GuiDG draws K from
    val too: its guidance pool), on the same stream.
    """
    if shots < 1:
        return splits
    if not splits.train:
        raise DatasetError(f"{splits.name!r} has no training images (a test-only dataset); few-shot "
                           "sampling applies to datasets with a train split.")
    if seed < 0:
        raise DatasetError(f"seed must be >= 0, got {seed} (CoOp's runs use seeds 1, 2, 3).")
    if val_shots is not None and val_shots < 1:
        raise DatasetError(f"val_shots must be >= 1 (or None for CoOp's min(shots, {VAL_SHOTS})), got {val_shots}.")
    sample_val = splits.name not in VAL_IS_TEST
    n_val = min(shots, VAL_SHOTS) if val_shots is None else val_shots
    parts = {"train": shots, "val": n_val} if sample_val else {"train": shots}
    small = _check_class_sizes(splits, parts, strict, repeat)
    suffix = "" if val_shots is None else f"-val_{val_shots}"
    paths = [d / f"shot_{shots}-seed_{seed}{suffix}.json" for d in _cache_dirs(splits, cache)]
    # with a class smaller than K the selection depends on `repeat`: part of the key (a cache of the other mode,
    # or of a version that always repeated, is resampled)
    key = (_fingerprint(splits, parts) + (f"-repeat_{repeat}" if small else "")) if paths else ""
    picked = None
    for path in paths:
        picked = _read_cache(path, key, splits, parts)
        if picked is not None:
            break
    if picked is None:
        rng = random.Random(seed)  # the same stream as random.seed(seed), consumed train first, then val
        picked = {part: _sample_per_class(getattr(splits, part), k, rng, repeat) for part, k in parts.items()}
        _write_cache(paths, {"dataset": splits.name, "shots": shots, "seed": seed, "fingerprint": key, **picked})
    train = [splits.train[i] for i in picked["train"]]
    val = [splits.val[i] for i in picked["val"]] if sample_val else splits.val
    return splits.with_lists(train=train, val=val)


def _sample_per_class(items: Sequence[Datum], shots: int, rng: random.Random, repeat: bool = False) -> list[int]:
    """Indices chosen by Dassl's generate_fewshot_dataset(repeat=`repeat`) with generator `rng`."""
    by_label: dict[int, list[int]] = {}  # insertion order = first appearance, like defaultdict
    for i, d in enumerate(items):
        by_label.setdefault(d.label, []).append(i)
    picked: list[int] = []
    for idxs in by_label.values():
        if len(idxs) >= shots:
            picked += rng.sample(idxs, shots)
        else:
            picked += rng.choices(idxs, k=shots) if repeat else idxs
    return picked


def _check_class_sizes(splits: Splits, parts: dict[str, int], strict: bool, repeat: bool) -> bool:
    """Warn (or raise when strict) about classes holding fewer images than the shots asked; whether any does."""
    problems = []
    for part, k in parts.items():
        counts: dict[int, int] = {}
        for d in getattr(splits, part):
            counts[d.label] = counts.get(d.label, 0) + 1
        small = [f"{splits.classnames[y]} ({n})" for y, n in counts.items() if n < k]
        if small:
            problems.append(f"{len(small)} {part} classes hold fewer than {k} images: {', '.join(small[:5])}"
                            + (", ..." if len(small) > 5 else ""))
    if not problems:
        return False
    msg = f"{splits.name}: " + "; ".join(problems)
    if strict:
        raise DatasetError(msg + ". Use fewer shots, or strict=False to keep all their images (Dassl's default) "
                           "or sample them with replacement (repeat=True).")
    what = ("sampling them with replacement (random.choices, Dassl's repeat=True)" if repeat
            else "keeping all their images, no repeats (Dassl's default, repeat=False)")
    warnings.warn(f"{msg}; {what}.", stacklevel=3)
    return True


def _fingerprint(splits: Splits, parts: Iterable[str]) -> str:
    """Hash of the sampled lists: paths below their common folder, labels, class names."""
    lists = [getattr(splits, part) for part in parts]
    cut = os.path.commonprefix([d.impath for items in lists for d in items]).rfind(os.sep) + 1
    rows = [[[d.impath[cut:], d.label, d.classname] for d in items] for items in lists]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _cache_dirs(splits: Splits, cache: str | Path | None) -> list[Path]:
    """Folders to read / write the selection, best first."""
    if cache is None:
        return []
    if cache != "auto":
        return [Path(cache)]
    fallback = cache_dir() / "split_fewshot" / splits.name
    folder = _dataset_folder(splits)
    return [folder / "split_fewshot", fallback] if folder is not None else [fallback]


def _dataset_folder(splits: Splits) -> Path | None:
    """The registered dataset folder the training images live in, if any."""
    spec = _all_specs().get(splits.name)
    if spec is None:
        return None
    marker = spec.split_file or spec.image_dir
    return next((p for p in Path(splits.train[0].impath).parents
                 if p.name == Path(spec.folder).name and (p / marker).exists()), None)


def _read_cache(path: Path, key: str, splits: Splits, parts: Iterable[str]) -> dict[str, list[int]] | None:
    """The cached selection at `path` if it exists and matches the current lists, else None."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        valid = data["fingerprint"] == key and all(
            isinstance(i, int) and 0 <= i < len(getattr(splits, part)) for part in parts for i in data[part])
    except (OSError, ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        warnings.warn(f"ignoring few-shot cache {path}: it does not match the current split; resampling.",
                      stacklevel=3)
        return None
    return data


def _write_cache(paths: list[Path], data: dict) -> None:
    """Write the selection to the first folder that accepts it."""
    for path in paths:
        try:
            write_json(path, data)
            return
        except OSError:
            continue


# ----------------------------------------------------------------------------- base / novel


def subsample_classes(splits: Splits, subsample: Literal["all", "base", "novel", "new"] = "all") -> Splits:
    """CoCoOp's base-to-novel split: sorted labels, first ceil(n/2) are base, the rest novel.

    Each subset is relabelled from 0 in train, val and test; class names follow. "new" is
    CoOp's spelling of "novel". Labels are taken from train (from test for test-only sets).
    """
    if subsample not in ("all", "base", "novel", "new"):
        raise DatasetError(f"subsample must be 'all', 'base' or 'novel' ('new'), got {subsample!r}.")
    if subsample == "all":
        return splits
    labels = sorted({d.label for d in (splits.train or splits.test)})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(selected)}

    def keep(items: list[Datum]) -> list[Datum]:
        return [replace(d, label=relabel[d.label]) for d in items if d.label in relabel]

    return splits.with_lists(train=keep(splits.train), val=keep(splits.val), test=keep(splits.test),
                             classnames=[splits.classnames[y] for y in selected])
