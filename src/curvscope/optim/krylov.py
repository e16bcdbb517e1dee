"""Newton-type methods that work in a Lanczos Krylov subspace and so *use* negative curvature:
saddle-free Newton and cubic-regularized Newton, each a descent paired with a search
(:mod:`curvscope.optim.model_step`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from curvscope.optim.base import check_int, check_positive
from curvscope.optim.descents import LanczosCubic, LanczosSaddleFree
from curvscope.optim.model_step import ModelStepOptimizer
from curvscope.optim.searches import AdaptiveCubic, LevenbergMarquardt


class SaddleFreeNewton(ModelStepOptimizer):
    """Saddle-free Newton (Dauphin et al. 2014): the Newton step with |H| in place of H — the
    :class:`~curvscope.optim.descents.LanczosSaddleFree` descent sized by a
    :class:`~curvscope.optim.searches.LevenbergMarquardt` search.

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
        group: the process group to average over (default: the initialized one; ``False``:
            this process alone): :class:`~curvscope.optim.base.CurvscopeOptimizer`.
    """

    descent = LanczosSaddleFree()
    search = LevenbergMarquardt()

    def __init__(
        self,
        params: Iterable[Any],
        krylov_dim: int = 20,
        damping: float = 1e-3,
        tolerance_grad: float = 0.0,
        *,
        group: Any = None,
    ) -> None:
        defaults = {"krylov_dim": krylov_dim, "damping": damping}
        super().__init__(params, defaults, tolerance_grad, group=group)

    def _check_group(self, group: Mapping[str, Any]) -> None:
        super()._check_group(group)
        check_int("krylov_dim", group["krylov_dim"])
        check_positive("damping", group["damping"])


class CubicNewton(ModelStepOptimizer):
    """Cubic-regularized Newton with adaptive σ (ARC; Nesterov & Polyak 2006, Cartis, Gould &
    Toint 2011) — the :class:`~curvscope.optim.descents.LanczosCubic` descent sized by an
    :class:`~curvscope.optim.searches.AdaptiveCubic` search.

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
        group: the process group to average over (default: the initialized one; ``False``:
            this process alone): :class:`~curvscope.optim.base.CurvscopeOptimizer`.
    """

    descent = LanczosCubic()
    search = AdaptiveCubic()

    def __init__(
        self,
        params: Iterable[Any],
        sigma: float = 1.0,
        krylov_dim: int = 20,
        min_sigma: float = 1e-8,
        tolerance_grad: float = 0.0,
        *,
        group: Any = None,
    ) -> None:
        defaults = {"sigma": sigma, "krylov_dim": krylov_dim, "min_sigma": min_sigma}
        super().__init__(params, defaults, tolerance_grad, group=group)  # each value checked
        if sigma < min_sigma:  # the keywords (an edit between steps is bounded instead)
            raise ValueError(f"Invalid sigma: {sigma} is below min_sigma={min_sigma}")

    def _check_group(self, group: Mapping[str, Any]) -> None:
        super()._check_group(group)
        sigma, min_sigma = group["sigma"], group["min_sigma"]
        check_positive("sigma", sigma)
        check_int("krylov_dim", group["krylov_dim"])
        check_positive("min_sigma", min_sigma)
