"""Loss landscapes and sharpness of tuned adapters: does gradient regularization find flatter minima?

The paper motivates GradReg (and compares with SAM) by flatness but does not measure it. Here the
training loss L(θ) of a tuned model is a function of its trained parameters θ only (LoRA A / B and,
for GLAD, AlignNet), over a fixed set of images (eval transform, eval mode: deterministic):

    L(θ) = Σ_b (n_b / N) [ CE(logits_b(θ), y_b) + λ · KL(p_zero-shot,b ‖ p_b(θ)) ]

Views of L around the tuned θ:

- 1-D / 2-D surfaces  L(θ + α d₁),  L(θ + α d₁ + β d₂)  along filter-normalised random directions
  (Li et al., 2018): each row of d is rescaled to the norm of the same row of θ, so directions
  are comparable across models whose weights have different scales.
- worst-case rise     max_{‖ε‖ ≤ ρ} L(θ + ε) − L(θ), with SAM's first-order ε = ρ g / ‖g‖ and
  optionally a few ascent steps (ρ is Euclidean over all of θ, as in SAM / GradReg training).
- top Hessian eigenvalue  λ_max(∇²L(θ)) by power iteration on Hessian-vector products.

A loss here is any callable returning a scalar tensor that depends on `params`; a `FixedBatchLoss`
is additionally split into per-batch terms, so gradients and Hessian-vector products never hold
more than one batch's graph. Every function leaves the parameters exactly as it found them.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .data import Datum, ImageDataset, Splits
from .lora import load_lora, lora_disabled, lora_layers
from .train import GladModel, TrainConfig, resolve_device

Loss = Callable[[], torch.Tensor]
Vector = list[torch.Tensor]  # one tensor per parameter: a point or direction in θ-space


# ---------------------------------------------------------------------------------------------
# The objective over fixed batches
# ---------------------------------------------------------------------------------------------

def tuning_loss(logits: torch.Tensor, labels: torch.Tensor, log_p_zs: torch.Tensor | None,
                kl_weight: float) -> torch.Tensor:
    """CE(logits, y) + λ · KL(p_zs ‖ softmax(logits)): the objective `train` minimises per batch."""
    loss = F.cross_entropy(logits, labels)
    if kl_weight > 0:
        loss = loss + kl_weight * F.kl_div(F.log_softmax(logits, dim=-1), log_p_zs, log_target=True,
                                           reduction="batchmean")
    return loss


class FixedBatchLoss:
    """L(θ) = Σ_b (n_b / N) ℓ_b(θ), the training objective over fixed batches, in eval mode.

    The zero-shot distributions of the KL term do not depend on θ and are computed once. Computed in
    the model's own dtype (no autocast, unlike bf16 training on CUDA). Attention runs on PyTorch's math kernel: it is deterministic and twice differentiable.
    """

    def __init__(self, model: GladModel, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 classnames: Sequence[str], templates: Sequence[str], kl_weight: float | None = None):
        if any(m.merged for m in lora_layers(model.clip)):
            raise ValueError("unmerge_lora(model.clip) first: merged adapters do not depend on their parameters.")
        self.model, self.classnames, self.templates = model, list(classnames), list(templates)
        self.kl_weight = model.cfg.kl_weight if kl_weight is None else kl_weight
        self.text_tuned = model.cfg.spec.lora and "text" in model.cfg.lora_towers
        ref = model.clip.logit_scale
        self.batches = [(x.to(ref.device, ref.dtype), y.to(ref.device)) for x, y in batches]
        self.n = sum(len(y) for _, y in self.batches)
        model.eval()
        self.log_p_zs: list[torch.Tensor | None] = [None] * len(self.batches)
        if self.kl_weight > 0:
            with torch.no_grad(), lora_disabled(model.clip), sdpa_kernel(SDPBackend.MATH):
                text = model.text_features(self.classnames, self.templates)
                self.log_p_zs = [F.log_softmax(model.logits(self._image_features(x), text, adapted=False), dim=-1)
                                 for x, _ in self.batches]

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.clip.encode_image(images), dim=-1)

    def terms(self) -> Iterator[torch.Tensor]:
        """The summands (n_b / N) ℓ_b(θ), one batch at a time."""
        self.model.eval()
        fixed_text = None
        if not self.text_tuned:
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
                fixed_text = self.model.text_features(self.classnames, self.templates)
        for (images, labels), log_p_zs in zip(self.batches, self.log_p_zs):
            with sdpa_kernel(SDPBackend.MATH):
                text = self.model.text_features(self.classnames, self.templates) if self.text_tuned else fixed_text
                logits = self.model.logits(self._image_features(images), text)
                term = len(labels) / self.n * tuning_loss(logits, labels, log_p_zs, self.kl_weight)
            yield term

    def __call__(self) -> torch.Tensor:
        return sum(self.terms())


def loss_fn(model: GladModel, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], classnames: Sequence[str],
            templates: Sequence[str], kl_weight: float | None = None) -> FixedBatchLoss:
    """The training loss of `model` (CE + λ KL, λ = its config's unless given) over fixed batches.

    `batches` are (images, labels) tensors already transformed (eval transform, no augmentation).
    The model is put in eval mode (no dropout), so every evaluation gives the same value.
    """
    return FixedBatchLoss(model, batches, classnames, templates, kl_weight)


def fixed_batches(items: Sequence[Datum], transform: Callable, batch_size: int = 64,
                  max_images: int | None = None, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`items` (or a seeded subset of `max_images`, in list order) as transformed (images, labels) batches."""
    items = list(items)
    if max_images is not None and max_images < len(items):
        items = [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), max_images))]
    loader = torch.utils.data.DataLoader(ImageDataset(items, transform), batch_size=batch_size)
    return [(x, y) for x, y in loader]


