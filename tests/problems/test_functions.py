"""The test functions: known minima are critical points with the stated value, the Newton
facts the lab relies on hold, and closed-form derivatives match autograd (see
tests/derivatives/test_functions.py for the latter)."""

import math

import pytest
import torch

import curvscope as cs
from curvscope.problems import FunctionProblem


def function_problems():
    return [n for n in cs.problems.names() if isinstance(cs.problems.get(n), FunctionProblem)]


@pytest.mark.parametrize("name", function_problems())
def test_minima_are_minima(name):
    p = cs.problems.get(name)
    assert p.x0.dtype == torch.float64 and p.x0.ndim == 1
    for x in p.minima:
        assert float(p.f(x)) == pytest.approx(p.f_min, abs=1e-9)
        assert p.grad(x).norm() < 1e-8
        assert torch.linalg.eigvalsh(p.hess(x)).min() > 0
    assert float(p.f(p.x0)) > p.f_min


def test_saddle_is_a_saddle():
    p = cs.problems.get("saddle")
    s = p.critical_points["saddle"]
    lam = torch.linalg.eigvalsh(p.hess(s))
    assert p.grad(s).norm() == 0 and lam[0] < 0 < lam[1]


def test_pure_newton_diverges_on_sqrt_one_plus_square_from_beyond_one():
    p = cs.problems.get("sqrt1px2")
    x = p.x0.clone()
    for _ in range(4):
        x = x - torch.linalg.solve(p.hess(x), p.grad(x))
    assert abs(x.item()) > 1e10  # x -> -x³: 1.5, -3.4, 38, -5.5e4, 1.7e14


def test_quadratic_has_the_prescribed_spectrum():
    lam = torch.tensor([-1.0, 0.5, 2.0, 10.0], dtype=torch.float64)
    p = cs.problems.get("quadratic", eigenvalues=lam, seed=3)
    torch.testing.assert_close(torch.linalg.eigvalsh(p.hess(p.x0)), lam)
    assert not p.well_behaved and p.f_min == -math.inf
    q = cs.problems.get("quadratic", n=10, condition=100.0)
    ev = torch.linalg.eigvalsh(q.hess(q.x0))
    assert ev.max() / ev.min() == pytest.approx(100.0)
    newton = q.x0 - torch.linalg.solve(q.hess(q.x0), q.grad(q.x0))
    torch.testing.assert_close(newton, q.minima[0])  # one Newton step solves a quadratic


def test_unknown_problem_lists_the_valid_names():
    with pytest.raises(ValueError, match="rosenbrock"):
        cs.problems.get("rosenbrok")


def test_bad_parameters():
    with pytest.raises(ValueError, match="n >= 2"):
        cs.problems.get("rosenbrock", n=1)
    with pytest.raises(ValueError, match="condition"):
        cs.problems.get("quadratic", condition=0.5)


@pytest.mark.parametrize(
    "lam, f_min, kind",
    [
        ([0.0, 1.0, 2.0], 0.0, None),  # singular: 0 at x*, along a line
        ([-1.0, 0.1, 10.0], -math.inf, "saddle"),
        ([-2.0, -1.0], -math.inf, "maximum"),
    ],
)
def test_a_quadratic_that_is_not_positive_definite_says_what_it_has(lam, f_min, kind):
    """An outside review: eigenvalues [0, 1, 2] gave f_min = -inf and no minimizer (f ≥ 0, with
    0 at x*), and an indefinite spectrum listed no saddle."""
    p = cs.problems.get("quadratic", eigenvalues=torch.tensor(lam, dtype=torch.float64))
    assert p.f_min == f_min and not p.well_behaved
    if kind is None:
        (x,) = p.minima
        assert float(p.f(x)) == 0 and p.grad(x).norm() == 0 and "singular" in p.description
    else:
        assert p.minima == () and set(p.critical_points) == {kind}
        x = p.critical_points[kind]
        assert p.grad(x).norm() == 0 and kind in p.description and "unbounded" in p.description
