"""Backbones: any open_clip model, or the embedded default `glad-mini`, behind one call.

    model, preprocess, tokenizer = load_backbone("ViT-B-16", "openai")   # the paper's backbone
    model, preprocess, tokenizer = load_backbone("glad-mini")            # offline default, built on first use
"""
from __future__ import annotations

import difflib
import os
from typing import Callable

import open_clip
import timm
import torch
from torch import nn

from . import mini
from .paths import cache_dir

PAPER_BACKBONE = ("ViT-B-16", "openai")


class WeightsError(RuntimeError):
    """Pretrained weights could not be fetched or read."""


def _weights_dir() -> str:
    return str(cache_dir() / "open_clip")


def check_backbone_name(name: str) -> None:
    """A ValueError with close names and the fix unless `name` is a backbone `load_backbone` accepts."""
    if name == mini.NAME or name.startswith(("hf-hub:", "local-dir:")) or name in open_clip.list_models():
        return
    names = {n.lower(): n for n in [mini.NAME, *open_clip.list_models()]}
    close = [names[n] for n in difflib.get_close_matches(name.lower(), names, n=3)]
    raise ValueError(
        f"Unknown model {name!r}{f' (did you mean {close}?)' if close else ''}. Use {mini.NAME!r} (the embedded "
        f"default) or a name from open_clip.list_models(), e.g. {PAPER_BACKBONE[0]!r} with "
        f"pretrained={PAPER_BACKBONE[1]!r}; open_clip.list_pretrained() lists (model, tag) pairs."
    )


def _local_file_hint(name: str) -> str:
    return (
        f"load_backbone({name!r}, pretrained='/path/to/open_clip_pytorch_model.bin') "
        "(or a .pt / .safetensors open_clip checkpoint); open_clip.list_pretrained() lists the (model, tag) pairs"
    )


def _resolve_pretrained(name: str, pretrained: str | None) -> dict:
    """Fetch a tag's weights or check a local file, failing with the fix; returns extra open_clip kwargs."""
    if pretrained is None:
        return {}
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        if os.path.isfile(pretrained):
            return {}
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise FileNotFoundError(
            f"pretrained={pretrained!r} is neither a pretrained tag of {name!r} (tags: {tags}) nor an existing "
            f"file. Pass a tag, or download the checkpoint and pass its path: {_local_file_hint(name)}."
        )
    try:
        open_clip.download_pretrained(cfg, cache_dir=_weights_dir())
    except Exception as e:
        hub = cfg.get("hf_hub", "")
        source = f"https://huggingface.co/{hub.rstrip('/')}" if hub else cfg.get("url", "")
        # A local file loses the tag's QuickGELU flag: the '-quickgelu' variant of the name restores it.
        local_name = f"{name}-quickgelu"
        if not (cfg.get("quick_gelu") and local_name in open_clip.list_models()):
            local_name = name
        raise WeightsError(
            f"Could not fetch the {pretrained!r} weights of {name!r} ({type(e).__name__}: {e}). Without internet "
            f"access, download the checkpoint elsewhere ({source}) and pass the file: {_local_file_hint(local_name)}."
        ) from e
    return {"force_quick_gelu": bool(cfg.get("quick_gelu", False))}


def _freeze_stochastic_layers(model: nn.Module) -> None:
    """Freeze BatchNorm statistics and zero dropout, so `train()` only affects layers added later (LoRA).
    Like CLIP's own towers, which have neither; few-shot batches must not overwrite ImageNet statistics."""
    model.visual = timm.layers.freeze_batch_norm_2d(model.visual)  # keeps timm's fused BatchNorm+activation
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "drop_rate", None), float):  # timm classifier-head dropout
            m.drop_rate = 0.0


def load_backbone(
    name: str, pretrained: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Callable, Callable]:
    """Return (model in eval mode, eval image preprocess, tokenizer) of an open_clip model.

    `name`: "glad-mini", any name in `open_clip.list_models()`, or an 'hf-hub:' / 'local-dir:' id.
    `pretrained`: an open_clip tag (e.g. "openai"), a local checkpoint file, or None for random init.
    For glad-mini, None means its own weights, built offline on first use (`glad_core.mini`).
    BatchNorm statistics are frozen and dropout is zeroed (see `_freeze_stochastic_layers`).
    """
    check_backbone_name(name)
    kwargs: dict = {"cache_dir": _weights_dir()}
    if name == mini.NAME:
        mini.register()
        pretrained = pretrained or str(mini.build_glad_mini())
        kwargs.update(mini.PREPROCESS)
    kwargs.update(_resolve_pretrained(name, pretrained))
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, **kwargs)
    except Exception as e:
        if pretrained is None or not os.path.isfile(pretrained):
            raise
        raise WeightsError(f"could not read the weights file {pretrained} as a {name!r} checkpoint "
                           f"({type(e).__name__}: {str(e)[:300]}); pass an open_clip checkpoint of that model: "
                           f"{_local_file_hint(name)}") from e
    _freeze_stochastic_layers(model)  # on CPU: timm's BatchNorm freezing cannot move buffers across devices
    return model.to(device).eval(), preprocess, open_clip.get_tokenizer(name)
