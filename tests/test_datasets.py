"""Dataset loaders (CoOp layouts), user datasets, Dassl-identical few-shot sampling, base/novel splits."""
from __future__ import annotations

import io
import json
import math
import os
import random
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from conftest import shared_dir
from glad_core import datasets as ds
from glad_core.data import Datum, Splits, open_rgb
from glad_core.datasets import (DATASETS, DEMO_DATASETS, DatasetError, dataset_names, fewshot, load_csv_dataset,
                                load_dataset, load_folder_dataset, load_split_file, subsample_classes)

# =============================================================================================
# REFERENCE: a literal transcription of the original code, kept as close to it as possible
# (print calls dropped; Dassl's Datum also asserts that the file exists, dropped so that split
# files without images can be checked).
#   Dassl.pytorch  dassl/utils/tools.py             set_random_seed (its Python-random part)
#   Dassl.pytorch  dassl/data/datasets/base_dataset.py  DatasetBase.generate_fewshot_dataset,
#                                                       DatasetBase.split_dataset_by_label
#   CoOp           datasets/oxford_pets.py           OxfordPets.read_split, OxfordPets.subsample_classes
#   CoOp           datasets/eurosat.py (and the other split-file datasets): __init__'s sequence
# =============================================================================================


class RefDatum:
    def __init__(self, impath="", label=0, domain=0, classname=""):
        assert isinstance(impath, str)
        self._impath = impath
        self._label = label
        self._domain = domain
        self._classname = classname

    @property
    def impath(self):
        return self._impath

    @property
    def label(self):
        return self._label

    @property
    def classname(self):
        return self._classname


def ref_set_random_seed(seed):
    random.seed(seed)


def ref_split_dataset_by_label(data_source):
    output = defaultdict(list)

    for item in data_source:
        output[item.label].append(item)

    return output


def ref_generate_fewshot_dataset(*data_sources, num_shots=-1, repeat=False):
    if num_shots < 1:
        if len(data_sources) == 1:
            return data_sources[0]
        return data_sources

    output = []

    for data_source in data_sources:
        tracker = ref_split_dataset_by_label(data_source)
        dataset = []

        for label, items in tracker.items():
            if len(items) >= num_shots:
                sampled_items = random.sample(items, num_shots)
            else:
                if repeat:
                    sampled_items = random.choices(items, k=num_shots)
                else:
                    sampled_items = items
            dataset.extend(sampled_items)

        output.append(dataset)

    if len(output) == 1:
        return output[0]

    return output


def ref_read_split(filepath, path_prefix):
    def _convert(items):
        out = []
        for impath, label, classname in items:
            impath = os.path.join(path_prefix, impath)
            item = RefDatum(impath=impath, label=int(label), classname=classname)
            out.append(item)
        return out

    with open(filepath, "r") as f:
        split = json.load(f)
    train = _convert(split["train"])
    val = _convert(split["val"])
    test = _convert(split["test"])

    return train, val, test


def ref_subsample_classes(*args, subsample="all"):
    assert subsample in ["all", "base", "new"]

    if subsample == "all":
        return args

    dataset = args[0]
    labels = set()
    for item in dataset:
        labels.add(item.label)
    labels = list(labels)
    labels.sort()
    n = len(labels)
    # Divide classes into two halves
    m = math.ceil(n / 2)

    if subsample == "base":
        selected = labels[:m]  # take the first half
    else:
        selected = labels[m:]  # take the second half
    relabeler = {y: y_new for y_new, y in enumerate(selected)}

    output = []
    for dataset in args:
        dataset_new = []
        for item in dataset:
            if item.label not in selected:
                continue
            item_new = RefDatum(
                impath=item.impath,
                label=relabeler[item.label],
                classname=item.classname
            )
            dataset_new.append(item_new)
        output.append(dataset_new)

    return output


def ref_coop_dataset(split_path, image_dir, num_shots, seed, subsample="all"):
    """CoOp's train.py (set_random_seed) then a split-file dataset's __init__ (no pickle cache)."""
    ref_set_random_seed(seed)
    train, val, test = ref_read_split(split_path, image_dir)
    if num_shots >= 1:
        train = ref_generate_fewshot_dataset(train, num_shots=num_shots)
        val = ref_generate_fewshot_dataset(val, num_shots=min(num_shots, 4))
    train, val, test = ref_subsample_classes(train, val, test, subsample=subsample)
    return train, val, test

# ===================================================== end of reference transcription =========


