"""GuiDG's two training stages (`glad_core.methods.guidg`): the domain experts, then the guided tuning."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import Datum, ImageDataset, Splits
from ..datasets import DatasetError, split_per_class
from ..feature_cache import frozen_features
from ..domains import split_subdomains
from ..gradreg import GradRegStep
from ..prompts import PromptLearner
from ..runtime import autocast, loader_options, resolve_device, set_seed, train_transform
from ..train import TrainResult, check_finite

if TYPE_CHECKING:
    from .guidg import GuiDG


@dataclass
class Pool:
    """One source domain: its expert-training items and its val (guidance) items."""

    name: str
    train: list
    val: list


def selection_epochs(epochs: int, every: int) -> list[int]:
    """The epochs (1-based) after which an expert is scored on its val pool: 1, 1 + every, ... (GuiDG's
    phase1.py: `epoch % 5 == 0`, 0-based)."""
    return [e + 1 for e in range(epochs) if e % every == 0]


EXPERT_SCALE_MIN = 0.7  # GuiDG's experts: RandomResizedCrop(224, scale (0.7, 1)) + horizontal flip


def eval_transform(clip: nn.Module) -> Callable:
    """open_clip's evaluation transform of this model (resize, centre crop, its mean / std)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**clip.visual.preprocess_cfg), is_train=False)


def guidance_transform(clip: nn.Module, randaugment: bool) -> Callable:
    """Step 2's augmentation: RandAugment(2, 9) on the image (before resizing), then the evaluation transform."""
    from torchvision import transforms

    base = eval_transform(clip)
    return transforms.Compose([transforms.RandAugment(2, 9), base]) if randaugment else base


def _by_class(items: Sequence[Datum]) -> list[list[Datum]]:
    groups: dict[int, list[Datum]] = {}
    for d in items:
        groups.setdefault(d.label, []).append(d)
    return list(groups.values())


def source_pools(items: Sequence[Datum], classnames: Sequence[str], templates: Sequence[str],
                 val_items: Sequence[Datum] | None, subdomains: int, seed: int) -> list[Pool]:
    """One pool per source domain (in order of appearance); one source (or none named) is dealt into
    `subdomains` random sub-domains, its val items included (Algorithm 1)."""
    names = list(dict.fromkeys(d.domain for d in items))
    if len(names) <= 1:
        source = Splits(names[0] if names and names[0] else "source", list(classnames), list(templates),
                        train=list(items) + list(val_items or []))
        md = split_subdomains(source, subdomains, seed)
        pools = [Pool(n, s.train, s.val) for n, s in md.domains.items()]
    else:
        extra = sorted({d.domain for d in val_items or []} - set(names))
        if extra:
            raise DatasetError(f"val items of domains {extra} have no training items; the sources are {names}")
        pools = []
        for name in names:
            train = [d for d in items if d.domain == name]
            if val_items is None:
                train, val, _ = split_per_class(_by_class(train), 0.5, 0.0, seed, name, min_train=0)
            else:
                val = [d for d in val_items if d.domain == name]
            pools.append(Pool(name, train, val))
    empty = [p.name for p in pools if not p.train or not p.val]
    if empty:
        raise DatasetError(f"GuiDG needs training and val images in every source domain; empty in {empty}. "
                           "Use more shots (or fewer sub-domains).")
    return pools


