"""Prompt learning: learned context reproduces hand-written prompts, batching, chunking, gradients, errors."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from glad_core.prompts import PromptLearner, handcrafted_features, meta_net, token_embedding

NAMES = ["cat", "sea_lion", "yorkshire terrier", "x-ray", "kite (bird of prey)"]  # "x" is also the placeholder;
# CLIP merges ")." into one token: the context must not rely on the class name and "." tokenizing apart
TINY_CUSTOM_TEXT = {  # CLIP's causal text transformer as `model.text` (open_clip's CustomTextCLIP)
    "embed_dim": 32, "custom_text": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def glad_mini():
    from glad_core.models import load_backbone

    model, _, tokenizer = load_backbone("glad-mini")
    return model, tokenizer


@pytest.fixture()
def tiny_custom_text(tmp_path):
    (tmp_path / "glad-tiny-custom-text.json").write_text(json.dumps(TINY_CUSTOM_TEXT))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    model = open_clip.create_model("glad-tiny-custom-text", pretrained=None).eval()
    return model, open_clip.get_tokenizer("glad-tiny-custom-text")


@pytest.fixture(params=["glad-mini", "clip", "custom-text"])
def tower(request):
    """(model, tokenizer) of each tower kind: Hugging Face (MiniLM), CLIP, CLIP's text transformer as `model.text`."""
    if request.param == "glad-mini":
        return request.getfixturevalue("glad_mini")
    if request.param == "clip":
        model, _, tokenizer = request.getfixturevalue("tiny_clip")
        return model, tokenizer
    return request.getfixturevalue("tiny_custom_text")


def plain(model, tokenizer, texts):
    """Normalised features of literal prompts through open_clip's own encode_text (full context)."""
    with torch.no_grad():
        return model.encode_text(tokenizer(texts), normalize=True)


@pytest.mark.parametrize("position, template", [("end", "a photo of a {}."), ("middle", "a photo {} of a."),
                                                ("front", "{} a photo of a.")])
