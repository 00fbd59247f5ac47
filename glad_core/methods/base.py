"""The contract every method fulfils, and the registry of methods by name.

A method wraps a backbone (an open_clip model) and says:

- what it trains: every parameter with `requires_grad` (`trainable`), saved and loaded by name
  (`trained_state`, `save_trained`, `load_trained`);
- how it scores: `encode_image` (normalised [B, D]), `class_features` ([C, D], or [B, C, D] for a
  method whose class embeddings depend on the image, `per_image = True`) and `logits` ([B, C]);
- how to turn every trained part off (`zero_shot()`, a context manager): the KL target of the loss
  and the zero-shot reference are computed inside it, so no learned part leaks into them;
- its loss (`loss`, by default CE + λ·KL to the zero-shot model) and its step ("none", "sam" or
  "gradreg", `glad_core.gradreg`); its optimizer and schedule (`optimizer`, `scheduler`, stepped per step
  or, when `lr_per_epoch`, per epoch) and whether the last incomplete batch is dropped (`drop_last`);
- `fit`, only when it trains in stages of its own (the default is `glad_core.train.train`'s loop);
- optionally, `use_items` (told each batch's `Datum` items before scoring it, for methods conditioned on
  per-image data such as descriptions) and `record_info` (extra facts for the results record).

A method declares its own hyper-parameters (`hparams`: name -> `Hparam`) and the shared knobs it sets
differently from `TrainConfig` (`defaults`). `register` makes it a name for parameter files, the
report and the published tables:

    @register("mymethod", published="MyMethod")
    class MyMethod(Method): ...
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..encode import class_text_features
from ..io import atomic_path
from ..lora import merge_lora, unmerge_lora

if TYPE_CHECKING:
    from ..train import TrainConfig, TrainResult

Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Hparam:
    """A method's own hyper-parameter: default value, an optional check (None = valid, else why not), doc."""

    default: Any
    doc: str
    check: Check | None = None


@dataclass(frozen=True)
class MethodInfo:
    """A registered name: its class, the options it passes to it, and how the report shows it."""

    name: str
    cls: type["Method"]
    options: dict[str, Any] = field(default_factory=dict)
    row: str | None = None         # the ablation row of the GLAD paper's Table 4, if any
    published: str | None = None   # its method name in glad_core/published/ tables, if any
    doc: str = ""

    @property
    def hparams(self) -> dict[str, Hparam]:
        return self.cls.hparams

    @property
    def trains(self) -> bool:
        return self.cls.trains

    @property
    def defaults(self) -> dict[str, Any]:
        return {**self.cls.defaults, **self.options.get("defaults", {})}


REGISTRY: dict[str, MethodInfo] = {}


def register(name: str, row: str | None = None, published: str | None = None, **options: Any):
    """Class decorator: register `cls` under `name` (several names may share one class with `options`)."""
    def add(cls: type[Method]) -> type[Method]:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is registered twice ({REGISTRY[name].cls.__name__}, {cls.__name__})")
        REGISTRY[name] = MethodInfo(name, cls, options, row, published, (cls.__doc__ or "").strip().split("\n")[0])
        return cls
    return add


def method_info(name: str) -> MethodInfo:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; allowed: {list(REGISTRY)}")
    return REGISTRY[name]


