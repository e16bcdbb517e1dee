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
        converged: ‖b − Ax‖ ≤ tol·‖b‖ was reached. Where ``tol`` is below what the
            products' dtype can show (taken as 4·eps·‖Ax‖ in that dtype: 3e-2·‖Ax‖ for a
            bfloat16 model's), it is False, with ``residual`` the checked one.
        negative_curvature: a direction p with pᵀAp ≤ 0 was met: A is not positive definite on
            the Krylov space, and ``x`` is the iterate before it (``direction`` holds p).
        direction: the negative-curvature direction, or None.
        direction_curvature: its Rayleigh quotient pᵀ(A + damping·I)p/‖p‖² (≤ 0), or None.
        residual: ‖b − Ax‖/‖b‖ at the end: the recurrence's, which is the true one to
            rounding in float64 where ``tol`` ≥ √eps; below, or in a coarser dtype, convergence
            is checked on b − Ax itself (``check_residual``), and the residual reported is
            that one.
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


_FLOAT64_EPS = torch.finfo(torch.float64).eps

#: the margin on the recurrence's estimated drift from b − Ax (:meth:`_Run._drifted`) past
#: which b − Ax is checked, whatever the dtype and tolerance
DRIFT_SAFETY = 10.0

#: the rounding of a product b − Ax is checked against: this many eps of the products' dtype
#: times ‖Ax‖ (an estimate: the sums in a product round at about eps·|A||x|)
PRODUCT_ROUNDING = 4.0

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
    check_residual: bool = True,
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
        max_matvecs: cap on iterations, one product each; a nonzero ``x0`` costs one more,
            and so does each check of b − Ax (``check_residual``), outside the cap.
        damping: Levenberg-Marquardt shift λ ≥ 0 added to A: the same as passing
            ``as_operator(A).damped(damping)`` (:meth:`~curvscope.spectrum.Operator.damped`).
        x0: a warm start (Hessian-free starts from the previous step, decayed).
        progress_tol: also stop when φ(x) = ½xᵀ(A+λI)x − bᵀx improved by less than
            ``progress_tol``·k per iteration over the last k = max(10, 0.1·i) iterations
            (Martens 2010, §4.4: the residual is a poor guide to the progress on φ).
        save: iteration -> whether to keep that iterate (with its residual) in ``saved``.
        check_residual: where ``tol`` is below √eps of the working dtype or of the products'
            dtype, or either is coarser than float64, or the recurrence's estimated drift from
            b − Ax reaches ``tol`` (:meth:`_Run._drifted`), check b − Ax (one product) before
            saying ``converged``, and go on from it
            where it is not within ``tol`` — or stop, not converged, where the products'
            rounding is above ``tol`` (default True; Hessian-free, which reads its saved
            iterates and not ``converged``, passes False).
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
    numbers = [("tol", tol), ("damping", damping)]
    for name, value in [*numbers, *([("progress_tol", progress_tol)] if progress_tol else [])]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"expected {name} to be a number >= 0, got {value!r}")
        if name == "damping" and not math.isfinite(value):  # it named the combinator's "lam"
            raise ValueError(f"expected damping to be a finite number >= 0, got {value!r}")
    dt = torch.promote_types(working_dtype(b.dtype), op.work_dtype)
    # below √eps of the iteration's dtype or of the products' (a float32 or bfloat16 model's
    # under a float64 b: "converged" at a recurrence residual of 9e-11 where b − Ax was 3.4e-7,
    # an outside review), the recurrence's residual is checked on b − Ax
    coarse = max(torch.finfo(dt).eps, torch.finfo(op.dtype).eps)
    # and in any dtype coarser than float64 whatever the tolerance: the recurrence drifts from
    # b − Ax by about eps·κ, which float32's eps makes tol-sized on an ill-conditioned A
    # (condition 1e6, tol 1e-2: "converged" at true residuals 5.7–7.3x tol, 20 of 20 runs; an
    # outside review) — one product more a converged solve
    check = check_residual and (tol < math.sqrt(coarse) or coarse > _FLOAT64_EPS)
    if damping:  # A + λI: the operator's own combinator, in the working dtype
        op = op.damped(damping)
    with autocast_off(op.device):
        return _cg(
            op, b.to(dt), tol, max_matvecs, x0, progress_tol, save, check, check_residual, coarse
        )


def _in_range(bnorm: float, dtype: torch.dtype) -> bool:
    """Whether CG works with ‖b‖ as given in b's dtype: within the fourth roots of its smallest
    normal and its largest number (room for A's own scale in pᵀAp); outside, on b/‖b‖."""
    info = torch.finfo(dtype)
    return info.tiny**0.25 <= bnorm <= info.max**0.25


