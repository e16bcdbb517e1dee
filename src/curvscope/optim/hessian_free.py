"""Hessian-free optimization (Martens 2010): damped Gauss-Newton steps by truncated CG."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from curvscope.optim.base import check_int, check_positive, check_unit
from curvscope.optim.descents import BACKTRACK_SPACING, GaussNewtonCG
from curvscope.optim.model_step import ModelStepOptimizer
from curvscope.optim.searches import MartensDamping

CURVATURES = ("auto", "ggn", "hessian")
__all__ = ["BACKTRACK_SPACING", "CURVATURES", "HessianFree"]


class HessianFree(ModelStepOptimizer):
    """Hessian-free optimization: CG on the damped Gauss-Newton system (G + λI) s = −g — the
    :class:`~curvscope.optim.descents.GaussNewtonCG` descent sized by
    :class:`~curvscope.optim.searches.MartensDamping`.

    Martens (2010), "Deep learning via Hessian-free optimization":

    - curvature: the Gauss-Newton matrix G = JᵀH_out J (positive semi-definite) when the closure
      returns ``(loss, outputs)``; the Hessian otherwise (``curvature="auto"``), or as asked.
      G holds the curvature of the loss's path through the outputs only, so a loss that also
      reads the parameters otherwise — an L2 penalty on them, where Martens counts the
      weight cost's λI in the curvature — is refused with G: use ``curvature="hessian"``;
    - CG is warm-started from ``decay`` × the previous solution and stopped by the relative
      progress of the quadratic (§4.4), at most ``max_cg`` products. Unlike §4.7's, it is not
      preconditioned: the condition number of G + λI is bounded by the damping alone,
      κ ≤ (λ_max(G) + λ)/λ (§4.7's [diag(Σᵢ gᵢ²) + λI]^0.75 needs per-example gradients gᵢ,
      and a closure returns the batch's loss);
    - CG backtracking: of the iterates kept at iterations ⌈1.3ʲ⌉, the one with the lowest loss
      found walking back from the last is taken (past any whose loss is not finite);
    - Levenberg-Marquardt damping from the reduction ratio ρ: λ ← 3/2·λ if ρ < ¼, 2/3·λ if ρ > ¾;
      a step that does not reduce the loss is not taken;
    - the curvature may come from a mini-batch: ``step(closure, curvature_closure=...)``.

    Args:
        damping: initial λ.
        max_cg: cap on CG iterations (products) per step.
        decay: warm-start factor ζ for the previous CG solution.
        progress_tol: Martens' ε for the CG stopping rule.
        curvature: ``"auto"``, ``"ggn"`` or ``"hessian"``.
        tolerance_grad: no step (and no products) when ‖g‖ ≤ this (torch LBFGS's option).
        group: the process group to average over (default: the initialized one; ``False``:
            this process alone): :class:`~curvscope.optim.base.CurvscopeOptimizer`.

    Raises:
        ValueError: at a step with the Gauss-Newton curvature, where the closure's loss (or
            the curvature closure's) reads a parameter other than through the outputs it
            returned; the step is undone.
    """

    descent = GaussNewtonCG()
    search = MartensDamping()

    def __init__(
        self,
        params: Iterable[Any],
        damping: float = 1.0,
        max_cg: int = 50,
        decay: float = 0.95,
        progress_tol: float = 5e-4,
        curvature: str = "auto",
        tolerance_grad: float = 0.0,
        *,
        group: Any = None,
    ) -> None:
        defaults = dict(
            damping=damping,
            max_cg=max_cg,
            decay=decay,
            progress_tol=progress_tol,
            curvature=curvature,
        )
        super().__init__(params, defaults, tolerance_grad, group=group)

    def _check_group(self, group: Mapping[str, Any]) -> None:
        super()._check_group(group)
        check_positive("damping", group["damping"])
        check_int("max_cg", group["max_cg"])
        check_unit("decay", group["decay"])
        check_positive("progress_tol", group["progress_tol"])
        if group["curvature"] not in CURVATURES:
            raise ValueError(
                f"Invalid curvature: {group['curvature']!r} (expected one of {CURVATURES})"
            )

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Any = None, curvature_closure: Callable[[], Any] | None = None
    ) -> Tensor | None:
        """One Hessian-free step; ``curvature_closure`` (optional) evaluates the loss on the
        mini-batch the curvature products should use."""
        self._curvature_closure = curvature_closure
        try:
            return super().step(closure)
        finally:
            self._curvature_closure = None
