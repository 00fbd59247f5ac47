"""MuGCP: reduction to CoOp, what it trains, batched = per-image, its loss, and a tiny run on Tux Paint."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glad_core.data import Datum
from glad_core.descriptions import DescriptionError, DescriptionProvider, Descriptions
from glad_core.methods import build
from glad_core.train import Step, TrainConfig

CLASSES = ["red", "green", "blue"]
PLAIN = ["a photo of a {}."]
TEXTS = {"a/1.png": "A small red bird on a branch.", "a/2.png": "A car.", "b/3.png": "Green leaves of an oak tree."}
ITEMS = [Datum(f"/data/images/{k}", i % 3, CLASSES[i % 3]) for i, k in enumerate(TEXTS)]


def _provider() -> DescriptionProvider:
    return DescriptionProvider(Descriptions("mllm", "unit", TEXTS, generator="a test", question="what is it?"))


def _method(model, name: str = "mugcp", **hp):
    clip, tok = model
    kw = {k: hp.pop(k) for k in ("kl_weight",) if k in hp}
    method = build(clip, tok, TrainConfig(method=name, device="cpu", hparams=hp, **kw))
    if name == "mugcp" and method.conditioned:
        method.set_provider(_provider())
    return method


@pytest.fixture()
def vit(tiny_clip):
    return tiny_clip[0], tiny_clip[2]


@pytest.fixture(scope="module")
def mini():
    from glad_core.models import load_backbone

    clip, _, tok = load_backbone("glad-mini", device="cpu")
    return clip, tok


def test_with_scp_and_vcp_off_it_is_coop(vit):
    mugcp, coop = _method(vit, scp=False, vcp=False), _method(vit, "coop")
    ctx = torch.randn_like(coop.ctx) * 0.05
    with torch.no_grad():
        mugcp.ctx.copy_(ctx)
        coop.ctx.copy_(ctx)
    assert set(mugcp.trained_state()) == {"ctx"}
    images = torch.randn(3, 3, 32, 32)
    mugcp.use_items(ITEMS, "train")
    with torch.no_grad():
        f = mugcp.encode_image(images)
        got = mugcp.logits(f, mugcp.class_features(CLASSES, PLAIN, f))
        want = coop.logits(coop.encode_image(images), coop.class_features(CLASSES, PLAIN))
    assert torch.equal(got, want)
    assert not torch.equal(got, coop.logits(f, coop.prompt_features(CLASSES, PLAIN)))  # the context matters


@pytest.mark.parametrize("fusion", ["concat", "add"])
def test_gradients_reach_only_the_trained_parts(vit, fusion):
    method = _method(vit, fusion=fusion)
    trained = {"ctx", "scp_proj", "vis_norm", "vis_proj", "amg"} | ({"fuse"} if fusion == "add" else set())
    assert {k.split(".")[0] for k in method.trained_state()} == trained
    if fusion == "add":  # zero-initialised (training starts at CoOp): open the gates to see gradients behind them
        with torch.no_grad():
            for p in method.fuse.parameters():
                p.normal_(0, 0.1)
    method.use_items(ITEMS, "train")
    logits, _ = Step(method, CLASSES, PLAIN).forward(torch.randn(3, 3, 32, 32))
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for name, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_add_fusion_starts_at_coop(vit):
    mugcp, coop = _method(vit, fusion="add"), _method(vit, "coop")
    images = torch.randn(3, 3, 32, 32)
    mugcp.use_items(ITEMS, "train")
    with torch.no_grad():
        f = mugcp.encode_image(images)
        torch.testing.assert_close(mugcp.class_features(CLASSES, PLAIN, f),
                                   coop.class_features(CLASSES, PLAIN).expand(3, -1, -1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backbone,size,fusion", [("vit", 32, "concat"), ("vit", 32, "add"), ("mini", 224, "concat")])
def test_batched_class_embeddings_equal_per_image(request, backbone, size, fusion):
    method = _method(request.getfixturevalue(backbone), fusion=fusion)
    with torch.no_grad():
        for p in method.parameters():  # away from the zero start of 'add', so every part shows
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
        images = torch.randn(3, 3, size, size)
        method.use_items(ITEMS, "test")  # descriptions of different lengths: padding is masked
        f = method.encode_image(images)
        batched = method.class_features(CLASSES, PLAIN, f)
        single = []
        for i in range(3):
            method.use_items(ITEMS[i:i + 1], "test")
            single.append(method.class_features(CLASSES, PLAIN, method.encode_image(images[i:i + 1])))
    assert batched.shape == (3, len(CLASSES), f.shape[1])
    torch.testing.assert_close(batched, torch.cat(single), atol=2e-5, rtol=1e-4)
    assert (batched[0] - batched[1]).abs().max() > 1e-4  # conditioned: images differ


def test_consistency_term_is_kl_to_the_zero_shot_model(vit):
    method = _method(vit, kl_weight=0.7)
    assert TrainConfig(method="mugcp").kl_weight == 1.0
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([2, 0, 1])
    method.use_items(ITEMS, "train")
    step = Step(method, CLASSES, PLAIN)
    with torch.no_grad():
        log_p_zs = step.zero_shot_log_probs(images)
        logits, text = step.forward(images)
        loss = method.loss(logits, labels, log_p_zs, text, step.zs_text)
        f = F.normalize(method.clip.encode_image(images), dim=-1)
        zs = F.log_softmax(method.logit_scale * f @ method.prompt_features(CLASSES, PLAIN).T, dim=-1)
        log_p = F.log_softmax(logits, dim=-1)
        want = -log_p[torch.arange(3), labels].mean() + 0.7 * (zs.exp() * (zs - log_p)).sum(-1).mean()
    torch.testing.assert_close(log_p_zs, zs)
    torch.testing.assert_close(loss, want)


def test_gradreg_step_trains_the_conditional_parts(vit):
    method = _method(vit, step_rule="gradreg")
    assert method.step == "gradreg"
    before = {k: v.clone() for k, v in method.trained_state().items()}
    method.use_items(ITEMS, "train")
    loss = Step(method, CLASSES, PLAIN)(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]))
    assert torch.isfinite(loss)
    after = method.trained_state()
    assert all(not torch.equal(before[k], after[k]) for k in ("ctx", "scp_proj.weight", "amg.to_visual.in_proj_weight"))


def test_clear_errors_without_descriptions_or_items(vit):
    clip, tok = vit
    method = build(clip, tok, TrainConfig(method="mugcp", device="cpu"))
    f = method.encode_image(torch.randn(1, 3, 32, 32))
    with pytest.raises(DescriptionError, match="'descriptions'"):
        method.class_features(CLASSES, PLAIN, f)
    method.set_provider(_provider())
    with pytest.raises(DescriptionError, match="use_items"):
        method.class_features(CLASSES, PLAIN, f)
    with pytest.raises(DescriptionError, match="needs descriptions"):
        build(clip, tok, TrainConfig(method="mugcp", device="cpu")).fit(ITEMS, CLASSES, PLAIN, progress=False)
    with pytest.raises(ValueError, match="fusion"):
        TrainConfig(method="mugcp", hparams={"fusion": "sum"})


def test_tiny_fit_on_tuxpaint_with_its_descriptions(tiny_clip):
    from glad_core.descriptions import tuxpaint_descriptions_path
    from glad_core.train import evaluate

    if not tuxpaint_descriptions_path().exists():
        pytest.skip("the tuxpaint demo set and its descriptions are not built (python -m glad_core prepare)")
    from glad_core.datasets import fewshot, load_dataset

    splits = fewshot(load_dataset("tuxpaint"), 1, seed=1, cache=None)
    classes = splits.classnames[:4]
    train = [d for d in splits.train if d.label < 4]
    test = [d for d in splits.test if d.label < 4][:8]
    clip, preprocess, tok = tiny_clip
    cfg = TrainConfig(method="mugcp", device="cpu", epochs=1, batch_size=2, hparams={"descriptions": "tuxpaint"})
    method = build(clip, tok, cfg)
    result = method.fit(train, classes, splits.templates, progress=False)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    info = method.record_info()["descriptions"]
    assert (info["kind"], info["oracle"], info["train"]["kind"]) == ("retrieval", False, "human")
    train_texts = set(method.provider.image_texts(train, "train"))
    r = evaluate(method, test, classes, splits.templates, preprocess, progress=False)
    assert r["n"] == len(test) and 0.0 <= r["acc"] <= 1.0
    assert set(method._text_cache) == train_texts  # test images got training texts (retrieval), no others


def test_contract_trained_state_and_zero_shot_switch(vit):
    """test_methods.py's contract tests for MuGCP (which needs descriptions): what it saves is exactly what
    requires grad, the backbone is frozen, and zero_shot() gives the untouched backbone's logits."""
    method = _method(vit)
    clip, tok = vit
    assert set(method.trained_state()) == {k for k, p in method.named_parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in clip.parameters())
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        text = F.normalize(clip.encode_text(tok([PLAIN[0].format(c) for c in CLASSES])), dim=-1)
        expected = clip.logit_scale.exp() * F.normalize(clip.encode_image(images), dim=-1) @ text.T
        method.use_items(ITEMS, "test")

        def logits():
            f = method.encode_image(images)
            return method.logits(f, method.class_features(CLASSES, PLAIN, f))
        tuned = logits()
        with method.zero_shot():
            torch.testing.assert_close(logits(), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(tuned, expected, atol=1e-4)
        torch.testing.assert_close(logits(), tuned)


def test_shared_loop_tells_the_method_each_batch_items(vit, monkeypatch):
    """train() and evaluate() hand MuGCP the Datum items of every batch, in batch order."""
    from glad_core.train import evaluate, train

    seen = []
    method = _method(vit)
    original = method.use_items
    monkeypatch.setattr(method, "use_items", lambda items, split: (seen.append((split, list(items))),
                                                                   original(items, split)))
    monkeypatch.setattr("glad_core.data.open_rgb", lambda path: __import__("PIL.Image").Image.new("RGB", (40, 40)))
    method.cfg.epochs, method.cfg.batch_size, method.cfg.eval_batch_size = 1, 2, 2
    assert train(method, ITEMS, CLASSES, PLAIN, progress=False).steps == 2
    r = evaluate(method, ITEMS, CLASSES, PLAIN, lambda im: torch.zeros(3, 32, 32), progress=False)
    train_batches = [b for s, b in seen if s == "train"]
    assert sorted(d.impath for b in train_batches for d in b) == sorted(d.impath for d in ITEMS)
    assert [b for s, b in seen if s == "test"] == [ITEMS[:2], ITEMS[2:]] and r["n"] == 3
