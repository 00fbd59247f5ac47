"""Methods as plug-ins: the registry, the contract every method keeps, saving exactly what it trains."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glad_core.methods import REGISTRY, Method, ablation_rows, build, load_trained, register, save_trained
from glad_core.methods.base import Hparam, switched_off
from glad_core.config import TrainConfig
from glad_core.train import evaluate, train
from glad_core.checks import in_range
from glad_core.lora import lora_disabled

CLASSES, TEMPLATES = ["red", "green", "blue"], ["a photo of {}."]

#: Methods conditioned on per-image descriptions: their versions of these contract tests are in test_mugcp.py.
DESCRIBED = {"mugcp"}


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
    assert ablation_rows() == {"a": "lora", "b": "lora+sam", "c": "lora+gradreg", "d": "lora+alignnet", "e": "glad",
                               "e-kl": "glad-nokl"}
    assert {REGISTRY[m].published for m in ("zeroshot", "lora", "glad")} == {"clip", "clip_lora", "glad"}
    with pytest.raises(ValueError, match="registered twice"):
        register("glad")(Method)


@pytest.mark.parametrize("name", [n for n in REGISTRY if n not in DESCRIBED])
def test_trained_state_is_exactly_what_requires_grad(tiny_clip, name):
    method = _method(tiny_clip, name)
    names = {k for k, p in method.named_parameters() if p.requires_grad}
    assert set(method.trained_state()) == names
    assert bool(names) == REGISTRY[name].trains
    frozen = [p for k, p in method.clip.named_parameters() if "lora_" not in k]
    assert frozen and not any(p.requires_grad for p in frozen)  # the backbone is frozen


@pytest.mark.parametrize("name", [n for n in REGISTRY if REGISTRY[n].trains and n not in DESCRIBED])
def test_zero_shot_switch_turns_every_trained_part_off(tiny_clip, name):
    """Inside zero_shot() the logits are those of the untouched backbone, computed directly."""
    clip, _, tok = tiny_clip
    images = torch.randn(2, 3, 32, 32)
    method = _method(tiny_clip, name)
    template = method.hp.get("template", TEMPLATES[0])  # a method with one template of its own uses it
    with torch.no_grad(), lora_disabled(clip):
        text = F.normalize(clip.encode_text(tok([template.format(c) for c in CLASSES])), dim=-1)
        expected = clip.logit_scale.exp() * F.normalize(clip.encode_image(images), dim=-1) @ text.T
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
        with switched_off(self, "_on"):
            yield


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


def _items(tmp_path, shots: int = 4) -> list:
    """`shots` solid-colour 32 x 32 images per class of CLASSES."""
    from PIL import Image

    from glad_core.data import Datum

    tmp_path.mkdir(parents=True, exist_ok=True)
    items = []
    for label, rgb in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220)]):
        for i in range(shots):
            path = tmp_path / f"{label}_{i}.png"
            Image.new("RGB", (32, 32), tuple(max(0, c - 20 * i) for c in rgb)).save(path)
            items.append(Datum(str(path), label, CLASSES[label]))
    return items


def test_train_config_checks_every_shared_knob():
    """The shared knobs are `Hparam`s too: a bad value is an error naming the knob, the value and the rule."""
    with pytest.raises(ValueError, match=r"'lr' = -3 of method 'glad' is invalid: must be in \(0, inf\]"):
        TrainConfig(alpha=5, rho=-1, lr=-3)
    with pytest.raises(ValueError, match=r"'alpha' = 5 of method 'glad' is invalid: must be in \[0, 1\]"):
        TrainConfig(alpha=5)
    with pytest.raises(ValueError, match=r"'rho' = -1 of method 'coop' is invalid"):
        TrainConfig(method="coop", rho=-1)
    with pytest.raises(ValueError, match=r"'epochs' = 2.5 .* expected int"):
        TrainConfig(epochs=2.5)
    with pytest.raises(ValueError, match=r"'aug_flip' = 1 .* expected bool"):
        TrainConfig(aug_flip=1)
    assert TrainConfig(lr="2e-3").lr == 0.002  # YAML 1.1's string floats are numbers


class Plugin(ClassBias):
    """A plug-in from outside the package, whose `heads` differs from GuiDG's (an int there)."""

    hparams = {**ClassBias.hparams,
               "heads": Hparam("auto", "'auto' or a number", lambda v: None if v == "auto" or (
                   isinstance(v, int) and v > 0) else "'auto' or an int > 0", types=(int, str))}


