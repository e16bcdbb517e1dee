"""Descents: the step a second-order method proposes from a local model of the loss, at the size
its search sets (optimistix's descents).

Each is a small frozen object: ``size`` names the number it takes ("radius": ‖s‖ ≤ Δ;
"damping": a shift added to the curvature; "sigma": the weight of a cubic term), ``init`` its
own entries in the method's state, and a call ``(local, size) -> Proposal``. Their
hyperparameters (``max_cg``, ``krylov_dim``, …) are read from the parameter group at each step,
as torch's optimizers read theirs. The linear algebra is in :mod:`curvscope.optim.subproblems`.

- :class:`DenseNewton`: (H + μI) s = −g in H's eigenbasis, H dense from n products; pure:
  s = −H⁺g.
- :class:`SteihaugCG`: min gᵀs + ½sᵀHs in ‖s‖ ≤ Δ by truncated CG (Steihaug 1983).
- :class:`LanczosSaddleFree`: s = −Q S (|Θ| + μ·max|θ|)⁻¹ Sᵀ Qᵀ g in a Lanczos subspace
  (Dauphin et al. 2014).
- :class:`LanczosCubic`: the minimizer of gᵀs + ½sᵀHs + σ/3‖s‖³ in a Lanczos subspace
  (Cartis, Gould & Toint 2011).
- :class:`GaussNewtonCG`: (G + λI) s = −g by CG, warm-started, stopped on progress, and
  backtracked over its iterates (Martens 2010).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvscope.optim._closure import Evaluation
from curvscope.optim.model_step import Local, Proposal, model_decrease
from curvscope.optim.subproblems import (
    cubic_in_eigenbasis,
    cubic_model,
    lanczos_subspace,
    steihaug,
)
from curvscope.spectrum import Operator
from curvscope.spectrum.cg import cg
from curvscope.spectrum.precision import eigh, working_dtype

#: Dense Newton leaves directions of no curvature out of its step while the gradient along them
#: is at most this share of its norm (the rest of the step is Newton's; more, and it is shifted)
IDLE_SHARE = 0.1


@dataclass(frozen=True)
class DenseNewton:
    """Newton's step with the dense Hessian H (n products), solved in its eigenbasis.

    Damped: s = −(H + μI)⁻¹g, where an indefinite H first raises μ to damping·max|λ| − λ_min
    (the step never goes uphill in the model); the proposal reports the μ used and that floor
    (damping·max|λ|, ``damping`` read from the group). Pure (``pure=True``): s = −H⁺g, the
    pseudo-inverse dropping eigenvalues below n·ε·max|λ|. Keeps max|λ| as ``scale``.
    """

    size: ClassVar[str] = "damping"
    pure: bool = False

    def init(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {"scale": 1.0}

    def __call__(self, local: Local, mu: float) -> Proposal:
        ev = local.ev
        n = ev.n
        H = ev.hvp(torch.eye(n, dtype=ev.flat_grad.dtype, device=ev.flat_grad.device))
        g, H = ev.flat_grad.to(working_dtype(H.dtype)), H.to(working_dtype(H.dtype))  # no bf16 eigh
        local.counts.hessians += 1
        lam, V = eigh((H + H.T) / 2)
        scale = max(float(lam.abs().max()), torch.finfo(lam.dtype).tiny)
        local.memory["scale"] = scale
        w = V.T @ g
        eps = torch.finfo(lam.dtype).eps
        null = lam.abs() <= n * eps * scale  # no curvature, to rounding
        indefinite = float(lam.min()) < -n * eps * scale
        if self.pure:
            inv = torch.where(~null, 1.0 / lam.where(~null, 1.0), torch.zeros_like(lam))
            s = -V @ (inv * w)
            note = "pure Newton step" + _shape_note(indefinite, int(null.sum()))
            return Proposal(s, model_decrease(g, s, H @ s), note)
        floor = local.group["damping"] * scale
        note = ""
        # Directions of no curvature to rounding (an unused parameter, a feature that is zero in
        # every sample, softmax regression's shift of every class by one vector) are left out of
        # the step while they carry little of the gradient: the shift the indefinite case needs
        # made every step damped — linear convergence, "indefinite" (an outside review). Where
        # they carry more (the model unbounded along them, or float32's rounding taking small
        # positive curvature for none: the diff review) the step is shifted, as before.
        idle = bool(null.any() and not null.all())  # (all of them: no Newton step to keep)
        idle = idle and float(w[null].norm()) <= IDLE_SHARE * float(g.norm())
        keep = ~null if idle and not indefinite else torch.ones_like(null)
        count = int(null.sum())
        if indefinite or (count and not idle):
            mu = max(mu, floor - min(float(lam.min()), 0.0))
            note = (
                "indefinite Hessian: shifted to positive definite"
                if indefinite
                else f"{count} direction(s) with no curvature to rounding carry gradient: "
                "shifted by the damping floor"
            )
        elif count:
            note = f"singular Hessian: {count} direction(s) of no curvature, and little gradient, "
            note += "left out of the step"
        s = -V[:, keep] @ (w[keep] / (lam[keep] + mu))
        lowest = float(lam[keep].min())
        return Proposal(s, model_decrease(g, s, H @ s), note, used=mu, floor=floor, lowest=lowest)


def _shape_note(indefinite: bool, null: int) -> str:
    """What pure Newton's step met: negative curvature, or directions of none (dropped)."""
    if indefinite:
        return " (indefinite Hessian)"
    return f" ({null} direction(s) of no curvature dropped)" if null else ""