def check_hparams(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """`given` with the method's defaults filled in; an unknown name or failed check raises ValueError."""
    declared = method_info(name).hparams
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ValueError(f"method {name!r} has no hyper-parameter {unknown}; its own are {sorted(declared)}")
    out = {k: given.get(k, h.default) for k, h in declared.items()}
    for k, v in out.items():
        why = declared[k].check(v) if declared[k].check is not None else None
        if why:
            raise ValueError(f"hyper-parameter {k!r} = {v!r} of method {name!r} is invalid: {why}")
    return out


class Method(nn.Module):
    """Base of every method: a frozen backbone scored with cosine logits (this alone is zero-shot CLIP)."""

    hparams: ClassVar[dict[str, Hparam]] = {}
    defaults: ClassVar[dict[str, Any]] = {}
    per_image: ClassVar[bool] = False  # class_features depend on the image features
    trains: ClassVar[bool] = True      # False: nothing to train (no record of training, no landscape)
    builds_in_fit: ClassVar[bool] = False  # True: `fit` builds what scoring needs (experts, a description
                                           # index), so a saved state alone is not reused: the cell fits
    step: str = "none"                 # "none" | "sam" | "gradreg"

    def __init__(self, clip: nn.Module, tokenizer: Callable, cfg: "TrainConfig"):
        super().__init__()
        self.clip, self.tokenizer, self.cfg = clip, tokenizer, cfg
        self.hp = cfg.hparams
        clip.requires_grad_(False)

    # --- what it trains ------------------------------------------------------------------------
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def text_trained(self) -> bool:
        """Whether `class_features` depends on trained parameters (else it is computed once per run)."""
        return False

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors by name: exactly what `save_trained` writes."""
        return {k: p.detach().cpu().contiguous() for k, p in self.named_parameters() if p.requires_grad}

    # --- how it scores -------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The model's own dtype (float32; float64 in numerical checks): features are cast to it after autocast."""
        return self.clip.logit_scale.dtype

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image features [B, D] in the model's dtype."""
        return F.normalize(self.clip.encode_image(images).to(self.dtype), dim=-1)

    def prompt_features(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Normalised features [C, D] of the hand-written prompts (templates averaged), through the text tower."""
        return class_text_features(self.clip, self.tokenizer, classnames, templates, self.logit_scale.device).to(self.dtype)

    def class_features(self, classnames: Sequence[str], templates: Sequence[str],
                       image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Class embeddings: [C, D], or [B, C, D] for a per-image method given `image_features` [B, D]."""
        return self.prompt_features(classnames, templates)

    def logits(self, image_features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[B, C] cosine logits from [B, D] image features and [C, D] or [B, C, D] class embeddings."""
        if text.dim() == 3:
            return self.logit_scale * torch.einsum("bd,bcd->bc", image_features, text)
        return self.logit_scale * image_features @ text.t()

    @contextmanager
    def zero_shot(self) -> Iterator[None]:
        """Every trained part off: the frozen backbone with hand-written prompts."""
        yield

    @contextmanager
    def inference(self) -> Iterator[None]:
        """Evaluation: LoRA folded into the weights (when there is any), restored afterwards."""
        merge_lora(self.clip)
        try:
            yield
        finally:
            unmerge_lora(self.clip)

    def use_items(self, items: Sequence, split: str) -> None:
        """The `Datum` items of the batch scored next, in batch order, before its `encode_image`: `split` is
        "train" (the training loop) or "test" (`evaluate`). Default: ignored; a method conditioned on
        per-image data other than pixels (MuGCP's descriptions) keeps them for its `class_features`."""

    def record_info(self) -> dict[str, Any]:
        """Facts about how this run's numbers were obtained, added to its results record (default: none)."""
        return {}

    # --- how it trains -------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, labels: torch.Tensor, log_p_zs: torch.Tensor | None,
             text: torch.Tensor | None = None, zs_text: torch.Tensor | None = None) -> torch.Tensor:
        """CE(logits, y) + λ·KL(p_zero-shot ‖ p), λ = `cfg.kl_weight` (`text`: the batch's class embeddings,
        `zs_text`: the zero-shot ones, [C, D], for methods whose loss uses them)."""
        return tuning_loss(logits, labels, log_p_zs, self.cfg.kl_weight)

    def optimizer(self, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
        """AdamW at `cfg.lr` with `cfg.weight_decay`."""
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        """Cosine from `cfg.lr` over all steps (`total_steps` counts epochs when `lr_per_epoch`)."""
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    @property
    def lr_per_epoch(self) -> bool:
        """Whether the training loop steps `scheduler` once per epoch (Dassl's trainers) instead of per step."""
        return False

    @property
    def drop_last(self) -> bool:
        """Whether the loop drops the last incomplete batch of an epoch when the set holds a full one (Dassl)."""
        return False

    def fit(self, items: Sequence, classnames: Sequence[str], templates: Sequence[str],
            checkpoint: str | Path | None = None, progress: bool = True) -> "TrainResult":
        """Train on `items`: the shared loop of `glad_core.train.train`; a method with stages overrides it."""
        from ..train import train

        return train(self, items, classnames, templates, checkpoint=checkpoint, progress=progress)


def tuning_loss(logits: torch.Tensor, labels: torch.Tensor, log_p_zs: torch.Tensor | None,
                kl_weight: float) -> torch.Tensor:
    """CE(logits, y) + λ · KL(p_zs ‖ softmax(logits)), λ = `kl_weight`: the loss of section 3 per batch."""
    loss = F.cross_entropy(logits, labels)
    if kl_weight > 0:
        loss = loss + kl_weight * F.kl_div(F.log_softmax(logits, dim=-1), log_p_zs, log_target=True,
                                           reduction="batchmean")
    return loss


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, warmup_lr: float,
                  min_lr: float = 0.0, period: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant `warmup_lr` for `warmup_steps`, then cosine from the optimizer's lr towards `min_lr` over
    `period` steps (default: the rest, so it ends at `min_lr`). Dassl's ConstantWarmupScheduler around
    CosineAnnealingLR(T_max = epochs) with WARMUP_RECOUNT restarts the cosine after the warm-up:
    `period = total_steps`, so the last step's lr stays above `min_lr`."""
    base = optimizer.param_groups[0]["lr"]
    period = total_steps - warmup_steps if period is None else period

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_lr / base
        t = (step - warmup_steps) / max(1, period)
        return (min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))) / base
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_trained(method: Method, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the method's trained tensors to a safetensors file atomically, with its name in the metadata."""
    from safetensors.torch import save_file

    from ..lora import lora_layers

    if any(m.merged for m in lora_layers(method.clip)):
        raise RuntimeError("unmerge_lora(method.clip) before saving: merged weights hide the adapters.")
    with atomic_path(path) as tmp:
        save_file(method.trained_state(), str(tmp), metadata={"method": method.cfg.method, **(metadata or {})})
    return Path(path)


def load_trained(method: Method, path: str | Path) -> None:
    """Load tensors written by `save_trained`; a file of another method or shape is a clear error."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        saved_by = (f.metadata() or {}).get("method")
    tensors = load_file(str(path))
    expected = method.trained_state()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or reshaped:
        raise ValueError(f"{path} (saved by method {saved_by!r}) does not match method {method.cfg.method!r}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, other shape {reshaped[:5]}. Build the "
                         "method with the same name and hyper-parameters as at training time.")
    method.load_state_dict(tensors, strict=False)
