"""Deep prompts and IVLP / MaPLe / PromptSRC: equal to the original code's outputs (stored reference runs),
the zero-shot switch, the mechanism on every tower kind, what they train, saving, and every protocol."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import originals
from glad_core.deep_prompts import (DeepPromptLearner, split_init, text_blocks, text_prompts, vision_blocks,
                                    vision_prompts)
from glad_core.methods import build, load_trained, save_trained
from glad_core.methods.deep_prompts import GaussianPromptAggregation
from glad_core.config import TrainConfig
from glad_core.train import Step

DEEP = ["ivlp", "maple", "promptsrc"]
CLASSES, PLAIN = ["red", "green", "blue"], ["a photo of a {}."]
TOL = {"atol": 1e-5, "rtol": 0}
# The reference runs' settings in our hyper-parameters (depth 3 of the 4 blocks of each tower)
REFERENCE_HPARAMS = {"maple": {"prompt_depth": 3}, "ivlp": {"text_depth": 3, "vision_depth": 3},
                     "promptsrc": {"text_depth": 3, "vision_depth": 3}}


@pytest.fixture(scope="module")
def openai_random():
    return originals.open_clip_model()


def _reference_method(openai_random, name: str, trained: bool = True):
    model, tok = openai_random
    method = build(model, tok, TrainConfig(method=name, device="cpu", hparams=REFERENCE_HPARAMS[name]))
    if trained:
        values = originals.trained({k: tuple(v.shape) for k, v in method.trained_state().items()})
        method.load_state_dict(values, strict=False)
    return method


def _grads(method) -> dict[str, torch.Tensor]:
    """Our gradients as the reference stores them (a coupling matrix G as G·a and b·G, a, b = linspace(-1, 1))."""
    out = {}
    for k, p in method.named_parameters():
        if p.requires_grad:
            if k.startswith("coupling") and p.dim() == 2:
                out[f"grad.{k}.probe_in"] = p.grad @ torch.linspace(-1, 1, p.shape[1])
                out[f"grad.{k}.probe_out"] = torch.linspace(-1, 1, p.shape[0]) @ p.grad
            else:
                out[f"grad.{k}"] = p.grad
    return out


def _train_step(method, images, labels):
    method.train()
    step = Step(method, originals.CLASSNAMES, PLAIN)
    logits, text = step.forward(images)
    loss = method.loss(logits, labels, None, text, step.zs_text)
    loss.backward()
    return logits, text, loss


@pytest.mark.parametrize("name", ["maple", "ivlp"])
def test_features_logits_loss_and_gradients_equal_the_original_code(openai_random, name):
    facts, ref = originals.load(name)
    assert sorted(facts["names"].values()) == sorted(_reference_method(openai_random, name, False).trained_state())
    torch.testing.assert_close(_reference_method(openai_random, name, False).ctx.detach(), ref["init.ctx"], **TOL)
    method = _reference_method(openai_random, name).eval()
    images, labels = ref["images"], ref["labels"].long()
    with torch.no_grad():
        text = method.class_features(originals.CLASSNAMES, PLAIN)
        image = method.encode_image(images)
        torch.testing.assert_close(text, ref["text_features"], **TOL)
        torch.testing.assert_close(image, ref["image_features"], **TOL)
        torch.testing.assert_close(method.logits(image, text), ref["logits"], **TOL)
    _, _, loss = _train_step(method, images, labels)
    assert loss.item() == pytest.approx(facts["loss"], abs=1e-5)
    grads = _grads(method)
    assert set(grads) == {k for k in ref if k.startswith("grad.")}
    for k, g in grads.items():
        torch.testing.assert_close(g, ref[k], **TOL, msg=k)


def test_promptsrc_regularized_loss_and_gradients_equal_the_original_code(openai_random):
    facts, ref = originals.load("promptsrc")
    method = _reference_method(openai_random, "promptsrc")
    images, labels = ref["images"], ref["labels"].long()
    logits, text, loss = _train_step(method, images, labels)
    torch.testing.assert_close(text.detach(), ref["text_features"], **TOL)
    torch.testing.assert_close(method.teacher_text(originals.CLASSNAMES), ref["teacher_text_features"], **TOL)
    torch.testing.assert_close(method.zero_shot_image(), ref["zs_image_features"], **TOL)
    torch.testing.assert_close(method._image.detach(), ref["image_features"], **TOL)
    torch.testing.assert_close(logits.detach(), ref["logits"], **TOL)
    assert loss.item() == pytest.approx(facts["loss"], abs=1e-5)
    for k, g in _grads(method).items():
        torch.testing.assert_close(g, ref[k], **TOL, msg=k)
    ce = F.cross_entropy(logits, labels).item()
    assert loss.item() - ce > 1e-3  # the self-regularizing terms are not vacuous


def test_gaussian_prompt_aggregation_equals_the_original_trainer(openai_random):
    facts, ref = originals.load("promptsrc_gpa")
    method = _reference_method(openai_random, "promptsrc", trained=False)
    names = [k for k, p in method.named_parameters() if p.requires_grad]
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    cfg = facts["config"]
    gpa = GaussianPromptAggregation(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), params, facts["epochs"],
                                    1, cfg["GPA_MEAN"], cfg["GPA_STD"])
    assert gpa.weights == pytest.approx(facts["weights"], rel=1e-12)
    shapes = {k: tuple(p.shape) for k, p in zip(names, params)}
    for seed in facts["epoch_seeds"]:  # one step per epoch, ending at these states
        values = originals.trained(shapes, seed=seed)
        with torch.no_grad():
            for k, p in zip(names, params):
                p.copy_(values[k])
        opt.step()
        gpa.step()
    for k, p in zip(names, params):
        torch.testing.assert_close(p.detach(), ref[f"gpa.{k}"], **TOL, msg=k)


def test_gpa_state_resumes_and_the_recipes_are_the_public_configs(tiny_clip):
    maple, src, ivlp = (TrainConfig(method=m) for m in ("maple", "promptsrc", "ivlp"))
    assert (maple.lr, maple.epochs, maple.batch_size, maple.weight_decay) == (0.0035, 5, 4, 5e-4)
    assert maple.hparams["n_ctx"] == 2 and maple.hparams["prompt_depth"] == 9
    assert (src.lr, src.epochs, src.batch_size) == (0.0025, 20, 4) == (ivlp.lr, ivlp.epochs, ivlp.batch_size)
    h = src.hparams
    assert (h["n_ctx"], h["n_ctx_vision"], h["text_depth"], h["vision_depth"]) == (4, 4, 9, 9)
    assert (h["text_loss_weight"], h["image_loss_weight"], h["gpa_mean"], h["gpa_std"]) == (25.0, 10.0, 15.0, 1.0)
    clip, _, tok = tiny_clip
    method = build(clip, tok, TrainConfig(method="promptsrc", device="cpu", epochs=4))
    opt = method.optimizer(method.trainable())
    assert method.lr_per_epoch  # Dassl's loop: the schedule counts epochs
    sched = method.scheduler(opt, total_steps=4)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cosine = 0.0025 * 0.5 * (1 + math.cos(math.pi / 4))  # CoOp's warm-up epoch, then the restarted cosine
    assert lrs == pytest.approx([1e-5, 0.0025, cosine])
    again = method.scheduler(torch.optim.SGD(method.trainable(), lr=0.0025), total_steps=4)
    again.load_state_dict(sched.state_dict())
    assert again.steps == 3 and all(torch.equal(a, b) for a, b in zip(again.sum, sched.sum))


def test_deep_prompts_off_leave_every_tower_untouched(tiny_clip):
    clip, _, tok = tiny_clip
    images, tokens = torch.randn(2, 3, 32, 32), tok(["a photo of a cat.", "a dog."])
    with torch.no_grad():
        before = clip.encode_image(images), clip.encode_text(tokens)
        with vision_prompts(clip, []), text_prompts(clip, [], torch.zeros(2, 1, dtype=torch.long)):
            assert torch.equal(clip.encode_image(images), before[0])
            assert torch.equal(clip.encode_text(tokens), before[1])
        p = torch.randn(3, 64)
        with vision_prompts(clip, [p, p]), text_prompts(clip, [torch.randn(1, 64)], torch.ones(2, 1, dtype=torch.long)):
            prompted = clip.encode_image(images), clip.encode_text(tokens)
        assert not torch.allclose(prompted[0], before[0]) and not torch.allclose(prompted[1], before[1])
        assert torch.equal(clip.encode_image(images), before[0]) and torch.equal(clip.encode_text(tokens), before[1])
    blocks = [*vision_blocks(clip), *text_blocks(clip)[0], clip.visual.ln_pre, clip.visual.transformer]
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in blocks)  # every hook removed


@pytest.mark.parametrize("name", DEEP)
def test_zero_shot_switch_gives_the_plain_model_exactly(tiny_clip, name):
    clip, _, tok = tiny_clip
    method = build(clip, tok, TrainConfig(method=name, device="cpu"))
    with torch.no_grad():
        for p in method.trainable():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain_image = F.normalize(clip.encode_image(images), dim=-1)
        plain_text = F.normalize(clip.encode_text(tok([PLAIN[0].format(c) for c in CLASSES])), dim=-1)
        with method.zero_shot():
            assert torch.equal(method.encode_image(images), plain_image)
            torch.testing.assert_close(method.class_features(CLASSES, PLAIN), plain_text, atol=1e-6, rtol=0)
        assert not torch.allclose(method.encode_image(images), plain_image, atol=1e-4)


def _replaced_by_what_the_block_sees(clip, blocks, layer, run, positions=None):
    """The block input at `positions` (default: the last n) recorded in a plain run."""
    seen = {}
    h = blocks[layer].register_forward_pre_hook(lambda m, a, k: seen.update(x=(a[0] if a else k["hidden_states"])),
                                                with_kwargs=True)
    try:
        out = run()
    finally:
        h.remove()
    return out, seen["x"]


def test_replacing_with_the_hidden_states_a_block_already_sees_changes_nothing(tiny_clip, tiny_hf_clip):
    """An independent check of where (layer, positions) the prompts go, on CLIP's two towers and a BERT tower:
    prompts equal to what the block receives anyway leave the output unchanged; others change it."""
    clip, _, tok = tiny_clip
    torch.manual_seed(1)
    image, u0 = torch.randn(1, 3, 32, 32), torch.randn(2, 64)
    with torch.no_grad():
        with vision_prompts(clip, [u0]):
            out, x = _replaced_by_what_the_block_sees(clip, vision_blocks(clip), 1, lambda: clip.encode_image(image))
        with vision_prompts(clip, [u0, x[0, -2:]]):
            torch.testing.assert_close(clip.encode_image(image), out, atol=1e-6, rtol=0)
        with vision_prompts(clip, [u0, x[0, -2:] + 0.1 * torch.randn(2, 64)]):  # (layer norm hides a constant shift)
            assert not torch.allclose(clip.encode_image(image), out, atol=1e-4)
    for model, tokenizer in ((clip, tok), (tiny_hf_clip, _hf_tokenizer(tiny_hf_clip))):
        learner = DeepPromptLearner(model, tokenizer, ["cat"], n_ctx=2)
        blocks, _ = text_blocks(model)
        with torch.no_grad():
            out, x = _replaced_by_what_the_block_sees(model, blocks, 1, learner)
            learner.deep = [x[0, learner.ctx_positions[0]]]
            torch.testing.assert_close(learner(), out, atol=1e-6, rtol=0)
            learner.deep = [x[0, learner.ctx_positions[0]] + 0.1 * torch.randn(2, x.shape[-1])]
            assert not torch.allclose(learner(), out, atol=1e-4)


def _hf_tokenizer(model):
    """A BERT-style tokenizer for the tiny BERT tower: ids < its 100-word vocabulary, [CLS] 1 ... [SEP] 2."""
    class Tok:
        context_length = 32

        def __call__(self, texts, context_length=32):
            words = {w: 3 + (sum(map(ord, w)) % 90) for t in texts for w in t.replace(".", " .").split()}
            rows = [[1, *[words[w] for w in t.replace(".", " .").split()], 2] for t in texts]
            return torch.tensor([(r + [0] * context_length)[:context_length] for r in rows])
    return Tok()


def test_split_init_keeps_the_rest_of_the_phrase_literal(tiny_clip):
    clip, _, tok = tiny_clip
    ids, rest = split_init(tok, "a photo of a", 2)
    assert rest == "of a" and ids == tok(["a photo"])[0, 1:3].tolist()
    learner = DeepPromptLearner(clip, tok, ["cat"], n_ctx=2, init="a photo of a")
    assert learner.layout("cat") == "X X of a cat."
    with torch.no_grad():  # no deep prompts: the hand-written prompt
        torch.testing.assert_close(learner(), F.normalize(clip.encode_text(tok(["a photo of a cat."])), dim=-1),
                                   atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="fewer than n_ctx=5"):
        split_init(tok, "a photo of a", 5)
    with pytest.raises(ValueError, match=r"6 layers of text prompts but the text tower has 2 blocks"):
        with text_prompts(clip, [torch.zeros(1, 64)] * 5, torch.ones(1, 1, dtype=torch.long)):
            pass


@pytest.mark.parametrize("name,trained", [
    ("ivlp", {"ctx", "text_prompts.0", "vision_prompts.0", "vision_prompts.1"}),
    ("maple", {"ctx", "text_prompts.0", *(f"coupling.{j}.{w}" for j in (0, 1) for w in ("weight", "bias"))}),
    ("promptsrc", {"ctx", "text_prompts.0", "vision_prompts.0", "vision_prompts.1"})])
def test_gradients_reach_only_the_prompts_and_coupling(tiny_clip, name, trained):
    clip, _, tok = tiny_clip  # 2 blocks per tower: depth 9 prompts both
    method = build(clip, tok, TrainConfig(method=name, device="cpu"))
    assert set(method.trained_state()) == trained and method.record_info()["deep_prompts"] == {
        "text_depth": 2, "vision_depth": 2}
    _train_step(method, torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
    grads = {k for k, p in method.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == trained and all(p.grad is None for p in method.clip.parameters())


@pytest.mark.parametrize("name", DEEP)
def test_saved_and_reloaded_state_reproduces_the_logits(tiny_clip, tiny_config, tmp_path, name):
    import open_clip

    clip, _, tok = tiny_clip
    method = build(clip, tok, TrainConfig(method=name, device="cpu")).eval()
    with torch.no_grad():
        for p in method.trainable():
            p.add_(0.05 * torch.randn_like(p))
    path = save_trained(method, tmp_path / f"{name}.safetensors")
    torch.manual_seed(0)
    fresh = open_clip.create_model(tiny_config, pretrained=None).eval()
    loaded = build(fresh, open_clip.get_tokenizer(tiny_config), TrainConfig(method=name, device="cpu")).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = method.logits(method.encode_image(images), method.class_features(CLASSES, PLAIN))
        assert not torch.allclose(loaded.logits(loaded.encode_image(images), loaded.class_features(CLASSES, PLAIN)),
                                  expected, atol=1e-4)
        load_trained(loaded, path)
        torch.testing.assert_close(loaded.logits(loaded.encode_image(images), loaded.class_features(CLASSES, PLAIN)),
                                   expected, atol=1e-6, rtol=0)


def test_glad_mini_takes_text_only_deep_prompts():
    from glad_core.models import load_backbone

    try:
        clip, _, tok = load_backbone("glad-mini")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"glad-mini unavailable here: {e}")
    with pytest.raises(TypeError, match=r"image tower \(TimmModel\) has no transformer blocks"):
        with vision_prompts(clip, [torch.zeros(2, 8)]):
            pass
    for name in ("maple", "promptsrc"):
        method = build(clip, tok, TrainConfig(method=name, device="cpu"))
        info = method.record_info()["deep_prompts"]
        assert (info["text_depth"], info["vision_depth"]) == (6, 0) and "no transformer blocks" in info["vision"]
        assert {k.split(".")[0] for k in method.trained_state()} == {"ctx", "text_prompts"}
    images = torch.randn(2, 3, 224, 224)
    _, _, loss = _train_step(method, images, torch.tensor([0, 1]))
    assert torch.isfinite(loss) and all(p.grad is not None for p in method.trainable())


def _ready(*names: str) -> bool:
    from glad_core.paths import cache_dir

    return all((cache_dir() / "data" / n).is_dir() for n in names)


@pytest.mark.skipif(not _ready("tuxpaint", "clipart10", "mini_pacs"), reason="demo data not built (prepare)")
@pytest.mark.parametrize("protocol,methods", [("base_to_novel", DEEP), ("cross_dataset", ["maple"]),
                                              ("domain_generalization", ["promptsrc"]), ("multi_source_dg", ["ivlp"])])
def test_deep_prompt_methods_run_in_every_protocol_on_an_open_clip_vit(tiny_config, protocol, methods, tmp_path):
    """End to end (train, save, evaluate, record) on a tiny open_clip ViT and the demo data: every method in
    base-to-novel, one in each other protocol (they share everything but the loss)."""
    from glad_core import params as P
    from glad_core.protocols import run_cell

    p = {"protocol": protocol, "datasets": ["mini_pacs" if protocol == "multi_source_dg" else "tuxpaint"],
         "methods": methods, "shots": 1, "epochs": 1, "batch_size": 4, "backbone": tiny_config, "pretrained": None,
         "device": "cpu", "results_dir": str(tmp_path)}
    if protocol == "multi_source_dg":
        p["held_out"] = ["sketch"]
    elif protocol != "base_to_novel":
        p["targets"] = ["clipart10"]
    for cell in P.cells(p):
        rec = run_cell(cell, progress=False)
        # >= 1 step: Dassl's loop drops a last incomplete batch (5 base images, batch 4: one step)
        assert rec["train"]["steps"] >= 1 and 0 <= min(rec["metrics"].values()) <= 1
        assert rec["cell"]["method"] in methods


def test_report_table_1_shows_maple_and_promptsrc_beside_their_published_numbers():
    import pandas as pd

    from glad_core.published import published
    from glad_core.report import PAPER_BACKBONE, PAPER_SHOTS, base_to_novel_comparison

    rows = [{"protocol": "base_to_novel", "dataset": "eurosat", "method": m, "descriptions": "",
             "backbone": PAPER_BACKBONE[0], "shots": PAPER_SHOTS, "setting": "", "seed": 1, "split": split,
             "acc": 0.5, "record": f"{m}{split}"}
            for m in ("maple", "promptsrc", "ivlp") for split in ("base", "novel", "hm")]
    t = base_to_novel_comparison(pd.DataFrame(rows)).set_index(["method", "split"])
    pub = published("base_to_novel").set_index(["method", "dataset"])
    for m in ("maple", "promptsrc"):
        assert t.loc[(m, "base"), "published"] == pytest.approx(pub.loc[(m, "eurosat"), "base"])
        assert t.loc[(m, "hm"), "gap"] == pytest.approx(50 - pub.loc[(m, "eurosat"), "hm"])
    assert pd.isna(t.loc[("ivlp", "base"), "published"])  # not in GLAD's Table 1