# ---------------------------------------------------------------------------------------------
# Values, gradients, Hessian-vector products
# ---------------------------------------------------------------------------------------------

def _terms(loss: Loss) -> Iterable[torch.Tensor]:
    """The summands of L: one per batch for a `FixedBatchLoss`, else L itself."""
    return loss.terms() if isinstance(loss, FixedBatchLoss) else (loss(),)


def value(loss: Loss) -> float:
    """L(θ) as a float."""
    with torch.no_grad():
        return float(sum(t.double().item() for t in _terms(loss)))


def value_and_grad(loss: Loss, params: Sequence[torch.Tensor]) -> tuple[float, Vector]:
    """L(θ) and ∇L(θ) (zeros for parameters L does not use); `.grad` fields are left untouched."""
    total, grad = 0.0, [torch.zeros_like(p) for p in params]
    for t in _terms(loss):
        for g, dt in zip(grad, torch.autograd.grad(t, params, materialize_grads=True)):
            g += dt
        total += t.double().item()
    return total, grad


def hvp(loss: Loss, params: Sequence[torch.Tensor], v: Vector) -> Vector:
    """H v = ∇(∇L(θ) · v), by double backpropagation."""
    out = [torch.zeros_like(p) for p in params]
    for t in _terms(loss):
        g = torch.autograd.grad(t, params, create_graph=True, materialize_grads=True)
        gv = sum((gi * vi).sum() for gi, vi in zip(g, v))
        for o, h in zip(out, torch.autograd.grad(gv, params, materialize_grads=True)):
            o += h
    return out


def dot(a: Vector, b: Vector) -> float:
    """⟨a, b⟩ over all tensors together, in float64."""
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def norm(a: Vector) -> float:
    return dot(a, a) ** 0.5


