"""Robustness: parameters validated up front, atomic records, kill-and-resume batch runs, per-epoch
checkpoint resume, determinism, non-finite losses and unreadable images.

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
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

import glad_core.train as train_module
from glad_core import params as P
from glad_core.data import Datum, ImageReadError
from glad_core.datasets import load_dataset, load_folder_dataset
from glad_core.io import write_json
from glad_core.protocols import run_cell
from glad_core.methods import Method, build
from glad_core.config import TrainConfig
from glad_core.train import NonFiniteLossError, evaluate, train

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("red", "green", "blue", "yellow")
COLORS = ((220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30))
TEMPLATES = ["a photo of {}."]
# Record fields that legitimately differ between two runs of the same cell.
VOLATILE = ("timings", "finished", "adapter", "git_commit", "git_dirty")


def _write_image(path: Path, rgb: tuple[int, int, int], g: torch.Generator) -> None:
    px = (torch.tensor(rgb).view(3, 1, 1) + 30 * torch.randn(3, 32, 32, generator=g)).clamp(0, 255)
    Image.fromarray(px.permute(1, 2, 0).byte().numpy()).save(path)


@pytest.fixture()
def data_root(tmp_path) -> Path:
    """A data root holding `eurosat/` as class folders (8 images each) and a CoOp split file."""
    root = tmp_path / "data"
    images = root / "eurosat" / "2750"
    g = torch.Generator().manual_seed(0)
    for name, rgb in zip(CLASSES, COLORS):
        (images / name).mkdir(parents=True)
        for i in range(8):
            _write_image(images / name / f"{i}.png", rgb, g)
    load_folder_dataset(images, "eurosat", split_file=root / "eurosat" / "split_zhou_EuroSAT.json")
    return root


def _cell_params(tiny_config: str, data_root: Path, results: Path, **kw: Any) -> dict[str, Any]:
    return {"protocol": "base_to_novel", "datasets": ["eurosat"], "methods": ["glad"], "seeds": [1],
            "shots": 2, "backbone": tiny_config, "pretrained": None, "data_root": str(data_root),
            "results_dir": str(results), "epochs": 2, "batch_size": 2, "device": "cpu", **kw}


def _comparable(record: dict) -> dict:
    """The record without what differs between runs: timings, paths, the commit."""
    out = {k: v for k, v in record.items() if k not in VOLATILE}
    out["params"] = {**record["params"], "results_dir": None}
    out["train"] = {**record["train"], "seconds": None}
    return out


def _model(tiny_config: str, **cfg: Any) -> Method:
    torch.manual_seed(0)
    clip, _, _ = open_clip.create_model_and_transforms(tiny_config, pretrained=None)
    return build(clip, open_clip.get_tokenizer(tiny_config),
                 TrainConfig(**{"device": "cpu", "batch_size": 4, "method": "glad", **cfg}))


def _items(data_root: Path) -> list[Datum]:
    return load_dataset("eurosat", data_root).train


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (no per-op thread synchronisation)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- parameters


@pytest.fixture()
def base_params(tiny_config, data_root, tmp_path) -> dict[str, Any]:
    return _cell_params(tiny_config, data_root, tmp_path / "results")


@pytest.mark.parametrize("key, value, allowed", [
    ("shots", 0, "[1, inf]"),
    ("shots", "four", "expected int"),
    ("epochs", 2.5, "expected int"),
    ("alpha", 1.5, "[0, 1]"),
    ("alpha", -0.1, "[0, 1]"),
    ("rho", -0.05, "[0, inf]"),
    ("lr", "fast", "expected int/float"),
    ("methods", ["glad", "gald"], "lora+gradreg"),
    ("datasets", ["eurosatt"], "eurosat"),
    ("protocol", "few_shot", "base_to_novel"),
    ("backbone", "ViT-B-33", "open_clip.list_models()"),
    ("precision", "fp8", "bf16"),
    ("device", "tpu", "cuda"),
    ("lora_towers", ["image", "audio"], "image"),
])
def test_bad_value_names_key_value_and_allowed(base_params, key, value, allowed):
    with pytest.raises(P.ParamError) as e:
        P.validate({**base_params, key: value})
    msg = str(e.value)
    shown = value[-1] if key in ("methods", "datasets") else value
    assert repr(key) in msg and repr(shown) in msg and allowed in msg, msg


def test_unknown_key_names_key_value_and_allowed_keys(base_params):
    with pytest.raises(P.ParamError) as e:
        P.validate({**base_params, "learning_rate": 0.1})
    msg = str(e.value)
    assert "'learning_rate'" in msg and "0.1" in msg and "'lr'" in msg and "'rho'" in msg, msg


def test_validation_happens_before_any_work(base_params, tmp_path, monkeypatch, capsys):
    """A bad value anywhere in the file stops the run before any cell starts or any file is written."""
    import glad_core.protocols
    from glad_core.__main__ import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**base_params, "methods": ["zeroshot", "glad"], "alpha": 2.0}))
    monkeypatch.setattr(glad_core.protocols, "run_cell", lambda *a, **k: pytest.fail("a cell ran"))
    assert main(["run", str(path)]) == 2
    assert "'alpha' = 2.0" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_cli_run_takes_a_file_and_overrides_or_overrides_alone(base_params, tmp_path, monkeypatch, capsys):
    """`run [params.yaml] --key value ...`: the README's commands parse into the validated grid."""
    import glad_core.__main__ as cli

    seen = []
    monkeypatch.setattr(cli, "cmd_run", seen.append)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(base_params))
    assert cli.main(["run", str(path), "--epochs", "2", "--seeds", "1,2"]) == 0
    assert seen[-1]["epochs"] == 2 and seen[-1]["seeds"] == [1, 2]
    assert cli.main(["run", "--protocol", "base_to_novel", "--datasets", "eurosat", "--data-root", "/data",
                     "--backbone", "glad-mini", "--methods", "zeroshot,lora,glad", "--shots", "16"]) == 0
    assert (seen[-1]["datasets"], seen[-1]["methods"], seen[-1]["shots"], seen[-1]["data_root"]) == \
        (["eurosat"], ["zeroshot", "lora", "glad"], 16, "/data")
    assert cli.main(["run", "--datasets"]) == 2
    assert "'datasets' has no value" in capsys.readouterr().err