@dataclass(frozen=True)
class SteihaugCG:
    """min gᵀs + ½sᵀHs subject to ‖s‖ ≤ Δ by truncated CG (Steihaug-Toint), following negative
    curvature to the boundary; stops at relative residual min(½, √‖g‖) (superlinear
    convergence; Nocedal & Wright, Alg. 7.2) or after ``max_cg`` products (from the group)."""

    size: ClassVar[str] = "radius"

    def init(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def __call__(self, local: Local, radius: float) -> Proposal:
        ev = local.ev
        g = ev.flat_grad
        gnorm = float(g.norm())
        tol = min(0.5, math.sqrt(gnorm)) * gnorm
        t = steihaug(lambda v: ev.hvp(v[:, None])[:, 0], g, radius, tol, local.group["max_cg"])
        local.counts.cg_iterations += t.iterations
        return Proposal(t.step, model_decrease(g, t.step, t.Hs), t.note, t.boundary)


def krylov_model(local: Local) -> tuple[Tensor, Tensor, Tensor]:
    """(QS, θ, w): the Lanczos basis Q of span{g, Hg, …} (``krylov_dim`` from the group),
    T = QᵀHQ = S diag(θ) Sᵀ, and w = SᵀQᵀg — the quadratic model in T's eigenbasis."""
    ev = local.ev
    # the seed only matters if the Krylov space closes early (then a random direction
    # continues it): a fresh, reproducible one per step
    Q, T = lanczos_subspace(
        ev.hvp, ev.flat_grad, local.group["krylov_dim"], seed=local.counts.gradients
    )
    local.counts.lanczos_iterations += Q.shape[1]
    theta, S = eigh(T)
    w = S.T @ (Q.T @ ev.flat_grad.to(Q.dtype))  # Lanczos works in float32 for a 16-bit model
    return Q @ S, theta, w


def _negative_note(theta: Tensor) -> str:
    """The note for a subspace with negative curvature beyond rounding — k·eps·max|θ| for the
    k Ritz values, as the dense Newton step judges its n: a convex softmax regression's λ_min
    of −8e-18 read "negative curvature used" (an outside review; with n for k, a float32 model
    of 8M parameters could never say it: a review)."""
    lo = float(theta.min())
    rounding = theta.numel() * torch.finfo(theta.dtype).eps * float(theta.abs().max())
    return f"negative curvature used (λ_min ≈ {lo:.3g})" if lo < -rounding else ""


@dataclass(frozen=True)
class LanczosSaddleFree:
    """The Newton step with |H| in place of H, in a Lanczos subspace (Dauphin et al. 2014):
    s = −Q S (|Θ| + μ·max|θ|)⁻¹ Sᵀ Qᵀ g. Along negative curvature it moves downhill, by as much
    as the curvature's magnitude says; μ is relative to the largest |θ|."""

    size: ClassVar[str] = "damping"

    def init(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def __call__(self, local: Local, mu: float) -> Proposal:
        QS, theta, w = krylov_model(local)
        scale = max(float(theta.abs().max()), torch.finfo(theta.dtype).tiny)
        u = -w / (theta.abs() + mu * scale)
        pred = -float(w @ u + 0.5 * (theta * u * u).sum())
        return Proposal(QS @ u, pred, _negative_note(theta))


@dataclass(frozen=True)
class LanczosCubic:
    """The global minimizer of gᵀs + ½sᵀHs + σ/3‖s‖³ over a Lanczos subspace, exactly (the
    secular equation in T's eigenbasis; Cartis, Gould & Toint 2011, §6): negative curvature
    is followed, the cubic term bounds the step."""

    size: ClassVar[str] = "sigma"

    def init(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def __call__(self, local: Local, sigma: float) -> Proposal:
        QS, theta, w = krylov_model(local)
        u, _ = cubic_in_eigenbasis(theta, w, sigma)
        u = u.to(w)
        return Proposal(QS @ u, -cubic_model(theta, w, u, sigma), _negative_note(theta))


#: Martens keeps the CG iterates at iterations ⌈γʲ⌉ for backtracking, γ = 1.3.
BACKTRACK_SPACING = 1.3
_KEPT = frozenset(math.ceil(BACKTRACK_SPACING**j) for j in range(80))


@dataclass(frozen=True)
class GaussNewtonCG:
    """CG on the damped curvature system (G + λI) s = −g, as Hessian-free does (Martens 2010).

    From the group: ``curvature`` ("ggn": G = JᵀH_out J from the closure's (loss, outputs),
    refused for a loss that also reads the parameters other than through the outputs — G
    would leave that term's curvature out; "hessian"; "auto": G when the outputs are there),
    ``max_cg``, ``decay`` (the warm start ζ·s_prev, the previous solution kept as
    ``previous``) and ``progress_tol`` (Martens' §4.4 stopping rule). CG is not
    preconditioned. Of the iterates kept at iterations ⌈1.3ʲ⌉, the one with the lowest loss
    found walking back from the last (past any whose loss is not finite) is proposed.
    Negative curvature (the Hessian only) is reported as the floor λ − pᵀ(H + λI)p/‖p‖² for
    the damping.
    """

    size: ClassVar[str] = "damping"
    tol: float = 1e-10

    def init(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    @staticmethod
    def product(ev: Evaluation, curvature: str) -> Callable[[Tensor], Tensor]:
        """The curvature products: Gauss-Newton or Hessian, as asked (``auto``: G when the
        closure returned the outputs)."""
        if curvature == "auto":
            curvature = "ggn" if ev.outputs is not None else "hessian"
        return ev.ggn if curvature == "ggn" else ev.hvp

    def __call__(self, local: Local, lam: float) -> Proposal:
        ev, counts, group = local.ev, local.counts, local.group
        cev = ev
        if local.curvature_closure is not None:
            cev = Evaluation(
                ev.params, local.curvature_closure, counts, group=ev.group, undone=True
            )
        g = ev.flat_grad
        op = Operator(self.product(cev, group["curvature"]), ev.n, g.dtype, g.device)
        prev = local.memory.get("previous")
        res = cg(
            op.damped(lam),
            -g,
            tol=self.tol,
            max_matvecs=group["max_cg"],
            x0=None if prev is None else group["decay"] * prev.to(g),
            progress_tol=group["progress_tol"],
            save=_KEPT.__contains__,
            check_residual=False,  # its saved iterates are searched, not `converged` read
        )
        counts.cg_iterations += res.iterations
        local.memory["previous"] = res.x
        note, floor = "", 0.0
        if res.negative_curvature:
            # only with the Hessian: raise λ past the curvature CG met, pᵀHp/‖p‖² = that − λ
            assert res.direction_curvature is not None
            note, floor = "negative curvature: damping raised", lam - res.direction_curvature
        best = _backtrack(res.saved, local.trial)
        if best is None:
            return Proposal(torch.zeros_like(g), 0.0, note or "CG made no progress", floor=floor)
        f, x, r = best
        # (G + λI) x = −g − r  ⇒  xᵀGx = xᵀ(−g − r) − λ‖x‖²
        xGx = float(x @ (-g - r)) - lam * float(x @ x)
        pred = -(float(g.to(x) @ x) + 0.5 * xGx)  # x: CG's working dtype (float32 for bf16)
        return Proposal(x, pred, note, loss_at_step=f, floor=floor)


def _backtrack(
    saved: Sequence[tuple[int, Tensor, Tensor]], trial: Callable[[Tensor], float]
) -> tuple[float, Tensor, Tensor] | None:
    """(f, x, r) of the saved CG iterate with the lowest loss found walking back from the last
    while the loss keeps improving; None when no iterate moved. An iterate whose loss is not
    finite is walked past wherever it is (it tells nothing of the iterates before it), and
    proposed, as +inf — which the step's ratio test rejects — only where no iterate's loss is
    finite: with NaN kept as the best, ``f < NaN`` was false, so the walk stopped at the second
    iterate and the step was rejected though an earlier one lowered the loss (a quadratic
    undefined past x₀ = 5: iterates 1–11 took it from 0 to −1637, 14 and 18 were NaN, and 24
    steps were rejected while the damping grew: a review)."""
    best: tuple[float, Tensor, Tensor] | None = None
    undefined: tuple[float, Tensor, Tensor] | None = None
    for _, x, r in reversed(saved):
        if not bool(x.any()):
            continue
        f = trial(x)
        if not math.isfinite(f):
            undefined = undefined or (math.inf, x, r)
            continue
        if best is not None and f >= best[0]:
            break
        best = (f, x, r)
    return best if best is not None else undefined
