"""Shared fixtures: tiny random-init open_clip models (weights do not matter for numerical checks), cells
on a generated image folder, the Jupyter environment of notebook and batch subprocesses."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import open_clip
import pytest
import torch
from PIL import Image

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


# ----------------------------------------------------------------------------- cells on generated images

CLASSES = ("red", "green", "blue", "yellow")
COLORS = ((220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30))
# Record fields that legitimately differ between two runs of the same cell.
VOLATILE = ("timings", "finished", "adapter", "git_commit", "git_dirty")


def write_color_image(path: Path, rgb: tuple[int, int, int], g: torch.Generator) -> None:
    px = (torch.tensor(rgb).view(3, 1, 1) + 30 * torch.randn(3, 32, 32, generator=g)).clamp(0, 255)
    Image.fromarray(px.permute(1, 2, 0).byte().numpy()).save(path)


@pytest.fixture()
def data_root(tmp_path) -> Path:
    """A data root holding `eurosat/` as class folders (8 images each of CLASSES) and a CoOp split file."""
    from glad_core.datasets import load_folder_dataset

    root = tmp_path / "data"
    images = root / "eurosat" / "2750"
    g = torch.Generator().manual_seed(0)
    for name, rgb in zip(CLASSES, COLORS):
        (images / name).mkdir(parents=True)
        for i in range(8):
            write_color_image(images / name / f"{i}.png", rgb, g)
    load_folder_dataset(images, "eurosat", split_file=root / "eurosat" / "split_zhou_EuroSAT.json")
    return root


def cell_params(tiny_config: str, data_root: Path, results: Path, **kw: Any) -> dict[str, Any]:
    """Parameters of GLAD cells on the tiny model and the `data_root` tree (`**kw` overrides)."""
    return {"protocol": "base_to_novel", "datasets": ["eurosat"], "methods": ["glad"], "seeds": [1],
            "shots": 2, "backbone": tiny_config, "pretrained": None, "data_root": str(data_root),
            "results_dir": str(results), "epochs": 2, "batch_size": 2, "device": "cpu", **kw}


def comparable(record: dict) -> dict:
    """The record without what differs between runs: timings, paths, the commit."""
    out = {k: v for k, v in record.items() if k not in VOLATILE}
    out["params"] = {**record["params"], "results_dir": None}
    out["train"] = {**record["train"], "seconds": None}
    return out


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (no per-op thread synchronisation)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- Jupyter


@pytest.fixture(scope="module")
def jupyter_env(request, tmp_path_factory) -> Iterator[dict[str, str]]:
    """Environment of notebook and batch subprocesses (and their kernels): the `glad` kernel installed, the
    demo data of the module's `DEMO_DATA` built, Jupyter / IPython / matplotlib state kept out of the home
    folder. Set in this process too, so that kernels started here (papermill) inherit it."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("glad")
    except NoSuchKernel:
        pytest.fail(f"the notebooks' kernel 'glad' is not installed: {sys.executable} -m ipykernel install "
                    f"--prefix {sys.prefix} --name glad (make install does it)")
    from glad_core.debian import DemoDataUnavailable
    from glad_core.prepare import prepare_demo_data

    try:
        prepare_demo_data(names=list(getattr(request.module, "DEMO_DATA", ["tuxpaint"])))
    except DemoDataUnavailable as e:
        pytest.skip(f"demo data unavailable here: {e}")
    home = tmp_path_factory.mktemp("home")
    root = Path(__file__).resolve().parent.parent
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"MPLBACKEND": "Agg", "IPYTHONDIR": home / "ipython", "MPLCONFIGDIR": home / "mpl",
                           "JUPYTER_CONFIG_DIR": home / "jupyter",
                           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}.items():
            mp.setenv(key, str(value))
        yield dict(os.environ)
