"""The contract every method fulfils, the shared training knobs, and the registry of methods by name.

A method wraps a backbone (an open_clip model) and says:

- what it trains: every parameter with `requires_grad` (`trainable`), saved and loaded by name
  (`trained_state`, `save_trained`, `load_trained`);
- how it scores: `encode_image` (normalised [B, D]), `class_features` ([C, D], or [B, C, D] for a
  method whose class embeddings depend on the image, `per_image = True`) and `logits` ([B, C]);
- how to turn every trained part off (`zero_shot()`, a context manager; `switched_off` writes one):
  the KL target of the loss and the zero-shot reference are computed inside it, so no learned part
  leaks into them;
- its loss (`loss`, by default CE + λ·KL to the zero-shot model), its optimizer and schedule
  (`optimizer`, `scheduler`, stepped per step or, when `lr_per_epoch`, per epoch), whether the loop
  drops the last incomplete batch (`drop_last`), and its step rule (the hyper-parameter `step_rule`,
  `STEP_RULE`: "none", "sam" or "gradreg", `glad_core.gradreg`);
- `fit(items, classnames, templates, *, val_items, checkpoint, progress)`: by default the shared loop
  of `glad_core.train.train` (which ignores `val_items`); a method with stages of its own, or one
  that trains on the sources' val pools (GuiDG), overrides it;
- optionally, `use_items` (told each batch's `Datum` items before scoring it, for methods conditioned on
  per-image data such as descriptions), `record_info` (facts about the run) and `extra_metrics` (more
  metrics of a test split): both go into the record's `method` section, never over its `metrics`.

What a method reads is declared, so parameter files, the record's identity and `--explain` know it:
its own hyper-parameters (`hparams`: name -> `Hparam`), the shared knobs (`SHARED`) it reads
(`reads`; rho / alpha / delta count only under a step rule other than "none") and the values it sets
differently from `SHARED` (`defaults`: its published recipe). `register` makes it a name for parameter
files, the report and the published tables:

    @register("mymethod", order=70, published="MyMethod", defaults={"lr": 2e-3})
    class MyMethod(Method): ...
"""
from __future__ import annotations

import dataclasses
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import in_range, one_of
from ..encode import class_text_features
from ..gradreg import MODES
from ..io import atomic_path
from ..lora import merge_lora, unmerge_lora
from ..train import TrainResult, train

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..feature_cache import FeatureCache

Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Hparam:
    """A knob: default value, doc, an optional check (None = valid, else why not), the types it takes
    (None: those of the default: an int, a float or int, a list or tuple, ...), and whether it changes
    the numbers (`identity`: False for where and how fast a run goes, e.g. the device)."""

    default: Any
    doc: str
    check: Check | None = None
    types: tuple[type, ...] | None = None
    identity: bool = True

    def accepted(self) -> tuple[type, ...]:
        """The types a value may have."""
        if self.types is not None:
            return self.types
        d = self.default
        return ((bool,) if isinstance(d, bool) else (list, tuple) if isinstance(d, tuple)
                else (int, float) if isinstance(d, float) else (object,) if d is None else (type(d),))

    def parse(self, value: Any) -> Any:
        """`value` as this knob takes it (YAML's string floats as floats, lists as tuples where the default
        is a tuple); raises ValueError with the reason when it is invalid."""
        types = self.accepted()
        if float in types and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if object not in types and ((isinstance(value, bool) and bool not in types) or not isinstance(value, types)):
            raise ValueError("expected " + "/".join(t.__name__ for t in types) + self._hint(value))
        why = self.check(value) if self.check is not None else None
        if why:
            raise ValueError(why)
        return tuple(value) if isinstance(self.default, tuple) and isinstance(value, list) else value

    def _hint(self, value: Any) -> str:
        """The check's reason for a value of the wrong type, where it can judge one ('' otherwise)."""
        try:
            why = self.check(value) if self.check is not None else None
        except (TypeError, ValueError):
            return ""
        return f" ({why})" if why else ""


#: The one step-rule hyper-parameter of every method that trains (a registered name may fix its default).
STEP_RULE = Hparam("none", "update rule: 'none' (the optimizer's step), 'sam' or 'gradreg' (Algorithm 1; "
                   "rho, alpha, delta)", one_of(MODES))
STEP_KNOBS = ("rho", "alpha", "delta")  # read only under a step rule other than "none"


def _device(v: str) -> str | None:
    ok = re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v)
    return None if ok else "allowed: 'auto', 'cpu', 'cuda', 'cuda:<index>', 'mps'"


def _workers(v: int | str) -> str | None:
    ok = v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
    return None if ok else "allowed: 'auto' or an integer >= 0"


