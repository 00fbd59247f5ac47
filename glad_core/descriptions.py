"""Image and class descriptions for MuGCP's semantic conditional prompts, from pluggable providers.

MuGCP asks a multimodal LLM to describe every image; no MLLM runs offline, so descriptions come
from a *source*, and a `DescriptionProvider` decides which text each training and test image gets.
Every provider reports its kind and name (`describe()`), which results records store.

Sources
-------
* `load_descriptions(path)`: a descriptions JSON (the format below), e.g. written by the user's
  own MLLM for train and test images: the faithful source (kind "mllm").
* `tuxpaint_descriptions()`: the human-written English description of each Tux Paint stamp (the
  first line of the `.txt` beside each `.png` in `tuxpaint-stamps-default`), for the `tuxpaint` demo
  set; kept beside its split as `descriptions/tuxpaint.json` (kind "human").
* `unicode_descriptions(chars)`: the Unicode name of the character each rendered emoji / symbol
  image shows ("TROPICAL FISH" -> "tropical fish"; kind "human").
* `WordNet()`: per-class glosses of WordNet 3.0 (Debian `wordnet-base`; kind "class").
* retrieval: a test image without a description gets the one of its nearest training image
  (cosine of image features under the frozen model; kind "retrieval").

Descriptions JSON (format "glad-descriptions", version 1)::

    {"format": "glad-descriptions", "version": 1,
     "kind": "mllm",                      # "mllm" (default), "human", or "class" (classes only)
     "name": "llava-eurosat",             # optional; default: the file name without .json
     "generator": "llava-hf/llava-v1.6-mistral-7b-hf",   # required for "mllm": which model wrote it
     "question": "Describe the main object of this image in one sentence.",  # required for "mllm"
     "images": {"AnnualCrop/AnnualCrop_1.jpg": "A patchwork of green fields ...", ...},
     "classes": {"AnnualCrop": "Land planted with crops harvested every year.", ...}}  # optional

Image keys are paths relative to the dataset's image folder (as in the split file), with "/"
separators; a key matches the image whose path ends with it (the longest matching key wins).

Honesty rule: a human description of a test image names its object, so using it at test time is
an oracle. By default human descriptions are used for training images only; test images get
retrieval (default) or class texts; `oracle=True` (recorded) uses them on test images as an upper
bound. MLLM descriptions of test images are what MuGCP itself uses and need no switch.
"""
from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Callable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F

from .data import Datum
from .datasets import DEMO_DATASETS, demo_root, not_built_message
from .debian import Package, content_dir
from .feature_cache import frozen_features
from .io import write_json


FORMAT, VERSION = "glad-descriptions", 1
KINDS = ("mllm", "human", "class", "retrieval", "oracle")
TEST_MODES = ("images", "retrieval", "class")
_FILE_KINDS = ("mllm", "human", "class")
_FILE_KEYS = {"format", "version", "kind", "name", "generator", "question", "images", "classes"}


class DescriptionError(ValueError):
    """Descriptions that are malformed, missing for an image or class, or used against the honesty rule."""


# ----------------------------------------------------------------------------- per-image sources


