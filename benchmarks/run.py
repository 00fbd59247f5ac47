"""Performance benchmarks of glad_core: training-step ratios, inference and evaluation throughput,
text-tower cost, peak memory; a GPU section when CUDA is present.

    python -m benchmarks.run                          # ViT-B-32 and glad-mini, writes benchmarks/RESULTS.md
    python -m benchmarks.run --quick                  # fewer repeats
    python -m benchmarks.run --models ViT-B-32 --out benchmarks/RESULTS.md

Models are random-init (speed and memory do not depend on the weights). Every ratio is measured
side by side in one run on the same inputs: warm-up calls first, then rounds in which each
configuration runs once (the order rotates every round); a ratio is the ratio of median times.
Peak memory (RSS) is measured in a fresh process per configuration. `--smoke` runs every section on a tiny model in seconds (for the test suite).
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import sys
import tempfile
import time
import weakref
from unittest import mock
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.hf_model import HFTextEncoder
from PIL import Image
from torch import nn

import glad_core
import glad_core.protocols
from benchmarks.common import ROOT, SMOKE_MODEL, child, image_size, load_model, run_children, smoke_config
from benchmarks.common import chosen_sections, parser as cli
from benchmarks.memory import MB, PeakRSS
from benchmarks.timing import interleave
from glad_core.data import Datum
from glad_core.encode import encode_text, prompts, trim_padding
from glad_core.gradreg import MODES, GradRegStep
from glad_core.lora import merge_lora, unmerge_lora
from glad_core.methods import build
from glad_core.config import TrainConfig
from glad_core.train import Step, evaluate

TEMPLATES = ["a photo of a {}."]
WORDS = ("red", "small", "wooden", "house", "striped", "cat", "sports", "car", "garden", "flower", "old",
         "bridge", "spotted", "bird", "stone", "tower")


@dataclass(frozen=True)
class Settings:
    """Sizes and repeat counts of one benchmark run."""

    batch: int = 32
    classes: int = 50
    step_rounds: int = 5
    text_rounds: int = 5
    infer_rounds: int = 7
    eval_images: int = 64
    eval_rounds: int = 3
    eval_batch: int = 64
    alignnet_batch: int = 64
    alignnet_chunk: int = 256


FULL = Settings()
QUICK = Settings(step_rounds=3, text_rounds=3, infer_rounds=5, eval_images=32, eval_rounds=2)
SMOKE = Settings(batch=4, classes=5, step_rounds=1, text_rounds=1, infer_rounds=1, eval_images=8, eval_rounds=1,
                 eval_batch=4, alignnet_batch=4, alignnet_chunk=64)


@dataclass
class Row:
    """One line of the results table."""

    model: str
    key: str
    what: str
    value: str
    target: str = ""
    met: bool | None = None
    note: str = ""


def classnames(n: int) -> list[str]:
    """`n` class names of one to four words (prompt lengths vary like real class lists)."""
    return [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(1 + i % 4)) for i in range(n)]


# ----------------------------------------------------------------------------- timing


def ratio(times: dict[str, list[float]], a: str, b: str) -> tuple[float, str]:
    """Median time of a / median time of b, and a note: per-round ratios' range, ratio of the fastest runs."""
    r = med(times, a) / med(times, b)
    if len(times[a]) == 1:
        return r, ""
    rs = [x / y for x, y in zip(times[a], times[b])]
    return r, f"rounds {min(rs):.3f}-{max(rs):.3f}; fastest runs {min(times[a]) / min(times[b]):.3f}"


def med(times: dict[str, list[float]], name: str) -> float:
    return statistics.median(times[name])


# ----------------------------------------------------------------------------- training step


