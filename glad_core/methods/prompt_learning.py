"""Prompt learning: CoOp, CoCoOp and KgCoOp on the frozen backbone (`glad_core.prompts`), with the
recipes their public code uses for base-to-novel with ViT-B/16 (docs/recipes.md cites every value).

    coop     t_c = g([SOS] v_1 .. v_M {class_c}.)            M = 4 from "a photo of a"; CE
    cocoop   t_c(x) = g([SOS] v_1+π(x) .. v_M+π(x) {class_c}.)   π = meta-net(f(x)); CE; [B, C, D]
    kgcoop   coop + λ · (1 − mean_c cos(t_c, t_c^hand))          t^hand: KgCoOp's hand-written prompts' features

Shared recipe (Dassl, CoOp's toolbox): SGD (lr 0.002, momentum 0.9, weight decay 5e-4), the lr stepped
once per epoch: one warm-up epoch at a constant 1e-5, then CosineAnnealingLR(T_max = epochs) restarted
after the warm-up (WARMUP_RECOUNT), so the last epoch's lr is 0.002 · ½(1 + cos(π (E − 2) / E)) > 0;
the last incomplete batch dropped when the set holds a full one; random resized crop 0.08-1 with flip;
CE only. CoOp: batch 32, 200 epochs (50 on ImageNet); CoCoOp: batch 1, 10 epochs;
KgCoOp: batch 128, 100 epochs. The originals run in fp16; ours follows `precision`. The context is
shared by all classes, so a model trained on base classes scores novel ones.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import boolean, in_range, one_of
from ..prompts import POSITIONS, PromptLearner, meta_net
from .base import STEP_RULE, Hparam, Method, register, switched_off, warmup_cosine

DASSL_SGD = {"lr": 0.002, "weight_decay": 5e-4, "kl_weight": 0.0, "aug_scale_min": 0.08, "aug_flip": True}
PROMPT_HPARAMS = {
    "n_ctx": Hparam(4, "context tokens M (CoOp's base-to-novel config: 4, from ctx_init)", in_range(1)),
    "ctx_init": Hparam("a photo of a", "phrase whose token embeddings start the context; '' = N(0, 0.02)",
                       lambda v: None if isinstance(v, str) else "must be a string"),
    "position": Hparam("end", "where the class name goes among the context tokens", one_of(POSITIONS)),
    "momentum": Hparam(0.9, "SGD momentum (Dassl)", in_range(0, 1)),
    "warmup_epochs": Hparam(1, "epochs at the constant warm-up lr before the cosine (Dassl: 1)", in_range(0)),
    "warmup_lr": Hparam(1e-5, "the constant warm-up learning rate (Dassl: 1e-5)", in_range(0)),
    "lr_per_epoch": Hparam(True, "step the lr once per epoch, cosine restarted after the warm-up (Dassl); false: "
                           "per step, cosine to 0 over the steps after the warm-up", boolean),
    "drop_last": Hparam(True, "drop the last incomplete batch when the set holds a full one (Dassl)", boolean),
    "prompt_chunk": Hparam(4096, "prompts per text-tower call in evaluation (bounds memory)", in_range(1)),
    "step_rule": STEP_RULE,
}


@register("coop", order=40, published="coop", recipe="docs/recipes.md (CoOp)",
          defaults={**DASSL_SGD, "batch_size": 32, "epochs": 200})
class CoOp(Method):
    """CoOp: learned context vectors shared by all classes, on the frozen text tower."""

    hparams = PROMPT_HPARAMS
    frozen_image_features = True  # the context enters the text tower only (CoCoOp's meta-net reads the features)

    def __init__(self, clip: nn.Module, tokenizer: Callable, cfg):
        super().__init__(clip, tokenizer, cfg)
        first = self.new_learner(["x"])
        self.ctx = nn.Parameter(first.ctx.detach().clone())  # the one trained tensor (with CoCoOp's meta-net)
        self._learners: dict[tuple, PromptLearner] = {}
        self._learned = True

    @property
    def text_trained(self) -> bool:
        return True

    def learner(self, classnames: Sequence[str]) -> PromptLearner:
        """The prompts of these classes around the shared context (tokenized once per class set and device)."""
        key = (tuple(classnames), self.ctx.device)
        if key not in self._learners:
            learner = self.new_learner(classnames)
            del learner.ctx
            learner.ctx = self.ctx  # shared, not copied: gradients reach the method's parameter
            self._learners[key] = learner
        return self._learners[key]

    def new_learner(self, classnames: Sequence[str]) -> PromptLearner:
        """A prompt learner for these classes (`learner` replaces its context by the method's)."""
        return PromptLearner(self.clip, self.tokenizer, classnames, n_ctx=self.hp["n_ctx"],
                             init=self.hp["ctx_init"] or None, position=self.hp["position"], freeze=False)

    def _chunk(self) -> int | None:
        return None if torch.is_grad_enabled() else self.hp["prompt_chunk"]

    def class_features(self, classnames: Sequence[str], templates: Sequence[str],
                       image_features: torch.Tensor | None = None) -> torch.Tensor:
        if not self._learned:
            return self.prompt_features(classnames, templates)
        return self.learner(classnames)(chunk=self._chunk())

    @contextmanager
    def zero_shot(self) -> Iterator[None]:
        """The dataset's hand-written prompts instead of the learned context."""
        with switched_off(self, "_learned"):
            yield

    def optimizer(self, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.hp["momentum"], weight_decay=self.cfg.weight_decay)

    @property
    def lr_per_epoch(self) -> bool:
        return self.hp["lr_per_epoch"]

    @property
    def drop_last(self) -> bool:
        return self.hp["drop_last"]

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        """Per epoch (`total_steps` = epochs): Dassl's warm-up and restarted cosine; per step: cosine to 0."""
        if self.lr_per_epoch:
            return warmup_cosine(optimizer, total_steps, self.hp["warmup_epochs"], self.hp["warmup_lr"],
                                 period=total_steps)
        warmup = total_steps // self.cfg.epochs * self.hp["warmup_epochs"]
        return warmup_cosine(optimizer, total_steps, warmup, self.hp["warmup_lr"])


@register("cocoop", order=41, published="cocoop", recipe="docs/recipes.md (CoCoOp)",
          defaults={**DASSL_SGD, "batch_size": 1, "epochs": 10})
class CoCoOp(CoOp):
    """CoCoOp: CoOp's context shifted per image by a meta-net of the image feature."""

    per_image = True
    hparams = {**PROMPT_HPARAMS,
               "meta_reduction": Hparam(16, "meta-net hidden size = D / this (CoCoOp: 16)", in_range(1))}

    def __init__(self, clip: nn.Module, tokenizer: Callable, cfg):
        super().__init__(clip, tokenizer, cfg)
        dim = self.prompt_features(["x"], ["{}"]).shape[-1]
        self.meta_net = meta_net(dim, self.ctx.shape[-1], self.hp["meta_reduction"])

    def class_features(self, classnames: Sequence[str], templates: Sequence[str],
                       image_features: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, D] given image features (every context token shifted by π(f)); [C, D] in zero-shot mode."""
        if not self._learned:
            return self.prompt_features(classnames, templates)
        if image_features is None:
            raise ValueError("CoCoOp's class embeddings depend on the image: pass image_features")
        shift = self.meta_net(image_features.to(self.ctx.dtype))[:, None, :]
        return self.learner(classnames)(shift=shift, chunk=self._chunk())


# KgCoOp's hand-written prompts (trainers/kgcoop.py CUSTOM_TEMPLATES) are CoOp's zero-shot ones (the
# datasets' templates) except DTD's: CoOp's template -> KgCoOp's.
KGCOOP_TEMPLATES = {"{} texture.": "a photo of a {}, a type of texture."}


@register("kgcoop", order=42, published="kgcoop", recipe="docs/recipes.md (KgCoOp)",
          defaults={**DASSL_SGD, "batch_size": 128, "epochs": 100})
class KgCoOp(CoOp):
    """KgCoOp: CoOp whose class embeddings are kept near the hand-written ones."""

    hparams = {**PROMPT_HPARAMS,
               "kg_weight": Hparam(8.0, "W of W · (1 − mean_c cos(t_c, t_c^hand)) (KgCoOp's run.sh: 8.0)", in_range(0))}

    def class_features(self, classnames: Sequence[str], templates: Sequence[str],
                       image_features: torch.Tensor | None = None) -> torch.Tensor:
        """CoOp's; in zero-shot mode KgCoOp's hand-written prompts (`KGCOOP_TEMPLATES`)."""
        if not self._learned:
            templates = [KGCOOP_TEMPLATES.get(t, t) for t in templates]
        return super().class_features(classnames, templates, image_features)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, log_p_zs: torch.Tensor | None,
             text: torch.Tensor | None = None, zs_text: torch.Tensor | None = None) -> torch.Tensor:
        """CE + W · (1 − mean over classes of cos(learned, hand-written class features)), as KgCoOp's code
        (`CustomCLIP.forward`: `1 - mean(CosineSimilarity(dim=1, eps=1e-7))`); its paper writes the squared
        distance of the unit vectors, 2 (1 − cos): W = 8 is the weight of the code's form."""
        score = 1.0 - F.cosine_similarity(text, zs_text, dim=-1, eps=1e-7).mean()
        return super().loss(logits, labels, log_p_zs) + self.hp["kg_weight"] * score
