"""CLIP-LoRA (Zanella & Ben Ayed, CVPR-W 2024), with the recipe of its public code (MaxZanella/CLIP-LoRA).

    h = W x + (α / √r) B(A dropout(x))     on q, k, v of every block of both towers
    r = 2, α = 1, dropout 0.25; AdamW (lr 2e-4, betas 0.9 / 0.999, weight decay 1e-2), batch 32,
    cosine to 1e-6 over 500 x shots iterations; cross-entropy only; one template, "a photo of a {}.";
    random resized crop (scale 0.08-1, bicubic) and horizontal flip.

The GLAD paper's CLIP-LoRA column and Table 4 row (a) are GLAD's own run of "the original LoRA on
CLIP" (method `lora`, GLAD's settings); this method is the CLIP-LoRA authors' recipe, to compare both.
The original runs in fp16 with a fixed logit scale of 100 (OpenAI CLIP's); ours uses the model's
logit scale and `precision`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from ..checks import in_range
from ..train import train
from .base import STEP_RULE, Hparam, register
from .glad import LORA_HPARAMS, LoRAMethod


@register("clip_lora", order=20, recipe="docs/recipes.md (CLIP-LoRA)",
          defaults={"lr": 2e-4, "weight_decay": 1e-2, "batch_size": 32, "kl_weight": 0.0,
                    "aug_scale_min": 0.08, "aug_flip": True})
class ClipLoRA(LoRAMethod):
    """CLIP-LoRA: LoRA scaled by α/√r, trained for 500 iterations per shot with AdamW and CE."""

    reads = tuple(k for k in LoRAMethod.reads if k != "epochs")  # its length is iterations_per_shot x shots
    hparams = {
        "rank": Hparam(2, "r (CLIP-LoRA: 2)", in_range(1)),
        "lora_alpha": Hparam(1.0, "α; the update is scaled by α/√r (CLIP-LoRA: 1)", in_range(0)),
        "lora_dropout": LORA_HPARAMS["lora_dropout"],
        "lora_towers": LORA_HPARAMS["lora_towers"],
        "template": Hparam("a photo of a {}.", "the one prompt template of every dataset (CLIP-LoRA's)",
                           lambda v: None if "{}" in v else "must contain {} for the class name"),
        "iterations_per_shot": Hparam(500, "training iterations per shot (CLIP-LoRA: 500)", in_range(1)),
        "min_lr": Hparam(1e-6, "the cosine schedule's final learning rate (CLIP-LoRA: 1e-6)", in_range(0)),
        "step_rule": STEP_RULE,
    }

    def lora_scale(self) -> float:
        return self.hp["lora_alpha"] / math.sqrt(self.hp["rank"])

    def prompt_features(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Every dataset's prompts are CLIP-LoRA's one template (the dataset's templates are not used)."""
        return super().prompt_features(classnames, [self.hp["template"]])

    def optimizer(self, params: Sequence[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.cfg.lr, betas=(0.9, 0.999), weight_decay=self.cfg.weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=self.hp["min_lr"])

    def fit(self, items: Sequence, classnames: Sequence[str], templates: Sequence[str], *,
            val_items: Sequence | None = None, checkpoint: str | Path | None = None, progress: bool = True):
        """`iterations_per_shot` x shots iterations of the shared loop (`epochs` is not used)."""
        shots = math.ceil(len(items) / len(classnames))
        return train(self, items, classnames, templates, checkpoint=checkpoint, progress=progress,
                     steps=self.hp["iterations_per_shot"] * shots)
