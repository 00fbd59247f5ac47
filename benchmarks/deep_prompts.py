"""Deep-prompt benchmarks: MaPLe, PromptSRC (and IVLP) training steps against a CoOp step and a LoRA step on
the same model and batch, and the peak memory of each step.

    python -m benchmarks.deep_prompts                       # ViT-B-32 (random init), batch 32, 50 classes
    python -m benchmarks.deep_prompts --model glad-mini     # text-only deep prompts (no blocks in its image tower)
    python -m benchmarks.deep_prompts --device cuda --model ViT-B-16
    python -m benchmarks.deep_prompts --smoke               # tiny model, one round: checks the script runs

Every method runs one full `glad_core.train.Step` (class features, image features, its own loss, backward,
its optimizer's step) on the same images and labels, with its default hyper-parameters (depth 9, LoRA r 8 on
both towers; no KL term for any of them; PromptSRC's self-regularization is part of its loss: one more
frozen image-tower forward and the 60-template teacher, computed once per class set). CoOp, IVLP, MaPLe
and PromptSRC share one frozen model (their prompts enter through hooks); LoRA gets its own copy. Times are
medians of interleaved rounds. Peak memory: each step in a fresh process, its RSS increase over the loaded
model and one warm-up step (CPU), or `torch.cuda.max_memory_allocated` over the loaded model (GPU).
"""
from __future__ import annotations

import copy
import statistics
import sys
from typing import Sequence

import torch

from benchmarks.common import SMOKE_MODEL, child, image_size, load_model, run_children, smoke_config, table, write_rows
from benchmarks.common import imagenet_names as classnames
from benchmarks.common import chosen_sections, parser as cli
from benchmarks.memory import MB, PeakRSS
from benchmarks.timing import interleave
from glad_core.methods import build
from glad_core.config import TrainConfig
from glad_core.train import Step

TEMPLATES = ["a photo of a {}."]
METHODS = ("lora", "coop", "ivlp", "maple", "promptsrc")


class MethodStep:
    """One training step of a method on a fixed batch (`Step.__call__`: forward, loss, backward, update)."""

    def __init__(self, name: str, clip, tokenizer, batch: int, classes: int, device: str):
        self.method = build(clip, tokenizer, TrainConfig(method=name, device=device, precision="fp32")).to(device)
        self.method.train()
        names = classnames(classes)
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 3, *image_size(clip), generator=g).to(device)
        self.labels = torch.randint(0, classes, (batch,), generator=g).to(device)
        self.step = Step(self.method, names, TEMPLATES, self.method.optimizer(self.method.trainable()))

    def __call__(self) -> float:
        return self.step(self.images, self.labels).item()


def speed_rows(model: str, batch: int, classes: int, n_rounds: int, device: str, config_dir: str | None) -> list[dict]:
    clip, _, tokenizer = load_model(model, device, config_dir)
    untouched = copy.deepcopy(clip)  # LoRA changes its model in place; the prompt methods leave theirs as is
    steps = {"lora": MethodStep("lora", untouched, tokenizer, batch, classes, device)}
    steps.update({m: MethodStep(m, clip, tokenizer, batch, classes, device) for m in METHODS[1:]})
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t = interleave(steps, n_rounds, warmup=list(steps), sync=sync)
    med = {k: statistics.median(v) for k, v in t.items()}
    depth = steps["maple"].method.record_info()["deep_prompts"]
    rows = []
    for m in ("maple", "promptsrc", "ivlp"):
        per_round = [a / b for a, b in zip(t[m], t["coop"])]
        rows.append(dict(
            what=f"{m} step / CoOp step ({device}, batch {batch}, {classes} classes; depth text "
                 f"{depth['text_depth']} / vision {depth['vision_depth']}); {1000 * med[m]:.0f} ms vs "
                 f"{1000 * med['coop']:.0f} ms",
            value=f"{med[m] / med['coop']:.3f}", target="report", met=None,
            note=f"rounds {min(per_round):.3f}-{max(per_round):.3f}; / LoRA step ({1000 * med['lora']:.0f} ms): "
                 f"{med[m] / med['lora']:.3f}"))
    rows.append(dict(what=f"CoOp step / LoRA step ({device}, same batch)", value=f"{med['coop'] / med['lora']:.3f}",
                     target="report", met=None, note="rounds " + ", ".join(f"{x:.2f}" for x in t["coop"])))
    return rows


def child_peak(spec: dict) -> dict:
    """Peak memory of one training step of `spec['method']` in this fresh process, after one warm-up step."""
    clip, _, tokenizer = load_model(spec["model"], spec["device"], spec.get("config_dir"))
    step = MethodStep(spec["method"], clip, tokenizer, spec["batch"], spec["classes"], spec["device"])
    if spec["device"].startswith("cuda"):
        step()
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"start_mb": start / MB, "peak_mb": torch.cuda.max_memory_allocated() / MB}
    step()
    with PeakRSS() as m:
        step()
    return {"start_mb": m.start / MB, "peak_mb": m.peak / MB}


def memory_rows(model: str, batch: int, classes: int, device: str, threads: int, config_dir: str | None) -> list[dict]:
    specs = [("deep_prompts", {"model": model, "method": m, "batch": batch, "classes": classes, "device": device,
                               "config_dir": config_dir}) for m in METHODS]
    results = run_children(specs, threads, parallel=False)  # one after the other: each has the machine to itself
    inc = {m: (r["peak_mb"] - r["start_mb"], r["start_mb"]) for m, r in zip(METHODS, results)}
    kind = "CUDA allocated" if device.startswith("cuda") else "RSS"
    return [dict(what=f"peak {kind} increase of a {m} step ({device}, batch {batch}, {classes} classes), "
                      f"/ a LoRA step ({inc['lora'][0]:.0f} MB)",
                 value=f"{inc[m][0]:.0f} MB ({inc[m][0] / max(inc['lora'][0], 1.0):.2f})", target="report", met=None,
                 note=f"loaded model {inc[m][1]:.0f} MB")
            for m in METHODS[1:]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli(__doc__, "smoke", "device", "threads", "json", "child")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sections", default="speed,memory", help="comma-separated: speed, memory")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        return child(child_peak, args.child)
    sections = chosen_sections(parser, args.sections, ("speed", "memory"))
    with smoke_config(args.smoke) as config_dir:
        if args.smoke:
            args.model, args.batch, args.classes, args.rounds = SMOKE_MODEL, 2, 5, 1
        rows = []
        if "speed" in sections:
            rows += speed_rows(args.model, args.batch, args.classes, args.rounds, args.device, config_dir)
        if "memory" in sections:
            rows += memory_rows(args.model, args.batch, args.classes, args.device, args.threads, config_dir)
    print(table(args.model, rows))
    write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
