"""Loss landscapes and sharpness against closed forms on quadratics, and on a tiny CLIP with LoRA."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from glad_core.data import Datum
from glad_core.gradreg import dot
from glad_core.landscape import (Landscape, check, filter_normalize, fixed_batches, hvp, loss_fn, norm, random_direction,
                                 surface_1d, surface_2d, top_eigenvalue_and_convergence, top_hessian_eigenvalue,
                                 value, value_and_grad, worst_case_rise)
from glad_core.methods import Method, build
from glad_core.config import TrainConfig

# ---------------------------------------------------------------------------------------------
# Quadratic L(θ) = ½ θᵀHθ − bᵀθ over θ = [W (3 x 2), c (2,)] flattened: g = Hθ − b, ∇²L = H.
# ---------------------------------------------------------------------------------------------


def _spd(eigenvalues: list[float], seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues),) * 2))
    return q @ np.diag(eigenvalues) @ q.T


def _quadratic(H: np.ndarray, seed: int = 1):
    rng = np.random.default_rng(seed)
    W = torch.nn.Parameter(torch.tensor(rng.normal(size=(3, 2))))
    c = torch.nn.Parameter(torch.tensor(rng.normal(size=2)))
    Ht, bt = torch.tensor(H), torch.tensor(rng.normal(size=8))

    def loss() -> torch.Tensor:
        x = torch.cat([W.reshape(-1), c])
        return 0.5 * x @ Ht @ x - bt @ x
    return [W, c], loss, Ht.numpy(), bt.numpy()


def _flat(v) -> np.ndarray:
    return np.concatenate([t.detach().reshape(-1).numpy() for t in v])


def _unflat(x: np.ndarray, params) -> list[torch.Tensor]:
    out, i = [], 0
    for p in params:
        out.append(torch.tensor(x[i:i + p.numel()]).view_as(p))
        i += p.numel()
    return out


def _exact(H, b, x) -> float:
    return 0.5 * x @ H @ x - b @ x


H8 = _spd([5.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05])


def test_value_grad_hvp_match_closed_form():
    params, loss, H, b = _quadratic(H8)
    x = _flat(params)
    v = np.random.default_rng(2).normal(size=8)
    f, g = value_and_grad(loss, params)
    assert f == pytest.approx(_exact(H, b, x), rel=1e-12)
    np.testing.assert_allclose(_flat(g), H @ x - b, rtol=1e-12)
    np.testing.assert_allclose(_flat(hvp(loss, params, _unflat(v, params))), H @ v, rtol=1e-12)
    assert value(loss) == f
    assert all(p.grad is None for p in params)


def test_surfaces_are_exact_and_oriented():
    params, loss, H, b = _quadratic(H8)
    x = _flat(params)
    d1, d2 = random_direction(params, 0), random_direction(params, 1)
    u, w = _flat(d1), _flat(d2)
    alphas = np.linspace(-1, 1, 7)
    np.testing.assert_allclose(surface_1d(loss, params, d1, alphas),
                               [_exact(H, b, x + a * u) for a in alphas], rtol=1e-12)
    grid = np.array([-1.0, 0.0, 0.5, 2.0])
    Z = surface_2d(loss, params, d1, d2, grid)
    expected = [[_exact(H, b, x + a * u + c * w) for a in grid] for c in grid]  # rows: d2, columns: d1
    np.testing.assert_allclose(Z, expected, rtol=1e-12)
    assert Z[1, 1] == pytest.approx(_exact(H, b, x), rel=1e-14)


def test_first_order_worst_case_rise():
    params, loss, H, b = _quadratic(H8)
    g = H @ _flat(params) - b
    rho = 0.3
    expected = rho * np.linalg.norm(g) + 0.5 * rho**2 * (g @ H @ g) / (g @ g)
    assert worst_case_rise(loss, params, rho) == pytest.approx(expected, rel=1e-12)


def test_ascent_steps_approach_the_ball_maximum():
    """In 2-D the exact max over the ρ-ball is found by sweeping the circle (convex L: max on the boundary)."""
    H = _spd([4.0, 0.5], seed=3)
    theta = torch.nn.Parameter(torch.tensor([0.05, -0.02], dtype=torch.float64))
    Ht, bt = torch.tensor(H), torch.tensor([0.1, 0.3], dtype=torch.float64)

    def loss() -> torch.Tensor:
        return 0.5 * theta @ Ht @ theta - bt @ theta

    rho = 0.5
    x = theta.detach().numpy().copy()
    angles = np.linspace(0, 2 * np.pi, 200_001)
    circle = x[:, None] + rho * np.stack([np.cos(angles), np.sin(angles)])
    best = (0.5 * np.einsum("in,ij,jn->n", circle, H, circle) - bt.numpy() @ circle).max()
    exact = best - _exact(H, bt.numpy(), x)
    rises = [worst_case_rise(loss, [theta], rho, steps) for steps in (0, 1, 2, 5, 30)]
    assert all(r2 >= r1 - 1e-15 for r1, r2 in zip(rises, rises[1:]))   # more steps never lower it
    assert rises[-1] <= exact + 1e-9
    assert rises[-1] == pytest.approx(exact, rel=1e-6)
    assert rises[0] < 0.99 * exact                                        # first order alone falls short here


@pytest.mark.parametrize("eigenvalues, top", [
    ([5.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05], 5.0),    # positive definite
    ([-6.0, 4.0, 1.0, 0.5, 0.0, -1.0, -2.0, 0.3], 4.0),  # a negative eigenvalue dominates
    ([4.0, -4.0, 1.0, 0.5, 0.0, -1.0, -2.0, 0.3], 4.0),  # ±4 tie: plain power iteration cannot settle
])
def test_top_hessian_eigenvalue(eigenvalues, top):
    """The largest algebraic eigenvalue, whatever the sign of the one of largest magnitude."""
    params, loss, _, _ = _quadratic(_spd(eigenvalues))
    assert top_hessian_eigenvalue(loss, params, iters=500, tol=1e-8) == pytest.approx(top, rel=1e-10)


def test_top_hessian_eigenvalue_with_a_large_null_space():
    """Like a network's Hessian: few large eigenvalues of both signs, most near 0. A residual test
    relative to the shifted eigenvalue (≈ r) would accept a random start vector here."""
    h = torch.zeros(100_000, dtype=torch.float64)
    h[:3] = torch.tensor([5.0, -4.8, 1.0])
    x = torch.nn.Parameter(torch.randn(100_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))

    def loss() -> torch.Tensor:  # H = diag(h)
        return 0.5 * (h * x * x).sum()

    assert top_hessian_eigenvalue(loss, [x], iters=1000, tol=1e-2) == pytest.approx(5.0, rel=1e-3)
    for iters in (2, 5, 20):  # a short budget: either converged to λ_max or says it did not
        lam, converged = top_eigenvalue_and_convergence(loss, [x], iters=iters, tol=1e-2)
        assert not converged or lam == pytest.approx(5.0, rel=1e-3), (iters, lam)


def test_power_iteration_warns_when_not_converged():
    params, loss, _, _ = _quadratic(_spd([1.0, 0.99, 0.98, 0.5, 0.4, 0.3, 0.2, 0.1]))
    with pytest.warns(RuntimeWarning, match="did not reach"):
        top_hessian_eigenvalue(loss, params, iters=2, tol=1e-14)


def test_every_function_restores_params_bit_exactly():
    params, loss, _, _ = _quadratic(H8)
    before = [p.detach().clone() for p in params]
    d1, d2 = random_direction(params, 0), random_direction(params, 1)
    surface_1d(loss, params, d1, [0.3, -0.7, 1.1])
    surface_2d(loss, params, d1, d2, [0.3, -0.7])
    worst_case_rise(loss, params, 0.1, steps=3)
    top_hessian_eigenvalue(loss, params, iters=50, tol=1e-3)
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert all(p.grad is None for p in params)


def test_params_restored_after_an_error():
    params, loss, _, _ = _quadratic(H8)
    before = [p.detach().clone() for p in params]
    calls = []

    def failing() -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return loss()

    with pytest.raises(RuntimeError, match="boom"):
        surface_1d(failing, params, random_direction(params, 0), [0.5, 1.0])
    assert all(torch.equal(p, q) for p, q in zip(params, before))


# ---------------------------------------------------------------------------------------------
# Filter normalisation
# ---------------------------------------------------------------------------------------------

def test_filter_normalisation_matches_row_norms():
    torch.manual_seed(0)
    A, B, bias = torch.randn(4, 6), torch.randn(5, 4), torch.randn(5)
    B[2] = 0  # a zero row (e.g. an untrained row of a LoRA B)
    conv = torch.randn(3, 2, 1, 1)
    params = [A, B, bias, conv]
    d = random_direction(params, seed=7)
    for p, x in zip((A, B, conv), (d[0], d[1], d[3])):
        assert x.shape == p.shape
        torch.testing.assert_close(x.reshape(len(x), -1).norm(dim=1), p.reshape(len(p), -1).norm(dim=1),
                                   rtol=1e-6, atol=0)
    assert torch.equal(d[1][2], torch.zeros(4))
    assert torch.equal(d[2], torch.zeros(5))  # biases are not perturbed
    # rows keep their random orientation: normalising a direction twice changes nothing
    torch.testing.assert_close(filter_normalize(d, params)[0], d[0])


def test_random_direction_is_seeded():
    params = [torch.randn(3, 4), torch.randn(2, 3)]
    a, b, c = random_direction(params, 1), random_direction(params, 1), random_direction(params, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert abs(dot(a, c)) < norm(a) * norm(c)


# ---------------------------------------------------------------------------------------------
# Tiny CLIP with LoRA in both towers and AlignNet (GLAD), float64 for tight numerical checks
# ---------------------------------------------------------------------------------------------

CLASSNAMES, TEMPLATES = ["cat", "dog", "car"], ["a photo of a {}.", "a {}."]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matrices are too small to gain from threads; one avoids their synchronisation."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batches(n: int, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


def _char_tokenizer(texts: list[str], length: int = 24) -> torch.Tensor:
    """Token ids < 100 per character for the tiny BERT tower (0 = padding)."""
    return torch.tensor([[1 + ord(ch) % 98 for ch in t[:length]] + [0] * (length - len(t[:length])) for t in texts])


def _glad(tiny_clip, trained: bool = True) -> Method:
    clip, _, tokenizer = tiny_clip
    model = build(clip, tokenizer, TrainConfig(method="glad", device="cpu",
                                               hparams={"rank": 2, "lora_dropout": 0.25, "alignnet_hidden": (16,)}))
    if trained:
        _train(model)
    return model.double().train()


def _train(model: Method) -> None:
    """Move B and AlignNet's output layer off their zero initialisation, as training does."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.trainable():
            if not p.any():
                p.normal_(0, 0.05)