#: The shared training and evaluation knobs: the value a method gets when neither its registered defaults
#: (its recipe) nor the caller set one.
SHARED: dict[str, Hparam] = {
    "epochs": Hparam(20, "training epochs", in_range(1)),
    "batch_size": Hparam(32, "training images per step", in_range(1)),
    "lr": Hparam(1e-3, "learning rate (the schedule's peak)", in_range(0, lo_open=True)),
    "weight_decay": Hparam(0.01, "the optimizer's weight decay", in_range(0)),
    "kl_weight": Hparam(0.0, "λ of the KL term to the zero-shot model; 0 = cross-entropy only", in_range(0)),
    "rho": Hparam(0.1, "ρ, radius of the ascent step (step_rule sam / gradreg)", in_range(0)),
    "alpha": Hparam(0.5, "α, weight of the regularized gradient in g_f (step_rule gradreg)", in_range(0, 1)),
    "delta": Hparam(1e-12, "δ, guards the projection's division (step_rule gradreg)", in_range(0)),
    "aug_scale_min": Hparam(0.5, "RandomResizedCrop scale range (aug_scale_min, 1)", in_range(0, 1, lo_open=True)),
    "aug_flip": Hparam(False, "random horizontal flip of training images"),
    "device": Hparam("auto", "'auto' = cuda if available, else cpu", _device, identity=False),
    "precision": Hparam("auto", "'auto' = bf16 autocast on CUDA, fp32 on CPU; or 'fp32' / 'bf16'",
                        one_of(("auto", "fp32", "bf16"))),
    "num_workers": Hparam("auto", "data loader worker processes; 'auto' = 0 on CPU, on CUDA one per available core "
                          "but one (at most 8), with pinned memory (glad_core.runtime.worker_count)", _workers,
                          types=(int, str), identity=False),
    "eval_batch_size": Hparam(64, "images per evaluation batch", in_range(1), identity=False),
}
EVAL_KNOBS = ("device", "precision", "num_workers", "eval_batch_size")  # what evaluating alone reads
#: Parameters that do not change a cell's numbers (the data's place; the shared knobs with identity=False,
#: unless a method's numbers depend on them: `Method.batch_dependent`).
NOT_IDENTITY = ("data_root", *(k for k, h in SHARED.items() if not h.identity))


@dataclass(frozen=True)
class MethodInfo:
    """A registered name: its class, the options it passes to it, its recipe and how the report shows it."""

    name: str
    cls: type["Method"]
    options: dict[str, Any] = field(default_factory=dict)
    row: str | None = None         # the ablation row of the GLAD paper's Table 4, if any
    published: str | None = None   # its method name in the glad_core/published/ tables (Tables 1-5), if any
    doc: str = ""
    order: float = math.inf        # place in tables (then registration order)
    recipe: str | None = None      # where its defaults are cited from, when they are a published recipe
    registered: dict[str, Any] = field(default_factory=dict)  # defaults given to `register`

    @property
    def hparams(self) -> dict[str, Hparam]:
        """Its own hyper-parameters, with the defaults of this registered name."""
        own = self.cls.hparams
        return {k: dataclasses.replace(h, default=self.registered[k]) if k in self.registered else h
                for k, h in own.items()}

    @property
    def trains(self) -> bool:
        return self.cls.trains

    @property
    def defaults(self) -> dict[str, Any]:
        """The shared knobs it sets differently from `SHARED` (the class's, then this name's)."""
        return {**self.cls.defaults, **{k: v for k, v in self.registered.items() if k in SHARED}}

    def knob_default(self, key: str) -> Any:
        """The default of a shared knob or own hyper-parameter for this name."""
        return self.defaults.get(key, SHARED[key].default) if key in SHARED else self.hparams[key].default


REGISTRY: dict[str, MethodInfo] = {}


def register(name: str, *, order: float = math.inf, row: str | None = None, published: str | None = None,
             recipe: str | None = None, defaults: dict[str, Any] | None = None, **options: Any):
    """Class decorator: register `cls` under `name` (several names may share one class with `options`,
    the class's constructor keywords). `defaults` sets shared knobs and own hyper-parameters for this name
    (its recipe, cited by `recipe`); `order` places it in tables."""
    def add(cls: type[Method]) -> type[Method]:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is registered twice ({REGISTRY[name].cls.__name__}, {cls.__name__})")
        given = dict(defaults or {})
        for key, value in given.items():
            knob = SHARED.get(key) or cls.hparams.get(key)
            if knob is None:
                raise ValueError(f"register({name!r}): default {key!r} is neither a shared knob {sorted(SHARED)} "
                                 f"nor a hyper-parameter of {cls.__name__} {sorted(cls.hparams)}")
            try:
                given[key] = knob.parse(value)
            except ValueError as e:
                raise ValueError(f"register({name!r}): default {key!r} = {value!r} is invalid: {e}") from None
        REGISTRY[name] = MethodInfo(name, cls, options, row, published, (cls.__doc__ or "").strip().split("\n")[0],
                                    order, recipe, given)
        return cls
    return add