@dataclass(frozen=True)
class Descriptions:
    """Texts per image (keys relative to the image folder) and per class, from one source."""

    kind: str
    name: str
    images: Mapping[str, str]
    classes: Mapping[str, str] = field(default_factory=dict)
    generator: str | None = None
    question: str | None = None
    source: str | None = None  # where the texts came from (file, package)

    def __post_init__(self) -> None:
        where = self.source or self.name
        if self.kind not in _FILE_KINDS:
            raise DescriptionError(f"{where}: kind {self.kind!r} is not one of {', '.join(_FILE_KINDS)}.")
        if self.kind == "mllm" and not (self.generator and self.question):
            raise DescriptionError(f"{where}: MLLM descriptions must name their 'generator' (the model) and "
                                   "the 'question' it was asked, so that results can say what produced them.")
        if self.kind == "class" and (self.images or not self.classes):
            raise DescriptionError(f"{where}: kind 'class' holds a non-empty 'classes' table and no 'images'.")
        if self.kind != "class" and not self.images:
            raise DescriptionError(f"{where}: no image descriptions ('images' is empty).")
        for table, entries in (("images", self.images), ("classes", self.classes)):
            for key, text in entries.items():
                if not isinstance(key, str) or not isinstance(text, str) or not text.strip():
                    raise DescriptionError(f"{where}: {table}[{key!r}] must map a string to a non-empty text.")
        for key in self.images:
            p = PurePosixPath(key)
            if p.is_absolute() or ".." in p.parts or "\\" in key:
                raise DescriptionError(f"{where}: image key {key!r} must be a path relative to the dataset's "
                                       "image folder with '/' separators, e.g. 'bird/crow.png'.")

    def info(self) -> dict:
        """What a results record stores about this source."""
        return {"kind": self.kind, "name": self.name, "generator": self.generator, "question": self.question,
                "source": self.source, "n_images": len(self.images), "n_classes": len(self.classes)}

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "kind": self.kind, "name": self.name,
                "generator": self.generator, "question": self.question,
                "images": dict(self.images), "classes": dict(self.classes)}

    def save(self, path: str | Path) -> Path:
        """Write in the descriptions JSON format (atomically)."""
        return write_json(path, self.to_json())

    def image_texts(self, items: Sequence[Datum]) -> list[str]:
        """The text of every item; every item must have one (the error names the images that do not)."""
        index = {PurePosixPath(k).parts: k for k in self.images}
        keys = [_match(index, d.impath) for d in items]
        missing = [d.impath for d, k in zip(items, keys) if k is None]
        if missing and len(missing) == len(items):
            raise DescriptionError(
                f"descriptions {self.source or self.name!r}: none of its {len(self.images)} image keys matches "
                f"any of the {len(items)} images (e.g. key {next(iter(self.images))!r}, image {missing[0]!r}). "
                "Keys must be image paths relative to the dataset's image folder, as in its split file.")
        if missing:
            raise DescriptionError(
                f"descriptions {self.source or self.name!r} have no text for {len(missing)} of {len(items)} "
                f"images, e.g. {missing[:3]}. Describe them too, or choose test='retrieval' or 'class' for "
                "images the source does not cover.")
        return [self.images[k] for k in keys]

    def class_texts(self, classnames: Sequence[str]) -> list[str]:
        missing = [c for c in classnames if c not in self.classes]
        if missing:
            raise DescriptionError(f"descriptions {self.source or self.name!r} have no 'classes' text for "
                                   f"{missing[:5]} ({len(missing)} missing); add them or use WordNet() glosses.")
        return [self.classes[c] for c in classnames]


def _match(index: Mapping[tuple[str, ...], str], impath: str) -> str | None:
    """The key whose path parts end `impath` (longest first), or None."""
    parts = PurePath(impath).parts
    for start in range(len(parts)):
        key = index.get(parts[start:])
        if key is not None:
            return key
    return None


def load_descriptions(path: str | Path) -> Descriptions:
    """Read a descriptions JSON (see the module docstring); errors name the file and the problem."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DescriptionError(f"cannot read descriptions file {path}: {e}") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DescriptionError(f"{path} is not a descriptions file: it needs \"format\": \"{FORMAT}\" "
                               "(see the format in glad_core/descriptions.py or the README).")
    if raw.get("version") != VERSION:
        raise DescriptionError(f"{path}: version {raw.get('version')!r} is not supported (expected {VERSION}).")
    unknown = sorted(set(raw) - _FILE_KEYS)
    if unknown:
        raise DescriptionError(f"{path}: unknown keys {unknown}; allowed: {sorted(_FILE_KEYS)}.")
    for table in ("images", "classes"):
        if not isinstance(raw.get(table, {}), dict):
            raise DescriptionError(f"{path}: {table!r} must be an object mapping names to texts.")
    return Descriptions(kind=raw.get("kind", "mllm"), name=raw.get("name") or path.stem,
                        images={k: v.strip() if isinstance(v, str) else v for k, v in raw.get("images", {}).items()},
                        classes={k: v.strip() if isinstance(v, str) else v for k, v in raw.get("classes", {}).items()},
                        generator=raw.get("generator"), question=raw.get("question"), source=str(path))


def unicode_description(char: str) -> str:
    """The lower-cased Unicode name(s) of a rendered glyph ("🐟" -> "fish"); joiners and selectors dropped."""
    names = []
    for c in char:
        if unicodedata.category(c) in ("Mn", "Cf") or "EMOJI MODIFIER" in unicodedata.name(c, ""):
            continue  # variation selectors, zero-width joiners, skin tones
        name = unicodedata.name(c, None)
        if name is None:
            raise DescriptionError(f"U+{ord(c):04X} has no name in this Python's Unicode database "
                                   f"({unicodedata.unidata_version}); use a newer Python or another glyph.")
        names.append(name.lower())
    if not names:
        raise DescriptionError(f"{char!r} holds no nameable character.")
    return ", ".join(names)


def unicode_descriptions(chars: Mapping[str, str], name: str = "unicode") -> Descriptions:
    """Descriptions of rendered glyph images: `chars` maps image keys (relative paths) to the character drawn."""
    images = {}
    for key, char in chars.items():
        try:
            images[key] = unicode_description(char)
        except DescriptionError as e:
            raise DescriptionError(f"image {key!r}: {e}") from e
    return Descriptions("human", name, images, generator=f"Unicode {unicodedata.unidata_version} character names",
                        source="unicodedata")


# ----------------------------------------------------------------------------- the Tux Paint stamps' texts


def tuxpaint_descriptions_path() -> Path:
    """Where the `tuxpaint` demo set's descriptions are kept (written with the set, `glad_core.demo_data`)."""
    return demo_root() / DEMO_DATASETS["tuxpaint"].folder / "descriptions" / "tuxpaint.json"


