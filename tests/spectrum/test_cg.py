"""Conjugate gradients: solves SPD systems, stops at negative curvature."""

import pytest
import torch

import curvscope as cs
from tests.spectrum.test_eigen import with_spectrum


def test_solves_a_positive_definite_system():
    A = with_spectrum(torch.linspace(0.5, 5.0, 40, dtype=torch.float64))
    b = torch.ones(40, dtype=torch.float64)
    r = cs.spectrum.cg(A, b, tol=1e-10, max_matvecs=100)
    assert r.converged and not r.negative_curvature
    torch.testing.assert_close(r.x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    assert r.iterations <= 40 and r.matvecs == r.iterations + 1  # tol < √eps: b − Ax checked


@pytest.mark.parametrize("tol", [1e-5, 1e-6])
def test_converged_means_the_true_residual_near_the_dtypes_precision(tol):
    """float32, condition 100: CG said converged at tol 1e-6 from its recurrence's residual,
    9.8e-7, where ‖b − Ax‖/‖b‖ was 2.1–2.9e-6 (20 of 60 runs, an outside review). Below √eps
    of the dtype it checks b − Ax before it says so (and restarts from it where not)."""
    for seed in range(6):
        lam = torch.logspace(0, 2, 200, dtype=torch.float64)
        A = with_spectrum(lam, seed).float()
        b = torch.randn(200, generator=torch.Generator().manual_seed(seed))
        r = cs.spectrum.cg(A, b, tol=tol, max_matvecs=400)
        true = float((b.double() - A.double() @ r.x.double()).norm() / b.double().norm())
        assert not r.converged or true <= tol * 1.01, (seed, r.residual, true)
        if tol == 1e-5:
            assert r.converged  # within float32's reach: found


def test_an_ill_conditioned_float32_system_is_checked_at_any_tolerance():
    """Condition 1e6 in float32 at the diagnosis's tol 1e-2: the recurrence drifts from b − Ax
    by about eps·κ, and CG said converged at true residuals 5.7–7.3x tol in 20 of 20 runs (an
    outside review): b − Ax is checked in any dtype coarser than float64."""
    for seed in range(4):
        lam = torch.logspace(-6, 0, 300, dtype=torch.float64)
        A = with_spectrum(lam, seed).float()
        b = torch.randn(300, generator=torch.Generator().manual_seed(seed))
        r = cs.spectrum.cg(A, b, tol=1e-2, max_matvecs=5000)
        true = float((b.double() - A.double() @ r.x.double()).norm() / b.double().norm())
        assert not r.converged or true <= 1e-2 * 1.01, (seed, r.residual, true)
        # said as it is: the residual reported is b − Ax's (float32 products), not the drift's
        assert true / 2 <= r.residual <= 2 * true, (seed, r.residual, true)


@pytest.mark.parametrize("tol", [1e-10, 1e-7])
def test_a_float64_b_against_float32_products_is_not_said_converged_below_their_precision(tol):
    """A float32 operator under a float64 b iterates in float64, and its recurrence reached 9e-11
    "converged" where ‖b − Ax‖/‖b‖ was 3.4e-7 (an outside review): b − Ax is checked below √eps
    of the products' dtype too, and where their rounding is above tol CG stops, not converged."""
    A = with_spectrum(torch.linspace(1.0, 100.0, 200, dtype=torch.float64)).float()
    b = torch.randn(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = cs.spectrum.cg(A, b, tol=tol, max_matvecs=400)
    true = float((b - A.double() @ r.x).norm() / b.norm())
    assert not r.converged and r.residual > tol and true > tol
    assert r.iterations < 100  # stopped at the check: the budget not spent on rounding
    ok = cs.spectrum.cg(A, b, tol=1e-5, max_matvecs=400)  # within their precision: as before
    assert ok.converged and float((b - A.double() @ ok.x).norm() / b.norm()) <= 1e-5


def test_an_inconsistent_singular_system_is_not_said_converged():
    """The Newton step of f = x₀ + Σxᵢ² + 0.1Σxᵢ⁴ does not exist (the gradient has e₀, the
    Hessian has not): CG's iterates grow without bound, and the result says so by its residual
    and ``converged`` — not by ``negative_curvature``, as no pᵀAp is below zero."""

    def f(x):
        return x[0] + (x[1:] ** 2).sum() + 0.1 * (x[1:] ** 4).sum()

    x = torch.linspace(0.5, 1.5, 10, dtype=torch.float64)
    r = cs.spectrum.cg(cs.Curvature.from_function(f, x), -cs.grad(f, x), max_matvecs=20)
    assert not r.converged and r.residual > 1.0


def test_a_numerically_singular_float64_system_is_checked_where_its_iterates_grew():
    """PSD with eigenvalues 0 and 0.1…1 (stored, the smallest is about 1e-17), a random b,
    tol 1e-6 ≥ √eps: CG said converged at a residual of 7e-14 where ‖b − Ax‖/‖b‖ was 2.2, ‖x‖
    6e16 — in 13 of 20 seeds at n = 5 (an outside review's fuzzing). The recurrence drifts
    from b − Ax by about eps·‖A‖·‖x‖ a step, float64 too: where that reaches tol, b − Ax is
    checked; a well-conditioned solve still pays no product for it."""
    said = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        lam = torch.linspace(0.1, 1, 5, dtype=torch.float64)
        lam[0] = 0.0
        A = with_spectrum(lam, seed)
        b = torch.randn(5, generator=g, dtype=torch.float64)
        r = cs.spectrum.cg(A, b, tol=1e-6, max_matvecs=60)
        true = float((b - A @ r.x).norm() / b.norm())
        assert not r.converged or true <= 1e-6 * 1.01, (seed, r.residual, true)
        said += r.converged
    assert said == 0  # b is not in A's range: no solution to find
    r = cs.spectrum.cg(A, b, tol=1e-6, max_matvecs=60, check_residual=False)
    assert r.matvecs == r.iterations  # unchecked, as asked (Hessian-free: its products kept)
    A = with_spectrum(torch.linspace(0.5, 5.0, 40, dtype=torch.float64))
    r = cs.spectrum.cg(A, torch.ones(40, dtype=torch.float64), tol=1e-6, max_matvecs=100)
    assert r.converged and r.matvecs == r.iterations  # no check needed: no product for it


def test_stops_at_negative_curvature_with_the_direction():
    A = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64))
    r = cs.spectrum.cg(A, torch.ones(3, dtype=torch.float64))
    assert r.negative_curvature and not r.converged
    assert float(r.direction @ A @ r.direction) <= 0
    d = r.direction
    assert r.direction_curvature == pytest.approx(float(d @ A @ d) / float(d @ d))


