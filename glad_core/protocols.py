"""The paper's evaluation protocols, one cell at a time, each cell writing a results record.

- base_to_novel: few-shot train on the base half of a dataset's classes, test on base and novel.
- cross_dataset: few-shot train on a source (ImageNet in the paper) over all classes, test on
  other datasets.
- domain_generalization: the same source model tested on shifted versions of the source.
- multi_source_dg: leave one domain of a multi-domain set out (`glad_core.domains`), train on the
  others' few-shot pools, test on the held-out one (`targets` = [that domain]).

A cell is (protocol, dataset, method, seed, shots, backbone) plus training parameters. Its record
(JSON) holds every parameter, metrics with their 95% bootstrap intervals and the per-image
correctness they come from (`glad_core.stats`), per-class accuracy, the training budget (steps,
images seen, trained parameters, seconds), timings, versions, device, git commit and the adapter
path. Records are written atomically, and a cell whose record exists is done.
Cross-dataset and domain-generalization cells with the same source and training parameters share
one trained adapter.
"""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__, stats
from .data import Splits
from .io import write_json
from .methods import Method, build, load_trained, save_trained
from .methods.base import NOT_IDENTITY
from .stats import harmonic_mean
from .config import TrainConfig
from .feature_cache import FeatureCache
from .runtime import image_features, resolve_device, set_seed
from .train import TrainResult, evaluate

PROTOCOLS = ("base_to_novel", "cross_dataset", "domain_generalization", "multi_source_dg")
TARGET_PARTS = ("test", "all")  # multi_source_dg: the held-out domain's test part, or all its images
PAPER_TARGETS = {
    "cross_dataset": ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
                      "sun397", "dtd", "eurosat", "ucf101"],
    "domain_generalization": ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"],
}


@dataclass
class Cell:
    """One unit of work: a protocol on one dataset (or source) with one method, seed and backbone."""

    protocol: str
    dataset: str
    train: TrainConfig = field(default_factory=TrainConfig)
    shots: int = 16
    backbone: str = "ViT-B-16"
    pretrained: str | None = "openai"
    targets: list[str] = field(default_factory=list)
    data_root: str | None = None
    results_dir: str = "results"
    target_part: str = "test"  # multi_source_dg only
    feature_cache: bool = True  # keep frozen image features under <results_dir>/feature_cache (not the numbers)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; allowed: {list(PROTOCOLS)}")
        if self.protocol == "multi_source_dg" and (len(self.targets) != 1 or self.target_part not in TARGET_PARTS):
            raise ValueError(f"multi_source_dg holds out one domain (targets = [domain], got {self.targets}) and tests "
                             f"on target_part in {list(TARGET_PARTS)} (got {self.target_part!r})")
        if self.protocol != "base_to_novel" and not self.targets:
            raise ValueError(f"protocol {self.protocol} needs targets (datasets to evaluate the source model on)")

    @property
    def name(self) -> str:
        """`shots{K}_seed{S}_{digest}`: the digest is of every parameter that changes the result."""
        return f"shots{self.shots}_seed{self.train.seed}_{_digest(self.identity())}"

    @property
    def record_path(self) -> Path:
        return (Path(self.results_dir) / self.protocol / self.dataset / _slug(self.backbone) / self.train.method
                / f"{self.name}.json")

    def _protocol_params(self) -> dict[str, Any]:
        extra = {"target_part": self.target_part} if self.protocol == "multi_source_dg" else {}
        return {"protocol": self.protocol, "dataset": self.dataset, "targets": self.targets, "shots": self.shots,
                "backbone": self.backbone, "pretrained": self.pretrained, "data_root": self.data_root, **extra}

    def params(self) -> dict[str, Any]:
        """The protocol's parameters and what the method reads (`TrainConfig.to_dict`)."""
        return {**self._protocol_params(), **self.train.to_dict()}

    def identity(self) -> dict[str, Any]:
        """The parameters that change the record's numbers: the protocol's (not where data lives) and what
        the method reads that changes them (`TrainConfig.identity`: not the device, nor the batching of
        evaluation unless its predictions depend on it). A changed value trains anew, an unchanged one
        reuses the record; a knob the method does not read changes nothing."""
        return {**{k: v for k, v in self._protocol_params().items() if k not in NOT_IDENTITY},
                **self.train.identity()}

    def feature_store(self) -> FeatureCache | None:
        """Where a method with frozen image features keeps them (None when `feature_cache` is off)."""
        return FeatureCache(Path(self.results_dir) / "feature_cache") if self.feature_cache else None

    def adapter_path(self) -> Path:
        """Where the trained state goes; transfer protocols key it by everything training depends on, so
        cross-dataset and domain-generalization cells of the same source and training share it
        (base-to-novel and leave-one-domain-out cells each train their own: beside the record)."""
        if self.protocol in ("base_to_novel", "multi_source_dg"):
            return self.record_path.with_suffix(".safetensors")
        training = {k: v for k, v in self.identity().items() if k not in ("protocol", "targets")}
        return (Path(self.results_dir) / "adapters" / self.dataset / _slug(self.backbone) / self.train.method
                / f"shots{self.shots}_seed{self.train.seed}_{_digest(training)}.safetensors")