def tuxpaint_descriptions() -> Descriptions:
    """The Tux Paint stamps' human descriptions of the `tuxpaint` demo images (written with the set by
    `python -m glad_core prepare`)."""
    path = tuxpaint_descriptions_path()
    if not path.exists():
        raise DescriptionError(not_built_message("tuxpaint", path))
    return load_descriptions(path)


# ----------------------------------------------------------------------------- WordNet glosses

_MORPHY = (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
           ("men", "man"), ("ies", "y"))  # WordNet's detachment rules for nouns


WORDNET = Package("wordnet-base", "usr/share/wordnet", ".noun")


class WordNet:
    """Per-class glosses: the definition of the first (most frequent) noun sense of the class name.

    A class name is looked up as written (lower case, spaces as "_"), then with hyphens as "_" or
    dropped, then in singular form (WordNet's noun suffix rules), then by its last word (the head
    noun: "ankle boot" -> "boot"); a name with no entry keeps itself as its text. `wnids` maps class
    names to ImageNet ids ("n01440764"), whose synset is then used exactly. Quoted usage examples
    are left out of the gloss. `info()["fallbacks"]` lists every class not found as written.
    """

    kind = "class"

    def __init__(self, wnids: Mapping[str, str] | None = None, folder: str | Path | None = None):
        self.wnids = dict(wnids or {})
        self._folder = Path(folder) if folder else None
        self._index: dict[str, str] | None = None
        self.fallbacks: dict[str, str | None] = {}
        self.name = "wordnet-3.0"

    @property
    def folder(self) -> Path:
        """The folder holding `index.noun` and `data.noun` (fetched from `wordnet-base` if needed)."""
        if self._folder is None:
            self._folder = content_dir(WORDNET)
        return self._folder

    def _first_sense(self) -> dict[str, str]:
        """lemma -> offset of its first noun synset, from `index.noun`."""
        if self._index is None:
            index = {}
            with open(self.folder / "index.noun", encoding="utf-8") as f:
                for line in f:
                    if line.startswith(" "):
                        continue  # licence header
                    fields = line.split()
                    index[fields[0]] = fields[-int(fields[2])]
            self._index = index
        return self._index

    def _gloss(self, offset: str) -> str:
        with open(self.folder / "data.noun", "rb") as f:
            f.seek(int(offset))
            line = f.readline().decode("utf-8")
        if not line.startswith(offset.zfill(8)) or " | " not in line:
            raise DescriptionError(f"WordNet synset {offset} not found in {self.folder / 'data.noun'}.")
        gloss = line.split(" | ", 1)[1].strip()
        return gloss.split('; "')[0].strip() or gloss

    def lookup(self, classname: str) -> tuple[str | None, str | None]:
        """(lemma found, its gloss) for `classname`, or (None, None)."""
        if classname in self.wnids:
            return self.wnids[classname], self._gloss(self.wnids[classname].lstrip("n"))
        index = self._first_sense()
        for lemma in _candidates(classname):
            if lemma in index:
                return lemma, self._gloss(index[lemma])
        return None, None

    def class_texts(self, classnames: Sequence[str]) -> list[str]:
        texts = []
        for c in classnames:
            lemma, gloss = self.lookup(c)
            if lemma != _lemma(c) and c not in self.wnids:
                self.fallbacks[c] = lemma
            texts.append(gloss or c)
        return texts

    def info(self) -> dict:
        return {"kind": self.kind, "name": self.name, "source": "Debian wordnet-base (WordNet 3.0), data.noun",
                "wnids": len(self.wnids), "fallbacks": dict(self.fallbacks)}