def test_damping_and_errors():
    A = torch.zeros(3, 3, dtype=torch.float64)
    r = cs.spectrum.cg(A, torch.ones(3, dtype=torch.float64), damping=2.0, tol=1e-12)
    torch.testing.assert_close(r.x, torch.full((3,), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        cs.spectrum.cg(A, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"b": torch.ones(4, dtype=torch.float64)}, ValueError, r"b of shape \(3,\)"),
        ({"b": [1.0, 1.0, 1.0]}, TypeError, "b to be a floating-point torch.Tensor"),
        ({"b": torch.ones(3, dtype=torch.long)}, TypeError, "got dtype torch.int64"),
        ({"max_matvecs": 0}, ValueError, "max_matvecs to be an integer >= 1"),
        ({"max_matvecs": 2.5}, TypeError, "max_matvecs to be an integer"),
        ({"tol": -1.0}, ValueError, "tol to be a number >= 0"),
        ({"damping": float("nan")}, ValueError, "damping to be a number >= 0"),
        ({"damping": float("inf")}, ValueError, "damping to be a finite number"),
        ({"x0": torch.ones(2, dtype=torch.float64)}, ValueError, r"x0 of shape \(3,\)"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    A = torch.eye(3, dtype=torch.float64)
    kwargs = {"b": torch.ones(3, dtype=torch.float64), **kwargs}
    with pytest.raises(error, match=match):
        cs.spectrum.cg(A, **kwargs)


def test_warm_start_saved_iterates_and_the_progress_stop():
    A = with_spectrum(torch.logspace(-3, 0, 60, dtype=torch.float64))
    b = torch.ones(60, dtype=torch.float64)
    exact = torch.linalg.solve(A + 0.01 * torch.eye(60, dtype=torch.float64), b)
    cold = cs.spectrum.cg(A, b, tol=1e-10, max_matvecs=200, damping=0.01)
    warm = cs.spectrum.cg(A, b, tol=1e-10, max_matvecs=200, damping=0.01, x0=0.99 * exact)
    torch.testing.assert_close(warm.x, exact, rtol=1e-7, atol=1e-9)  # residual 1e-10, κ ≈ 100
    assert warm.iterations < cold.iterations
    assert warm.matvecs == warm.iterations + 2  # x0's residual, and b − Ax checked at the end
    assert cold.saved == ()  # nothing kept unless asked
    r = cs.spectrum.cg(A, b, tol=1e-10, max_matvecs=200, damping=0.01, save={1, 2, 4}.__contains__)
    its = [it for it, _, _ in r.saved]
    assert its[:3] == [1, 2, 4] and its[-1] == r.iterations  # the last is always kept
    for _, x, res in r.saved:
        torch.testing.assert_close(res, b - A @ x - 0.01 * x, rtol=1e-8, atol=1e-10)
    early = cs.spectrum.cg(A, b, tol=1e-10, max_matvecs=200, damping=0.01, progress_tol=5e-4)
    assert 10 < early.iterations < cold.iterations and not early.converged


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [
        (torch.float32, 1e-14),
        (torch.float32, 1e-23),
        (torch.float32, 1e30),
        (torch.float64, 1e-140),
        (torch.float64, 1e-200),
        (torch.float64, 1e150),
    ],
)
def test_a_right_hand_side_at_any_scale_is_solved(dtype, scale):
    """CG is linear in b, but pᵀAp and ‖r‖² underflowed or overflowed in the working dtype:
    float32 at ‖b‖ ≈ 1e-14 met "negative curvature" on a positive-definite A, and from 1e-17
    returned x = 0 (at 1e-23 "converged"); float64 the same from 1e-140; and a b of 1e30 in
    float32 was refused as too large to square (an outside review)."""
    B = torch.diag(torch.arange(1.0, 8.0, dtype=torch.float64))
    b = torch.ones(7, dtype=torch.float64)
    small = scale < 1
    A, rhs = ((B * scale), (b * scale)) if small else (B, b * scale)
    r = cs.spectrum.cg(A.to(dtype), rhs.to(dtype), tol=1e-5)
    assert r.converged and not r.negative_curvature
    truth = torch.linalg.solve(B, b) * (1 if small else scale)
    torch.testing.assert_close(r.x.double(), truth, rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_that_overflow_are_refused_not_looped_on(dtype):
    """An outside review: a congruence by 1e200 made every product NaN, every convergence
    test False, and CG looped for ever without a product; a float32 matrix of 1e38 entries
    returned x = 0, unconverged, past its cap. Both raise FloatingPointError now."""
    from curvscope.spectrum import as_operator

    A = torch.diag(torch.linspace(-1.0, 3.0, 20, dtype=dtype))
    big = 1e200 if dtype == torch.float64 else 1e30
    op = as_operator(A).congruence(torch.full((20,), big, dtype=dtype))
    with pytest.raises(FloatingPointError, match="not finite"):
        cs.spectrum.cg(op, torch.ones(20, dtype=dtype), max_matvecs=50)
    if dtype == torch.float32:
        with pytest.raises(FloatingPointError, match="not finite"):
            cs.spectrum.cg(torch.full((4, 4), 1e38), torch.ones(4), max_matvecs=20)
