"""GuiDG (AAAI 2026): domain experts guiding the fine-tuning of the image tower, and its baselines.

    Step 1   one CoOp expert per source domain: 16 context vectors ~ N(0, 0.02), "X .. X {class}.",
             frozen towers, CE, SGD (no momentum), selected on the domain's val pool every N epochs
    CMAttn   per head h (4, outputs averaged): q = W_h f, key_k = sum_c a_h[c] T_k[c] (Linear(C, 1)
             over the class axis of expert k's class features), w = softmax_k cos(q, key_k)
    Step 2   the image tower (a trainable copy; or LoRA on it, `tune: lora`) and CMAttn, AdamW;
             each iteration one batch per source domain (with replacement) from its val pool, the
             batches concatenated: L = sum_k w̄_k · CE(τ f T_kᵀ, y) over that mixed batch, w̄ = the
             CMAttn weights averaged over it (one vector per step, GuiDG's `train_resample`)
    Predict  logits = sum_k w_k τ f T_kᵀ, w averaged over chunks of `attn_batch` images in dataset
             order (the official evaluation, batch 36) or per image (`attention: image`)

Baselines (the paper's appendix Table 8 rows) and their guided versions, one class each:

    erm_wf   CE, then WiSE-FT after every epoch: θ ← (1 − α) θ_pretrained + α θ (α = 0.5; GuiDG's
             phase2.py loads the mix into the tower being trained, which goes on from it)
    ueo_wf   CE + μ Σ_k (mean entropy − entropy of the mean prediction) of each classifier k, on
             the mixed batch, not weighted by the attention (μ = 0.01), WiSE-FT
    clipood  margin-metric softmax τ (cos(f, T_c) − λ cos(T_y, T_c)), λ = 0.3, and the Beta moving
             average of the image tower (not the attention): θ̄ = Σ_{t=0..T} w_t θ_t / Σ_t w_t, θ_0 the
             weights before training, θ_t after step t, w_t = Beta(β, β) pdf((t + 0.5) / (T + 1)),
             β = 0.1 (GuiDG's code; its appendix says 0.5); the average is evaluated

Without `+guidg` the same loop runs with one classifier, the hand-written prompts (the universal
model); `guidg` is `erm_wf+guidg`. The pretrained tower stays in the backbone untouched: it is the
zero-shot model and WiSE-FT's θ_pretrained. With one source domain (or items without domains) the
source is dealt into `subdomains` random sub-domains (the appendix's Algorithm 1).
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import in_range, one_of
from ..lora import apply_lora, lora_disabled, lora_layers
from .base import STEP_RULE, Hparam, Method, register, switched_off
from .glad import LORA_HPARAMS
from .guidg_train import fit_guidg

GUIDG_DEFAULTS = {"lr": 5e-6, "weight_decay": 0.1, "epochs": 10, "batch_size": 12, "eval_batch_size": 36}
GUIDG_RECIPE = "GuiDG's code (glad_core/methods/guidg.py)"

COMMON_HPARAMS = {
    "iterations": Hparam(400, "step-2 iterations per epoch (GuiDG: 400)", in_range(1)),
    "tune": Hparam("full", "how the image tower is tuned: 'full' (the paper) or 'lora' (ours)", one_of(("full", "lora"))),
    "step_rule": STEP_RULE,
    "rank": LORA_HPARAMS["rank"],
    "lora_scale": LORA_HPARAMS["lora_scale"],
    "lora_dropout": LORA_HPARAMS["lora_dropout"],
    "subdomains": Hparam(4, "sub-domains a single source is dealt into (Algorithm 1; GuiDG's code: 4)", in_range(1)),
    "aug_randaugment": Hparam(True, "RandAugment(2, 9) on the step-2 batches (GuiDG: on)",
                              lambda v: None if isinstance(v, bool) else "must be true or false"),
}
GUIDE_HPARAMS = {
    "n_ctx": Hparam(16, "context tokens of an expert (GuiDG: 16, random init)", in_range(1)),
    "expert_epochs": Hparam(31, "epochs of an expert's few-shot loader (GuiDG: 31)", in_range(1)),
    "expert_lr": Hparam(1e-4, "SGD learning rate of the experts (GuiDG: 1e-4)", in_range(0, lo_open=True)),
    "expert_batch_size": Hparam(32, "expert batch size (GuiDG: 32)", in_range(1)),
    "expert_schedule_steps": Hparam(12400, "length of the experts' cosine schedule (GuiDG: 31 x 400)", in_range(1)),
    "expert_eval_every": Hparam(5, "selection on the val pool after epochs 1, 1 + N, 1 + 2N, ... (GuiDG: N = 5, "
                                "epochs 1, 6, ..., 31)", in_range(1)),
    "heads": Hparam(4, "heads of the cross-modal attention (GuiDG: 4)", in_range(1)),
    "attention": Hparam("batch", "inference weights: 'batch' (averaged over attn_batch images, official) or "
                        "'image' (per image)", one_of(("batch", "image"))),
    "attn_batch": Hparam(36, "images whose attention weights are averaged at inference (GuiDG: 36)", in_range(1)),
}
WISE_HPARAMS = {"wise_alpha": Hparam(0.5, "WiSE-FT: weight of the tuned tower after each epoch (0.5)", in_range(0, 1))}


class CrossModalAttention(nn.Module):
    """Weights over K experts [B, K] from image features f [B, D] and expert class features T [K, C, D]."""

    def __init__(self, dim: int, num_classes: int, heads: int = 4):
        super().__init__()
        self.query = nn.ModuleList(nn.Linear(dim, dim) for _ in range(heads))
        self.key = nn.ModuleList(nn.Linear(num_classes, 1) for _ in range(heads))

    def forward(self, f: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        dtype = self.query[0].weight.dtype  # fp32 (float64 in numerical checks)
        f, T = f.detach().to(dtype), T.detach().to(dtype)
        if T.shape[1] != self.key[0].in_features:
            raise ValueError(f"the attention was trained on {self.key[0].in_features} classes, got {T.shape[1]}: "
                             "GuiDG scores the label set it was trained on")
        out = 0.0
        for query, key in zip(self.query, self.key):
            keys = key(T.transpose(1, 2)).squeeze(-1)                               # [K, D]
            cos = F.cosine_similarity(query(f)[:, None, :], keys[None], dim=-1)     # [B, K]
            out = out + cos.softmax(dim=-1)
        return out / len(self.query)


def batch_mean_weights(w: torch.Tensor, chunk: int) -> torch.Tensor:
    """[B, K] weights replaced by their mean over consecutive chunks of `chunk` rows (the last may be shorter)."""
    return torch.cat([c.mean(0, keepdim=True).expand_as(c) for c in w.split(chunk)])


def ueo_term(logits: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean entropy of the predictions minus the entropy of their mean (UEO's objective, minimised), with
    GuiDG's log(p + 1e-5) (models.py `ent_loss`)."""
    p = logits.softmax(-1)
    mean_entropy = -(p * (p + eps).log()).sum(-1).mean()
    p_bar = p.mean(0)
    return mean_entropy + (p_bar * (p_bar + eps).log()).sum()


