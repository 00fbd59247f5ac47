"""The random OpenAI-format CLIP shared by our equivalence tests and the reference runs of original code.

Both sides build the same weights from this recipe: the reference run loads them into the original
repository's own `clip.build_model` (OpenAI's state-dict layout), the tests into open_clip's CLIP
(the same layout and key names). `trained(shapes)` gives the trained tensors (prompts, coupling
layers) both sides copy into their models before computing the stored outputs. How the reference
files under `tests/data/originals/` were produced: `tests/data/originals/deep_prompts.md`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data" / "originals"

#: ViT-B/16's widths (MaPLe's code hard-codes 512 for the text prompts and 768 for the vision ones) and
#: heads (OpenAI's width // 64), CLIP's tokenizer and 77-token context; 4 blocks per tower, 32 px images.
CONFIG = {
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 768, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 4},
}
NAME = "glad-openai-random"
CLASSNAMES = ["cat", "sea_lion", "yorkshire terrier"]


def _values(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Seeded values by name (sorted names, one generator): layer-norm weights near 1, biases and embeddings
    small, matrices at fan-in scale (fan-in: the last dimension, or the first for OpenAI's [in, out] `proj`s)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(shapes):
        s = shapes[k]
        x = torch.randn(s, generator=g)
        leaf = k.rsplit(".", 1)[-1]
        if k == "logit_scale":
            v = torch.full(s, math.log(1 / 0.07))
        elif ".ln" in f".{k}" and leaf == "weight":
            v = 1 + 0.1 * x
        elif leaf in ("bias", "in_proj_bias") or k in ("token_embedding.weight", "positional_embedding"):
            v = 0.02 * x
        elif len(s) == 1:  # class embedding
            v = x * s[0] ** -0.5
        elif k.endswith("proj") or k.endswith("projection"):
            v = x * s[0] ** -0.5
        else:
            v = x * math.prod(s[1:]) ** -0.5
        out[k] = v
    return out


def state_dict(keys_and_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The backbone's weights for these keys (OpenAI's / open_clip's names)."""
    return _values(keys_and_shapes, seed=0)


def trained(shapes: dict[str, tuple[int, ...]], seed: int = 1) -> dict[str, torch.Tensor]:
    """Trained tensors by our names (away from any initialisation, as after training)."""
    return _values(shapes, seed=seed)


def open_clip_model():
    """(model, tokenizer): open_clip's CLIP with the recipe's weights, in float32."""
    import tempfile

    import open_clip

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / f"{NAME}.json").write_text(json.dumps(CONFIG))
        open_clip.add_model_config(Path(d))
        model = open_clip.create_model(NAME, pretrained=None)
    sd = model.state_dict()
    model.load_state_dict(state_dict({k: tuple(v.shape) for k, v in sd.items()}))
    return model.eval(), open_clip.get_tokenizer(NAME)


def load(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A stored reference: its JSON facts and its tensors."""
    from safetensors.torch import load_file

    return json.loads((DATA / f"{name}.json").read_text()), load_file(str(DATA / f"{name}.safetensors"))