def rows(items) -> list[tuple[str, int, str]]:
    return [(d.impath, d.label, d.classname) for d in items]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private glad cache; the global random state is restored after each test."""
    monkeypatch.setenv("GLAD_CACHE", str(tmp_path / "glad-cache"))
    state = random.getstate()
    yield
    random.setstate(state)


# ---------------------------------------------------------------------------- fixture trees

_JPEG: list[bytes] = []


def write_image(path: Path) -> None:
    """A tiny real JPEG (the same bytes every time)."""
    if not _JPEG:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (200, 30, 60)).save(buf, format="JPEG")
        _JPEG.append(buf.getvalue())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_JPEG[0])


def make_split_dataset(root: Path, name: str, classes: list[str], per_class=(4, 2, 3), flat=False) -> dict:
    """A split-file dataset in CoOp's layout: images under folder/image_dir and its split_zhou JSON."""
    spec = DATASETS[name]
    image_dir = root / spec.folder / spec.image_dir
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, cname in enumerate(classes):
        k = 0
        for part, n in zip(split, per_class):
            for _ in range(n):
                rel = f"{cname}_{k}.jpg" if flat else f"{cname}/{cname}_{k}.jpg"
                write_image(image_dir / rel)
                split[part].append([rel, label, cname])
                k += 1
    (root / spec.folder / spec.split_file).write_text(json.dumps(split))
    return split


WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]
NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark"]


def write_classnames(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, NAMES)))


def make_imagenet(root: Path, sizes=(5, 3, 6, 2, 4)) -> None:
    write_classnames(root / "imagenet")
    for w, n in zip(reversed(WNIDS), reversed(sizes)):  # creation order must not matter
        for i in range(n):
            write_image(root / "imagenet/images/train" / w / f"{w}_{i}.JPEG")
        write_image(root / "imagenet/images/val" / w / f"ILSVRC2012_val_{w}.JPEG")


# ---------------------------------------------------------------------------- registry

# Transcribed from CoOp's datasets/*.py (dataset_dir, image_dir, split_path) and trainers/zsclip.py.
COOP = {
    "imagenet": ("imagenet", "images", None, "ImageNet"),
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "Caltech101"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json", "OxfordPets"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json", "StanfordCars"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", "OxfordFlowers"),
    "food101": ("food-101", "images", "split_zhou_Food101.json", "Food101"),
    "fgvc_aircraft": ("fgvc_aircraft", "images", None, "FGVCAircraft"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json", "SUN397"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json", "DescribableTextures"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json", "EuroSAT"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "UCF101"),
    "imagenetv2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", None, "ImageNetV2"),
    "imagenet_sketch": ("imagenet-sketch", "images", None, "ImageNetSketch"),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a", None, "ImageNetA"),
    "imagenet_r": ("imagenet-rendition", "imagenet-r", None, "ImageNetR"),
}
CUSTOM_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}


def test_registry_matches_coop():
    assert list(DATASETS) == list(COOP)
    for name, (folder, image_dir, split_file, coop_name) in COOP.items():
        spec = DATASETS[name]
        assert (spec.folder, spec.image_dir, spec.split_file) == (folder, image_dir, split_file), name
        assert spec.templates == (CUSTOM_TEMPLATES[coop_name],) and not spec.demo
    assert set(ds.SPLIT_URLS) == {n for n, v in COOP.items() if v[2]}


def test_demo_sets_are_merged():
    names = dataset_names()
    assert names[:len(DATASETS)] == list(DATASETS)
    for name, spec in DEMO_DATASETS.items():
        assert name in names and spec.demo and ds.dataset_spec(name) is (DATASETS.get(name) or spec)


def test_demo_set_loads_from_the_cache(tmp_path):
    """A demo set already built under the cache's data/ folder loads without a data root."""
    name, spec = next(iter(DEMO_DATASETS.items()))
    folder = tmp_path / "glad-cache/data" / spec.folder
    split = {"train": [], "val": [], "test": []}
    for y, cname in enumerate(["shirt", "shoe"]):
        for i, part in enumerate(("train", "train", "val", "test")):
            write_image(folder / spec.image_dir / cname / f"{i}.png")
            split[part].append([f"{cname}/{i}.png", y, cname])
    (folder / spec.split_file).write_text(json.dumps(split))
    s = load_dataset(name)
    assert s.classnames == ["shirt", "shoe"] and s.test[1].impath == str(folder / spec.image_dir / "shoe/3.png")
    fewshot(s, 1, 1)
    assert (folder / "split_fewshot/shot_1-seed_1.json").is_file()