def _values() -> st.SearchStrategy:
    scalars = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True)
               | st.text(max_size=12) | st.sampled_from(["glad", "eurosat", "ViT-B-32", "image", "text", "1e-3",
                                                         "nan", "cpu", "auto", "base_to_novel"]))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                            max_size=3),
                        max_leaves=8)


def _fuzz_params() -> st.SearchStrategy:
    keys = st.sampled_from(sorted(P.SCHEMA)) | st.text(max_size=10)
    return st.dictionaries(keys, _values(), max_size=6)


def _check_valid(out: dict[str, Any]) -> None:
    """A mapping `validate` accepts builds its cells and validates again to itself."""
    assert P.validate(out) == out
    P.cells(out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=_fuzz_params())
def test_validate_fuzz_raises_only_param_error(params):
    try:
        out = P.validate({"datasets": ["eurosat"], **params})
    except P.ParamError:
        return
    _check_valid(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80) | _fuzz_params().map(lambda d: yaml.safe_dump({"datasets": ["eurosat"], **d})))
def test_load_fuzz_yaml_raises_only_param_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        out = P.load(path)
    except P.ParamError:
        return
    _check_valid(out)


@pytest.mark.parametrize("text", ["datasets: [eurosat]\nseed: 2001-13-45\n", "- a\n- b\n", "datasets: [eurosat\n",
                                  "? [a, b]\n: 1\n", "lr: .nan\ndatasets: [eurosat]\n"])
def test_load_malformed_yaml(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(P.ParamError):
        P.load(path)


def test_load_undecodable_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"datasets: [\xff\xfe]\n")
    with pytest.raises(P.ParamError, match="p.yaml"):
        P.load(path)


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


