"""Multi-domain data: Datum.domain, DomainBed-layout loaders, ImageNet-DG, sub-domains, mini-PACS."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

from glad_core import datasets as ds
from glad_core import debian, demo_data, prepare
from glad_core import domains as dm
from glad_core.data import Datum, Splits, open_rgb
from glad_core.datasets import DatasetError, split_per_class, subsample_classes
from test_datasets import RefDatum, ref_generate_fewshot_dataset, ref_set_random_seed

PACS = ("art_painting", "cartoon", "photo", "sketch")
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Split files that fall back to the cache land in this test's own folder."""
    monkeypatch.setattr(dm, "cache_dir", lambda: tmp_path / "cache")


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def make_domainbed(root: Path, folder: str = "PACS", domains=PACS, classes=PACS_CLASSES, n: int = 10,
                   sizes: dict[str, int] | None = None) -> Path:
    """<root>/<folder>/<domain>/<class>/<images> with `n` (or sizes[class]) empty image files each."""
    for d in domains:
        for c in classes:
            for i in range((sizes or {}).get(c, n)):
                touch(root / folder / d / c / f"{d}_{c}_{i:03d}.jpg")
            touch(root / folder / d / c / "notes.txt")  # not an image
    return root


# ----------------------------------------------------------------------------- Datum, splitting


def test_datum_domain_defaults_to_empty_and_survives_relabelling() -> None:
    assert Datum("/x/a.jpg", 0, "a") == Datum("/x/a.jpg", 0, "a", "")
    s = Splits("t", ["a", "b"], ["{}"], train=[Datum("/x/a.jpg", 0, "a", "photo"), Datum("/x/b.jpg", 1, "b", "sketch")])
    novel = subsample_classes(s, "novel")
    assert [(d.label, d.domain) for d in novel.train] == [(0, "sketch")]


def test_split_per_class_sizes_disjoint_and_seeded() -> None:
    groups = [[Datum(f"/x/{y}/{i}.jpg", y, f"c{y}") for i in range(n)] for y, n in enumerate([0, 1, 2, 3, 4, 5, 10, 13])]
    train, val, test = split_per_class(groups, 0.4, 0.2, seed=3, source="toy", min_train=0)
    for y, g in enumerate(groups):
        n = len(g)
        counts = [sum(d.label == y for d in lst) for lst in (train, val, test)]
        assert counts == [n - round(0.4 * n) - round(0.2 * n), round(0.4 * n), round(0.2 * n)]
    assert sorted(d.impath for d in train + val + test) == sorted(d.impath for g in groups for d in g)
    assert split_per_class(groups, 0.4, 0.2, 3, "toy", min_train=0) == (train, val, test)
    assert split_per_class(groups, 0.4, 0.2, 4, "toy", min_train=0) != (train, val, test)
    with pytest.raises(DatasetError, match="too small"):
        split_per_class(groups, 0.4, 0.2, 3, "toy")  # the empty class keeps no training image


# ----------------------------------------------------------------------------- DomainBed layout


def test_domainbed_split_40_40_20_written_once(tmp_path: Path) -> None:
    make_domainbed(tmp_path)
    md = dm.load_domains("pacs", tmp_path)
    assert md.domain_names == list(PACS) and md.held_out_choices == list(PACS) and md.target is None
    assert md.classnames == list(PACS_CLASSES) and md.templates == ["a photo of a {}."]
    for d, s in md.domains.items():
        items = s.train + s.val + s.test
        assert {x.domain for x in items} == {d}
        assert all(Path(x.impath).parent.parent == tmp_path / "PACS" / d for x in items)
        assert all(Path(x.impath).parent.name == md.classnames[x.label] == x.classname for x in items)
        for lst, k in ((s.train, 4), (s.val, 4), (s.test, 2)):
            assert Counter(x.label for x in lst) == {y: k for y in range(7)}
        assert len({x.impath for x in items}) == 70
        assert (tmp_path / "PACS" / f"split_glad_{d}_seed1.json").is_file()
    assert md.domains["photo"].name == "pacs/photo"
    touch(tmp_path / "PACS" / "photo" / "dog" / "added_later.jpg")  # the split file wins, as in CoOp
    again = dm.load_domains("pacs", tmp_path)
    assert again.domains == md.domains
    other = dm.load_domains("pacs", tmp_path, split_seed=2)
    assert other.domains["photo"].test != md.domains["photo"].test
    assert not list((tmp_path / "PACS").glob(".*.tmp"))