def test_a_plugin_registered_after_params_validates_and_runs(tiny_clip, tmp_path):
    """Registered after glad_core.params is imported: its keys validate by its own Hparam, through flat keys
    and method_settings, and a cell of it trains through `fit`."""
    from glad_core import params as P

    register("plugin", defaults={"epochs": 2, "batch_size": 4})(Plugin)
    try:
        base = {"datasets": ["tuxpaint"], "methods": ["plugin", "guidg"]}
        plugin, guidg = (c.train for c in P.cells({**base, "heads": 2}))  # a flat key: both declare it
        assert plugin.hparams["heads"] == 2 and guidg.hparams["heads"] == 2
        plugin, guidg = (c.train for c in P.cells({**base, "method_settings": {"plugin": {"heads": "auto"}}}))
        assert plugin.hparams["heads"] == "auto" and guidg.hparams["heads"] == 4  # its own type, not GuiDG's
        with pytest.raises(P.ParamError, match=r"'heads' = 'auto' .*checked by method 'guidg'"):
            P.validate({**base, "heads": "auto"})  # a flat key applies to every method declaring it
        with pytest.raises(P.ParamError, match=r"'method_settings.plugin.shift_scale' = -1 is invalid"):
            P.validate({**base, "method_settings": {"plugin": {"shift_scale": -1}}})
        with pytest.raises(P.ParamError, match=r"method_settings.plugin.rank.*not a setting of method 'plugin'"):
            P.validate({**base, "method_settings": {"plugin": {"rank": 2}}})
        (cell,) = P.cells({"datasets": ["tuxpaint"], "methods": ["plugin"], "shift_scale": 0.5, "device": "cpu"})
        assert (cell.train.epochs, cell.train.batch_size, cell.train.lr, cell.train.hparams) == (
            2, 4, 0.05, {"shift_scale": 0.5, "heads": "auto"})
        clip, _, tok = tiny_clip
        method = build(clip, tok, cell.train)
        res = method.fit(_items(tmp_path), CLASSES, TEMPLATES, progress=False)
        assert res.steps == 2 * 3 and method.shift.abs().sum() > 0
    finally:
        REGISTRY.pop("plugin")


def test_register_checks_the_defaults_it_is_given():
    with pytest.raises(ValueError, match=r"register\('x'\): default 'rank' is neither a shared knob"):
        register("x", defaults={"rank": 2})(ClassBias)
    with pytest.raises(ValueError, match=r"register\('x'\): default 'lr' = 0 is invalid"):
        register("x", defaults={"lr": 0})(ClassBias)
    assert "x" not in REGISTRY


def test_kl_weight_is_a_per_method_default():
    """Row (a) is the original LoRA (CE only), rows (b)-(d) add one component each; GLAD is CE + KL."""
    weights = {m: TrainConfig(method=m).kl_weight for m in ("lora", "lora+sam", "lora+gradreg", "lora+alignnet",
                                                            "glad", "glad-nokl", "clip_lora")}
    assert weights == {"lora": 0.0, "lora+sam": 0.0, "lora+gradreg": 0.0, "lora+alignnet": 0.0, "glad": 1.0,
                       "glad-nokl": 0.0, "clip_lora": 0.0}
    assert TrainConfig(method="lora", kl_weight=0.5).kl_weight == 0.5  # a given value wins


def test_clip_lora_recipe(tiny_clip, tmp_path):
    """CLIP-LoRA's recipe: scale α/√r, AdamW betas and decay, cosine to min_lr over iterations_per_shot x shots,
    one template, CE only, crop 0.08-1 with flip."""
    from PIL import Image

    from glad_core.data import Datum
    from glad_core.lora import LoRA

    method = _method(tiny_clip, "clip_lora", hparams={"iterations_per_shot": 3}, batch_size=2)
    cfg = method.cfg
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.kl_weight, cfg.aug_scale_min, cfg.aug_flip) == (
        2e-4, 1e-2, 2, 0.0, 0.08, True)
    scales = {m.scale for m in method.clip.modules() if isinstance(m, LoRA)}
    assert len(scales) == 1 and scales.pop() == pytest.approx(1 / 2 ** 0.5)
    assert {m.lora_A.shape[0] for m in method.clip.modules() if isinstance(m, LoRA)} == {2}
    opt = method.optimizer(method.trainable())
    assert opt.defaults["betas"] == (0.9, 0.999) and isinstance(opt, torch.optim.AdamW)
    clip, _, tok = tiny_clip
    with torch.no_grad():  # one template for every dataset, whatever the dataset's templates are
        expected = F.normalize(clip.encode_text(tok([f"a photo of a {c}." for c in CLASSES])), dim=-1)
        torch.testing.assert_close(method.class_features(CLASSES, ["itap of a {}.", "art of {}."]), expected)
    items = []
    for label in range(3):
        for i in range(2):  # 2 shots
            path = tmp_path / f"{label}_{i}.png"
            Image.new("RGB", (32, 32), (80 * label, 60 * i, 40)).save(path)
            items.append(Datum(str(path), label, CLASSES[label]))
    res = method.fit(items, CLASSES, TEMPLATES, progress=False)
    assert res.steps == 3 * 2  # iterations_per_shot x shots, over 2 epochs of 3 batches
    assert res.history[-1]["lr"] == pytest.approx(1e-6)  # cosine down to min_lr at the last step