def test_batch_killed_at_random_moments_resumes_without_loss(tiny_config, config_dir, data_root, tmp_path):
    results = tmp_path / "killed"
    params = _cell_params(tiny_config, data_root, results, methods=["zeroshot", "lora", "glad"], seeds=[1, 2],
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
        assert _comparable(got) == _comparable(ref), path


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


def test_same_parameters_and_seed_give_identical_records(tiny_config, data_root, tmp_path):
    records = []
    for run in ("a", "b"):
        params = _cell_params(tiny_config, data_root, tmp_path / run, methods=["glad"], epochs=2)
        (cell,) = P.cells(params)
        rec = run_cell(cell, progress=False)
        records.append(_comparable(rec))
    assert records[0]["metrics"] == records[1]["metrics"]  # exact float equality
    assert records[0] == records[1]


def test_a_changed_parameter_trains_anew_and_an_unchanged_one_is_reused(tiny_config, data_root, tmp_path):
    """The record's address names every parameter that changes it: alpha 0.5 -> 0.3 is a new record
    beside the old one; the same parameters again reuse the record without touching it."""
    cells = {}
    for alpha in (0.5, 0.3):
        (cells[alpha],) = P.cells(_cell_params(tiny_config, data_root, tmp_path, alpha=alpha, epochs=1))
    first = run_cell(cells[0.5], progress=False)
    stamp = cells[0.5].record_path.stat().st_mtime_ns
    assert cells[0.3].record_path != cells[0.5].record_path and not cells[0.3].record_path.exists()
    second = run_cell(cells[0.3], progress=False)
    assert {first["params"]["alpha"], second["params"]["alpha"]} == {0.5, 0.3}
    assert cells[0.5].record_path.exists() and cells[0.3].record_path.exists()
    assert run_cell(cells[0.5], progress=False)["metrics"] == first["metrics"]
    assert cells[0.5].record_path.stat().st_mtime_ns == stamp  # read, not rerun
    # what does not change the numbers keeps the address: the device, evaluation batching, the data's place
    (same,) = P.cells(_cell_params(tiny_config, data_root, tmp_path, alpha=0.5, epochs=1, eval_batch_size=7,
                                   device="auto"))
    assert same.record_path == cells[0.5].record_path
    from glad_core.results import collect
    df = collect(tmp_path)
    assert sorted(set(df["setting"])) == ["alpha=0.3", "alpha=0.5"]  # reported apart, never averaged


def test_a_knob_a_method_does_not_read_never_retrains_it(tmp_path):
    """The record's identity holds only what the method reads: alpha retrains glad (step rule gradreg), not
    coop or lora (no step rule); eval_batch_size only GuiDG with batch-averaged attention."""
    def paths(**kw: Any) -> dict[str, Path]:
        p = {"datasets": ["tuxpaint"], "methods": ["glad", "coop", "lora", "zeroshot"], "results_dir": str(tmp_path),
             **kw}
        return {c.train.method: c.record_path for c in P.cells(p)}

    before, after = paths(alpha=0.5), paths(alpha=0.3)
    assert before["glad"] != after["glad"]
    assert {m: before[m] == after[m] for m in ("coop", "lora", "zeroshot")} == {"coop": True, "lora": True,
                                                                                "zeroshot": True}
    assert paths(lr=0.004)["zeroshot"] == before["zeroshot"] and paths(lr=0.004)["coop"] != before["coop"]
    (lora_sam,) = P.cells({"datasets": ["tuxpaint"], "methods": ["lora"],
                           "method_settings": {"lora": {"step_rule": "sam"}}})
    assert "rho" in lora_sam.identity() and "alpha" in lora_sam.identity()  # read under a step rule

    def guidg(**kw: Any) -> Path:
        (cell,) = P.cells({"protocol": "multi_source_dg", "datasets": ["mini_pacs"], "held_out": ["sketch"],
                           "methods": ["guidg"], "results_dir": str(tmp_path), **kw})
        return cell.record_path

    assert guidg(eval_batch_size=64) != guidg()  # 36: the attention is averaged over each evaluation batch
    assert guidg(eval_batch_size=64, attention="image") == guidg(attention="image")  # per image: no effect
    assert guidg(kl_weight=1.0) == guidg()  # GuiDG's loss has no KL term
    assert paths(eval_batch_size=7, device="cpu", num_workers=1) == before  # never the numbers of these


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


def test_batch_explain_shows_each_methods_values_and_their_sources(tmp_path, capsys):
    """`--dry-run --explain`: one JSON line per method, every value it reads and where it came from."""
    import json

    from glad_core.batch import main

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"datasets": ["tuxpaint"], "methods": ["glad", "coop", "zeroshot"], "epochs": 3,
                                    "rank": 4, "method_settings": {"glad": {"lr": 0.004}}}))
    assert main([str(path), "--dry-run", "--explain", "--set", "batch_size=8"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["file"], d["method"]) for d in lines] == [(str(path), m) for m in ("glad", "coop", "zeroshot")]
    glad, coop, zeroshot = (d["params"] for d in lines)
    src = {d["method"]: d["sources"] for d in lines}
    assert set(src["glad"]) == set(glad) and set(src["coop"]) == set(coop)
    assert (glad["lr"], glad["epochs"], glad["batch_size"], glad["rank"], glad["alpha"]) == (0.004, 3, 8, 4, 0.5)
    assert (src["glad"]["lr"], src["glad"]["epochs"], src["glad"]["batch_size"], src["glad"]["rank"],
            src["glad"]["alpha"]) == ("method_settings", "file", "command line", "file", "method default")
    assert (coop["lr"], coop["epochs"], coop["weight_decay"]) == (0.002, 3, 5e-4)  # its recipe, but the flat epochs
    assert src["coop"]["lr"] == "method default" and "rank" not in coop  # a key it does not declare
    assert "alpha" not in coop and "rho" not in coop  # no step rule: coop does not read them
    assert set(zeroshot) == {"device", "precision", "num_workers", "eval_batch_size"}  # it trains nothing
    assert main([str(path), "--explain"]) == 2 and "add --dry-run" in capsys.readouterr().err
