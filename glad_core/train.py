"""Few-shot tuning and evaluation: the methods of the paper's ablation (Table 4) as switches.

    loss = CE(tuned logits, y) + λ · KL(p_zero-shot ‖ p_tuned)

The zero-shot distribution comes from the same model with LoRA (and AlignNet) switched off, on the
same augmented batch. It is computed once per step under no_grad and reused by both passes of the
regularized step.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .alignnet import AlignNet
from .data import Datum, ImageDataset
from .encode import class_text_features
from .gradreg import GradRegStep
from .io import atomic_path
from .lora import adapter_state_dict, apply_lora, lora_disabled, merge_lora, unmerge_lora


@dataclass(frozen=True)
class Method:
    """Which parts of GLAD are on: LoRA, AlignNet, and the step (plain, SAM or GradReg)."""

    lora: bool
    alignnet: bool
    step: str  # "none" | "sam" | "gradreg"


METHODS: dict[str, Method] = {
    "zeroshot": Method(lora=False, alignnet=False, step="none"),
    "lora": Method(lora=True, alignnet=False, step="none"),                # Table 4 row (a)
    "lora+sam": Method(lora=True, alignnet=False, step="sam"),             # (b)
    "lora+gradreg": Method(lora=True, alignnet=False, step="gradreg"),     # (c)
    "lora+alignnet": Method(lora=True, alignnet=True, step="none"),        # (d)
    "glad": Method(lora=True, alignnet=True, step="gradreg"),              # (e)
}
ABLATION_ROWS: dict[str, str] = {"a": "lora", "b": "lora+sam", "c": "lora+gradreg", "d": "lora+alignnet",
                                 "e": "glad"}


@dataclass
class TrainConfig:
    """Every knob of a run. Paper values where the paper gives them; see params/ for the rest."""

    method: str = "glad"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    rank: int = 8
    lora_scale: float = 0.25         # γ in eq. 4
    lora_dropout: float = 0.25
    lora_towers: tuple[str, ...] = ("image", "text")
    alignnet_hidden: tuple[int, ...] = (256, 128)
    kl_weight: float = 1.0           # λ; 0 turns the KL term off
    rho: float = 0.1
    alpha: float = 0.5
    delta: float = 1e-12
    aug_scale_min: float = 0.5       # RandomResizedCrop scale range (aug_scale_min, 1)
    seed: int = 1
    device: str = "auto"             # "auto" = cuda if available, else cpu
    precision: str = "auto"          # "auto" = bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16"
    num_workers: int = 0
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; allowed: {list(METHODS)}")

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict:
        return asdict(self)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA (precision "auto" or "bf16"), a no-op context otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


class GladModel(nn.Module):
    """An open_clip model with LoRA (optional) and AlignNet (optional): the scorer of every method."""

    def __init__(self, clip: nn.Module, tokenizer: Callable, cfg: TrainConfig):
        super().__init__()
        self.clip, self.tokenizer, self.cfg = clip, tokenizer, cfg
        spec = cfg.spec
        self.lora_params = (apply_lora(clip, rank=cfg.rank, scale=cfg.lora_scale, dropout=cfg.lora_dropout,
                                       towers=cfg.lora_towers) if spec.lora else [])
        if not spec.lora:
            clip.requires_grad_(False)
        with torch.no_grad():
            dim = clip.encode_text(tokenizer(["a"])).shape[-1]
        self.alignnet = AlignNet(dim, tuple(cfg.alignnet_hidden)) if spec.alignnet else None

    def trainable(self) -> list[nn.Parameter]:
        return list(self.lora_params) + (list(self.alignnet.parameters()) if self.alignnet is not None else [])

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def text_features(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        return class_text_features(self.clip, self.tokenizer, classnames, templates, self.logit_scale.device)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor, adapted: bool = True) -> torch.Tensor:
        """[B, C] logits from normalised features; `adapted=False` skips AlignNet (zero-shot scorer)."""
        if adapted and self.alignnet is not None:
            return self.alignnet.logits(image_features, text_features, self.logit_scale)
        return self.logit_scale * image_features @ text_features.t()


def train_transform(clip: nn.Module, scale_min: float = 0.5) -> Callable:
    """open_clip's training transform for this model (random resized crop, its mean / std)."""
    from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(**clip.visual.preprocess_cfg)
    return image_transform_v2(cfg, is_train=True, aug_cfg=AugmentationCfg(scale=(scale_min, 1.0)))


def tuning_loss(logits: torch.Tensor, labels: torch.Tensor, log_p_zs: torch.Tensor | None,
                kl_weight: float) -> torch.Tensor:
    """CE(logits, y) + λ · KL(p_zs ‖ softmax(logits)), λ = `kl_weight`: the loss of section 3 per batch."""
    loss = F.cross_entropy(logits, labels)
    if kl_weight > 0:
        loss = loss + kl_weight * F.kl_div(F.log_softmax(logits, dim=-1), log_p_zs, log_target=True,
                                           reduction="batchmean")
    return loss


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


