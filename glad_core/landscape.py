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
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch.nn.attention import SDPBackend, sdpa_kernel

from .data import Datum, ImageDataset, Splits
from .gradreg import dot
from .lora import lora_layers
from .methods import Method, build, load_trained
from .protocols import Cell, run_cell
from .config import TrainConfig
from .runtime import resolve_device
from .train import Step

Loss = Callable[[], torch.Tensor]
Vector = list[torch.Tensor]  # one tensor per parameter: a point or direction in θ-space


# ---------------------------------------------------------------------------------------------
# The objective over fixed batches
# ---------------------------------------------------------------------------------------------

class FixedBatchLoss:
    """L(θ) = Σ_b (n_b / N) ℓ_b(θ), the training objective over fixed batches, in eval mode.

    ℓ_b is the method's own loss on batch b, through the training step's forward (`glad_core.train.Step`).
    The zero-shot distributions of the KL term do not depend on θ and are computed once. Everything
    runs in the model's own dtype (no autocast, unlike bf16 training on CUDA), and attention on
    PyTorch's math kernel, which is twice differentiable (the fused CPU / CUDA kernels are not).
    """

    def __init__(self, method: Method, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 classnames: Sequence[str], templates: Sequence[str]):
        if any(m.merged for m in lora_layers(method.clip)):
            raise ValueError("unmerge_lora(method.clip) first: merged adapters do not depend on their parameters.")
        self.method = method
        ref = method.clip.logit_scale
        self.batches = [(x.to(ref.device, ref.dtype), y.to(ref.device)) for x, y in batches]
        self.n = sum(len(y) for _, y in self.batches)
        method.eval()
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            self.step = Step(method, classnames, templates, precision="fp32")
            self.log_p_zs = [self.step.zero_shot_log_probs(x) if method.cfg.kl_weight > 0 else None
                             for x, _ in self.batches]

    def terms(self) -> Iterator[torch.Tensor]:
        """The summands (n_b / N) ℓ_b(θ), one batch at a time."""
        self.method.eval()
        for (images, labels), log_p_zs in zip(self.batches, self.log_p_zs):
            with sdpa_kernel(SDPBackend.MATH):
                logits, text = self.step.forward(images)
                term = len(labels) / self.n * self.method.loss(logits, labels, log_p_zs, text, self.step.zs_text)
            yield term

    def __call__(self) -> torch.Tensor:
        return sum(self.terms())


def loss_fn(method: Method, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], classnames: Sequence[str],
            templates: Sequence[str]) -> FixedBatchLoss:
    """The training loss of `method` (its own `loss`, e.g. CE + λ KL) over fixed batches.

    `batches` are (images, labels) tensors already transformed (eval transform, no augmentation).
    The model is put in eval mode (no dropout), so every evaluation gives the same value.
    """
    return FixedBatchLoss(method, batches, classnames, templates)


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
        return sum(t.item() for t in _terms(loss))


def value_and_grad(loss: Loss, params: Sequence[torch.Tensor]) -> tuple[float, Vector]:
    """L(θ) and ∇L(θ) (zeros for parameters L does not use); `.grad` fields are left untouched."""
    total, grad = 0.0, [torch.zeros_like(p) for p in params]
    for t in _terms(loss):
        for g, dt in zip(grad, torch.autograd.grad(t, params, materialize_grads=True)):
            g += dt
        total += t.item()
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


def norm(a: Vector) -> float:
    return float(dot(a, a)) ** 0.5


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


def _power_iteration(loss: Loss, params: Sequence[torch.Tensor], v: Vector, shift: float, iters: int,
                     tol: float) -> tuple[float, Vector, float, bool]:
    """v ← (H + shift·I) v / ‖·‖ from a unit vector v, at most `iters` times.

    Returns λ = vᵀHv, the last v, ‖(H + shift·I)v‖, and whether the relative residual
    ‖Hv − λv‖ ≤ tol·|λ| was reached (the residual is the same with or without the shift).
    """
    lam, hv_norm = float("nan"), float("nan")
    for _ in range(iters):
        hv = [h + shift * x for h, x in zip(hvp(loss, params, v), v)]
        lam, hv_norm = float(dot(v, hv)) - shift, norm(hv)
        if norm([h - (lam + shift) * x for h, x in zip(hv, v)]) <= tol * abs(lam):
            return lam, v, hv_norm, True
        v = [h / hv_norm for h in hv]
    return lam, v, hv_norm, False


