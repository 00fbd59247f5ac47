"""CoOp, CoCoOp, KgCoOp as methods: their recipes, what they train, and their losses against direct computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from glad_core.methods import build
from glad_core.config import TrainConfig
from glad_core.train import Step

CLASSES, NOVEL = ["red", "green", "blue"], ["yellow", "black"]
PLAIN = ["a photo of a {}."]


def _method(tiny_clip, name: str, **kw):
    clip, _, tok = tiny_clip
    return build(clip, tok, TrainConfig(method=name, device="cpu", **kw))


@pytest.mark.parametrize("name", ["coop", "kgcoop"])
def test_context_from_a_photo_of_a_starts_at_the_plain_prompt_on_any_class_set(tiny_clip, name):
    method = _method(tiny_clip, name)
    with torch.no_grad():
        for classes in (CLASSES, NOVEL):  # base and novel classes share the context
            torch.testing.assert_close(method.class_features(classes, ["itap of a {}."]),
                                       method.prompt_features(classes, PLAIN), atol=1e-5, rtol=1e-5)


def test_recipes_from_the_public_configs():
    coop, cocoop, kgcoop = (TrainConfig(method=m) for m in ("coop", "cocoop", "kgcoop"))
    assert (coop.lr, coop.weight_decay, coop.batch_size, coop.epochs, coop.kl_weight) == (0.002, 5e-4, 32, 200, 0.0)
    assert (cocoop.batch_size, cocoop.epochs) == (1, 10) and (kgcoop.batch_size, kgcoop.epochs) == (128, 100)
    assert coop.hparams["n_ctx"] == 4 and coop.hparams["ctx_init"] == "a photo of a"
    assert kgcoop.hparams["kg_weight"] == 8.0 and (coop.aug_scale_min, coop.aug_flip) == (0.08, True)


class _LrProbe:
    """Stands in for `train.Step`: records the lr each step sees, no forward pass (`train`'s loop as is)."""

    def __init__(self, method, classnames, templates, optimizer=None):
        self.optimizer, self.lrs = optimizer, []
        _LrProbe.last = self

    def __call__(self, images, labels, first_logits):
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()  # no gradients: nothing moves
        first_logits.append(torch.zeros(len(labels), 2))
        return torch.tensor(0.0)


class _Blank(torch.utils.data.Dataset):
    def __init__(self, items, transform=None):
        self.n = len(items)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.zeros(1), 0


def _loop(monkeypatch, method, n: int):
    """`train` on n items with the probe step: (the lr of every step, the TrainResult)."""
    from glad_core import train as T
    from glad_core.data import Datum

    monkeypatch.setattr(T, "Step", _LrProbe)
    monkeypatch.setattr(T, "ImageDataset", _Blank)
    monkeypatch.setattr(T, "train_transform", lambda *a, **k: None)
    result = T.train(method, [Datum(f"{i}.png", 0, "x") for i in range(n)], CLASSES, PLAIN, progress=False)
    return _LrProbe.last.lrs, result


@pytest.mark.parametrize("case", ["coop", "cocoop", "kgcoop", "coop_short"])
def test_lr_of_every_step_equals_dassls(tiny_clip, monkeypatch, original, case):
    """Dassl's build_lr_scheduler stepped after each epoch's last batch, on the same set (tests/data/originals)."""
    ref = original("dassl")["schedules"][case]
    method = _method(tiny_clip, ref["method"], epochs=ref["epochs"])
    assert (method.cfg.batch_size, method.cfg.lr) == (ref["batch_size"], ref["lr"])
    lrs, result = _loop(monkeypatch, method, ref["items"])
    assert result.steps == ref["steps_per_epoch"] * ref["epochs"]
    assert lrs == pytest.approx(ref["lr_per_step"], rel=1e-9, abs=1e-15)
    assert lrs[::ref["steps_per_epoch"]] == pytest.approx(ref["lr_per_epoch"], rel=1e-9, abs=1e-15)
    assert sum(lrs) == pytest.approx(ref["lr_sum"], rel=1e-9) and min(lrs[ref["steps_per_epoch"]:]) > 0


def test_per_step_schedules_as_an_option_and_for_glad(tiny_clip, monkeypatch):
    lrs, _ = _loop(monkeypatch, _method(tiny_clip, "coop", epochs=3, hparams={"lr_per_epoch": False}), 64)
    cosine = [0.002 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx([1e-5, 1e-5, *cosine])  # 2 steps per epoch, warm-up = 1 epoch, cosine to 0
    lrs, _ = _loop(monkeypatch, _method(tiny_clip, "glad", epochs=2, batch_size=4), 10)  # GLAD: per step, kept
    assert lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)])


def test_steps_per_epoch_follow_dassls_drop_last_rule(tiny_clip, monkeypatch, original):
    """Dassl's train loader drops the last incomplete batch when the set holds at least one batch."""
    ref = original("dassl")["batches_per_epoch"]
    for name, sizes in ref.items():
        method = _method(tiny_clip, name, epochs=1)
        for n, batches in sizes.items():
            assert _loop(monkeypatch, method, int(n))[1].steps == batches, (name, n)
    keep = _method(tiny_clip, "coop", epochs=1, hparams={"drop_last": False})
    assert _loop(monkeypatch, keep, 80)[1].steps == 3  # the option: every item every epoch (Dassl: 2)


