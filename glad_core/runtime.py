"""Where and how a method runs, below every method and loop: seeding, the device, bf16 autocast, the
training transform and image feature extraction (each image encoded once)."""
from __future__ import annotations

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


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA (precision "auto" or "bf16"), a no-op context otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


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
                   num_workers: int = 0, progress: bool = True, desc: str = "encode") -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image features [N, D] and labels [N] of `items`, each image encoded once."""
    cfg = method.cfg
    device = resolve_device(cfg.device)
    loader = torch.utils.data.DataLoader(ImageDataset(items, transform), batch_size=batch_size,
                                         num_workers=num_workers)
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        with autocast(device, cfg.precision):
            feats.append(method.encode_image(images.to(device)))
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)