def _norm(op: Operator, b: Tensor) -> float:
    """‖b‖ in float64, over its largest entry where the vectors are whole: the sum of squares
    underflows below 1e-154 even in float64. (Sharded, the ranks' sums of squares in float64:
    enough for any float32 b.)"""
    if op.shards is not None:
        return float(op.norm(b.to(torch.float64)))
    top = float(b.abs().max()) if b.numel() else 0.0
    if not top > 0 or not math.isfinite(top):
        return top
    return float((b.to(torch.float64) / top).norm()) * top


def _finite(value: float, name: str) -> float:
    """``value``, a norm of ``name`` over all its entries, refused where it is not finite."""
    if not math.isfinite(value):
        raise ValueError(
            f"{name} has non-finite entries (NaN/Inf, or entries too large to square in its "
            "dtype); check how it was computed"
        )
    return value


@dataclass
class _Run:
    """One CG solve's state: the iterate, its residual and direction, the progress record."""

    op: Operator
    b: Tensor
    x: Tensor
    r: Tensor
    progress_tol: float | None
    save: Callable[[int], bool] | None
    it: int = 0
    exact: bool = True  # whether r is b − Ax as computed (no recurrence step since)
    direction: Tensor | None = None  # p with pᵀAp ≤ 0, where met
    direction_curvature: float | None = None
    stalled: bool = False  # the progress test stopped it
    limited: bool = False  # the products' rounding is above the goal (:meth:`converged`)
    product_eps: float = 0.0  # eps of the products' dtype (the operator's, before any damping)
    #: ‖A‖ from below, for free: the largest 1/α = pᵀAp/rᵀr met (each is at most λ_max: a
    #: diagonal entry of the Lanczos matrix CG builds, less a non-negative term)
    norm_below: float = 0.0

    def __post_init__(self) -> None:
        self.p, self.rr = self.r.clone(), self.dot(self.r, self.r)
        # φ(x) = ½xᵀ(Ax − b) − ½bᵀx = ½xᵀ(−r − b) (A damped already): the progress test's
        self.phis = [] if self.progress_tol is None else [self.dot(self.x, -self.r - self.b) / 2]
        self.saved: list[tuple[int, Tensor, Tensor]] = []  # rebound, never written in place

    def dot(self, u: Tensor, v: Tensor) -> float:  # over all entries: reduced when sharded
        return float(self.op.total(u @ v))

    def iterate(self, cap: int, goal: float) -> None:
        """CG steps until ‖r‖ ≤ goal, ``cap`` products in all, negative curvature or stalled
        progress."""
        while self.it < cap and self.rr**0.5 > goal:
            Ap = self.op(self.p[:, None])[:, 0]
            self.it += 1
            self.exact = False
            curv = self.dot(self.p, Ap)
            _finite_step(curv, "pᵀAp")
            if curv <= 0:
                self.direction = self.p
                self.direction_curvature = curv / self.dot(self.p, self.p)
                return
            self.norm_below = max(self.norm_below, curv / self.rr)
            alpha = self.rr / curv
            self.x = self.x + alpha * self.p
            self.r = self.r - alpha * Ap
            rr_new = _finite_step(self.dot(self.r, self.r), "the residual's ‖r‖²")
            self.p = self.r + (rr_new / self.rr) * self.p
            self.rr = rr_new
            if self.save is not None and self.save(self.it):
                self.saved.append((self.it, self.x, self.r))
            if self.progress_tol is not None and self._progress_stalled():
                self.stalled = True
                return

    def _progress_stalled(self) -> bool:
        """Martens's test: φ improved by less than progress_tol·k per iteration over the last
        k = max(10, 0.1·i) iterations."""
        assert self.progress_tol is not None
        self.phis.append(self.dot(self.x, -self.r - self.b) / 2)
        k = max(PROGRESS_WINDOW_MIN, int(PROGRESS_WINDOW_SHARE * self.it))
        if self.it <= k or self.phis[-1] >= 0:
            return False
        return (self.phis[-1] - self.phis[-1 - k]) / self.phis[-1] < k * self.progress_tol

    def converged(self, goal: float, check: bool, drift: bool) -> bool:
        """Whether the solve ended converged: the recurrence's residual within ``goal``, and
        with ``check`` — or with ``drift``, where the recurrence may have drifted by the goal
        (:meth:`_drifted`) — b − Ax itself (one product, unless r is exact already); where it
        is not,
        CG restarts from it (p = r) and this says False — and where the products' own rounding,
        about eps·‖Ax‖ in their dtype, is above ``goal``, it sets ``limited``: no more
        iterations can show the goal reached."""
        if self.direction is not None or self.rr**0.5 > goal:
            return False
        if not self.exact and (check or (drift and self._drifted(goal))):
            self.r = self.op.residual(self.b[:, None], self.x[:, None])[:, 0]
            self.exact = True
            self.rr, self.p = _finite_step(self.dot(self.r, self.r), "b − Ax's ‖r‖²"), self.r
            if self.rr**0.5 > goal:
                ax = self.op.norm(self.b - self.r)  # Ax, as the products computed it
                rounding = PRODUCT_ROUNDING * self.product_eps * float(ax)
                self.limited = rounding >= goal
        return self.rr**0.5 <= goal

    def _drifted(self, goal: float) -> bool:
        """Whether the recurrence's residual may have drifted from b − Ax by ``goal``: each
        step's rounding moves them apart by about eps·‖A‖·‖x‖ in the iteration's dtype, which
        on a numerically singular A is not small in float64 either (PSD, eigenvalues 0 and
        0.1…1, tol 1e-6: "converged" at a residual of 7e-14 where b − Ax was 2.2, ‖x‖ 6e16,
        in 13 of 20 runs at n = 5: an outside review's fuzzing). One dot product, at the end."""
        eps = torch.finfo(self.x.dtype).eps
        x_norm = self.dot(self.x, self.x) ** 0.5
        bound = DRIFT_SAFETY * eps * self.it * self.norm_below * x_norm
        return bound > goal