def test_a_demo_set_not_built_names_the_command_that_builds_it():
    """Readers only read: a demo set missing from the cache is an error naming `python -m glad_core prepare`."""
    from glad_core.domains import load_domains

    with pytest.raises(DatasetError, match=r"demo set 'tuxpaint' is not built .*python -m glad_core prepare"):
        load_dataset("tuxpaint")
    with pytest.raises(DatasetError, match=r"demo set 'mini_pacs' is not built .*python -m glad_core prepare"):
        load_domains("mini_pacs")


# ---------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("name", [n for n, s in DATASETS.items() if s.split_file])
def test_split_file_datasets(tmp_path, name):
    split = make_split_dataset(tmp_path, name, ["Annual Crop Land", "Forest", "Sea or Lake"])
    s = load_dataset(name, tmp_path)
    folder = tmp_path / DATASETS[name].folder / DATASETS[name].image_dir
    assert s.name == name and s.classnames == ["Annual Crop Land", "Forest", "Sea or Lake"]
    assert s.templates == list(DATASETS[name].templates)
    for part in ("train", "val", "test"):
        assert rows(getattr(s, part)) == [(os.path.join(folder, p), y, c) for p, y, c in split[part]]
    assert all(os.path.isfile(d.impath) for d in s.train + s.val + s.test)


def test_flat_layouts(tmp_path):
    """Pets (images/<Breed>_n.jpg), Cars (paths relative to the dataset folder itself)."""
    make_split_dataset(tmp_path, "oxford_pets", ["abyssinian", "american_bulldog"], flat=True)
    pets = load_dataset("oxford_pets", str(tmp_path))
    assert pets.train[0].impath == str(tmp_path / "oxford_pets/images/abyssinian_0.jpg")
    assert pets.classnames == ["abyssinian", "american_bulldog"]  # underscores kept, as in CoOp
    make_split_dataset(tmp_path, "stanford_cars", ["cars_train"], per_class=(2, 1, 1))
    cars = load_dataset("stanford_cars", tmp_path)
    assert cars.test[0].impath == str(tmp_path / "stanford_cars/cars_train/cars_train_3.jpg")


def test_imagenet_folder_layout(tmp_path):
    make_imagenet(tmp_path)
    s = load_dataset("imagenet", tmp_path)
    assert s.classnames == NAMES
    assert [d.label for d in s.train] == [0] * 5 + [1] * 3 + [2] * 6 + [3] * 2 + [4] * 4
    assert s.train[0].impath == str(tmp_path / "imagenet/images/train/n01440764/n01440764_0.JPEG")
    assert s.val is s.test and [d.label for d in s.test] == [0, 1, 2, 3, 4]
    assert s.test[2].classname == "great white shark"


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_imagenet_a_r_relabel_to_their_subset(tmp_path, name):
    spec = DATASETS[name]
    folder = tmp_path / spec.folder
    write_classnames(folder)
    for w in (WNIDS[4], WNIDS[1]):
        for i in range(2):
            write_image(folder / spec.image_dir / w / f"{i}.jpg")
    (folder / spec.image_dir / "README.txt").write_text("not a class")
    s = load_dataset(name, tmp_path)
    assert s.classnames == ["goldfish", "hammerhead shark"]  # a 2-way classifier, like CoOp
    assert rows(s.test) == [(str(folder / spec.image_dir / WNIDS[1] / f"{i}.jpg"), 0, "goldfish") for i in range(2)] \
        + [(str(folder / spec.image_dir / WNIDS[4] / f"{i}.jpg"), 1, "hammerhead shark") for i in range(2)]
    assert s.train == [] and s.val == []


def test_imagenet_variants_fall_back_to_imagenet_classnames(tmp_path):
    write_classnames(tmp_path / "imagenet")
    for w in WNIDS:
        write_image(tmp_path / "imagenet-sketch/images" / w / "sketch_0.JPEG")
    s = load_dataset("imagenet_sketch", tmp_path)
    assert s.classnames == NAMES and [d.label for d in s.test] == [0, 1, 2, 3, 4]


def test_imagenetv2_numbered_folders(tmp_path):
    folder = tmp_path / "imagenetv2"
    write_classnames(folder)
    for y in range(5):
        write_image(folder / "imagenetv2-matched-frequency-format-val" / str(y) / "a.jpeg")
    s = load_dataset("imagenetv2", tmp_path)
    assert [(d.label, d.classname) for d in s.test] == list(enumerate(NAMES))
    (folder / "imagenetv2-matched-frequency-format-val/3/a.jpeg").unlink()
    (folder / "imagenetv2-matched-frequency-format-val/3").rmdir()
    with pytest.raises(DatasetError, match="1 class folders missing"):
        load_dataset("imagenetv2", tmp_path)