class StepBench:
    """One training step of `glad_core.train.train` on a fixed batch: its `Step` (zero-shot target when
    the KL weight is positive, the method's forward and loss as closure) under each step rule.
    """

    def __init__(self, clip: nn.Module, tokenizer: Callable, settings: Settings, method: str = "lora",
                 device: str = "cpu", precision: str = "auto"):
        self.cfg = TrainConfig(method=method, device=device, precision=precision)
        self.kl_weight = self.cfg.kl_weight or 1.0  # steps "with KL" use it; the others set it to 0
        self.device = torch.device(device)
        self.model = build(clip, tokenizer, self.cfg).to(self.device).train()
        self.tokenizer = tokenizer
        self.names = classnames(settings.classes)
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(settings.batch, 3, *image_size(clip), generator=g).to(self.device)
        self.labels = torch.randint(0, settings.classes, (settings.batch,), generator=g).to(self.device)
        self.params = self.model.trainable()
        optimizer = self.model.optimizer(self.params)
        self.train_step = Step(self.model, self.names, TEMPLATES, optimizer)
        self.steppers = {m: GradRegStep(self.params, optimizer, mode=m, rho=self.cfg.rho, alpha=self.cfg.alpha,
                                        delta=self.cfg.delta) for m in MODES}
        self.passes: list[float] = []  # seconds of each forward-backward pass of the running step
        self.outside: dict[str, list[float]] = {m: [] for m in MODES}  # step time not spent in passes
        for stepper in self.steppers.values():
            stepper._grad = self._timed(stepper._grad)
        self.prompts = prompts(self.names, TEMPLATES)
        self.tokens = tokenizer(self.prompts).to(self.device)

    def _timed(self, grad: Callable) -> Callable:
        """`GradRegStep._grad` (closure, then backward) that records its duration in `self.passes`."""
        def timed(closure: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
            t = time.perf_counter()
            out = grad(closure)
            self.passes.append(time.perf_counter() - t)
            return out
        return timed

    def text_features(self, full_context: bool = False) -> torch.Tensor:
        """Class text features: trimmed (glad_core) or at the full context (model.encode_text).

        Both tokenize the prompts on every call, as `train` does.
        """
        if not full_context:
            return self.model.class_features(self.names, TEMPLATES).float()
        tokens = self.tokenizer(self.prompts).to(self.device)
        f = self.model.clip.encode_text(tokens, normalize=True).view(len(TEMPLATES), len(self.names), -1)
        return F.normalize(f.mean(0), dim=-1).float()

    def zero_shot(self) -> torch.Tensor:
        """The zero-shot log-probabilities of the batch (no_grad, every trained part off)."""
        return self.train_step.zero_shot_log_probs(self.images)

    def step(self, mode: str, kl: bool, full_context: bool = False) -> Callable[[], torch.Tensor]:
        """A function running one training step (returns the loss)."""
        def run() -> torch.Tensor:
            self.cfg.kl_weight = self.kl_weight if kl else 0.0
            log_p_zs = self.zero_shot() if kl else None
            closure = self.train_step.closure(self.images, self.labels, log_p_zs)
            self.passes.clear()
            t = time.perf_counter()
            if full_context:  # the same step with the text tower run at its full context
                with mock.patch.object(self.model, "class_features", lambda *a: self.text_features(True)):
                    loss = self.steppers[mode].step(closure)
            else:
                loss = self.steppers[mode].step(closure)
            if not kl and not full_context:
                self.outside[mode].append(time.perf_counter() - t - sum(self.passes))
            return loss
        return run

    def text_pass(self, full_context: bool) -> Callable[[], None]:
        """Forward and backward through the text tower alone."""
        def run() -> None:
            for p in self.params:
                p.grad = None
            self.text_features(full_context).sum().backward()
        return run


def step_rows(name: str, sb: StepBench, s: Settings) -> list[Row]:
    """Targets 1, 2 and the step part of 4."""
    fns = {"lora": sb.step("none", kl=False), "gradreg": sb.step("gradreg", kl=False),
           "sam": sb.step("sam", kl=False), "lora_kl": sb.step("none", kl=True),
           "gradreg_kl": sb.step("gradreg", kl=True), "zs": sb.zero_shot,
           "lora_full_text": sb.step("none", kl=False, full_context=True)}
    t = interleave(fns, s.step_rounds, warmup=("lora", "zs"))
    log_times(name, t)
    rows = []
    r, note = ratio(t, "gradreg", "lora")
    rows.append(Row(name, "1a", "GradReg step / plain LoRA step (no KL)", f"{r:.3f}", "<= 2.05", r <= 2.05, note))
    t_zs, t_fb = med(t, "zs"), med(t, "lora")
    predicted = (t_zs + 2 * t_fb) / (t_zs + t_fb)
    r, note = ratio(t, "gradreg_kl", "lora_kl")
    dev = r / predicted - 1
    rows.append(Row(name, "1b", f"GradReg step / plain LoRA step (KL on); T_zs {t_zs:.2f} s, T_fb {t_fb:.2f} s",
                    f"{r:.3f}", f"(T_zs+2T_fb)/(T_zs+T_fb) = {predicted:.3f} +-3%", abs(dev) <= 0.03,
                    f"off by {100 * dev:+.1f}%; {note}"))
    extra = statistics.median(sb.outside["gradreg"]) - statistics.median(sb.outside["none"])
    rows.append(Row(name, "1c", f"GradRegStep's own work beyond a second pass (perturb, restore, fuse): "
                                f"{1000 * extra:.1f} ms per step, as a fraction of T_fb",
                    f"{extra / t_fb:.4f}", "<= 0.02", extra / t_fb <= 0.02,
                    "step time outside the forward-backward passes, GradReg minus plain"))
    r, note = ratio(t, "sam", "lora")
    rows.append(Row(name, "2", "SAM step / plain LoRA step (no KL)", f"{r:.3f}", "<= 2.05", r <= 2.05, note))
    rows.append(Row(name, "-", "plain LoRA step / GradReg step (KL on), training images/s",
                    f"{s.batch / med(t, 'lora_kl'):.1f} / {s.batch / med(t, 'gradreg_kl'):.1f}", "report"))
    r, note = ratio(t, "lora", "lora_full_text")
    rows.append(Row(name, "4a", "LoRA step time, trimmed text (after) / full-context model.encode_text (before)",
                    f"{r:.3f}", "report", None, note))
    return rows


def log_times(name: str, times: dict[str, list[float]]) -> None:
    """Print every timed call (seconds), for the run's log."""
    for key, ts in times.items():
        print(f"    {name} {key}: " + " ".join(f"{x:.3f}" for x in ts), flush=True)


def coop_row(name: str, untouched: nn.Module, tokenizer: Callable, lora: StepBench, s: Settings) -> Row:
    """A CoOp step (context through the frozen text tower) against a LoRA step, same model and batch."""
    coop = StepBench(copy.deepcopy(untouched), tokenizer, s, method="coop")
    t = interleave({"lora": lora.step("none", kl=False), "coop": coop.step("none", kl=False)}, s.step_rounds,
                   warmup=("lora", "coop"))
    log_times(name, t)
    r, note = ratio(t, "coop", "lora")
    return Row(name, "9a", "CoOp step / LoRA step (4 context tokens; LoRA r 8 on both towers; no KL)", f"{r:.3f}",
               "report", None, note)


def text_rows(name: str, sb: StepBench, s: Settings) -> list[Row]:
    """The text-tower part of target 4: cost against the longest prompt, and equal features."""
    t = interleave({"trim": sb.text_pass(False), "full": sb.text_pass(True)}, s.text_rounds, warmup=("trim", "full"))
    log_times(name, t)
    r, note = ratio(t, "trim", "full")
    used, context = trim_padding(sb.tokens, _pad_id(sb.model.clip)).shape[1], sb.tokens.shape[1]
    bound = 1.5 * used / context
    rows = [Row(name, "4b", f"text tower fwd+bwd, trimmed / full context ({used} of {context} tokens used)",
                f"{r:.3f}", f"<= 1.5 x {used}/{context} = {bound:.3f}", r <= bound, note)]
    sb.model.eval()
    rows.append(text_equality_row(name, "4c", sb.model.clip, sb.tokens))
    sb.model.train()
    return rows


def _pad_id(model: nn.Module) -> int:
    return getattr(getattr(getattr(model, "text", None), "config", None), "pad_token_id", 0) or 0


@torch.no_grad()
def text_equality_row(name: str, key: str, model: nn.Module, tokens: torch.Tensor) -> Row:
    tower = type(getattr(model, "text", model)).__name__
    diff = (encode_text(model, tokens) - model.encode_text(tokens, normalize=True)).abs().max().item()
    return Row(name, key, f"text features trimmed vs full context, {tower} tower", f"max |diff| {diff:.1e}",
               "<= 1e-5", diff <= 1e-5)


class HFTower(nn.Module):
    """open_clip's Hugging Face text tower alone (BERT), as a model with `encode_text`."""

    def __init__(self, hidden: int, layers: int, heads: int, dim: int = 512):
        super().__init__()
        from transformers import BertConfig

        cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=4 * hidden, max_position_embeddings=512, pad_token_id=0)
        self.text = HFTextEncoder("bert", dim, config=cfg, pooler_type="mean_pooler", proj_type="linear")

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = self.text(tokens)
        return F.normalize(f, dim=-1) if normalize else f