class _Moved:
    """Context: parameters set to θ₀ + offset (θ₀ = their values on entry), restored exactly on exit."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)

    def __enter__(self) -> "_Moved":
        self.theta0 = [p.detach().clone() for p in self.params]
        return self

    @torch.no_grad()
    def to(self, offset: Vector) -> None:
        for p, t, o in zip(self.params, self.theta0, offset):
            p.copy_(t + o)

    @torch.no_grad()
    def __exit__(self, *exc) -> None:
        for p, t in zip(self.params, self.theta0):
            p.copy_(t)


# ---------------------------------------------------------------------------------------------
# Filter-normalised directions and surfaces (Li et al., 2018)
# ---------------------------------------------------------------------------------------------

def filter_normalize(direction: Vector, params: Sequence[torch.Tensor]) -> Vector:
    """d_i ← d_i / ‖d_i‖ · ‖θ_i‖ for every row (filter) i of every matrix; zero for 1-D tensors.

    Rows are output units: row j of a LoRA B (d_out × r) or of a Linear weight, row k of a LoRA A
    (r × d_in, the k-th rank-one component). As in Li et al., biases (1-D) get a zero direction.
    A row of zero norm (a never-trained, zero-initialised B or AlignNet output layer) gets a zero
    direction: filter normalisation measures moves relative to the weights' own scale, and that
    scale is zero. Trained B and AlignNet layers are nonzero, so this only affects untrained models.
    """
    out = []
    for d, p in zip(direction, params):
        if p.dim() <= 1:
            out.append(torch.zeros_like(p))
            continue
        d_rows, p_rows = d.reshape(len(d), -1), p.detach().reshape(len(p), -1)
        out.append((d_rows * (p_rows.norm(dim=1) / d_rows.norm(dim=1))[:, None]).view_as(p))
    return out


def random_direction(params: Sequence[torch.Tensor], seed: int) -> Vector:
    """A seeded Gaussian direction, filter-normalised to `params`.

    Drawn on the CPU in parameter order, so a seed gives the same draw on any device, and models
    sharing their first parameters (LoRA before AlignNet) share that part of the draw.
    """
    gen = torch.Generator().manual_seed(seed)
    raw = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
    return filter_normalize(raw, params)


def surface_1d(loss: Loss, params: Sequence[torch.Tensor], direction: Vector,
               alphas: Sequence[float]) -> np.ndarray:
    """[L(θ + α d) for α in alphas]."""
    with _Moved(params) as moved:
        out = []
        for a in alphas:
            moved.to([a * d for d in direction])
            out.append(value(loss))
    return np.array(out)


def surface_2d(loss: Loss, params: Sequence[torch.Tensor], d1: Vector, d2: Vector,
               grid: Sequence[float]) -> np.ndarray:
    """Z[i, j] = L(θ + grid[j] d₁ + grid[i] d₂): rows follow d₂ (y), columns d₁ (x), as
    matplotlib's `contour(grid, grid, Z)` expects."""
    with _Moved(params) as moved:
        out = np.empty((len(grid), len(grid)))
        for i, b in enumerate(grid):
            for j, a in enumerate(grid):
                moved.to([a * x + b * y for x, y in zip(d1, d2)])
                out[i, j] = value(loss)
    return out


# ---------------------------------------------------------------------------------------------
# Sharpness
# ---------------------------------------------------------------------------------------------

def worst_case_rise(loss: Loss, params: Sequence[torch.Tensor], rho: float, steps: int = 0) -> float:
    """max_{‖ε‖ ≤ ρ} L(θ + ε) − L(θ), estimated from below.

        ε₀ = ρ ∇L(θ) / ‖∇L(θ)‖                     SAM's first-order maximiser
        ε_{k+1} = ρ ∇L(θ + ε_k) / ‖∇L(θ + ε_k)‖    `steps` projected ascent steps

    Each step maximises the linearisation of L at θ + ε_k over the ball (for convex L the rise
    never decreases). Returned: the largest rise among the iterates, and at least 0 (ε = 0 is in
    the ball). For a quadratic the first-order rise is ρ‖g‖ + ½ρ² gᵀHg / ‖g‖²; at a stationary
    point (g = 0) the first-order estimate is 0.
    """
    loss0, g = value_and_grad(loss, params)
    best = 0.0
    with _Moved(params) as moved:
        for k in range(steps + 1):
            g_norm = norm(g)
            if g_norm == 0:
                break
            moved.to([rho / g_norm * x for x in g])
            if k < steps:
                loss_k, g = value_and_grad(loss, params)
            else:
                loss_k = value(loss)
            best = max(best, loss_k - loss0)
    return best


def _power_iteration(loss: Loss, params: Sequence[torch.Tensor], shift: float, iters: int, tol: float,
                     seed: int) -> tuple[float, float, bool]:
    """v ← (H + shift·I) v / ‖·‖ from a seeded random v.

    Returns the Rayleigh quotient λ = vᵀ(H + shift·I)v, ‖(H + shift·I)v‖ (a lower bound on the
    spectral radius), and whether the relative residual ‖(H + shift·I)v − λv‖ ≤ tol·|λ| was reached.
    """
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
    v_norm = norm(v)
    v = [x / v_norm for x in v]
    for _ in range(iters):
        hv = [h + shift * x for h, x in zip(hvp(loss, params, v), v)]
        lam, hv_norm = dot(v, hv), norm(hv)
        if norm([h - lam * x for h, x in zip(hv, v)]) <= tol * abs(lam):
            return lam, hv_norm, True
        v = [h / hv_norm for h in hv]
    return lam, hv_norm, False


