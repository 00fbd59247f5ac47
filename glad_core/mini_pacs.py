"""mini-PACS: the demo's 10 classes in four rendering domains, like PACS's photo / art / cartoon / sketch.

* photo: the `tuxpaint` demo set (Tux Paint stamp photos), every image of its three splits
  (hard links to its files where the file system allows, else copies);
* clip_art: the `clipart10` demo set (OpenClipart), likewise;
* cartoon: Noto Color Emoji glyphs (Debian `fonts-noto-color-emoji`, SIL OFL 1.1), drawn with
  Pillow at the font's bitmap size 109 in colour (`embedded_color`);
* sketch: Symbola glyphs (Debian `fonts-symbola`, "free for any use"), black line drawings drawn
  at size 160.

The characters of each class are the Unicode code points below (names as in Unicode; SHEEP is
the emoji "ewe"); a font's glyphs are those its character map holds, so the cartoon domain has
179 images and the sketch domain 127. Two emoji that are ZWJ sequences (black bird, lime) are
left out. Each glyph is drawn once, cropped to its ink and centred on white like the cut-outs
(`demo_data.on_white`); tree and fish have only 4 glyphs per font domain, so keep shots small
(<= 2) on those domains or test a held-out domain on all its images.

The set is written in DomainBed's layout, `cache_dir()/data/mini_pacs/<domain>/<class>/*.png`
(class folders as in the demo sets: "musical_instrument"), and split per domain 40 / 40 / 20 by
`glad_core.domains` with seed 1; the split files are written last, so an interrupted build is
redone on the next `prepare`.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from .datasets import DEMO_DATASETS
from .debian import Package, content_dir
from .demo_data import EMOJI_FONT, SYMBOLA_FONT, build_demo_sets, class_dirname, on_white
from .domains import DOMAINBED, read_domain_folders, split_file_name

NAME = "mini_pacs"
SPLIT_SEED = 1
COPIED = {"photo": "tuxpaint", "clip_art": "clipart10"}  # domain -> demo set whose images it reuses


@dataclass(frozen=True)
class _Font:
    """A font domain: the package holding the font, the size it is drawn at, colour or black."""

    package: Package
    size: int
    color: bool


FONTS = {"cartoon": _Font(EMOJI_FONT, 109, color=True), "sketch": _Font(SYMBOLA_FONT, 160, color=False)}

# Code points per class (Unicode character names).
GLYPHS: dict[str, tuple[tuple[int, str], ...]] = {
    "mammal": (
        (0x1F412, "MONKEY"), (0x1F415, "DOG"), (0x1F429, "POODLE"), (0x1F43A, "WOLF FACE"), (0x1F98A, "FOX FACE"),
        (0x1F99D, "RACCOON"), (0x1F408, "CAT"), (0x1F981, "LION FACE"), (0x1F405, "TIGER"), (0x1F406, "LEOPARD"),
        (0x1F40E, "HORSE"), (0x1F993, "ZEBRA FACE"), (0x1F98C, "DEER"), (0x1F9AC, "BISON"), (0x1F402, "OX"),
        (0x1F403, "WATER BUFFALO"), (0x1F404, "COW"), (0x1F416, "PIG"), (0x1F417, "BOAR"), (0x1F40F, "RAM"),
        (0x1F411, "SHEEP"), (0x1F410, "GOAT"), (0x1F42A, "DROMEDARY CAMEL"), (0x1F42B, "BACTRIAN CAMEL"),
        (0x1F999, "LLAMA"), (0x1F992, "GIRAFFE FACE"), (0x1F418, "ELEPHANT"), (0x1F9A3, "MAMMOTH"),
        (0x1F98F, "RHINOCEROS"), (0x1F99B, "HIPPOPOTAMUS"), (0x1F401, "MOUSE"), (0x1F400, "RAT"),
        (0x1F439, "HAMSTER FACE"), (0x1F407, "RABBIT"), (0x1F43F, "CHIPMUNK"), (0x1F9AB, "BEAVER"),
        (0x1F994, "HEDGEHOG"), (0x1F987, "BAT"), (0x1F43B, "BEAR FACE"), (0x1F428, "KOALA"), (0x1F43C, "PANDA FACE"),
        (0x1F9A5, "SLOTH"), (0x1F9A6, "OTTER"), (0x1F9A8, "SKUNK"), (0x1F998, "KANGAROO"), (0x1F9A1, "BADGER"),
        (0x1F98D, "GORILLA"), (0x1F9A7, "ORANGUTAN"), (0x1F40B, "WHALE"), (0x1F433, "SPOUTING WHALE"),
        (0x1F42C, "DOLPHIN"), (0x1F9AD, "SEAL"), (0x1FACE, "MOOSE"), (0x1FACF, "DONKEY"), (0x1F9AE, "GUIDE DOG"),
    ),
    "bird": (
        (0x1F983, "TURKEY"), (0x1F414, "CHICKEN"), (0x1F413, "ROOSTER"), (0x1F424, "BABY CHICK"),
        (0x1F425, "FRONT-FACING BABY CHICK"), (0x1F426, "BIRD"), (0x1F427, "PENGUIN"), (0x1F54A, "DOVE OF PEACE"),
        (0x1F985, "EAGLE"), (0x1F986, "DUCK"), (0x1F9A2, "SWAN"), (0x1F989, "OWL"), (0x1F9A4, "DODO"),
        (0x1F9A9, "FLAMINGO"), (0x1F99A, "PEACOCK"), (0x1F99C, "PARROT"), (0x1FABF, "GOOSE"),
        (0x1F423, "HATCHING CHICK"),
    ),
    "fruit": (
        (0x1F347, "GRAPES"), (0x1F348, "MELON"), (0x1F349, "WATERMELON"), (0x1F34A, "TANGERINE"), (0x1F34B, "LEMON"),
        (0x1F34C, "BANANA"), (0x1F34D, "PINEAPPLE"), (0x1F96D, "MANGO"), (0x1F34E, "RED APPLE"),
        (0x1F34F, "GREEN APPLE"), (0x1F350, "PEAR"), (0x1F351, "PEACH"), (0x1F352, "CHERRIES"),
        (0x1F353, "STRAWBERRY"), (0x1FAD0, "BLUEBERRIES"), (0x1F95D, "KIWIFRUIT"), (0x1F965, "COCONUT"),
    ),
    "flower": (
        (0x1F490, "BOUQUET"), (0x1F338, "CHERRY BLOSSOM"), (0x1F4AE, "WHITE FLOWER"), (0x1F3F5, "ROSETTE"),
        (0x1F339, "ROSE"), (0x1F940, "WILTED FLOWER"), (0x1F33A, "HIBISCUS"), (0x1F33B, "SUNFLOWER"),
        (0x1F33C, "BLOSSOM"), (0x1F337, "TULIP"), (0x1FAB7, "LOTUS"), (0x1FABB, "HYACINTH"),
    ),
    "vegetable": (
        (0x1F346, "AUBERGINE"), (0x1F954, "POTATO"), (0x1F955, "CARROT"), (0x1F33D, "EAR OF MAIZE"),
        (0x1F336, "HOT PEPPER"), (0x1FAD1, "BELL PEPPER"), (0x1F952, "CUCUMBER"), (0x1F96C, "LEAFY GREEN"),
        (0x1F966, "BROCCOLI"), (0x1F9C4, "GARLIC"), (0x1F9C5, "ONION"), (0x1F344, "MUSHROOM"),
        (0x1F360, "ROASTED SWEET POTATO"), (0x1FADA, "GINGER ROOT"), (0x1FADB, "PEA POD"), (0x1FAD8, "BEANS"),
        (0x1F345, "TOMATO"), (0x1F951, "AVOCADO"),
    ),
    "clothing": (
        (0x1F454, "NECKTIE"), (0x1F455, "T-SHIRT"), (0x1F456, "JEANS"), (0x1F9E3, "SCARF"), (0x1F9E4, "GLOVES"),
        (0x1F9E5, "COAT"), (0x1F9E6, "SOCKS"), (0x1F457, "DRESS"), (0x1F458, "KIMONO"), (0x1F97B, "SARI"),
        (0x1FA71, "ONE-PIECE SWIMSUIT"), (0x1FA72, "BRIEFS"), (0x1FA73, "SHORTS"), (0x1F459, "BIKINI"),
        (0x1F45A, "WOMANS CLOTHES"), (0x1F452, "WOMANS HAT"), (0x1F3A9, "TOP HAT"), (0x1F9E2, "BILLED CAP"),
        (0x1F45E, "MANS SHOE"), (0x1F45F, "ATHLETIC SHOE"), (0x1F97E, "HIKING BOOT"), (0x1F97F, "FLAT SHOE"),
        (0x1F460, "HIGH-HEELED SHOE"), (0x1F461, "WOMANS SANDAL"), (0x1FA70, "BALLET SHOES"),
        (0x1F462, "WOMANS BOOTS"), (0x1F97C, "LAB COAT"), (0x1F9BA, "SAFETY VEST"), (0x1FA74, "THONG SANDAL"),
    ),
    "fish": ((0x1F41F, "FISH"), (0x1F420, "TROPICAL FISH"), (0x1F421, "BLOWFISH"), (0x1F988, "SHARK")),
    "musical instrument": (
        (0x1F3B7, "SAXOPHONE"), (0x1FA97, "ACCORDION"), (0x1F3B8, "GUITAR"), (0x1F3B9, "MUSICAL KEYBOARD"),
        (0x1F3BA, "TRUMPET"), (0x1F3BB, "VIOLIN"), (0x1FA95, "BANJO"), (0x1F941, "DRUM WITH DRUMSTICKS"),
        (0x1FA98, "LONG DRUM"), (0x1FA87, "MARACAS"), (0x1FA88, "FLUTE"),
    ),
    "insect": (
        (0x1F41B, "BUG"), (0x1F41C, "ANT"), (0x1F41D, "HONEYBEE"), (0x1F41E, "LADY BEETLE"), (0x1FAB2, "BEETLE"),
        (0x1F997, "CRICKET"), (0x1FAB3, "COCKROACH"), (0x1F98B, "BUTTERFLY"), (0x1F99F, "MOSQUITO"), (0x1FAB0, "FLY"),
        (0x1F40C, "SNAIL"),
    ),
    "tree": ((0x1F332, "EVERGREEN TREE"), (0x1F333, "DECIDUOUS TREE"), (0x1F334, "PALM TREE"),
             (0x1F384, "CHRISTMAS TREE")),
}


def glyph_file(classname: str, codepoint: int, name: str) -> str:
    """Path of a glyph image inside its domain folder: <class>/<code point>_<name>.png."""
    return f"{class_dirname(classname)}/{codepoint:05x}_{name.lower().replace(' ', '_').replace('-', '_')}.png"


def font_path(domain: str) -> Path:
    """The font file of a glyph domain (its Debian package fetched when needed)."""
    package = FONTS[domain].package
    return content_dir(package) / package.file


def glyphs_in_font(path: Path) -> dict[str, list[tuple[int, str]]]:
    """Per class, the characters that the font's character map holds."""
    from fontTools.ttLib import TTFont

    with TTFont(path, lazy=True) as font:
        cmap = font.getBestCmap()
    return {c: [(cp, n) for cp, n in chars if cp in cmap] for c, chars in GLYPHS.items()}


