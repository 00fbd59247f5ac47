"""The training data pipeline's images/s against the training step's: can loading keep up?

    python -m benchmarks.pipeline                       # glad-mini and a random ViT-B-16, CPU
    python -m benchmarks.pipeline --workers 0,1,2 --images 256
    python -m benchmarks.pipeline --device cuda         # on a GPU: 'auto' = the cores but one, pinned memory
    python -m benchmarks.pipeline --smoke               # tiny model, a few images: checks the script runs

The pipeline is the training loop's: `ImageDataset` of `--images` PNG files (224x224, written to a
temporary folder) through the model's training transform (`glad_core.runtime.train_transform`: random
resized crop, its normalisation), shuffled batches of `--batch` from a DataLoader with
`glad_core.runtime.loader_options` (`num_workers` 'auto' and each count of `--workers`), including the
copy to the device; one pass over the images per round. The step is `glad_core.train.Step` of GLAD
(LoRA, AlignNet, GradReg's two passes, the zero-shot target) on one fixed batch of the same size. Loading
keeps up when its images/s is at least the step's (ratio >= 1).
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import SMOKE_MODEL, image_size, load_model, parser, smoke_config, table, write_images, write_rows
from benchmarks.common import imagenet_names as classnames
from benchmarks.timing import interleave
from glad_core.config import TrainConfig
from glad_core.data import ImageDataset
from glad_core.methods import build
from glad_core.runtime import loader_options, resolve_device, train_transform, worker_count
from glad_core.train import Step

TEMPLATES = ["a photo of a {}."]


def run(model: str, n: int, batch: int, workers: list[int | str], rounds: int, device: str,
        config_dir: str | None) -> list[dict]:
    clip, _, tokenizer = load_model(model, device, config_dir)
    dev = resolve_device(device)
    names = classnames(10)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        items = write_images(Path(tmp), n, len(names))
        data = ImageDataset(items, train_transform(clip, 0.5))

        def epoch(w: int | str):
            def go() -> None:
                loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, **loader_options(w, dev))
                for images, labels in loader:
                    images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
            return go

        fns = {f"workers {w}": epoch(w) for w in workers}
        method = build(clip, tokenizer, TrainConfig(method="glad", device=device, batch_size=batch)).to(dev)
        method.train()
        step = Step(method, names, TEMPLATES)
        images = torch.randn(batch, 3, *image_size(clip), generator=torch.Generator().manual_seed(0)).to(dev)
        labels = torch.randint(0, len(names), (batch,), generator=torch.Generator().manual_seed(1)).to(dev)
        fns["step"] = lambda: step(images, labels)
        t0 = time.perf_counter()
        times = interleave(fns, rounds, warmup=["step"], sync=sync)
        total = time.perf_counter() - t0
    step_rate = batch / statistics.median(times["step"])
    rows = []
    for w in workers:
        rate = n / statistics.median(times[f"workers {w}"])
        label = f"'auto' = {worker_count(w, dev)}" if w == "auto" else str(w)
        rows.append(dict(what=f"data pipeline images/s, {label} worker(s), batch {batch} ({dev.type}), / GLAD "
                              f"training step images/s",
                         value=f"{rate:.1f} / {step_rate:.3g} = {rate / step_rate:.2f}", target=">= 1 (keeps up)",
                         met=rate >= step_rate, note=f"{n} images per pass; {rounds} rounds in {total:.0f} s"))
    return rows


def main(argv: list[str] | None = None) -> int:
    cli = parser(__doc__, "smoke", "device", "json")
    cli.add_argument("--models", default="glad-mini,ViT-B-16", help="comma-separated backbones")
    cli.add_argument("--images", type=int, default=128, help="images per pass")
    cli.add_argument("--batch", type=int, default=32)
    cli.add_argument("--workers", default="auto,1", help="comma-separated worker counts ('auto' included)")
    cli.add_argument("--rounds", type=int, default=3)
    args = cli.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    workers: list[int | str] = [w if w == "auto" else int(w) for w in (x.strip() for x in args.workers.split(",")) if w]
    if args.smoke:
        models, args.images, args.batch, args.rounds, workers = [SMOKE_MODEL], 8, 4, 1, ["auto"]
    out = {}
    with smoke_config(args.smoke) as config_dir:
        for model in models:
            rows = run(model, args.images, args.batch, workers, args.rounds, args.device, config_dir)
            print(table(model, rows), flush=True)
            out[model] = rows
    write_rows(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
