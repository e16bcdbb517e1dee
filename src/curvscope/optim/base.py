"""What the curvature-using optimizers share: the closure contract, the cost counts, the
per-step report, hyperparameter checks, and the safeguard that a step making the loss
non-finite is never written into the parameters.

A second-order step is a *descent* (a proposed step s and the decrease its model predicts)
paired with a *search* rule (trust radius, damping or cubic weight, updated from the ratio
ρ = actual / predicted reduction). :class:`ModelStepOptimizer` runs that loop once per
``step()``; each method supplies ``propose`` and ``update``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvscope.optim._closure import (
    Closure,
    Counts,
    Evaluation,
    check_closure,
    flat_params,
    loss_only,
    write_flat,
)


@dataclass(frozen=True)
class StepInfo:
    """What one ``step()`` did.

    Attributes:
        loss: the loss at the start of the step.
        grad_norm: ‖g‖ there.
        step_norm: ‖s‖ of the step taken (0 when rejected).
        predicted: the decrease the local model predicted, m(0) − m(s) (None for first-order).
        actual: f(θ) − f(θ + s), measured (None when not measured; −inf for a non-finite loss).
        ratio: actual / predicted (the trust test).
        accepted: whether the step was written into the parameters.
        radius, damping, sigma: the trust radius / damping / cubic weight after the update.
        products: curvature products this step; cost: the totals so far (see :class:`Counts`).
        note: what happened, in words (e.g. "negative curvature: went to the boundary").
    """

    loss: float
    grad_norm: float
    step_norm: float
    predicted: float | None
    actual: float | None
    ratio: float | None
    accepted: bool
    products: int
    note: str = ""
    radius: float | None = None
    damping: float | None = None
    sigma: float | None = None


@dataclass(frozen=True)
class Proposal:
    """A step s and the decrease m(0) − m(s) its model predicts (positive)."""

    step: Tensor
    predicted: float
    note: str = ""
    boundary: bool = False
    #: the loss at θ + s when the method already measured it (Hessian-free's backtracking)
    loss_at_step: float | None = None


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number {bound})")
    return float(value)


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= {minimum})")
    return value


def check_unit(name: str, value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not 0 <= value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected a number in [0, 1))")
    return float(value)


def check_betas(betas: Any) -> tuple[float, float]:
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    return check_unit("beta1", betas[0]), check_unit("beta2", betas[1])


class CurvscopeOptimizer(Optimizer):
    """Base: keeps :class:`Counts` in ``state["counts"]`` (so ``state_dict`` carries them) and the
    last :class:`StepInfo` in ``info``."""

    #: Whether the method treats all parameters as one vector (Newton-type) and so needs a single
    #: parameter group, like ``torch.optim.LBFGS``.
    single_group: bool = False

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        name = type(self).__name__
        if self.single_group and len(self.param_groups) != 1:
            raise ValueError(
                f"{name} treats all parameters as one vector and takes one parameter group, got "
                f"{len(self.param_groups)}; pass model.parameters() (per-group options are not "
                "supported by second-order methods)"
            )
        for group in self.param_groups:
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError(f"{name} supports real parameters only, got {p.dtype}")
        self.state["counts"] = Counts().as_dict()
        self.info: StepInfo | None = None

    @property
    def counts(self) -> Counts:
        """The work done so far: closure calls, gradients, products, dense Hessians, CG and
        Lanczos iterations — each counted separately."""
        return Counts(**self.state["counts"])

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _global(self) -> dict[str, Any]:
        """Method state that belongs to the whole vector (radius, damping, previous step)."""
        return self.state.setdefault("global", {})

    def _begin(self, closure: Any) -> tuple[Closure, Counts]:
        return check_closure(closure, type(self).__name__), self.counts

    def _end(self, counts: Counts, info: StepInfo) -> None:
        self.state["counts"] = counts.as_dict()
        self.info = info


class ModelStepOptimizer(CurvscopeOptimizer):
    """One step: evaluate, propose s from a local model, measure the loss at θ + s, keep or undo
    the step by the ratio test, update the search parameter. Non-finite trial losses are undone
    whatever the method."""

    single_group = True
    _trial: Any = None

    def __init__(
        self, params: Iterable[Any], defaults: dict[str, Any], tolerance_grad: float = 0.0
    ) -> None:
        check_positive("tolerance_grad", tolerance_grad, allow_zero=True)
        super().__init__(params, {**defaults, "tolerance_grad": tolerance_grad})

    def propose(self, ev: Evaluation, counts: Counts) -> Proposal:
        """The step and its predicted decrease; ``self.trial(s)`` measures f(θ + s) if needed."""
        raise NotImplementedError

    def trial(self, s: Tensor) -> float:
        """The loss at θ + s (θ the point of this step); the parameters are left at θ + s."""
        assert self._trial is not None, "trial() is only available inside propose()"
        return self._trial(s)

    def update(self, ratio: float, proposal: Proposal) -> None:
        """Adapt the search parameter from the ratio (also called for rejected steps)."""

    def accepts(self, ratio: float, actual: float) -> bool:
        """Keep the step? By default when it reduced the loss; trust-region methods ask more."""
        return actual > 0

    def search_state(self) -> dict[str, float | None]:
        return {}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor:  # type: ignore[override]
        closure, counts = self._begin(closure)
        params = self._params()
        products_before = counts.products
        ev = Evaluation(params, closure, counts)
        gnorm = float(ev.flat_grad.norm())
        if gnorm <= self.param_groups[0]["tolerance_grad"]:
            note = f"converged: ‖g‖ = {gnorm:.3g} <= tolerance_grad, no step"
            info = StepInfo(
                ev.loss, 0.0, 0.0, 0.0, 0.0, None, False, 0, note, **self.search_state()
            )
            self._end(counts, info)
            return ev.loss_tensor.detach()
        x0 = flat_params(params)

        def trial(s: Tensor) -> float:
            write_flat(params, x0 + s)
            return loss_only(closure, params, counts)

        self._trial = trial
        try:
            proposal = self.propose(ev, counts)
        finally:
            self._trial = None
        f0, loss_out = ev.loss, ev.loss_tensor.detach()
        del ev  # free the graph before the trial forward pass
        s = proposal.step
        f_new = proposal.loss_at_step
        if f_new is None:
            f_new = trial(s)
        elif not math.isfinite(f_new):
            f_new = math.inf
        actual = f0 - f_new if math.isfinite(f_new) else -math.inf
        pred = proposal.predicted
        ratio = actual / pred if pred > 0 else (math.inf if actual > 0 else -math.inf)
        accepted = math.isfinite(actual) and self.accepts(ratio, actual)
        note = proposal.note
        if not accepted:
            write_flat(params, x0)
        elif proposal.loss_at_step is not None:  # the method's own trials may have moved on
            write_flat(params, x0 + s)
        if not accepted:
            if not math.isfinite(f_new):
                note = (note + "; " if note else "") + "rejected: the loss there is not finite"
            else:
                note = (note + "; " if note else "") + "rejected by the ratio test"
        self.update(ratio, proposal)
        info = StepInfo(
            f0,
            gnorm,
            float(s.norm()) if accepted else 0.0,
            pred,
            actual,
            ratio,
            accepted,
            counts.products - products_before,
            note,
            **self.search_state(),
        )
        self._end(counts, info)
        return loss_out


def model_decrease(g: Tensor, s: Tensor, Hs: Tensor) -> float:
    """m(0) − m(s) for m(s) = gᵀs + ½ sᵀHs."""
    return -float(g @ s + 0.5 * (s @ Hs))