def make_aircraft(root: Path) -> Path:
    folder = root / "fgvc_aircraft"
    folder.mkdir(parents=True)
    (folder / "variants.txt").write_text("707-320\n727-200\nA300B4\n")
    entries = {"train": ["0034309 707-320", "0034958 727-200", "0037511 A300B4", "0037512 A300B4"],
               "val": ["1025794 707-320", "1340192 A300B4"], "test": ["1514522 727-200"]}
    for part, lines in entries.items():
        (folder / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
        for line in lines:
            write_image(folder / "images" / f"{line.split()[0]}.jpg")
    return folder


def test_fgvc_aircraft_reader(tmp_path):
    folder = make_aircraft(tmp_path)
    s = load_dataset("fgvc_aircraft", tmp_path)
    assert s.classnames == ["707-320", "727-200", "A300B4"]
    assert rows(s.val) == [(str(folder / "images/1025794.jpg"), 0, "707-320"),
                           (str(folder / "images/1340192.jpg"), 2, "A300B4")]
    assert [d.label for d in s.train] == [0, 1, 2, 2] and len(s.test) == 1
    (folder / "images_variant_test.txt").write_text("1514522 Boeing 999\n")
    with pytest.raises(DatasetError, match="'Boeing 999' is not in"):
        load_dataset("fgvc_aircraft", tmp_path)


def test_real_eurosat():
    shared = shared_dir()
    if shared is None or not (shared / "datasets/eurosat").is_dir():
        pytest.skip("shared EuroSAT data not present")
    s = load_dataset("eurosat", shared / "datasets")
    assert (len(s.train), len(s.val), len(s.test)) == (13500, 5400, 8100)
    assert s.classnames == ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road",
                            "Industrial Buildings", "Pasture Land", "Permanent Crop Land",
                            "Residential Buildings", "River", "Sea or Lake"]
    paths = {d.impath for d in s.train + s.val + s.test}
    assert len(paths) == 27000 and all(os.path.isfile(p) for p in paths)
    assert s.train[0].impath.endswith(os.path.join("eurosat", "2750", "AnnualCrop", "AnnualCrop_1381.jpg"))
    assert open_rgb(s.test[-1].impath).size == (64, 64)
    assert s.templates == ["a centered satellite photo of {}."]


# ---------------------------------------------------------------------------- user datasets


def make_folder_tree(root: Path, sizes: dict[str, int]) -> None:
    for cname, n in sizes.items():
        for i in range(n):
            write_image(root / cname / f"img_{i:02d}.jpg")
    (root / "notes.txt").write_text("ignored: not a class folder")


def test_folder_dataset_is_deterministic_and_writes_a_coop_split(tmp_path):
    root = tmp_path / "mydata"
    make_folder_tree(root, {"cat": 10, "dog": 7, "red_fox": 3})
    (root / "cat" / "readme.txt").write_text("not an image")
    a = load_folder_dataset(root, template="a photo of my {}.", seed=3)
    b = load_folder_dataset(root, template="a photo of my {}.", seed=3)
    c = load_folder_dataset(root, template="a photo of my {}.", seed=4)
    assert a == b and rows(a.train) != rows(c.train)
    assert a.name == "mydata" and a.classnames == ["cat", "dog", "red_fox"] and a.templates == ["a photo of my {}."]
    counts = {(part, y): sum(d.label == y for d in getattr(a, part))
              for part in ("train", "val", "test") for y in range(3)}
    assert [counts["val", y] for y in range(3)] == [2, 1, 1]  # round(0.2 n)
    assert [counts["test", y] for y in range(3)] == [3, 2, 1]  # round(0.3 n)
    assert [counts["train", y] for y in range(3)] == [5, 4, 1]  # the rest
    assert {d.impath for d in a.train + a.val + a.test} == {str(p) for p in root.glob("*/*.jpg")}
    split_file = tmp_path / "split_mydata.json"
    written = load_folder_dataset(root, seed=3, split_file=split_file)
    assert json.loads(split_file.read_text())["val"][0][0].count("/") == 1  # relative to root
    assert load_split_file(split_file, root, "mydata", ["a photo of a {}."]) == written
    assert load_folder_dataset(root, seed=99, split_file=split_file) == written  # existing file is reused


