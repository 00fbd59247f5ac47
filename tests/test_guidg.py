"""GuiDG: cross-modal attention, the guided loss, the baselines' terms, experts per domain, and the
leave-one-domain-out protocol, against direct computations."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from glad_core import params as P
from glad_core.data import Datum
from glad_core.lora import lora_layers
from glad_core.methods import build
from glad_core.methods.guidg import (BetaMovingAverage, CrossModalAttention, GuiDG, batch_mean_weights, beta_weight,
                                     margin_logits, ueo_term, wise_ft_)
from glad_core.methods.guidg_train import selection_epochs, source_pools
from glad_core.config import TrainConfig

CLASSES, TEMPLATES = ["red", "green", "blue"], ["a photo of {}."]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
FAST = {"iterations": 2, "expert_epochs": 2, "expert_eval_every": 1, "expert_batch_size": 4, "n_ctx": 4,
        "aug_randaugment": False}


def _method(tiny_clip, name: str = "guidg", **hparams) -> GuiDG:
    clip, _, tok = tiny_clip
    cfg = TrainConfig(method=name, device="cpu", epochs=1, batch_size=2, lr=1e-3, hparams={**FAST, **hparams})
    return build(clip, tok, cfg)


def _items(tmp_path, domains=("photo", "sketch"), per_class: int = 2) -> list[Datum]:
    """Tiny coloured images per domain and class (sketch: a lighter shade)."""
    items = []
    for d in domains:
        for y, c in enumerate(CLASSES):
            for i in range(per_class):
                rgb = COLORS[c] if d != "sketch" else tuple(min(255, v + 60) for v in COLORS[c])
                path = tmp_path / d / c / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40 + 4 * i, 40), rgb).save(path)
                items.append(Datum(str(path), y, c, d))
    return items


def test_cross_modal_attention_matches_a_naive_loop():
    torch.manual_seed(0)
    B, K, C, D, H = 3, 4, 5, 6, 4
    attn = CrossModalAttention(D, C, heads=H)
    f, T = torch.randn(B, D), F.normalize(torch.randn(K, C, D), dim=-1)
    expected = torch.zeros(B, K)
    for q, a in zip(attn.query, attn.key):
        for b in range(B):
            query = q.weight @ f[b] + q.bias
            sims = []
            for k in range(K):
                key = sum(a.weight[0, c] * T[k, c] for c in range(C)) + a.bias[0]
                sims.append(float((query @ key / (query.norm() * key.norm())).detach()))
            e = [math.exp(s) for s in sims]
            expected[b] += torch.tensor([x / sum(e) for x in e])
    torch.testing.assert_close(attn(f, T), expected / H, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="trained on 5 classes"):
        attn(f, T[:, :4])


def test_batch_averaged_and_per_image_inference(tiny_clip):
    method = _method(tiny_clip, attn_batch=2)
    torch.manual_seed(1)
    K, C, D = 3, 3, 32
    method.attn = CrossModalAttention(D, C)
    T = F.normalize(torch.randn(K, C, D), dim=-1)
    f = F.normalize(torch.randn(5, D), dim=-1)
    w = method.attn(f, T)
    per_expert = [method.logit_scale * f @ T[k].t() for k in range(K)]
    image = sum(w[:, k:k + 1] * per_expert[k] for k in range(K))
    torch.testing.assert_close(method.logits(f, T, "image"), image)
    chunks = [w[:2].mean(0), w[:2].mean(0), w[2:4].mean(0), w[2:4].mean(0), w[4]]  # chunks of attn_batch = 2
    batch = torch.stack([sum(chunks[b][k] * per_expert[k][b] for k in range(K)) for b in range(5)])
    torch.testing.assert_close(method.logits(f, T, "batch"), batch)
    torch.testing.assert_close(batch_mean_weights(w, 2)[4], w[4])
    # per image: independent of the order; batch-averaged: not
    perm = torch.tensor([4, 0, 3, 1, 2])
    torch.testing.assert_close(method.logits(f[perm], T, "image"), image[perm])
    assert not torch.allclose(method.logits(f[perm], T, "batch"), batch[perm])


def test_guided_loss_is_the_attention_weighted_sum_of_expert_cross_entropies(tiny_clip):
    method = _method(tiny_clip)
    torch.manual_seed(2)
    K, C, D = 3, 3, 32
    method.attn = CrossModalAttention(D, C)
    T = F.normalize(torch.randn(K, C, D), dim=-1)
    f, y = F.normalize(torch.randn(4, D), dim=-1), torch.tensor([0, 2, 1, 1])
    w = method.attn(f, T).mean(0)
    expected = sum(w[k] * F.cross_entropy(method.logit_scale * f @ T[k].t(), y) for k in range(K))
    torch.testing.assert_close(method.guided_loss(f, y, T), expected)


@pytest.mark.parametrize("name,baseline", [("erm_wf+guidg", "erm"), ("ueo_wf+guidg", "ueo"),
                                           ("clipood+guidg", "clipood")])
def test_step2_loss_and_gradients_equal_the_original_train_resample(tiny_clip, monkeypatch, original, name, baseline):
    """GuiDG's train_resample on these float64 tensors (tests/data/originals): one attention weight vector over
    the batch of all sources, UEO's term per expert unweighted; equal loss and gradients of tower and attention."""
    ref = original("guidg")
    method = _method(tiny_clip, name)
    monkeypatch.setattr(method.clip, "logit_scale",
                        torch.nn.Parameter(torch.tensor(math.log(ref["temperature"]), dtype=torch.float64)))
    assert (method.hp.get("ueo_weight", ref["ueo_weight"]), method.hp.get("margin", ref["lam"])) == (0.01, 0.3)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    tower = torch.nn.Linear(6, 8).double()
    tower.load_state_dict({k: f64(v) for k, v in ref["tower"].items()})
    method.attn = CrossModalAttention(8, 3, heads=4).double()
    rename = {"linear_v": "query", "linear_t": "key"}  # the original's Head.linear_v / linear_t
    method.attn.load_state_dict({f"{rename[k.split('.')[2]]}.{k.split('.')[1]}.{k.split('.')[3]}": f64(v)
                                 for k, v in ref["attn"].items()})
    doms = [str(d) for d in ref["domains"]]
    x = torch.cat([f64(ref["x"][d]) for d in doms])
    y = torch.cat([torch.tensor(ref["labels"][d]) for d in doms])
    T = torch.stack([f64(ref["expert_text"][d]) for d in doms])
    loss = method.guided_loss(F.normalize(tower(x), dim=-1), y, T)
    loss.backward()
    want = ref["step2"][baseline]
    assert loss.item() == pytest.approx(want["loss"], rel=1e-12)
    ours = {"tower." + k: p.grad for k, p in tower.named_parameters()}
    ours.update({f"attn.layers.{k.split('.')[1]}.{'linear_v' if k.startswith('query') else 'linear_t'}.{k.split('.')[2]}":
                 p.grad for k, p in method.attn.named_parameters()})
    assert set(ours) == set(want["grads"])
    for k, g in want["grads"].items():
        torch.testing.assert_close(ours[k], f64(g), rtol=1e-10, atol=1e-13, msg=k)


