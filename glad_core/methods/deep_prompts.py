"""Deep vision-language prompts: IVLP, MaPLe and PromptSRC on the frozen backbone (`glad_core.deep_prompts`),
with the base-to-novel recipes of their public code (muzairkhattak/multimodal-prompt-learning for MaPLe,
muzairkhattak/PromptSRC for IVLP and PromptSRC; configs/trainers/*/vit_b16_c2_*.yaml).

    ivlp       text context v^0 + text prompts v^1..v^{J-1}, vision prompts u^0..u^{J-1}, independent; CE
    maple      v^0..v^{J-1} as ivlp; u^j = F_j(v^j), F_j a linear coupling per depth (Khattak et al., CVPR 2023); CE
    promptsrc  ivlp + self-regularization (Khattak et al., ICCV 2023):
                 L = CE + λ_t · L1(t, t^zs) + λ_i · L1(f, f^zs) + λ_l · KL(p^zs ‖ p)
               t^zs: the frozen model's text features averaged over 60 templates (textual diversity),
               f^zs: its image features, p^zs = softmax(τ f^zs · t^zs); and Gaussian prompt aggregation:
               the prompts used after training are Σ_e w_e P_e over the epochs' end states, w_e ∝ N(e; μ, σ²)

Recipes (SGD, momentum 0.9, weight decay 5e-4, one warm-up epoch at 1e-5, cosine, stepped per epoch as Dassl
does (`prompt_learning`); batch 4; crop 0.08-1 and flip; fp16 in the originals, `precision` here):
    ivlp       lr 0.0025, 20 epochs, 4 + 4 tokens, depth 9 + 9   (PromptSRC repo, IVLP/vit_b16_c2_ep20_batch4_4+4ctx)
    maple      lr 0.0035, 5 epochs, 2 tokens, depth 9            (MaPLe/vit_b16_c2_ep5_batch4_2ctx)
    promptsrc  lr 0.0025, 20 epochs, 4 + 4 tokens, depth 9 + 9, λ_t 25, λ_i 10, GPA μ 15, σ 1
               (PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx; λ_l = 1 is hard-coded in its trainer)

A depth beyond a tower's blocks prompts every block (the originals' loops stop at the last block too); a
tower without transformer blocks (glad-mini's EfficientNet) gets no vision prompts: the depths used and the
reason go into the results record (`record_info`).
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import in_range
from ..deep_prompts import DeepPromptLearner, text_blocks, vision_blocks, vision_prompts, vision_unavailable
from ..encode import encode_text, prompts
from ..prompts import token_embedding
from .base import Hparam, Method, register
from .prompt_learning import DASSL_SGD, PROMPT_HPARAMS, CoOp

log = logging.getLogger(__name__)

# Dassl's loop too (the trainers call update_lr after each epoch's last batch; Dassl's drop_last rule)
COMMON = {k: PROMPT_HPARAMS[k] for k in ("ctx_init", "momentum", "warmup_epochs", "warmup_lr", "lr_per_epoch",
                                          "drop_last", "prompt_chunk", "step_rule")}
IVLP_HPARAMS = {
    **COMMON,
    "n_ctx": Hparam(4, "text context tokens M (N_CTX_TEXT: 4)", in_range(1)),
    "n_ctx_vision": Hparam(4, "vision prompt tokens per layer (N_CTX_VISION: 4)", in_range(1)),
    "text_depth": Hparam(9, "text blocks whose input carries learned tokens; 1 = the context alone (9)", in_range(1)),
    "vision_depth": Hparam(9, "image blocks whose input carries learned tokens; 0 = none (9)", in_range(0)),
}
RECIPE = {**DASSL_SGD, "batch_size": 4}

#: PromptSRC's teacher templates (its trainers/imagenet_templates.py, IMAGENET_TEMPLATES: 60 of CLIP's ImageNet
#: prompts, from OpenAI's prompt-engineering notebook), in its order.
PROMPTSRC_TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.",
    "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.", "the toy {}.",
    "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
)


def _prompt_list(layers: int, n: int, dim: int, device: torch.device, std: float = 0.02) -> nn.ParameterList:
    """`layers` prompts [n, dim], each N(0, std²) (the originals' init of every deep prompt)."""
    return nn.ParameterList([nn.Parameter(torch.randn(n, dim, device=device) * std) for _ in range(layers)])


class DeepPrompting(CoOp):
    """Shared by the three: CoOp's context and recipe, text prompts at blocks 1..J_t-1, vision prompts (subclasses)."""

    frozen_image_features = False  # vision prompts: the image features move with training

    def __init__(self, clip: nn.Module, tokenizer: Callable, cfg, text_depth: int, vision_depth: int):
        super().__init__(clip, tokenizer, cfg)
        blocks = vision_blocks(clip)
        self.vision_note = vision_unavailable(clip) if vision_depth else None
        if self.vision_note:
            log.warning("%s: %s", cfg.method, self.vision_note)
        self.depths = {"text": min(text_depth, len(text_blocks(clip)[0])),
                       "vision": min(vision_depth, len(blocks) if blocks is not None else 0)}
        self.text_prompts = _prompt_list(self.depths["text"] - 1, self.hp["n_ctx"],
                                         token_embedding(clip).embedding_dim, self.ctx.device)

    def new_learner(self, classnames: Sequence[str]) -> DeepPromptLearner:
        learner = DeepPromptLearner(self.clip, self.tokenizer, classnames, n_ctx=self.hp["n_ctx"],
                                    init=self.hp["ctx_init"] or None, freeze=False)
        object.__setattr__(learner, "deep", getattr(self, "text_prompts", ()))  # shared, not a submodule
        return learner

    def vision_width(self) -> int:
        return self.clip.visual.transformer.width

    def deep_vision(self) -> list[torch.Tensor]:
        """The vision prompts u^0 .. u^{J_v-1} of this forward."""
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        with vision_prompts(self.clip, self.deep_vision() if self._learned and self.depths["vision"] else []):
            return super().encode_image(images)

    def record_info(self) -> dict[str, Any]:
        info = {"text_depth": self.depths["text"], "vision_depth": self.depths["vision"]}
        return {"deep_prompts": {**info, **({"vision": self.vision_note} if self.vision_note else {})}}


@register("ivlp", order=43, recipe="docs/recipes.md (IVLP)", defaults={**RECIPE, "lr": 0.0025, "epochs": 20})
class IVLP(DeepPrompting):
    """IVLP: independent deep prompts in the text and image towers."""

    hparams = IVLP_HPARAMS

    def __init__(self, clip: nn.Module, tokenizer: Callable, cfg):
        super().__init__(clip, tokenizer, cfg, cfg.hparams["text_depth"], cfg.hparams["vision_depth"])
        self.vision_prompts = _prompt_list(self.depths["vision"], self.hp["n_ctx_vision"],
                                           self.vision_width() if self.depths["vision"] else 0, self.ctx.device)

    def deep_vision(self) -> list[torch.Tensor]:
        return list(self.vision_prompts)


@register("maple", order=44, published="maple", recipe="docs/recipes.md (MaPLe)",
          defaults={**RECIPE, "lr": 0.0035, "epochs": 5})
class MaPLe(DeepPrompting):
    """MaPLe: deep text prompts, and vision prompts coupled to them by a linear layer per depth."""

    hparams = {**COMMON,
               "n_ctx": Hparam(2, "context / prompt tokens per layer, both towers (N_CTX: 2)", in_range(1)),
               "prompt_depth": Hparam(9, "blocks of each tower whose input carries prompts (PROMPT_DEPTH: 9)",
                                      in_range(1))}

    def __init__(self, clip: nn.Module, tokenizer: Callable, cfg):
        depth = cfg.hparams["prompt_depth"]
        super().__init__(clip, tokenizer, cfg, depth, depth)
        self.depths["vision"] = min(self.depths["vision"], self.depths["text"])  # u^j needs v^j
        d, J = self.ctx.shape[-1], self.depths["vision"]
        # F_0 couples the context, F_1..F_{J-1} the deeper prompts: copies of one layer at init, as in the original
        deeper = nn.Linear(d, self.vision_width()) if J > 1 else None
        self.coupling = nn.ModuleList(([nn.Linear(d, self.vision_width())] if J else [])
                                      + [copy.deepcopy(deeper) for _ in range(J - 1)]).to(self.ctx.device)

    def deep_vision(self) -> list[torch.Tensor]:
        text = [self.ctx, *self.text_prompts]
        return [f(text[j]) for j, f in enumerate(self.coupling)]


class GaussianPromptAggregation:
    """PromptSRC's GPA around a schedule: after epoch e = 1..E the prompts P_e are added with weight
    w_e = N(e; μ, σ²) / Σ_k N(k; μ, σ²); after the last epoch the parameters become Σ_e w_e P_e.

    Epochs are counted in steps (`steps_per_epoch`); `state_dict` holds the running sum, so a resumed run
    aggregates the same states."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler, params: Sequence[nn.Parameter],
                 epochs: int, steps_per_epoch: int, mean: float, std: float):
        self.scheduler, self.params = scheduler, list(params)
        self.epochs, self.steps_per_epoch = epochs, max(1, steps_per_epoch)
        pdf = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
        self.weights = [w / sum(pdf) for w in pdf]
        self.steps, self.sum = 0, None

    def step(self) -> None:
        self.scheduler.step()
        self.steps += 1
        if self.steps % self.steps_per_epoch:
            return
        epoch = self.steps // self.steps_per_epoch
        if epoch > self.epochs:
            return
        with torch.no_grad():
            weighted = [self.weights[epoch - 1] * p.detach() for p in self.params]
            self.sum = weighted if self.sum is None else [s + w for s, w in zip(self.sum, weighted)]
            if epoch == self.epochs:
                for p, s in zip(self.params, self.sum):
                    p.copy_(s)

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "steps": self.steps, "sum": self.sum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps, self.sum = state["steps"], state["sum"]


@register("promptsrc", order=45, published="promptsrc", recipe="docs/recipes.md (PromptSRC)",
          defaults={**RECIPE, "lr": 0.0025, "epochs": 20})
class PromptSRC(IVLP):
    """PromptSRC: IVLP's prompts regularized towards the frozen model, aggregated over epochs."""

    hparams = {**IVLP_HPARAMS,
               "text_loss_weight": Hparam(25.0, "λ_t of the L1 text-feature consistency (TEXT_LOSS_WEIGHT: 25)",
                                          in_range(0)),
               "image_loss_weight": Hparam(10.0, "λ_i of the L1 image-feature consistency (IMAGE_LOSS_WEIGHT: 10)",
                                           in_range(0)),
               "logits_loss_weight": Hparam(1.0, "λ_l of KL(p^zs ‖ p), summed / (B·C) (the trainer's constant 1)",
                                            in_range(0)),
               "gpa_mean": Hparam(15.0, "μ of the Gaussian over epochs (GPA_MEAN: 15, of 20 epochs)"),
               "gpa_std": Hparam(1.0, "σ of the Gaussian over epochs (GPA_STD: 1)", in_range(0, lo_open=True))}

    def __init__(self, clip: nn.Module, tokenizer: Callable, cfg):
        super().__init__(clip, tokenizer, cfg)
        self._teachers: dict[tuple, torch.Tensor] = {}
        self._classnames: tuple[str, ...] = ()
        self._images = self._image = None
        self._zs_image: tuple[torch.Tensor, torch.Tensor] | None = None  # (images, their frozen features)

    def teacher_text(self, classnames: Sequence[str]) -> torch.Tensor:
        """t^zs [C, D]: the frozen model's unnormalised text features averaged over PROMPTSRC_TEMPLATES, then
        normalised (as the original; the zero-shot classifier averages normalised features instead)."""
        key = (tuple(classnames), self.ctx.device)
        if key not in self._teachers:
            with torch.no_grad():
                tokens = self.tokenizer(prompts(classnames, PROMPTSRC_TEMPLATES)).to(self.ctx.device)
                chunks = tokens.split(self.hp["prompt_chunk"])
                f = torch.cat([encode_text(self.clip, t, normalize=False) for t in chunks])
                f = f.to(self.dtype).view(len(PROMPTSRC_TEMPLATES), len(classnames), -1).mean(0)
            self._teachers[key] = F.normalize(f, dim=-1)
        return self._teachers[key]

    def class_features(self, classnames: Sequence[str], templates: Sequence[str],
                       image_features: torch.Tensor | None = None) -> torch.Tensor:
        self._classnames = tuple(classnames)
        return super().class_features(classnames, templates, image_features)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        f = super().encode_image(images)
        if self._learned:
            self._images, self._image = images, f  # for the image-side terms of `loss`
        return f

    def zero_shot_image(self) -> torch.Tensor:
        """f^zs of the last prompted batch: the frozen image tower (computed once per batch)."""
        if self._zs_image is None or self._zs_image[0] is not self._images:
            with torch.no_grad():
                self._zs_image = (self._images, Method.encode_image(self, self._images))
        return self._zs_image[1]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, log_p_zs: torch.Tensor | None,
             text: torch.Tensor | None = None, zs_text: torch.Tensor | None = None) -> torch.Tensor:
        """CE (+ the shared λ·KL when kl_weight > 0) + L_SCL on the batch last scored (`encode_image`)."""
        if self._image is None or not self._classnames:
            raise RuntimeError("PromptSRC's loss needs the batch's prompted image features: score the batch with "
                               "class_features and encode_image first (as glad_core.train.Step does)")
        teacher, f_zs = self.teacher_text(self._classnames), self.zero_shot_image()
        zs_logits = self.logit_scale * f_zs @ teacher.t()
        kl = F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(zs_logits, dim=-1), reduction="sum",
                      log_target=True) / logits.numel()
        return (super().loss(logits, labels, log_p_zs, text, zs_text)
                + self.hp["text_loss_weight"] * F.l1_loss(text, teacher)
                + self.hp["image_loss_weight"] * F.l1_loss(self._image, f_zs)
                + self.hp["logits_loss_weight"] * kl)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> GaussianPromptAggregation:
        return GaussianPromptAggregation(super().scheduler(optimizer, total_steps),
                                         [p for g in optimizer.param_groups for p in g["params"]], self.cfg.epochs,
                                         total_steps // self.cfg.epochs, self.hp["gpa_mean"], self.hp["gpa_std"])
