"""What the curvature-using optimizers share: the closure contract, the cost counts, the
per-step report, hyperparameter checks, the safeguard that a step making the loss
non-finite is never written into the parameters, and the step as a transaction.

**A step is a transaction.** :meth:`CurvscopeOptimizer.step` snapshots the parameters' values
(one copy) and the optimizer's state (its containers; the tensors in it are replaced by a step,
never changed in place, so they are kept by reference) before calling the method's ``_step``. If
anything raises inside — the closure at a trial point, a curvature product inside CG or
Lanczos, a refused non-finite update, a ``KeyboardInterrupt`` — parameters, state, counts and
``info`` are put back bit for bit before the exception propagates, so a retry repeats exactly
the step that never happened.

A second-order step is a *descent* (a proposed step s and the decrease its model predicts)
paired with a *search* rule (trust radius, damping or cubic weight, updated from the ratio
ρ = actual / predicted reduction). :class:`ModelStepOptimizer` runs that loop once per
``step()``; each method supplies ``propose`` and ``update``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
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


#: (parameter, its new value, its new per-parameter state or None): one entry of a commit
Update = tuple[Tensor, Tensor, dict[str, Tensor] | None]


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
        #: the type that keeps this state: ``load_state_dict`` refuses another optimizer's
        self.state["optimizer"] = name
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

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:  # type: ignore[override]
        """One step, as a transaction: if anything raises inside (the closure at any of its
        evaluations, a curvature product, a refused non-finite update), the parameters, the
        state (counts included) and ``info`` are restored bit for bit to what they were at the
        start of the step, then the exception propagates. Returns the loss at the start."""
        snapshot = Snapshot(self)
        try:
            return self._step(closure, snapshot)
        except BaseException as error:
            snapshot.restore(self, error)
            raise

    def _step(self, closure: Any, snapshot: Snapshot) -> Tensor | None:
        """The method's step; ``snapshot.flat()`` holds θ at its start (do not modify it)."""
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, refusing a state dict this optimizer could
        not continue from: one saved by another optimizer type, for other parameter groups, or
        for parameters of other shapes (checked before anything is loaded)."""
        check_loadable(self, state_dict)
        super().load_state_dict(state_dict)
        self.state["optimizer"] = type(self).__name__

    def _commit(self, updates: list[Update]) -> None:
        """Write each (parameter, its new value, its new state or None) — after checking that
        every value is finite: one check for all, before anything is written, so a refused step
        writes nothing (not even to the parameters that came first)."""
        tensors = [t for _, new, st in updates for t in (new, *(st or {}).values())]
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            raise FloatingPointError(self._non_finite_message(updates))
        for p, new, st in updates:
            if st is not None:
                self.state[p] = st
            p.copy_(new)

    def _non_finite_message(self, updates: list[Update]) -> str:
        name = type(self).__name__
        for i, (p, new, st) in enumerate(updates):
            bad = [k for k, t in (st or {}).items() if not bool(torch.isfinite(t).all())]
            where = f"parameter {i} (shape {tuple(p.shape)}, {p.dtype})"
            if bad:
                return (
                    f"{name} refused the step: its state {', '.join(map(repr, bad))} for {where} "
                    f"would not be finite — the gradient or the curvature estimate overflows "
                    f"{p.dtype}; use float64 or scale the loss down. Nothing was written: the "
                    "parameters and the state are as before the step"
                )
            if not bool(torch.isfinite(new).all()):
                n_bad = int((~torch.isfinite(new)).sum())
                group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
                lr = group.get("lr")
                return (
                    f"{name} refused the step: the update would write {n_bad} non-finite "
                    f"entries into {where} — the step overflows {p.dtype} (lr = {lr!r}); lower "
                    "the learning rate or use float64. Nothing was written: the parameters and "
                    "the state are as before the step"
                )
        return f"{name} refused the step: a non-finite value"  # pragma: no cover

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

    def _step(self, closure: Any, snapshot: Snapshot) -> Tensor:
        closure, counts = self._begin(closure)
        params = snapshot.params
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
        x0 = snapshot.flat()  # θ at the start: the transaction's copy, not a second one

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


class Snapshot:
    """The parameters' values and the optimizer's state at the start of a step.

    The parameters are copied once: as one flat vector when they share a dtype and a device
    (the model-step methods use it as θ₀), else one copy each. The state's containers (dicts,
    lists) are copied; the tensors in them are kept by reference, which is exact because a step
    never changes a state tensor in place (it binds a new one): their version counters are
    recorded, and a restore that finds one changed says so instead of restoring wrongly.
    """

    def __init__(self, opt: CurvscopeOptimizer) -> None:
        self.params = opt._params()
        kinds = {(p.dtype, p.device) for p in self.params}
        self._flat = flat_params(self.params) if len(kinds) == 1 else None
        self._copies = None if self._flat is not None else [p.clone() for p in self.params]
        self._state = {k: _copy_containers(v) for k, v in opt.state.items()}
        self._versions = [(t, t._version) for t in _tensors(self._state)]
        self._info = opt.info

    def flat(self) -> Tensor:
        """θ at the start of the step, flat (a promoted copy when the dtypes differ)."""
        if self._flat is not None:
            return self._flat
        assert self._copies is not None
        return flat_params(self._copies)

    def restore(self, opt: CurvscopeOptimizer, error: BaseException | None = None) -> None:
        if self._flat is not None:
            write_flat(self.params, self._flat)
        else:
            assert self._copies is not None
            for p, c in zip(self.params, self._copies, strict=True):
                p.copy_(c)
        opt.state.clear()
        opt.state.update(self._state)
        opt.info = self._info
        if any(t._version != v for t, v in self._versions):
            raise RuntimeError(
                f"{type(opt).__name__} changed a state tensor in place during the failed step, "
                "so its state could not be restored (a bug in curvscope: please report it)"
            ) from error


def _copy_containers(obj: Any) -> Any:
    """A copy of the dicts, lists and tuples in ``obj``; their leaves (tensors, numbers) shared."""
    if isinstance(obj, dict):
        return {k: _copy_containers(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_copy_containers(v) for v in obj)
    return obj


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)


def check_loadable(opt: CurvscopeOptimizer, state_dict: Any) -> None:
    """Refuse, before loading, a state dict ``opt`` could not continue from (with the reason
    and the remedy): another optimizer type's, other parameter groups', other shapes'."""
    name = type(opt).__name__
    if not (isinstance(state_dict, dict) and {"state", "param_groups"} <= set(state_dict)):
        raise TypeError(
            f"{name}.load_state_dict expected what {name}.state_dict() returns (a dict with "
            f"'state' and 'param_groups'), got {type(state_dict).__name__}"
        )
    state, groups = state_dict["state"], state_dict["param_groups"]
    saved = state.get("optimizer")
    ours = [c.__name__ for c in type(opt).__mro__ if issubclass(c, CurvscopeOptimizer)]
    if saved not in ours:
        other = saved if isinstance(saved, str) else "another optimizer (not a curvscope one)"
        raise ValueError(
            f"{name}.load_state_dict: this state dict was saved by {other}, not {name}; its "
            f"state means something else here: load it into the optimizer type that saved it, "
            f"or start {name} afresh"
        )
    if len(groups) != len(opt.param_groups):
        raise ValueError(
            f"{name}.load_state_dict: the state dict has {len(groups)} parameter group(s), this "
            f"optimizer {len(opt.param_groups)}; build it on the parameters it was saved with"
        )
    counts = state.get("counts")
    if not isinstance(counts, dict) or set(counts) != set(Counts().as_dict()):
        raise ValueError(
            f"{name}.load_state_dict: the state dict's 'counts' are not curvscope's Counts "
            f"(got {counts!r}); was it edited by hand?"
        )
    params: list[Tensor] = []
    for i, (g_saved, g_ours) in enumerate(zip(groups, opt.param_groups, strict=True)):
        if len(g_saved["params"]) != len(g_ours["params"]):
            raise ValueError(
                f"{name}.load_state_dict: parameter group {i} holds {len(g_saved['params'])} "
                f"parameters in the state dict and {len(g_ours['params'])} here; build the "
                "optimizer on the parameters it was saved with"
            )
        for idx, p in zip(g_saved["params"], g_ours["params"], strict=True):
            params.append(p)
            for key, t in state.get(idx, {}).items():
                if isinstance(t, Tensor) and t.ndim > 0 and t.shape != p.shape:
                    raise ValueError(
                        f"{name}.load_state_dict: the saved state {key!r} of parameter "
                        f"{len(params) - 1} has shape {tuple(t.shape)}, the parameter "
                        f"{tuple(p.shape)}: the state dict belongs to a model of another shape"
                    )
    n = sum(p.numel() for p in params if p.requires_grad)
    for key, t in (state.get("global") or {}).items():
        if isinstance(t, Tensor) and t.ndim > 0 and t.numel() != n:
            raise ValueError(
                f"{name}.load_state_dict: the saved {key!r} has {t.numel()} entries, the "
                f"parameters {n}: the state dict belongs to a model of another shape"
            )


def model_decrease(g: Tensor, s: Tensor, Hs: Tensor) -> float:
    """m(0) − m(s) for m(s) = gᵀs + ½ sᵀHs."""
    return -float(g @ s + 0.5 * (s @ Hs))