def top_eigenvalue_and_convergence(loss: Loss, params: Sequence[torch.Tensor], iters: int = 100,
                                   tol: float = 1e-3, seed: int = 0) -> tuple[float, bool]:
    """`top_hessian_eigenvalue` and whether it converged, without warning."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    gen = torch.Generator().manual_seed(seed)
    v0 = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
    v0 = [x / norm(v0) for x in v0]
    lam, v, radius, converged = _power_iteration(loss, params, v0, 0.0, iters, tol)
    if not (converged and lam >= 0):  # converged to a negative eigenvector: restart, else go on from v
        lam, _, _, converged = _power_iteration(loss, params, v0 if converged else v, radius, iters, tol)
    return lam, converged


def top_hessian_eigenvalue(loss: Loss, params: Sequence[torch.Tensor], iters: int = 100, tol: float = 1e-3,
                           seed: int = 0) -> float:
    """λ_max of ∇²L(θ), by power iteration on Hessian-vector products (at most 2·iters of them).

    Power iteration v ← Hv / ‖Hv‖ converges to μ, the eigenvalue of largest magnitude; if μ ≥ 0
    it is λ_max. Otherwise a second power iteration runs on H + rI, r = ‖Hv‖ ≈ the spectral
    radius, whose eigenvalues λ + r are nonnegative and whose top one is λ_max + r: restarted if
    μ < 0 (negative curvature dominates), continued from the last v if the first did not converge
    (e.g. λ_max and a negative eigenvalue of about the same magnitude). Converged means the
    relative residual ‖Hv − λv‖ ≤ tol·|λ| (λ itself is then accurate to about tol²·|λ|); warns if
    it is not reached and returns the last estimate, a Rayleigh quotient vᵀHv ≤ λ_max: a lower bound.
    """
    lam, converged = top_eigenvalue_and_convergence(loss, params, iters, tol, seed)
    if not converged:
        warnings.warn(f"Hessian power iteration did not reach tol={tol} in {iters} iterations; "
                      f"returning the last estimate {lam:.6g}", RuntimeWarning, stacklevel=2)
    return lam


# ---------------------------------------------------------------------------------------------
# From cells and records to measurements, tables and figures
# ---------------------------------------------------------------------------------------------

def tuned_records(cells: Sequence[Cell], progress: bool = True) -> list[dict]:
    """The records of `cells`, training those not done yet (`run_cell`; a record's path names every
    parameter that changes it, so a record found is one trained with the cell's parameters)."""
    return [run_cell(cell, progress=progress) for cell in cells]


def load_tuned(record: dict, device: str | None = None) -> tuple[Method, Callable]:
    """The tuned method of a `run_cell` record (backbone, method as configured, its trained state
    loaded) in eval mode, and the backbone's eval transform."""
    from .models import load_backbone

    p = record["params"]
    cfg = TrainConfig.from_params(p)
    dev = resolve_device(device or cfg.device)
    clip, preprocess, tokenizer = load_backbone(p["backbone"], p["pretrained"], device=dev)
    method = build(clip, tokenizer, cfg).to(dev)
    if record["adapter"] is not None:
        load_trained(method, record["adapter"])
    return method.eval(), preprocess


def training_split(record: dict) -> Splits:
    """The split a record's model was tuned on: few-shot, base classes for base-to-novel."""
    from .datasets import fewshot, load_dataset, subsample_classes

    p = record["params"]
    source = fewshot(load_dataset(p["dataset"], p["data_root"]), p["shots"], p["seed"])
    return subsample_classes(source, "base") if p["protocol"] == "base_to_novel" else source


def output_dir(cell: Cell) -> Path:
    """Where the landscape table and figures of a cell's dataset, backbone, shots and seed go."""
    return Path(cell.results_dir) / "landscape" / cell.dataset / cell.backbone.replace("/", "_") / cell.name


def symmetric_grid(points: int, span: float) -> np.ndarray:
    """`points` (odd) coordinates evenly spaced over [−span, span], with 0 exactly in the middle."""
    if points < 3 or points % 2 == 0:
        raise ValueError(f"grid points must be odd and >= 3 (so that 0 is on the grid), got {points}")
    k = points // 2
    return span * np.arange(-k, k + 1) / k


@dataclass
class Landscape:
    """Measurements around one tuned model: `curve` along d₁ over `alphas`, `surface` over (d₁, d₂)
    on `grid` × `grid` (rows: d₂). `alphas` halves the spacing of `grid`: curve[::2] = surface[centre]."""

    method: str
    metrics: dict[str, float]  # accuracies from the record (base / novel / hm, or targets)
    images: int                # size of the fixed set the loss is taken over
    loss: float
    worst_case_rise: float
    top_eigenvalue: float       # NaN when skipped
    eigenvalue_converged: bool  # power iteration reached its tolerance (else: the last estimate)
    alphas: np.ndarray
    curve: np.ndarray
    grid: np.ndarray
    surface: np.ndarray


def measure(record: dict, points: int = 11, span: float = 1.0, rho: float = 0.1, ascent_steps: int = 0,
            hessian_iters: int = 100, hessian_tol: float = 1e-3, direction_seed: int = 0,
            max_images: int | None = None, batch_size: int = 64, device: str | None = None) -> Landscape:
    """Surfaces along filter-normalised directions (seeds `direction_seed` and +1) and sharpness of
    the training loss of a record's tuned model, over (a seeded subset of) its training images.

    The surface takes `points` × `points` coordinates over [−span, span]², the curve 2·points − 1.
    `hessian_iters=0` skips the top eigenvalue (NaN), the costly part on a CPU.
    """
    model, preprocess = load_tuned(record, device)
    params = model.trainable()
    if not params:
        raise ValueError(f"method {record['cell']['method']!r} trains no parameters: it has no landscape")
    split = training_split(record)
    loss = loss_fn(model, fixed_batches(split.train, preprocess, batch_size, max_images), split.classnames,
                   split.templates)
    d1, d2 = random_direction(params, direction_seed), random_direction(params, direction_seed + 1)
    alphas, grid = symmetric_grid(2 * points - 1, span), symmetric_grid(points, span)
    lam, converged = (top_eigenvalue_and_convergence(loss, params, hessian_iters, hessian_tol) if hessian_iters > 0
                      else (float("nan"), False))
    return Landscape(method=record["cell"]["method"], metrics=dict(record["metrics"]), images=loss.n,
                     loss=value(loss), worst_case_rise=worst_case_rise(loss, params, rho, ascent_steps),
                     top_eigenvalue=lam, eigenvalue_converged=converged,
                     alphas=alphas, curve=surface_1d(loss, params, d1, alphas),
                     grid=grid, surface=surface_2d(loss, params, d1, d2, grid))


def check(landscapes: Sequence[Landscape], hessian_iters: int, hessian_tol: float) -> list[str]:
    """The invariants every measurement must meet; raises AssertionError naming each one broken.

    Finite values; the curve passes through θ and agrees with the surface's row β = 0 (the loss is
    deterministic); the worst-case rise is >= 0 (ε = 0 lies in the ball); along d₁ the loss drops
    no more than 5 % below L(θ) (θ is near a minimum); a converged top eigenvalue is positive (every
    estimate is a Rayleigh quotient vᵀHv <= λ_max: unconverged, it is a lower bound). Returns a note
    for each eigenvalue whose power iteration stopped before `hessian_tol`.
    """
    failures, notes = [], []
    for ls in landscapes:
        values = [ls.loss, ls.worst_case_rise, *ls.curve, *ls.surface.ravel()]
        if not all(map(np.isfinite, values)):
            failures.append(f"{ls.method}: non-finite values")
        if not (np.isfinite(ls.top_eigenvalue) or hessian_iters == 0):
            failures.append(f"{ls.method}: non-finite eigenvalue")
        centre = len(ls.grid) // 2
        if not (ls.grid[centre] == 0 and np.isclose(ls.curve[2 * centre], ls.loss, rtol=1e-6)):
            failures.append(f"{ls.method}: the curve does not pass through θ")
        if not np.allclose(ls.curve[::2], ls.surface[centre], rtol=1e-6):
            failures.append(f"{ls.method}: the 1-D curve and the surface's row β = 0 disagree: the loss is not "
                            "deterministic")
        if not ls.worst_case_rise >= 0:
            failures.append(f"{ls.method}: worst-case rise {ls.worst_case_rise:.4g} < 0, yet ε = 0 lies in the ball")
        if not ls.curve.min() >= ls.loss - 0.05 * ls.loss:
            failures.append(f"{ls.method}: along d₁ the loss drops more than 5% below L(θ) (min "
                            f"{ls.curve.min():.4f} at α = {ls.alphas[ls.curve.argmin()]}): the tuned point is far "
                            "from a minimum; train longer")
        if not (ls.top_eigenvalue > 0 or not ls.eigenvalue_converged):
            failures.append(f"{ls.method}: λ_max = {ls.top_eigenvalue:.4g} <= 0 means no positive curvature at all, "
                            "impossible near a minimum; check the loss")
        if hessian_iters > 0 and not ls.eigenvalue_converged:
            notes.append(f"{ls.method}: power iteration stopped after hessian_iters = {hessian_iters} per phase, "
                         f"before tol = {hessian_tol}; its top eigenvalue {ls.top_eigenvalue:.4g} is a lower bound")
    if failures:
        raise AssertionError("\n".join(failures))
    return notes


def sharpness_table(landscapes: Sequence[Landscape]) -> pd.DataFrame:
    """One row per method: training loss, worst-case rise, top Hessian eigenvalue (and whether its
    power iteration converged), and the record's accuracies (%)."""
    return pd.DataFrame([{"method": ls.method, "train loss": ls.loss, "worst-case rise": ls.worst_case_rise,
                          "top eigenvalue": ls.top_eigenvalue, "converged": ls.eigenvalue_converged,
                          **{f"{k} acc (%)": 100 * v for k, v in ls.metrics.items()}}
                         for ls in landscapes]).set_index("method")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_curves(landscapes: Sequence[Landscape], path: str | Path) -> Path:
    """The 1-D rises L(θ + α d₁) − L(θ) of all methods on one axis, saved as PNG at `path`."""
    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.subplots()
    for ls in landscapes:
        ax.plot(ls.alphas, ls.curve - ls.loss, marker="o", markersize=3, label=ls.method)
    ax.set_xlabel("α  (d₁ filter-normalised)")
    ax.set_ylabel("L(θ + α d₁) − L(θ)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_surfaces(landscapes: Sequence[Landscape], path: str | Path, levels: int = 15) -> Path:
    """Contours of the rise L(θ + α d₁ + β d₂) − L(θ), methods side by side on shared levels (so
    wider basins read as flatter), saved as PNG at `path`."""
    rises = [ls.surface - ls.loss for ls in landscapes]
    lo, hi = min(r.min() for r in rises), max(r.max() for r in rises)
    steps = np.linspace(lo, hi, levels) if hi > lo else levels
    fig = Figure(figsize=(3.6 * len(landscapes) + 0.8, 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(landscapes), sharey=True))
    for ax, ls, rise in zip(axes, landscapes, rises):
        filled = ax.contourf(ls.grid, ls.grid, rise, levels=steps, cmap="viridis")
        ax.contour(ls.grid, ls.grid, rise, levels=steps, colors="white", linewidths=0.4)
        ax.plot(0, 0, marker="+", color="red")
        ax.set_title(ls.method)
        ax.set_xlabel("α  (d₁)")
        ax.set_aspect("equal")
    axes[0].set_ylabel("β  (d₂)")
    fig.colorbar(filled, ax=list(axes), label="L(θ + α d₁ + β d₂) − L(θ)")
    return _save(fig, path)
