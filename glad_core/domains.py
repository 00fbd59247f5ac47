"""Multi-domain datasets for domain generalization: DomainBed's sets, ImageNet-DG and mini-PACS.

A `MultiDomain` is one label set seen in several domains: a `Splits` per domain, every `Datum`
carrying its domain's name. The leave-one-domain-out protocol trains on all domains but one and
tests on the one held out (`MultiDomain.leave_one_out`); ImageNet-DG has a fixed target instead.

DomainBed layout
----------------
PACS, VLCS, OfficeHome, TerraIncognita and DomainNet are read from the folders DomainBed's
download script writes (`python -m domainbed.scripts.download`)::

    <data_root>/PACS/{art_painting,cartoon,photo,sketch}/<class>/<images>

Classes are the sorted class-folder names (labels 0..n-1, as DomainBed's ImageFolder gives them);
every domain must hold the same class folders. Each domain is split per class into 40 % train /
40 % val / 20 % test (GuiDG's few-shot protocol: experts learn from train, the guided fine-tuning
from val, the held-out domain is tested on its test part), seeded (`split_per_class`), and the
split is stored on first use as a CoOp-format file `split_glad_<domain>_seed<S>.json` (paths
relative to the domain folder) beside the domain folders, or in the glad cache when that folder
is read-only. An existing split file wins over the folder, as in CoOp: delete it to split again.
`fewshot_pools` draws K shots per class from train and K from val with Dassl's sampler.

ImageNet-DG (GuiDG)
-------------------
Sources ImageNet (train), ImageNet-Sketch and ImageNetV2; three tasks with targets ImageNet-A,
ImageNet (val) and ImageNet-R, read from the CoOp-layout folders of `glad_core.datasets`. Classes
are matched by WordNet id (the class folder, or for ImageNetV2 the wnid at line y of
classnames.txt for folder y, as CoOp reads it), never by name: CLIP's ImageNet names repeat. Every
source is restricted to the target's classes, relabelled by sorted wnid; each source's images are
split per class 50 / 50 into a train and a val pool (stored as
`imagenet_dg/split_glad_<source>_<task>_seed<S>.json` under the data root, paths relative to it);
the target is tested on all its images.

Single-source DG
----------------
`split_subdomains` deals one source's training images randomly into n sub-domains (GuiDG's
appendix, Algorithm 1, line 4; its code deals ImageNet's training folder into 4), each with a
train and a val pool, so that one expert can be trained per sub-domain.
"""
from __future__ import annotations

import difflib
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Literal, Sequence

from .data import Datum, Splits
from .datasets import (IMAGE_EXTENSIONS, DatasetError, dataset_spec, demo_root, fewshot, list_files, list_subdirs,
                       load_dataset, load_split_file, not_built_message, read_classnames, save_split_file,
                       split_per_class)
from .paths import cache_dir

PHOTO_TEMPLATE = ("a photo of a {}.",)
DOMAINBED_DOC = ("DomainBed's layout <data_root>/<dataset>/<domain>/<class>/<images>, as written by "
                 "python -m domainbed.scripts.download (https://github.com/facebookresearch/DomainBed)")
VAL_FRAC, TEST_FRAC = 0.4, 0.2  # DomainBed sets: 40 % train (the rest) / 40 % val / 20 % test per class


@dataclass(frozen=True)
class DomainSetSpec:
    """A multi-domain set in DomainBed's layout: folder names, domains, class count, templates."""

    name: str
    folders: tuple[str, ...]              # accepted names of <data_root>/<folder>, first = DomainBed's
    domains: tuple[str, ...]
    num_classes: int
    templates: tuple[str, ...] = PHOTO_TEMPLATE
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # other spellings of domain folders
    demo: bool = False