def test_domainbed_split_goes_to_cache_when_data_is_read_only(tmp_path: Path, monkeypatch) -> None:
    make_domainbed(tmp_path, n=5)
    real_save = dm.save_split_file

    def save(splits, path, image_dir):
        if Path(path).parent == tmp_path / "PACS":
            raise PermissionError(13, "Permission denied", str(path))
        return real_save(splits, path, image_dir)

    monkeypatch.setattr(dm, "save_split_file", save)
    md = dm.load_domains("pacs", tmp_path)
    cached = tmp_path / "cache" / "splits" / "pacs"
    assert sorted(p.name for p in cached.glob("*.json")) == sorted(f"split_glad_{d}_seed1.json" for d in PACS)
    assert md.fewshot_dir == cached / "split_fewshot"
    assert dm.load_domains("pacs", tmp_path).domains == md.domains


def test_domainbed_errors_name_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="needs a data root"):
        dm.load_domains("pacs")
    with pytest.raises(DatasetError, match=r"PACS.*DomainBed's layout"):
        dm.load_domains("pacs", tmp_path)
    with pytest.raises(DatasetError, match="Did you mean 'pacs'"):
        dm.load_domains("pacss", tmp_path)
    make_domainbed(tmp_path, domains=("art_painting", "cartoon", "photo"))
    with pytest.raises(DatasetError, match=rf"domain 'sketch'.*{tmp_path / 'PACS' / 'sketch'}.*art_painting, cartoon"):
        dm.load_domains("pacs", tmp_path)
    make_domainbed(tmp_path, domains=("sketch",), classes=PACS_CLASSES[:-1])
    with pytest.raises(DatasetError, match=r"sketch holds 6 class folders.*missing here: \['person'\]"):
        dm.load_domains("pacs", tmp_path)
    make_domainbed(tmp_path, classes=("zebra",))
    with pytest.raises(DatasetError, match="pacs has 7.*together hold 8"):
        dm.load_domains("pacs", tmp_path)


def test_office_home_real_world_with_space_and_small_classes(tmp_path: Path) -> None:
    classes = tuple(f"Class_{i:02d}" for i in range(65))
    make_domainbed(tmp_path, "office_home", ("Art", "Clipart", "Product", "Real World"), classes, n=3,
                   sizes={"Class_00": 0, "Class_01": 1})
    md = dm.load_domains("office_home", tmp_path)
    assert md.domain_names == ["Art", "Clipart", "Product", "Real_World"]
    rw = md.domains["Real_World"]
    assert all("/Real World/" in d.impath and d.domain == "Real_World" for d in rw.train + rw.val + rw.test)
    assert 0 not in {d.label for d in rw.train + rw.val + rw.test}  # an empty class folder is allowed
    assert dm.load_domains("office_home", tmp_path).domains == md.domains  # read back with the gap


def test_fewshot_pools_draw_k_from_train_and_k_from_val_like_dassl(tmp_path: Path) -> None:
    make_domainbed(tmp_path, n=12)
    md = dm.load_domains("pacs", tmp_path)
    pools = dm.fewshot_pools(md, shots=3, seed=2)
    for d, s in pools.domains.items():
        full = md.domains[d]
        ref_set_random_seed(2)  # GuiDG's dataset classes: seed, then train and val on one stream
        ref_train = ref_generate_fewshot_dataset([RefDatum(x.impath, x.label) for x in full.train], num_shots=3)
        ref_val = ref_generate_fewshot_dataset([RefDatum(x.impath, x.label) for x in full.val], num_shots=3)
        assert [x.impath for x in s.train] == [r.impath for r in ref_train]
        assert [x.impath for x in s.val] == [r.impath for r in ref_val]
        assert s.test == full.test and {x.domain for x in s.train + s.val} == {d}
        assert (tmp_path / "PACS" / "split_fewshot" / d / "shot_3-seed_2-val_3.json").is_file()
    assert dm.fewshot_pools(md, shots=3, seed=2).domains == pools.domains  # read from the cache
    with pytest.raises(DatasetError, match="unknown domains"):
        dm.fewshot_pools(md, 3, 2, domains=["nope"])


def test_fewshot_val_shots_default_is_coop() -> None:
    items = [Datum(f"/x/{y}_{i}.jpg", y, f"c{y}") for y in range(2) for i in range(20)]
    s = Splits("toy", ["c0", "c1"], ["{}"], train=items, val=items)
    assert len(ds.fewshot(s, 8, 1, cache=None).val) == 2 * 4
    assert len(ds.fewshot(s, 8, 1, cache=None, val_shots=8).val) == 2 * 8
    with pytest.raises(DatasetError, match="val_shots"):
        ds.fewshot(s, 8, 1, cache=None, val_shots=0)


