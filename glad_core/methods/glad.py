"""GLAD and the rows of its ablation (paper Table 4); zero-shot CLIP (`zeroshot`) is in `base`.

    lora            LoRA on q, k, v of both towers (eq. 4)                row (a)
    lora+sam        (a) stepped with SAM                                  row (b)
    lora+gradreg    (a) stepped with the regularized gradient (Alg. 1)    row (c)
    lora+alignnet   (a) with AlignNet (eq. 5)                             row (d)
    glad            LoRA + AlignNet + regularized gradient, CE + KL       row (e)
    glad-nokl       (e) without the KL term                               row e-kl (ours)

GLAD's loss is CE + λ·KL(p_zero-shot ‖ p) (the paper's Fig. 2 caption, its only mention), λ =
`kl_weight`; the zero-shot distribution is the same model with LoRA and AlignNet off (`zero_shot()`),
on the same batch. Row (a) is "the original LoRA on CLIP" (section 4.1), trained with cross-entropy
only in CLIP-LoRA's code; rows (b)-(d) each add the one component the table names to (a), so they
are CE only too (our reading: Table 4 lists no KL component). The paper never ablates its KL term:
`glad-nokl` is GLAD without it, so (e) vs e-kl measures it. Every default is a parameter; each name
fixes only the default of its step rule (`step_rule`) and of λ.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from ..alignnet import AlignNet
from ..checks import in_range, positive_ints, subset_of
from ..lora import apply_lora, lora_disabled
from .base import STEP_RULE, Hparam, Method, register, switched_off

LORA_HPARAMS = {
    "rank": Hparam(8, "r, the rank of every LoRA update (paper: 8)", in_range(1)),
    "lora_scale": Hparam(0.25, "γ in eq. 4 (not stated by the paper)", in_range()),
    "lora_dropout": Hparam(0.25, "dropout on the input of the LoRA path (not stated; CLIP-LoRA's 0.25)",
                           in_range(0, 1, hi_open=True)),
    "lora_towers": Hparam(("image", "text"), "towers whose attention layers get LoRA (paper: both)",
                          subset_of(("image", "text"))),
    "step_rule": STEP_RULE,
}


@register("lora+gradreg", order=12, row="c", defaults={"step_rule": "gradreg"})
@register("lora+sam", order=11, row="b", defaults={"step_rule": "sam"})
@register("lora", order=10, row="a", published="clip_lora")
class LoRAMethod(Method):
    """LoRA (eq. 4) on the q, k, v projections of every attention layer of the chosen towers."""

    hparams = LORA_HPARAMS

    def __init__(self, clip: nn.Module, tokenizer: Callable, cfg):
        super().__init__(clip, tokenizer, cfg)
        apply_lora(clip, rank=self.hp["rank"], scale=self.lora_scale(), dropout=self.hp["lora_dropout"],
                   towers=self.hp["lora_towers"])

    def lora_scale(self) -> float:
        """γ of eq. 4."""
        return self.hp["lora_scale"]

    @property
    def text_trained(self) -> bool:
        return "text" in self.hp["lora_towers"]

    @contextmanager
    def zero_shot(self) -> Iterator[None]:
        with lora_disabled(self.clip):
            yield


@register("glad-nokl", order=15, row="e-kl", defaults={"step_rule": "gradreg"})
@register("glad", order=14, row="e", published="glad", defaults={"kl_weight": 1.0, "step_rule": "gradreg"})
@register("lora+alignnet", order=13, row="d")
class GladMethod(LoRAMethod):
    """LoRA with AlignNet (eq. 5): f̃_t = f_t + AlignNet([f_i; f_t]) per image and class."""

    hparams = {**LORA_HPARAMS,
               "alignnet_hidden": Hparam((256, 128), "hidden sizes of AlignNet's MLP (paper: 256, 128)", positive_ints)}

    def __init__(self, clip: nn.Module, tokenizer: Callable, cfg):
        super().__init__(clip, tokenizer, cfg)
        with torch.no_grad():
            dim = clip.encode_text(tokenizer(["a"])).shape[-1]
        self.alignnet = AlignNet(dim, tuple(self.hp["alignnet_hidden"]))
        self._aligned = True

    def logits(self, image_features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if self._aligned:
            return self.alignnet.logits(image_features, text, self.logit_scale)
        return super().logits(image_features, text)

    @contextmanager
    def zero_shot(self) -> Iterator[None]:
        with switched_off(self, "_aligned"), super().zero_shot():
            yield
