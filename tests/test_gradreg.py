"""Gradient regularization (Algorithm 1) against direct numpy computations and closed forms."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from glad_core.gradreg import GradRegStep, fuse_gradients


def _reference_fuse(g: np.ndarray, gp: np.ndarray, alpha: float, delta: float) -> np.ndarray:
    """Eqs. 6-7 written out on one flat float64 vector."""
    dot = g @ gp
    if dot < 0:
        gp = gp - dot / (g @ g + delta) * g
    return (1 - alpha) * g + alpha * gp


def _split(v: np.ndarray) -> list[torch.Tensor]:
    return [torch.tensor(v[:3].reshape(3)), torch.tensor(v[3:].reshape(2, 2))]


def _flat(ts: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([t.detach().double().reshape(-1).numpy() for t in ts])


@pytest.mark.parametrize("sign", [+1, -1])
def test_fuse_matches_reference_in_both_branches(sign):
    rng = np.random.default_rng(0)
    g = rng.normal(size=7)
    gp = sign * g + 0.3 * rng.normal(size=7)
    assert np.sign(g @ gp) == sign
    out = _flat(fuse_gradients(_split(g), _split(gp), alpha=0.3, delta=1e-8))
    np.testing.assert_allclose(out, _reference_fuse(g, gp, 0.3, 1e-8), rtol=1e-12)
    if sign < 0:  # after the projection, g' no longer conflicts with g
        projected = (out - 0.7 * g) / 0.3
        assert abs(projected @ g) < 1e-6 * np.linalg.norm(g) * np.linalg.norm(gp)


def test_fuse_zero_gradient_has_no_nan():
    g = [torch.zeros(3, dtype=torch.float64)]
    gp = [torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)]
    out = fuse_gradients(g, gp, alpha=0.5, delta=1e-12)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, 0.5 * gp[0])


def _quadratic(H: np.ndarray, b: np.ndarray):
    """Parameters split over two tensors and the closure of L(θ) = ½ θᵀHθ − bᵀθ."""
    theta = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    phi = torch.nn.Parameter(torch.tensor([0.3], dtype=torch.float64))
    Ht, bt = torch.tensor(H), torch.tensor(b)

    def closure():
        x = torch.cat([theta, phi])
        return 0.5 * x @ Ht @ x - bt @ x
    return [theta, phi], closure


def _expected_step(H, b, x, rho, alpha, lr, mode):
    g = H @ x - b
    eps = rho * g / np.linalg.norm(g)
    gp = H @ (x + eps) - b
    direction = {"none": g, "sam": gp, "gradreg": _reference_fuse(g, gp, alpha, 1e-12)}[mode]
    return x - lr * direction, g @ gp


@pytest.mark.parametrize("mode", ["none", "sam", "gradreg"])
@pytest.mark.parametrize("H_diag", [(2.0, 1.0, 3.0, 0.5), (1.0, -40.0, 2.0, -30.0)])
def test_step_on_quadratic_matches_closed_form(mode, H_diag):
    H = np.diag(H_diag)
    b = np.array([0.2, 0.1, -0.3, 0.4])
    params, closure = _quadratic(H, b)
    x0 = _flat(params)
    expected, dot = _expected_step(H, b, x0, rho=2.0, alpha=0.5, lr=0.1, mode=mode)
    if H_diag[1] < 0:
        assert dot < 0  # the indefinite case exercises the projection branch
    step = GradRegStep(params, torch.optim.SGD(params, lr=0.1), mode=mode, rho=2.0, alpha=0.5)
    loss = step.step(closure)
    np.testing.assert_allclose(loss.item(), 0.5 * x0 @ H @ x0 - b @ x0, rtol=1e-12)
    np.testing.assert_allclose(_flat(params), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["sam", "gradreg"])
def test_theta_restored_bit_exactly(mode):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(1000))
    before = w.detach().clone()
    step = GradRegStep([w], torch.optim.SGD([w], lr=0.0), mode=mode, rho=0.37)
    step.step(lambda: (torch.sin(w) * w).sum())
    assert torch.equal(w.detach(), before)


def test_zero_gradient_step_is_finite():
    w = torch.nn.Parameter(torch.ones(4))
    step = GradRegStep([w], torch.optim.SGD([w], lr=0.1), mode="gradreg")
    step.step(lambda: (w * 0).sum())
    assert torch.isfinite(w).all() and torch.equal(w.detach(), torch.ones(4))


def test_unknown_mode():
    w = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="allowed"):
        GradRegStep([w], torch.optim.SGD([w], lr=0.1), mode="adam")
