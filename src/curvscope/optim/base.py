"""What every curvscope optimizer shares: the closure contract, the cost counts, the
per-step report, hyperparameter checks, the safeguard that a step making the loss
non-finite is never written into the parameters, and the step as a transaction.

**A step is a transaction.** :meth:`CurvscopeOptimizer.step` snapshots the parameters' values
(one copy) and the optimizer's state (its containers; the tensors in it are replaced by a step,
never changed in place, so they are kept by reference) before calling the method's ``_step``. If
anything raises inside — the closure at a trial point, a curvature product inside CG or
Lanczos, a refused non-finite update, a ``KeyboardInterrupt`` — parameters, state, counts and
``info`` are put back bit for bit before the exception propagates, so a retry repeats exactly
the step that never happened.

**The state.** ``Optimizer.state`` holds what torch's holds: per-parameter state (AdaHessian's
and Sophia's moments), and, under ``"global"``, the state of the whole vector (trust radius,
damping, σ, the step counter), replaced by each step rather than edited, so a ``state_dict()``
is not changed by later steps. The counts and the optimizer's type are at the top level of
``state_dict()``, beside ``"state"`` and ``"param_groups"``.

The second-order methods compose a descent with a search: :mod:`curvscope.optim.model_step`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvscope.derivatives import checks
from curvscope.derivatives.distributed import resolve_group
from curvscope.derivatives.flat import tensors
from curvscope.derivatives.zero3 import is_dtensor, is_partitioned
from curvscope.optim._closure import (
    Closure,
    Counts,
    KeptStatistics,
    check_closure,
    flat_params,
    parameters_written,
    rng_back,
    rng_now,
    undo_interrupted_exits,
    write_flat,
)

#: Why a sharded model's parameters are refused, with the fix: an optimizer on FSDP2's
#: shards failed with DTensor's "Cannot flatten unevenly sharded tensor", and where the shards
#: are even its products by double backward would come out 0, as the exact backends' did
SHARDED = (
    "a parameter is a shard of a sharded model (FSDP2's fully_shard or tensor parallelism: a "
    "DTensor; DeepSpeed ZeRO-3: a partition), and curvscope's optimizers step the parameters "
    "as local tensors with curvature by a double backward through the closure's graph, which "
    "does not go through the engine (its products would come out 0); train a sharded model "
    "with a torch.optim optimizer and measure its curvature with backend='finite_difference' "
    "(README, Models larger than one device)"
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


# Hyperparameters are checked by the shared checks (curvscope.derivatives.checks) and refused
# the way torch.optim refuses them: a ValueError "Invalid lr: -1 (expected ...)".


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    try:
        return checks.check_real(value, name, minimum=0, exclusive=not allow_zero)
    except (TypeError, ValueError):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number {bound})") from None


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    try:
        return checks.check_int(value, name, minimum)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= {minimum})") from None


def check_unit(name: str, value: Any) -> float:
    try:
        number = checks.check_real(value, name, minimum=0)
    except (TypeError, ValueError):
        number = math.nan
    if not number < 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected a number in [0, 1))")
    return number


#: a learning rate this far below 0 is a scheduler's rounding, accepted (its step is nil):
#: torch's LinearLR decaying to 0 ends at -1.85e-19 (refused at the step, it ended the run)
LR_ROUNDING = 1e-12


def check_lr(value: Any) -> float:
    """A group's learning rate: a finite number >= 0 — a one-element tensor as its number (a
    LambdaLR returning one writes it), and a scheduler's rounding below 0 (within
    :data:`LR_ROUNDING`) accepted, checked as 0."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and -LR_ROUNDING <= value < 0:
        return 0.0
    return check_positive("learning rate", value, allow_zero=True)  # torch's accept 0


def check_betas(betas: Any) -> tuple[float, float]:
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    return check_unit("beta1", betas[0]), check_unit("beta2", betas[1])


#: (parameter, its new value, its new per-parameter state or None): one entry of a commit
Update = tuple[Tensor, Tensor, dict[str, Tensor] | None]


#: hyperparameters torch's optimizers read from a group: one a curvscope method does not read
#: is refused in a group, not taken and ignored
TORCH_HYPERPARAMETERS = (
    "weight_decay",
    "momentum",
    "dampening",
    "nesterov",
    "betas",
    "amsgrad",
    "maximize",
)