def train(model: GladModel, items: Sequence[Datum], classnames: Sequence[str], templates: Sequence[str],
          checkpoint: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Tune `model` on `items` with its config; resumes from `checkpoint` (saved every epoch) if present."""
    cfg, spec = model.cfg, model.cfg.spec
    device = resolve_device(cfg.device)
    model.to(device)
    params = model.trainable()
    if not params:
        return TrainResult()
    loader_set = ImageDataset(items, train_transform(model.clip, cfg.aug_scale_min))
    steps_per_epoch = math.ceil(len(loader_set) / cfg.batch_size)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps_per_epoch)
    stepper = GradRegStep(params, optimizer, mode=spec.step, rho=cfg.rho, alpha=cfg.alpha, delta=cfg.delta)
    result, start_epoch = TrainResult(), 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["adapter"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        result = TrainResult(**state["result"])
        start_epoch = state["epoch"] + 1

    with torch.no_grad(), lora_disabled(model.clip), autocast(device, cfg.precision):
        zs_text = model.text_features(classnames, templates).float()
    text_tuned = "text" in cfg.lora_towers and spec.lora  # else the text features are zs_text, every step

    model.train()
    t0 = time.perf_counter() - result.seconds
    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch,
               desc=f"train {cfg.method}", disable=not progress, leave=False)
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 1000 + epoch)  # per-epoch seeding: a resumed run is identical
        loader = torch.utils.data.DataLoader(loader_set, batch_size=cfg.batch_size, shuffle=True,
                                             num_workers=cfg.num_workers,
                                             generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        loss_sum, correct, seen = 0.0, 0, 0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            log_p_zs = None
            with torch.no_grad(), autocast(device, cfg.precision):
                if cfg.kl_weight > 0:
                    with lora_disabled(model.clip):
                        f_zs = F.normalize(model.clip.encode_image(images).float(), dim=-1)
                    log_p_zs = F.log_softmax(model.logits(f_zs, zs_text, adapted=False), dim=-1)
            first_logits: list[torch.Tensor] = []

            def closure() -> torch.Tensor:
                with autocast(device, cfg.precision):
                    t = model.text_features(classnames, templates).float() if text_tuned else zs_text
                    f_i = F.normalize(model.clip.encode_image(images).float(), dim=-1)
                    logits = model.logits(f_i, t)
                    loss = tuning_loss(logits, labels, log_p_zs, cfg.kl_weight)
                if not first_logits:
                    first_logits.append(logits.detach())
                return loss

            loss = stepper.step(closure)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite loss ({loss.item()}) at epoch {epoch + 1} of {cfg.method}; lower lr "
                    f"(now {cfg.lr}) or use precision='fp32'. The last good checkpoint is kept"
                    + (f" at {checkpoint}." if checkpoint else "."))
            scheduler.step()
            loss_sum += loss.item() * len(labels)
            correct += (first_logits[0].argmax(-1) == labels).sum().item()
            seen += len(labels)
            result.steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1)
        result.history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": correct / seen,
                               "lr": scheduler.get_last_lr()[0]})
        result.seconds = time.perf_counter() - t0
        if checkpoint is not None:
            with atomic_path(checkpoint) as tmp:
                torch.save({"adapter": adapter_state_dict(model), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch,
                            "result": asdict(result)}, tmp)
    bar.close()
    model.eval()
    return result


@torch.no_grad()
def image_features(model: GladModel, items: Sequence[Datum], transform: Callable, batch_size: int = 64,
                   num_workers: int = 0, progress: bool = True, desc: str = "encode") -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image features [N, D] and labels [N] of `items`, each image encoded once."""
    cfg = model.cfg
    device = resolve_device(cfg.device)
    loader = torch.utils.data.DataLoader(ImageDataset(items, transform), batch_size=batch_size,
                                         num_workers=num_workers)
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        with autocast(device, cfg.precision):
            feats.append(F.normalize(model.clip.encode_image(images.to(device)).float(), dim=-1))
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def evaluate(model: GladModel, items: Sequence[Datum], classnames: Sequence[str], templates: Sequence[str],
             transform: Callable, progress: bool = True, desc: str = "eval") -> dict:
    """Top-1 accuracy and per-class accuracy of `model` on `items`, LoRA merged for speed."""
    cfg = model.cfg
    device = resolve_device(cfg.device)
    model.to(device).eval()
    merge_lora(model.clip)
    try:
        with autocast(device, cfg.precision):
            text = model.text_features(classnames, templates).float()
        feats, labels = image_features(model, items, transform, cfg.eval_batch_size, cfg.num_workers, progress, desc)
        pred = torch.cat([model.logits(f, text).argmax(-1) for f in feats.split(cfg.eval_batch_size)])
    finally:
        unmerge_lora(model.clip)
    hit = (pred == labels).float()
    per_class = {c: (hit[labels == k].mean().item() if (labels == k).any() else float("nan"))
                 for k, c in enumerate(classnames)}
    return {"acc": hit.mean().item(), "n": len(items), "per_class": per_class}