def test_tiny_clip_loss_is_deterministic_and_batch_invariant(tiny_clip):
    model = _glad(tiny_clip)
    params = model.trainable()
    split = loss_fn(model, _batches(5, 2), CLASSNAMES, TEMPLATES)
    whole = loss_fn(model, _batches(5, 5), CLASSNAMES, TEMPLATES)
    assert not model.training  # eval mode: LoRA dropout off
    f1, g1 = value_and_grad(split, params)
    f2, g2 = value_and_grad(whole, params)
    assert value(split) == f1 and np.isfinite(f1)
    assert f1 == pytest.approx(f2, rel=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert norm(g1) > 0
    assert split().item() == pytest.approx(f1, rel=1e-12)


def test_tiny_clip_kl_term_vanishes_at_initialisation(tiny_clip):
    """Untrained adapters (B = 0, AlignNet output 0) leave the model zero-shot: KL(p_zs ‖ p) = 0."""
    model = _glad(tiny_clip, trained=False)
    batches = _batches(4, 4)
    def loss_with(kl_weight: float) -> float:
        model.cfg.kl_weight = kl_weight
        return value(loss_fn(model, batches, CLASSNAMES, TEMPLATES))

    assert loss_with(1.0) == pytest.approx(loss_with(0.0), rel=1e-12)
    _train(model)
    assert loss_with(1.0) > loss_with(0.0)


@pytest.mark.parametrize("fixture", ["tiny_clip", "tiny_hf_clip"])
def test_tiny_clip_hvp_matches_finite_differences(fixture, request):
    """Both tower kinds: packed attention (ViT / CLIP text), and 1x1 convolutions with a BERT text
    tower (glad-mini's kinds)."""
    clip = request.getfixturevalue(fixture)
    model = _glad(clip if fixture == "tiny_clip" else (clip, None, _char_tokenizer))
    params = model.trainable()
    loss = loss_fn(model, _batches(4, 2), CLASSNAMES, TEMPLATES)
    v = random_direction(params, 3)
    v = [x / norm(v) for x in v]
    h = 1e-4
    with torch.no_grad():
        theta = [p.clone() for p in params]
        for p, t, x in zip(params, theta, v):
            p.copy_(t + h * x)
    _, g_plus = value_and_grad(loss, params)
    with torch.no_grad():
        for p, t, x in zip(params, theta, v):
            p.copy_(t - h * x)
    _, g_minus = value_and_grad(loss, params)
    with torch.no_grad():
        for p, t in zip(params, theta):
            p.copy_(t)
    fd = [(a - b) / (2 * h) for a, b in zip(g_plus, g_minus)]
    hv = hvp(loss, params, v)
    assert norm(hv) > 0
    assert norm([a - b for a, b in zip(hv, fd)]) < 1e-6 * norm(hv)


def test_tiny_clip_landscape_runs_and_restores(tiny_clip):
    model = _glad(tiny_clip)
    params = model.trainable()
    loss = loss_fn(model, _batches(2, 2), CLASSNAMES, TEMPLATES)
    before = [p.detach().clone() for p in params]
    d1, d2 = random_direction(params, 0), random_direction(params, 1)
    curve = surface_1d(loss, params, d1, [-0.5, 0.0, 0.5])
    Z = surface_2d(loss, params, d1, d2, [-0.5, 0.0, 0.5])
    f0 = value(loss)
    assert curve[1] == f0 and Z[1, 1] == f0
    assert np.isfinite(curve).all() and np.isfinite(Z).all()
    rise = worst_case_rise(loss, params, rho=0.05, steps=2)
    assert np.isfinite(rise) and rise > 0
    lam = top_hessian_eigenvalue(loss, params, iters=300, tol=1e-2)
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    # against Lanczos on the same Hessian-vector products (this random model's Hessian is indefinite)
    linalg = pytest.importorskip("scipy.sparse.linalg")
    sizes = [p.numel() for p in params]

    def matvec(x: np.ndarray) -> np.ndarray:
        v = [torch.tensor(c).view_as(p) for c, p in zip(np.split(x, np.cumsum(sizes)[:-1]), params)]
        return _flat(hvp(loss, params, v))

    op = linalg.LinearOperator((sum(sizes),) * 2, matvec=matvec, dtype=np.float64)
    top = linalg.eigsh(op, k=1, which="LA", tol=1e-8, return_eigenvectors=False)[0]
    bottom = linalg.eigsh(op, k=1, which="SA", tol=1e-8, return_eigenvectors=False)[0]
    assert bottom < 0 < top
    assert lam == pytest.approx(top, rel=1e-3)


def test_fixed_batches_subset_is_seeded_and_ordered(tmp_path):
    items = []
    for i in range(10):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(path)
        items.append(Datum(str(path), i % 3, ["a", "b", "c"][i % 3]))

    def transform(im: Image.Image) -> torch.Tensor:
        return torch.tensor(np.asarray(im), dtype=torch.float32).permute(2, 0, 1)

    a = fixed_batches(items, transform, batch_size=4, max_images=6)
    b = fixed_batches(items, transform, batch_size=4, max_images=6)
    assert [len(y) for _, y in a] == [4, 2]
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(a, b))
    reds = torch.cat([x[:, 0, 0, 0] for x, _ in a])
    assert torch.all(reds[1:] > reds[:-1])  # list order kept
    assert sum(len(y) for _, y in fixed_batches(items, transform, batch_size=4)) == 10