def hf_equality_row(name: str, smoke: bool) -> Row:
    """Trimmed vs full-length features of a random-init BERT tower (MiniLM-L6 shape; tiny in smoke)."""
    torch.manual_seed(0)
    tower = HFTower(32, 2, 2) if smoke else HFTower(384, 6, 12)
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(8, 77, dtype=torch.long)
    for i in range(len(tokens)):
        n = 3 + 2 * i
        tokens[i, :n] = torch.randint(1000, 30000, (n,), generator=g)
        tokens[i, 0], tokens[i, n - 1] = 101, 102
    row = text_equality_row(name, "4c", tower.eval(), tokens)
    row.what += " (random init, " + ("tiny)" if smoke else "MiniLM-L6 shape)")
    return row


# ----------------------------------------------------------------------------- inference and evaluation


def inference_row(name: str, sb: StepBench, untouched: nn.Module, s: Settings) -> Row:
    """Target 3: images/s of the merged LoRA model against the untouched open_clip model."""
    clip = sb.model.clip.eval()
    merge_lora(clip)
    try:
        with torch.no_grad():
            t = interleave({"merged": lambda: clip.encode_image(sb.images),
                            "untouched": lambda: untouched.encode_image(sb.images)},
                           s.infer_rounds, warmup=("merged", "untouched"))
    finally:
        unmerge_lora(clip)
        sb.model.train()
    log_times(name, t)
    r, note = ratio(t, "untouched", "merged")  # time ratio = images/s of merged / untouched
    return Row(name, "3", f"inference images/s, merged LoRA / untouched model "
                          f"({s.batch / med(t, 'merged'):.1f} vs {s.batch / med(t, 'untouched'):.1f})",
               f"{r:.3f}", ">= 0.98", r >= 0.98, note)