def test_csv_dataset(tmp_path):
    make_folder_tree(tmp_path / "imgs", {"b_class": 4, "a_class": 4})
    part = ["train", "train", "val", "test"]
    lines = ["path,label,split"] + [f"imgs/{c}/img_{i:02d}.jpg,{c},{part[i]}"
                                    for c in ("b_class", "a_class") for i in range(4)]
    (tmp_path / "with_split.csv").write_text("\n".join(lines) + "\n\n")
    s = load_csv_dataset(tmp_path / "with_split.csv")
    assert s.name == "with_split" and s.classnames == ["a_class", "b_class"]
    assert rows(s.val) == [(str(tmp_path / "imgs/b_class/img_02.jpg"), 1, "b_class"),
                           (str(tmp_path / "imgs/a_class/img_02.jpg"), 0, "a_class")]
    assert (len(s.train), len(s.test)) == (4, 2)
    (tmp_path / "no_split.csv").write_text("\n".join(",".join(line.split(",")[:2]) for line in lines[1:]))
    t = load_csv_dataset(tmp_path / "no_split.csv", name="mine", val_frac=0.25, test_frac=0.25, seed=2)
    assert t.name == "mine" and (len(t.train), len(t.val), len(t.test)) == (4, 2, 2)
    assert t == load_csv_dataset(tmp_path / "no_split.csv", name="mine", val_frac=0.25, test_frac=0.25, seed=2)
    (tmp_path / "abs.csv").write_text(f"{tmp_path / 'imgs/a_class/img_00.jpg'},a_class,test\n")
    assert load_csv_dataset(tmp_path / "abs.csv", image_root="/elsewhere").test[0].impath == \
        str(tmp_path / "imgs/a_class/img_00.jpg")


# ---------------------------------------------------------------------------- Dassl equivalence


def real_split_files() -> list[Path]:
    """CoOp's published split files in the shared folder (EuroSAT's with its images)."""
    shared = shared_dir()
    if shared is None:
        return []
    files = [shared / "datasets/eurosat/split_zhou_EuroSAT.json"]
    files += sorted((shared / "datasets/coop_splits").glob("split_zhou_*.json"))
    return [p for p in files if p.is_file()]


@pytest.mark.parametrize("split_path", real_split_files() or [pytest.param(None, marks=pytest.mark.skip(
    reason="shared CoOp split files not present"))], ids=lambda p: getattr(p, "stem", None))
def test_fewshot_matches_dassl_on_real_split_files(split_path):
    spec = next(s for s in DATASETS.values() if s.split_file == split_path.name)
    image_dir = str(split_path.parent / spec.image_dir)
    full = load_split_file(split_path, image_dir, spec.name, spec.templates, check_images=False)
    ref_split = ref_read_split(split_path, image_dir)
    for seed in (1, 2, 3):
        for shots in (1, 2, 4, 8, 16):
            ours = fewshot(full, shots, seed, cache=None)
            ref_set_random_seed(seed)
            ref_train = ref_generate_fewshot_dataset(ref_split[0], num_shots=shots)
            ref_val = ref_generate_fewshot_dataset(ref_split[1], num_shots=min(shots, 4))
            assert rows(ours.train) == rows(ref_train) and rows(ours.val) == rows(ref_val)
            assert rows(ours.test) == rows(ref_split[2]) and len(ours.train) == shots * full.num_classes
    for seed, sub in ((1, "base"), (2, "new")):
        ours = subsample_classes(fewshot(full, 16, seed, cache=None), sub)
        ref = ref_coop_dataset(split_path, image_dir, 16, seed, subsample=sub)
        assert [rows(x) for x in (ours.train, ours.val, ours.test)] == [rows(x) for x in ref]
        assert ours.classnames == [c for _, c in sorted({(d.label, d.classname) for d in ref[2]})]


def test_fewshot_matches_dassl_with_small_classes_and_interleaved_labels(tmp_path):
    """Classes smaller than K (random.choices) and labels first seen out of order."""
    split = {"train": [], "val": [], "test": []}
    order = [2, 0, 2, 1, 0, 2, 3, 1, 2, 0, 3, 2, 2, 0, 1, 2]
    for part in split:
        split[part] = [[f"c{y}/{part}_{i}.jpg", y, f"class {y}"] for i, y in enumerate(order)]
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split))
    full = load_split_file(path, "/data", "toy", ["{}"], check_images=False)
    for seed in (1, 7):
        for shots in (1, 3, 5, 8):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ours = fewshot(full, shots, seed, cache=None)
            assert bool(caught) == (shots > 2)  # the smallest class holds 2 items
            ref_train, ref_val, _ = ref_coop_dataset(path, "/data", shots, seed)
            assert rows(ours.train) == rows(ref_train) and rows(ours.val) == rows(ref_val)


