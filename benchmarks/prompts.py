"""Prompt-learning benchmarks: CoCoOp's per-image class embeddings batched vs looped, and peak memory.

    python -m benchmarks.prompts                     # glad-mini, batch 8, 50 classes; memory on 1000 classes
    python -m benchmarks.prompts --model ViT-B-16    # any open_clip model (random init)
    python -m benchmarks.prompts --device cuda --sections speed   # step times on a GPU
    python -m benchmarks.prompts --smoke             # tiny model, one round: checks the script runs

CoCoOp gives every image its own context v_m + π(f(x)), hence its own class embeddings [B, C, D].
Its original trainer loops over the images (B text-tower calls of C prompts); `PromptLearner`
encodes the B·C prompts in one call. Both run here on the same inputs (4 context tokens from
"a photo of a", the meta-net, CE on fixed image features): equal features and gradients, and the
ratio of the median step times (forward and backward of context and meta-net) over interleaved
rounds. Peak memory is the RSS of a fresh process (as in `memory.py`): evaluation of a batch on
1000 classes (ImageNet's names) in chunks of prompts against one call, and a training step at
CoCoOp's published batch size 1.
"""
from __future__ import annotations

import statistics
import sys
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import SMOKE_MODEL, child, load_model, run_children, smoke_config, table, write_rows
from benchmarks.common import imagenet_names as classnames
from benchmarks.common import chosen_sections, parser as cli
from benchmarks.memory import MB, PeakRSS
from benchmarks.timing import interleave
from glad_core.prompts import PromptLearner, meta_net