def top_hessian_eigenvalue(loss: Loss, params: Sequence[torch.Tensor], iters: int = 100, tol: float = 1e-3,
                           seed: int = 0) -> float:
    """λ_max of ∇²L(θ), by power iteration on Hessian-vector products.

    Power iteration converges to μ, the eigenvalue of largest magnitude; if μ ≥ 0 it is λ_max.
    Otherwise (negative curvature dominates, or ±μ tie and the iteration cannot settle), with
    r = ‖Hv‖ ≈ the spectral radius, H + rI has nonnegative eigenvalues and top eigenvalue
    λ_max + r, found by a second power iteration. Converged means the relative residual
    ‖Hv − λv‖ ≤ tol·|λ| (the eigenvalue itself is then accurate to about tol²); warns if `iters`
    iterations do not get there and returns the last estimate.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    lam, radius, converged = _power_iteration(loss, params, 0.0, iters, tol, seed)
    if not (converged and lam >= 0):
        lam_shifted, _, converged = _power_iteration(loss, params, radius, iters, tol, seed)
        lam = lam_shifted - radius
    if not converged:
        warnings.warn(f"Hessian power iteration did not reach tol={tol} in {iters} iterations; "
                      f"returning the last estimate {lam:.6g}", RuntimeWarning, stacklevel=2)
    return lam


# ---------------------------------------------------------------------------------------------
# From a results record to measurements
# ---------------------------------------------------------------------------------------------

def load_tuned(record: dict, device: str | None = None) -> tuple[GladModel, Callable]:
    """The tuned model of a `run_cell` record (backbone, LoRA / AlignNet as configured, its adapter
    loaded) in eval mode, and the backbone's eval transform."""
    from .models import load_backbone

    p = record["params"]
    cfg = TrainConfig(**{k: (tuple(p[k]) if isinstance(p[k], list) else p[k]) for k in TrainConfig.keys()})
    dev = resolve_device(device or cfg.device)
    clip, preprocess, tokenizer = load_backbone(p["backbone"], p["pretrained"], device=dev)
    model = GladModel(clip, tokenizer, cfg).to(dev)
    if record["adapter"] is not None:
        load_lora(model, record["adapter"])
    return model.eval(), preprocess


def training_split(record: dict) -> Splits:
    """The split a record's model was tuned on: few-shot, base classes for base-to-novel."""
    from .datasets import fewshot, load_dataset, subsample_classes

    p = record["params"]
    source = fewshot(load_dataset(p["dataset"], p["data_root"]), p["shots"], p["seed"])
    return subsample_classes(source, "base") if p["protocol"] == "base_to_novel" else source


@dataclass
class Landscape:
    """Measurements around one tuned model; `curve` over `alphas`, `surface` over `grid` × `grid`."""

    method: str
    loss: float
    worst_case_rise: float
    top_eigenvalue: float
    alphas: np.ndarray
    curve: np.ndarray
    grid: np.ndarray
    surface: np.ndarray


def measure(record: dict, alphas: Sequence[float], grid: Sequence[float], rho: float = 0.1,
            ascent_steps: int = 0, hessian_iters: int = 50, tol: float = 1e-3, direction_seed: int = 0,
            max_images: int | None = None, batch_size: int = 64, device: str | None = None) -> Landscape:
    """Surfaces along filter-normalised directions (seeds `direction_seed`, +1) and sharpness of the
    training loss of a record's tuned model, over (a seeded subset of) its training images."""
    model, preprocess = load_tuned(record, device)
    split = training_split(record)
    loss = loss_fn(model, fixed_batches(split.train, preprocess, batch_size, max_images), split.classnames,
                   split.templates)
    params = model.trainable()
    d1, d2 = random_direction(params, direction_seed), random_direction(params, direction_seed + 1)
    return Landscape(method=record["cell"]["method"], loss=value(loss),
                     worst_case_rise=worst_case_rise(loss, params, rho, ascent_steps),
                     top_eigenvalue=top_hessian_eigenvalue(loss, params, hessian_iters, tol),
                     alphas=np.asarray(alphas, dtype=float), curve=surface_1d(loss, params, d1, alphas),
                     grid=np.asarray(grid, dtype=float), surface=surface_2d(loss, params, d1, d2, grid))