def test_context_from_phrase_reproduces_the_literal_prompt(tower, position, template):
    model, tokenizer = tower
    pl = PromptLearner(model, tokenizer, NAMES, n_ctx=4, init="a photo of a", position=position)
    expected = plain(model, tokenizer, [template.format(n.replace("_", " ")) for n in NAMES])
    with torch.no_grad():
        torch.testing.assert_close(pl(), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(pl(chunk=3), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(handcrafted_features(model, tokenizer, NAMES, [template]), expected, atol=1e-5, rtol=0)


def test_placeholders_sit_where_the_context_goes(glad_mini):
    model, tokenizer = glad_mini
    pl = PromptLearner(model, tokenizer, ["yorkshire terrier"], n_ctx=4, position="middle")
    assert pl.layout("yorkshire terrier") == "X X yorkshire terrier X X."
    row = pl.tokens[0].tolist()
    x = tokenizer(["X"])[0, 1].item()
    assert row == tokenizer(["X X yorkshire terrier X X."])[0, :len(row)].tolist()
    assert [i for i, t in enumerate(row) if t == x] == pl.ctx_positions[0].tolist() == [1, 2, 6, 7]


def test_only_context_and_meta_net_get_gradients(tower):
    model, tokenizer = tower
    pl = PromptLearner(model, tokenizer, NAMES, n_ctx=4)
    assert [n for n, _ in pl.named_parameters()] == ["ctx"] and list(pl.state_dict()) == ["ctx"]
    torch.manual_seed(1)
    d = pl().shape[-1]
    net = meta_net(d, pl.d_token, reduction=4)
    f_i = F.normalize(torch.randn(3, d), dim=-1)
    t = pl(net(f_i)[:, None])  # [B, C, D]
    logits = 10 * torch.einsum("bd,bcd->bc", f_i, t)
    F.cross_entropy(logits, torch.tensor([0, 1, 3])).backward()
    assert pl.ctx.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_context_gradient_matches_finite_differences(tiny_clip):
    model, _, tokenizer = tiny_clip
    model.double()
    pl = PromptLearner(model, tokenizer, NAMES, n_ctx=3, position="middle").double()
    torch.manual_seed(2)
    f_i = F.normalize(torch.randn(2, 32, dtype=torch.float64), dim=-1)
    shift = torch.randn(2, 3, pl.d_token, dtype=torch.float64) * 0.02

    def loss() -> torch.Tensor:
        return F.cross_entropy(20 * torch.einsum("bd,bcd->bc", f_i, pl(shift)), torch.tensor([1, 2]))

    loss().backward()
    direction = torch.randn_like(pl.ctx)
    eps = 1e-6
    with torch.no_grad():
        pl.ctx += eps * direction
        up = loss()
        pl.ctx -= 2 * eps * direction
        down = loss()
    torch.testing.assert_close((up - down) / (2 * eps), (pl.ctx.grad * direction).sum(), atol=1e-7, rtol=1e-5)


def test_class_specific_context(glad_mini):
    model, tokenizer = glad_mini
    pl = PromptLearner(model, tokenizer, ["cat", "sea lion"], n_ctx=4, init="a photo of a", class_specific=True)
    assert pl.ctx.shape == (2, 4, pl.d_token)
    with torch.no_grad():
        pl.ctx[1] = token_embedding(model)(tokenizer(["a sketch of a"])[0, 1:5])
    expected = plain(model, tokenizer, ["a photo of a cat.", "a sketch of a sea lion."])
    t = pl()
    torch.testing.assert_close(t, expected, atol=1e-5, rtol=0)
    t[0].sum().backward()  # class 0's feature depends on class 0's context alone
    assert pl.ctx.grad[0].abs().sum() > 0 and pl.ctx.grad[1].abs().sum() == 0


def test_per_image_shift_batched_equals_loop_and_shifted_context(tower):
    model, tokenizer = tower
    pl = PromptLearner(model, tokenizer, NAMES, n_ctx=4)
    torch.manual_seed(3)
    shift = torch.randn(2, 4, pl.d_token) * 0.05
    with torch.no_grad():
        batched = pl(shift)
        assert batched.shape[:2] == (2, len(NAMES))
        looped = torch.stack([pl(shift[b:b + 1])[0] for b in range(2)])
        torch.testing.assert_close(batched, looped, atol=1e-5, rtol=0)
        torch.testing.assert_close(pl(shift, chunk=3), batched, atol=1e-5, rtol=0)  # chunks across images
        ctx = pl.ctx.clone()
        for b in range(2):  # independent: a learner whose own context is ctx + shift[b]
            pl.ctx.copy_(ctx + shift[b])
            torch.testing.assert_close(batched[b], pl(), atol=1e-5, rtol=0)
        one = torch.randn(2, 1, pl.d_token) * 0.05  # one shift for every context token (CoCoOp's meta-net)
        torch.testing.assert_close(pl(one), pl(one.expand(-1, 4, -1).contiguous()), atol=1e-6, rtol=0)


def test_chunked_gradients_equal_unchunked(tiny_clip):
    model, _, tokenizer = tiny_clip
    pl = PromptLearner(model, tokenizer, NAMES, n_ctx=4, class_specific=True)
    shift = torch.randn(2, 4, pl.d_token) * 0.05
    grads = []
    for chunk in (None, 3):
        pl.ctx.grad = None
        (pl(shift, chunk=chunk) ** 3).sum().backward()
        grads.append(pl.ctx.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_saved_context_reloads(glad_mini):
    model, tokenizer = glad_mini
    torch.manual_seed(4)
    a = PromptLearner(model, tokenizer, NAMES, n_ctx=6)
    torch.manual_seed(5)
    b = PromptLearner(model, tokenizer, NAMES, n_ctx=6)
    with torch.no_grad():
        assert (a() - b()).abs().max() > 1e-4
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(a(), b(), atol=0, rtol=0)


def test_too_long_context_names_the_class_and_lengths(glad_mini):
    model, tokenizer = glad_mini
    assert tokenizer.context_length == 32
    PromptLearner(model, tokenizer, ["cat", "sea lion"], n_ctx=27)  # 2 + 27 + 2 + 1 = 32 tokens: fits
    with pytest.raises(ValueError, match=r"class 'sea lion' needs 33 tokens.*context length is 32.*n_ctx <= 27"):
        PromptLearner(model, tokenizer, ["cat", "sea lion"], n_ctx=28)


def test_bad_arguments(tiny_clip):
    model, _, tokenizer = tiny_clip
    with pytest.raises(ValueError, match="init phrase 'a photo of a' has 4 tokens but n_ctx=16"):
        PromptLearner(model, tokenizer, NAMES, n_ctx=16, init="a photo of a")
    with pytest.raises(ValueError, match="unknown prompt position"):
        PromptLearner(model, tokenizer, NAMES, position="start")
    pl = PromptLearner(model, tokenizer, NAMES)
    with pytest.raises(ValueError, match=r"shift must be \[B, 4 or 1, 64\]"):
        pl(torch.zeros(2, 3, 64))
    with pytest.raises(TypeError, match="causal text transformer"):
        token_embedding(torch.nn.Linear(2, 2))
