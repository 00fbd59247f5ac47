"""Frozen image features cached (glad_core/feature_cache.py): a hit scores exactly as encoding does, any
change of weights, split or transform misses, files are written atomically, and what a method declares
frozen is frozen."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms

from glad_core import feature_cache as fc
from glad_core import params as P
from glad_core.config import TrainConfig
from glad_core.data import Datum
from glad_core.feature_cache import FeatureCache
from glad_core.methods import REGISTRY, build
from glad_core.train import evaluate

CLASSES, TEMPLATES = ["red", "green", "blue"], ["a photo of a {}."]


@pytest.fixture()
def items(tmp_path) -> list[Datum]:
    """Four noisy squares per colour class."""
    g = torch.Generator().manual_seed(0)
    out = []
    for label, rgb in enumerate(((220, 30, 30), (30, 200, 40), (30, 40, 220))):
        for i in range(4):
            px = (torch.tensor(rgb).view(3, 1, 1) + 60 * torch.randn(3, 32, 32, generator=g)).clamp(0, 255)
            path = tmp_path / "img" / f"{label}_{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(px.permute(1, 2, 0).byte().numpy()).save(path)
            out.append(Datum(str(path), label, CLASSES[label]))
    return out


def _method(tiny_clip, name="coop", **kw):
    clip, _, tok = tiny_clip
    return build(clip, tok, TrainConfig(method=name, device="cpu", eval_batch_size=5, **kw))


def _count_encodes(method, monkeypatch) -> list[int]:
    calls: list[int] = []
    real = type(method).encode_image

    def counted(self, images):
        calls.append(len(images))
        return real(self, images)

    monkeypatch.setattr(type(method), "encode_image", counted)
    return calls


def _predictions(method, items, transform) -> dict:
    return evaluate(method, items, CLASSES, TEMPLATES, transform, progress=False)


def test_a_hit_scores_exactly_as_encoding_and_encodes_nothing(tiny_clip, items, tmp_path, monkeypatch):
    method = _method(tiny_clip)
    with torch.no_grad():
        for p in method.trainable():  # a trained context: the text side differs from zero-shot
            p.normal_(0, 0.5)
    preprocess = tiny_clip[1]
    plain = _predictions(method, items, preprocess)
    method.feature_cache = FeatureCache(tmp_path / "cache")
    calls = _count_encodes(method, monkeypatch)
    miss = _predictions(method, items, preprocess)
    assert sum(calls) == len(items) and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    calls.clear()
    hit = _predictions(method, items, preprocess)
    assert calls == []  # read, not encoded
    assert plain == miss == hit
    # the same features straight from the encoder, in the same batches
    f, _ = fc.image_features(method, items, preprocess, 5, progress=False)
    stored, _ = method.feature_cache.image_features(method, items, preprocess, 5, progress=False)
    assert torch.equal(f, stored)


def test_per_image_method_hits_too(tiny_clip, items, tmp_path):
    """CoCoOp's class embeddings depend on each image's features: a hit gives the same accuracy."""
    method = _method(tiny_clip, "cocoop")
    plain = _predictions(method, items, tiny_clip[1])
    method.feature_cache = FeatureCache(tmp_path / "cache")
    assert _predictions(method, items, tiny_clip[1]) == plain == _predictions(method, items, tiny_clip[1])


def test_changed_transform_weights_or_items_miss(tiny_clip, items, tmp_path, monkeypatch):
    method = _method(tiny_clip, "zeroshot")
    cache = method.feature_cache = FeatureCache(tmp_path / "cache")
    calls = _count_encodes(method, monkeypatch)
    preprocess = tiny_clip[1]
    _predictions(method, items, preprocess)
    base = fc.split_key(method, items, preprocess)

    def misses(key_changed: dict, run) -> None:
        calls.clear()
        run()
        assert calls, "expected a miss"
        assert cache.path(key_changed) != cache.path(base) and cache.path(key_changed).is_file()

    other = transforms.Compose([transforms.Resize(40), preprocess])
    misses(fc.split_key(method, items, other), lambda: _predictions(method, items, other))
    fewer = items[:-1]
    misses(fc.split_key(method, fewer, preprocess), lambda: _predictions(method, fewer, preprocess))
    relabelled = [Datum(d.impath, (d.label + 1) % 3, d.classname) for d in items]
    misses(fc.split_key(method, relabelled, preprocess), lambda: _predictions(method, relabelled, preprocess))
    os.utime(items[0].impath, ns=(1, 1))  # the image file changed on disk
    misses(fc.split_key(method, items, preprocess), lambda: _predictions(method, items, preprocess))
    with torch.no_grad():
        next(method.clip.visual.parameters()).add_(0.01)  # other weights of the image tower
    misses(fc.split_key(method, items, preprocess), lambda: _predictions(method, items, preprocess))
    calls.clear()
    _predictions(method, items, preprocess)
    assert calls == []  # and the new state hits again


def test_weights_digest_is_of_the_state_dict(tiny_clip, tiny_config):
    import open_clip

    visual = tiny_clip[0].visual
    torch.manual_seed(0)
    same = open_clip.create_model_and_transforms(tiny_config, pretrained=None)[0].visual
    torch.manual_seed(1)
    other = open_clip.create_model_and_transforms(tiny_config, pretrained=None)[0].visual
    assert fc.weights_digest(visual) == fc.weights_digest(same) != fc.weights_digest(other)
    with torch.no_grad():
        same.conv1.weight[0, 0, 0, 0] += 1
    assert fc.weights_digest(same) != fc.weights_digest(visual)


def test_the_cache_file_is_written_atomically(tiny_clip, items, tmp_path, monkeypatch):
    """A write that fails midway leaves no file at the cache's path (and no temporary beside it)."""
    method = _method(tiny_clip, "zeroshot")
    method.feature_cache = cache = FeatureCache(tmp_path / "cache")

    def half_then_fail(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(fc.torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        _predictions(method, items, tiny_clip[1])
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    _predictions(method, items, tiny_clip[1])
    path = cache.path(fc.split_key(method, items, tiny_clip[1]))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]
    path.write_bytes(b"garbage")  # an unreadable file is recomputed and replaced
    assert _predictions(method, items, tiny_clip[1])["n"] == len(items) and path.stat().st_size > 7


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_declared_frozen_features_do_not_move_with_training(tiny_clip, name):
    """A method declaring frozen image features encodes the same whatever its trained parameters hold;
    the LoRA methods (which tune the image tower) do not declare them."""
    method = _method(tiny_clip, name)
    if name.startswith(("lora", "glad", "clip_lora")):
        assert not method.frozen_image_features
    if not method.frozen_image_features:
        return
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = method.encode_image(images)
        for p in method.trainable():
            p.add_(torch.randn_like(p))
        assert torch.equal(method.encode_image(images), before)


def test_no_feature_cache_switch():
    assert P.parse_overrides(["--no-feature-cache", "--epochs", "2"]) == {"feature_cache": False, "epochs": 2}
    with pytest.raises(P.ParamError):
        P.parse_overrides(["--no-epochs"])  # only a switch (a key whose default is a bool) has a --no- form
    on = P.cells({"datasets": ["tuxpaint"], "methods": ["coop"]})[0]
    off = P.cells({"datasets": ["tuxpaint"], "methods": ["coop"], "feature_cache": False})[0]
    assert on.feature_store() is not None and off.feature_store() is None
    assert on.identity() == off.identity() and on.record_path == off.record_path  # never the numbers