def write_images(folder: Path, n: int, classes: int) -> list[Datum]:
    """`n` JPEG files (smooth colour fields with noise, 256x256) labelled round-robin."""
    rng = np.random.default_rng(0)
    names = classnames(classes)
    yy, xx = np.mgrid[0:256, 0:256] / 255.0
    items = []
    for i in range(n):
        a = rng.uniform(0, 1, (3, 3))
        img = np.stack([a[c, 0] * xx + a[c, 1] * yy + a[c, 2] for c in range(3)], -1) / 3
        img = np.clip(255 * img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(img).save(path, quality=90)
        items.append(Datum(str(path), i % classes, names[i % classes]))
    return items


@torch.no_grad()
def plain_open_clip_eval(clip: nn.Module, tokenizer: Callable, preprocess: Callable, items: Sequence[Datum],
                         names: Sequence[str], batch: int) -> float:
    """The usual open_clip zero-shot loop: text encoded once per class, images in batches."""
    text = F.normalize(clip.encode_text(tokenizer([TEMPLATES[0].format(c) for c in names])), dim=-1)
    correct = 0
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        x = torch.stack([preprocess(Image.open(d.impath).convert("RGB")) for d in chunk])
        pred = (F.normalize(clip.encode_image(x), dim=-1) @ text.T).argmax(-1)
        correct += (pred == torch.tensor([d.label for d in chunk])).sum().item()
    return correct / len(items)


def eval_row(name: str, clip: nn.Module, preprocess: Callable, tokenizer: Callable, s: Settings) -> Row:
    """Target 5: zero-shot evaluation images/s, glad_core.train.evaluate against the plain loop."""
    names = classnames(s.classes)
    zs = build(clip, tokenizer, TrainConfig(method="zeroshot", device="cpu", eval_batch_size=s.eval_batch))
    with tempfile.TemporaryDirectory() as d:
        items = write_images(Path(d), s.eval_images, s.classes)
        t = interleave({"glad": lambda: evaluate(zs, items, names, TEMPLATES, preprocess, progress=False),
                        "plain": lambda: plain_open_clip_eval(clip, tokenizer, preprocess, items, names, s.eval_batch)},
                       s.eval_rounds, warmup=("glad", "plain"))
    log_times(name, t)
    r, note = ratio(t, "plain", "glad")
    return Row(name, "5a", f"zero-shot eval images/s, evaluate() / plain open_clip loop "
                           f"({s.eval_images / med(t, 'glad'):.1f} vs {s.eval_images / med(t, 'plain'):.1f})",
               f"{r:.3f}", ">= 0.98", r >= 0.98, note)


# ----------------------------------------------------------------------------- memory (child processes)


class _Saved:
    """A tensor saved for backward, held through an object whose lifetime can be watched."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def child_step(spec: dict) -> dict:
    """Peak RSS of training steps in this (fresh) process, and whether pass 1's graph is freed early."""
    s = Settings(**spec["settings"])
    clip, _, tokenizer = load_model(spec["model"], config_dir=spec.get("config_dir"))
    sb = StepBench(clip, tokenizer, s, method=spec["method"])
    with torch.no_grad():
        sb.model.clip.encode_image(sb.images[:1])
    passes: list[list[weakref.ref]] = []
    alive: list[int] = []

    def pack(t: torch.Tensor) -> _Saved:
        h = _Saved(t)
        passes[-1].append(weakref.ref(h))
        return h

    stepper = sb.steppers[spec["mode"]]
    original_step = stepper.step

    def tracked(closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        def wrapped() -> torch.Tensor:
            if passes:  # the second pass starts: count pass 1's saved tensors still referenced
                alive.append(sum(r() is not None for r in passes[-1]))
            passes.append([])
            return closure()
        return original_step(wrapped)

    stepper.step = tracked
    step = sb.step(spec["mode"], kl=True)
    with PeakRSS() as m, torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.tensor):
        for _ in range(spec["steps"]):
            passes.clear()
            step()
    return {"start_mb": m.start / MB, "peak_mb": m.peak / MB, "saved_first_pass": len(passes[0]),
            "alive_at_second_pass": max(alive) if alive else None}


def memory_rows(name: str, config_dir: str | None, s: Settings, threads: int, dim: int) -> list[Row]:
    """Target 6 (GLAD step vs plain LoRA step) and the AlignNet part of target 5."""
    small, big = s.alignnet_chunk, 1000
    base = {"model": name, "config_dir": config_dir, "settings": vars(s), "steps": 2}
    net = {"dim": dim, "batch": s.alignnet_batch, "grad": False}
    sizes = ((small, small), (big, small), (big, big))
    plain, glad, *nets, train = run_children(
        [("run", {**base, "method": "lora", "mode": "none"}), ("run", {**base, "method": "glad", "mode": "gradreg"})]
        + [("memory", {**net, "classes": c, "chunk": k}) for c, k in sizes]
        + [("memory", {**net, "batch": s.batch, "classes": big, "chunk": small, "grad": True})], threads)
    inc_p, inc_g = plain["peak_mb"] - plain["start_mb"], glad["peak_mb"] - glad["start_mb"]
    r = inc_g / inc_p
    rows = [Row(name, "6a", f"peak RSS of a step (KL on): plain LoRA {plain['peak_mb']:.0f} MB (+{inc_p:.0f} over "
                            f"the loaded model), GLAD {glad['peak_mb']:.0f} MB (+{inc_g:.0f})",
                f"{r:.3f}", "GLAD / plain increase <= 1.10", r <= 1.10),
            Row(name, "6b", "pass-1 saved tensors still alive when GradReg's second pass starts",
                f"{glad['alive_at_second_pass']} of {glad['saved_first_pass']}", "0",
                glad["alive_at_second_pass"] == 0)]
    inc = {key: v["peak_mb"] - v["start_mb"] for key, v in zip(sizes, nets)}
    r = inc[(big, small)] / max(inc[(small, small)], 1.0)
    rows.append(Row(name, "5b", f"AlignNet eval logits, batch {s.alignnet_batch}, D={dim}: peak increase "
                                f"{inc[(big, small)]:.0f} MB for 1000 classes in chunks of {small} "
                                f"(unchunked {inc[(big, big)]:.0f} MB; {small} classes {inc[(small, small)]:.0f} MB)",
                    f"{r:.2f}", f"1000 / {small} classes <= 1.5", r <= 1.5))
    rows.append(Row(name, "5c", f"AlignNet training fwd+bwd, batch {s.batch}, 1000 classes: peak increase",
                    f"{train['peak_mb'] - train['start_mb']:.0f} MB", "report"))
    return rows


# ----------------------------------------------------------------------------- GPU


def gpu_rows(s: Settings, smoke: bool, config_dir: str | None) -> list[Row]:
    """Target 7: CUDA + bf16 autocast, ViT-B-16 training images/s and peak memory (only with CUDA)."""
    name = SMOKE_MODEL if smoke else "ViT-B-16"
    if not torch.cuda.is_available():
        return [Row(name, "7", "GPU: bf16 training images/s and peak memory", "not measured", "report", None,
                    "no GPU was available for this measurement")]
    rows = []
    for method, mode in (("lora", "none"), ("glad", "gradreg")):
        clip, _, tokenizer = load_model(name, config_dir=config_dir)
        sb = StepBench(clip, tokenizer, s, method=method, device="cuda", precision="bf16")
        torch.cuda.reset_peak_memory_stats()
        t = interleave({"step": sb.step(mode, kl=True)}, max(s.step_rounds, 5), warmup=("step", "step"),
                       sync=torch.cuda.synchronize)
        peak = torch.cuda.max_memory_allocated() / MB
        rows.append(Row(name, "7", f"GPU ({torch.cuda.get_device_name()}), bf16, {method} step (KL on): "
                                   f"training images/s, peak allocated {peak:.0f} MB",
                        f"{s.batch / med(t, 'step'):.1f}", "report"))
        del sb, clip
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- driver


SECTIONS = ("training steps", "prompt learning", "text tower", "inference", "evaluation", "memory")


def bench_model(name: str, loaded: tuple[nn.Module, Callable, Callable], s: Settings, threads: int,
                config_dir: str | None, smoke: bool, only: Sequence[str] = SECTIONS) -> list[Row]:
    """The CPU sections `only` (default: all of `SECTIONS`) for one backbone."""
    clip, preprocess, tokenizer = loaded
    untouched = copy.deepcopy(clip).requires_grad_(False)
    dim = clip.encode_text(tokenizer(["a"])).shape[-1]
    sb = StepBench(clip, tokenizer, s)
    is_hf = isinstance(getattr(clip, "text", None), HFTextEncoder)  # its own HF tower is checked in 4c already
    sections: list[tuple[str, Callable[[], list[Row]]]] = [
        ("training steps", lambda: step_rows(name, sb, s)),
        ("prompt learning", lambda: [coop_row(name, untouched, tokenizer, sb, s)]),
        ("text tower", lambda: text_rows(name, sb, s) + ([] if is_hf else [hf_equality_row(name, smoke)])),
        ("inference", lambda: [inference_row(name, sb, untouched, s)]),
        ("evaluation", lambda: [eval_row(name, untouched, preprocess, tokenizer, s)]),
        ("memory", lambda: memory_rows(name, config_dir, s, threads, dim)),
    ]
    rows = []
    for label, run in sections:
        if label not in only:
            continue
        t = time.perf_counter()
        rows += run()
        print(f"  {label}: {time.perf_counter() - t:.0f} s", flush=True)
    return rows


def environment(threads: int) -> dict[str, str]:
    env = glad_core.protocols.environment()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}",
            "versions": ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
            "threads": f"torch intra-op threads {threads}",
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def table(rows: Sequence[Row]) -> str:
    """Markdown table of the rows."""
    lines = ["| model | # | measurement | value | target | met | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        met = "n/a" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.model} | {r.key} | {r.what} | {r.value} | {r.target} | {met} | {r.note} |")
    return "\n".join(lines)