def test_fewshot_imagenet_samples_train_only(tmp_path):
    make_imagenet(tmp_path)
    s = load_dataset("imagenet", tmp_path)
    ours = fewshot(s, 2, 1, cache=None)
    ref_set_random_seed(1)
    ref = ref_generate_fewshot_dataset([RefDatum(d.impath, d.label, classname=d.classname) for d in s.train],
                                       num_shots=2)
    assert rows(ours.train) == rows(ref) and ours.val is s.test and ours.test is s.test


def test_fewshot_leaves_global_random_alone_and_all_shots(tmp_path):
    make_split_dataset(tmp_path, "dtd", ["banded", "blotchy"])
    s = load_dataset("dtd", tmp_path)
    random.seed(123)
    expected = random.random()
    random.seed(123)
    fewshot(s, 2, 1, cache=None)
    assert random.random() == expected
    assert fewshot(s, 0, 1) is s and fewshot(s, -1, 1) is s


# ---------------------------------------------------------------------------- few-shot cache


def test_fewshot_cache_in_dataset_folder_is_reused(tmp_path, monkeypatch):
    make_split_dataset(tmp_path, "eurosat", ["Forest", "River"])
    s = load_dataset("eurosat", tmp_path)
    first = fewshot(s, 2, 5)
    cache = tmp_path / "eurosat/split_fewshot/shot_2-seed_5.json"
    data = json.loads(cache.read_text())
    assert (data["shots"], data["seed"], len(data["train"]), len(data["val"])) == (2, 5, 4, 4)
    monkeypatch.setattr(ds, "_sample_per_class", lambda *a: pytest.fail("cache not reused"))
    assert fewshot(load_dataset("eurosat", tmp_path), 2, 5) == first


def test_fewshot_stale_cache_is_resampled(tmp_path):
    make_split_dataset(tmp_path, "eurosat", ["Forest", "River"])
    s = load_dataset("eurosat", tmp_path)
    cache = tmp_path / "eurosat/split_fewshot/shot_2-seed_1.json"
    cache.parent.mkdir()
    cache.write_text(json.dumps({"fingerprint": "old", "train": [0, 0, 0, 0], "val": [0, 0, 0, 0]}))
    with pytest.warns(UserWarning, match="does not match"):
        got = fewshot(s, 2, 1)
    assert got == fewshot(s, 2, 1, cache=None) and json.loads(cache.read_text())["fingerprint"] != "old"


def test_fewshot_cache_falls_back_to_glad_cache(tmp_path, monkeypatch):
    make_split_dataset(tmp_path, "eurosat", ["Forest", "River"])
    s = load_dataset("eurosat", tmp_path)
    real_write = ds.write_json

    def refuse_dataset_folder(path, obj):
        if (tmp_path / "eurosat") in Path(path).parents:
            raise PermissionError(f"read-only: {path}")
        return real_write(path, obj)

    monkeypatch.setattr(ds, "write_json", refuse_dataset_folder)
    fewshot(s, 1, 2)
    assert not (tmp_path / "eurosat/split_fewshot").exists()
    assert (tmp_path / "glad-cache/split_fewshot/eurosat/shot_1-seed_2.json").is_file()
    own = tmp_path / "own-cache"
    fewshot(s, 1, 3, cache=own)
    assert (own / "shot_1-seed_3.json").is_file()


# ---------------------------------------------------------------------------- base / novel


def test_subsample_classes_relabels_each_half():
    items = [Datum(f"/x/{y}_{i}.jpg", y, f"c{y}") for y in (4, 0, 3, 1, 2) for i in range(2)]
    s = Splits("toy", [f"c{y}" for y in range(5)], ["{}"], train=items, val=items[:4], test=items)
    base, novel = subsample_classes(s, "base"), subsample_classes(s, "novel")
    assert base.classnames == ["c0", "c1", "c2"] and novel.classnames == ["c3", "c4"]
    assert [(d.label, d.classname) for d in novel.train] == [(1, "c4")] * 2 + [(0, "c3")] * 2
    assert [d.label for d in base.test] == [0, 0, 1, 1, 2, 2] and [d.label for d in base.val] == [0, 0]
    assert subsample_classes(s, "new") == novel and subsample_classes(s, "all") is s
    assert base.num_classes + novel.num_classes == 5