def _asks(value: Any) -> bool:
    """Whether a group's value of a hyperparameter asks for something: not absent, off or 0
    (a group built for any optimizer, as Hugging Face's Trainer builds them, holds
    ``weight_decay=0.0`` for the parameters it leaves undecayed)."""
    if value is None or value is False:
        return False
    try:
        return bool(value != 0)
    except (RuntimeError, TypeError, ValueError):  # (a tensor of several values)
        return True


class CurvscopeOptimizer(Optimizer):
    """Base: keeps :class:`Counts` (``counts``; at the top level of ``state_dict()``) and the last
    :class:`StepInfo` (``info``); each ``step()`` is a transaction.

    ``group`` (every optimizer's keyword): under torch.distributed, by default (None) inside an
    initialized process group, the loss, gradient, curvature products, diagonal estimates and
    trial losses are averaged over its ranks — each rank's closure computes its own shard's
    loss, as under DDP — so every rank takes the same step and the replicas stay equal; a
    ``ProcessGroup`` selects the group, ``False`` keeps each process alone.
    """

    #: Whether the method treats all parameters as one vector (Newton-type) and so needs a single
    #: parameter group, like ``torch.optim.LBFGS``.
    single_group: bool = False

    def __init__(
        self, params: Iterable[Any], defaults: dict[str, Any], *, group: Any = None
    ) -> None:
        super().__init__(params, defaults)
        self._alone = group is False
        self._group = resolve_group(group)
        name = type(self).__name__
        if self.single_group and len(self.param_groups) != 1:
            raise ValueError(
                f"{name} treats all parameters as one vector and takes one parameter group, got "
                f"{len(self.param_groups)}; pass model.parameters() (per-group options are not "
                "supported by second-order methods)"
            )
        self._counts = Counts()
        self.info: StepInfo | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``; refused by the methods that take one
        group (it was accepted, and the new group's options silently ignored: a review)."""
        if self.single_group and "_counts" in self.__dict__:  # built: no second group
            name = type(self).__name__
            raise ValueError(
                f"{name} treats all parameters as one vector and takes one parameter group; "
                f"to train more parameters build a new {name} on all of them (its radius, "
                "damping or σ start afresh)"
            )
        params = param_group.get("params")
        if isinstance(params, set):  # torch's own error: parameters need an order
            super().add_param_group(param_group)
            return
        self._check_group({**self.defaults, **param_group})
        unread = [
            k for k in TORCH_HYPERPARAMETERS if k not in self.defaults and _asks(param_group.get(k))
        ]
        if unread:  # (torch's optimizers read them: a group's weight_decay was silently not)
            raise ValueError(
                f"{type(self).__name__} reads no {unread[0]!r}: a parameter group's "
                f"{unread[0]}={param_group[unread[0]]!r} would change nothing (an outside "
                f"review); its hyperparameters are {', '.join(sorted(self.defaults))}"
            )
        listed = [params] if isinstance(params, Tensor) else list(params or [])
        # torch takes named parameters too, (name, tensor) pairs: each checked as its tensor
        # (a pair listed twice passed, and AdaHessian stepped it twice: an outside review)
        tensors: list[Any] = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in listed]
        for p in tensors:  # at construction (torch adds each group here) and after it alike
            if isinstance(p, Tensor) and p.is_complex():
                raise TypeError(
                    f"{type(self).__name__} supports real parameters only, got {p.dtype}"
                )
            if is_dtensor(p) or is_partitioned(p):
                raise ValueError(f"{type(self).__name__}: {SHARDED}")
        if len({id(p) for p in tensors}) != len(tensors):  # torch only warns
            raise ValueError(
                f"{type(self).__name__}: a parameter appears twice in one parameter group, so "
                "its step would be applied twice (AdaHessian diverged to 1e8 on a quadratic); "
                "pass each parameter once"
            )
        super().add_param_group({**param_group, "params": listed})

    def _check_group(self, group: Mapping[str, Any]) -> None:
        """A group's hyperparameters checked as the constructor's keywords are (a method with
        some overrides this) — at construction, for a group's own (``add_param_group``) and,
        before every step, for each group as it is then: a value set between steps (a
        scheduler's, or the user's, as the README says to schedule a radius, damping or σ) was
        taken unchecked — σ = −1 hung CubicNewton, lr = −1 stepped uphill (an outside review)."""

    #: attributes a copy or a pickle keeps beside torch's own (defaults, state, param_groups)
    _kept: tuple[str, ...] = ("_counts", "info", "_alone")

    def __getstate__(self) -> dict[str, Any]:
        kept = {k: self.__dict__[k] for k in self._kept if k in self.__dict__}
        return {**super().__getstate__(), **kept}

    @property
    def group(self) -> Any:
        """The process group whose ranks' losses, gradients and products a step averages (None:
        this process alone). A process group does not pickle: a copy (``copy.deepcopy``, a
        pickle) takes the default group where it is used, as a new optimizer would, unless
        built with ``group=False``."""
        if "_group" not in self.__dict__:
            self._group = resolve_group(False if self.__dict__.get("_alone") else None)
        return self._group

    @property
    def counts(self) -> Counts:
        """The work done so far: closure calls, gradients, products, dense Hessians, CG and
        Lanczos iterations — each counted separately (a copy: changing it changes nothing)."""
        return replace(self._counts)

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _global(self) -> dict[str, Any]:
        """The state of the whole vector (radius, damping, σ, previous solution, step counter):
        read it here, replace it with :meth:`_set_global`, never edit it in place."""
        state: dict[Any, Any] = self.state  # torch types the keys as tensors; this one is a str
        return state.get("global", {})

    def _set_global(self, memory: dict[str, Any]) -> None:
        state: dict[Any, Any] = self.state
        state["global"] = memory

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:  # type: ignore[override]
        """One step, as a transaction: if anything raises inside (the closure at any of its
        evaluations, a curvature product, a refused non-finite update), the parameters, the
        state (counts included), ``info``, the running statistics of the normalization layers
        the step ran and torch's global RNG are restored bit for bit to what they were at the
        start of the step, then the exception propagates. Returns the loss at the start."""
        for group in self.param_groups:  # as they are now: edited since, perhaps
            self._check_group(group)
        snapshot = Snapshot(self)
        kept = KeptStatistics(on_error=True)
        try:
            with kept:
                return self._step(closure, snapshot)
        except BaseException as error:
            undo_interrupted_exits(kept)  # a Ctrl-C that skipped an exit (nothing otherwise)
            snapshot.restore(self, error)
            raise

    def _step(self, closure: Any, snapshot: Snapshot) -> Tensor | None:
        """The method's step; ``snapshot.flat()`` holds θ at its start (do not modify it)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict()`` with, at its top level, ``"counts"`` (the
        :class:`Counts` as a dict) and ``"optimizer"`` (the type's name, which
        ``load_state_dict`` checks). Later steps do not change it (they replace the state)."""
        sd = super().state_dict()
        return {**sd, "counts": self._counts.as_dict(), "optimizer": type(self).__name__}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, refusing a state dict this optimizer could
        not continue from: one saved by another optimizer type, for other parameter groups, or
        for parameters of other shapes (checked before anything is loaded). The layout before
        curvscope 0.2, with the counts and the type inside ``"state"``, loads too."""
        check_loadable(self, state_dict)
        counts = _saved(state_dict, "counts")
        state = {k: v for k, v in state_dict["state"].items() if k not in TOP_LEVEL}
        super().load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})
        self._counts = Counts(**counts)

    def _commit(self, updates: Sequence[Update]) -> None:
        """Write each (parameter, its new value, its new state or None) — after checking that
        every value is finite: one check for all, before anything is written, so a refused step
        writes nothing (not even to the parameters that came first)."""
        # (a step count is a CPU tensor, as torch's Adam keeps it: not stacked with the rest)
        tensors = [new for _, new, _ in updates] + [
            v for _, _, st in updates for k, v in (st or {}).items() if k != "step"
        ]
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            raise FloatingPointError(self._non_finite_message(updates))
        for p, new, st in updates:
            if st is not None:
                self.state[p] = st
            p.copy_(new)
        parameters_written()

    def _non_finite_message(self, updates: Sequence[Update]) -> str:
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
        self._counts = replace(counts)
        self.info = info


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
        self._versions = [(t, t._version) for t in tensors(self._state)]
        self._counts, self._info = opt._counts, opt.info
        #: torch's RNGs at the start: put back by a failed step (a retry drew other dropout
        #: masks), and where a model-step method measures its trial points (its own masks)
        self.rng = rng_now()

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
            parameters_written()
        opt.state.clear()
        opt.state.update(self._state)
        opt._counts, opt.info = self._counts, self._info
        rng_back(self.rng)
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


#: the entries of ``state_dict()`` beside "state" and "param_groups" (inside "state" before 0.2)
TOP_LEVEL = ("counts", "optimizer")


def _saved(state_dict: dict[str, Any], key: str) -> Any:
    """A top-level entry of a state dict, or where the earlier layout kept it (in "state")."""
    return state_dict[key] if key in state_dict else state_dict["state"].get(key)


def check_loadable(opt: CurvscopeOptimizer, state_dict: Any) -> None:
    """Refuse, before loading, a state dict ``opt`` could not continue from (with the reason
    and the remedy): another optimizer type's, other parameter groups', other shapes'."""
    name = type(opt).__name__
    if not (isinstance(state_dict, dict) and {"state", "param_groups"} <= set(state_dict)):
        raise TypeError(
            f"{name}.load_state_dict expected what {name}.state_dict() returns (a dict with "
            f"'state' and 'param_groups'), got {type(state_dict).__name__}"
        )
    _check_type(opt, _saved(state_dict, "optimizer"))
    groups = state_dict["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise ValueError(
            f"{name}.load_state_dict: the state dict has {len(groups)} parameter group(s), this "
            f"optimizer {len(opt.param_groups)}; build it on the parameters it was saved with"
        )
    counts = _saved(state_dict, "counts")
    if not isinstance(counts, dict) or set(counts) != set(Counts().as_dict()):
        raise ValueError(
            f"{name}.load_state_dict: the state dict's 'counts' are not curvscope's Counts "
            f"(got {counts!r}); was it edited by hand?"
        )
    state = state_dict["state"]
    n = _check_parameter_state(name, state, groups, opt.param_groups)
    saved = state.get("global") or {}
    shapes = [list(p.shape) for g in opt.param_groups for p in g["params"]]
    # a warm start is a vector over the parameters in order: of the same total size in another
    # order, Hessian-free's was applied to the wrong coordinates (an outside review); a state of
    # scalars (a radius, a damping) means the same on any model, and loads (a test holds it)
    moved = [list(s) for s in saved.get("shapes", shapes)] != shapes  # (saved before: unknown)
    if moved and "previous" in saved:
        raise ValueError(
            f"{name}.load_state_dict: the state dict was saved on parameters of shapes "
            f"{saved['shapes']}, these are {shapes}: it belongs to a model of another shape, or "
            "its parameters in another order; build the optimizer on the parameters it was "
            "saved with, in their order"
        )
    now = [p.requires_grad for g in opt.param_groups for p in g["params"]]
    refrozen = saved.get("trainable", now) != now  # a layer frozen or unfrozen since
    for key, t in saved.items():
        if key == "previous" and refrozen:
            continue  # a warm start for other trained parameters: the next step drops it
        if isinstance(t, Tensor) and t.ndim > 0 and t.numel() != n:
            raise ValueError(
                f"{name}.load_state_dict: the saved {key!r} has {t.numel()} entries, the "
                f"parameters {n}: the state dict belongs to a model of another shape"
            )


def _check_type(opt: CurvscopeOptimizer, saved: Any) -> None:
    name = type(opt).__name__
    ours = [c.__name__ for c in type(opt).__mro__ if issubclass(c, CurvscopeOptimizer)]
    if saved not in ours:
        other = saved if isinstance(saved, str) else "another optimizer (not a curvscope one)"
        raise ValueError(
            f"{name}.load_state_dict: this state dict was saved by {other}, not {name}; its "
            f"state means something else here: load it into the optimizer type that saved it, "
            f"or start {name} afresh"
        )


def _check_parameter_state(
    name: str, state: dict[Any, Any], saved: list[dict[str, Any]], groups: list[dict[str, Any]]
) -> int:
    """Refuse per-parameter state of other shapes; the number of trainable entries."""
    params: list[Tensor] = []
    for i, (g_saved, g_ours) in enumerate(zip(saved, groups, strict=True)):
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
    return sum(p.numel() for p in params if p.requires_grad)
