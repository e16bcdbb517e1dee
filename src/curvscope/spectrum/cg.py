"""Conjugate gradients on a curvature operator, with the negative-curvature test that
Newton-type methods and the Newton decrement need."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvscope.derivatives.checks import check_int
from curvscope.spectrum._operator import Operator, as_operator
from curvscope.spectrum.precision import autocast_off, working_dtype


@dataclass(frozen=True)
class CGResult:
    """x ≈ A⁻¹b from conjugate gradients.

    The vectors (``x``, ``direction``, the saved iterates) are in the working dtype: the wider
    of b's dtype and the operator's working dtype (float32 at least; float64 when either is).

    Attributes:
        x: the last iterate (the solution when ``converged``).
        converged: ‖b − Ax‖ ≤ tol·‖b‖ was reached.
        negative_curvature: a direction p with pᵀAp ≤ 0 was met: A is not positive definite on
            the Krylov space, and ``x`` is the iterate before it (``direction`` holds p).
        direction: the negative-curvature direction, or None.
        direction_curvature: its Rayleigh quotient pᵀ(A + damping·I)p/‖p‖² (≤ 0), or None.
        residual: ‖b − Ax‖/‖b‖ at the end.
        iterations, matvecs, seconds: the cost (one product per iteration).
        saved: with ``save``, (iteration, x, r) for the iterations it asks for
            (r = b − (A+λI)x), the last one always included — what Hessian-free's CG
            backtracking searches; empty without.
    """

    x: Tensor
    converged: bool
    negative_curvature: bool
    direction: Tensor | None
    residual: float
    iterations: int
    matvecs: int
    seconds: float
    saved: tuple[tuple[int, Tensor, Tensor], ...] = ()
    direction_curvature: float | None = None


#: Martens (2010) stops CG when the quadratic φ(x) = ½xᵀAx − bᵀx has improved by less than
#: this share per iteration over the last max(10, 0.1·i) iterations.
PROGRESS_WINDOW_MIN, PROGRESS_WINDOW_SHARE = 10, 0.1


def cg(
    A: Any,
    b: Tensor,
    *,
    tol: float = 1e-4,
    max_matvecs: int = 50,
    damping: float = 0.0,
    x0: Tensor | None = None,
    progress_tol: float | None = None,
    save: Callable[[int], bool] | None = None,
) -> CGResult:
    """Solve (A + damping·I) x = b by conjugate gradients, stopping at negative curvature.

    The iteration runs in the working dtype — the wider of b's and the operator's working
    dtype, float32 at least — while each product runs in the operator's own dtype (a bfloat16
    model's gradient can be passed as it is). With sharded vectors (``C.sharded()``, FSDP2)
    ``b``, ``x0`` and the solution are this rank's entries, and the inner products are reduced
    over the ranks: every rank takes the same steps.

    Args:
        A: a :class:`~curvscope.Curvature`, a square symmetric tensor, or an object with
            ``matmat``.
        b: the right-hand side (n,), any floating dtype, finite.
        tol: relative residual to reach.
        max_matvecs: cap on products (one per iteration, one more for a nonzero ``x0``).
        damping: Levenberg-Marquardt shift λ ≥ 0 added to A: the same as passing
            ``as_operator(A).damped(damping)`` (:meth:`~curvscope.spectrum.Operator.damped`).
        x0: a warm start (Hessian-free starts from the previous step, decayed).
        progress_tol: also stop when φ(x) = ½xᵀ(A+λI)x − bᵀx improved by less than
            ``progress_tol``·k per iteration over the last k = max(10, 0.1·i) iterations
            (Martens 2010, §4.4: the residual is a poor guide to the progress on φ).
        save: iteration -> whether to keep that iterate (with its residual) in ``saved``.
    """
    op = as_operator(A)
    op.same_on_ranks(
        "cs.cg",
        b=op.alike(b),
        tol=tol,
        max_matvecs=max_matvecs,
        damping=damping,
        x0=op.alike(x0),
        progress_tol=progress_tol,
    )
    if not isinstance(b, Tensor) or not b.is_floating_point():
        raise TypeError(
            f"expected b to be a floating-point torch.Tensor of shape ({op.n},), got "
            + (f"dtype {b.dtype}" if isinstance(b, Tensor) else type(b).__name__)
        )
    if b.shape != (op.n,):
        whose = "" if op.shards is None else " (this rank's entries: S.shard(b) from a full b)"
        raise ValueError(f"expected b of shape ({op.n},){whose}, got {tuple(b.shape)}")
    if x0 is not None and (not isinstance(x0, Tensor) or x0.shape != (op.n,)):
        shape = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
        raise ValueError(f"expected x0 of shape ({op.n},) like b, got {shape}")
    op.require_symmetric("cs.spectrum.cg")
    max_matvecs = check_int(max_matvecs, "max_matvecs", minimum=1)
    for name, value in (("tol", tol), ("damping", damping)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"expected {name} to be a number >= 0, got {value!r}")
    dt = torch.promote_types(working_dtype(b.dtype), op.work_dtype)
    if damping:  # A + λI: the operator's own combinator, in the working dtype
        op = op.damped(damping)
    with autocast_off(op.device):
        return _cg(op, b.to(dt), tol, max_matvecs, x0, progress_tol, save)


def _finite(value: float, name: str) -> float:
    """``value``, a norm of ``name`` over all its entries, refused where it is not finite."""
    if not math.isfinite(value):
        raise ValueError(
            f"{name} has non-finite entries (NaN/Inf, or entries too large to square in its "
            "dtype); check how it was computed"
        )
    return value


def _cg(
    op: Operator,
    b: Tensor,
    tol: float,
    max_matvecs: int,
    x0: Tensor | None,
    progress_tol: float | None,
    save: Callable[[int], bool] | None,
) -> CGResult:
    start, used_before = time.perf_counter(), op.matvecs

    def dot(u: Tensor, v: Tensor) -> float:  # over all entries: reduced for sharded vectors
        return float(op.total(u @ v))

    # b's and x0's finiteness from the norms read anyway: reduced over the ranks, so every rank
    # refuses together (a rank checking its own shard alone left the others in a collective)
    bnorm = _finite(float(op.norm(b)), "b")
    if x0 is None or not _finite(dot(x0, x0), "x0") > 0:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x = x0.to(b).clone()
        r = op.residual(b[:, None], x[:, None])[:, 0]  # (b − Ax) − λx for a damped A
    p = r.clone()
    bnorm = bnorm or 1.0
    rr = dot(r, r)
    it, neg, direction, direction_curvature = 0, False, None, None
    # φ(x) = ½xᵀ(Ax − b) − ½bᵀx = ½xᵀ(−r − b) (A damped already): for the progress test only
    phis = [] if progress_tol is None else [dot(x, -r - b) / 2]
    saved = []  # x, r and p are rebound each iteration, never written in place: no copies
    while it < max_matvecs and rr**0.5 > tol * bnorm:
        Ap = op(p[:, None])[:, 0]
        it += 1
        curv = dot(p, Ap)
        if curv <= 0:
            neg, direction, direction_curvature = True, p, curv / dot(p, p)
            break
        alpha = rr / curv
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = dot(r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new
        if save is not None and save(it):
            saved.append((it, x, r))
        if progress_tol is not None:
            phis.append(dot(x, -r - b) / 2)
            k = max(PROGRESS_WINDOW_MIN, int(PROGRESS_WINDOW_SHARE * it))
            if it > k and phis[-1] < 0 and (phis[-1] - phis[-1 - k]) / phis[-1] < k * progress_tol:
                break
    if save is not None and (not saved or saved[-1][0] != it):
        saved.append((it, x, r))
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
        tuple(saved),
        direction_curvature,
    )