# ---------------------------------------------------------------------------- errors


def test_error_unknown_name():
    with pytest.raises(DatasetError, match="unknown dataset 'eurosta'. Did you mean 'eurosat'.*imagenet_r"):
        load_dataset("eurosta", "/data")
    assert issubclass(DatasetError, ValueError)


def test_error_no_data_root():
    with pytest.raises(DatasetError, match="--data-root.*contains eurosat/.*DATASETS.md"):
        load_dataset("eurosat")


def test_error_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path / 'caltech-101'} does not exist.*DATASETS.md.*"
                                           "101_ObjectCategories/ and split_zhou_Caltech101.json"):
        load_dataset("caltech101", tmp_path)
    with pytest.raises(DatasetError, match="data root .*nowhere itself does not exist"):
        load_dataset("caltech101", tmp_path / "nowhere")
    make_split_dataset(tmp_path, "eurosat", ["Forest"])
    with pytest.raises(DatasetError, match=f"looks like the dataset folder itself: pass its parent {tmp_path}"):
        load_dataset("eurosat", tmp_path / "eurosat")


def test_error_missing_split_file(tmp_path):
    (tmp_path / "eurosat/2750").mkdir(parents=True)
    with pytest.raises(DatasetError, match="split_zhou_EuroSAT.json.*drive.google.com/file/d/1Ip7yaCWFi0eaOF"):
        load_dataset("eurosat", tmp_path)


def test_error_split_names_missing_images(tmp_path):
    make_split_dataset(tmp_path, "dtd", ["banded", "blotchy"])
    gone = sorted((tmp_path / "dtd/images/blotchy").iterdir())[:3]
    for p in gone:
        p.unlink()
    with pytest.raises(DatasetError, match=r"3 of 18 images named in split file .* missing, e\.g\. .*blotchy_0\.jpg"):
        load_dataset("dtd", tmp_path)


def test_error_malformed_split_files(tmp_path):
    bad = tmp_path / "split.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read split file"):
        load_split_file(bad, tmp_path, "x", ["{}"])
    bad.write_text(json.dumps({"train": [], "val": []}))
    with pytest.raises(DatasetError, match="no 'test' list"):
        load_split_file(bad, tmp_path, "x", ["{}"])
    bad.write_text(json.dumps({"train": [["a.jpg", 0]], "val": [], "test": []}))
    with pytest.raises(DatasetError, match="malformed 'train' entry"):
        load_split_file(bad, tmp_path, "x", ["{}"])
    bad.write_text(json.dumps({"train": [["a.jpg", 0, "cat"], ["b.jpg", 0, "dog"]], "val": [], "test": []}))
    with pytest.raises(DatasetError, match="label 0 is named both 'cat' and 'dog'"):
        load_split_file(bad, tmp_path, "x", ["{}"], check_images=False)
    bad.write_text(json.dumps({"train": [["a.jpg", 0, "cat"], ["b.jpg", 2, "dog"]], "val": [], "test": []}))
    with pytest.raises(DatasetError, match=r"without gaps; missing \[1\]"):
        load_split_file(bad, tmp_path, "x", ["{}"], check_images=False)


def test_error_imagenet_layout(tmp_path):
    (tmp_path / "imagenet/images/train/n01440764").mkdir(parents=True)
    with pytest.raises(DatasetError, match="classnames.txt not found"):
        load_dataset("imagenet", tmp_path)
    write_classnames(tmp_path / "imagenet")
    with pytest.raises(DatasetError, match="validation images not found.*images/val"):
        load_dataset("imagenet", tmp_path)
    (tmp_path / "imagenet/images/val/n99999999").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"\['n99999999'\] have no counterpart"):
        load_dataset("imagenet", tmp_path)
    write_image(tmp_path / "imagenet-adversarial/imagenet-a/n99999999/0.jpg")
    with pytest.raises(DatasetError, match=r"\['n99999999'\] are not listed in classnames.txt"):
        load_dataset("imagenet_a", tmp_path)


def test_error_more_shots_than_a_class_holds(tmp_path):
    make_split_dataset(tmp_path, "eurosat", ["Forest", "River"], per_class=(3, 2, 1))
    s = load_dataset("eurosat", tmp_path)
    with pytest.raises(DatasetError, match=r"2 train classes hold fewer than 4 images: Forest \(3\), River \(3\).*"
                                           "strict=False"):
        fewshot(s, 4, 1, strict=True, cache=None)
    with pytest.warns(UserWarning, match=r"2 val classes hold fewer than 4 images.*keeping all their images"):
        got = fewshot(s, 4, 1, cache=None)
    assert len(got.train) == 6 and len({d.impath for d in got.train}) == 6  # all 3 of each class, as Dassl
    with pytest.warns(UserWarning, match=r"with replacement"):
        got = fewshot(s, 4, 1, cache=None, repeat=True)
    assert len(got.train) == 8 and len({d.impath for d in got.train}) < 8  # Dassl's repeat=True