def test_beta_moving_average_equals_the_original(original):
    """GuiDG's GeneralMovingAverage over 5 steps with its weight function (β = 0.1): the weights before training count."""
    ref = original("guidg")["bma"]
    assert [beta_weight(t, ref["steps"], ref["beta"]) for t in range(ref["steps"] + 1)] == pytest.approx(
        ref["weights"], rel=1e-12)
    net = torch.nn.Linear(3, 2).double()
    set_to = lambda it: [p.data.copy_(torch.tensor(v, dtype=torch.float64)) for p, v in zip(net.parameters(), it)]  # noqa: E731
    set_to(ref["iterates"][0])
    bma = BetaMovingAverage(net.parameters(), ref["steps"], ref["beta"])
    for it in ref["iterates"][1:]:
        set_to(it)
        bma.update()
    bma.load()
    for p, v in zip(net.parameters(), ref["average"]):
        torch.testing.assert_close(p.detach(), torch.tensor(v, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_experts_are_selected_after_the_originals_epochs(tiny_clip, tmp_path, monkeypatch, original):
    """phase1.py scores an expert after epochs 1, 6, ..., 31 and keeps the first best (tests/data/originals)."""
    from glad_core.methods import guidg_train
    from glad_core.methods.guidg_train import Pool

    ref = original("guidg")["selection"]
    assert selection_epochs(ref["epochs"], 5) == ref["evaluated_epochs"]
    accs, contexts = iter(ref["val_acc"]), []

    def scored(learner, *args):
        contexts.append(learner.ctx.detach().clone())
        return float(next(accs))

    monkeypatch.setattr(guidg_train, "val_accuracy", scored)
    moved = lambda method, learner, opt, images, labels: (learner.ctx.data.add_(0.01), opt.step())[0].sum()  # noqa: E731
    monkeypatch.setattr(guidg_train, "expert_step", moved)
    items = _items(tmp_path, domains=("photo",), per_class=1)
    method = _method(tiny_clip, expert_epochs=ref["epochs"], expert_eval_every=5, expert_batch_size=3)
    ctx, info = guidg_train.train_expert(method, Pool("photo", items, items), CLASSES, progress=False)
    assert [h["epoch"] for h in info["history"]] == ref["evaluated_epochs"]
    kept = ref["evaluated_epochs"].index(ref["kept_after_epochs"][-1])
    torch.testing.assert_close(ctx, contexts[kept])
    assert not torch.equal(contexts[kept], contexts[kept + 1])  # a tie later does not replace it


def test_baseline_terms_against_their_formulas():
    torch.manual_seed(3)
    z = torch.randn(6, 4)
    p = z.softmax(-1)
    entropy = lambda q: -(q * (q + 1e-5).log()).sum(-1)  # noqa: E731  (GuiDG's ent_loss: log(p + 1e-5))
    torch.testing.assert_close(ueo_term(z), entropy(p).mean() - entropy(p.mean(0)))
    f, T = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    y = torch.tensor([1, 3, 0])
    expected = torch.tensor([[10 * (float(f[b] @ T[c]) - 0.3 * float(T[y[b]] @ T[c])) for c in range(4)]
                             for b in range(3)])
    torch.testing.assert_close(margin_logits(f, T, y, torch.tensor(10.0), 0.3), expected)
    for t, total in ((0, 10), (4, 10), (9, 10)):  # Beta(1/2, 1/2) density = 1 / (π √(x (1 − x)))
        x = (t + 0.5) / (total + 1)
        assert beta_weight(t, total, 0.5) == pytest.approx(1 / (math.pi * math.sqrt(x * (1 - x))))
    assert beta_weight(3, 10, 1.0) == pytest.approx(1.0)


def test_wise_ft_interpolates_the_weights(tiny_clip):
    method = _method(tiny_clip)  # full fine-tuning of a copy of the tower
    with torch.no_grad():
        for p in method.visual.parameters():
            p.add_(torch.randn_like(p))
    tuned = [p.detach().clone() for p in method.visual.parameters()]
    wise_ft_(method, 0.5)
    for p, t, p0 in zip(method.visual.parameters(), tuned, method.clip.visual.parameters()):
        torch.testing.assert_close(p, 0.5 * p0 + 0.5 * t)


def test_wise_ft_with_lora_is_the_weight_interpolation(tiny_config):
    import open_clip

    torch.manual_seed(0)
    clip, _, _ = open_clip.create_model_and_transforms(tiny_config, pretrained=None)
    method = build(clip, open_clip.get_tokenizer(tiny_config),
                   TrainConfig(method="erm_wf", device="cpu", hparams={"tune": "lora"}))
    layer = lora_layers(clip)[0]
    with torch.no_grad():
        for p in method.trainable():
            p.add_(0.1 * torch.randn_like(p))
    w0 = layer.base.in_proj_weight.detach().clone()
    layer.merge()
    w_tuned = layer.base.in_proj_weight.detach().clone()
    layer.unmerge()
    wise_ft_(method, 0.5)
    layer.merge()
    torch.testing.assert_close(layer.base.in_proj_weight, 0.5 * w0 + 0.5 * w_tuned, atol=1e-6, rtol=1e-5)
    layer.unmerge()


def test_source_pools_per_domain_and_subdomains(tmp_path):
    items = _items(tmp_path, per_class=4)
    pools = source_pools(items, CLASSES, TEMPLATES, None, subdomains=3, seed=1)
    assert [p.name for p in pools] == ["photo", "sketch"]
    for p in pools:
        assert {d.domain for d in p.train + p.val} == {p.name}
        assert not {d.impath for d in p.train} & {d.impath for d in p.val}
    single = [Datum(d.impath, d.label, d.classname) for d in items]
    pools = source_pools(single, CLASSES, TEMPLATES, None, subdomains=2, seed=1)
    assert len(pools) == 2
    assert sorted(d.impath for p in pools for d in p.train + p.val) == sorted(d.impath for d in single)


def test_experts_are_trained_per_domain_and_zero_shot_switch_after_fit(tiny_clip, tmp_path, monkeypatch):
    from glad_core.methods import guidg_train

    clip, _, tok = tiny_clip
    items = _items(tmp_path, per_class=2)
    val = _items(tmp_path / "val", per_class=1)
    seen: dict[str, set] = {}
    real = guidg_train.train_expert

    def spy(method, pool, classnames, progress):
        seen[pool.name] = {d.domain for d in pool.train + pool.val}
        return real(method, pool, classnames, progress)

    monkeypatch.setattr(guidg_train, "train_expert", spy)
    method = _method(tiny_clip)
    before = [p.detach().clone() for p in method.visual.parameters()]
    result = method.fit(items, CLASSES, TEMPLATES, progress=False, val_items=val)
    assert seen == {"photo": {"photo"}, "sketch": {"sketch"}}
    assert method.expert_names == ["photo", "sketch"] and method.expert_text.shape == (2, 3, 32)
    assert {h["stage"] for h in result.history} == {"expert", "guided"}
    experts = [h for h in result.history if h["stage"] == "expert"]  # the budget: every stage's steps
    assert result.steps == 2 + sum(h["steps"] for h in experts) and all(h["steps"] > 0 for h in experts)
    assert result.images_seen == 2 * 2 * 2 + sum(h["images_seen"] for h in experts)  # 2 steps x 2 sources x 2
    assert result.parameters == sum(p.numel() for p in method.trainable()) + method.ctx.numel()
    assert any(not torch.equal(a, b) for a, b in zip(before, method.visual.parameters()))
    assert {"ctx"} <= set(method.trained_state()) and any(k.startswith("attn.") for k in method.trained_state())

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        text = F.normalize(clip.encode_text(tok([TEMPLATES[0].format(c) for c in CLASSES])), dim=-1)
        expected = clip.logit_scale.exp() * F.normalize(clip.encode_image(images), dim=-1) @ text.T
        with method.zero_shot():
            zs = method.logits(method.encode_image(images), method.class_features(CLASSES, TEMPLATES))
        tuned = method.logits(method.encode_image(images), method.class_features(CLASSES, TEMPLATES))
    torch.testing.assert_close(zs, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tuned, expected, atol=1e-4)
    metrics = method.guidance_metrics(F.normalize(torch.randn(4, 32), dim=-1), torch.tensor([0, 1, 2, 0]))
    assert set(metrics["experts"]) == {"photo", "sketch"}
    assert sum(metrics["mean_weights"].values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="trained on the classes"):
        method.class_features(["a", "b", "c"], TEMPLATES)


def test_unguided_baseline_and_clipood_bma_run(tiny_clip, tmp_path):
    items = _items(tmp_path, per_class=2)
    for name in ("erm_wf", "clipood"):
        method = _method(tiny_clip, name)
        result = method.fit(items, CLASSES, TEMPLATES, progress=False)
        assert result.steps == 2 and method.attn is None and not method.has_experts
    # clipood: after training the image tower is the Beta-weighted average of its iterates, the pretrained included
    method = _method(tiny_clip, "clipood")
    iterates = []
    snap = lambda: iterates.append([p.detach().clone() for p in method.image_tower_parameters()])  # noqa: E731
    method.before_training = (lambda orig: lambda total: (snap(), orig(total)))(method.before_training)
    method.after_step = (lambda orig: lambda s, t: (snap(), orig(s, t)))(method.after_step)
    method.fit(items, CLASSES, TEMPLATES, progress=False)
    w = [beta_weight(t, 2, 0.1) for t in range(3)]
    assert len(iterates) == 3
    for i, p in enumerate(method.image_tower_parameters()):
        torch.testing.assert_close(p, sum(wi * it[i] for wi, it in zip(w, iterates)) / sum(w))
    method.attn = CrossModalAttention(32, 3)  # the attention is not averaged
    assert not {id(p) for p in method.attn.parameters()} & {id(p) for p in method.image_tower_parameters()}


def test_multi_source_params_expand_held_out_domains():
    cells = P.cells({"protocol": "multi_source_dg", "datasets": ["mini_pacs"], "methods": ["zeroshot", "guidg"]})
    assert [(c.targets[0], c.train.method) for c in cells][:3] == [("photo", "zeroshot"), ("photo", "guidg"),
                                                                   ("clip_art", "zeroshot")]
    assert len(cells) == 8 and len({c.record_path for c in cells}) == 8
    with pytest.raises(P.ParamError, match="not domains of 'mini_pacs'"):
        P.validate({"protocol": "multi_source_dg", "datasets": ["mini_pacs"], "held_out": ["painting"]})
    with pytest.raises(P.ParamError, match="multi-domain set"):
        P.validate({"protocol": "multi_source_dg", "datasets": ["tuxpaint"]})
    with pytest.raises(P.ParamError, match="only the multi_source_dg"):
        P.validate({"protocol": "base_to_novel", "datasets": ["tuxpaint"], "held_out": ["photo"]})


def _mini_pacs_ready() -> bool:
    from glad_core.paths import cache_dir
    return (cache_dir() / "data" / "mini_pacs" / "split_glad_sketch_seed1.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _mini_pacs_ready(), reason="mini-PACS demo data not built (python -m glad_core prepare)")
def test_leave_one_domain_out_on_mini_pacs(tmp_path):
    import pandas as pd

    from glad_core.protocols import run_cell
    from glad_core.report import multi_source_comparison
    from glad_core.results import collect

    p = P.load(Path(__file__).resolve().parents[1] / "params" / "smoke" / "multi_source_dg.yaml", results_dir=str(tmp_path))
    records = [run_cell(c, progress=False) for c in P.cells(p)]
    for rec in records:
        held = rec["params"]["targets"][0]
        assert held not in rec["train"]["sources"] and len(rec["train"]["sources"]) == 3
        assert set(rec["metrics"]) == {held} and 0 <= rec["metrics"][held] <= 1
    guided = [r for r in records if r["cell"]["method"] == "guidg"]
    held = guided[0]["params"]["targets"][0] if guided else None
    assert guided and set(guided[0]["method"]["metrics"][held]["experts"]) == set(guided[0]["train"]["sources"])
    table = multi_source_comparison(collect(tmp_path))
    assert isinstance(table, pd.DataFrame) and set(table["split"]) == {"sketch"}  # one domain held out: no average
    assert table["mean"].tolist() == pytest.approx([100 * r["metrics"]["sketch"] for r in records])


def _multi_source_rows(rows, dataset="mini_pacs", backbone="glad-mini", shots=1):
    import pandas as pd

    return pd.DataFrame([{"protocol": "multi_source_dg", "dataset": dataset, "method": m, "descriptions": "",
                          "backbone": backbone, "shots": shots, "setting": "", "seed": s, "split": h, "acc": a,
                          "record": f"{m}-{h}-{s}"} for m, h, s, a in rows])


def test_report_averages_only_seeds_that_held_out_every_domain():
    from glad_core.report import multi_source_comparison

    domains = P.domains_of("mini_pacs")
    acc = {(s, h): (i + 1) / 10 + s / 100 for s in (1, 2) for i, h in enumerate(domains)}
    rows = [("zeroshot", h, s, a) for (s, h), a in reversed(acc.items())]  # records in another order
    rows += [("zeroshot", "photo", 3, 0.2)]  # a seed with one domain only: in that domain's mean, not the average
    rows += [("guidg", "photo", 1, 0.9)]     # a method with one domain: no average row
    t = multi_source_comparison(_multi_source_rows(rows)).set_index(["method", "split"])
    per_seed = [sum(acc[(s, h)] for h in domains) / len(domains) for s in (1, 2)]
    assert t.loc[("zeroshot", "average"), "mean"] == pytest.approx(100 * sum(per_seed) / 2)
    assert t.loc[("zeroshot", "average"), "seeds"] == 2
    assert t.loc[("zeroshot", "photo"), "mean"] == pytest.approx(100 * (acc[(1, "photo")] + acc[(2, "photo")] + 0.2) / 3)
    assert ("guidg", "average") not in t.index and t.loc[("guidg", "photo"), "mean"] == pytest.approx(90.0)
    assert list(t.loc["zeroshot"].index) == [*domains, "average"]  # domains as run, the average last
    assert t["published"].isna().all()  # glad-mini on mini-PACS: no published counterpart


def test_report_matches_guidg_table_8_in_its_setting():
    from glad_core.published import published
    from glad_core.report import multi_source_comparison

    pub = published("multi_source_dg").set_index(["method", "dataset", "domain"])["acc"]
    domains = P.domains_of("pacs")
    ours = {h: 0.9 + i / 100 for i, h in enumerate(domains)}
    for shots, expect_match in ((16, True), (4, False)):
        t = multi_source_comparison(_multi_source_rows([("clipood", h, 1, a) for h, a in ours.items()], "pacs",
                                                       "ViT-B-16", shots)).set_index("split")
        if not expect_match:
            assert t["published"].isna().all()
            continue
        for h in domains:
            assert t.loc[h, "published"] == pub[("clipood", "pacs", h)]
            assert t.loc[h, "gap"] == pytest.approx(100 * ours[h] - pub[("clipood", "pacs", h)])
        assert t.loc["average", "published"] == pub[("clipood", "pacs", "average")]


def test_guidance_table_and_heatmap(tmp_path):
    import json

    from glad_core import results
    from glad_core.report import attention_heatmap, guidance_table

    for seed, w in ((1, (0.5, 0.3, 0.2)), (2, (0.3, 0.3, 0.4))):  # two records of clip art held out
        rec = {"cell": {"protocol": "multi_source_dg", "dataset": "mini_pacs", "method": "clipood+guidg", "seed": seed,
                        "shots": 1, "backbone": "glad-mini"}, "params": {}, "metrics": {"clip_art": 0.5},
               "method": {"info": {}, "metrics": {"clip_art": {
                   "acc_batch": 0.5, "acc_image": 0.4 + seed / 10,
                   "experts": {"photo": 0.6, "cartoon": 0.2 * seed, "sketch": 0.1},
                   "mean_weights": dict(zip(("photo", "cartoon", "sketch"), w))}}}}
        (tmp_path / f"r{seed}.json").write_text(json.dumps(rec))
    (tmp_path / "zeroshot.json").write_text(json.dumps({**rec, "method": {"info": {}, "metrics": {}}}))  # no rows
    g = results.guidance(tmp_path)
    assert len(g) == 6 and set(g["held_out"]) == {"clip_art"}
    t = guidance_table(g).loc[("mini_pacs", "clipood+guidg", "clip_art")]
    assert t[("accuracy %", "batch weights")] == pytest.approx(50.0)
    assert t[("accuracy %", "per-image weights")] == pytest.approx(55.0)  # seed mean of 50 and 60
    assert t[("expert accuracy %", "cartoon")] == pytest.approx(30.0)
    assert t[("mean weight", "photo")] == pytest.approx(0.4) and t[("mean weight", "sketch")] == pytest.approx(0.3)
    png = attention_heatmap(g, tmp_path / "attention.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_held_out_domain_is_a_split_not_a_setting(tmp_path):
    """Records of one method that differ only in the held-out domain are one row of the table."""
    import json

    from glad_core.results import collect

    for held in ("photo", "sketch"):
        rec = {"cell": {"protocol": "multi_source_dg", "dataset": "mini_pacs", "method": "zeroshot", "seed": 1,
                        "shots": 1, "backbone": "glad-mini"},
               "identity": {"targets": [held], "precision": "fp32"}, "metrics": {held: 0.5}}
        (tmp_path / f"{held}.json").write_text(json.dumps(rec))
    assert set(collect(tmp_path)["setting"]) == {""}
    rec["identity"]["precision"] = "bf16"  # another value of a parameter is another setting
    (tmp_path / "sketch.json").write_text(json.dumps(rec))
    assert set(collect(tmp_path)["setting"]) == {"precision=fp32", "precision=bf16"}


def test_batch_runs_a_notebook_per_held_out_domain(tmp_path):
    from glad_core import jobs as J

    jobs = J.plan([{"protocol": "multi_source_dg", "datasets": ["mini_pacs"], "methods": ["zeroshot", "guidg"],
                        "results_dir": str(tmp_path)}])
    assert len(jobs) == 8 and {j.notebook.name for j in jobs} == {"multi_source_dg.ipynb"}
    assert [j.params["held_out"] for j in jobs[:3]] == [["photo"], ["photo"], ["clip_art"]]
    assert len({j.unit for j in jobs}) == 8  # each cell trains its own adapter, beside its record
    assert all(j.cell.adapter_path() == j.cell.record_path.with_suffix(".safetensors") for j in jobs)
    assert "held out clip_art" in jobs[2].label