def test_leave_one_out_holds_the_domain_out(tmp_path: Path) -> None:
    make_domainbed(tmp_path, n=5)
    md = dm.load_domains("pacs", tmp_path)
    sources, target = md.leave_one_out("sketch")
    assert list(sources) == ["art_painting", "cartoon", "photo"]
    assert target.test == md.domains["sketch"].test
    assert all(d.domain != "sketch" for s in sources.values() for d in s.train + s.val + s.test)
    _, everything = md.leave_one_out("sketch", target_part="all")
    s = md.domains["sketch"]
    assert everything.test == s.train + s.val + s.test and not everything.train and not everything.val
    with pytest.raises(DatasetError, match="cannot hold out 'clipart'"):
        md.leave_one_out("clipart")
    leaky = dm.MultiDomain("leaky", md.classnames, md.templates,
                           {"a": md.domains["photo"], "b": md.domains["photo"]})
    with pytest.raises(DatasetError, match="also in the source domains"):
        leaky.leave_one_out("b")


# ----------------------------------------------------------------------------- single-source DG


def test_split_subdomains_partitions_each_class() -> None:
    items = [Datum(f"/x/{y}_{i}.jpg", y, f"c{y}") for y, n in enumerate([7, 4, 1]) for i in range(n)]
    held = [Datum(f"/v/{y}_{i}.jpg", y, f"c{y}") for y in range(3) for i in range(5)]
    src = Splits("src", ["c0", "c1", "c2"], ["{}"], train=items, val=held, test=held)
    md = dm.split_subdomains(src, 3, seed=5)
    assert md.domain_names == ["src_part1", "src_part2", "src_part3"] and md.name == "src_split3"
    subs = list(md.domains.values())
    assert sorted(d.impath for s in subs for d in s.train + s.val) == sorted(d.impath for d in items)
    assert all(not s.test for s in subs)  # the source's val / test lists stay out
    for y in range(3):
        sizes = [sum(d.label == y for d in s.train + s.val) for s in subs]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        for s, m in zip(subs, sizes):
            assert sum(d.label == y for d in s.val) == round(0.5 * m)  # 50 / 50 pools within a sub-domain
    for name, s in md.domains.items():
        assert {d.domain for d in s.train + s.val} == {name} and s.classnames == src.classnames
    assert dm.split_subdomains(src, 3, seed=5).domains == md.domains
    assert dm.split_subdomains(src, 3, seed=6).domains != md.domains
    with pytest.raises(DatasetError, match=">= 1"):
        dm.split_subdomains(src, 0)


# ----------------------------------------------------------------------------- ImageNet-DG

# classnames.txt deliberately not in wnid order, with repeated names (as CLIP's ImageNet names repeat)
WNIDS = {"n04008634": "missile", "n01440764": "tench", "n03773504": "missile", "n02012849": "crane",
         "n03126707": "crane", "n01443537": "goldfish", "n04355933": "sunglasses", "n04356056": "sunglasses"}
A_WNIDS = ("n04008634", "n03773504", "n01443537")
R_WNIDS = ("n02012849", "n03126707", "n04356056")


def make_imagenet(root: Path) -> Path:
    lines = "".join(f"{w} {n}\n" for w, n in WNIDS.items())
    (root / "imagenet").mkdir(parents=True)
    (root / "imagenet" / "classnames.txt").write_text(lines)
    for w in WNIDS:
        for i in range(6):
            touch(root / "imagenet/images/train" / w / f"train_{w}_{i}.JPEG")
        for i in range(2):
            touch(root / "imagenet/images/val" / w / f"val_{w}_{i}.JPEG")
        for i in range(4):
            touch(root / "imagenet-sketch/images" / w / f"sketch_{w}_{i}.JPEG")
    for y, w in enumerate(WNIDS):  # CoOp's ImageNetV2: folder y holds the class of line y
        for i in range(2):
            touch(root / "imagenetv2/imagenetv2-matched-frequency-format-val" / str(y) / f"v2_{w}_{i}.jpeg")
    for folder, sub, wnids in (("imagenet-adversarial", "imagenet-a", A_WNIDS),
                               ("imagenet-rendition", "imagenet-r", R_WNIDS)):
        for w in wnids:
            for i in range(3):
                touch(root / folder / sub / w / f"{sub}_{w}_{i}.jpg")
    return root


