"""MuGCP: reduction to CoOp, what it trains, batched = per-image, its loss, and a tiny run on Tux Paint."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glad_core.data import Datum
from glad_core.descriptions import DescriptionError, DescriptionProvider, Descriptions
from glad_core.methods import build
from glad_core.config import TrainConfig
from glad_core.train import Step

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
    method.hp["drop_last"] = False  # every item of the epoch (Dassl's loop, the default, drops the last batch of 1)
    assert train(method, ITEMS, CLASSES, PLAIN, progress=False).steps == 2
    r = evaluate(method, ITEMS, CLASSES, PLAIN, lambda im: torch.zeros(3, 32, 32), progress=False)
    train_batches = [b for s, b in seen if s == "train"]
    assert sorted(d.impath for b in train_batches for d in b) == sorted(d.impath for d in ITEMS)
    assert [b for s, b in seen if s == "test"] == [ITEMS[:2], ITEMS[2:]] and r["n"] == 3


# ----------------------------------------------------------------------------- AMG, providers, records


def test_amg_shapes_attention_and_gradients():
    """S' [B, L, d], P' [B, P, d]; A is the head-averaged softmax of the semantic queries over the visual keys
    (against a direct computation); P' ignores padded description tokens; gradients reach every weight."""
    from glad_core.methods.mugcp import AMG

    torch.manual_seed(0)
    B, L, P, d, heads = 2, 5, 9, 16, 4
    amg = AMG(d, heads)
    s, p = torch.randn(B, L, d, requires_grad=True), torch.randn(B, P, d, requires_grad=True)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    s2, p2, a = amg(s, pad, p, weights=True)
    assert s2.shape == (B, L, d) and p2.shape == (B, P, d) and a.shape == (B, L, P)
    w, b = amg.to_semantic.in_proj_weight, amg.to_semantic.in_proj_bias
    q, k = s @ w[:d].T + b[:d], p @ w[d:2 * d].T + b[d:2 * d]
    h = d // heads
    direct = torch.stack([torch.softmax(q[..., i * h:(i + 1) * h] @ k[..., i * h:(i + 1) * h].transpose(1, 2)
                                        / h ** 0.5, -1) for i in range(heads)]).mean(0)
    torch.testing.assert_close(a, direct, atol=1e-5, rtol=1e-5)
    s3, p3, none = amg(s, pad, p)
    assert none is None
    torch.testing.assert_close((s3, p3), (s2, p2))  # reading the weights changes nothing (but rounding)
    (s2.square().sum() + p2.square().sum()).backward()
    assert s.grad.abs().sum() > 0 and p.grad.abs().sum() > 0
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in amg.parameters())
    with torch.no_grad():
        moved = s.clone()
        moved[1, 3:] += 5.0  # the padded tokens of image 1
        torch.testing.assert_close(amg(moved, pad, p)[1], p2.detach())
    with pytest.raises(ValueError, match="must divide"):
        AMG(10, 4)


@pytest.mark.parametrize("backbone,size,grid", [("vit", 32, (4, 4)), ("mini", 224, (7, 7))])
def test_attention_map_over_the_visual_grid(request, backbone, size, grid):
    method = _method(request.getfixturevalue(backbone))
    method.keep_attention = True
    method.use_items(ITEMS, "test")
    with torch.no_grad():
        f = method.encode_image(torch.randn(3, 3, size, size))
        method.class_features(CLASSES, PLAIN, f)
    a = method.attention
    assert a.shape == (3, *grid) and (a >= 0).all()
    torch.testing.assert_close(a.sum((1, 2)), torch.ones(3))  # a mean of distributions over the visual tokens
    method.keep_attention, method.attention = False, None
    with torch.no_grad():
        method.class_features(CLASSES, PLAIN, f)
    assert method.attention is None


def test_class_glosses_at_test_come_from_the_zero_shot_prediction(vit):
    """Training images get their own class's text; test images the text of the class the frozen zero-shot
    model predicts (a direct computation), not their label's."""
    clip, tok = vit
    glosses = {c: f"the meaning of {c}" for c in CLASSES}
    method = _method(vit, scp=True, vcp=True)
    method.set_provider(DescriptionProvider(Descriptions("class", "glosses", {}, classes=glosses)))
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        f = F.normalize(clip.encode_image(images), dim=-1)
        t = F.normalize(clip.encode_text(tok([PLAIN[0].format(c) for c in CLASSES])), dim=-1)
        predicted = (f @ t.T).argmax(-1).tolist()
    items = [Datum(f"/data/images/{i}.png", (k + 1) % 3, CLASSES[(k + 1) % 3]) for i, k in enumerate(predicted)]
    method.use_items(items, "test")
    with torch.no_grad():
        got = method.texts(method.encode_image(images), CLASSES, PLAIN)
        assert method.class_features(CLASSES, PLAIN, method.encode_image(images)).shape[:2] == (6, 3)
    assert got == [glosses[CLASSES[k]] for k in predicted]
    assert all(g != glosses[d.classname] for g, d in zip(got, items))  # every label differs from the prediction
    method.use_items(items, "train")
    assert method.texts(f, CLASSES, PLAIN) == [glosses[d.classname] for d in items]
    assert method.record_info()["descriptions"]["kind"] == "class"


def _human_file(tmp_path):
    return str(Descriptions("human", "notes", TEXTS).save(tmp_path / "notes.json"))