DOMAINBED: dict[str, DomainSetSpec] = {s.name: s for s in (
    DomainSetSpec("pacs", ("PACS", "pacs"), ("art_painting", "cartoon", "photo", "sketch"), 7),
    DomainSetSpec("vlcs", ("VLCS", "vlcs"), ("Caltech101", "LabelMe", "SUN09", "VOC2007"), 5),
    DomainSetSpec("office_home", ("office_home", "OfficeHome", "OfficeHomeDataset_10072016"),
                  ("Art", "Clipart", "Product", "Real_World"), 65, aliases={"Real_World": ("Real World",)}),
    DomainSetSpec("terra_incognita", ("terra_incognita", "TerraIncognita"),
                  ("location_100", "location_38", "location_43", "location_46"), 10),
    DomainSetSpec("domainnet", ("domain_net", "DomainNet", "domainnet"),
                  ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"), 345),
    DomainSetSpec("mini_pacs", ("mini_pacs",), ("photo", "clip_art", "cartoon", "sketch"), 10, demo=True),
)}

IMAGENET_DG_SOURCES = ("imagenet", "imagenet_sketch", "imagenetv2")
# task name -> (target dataset, target domain name)
IMAGENET_DG: dict[str, tuple[str, str]] = {
    "imagenet_dg_a": ("imagenet_a", "imagenet_a"),
    "imagenet_dg_val": ("imagenet", "imagenet_val"),
    "imagenet_dg_r": ("imagenet_r", "imagenet_r"),
}


@dataclass
class MultiDomain:
    """One label set in several domains: a `Splits` per domain (items carry the domain name).

    `target` names the fixed test domain of a set that has one (ImageNet-DG), else None (any
    domain can be held out). `fewshot_dir` is where `fewshot_pools` caches its selections.
    """

    name: str
    classnames: list[str]
    templates: list[str]
    domains: dict[str, Splits]
    target: str | None = None
    fewshot_dir: Path | None = None

    @property
    def domain_names(self) -> list[str]:
        return list(self.domains)

    @property
    def held_out_choices(self) -> list[str]:
        """Domains a leave-one-domain-out run may hold out: the fixed target, or every domain."""
        return [self.target] if self.target else self.domain_names

    def leave_one_out(self, held_out: str,
                      target_part: Literal["test", "all"] = "test") -> tuple[dict[str, Splits], Splits]:
        """(sources, target): every other domain, and `held_out` to test on.

        The target's test list is its test part (`"test"`, GuiDG's DomainBed protocol) or all its
        images (`"all"`: nothing of a held-out domain is trained on, so all of it is unseen).
        """
        if held_out not in self.held_out_choices:
            raise DatasetError(f"{self.name}: cannot hold out {held_out!r}; choose from {self.held_out_choices}.")
        if target_part not in ("test", "all"):
            raise DatasetError(f"target_part must be 'test' or 'all', got {target_part!r}.")
        target = self.domains[held_out]
        if target_part == "all":
            target = target.with_lists(train=[], val=[], test=target.train + target.val + target.test)
        sources = {d: s for d, s in self.domains.items() if d != held_out}
        seen = {d.impath for s in sources.values() for d in s.train + s.val + s.test}
        leaked = [d.impath for d in target.test if d.impath in seen or d.domain != held_out]
        leaked += [d.impath for s in sources.values() for d in s.train + s.val if d.domain == held_out]
        if leaked:
            raise DatasetError(f"{self.name}: {len(leaked)} images of held-out domain {held_out!r} are also in the "
                               f"source domains, e.g. {leaked[:3]}.")
        return sources, target


def domain_set_names() -> list[str]:
    """Names accepted by `load_domains`: DomainBed's sets, mini-PACS and the ImageNet-DG tasks."""
    return [*DOMAINBED, *IMAGENET_DG]


def load_domains(name: str, data_root: str | Path | None = None, split_seed: int = 1) -> MultiDomain:
    """A multi-domain set by name, split (and its split files written) on first use.

    `data_root` holds the DomainBed folders (or CoOp's ImageNet folders for ImageNet-DG); the
    demo set mini-PACS ignores it (it is built in the glad cache by `python -m glad_core prepare`).
    """
    if name in IMAGENET_DG:
        return load_imagenet_dg(name, _require_root(name, data_root, "CoOp's ImageNet folders"), split_seed)
    if name not in DOMAINBED:
        close = difflib.get_close_matches(name, domain_set_names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DatasetError(f"unknown multi-domain set {name!r}.{hint} Valid names: {', '.join(domain_set_names())}.")
    spec = DOMAINBED[name]
    if spec.demo:
        root = demo_root()
        missing = [root / spec.folders[0] / split_file_name(d, split_seed) for d in spec.domains]
        missing = [p for p in missing if not p.is_file()]
        if missing:
            raise DatasetError(not_built_message(name, missing[0]))
    else:
        root = _require_root(name, data_root, f"{spec.folders[0]}/ ({DOMAINBED_DOC})")
    folder = next((root / f for f in spec.folders if (root / f).is_dir()), None)
    if folder is None:
        tried = ", ".join(str(root / f) for f in spec.folders)
        where = f" (the data root {root} itself does not exist)" if not root.is_dir() else ""
        raise DatasetError(f"dataset {name!r} not found: none of {tried} is a folder{where}. Expected "
                           f"{DOMAINBED_DOC}, with domains {', '.join(spec.domains)}. Pass as data root the "
                           f"folder that contains {spec.folders[0]}/.")
    return read_domain_folders(spec, folder, split_seed)


def _require_root(name: str, data_root: str | Path | None, layout: str) -> Path:
    if data_root is None:
        raise DatasetError(f"dataset {name!r} needs a data root: pass --data-root (data_root=...) pointing at the "
                           f"folder that contains {layout}.")
    return Path(os.path.abspath(os.path.expanduser(data_root)))


# ----------------------------------------------------------------------------- DomainBed layout


def split_file_name(domain: str, seed: int) -> str:
    return f"split_glad_{domain}_seed{seed}.json"


def read_domain_folders(spec: DomainSetSpec, folder: Path, split_seed: int = 1) -> MultiDomain:
    """Every domain of `spec` under `folder`, from its split file (written first if missing)."""
    domain_dirs = {d: _domain_dir(spec, folder, d) for d in spec.domains}
    classes = {d: list_subdirs(p) for d, p in domain_dirs.items()}
    classnames = sorted(set().union(*classes.values()))
    for d, found in classes.items():
        if found != classnames or len(classnames) != spec.num_classes:
            raise DatasetError(
                f"{domain_dirs[d]} holds {len(found)} class folders; {spec.name} has {spec.num_classes}, the same "
                f"in every domain ({DOMAINBED_DOC}). All domains together hold {len(classnames)}; missing here: "
                f"{sorted(set(classnames) - set(found))[:10]}.")
    split_dirs = _split_dirs(folder, spec.name)
    domains, used = {}, []
    for d, path in domain_dirs.items():
        fname = split_file_name(d, split_seed)
        existing = _find(split_dirs, fname)
        if existing is None:
            groups = [[Datum(os.path.join(path, c, f), y, c, d) for f in list_files(path / c, IMAGE_EXTENSIONS)]
                      for y, c in enumerate(classnames)]
            train, val, test = split_per_class(groups, VAL_FRAC, TEST_FRAC, split_seed, str(path), min_train=0)
            domains[d] = Splits(f"{spec.name}/{d}", list(classnames), list(spec.templates), train=train, val=val,
                                test=test)
            used.append(_save_first(split_dirs, fname, domains[d], path).parent)
        else:
            domains[d] = load_split_file(existing, path, f"{spec.name}/{d}", spec.templates, classnames=classnames,
                                         domain=d)
            used.append(existing.parent)
    return MultiDomain(spec.name, list(classnames), list(spec.templates), domains,
                       fewshot_dir=used[0] / "split_fewshot")


def _domain_dir(spec: DomainSetSpec, folder: Path, domain: str) -> Path:
    names = (domain, *spec.aliases.get(domain, ()))
    path = next((folder / n for n in names if (folder / n).is_dir()), None)
    if path is None:
        raise DatasetError(f"domain {domain!r} of {spec.name!r} not found: {folder / domain} is not a folder "
                           f"(found {list_subdirs(folder)}). Expected {DOMAINBED_DOC}, with domains "
                           f"{', '.join(spec.domains)}.")
    return path


def _split_dirs(folder: Path, name: str) -> list[Path]:
    """Where split files are looked for and written, best first: beside the data, then the cache."""
    return [folder, cache_dir() / "splits" / name]


def _find(dirs: Sequence[Path], fname: str) -> Path | None:
    return next((d / fname for d in dirs if (d / fname).is_file()), None)


def _save_first(dirs: Sequence[Path], fname: str, splits: Splits, image_dir: Path) -> Path:
    """Write the split file into the first folder that accepts it (atomically)."""
    errors = []
    for d in dirs:
        try:
            return save_split_file(splits, d / fname, image_dir)
        except OSError as e:
            errors.append(f"{d}: {e}")
    raise DatasetError(f"cannot write split file {fname}: {'; '.join(errors)}")


def fewshot_pools(md: MultiDomain, shots: int, seed: int, domains: Iterable[str] | None = None,
                  repeat: bool = False) -> MultiDomain:
    """K shots per class from each domain's train list (experts) and K from its val list (guidance).

    Dassl's sampler on one stream per domain (train first), as GuiDG's dataset classes call it (its
    default `repeat=False`: a class smaller than K keeps all its images; `repeat=True` repeats them);
    selections are cached under `md.fewshot_dir/<domain>/`. Domains without training
    images (a fixed target) and those not in `domains` are kept as they are.
    """
    chosen = set(md.domain_names if domains is None else domains)
    unknown = chosen - set(md.domain_names)
    if unknown:
        raise DatasetError(f"{md.name}: unknown domains {sorted(unknown)}; it has {md.domain_names}.")
    out = {}
    for d, s in md.domains.items():
        if d in chosen and s.train:
            cache = md.fewshot_dir / d if md.fewshot_dir is not None else "auto"
            s = fewshot(s, shots, seed, cache=cache, val_shots=shots, repeat=repeat)
        out[d] = s
    return replace(md, domains=out)


# ----------------------------------------------------------------------------- ImageNet-DG


def _wnid_items(splits: Splits, data_root: Path, part: str) -> list[tuple[str, Datum]]:
    """(wnid, item) for `part` of a CoOp-layout ImageNet set; ImageNetV2's folder y is line y's wnid."""
    items = getattr(splits, part)
    if splits.name == "imagenetv2":
        wnids = list(read_classnames(data_root / dataset_spec("imagenetv2").folder))
        return [(wnids[int(Path(d.impath).parent.name)], d) for d in items]
    return [(Path(d.impath).parent.name, d) for d in items]


def load_imagenet_dg(task: str, data_root: str | Path, split_seed: int = 1) -> MultiDomain:
    """ImageNet-DG task `task` (`IMAGENET_DG`): three source domains and the fixed target domain."""
    if task not in IMAGENET_DG:
        raise DatasetError(f"unknown ImageNet-DG task {task!r}; choose from {', '.join(IMAGENET_DG)}.")
    root = Path(os.path.abspath(os.path.expanduser(data_root)))
    loaded: dict[str, Splits] = {}

    def items(name: str, part: str) -> list[tuple[str, Datum]]:
        if name not in loaded:
            loaded[name] = load_dataset(name, root)
        return _wnid_items(loaded[name], root, part)

    target_name, target_domain = IMAGENET_DG[task]
    target_items = items(target_name, "test")
    wnids = sorted({w for w, _ in target_items})
    label = {w: i for i, w in enumerate(wnids)}
    name_of = {w: d.classname for w, d in target_items}
    classnames = [name_of[w] for w in wnids]
    templates = list(dataset_spec(target_name).templates)
    split_dirs = _split_dirs(root / "imagenet_dg", "imagenet_dg")
    domains, used = {}, []
    for source in IMAGENET_DG_SOURCES:
        fname = f"split_glad_{source}_{task}_seed{split_seed}.json"
        existing = _find(split_dirs, fname)
        sname = f"{task}/{source}"
        if existing is not None:
            domains[source] = load_split_file(existing, root, sname, templates, classnames=classnames, domain=source)
            used.append(existing.parent)
            continue
        groups: list[list[Datum]] = [[] for _ in wnids]
        for w, d in items(source, "train" if source == "imagenet" else "test"):
            if w in label:
                groups[label[w]].append(Datum(d.impath, label[w], name_of[w], source))
        train, val, _ = split_per_class(groups, 0.5, 0.0, split_seed, sname, min_train=0)
        domains[source] = Splits(sname, classnames, templates, train=train, val=val)
        used.append(_save_first(split_dirs, fname, domains[source], root).parent)
    test = [Datum(d.impath, label[w], name_of[w], target_domain) for w, d in target_items]
    domains[target_domain] = Splits(f"{task}/{target_domain}", classnames, templates, test=test)
    return MultiDomain(task, classnames, templates, domains, target=target_domain,
                       fewshot_dir=used[0] / "split_fewshot" / task)


# ----------------------------------------------------------------------------- single-source DG


def split_subdomains(splits: Splits, n: int, seed: int = 1, val_frac: float = 0.5) -> MultiDomain:
    """Deal one source's training images randomly into `n` sub-domains (GuiDG, appendix Algorithm 1).

    Per class, the training items are shuffled with `random.Random(seed)` and cut into n
    consecutive parts whose sizes differ by at most one (the first parts take the remainder), so
    every training image lands in exactly one sub-domain; each part is then split per class into a
    train and a val pool (`val_frac`, GuiDG's 50 / 50, as for ImageNet-DG's sources). The source's
    val and test lists are not used (ImageNet's val list is its test list). Sub-domain i is named
    "<name>_part<i>" (i from 1) and its items carry that domain.
    """
    if n < 1:
        raise DatasetError(f"the number of sub-domains must be >= 1, got {n}.")
    names = [f"{splits.name}_part{i + 1}" for i in range(n)]
    rng = random.Random(seed)
    by_label: dict[int, list[Datum]] = {}
    for d in splits.train:
        by_label.setdefault(d.label, []).append(d)
    parts: list[list[list[Datum]]] = [[] for _ in range(n)]  # sub-domain -> class groups
    for items in by_label.values():
        rng.shuffle(items)
        q, r = divmod(len(items), n)
        start = 0
        for i in range(n):
            size = q + (i < r)
            parts[i].append([replace(d, domain=names[i]) for d in items[start:start + size]])
            start += size
    domains = {}
    for name, groups in zip(names, parts):
        train, val, _ = split_per_class(groups, val_frac, 0.0, seed, name, min_train=0)
        domains[name] = replace(splits, name=name, train=train, val=val, test=[])
    return MultiDomain(f"{splits.name}_split{n}", list(splits.classnames), list(splits.templates), domains)
