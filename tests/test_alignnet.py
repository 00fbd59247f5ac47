"""AlignNet (eq. 5) against an explicit concatenation MLP and a naive cosine computation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glad_core.alignnet import AlignNet


def _naive(net: AlignNet, f_i: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """f_t + MLP([f_i; f_t]) with the concatenation built explicitly, pair by pair."""
    mlp = nn.Sequential(net.first, *net.rest, net.last)
    out = torch.empty(len(f_i), len(f_t), f_t.shape[1])
    for b in range(len(f_i)):
        for c in range(len(f_t)):
            out[b, c] = f_t[c] + mlp(torch.cat([f_i[b], f_t[c]]))
    return out


def test_identity_at_init():
    net = AlignNet(8)
    f_i, f_t = torch.randn(3, 8), torch.randn(5, 8)
    torch.testing.assert_close(net(f_i, f_t), f_t.expand(3, 5, 8))


def test_forward_matches_concatenation():
    torch.manual_seed(0)
    net = AlignNet(8, hidden=(16, 12))
    nn.init.normal_(net.last.weight)
    f_i, f_t = torch.randn(3, 8), torch.randn(5, 8)
    torch.testing.assert_close(net(f_i, f_t), _naive(net, f_i, f_t), atol=1e-5, rtol=1e-5)


def test_chunked_logits_match_naive_cosine():
    torch.manual_seed(0)
    net = AlignNet(8)
    nn.init.normal_(net.last.weight, std=0.1)
    f_i, f_t = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(7, 8), dim=-1)
    adjusted = _naive(net, f_i, f_t)
    expected = 10.0 * torch.einsum("bd,bcd->bc", f_i, adjusted / adjusted.norm(dim=-1, keepdim=True))
    for chunk in (1, 3, 100):
        torch.testing.assert_close(net.logits(f_i, f_t, 10.0, chunk=chunk), expected, atol=1e-5, rtol=1e-5)


def test_gradients_flow_to_all_layers():
    net = AlignNet(8)
    f_i, f_t = torch.randn(2, 8), torch.randn(3, 8)
    net.logits(f_i, f_t, 1.0).sum().backward()
    assert net.last.weight.grad.abs().sum() > 0  # zero-init last layer still receives gradient
