"""Hessian-free optimization (Martens 2010): damped Gauss-Newton steps by truncated CG."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from curvscope.optim._closure import Counts, Evaluation
from curvscope.optim.base import (
    ModelStepOptimizer,
    Proposal,
    check_int,
    check_positive,
    check_unit,
)
from curvscope.spectrum._operator import Operator
from curvscope.spectrum.cg import cg

CURVATURES = ("auto", "ggn", "hessian")
#: Martens keeps the CG iterates at iterations ⌈γʲ⌉ for backtracking, γ = 1.3.
BACKTRACK_SPACING = 1.3
_KEPT = frozenset(math.ceil(BACKTRACK_SPACING**j) for j in range(80))


class HessianFree(ModelStepOptimizer):
    """Hessian-free optimization: CG on the damped Gauss-Newton system (G + λI) s = −g.

    Martens (2010), "Deep learning via Hessian-free optimization":

    - curvature: the Gauss-Newton matrix G = JᵀH_out J (positive semi-definite) when the closure
      returns ``(loss, outputs)``; the Hessian otherwise (``curvature="auto"``), or as asked;
    - CG is warm-started from ``decay`` × the previous solution and stopped by the relative
      progress of the quadratic (§4.4), at most ``max_cg`` products;
    - CG backtracking: of the iterates kept at iterations ⌈1.3ʲ⌉, the one with the lowest loss
      found walking back from the last is taken;
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
    """

    def __init__(
        self,
        params: Iterable[Any],
        damping: float = 1.0,
        max_cg: int = 50,
        decay: float = 0.95,
        progress_tol: float = 5e-4,
        curvature: str = "auto",
        tolerance_grad: float = 0.0,
    ) -> None:
        check_positive("damping", damping)
        check_int("max_cg", max_cg)
        check_unit("decay", decay)
        check_positive("progress_tol", progress_tol)
        if curvature not in CURVATURES:
            raise ValueError(f"Invalid curvature: {curvature!r} (expected one of {CURVATURES})")
        defaults = dict(
            damping=damping,
            max_cg=max_cg,
            decay=decay,
            progress_tol=progress_tol,
            curvature=curvature,
        )
        super().__init__(params, defaults, tolerance_grad)
        self._global()["damping"] = float(damping)
        self._curvature_closure: Callable[[], Any] | None = None
        self._trial: Callable[[Tensor], float] | None = None

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Any = None, curvature_closure: Callable[[], Any] | None = None
    ) -> Tensor:
        """One Hessian-free step; ``curvature_closure`` (optional) evaluates the loss on the
        mini-batch the curvature products should use."""
        self._curvature_closure = curvature_closure
        try:
            return super().step(closure)
        finally:
            self._curvature_closure = None

    def _product(self, ev: Evaluation) -> Callable[[Tensor], Tensor]:
        mode = self.param_groups[0]["curvature"]
        if mode == "auto":
            mode = "ggn" if ev.outputs is not None else "hessian"
        return ev.ggn if mode == "ggn" else ev.hvp

    def propose(self, ev: Evaluation, counts: Counts) -> Proposal:
        group, st = self.param_groups[0], self._global()
        cev = ev
        if self._curvature_closure is not None:
            cev = Evaluation(ev.params, self._curvature_closure, counts)
        g, lam = ev.flat_grad, st["damping"]
        op = Operator(self._product(cev), ev.n, g.dtype, g.device)
        prev = st.get("previous")
        res = cg(
            op,
            -g,
            tol=1e-10,
            max_matvecs=group["max_cg"],
            damping=lam,
            x0=None if prev is None else group["decay"] * prev.to(g),
            progress_tol=group["progress_tol"],
            save=_KEPT.__contains__,
        )
        counts.cg_iterations += res.iterations
        st["previous"] = res.x
        note = ""
        if res.negative_curvature:
            # only with the Hessian: raise λ past the curvature CG met, pᵀHp/‖p‖² = that − λ
            assert res.direction_curvature is not None
            st["negative"] = lam - res.direction_curvature
            note = "negative curvature: damping raised"
        # walk back through the saved iterates while the loss keeps improving
        best: tuple[float, Tensor, Tensor] | None = None
        for _, x, r in reversed(res.saved):
            if not bool(x.any()):
                continue
            f = self.trial(x)
            if best is not None and not f < best[0]:
                break
            best = (f, x, r)
        if best is None:
            return Proposal(torch.zeros_like(g), 0.0, note or "CG made no progress")
        f, x, r = best
        # (G + λI) x = −g − r  ⇒  xᵀGx = xᵀ(−g − r) − λ‖x‖²
        xGx = float(x @ (-g - r)) - lam * float(x @ x)
        pred = -(float(g.to(x) @ x) + 0.5 * xGx)  # x: CG's working dtype (float32 for bf16)
        return Proposal(x, pred, note, loss_at_step=f)

    def update(self, ratio: float, proposal: Proposal) -> None:
        st = self._global()
        lam = st["damping"]
        if ratio < 0.25:
            lam *= 1.5
        elif ratio > 0.75:
            lam *= 2 / 3
        st["damping"] = max(lam, 1.5 * st.pop("negative", 0.0), 1e-12)

    def search_state(self) -> dict[str, float | None]:
        return {"damping": self._global()["damping"]}
