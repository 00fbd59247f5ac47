"""LoRA (paper eq. 4):  h = W x + γ B (A x),  W frozen, A ∈ R^{r×d_in}, B ∈ R^{d_out×r} trained.

`A` starts Kaiming-uniform and `B` at zero, so an injected model starts equal to the frozen one.
The update is mergeable: W ← W + γ B A for inference (`merge_lora`), and back (`unmerge_lora`).

Three layer types are adapted, covering every CLIP tower open_clip builds:
- `nn.MultiheadAttention` with a packed `in_proj_weight` (OpenAI / OpenCLIP ViT towers and the
  text transformer): one adapter per projection among q, k, v, added to the packed projection;
- separate q / k / v `nn.Linear` layers (Hugging Face towers: BERT's query / key / value);
- 1x1 convolutions, for convolutional image towers that have no attention (EfficientNet): the
  pointwise convolution is the per-pixel linear map W x, so eq. 4 applies to it unchanged.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Names of separate q / k / v projections in common towers (HF BERT, ViT-style timm / HF models).
_LINEAR_NAMES = {"q": ("query", "q_proj", "q"), "k": ("key", "k_proj", "k"), "v": ("value", "v_proj", "v")}
_QKV = ("q", "k", "v")


class LoRA(nn.Module):
    """The low-rank update γ B(A x) of one projection d_in -> d_out."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """γ B(A x) over the last dimension of x."""
        return self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """γ B A, the update of the d_out x d_in weight."""
        return self.scale * (self.lora_B @ self.lora_A)


class _Adapted(nn.Module):
    """Shared state of an adapted layer: the frozen `base` layer, merge flag and on/off switch."""

    base: nn.Module
    merged: bool = False
    enabled: bool = True

    def adapters(self) -> Iterator[tuple[LoRA, slice]]:
        """Each adapter with the rows of the base weight it updates."""
        raise NotImplementedError

    def _fold(self, sign: float) -> None:
        w = self.base.weight if not isinstance(self.base, nn.MultiheadAttention) else self.base.in_proj_weight
        with torch.no_grad():
            for lora, rows in self.adapters():
                w[rows] += sign * lora.delta_weight().to(w.dtype).view_as(w[rows])

    def merge(self) -> None:
        if not self.merged:
            self._fold(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._fold(-1.0)
            self.merged = False

    @property
    def active(self) -> bool:
        """Whether forward must add the low-rank path (enabled and not already folded in)."""
        return self.enabled and not self.merged


class LoRALinear(_Adapted):
    """h = W x + γ B(A x) for an `nn.Linear`."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora = LoRA(base.in_features, base.out_features, rank, scale, dropout)

    def adapters(self) -> Iterator[tuple[LoRA, slice]]:
        yield self.lora, slice(None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return h + self.lora(x).to(h.dtype) if self.active else h


class LoRAConv1x1(_Adapted):
    """h = W x + γ B(A x) for a pointwise (1x1, stride 1, ungrouped) `nn.Conv2d`, per pixel."""

    def __init__(self, base: nn.Conv2d, rank: int, scale: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora = LoRA(base.in_channels, base.out_channels, rank, scale, dropout)

    def adapters(self) -> Iterator[tuple[LoRA, slice]]:
        yield self.lora, slice(None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if not self.active:
            return h
        return h + self.lora(x.movedim(1, -1)).movedim(-1, 1).to(h.dtype)


class LoRAMultiheadAttention(_Adapted):
    """`nn.MultiheadAttention` whose packed q, k, v projections get LoRA updates.

    q = W_q x_q + γ B_q(A_q x_q), likewise k and v; attention and the output projection are those
    of the frozen module. With all adapters merged (or disabled) it calls the frozen module itself.
    """

    def __init__(self, base: nn.MultiheadAttention, targets: Sequence[str], rank: int, scale: float,
                 dropout: float):
        super().__init__()
        if not base._qkv_same_embed_dim or not base.batch_first:
            raise ValueError("LoRA supports nn.MultiheadAttention with a packed in_proj_weight and "
                             "batch_first=True (as open_clip builds it).")
        self.base = base
        d = base.embed_dim
        self.lora = nn.ModuleDict({t: LoRA(d, d, rank, scale, dropout) for t in _QKV if t in targets})

    def adapters(self) -> Iterator[tuple[LoRA, slice]]:
        d = self.base.embed_dim
        for t, lora in self.lora.items():
            i = _QKV.index(t)
            yield lora, slice(i * d, (i + 1) * d)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
        if not self.active:
            return self.base(query, key, value, need_weights=need_weights, attn_mask=attn_mask,
                             key_padding_mask=key_padding_mask, **kwargs)
        if need_weights:
            raise ValueError("LoRA attention does not return attention weights; use need_weights=False.")
        m, d, H = self.base, self.base.embed_dim, self.base.num_heads
        w, b = m.in_proj_weight.chunk(3), (m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None,) * 3)
        qkv = []
        for i, (t, x) in enumerate(zip(_QKV, (query, key, value))):
            h = F.linear(x, w[i], b[i])
            if t in self.lora:
                h = h + self.lora[t](x).to(h.dtype)
            qkv.append(h.unflatten(-1, (H, d // H)).transpose(1, 2))  # [B, H, L, d_head]
        mask = _sdpa_mask(attn_mask, key_padding_mask, query.dtype)
        if mask is not None and mask.dim() == 3:  # [B * H, L, S] in nn.MultiheadAttention's convention
            mask = mask.unflatten(0, (-1, H))
        o = F.scaled_dot_product_attention(*qkv, attn_mask=mask,
                                           dropout_p=m.dropout if self.training else 0.0)
        return m.out_proj(o.transpose(1, 2).flatten(2)), None


def _sdpa_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention masks (bool True = masked out, or additive float) as one additive mask."""
    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = additive(attn_mask) if attn_mask is not None else None
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask)[:, None, None, :]
        mask = kpm if mask is None else mask + kpm
    return mask


def tower_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The image and text towers of an open_clip model (CLIP keeps its text modules at top level)."""
    towers = {"image": model.visual}
    if hasattr(model, "text"):
        towers["text"] = model.text
    else:
        towers["text"] = nn.ModuleList([model.transformer])
    return towers


def apply_lora(model: nn.Module, rank: int = 8, scale: float = 1.0, dropout: float = 0.0,
               targets: Sequence[str] = _QKV, towers: Sequence[str] = ("image", "text")) -> list[nn.Parameter]:
    """Freeze `model` and inject LoRA into the q / k / v projections of every attention layer.

    In a tower without attention layers (a CNN), LoRA goes into its 1x1 convolutions instead.
    Returns the trainable LoRA parameters (A and B of every adapter).
    """
    unknown = set(targets) - set(_QKV)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; allowed: {list(_QKV)}")
    for p in model.parameters():
        p.requires_grad_(False)
    all_towers = tower_modules(model)
    for name in towers:
        if name not in all_towers:
            raise ValueError(f"unknown tower {name!r}; allowed: {list(all_towers)}")
        if not _inject(all_towers[name], targets, rank, scale, dropout):
            raise ValueError(f"found no attention projections or 1x1 convolutions in the {name} tower "
                             f"({type(all_towers[name]).__name__}) to adapt")
    return [p for m in model.modules() if isinstance(m, LoRA) for p in m.parameters()]


def _inject(tower: nn.Module, targets: Sequence[str], rank: int, scale: float, dropout: float) -> int:
    """Replace the matching layers of one tower in place; returns how many were adapted."""
    def replace(pred, make) -> int:
        hits = [(parent, child_name, child) for parent in list(tower.modules())
                for child_name, child in parent.named_children() if pred(child_name, child)]
        for parent, child_name, child in hits:
            setattr(parent, child_name, make(child))
        return len(hits)

    linear_names = {n: t for t in targets for n in _LINEAR_NAMES[t]}
    n = replace(lambda _, c: isinstance(c, nn.MultiheadAttention),
                lambda c: LoRAMultiheadAttention(c, targets, rank, scale, dropout))
    n += replace(lambda name, c: isinstance(c, nn.Linear) and name in linear_names,
                 lambda c: LoRALinear(c, rank, scale, dropout))
    if n == 0:
        n = replace(lambda _, c: isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1)
                    and c.stride == (1, 1) and c.groups == 1,
                    lambda c: LoRAConv1x1(c, rank, scale, dropout))
    return n


def lora_layers(model: nn.Module) -> list[_Adapted]:
    return [m for m in model.modules() if isinstance(m, _Adapted)]


def merge_lora(model: nn.Module) -> None:
    """Fold γ B A into the frozen weights of every adapted layer (for fast inference)."""
    for m in lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora`, restoring the frozen weights (up to floating-point rounding)."""
    for m in lora_layers(model):
        m.unmerge()


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run the frozen model: adapters are bypassed (merged ones are unmerged for the duration)."""
    layers = lora_layers(model)
    merged = [m.merged for m in layers]
    for m in layers:
        m.unmerge()
        m.enabled = False
    try:
        yield
    finally:
        for m, was_merged in zip(layers, merged):
            m.enabled = True
            if was_merged:
                m.merge()