def margin_logits(f: torch.Tensor, T: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                  margin: float) -> torch.Tensor:
    """CLIPood's margin-metric logits τ (cos(f, T_c) − λ cos(T_y, T_c)), unit-norm f [B, D], T [C, D]."""
    return scale * (f @ T.t() - margin * (T @ T.t())[labels])


def beta_weight(step: int, total: int, beta: float) -> float:
    """CLIPood's BMA weight of iterate t (0 = before training, T = after the last of `total` steps): the
    Beta(β, β) density at (t + 0.5) / (T + 1)."""
    x = (step + 0.5) / (total + 1)
    log_b = 2 * math.lgamma(beta) - math.lgamma(2 * beta)
    return math.exp((beta - 1) * (math.log(x) + math.log1p(-x)) - log_b)


class BetaMovingAverage:
    """θ̄ = Σ_{t=0..T} w_t θ_t / Σ_t w_t over `params`, w_t = `beta_weight(t, T, β)`: θ_0 when built (the
    weights before training), θ_t at the t-th `update()` (GuiDG's / CLIPood's GeneralMovingAverage)."""

    def __init__(self, params: Sequence[nn.Parameter], total: int, beta: float):
        self.params, self.total, self.beta, self.t = list(params), total, beta, 0
        self.weight = beta_weight(0, total, beta)
        self.sum = [p.detach().clone().mul_(self.weight) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.t += 1
        w = beta_weight(self.t, self.total, self.beta)
        for a, p in zip(self.sum, self.params):
            a.add_(p.detach(), alpha=w)
        self.weight += w

    @torch.no_grad()
    def load(self) -> None:
        """The average into the parameters."""
        for a, p in zip(self.sum, self.params):
            p.copy_(a / self.weight)


@register("guidg", order=32, recipe=GUIDG_RECIPE, guided=True)
@register("erm_wf+guidg", order=31, published="erm_wf+guidg", recipe=GUIDG_RECIPE, guided=True)
@register("erm_wf", order=30, published="erm_wf", recipe=GUIDG_RECIPE, guided=False)
class GuiDG(Method):
    """ERM (WF), optionally guided by GuiDG's domain experts (the others derive from it)."""

    hparams: ClassVar[dict[str, Hparam]] = {**COMMON_HPARAMS, **GUIDE_HPARAMS, **WISE_HPARAMS}
    defaults = GUIDG_DEFAULTS
    # its own transforms and loss: no aug_scale_min / aug_flip, no kl_weight
    reads = tuple(k for k in Method.reads if k not in ("kl_weight", "aug_scale_min", "aug_flip"))
    builds_in_fit: ClassVar[bool] = True  # the experts and the attention exist only after `fit`

    def __init__(self, clip: nn.Module, tokenizer: Callable, cfg, guided: bool = True):
        super().__init__(clip, tokenizer, cfg)
        self.guided = guided
        if self.hp["tune"] == "lora":
            apply_lora(clip, rank=self.hp["rank"], scale=self.hp["lora_scale"], dropout=self.hp["lora_dropout"],
                       towers=("image",))
            self.visual = None
        else:  # a trainable copy: the backbone keeps the pretrained tower (zero-shot, WiSE-FT's anchor)
            self.visual = copy.deepcopy(clip.visual).requires_grad_(True)
        self.expert_names: list[str] = []
        self.classnames: list[str] = []
        self.attn: CrossModalAttention | None = None
        self.register_buffer("expert_text", torch.empty(0), persistent=False)
        self._tuned = True

    # --- scoring ----------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if self.visual is not None and self._tuned:
            return F.normalize(self.visual(images).float(), dim=-1)
        return super().encode_image(images)

    @classmethod
    def batch_dependent(cls, hp: dict) -> bool:
        """Batch-averaged attention: the weights of a test image depend on its evaluation batch's others."""
        return hp["attention"] == "batch"

    @property
    def has_experts(self) -> bool:
        return self.guided and self.attn is not None

    def extra_metrics(self):
        """The guided methods' `guidance_metrics` (after `fit`)."""
        return self.guidance_metrics if self.has_experts else None

    def class_features(self, classnames: Sequence[str], templates: Sequence[str],
                       image_features: torch.Tensor | None = None) -> torch.Tensor:
        """The experts' class features [K, C, D] once trained (else the hand-written prompts' [C, D])."""
        if not (self._tuned and self.has_experts):
            return self.prompt_features(classnames, templates)
        if list(classnames) != self.classnames:
            raise ValueError(f"GuiDG's experts and attention were trained on the classes {self.classnames[:5]}...; "
                             f"got {list(classnames)[:5]}...: evaluate on the training label set")
        return self.expert_text

    def weights(self, f: torch.Tensor, T: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Inference weights [B, K]: per image, or averaged over `attn_batch` consecutive images."""
        w = self.attn(f, T)
        return w if (mode or self.hp["attention"]) == "image" else batch_mean_weights(w, self.hp["attn_batch"])

    def expert_logits(self, f: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        """τ f T_kᵀ for every expert: [K, B, C]."""
        return self.logit_scale * torch.einsum("bd,kcd->kbc", f, T)

    def logits(self, image_features: torch.Tensor, text: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """[C, D] text: cosine logits; [K, C, D] expert features: sum_k w_k τ f T_kᵀ."""
        if text.dim() == 2:
            return super().logits(image_features, text)
        w = self.weights(image_features, text, mode)
        return torch.einsum("bk,kbc->bc", w, self.expert_logits(image_features, text))

    @torch.no_grad()
    def guidance_metrics(self, f: torch.Tensor, labels: torch.Tensor) -> dict:
        """Accuracy with batch-averaged and per-image weights, each expert's own accuracy, the mean weights."""
        if not self.has_experts:
            return {}
        T = self.expert_text
        acc = {m: (self.logits(f, T, m).argmax(-1) == labels).float().mean().item() for m in ("batch", "image")}
        experts = (self.expert_logits(f, T).argmax(-1) == labels).float().mean(1)
        w = self.attn(f, T).mean(0)
        return {"acc_batch": acc["batch"], "acc_image": acc["image"],
                "experts": dict(zip(self.expert_names, experts.tolist())),
                "mean_weights": dict(zip(self.expert_names, w.tolist()))}

    @contextmanager
    def zero_shot(self) -> Iterator[None]:
        """The pretrained tower (LoRA off) with the hand-written prompts."""
        with switched_off(self, "_tuned"), lora_disabled(self.clip):
            yield

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The tuned tower (or its LoRA), the attention and the experts' contexts (frozen in step 2)."""
        state = super().trained_state()
        if self.has_experts:
            state.update({k: p.detach().cpu().contiguous() for k, p in self.named_parameters() if k.startswith("ctx")})
        return state

    # --- the objective (overridden by the baselines) ----------------------------------------------
    def classifier_logits(self, f: torch.Tensor, T: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training logits of every classifier, [K, B, C]."""
        return self.expert_logits(f, T)

    def classifier_term(self, logits: torch.Tensor) -> torch.Tensor | float:
        """A term of one classifier's logits [B, C] added unweighted by the attention (default none)."""
        return 0.0

    def guided_loss(self, f: torch.Tensor, labels: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        """sum_k w̄_k CE(z_k, y) + sum_k term(z_k) on the batch of all sources, z_k = classifier k's logits,
        w̄ the attention weights averaged over that batch (1 without experts), as GuiDG's `train_resample`."""
        logits = self.classifier_logits(f, T, labels)
        ce = torch.stack([F.cross_entropy(z, labels) for z in logits])
        w = self.attn(f, T).mean(0) if self.attn is not None else torch.ones_like(ce)
        return (w * ce).sum() + sum(self.classifier_term(z) for z in logits)

    def after_epoch(self) -> None:
        """WiSE-FT: the tuned tower moved halfway (`wise_alpha`) back to the pretrained one."""
        wise_ft_(self, self.hp["wise_alpha"])

    def image_tower_parameters(self) -> list[nn.Parameter]:
        """The trained parameters of the image tower (its copy or its LoRA): all but the attention's."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("attn.")]

    def before_training(self, total: int) -> None:
        """Hook before step 2's first of `total` steps (CLIPood starts its moving average)."""

    def after_step(self, step: int, total: int) -> None:
        """Per-step hook (the Beta moving average of CLIPood)."""

    def finish(self) -> None:
        """End-of-training hook (CLIPood loads its moving average)."""

    # --- training ---------------------------------------------------------------------------------
    def new_attention(self, dim: int, n_classes: int) -> CrossModalAttention:
        """A fresh cross-modal attention over `n_classes` classes of dimension `dim` (`heads` heads)."""
        return CrossModalAttention(dim, n_classes, self.hp["heads"])

    def fit(self, items: Sequence, classnames: Sequence[str], templates: Sequence[str], *,
            val_items: Sequence | None = None, checkpoint: str | Path | None = None, progress: bool = True):
        """Step 1 (experts, when guided) then step 2 on `items` grouped by `Datum.domain`.

        `val_items`: the sources' val pools (step 2's data, experts' selection); without them each
        domain's items are split per class 50 / 50. The staged fit does not resume: `checkpoint` is unused."""
        return fit_guidg(self, items, classnames, templates, val_items, progress)


def wise_ft_(method: GuiDG, alpha: float) -> None:
    """θ ← (1 − α) θ_pretrained + α θ on the tuned tower; with LoRA, B ← α B (exactly that in weight space)."""
    with torch.no_grad():
        if method.visual is not None:
            for p, p0 in zip(method.visual.parameters(), method.clip.visual.parameters()):
                p.mul_(alpha).add_(p0.to(p.dtype), alpha=1 - alpha)
        for layer in lora_layers(method.clip):
            for lora, _ in layer.adapters():
                lora.lora_B.mul_(alpha)


@register("ueo_wf+guidg", order=34, published="ueo_wf+guidg", recipe=GUIDG_RECIPE, guided=True)
@register("ueo_wf", order=33, published="ueo_wf", recipe=GUIDG_RECIPE, guided=False)
class UEO(GuiDG):
    """UEO (WF): CE plus μ (mean entropy − entropy of the mean) per classifier, WiSE-FT after each epoch."""

    hparams = {**GuiDG.hparams, "ueo_weight": Hparam(0.01, "μ of the UEO term (GuiDG's code: 0.01)", in_range(0))}

    def classifier_term(self, logits: torch.Tensor) -> torch.Tensor:
        return self.hp["ueo_weight"] * ueo_term(logits)


@register("clipood+guidg", order=36, published="clipood+guidg", recipe=GUIDG_RECIPE, guided=True)
@register("clipood", order=35, published="clipood", recipe=GUIDG_RECIPE, guided=False)
class CLIPood(GuiDG):
    """CLIPood: margin-metric softmax and the Beta moving average of the parameters (evaluated)."""

    hparams = {**COMMON_HPARAMS, **GUIDE_HPARAMS,
               "margin": Hparam(0.3, "λ of the margin-metric softmax (CLIPood: 0.3)", in_range(0)),
               "bma_beta": Hparam(0.1, "β of the Beta moving average (GuiDG's code: 0.1; its appendix: 0.5)",
                                  in_range(0, lo_open=True))}

    def classifier_logits(self, f: torch.Tensor, T: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.stack([margin_logits(f, t, labels, self.logit_scale, self.hp["margin"]) for t in T])

    def after_epoch(self) -> None:
        """No WiSE-FT: CLIPood averages over steps instead."""

    def before_training(self, total: int) -> None:
        self._bma = BetaMovingAverage(self.image_tower_parameters(), total, self.hp["bma_beta"])

    def after_step(self, step: int, total: int) -> None:
        self._bma.update()

    def finish(self) -> None:
        self._bma.load()