def _digest(params: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _slug(s: str) -> str:
    return s.replace("/", "_").replace(":", "_")


def environment() -> dict[str, Any]:
    """Library versions, device and git commit for the record."""
    import open_clip

    versions = {"glad_core": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "open_clip": open_clip.__version__}
    for mod in ("timm", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"versions": versions, "device": device, "threads": torch.get_num_threads(), "git_commit": commit,
            "git_dirty": dirty}


def train_budget(result: TrainResult | None) -> dict[str, Any]:
    """A fit's budget (`TrainResult`; zeros when nothing was trained): optimizer steps, images seen,
    trained parameters, seconds."""
    result = result or TrainResult()
    return {"steps": result.steps, "images_seen": result.images_seen, "parameters": result.parameters,
            "seconds": result.seconds}


def adapter_budget(adapter: Path) -> dict[str, Any]:
    """The budget of the fit that wrote a reused adapter (its metadata; None where an older file has none)."""
    from safetensors import safe_open

    with safe_open(str(adapter), "pt") as f:
        saved = (f.metadata() or {}).get("budget")
    return json.loads(saved) if saved else dict.fromkeys(train_budget(None))


def _scored(scores: dict[str, tuple[dict, list]], summary: Callable[[dict], dict]) -> dict[str, Any]:
    """The record's results of its evaluated splits (`evaluate`'s result and the test items, by split):
    accuracies with their `summary` (HM or average), per-class accuracy, test sizes, and the evidence
    of `glad_core.stats`: per-image correctness, the test lists' digests, 95% bootstrap intervals of
    every metric (the summary's from the same draws) and the bootstrap's seed and draws."""
    correct = {k: r["correct"] for k, (r, _) in scores.items()}
    tests = {k: stats.items_digest(items) for k, (_, items) in scores.items()}
    draws = summary({k: stats.resampled_accuracy(correct[k], tests[k]) for k in scores})
    return {"metrics": summary({k: r["acc"] for k, (r, _) in scores.items()}),
            "intervals": {k: list(stats.interval(v)) for k, v in draws.items()},
            "per_class": {k: r["per_class"] for k, (r, _) in scores.items()},
            "test_sizes": {k: r["n"] for k, (r, _) in scores.items()},
            "test_items": tests,
            "correct": {k: stats.pack(c) for k, c in correct.items()},
            "bootstrap": {"seed": stats.SEED, "draws": stats.DRAWS, "level": stats.LEVEL}}


def _load(name: str, cell: Cell) -> Splits:
    from .datasets import load_dataset
    return load_dataset(name, cell.data_root)


def method_section(method: Method, tests: dict[str, list], transform) -> dict[str, Any]:
    """The record's `method` section: its `record_info()` as `info`, and its `extra_metrics` of each test
    split as `metrics` (one more encoding pass per split, only for a method that has extra metrics)."""
    hook, metrics = method.extra_metrics(), {}
    if hook is not None:
        cfg = method.cfg
        with method.inference():
            for key, items in tests.items():
                f, y = image_features(method, items, transform, cfg.eval_batch_size, cfg.num_workers, progress=False)
                metrics[key] = hook(f, y)
    return {"info": method.record_info(), "metrics": metrics}


def run_cell(cell: Cell, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train and evaluate one cell; write and return its record. An existing record is returned as is."""
    from .datasets import fewshot, subsample_classes
    from .models import load_backbone

    path = cell.record_path
    if path.exists() and not overwrite:
        return json.loads(path.read_text())
    if cell.protocol == "multi_source_dg":
        return run_multi_source_cell(cell, progress)
    t_start = time.perf_counter()
    cfg = cell.train
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    clip, preprocess, tokenizer = load_backbone(cell.backbone, cell.pretrained, device=device)
    method = build(clip, tokenizer, cfg).to(device)
    method.feature_cache = cell.feature_store()

    source = fewshot(_load(cell.dataset, cell), cell.shots, cfg.seed)
    train_split = subsample_classes(source, "base") if cell.protocol == "base_to_novel" else source
    adapter = cell.adapter_path()
    checkpoint = adapter.with_suffix(".ckpt")
    reused = (cell.protocol != "base_to_novel" and bool(method.trainable()) and adapter.exists()
              and not method.builds_in_fit)
    history = None
    if reused:  # the budget of the fit that wrote the adapter; its history is in that cell's record
        load_trained(method, adapter)
        budget = adapter_budget(adapter)
    elif method.trainable():
        adapter.parent.mkdir(parents=True, exist_ok=True)
        history = method.fit(train_split.train, train_split.classnames, train_split.templates,
                             checkpoint=checkpoint, progress=progress)
        budget = train_budget(history)
        save_trained(method, adapter, metadata={"backbone": cell.backbone, "budget": json.dumps(budget)})
        checkpoint.unlink(missing_ok=True)
    else:
        budget = train_budget(None)
    t_train = time.perf_counter() - t_start

    if cell.protocol == "base_to_novel":
        evals = {sub: subsample_classes(source, sub) for sub in ("base", "novel")}
    else:
        evals = {cell.dataset: source, **{t: _load(t, cell) for t in cell.targets}}
    scores = {key: (evaluate(method, split.test, split.classnames, split.templates, preprocess, progress=progress,
                             desc=f"eval {key}"), split.test) for key, split in evals.items()}

    def summary(acc: dict[str, Any]) -> dict[str, Any]:
        """The evaluated splits' accuracies (numbers or bootstrap draws) and their summary: HM, or the targets' mean."""
        if cell.protocol == "base_to_novel":
            return {**acc, "hm": harmonic_mean(acc["base"], acc["novel"])}
        return {**acc, "average": sum(acc[t] for t in cell.targets) / len(cell.targets)}

    section = method_section(method, {key: split.test for key, split in evals.items()}, preprocess)

    record = {
        "cell": {"protocol": cell.protocol, "dataset": cell.dataset, "method": cfg.method, "seed": cfg.seed,
                 "shots": cell.shots, "backbone": cell.backbone},
        "params": cell.params(),
        "identity": cell.identity(),
        **_scored(scores, summary),
        "method": section,
        "train": {"classes": train_split.num_classes, "images": len(train_split.train),
                  "history": history.history if history else [], **budget, "reused_adapter": reused},
        "timings": {"train_s": t_train, "eval_s": time.perf_counter() - t_start - t_train,
                    "total_s": time.perf_counter() - t_start},
        **environment(),
        "device_type": device.type,
        "adapter": str(adapter) if method.trainable() else None,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(path, record)
    return record


def run_multi_source_cell(cell: Cell, progress: bool = True) -> dict[str, Any]:
    """Leave-one-domain-out: few-shot pools of every other domain (train, and val for methods that take
    it), the held-out domain tested; writes and returns the record (GuiDG's guided methods add their
    guidance to `method.metrics`: accuracy with batch-averaged and per-image attention, each expert's
    accuracy, the mean weights)."""
    from .datasets import DatasetError
    from .domains import fewshot_pools, load_domains
    from .models import load_backbone

    t_start = time.perf_counter()
    cfg, held = cell.train, cell.targets[0]
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    md = load_domains(cell.dataset, cell.data_root)
    if held not in md.held_out_choices:
        raise DatasetError(f"{cell.dataset}: cannot hold out {held!r}; choose from {md.held_out_choices}.")
    md = fewshot_pools(md, cell.shots, cfg.seed, domains=[d for d in md.domain_names if d != held])
    sources, target = md.leave_one_out(held, cell.target_part)
    train_items = [d for s in sources.values() for d in s.train]
    val_items = [d for s in sources.values() for d in s.val]
    if any(d.domain == held for d in train_items + val_items):
        raise AssertionError(f"held-out domain {held!r} leaked into the training data")
    clip, preprocess, tokenizer = load_backbone(cell.backbone, cell.pretrained, device=device)
    method = build(clip, tokenizer, cfg).to(device)
    method.feature_cache = cell.feature_store()
    adapter = cell.adapter_path()
    history = None
    if method.trainable():
        history = method.fit(train_items, md.classnames, md.templates, val_items=val_items, progress=progress)
        adapter.parent.mkdir(parents=True, exist_ok=True)
        save_trained(method, adapter, metadata={"backbone": cell.backbone, "budget": json.dumps(train_budget(history))})
    t_train = time.perf_counter() - t_start

    r = evaluate(method, target.test, md.classnames, md.templates, preprocess, progress=progress, desc=f"eval {held}")
    record = {
        "cell": {"protocol": cell.protocol, "dataset": cell.dataset, "method": cfg.method, "seed": cfg.seed,
                 "shots": cell.shots, "backbone": cell.backbone},
        "params": cell.params(),
        "identity": cell.identity(),
        **_scored({held: (r, target.test)}, dict),
        "method": method_section(method, {held: target.test}, preprocess),
        "train": {"sources": list(sources), "classes": len(md.classnames), "images": len(train_items),
                  "val_images": len(val_items), "history": history.history if history else [],
                  **train_budget(history)},
        "timings": {"train_s": t_train, "eval_s": time.perf_counter() - t_start - t_train,
                    "total_s": time.perf_counter() - t_start},
        **environment(),
        "device_type": device.type,
        "adapter": str(adapter) if method.trainable() else None,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(cell.record_path, record)
    return record
