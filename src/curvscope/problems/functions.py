"""Test functions with known minima and exact (closed-form) derivatives.

Each is a :class:`FunctionProblem`: ``f`` maps a 1-D float tensor to a scalar, ``grad`` and
``hess`` are written out by hand (so autograd can be checked against them, as scipy's
``rosen_der``/``rosen_hess`` are), ``x0`` is the customary start, ``minima`` the known minimizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvscope.derivatives.checks import check_int
from curvscope.derivatives.seeding import generator

Fn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class FunctionProblem:
    """A function f: R^n -> R with its exact derivatives, a start and its known minima.

    Attributes:
        name: registry name.
        f, grad, hess: the function and its closed-form gradient (n,) and Hessian (n, n).
        x0: the customary starting point (float64).
        minima: known minimizers (global ones, or all local ones where few).
        f_min: the minimum value.
        description: one sentence on what the function shows.
        well_behaved: True where Newton-type methods are expected to shine (convex, smooth).
    """

    name: str
    f: Fn
    grad: Fn
    hess: Fn
    x0: Tensor
    minima: tuple[Tensor, ...]
    f_min: float
    description: str
    well_behaved: bool
    critical_points: dict[str, Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.x0.numel()

    def __call__(self, x: Tensor) -> Tensor:
        return self.f(x)


def _t(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------- Rosenbrock
def rosenbrock(n: int = 2) -> FunctionProblem:
    """Σ_i 100 (x_{i+1} − x_i²)² + (1 − x_i)²: a curved, narrow valley; minimum 0 at (1, …, 1)."""
    if n < 2:
        raise ValueError(f"rosenbrock needs n >= 2, got n={n}")

    def f(x: Tensor) -> Tensor:
        return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()

    def grad(x: Tensor) -> Tensor:
        d = x[1:] - x[:-1] ** 2
        g = torch.zeros_like(x)
        g[:-1] += -400.0 * x[:-1] * d - 2.0 * (1.0 - x[:-1])
        g[1:] += 200.0 * d
        return g

    def hess(x: Tensor) -> Tensor:
        h = torch.zeros(x.numel(), x.numel(), dtype=x.dtype, device=x.device)
        i = torch.arange(x.numel() - 1, device=x.device)
        diag = torch.zeros_like(x)
        diag[:-1] += 1200.0 * x[:-1] ** 2 - 400.0 * x[1:] + 2.0
        diag[1:] += 200.0
        h[i, i + 1] = h[i + 1, i] = -400.0 * x[:-1]
        return h + torch.diag(diag)

    x0 = torch.tensor([-1.2 if i % 2 == 0 else 1.0 for i in range(n)], dtype=torch.float64)
    return FunctionProblem(
        "rosenbrock",
        f,
        grad,
        hess,
        x0,
        (torch.ones(n, dtype=torch.float64),),
        0.0,
        "a narrow curved valley: gradient descent zig-zags, Newton follows the curve",
        well_behaved=False,
    )


# ----------------------------------------------------------------------------- quadratic
def quadratic(
    n: int = 20,
    condition: float = 1e3,
    eigenvalues: Tensor | None = None,
    seed: int = 0,
) -> FunctionProblem:
    """½ (x − x*)ᵀ A (x − x*) with A = Q diag(λ) Qᵀ of a prescribed spectrum: minimum 0 at x*
    where every λ ≥ 0 (not isolated where one is 0); otherwise unbounded below, with a saddle
    (a maximum, if every λ < 0) at x* in ``critical_points``.

    Args:
        n: dimension (ignored when ``eigenvalues`` is given).
        condition: λ_max/λ_min of the default log-spaced spectrum in [1/condition, 1].
        eigenvalues: the spectrum λ (any signs: negative ones make a saddle).
        seed: fixes the eigenvectors Q, x* and x0.
    """
    gen = generator(seed)
    if eigenvalues is None:  # (n = 0 or 3.7, NaN eigenvalues: torch's bare errors, or a NaN
        n = check_int(n, "n", minimum=1)  # spectrum described as a saddle: an outside review)
        if not 1 <= condition < math.inf:  # (NaN, inf: a NaN function, called a saddle)
            raise ValueError(f"condition must be a finite number >= 1, got {condition}")
        lam = torch.logspace(-math.log10(condition), 0, n, dtype=torch.float64)
    else:
        lam = torch.as_tensor(eigenvalues, dtype=torch.float64).reshape(-1)
        n = lam.numel()
        if n == 0 or not bool(torch.isfinite(lam).all()):
            raise ValueError(f"eigenvalues must be one or more finite numbers, got {lam.tolist()}")
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = (q * lam) @ q.T
    a = (a + a.T) / 2
    x_star = torch.randn(n, generator=gen, dtype=torch.float64)
    x0 = x_star + torch.randn(n, generator=gen, dtype=torch.float64) * 3.0

    def f(x: Tensor) -> Tensor:
        d = x - x_star.to(x)
        return 0.5 * d @ (a.to(x) @ d)

    convex = bool((lam > 0).all())
    bounded = bool((lam >= 0).all())  # a zero eigenvalue: still 0 at x*, along a flat subspace
    if convex:
        about = (
            f"a quadratic with condition number {float(lam.max() / lam.min()):.3g}: Newton "
            "solves it in one step, gradient descent needs about that many"
        )
    elif bounded:
        about = (
            f"a singular quadratic ({int((lam == 0).sum())} zero eigenvalue(s)): its minimum 0 "
            "at x* is not isolated, and Newton's system has no unique solution"
        )
    else:
        kind = "maximum" if bool((lam < 0).all()) else "saddle"
        about = (
            f"an indefinite quadratic, unbounded below, with a {kind} at x*: pure Newton jumps "
            f"to the {kind} in one step"
        )
    return FunctionProblem(
        "quadratic",
        f,
        lambda x: a.to(x) @ (x - x_star.to(x)),
        lambda x: a.to(x).clone(),
        x0,
        (x_star,) if bounded else (),
        0.0 if bounded else -math.inf,
        about,
        well_behaved=convex,
        # reported by the review of the problems: an indefinite spectrum listed no saddle
        critical_points={} if bounded else {kind: x_star},
    )


# --------------------------------------------------------------------- Beale, Himmelblau
def _sum_of_squares(
    residuals: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]],
) -> tuple[Fn, Fn, Fn]:
    """f = Σ r_i², given r_i, ∇r_i (m, n) and ∇²r_i (m, n, n) in closed form."""

    def f(x: Tensor) -> Tensor:
        r, _, _ = residuals(x)
        return (r**2).sum()

    def grad(x: Tensor) -> Tensor:
        r, jac, _ = residuals(x)
        return 2.0 * jac.T @ r

    def hess(x: Tensor) -> Tensor:
        r, jac, hr = residuals(x)
        return 2.0 * (jac.T @ jac + torch.einsum("i,ijk->jk", r, hr))

    return f, grad, hess


def _beale_residuals(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    a, b = x[0], x[1]
    c = torch.tensor([1.5, 2.25, 2.625], dtype=x.dtype, device=x.device)
    rows_r, rows_j, rows_h = [], [], []
    for i in (1, 2, 3):
        rows_r.append(c[i - 1] - a + a * b**i)
        rows_j.append(torch.stack([b**i - 1.0, i * a * b ** (i - 1)]))
        cross = i * b ** (i - 1)
        yy = i * (i - 1) * a * b ** (i - 2) if i >= 2 else torch.zeros_like(a)
        rows_h.append(
            torch.stack([torch.stack([torch.zeros_like(a), cross]), torch.stack([cross, yy])])
        )
    return torch.stack(rows_r), torch.stack(rows_j), torch.stack(rows_h)


def beale() -> FunctionProblem:
    """(1.5 − x + xy)² + (2.25 − x + xy²)² + (2.625 − x + xy³)²; minimum 0 at (3, 0.5)."""
    f, g, h = _sum_of_squares(_beale_residuals)
    return FunctionProblem(
        "beale",
        f,
        g,
        h,
        _t(1.0, 1.0),
        (_t(3.0, 0.5),),
        0.0,
        "flat plateaus and sharp ridges: curvature varies by orders of magnitude",
        well_behaved=False,
    )


def _himmelblau_residuals(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    a, b = x[0], x[1]
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    r = torch.stack([a**2 + b - 11.0, a + b**2 - 7.0])
    jac = torch.stack([torch.stack([2 * a, one]), torch.stack([one, 2 * b])])
    hr = torch.stack(
        [
            torch.stack([torch.stack([2 * one, zero]), torch.stack([zero, zero])]),
            torch.stack([torch.stack([zero, zero]), torch.stack([zero, 2 * one])]),
        ]
    )
    return r, jac, hr


def himmelblau() -> FunctionProblem:
    """(x² + y − 11)² + (x + y² − 7)²: four minima of value 0, a maximum and four saddles."""
    f, g, h = _sum_of_squares(_himmelblau_residuals)
    minima = (
        _t(3.0, 2.0),
        _t(-2.805118086952745, 3.131312518250573),
        _t(-3.779310253377747, -3.283185991286170),
        _t(3.584428340330492, -1.848126526964404),
    )
    return FunctionProblem(
        "himmelblau",
        f,
        g,
        h,
        _t(0.0, 0.0),
        minima,
        0.0,
        "several minima, saddles and a maximum: where a method ends depends on its curvature use",
        well_behaved=False,
        critical_points={"maximum": _t(-0.270845, -0.923039)},
    )


# ------------------------------------------------------------------- saddle, sqrt(1+x²)
def saddle() -> FunctionProblem:
    """x² − y² + y⁴/4: a saddle at 0 and minima of value −1 at (0, ±√2).

    Started near the saddle, pure Newton converges to it (it seeks any critical point);
    saddle-free and cubic-regularized Newton escape along the negative curvature.
    """

    def f(x: Tensor) -> Tensor:
        return x[0] ** 2 - x[1] ** 2 + x[1] ** 4 / 4

    def grad(x: Tensor) -> Tensor:
        return torch.stack([2 * x[0], -2 * x[1] + x[1] ** 3])

    def hess(x: Tensor) -> Tensor:
        zero = torch.zeros_like(x[0])
        return torch.stack([torch.stack([2 + zero, zero]), torch.stack([zero, -2 + 3 * x[1] ** 2])])

    r2 = math.sqrt(2.0)
    return FunctionProblem(
        "saddle",
        f,
        grad,
        hess,
        _t(0.5, 0.01),
        (_t(0.0, r2), _t(0.0, -r2)),
        -1.0,
        "a saddle next to the start: Newton is attracted to it, gradient descent leaves slowly",
        well_behaved=False,
        critical_points={"saddle": _t(0.0, 0.0)},
    )


def sqrt_one_plus_square(n: int = 1, start: float = 1.5) -> FunctionProblem:
    """Σ_i sqrt(1 + x_i²): convex, minimum n at 0, but the pure Newton step maps x to −x³.

    So pure Newton diverges from |x0| > 1 (and converges cubically from |x0| < 1), while a
    safeguarded method (damping, trust region, line search) decreases f from anywhere.
    """

    def f(x: Tensor) -> Tensor:
        return torch.sqrt(1.0 + x**2).sum()

    def grad(x: Tensor) -> Tensor:
        return x / torch.sqrt(1.0 + x**2)

    def hess(x: Tensor) -> Tensor:
        return torch.diag((1.0 + x**2) ** -1.5)

    return FunctionProblem(
        "sqrt1px2",
        f,
        grad,
        hess,
        torch.full((n,), float(start), dtype=torch.float64),
        (torch.zeros(n, dtype=torch.float64),),
        float(n),
        "convex but with curvature that vanishes far out: pure Newton overshoots and diverges "
        "from |x0| > 1",
        well_behaved=False,
    )
