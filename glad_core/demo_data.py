"""Embedded demo datasets, built from Debian packages of labelled images (and two fonts).

The packages are fetched with `apt-get download` (no root needed) and only their image files (and
Tux Paint's descriptions) are unpacked into `cache_dir()/debian/`; packages already installed
system-wide, or unpacked by hand under `$GLAD_DEBIAN_ROOT`, are used in place. Each dataset is
written in CoOp's layout to `cache_dir()/data/<folder>/`: PNG images under `images/<class>/` and a split file
`split_glad_<Name>.json` = {"train"|"val"|"test": [[impath relative to images/, label, classname]]}.

Datasets (`DEMO_DATASETS`):

* `fashion_mnist` (base-to-novel; `dataset-fashion-mnist`, MIT): 10 classes of 28x28 grey
  product photos. Per class, 100 train and 20 val images from the official training set and
  100 test images from the official test set. Pixels are inverted to dark-on-light, like product
  photos on a white ground, which a model pretrained on photos reads better than the light-on-dark
  originals.
* `clipart` (base-to-novel; `openclipart-png`, public domain): 16 object classes from the
  OpenClipart folders holding 25+ images, in folder order (so base = animals, houses, computers,
  food; novel = clothing, flowers, music, sports, toys, clocks, tools, vehicles). A few files that
  are not the folder's object (diagrams, people, road signs, ...) are left out.
* `tuxpaint` (`tuxpaint-stamps-default`, GPL-2+): 10 coarse classes of photo cut-outs (clothing
  is drawn). The "ImageNet" of the demo: the source of the cross-dataset and domain-generalization
  protocols.
* `clipart10` (`openclipart-png`): the same 10 classes, class names and label order as
  `tuxpaint`, as clip art: the domain-generalization target.

`fashion_mnist` is the cross-dataset target: its garment names share no class name with
`tuxpaint` (whose "clothing" is their super-class, a deliberate semantic overlap).

Their specs (`DEMO_DATASETS`) are in `glad_core.datasets`, which reads them like any dataset.
`mini_pacs` (`glad_core.mini_pacs`, loaded with `glad_core.domains.load_domains`) is a four-domain
set of the same 10 classes for multi-source domain generalization: photo (`tuxpaint`), clip art
(`clipart10`), cartoon (Noto Color Emoji glyphs, `fonts-noto-color-emoji`) and sketch (Symbola
glyphs, `fonts-symbola`).

Cut-outs are cropped to their opaque area, fitted into 208x208 and centred on a white square of at
most 224x224 (so a centre crop keeps the whole object). Exact duplicate files are kept once and
sources above 25 megapixels are skipped (they take seconds each to decode).

Splits are fixed: files are sorted, then ordered within each class by SHA-256 of
"<seed>:<path>" (independent of Python/NumPy versions), and cut per class into
train / val / test = about 50/20/30 % (`clipart`), 65/10/25 % (`tuxpaint`: small, so as much
training data as a usable test set allows) and 30/10/60 % (`clipart10`: a target, its test set
matters most), with at least one image in each.

Run `python -m glad_core prepare` (or `glad_core.prepare.prepare_demo_data()`): about a minute, 45 MB. The unpacked
packages in `cache_dir()/debian/` (about 235 MB) are needed only to rebuild or re-check the splits
and may be deleted. Without apt-get / dpkg-deb, `DemoDataUnavailable` explains the alternatives
(`$GLAD_DEBIAN_ROOT`; torchvision's copy of Fashion-MNIST).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from .datasets import DEMO_DATASETS, demo_root
from .debian import DemoDataUnavailable, Package, content_dir
from .descriptions import Descriptions, DescriptionError, load_descriptions, tuxpaint_descriptions_path
from .io import atomic_path
from .paths import cache_dir

SEED = 1
MAX_SIDE = 224
PAD = 8
MAX_SOURCE_PIXELS = 25_000_000
SPLITS = ("train", "val", "test")


FASHION = Package("dataset-fashion-mnist", "usr/share/datasets/fashion-mnist", ".gz")
TUXPAINT = Package("tuxpaint-stamps-default", "usr/share/tuxpaint/stamps", ".png", also=".txt")
OPENCLIPART = Package("openclipart-png", "usr/share/openclipart/png", ".png")
EMOJI_FONT = Package("fonts-noto-color-emoji", "usr/share/fonts/truetype/noto", ".ttf", "NotoColorEmoji.ttf")
SYMBOLA_FONT = Package("fonts-symbola", "usr/share/fonts/truetype/ancient-scripts", ".ttf", "Symbola_hint.ttf")


@dataclass(frozen=True)
class _Class:
    """A class: globs (relative to the package's content dir) minus fnmatch exclusions."""

    name: str
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Recipe:
    package: Package
    classes: tuple[_Class, ...]
    p_val: float
    p_test: float
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class _Item:
    split: str
    label: int
    classname: str
    impath: str  # relative to the dataset's image_dir
    source: Path | np.ndarray  # a cut-out file, or a 28x28 Fashion-MNIST image


FASHION_CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot")
FASHION_PER_CLASS = {"train": 100, "val": 20, "test": 100}

# Tux Paint (photos) and OpenClipart (clip art) versions of the same 10 classes.
_TUX10 = (
    _Class("mammal", ("animals/mammals/**/*.png", "animals/marsupials/*.png"), ("*/edward_bear.png",)),
    _Class("bird", ("animals/birds/*.png",)),
    _Class("fruit", ("food/fruit/*.png",)),
    _Class("flower", ("plants/flowers/**/*.png",)),
    _Class("vegetable", ("food/vegetables/*.png",)),
    _Class("clothing", ("clothes/**/*.png",), ("clothes/button.png", "clothes/clothespin_*")),
    _Class("fish", ("animals/fish/*.png",), ("*/lobster.png", "*/shrimp.png")),
    _Class("musical instrument", ("hobbies/music/**/*.png",)),
    _Class("insect", ("animals/insects/*.png",), ("*/Brown_slug.png", "*/Woodlouse.png")),
    _Class("tree", ("plants/trees/*.png", "seasonal/christmas/Christmas_Tree_photo*.png"),
           ("*/holly_leaves.png", "*/pinecone.png", "*/rambutan.png")),
)
_CLIP = {
    "mammal": _Class("mammal", ("animals/mammals/*.png", "animals/mammals/*/*.png"),
                     ("*_peterm_*", "*/emule_icon_*")),
    "bird": _Class("bird", ("animals/birds/*.png", "animals/birds/penguin/*.png"),
                   ("*tux*", "*/contour_bat*", "*/duck_yellow_ii_*", "*/manager_mimooh*",
                    "*/mirjam_meijer*", "*/turkey_on_platte*", "*/wing_mitchell*")),
    "fruit": _Class("fruit", ("food/fruit/*.png",),
                    ("*/apple_juice*", "*/champignon*", "*/gumnut*", "*/juice_glass*", "*/kallisti*",
                     "*/pie_*", "*/slate-apple*", "*/straw_tote*", "*/tile_orange*",
                     "*/tree_whit_fruits*", "*/turkey_platter*")),
    "flower": _Class("flower", ("plants/flowers/*.png",), ("*/cactus_*", "*/mirjam_meijer*")),
    "vegetable": _Class("vegetable", ("food/vegetables/*.png", "plants/potato_*.png",
                                      "plants/cayennepepper*.png", "plants/champignon_*.png")),
    "clothing": _Class("clothing", ("people/clothing/*.png", "people/clothing/hats/*.png"),
                       ("*/earring*", "*/gold_chain*", "*/shoe_print*", "*/straw_tote*",
                        "*/sunglasses*", "*/feet_in_sandals*", "*/magic_hat*", "*crown*",
                        "*/jacob_leisler*")),
    "fish": _Class("fish", ("animals/fish/*.png",),
                   ("*/amibe_*", "*/bluewhale*", "*/crawfish*", "*/dolphin*", "*/kallisti*",
                    "*/orca_*", "*/paesaggio*")),
    "musical instrument": _Class(
        "musical instrument", ("recreation/music/*.png",),
        ("*/45_rpm_*", "*/a_man_singing*", "*/bach_*", "*/bass_clef*", "*/beethoveo*", "*/boombox*",
         "*note*", "*croche*", "*/fifties_jukebox*", "*/gramophone*", "*/handel_*", "*/headphones*",
         "*/jazz_*", "*/microphone*", "*/piano_theory*", "*/quaver*", "*/treble_*", "*_mute_*",
         "*/vinyl_*")),
    "insect": _Class("insect", ("animals/bugs/*.png",),
                     ("*/lumaca*", "*/ragn*", "*/spider*", "*/virus*", "*/mostriciattolo*")),
    "tree": _Class("tree", ("plants/trees/*.png", "plants/trees/evergreen/*.png", "plants/albero_*.png",
                            "plants/arbre_modern_*.png"),
                   ("*/bowsaw*", "*/bypasspruner*", "*/christmas_balls*", "*/fall_coloured_le*",
                    "*/fall_scene*", "*/fern_*")),
}
_CLIP16 = (
    _CLIP["bird"], _CLIP["insect"], _CLIP["mammal"],
    _Class("house", ("buildings/homes/*.png",), ("*/lighthouse*",)),
    _Class("computer hardware", ("computer/hardware/*.png",)),
    _Class("beverage", ("food/beverages/*.png",)),
    _Class("dessert", ("food/desserts/*.png",)),
    _CLIP["fruit"], _CLIP["clothing"], _CLIP["flower"], _CLIP["musical instrument"],
    _Class("sports equipment", ("recreation/sports/*.png",),
           ("*/sport_*", "*/stylized_yoga_*", "*/a_boy_plays*", "*/backpacker*", "*/future_beckham*",
            "*/golf_drive*", "*/hikinh*", "*/judo*", "*/karate*", "*/roller_blader*",
            "*/water_skier*", "*/sportcar*", "*/ticket*")),
    _Class("toy", ("recreation/toys/*.png",)),
    _Class("clock", ("signs_and_symbols/clocks/*.png",)),
    _Class("tool", ("tools/*.png",)),
    _Class("vehicle", ("transportation/vehicles/*.png",),
           ("*/crossroads*", "*/curve_ahead*", "*/cycle_lane*", "*/cycle_route*", "*/lighthouse*",
            "*/parking_*", "*/quay_sign*")),
)

_RECIPES: dict[str, _Recipe | None] = {
    "fashion_mnist": None,
    "clipart": _Recipe(OPENCLIPART, _CLIP16, p_val=0.2, p_test=0.3),
    "tuxpaint": _Recipe(TUXPAINT, _TUX10, p_val=0.1, p_test=0.25, exclude=("*cartoon*",)),
    "clipart10": _Recipe(OPENCLIPART, tuple(_CLIP[c.name] for c in _TUX10), p_val=0.1, p_test=0.6),
}

def _torchvision_fashion_dir() -> Path:
    return cache_dir() / "torchvision" / "FashionMNIST" / "raw"


def fashion_dir() -> Path:
    """Fashion-MNIST's IDX files: the Debian package's (`content_dir`) or torchvision's copy."""
    try:
        return content_dir(FASHION, also_in=[_torchvision_fashion_dir()])
    except DemoDataUnavailable as e:
        raise DemoDataUnavailable(
            f"{e} For fashion_mnist alone, with internet access, torchvision's copy works too: python -c \"import "
            f"torchvision; torchvision.datasets.FashionMNIST('{_torchvision_fashion_dir().parent.parent}', "
            "download=True)\".") from None


def _ordered(keys: Iterable[str]) -> list[str]:
    """`keys` in a fixed pseudo-random order (SHA-256 of "<seed>:<key>")."""
    return sorted(keys, key=lambda k: hashlib.sha256(f"{SEED}:{k}".encode()).digest())


def _split_sizes(n: int, p_val: float, p_test: float) -> tuple[int, int, int]:
    """Per-class (train, val, test) sizes: rounded fractions, at least one image each."""
    n_val, n_test = max(1, round(n * p_val)), max(1, round(n * p_test))
    if n - n_val - n_test < 1:
        raise RuntimeError(f"a class has only {n} images; the demo sets need at least 3 per class")
    return n - n_val - n_test, n_val, n_test


def class_dirname(classname: str) -> str:
    return classname.lower().replace(" ", "_").replace("-", "_")


def _read_idx(folder: Path, stem: str) -> np.ndarray:
    """An IDX array (`stem` or `stem.gz`, as in the Debian package and in torchvision's raw folder)."""
    path = folder / f"{stem}.gz"
    data = gzip.decompress(path.read_bytes()) if path.exists() else (folder / stem).read_bytes()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _plan_fashion(src: Path) -> list[_Item]:
    sets = {part: (_read_idx(src, f"{part}-images-idx3-ubyte"), _read_idx(src, f"{part}-labels-idx1-ubyte"))
            for part in ("train", "t10k")}
    items = []
    for label, name in enumerate(FASHION_CLASSES):
        for part, splits in (("train", ("train", "val")), ("t10k", ("test",))):
            images, labels = sets[part]
            order = [int(i) for i in _ordered(str(i) for i in np.flatnonzero(labels == label))]
            start = 0
            for split in splits:
                for i in order[start:start + FASHION_PER_CLASS[split]]:
                    items.append(_Item(split, label, name, f"{class_dirname(name)}/{part}_{i:05d}.png", images[i]))
                start += FASHION_PER_CLASS[split]
    return items


def _select(src: Path, cls: _Class, exclude: tuple[str, ...]) -> list[str]:
    found = {p.relative_to(src).as_posix() for pattern in cls.include for p in src.glob(pattern) if p.is_file()}
    return sorted(r for r in found if not any(fnmatchcase(r, x) for x in cls.exclude + exclude))


def _too_large(path: Path) -> bool:
    """Whether the image has more than MAX_SOURCE_PIXELS (read from its header)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                return im.width * im.height > MAX_SOURCE_PIXELS
        except Image.DecompressionBombError:
            return True


def _plan_cutouts(recipe: _Recipe, src: Path) -> list[_Item]:
    seen: set[bytes] = set()
    items = []
    for label, cls in enumerate(recipe.classes):
        files = []
        for rel in _select(src, cls, recipe.exclude):
            if _too_large(src / rel):
                continue
            digest = hashlib.sha256((src / rel).read_bytes()).digest()
            if digest not in seen:
                seen.add(digest)
                files.append(rel)
        n_train, n_val, _ = _split_sizes(len(files), recipe.p_val, recipe.p_test)
        for i, rel in enumerate(_ordered(files)):
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            items.append(_Item(split, label, cls.name, f"{class_dirname(cls.name)}/{rel.replace('/', '_')}", src / rel))
    return items


def _plan(name: str) -> list[_Item]:
    recipe = _RECIPES[name]
    items = _plan_fashion(fashion_dir()) if recipe is None else _plan_cutouts(recipe, content_dir(recipe.package))
    if len({it.impath for it in items}) != len(items):
        raise RuntimeError(f"two images of {name} map to the same file name")
    return items


def _split_json(items: Sequence[_Item]) -> dict[str, list[list]]:
    return {split: [[it.impath, it.label, it.classname]
                    for it in sorted(items, key=lambda it: (it.label, it.impath)) if it.split == split]
            for split in SPLITS}


def plan_splits(name: str) -> dict[str, list[list]]:
    """The split-file content that demo set `name` is built with (fetching packages if needed, writing no images)."""
    return _split_json(_plan(name))


def _cutout(path: Path) -> Image.Image:
    """A cut-out file on white (`on_white`)."""
    with Image.open(path) as im:
        return on_white(im.convert("RGBA"))


def on_white(im: Image.Image) -> Image.Image:
    """Crop an RGBA image to its opaque area, fit it into MAX_SIDE - 2*PAD, centre it on a white square."""
    box = im.getchannel("A").getbbox()
    if box:
        im = im.crop(box)
    im.thumbnail((MAX_SIDE - 2 * PAD, MAX_SIDE - 2 * PAD), Image.Resampling.LANCZOS)
    side = max(im.size) + 2 * PAD
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(im, ((side - im.width) // 2, (side - im.height) // 2))
    return canvas.convert("RGB")


def _render(item: _Item) -> Image.Image:
    if isinstance(item.source, np.ndarray):
        return Image.fromarray(255 - item.source)  # uint8 2-D: mode "L"
    return _cutout(item.source)


def _write_split(path: Path, obj: object) -> None:
    """A split file, atomically, in the indentation of CoOp's split files."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=4, separators=(",", ": ")))


def build_demo_sets(names: Iterable[str] | None = None, force: bool = False) -> Path:
    """Fetch the packages and build the demo sets `names` (default all of `DEMO_DATASETS`); return the data root.

    A set whose split file exists is skipped unless `force`; the split file is written last
    (atomically), so an interrupted build is redone from scratch on the next call. `tuxpaint` also
    gets its stamps' own descriptions beside the split (`descriptions/tuxpaint.json`, for MuGCP),
    written with the set, or when missing.
    """
    root = demo_root()
    for name in names or DEMO_DATASETS:
        spec = DEMO_DATASETS[name]
        folder = root / spec.folder
        if (folder / spec.split_file).exists() and not force:
            if name == "tuxpaint" and not tuxpaint_descriptions_path().exists():
                write_tuxpaint_descriptions()
            continue
        items = _plan(name)
        image_dir = folder / spec.image_dir
        shutil.rmtree(image_dir, ignore_errors=True)
        for item in tqdm(items, desc=f"building {name}", unit=" images"):
            out = image_dir / item.impath
            out.parent.mkdir(parents=True, exist_ok=True)
            _render(item).save(out)
        _write_split(folder / spec.split_file, _split_json(items))
        if name == "tuxpaint":
            write_tuxpaint_descriptions({it.impath: it.source for it in items}, force=True)
    return root


def write_tuxpaint_descriptions(sources: Mapping[str, Path] | None = None, force: bool = False) -> Path:
    """Write the stamps' own descriptions of the `tuxpaint` demo images beside its split; return the file.

    `sources` maps each image (relative path) to the stamp `.png` it was made from (default: the
    demo recipe's plan). Each text is the first (English) line of the `.txt` beside that `.png`,
    read beside the unpacked images when present, else from a text-only unpack of the package. An
    existing file that covers exactly the split's images is kept unless `force`.
    """
    out = tuxpaint_descriptions_path()
    split = out.parent.parent / DEMO_DATASETS["tuxpaint"].split_file
    if not split.exists():
        raise DescriptionError(f"the tuxpaint demo set is not built ({split} missing): run "
                               "`python -m glad_core prepare` first.")
    built = {row[0] for rows in json.loads(split.read_text()).values() for row in rows}
    if out.exists() and not force and set(load_descriptions(out).images) == built:
        return out
    sources = sources if sources is not None else {it.impath: it.source for it in _plan("tuxpaint")}
    if set(sources) != built:
        raise DescriptionError(f"{split} does not match the current tuxpaint recipe: rebuild it with "
                               "`python -m glad_core.prepare tuxpaint --force`.")
    stamps = content_dir(TUXPAINT)
    rel = {impath: Path(src).relative_to(stamps).with_suffix(".txt") for impath, src in sources.items()}
    if not all((stamps / r).is_file() for r in rel.values()):
        stamps = content_dir(Package(TUXPAINT.name, TUXPAINT.content, ".txt"), dest=cache_dir() / "debian-text")
    texts = {}
    for impath, r in sorted(rel.items()):
        try:
            texts[impath] = (stamps / r).read_text(encoding="utf-8-sig").splitlines()[0].strip()
        except (OSError, IndexError) as e:
            raise DescriptionError(f"no description for tuxpaint image {impath!r}: cannot read {stamps / r} ({e}).") from e
    return Descriptions("human", "tuxpaint", texts,
                        generator=f"human: first (English) line of each stamp's .txt in {TUXPAINT.name}").save(out)