def render_glyph(font: ImageFont.FreeTypeFont, codepoint: int, color: bool) -> Image.Image:
    """One character, cropped to its ink and centred on white (RGB)."""
    char = chr(codepoint)
    left, top, right, bottom = font.getbbox(char)
    im = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((-left, -top), char, font=font, fill=(0, 0, 0, 255), embedded_color=color)
    if im.getchannel("A").getbbox() is None:
        raise RuntimeError(f"the font {font.path} draws nothing for U+{codepoint:04X}")
    return on_white(im)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def build_mini_pacs(root: Path, force: bool = False) -> Path:
    """Write mini-PACS under `root/mini_pacs` (skipped when its split files exist, unless `force`)."""
    spec = DOMAINBED[NAME]
    folder = root / spec.folders[0]
    if not force and all((folder / split_file_name(d, SPLIT_SEED)).is_file() for d in spec.domains):
        return folder
    built = build_demo_sets(names=list(COPIED.values()))
    shutil.rmtree(folder, ignore_errors=True)
    for domain, name in COPIED.items():
        src = DEMO_DATASETS[name]
        shutil.copytree(built / src.folder / src.image_dir, folder / domain, copy_function=_link_or_copy)
    for domain, f in FONTS.items():
        path = font_path(domain)
        font = ImageFont.truetype(str(path), f.size, layout_engine=ImageFont.Layout.BASIC)
        chars = [(c, cp, n) for c, found in glyphs_in_font(path).items() for cp, n in found]
        for classname, cp, name in tqdm(chars, desc=f"building mini_pacs/{domain}", unit=" images"):
            out = folder / domain / glyph_file(classname, cp, name)
            out.parent.mkdir(parents=True, exist_ok=True)
            render_glyph(font, cp, f.color).save(out)
    read_domain_folders(spec, folder, SPLIT_SEED)  # writes the split files, last
    return folder