README = """\
## How to run

    python -m benchmarks.run                    # full run (15-20 minutes on 2 CPU cores)
    python -m benchmarks.run --quick            # fewer repeats
    python -m benchmarks.run --models ViT-B-32 --out my-results.md

Options: `--models` (comma-separated open_clip names, or `glad-mini` once `python -m glad_core
prepare` has built it), `--threads` (torch threads, default all cores), `--out`, `--sections` (a
subset, e.g. `--sections "prompt learning"` for row 9a alone). The GPU section runs
when CUDA is available. `--smoke` runs every section on a tiny model in seconds (used by the tests;
its numbers mean nothing).

## Method

- Models are random-init: speed and memory do not depend on the weights. Batch {batch}, {classes}
  classes, one prompt template; class names of one to four words.
- The training step is `glad_core.train.train`'s per-batch work on a fixed batch (no data loading):
  the zero-shot target under no_grad when KL is on, then `GradRegStep.step` whose closure builds the
  class text features through the adapted text tower, encodes the images and returns CE (+ KL).
  LoRA on q/k/v of both towers, `TrainConfig` defaults (rank 8, LoRA dropout 0.25).
- Ratios are measured side by side in one process on the same inputs: warm-up calls, then rounds in
  which each configuration runs once, the order rotated every round. A ratio is the ratio of the
  two configurations' median times; the note gives the range of the per-round ratios and the ratio
  of the fastest runs. Other processes on the machine slow single calls at random (see the load
  average above): a wide range over rounds means the run was disturbed, and the ratio of the
  fastest runs is then the better estimate. With several threads every operation waits for all of
  them, so a thread taken away by another process stalls each operation: many small operations (the
  trimmed text tower) lose more than few large ones, which pulls such ratios towards 1. Every timed
  call is printed to the run's log.
- T_fb is the plain LoRA step without KL (one forward-backward), T_zs the no_grad zero-shot image
  forward; with the zero-shot target computed once per step and reused by both passes, GradReg costs
  T_zs + 2 T_fb against T_zs + T_fb. Row 1c times each forward-backward pass inside the step
  (wrapping `GradRegStep._grad`) and reports what a GradReg step spends outside its passes, beyond
  what a plain step spends there (the optimizer step): the cost of the method itself, free of the
  run-to-run noise of the passes. A 1a / 2 ratio above 2 with a small 1c is pass-time noise.
- Peak memory is the RSS of a fresh process per configuration, sampled every millisecond during two
  steps, minus the RSS before the steps (model loaded and warmed up): both configurations are
  measured the same way. glibc's mmap threshold is fixed at 128 KiB in these processes, so a freed
  tensor leaves the RSS at once and the RSS follows live memory, not the allocator's history.
  Row 6b watches every tensor autograd saves in pass 1 and counts those still referenced when
  pass 2 starts (0: the first graph is freed before the second pass).
- Evaluation reads the same JPEG files through each model's own preprocessing in both loops.
"""


