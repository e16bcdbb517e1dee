"""Moré, Garbow & Hillstrom (1981), "Testing unconstrained optimization software": classic
least-squares test functions f = Σ rᵢ², written out with their residuals' Jacobians and
Hessians in closed form (numbers as in the paper: #2, #4, #7, #13, #14)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvscope.problems.functions import FunctionProblem, _sum_of_squares, _t


def _stack2(rows: list[list[Tensor]]) -> Tensor:
    return torch.stack([torch.stack(r) for r in rows])


def _freudenstein_roth_residuals(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    a, b = x[0], x[1]
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    r = torch.stack([-13.0 + a + ((5.0 - b) * b - 2.0) * b, -29.0 + a + ((b + 1.0) * b - 14.0) * b])
    jac = _stack2([[one, 10.0 * b - 3.0 * b**2 - 2.0], [one, 3.0 * b**2 + 2.0 * b - 14.0]])
    hr = torch.stack(
        [
            _stack2([[zero, zero], [zero, 10.0 - 6.0 * b]]),
            _stack2([[zero, zero], [zero, 6.0 * b + 2.0]]),
        ]
    )
    return r, jac, hr


def freudenstein_roth() -> FunctionProblem:
    """MGH #2: minimum 0 at (5, 4), and a local minimum 48.98 at (11.41, −0.8968) that many
    methods end in from the standard start (0.5, −2)."""
    f, g, h = _sum_of_squares(_freudenstein_roth_residuals)
    return FunctionProblem(
        "freudenstein-roth",
        f,
        g,
        h,
        _t(0.5, -2.0),
        (_t(5.0, 4.0),),
        0.0,
        "a global minimum and a nearby local one: where a method ends depends on its steps",
        well_behaved=False,
        critical_points={"local minimum": _t(11.412779, -0.896805)},
    )


def _brown_residuals(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    a, b = x[0], x[1]
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    r = torch.stack([a - 1e6, b - 2e-6, a * b - 2.0])
    jac = _stack2([[one, zero], [zero, one], [b, a]])
    z = _stack2([[zero, zero], [zero, zero]])
    hr = torch.stack([z, z, _stack2([[zero, one], [one, zero]])])
    return r, jac, hr


def brown_badly_scaled() -> FunctionProblem:
    """MGH #4: minimum 0 at (10⁶, 2·10⁻⁶): the variables differ by twelve orders of magnitude."""
    f, g, h = _sum_of_squares(_brown_residuals)
    return FunctionProblem(
        "brown-badly-scaled",
        f,
        g,
        h,
        _t(1.0, 1.0),
        (_t(1e6, 2e-6),),
        0.0,
        "badly scaled: the solution's coordinates differ by 10¹²",
        well_behaved=False,
    )