def method_info(name: str) -> MethodInfo:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; allowed: {list(REGISTRY)}")
    return REGISTRY[name]


def table_order() -> list[str]:
    """Registered names in the order of tables: by `order`, then registration."""
    names = list(REGISTRY)
    return sorted(names, key=lambda n: (REGISTRY[n].order, names.index(n)))


def check_hparams(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """`given` with the method's defaults filled in, each value parsed by its own `Hparam`; an unknown
    name or an invalid value raises ValueError."""
    declared = method_info(name).hparams
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ValueError(f"method {name!r} has no hyper-parameter {unknown}; its own are {sorted(declared)}")
    out = {}
    for k, h in declared.items():
        try:
            out[k] = h.parse(given[k]) if k in given else h.default
        except ValueError as e:
            raise ValueError(f"hyper-parameter {k!r} = {given[k]!r} of method {name!r} is invalid: {e}") from None
    return out


@contextmanager
def switched_off(obj: Any, flag: str) -> Iterator[None]:
    """`obj.<flag>` False inside, restored to True after: the `zero_shot()` of a method whose trained part
    is gated by a flag."""
    setattr(obj, flag, False)
    try:
        yield
    finally:
        setattr(obj, flag, True)


class Method(nn.Module):
    """Base of every method: a frozen backbone scored with cosine logits (this alone is zero-shot CLIP)."""

    hparams: ClassVar[dict[str, Hparam]] = {}
    defaults: ClassVar[dict[str, Any]] = {}
    reads: ClassVar[tuple[str, ...]] = tuple(SHARED)  # the shared knobs it reads (see `knobs`)
    per_image: ClassVar[bool] = False  # class_features depend on the image features
    #: True: `encode_image` depends on the frozen backbone alone, never on a trained part (no LoRA in the image
    #: tower, no vision prompts), so the features of an evaluation split are computed once and reused by every
    #: cell and seed (`glad_core.feature_cache`). A subclass that trains anything the image tower uses sets False.
    frozen_image_features: ClassVar[bool] = False
    trains: ClassVar[bool] = True      # False: nothing to train (no record of training, no landscape)
    builds_in_fit: ClassVar[bool] = False  # True: `fit` builds what scoring needs (experts, a description
                                           # index), so a saved state alone is not reused: the cell fits

    def __init__(self, clip: nn.Module, tokenizer: Callable, cfg: "TrainConfig"):
        super().__init__()
        self.clip, self.tokenizer, self.cfg = clip, tokenizer, cfg
        self.hp = cfg.hparams
        self.feature_cache: FeatureCache | None = None  # set by a run: where frozen image features are kept
        clip.requires_grad_(False)

    @classmethod
    def knobs(cls, hp: dict[str, Any]) -> tuple[str, ...]:
        """The shared knobs this method reads with hyper-parameters `hp`: `reads`, without rho, alpha and
        delta when its step rule is "none" (the record, its identity and `--explain` hold only these)."""
        stepped = hp.get("step_rule", "none") != "none"
        return tuple(k for k in cls.reads if stepped or k not in STEP_KNOBS)

    @classmethod
    def batch_dependent(cls, hp: dict[str, Any]) -> bool:
        """Whether its predictions depend on how the test images are batched (then `eval_batch_size` is
        part of its identity; default: no)."""
        return False

    @property
    def step(self) -> str:
        """Its step rule: "none", "sam" or "gradreg" (the hyper-parameter `step_rule`)."""
        return self.hp.get("step_rule", "none")

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
        """Facts about how this run's numbers were obtained: the record's `method.info` (default: none)."""
        return {}

    def extra_metrics(self) -> Callable[[torch.Tensor, torch.Tensor], dict[str, Any]] | None:
        """More metrics of a test split, or None (the default: no extra encoding pass): a function of the
        split's image features [N, D] (encoded in `inference()`, in order) and labels [N], whose result
        goes into the record's `method.metrics[split]`."""
        return None

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

    def fit(self, items: Sequence, classnames: Sequence[str], templates: Sequence[str], *,
            val_items: Sequence | None = None, checkpoint: str | Path | None = None,
            progress: bool = True) -> TrainResult:
        """Train on `items` (resuming from `checkpoint` where the loop saves one): the shared loop of
        `glad_core.train.train`, which does not use the sources' val pools (`val_items`, given by the
        leave-one-domain-out protocol); a method with stages, or one trained on the val pools, overrides it."""
        return train(self, items, classnames, templates, checkpoint=checkpoint, progress=progress)


@register("zeroshot", order=0, published="clip")
class ZeroShot(Method):
    """Frozen CLIP with the dataset's hand-written prompts: trains nothing."""

    trains = False
    frozen_image_features = True
    reads = EVAL_KNOBS


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