def _finite_step(value: float, what: str) -> float:
    """``value``, refused where it is not finite: a product that overflowed (NaN or Inf in
    pᵀAp or ‖r‖²) left every convergence test False, and CG looped for ever without a
    product (an outside review: a congruence scaled by 1e200)."""
    if not math.isfinite(value):
        raise FloatingPointError(
            f"CG: {what} is {value} — the operator's products overflowed or are not finite "
            "here; rescale the problem (or run it in float64)"
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
    check: bool,
    drift: bool,
    product_eps: float,
) -> CGResult:
    start, used_before = time.perf_counter(), op.matvecs
    # b's and x0's finiteness from the norms read anyway: reduced over the ranks, so every rank
    # refuses together (a rank checking its own shard alone left the others in a collective)
    bnorm = _finite(_norm(op, b), "b")
    # a b so small or large that pᵀAp and ‖r‖² underflow or overflow in the working dtype is
    # solved as b/‖b‖ and the solution scaled back (CG is linear in b): float32 at ‖b‖ ≈ 1e-14
    # met "negative curvature" on a positive-definite A, and from 1e-17 returned x = 0, at 1e-23
    # "converged"; float64 the same from 1e-140; and 1e30 was refused as too large to square
    # (an outside review)
    scale = bnorm if bnorm > 0 and not _in_range(bnorm, b.dtype) else 1.0
    if scale != 1.0:
        b, bnorm = b / scale, bnorm / scale
        x0 = None if x0 is None else x0 / scale
    if x0 is None or not _finite(float(op.total(x0 @ x0)), "x0") > 0:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x = x0.to(b).clone()
        r = op.residual(b[:, None], x[:, None])[:, 0]  # (b − Ax) − λx for a damped A
    goal = tol * (bnorm or 1.0)
    run = _Run(op, b, x, r, progress_tol, save, product_eps=product_eps)
    # near the dtype's precision the recurrence's residual drifts below the true one (float32,
    # tol 1e-6, condition 100: "converged" at 9.8e-7 where ‖b − Ax‖/‖b‖ was 2.1–2.9e-6 in 20
    # of 60 runs; an outside review): there (``check``), convergence is checked on b − Ax
    # itself — a product beyond the cap, as x0's — and CG goes on from it where it is not
    _finite_step(run.rr, "the starting residual's ‖r‖²")
    run.iterate(max_matvecs, goal)
    converged = run.converged(goal, check, drift)
    while not (converged or run.stalled or run.limited or run.direction is not None) and (
        run.it < max_matvecs
    ):
        run.iterate(max_matvecs, goal)
        converged = run.converged(goal, check, drift)
    if save is not None and (not run.saved or run.saved[-1][0] != run.it):
        run.saved.append((run.it, run.x, run.r))
    res = run.rr**0.5 / (bnorm or 1.0)
    neg = run.direction is not None
    saved = tuple(run.saved)
    if scale != 1.0:
        saved = tuple((it, x * scale, r * scale) for it, x, r in saved)
    return CGResult(
        run.x * scale if scale != 1.0 else run.x,
        converged,
        neg,
        run.direction,
        res,
        run.it,
        op.matvecs - used_before,
        time.perf_counter() - start,
        saved,
        run.direction_curvature,
    )
