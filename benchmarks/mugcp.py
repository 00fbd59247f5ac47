"""MuGCP benchmarks: a MuGCP training step against a CoCoOp step on the same batch, and evaluation on
1000 classes in chunks of prompts.

    python -m benchmarks.mugcp                       # glad-mini, batch 8, 50 classes, 1000-class evaluation
    python -m benchmarks.mugcp --device cuda --batch 32
    python -m benchmarks.mugcp --smoke               # tiny model, one round: checks the script runs

Both methods run through `glad_core.train.Step` (image tower, per-image class embeddings [B, C, D] in
one text-tower call, loss, backward, optimizer step) on the same images and labels, CE only
(kl_weight 0) so that the ratio measures the conditional prompts alone; MuGCP's default consistency
term (kl_weight 1: one more zero-shot forward of the image tower) is reported beside it. Descriptions
are synthetic one-sentence texts of 6-14 words (an MLLM's length), one per image. Evaluation scores
a batch on 1000 ImageNet class names with `prompt_chunk` prompts per text-tower call (no_grad).
"""
from __future__ import annotations

import statistics
import sys

import torch

from benchmarks.common import SMOKE_MODEL, image_size, load_model, parser, smoke_config, table, write_rows
from benchmarks.common import imagenet_names as classnames
from benchmarks.timing import interleave
from glad_core.data import Datum
from glad_core.descriptions import DescriptionProvider, Descriptions
from glad_core.methods import build
from glad_core.config import TrainConfig
from glad_core.train import Step

WORDS = "a small bright object with round edges lying on a wooden table near the window".split()


def batch_items(n: int, classes: list[str]) -> tuple[list[Datum], DescriptionProvider]:
    """`n` items and an MLLM-style provider giving each a sentence of 6-14 words."""
    items = [Datum(f"/bench/img/{i}.png", i % len(classes), classes[i % len(classes)]) for i in range(n)]
    texts = {f"img/{i}.png": " ".join(WORDS[: 6 + i % 9]).capitalize() + "." for i in range(n)}
    return items, DescriptionProvider(Descriptions("mllm", "bench", texts, generator="synthetic", question="-"))


def method(name: str, clip, tokenizer, device: str, **kw):
    m = build(clip, tokenizer, TrainConfig(method=name, device=device, **kw)).to(device)
    return m


def run(model: str, batch: int, classes: int, n_rounds: int, device: str, chunk: int, config_dir: str | None) -> list[dict]:
    clip, _, tokenizer = load_model(model, device, config_dir)
    names = classnames(classes)
    items, provider = batch_items(batch, names)
    size = image_size(clip)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *size, generator=g).to(device)
    labels = torch.randint(0, classes, (batch,), generator=g).to(device)
    methods = {"cocoop": method("cocoop", clip, tokenizer, device),
               "mugcp": method("mugcp", clip, tokenizer, device, kl_weight=0.0),
               "mugcp_kl": method("mugcp", clip, tokenizer, device)}
    steps = {}
    for k, m in methods.items():
        if k.startswith("mugcp"):
            m.set_provider(provider)
            m.use_items(items, "train")
        m.train()
        steps[k] = Step(m, names, ["a photo of a {}."], precision="fp32")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fns = {k: (lambda s=s: s(images, labels)) for k, s in steps.items()}
    times = interleave(fns, n_rounds, warmup=list(fns), sync=sync)
    med = {k: statistics.median(ts) for k, ts in times.items()}
    where = f"{device}, batch {batch}, {classes} classes"
    rows = [dict(what=f"MuGCP step / CoCoOp step, same batch, CE only ({where}); "
                      f"{1000 * med['mugcp']:.0f} ms vs {1000 * med['cocoop']:.0f} ms",
                 value=f"{med['mugcp'] / med['cocoop']:.3f}", target="<= 1.3", met=med["mugcp"] / med["cocoop"] <= 1.3,
                 note=f"fastest runs {min(times['mugcp']) / min(times['cocoop']):.3f}"),
            dict(what=f"MuGCP step with its default consistency term (kl_weight 1) / CoCoOp step ({where}); "
                      f"{1000 * med['mugcp_kl']:.0f} ms",
                 value=f"{med['mugcp_kl'] / med['cocoop']:.3f}", target="report", met=None, note="")]

    eval_names = classnames(1000)
    evals = {}
    for k in ("cocoop", "mugcp"):
        m = methods[k].eval()
        m.hp["prompt_chunk"] = chunk

        def score(m=m):
            with torch.no_grad():
                f = m.encode_image(images)
                return m.logits(f, m.class_features(eval_names, ["a photo of a {}."], f))
        evals[k] = score
    if device.startswith("cuda"):
        peaks = {}
        for k, fn in evals.items():
            torch.cuda.reset_peak_memory_stats()
            fn()
            peaks[k] = torch.cuda.max_memory_allocated() / 2**20
    t_eval = interleave(evals, max(1, n_rounds // 2), warmup=list(evals), sync=sync)
    e = {k: statistics.median(ts) for k, ts in t_eval.items()}
    mem = f"; peak CUDA memory {peaks['mugcp']:.0f} MB vs {peaks['cocoop']:.0f} MB" if device.startswith("cuda") else ""
    rows.append(dict(what=f"evaluation of a batch of {batch} on 1000 classes in chunks of {chunk} prompts "
                          f"({device}): MuGCP / CoCoOp; {1000 * e['mugcp']:.0f} ms vs {1000 * e['cocoop']:.0f} ms",
                     value=f"{e['mugcp'] / e['cocoop']:.3f}", target="report", met=None,
                     note=f"{1000 * e['mugcp'] / batch:.0f} ms per image{mem}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    cli = parser(__doc__, "smoke", "device", "json")
    cli.add_argument("--model", default="glad-mini")
    cli.add_argument("--batch", type=int, default=8)
    cli.add_argument("--classes", type=int, default=50)
    cli.add_argument("--rounds", type=int, default=7)
    cli.add_argument("--chunk", type=int, default=1000, help="prompts per text-tower call in evaluation")
    args = cli.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.classes, args.rounds, args.chunk = SMOKE_MODEL, 2, 5, 1, 300
    with smoke_config(args.smoke) as config_dir:
        rows = run(args.model, args.batch, args.classes, args.rounds, args.device, args.chunk, config_dir)
    print(table(args.model, rows))
    write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
