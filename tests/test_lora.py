"""LoRA (eq. 4) against hand-computed (W + γBA)x, on all three adapted layer types."""
from __future__ import annotations

import torch
from torch import nn

import pytest

from glad_core.lora import (LoRAConv1x1, LoRALinear, LoRAMultiheadAttention, apply_lora, lora_disabled, lora_layers,
                            merge_lora, unmerge_lora)


def _randomize_B(model: nn.Module) -> None:
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)


def _outputs(model, tokens_len=16):
    torch.manual_seed(2)
    size = 32
    img = torch.randn(2, 3, size, size)
    tok = torch.randint(1, 99, (3, tokens_len))
    with torch.no_grad():
        return model.encode_image(img), model.encode_text(tok)


@pytest.mark.parametrize("fixture", ["tiny_clip", "tiny_hf_clip"])
def test_zero_B_leaves_outputs_unchanged(fixture, request):
    m = request.getfixturevalue(fixture)
    model = m[0] if isinstance(m, tuple) else m
    before = _outputs(model)
    params = apply_lora(model, rank=4, scale=2.0)
    assert params and all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in model.parameters()) == len(params)
    after = _outputs(model)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_layer_counts(tiny_clip, tiny_hf_clip):
    model = tiny_clip[0]
    apply_lora(model, rank=4)
    mha = [m for m in lora_layers(model) if isinstance(m, LoRAMultiheadAttention)]
    assert len(mha) == 4 and all(set(m.lora) == {"q", "k", "v"} for m in mha)  # 2 image + 2 text blocks
    apply_lora(tiny_hf_clip, rank=4)
    kinds = [type(m) for m in lora_layers(tiny_hf_clip)]
    assert kinds.count(LoRALinear) == 6 and kinds.count(LoRAConv1x1) == 2


def test_linear_matches_hand_computation():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=3, scale=0.7, dropout=0.0)
    layer.lora.lora_B.data.normal_()
    x = torch.randn(4, 6)
    W = base.weight + 0.7 * layer.lora.lora_B @ layer.lora.lora_A
    torch.testing.assert_close(layer(x), x @ W.T + base.bias)


def test_conv1x1_matches_hand_computation():
    torch.manual_seed(0)
    base = nn.Conv2d(6, 5, 1)
    layer = LoRAConv1x1(base, rank=3, scale=0.7, dropout=0.0)
    layer.lora.lora_B.data.normal_()
    x = torch.randn(2, 6, 4, 4)
    W = base.weight[:, :, 0, 0] + 0.7 * layer.lora.lora_B @ layer.lora.lora_A
    expected = torch.einsum("oc,bchw->bohw", W, x) + base.bias[None, :, None, None]
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [("q", "k", "v"), ("q", "v")])
def test_attention_matches_torch_mha_with_updated_weights(targets):
    torch.manual_seed(0)
    d, heads = 16, 4
    base = nn.MultiheadAttention(d, heads, batch_first=True)
    layer = LoRAMultiheadAttention(base, targets, rank=2, scale=0.5, dropout=0.0)
    for lora in layer.lora.values():
        lora.lora_B.data.normal_()
    # independent reference: torch's own MHA with in_proj_weight = W + γ [B_q A_q; B_k A_k; B_v A_v]
    ref = nn.MultiheadAttention(d, heads, batch_first=True)
    ref.load_state_dict(base.state_dict())
    with torch.no_grad():
        for i, t in enumerate("qkv"):
            if t in targets:
                lo = layer.lora[t]
                ref.in_proj_weight[i * d:(i + 1) * d] += 0.5 * lo.lora_B @ lo.lora_A
    x = torch.randn(3, 7, d)
    causal = torch.full((7, 7), float("-inf")).triu(1)
    for mask in (None, causal, causal.isinf()):
        out, _ = layer(x, x, x, need_weights=False, attn_mask=mask)
        expected, _ = ref(x, x, x, need_weights=False, attn_mask=mask)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_clip", "tiny_hf_clip"])
def test_merge_unmerge_and_disable(fixture, request):
    m = request.getfixturevalue(fixture)
    model = m[0] if isinstance(m, tuple) else m
    frozen_out = _outputs(model)
    apply_lora(model, rank=4)
    _randomize_B(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = _outputs(model)
    assert not torch.allclose(adapted[0], frozen_out[0], atol=1e-4)
    merge_lora(model)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    assert changed and all(k.endswith(("weight", "in_proj_weight")) for k in changed)
    for a, b in zip(_outputs(model), adapted):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with lora_disabled(model):
        for a, b in zip(_outputs(model), frozen_out):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(layer.merged for layer in lora_layers(model))  # merge state restored on exit
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)


def test_bad_arguments(tiny_clip):
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        apply_lora(tiny_clip[0], targets=("q", "z"))
    with pytest.raises(ValueError, match="unknown tower"):
        apply_lora(tiny_clip[0], towers=("audio",))


def test_gradients_reach_A_and_B_only(tiny_clip):
    model = tiny_clip[0]
    params = apply_lora(model, rank=4)
    _randomize_B(model)
    img = torch.randn(2, 3, 32, 32)
    model.encode_image(img).sum().backward()
    image_params = [p for p in params if p.grad is not None]
    assert image_params and all(p.grad.abs().sum() > 0 for p in image_params)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