def test_oracle_switch_and_provider_kind_are_recorded(vit, tmp_path, monkeypatch):
    monkeypatch.setattr("glad_core.data.open_rgb", lambda path: __import__("PIL.Image").Image.new("RGB", (40, 40)))
    path = _human_file(tmp_path)
    infos = {}
    for name, hp in {"retrieval": {}, "oracle": {"oracle": True}}.items():
        clip, tok = vit
        method = build(clip, tok, TrainConfig(method="mugcp", device="cpu", hparams={"descriptions": path, **hp}))
        method.build_provider(ITEMS)
        infos[name] = method.record_info()["descriptions"]
    assert (infos["retrieval"]["kind"], infos["retrieval"]["oracle"]) == ("retrieval", False)
    assert (infos["oracle"]["kind"], infos["oracle"]["oracle"]) == ("oracle", True)
    assert infos["oracle"]["test"]["from"] == "the image's own description"
    none = _method(vit, scp=False, vcp=False)
    assert none.record_info() == {"descriptions": None}


@pytest.mark.parametrize("hp,match", [
    ({"test_descriptions": "images"}, "test_descriptions='images'.*oracle=True"),
    ({"test_descriptions": "class"}, "test='class' needs class texts"),
    ({"test_descriptions": "retrieval", "oracle": True}, "contradicts test='retrieval'"),
])
def test_provider_hyperparameter_errors_name_the_settings(vit, tmp_path, hp, match):
    clip, tok = vit
    method = build(clip, tok, TrainConfig(method="mugcp", device="cpu", hparams={"descriptions": _human_file(tmp_path),
                                                                               **hp}))
    with pytest.raises(DescriptionError, match=f"mugcp descriptions=.*{match}"):
        method.build_provider(ITEMS)


def test_provider_hyperparameters_are_validated():
    with pytest.raises(ValueError, match="test_descriptions.*allowed"):
        TrainConfig(method="mugcp", hparams={"test_descriptions": "labels"})
    with pytest.raises(ValueError, match="'wordnet'"):
        TrainConfig(method="mugcp", hparams={"descriptions": 3})


def test_provider_variants_are_cells_with_records_of_their_own(tmp_path):
    """Each provider variant is a mugcp cell whose parameters (hence record) differ; other mugcp settings are kept."""
    from glad_core import params as P
    from glad_core.provider_study import EXPECTED_KIND, provider_cells

    p = {"datasets": ["tuxpaint"], "seeds": [1, 2], "results_dir": str(tmp_path),
         "method_settings": {"mugcp": {"fusion": "add", "oracle": True}, "coop": {"lr": 0.01}}}
    cells = provider_cells(p, list(EXPECTED_KIND))
    assert list(cells) == ["none", "class", "retrieval", "oracle"] and all(len(c) == 2 for c in cells.values())
    paths = {c.record_path for cs in cells.values() for c in cs}
    assert len(paths) == 8 and all(c.train.method == "mugcp" for cs in cells.values() for c in cs)
    hp = {name: cs[0].train.hparams for name, cs in cells.items()}
    assert {k: hp["none"][k] for k in ("scp", "vcp", "descriptions", "oracle")} == \
        {"scp": False, "vcp": False, "descriptions": "", "oracle": False}
    assert (hp["class"]["descriptions"], hp["class"]["oracle"]) == ("wordnet", False)
    assert (hp["retrieval"]["descriptions"], hp["retrieval"]["oracle"]) == ("tuxpaint", False)
    assert (hp["oracle"]["descriptions"], hp["oracle"]["oracle"]) == ("tuxpaint", True)
    assert all(h["fusion"] == "add" for h in hp.values())
    with pytest.raises(P.ParamError, match="unknown provider variant 'mllm'"):
        provider_cells(p, ["mllm"])


@pytest.mark.parametrize("protocol", ["base_to_novel", "cross_dataset", "domain_generalization", "multi_source_dg"])
def test_mugcp_runs_in_every_protocol_on_an_open_clip_vit(tiny_config, protocol, tmp_path):
    """mugcp end to end (train, save, evaluate, record with its provider) on a tiny open_clip ViT: Tux Paint's
    human texts in training and retrieval at test in the single-source protocols (clip art targets), WordNet's
    class glosses on mini-PACS (leave-one-domain-out); glad-mini runs it in the demo and the smoke notebooks."""
    from glad_core import params as P
    from glad_core.debian import DemoDataUnavailable
    from glad_core.prepare import prepare_demo_data
    from glad_core.protocols import run_cell

    try:
        prepare_demo_data(names=["tuxpaint", "clipart10", "mini_pacs"])
    except DemoDataUnavailable as e:
        pytest.skip(f"demo data unavailable here: {e}")
    multi = protocol == "multi_source_dg"
    p = {"protocol": protocol, "datasets": ["mini_pacs" if multi else "tuxpaint"], "methods": ["mugcp"], "shots": 1,
         "epochs": 1, "batch_size": 4, "backbone": tiny_config, "pretrained": None, "device": "cpu",
         "results_dir": str(tmp_path), "method_settings": {"mugcp": {"descriptions": "wordnet" if multi else "tuxpaint"}},
         **({"held_out": ["sketch"]} if multi else {"targets": [] if protocol == "base_to_novel" else ["clipart10"]})}
    [cell] = P.cells(p)
    rec = run_cell(cell, progress=False)
    expected = {"base_to_novel": {"base", "novel", "hm"}, "multi_source_dg": {"sketch"}}.get(
        protocol, {"tuxpaint", "clipart10", "average"})
    assert set(rec["metrics"]) == expected and all(0 <= v <= 1 for v in rec["metrics"].values())
    assert rec["train"]["steps"] > 0 and rec["method"]["info"]["descriptions"]["kind"] == ("class" if multi else "retrieval")
    assert cell.adapter_path().exists()
