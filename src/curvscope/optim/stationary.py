"""What kind of point an optimizer stopped at — read from the curvature, not from the
optimizer's own word (scipy's Newton-CG reports success at a maximum; L-BFGS-B at a saddle)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvscope.optim._closure import Counts, Evaluation
from curvscope.spectrum import Operator, eigenvalues
from curvscope.spectrum.precision import eigh

#: Above this many parameters the extreme eigenvalues come from Lanczos instead of eigvalsh.
DENSE_EIGEN_LIMIT = 300
#: ‖g‖ ≤ GRAD_TOL · max(1, |f|) counts as stationary.
GRAD_TOL = 1e-5
#: Eigenvalues within CURVATURE_TOL · max|λ| of 0 count as zero (flat directions).
CURVATURE_TOL = 1e-6


@dataclass(frozen=True)
class PointType:
    """kind: "minimum" | "saddle" | "maximum" | "degenerate" (stationary, but a zero eigenvalue
    leaves the type open) | "not stationary"; with the numbers it was read from."""

    kind: str
    loss: float
    grad_norm: float
    lambda_min: float
    lambda_max: float
    products: int

    @property
    def message(self) -> str:
        nums = (
            f"‖g‖ = {self.grad_norm:.2e}, λ_min = {self.lambda_min:.3g}, "
            f"λ_max = {self.lambda_max:.3g}"
        )
        return f"{self.kind} ({nums})"


def stationary_point(
    closure: Callable[[], Any],
    params: Iterable[Tensor],
    *,
    grad_tol: float = GRAD_TOL,
    curvature_tol: float = CURVATURE_TOL,
) -> PointType:
    """Classify the current point of ``closure`` by its gradient and its extreme eigenvalues.

    Stationary when ‖g‖ ≤ grad_tol·max(1, |f|); then a minimum when λ_min > curvature_tol·
    max|λ|, a maximum when λ_max < −curvature_tol·max|λ|, a saddle when λ_min < −… < … < λ_max,
    degenerate otherwise. Exact eigenvalues for n ≤ 300, Lanczos (tol 1e-6) above.

    With exact eigenvalues, a positive λ_min below that share of max|λ| still makes a minimum
    where it is resolved (above n·eps·max|λ|, eigh's error) and the point is stationary in the
    Hessian's own metric too: the Newton decrement √(gᵀH⁻¹g) ≤ grad_tol·max(1, |f|) — the
    bottom of the local quadratic is where the point is. A badly scaled minimum's curvatures
    (2 and 2·10¹² at Brown's, exactly at its minimizer) read *degenerate* before (an outside
    review), while curvature that vanishes with the loss (logistic regression on separable
    data) stays *degenerate*: there the decrement is far above the gradient's tolerance.

    Example:
        >>> import torch, curvscope as cs
        >>> x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        >>> cs.optim.stationary_point(lambda: x[0] ** 2 - x[1] ** 2, [x]).kind
        'saddle'
    """
    params = [p for p in params if p.requires_grad]
    counts = Counts()
    ev = Evaluation(params, closure, counts)
    g = ev.flat_grad
    decrement = math.inf  # √(gᵀH⁻¹g) where H is positive definite and resolved
    if ev.n <= DENSE_EIGEN_LIMIT:
        H = ev.hvp(torch.eye(ev.n, dtype=g.dtype, device=g.device))
        lam, vecs = eigh((H + H.T) / 2)
        lo, hi = float(lam[0]), float(lam[-1])
        if lo > ev.n * torch.finfo(lam.dtype).eps * max(abs(lo), abs(hi)):
            decrement = float(((vecs.T @ g) ** 2 / lam).sum().sqrt())
    else:
        op = Operator(ev.hvp, ev.n, g.dtype, g.device)
        r = eigenvalues(op, k=1, which="both", tol=1e-6, return_vectors=False)
        hi, lo = float(r.values[0]), float(r.values[-1])
    gnorm = float(g.norm())
    zero = curvature_tol * max(abs(lo), abs(hi), 1e-300)
    scale = grad_tol * max(1.0, abs(ev.loss))
    if gnorm > scale:
        kind = "not stationary"
    elif lo > zero or decrement <= scale:
        kind = "minimum"
    elif hi < -zero:
        kind = "maximum"
    elif lo < -zero:
        kind = "saddle"
    else:
        kind = "degenerate"
    return PointType(kind, ev.loss, gnorm, lo, hi, counts.products)
