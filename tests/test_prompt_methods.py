"""CoOp, CoCoOp, KgCoOp as methods: their recipes, what they train, and their losses against direct computations."""
from __future__ import annotations

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


def test_sgd_with_a_constant_warm_up_epoch_then_cosine(tiny_clip):
    method = _method(tiny_clip, "coop", epochs=4)
    opt = method.optimizer(method.trainable())
    sched = method.scheduler(opt, total_steps=8)  # 2 steps per epoch, warm-up = 1 epoch
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert lrs[:2] == pytest.approx([1e-5, 1e-5])
    cosine = [0.002 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * k / 6)).item()) for k in range(6)]
    assert lrs[2:] == pytest.approx(cosine)


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


def test_kgcoop_term_against_a_direct_computation(tiny_clip):
    method = _method(tiny_clip, "kgcoop", hparams={"kg_weight": 2.0})
    with torch.no_grad():
        method.ctx.add_(0.05 * torch.randn_like(method.ctx))
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 0])
    step = Step(method, CLASSES, PLAIN)
    logits, text = step.forward(images)
    loss = method.loss(logits, labels, None, text, step.zs_text)
    hand = method.prompt_features(CLASSES, PLAIN)
    expected = F.cross_entropy(logits, labels) + 2.0 * sum(
        ((text[c] - hand[c]) ** 2).sum() for c in range(3)) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert (text - hand).abs().max() > 1e-4  # the term is not vacuous


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
        steps = 2 if protocol == "base_to_novel" else 3  # 1 shot of 5 base (10) classes, 4 per batch
        assert rec["train"]["steps"] == steps and 0 <= min(rec["metrics"].values()) <= 1
        assert set(rec["metrics"]) == ({"base", "novel", "hm"} if protocol == "base_to_novel"
                                       else {"tuxpaint", "clipart10", "average"})
