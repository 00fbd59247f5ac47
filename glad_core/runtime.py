"""Where and how a method runs, below every method and loop: seeding, the device, bf16 autocast, the
training transform and image feature extraction (each image encoded once)."""
from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Datum, ImageDataset

if TYPE_CHECKING:
    from .methods import Method


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)


MAX_WORKERS = 8


def worker_count(num_workers: int | str, device: torch.device) -> int:
    """Data-loader worker processes for `num_workers`: an int as given; "auto": 0 on CPU (workers would only
    compete for the cores the model computes on), on CUDA one per core this process may use but one, at
    most `MAX_WORKERS` (JPEG decoding and augmentation off the main process, so they keep the GPU fed).
    The cores are `OMP_NUM_THREADS` when set (`glad_core.cluster` gives each worker its share), else the
    process's CPU affinity."""
    if num_workers != "auto":
        return int(num_workers)
    if device.type != "cuda":
        return 0
    cores = int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    return max(0, min(MAX_WORKERS, cores - 1))


def loader_options(num_workers: int | str, device: torch.device) -> dict:
    """DataLoader keywords: `worker_count` workers and, on CUDA, pinned memory (asynchronous copies to the GPU).

    Workers are not persistent: the training loop builds its loader per epoch from that epoch's seed, and a
    persistent worker would carry its random stream across epochs, so a run resumed from a checkpoint would
    no longer repeat an uninterrupted one."""
    return {"num_workers": worker_count(num_workers, device), "pin_memory": device.type == "cuda"}


def autocast_enabled(device: torch.device, precision: str) -> bool:
    """Whether `autocast` runs in bf16: precision "bf16", or "auto" on CUDA."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA (precision "auto" or "bf16"), a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_enabled(device, precision))


def train_transform(clip: nn.Module, scale_min: float = 0.5, flip: bool = False) -> Callable:
    """open_clip's training transform for this model (bicubic random resized crop, its mean / std),
    after a random horizontal flip when `flip` (CoOp's and CLIP-LoRA's augmentation with scale_min 0.08)."""
    from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
    from torchvision import transforms

    cfg = PreprocessCfg(**clip.visual.preprocess_cfg)
    base = image_transform_v2(cfg, is_train=True, aug_cfg=AugmentationCfg(scale=(scale_min, 1.0)))
    return transforms.Compose([transforms.RandomHorizontalFlip(), base]) if flip else base




@torch.no_grad()
def image_features(method: Method, items: Sequence[Datum], transform: Callable, batch_size: int = 64,
                   num_workers: int | str = 0, progress: bool = True,
                   desc: str = "encode") -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image features [N, D] and labels [N] of `items`, each image encoded once."""
    cfg = method.cfg
    device = resolve_device(cfg.device)
    loader = torch.utils.data.DataLoader(ImageDataset(items, transform), batch_size=batch_size,
                                         **loader_options(num_workers, device))
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        with autocast(device, cfg.precision):
            feats.append(method.encode_image(images.to(device)))
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)
