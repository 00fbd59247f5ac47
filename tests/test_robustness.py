"""Robustness: atomic records, kill-and-resume batch runs, per-epoch checkpoint resume, clear errors for bad
command-line input, non-finite losses and unreadable images (parameter validation: test_params.py;
identical and reused records: test_protocols.py).

Everything runs on a tiny random-init open_clip model and a few generated images in a folder tree,
laid out as the `eurosat` dataset (class folders plus a CoOp split file written by the user-folder
loader), so `run_cell` finds it by name under a temporary data root.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import open_clip
import pytest
import torch
from safetensors.torch import load_file

import glad_core.train as train_module
from conftest import CLASSES, cell_params, comparable
from glad_core import params as P
from glad_core.data import Datum, ImageReadError
from glad_core.datasets import load_dataset
from glad_core.io import write_json
from glad_core.protocols import run_cell
from glad_core.methods import Method, build
from glad_core.config import TrainConfig
from glad_core.train import NonFiniteLossError, evaluate, train

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ["a photo of {}."]
pytestmark = pytest.mark.usefixtures("one_thread")


def _model(tiny_config: str, **cfg: Any) -> Method:
    torch.manual_seed(0)
    clip, _, _ = open_clip.create_model_and_transforms(tiny_config, pretrained=None)
    return build(clip, open_clip.get_tokenizer(tiny_config),
                 TrainConfig(**{"device": "cpu", "batch_size": 4, "method": "glad", **cfg}))


def _items(data_root: Path) -> list[Datum]:
    return load_dataset("eurosat", data_root).train


# ----------------------------------------------------------------------------- atomic writes


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "rec.json"
    write_json(path, {"a": 1})

    class Unserializable:
        def __repr__(self) -> str:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_json(path, {"a": 2, "b": Unserializable()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["rec.json"]


DRIVER = textwrap.dedent("""
    import json, sys
    import open_clip
    from glad_core import params as P
    from glad_core.protocols import run_cell

    config_dir, params = sys.argv[1], json.loads(sys.argv[2])
    open_clip.add_model_config(config_dir)
    cells = P.cells(params)
    print("ready", flush=True)
    for cell in cells:
        run_cell(cell, progress=False)
        print("done", cell.record_path, flush=True)
""")


def _batch(config_dir: Path, params: dict, kill_after: float | None) -> subprocess.CompletedProcess | None:
    """Run every cell in a fresh process; with `kill_after`, SIGKILL it that long after it is ready."""
    cmd = [sys.executable, "-c", DRIVER, str(config_dir), json.dumps(params)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # as in this process (see one_thread): identical numbers
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if kill_after is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return None


def _finished_records(results: Path) -> dict[Path, str]:
    """Every record file under `results` (each must be complete JSON) with its text; adapters must load."""
    for path in results.rglob("*.safetensors"):
        load_file(path)
    out = {}
    for path in results.rglob("*.json"):
        text = path.read_text()
        assert "finished" in json.loads(text), path
        out[path] = text
    return out


@pytest.fixture()
def config_dir(tiny_config, tmp_path_factory) -> Path:
    """The folder holding the tiny model's open_clip config, for child processes to register."""
    d = tmp_path_factory.mktemp("child_cfg")
    (d / f"{tiny_config}.json").write_text(json.dumps(open_clip.get_model_config(tiny_config)))
    return d


@pytest.mark.slow
def test_batch_killed_at_random_moments_resumes_without_loss(tiny_config, config_dir, data_root, tmp_path):
    results = tmp_path / "killed"
    params = cell_params(tiny_config, data_root, results, methods=["zeroshot", "lora", "glad"], seeds=[1, 2],
                          epochs=3)
    expected = [c.record_path for c in P.cells(params)]
    rng = random.Random(0)
    seen: dict[Path, str] = {}
    for _ in range(2):
        _batch(config_dir, params, kill_after=rng.uniform(0.1, 1.5))
        now = _finished_records(results)
        assert all(now[p] == text for p, text in seen.items()), "a finished record changed"
        seen = now
    done = _batch(config_dir, params, kill_after=None)
    assert done.returncode == 0, done.stderr[-3000:]
    final = _finished_records(results)
    assert sorted(final) == sorted(expected)
    assert all(final[p] == text for p, text in seen.items())

    # the interrupted-and-resumed batch gives the records of an uninterrupted one
    clean = tmp_path / "clean"
    for cell in P.cells({**params, "results_dir": str(clean)}):
        run_cell(cell, progress=False)
    for path in expected:
        ref = json.loads((clean / path.relative_to(results)).read_text())
        got = json.loads(path.read_text())
        assert comparable(got) == comparable(ref), path


# ----------------------------------------------------------------------------- resume and determinism


