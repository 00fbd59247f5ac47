"""AlignNet (paper eq. 5): a per-image, per-class bias on the text feature.

    π = AlignNet([f_i; f_t]),   f̃_t = f_t + π

An MLP (2D -> 256 -> 128 -> D, ReLU) reads the concatenated image and text features. Its first
layer is split into an image half and a text half, W_1 [f_i; f_t] = W_i f_i + W_t f_t, so the
[B, C, 2D] concatenation is never built; its last layer starts at zero, so an untrained AlignNet
is the identity (f̃_t = f_t).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AlignNet(nn.Module):
    def __init__(self, dim: int, hidden: tuple[int, ...] = (256, 128)):
        super().__init__()
        self.dim = dim
        self.first = nn.Linear(2 * dim, hidden[0])
        layers: list[nn.Module] = []
        for h_in, h_out in zip(hidden, hidden[1:]):
            layers += [nn.ReLU(), nn.Linear(h_in, h_out)]
        self.rest = nn.Sequential(*layers, nn.ReLU())
        self.last = nn.Linear(hidden[-1], dim)
        nn.init.zeros_(self.last.weight)
        nn.init.zeros_(self.last.bias)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Adjusted text features f_t + π of shape [B, C, D] from f_i [B, D] and f_t [C, D]."""
        w_i, w_t = self.first.weight.split(self.dim, dim=1)
        h = (F.linear(image_features, w_i, self.first.bias)[:, None, :]   # W_i f_i + b   [B, 1, H]
             + F.linear(text_features, w_t)[None, :, :])                   # + W_t f_t     [B, C, H]
        return text_features[None] + self.last(self.rest(h))

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
               chunk: int = 256) -> torch.Tensor:
        """Cosine logits s · cos(f_i, f̃_t) of shape [B, C], computed `chunk` classes at a time."""
        f_i = F.normalize(image_features, dim=-1)
        out = [torch.einsum("bd,bcd->bc", f_i, F.normalize(self(f_i, t), dim=-1))
               for t in text_features.split(chunk)]
        return logit_scale * torch.cat(out, dim=1)
