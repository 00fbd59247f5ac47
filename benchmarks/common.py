"""What the benchmark scripts share: their command line, the tiny smoke model, loading a backbone,
measurements in fresh child processes, and the table of result rows.

Imports only the standard library at module level, so that a child process measuring memory
(`memory.py`) loads nothing it does not use.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOKE_MODEL = "glad-bench-tiny"
SMOKE_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

#: Options the scripts share, by name: `parser(doc, "smoke", "device", ...)` adds them.
OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "smoke": (("--smoke",), {"action": "store_true",
                             "help": "tiny random model, small sizes, one round: checks the script runs "
                                     "(its numbers mean nothing)"}),
    "device": (("--device",), {"default": "cpu", "help": "torch device (default cpu)"}),
    "threads": (("--threads",), {"type": int, "default": os.cpu_count() or 1, "help": "torch intra-op threads"}),
    "json": (("--json",), {"help": "also write the rows to this JSON file"}),
    "child": (("--child",), {"help": argparse.SUPPRESS}),
}


def parser(doc: str | None, *options: str) -> argparse.ArgumentParser:
    """An argument parser with the script's docstring as help and the shared `options` (see OPTIONS)."""
    p = argparse.ArgumentParser(prog=_prog(), description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in options:
        flags, kw = OPTIONS[name]
        p.add_argument(*flags, **kw)
    return p


def chosen_sections(parser: argparse.ArgumentParser, value: str, allowed: Sequence[str]) -> list[str]:
    """The comma-separated `--sections` value as a list; a name not in `allowed` is a usage error."""
    chosen = [x.strip() for x in value.split(",") if x.strip()]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(allowed)}")
    return chosen


def _prog() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return f"python -m {spec.name}" if spec is not None and spec.name else Path(sys.argv[0]).name


@contextmanager
def smoke_config(on: bool) -> Iterator[str | None]:
    """A temporary folder holding the tiny model's open_clip config, registered with open_clip (None when off).

    Child processes get the folder's path (`load_model(..., config_dir)`) to register it themselves.
    """
    if not on:
        yield None
        return
    import open_clip

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / f"{SMOKE_MODEL}.json").write_text(json.dumps(SMOKE_CONFIG))
        open_clip.add_model_config(d)
        yield d


def load_model(name: str, device: str = "cpu", config_dir: str | None = None) -> tuple[Any, Callable, Callable]:
    """(model, preprocess, tokenizer) in eval mode: glad-mini with its weights (`glad_core.models`), any
    other open_clip model random-init with seed 0 (speed and memory do not depend on the weights)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    if name == "glad-mini":
        from glad_core.models import load_backbone
        model, preprocess, tokenizer = load_backbone(name, device=device)
        return model.eval(), preprocess, tokenizer
    if config_dir is not None:
        open_clip.add_model_config(config_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return model.to(device).eval(), preprocess, open_clip.get_tokenizer(name)


def child(measure: Callable[[dict], dict], spec: str) -> int:
    """The body of a child process: print `measure`'s result for the JSON `spec` as one JSON line."""
    print(json.dumps(measure(json.loads(spec))), flush=True)
    return 0


def run_children(children: Sequence[tuple[str, dict]], threads: int, parallel: bool = True) -> list[dict]:
    """Each (module, spec) measured in its own fresh process, `python -m benchmarks.<module> --child SPEC`
    (all at once when `parallel`, else one after the other); returns their JSON results in order.

    RSS is per process, so concurrent children do not change each other's peak memory (only their
    speed). glibc's mmap threshold is fixed at 128 KiB, so freed tensors leave the RSS at once: the
    RSS then follows live memory instead of the allocator's history (its dynamic threshold keeps
    freed buffers).
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

    def start(module: str, spec: dict) -> subprocess.Popen:
        cmd = [sys.executable, "-m", f"benchmarks.{module}", "--child", json.dumps(spec), "--threads", str(threads)]
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(spec: dict, proc: subprocess.Popen) -> dict:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark child {spec} failed:\n{err[-3000:]}")
        return json.loads(out.strip().splitlines()[-1])

    if parallel:
        procs = [start(m, s) for m, s in children]
        return [result(s, p) for (_, s), p in zip(children, procs)]
    return [result(s, start(m, s)) for m, s in children]


def imagenet_names(n: int) -> list[str]:
    """`n` ImageNet class names spread over the 1000 (real names: one to several tokens each)."""
    import open_clip

    names = open_clip.IMAGENET_CLASSNAMES
    return [names[i * len(names) // n] for i in range(n)]


def table(model: str, rows: Sequence[dict]) -> str:
    """Markdown table of result rows (dicts with what, value, target, met, note) of one model."""
    lines = ["| model | measurement | value | target | met | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        met = "n/a" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {model} | {r['what']} | {r['value']} | {r['target']} | {met} | {r['note']} |")
    return "\n".join(lines)


def write_rows(path: str | Path | None, rows: Any) -> None:
    """Write the rows as JSON to `path` (atomically), when a path is given."""
    if path:
        from glad_core.io import write_json
        write_json(path, rows)


def image_size(model: Any) -> tuple[int, int]:
    """(height, width) of a model's input images, from its preprocessing config."""
    size = model.visual.preprocess_cfg["size"]
    return (size, size) if isinstance(size, int) else tuple(size)


def write_images(folder: Path, n: int, classes: int) -> list:
    """`n` random 224x224 PNG images in `folder` as `Datum` items, labels round-robin over `classes`."""
    import torch
    from PIL import Image

    from glad_core.data import Datum

    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        px = torch.randint(0, 256, (224, 224, 3), generator=g, dtype=torch.uint8)
        path = folder / f"{i:04d}.png"
        Image.fromarray(px.numpy()).save(path)
        items.append(Datum(str(path), i % classes, f"c{i % classes}"))
    return items
