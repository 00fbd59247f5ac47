"""GuiDG benchmarks: a step-2 iteration of `clipood+guidg` against `clipood`, and images per second of
both training stages.

    python -m benchmarks.guidg                           # glad-mini and a random ViT-B-16
    python -m benchmarks.guidg --models glad-mini --rounds 7
    python -m benchmarks.guidg --device cuda --models ViT-B-16
    python -m benchmarks.guidg --smoke                   # tiny model, one round: checks the script runs

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

import copy
import statistics
import sys

import torch

from benchmarks.common import SMOKE_MODEL, image_size, load_model, parser, smoke_config, table, write_rows
from benchmarks.common import imagenet_names as classnames
from benchmarks.timing import interleave
from glad_core.gradreg import GradRegStep
from glad_core.methods import build
from glad_core.methods.guidg_train import expert_step, guided_step, step2_classifiers
from glad_core.prompts import PromptLearner
from glad_core.config import TrainConfig

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
    m.before_training(10_000)
    step = [0]

    def run() -> None:
        guided_step(m, stepper, images, labels, T)
        m.after_step(step[0], 10_000)
        step[0] += 1
    return run


def run(model: str, batch: int, classes: int, rounds: int, device: str, tune: str, config_dir: str | None) -> list[dict]:
    clip, _, tokenizer = load_model(model, device, config_dir)
    names = classnames(classes)
    size = image_size(clip)
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
    cli = parser(__doc__, "smoke", "device", "json")
    cli.add_argument("--models", default="glad-mini,ViT-B-16", help="comma-separated backbones")
    cli.add_argument("--batch", type=int, default=12, help="images per source domain and step (GuiDG: 12)")
    cli.add_argument("--classes", type=int, default=10)
    cli.add_argument("--rounds", type=int, default=5)
    cli.add_argument("--tune", default="full", choices=("full", "lora"))
    args = cli.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.smoke:
        models, args.batch, args.classes, args.rounds = [SMOKE_MODEL], 2, 3, 1
    out = {}
    with smoke_config(args.smoke) as config_dir:
        for model in models:
            rows = run(model, args.batch, args.classes, args.rounds, args.device, args.tune, config_dir)
            print(table(model, rows), flush=True)
            out[model] = rows
    write_rows(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