class _Interrupt(Exception):
    pass


@contextmanager
def _interrupt_after_checkpoints(k: int, monkeypatch) -> Iterator[None]:
    """Make `train` stop (as if killed) right after writing its k-th per-epoch checkpoint."""
    real, saved = train_module.atomic_path, []

    @contextmanager
    def atomic_then_stop(path):
        with real(path) as tmp:
            yield tmp
        saved.append(path)
        if len(saved) == k:
            raise _Interrupt

    monkeypatch.setattr(train_module, "atomic_path", atomic_then_stop)
    yield
    monkeypatch.setattr(train_module, "atomic_path", real)


@pytest.mark.parametrize("k", [1, 2])
def test_resume_after_epoch_k_equals_uninterrupted(tiny_config, data_root, tmp_path, monkeypatch, k):
    items, names = _items(data_root), list(CLASSES)
    full = _model(tiny_config, epochs=3)
    ref = train(full, items, names, TEMPLATES, checkpoint=tmp_path / "full.ckpt", progress=False)

    ckpt = tmp_path / "cut.ckpt"
    with _interrupt_after_checkpoints(k, monkeypatch), pytest.raises(_Interrupt):
        train(_model(tiny_config, epochs=3), items, names, TEMPLATES, checkpoint=ckpt, progress=False)
    assert torch.load(ckpt, weights_only=False)["epoch"] == k - 1
    resumed = _model(tiny_config, epochs=3)
    res = train(resumed, items, names, TEMPLATES, checkpoint=ckpt, progress=False)

    assert res.history == ref.history
    assert res.steps == ref.steps
    a, b = full.trained_state(), resumed.trained_state()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    transform = open_clip.create_model_and_transforms(tiny_config, pretrained=None)[2]
    assert evaluate(full, items, names, TEMPLATES, transform, progress=False) == \
        evaluate(resumed, items, names, TEMPLATES, transform, progress=False)


def test_cli_bad_input_is_one_error_line_with_the_fix(tmp_path):
    """Missing dataset folder, missing split file, unreadable weights: exit 2, `error: ...`, no traceback."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "glad_core", "run", "--protocol", "base_to_novel",
                               "--methods", "zeroshot", "--shots", "1", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    no_folder = run("--datasets", "eurosat", "--data-root", str(tmp_path / "nowhere"))
    (tmp_path / "data" / "eurosat" / "2750").mkdir(parents=True)
    no_split = run("--datasets", "eurosat", "--data-root", str(tmp_path / "data"))
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"not a checkpoint")
    bad_weights = run("--datasets", "tuxpaint", "--backbone", "RN50", "--pretrained", str(weights))
    for r, words in ((no_folder, "eurosat"), (no_split, "split"), (bad_weights, str(weights))):
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
        assert words in r.stderr, r.stderr


# ----------------------------------------------------------------------------- failures


def test_non_finite_loss_stops_with_clear_error_and_keeps_last_checkpoint(tiny_config, data_root, tmp_path):
    """NaN image features from epoch 2 on: training stops there, epoch 1's checkpoint is intact."""
    model = _model(tiny_config, epochs=3)
    ckpt = tmp_path / "run.ckpt"
    model.clip.visual.register_forward_hook(lambda m, i, out: out * float("nan") if ckpt.exists() else out)
    with pytest.raises(NonFiniteLossError) as e:
        train(model, _items(data_root), list(CLASSES), TEMPLATES, checkpoint=ckpt, progress=False)
    msg = str(e.value)
    assert "non-finite loss" in msg and "epoch 2" in msg and str(ckpt) in msg, msg
    state = torch.load(ckpt, weights_only=False)
    assert state["epoch"] == 0 and len(state["result"]["history"]) == 1
    assert all(torch.isfinite(t).all() for t in state["trained"].values())
    assert [p.name for p in tmp_path.iterdir()] == ["data", "run.ckpt"]  # no temp file left behind


@pytest.mark.parametrize("kind", ["truncated", "not an image", "empty"])
def test_unreadable_image_error_names_the_file(tiny_config, data_root, kind):
    items = _items(data_root)
    bad = Path(items[1].impath)
    data = bad.read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2], "not an image": b"hello, world\n" * 20, "empty": b""}[kind])
    model = _model(tiny_config, epochs=1)
    transform = open_clip.create_model_and_transforms(tiny_config, pretrained=None)[2]
    with pytest.raises(ImageReadError, match=re.escape(str(bad))):
        evaluate(model, items, list(CLASSES), TEMPLATES, transform, progress=False)
    with pytest.raises(ImageReadError, match=re.escape(str(bad))):
        train(model, items, list(CLASSES), TEMPLATES, progress=False)