@pytest.mark.parametrize("name,trained", [("coop", {"ctx"}), ("kgcoop", {"ctx"}),
                                          ("cocoop", {"ctx", "meta_net.0.weight", "meta_net.0.bias",
                                                      "meta_net.2.weight", "meta_net.2.bias"})])
def test_gradients_reach_only_the_context_and_meta_net(tiny_clip, name, trained):
    method = _method(tiny_clip, name)
    assert set(method.trained_state()) == trained
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    step = Step(method, CLASSES, PLAIN)
    logits, text = step.forward(images)
    method.loss(logits, labels, None, text, step.zs_text).backward()
    grads = {k for k, p in method.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == trained and all(p.grad is None for p in method.clip.parameters())


def test_cocoop_batched_class_embeddings_equal_one_image_at_a_time(tiny_clip):
    method = _method(tiny_clip, "cocoop")
    with torch.no_grad():
        for p in method.meta_net.parameters():
            p.normal_(0, 0.1)
        f = F.normalize(torch.randn(3, method.prompt_features(["x"], ["{}"]).shape[-1]), dim=-1)
        batched = method.class_features(CLASSES, PLAIN, f)
        looped = torch.cat([method.class_features(CLASSES, PLAIN, f[i:i + 1]) for i in range(3)])
    assert batched.shape == (3, 3, f.shape[1])
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-4)  # per-image prompts differ


def test_kgcoop_loss_and_gradient_equal_the_original_code(tiny_clip, original):
    """KgCoOp's CustomCLIP.forward + forward_backward, run on these float64 tensors (tests/data/originals)."""
    ref = original("kgcoop")
    method = _method(tiny_clip, "kgcoop")
    assert method.hp["kg_weight"] == ref["W"]
    raw = torch.tensor(ref["text_features"], dtype=torch.float64, requires_grad=True)
    text = F.normalize(raw, dim=-1)
    f = F.normalize(torch.tensor(ref["image_features"], dtype=torch.float64), dim=-1)
    logits = math.exp(ref["logit_scale"]) * f @ text.t()
    zs_text = F.normalize(torch.tensor(ref["clip_text_features"], dtype=torch.float64), dim=-1)
    loss = method.loss(logits, torch.tensor(ref["labels"]), None, text, zs_text)
    loss.backward()
    assert loss.item() == pytest.approx(ref["loss"], rel=1e-12)
    torch.testing.assert_close(raw.grad, torch.tensor(ref["grad_text_features"], dtype=torch.float64),
                               rtol=1e-10, atol=1e-12)
    assert abs(ref["previous_form_8_mean_sq_dist"] - (ref["loss"] - ref["cross_entropy"])) > 1  # not the old form


def test_kgcoop_hand_written_prompts_are_kgcoops_own(tiny_clip):
    """KgCoOp's DTD prompt is "a photo of a {}, a type of texture." (CoOp's zero-shot one: "{} texture.")."""
    from glad_core.datasets import dataset_spec

    method = _method(tiny_clip, "kgcoop")
    dtd = list(dataset_spec("dtd").templates)
    with torch.no_grad(), method.zero_shot():
        hand = method.class_features(CLASSES, dtd)
        other = method.class_features(CLASSES, PLAIN)
    torch.testing.assert_close(hand, method.prompt_features(CLASSES, ["a photo of a {}, a type of texture."]))
    torch.testing.assert_close(other, method.prompt_features(CLASSES, PLAIN))  # every other dataset: CoOp's
    with torch.no_grad():
        assert not torch.allclose(hand, method.prompt_features(CLASSES, dtd), atol=1e-4)


@pytest.mark.parametrize("protocol", ["base_to_novel", "cross_dataset", "domain_generalization"])
def test_prompt_methods_run_in_every_protocol_on_an_open_clip_model(tiny_config, protocol, tmp_path):
    """coop, cocoop and kgcoop end to end (train, save, evaluate, record) on a tiny open_clip CLIP and
    the embedded Tux Paint photos; glad-mini runs them in the smoke notebooks."""
    from glad_core import params as P
    from glad_core.debian import DemoDataUnavailable
    from glad_core.prepare import prepare_demo_data
    from glad_core.protocols import run_cell

    try:
        prepare_demo_data(names=["tuxpaint", "clipart10"])
    except DemoDataUnavailable as e:
        pytest.skip(f"demo data unavailable here: {e}")
    p = {"protocol": protocol, "datasets": ["tuxpaint"], "methods": ["coop", "cocoop", "kgcoop"], "shots": 1,
         "epochs": 1, "batch_size": 4, "backbone": tiny_config, "pretrained": None, "device": "cpu",
         "results_dir": str(tmp_path), "targets": [] if protocol == "base_to_novel" else ["clipart10"]}
    for cell in P.cells(p):
        rec = run_cell(cell, progress=False)
        steps = 1 if protocol == "base_to_novel" else 2  # 1 shot of 5 base (10) classes, 4 per batch, last dropped
        assert rec["train"]["steps"] == steps and 0 <= min(rec["metrics"].values()) <= 1
        assert set(rec["metrics"]) == ({"base", "novel", "hm"} if protocol == "base_to_novel"
                                       else {"tuxpaint", "clipart10", "average"})