def wnid_of(d: Datum) -> str:
    return next(p for p in Path(d.impath).name.split("_") if p.startswith("n0"))


@pytest.mark.parametrize("task, target_wnids, target_domain, n_target",
                         [("imagenet_dg_a", A_WNIDS, "imagenet_a", 3), ("imagenet_dg_r", R_WNIDS, "imagenet_r", 3),
                          ("imagenet_dg_val", tuple(WNIDS), "imagenet_val", 2)])
def test_imagenet_dg_matches_by_wnid(tmp_path: Path, task, target_wnids, target_domain, n_target) -> None:
    make_imagenet(tmp_path)
    md = dm.load_domains(task, tmp_path)
    wnids = sorted(target_wnids)
    assert md.target == target_domain and md.held_out_choices == [target_domain]
    assert md.domain_names == ["imagenet", "imagenet_sketch", "imagenetv2", target_domain]
    assert md.classnames == [WNIDS[w] for w in wnids]  # relabelled by sorted wnid, repeated names kept
    per_source = {"imagenet": 6, "imagenet_sketch": 4, "imagenetv2": 2}
    for source, n in per_source.items():
        s = md.domains[source]
        assert not s.test
        for lst in (s.train, s.val):
            assert all(wnids[d.label] == wnid_of(d) and d.domain == source for d in lst)
            assert Counter(d.label for d in lst) == {y: n // 2 for y in range(len(wnids))}  # 50 / 50 per class
        assert {d.impath for d in s.train}.isdisjoint(d.impath for d in s.val)
        assert (tmp_path / "imagenet_dg" / f"split_glad_{source}_{task}_seed1.json").is_file()
    target = md.domains[target_domain]
    assert not target.train and not target.val and len(target.test) == n_target * len(wnids)
    assert all(wnids[d.label] == wnid_of(d) and d.domain == target_domain for d in target.test)
    assert dm.load_domains(task, tmp_path).domains == md.domains  # read back from the split files
    pools = dm.fewshot_pools(md, shots=1, seed=1)
    for source in per_source:
        assert len(pools.domains[source].train) == len(pools.domains[source].val) == len(wnids)
    assert pools.domains[target_domain] == target
    sources, held = md.leave_one_out(target_domain, target_part="all")
    assert set(sources) == set(per_source) and held.test == target.test


def test_imagenet_dg_v2_folder_is_line_of_classnames(tmp_path: Path) -> None:
    make_imagenet(tmp_path)
    md = dm.load_domains("imagenet_dg_val", tmp_path)
    v2 = md.domains["imagenetv2"]
    for d in v2.train + v2.val:  # folder y -> wnid at line y (not the y-th sorted wnid)
        assert list(WNIDS)[int(Path(d.impath).parent.name)] == wnid_of(d)
    with pytest.raises(DatasetError, match="unknown ImageNet-DG task"):
        dm.load_imagenet_dg("imagenet_dg_x", tmp_path)


# ----------------------------------------------------------------------------- mini-PACS (real glyphs)


@pytest.fixture(scope="module")
def mini_pacs() -> dm.MultiDomain:
    try:
        prepare.prepare_demo_data(names=["mini_pacs"])
    except debian.DemoDataUnavailable as e:
        pytest.skip(f"demo data cannot be fetched on this system: {e}")
    return dm.load_domains("mini_pacs")


def test_mini_pacs_domains_and_classes(mini_pacs: dm.MultiDomain) -> None:
    from glad_core import mini_pacs as mp

    tux, clip = ds.load_dataset("tuxpaint"), ds.load_dataset("clipart10")
    assert list(mp.GLYPHS) == tux.classnames == clip.classnames
    assert mini_pacs.domain_names == ["photo", "clip_art", "cartoon", "sketch"]
    assert mini_pacs.classnames == sorted(c.replace(" ", "_") for c in tux.classnames)
    sizes = {d: len(s.train + s.val + s.test) for d, s in mini_pacs.domains.items()}
    assert sizes == {"photo": len(tux.train + tux.val + tux.test), "clip_art": len(clip.train + clip.val + clip.test),
                     "cartoon": 179, "sketch": 127}
    for d, s in mini_pacs.domains.items():
        for lst in (s.train, s.val, s.test):
            assert {x.label for x in lst} == set(range(10)), f"{d} lacks a class in one of its splits"


def test_mini_pacs_split_files_are_the_seeded_split(mini_pacs: dm.MultiDomain) -> None:
    folder = ds.demo_root() / "mini_pacs"
    for d in mini_pacs.domain_names:
        groups = [[Datum(str(folder / d / c / f), y, c) for f in sorted(p.name for p in (folder / d / c).glob("*.png"))]
                  for y, c in enumerate(mini_pacs.classnames)]
        rng = random.Random(1)  # independent of split_per_class: shuffle, then val / test / train per class
        expect = {"train": [], "val": [], "test": []}
        for g in groups:
            rng.shuffle(g)
            n_val, n_test = round(0.4 * len(g)), round(0.2 * len(g))
            for part, lst in (("val", g[:n_val]), ("test", g[n_val:n_val + n_test]), ("train", g[n_val + n_test:])):
                expect[part] += [[str(Path(x.impath).relative_to(folder / d)), x.label, x.classname] for x in lst]
        assert json.loads((folder / f"split_glad_{d}_seed1.json").read_text()) == expect


def test_mini_pacs_glyph_images(mini_pacs: dm.MultiDomain) -> None:
    from glad_core import mini_pacs as mp

    def colourfulness(path: str) -> float:
        a = np.asarray(open_rgb(path), dtype=float)
        return float((a.max(-1) - a.min(-1)).mean())

    for domain in ("cartoon", "sketch"):
        s = mini_pacs.domains[domain]
        for x in s.train + s.val + s.test:
            img = open_rgb(x.impath)
            assert img.width == img.height <= demo_data.MAX_SIDE
            a = np.asarray(img)
            assert (a[0] == 255).all() and (a[-1] == 255).all()
        shades = [colourfulness(x.impath) for x in s.test]
        assert (np.median(shades) > 10) if domain == "cartoon" else (max(shades) < 1)
    f = mp.FONTS["sketch"]  # drawing is deterministic: a fresh drawing equals the stored image
    font = ImageFont.truetype(str(mp.font_path("sketch")), f.size, layout_engine=ImageFont.Layout.BASIC)
    stored = ds.demo_root() / "mini_pacs" / "sketch" / mp.glyph_file("tree", 0x1F332, "EVERGREEN TREE")
    assert np.array_equal(np.asarray(mp.render_glyph(font, 0x1F332, f.color)), np.asarray(Image.open(stored)))


def test_mini_pacs_build_is_reproducible_and_redone_when_interrupted(mini_pacs: dm.MultiDomain, tmp_path: Path) -> None:
    from glad_core.mini_pacs import build_mini_pacs

    shipped = ds.demo_root() / "mini_pacs"
    folder = build_mini_pacs(tmp_path)  # a second, independent build
    splits = sorted(p.name for p in shipped.glob("split_glad_*.json"))
    assert splits == sorted(p.name for p in folder.glob("split_glad_*.json")) and len(splits) == 4
    for name in splits:
        assert (folder / name).read_bytes() == (shipped / name).read_bytes()
    mtime = (folder / splits[0]).stat().st_mtime_ns
    assert build_mini_pacs(tmp_path) == folder and (folder / splits[0]).stat().st_mtime_ns == mtime  # skipped
    (folder / splits[0]).unlink()  # as if the build had stopped before its last step
    stray = folder / "sketch" / "tree" / "stray.png"
    stray.write_bytes(b"partial")
    build_mini_pacs(tmp_path)
    assert (folder / splits[0]).read_bytes() == (shipped / splits[0]).read_bytes() and not stray.exists()


def test_font_package_needs_its_file(tmp_path: Path, monkeypatch) -> None:
    font_dir = tmp_path / "deb" / demo_data.EMOJI_FONT.content
    font_dir.mkdir(parents=True)
    monkeypatch.setenv("GLAD_DEBIAN_ROOT", str(tmp_path / "deb"))
    monkeypatch.setattr(debian, "cache_dir", lambda: tmp_path / "cache")

    def no_fetch(dest, packages):
        raise debian.DemoDataUnavailable(f"would fetch {packages}")

    monkeypatch.setattr(debian, "fetch_packages", no_fetch)
    if not (Path("/") / demo_data.EMOJI_FONT.content / demo_data.EMOJI_FONT.file).is_file():
        with pytest.raises(debian.DemoDataUnavailable, match="fonts-noto-color-emoji"):
            debian.content_dir(demo_data.EMOJI_FONT)  # a font folder without the font does not count
    touch(font_dir / demo_data.EMOJI_FONT.file)
    assert debian.content_dir(demo_data.EMOJI_FONT) == font_dir