def _landscape(**kw) -> Landscape:
    """A landscape of L = 1 + α² + β² on a 3 x 3 grid (curve over 5 points), eigenvalue converged at 2."""
    grid, alphas = np.array([-1.0, 0.0, 1.0]), np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    values = dict(method="lora", metrics={"base": 0.5}, images=4, loss=1.0, worst_case_rise=0.01, top_eigenvalue=2.0,
                  eigenvalue_converged=True, alphas=alphas, curve=1 + alphas ** 2, grid=grid,
                  surface=1 + grid[None, :] ** 2 + grid[:, None] ** 2)
    return Landscape(**{**values, **kw})


def test_check_passes_a_sound_landscape_and_notes_an_unconverged_eigenvalue():
    assert check([_landscape()], hessian_iters=4, hessian_tol=0.05) == []
    assert check([_landscape(top_eigenvalue=float("nan"), eigenvalue_converged=False)], 0, 0.05) == []  # skipped
    [note] = check([_landscape(eigenvalue_converged=False, top_eigenvalue=-0.3)], hessian_iters=4, hessian_tol=0.05)
    assert "hessian_iters = 4" in note and "lower bound" in note


@pytest.mark.parametrize("broken, message", [
    (dict(loss=float("nan")), "non-finite values"),
    (dict(top_eigenvalue=float("inf")), "non-finite eigenvalue"),
    (dict(curve=1.5 + np.array([-1.0, -0.5, 0.0, 0.5, 1.0]) ** 2), "does not pass through θ"),
    (dict(surface=np.ones((3, 3)) * 1.0 + np.eye(3)), "disagree: the loss is not deterministic"),
    (dict(worst_case_rise=-1e-3), "worst-case rise -0.001 < 0"),
    (dict(curve=np.array([0.5, 1.0, 1.0, 1.25, 2.0]), surface=np.array([[2, 2, 3], [0.5, 1.0, 2.0], [2, 2, 3]])),
     "drops more than 5% below L(θ)"),
    (dict(top_eigenvalue=-0.5), "no positive curvature"),
])
def test_check_names_each_broken_invariant(broken, message):
    with pytest.raises(AssertionError, match=re.escape(message)) as e:
        check([_landscape(), _landscape(method="glad", **broken)], hessian_iters=4, hessian_tol=0.05)
    assert str(e.value).startswith("glad: ") and "lora" not in str(e.value)
