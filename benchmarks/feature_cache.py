"""Frozen image features cached: a second-seed CoOp cell's evaluation with the cache against without.

    python -m benchmarks.feature_cache                       # glad-mini and a random ViT-B-16, CPU
    python -m benchmarks.feature_cache --models ViT-B-16 --images 200 --rounds 5
    python -m benchmarks.feature_cache --device cuda
    python -m benchmarks.feature_cache --smoke               # tiny model, a few images: checks the script runs

The first seed's cell evaluates its test split and writes the split's image features
(`glad_core.feature_cache`); the second seed's cell is a new CoOp (another random context) on the same
backbone, split and transform, which reads them. Both evaluations go through `glad_core.train.evaluate`
(text features through the text tower, logits, accuracy), on `--images` PNG files written to a
temporary folder, `eval_batch_size` 32: "without" encodes every image, "with" reads the cached file.
The miss (the first seed's evaluation, encoding and writing the file) is timed against "without" too.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch
from benchmarks.common import SMOKE_MODEL, load_model, parser, smoke_config, table, write_images, write_rows
from benchmarks.common import imagenet_names as classnames
from benchmarks.timing import interleave
from glad_core.config import TrainConfig
from glad_core.feature_cache import FeatureCache
from glad_core.methods import build
from glad_core.train import evaluate

TEMPLATES = ["a photo of a {}."]


def run(model: str, n: int, classes: int, rounds: int, device: str, config_dir: str | None) -> list[dict]:
    clip, preprocess, tokenizer = load_model(model, device, config_dir)
    names = classnames(classes)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        items = write_images(Path(tmp), n, classes)

        def coop(seed: int, cache: FeatureCache | None):
            torch.manual_seed(seed)
            m = build(clip, tokenizer, TrainConfig(method="coop", seed=seed, device=device, eval_batch_size=32))
            m.to(device).feature_cache = cache
            return m

        shared = FeatureCache(Path(tmp) / "feature_cache")
        first, plain, cached = coop(1, shared), coop(2, None), coop(2, shared)
        fresh = iter(range(rounds + 1))

        def miss() -> dict:
            first.feature_cache = FeatureCache(Path(tmp) / f"miss{next(fresh)}")  # nothing there: encode, write
            return evaluate(first, items, names, TEMPLATES, preprocess, progress=False)

        evaluate(first, items, names, TEMPLATES, preprocess, progress=False)  # the first seed's cell fills `shared`
        fns = {"without": lambda: evaluate(plain, items, names, TEMPLATES, preprocess, progress=False),
               "with": lambda: evaluate(cached, items, names, TEMPLATES, preprocess, progress=False),
               "miss": miss}
        times = interleave(fns, rounds, warmup=["without", "with"], sync=sync)
        same = fns["without"]() == fns["with"]()
    med = {k: statistics.median(ts) for k, ts in times.items()}
    r, miss = med["with"] / med["without"], med["miss"] / med["without"]
    per_round = [a / b for a, b in zip(times["with"], times["without"])]
    where = f"{device}, {n} images, {classes} classes, eval batch 32"
    return [dict(what=f"second-seed CoOp cell's evaluation, with cache / without ({where}); "
                      f"{1000 * med['with']:.0f} ms vs {1000 * med['without']:.0f} ms",
                 value=f"{r:.3f}", target="<= 0.2", met=r <= 0.2,
                 note=f"rounds {min(per_round):.3f}-{max(per_round):.3f}; same results: {same}"),
            dict(what=f"first cell's evaluation (a miss: encodes and writes the file) / without ({where})",
                 value=f"{miss:.3f}", target="report", met=None, note=f"{1000 * med['miss']:.0f} ms")]


def main(argv: list[str] | None = None) -> int:
    cli = parser(__doc__, "smoke", "device", "json")
    cli.add_argument("--models", default="glad-mini,ViT-B-16", help="comma-separated backbones")
    cli.add_argument("--images", type=int, default=128, help="test images")
    cli.add_argument("--classes", type=int, default=10)
    cli.add_argument("--rounds", type=int, default=3)
    args = cli.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.smoke:
        models, args.images, args.classes, args.rounds = [SMOKE_MODEL], 8, 3, 1
    out = {}
    with smoke_config(args.smoke) as config_dir:
        for model in models:
            rows = run(model, args.images, args.classes, args.rounds, args.device, config_dir)
            print(table(model, rows), flush=True)
            out[model] = rows
    write_rows(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
