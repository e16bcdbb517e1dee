"""A second-order step as a composition: a *descent* proposes a step s from a local model of the
loss, a *search* sizes it (trust radius, damping or cubic weight) and judges it by the ratio
ρ = actual / predicted reduction — optimistix's search × descent (Rader, Lyons & Kidger 2024).

A named optimizer is one pairing, plus a constructor that checks the hyperparameters the two
pieces read from the parameter group::

    class NewtonCG(ModelStepOptimizer):
        descent = SteihaugCG()   # min gᵀs + ½sᵀHs in ‖s‖ ≤ Δ by truncated CG
        search = TrustRadius()   # Δ from ρ (Nocedal & Wright, Alg. 4.1)

The step itself is written once, in :meth:`ModelStepOptimizer._step`: evaluate the closure at θ,
ask the descent for s at the search's current size, measure f(θ + s), keep the step or undo it
by the search's test, and update the size from ρ. The descents are in
:mod:`curvscope.optim.descents`, the searches in :mod:`curvscope.optim.searches`.

The size is one number in the method's state (``state["global"][search.key]``) and is reported
in :class:`StepInfo` under what it means (``radius``, ``damping`` or ``sigma``); a descent and a
search pair only when they agree on that meaning (checked when the optimizer is built).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, cast

import torch
from torch import Tensor

from curvscope.optim._closure import (
    Closure,
    Counts,
    Evaluation,
    loss_only,
    origin,
    rng_back,
    rng_now,
    warn_grad_edits,
    write_flat,
)
from curvscope.optim.base import CurvscopeOptimizer, Snapshot, StepInfo, check_positive

#: the first steps whose closure's ``.grad`` is compared with the method's own gradient, for
#: edits it does not read (:func:`~curvscope.optim._closure.warn_grad_edits`): a closure edits
#: alike at every step, and the comparison reads every entry (0.1 s a step at 8.4M parameters)
GRAD_CHECKS = 3
#: what a size can mean: a bound on ‖s‖, a shift added to the curvature, a cubic term's weight
SIZES = ("radius", "damping", "sigma")


@dataclass(frozen=True)
class Proposal:
    """A step s and the decrease m(0) − m(s) its model predicts (positive).

    Attributes:
        step: s, flat.
        predicted: m(0) − m(s).
        note: what happened, in words (e.g. "negative curvature: followed to the trust
            boundary").
        boundary: the step lies on the trust region's boundary (a trust radius grows only then).
        loss_at_step: f(θ + s) when the descent already measured it (Hessian-free's
            backtracking), else None (the step measures it).
        used: the size the descent actually used when it had to raise it (dense Newton shifts
            an indefinite Hessian past its lowest eigenvalue), else None.
        floor: the least size the curvature the descent met asks for: dense Newton's first
            shift (damping × max|λ|), Hessian-free's damping past the negative curvature CG met.
        lowest: the curvature's lowest eigenvalue where the descent knows it (dense Newton),
            else None.
    """

    step: Tensor
    predicted: float
    note: str = ""
    boundary: bool = False
    loss_at_step: float | None = None
    used: float | None = None
    floor: float = 0.0
    lowest: float | None = None


@dataclass(frozen=True)
class Local:
    """What a descent may use at the current point θ.

    Attributes:
        ev: the closure at θ: loss, gradient, curvature products (counted in ``counts``).
        counts: the step's work counts; a descent adds its inner iterations (CG, Lanczos).
        group: the hyperparameters (the one parameter group), read at each step as torch's
            optimizers read theirs.
        memory: the method's state for this step, where a descent keeps its own entries (dense
            Newton's scale, Hessian-free's previous solution); committed when the step ends.
        trial: s ↦ f(θ + s), a loss-only evaluation that leaves the parameters at θ + s (the
            step puts them where they belong afterwards).
        curvature_closure: a closure on the mini-batch the curvature products should come from
            (Hessian-free's ``step(closure, curvature_closure=...)``), or None: ``ev``'s.
    """

    ev: Evaluation
    counts: Counts
    group: Mapping[str, Any]
    memory: dict[str, Any]
    trial: Callable[[Tensor], float]
    curvature_closure: Closure | None = None


class Descent(Protocol):
    """Proposes the step from a local model of the loss, at a size set by a :class:`Search`."""

    #: the size it takes: "radius", "damping" or "sigma" (see :data:`SIZES`)
    size: ClassVar[str]

    def init(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """Its own entries in the method's state when the optimizer is built (usually none)."""
        ...

    def __call__(self, local: Local, size: float, /) -> Proposal:
        """The step at θ for this size, and the decrease its model predicts."""
        ...


class Search(Protocol):
    """Sizes a descent, keeps or refuses its step, and adapts the size from ρ."""

    #: what its number means: "radius", "damping" or "sigma" (see :data:`SIZES`)
    size: ClassVar[str]

    @property
    def key(self) -> str:
        """The number's entry in the method's state (``state["global"]``)."""
        ...

    def init(self, group: Mapping[str, Any]) -> float:
        """The number when the optimizer is built."""
        ...

    def accepts(self, ratio: float, actual: float, group: Mapping[str, Any]) -> bool:
        """Keep the step? ``actual`` is f(θ) − f(θ + s) (finite here), ``ratio`` ρ."""
        ...

    def update(
        self, value: float, ratio: float, proposal: Proposal, group: Mapping[str, Any]
    ) -> float:
        """The number for the next step (called for rejected steps too)."""
        ...


def check_pairing(name: str, descent: Descent, search: Search) -> None:
    """Refuse a descent and a search that mean different things by the size."""
    if descent.size != search.size or descent.size not in SIZES:
        raise TypeError(
            f"{name} pairs the descent {descent!r}, which takes a {descent.size}, with the search "
            f"{search!r}, which sets a {search.size}; pair pieces that agree on the size (one of "
            f"{', '.join(SIZES)})"
        )


class SizedGroup(dict[str, Any]):
    """A model-step method's parameter group (a plain dict otherwise): it has no learning
    rate, and asked for one — by torch's learning-rate schedulers — it says so and what to do
    instead (it was torch's bare ``KeyError: 'lr'``)."""

    method: str = ""
    size: str = ""
    #: how many times the size's entry was set — to any value, its own too: a radius
    #: collapsed to 9e-16 and set back to the constructor's 1.0 was not restarted (compared
    #: with the last value asked, it was no edit: an outside review) — and how many of those a
    #: step that completed has read (:meth:`ModelStepOptimizer._keep_search`)
    edits: int = 0
    read: int = 0

    @property
    def edited(self) -> bool:
        """The size's entry was set since the last step that completed read it."""
        return self.edits != self.read

    @edited.setter
    def edited(self, value: bool) -> None:
        self.read = self.edits - int(value)

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        if key == self.size:
            self.edits += 1

    def update(self, *args: Any, **kwargs: Any) -> None:
        """As ``dict.update``, each entry set as by ``group[key] = value`` (dict's own skips
        :meth:`__setitem__`: ``update(radius=1.0)`` was no edit, and the search went on from
        its collapsed radius, 2.4e-4 for 1.0: an outside review)."""
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> SizedGroup:  # type: ignore[override,misc]
        self.update(other)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        """Copied and pickled with its entries as they are, not set one by one (which marked
        every copy's size as edited: a copied optimizer restarted its search)."""
        return (_sized_group, (dict(self), self.method, self.size, self.edited))

    def _no_lr(self) -> str:
        newton = (
            " (Newton's damping is the least shift, relative to max|λ|, that an indefinite "
            "Hessian or a rejected step brings in; setting it restarts the shift from 0)"
            if self.method == "Newton"
            else ""
        )
        return (
            f"{self.method} has no learning rate: each step is sized by its "
            f"{self.size}, adapted step by step from how well the model predicted the last "
            "one, so torch's learning-rate schedulers do not apply; to schedule it, set "
            f"optimizer.param_groups[0][{self.size!r}] between steps (the search restarts "
            f"from the new value){newton}"
        )

    def __missing__(self, key: Any) -> Any:
        if key == "lr":
            raise KeyError(f"'lr': {self._no_lr()}")
        raise KeyError(key)

    def refuse_lr(self) -> None:
        """An "lr" in the group (passed with the parameters, or set later) is read by nothing:
        a scheduler on it ran without error and changed nothing (an outside review)."""
        if "lr" in self:
            raise ValueError(
                f"the parameter group holds 'lr', which is never read: {self._no_lr()}"
            )


def _sized_group(entries: dict[str, Any], method: str, size: str, edited: bool) -> SizedGroup:
    """A :class:`SizedGroup` rebuilt from its entries and attributes (its ``__reduce__``)."""
    group = SizedGroup(entries)
    group.method, group.size, group.edited = method, size, edited
    return group


class ModelStepOptimizer(CurvscopeOptimizer):
    """One step: evaluate, propose s by the descent at the search's size, measure the loss at
    θ + s, keep or undo the step by the search's test, update the size from ρ. Non-finite trial
    losses are undone whatever the pairing.

    A subclass names its pieces as the class attributes (or properties) ``descent`` and
    ``search``, and checks in its ``__init__`` the hyperparameters they read from the group.
    """

    single_group = True
    #: the closure the curvature products come from this step, when not the step's own
    #: (set by Hessian-free's ``step(closure, curvature_closure=...)``)
    _curvature_closure: Closure | None = None
    #: the steps whose closure's ``.grad`` was compared (:data:`GRAD_CHECKS` at most); the
    #: class's 0 until the first (and for an optimizer unpickled without it)
    _grad_checks = 0

    @property
    def descent(self) -> Descent:
        """The piece that proposes the step."""
        raise NotImplementedError

    @property
    def search(self) -> Search:
        """The piece that sizes the step and judges it."""
        raise NotImplementedError

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        tolerance_grad: float = 0.0,
        *,
        group: Any = None,
    ) -> None:
        super().__init__(params, {**defaults, "tolerance_grad": tolerance_grad}, group=group)
        descent, search = self.descent, self.search
        check_pairing(type(self).__name__, descent, search)
        self._sized_groups()
        group = self.param_groups[0]
        asked = self._asked()
        self._set_global({search.key: asked["asked"], **descent.init(group), **asked})

    def _check_group(self, group: Mapping[str, Any]) -> None:
        """The group's ``tolerance_grad``, and (a method's own) its size and settings: read from
        the group at every step, so checked there too (:meth:`CurvscopeOptimizer._check_group`)."""
        check_positive("tolerance_grad", group["tolerance_grad"], allow_zero=True)

    def _sized_groups(self) -> None:
        """The group as a :class:`SizedGroup` (at construction, and after a state dict loaded
        torch's plain one)."""
        group = SizedGroup(self.param_groups[0])
        group.method, group.size = type(self).__name__, self.search.size
        self.param_groups[0] = group

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`CurvscopeOptimizer.state_dict`, with ``"size_edited"``: whether the
        group's size was set since the last step (:attr:`SizedGroup.edited`), which the next
        step restarts the search from — a value set, then saved, was lost on resume (an outside
        review: HessianFree's damping 0.667 uninterrupted, 0.132 resumed)."""
        edited = cast(SizedGroup, self.param_groups[0]).edited
        return {**super().state_dict(), "size_edited": edited}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._sized_groups()
        cast(SizedGroup, self.param_groups[0]).edited = bool(state_dict.get("size_edited"))

    def _asked(self) -> dict[str, Any]:
        """What the group asks for now — the search (Newton's pairing follows its damping), its
        starting size (radius, damping or σ, read as torch reads its lr) — and which
        parameters are trained: compared with the last step's, to see an edit."""
        search, group = self.search, self.param_groups[0]
        cast(SizedGroup, group).refuse_lr()
        return {
            "asked": search.init(group),
            "search": type(search).__name__,
            "trainable": [p.requires_grad for p in group["params"]],
            # the parameters' shapes, in order: a state loaded into parameters of the same total
            # size in another order applied Hessian-free's warm start to the wrong coordinates
            "shapes": [list(p.shape) for p in group["params"]],
        }

    def _restarted(self, memory: dict[str, Any]) -> dict[str, Any]:
        """The state with the group's edits since the last step applied: the size starts from
        what the group asks (it was read once, at construction: an outside review), and a warm
        start made for another set of trained parameters is dropped (a layer frozen or
        unfrozen: HessianFree failed on it, or warm-started from a misaligned vector). A state
        saved before these entries existed counts as unedited."""
        asked = self._asked()
        memory = dict(memory)
        if memory.get("trainable", asked["trainable"]) != asked["trainable"]:
            memory.pop("previous", None)
        group = cast(SizedGroup, self.param_groups[0])
        self._edits_seen = group.edits  # (read once the step completes: _keep_search)
        if group.edited or any(memory.get(k, asked[k]) != asked[k] for k in ("asked", "search")):
            memory[self.search.key] = asked["asked"]
        bounded = getattr(self.search, "bounded", None)  # a bound edited since: held to
        if bounded is not None and self.search.key in memory:
            memory[self.search.key] = bounded(memory[self.search.key], group)
        return {**memory, **asked}

    def _keep_search(self, memory: dict[str, Any]) -> None:
        """The step's search state kept, and the size edits it began with taken as read: only
        here, at the step's end — taken as read where the step began, an edit was lost with a
        step that failed at its trial point and was put back, and the retry went on from the
        collapsed radius (an outside review's fuzzing); and only those it began with — one
        made inside the closure, during the step, is the next step's (the diff review)."""
        self._set_global(memory)
        cast(SizedGroup, self.param_groups[0]).read = self._edits_seen

    def _step(self, closure: Any, snapshot: Snapshot) -> Tensor:
        closure, counts = self._begin(closure)
        descent, search, group = self.descent, self.search, self.param_groups[0]
        memory = self._restarted(self._global())  # committed at the end: replaced, not edited
        params = snapshot.params
        products_before = counts.products
        ev = Evaluation(params, closure, counts, group=self.group)
        if ev.ran_backward and self._grad_checks < GRAD_CHECKS:
            self._grad_checks += 1
            warn_grad_edits(type(self).__name__, params, ev.grads)
        after = rng_now()  # where the step leaves the RNG: one forward's draws, as torch's
        gnorm = float(ev.flat_grad.norm())
        if gnorm <= group["tolerance_grad"]:
            note = (  # "converged" it read, at a saddle too (even for the cubic method)
                f"stationary: ‖g‖ = {gnorm:.3g} <= tolerance_grad, no step (a minimum, saddle or "
                "maximum: cs.optim.stationary_point tells which)"
            )
            size = {search.size: memory[search.key]}
            self._keep_search(memory)
            self._end(counts, StepInfo(ev.loss, gnorm, 0.0, 0.0, 0.0, None, False, 0, note, **size))
            return ev.loss_tensor.detach()
        x0 = snapshot.flat()  # θ at the start: the transaction's copy, not a second one

        def trial(s: Tensor) -> float:
            # the step's own dropout masks: ρ compares f(θ) and f(θ + s) under one draw (fresh
            # masks at each trial put ρ between −2e5 and 3e5 at a small radius, 11 of 20 steps
            # kept; 0.5–1.7 and 20 of 20 with one: an outside review)
            write_flat(params, x0 + s)
            rng_back(snapshot.rng)
            return loss_only(closure, params, counts, self.group, start)

        start = weakref.ref(origin(ev.loss_tensor))  # (not kept alive: its graph is freed)
        value = memory[search.key]
        local = Local(ev, counts, group, memory, trial, self._curvature_closure)
        proposal = descent(local, value)
        f0, loss_out = ev.loss, ev.loss_tensor.detach()
        del ev, local  # free the graph before the trial forward pass
        actual, ratio, finite = _measure(proposal, f0, trial)
        noise = _within_rounding(proposal, f0, actual, loss_out.dtype)
        if noise:  # the model taken as agreeing: ρ = 1, the step kept unless the radius set it
            ratio = 1.0  # (and can grow: at max_radius it is kept, or a small one stalls)
            kept = not proposal.boundary or search.update(value, ratio, proposal, group) == value
        else:
            kept = search.accepts(ratio, actual, group)
        accepted = math.isfinite(actual) and kept
        if not accepted:
            write_flat(params, x0)
        elif proposal.loss_at_step is not None:  # the descent's own trials may have moved on
            write_flat(params, x0 + proposal.step)
        memory[search.key] = search.update(value, ratio, proposal, group)
        self._keep_search(memory)
        info = StepInfo(
            f0,
            gnorm,
            float(proposal.step.norm()) if accepted else 0.0,
            proposal.predicted,
            actual,
            ratio,
            accepted,
            counts.products - products_before,
            _note(proposal.note, accepted, finite, noise),
            **{search.size: memory[search.key]},
        )
        self._end(counts, info)
        rng_back(after)
        return loss_out


def _measure(
    proposal: Proposal, f0: float, trial: Callable[[Tensor], float]
) -> tuple[float, float, bool]:
    """(actual, ρ, finite): the measured decrease f(θ) − f(θ + s) (−inf where the loss there is
    not finite), its ratio to the predicted one (±inf when nothing was predicted), and whether
    the loss at θ + s is finite."""
    f_new = proposal.loss_at_step
    if f_new is None:
        f_new = trial(proposal.step)
    elif not math.isfinite(f_new):
        f_new = math.inf
    actual = f0 - f_new if math.isfinite(f_new) else -math.inf
    pred = proposal.predicted
    ratio = actual / pred if pred > 0 else (math.inf if actual > 0 else -math.inf)
    return actual, ratio, math.isfinite(f_new)


#: a predicted and a measured decrease both below this many units of rounding of the loss
#: (eps × |f|) are rounding's, not the model's (Conn, Gould & Toint 2000, §17.4.2)
ROUNDING_UNITS = 10.0


def _within_rounding(proposal: Proposal, f0: float, actual: float, loss_dtype: torch.dtype) -> bool:
    """Whether the predicted and the measured decrease are both within the loss's rounding, so
    that ρ is rounding over rounding: at a minimum, a method run on past convergence had every
    step rejected on that noise, and its size wrecked — a damping of 2.7e9, a radius of 4.5e-13 —
    so that new data then took 17–43 steps where a fresh optimizer took 4–5 (an outside review).
    Such a step is kept and ρ read as 1 — but not one on the trust region's boundary, whose
    length the radius set, not the curvature: along an exact symmetry (softmax regression's
    shift of every class's logits, where H has no curvature) the gradient's rounding pointed
    NewtonCG to the boundary at every step, each kept, the radius doubling: ‖θ‖ went 0.5 → 222
    in 200 steps past convergence, the loss unchanged (an outside review). That step is not
    taken, and ρ = 1 still grows the radius (a radius too small for any decrease the loss can
    resolve then grows until one can) — unless it is at ``max_radius`` already, where the step
    is kept as before (a float32 loss of 1e4 + BCE under ``max_radius=0.05`` stalled 0.3 above
    its optimum otherwise: the diff review). The rounding is the step's dtype's (the predicted
    decrease is computed in it), but a measured *increase* is noise only within the loss's own
    rounding (10 eps of its dtype) or one eps of the step's (a bfloat16 model's activations
    round its float32 loss by about that much: 7e-4 relative increases, the diff review, whose
    rejections collapsed the radius to 6e-5): a bfloat16 GPT-2, whose loss transformers
    computes in float32, had a step from 3.141 to 3.329 (+6%) kept at bfloat16's 10·eps·|f| =
    0.25 (an outside review)."""
    if not math.isfinite(actual):
        return False
    step_eps = torch.finfo(proposal.step.dtype).eps
    rounding = ROUNDING_UNITS * step_eps * abs(f0)
    increase = max(ROUNDING_UNITS * torch.finfo(loss_dtype).eps, step_eps) * abs(f0)
    return abs(proposal.predicted) <= rounding and -min(rounding, increase) <= actual <= rounding


def _note(note: str, accepted: bool, finite: bool, noise: bool = False) -> str:
    """The descent's note, and why a step was (not) taken."""
    if noise:
        why = "the predicted and the measured decrease are within the loss's rounding: " + (
            "kept" if accepted else "not taken, its length the trust radius's (the radius grows)"
        )
        return (note + "; " if note else "") + why
    if accepted:
        return note
    why = "rejected by the ratio test" if finite else "rejected: the loss there is not finite"
    return (note + "; " if note else "") + why


def model_decrease(g: Tensor, s: Tensor, Hs: Tensor) -> float:
    """m(0) − m(s) for m(s) = gᵀs + ½ sᵀHs."""
    return -float(g @ s + 0.5 * (s @ Hs))
