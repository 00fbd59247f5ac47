"""Few-shot tuning and evaluation of any method (`glad_core.methods`): one config, one step, one loop.

    loss = method.loss(logits, y, log p_zero-shot)     (by default CE + λ · KL(p_zero-shot ‖ p_tuned))

The zero-shot distribution comes from the same method with every trained part off (`zero_shot()`),
on the same augmented batch. It is computed once per step under no_grad and reused by both passes of
the regularized step.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Datum, ImageDataset
from .gradreg import GradRegStep
from .io import atomic_path
from .runtime import autocast, loader_options, resolve_device, train_transform

if TYPE_CHECKING:
    from .config import TrainConfig
    from .methods import Method


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


def check_finite(loss: torch.Tensor, cfg: TrainConfig, epoch: int, checkpoint: str | Path | None = None) -> None:
    """Raise `NonFiniteLossError` (with the fix) when `loss` is NaN or infinite, at 0-based `epoch`."""
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"non-finite loss ({loss.item()}) at epoch {epoch + 1} of {cfg.method}; lower lr "
            f"(now {cfg.lr}) or use precision='fp32'. The last good checkpoint is kept"
            + (f" at {checkpoint}." if checkpoint else "."))


@dataclass
class TrainResult:
    """What a fit did: per-epoch history, and its budget: seconds, optimizer steps (every stage's), images
    seen by those steps (with repeats), and the number of trained parameters."""

    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    images_seen: int = 0
    parameters: int = 0


class Step:
    """One training step of a method on a batch: the zero-shot target, then its loss under its stepper.

        log p_zs = log softmax(zero-shot logits)        (no_grad, every trained part off; when λ > 0)
        loss     = method.loss(method.logits(f_i, t), y, log p_zs)
        θ        ← GradRegStep(mode = method.step)       (plain, SAM or GradReg, Algorithm 1)

    Class embeddings that do not depend on trained parameters, and the zero-shot ones, are computed
    once per class set. `train`, the loss landscape and the benchmarks all step through this class.
    """

    def __init__(self, method: Method, classnames: Sequence[str], templates: Sequence[str],
                 optimizer: torch.optim.Optimizer | None = None, precision: str | None = None):
        self.method, self.cfg = method, method.cfg
        self.classnames, self.templates = list(classnames), list(templates)
        self.device = method.logit_scale.device
        self.precision = precision or self.cfg.precision
        self.optimizer = optimizer
        with torch.no_grad(), method.zero_shot(), self.autocast():
            self.zs_text = method.class_features(self.classnames, self.templates).to(method.dtype)
        self.fixed_text = None
        if not method.text_trained and not method.per_image:
            with torch.no_grad(), self.autocast():
                self.fixed_text = method.class_features(self.classnames, self.templates).to(method.dtype)

    @functools.cached_property
    def stepper(self) -> GradRegStep:
        """The method's step rule around its optimizer (built on first use)."""
        params = self.method.trainable()
        return GradRegStep(params, self.optimizer or self.method.optimizer(params), mode=self.method.step,
                           rho=self.cfg.rho, alpha=self.cfg.alpha, delta=self.cfg.delta)

    def autocast(self):
        return autocast(self.device, self.precision)

    @torch.no_grad()
    def zero_shot_log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """log p of the zero-shot model on `images`."""
        with self.method.zero_shot(), self.autocast():
            return F.log_softmax(self.method.logits(self.method.encode_image(images), self.zs_text), dim=-1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, C] of the method being trained, and the class embeddings they used."""
        m = self.method
        if m.per_image:
            f_i = m.encode_image(images)
            text = m.class_features(self.classnames, self.templates, f_i).to(m.dtype)
        else:  # text first, then image: the order of their dropout draws
            text = self.fixed_text if self.fixed_text is not None else m.class_features(
                self.classnames, self.templates).to(m.dtype)
            f_i = m.encode_image(images)
        return m.logits(f_i, text), text

    def closure(self, images: torch.Tensor, labels: torch.Tensor, log_p_zs: torch.Tensor | None,
                first_logits: list[torch.Tensor] | None = None) -> Callable[[], torch.Tensor]:
        """The loss at the current parameters, as `GradRegStep.step` calls it (once or twice per step)."""
        def closure() -> torch.Tensor:
            with self.autocast():
                logits, text = self.forward(images)
                loss = self.method.loss(logits, labels, log_p_zs, text, self.zs_text)
            if first_logits is not None and not first_logits:
                first_logits.append(logits.detach())
            return loss
        return closure

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 first_logits: list[torch.Tensor] | None = None) -> torch.Tensor:
        """One step on (images, labels); returns the loss at θ (logits at θ go into `first_logits`)."""
        log_p_zs = self.zero_shot_log_probs(images) if self.cfg.kl_weight > 0 else None
        return self.stepper.step(self.closure(images, labels, log_p_zs, first_logits))


def train(method: Method, items: Sequence[Datum], classnames: Sequence[str], templates: Sequence[str],
          checkpoint: str | Path | None = None, progress: bool = True, steps: int | None = None) -> TrainResult:
    """Tune `method` on `items` with its config; resumes from `checkpoint` (saved every epoch) if present.

    `steps`: train for this many iterations (epochs as needed, the last one cut short) instead of
    `cfg.epochs` epochs."""
    cfg = method.cfg
    device = resolve_device(cfg.device)
    method.to(device)
    params = method.trainable()
    if not params:
        return TrainResult()
    items = list(items)
    loader_set = _Indexed(ImageDataset(items, train_transform(method.clip, cfg.aug_scale_min, cfg.aug_flip)))
    drop_last = method.drop_last and len(loader_set) >= cfg.batch_size
    steps_per_epoch = (len(loader_set) // cfg.batch_size if drop_last else math.ceil(len(loader_set) / cfg.batch_size))
    total = steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    optimizer = method.optimizer(params)
    scheduler = method.scheduler(optimizer, epochs if method.lr_per_epoch else total)
    result, start_epoch = TrainResult(parameters=sum(p.numel() for p in params)), 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        method.load_state_dict(state["trained"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        result = TrainResult(**state["result"])
        start_epoch = state["epoch"] + 1
    step = Step(method, classnames, templates, optimizer)

    method.train()
    t0 = time.perf_counter() - result.seconds
    bar = tqdm(total=total, initial=result.steps, desc=f"train {cfg.method}", disable=not progress, leave=False)
    for epoch in range(start_epoch, epochs):
        torch.manual_seed(cfg.seed * 1000 + epoch)  # per-epoch seeding: a resumed run is identical
        loader = torch.utils.data.DataLoader(loader_set, batch_size=cfg.batch_size, shuffle=True,
                                             **loader_options(cfg.num_workers, device), drop_last=drop_last,
                                             generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        loss_sum, correct, seen = 0.0, 0, 0
        for images, labels, index in loader:
            if result.steps == total:
                break
            method.use_items([items[i] for i in index.tolist()], "train")
            images, labels = images.to(device), labels.to(device)
            first_logits: list[torch.Tensor] = []
            loss = step(images, labels, first_logits)
            check_finite(loss, cfg, epoch, checkpoint)
            if not method.lr_per_epoch:
                scheduler.step()
            loss_sum += loss.item() * len(labels)
            correct += (first_logits[0].argmax(-1) == labels).sum().item()
            seen += len(labels)
            result.steps += 1
            result.images_seen += len(labels)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1)
        if method.lr_per_epoch:
            scheduler.step()
        result.history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": correct / seen,
                               "lr": scheduler.get_last_lr()[0]})
        result.seconds = time.perf_counter() - t0
        if checkpoint is not None:
            with atomic_path(checkpoint) as tmp:
                torch.save({"trained": method.trained_state(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch,
                            "result": asdict(result)}, tmp)
    bar.close()
    method.eval()
    return result


class _Indexed(torch.utils.data.Dataset):
    """(image, label, index) of a dataset: the training loop tells the method each batch's items (`use_items`)."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return (*self.dataset[i], i)


@torch.no_grad()
def evaluate(method: Method, items: Sequence[Datum], classnames: Sequence[str], templates: Sequence[str],
             transform: Callable, progress: bool = True, desc: str = "eval") -> dict:
    """Top-1 accuracy, per-class accuracy and per-image correctness (`correct`, in the order of `items`) of
    `method` on `items` (in its `inference()` mode: LoRA merged).

    A method with frozen image features and a `feature_cache` reads the split's features from it (encoded
    once per backbone, split and transform, in the same batches)."""
    cfg = method.cfg
    device = resolve_device(cfg.device)
    method.to(device).eval()
    with method.inference():
        text = None
        if not method.per_image:
            with autocast(device, cfg.precision):
                text = method.class_features(classnames, templates).to(method.dtype)
        bs = cfg.eval_batch_size
        if method.frozen_image_features and method.feature_cache is not None:  # encoded once, in the same batches
            f_all, y_all = method.feature_cache.image_features(method, items, transform, bs, cfg.num_workers,
                                                               progress, desc)
            batches = ((f_all[i:i + bs], None, y_all[i:i + bs]) for i in range(0, len(items), bs))
        else:
            loader = torch.utils.data.DataLoader(ImageDataset(items, transform), batch_size=bs,
                                                 **loader_options(cfg.num_workers, device))
            batches = ((None, images, y) for images, y in tqdm(loader, desc=desc, disable=not progress, leave=False))
        preds, labels, start = [], [], 0
        for f, images, y in batches:
            method.use_items(items[start:start + len(y)], "test")  # batch by batch: per-image methods
            start += len(y)                                         # score each batch right after encoding it
            with autocast(device, cfg.precision):
                if f is None:
                    f = method.encode_image(images.to(device))
                t = text if text is not None else method.class_features(classnames, templates, f).to(method.dtype)
            preds.append(method.logits(f, t).argmax(-1))
            labels.append(y.to(device))
        pred, labels = torch.cat(preds), torch.cat(labels)
    hit = (pred == labels).float()
    per_class = {c: (hit[labels == k].mean().item() if (labels == k).any() else float("nan"))
                 for k, c in enumerate(classnames)}
    return {"acc": hit.mean().item(), "n": len(items), "per_class": per_class, "correct": hit.bool().tolist()}
