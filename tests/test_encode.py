"""Trimmed text encoding equals open_clip's full-context encoding."""
from __future__ import annotations

import torch

from glad_core.encode import class_text_features, encode_text, prompts, trim_padding
from glad_core.lora import apply_lora


def test_trim_padding():
    t = torch.tensor([[5, 6, 0, 0, 0], [7, 8, 9, 0, 0]])
    assert trim_padding(t).tolist() == [[5, 6, 0], [7, 8, 9]]


def test_clip_text_features_equal_full_context(tiny_clip):
    model, _, tokenizer = tiny_clip
    apply_lora(model, rank=4)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    tokens = tokenizer(["a photo of a cat.", "a centered satellite photo of annual crop land."])
    assert tokens.shape[1] == 16 and trim_padding(tokens).shape[1] < 16
    with torch.no_grad():
        torch.testing.assert_close(encode_text(model, tokens), model.encode_text(tokens, normalize=True),
                                   atol=1e-5, rtol=1e-5)


def test_hf_text_features_equal_full_length(tiny_hf_clip):
    tokens = torch.tensor([[3, 4, 5, 0, 0, 0, 0, 0], [3, 9, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(encode_text(tiny_hf_clip, tokens),
                                   tiny_hf_clip.encode_text(tokens, normalize=True), atol=1e-5, rtol=1e-5)


def test_class_features_average_templates(tiny_clip):
    model, _, tokenizer = tiny_clip
    names, tpls = ["cat", "dog_house"], ["a photo of a {}.", "a {} in the wild."]
    assert prompts(names, tpls)[1] == "a photo of a dog house."
    with torch.no_grad():
        feats = class_text_features(model, tokenizer, names, tpls)
        each = [model.encode_text(tokenizer([t.format(n.replace("_", " ")) for t in tpls]), normalize=True)
                for n in names]
    expected = torch.stack([torch.nn.functional.normalize(e.mean(0), dim=-1) for e in each])
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