@pytest.mark.parametrize("repeat", [False, True])
def test_fewshot_picks_equal_dassls_generate_fewshot_dataset(original, repeat):
    """The indices Dassl's own sampler picked after random.seed(S), train then val (tests/data/originals): the
    same, draw for draw (Python's random is the same generator), for classes smaller and larger than K."""
    ref = original("dassl")["sampler"]
    assert original("dassl")["generate_fewshot_dataset_default_repeat"] is False
    train = [Datum(f"/d/train/{i}.jpg", y, f"c{y}") for i, y in enumerate(ref["labels"])]
    val = [Datum(f"/d/val/{i}.jpg", y, f"c{y}") for i, y in enumerate(ref["val_labels"])]
    s = Splits("toy", [f"c{y}" for y in range(5)], ["{}"], train=train, val=val)
    cases = [c for c in ref["cases"] if c["repeat"] is repeat]
    for c in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = fewshot(s, c["shots"], c["seed"], cache=None, repeat=repeat)
        assert [train.index(d) for d in got.train] == c["train"], c
        assert [val.index(d) for d in got.val] == c["val"], c
    if not repeat:  # a class smaller than K keeps all its items once: sizes 1, 2, 4, 5, 20 at K = 16
        c = next(c for c in cases if c["shots"] == 16)
        counts = {y: [ref["labels"][i] for i in c["train"]].count(y) for y in range(5)}
        assert counts == {3: 1, 0: 2, 1: 5, 4: 4, 2: 16} and len(set(c["train"])) == len(c["train"])


def test_error_fewshot_and_subsample_arguments(tmp_path):
    s = Splits("imagenet_a", ["a"], ["{}"], test=[Datum("/x/a.jpg", 0, "a")])
    with pytest.raises(DatasetError, match="no training images.*test-only"):
        fewshot(s, 1, 1)
    s = Splits("toy", ["a"], ["{}"], train=[Datum("/x/a.jpg", 0, "a")])
    with pytest.raises(DatasetError, match="seed must be >= 0"):
        fewshot(s, 1, -1)
    with pytest.raises(DatasetError, match="subsample must be 'all', 'base' or 'novel'"):
        subsample_classes(s, "half")


def test_error_user_datasets(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_folder_dataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        load_folder_dataset(tmp_path / "empty")
    make_folder_tree(tmp_path / "d", {"cat": 3, "dog": 1})
    (tmp_path / "d/bird").mkdir()
    with pytest.raises(DatasetError, match=r"class folders without images .*\['bird'\]"):
        load_folder_dataset(tmp_path / "d")
    (tmp_path / "d/bird").rmdir()
    with pytest.raises(DatasetError, match=r"too small to keep a training image .*: cat \(3\)\."):
        load_folder_dataset(tmp_path / "d", val_frac=0.5, test_frac=0.49)  # 3 images: 2 val, 1 test
    with pytest.raises(DatasetError, match="sum below 1"):
        load_folder_dataset(tmp_path / "d", val_frac=0.6, test_frac=0.4)
    with pytest.raises(DatasetError, match="must contain '{}'"):
        load_folder_dataset(tmp_path / "d", template="a photo")
    csv_file = tmp_path / "x.csv"
    csv_file.write_text("d/cat/img_00.jpg,cat,training\n")
    with pytest.raises(DatasetError, match=r"unknown split values \['training'\]"):
        load_csv_dataset(csv_file)
    csv_file.write_text("d/cat/img_00.jpg,cat,train\nd/cat/img_01.jpg,cat\n")
    with pytest.raises(DatasetError, match="every row or no row"):
        load_csv_dataset(csv_file)
    csv_file.write_text("path,label\nd/cat/img_00.jpg\n")
    with pytest.raises(DatasetError, match=r"malformed data rows \[1\]"):
        load_csv_dataset(csv_file)
    csv_file.write_text("d/cat/img_00.jpg,cat\nd/cat/missing.jpg,cat\n")
    with pytest.raises(DatasetError, match="1 of 2 images named in CSV .*missing.jpg"):
        load_csv_dataset(csv_file)
