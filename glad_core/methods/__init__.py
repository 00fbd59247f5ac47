"""Methods as plug-ins: one file per family, each registering its names (see `base`).

    from glad_core.methods import build, REGISTRY
    method = build(clip, tokenizer, TrainConfig(method="glad"))
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from torch import nn

from . import clip_lora, deep_prompts, glad, guidg, mugcp, prompt_learning  # noqa: F401  (each registers its names)
from .base import (REGISTRY, SHARED, Hparam, Method, MethodInfo, load_trained, method_info, register, save_trained,
                   table_order)

if TYPE_CHECKING:
    from ..config import TrainConfig

__all__ = ["REGISTRY", "SHARED", "Hparam", "Method", "MethodInfo", "build", "load_trained", "method_info",
           "register", "save_trained", "table_order", "ablation_rows"]


def build(clip: nn.Module, tokenizer: Callable, cfg: "TrainConfig") -> Method:
    """The method named by `cfg.method`, on `clip` (which it freezes and may modify in place)."""
    info = method_info(cfg.method)
    return info.cls(clip, tokenizer, cfg, **info.options)


def ablation_rows() -> dict[str, str]:
    """Table 4 rows -> method names, in row order."""
    return dict(sorted((i.row, i.name) for i in REGISTRY.values() if i.row))
