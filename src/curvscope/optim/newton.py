"""Newton's method, dense and safeguarded, and trust-region Newton-CG (matrix-free)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from curvscope.derivatives._checks import DENSE_LIMIT
from curvscope.optim._closure import Counts, Evaluation
from curvscope.optim.base import (
    ModelStepOptimizer,
    Proposal,
    check_int,
    check_positive,
    model_decrease,
)
from curvscope.optim.subproblems import steihaug


class Newton(ModelStepOptimizer):
    """Newton's method with the dense Hessian (small n), safeguarded by Levenberg-Marquardt.

    Each step forms H from n Hessian-vector products and solves (H + μI) s = −g in H's
    eigenbasis. μ = 0 while the Hessian is positive definite and steps are trusted, so a convex
    quadratic is solved in one step; where H is indefinite μ > −λ_min (the step never goes
    uphill in the model), and μ grows on a step the model did not predict (ratio ρ < ¼) and
    shrinks on a good one (ρ > ¾), as in Levenberg (1944) and Marquardt (1963).

    ``damping=0`` is *pure* Newton: s = −H⁻¹g (pseudo-inverse where singular), always taken
    unless the loss there is not finite — it converges to saddles and maxima and can diverge,
    which is what the lab demonstrates.

    Args:
        params: the parameters (one group; at most ``DENSE_LIMIT`` = 5,000 entries).
        damping: the Levenberg-Marquardt shift first applied when needed, relative to the
            Hessian's scale max|λ|; 0 for pure Newton.
        tolerance_grad: no step (and no products) when ‖g‖ ≤ this (torch LBFGS's option).

    Example:
        >>> import torch, curvscope as cs
        >>> x = torch.tensor([3.0, -1.0], dtype=torch.float64, requires_grad=True)
        >>> opt = cs.optim.Newton([x])
        >>> _ = opt.step(lambda: (x[0] - 1) ** 2 + 10 * (x[1] + 2) ** 2)
        >>> x.detach()
        tensor([ 1., -2.], dtype=torch.float64)
    """

    def __init__(
        self, params: Iterable[Any], damping: float = 1e-3, tolerance_grad: float = 0.0
    ) -> None:
        check_positive("damping", damping, allow_zero=True)
        super().__init__(params, {"damping": damping}, tolerance_grad)
        n = sum(p.numel() for p in self._params())
        if n > DENSE_LIMIT:
            raise ValueError(
                f"Newton forms the dense {n}x{n} Hessian; above {DENSE_LIMIT:,} parameters use "
                "NewtonCG (matrix-free trust region) or HessianFree"
            )
        self._global().update(mu=0.0, scale=1.0)

    @property
    def pure(self) -> bool:
        return self.param_groups[0]["damping"] == 0

    def propose(self, ev: Evaluation, counts: Counts) -> Proposal:
        st = self._global()
        n = ev.n
        H = ev.hvp(torch.eye(n, dtype=ev.flat_grad.dtype, device=ev.flat_grad.device))
        counts.hessians += 1
        lam, V = torch.linalg.eigh((H + H.T) / 2)
        scale = max(float(lam.abs().max()), torch.finfo(lam.dtype).tiny)
        st["scale"] = scale
        w = V.T @ ev.flat_grad
        if self.pure:
            keep = lam.abs() > n * torch.finfo(lam.dtype).eps * scale
            inv = torch.where(keep, 1.0 / lam.where(keep, 1.0), torch.zeros_like(lam))
            s = -V @ (inv * w)
            note = "pure Newton step" + ("" if bool((lam > 0).all()) else " (indefinite Hessian)")
        else:
            mu = st["mu"]
            floor = self.param_groups[0]["damping"] * scale
            note = ""
            if float(lam.min()) <= 0:
                mu = max(mu, floor - float(lam.min()))
                note = "indefinite Hessian: shifted to positive definite"
            s = -V @ (w / (lam + mu))
            st["mu_used"] = mu
        return Proposal(s, model_decrease(ev.flat_grad, s, H @ s), note)

    def accepts(self, ratio: float, actual: float) -> bool:
        return True if self.pure else ratio > 1e-4

    def update(self, ratio: float, proposal: Proposal) -> None:
        if self.pure:
            return
        st = self._global()
        floor = self.param_groups[0]["damping"] * st["scale"]
        mu = st.pop("mu_used", st["mu"])
        if ratio < 0.25:
            st["mu"] = max(4 * mu, floor)
        elif ratio > 0.75:
            st["mu"] = mu / 3 if mu > 1e-9 * floor else 0.0
        else:
            st["mu"] = mu

    def search_state(self) -> dict[str, float | None]:
        return {"damping": self._global()["mu"]}


class NewtonCG(ModelStepOptimizer):
    """Trust-region Newton-CG (Steihaug-Toint): matrix-free Newton for any n.

    Each step minimizes the quadratic model gᵀs + ½sᵀHs inside ‖s‖ ≤ Δ by truncated CG with
    Hessian-vector products, following negative curvature to the boundary. The radius follows
    the ratio ρ of actual to predicted reduction (Nocedal & Wright, Alg. 4.1): ρ < ¼ shrinks
    it to Δ/4; ρ > ¾ with the step on the boundary doubles it (up to ``max_radius``); the step
    is kept when ρ > ``eta``. CG stops at relative residual min(½, √‖g‖) (superlinear
    convergence; Nocedal & Wright, Alg. 7.2). Defaults are scipy's ``trust-ncg``.

    Args:
        radius: initial trust radius Δ₀.
        max_radius: the largest radius.
        eta: acceptance threshold on ρ, in [0, ¼).
        max_cg: cap on CG iterations (= Hessian-vector products) per step.
        tolerance_grad: no step (and no products) when ‖g‖ ≤ this (torch LBFGS's option).

    Example:
        >>> import torch, curvscope as cs
        >>> p = cs.problems.get("rosenbrock")
        >>> x = p.x0.clone().requires_grad_()
        >>> opt = cs.optim.NewtonCG([x])
        >>> for _ in range(40):
        ...     _ = opt.step(lambda: p.f(x))
        >>> torch.allclose(x.detach(), torch.ones(2, dtype=torch.float64))
        True
    """

    def __init__(
        self,
        params: Iterable[Any],
        radius: float = 1.0,
        max_radius: float = 1000.0,
        eta: float = 0.15,
        max_cg: int = 250,
        tolerance_grad: float = 0.0,
    ) -> None:
        check_positive("radius", radius)
        check_positive("max_radius", max_radius)
        if radius > max_radius:
            raise ValueError(f"Invalid radius: {radius} exceeds max_radius={max_radius}")
        if not isinstance(eta, int | float) or not 0 <= eta < 0.25:
            raise ValueError(f"Invalid eta: {eta!r} (expected a number in [0, 0.25))")
        check_int("max_cg", max_cg)
        defaults = {"radius": radius, "max_radius": max_radius, "eta": eta, "max_cg": max_cg}
        super().__init__(params, defaults, tolerance_grad)
        self._global()["radius"] = float(radius)

    def propose(self, ev: Evaluation, counts: Counts) -> Proposal:
        group, radius = self.param_groups[0], self._global()["radius"]
        g = ev.flat_grad
        gnorm = float(g.norm())
        tol = min(0.5, math.sqrt(gnorm)) * gnorm
        t = steihaug(lambda v: ev.hvp(v[:, None])[:, 0], g, radius, tol, group["max_cg"])
        counts.cg_iterations += t.iterations
        return Proposal(t.step, model_decrease(g, t.step, t.Hs), t.note, t.boundary)

    def accepts(self, ratio: float, actual: float) -> bool:
        return ratio > self.param_groups[0]["eta"]

    def update(self, ratio: float, proposal: Proposal) -> None:
        st, group = self._global(), self.param_groups[0]
        if ratio < 0.25:
            st["radius"] *= 0.25
        elif ratio > 0.75 and proposal.boundary:
            st["radius"] = min(2 * st["radius"], group["max_radius"])

    def search_state(self) -> dict[str, float | None]:
        return {"radius": self._global()["radius"]}