def expert_step(method: "GuiDG", learner: PromptLearner, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
    """One step of an expert: frozen pretrained image features, CE of its prompt's logits, SGD on the context."""
    device, precision = resolve_device(method.cfg.device), method.cfg.precision
    with torch.no_grad(), method.zero_shot(), autocast(device, precision):
        f = method.encode_image(images)
    with autocast(device, precision):
        loss = F.cross_entropy(method.logit_scale * f @ learner().float().t(), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


@torch.no_grad()
def val_accuracy(learner: PromptLearner, val_f: torch.Tensor, val_y: torch.Tensor, precision_context) -> float:
    """Top-1 accuracy of an expert's prompts on the val pool's image features (its selection score)."""
    with precision_context:
        return ((val_f @ learner().float().t()).argmax(-1) == val_y).float().mean().item()


def train_expert(method: "GuiDG", pool: Pool, classnames: Sequence[str], progress: bool) -> tuple[torch.Tensor, dict]:
    """A CoOp expert on the frozen pretrained backbone: the selected context [M, d] and its history.

    Scored on the val pool after epochs 1, 1 + N, ... (`selection_epochs`); the first best is kept (GuiDG
    keeps a strictly better one too, starting from 0, so it keeps nothing while the accuracy is 0)."""
    cfg, hp = method.cfg, method.hp
    device = resolve_device(cfg.device)
    learner = PromptLearner(method.clip, method.tokenizer, classnames, n_ctx=hp["n_ctx"], init=None,
                            freeze=False).to(device)
    optimizer = torch.optim.SGD([learner.ctx], lr=hp["expert_lr"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp["expert_schedule_steps"])
    data = ImageDataset(pool.train, train_transform(method.clip, EXPERT_SCALE_MIN, flip=True))
    with method.zero_shot():
        val_f, val_y = frozen_features(method, pool.val, eval_transform(method.clip), cfg.eval_batch_size,
                                       cfg.num_workers, progress=False)
    best, best_ctx, history = -1.0, learner.ctx.detach().clone(), []
    epochs, steps, seen = hp["expert_epochs"], 0, 0
    selected = selection_epochs(epochs, hp["expert_eval_every"])
    for epoch in tqdm(range(epochs), desc=f"expert {pool.name}", disable=not progress, leave=False):
        loader = torch.utils.data.DataLoader(data, batch_size=hp["expert_batch_size"], shuffle=True,
                                             **loader_options(cfg.num_workers, device),
                                             generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        for images, labels in loader:
            loss = expert_step(method, learner, optimizer, images.to(device), labels.to(device))
            scheduler.step()
            steps, seen = steps + 1, seen + len(labels)
        if epoch + 1 in selected:
            acc = val_accuracy(learner, val_f, val_y, autocast(device, cfg.precision))
            history.append({"epoch": epoch + 1, "loss": loss.item(), "val_acc": acc})
            if acc > best:
                best, best_ctx = acc, learner.ctx.detach().clone()
    return best_ctx, {"domain": pool.name, "val_acc": best, "history": history, "steps": steps,
                      "images_seen": seen, "parameters": learner.ctx.numel()}


@torch.no_grad()
def expert_features(method: "GuiDG", contexts: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
    """Class features [K, C, D] of the experts' contexts [K, M, d] (computed once, frozen)."""
    learner = PromptLearner(method.clip, method.tokenizer, classnames, n_ctx=contexts.shape[1], init=None,
                            freeze=False).to(contexts.device)
    out = []
    for ctx in contexts:
        learner.ctx.copy_(ctx)
        out.append(learner().float())
    return torch.stack(out)


def step2_classifiers(method: "GuiDG", contexts: Sequence[torch.Tensor] | None, classnames: Sequence[str],
                      templates: Sequence[str]) -> torch.Tensor:
    """Step 2's fixed classifiers [K, C, D], computed once: the experts' (their contexts installed with a
    fresh cross-modal attention) or, unguided, the hand-written prompts' (K = 1)."""
    device = resolve_device(method.cfg.device)
    if contexts is None:
        with torch.no_grad(), method.zero_shot(), autocast(device, method.cfg.precision):
            return method.prompt_features(classnames, templates)[None].float()
    method.ctx = nn.Parameter(torch.stack(list(contexts)), requires_grad=False)
    method.expert_text = expert_features(method, method.ctx, classnames)
    method.attn = method.new_attention(method.expert_text.shape[-1], len(classnames)).to(device)
    return method.expert_text


def guided_step(method: "GuiDG", stepper: GradRegStep, images: torch.Tensor, labels: torch.Tensor,
                T: torch.Tensor) -> torch.Tensor:
    """One step-2 iteration on the sources' batches (`batch_size` images each, concatenated): the tuned
    tower encodes them in one call and `guided_loss` scores the whole mixed batch against the fixed
    classifiers T [K, C, D] (one attention weight vector, as GuiDG's `train_resample`); returns the loss."""
    cfg = method.cfg
    device = resolve_device(cfg.device)

    def closure() -> torch.Tensor:
        with autocast(device, cfg.precision):
            return method.guided_loss(method.encode_image(images), labels, T)

    return stepper.step(closure)


def fit_guidg(method: "GuiDG", items: Sequence[Datum], classnames: Sequence[str], templates: Sequence[str],
              val_items: Sequence[Datum] | None, progress: bool) -> TrainResult:
    """Step 1 (one expert per source pool, when guided), then step 2 (tower + attention, or tower alone)."""
    cfg, hp = method.cfg, method.hp
    device = resolve_device(cfg.device)
    set_seed(cfg.seed)
    method.to(device)
    t0 = time.perf_counter()
    pools = source_pools(items, classnames, templates, val_items, hp["subdomains"], cfg.seed)
    method.classnames, method.expert_names = list(classnames), [p.name for p in pools]
    result = TrainResult()
    if method.guided:
        experts = [train_expert(method, p, classnames, progress) for p in pools]
        result.history += [{"stage": "expert", **info} for _, info in experts]
        for key in ("steps", "images_seen", "parameters"):  # the experts' budget, then step 2's
            setattr(result, key, sum(info[key] for _, info in experts))
    T = step2_classifiers(method, [c for c, _ in experts] if method.guided else None, classnames, templates)

    params = method.trainable()
    optimizer = method.optimizer(params)  # AdamW at lr with weight_decay, cosine over every iteration
    total = cfg.epochs * hp["iterations"]
    scheduler = method.scheduler(optimizer, total)
    stepper = GradRegStep(params, optimizer, mode=method.step, rho=cfg.rho, alpha=cfg.alpha, delta=cfg.delta)
    result.parameters += sum(p.numel() for p in params)
    transform = guidance_transform(method.clip, hp["aug_randaugment"])
    data = [ImageDataset(p.val, transform) for p in pools]
    gen = torch.Generator().manual_seed(cfg.seed)
    method.before_training(total)
    method.train()
    bar = tqdm(total=total, desc=f"train {cfg.method}", disable=not progress, leave=False)
    for epoch in range(cfg.epochs):
        loss_sum = 0.0
        for it in range(hp["iterations"]):
            batches = [[ds[i] for i in torch.randint(len(ds), (cfg.batch_size,), generator=gen).tolist()] for ds in data]
            images = torch.stack([x for b in batches for x, _ in b]).to(device)
            labels = torch.tensor([y for b in batches for _, y in b], device=device)

            loss = guided_step(method, stepper, images, labels, T)
            check_finite(loss, cfg, epoch)
            scheduler.step()
            method.after_step(epoch * hp["iterations"] + it, total)
            result.steps += 1
            result.images_seen += len(labels)
            loss_sum += loss.item()
            bar.update(1)
        method.after_epoch()
        result.history.append({"stage": "guided", "epoch": epoch + 1, "loss": loss_sum / hp["iterations"],
                               "lr": scheduler.get_last_lr()[0]})
    bar.close()
    method.finish()
    method.eval()
    result.seconds = time.perf_counter() - t0
    return result
