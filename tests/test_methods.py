"""Methods as plug-ins: the registry, the contract every method keeps, saving exactly what it trains."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glad_core.methods import REGISTRY, Method, ablation_rows, build, load_trained, register, save_trained
from glad_core.methods.base import Hparam
from glad_core.train import TrainConfig, evaluate, train
from glad_core.checks import in_range

CLASSES, TEMPLATES = ["red", "green", "blue"], ["a photo of {}."]


def _method(tiny_clip, name: str, **kw) -> Method:
    clip, _, tok = tiny_clip
    return build(clip, tok, TrainConfig(method=name, device="cpu", **kw))


def _perturb(method: Method) -> None:
    """Move every trained tensor off its initialisation (B = 0, AlignNet output 0), as training does."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in method.trainable():
            p.add_(0.05 * torch.randn_like(p))


def _logits(method: Method, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        f = method.encode_image(images)
        return method.logits(f, method.class_features(CLASSES, TEMPLATES, f if method.per_image else None))


def test_registry_names_rows_and_published_columns():
    assert list(REGISTRY)[:6] == ["zeroshot", "lora", "lora+sam", "lora+gradreg", "lora+alignnet", "glad"]
    assert ablation_rows() == {"a": "lora", "b": "lora+sam", "c": "lora+gradreg", "d": "lora+alignnet", "e": "glad"}
    assert {REGISTRY[m].published for m in ("zeroshot", "lora", "glad")} == {"clip", "clip_lora", "glad"}
    with pytest.raises(ValueError, match="registered twice"):
        register("glad")(Method)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_trained_state_is_exactly_what_requires_grad(tiny_clip, name):
    method = _method(tiny_clip, name)
    names = {k for k, p in method.named_parameters() if p.requires_grad}
    assert set(method.trained_state()) == names
    assert bool(names) == REGISTRY[name].trains
    frozen = [p for k, p in method.clip.named_parameters() if "lora_" not in k]
    assert frozen and not any(p.requires_grad for p in frozen)  # the backbone is frozen


@pytest.mark.parametrize("name", [n for n in REGISTRY if REGISTRY[n].trains])
def test_zero_shot_switch_turns_every_trained_part_off(tiny_clip, name):
    """Inside zero_shot() the logits are those of the untouched backbone, computed directly."""
    clip, _, tok = tiny_clip
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        text = F.normalize(clip.encode_text(tok([TEMPLATES[0].format(c) for c in CLASSES])), dim=-1)
        expected = clip.logit_scale.exp() * F.normalize(clip.encode_image(images), dim=-1) @ text.T
    method = _method(tiny_clip, name)
    _perturb(method)
    method.eval()
    tuned = _logits(method, images)
    with method.zero_shot():
        torch.testing.assert_close(_logits(method, images), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tuned, expected, atol=1e-4)  # the perturbation is visible outside
    torch.testing.assert_close(_logits(method, images), tuned)  # and restored after


def test_save_and_load_reproduce_the_logits_and_refuse_other_methods(tiny_clip, tiny_config, tmp_path):
    import open_clip

    method = _method(tiny_clip, "glad", hparams={"rank": 4})
    _perturb(method)
    method.eval()
    path = save_trained(method, tmp_path / "glad.safetensors")
    images = torch.randn(2, 3, 32, 32)

    def fresh(name: str, **kw) -> Method:
        torch.manual_seed(0)
        clip = open_clip.create_model(tiny_config, pretrained=None).eval()
        return build(clip, open_clip.get_tokenizer(tiny_config), TrainConfig(method=name, device="cpu", **kw))

    loaded = fresh("glad", hparams={"rank": 4})
    load_trained(loaded, path)
    torch.testing.assert_close(_logits(loaded.eval(), images), _logits(method, images))
    with pytest.raises(ValueError, match=r"saved by method 'glad'.*does not match method 'lora'"):
        load_trained(fresh("lora", hparams={"rank": 4}), path)  # no AlignNet: unexpected tensors
    with pytest.raises(ValueError, match="other shape"):
        load_trained(fresh("glad", hparams={"rank": 2}), path)


def test_config_resolves_method_defaults_and_checks_hparams():
    assert TrainConfig(method="glad").hparams["alignnet_hidden"] == (256, 128)
    assert "alignnet_hidden" not in TrainConfig(method="lora").hparams
    assert TrainConfig(method="zeroshot").hparams == {}
    with pytest.raises(ValueError, match=r"method 'lora' has no hyper-parameter \['alignnet_hidden'\]"):
        TrainConfig(method="lora", hparams={"alignnet_hidden": (8,)})
    with pytest.raises(ValueError, match="'rank' = 0 of method 'glad' is invalid"):
        TrainConfig(method="glad", hparams={"rank": 0})
    with pytest.raises(ValueError, match="unknown method 'gald'"):
        TrainConfig(method="gald")
    flat = TrainConfig(method="glad", epochs=3, hparams={"rank": 2}).to_dict()
    assert flat["epochs"] == 3 and flat["rank"] == 2 and TrainConfig.from_params(flat) == TrainConfig(
        method="glad", epochs=3, hparams={"rank": 2})


class ClassBias(Method):
    """A toy method, as a newcomer writes one: a learned shift of every class embedding."""

    hparams = {"shift_scale": Hparam(1.0, "scale of the learned shift", in_range(0))}
    defaults = {"lr": 0.05, "kl_weight": 0.0}

    def __init__(self, clip: nn.Module, tokenizer, cfg):
        super().__init__(clip, tokenizer, cfg)
        self.shift = nn.Parameter(torch.zeros(clip.text_projection.shape[1]))
        self._on = True

    @property
    def text_trained(self) -> bool:
        return True

    def class_features(self, classnames, templates, image_features=None):
        t = self.prompt_features(classnames, templates)
        return F.normalize(t + self.hp["shift_scale"] * self.shift, dim=-1) if self._on else t

    @contextmanager
    def zero_shot(self):
        self._on = False
        try:
            yield
        finally:
            self._on = True


def test_a_new_method_is_one_class_and_runs_through_the_shared_loop(tiny_clip, tmp_path):
    from PIL import Image

    register("class-bias")(ClassBias)
    try:
        method = _method(tiny_clip, "class-bias", epochs=2, batch_size=4)
        assert method.cfg.lr == 0.05 and method.cfg.kl_weight == 0.0 and method.hp == {"shift_scale": 1.0}
        from glad_core.data import Datum
        items = []
        for label, rgb in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220)]):
            for i in range(4):
                path = tmp_path / f"{label}_{i}.png"
                Image.new("RGB", (32, 32), rgb).save(path)
                items.append(Datum(str(path), label, CLASSES[label]))
        res = train(method, items, CLASSES, TEMPLATES, progress=False)
        assert res.steps == 6 and method.shift.abs().sum() > 0
        r = evaluate(method, items, CLASSES, TEMPLATES, tiny_clip[1], progress=False)
        assert 0 <= r["acc"] <= 1 and r["n"] == 12
        assert set(method.trained_state()) == {"shift"}
    finally:
        REGISTRY.pop("class-bias")
