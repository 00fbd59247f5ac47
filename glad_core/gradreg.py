"""Gradient regularization (paper Algorithm 1, eqs. 6-7), and SAM as its ablation.

    g  = ∇L(θ)                        plain gradient
    ε  = ρ g / ‖g‖                    ascent step (SAM's perturbation)
    g' = ∇L(θ + ε)                    gradient at the perturbed point
    if ⟨g, g'⟩ < 0:  g' ← g' − ⟨g, g'⟩ / (‖g‖² + δ) · g     (eq. 6: drop the conflicting part)
    g_f = (1 − α) g + α g'                                    (eq. 7)
    θ ← optimizer step with g_f

Inner products and norms are over all trained parameters together, as one vector.
"""
from __future__ import annotations

from typing import Callable, Iterable, Literal, Sequence

import torch

Mode = Literal["gradreg", "sam", "none"]
MODES: tuple[str, ...] = ("gradreg", "sam", "none")


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """⟨a, b⟩ over all tensors together (one long vector), in float64."""
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def fuse_gradients(g: list[torch.Tensor], g_ref: list[torch.Tensor], alpha: float = 0.5,
                   delta: float = 1e-12) -> list[torch.Tensor]:
    """Eqs. 6-7: project the conflicting part of g' (`g_ref`, taken at θ + ε) off g, then mix."""
    g_dot = dot(g, g_ref)
    if g_dot < 0:
        c = (g_dot / (dot(g, g) + delta)).item()
        g_ref = [r - c * x for x, r in zip(g, g_ref)]
    return [(1 - alpha) * x + alpha * r for x, r in zip(g, g_ref)]


class GradRegStep:
    """Algorithm 1 around any torch optimizer.

    `step(closure)` calls `closure()` for a loss tensor (it must not call backward) and returns
    the loss at θ. mode="gradreg" steps with g_f, mode="sam" with g' alone (ablation row b),
    mode="none" with g (plain training, one pass).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 mode: Mode = "gradreg", rho: float = 0.1, alpha: float = 0.5, delta: float = 1e-12):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; allowed: {list(MODES)}")
        self.params = [p for p in params if p.requires_grad]
        self.optimizer, self.mode = optimizer, mode
        self.rho, self.alpha, self.delta = rho, alpha, delta

    def _grad(self, closure: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Loss and its gradient w.r.t. the parameters (zeros for parameters the loss ignores)."""
        for p in self.params:
            p.grad = None
        loss = closure()
        loss.backward()
        return loss.detach(), [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        loss, g = self._grad(closure)
        if self.mode != "none":
            norm = dot(g, g).sqrt().item()
            theta = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                if norm > 0:
                    for p, x in zip(self.params, g):
                        p.add_(x, alpha=self.rho / norm)
            _, g_ref = self._grad(closure)
            with torch.no_grad():
                for p, t in zip(self.params, theta):
                    p.copy_(t)  # restore θ exactly, not θ + ε − ε
            g = g_ref if self.mode == "sam" else fuse_gradients(g, g_ref, self.alpha, self.delta)
        for p, x in zip(self.params, g):
            p.grad = x
        self.optimizer.step()
        return loss
