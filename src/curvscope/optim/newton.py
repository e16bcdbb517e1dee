"""Newton's method, dense and safeguarded, and trust-region Newton-CG (matrix-free): each a
descent paired with a search (:mod:`curvscope.optim.model_step`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from curvscope.derivatives import DENSE_LIMIT
from curvscope.optim.base import check_int, check_positive
from curvscope.optim.descents import DenseNewton, SteihaugCG
from curvscope.optim.model_step import Descent, ModelStepOptimizer, Search
from curvscope.optim.searches import LevenbergMarquardt, TrustRadius, Unsafeguarded

#: Newton: dense Newton with Levenberg-Marquardt damping, μ₀ = 0 (undamped while H is positive
#: definite and the steps are trusted), kept when ρ > 1e-4
DAMPED_NEWTON = (DenseNewton(), LevenbergMarquardt(initial=0.0, minimum=0.0, accept=1e-4))
#: pure Newton (damping=0): the pseudo-inverse step, every finite one kept
PURE_NEWTON = (DenseNewton(pure=True), Unsafeguarded())


class Newton(ModelStepOptimizer):
    """Newton's method with the dense Hessian (small n), safeguarded by Levenberg-Marquardt —
    the :class:`~curvscope.optim.descents.DenseNewton` descent sized by a
    :class:`~curvscope.optim.searches.LevenbergMarquardt` search (pure: by none).

    Each step forms H from n Hessian-vector products and solves (H + μI) s = −g in H's
    eigenbasis. μ = 0 while the Hessian is positive definite and steps are trusted, so a convex
    quadratic is solved in one step; where H is indefinite μ > −λ_min (the step never goes
    uphill in the model), and μ grows on a step the model did not predict (ratio ρ < ¼) and
    shrinks on a good one (ρ > ¾), as in Levenberg (1944) and Marquardt (1963): ÷3, and to
    μ²/λ_min once below λ_min/3, so that the convergence near a minimum is quadratic again
    after a rejected step.

    ``damping=0`` is *pure* Newton: s = −H⁻¹g (pseudo-inverse where singular), always taken
    unless the loss there is not finite — it converges to saddles and maxima and can diverge,
    which is what the lab demonstrates.

    Args:
        params: the parameters (one group; at most ``DENSE_LIMIT`` = 5,000 entries).
        damping: the Levenberg-Marquardt shift first applied when needed, relative to the
            Hessian's scale max|λ|; 0 for pure Newton.
        tolerance_grad: no step (and no products) when ‖g‖ ≤ this (torch LBFGS's option).
        group: the process group to average over (default: the initialized one; ``False``:
            this process alone): :class:`~curvscope.optim.base.CurvscopeOptimizer`.

    Example:
        >>> import torch, curvscope as cs
        >>> x = torch.tensor([3.0, -1.0], dtype=torch.float64, requires_grad=True)
        >>> opt = cs.optim.Newton([x])
        >>> _ = opt.step(lambda: (x[0] - 1) ** 2 + 10 * (x[1] + 2) ** 2)
        >>> x.detach()
        tensor([ 1., -2.], dtype=torch.float64)
    """

    def __init__(
        self,
        params: Iterable[Any],
        damping: float = 1e-3,
        tolerance_grad: float = 0.0,
        *,
        group: Any = None,
    ) -> None:
        super().__init__(params, {"damping": damping}, tolerance_grad, group=group)
        self._check_size()

    def _check_group(self, group: Mapping[str, Any]) -> None:
        super()._check_group(group)
        check_positive("damping", group["damping"], allow_zero=True)

    def _check_size(self) -> None:
        """Refuse more than ``DENSE_LIMIT`` trainable entries — at construction and at every
        step: a layer unfrozen later asked for a 10,201 x 10,201 Hessian (an outside review)."""
        n = sum(p.numel() for p in self._params())
        if n > DENSE_LIMIT:
            raise ValueError(
                f"Newton forms the dense {n}x{n} Hessian; above {DENSE_LIMIT:,} parameters use "
                "NewtonCG (matrix-free trust region) or HessianFree"
            )

    def _step(self, closure: Any, snapshot: Any) -> Tensor:
        self._check_size()
        return super()._step(closure, snapshot)

    @property
    def pure(self) -> bool:
        return bool(self.param_groups[0]["damping"] == 0)

    @property
    def descent(self) -> Descent:
        return (PURE_NEWTON if self.pure else DAMPED_NEWTON)[0]

    @property
    def search(self) -> Search:
        return (PURE_NEWTON if self.pure else DAMPED_NEWTON)[1]


class NewtonCG(ModelStepOptimizer):
    """Trust-region Newton-CG (Steihaug-Toint): matrix-free Newton for any n — the
    :class:`~curvscope.optim.descents.SteihaugCG` descent sized by a
    :class:`~curvscope.optim.searches.TrustRadius`.

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
        group: the process group to average over (default: the initialized one; ``False``:
            this process alone): :class:`~curvscope.optim.base.CurvscopeOptimizer`.

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

    descent = SteihaugCG()
    search = TrustRadius()

    def __init__(
        self,
        params: Iterable[Any],
        radius: float = 1.0,
        max_radius: float = 1000.0,
        eta: float = 0.15,
        max_cg: int = 250,
        tolerance_grad: float = 0.0,
        *,
        group: Any = None,
    ) -> None:
        defaults = {"radius": radius, "max_radius": max_radius, "eta": eta, "max_cg": max_cg}
        super().__init__(params, defaults, tolerance_grad, group=group)  # each value checked
        if radius > max_radius:  # the keywords (an edit between steps is bounded instead)
            raise ValueError(f"Invalid radius: {radius} exceeds max_radius={max_radius}")

    def _check_group(self, group: Mapping[str, Any]) -> None:
        super()._check_group(group)
        radius, max_radius, eta = group["radius"], group["max_radius"], group["eta"]
        check_positive("radius", radius)
        check_positive("max_radius", max_radius)
        if isinstance(eta, bool) or not isinstance(eta, int | float) or not 0 <= eta < 0.25:
            raise ValueError(f"Invalid eta: {eta!r} (expected a number in [0, 0.25))")
        check_int("max_cg", group["max_cg"])
