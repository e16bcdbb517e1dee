"""Conjugate gradients on a curvature operator, with the negative-curvature test that
Newton-type methods and the Newton decrement need."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvscope.spectrum._operator import as_operator


@dataclass(frozen=True)
class CGResult:
    """x ≈ A⁻¹b from conjugate gradients.

    Attributes:
        x: the last iterate (the solution when ``converged``).
        converged: ‖b − Ax‖ ≤ tol·‖b‖ was reached.
        negative_curvature: a direction p with pᵀAp ≤ 0 was met: A is not positive definite on
            the Krylov space, and ``x`` is the iterate before it (``direction`` holds p).
        direction: the negative-curvature direction, or None.
        residual: ‖b − Ax‖/‖b‖ at the end.
        iterations, matvecs, seconds: the cost (one product per iteration).
    """

    x: Tensor
    converged: bool
    negative_curvature: bool
    direction: Tensor | None
    residual: float
    iterations: int
    matvecs: int
    seconds: float


def cg(
    A: Any, b: Tensor, *, tol: float = 1e-4, max_matvecs: int = 50, damping: float = 0.0
) -> CGResult:
    """Solve (A + damping·I) x = b by conjugate gradients, stopping at negative curvature.

    Args:
        A: a :class:`~curvscope.Curvature`, a square tensor, or an object with ``matmat``.
        b: the right-hand side (n,).
        tol: relative residual to reach.
        max_matvecs: cap on products (one per iteration).
        damping: Levenberg-Marquardt shift added to A.
    """
    op = as_operator(A)
    if b.shape != (op.n,):
        raise ValueError(f"expected b of shape ({op.n},), got {tuple(b.shape)}")
    start, used_before = time.perf_counter(), op.matvecs
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    bnorm = float(b.norm()) or 1.0
    rr = float(r @ r)
    it, neg, direction = 0, False, None
    while it < max_matvecs and rr**0.5 > tol * bnorm:
        Ap = op(p[:, None])[:, 0] + damping * p
        it += 1
        curv = float(p @ Ap)
        if curv <= 0:
            neg, direction = True, p.clone()
            break
        alpha = rr / curv
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    res = rr**0.5 / bnorm
    return CGResult(
        x,
        res <= tol and not neg,
        neg,
        direction,
        res,
        it,
        op.matvecs - used_before,
        time.perf_counter() - start,
    )
