"""Image features of evaluation splits under a frozen image tower, computed once and kept on disk.

A method whose image features never depend on what it trains (`Method.frozen_image_features`: zero-shot,
CoOp, CoCoOp, KgCoOp, ...) encodes the same test images in every cell and seed. `FeatureCache` keeps
them in a folder (`<results_dir>/feature_cache/` in a run), one file per split, named by the digest of
everything that produces them:

- the weights: a digest of the image tower's state dict (names, dtypes, shapes and bytes), so a pretrained
  tag, a local checkpoint and a random init each get their own;
- the encoder: the method's `encode_image` (its qualified name), its dtype, the device type and whether
  bf16 autocast is on;
- the split: each item's path, label, file size and modification time, in order;
- the preprocessing: the transform's `repr`.

A change in any of these is another file (a miss); the file also stores its key, checked on reading.
Files are written atomically (`glad_core.io.atomic_path`). Features are computed in batches of the
evaluation batch size, exactly as `glad_core.train.evaluate` encodes them without the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from .data import Datum
from .io import atomic_path
from .runtime import autocast_enabled, image_features, resolve_device

if TYPE_CHECKING:
    from .methods import Method

FORMAT = 1
_WEIGHTS: dict[int, tuple[tuple, str]] = {}  # id(module) -> (the tensors' storage and versions, digest)


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of `module`'s state dict (names, dtypes, shapes, bytes); recomputed only when a tensor changed
    (its storage or its in-place version counter)."""
    state = module.state_dict(keep_vars=True)
    stamp = tuple((k, t.data_ptr(), t._version) for k, t in state.items())
    memo = _WEIGHTS.get(id(module))
    if memo is not None and memo[0] == stamp:
        return memo[1]
    h = hashlib.sha256()
    for name, t in state.items():
        t = t.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    _WEIGHTS[id(module)] = (stamp, h.hexdigest())
    return _WEIGHTS[id(module)][1]


def items_digest(items: Sequence[Datum]) -> str:
    """SHA-256 of the split: each item's path, label, file size and modification time, in order."""
    h = hashlib.sha256()
    for d in items:
        try:
            st = os.stat(d.impath)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{d.impath}\t{d.label}\t{stamp}\n".encode())
    return h.hexdigest()


def split_key(method: "Method", items: Sequence[Datum], transform: Callable) -> dict[str, Any]:
    """Everything the features of `items` under `method` depend on (see the module's docstring)."""
    device = resolve_device(method.cfg.device)
    encoder = type(method).encode_image
    return {"format": FORMAT, "weights": weights_digest(getattr(method.clip, "visual", method.clip)),
            "encoder": f"{encoder.__module__}.{encoder.__qualname__}", "dtype": str(method.dtype),
            "device": device.type, "bf16_autocast": autocast_enabled(device, method.cfg.precision),
            "items": items_digest(items), "n": len(items), "transform": repr(transform)}


class FeatureCache:
    """Image features of splits, one file per `split_key` under `folder`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, key: dict[str, Any]) -> Path:
        return self.folder / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32] + ".pt")

    def image_features(self, method: "Method", items: Sequence[Datum], transform: Callable, batch_size: int = 64,
                       num_workers: int = 0, progress: bool = True,
                       desc: str = "encode") -> tuple[torch.Tensor, torch.Tensor]:
        """`glad_core.runtime.image_features` of `items`, read from the cache when there, else computed and
        stored. Only for features of a frozen image tower (the caller's promise)."""
        key = split_key(method, items, transform)
        path = self.path(key)
        device = resolve_device(method.cfg.device)
        if path.is_file():
            try:
                stored = torch.load(path, map_location=device, weights_only=True)
            except Exception:  # an unreadable file is recomputed and replaced
                stored = None
            if stored is not None and stored.get("key") == json.dumps(key, sort_keys=True):
                return stored["features"], stored["labels"]
        f, y = image_features(method, items, transform, batch_size, num_workers, progress, desc)
        with atomic_path(path) as tmp:
            torch.save({"key": json.dumps(key, sort_keys=True), "features": f.cpu(), "labels": y.cpu()}, tmp)
        return f, y


def frozen_features(method: "Method", items: Sequence[Datum], transform: Callable, batch_size: int = 64,
                    num_workers: int = 0, progress: bool = True,
                    desc: str = "encode") -> tuple[torch.Tensor, torch.Tensor]:
    """Image features of `items` whose image tower is frozen: through the method's cache when it has one
    (`method.feature_cache`), else computed (`glad_core.runtime.image_features`)."""
    cache = getattr(method, "feature_cache", None)
    if cache is None:
        return image_features(method, items, transform, batch_size, num_workers, progress, desc)
    return cache.image_features(method, items, transform, batch_size, num_workers, progress, desc)
