"""Embedded demo datasets: built from Debian packages (the first run downloads about 320 MB)."""
from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glad_core import debian, demo_data, prepare
from glad_core.datasets import DEMO_DATASETS, load_dataset
from glad_core.data import Splits, open_rgb

NUM_CLASSES = {"fashion_mnist": 10, "clipart": 16, "tuxpaint": 10, "clipart10": 10}


@pytest.fixture(scope="module")
def data_root() -> Path:
    try:
        return prepare.prepare_demo_data()
    except debian.DemoDataUnavailable as e:
        pytest.skip(f"demo data cannot be fetched on this system: {e}")


@pytest.fixture(scope="module")
def demos(data_root: Path) -> dict[str, Splits]:
    return {name: load_dataset(name) for name in DEMO_DATASETS}


def test_specs() -> None:
    assert set(DEMO_DATASETS) == set(NUM_CLASSES)
    for name, spec in DEMO_DATASETS.items():
        assert spec.name == name and spec.demo
        assert spec.split_file.startswith("split_glad_") and spec.split_file.endswith(".json")
        assert spec.templates and all("{}" in t for t in spec.templates)


@pytest.mark.parametrize("name", NUM_CLASSES)
def test_classes_and_splits(demos: dict[str, Splits], name: str) -> None:
    s = demos[name]
    assert s.num_classes == NUM_CLASSES[name] == len(set(s.classnames))
    for split in demo_data.SPLITS:
        items = getattr(s, split)
        assert {d.label for d in items} == set(range(s.num_classes)), f"{name}/{split} lacks a class"
        assert all(s.classnames[d.label] == d.classname for d in items)
        assert all(Path(d.impath).is_absolute() for d in items)
    paths = [d.impath for split in demo_data.SPLITS for d in getattr(s, split)]
    assert len(paths) == len(set(paths)), f"{name}: an image is listed twice (splits must be disjoint)"


def test_fashion_mnist_subset(demos: dict[str, Splits]) -> None:
    s = demos["fashion_mnist"]
    assert s.classnames == list(demo_data.FASHION_CLASSES)
    for split, n in demo_data.FASHION_PER_CLASS.items():
        assert Counter(d.label for d in getattr(s, split)) == {label: n for label in range(10)}
    assert all("/train_" in d.impath for d in s.train + s.val)
    assert all("/t10k_" in d.impath for d in s.test)


def test_images_open_and_are_small(demos: dict[str, Splits], data_root: Path) -> None:
    for name, s in demos.items():
        items = s.train + s.val + s.test
        for d in items:
            img = open_rgb(d.impath)
            if name == "fashion_mnist":
                assert img.size == (28, 28)
            else:
                assert img.width == img.height <= demo_data.MAX_SIDE
        spec = DEMO_DATASETS[name]
        on_disk = list((data_root / spec.folder / spec.image_dir).rglob("*.png"))
        assert len(on_disk) == len(items), f"{name}: stray or missing image files"


def test_fashion_mnist_is_dark_on_light(demos: dict[str, Splits]) -> None:
    corners = [np.asarray(Image.open(d.impath))[[0, 0, -1, -1], [0, -1, 0, -1]] for d in demos["fashion_mnist"].test]
    assert np.mean(corners) > 250


def test_cutouts_on_white(demos: dict[str, Splits]) -> None:
    for name in ("tuxpaint", "clipart10"):
        img = np.asarray(open_rgb(demos[name].test[0].impath))
        assert (img[0] == 255).all() and (img[-1] == 255).all()  # padded border


def test_domain_pair_and_cross_dataset_target(demos: dict[str, Splits]) -> None:
    assert demos["tuxpaint"].classnames == demos["clipart10"].classnames
    tux = {c.lower() for c in demos["tuxpaint"].classnames}
    assert not tux & {c.lower() for c in demos["fashion_mnist"].classnames}


@pytest.mark.parametrize("name", NUM_CLASSES)
def test_split_file_is_deterministic(data_root: Path, name: str) -> None:
    spec = DEMO_DATASETS[name]
    written = json.loads((data_root / spec.folder / spec.split_file).read_text())
    assert written == demo_data.plan_splits(name)


def test_interrupted_build_is_redone(data_root: Path) -> None:
    spec = DEMO_DATASETS["tuxpaint"]
    split_file = data_root / spec.folder / spec.split_file
    before = split_file.read_bytes()
    mtime = split_file.stat().st_mtime_ns
    assert prepare.prepare_demo_data(names=["tuxpaint"]) == data_root
    assert split_file.stat().st_mtime_ns == mtime  # built sets are skipped
    split_file.unlink()  # as if the build had stopped before its last step
    stray = data_root / spec.folder / spec.image_dir / "stray.png"
    stray.write_bytes(b"partial")
    prepare.prepare_demo_data(names=["tuxpaint"])
    assert split_file.read_bytes() == before
    assert not stray.exists()


def test_read_idx_gzipped_and_raw(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    idx = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in images.shape) + images.tobytes()
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(idx))
    (tmp_path / "b-idx3-ubyte").write_bytes(idx)
    assert np.array_equal(demo_data._read_idx(tmp_path, "a-idx3-ubyte"), images)
    assert np.array_equal(demo_data._read_idx(tmp_path, "b-idx3-ubyte"), images)


def test_without_apt_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debian.shutil, "which", lambda tool: None)
    with pytest.raises(debian.DemoDataUnavailable, match="GLAD_DEBIAN_ROOT"):
        debian.fetch_packages(tmp_path, [demo_data.OPENCLIPART])


def test_cli_rejects_unknown_names() -> None:
    with pytest.raises(SystemExit):
        prepare.main(["no_such_set"])
