"""GuiDG benchmarks: a step-2 iteration of `clipood+guidg` against `clipood`, and images per second of
both training stages.

    python benchmarks/guidg.py                           # glad-mini and a random ViT-B-16
    python benchmarks/guidg.py --models glad-mini --rounds 7
    python benchmarks/guidg.py --device cuda --models ViT-B-16
    python benchmarks/guidg.py --smoke                   # tiny model, one round: checks the script runs

Step 2 runs through `glad_core.methods.guidg_train.guided_step` (the tuned image tower on one batch
per source domain in one call, the guided loss against fixed classifiers, AdamW) on the same images
and labels for both methods: `clipood` scores one classifier (the hand-written prompts), `clipood+guidg`
K = 3 experts weighted by the cross-modal attention. The experts' class features are computed once
(`step2_classifiers`), as in training, so the ratio measures the guidance itself. Step 1 is
`expert_step` (frozen image features, one CoOp expert's context through the text tower, SGD).
Full fine-tuning of the image tower (GuiDG's setting) unless `--tune lora`; the Beta moving average
of CLIPood is not part of a step (it is a parameter copy after it) and is timed with it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from glad_core.gradreg import GradRegStep  # noqa: E402
from glad_core.methods import build  # noqa: E402
from glad_core.methods.guidg_train import expert_step, guided_step, step2_classifiers  # noqa: E402
from glad_core.prompts import PromptLearner  # noqa: E402
from glad_core.config import TrainConfig  # noqa: E402
from prompts import SMOKE_CONFIG, SMOKE_MODEL, classnames, load, table  # noqa: E402
from timing import interleave  # noqa: E402

SOURCES = 3  # a leave-one-out run on a four-domain set (PACS, VLCS, OfficeHome, TerraIncognita, mini-PACS)


def guided(name: str, clip, tokenizer, names: list[str], device: str, batch: int, tune: str,
           images: torch.Tensor, labels: torch.Tensor):
    """One step-2 iteration of a GuiDG method on fixed batches, as a function (random expert contexts installed)."""
    cfg = TrainConfig(method=name, device=device, batch_size=batch, hparams={"tune": tune, "n_ctx": 16})
    m = build(clip, tokenizer, cfg).to(device)
    contexts = None
    if m.guided:
        g = torch.Generator().manual_seed(1)
        d = PromptLearner(clip, tokenizer, names[:1], n_ctx=1, init=None).d_token
        contexts = [0.02 * torch.randn(16, d, generator=g).to(device) for _ in range(SOURCES)]
    m.classnames, m.expert_names = list(names), [f"d{k}" for k in range(SOURCES)]
    T = step2_classifiers(m, contexts, names, ["a photo of a {}."])
    params = m.trainable()
    stepper = GradRegStep(params, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay), mode="none")
    m.train()
    step = [0]

    def run() -> None:
        guided_step(m, stepper, images, labels, T)
        m.after_step(step[0], 10_000)
        step[0] += 1
    return run


def run(model: str, batch: int, classes: int, rounds: int, device: str, tune: str, config_dir: str | None) -> list[dict]:
    clip, tokenizer = load(model, device, config_dir)
    names = classnames(classes)
    size = clip.visual.preprocess_cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(SOURCES * batch, 3, *size, generator=g).to(device)
    labels = torch.randint(0, classes, (SOURCES * batch,), generator=g).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fns = {}
    for name in ("clipood", "clipood+guidg"):
        fns[name] = guided(name, copy.deepcopy(clip), tokenizer, names, device, batch, tune, images, labels)
    expert = build(copy.deepcopy(clip), tokenizer, TrainConfig(method="guidg", device=device)).to(device)
    learner = PromptLearner(expert.clip, tokenizer, names, n_ctx=16, init=None, freeze=False).to(device)
    sgd = torch.optim.SGD([learner.ctx], lr=1e-4)
    fns["expert"] = lambda: expert_step(expert, learner, sgd, images, labels)
    times = interleave(fns, rounds, warmup=list(fns), sync=sync)
    med = {k: statistics.median(ts) for k, ts in times.items()}
    n = SOURCES * batch
    per_round = [a / b for a, b in zip(times["clipood+guidg"], times["clipood"])]
    where = f"{device}, {SOURCES} sources x batch {batch}, {classes} classes, tune {tune}"
    r = med["clipood+guidg"] / med["clipood"]
    return [dict(what=f"step-2 iteration, clipood+guidg / clipood, same batches ({where}); "
                      f"{1000 * med['clipood+guidg']:.0f} ms vs {1000 * med['clipood']:.0f} ms",
                 value=f"{r:.3f}", target="<= 1.15", met=r <= 1.15,
                 note=f"rounds {min(per_round):.3f}-{max(per_round):.3f}; fastest runs "
                      f"{min(times['clipood+guidg']) / min(times['clipood']):.3f}"),
            dict(what=f"step-2 training images/s, clipood+guidg / clipood ({where})",
                 value=f"{n / med['clipood+guidg']:.1f} / {n / med['clipood']:.1f}", target="report", met=None, note=""),
            dict(what=f"step-1 (one expert, CoOp 16 tokens, frozen image tower) training images/s, batch {n} ({device})",
                 value=f"{n / med['expert']:.1f}", target="report", met=None, note="")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="glad-mini,ViT-B-16", help="comma-separated backbones")
    parser.add_argument("--batch", type=int, default=12, help="images per source domain and step (GuiDG: 12)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tune", default="full", choices=("full", "lora"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny model, small sizes, one round")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    config_dir, models = None, [m.strip() for m in args.models.split(",") if m.strip()]
    if args.smoke:
        config_dir = tempfile.mkdtemp()
        (Path(config_dir) / f"{SMOKE_MODEL}.json").write_text(json.dumps(SMOKE_CONFIG))
        models, args.batch, args.classes, args.rounds = [SMOKE_MODEL], 2, 3, 1
    out = {}
    for model in models:
        rows = run(model, args.batch, args.classes, args.rounds, args.device, args.tune, config_dir)
        print(table(model, rows), flush=True)
        out[model] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
