"""Shared fixtures: tiny random-init open_clip models (weights do not matter for numerical checks)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import open_clip
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


ORIGINALS = Path(__file__).parent / "data" / "originals"


@pytest.fixture(scope="session")
def original():
    """Loader of the numbers the original code produced (tests/data/originals/<name>.json, see its README)."""
    return lambda name: json.loads((ORIGINALS / f"{name}.json").read_text())


def shared_dir() -> Path | None:
    """The project's shared test data folder beside the checkout, when present."""
    env = os.environ.get("GLAD_SHARED")
    p = Path(env) if env else Path(__file__).resolve().parents[2] / "shared"
    return p if p.is_dir() else None


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> str:
    """Register a tiny OpenAI-style ViT CLIP config with open_clip; returns its model name."""
    d = tmp_path_factory.mktemp("cfg")
    (d / "glad-tiny-vit.json").write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(d)
    return "glad-tiny-vit"


@pytest.fixture()
def tiny_clip(tiny_config):
    """(model, preprocess, tokenizer) of a fresh tiny random-init CLIP, seeded."""
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_config, pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer(tiny_config)


class TinyHFClip(torch.nn.Module):
    """A CLIP-shaped pair with the other two tower kinds: a CNN image tower (1x1 convolutions)
    and open_clip's Hugging Face text tower (BERT with separate query / key / value layers)."""

    def __init__(self, dim: int = 32):
        super().__init__()
        from open_clip.hf_model import HFTextEncoder
        from transformers import BertConfig

        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32, pad_token_id=0)
        self.visual = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(16, 24, 1),
            torch.nn.ReLU(), torch.nn.Conv2d(24, dim, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.text = HFTextEncoder("bert", dim, config=cfg, pooler_type="mean_pooler", proj_type="linear")
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6052))

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = self.visual(x)
        return torch.nn.functional.normalize(f, dim=-1) if normalize else f

    def encode_text(self, t: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = self.text(t)
        return torch.nn.functional.normalize(f, dim=-1) if normalize else f


@pytest.fixture()
def tiny_hf_clip() -> TinyHFClip:
    torch.manual_seed(0)
    return TinyHFClip().eval()