PAPER_FILES = sorted((Path(__file__).resolve().parents[1] / "params").glob("*.yaml"))
BASELINE_RECIPES = {  # docs/recipes.md: what each baseline's public code runs (ViT-B/16, base-to-novel)
    "coop": {"lr": 0.002, "epochs": 200, "batch_size": 32, "weight_decay": 5e-4},
    "cocoop": {"lr": 0.002, "epochs": 10, "batch_size": 1, "weight_decay": 5e-4},
    "kgcoop": {"lr": 0.002, "epochs": 100, "batch_size": 128, "weight_decay": 5e-4, "kg_weight": 8.0},
    "clip_lora": {"lr": 2e-4, "batch_size": 32, "weight_decay": 1e-2, "rank": 2, "iterations_per_shot": 500},
}


@pytest.mark.parametrize("path", PAPER_FILES, ids=lambda p: p.name)
def test_paper_files_resolve_every_method_with_a_published_recipe_to_it(path):
    """Added to any paper file's grid, a method with a published recipe gets exactly its registered defaults
    (no flat key of the file reaches it), and GLAD gets the paper's values."""
    from glad_core import params as P

    recipes = [n for n, i in REGISTRY.items() if i.recipe]
    assert set(BASELINE_RECIPES) <= set(recipes) and {"erm_wf", "guidg", "clipood+guidg"} <= set(recipes)
    p = P.load(path, methods=[*recipes, "glad"], data_root="/data")
    for name in recipes:
        cfg = P.train_config(p, name, 1)
        assert cfg == TrainConfig(method=name, seed=1), name
        got = {**cfg.to_dict(), **cfg.hparams}
        assert {k: got[k] for k in BASELINE_RECIPES.get(name, {})} == BASELINE_RECIPES.get(name, {}), name
    glad = P.train_config(p, "glad", 1)
    assert (glad.epochs, glad.lr, glad.batch_size, glad.rho, glad.alpha, glad.aug_scale_min, glad.aug_flip) == (
        20, 1e-3, 32, 0.1, 0.5, 0.08, True)
    assert (glad.hparams["rank"], glad.hparams["alignnet_hidden"], glad.hparams["step_rule"]) == (8, (256, 128),
                                                                                                 "gradreg")


#: Small settings per method for the contract test (its own defaults train for minutes).
FAST_FIT = {"clip_lora": {"iterations_per_shot": 1}, "mugcp": {"scp": False, "vcp": False},
            **{n: {"iterations": 1, "expert_epochs": 1, "expert_eval_every": 1, "expert_batch_size": 4, "n_ctx": 2,
                   "aug_randaugment": False, "subdomains": 2}
               for n, i in REGISTRY.items() if i.cls.__module__.endswith(".guidg")}}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_fit_is_the_contract_for_every_method(tiny_clip, tmp_path, name):
    """Every registered method trains through `fit(items, classnames, templates, *, val_items, checkpoint,
    progress)` as the protocols call it (two source domains with val pools), changes what it trains, then
    evaluates; its record sections are plain data."""
    import json

    from glad_core.data import Datum

    items = [Datum(d.impath, d.label, d.classname, domain) for domain in ("photo", "sketch")
             for d in _items(tmp_path / domain, shots=1)]
    val = [Datum(d.impath, d.label, d.classname, domain) for domain in ("photo", "sketch")
           for d in _items(tmp_path / f"val_{domain}", shots=1)]
    method = _method(tiny_clip, name, epochs=1, batch_size=4, hparams=FAST_FIT.get(name, {}))
    before = {k: v.clone() for k, v in method.trained_state().items()}
    res = method.fit(items, CLASSES, TEMPLATES, val_items=val, checkpoint=tmp_path / "ckpt", progress=False)
    assert (res.steps > 0) == REGISTRY[name].trains
    after = method.trained_state()
    assert any(k not in before or not torch.equal(before[k], v) for k, v in after.items()) == REGISTRY[name].trains
    r = evaluate(method, items, CLASSES, TEMPLATES, tiny_clip[1], progress=False)
    assert 0 <= r["acc"] <= 1 and r["n"] == len(items)
    hook = method.extra_metrics()
    if hook is not None:
        with torch.no_grad(), method.inference():
            f = method.encode_image(torch.randn(3, 3, 32, 32))
            json.dumps(hook(f, torch.tensor([0, 1, 2])))
    json.dumps(method.record_info())