def write_results(path: Path, rows: Sequence[Row], env: dict[str, str], s: Settings, argv: Sequence[str],
                  seconds: float, loads: tuple[str, str], skipped: Sequence[str]) -> None:
    missed = [r for r in rows if r.met is False]
    summary = (f"{sum(r.met is True for r in rows)} targets met, {len(missed)} missed"
               + (": " + ", ".join(f"{r.model} #{r.key}" for r in missed) if missed else "") + ".")
    text = [
        "# Benchmarks", "",
        f"Command: `{' '.join(['python -m benchmarks.run', *argv])}` ({seconds / 60:.1f} min).", "",
        f"- Date: {env['date']}",
        f"- Machine: {env['machine']}; GPU: {env['gpu']}",
        f"- Versions: {env['versions']}",
        f"- Threads: {env['threads']}",
        f"- Load average (1/5/15 min) at start {loads[0]}, at end {loads[1]}",
        f"- Settings: batch {s.batch}, {s.classes} classes, {s.step_rounds} step rounds, "
        f"{s.infer_rounds} inference rounds, {s.eval_images} evaluation images x {s.eval_rounds} rounds", "",
        "## Results", "", summary, "", table(rows), "",
    ]
    if skipped:
        text += ["Not measured: " + "; ".join(skipped) + ".", ""]
    text += [README.format(batch=s.batch, classes=s.classes)]
    from glad_core.io import atomic_path
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(text))


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli(__doc__, "smoke", "threads", "child")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--models", default="ViT-B-32,glad-mini", help="comma-separated backbones")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="results file")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated CPU sections to run (default all: {', '.join(SECTIONS)}); the GPU "
                             "section runs with 'gpu' in the list or by default")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        return child(child_step, args.child)
    only = chosen_sections(parser, args.sections, (*SECTIONS, "gpu"))
    gpu = "gpu" in only or args.sections == parser.get_default("sections")

    t0, load_start = time.perf_counter(), load_average()
    s = SMOKE if args.smoke else QUICK if args.quick else FULL
    with smoke_config(args.smoke) as config_dir:
        models = [SMOKE_MODEL] if args.smoke else [m.strip() for m in args.models.split(",") if m.strip()]
        rows: list[Row] = []
        skipped: list[str] = []
        for name in models:
            try:
                loaded = load_model(name, config_dir=config_dir)
            except Exception as e:  # an optional backbone that is not built here: reported, not fatal
                skipped.append(f"{name} ({type(e).__name__}: {e})")
                print(f"skipping {name}: {e}", flush=True)
                continue
            print(f"== {name}", flush=True)
            rows += bench_model(name, loaded, s, args.threads, config_dir, args.smoke, only)
        if gpu:
            rows += gpu_rows(s, args.smoke, config_dir)
    env = environment(args.threads)
    print(table(rows))
    write_results(Path(args.out), rows, env, s, argv if argv is not None else sys.argv[1:],
                  time.perf_counter() - t0, (load_start, load_average()), skipped)
    print(f"\nwrote {args.out} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
