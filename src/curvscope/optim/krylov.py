"""Newton-type methods that work in a Lanczos Krylov subspace and so *use* negative curvature:
saddle-free Newton and cubic-regularized Newton."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from curvscope.optim._closure import Counts, Evaluation
from curvscope.optim.base import ModelStepOptimizer, Proposal, check_int, check_positive
from curvscope.optim.subproblems import cubic_in_eigenbasis, cubic_model, lanczos_subspace


class _KrylovMethod(ModelStepOptimizer):
    """Shared: the Krylov basis Q of span{g, Hg, …}, T = QᵀHQ = S diag(θ) Sᵀ, and w = SᵀQᵀg."""

    def _subspace(self, ev: Evaluation, counts: Counts) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dim = self.param_groups[0]["krylov_dim"]
        # the seed only matters if the Krylov space closes early (then a random direction
        # continues it): a fresh, reproducible one per step
        Q, T = lanczos_subspace(ev.hvp, ev.flat_grad, dim, seed=counts.gradients)
        counts.lanczos_iterations += Q.shape[1]
        theta, S = torch.linalg.eigh(T)
        w = S.T @ (Q.T @ ev.flat_grad)
        return Q @ S, theta, w, T

    @staticmethod
    def _negative_note(theta: Tensor) -> str:
        lo = float(theta.min())
        return f"negative curvature used (λ_min ≈ {lo:.3g})" if lo < 0 else ""


class SaddleFreeNewton(_KrylovMethod):
    """Saddle-free Newton (Dauphin et al. 2014): the Newton step with |H| in place of H.

    In a k-dimensional Lanczos subspace (T = QᵀHQ = S Θ Sᵀ), the step is
    s = −Q S (|Θ| + μI)⁻¹ Sᵀ Qᵀ g: along a direction of negative curvature it moves *downhill*
    (Newton moves uphill there, towards the saddle), by as much as the curvature's magnitude
    says. The damping μ (relative to max|θ|) follows the ratio of actual to predicted reduction
    of the quadratic model: ×4 when ρ < ¼, ÷3 when ρ > ¾; a step that does not reduce the loss
    is not taken.

    Args:
        krylov_dim: subspace dimension k (products per step).
        damping: initial μ, relative to the largest |θ|.
        tolerance_grad: no step (and no products) when ‖g‖ ≤ this (torch LBFGS's option).
    """

    def __init__(
        self,
        params: Iterable[Any],
        krylov_dim: int = 20,
        damping: float = 1e-3,
        tolerance_grad: float = 0.0,
    ) -> None:
        check_int("krylov_dim", krylov_dim)
        check_positive("damping", damping)
        super().__init__(params, {"krylov_dim": krylov_dim, "damping": damping}, tolerance_grad)
        self._global()["mu"] = float(damping)

    def propose(self, ev: Evaluation, counts: Counts) -> Proposal:
        QS, theta, w, _ = self._subspace(ev, counts)
        scale = max(float(theta.abs().max()), torch.finfo(theta.dtype).tiny)
        u = -w / (theta.abs() + self._global()["mu"] * scale)
        pred = -float(w @ u + 0.5 * (theta * u * u).sum())
        return Proposal(QS @ u, pred, self._negative_note(theta))

    def update(self, ratio: float, proposal: Proposal) -> None:
        st = self._global()
        if ratio < 0.25:
            st["mu"] *= 4
        elif ratio > 0.75:
            st["mu"] = max(st["mu"] / 3, 1e-12)

    def search_state(self) -> dict[str, float | None]:
        return {"damping": self._global()["mu"]}


class CubicNewton(_KrylovMethod):
    """Cubic-regularized Newton with adaptive σ (ARC; Nesterov & Polyak 2006, Cartis, Gould &
    Toint 2011).

    Each step minimizes m(s) = gᵀs + ½sᵀHs + σ/3‖s‖³ over a k-dimensional Lanczos subspace,
    exactly (secular equation in T's eigenbasis): the cubic term bounds the step where the
    quadratic model is not to be trusted, and negative curvature is followed, not avoided, so
    the method escapes saddles. σ adapts from ρ = actual / predicted reduction: the step is kept
    when ρ ≥ 0.1, σ halves when ρ ≥ 0.9 and doubles when ρ < 0.1.

    Args:
        sigma: initial σ.
        krylov_dim: subspace dimension k (products per step).
        min_sigma: the smallest σ.
        tolerance_grad: no step (and no products) when ‖g‖ ≤ this (torch LBFGS's option).
    """

    def __init__(
        self,
        params: Iterable[Any],
        sigma: float = 1.0,
        krylov_dim: int = 20,
        min_sigma: float = 1e-8,
        tolerance_grad: float = 0.0,
    ) -> None:
        check_positive("sigma", sigma)
        check_int("krylov_dim", krylov_dim)
        check_positive("min_sigma", min_sigma)
        defaults = {"sigma": sigma, "krylov_dim": krylov_dim, "min_sigma": min_sigma}
        super().__init__(params, defaults, tolerance_grad)
        self._global()["sigma"] = float(sigma)

    def propose(self, ev: Evaluation, counts: Counts) -> Proposal:
        QS, theta, w, _ = self._subspace(ev, counts)
        sigma = self._global()["sigma"]
        u, _ = cubic_in_eigenbasis(theta, w, sigma)
        u = u.to(w)
        return Proposal(QS @ u, -cubic_model(theta, w, u, sigma), self._negative_note(theta))

    def accepts(self, ratio: float, actual: float) -> bool:
        return ratio >= 0.1

    def update(self, ratio: float, proposal: Proposal) -> None:
        st, group = self._global(), self.param_groups[0]
        if ratio >= 0.9:
            st["sigma"] = max(st["sigma"] / 2, group["min_sigma"])
        elif ratio < 0.1:
            st["sigma"] *= 2

    def search_state(self) -> dict[str, float | None]:
        return {"sigma": self._global()["sigma"]}