def _helical_residuals(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    a, b, c = x[0], x[1], x[2]
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    two_pi = 2.0 * math.pi
    theta = torch.atan(b / a) / two_pi + torch.where(a < 0, 0.5, 0.0).to(a)
    rho2 = a**2 + b**2
    rho = torch.sqrt(rho2)
    r = torch.stack([10.0 * (c - 10.0 * theta), 10.0 * (rho - 1.0), c])
    t_a, t_b = -b / (two_pi * rho2), a / (two_pi * rho2)
    jac = _stack2(
        [
            [-100.0 * t_a, -100.0 * t_b, 10.0 * one],
            [10 * a / rho, 10 * b / rho, zero],
            [zero, zero, one],
        ]
    )
    rho4 = rho2**2
    t_aa, t_ab, t_bb = (
        2 * a * b / (two_pi * rho4),
        (b**2 - a**2) / (two_pi * rho4),
        -2 * a * b / (two_pi * rho4),
    )
    rho3 = rho2 * rho
    p_aa, p_ab, p_bb = b**2 / rho3, -a * b / rho3, a**2 / rho3
    h1 = -100.0 * _stack2([[t_aa, t_ab, zero], [t_ab, t_bb, zero], [zero, zero, zero]])
    h2 = 10.0 * _stack2([[p_aa, p_ab, zero], [p_ab, p_bb, zero], [zero, zero, zero]])
    h3 = torch.zeros_like(h1)
    return r, jac, torch.stack([h1, h2, h3])


def helical_valley() -> FunctionProblem:
    """MGH #7: a helix-shaped valley around the x₃ axis; minimum 0 at (1, 0, 0)."""
    f, g, h = _sum_of_squares(_helical_residuals)
    return FunctionProblem(
        "helical-valley",
        f,
        g,
        h,
        _t(-1.0, 0.0, 0.0),
        (_t(1.0, 0.0, 0.0),),
        0.0,
        "a steep helical valley: the path to the minimum winds around an axis",
        well_behaved=False,
    )


def _powell_residuals(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    a, b, c, d = x[0], x[1], x[2], x[3]
    zero = torch.zeros_like(a)
    s5, s10 = math.sqrt(5.0), math.sqrt(10.0)
    u, w = b - 2.0 * c, a - d
    r = torch.stack([a + 10.0 * b, s5 * (c - d), u**2, s10 * w**2])
    one = torch.ones_like(a)
    jac = _stack2(
        [
            [one, 10.0 * one, zero, zero],
            [zero, zero, s5 * one, -s5 * one],
            [zero, 2 * u, -4 * u, zero],
            [2 * s10 * w, zero, zero, -2 * s10 * w],
        ]
    )
    z4 = torch.zeros(4, 4, dtype=x.dtype, device=x.device)
    h3 = torch.tensor([[0, 0, 0, 0], [0, 2, -4, 0], [0, -4, 8, 0], [0, 0, 0, 0]], dtype=x.dtype)
    h4 = (
        2
        * s10
        * torch.tensor([[1, 0, 0, -1], [0, 0, 0, 0], [0, 0, 0, 0], [-1, 0, 0, 1]], dtype=x.dtype)
    )
    return r, jac, torch.stack([z4, z4, h3.to(x.device), h4.to(x.device)])


def powell_singular() -> FunctionProblem:
    """MGH #13: minimum 0 at the origin, where the Hessian is singular (rank 2): Newton's method
    converges only linearly there."""
    f, g, h = _sum_of_squares(_powell_residuals)
    return FunctionProblem(
        "powell-singular",
        f,
        g,
        h,
        _t(3.0, -1.0, 0.0, 1.0),
        (),
        0.0,
        "a singular minimum: the Hessian at the solution has rank 2, so convergence is slow",
        well_behaved=False,
        critical_points={"singular minimum": _t(0.0, 0.0, 0.0, 0.0)},
    )


def _wood_residuals(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    a, b, c, d = x[0], x[1], x[2], x[3]
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    s90, s10 = math.sqrt(90.0), math.sqrt(10.0)
    r = torch.stack(
        [10.0 * (b - a**2), 1.0 - a, s90 * (d - c**2), 1.0 - c, s10 * (b + d - 2.0), (b - d) / s10]
    )
    jac = _stack2(
        [
            [-20.0 * a, 10.0 * one, zero, zero],
            [-one, zero, zero, zero],
            [zero, zero, -2.0 * s90 * c, s90 * one],
            [zero, zero, -one, zero],
            [zero, s10 * one, zero, s10 * one],
            [zero, one / s10, zero, -one / s10],
        ]
    )
    hr = torch.zeros(6, 4, 4, dtype=x.dtype, device=x.device)
    hr[0, 0, 0] = -20.0
    hr[2, 2, 2] = -2.0 * s90
    return r, jac, hr


def wood() -> FunctionProblem:
    """MGH #14: minimum 0 at (1, 1, 1, 1); from (−3, −1, −3, −1) scipy's L-BFGS-B stops at a saddle
    near (−0.97, 0.95, −0.97, 0.94) and reports success."""
    f, g, h = _sum_of_squares(_wood_residuals)
    return FunctionProblem(
        "wood",
        f,
        g,
        h,
        _t(-3.0, -1.0, -3.0, -1.0),
        (_t(1.0, 1.0, 1.0, 1.0),),
        0.0,
        "two coupled Rosenbrock valleys with a saddle that quasi-Newton methods stop at",
        well_behaved=False,
    )


def extended_rosenbrock(n: int = 2) -> FunctionProblem:
    """MGH #21: Σ_{i<n/2} 100 (x_{2i+1} − x_{2i}²)² + (1 − x_{2i})², n even: n/2 independent
    Rosenbrock valleys (block-diagonal Hessian); minimum 0 at (1, …, 1), start (−1.2, 1, …)."""
    if n < 2 or n % 2:
        raise ValueError(f"extended rosenbrock needs an even n >= 2, got n={n}")

    def f(x: Tensor) -> Tensor:
        a, b = x[0::2], x[1::2]
        return (100.0 * (b - a**2) ** 2 + (1.0 - a) ** 2).sum()

    def grad(x: Tensor) -> Tensor:
        a, b = x[0::2], x[1::2]
        g = torch.empty_like(x)
        g[0::2] = -400.0 * a * (b - a**2) - 2.0 * (1.0 - a)
        g[1::2] = 200.0 * (b - a**2)
        return g

    def hess(x: Tensor) -> Tensor:
        a, b = x[0::2], x[1::2]
        h = torch.zeros(n, n, dtype=x.dtype, device=x.device)
        i = torch.arange(0, n, 2, device=x.device)
        h[i, i] = 1200.0 * a**2 - 400.0 * b + 2.0
        h[i + 1, i + 1] = 200.0
        h[i, i + 1] = h[i + 1, i] = -400.0 * a
        return h

    x0 = torch.tensor([-1.2, 1.0] * (n // 2), dtype=torch.float64)
    return FunctionProblem(
        "extended-rosenbrock",
        f,
        grad,
        hess,
        x0,
        (torch.ones(n, dtype=torch.float64),),
        0.0,
        "independent Rosenbrock valleys side by side: as hard as n = 2, n times the size",
        well_behaved=False,
    )