def _lemma(name: str) -> str:
    return "_".join(name.strip().lower().replace("_", " ").split())


def _candidates(classname: str) -> list[str]:
    """Lemmas to try, in order: as written, hyphen variants, singular forms, then the same for the last word."""
    def forms(lemma: str) -> list[str]:
        base = [lemma, lemma.replace("-", "_"), lemma.replace("-", "")]
        return base + [b[: -len(old)] + new for b in base for old, new in _MORPHY if b.endswith(old)]

    lemma = _lemma(classname)
    head = lemma.replace("-", "_").split("_")[-1]
    seen: dict[str, None] = {}
    for cand in forms(lemma) + forms(head):
        if cand:
            seen.setdefault(cand, None)
    return list(seen)


# ----------------------------------------------------------------------------- retrieval


def retrieve(query: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of `query` [M, D], the index of the most cosine-similar row of `bank` [N, D] and that cosine."""
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1] or len(bank) == 0:
        raise DescriptionError(f"retrieval needs [M, D] queries and a non-empty [N, D] bank; got "
                               f"{tuple(query.shape)} and {tuple(bank.shape)}.")
    b = F.normalize(bank.float(), dim=-1)
    best = [(F.normalize(q.float(), dim=-1) @ b.T).max(dim=-1) for q in query.split(chunk)]
    return torch.cat([r.indices for r in best]), torch.cat([r.values for r in best])


@torch.no_grad()
def frozen_image_features(method, items: Sequence[Datum], transform: Callable, batch_size: int = 64,
                          progress: bool = False) -> torch.Tensor:
    """Normalised image features [N, D] of `items` under the frozen model (a method's `zero_shot()`)."""
    with method.zero_shot():
        return frozen_features(method, items, transform, batch_size, progress=progress, desc="describe")[0]


# ----------------------------------------------------------------------------- the provider


class ClassTexts(Protocol):
    kind: str
    name: str

    def class_texts(self, classnames: Sequence[str]) -> list[str]: ...

    def info(self) -> dict: ...


class DescriptionProvider:
    """Which description every training and test image gets, and the per-class texts.

    `images`: a per-image source (or None: class texts only); `classes`: per-class texts (WordNet,
    or a JSON with a "classes" table; default: the `images` source's own "classes"). `test` says what
    test (and validation) images get: "images" (the source's own texts: the default for MLLM
    sources, an oracle for human ones), "retrieval" (the default for human sources: the text of the
    nearest training image, after `index(train_items, features)`), or "class" (the default for class
    texts alone: the class text of the class the frozen zero-shot model predicts for the image,
    `predicted`, so no test label is read). Training images get their own per-image text, or, with
    class texts alone, the class text of their own (known) label.
    """

    def __init__(self, images: Descriptions | None = None, classes: ClassTexts | None = None,
                 test: str | None = None, oracle: bool = False):
        if images is None and classes is None:
            raise DescriptionError("a description provider needs per-image descriptions, class texts, or both.")
        if images is not None and images.kind == "class":
            classes, images = classes or images, None
        if test is None:
            test = "images" if images is not None and (oracle or images.kind == "mllm") else \
                "retrieval" if images is not None else "class"
        if test not in TEST_MODES:
            raise DescriptionError(f"test={test!r} is not one of {', '.join(TEST_MODES)}.")
        if images is None and test != "class":
            raise DescriptionError(f"test={test!r} needs per-image descriptions; with class texts only use test='class'.")
        if oracle and test != "images":
            raise DescriptionError(f"oracle=True gives test images their own descriptions; it contradicts test={test!r}.")
        if test == "images" and images.kind == "human" and not oracle:
            raise DescriptionError(
                f"{images.name!r} holds human descriptions, which name the object: giving them to test images is an "
                "oracle. Pass oracle=True for that upper bound (it is recorded), or test='retrieval' or 'class'.")
        if test == "class" and classes is None and not (images is not None and images.classes):
            raise DescriptionError("test='class' needs class texts: pass classes=WordNet() or a JSON with 'classes'.")
        self.images, self.classes, self.test, self.oracle = images, classes, test, oracle
        self._bank: tuple[list[str], torch.Tensor] | None = None

    @property
    def kind(self) -> str:
        """How test images are described (what test accuracy depends on): one of `KINDS`."""
        if self.oracle:
            return "oracle"
        return {"images": self.images.kind if self.images else "class", "retrieval": "retrieval", "class": "class"}[self.test]

    @property
    def name(self) -> str:
        source = self.images if self.images is not None else self.classes
        return f"{source.name}/{self.kind}"

    def index(self, train_items: Sequence[Datum], features: torch.Tensor) -> "DescriptionProvider":
        """Remember the training images' texts and frozen features [N, D] for retrieval; returns self."""
        if len(train_items) != len(features):
            raise DescriptionError(f"{len(train_items)} training items but {len(features)} feature rows.")
        self._bank = (self.image_texts(train_items, "train"), features)
        return self

    def image_texts(self, items: Sequence[Datum], split: str, features: torch.Tensor | None = None,
                    predicted: Sequence[str] | None = None) -> list[str]:
        """One text per item.

        `split` is "train" (training images) or "test" (any image evaluated: test or validation);
        retrieval needs the items' frozen `features` [M, D]; test mode "class" the class name the
        frozen zero-shot model predicts for each item (`predicted`), never its label.
        """
        if split not in ("train", "test"):
            raise DescriptionError(f"split must be 'train' or 'test', not {split!r}.")
        if split == "test" and self.test == "class":
            if predicted is None or len(predicted) != len(items):
                raise DescriptionError(f"test='class' describes each test image by the class text of the frozen "
                                       f"zero-shot model's prediction: pass predicted=[one class name per item] "
                                       f"({len(items)} items).")
            return self.class_texts(predicted)
        if self.images is None:
            return self.class_texts([d.classname for d in items])  # training labels are known
        if split == "train" or self.test == "images":
            return self.images.image_texts(items)
        if self._bank is None:
            raise DescriptionError("test='retrieval': call provider.index(train_items, train_features) first.")
        if features is None or len(features) != len(items):
            raise DescriptionError(f"test='retrieval' needs one feature row per test item ({len(items)}).")
        texts, bank = self._bank
        nearest, _ = retrieve(features, bank.to(features.device))
        return [texts[i] for i in nearest.tolist()]

    def class_texts(self, classnames: Sequence[str]) -> list[str]:
        """One text per class name (from `classes`, else the per-image source's 'classes' table)."""
        if self.classes is not None:
            return self.classes.class_texts(classnames)
        if self.images is not None and self.images.classes:
            return self.images.class_texts(classnames)
        raise DescriptionError(f"provider {self.name!r} has no class texts: pass classes=WordNet() or a JSON "
                               "with a 'classes' table.")

    def describe(self) -> dict:
        """What a results record stores: kind, name, the oracle switch, and each source."""
        test = {"kind": self.kind, "mode": self.test, "from": {
            "images": "the image's own description", "class": "the class text of the frozen zero-shot model's "
            "prediction (no test label is read)", "retrieval": "the description of the nearest training image "
            "(cosine, frozen image features)"}[self.test]}
        train = self.images.info() if self.images is not None else {
            "kind": "class", "from": "the class text of the image's own label"}
        return {"kind": self.kind, "name": self.name, "oracle": self.oracle, "train": train, "test": test,
                "classes": self.classes.info() if self.classes is not None else None}


def make_provider(images: str | None = None, classes: str | None = None, test: str | None = None,
                  oracle: bool = False) -> DescriptionProvider:
    """A provider from parameter values: `images` = "tuxpaint" or a descriptions JSON path; `classes` =
    "wordnet" or a JSON path; `test` and `oracle` as in `DescriptionProvider`."""
    per_image = None if images is None else tuxpaint_descriptions() if images == "tuxpaint" else load_descriptions(images)
    per_class = None if classes is None else WordNet() if classes == "wordnet" else load_descriptions(classes)
    return DescriptionProvider(per_image, per_class, test=test, oracle=oracle)