class CoCoOpStep:
    """One CoCoOp training step on fixed image features: meta-net shift, class embeddings, CE, backward."""

    def __init__(self, clip: nn.Module, tokenizer: Callable, classes: int, batch: int, device: str = "cpu"):
        torch.manual_seed(0)
        self.clip = clip
        self.learner = PromptLearner(clip, tokenizer, classnames(classes), n_ctx=4, init="a photo of a").to(device)
        with torch.no_grad():
            dim = self.learner().shape[-1]
        self.net = meta_net(dim, self.learner.d_token).to(device)
        g = torch.Generator().manual_seed(0)
        self.f_i = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device)
        self.labels = torch.randint(0, classes, (batch,), generator=g).to(device)
        self.params = [self.learner.ctx, *self.net.parameters()]

    def step(self, batched: bool, chunk: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Class embeddings [B, C, D] and the gradients of context and meta-net."""
        for p in self.params:
            p.grad = None
        shift = self.net(self.f_i)[:, None]  # [B, 1, d_token]: one shift for every context token
        if batched:
            t = self.learner(shift, chunk=chunk)
        else:  # the original trainer: one text-tower call of C prompts per image
            t = torch.stack([self.learner(shift[b:b + 1])[0] for b in range(len(shift))])
        logits = self.clip.logit_scale.exp() * torch.einsum("bd,bcd->bc", self.f_i, t)
        F.cross_entropy(logits, self.labels).backward()
        return t.detach(), [p.grad.clone() for p in self.params]


def speed_rows(name: str, clip: nn.Module, tokenizer: Callable, batch: int, classes: int, n_rounds: int,
               device: str) -> list[dict]:
    """Equal outputs and the step-time ratio of the batched call against the per-image loop."""
    bench = CoCoOpStep(clip, tokenizer, classes, batch, device)
    (t_b, g_b), (t_l, g_l) = bench.step(True), bench.step(False)
    diff_t = (t_b - t_l).abs().max().item()
    diff_g = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(g_b, g_l))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = interleave({"batched": lambda: bench.step(True), "looped": lambda: bench.step(False)}, n_rounds,
                       warmup=("batched", "looped"), sync=sync)
    for k, ts in times.items():
        print(f"    {name} {k}: " + " ".join(f"{x:.3f}" for x in ts), flush=True)
    med = {k: statistics.median(ts) for k, ts in times.items()}
    r = med["batched"] / med["looped"]
    per_round = [a / b for a, b in zip(times["batched"], times["looped"])]
    where = f"{device}, batch {batch}, {classes} classes, {bench.learner.tokens.shape[1]} tokens"
    return [
        dict(what=f"CoCoOp class embeddings [B, C, D], one batched call vs per-image loop ({where}): max |diff|",
             value=f"{diff_t:.1e}", target="<= 1e-5", met=diff_t <= 1e-5,
             note=f"gradients of context and meta-net: max relative diff {diff_g:.1e}"),
        dict(what=f"CoCoOp step time (fwd+bwd of context and meta-net), batched / per-image loop ({where}); "
                  f"{1000 * med['batched']:.0f} ms vs {1000 * med['looped']:.0f} ms",
             value=f"{r:.3f}", target="<= 0.8", met=r <= 0.8,
             note=f"rounds {min(per_round):.3f}-{max(per_round):.3f}; fastest runs "
                  f"{min(times['batched']) / min(times['looped']):.3f}"),
    ]


def child_peak(spec: dict) -> dict:
    """Peak RSS of one evaluation batch (no_grad) or one training step on `classes` classes, in this process."""
    clip, _, tokenizer = load_model(spec["model"], config_dir=spec.get("config_dir"))
    bench = CoCoOpStep(clip, tokenizer, spec["classes"], spec["batch"])
    warm = PromptLearner(clip, tokenizer, classnames(2))
    with torch.no_grad():
        warm(torch.zeros(1, 1, warm.d_token))
    with PeakRSS() as m:
        if spec["grad"]:
            bench.step(True, chunk=spec["chunk"])
        else:
            with torch.no_grad():
                bench.learner(bench.net(bench.f_i)[:, None], chunk=spec["chunk"])
    return {"start_mb": m.start / MB, "peak_mb": m.peak / MB, "tokens": bench.learner.tokens.shape[1],
            "width": bench.learner.d_token}


def memory_rows(name: str, batch: int, chunk: int, threads: int, config_dir: str | None) -> list[dict]:
    """Chunked vs one-call evaluation on 1000 classes, and a training step at batch 1."""
    base = {"model": name, "classes": 1000, "config_dir": config_dir}
    chunked, whole, train = run_children([("prompts", {**base, "batch": batch, "chunk": chunk, "grad": False}),
                                          ("prompts", {**base, "batch": batch, "chunk": None, "grad": False}),
                                          ("prompts", {**base, "batch": 1, "chunk": None, "grad": True})],
                                         threads, parallel=False)
    inc = [c["peak_mb"] - c["start_mb"] for c in (chunked, whole, train)]
    layer = batch * 1000 * chunked["tokens"] * chunked["width"] * 4 / MB
    return [
        dict(what=f"CoCoOp evaluation, batch {batch} x 1000 classes ({chunked['tokens']} tokens): peak RSS increase "
                  f"in chunks of {chunk} prompts / in one call ({inc[0]:.0f} MB vs {inc[1]:.0f} MB)",
             value=f"{inc[0] / max(inc[1], 1.0):.3f}", target="report", met=None,
             note=f"one layer's activations of all {batch}x1000 prompts: {layer:.0f} MB"),
        dict(what="CoCoOp training step, batch 1 (published) x 1000 classes: peak RSS increase",
             value=f"{inc[2]:.0f} MB", target="report", met=None, note=f"start {train['start_mb']:.0f} MB"),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli(__doc__, "smoke", "device", "threads", "json", "child")
    parser.add_argument("--model", default="glad-mini")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--eval-batch", type=int, default=8, help="images per evaluation batch (1000 classes)")
    parser.add_argument("--chunk", type=int, default=1000, help="prompts per text-tower call in chunked evaluation")
    parser.add_argument("--sections", default="speed,memory", help="comma-separated: speed, memory")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        return child(child_peak, args.child)
    sections = chosen_sections(parser, args.sections, ("speed", "memory"))
    with smoke_config(args.smoke) as config_dir:
        if args.smoke:
            args.model, args.batch, args.classes, args.rounds, args.eval_batch, args.chunk = SMOKE_MODEL, 2, 5, 1, 2, 500
        rows = []
        if "speed" in sections:
            clip, _, tokenizer = load_model(args.model, args.device, config_dir)
            rows += speed_rows(args.model, clip, tokenizer, args.batch, args.classes, args.rounds, args.device)
        if "memory" in sections:
            rows += memory_rows(args.model, args.eval_batch, args.chunk, args.threads, config_dir)
    print(table(args.model, rows))
    write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
