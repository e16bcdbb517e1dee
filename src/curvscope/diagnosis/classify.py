"""The diagnosis vocabulary, in one module: the states (each with its code, headline and
advice), the evidence they are judged on, and the rules that decide them — :func:`classify`
for one probe, :func:`classify_history` for what only a run of probes shows.

The states are decided in this order, the first that holds wins: **diverged**; **unstable**
when the optimizer's last update overshoots (the Monitor's cheap tier measured it); then, when
the gradient is small, **flat** › **saddle** › **minimum** (where the optimizer is stable: a
sharpness past the limit by the margin is **unstable** whatever the gradient); otherwise
**unstable** › **learning** (:data:`RULES`). "Small" is judged against the curvature and the
loss scale, with absolute floors, so that a saddle at loss ≈ 0 and a plateau at loss ≈ 1 are
both recognised. History adds **diverged** (the training loss ran away between probes) and
**edge_of_stability** (the sharpness held at the limit over several probes):
:func:`classify_history`.

Adding a state is this module and its test: a member of :class:`State` with the next free code
(codes are append-only: a logged ``state_code`` keeps its meaning), its headline and its advice;
and its rule, in :data:`RULES` at its place in the order (or in :func:`classify_history` when
only history shows it). Nothing else in curvscope lists the states: ``Diagnosis.__str__``, the
advice, the Monitor, the run log's check and the TensorBoard ``state_code`` all read them here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from functools import cached_property
from typing import Any, TypeVar

# ------------------------------------------------------------------------------ thresholds


@dataclass(frozen=True)
class Thresholds:
    """What "small" and "margin" mean. Every number is relative to the *loss scale*
    max(|L|, loss_floor) or to the sharpness s, so that the rules hold at any scale.

    Attributes:
        small_gradient: the gradient is small when the decrease the best step along the
            optimizer's direction d could still buy under the local quadratic, ½·gᵀd/c (c the
            curvature along d; ½‖g‖²/c for gradient descent), is at most this fraction of the
            loss scale.
        direction_floor: c is taken as at least this fraction of max(|λ_max|, |λ_min|).
        gradient_floor: ‖g‖ at or below this is small whatever the scale.
        loss_floor: the loss scale never drops below this (a loss near 0 still has a scale).
        flat_curvature: curvature is negligible when max(|λ_max|, |λ_min|) is at most this
            times the loss scale: with a small gradient, a plateau.
        negative_curvature: τ — with a small gradient, λ_min < −τ·|s| is a saddle.
        small_decrement: at a minimum the quadratic model's bottom, ½δ² (δ² = gᵀH⁻¹g), is at
            most this fraction of the loss scale below the loss.
        margin: "unstable" needs the sharpness above (1 + margin) times the limit.
        confidence: z — an estimate with a standard error (the batch sharpness) exceeds the
            limit's margin only when it does so by more than z standard errors, and sits in
            the edge-of-stability band unless it is z standard errors outside it.
        zero_gradient: when the parameter blocks whose gradient is exactly zero hold at least
            this share of the measured parameters, the verdict says so and its advice reads
            it: the state, sharpness and stable learning rate are then those of the rest (a
            network whose ReLUs all died reads as a minimum of its output bias).
        chance: a loss within this share of the chance loss (``chance_loss``: the best
            prediction that ignores the inputs), or above it, is at chance — nothing learnt from
            the inputs (a 10-layer sigmoid network stuck by vanishing gradients sits at it, within
            1e-6, on digits; logistic regression on a feature that moves P(y = 1) from 0.44 to
            0.56 sits 0.9% below).
    """

    small_gradient: float = 1e-3
    direction_floor: float = 1e-2
    gradient_floor: float = 1e-8
    loss_floor: float = 1e-3
    flat_curvature: float = 1e-2
    negative_curvature: float = 1e-2
    small_decrement: float = 1e-3
    margin: float = 0.1
    confidence: float = 2.0
    zero_gradient: float = 0.5
    chance: float = 0.01

    def __post_init__(self) -> None:
        # a review: zero_gradient=-1 put "go back to a checkpoint" on a 0.8% unused module
        for f in fields(self):
            value = getattr(self, f.name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not (ok and math.isfinite(value) and value >= 0):
                raise ValueError(f"Thresholds.{f.name} must be a finite number >= 0, got {value!r}")
        for name, of in (("zero_gradient", "the parameters"), ("chance", "the chance loss")):
            if getattr(self, name) > 1:
                raise ValueError(
                    f"Thresholds.{name} is a share of {of}, in [0, 1]; got {getattr(self, name)!r}"
                )

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


DEFAULT_THRESHOLDS = Thresholds()

#: History, edge of stability: the sharpness within this fraction of the limit ...
EOS_BAND = 0.15
#: ... at this many consecutive probes ...
EOS_PROBES = 3
#: ... spanning at least this many steps where the probes' steps are known (the Monitor's: its
#: forecast can probe a few steps apart, and a sharpness seen near the limit for three steps in
#: a row has not been *held* there; 20 is the span of three probes at every=10, the cadence the
#: rules were tuned at in benchmarks/verdicts.py) ...
EOS_HOLD = 20
#: ... at a steady learning rate: their stability limits within this fraction of each other
#: (a warm-up that moves the limit down through the sharpness is a crossing, not the edge).
EOS_LIMIT_DRIFT = 0.05
#: History, rule (e): a sharpness above the band, up to EOS_SWING times a steady limit, held
#: for this many steps (and EOS_PROBES probes) while the loss has not risen, is the edge too —
#: five probes at every=10: an overshoot that is instability blows up within fewer
EOS_ABOVE_HOLD = 50
#: History, diverged: a training loss above this multiple of the first loss (or not finite) ...
EXPLOSION = 1e3
#: ... or a mean training loss between two probes above this multiple of its running minimum
#: (of such means) and above the first loss: a run blown up and stuck there (a saturated
#: network whose curvature has collapsed reads as stable steps; the verdict suite's blow-up
#: line is the same 10x).
RAN_AWAY = 10.0
#: History, staying at the edge: once at the edge of stability, a probe whose sharpness swings
#: out of the band, down to EOS_FLOOR or up to EOS_SWING times the limit, ...
EOS_FLOOR = 0.5
EOS_SWING = 3.0
#: ... while the training loss since the previous probe stays, on average, within this multiple
#: of its lowest such average (its running minimum), is still at the edge. Measured in
#: benchmarks/verdicts.py: full-batch gradient descent there swings to 1.2-1.8x the limit on
#: MLPs, CNNs and deep linear networks, to 2.8x on logistic regression at η = 60, and back,
#: while the loss keeps falling (Cohen et al. 2021 report 1.2-1.5x).
EOS_LOSS_RISE = 2.0
#: History, an overshoot absorbed: judged on at least this many losses since the previous
#: probe, whose lowest must lie in the last ABSORB_END of them.
ABSORB_STEPS = 4
ABSORB_END = 2

# ------------------------------------------------------------------------------ the states

#: What a state advises, from the evidence: actionable sentences.
Advise = Callable[[Mapping[str, Any]], list[str]]


class StateEnum(str, Enum):
    """The base of a vocabulary of states (:class:`State` is curvscope's). Each member is a
    string — its name in logs and JSON, so ``state == "learning"`` holds — that carries:

    - ``code``: its number in logged scalars (``state_code``), fixed once given: codes are
      append-only, never reused or renumbered (:func:`unique_codes` checks a vocabulary);
    - ``headline``: the first words of ``str(diagnosis)``;
    - :meth:`advice`: what to do, from the evidence.

    A member is written ``NAME = "name", code, "Headline", advise``.
    """

    _value_: str
    code: int
    headline: str
    _advise: Advise

    def __new__(cls, value: str, code: int, headline: str, advise: Advise) -> StateEnum:
        member = str.__new__(cls, value)
        member._value_ = value
        member.code = code
        member.headline = headline
        member._advise = advise
        return member

    def advice(self, evidence: Mapping[str, Any]) -> list[str]:
        """What to do in this state, with the numbers of ``evidence``."""
        return self._advise(evidence)

    def __str__(self) -> str:  # the name, as in logs (Python 3.12 would print "State.X")
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(self, spec)


_Vocabulary = TypeVar("_Vocabulary", bound=type[StateEnum])


def _groups(ev: Mapping[str, Any], named: float) -> list[str]:
    """Where the advice names the learning rate ``named`` and the optimizer's parameter groups
    step at several rates, which group's it is and how the others go with it: "the largest
    stable learning rate here is 0.507 (now 0.8)" held for the largest group with the others
    scaled alike, and did not say so (the training-loop review)."""
    rates, lr = ev.get("group_lrs"), ev.get("lr")
    if not rates or not lr or not math.isfinite(named):
        return []
    return [
        f"The learning rates named are the largest parameter group's ({lr:.3g}; the groups "
        f"step at {', '.join(f'{r:.3g}' for r in rates)}): scale every group's rate by the "
        f"same factor ({named / lr:.3g}x each). Raising one group's alone moves the limit "
        "another way."
    ]


def unique_codes(vocabulary: _Vocabulary) -> _Vocabulary:
    """Class decorator: refuse a vocabulary in which two states share a code."""
    seen: dict[int, StateEnum] = {}
    for state in vocabulary:
        if not isinstance(state.code, int) or isinstance(state.code, bool) or state.code < 0:
            raise TypeError(
                f"{vocabulary.__name__}.{state.name}: a state's code must be a non-negative "
                f"integer, got {state.code!r}"
            )
        if state.code in seen:
            raise ValueError(
                f"{vocabulary.__name__}.{state.name} and {seen[state.code].name} share the code "
                f"{state.code}: codes are append-only, give the new state the next free one "
                f"({max(seen) + 1})"
            )
        seen[state.code] = state
    return vocabulary


def _threshold(ev: Mapping[str, Any], name: str = "zero_gradient") -> float:
    """The threshold ``name`` the evidence was judged with (or the default)."""
    return float((ev.get("thresholds") or {}).get(name, getattr(Thresholds, name)))


def _dead(ev: Mapping[str, Any], at_least: float | None = None) -> bool:
    """Whether dead units — blocks with neither gradient nor curvature, and no factor still at
    zero they may wait on — hold at least the ``zero_gradient`` share of the parameters."""
    share = ev.get("dead_share")
    at_least = _threshold(ev) if at_least is None else at_least
    dead = bool(ev.get("dead_blocks")) and share is not None and share >= at_least
    return dead and not ev.get("zero_factor_blocks")


def _coupled(ev: Mapping[str, Any], at_least: float | None = None) -> bool:
    """Whether blocks with no gradient hold at least the ``zero_gradient`` share and are not dead
    units: a factor still at zero holds them (the curvature couples them to it, or they wait on
    it)."""
    at_least = _threshold(ev) if at_least is None else at_least
    share = ev.get("zero_gradient_share")
    judged = ev.get("dead_share") is not None
    return judged and share is not None and share >= at_least and not _dead(ev, at_least)


def at_chance(ev: Mapping[str, Any], share: float | None = None) -> bool:
    """Whether the loss is at chance: within ``share`` (default the evidence's
    ``Thresholds.chance``) of the chance loss or above it, where there is one and it is above 0
    (targets that never vary leave nothing to learn). Relative, so in any units (a floor of
    1e-3 missed a regression on daily returns, a variance of 1e-4: a review)."""
    loss, chance = ev.get("loss"), ev.get("chance_loss")
    if loss is None or chance is None or not (_finite(loss) and _finite(chance)):
        return False
    share = _threshold(ev, "chance") if share is None else share
    return chance > 0 and loss >= (1 - share) * chance


def _chance_sentence(ev: Mapping[str, Any], small: bool, share: float) -> str:
    said = (
        f"the loss ({ev['loss']:.4g}) is within {share:.0%} of the chance loss, what the best "
        f"prediction that ignores the inputs gives here (the label frequencies, or the "
        f"targets' means: {ev['chance_loss']:.4g}), or above it"
    )
    if small:
        return said + ": the model predicts next to nothing from its inputs"
    return said + ": nothing learnt from the inputs yet (as at initialisation)"


def _named(blocks: list[str]) -> str:
    return ", ".join(blocks[:3]) + (f" and {len(blocks) - 3} more" if len(blocks) > 3 else "")


def _silent_sentence(ev: Mapping[str, Any], at_least: float) -> str | None:
    """The verdict's sentence on blocks with exactly zero gradient, where they hold at least the
    ``zero_gradient`` share of the parameters: dead units, or a factor still at zero."""
    dead = list(ev.get("dead_blocks") or [])
    factors = list(ev.get("zero_factor_blocks") or [])
    coupled = [b for b in ev.get("zero_gradient_blocks") or [] if b not in dead + factors]
    if _dead(ev, at_least):
        said = (
            f"{100 * ev['dead_share']:.4g}% of the parameters ({_named(dead)}) get exactly "
            "zero gradient and curvature on this data: the verdict's curvature and learning "
            "rates are those of the rest"
        )
        return said + (f"; the curvature couples {_named(coupled)} to it" if coupled else "")
    if not _coupled(ev, at_least):
        return None
    said = f"{100 * ev['zero_gradient_share']:.4g}% of the parameters get exactly zero gradient"
    if coupled:
        held = (
            f"a factor still at zero ({_named(factors)})"
            if factors
            else "something still at zero (a zero-initialized layer or bias, a LoRA adapter's "
            "B, an activation that is 0)"
        )
        said += (
            f" on this data, but the curvature couples {_named(coupled)} to the rest: {held} "
            "that moves them once it moves"
        )
    else:
        said += " on this data"
    if dead:
        said += f"; {_named(dead)} get no curvature either: " + (
            f"dead units, or waiting on {_named(factors)} (two factors at zero in series, as "
            "in a Fixup network, leave the layers before them none until both move)"
            if factors
            else "dead units"
        )
    return said


def _heed_silent(advise: Advise, alone: bool = False) -> Advise:
    """``advise``, with what to do about dead units first where they hold most of the
    parameters: no learning rate moves them. ``alone``: that advice instead of the state's own
    (a minimum's "stop", a plateau's "a larger learning rate", learning's stable rate:
    none holds for them)."""

    def advice(ev: Mapping[str, Any]) -> list[str]:
        if not _dead(ev):
            return advise(ev)
        return [
            f"{100 * ev['dead_share']:.4g}% of the parameters get neither gradient nor "
            "curvature, so no learning rate moves them. After a loss spike this is a network "
            "a step killed (ReLUs that output 0 for every input: the rest is a minimum of the "
            "output bias, not a fit): go back to a checkpoint from before the spike and lower "
            "the learning rate, or clip. "
            "Otherwise look for what cuts the gradient off: a detach, saturated units, "
            "parameters the loss does not use.",
            *([] if alone else advise(ev)),
        ]

    return advice


def _learning_advice(ev: Mapping[str, Any]) -> list[str]:
    s, lr, stable = ev.get("sharpness"), ev.get("lr"), ev.get("stable_lr")
    if stable is not None and s is not None and s > 0 and lr:
        if lr > stable:  # past the limit within the margin: "stable" contradicted the numbers
            return [  # (gradient descent 5% past its limit diverged: an outside review)
                f"The learning rate is {lr / stable:.3g}x the largest stable one here "
                f"({stable:.3g}, now {lr:.3g}): within the margin the verdict allows for the "
                "estimates' error, but if the sharpness stays, steps along the sharpest "
                "direction grow and the run will turn unstable: lower it below that to be sure.",
                *_groups(ev, stable),
            ]
        caveat = (
            " For an adaptive optimizer that limit holds for its present preconditioner, which a "
            "larger learning rate changes with the steps: raise it gradually, not to the limit."
            if ev.get("preconditioned") and stable > 2 * lr
            else ""
        )  # Adam at 38x its lr, as said, peaked at 1,296x its loss (an outside review)
        if _coupled(ev) and stable > 2 * lr and not caveat:
            # a zero-initialized head: 0.5x the rate named at initialisation took the loss to
            # 78 and left the network at chance (a review)
            caveat = (
                " Most of the parameters have no curvature yet (a factor still at zero): that "
                "limit holds for this point, and falls as they start to move — raise the "
                "learning rate gradually, not to the limit."
            )
        return [
            f"Steps are stable; the largest stable learning rate here is {stable:.3g} "
            f"(now {lr:.3g}).{caveat}",
            *_groups(ev, stable),
        ]
    return []


def _unstable_advice(ev: Mapping[str, Any]) -> list[str]:
    lr, stable = ev.get("lr"), ev.get("stable_lr")
    clip, limit = ev.get("clip_factor"), ev.get("stability_limit")
    # the largest curvature the steps meet (the sharpness, or along the last update or the step
    # direction), each as a step meets it
    met = (
        effective_sharpness(ev),
        step_scaled(ev, ev.get("sharpness")),  # (what _too_sharp judges beside the batch's)
        step_scaled(ev, ev.get("update_curvature")),
        step_scaled(ev, ev.get("directional_curvature")),
    )
    worst = max((c for c in met if c is not None and math.isfinite(c)), default=0.0)
    tips = []
    if stable is not None and lr:
        along = lr * limit / worst if limit and math.isfinite(limit) and worst > 0 else stable
        if along < stable:  # the step decided, not the sharpness: its rate, or "lower it below
            # 0.9" was said at 0.5 (a review)
            tips.append(
                f"The largest stable learning rate along the steps taken here is {along:.3g} "
                f"(now {lr:.3g}; the sharpness alone allows {stable:.3g}): lower it below "
                "that, or warm it up."
            )
        else:
            tips.append(
                f"The largest stable learning rate here is {stable:.3g} (now {lr:.3g}): lower "
                "it below that, or warm it up."
            )
        tips += _groups(ev, min(along, stable))
    if clip is not None and limit is not None:
        # a clipped run: clip harder — by that curvature against the limit, where the norm
        # clipped (at s = 1 the present max_norm is above the gradient's: no multiple of it)
        by = f" (about {limit / worst:.2g}x the present one)" if clip < 1 and worst > limit else ""
        return [
            *tips,
            f"Or clip harder: the steps took s = {clip:.3g} of the gradient; a smaller "
            f"max_grad_norm{by} holds them below the limit. A curvature-aware optimizer "
            "(trust-region Newton-CG) also keeps steps from overshooting.",
        ]
    return [
        *tips,
        "A curvature-aware optimizer (trust-region Newton-CG) or gradient "
        "clipping also keeps steps from overshooting.",
    ]


def _edge_advice(ev: Mapping[str, Any]) -> list[str]:
    return [
        "Training is at the edge of stability: the learning rate, not the curvature, is "
        "setting the sharpness. This is normal for full-batch and large-batch training; "
        "lowering the learning rate lets the sharpness rise again, and a rising loss trend "
        "would mean it has tipped over."
    ]


def _flat_advice(ev: Mapping[str, Any]) -> list[str]:
    loss, floor = ev.get("loss"), DEFAULT_THRESHOLDS.loss_floor
    if loss is not None and 0 <= loss <= floor:
        # a separable logistic regression at 5e-11 was told to cross a plateau faster and to
        # look for dead units (an outside review): at a loss of zero nothing is left to cross
        return [
            f"The loss is about zero ({loss:.3g}, below {floor:g}): where it cannot go below "
            "zero (cross-entropy, squared error) the model fits this data as well as it can, "
            "and the gradient and curvature are tiny because nothing is left to learn — not a "
            "plateau to cross. With separable classes the loss has no finite minimum and "
            "further steps only grow the weights: stop, or add weight decay to make one."
        ]
    lr, stable = ev.get("lr"), ev.get("stable_lr")
    faster = (
        "a larger learning rate, momentum or normalized gradient descent crosses a plateau faster"
    )
    if stable is not None and lr and math.isfinite(stable):
        # "a larger learning rate" was said at 0.9x the limit, and within the margin past it
        faster = (
            f"a larger learning rate (up to {stable:.3g}, the largest stable one here; now "
            f"{lr:.3g}), momentum or normalized gradient descent crosses a plateau faster"
            if stable > lr
            else "momentum or normalized gradient descent crosses a plateau faster (not a "
            f"larger learning rate: {lr:.3g} is at or past the largest stable one, {stable:.3g})"
        )
    said = [
        f"Gradients and curvature are both tiny: {faster}; check for saturated or dead units "
        "and for a vanishing loss signal.",
        *(_groups(ev, stable) if stable is not None and lr and stable > lr else []),
    ]
    return [_at_chance_advice(), *said] if at_chance(ev) else said


def _saddle_advice(ev: Mapping[str, Any]) -> list[str]:
    return [
        f"Escape along the negative-curvature direction (λ_min = {ev['lambda_min']:.3g}, "
        "its eigenvector is in diagnosis.vectors['bottom']): use saddle-free Newton or "
        "cubic-regularized Newton, or add noise or momentum."
    ]


def _at_chance_advice() -> str:
    return (
        "A loss at chance: the model predicts next to nothing from its inputs beyond what the "
        "targets' frequencies (or means) give. Unless the targets barely depend on the inputs "
        "(then this is the best fit there is), look for what keeps the inputs from the loss — "
        "vanishing gradients (a deep stack of sigmoid or tanh units without normalization or "
        "residual connections: compare the first layers' gradient norms with the last's), dead "
        "units, inputs that do not reach the model — rather than for a learning rate."
    )


def _minimum_advice(ev: Mapping[str, Any]) -> list[str]:
    if at_chance(ev):  # a 10-layer sigmoid network stuck at ln 10 read "stop" (a review)
        return [_at_chance_advice()]
    return [
        "Converged to a minimum: further steps only fine-tune. Lower the learning rate "
        "to settle, or stop."
    ]


def _diverged_advice(ev: Mapping[str, Any]) -> list[str]:
    clipped = ev.get("clip_factor") is not None
    clip = "clip harder: a smaller max_grad_norm" if clipped else "clip gradients"
    advice = [
        f"Restore the last good checkpoint and lower the learning rate (or {clip}); look for "
        "NaN/Inf in the data and for overflow in the model."
    ]
    curvature = (ev.get("sharpness"), ev.get("batch_sharpness"))
    if _finite(ev.get("loss")) and _finite(ev.get("grad_norm")) and _overflowed(*curvature):
        advice.append(  # (a model at its initialisation read "restore the last good checkpoint")
            "If the loss has not risen, look for an operation without a second derivative "
            "here instead: torch.autograd.detect_anomaly() around the call names the one whose "
            "backward returned NaN (x.norm() of a zero vector, sqrt(0)); add an epsilon there."
        )
    return advice


@unique_codes
class State(StateEnum):
    """Which state training is in (the definitions: DESIGN.md, "The states, defined").

    A string enum: ``State.UNSTABLE == "unstable"``, and it is written to logs and JSON as
    ``"unstable"``. Each state knows its ``code`` (append-only), ``headline`` and
    :meth:`~StateEnum.advice`.
    """

    LEARNING = "learning", 0, "Learning", _heed_silent(_learning_advice, alone=True)
    UNSTABLE = (
        "unstable",
        1,
        "Unstable: the step overshoots sharp curvature",
        _heed_silent(_unstable_advice),
    )
    EDGE_OF_STABILITY = (
        "edge_of_stability",
        2,
        "At the edge of stability",
        _heed_silent(_edge_advice),
    )
    FLAT = "flat", 3, "Flat: a plateau", _heed_silent(_flat_advice, alone=True)
    SADDLE = "saddle", 4, "At a saddle point", _heed_silent(_saddle_advice)
    MINIMUM = "minimum", 5, "At a minimum", _heed_silent(_minimum_advice, alone=True)
    DIVERGED = "diverged", 6, "Diverged", _diverged_advice


#: The states, in definition order (``"learning" in STATES`` holds). Their numbers in logs are
#: their ``code``, not their place here.
STATES: tuple[State, ...] = tuple(State)
_BY_NAME: dict[str, State] = {state.value: state for state in State}


def as_state(state: object) -> StateEnum:
    """A state of a vocabulary as it is, or the :class:`State` named by a string.

    Raises:
        ValueError: a string that names no state (the message lists them).
        TypeError: neither a state nor a string.
    """
    if isinstance(state, StateEnum):
        return state
    if isinstance(state, str):
        if state not in _BY_NAME:
            raise ValueError(
                f"unknown state {state!r}: expected one of {', '.join(STATES)} (a new state is "
                "a member of curvscope.diagnosis.State, with its rule in classify.RULES)"
            )
        return _BY_NAME[state]
    raise TypeError(f"a state is a curvscope.diagnosis.State or its name, got {state!r}")


# ---------------------------------------------------------------------------- the evidence


def _always(**kw: Any) -> Any:
    """A field that is always in the evidence mapping (None where undefined)."""
    return field(metadata={"always": True}, **kw)


def _with(stage: str) -> Any:
    """A field in the mapping once the measurement it belongs to was made (``stage`` is not
    None), even where its own value is None (undefined)."""
    return field(default=None, metadata={"with": stage})


@dataclass(frozen=True, eq=False)
class Evidence(Mapping[str, Any]):
    """The numbers behind a diagnosis: a typed, read-only record that is also the mapping
    DESIGN.md promises — ``d.evidence["sharpness"]``, ``d.evidence.get("stable_lr")``,
    ``dict(d.evidence)``, ``**d.evidence`` (the run log's records) — and reads as attributes,
    ``d.evidence.sharpness``.

    Which keys the mapping holds says what was measured. The contract keys (:data:`ALWAYS`:
    loss, grad_norm, sharpness, lambda_min, stability_limit, directional_curvature,
    newton_decrement, matvecs, and lr and limit_constant) are always there, None where
    undefined. Every other field is there when it holds a value, or when the measurement it
    belongs to was made: ``decrement_converged`` (None: CG was not run or met negative
    curvature) with the curvature (``eigen_converged``), ``batch_sharpness`` and its stderr
    (None: no batch gave one) with ``batches``. Past a non-finite loss nothing else is measured;
    without ``train_batches`` no batch sharpness. Keys the record does not know (``extra``)
    follow, as given. Equality is the mapping's.

    Attributes:
        loss: the data loss L (NaN if it could not be computed).
        grad_norm: ‖g‖ of the objective the optimizer steps on (data loss plus L2).
        sharpness: λ_max of the curvature the optimizer sees (preconditioned for Adam).
        lambda_min: its most negative (smallest) eigenvalue.
        stability_limit: s* = c/η, or None without an optimizer or learning rate.
        directional_curvature: c = dᵀHd/gᵀd along the step direction d (None if gᵀd ≤ 0).
        newton_decrement: δ² = gᵀH⁻¹g (None where CG meets negative curvature).
        matvecs: curvature products spent (and one per train batch).
        lr: the reference learning rate η; limit_constant: c in s* = c/η.
        group_lrs: the optimizer's parameter groups' learning rates, largest first, where they
            differ (η is the largest): ``stable_lr`` is then η's, with every group's rate
            scaled by the same factor.
        optimizer: the optimizer in words; preconditioned: whether the sharpness is
            preconditioned; thresholds: the :class:`Thresholds` as a dict.
        sharpness_residual, lambda_min_residual, eigen_converged: Lanczos's quality.
        layer_shares: each parameter block's share of the top eigenvector.
        grad_dot_step: gᵀd; decrement_converged: whether CG converged (on the damped
            curvature where it gave ``damped_decrement``).
        damped_decrement, decrement_damping: where CG met negative curvature (no
            ``newton_decrement``), δ_σ² = bᵀ(M + σI)⁻¹b with σ the damping, 2(|λ_min| + its
            residual), in the optimizer's metric (M = S^½HS^½, b = S^½g; H and g without
            step factors): what a *minimum* reads in the Newton decrement's place.
        batch_sharpness, batch_sharpness_stderr, batches: the mini-batch sharpness, its
            standard error and the batches it was measured on.
        update_curvature: the curvature along the optimizer's last update u, uᵀHu / uᵀS⁻¹u
            (S the optimizer's step factors; ‖u‖² for SGD), measured by the Monitor's cheap
            tier between probes (present when the probe follows one).
        stable_lr: the largest stable learning rate at this sharpness (and, where measured,
            this batch sharpness: below both).
        step_share: for a summed loss with ``train_batches``, B/N: the training batches'
            mean sample count B over the N samples of ``data``. A step of B samples on a
            summed loss meets B/N of the sum's curvature over N, so the stability rules judge
            the full-batch curvatures (the sharpness, along the step and along the last
            update) times it (:func:`step_scaled`); the fields keep the values measured.
            Under a process group divided by the R data-parallel ranks whose gradients a step
            averages (DDP, FSDP): 1/R without training batches.
        clip_factor: the fraction s of the gradient the optimizer was given (gradient
            clipping; the Monitor's median since the previous probe), when it was told
            (``diagnose(..., clip_factor=s)``): the stability limit is then c/(s·η).
        seconds: the wall time of the diagnosis.
        unscaled_coordinates: coordinates the preconditioner has not scaled yet (Adam's v
            still exactly 0), left out of the preconditioned sharpness.
        zero_gradient_share, zero_gradient_blocks: the parameter blocks whose gradient of the
            data loss is exactly zero in every entry (dead units, a factor still at zero,
            parameters the loss does not use), and the share of the parameters they hold —
            where they hold at least the ``zero_gradient`` threshold's share, those with
            curvature of their own left out (a block at its own stationary point).
        dead_share, dead_blocks: where those blocks still hold that share, the ones with no
            curvature at all (judged from products with random vectors): dead units, which no
            step moves; the others are coupled to the rest — a factor still at zero that moves
            them once it moves. None where not judged.
        zero_factor_blocks: where judged, the measured weights (two or more dimensions, or one
            number) whose values are all 0: factors still at zero — with one, blocks without
            curvature may be waiting on it rather than dead (two zero factors in series, as in
            a Fixup network, leave the layers before them none until both move).
        chance_loss: the loss of the best prediction that ignores the inputs, on the same data
            (the label frequencies' entropy for cross-entropy, the targets' mean variance for
            squared error, the binary entropy at each coordinate's mean for binary
            cross-entropy: :mod:`curvscope.diagnosis.chance`), where the loss has such a closed
            form; a loss within ``Thresholds.chance`` (1%) of it, or above, is at chance.
        extra: any other keys (not produced by curvscope).
    """

    loss: float = _always()
    grad_norm: float = _always()
    sharpness: float | None = _always(default=None)
    lambda_min: float | None = _always(default=None)
    stability_limit: float | None = _always(default=None)
    directional_curvature: float | None = _always(default=None)
    newton_decrement: float | None = _always(default=None)
    matvecs: int | None = _always(default=None)
    lr: float | None = _always(default=None)
    limit_constant: float | None = _always(default=None)
    group_lrs: list[float] | None = None
    optimizer: str | None = None
    preconditioned: bool | None = None
    thresholds: dict[str, float] | None = None
    sharpness_residual: float | None = None
    lambda_min_residual: float | None = None
    eigen_converged: bool | None = None
    layer_shares: dict[str, float] | None = None
    grad_dot_step: float | None = None
    decrement_converged: bool | None = _with("eigen_converged")
    batch_sharpness: float | None = _with("batches")
    batch_sharpness_stderr: float | None = _with("batches")
    batches: int | None = None
    update_curvature: float | None = None
    stable_lr: float | None = None
    step_share: float | None = None
    clip_factor: float | None = None
    seconds: float | None = None
    unscaled_coordinates: int | None = None
    zero_gradient_share: float | None = None
    zero_gradient_blocks: list[str] | None = None
    dead_share: float | None = None
    dead_blocks: list[str] | None = None
    zero_factor_blocks: list[str] | None = None
    chance_loss: float | None = None
    damped_decrement: float | None = None
    decrement_damping: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, evidence: Mapping[str, Any]) -> Evidence:
        """The record of a mapping (an :class:`Evidence` is returned as it is): the known
        keys become fields, the others ``extra``.

        Raises:
            ValueError: ``loss`` or ``grad_norm`` is missing.
        """
        if isinstance(evidence, Evidence):
            return evidence
        missing = [k for k in ("loss", "grad_norm") if k not in evidence]
        if missing:
            raise ValueError(
                f"evidence needs {' and '.join(missing)}; got the keys {sorted(evidence)}"
            )
        known = {k: v for k, v in evidence.items() if k in _FIELDS}
        extra = {k: v for k, v in evidence.items() if k not in _FIELDS}
        return cls(**known, extra=extra)

    def _present(self, key: str) -> bool:
        meta = _FIELDS[key]
        if meta.get("always") or getattr(self, key) is not None:
            return True
        stage = meta.get("with")
        return stage is not None and getattr(self, stage) is not None

    def __getitem__(self, key: str) -> Any:
        if key not in _FIELDS:
            return self.extra[key]
        if not self._present(key):
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        yield from (key for key in _FIELDS if self._present(key))
        yield from self.extra

    def __len__(self) -> int:
        return sum(1 for _ in self)


#: Each field of an :class:`Evidence` (but ``extra``), in order, with its presence rule.
_FIELDS: dict[str, Mapping[str, Any]] = {
    f.name: f.metadata for f in fields(Evidence) if f.name != "extra"
}
#: The evidence keys always in the mapping, None where undefined: the DESIGN.md contract, and
#: the learning rate and limit constant the stability limit came from.
ALWAYS: tuple[str, ...] = tuple(k for k, meta in _FIELDS.items() if meta.get("always"))

# ------------------------------------------------------------------------------- the rules


class Facts:
    """The evidence of one probe with what the rules share, derived once (lazily, so that
    a non-finite loss reaches the diverged rule before any arithmetic on it).

    Attributes:
        evidence, thresholds: as given; loss, g (‖g‖), s (λ_max), lmin (λ_min), limit (s*),
        lr, const (c in s* = c/η), bs (batch sharpness) and bs_se (its standard error, 0
        where not finite), c_dir (curvature along the step), c_update (along the last
        update), dec (δ²): read from the evidence (None where absent).
    """

    def __init__(self, evidence: Mapping[str, Any], thresholds: Thresholds) -> None:
        self.evidence, self.th = evidence, thresholds
        self.loss, self.g = evidence["loss"], evidence["grad_norm"]
        self.s, self.lmin = evidence.get("sharpness"), evidence.get("lambda_min")
        self.limit = evidence.get("stability_limit")
        self.lr, self.const = evidence.get("lr"), evidence.get("limit_constant")
        clip = evidence.get("clip_factor")
        self.clip: float = 1.0 if clip is None else clip
        self.bs = evidence.get("batch_sharpness")
        #: the full-batch sharpness as a training step meets it (:func:`step_scaled`)
        self.step_s = step_scaled(evidence, self.s)
        se = evidence.get("batch_sharpness_stderr")
        self.bs_se: float = _stderr_of(se)
        self.c_update = evidence.get("update_curvature")
        self.c_dir = evidence.get("directional_curvature")
        self.dec = evidence.get("newton_decrement")
        #: where CG met negative curvature, the decrement of the damped curvature in its place
        self.damped: float | None = evidence.get("damped_decrement")

    def overshoots(self, value: float | None, se: float = 0.0) -> bool:
        """Whether ``value`` (a curvature the steps meet) exceeds the stability limit by more
        than the margin — an estimate with standard error ``se`` by more than
        ``confidence`` standard errors beyond it."""
        if self.limit is None or value is None:
            return False
        return value - self.th.confidence * se > (1 + self.th.margin) * self.limit

    @cached_property
    def unstable(self) -> bool:
        """Whether the steps overshoot: the sharpness, or the batch sharpness, past the limit by
        the margin. A state of a small gradient (flat, saddle, minimum) is one the optimizer can
        stay in only where they do not: past the limit its steps blow up along the sharpest
        direction, and that is instability (a review: a least-squares minimum at 1.5x and 3x
        the limit read *flat*, "a larger learning rate", and a saddle at 2x and 4x *saddle*,
        "add noise or momentum"; gradient descent there reached 3e31, or NaN)."""
        return self.overshoots(self.step_s) or self.overshoots(self.bs, self.bs_se)

    @cached_property
    def scale(self) -> float:
        """The loss scale max(|L|, loss_floor)."""
        return max(abs(self.loss), self.th.loss_floor)

    @cached_property
    def curv(self) -> float:
        """The extreme curvature max(|λ_max|, |λ_min|)."""
        return max(abs(self.s or 0.0), abs(self.lmin or 0.0))

    @cached_property
    def buyable(self) -> float:
        """The decrease the best step along the optimizer's direction d can still buy under
        the local quadratic, ½·gᵀd/c (d = g for gradient descent: ½‖g‖²/c), with c the
        curvature along d, floored at a fraction of the extreme curvature (along a direction
        with almost none, the quadratic model stops being a guide)."""
        gd = self.evidence.get("grad_dot_step")
        gd = self.g * self.g if gd is None or not _finite(gd) else abs(gd)
        along = self.curv if self.c_dir is None else abs(self.c_dir)
        return 0.5 * gd / max(along, self.th.direction_floor * self.curv, 1e-300)

    @cached_property
    def small(self) -> bool:
        """Whether the gradient is small (at the floor, or buys little)."""
        th = self.th
        return self.g <= th.gradient_floor or self.buyable <= th.small_gradient * self.scale

    @property
    def clipping(self) -> str | None:
        """The sentence on gradient clipping, when it moved a limit there is (not the NaN of an
        optimizer state that is not finite)."""
        if self.clip == 1.0 or self.limit is None or not math.isfinite(self.limit):
            return None
        return (
            f"gradient clipping gives the optimizer s = {self.clip:.3g} of the gradient: the "
            f"limit is that of the rate s·η, {self.limit:.4g}"
        )

    @property
    def silent(self) -> str | None:
        """The sentence on parameter blocks with exactly zero gradient, where they hold at
        least the ``zero_gradient`` share of the parameters."""
        return _silent_sentence(self.evidence, self.th.zero_gradient)

    @property
    def chance(self) -> str | None:
        """The sentence on a loss at chance (:func:`at_chance`): with a small gradient a
        plateau, saddle or minimum of a model that has learnt nothing from its inputs; with a
        large one, nothing learnt yet (a stuck network on a small probe batch reads *learning*:
        its output bias can still fit that batch's label frequencies)."""
        # judged with the thresholds classify was given, as every other rule is
        share = self.th.chance
        if not at_chance(self.evidence, share):
            return None
        return _chance_sentence(self.evidence, self.small, share)

    @cached_property
    def gradient(self) -> str:
        """The sentence on the gradient every verdict past *diverged* starts with."""
        if not self.small:
            return f"the gradient is not small: ‖g‖ = {self.g:.3g}"
        return (
            f"the gradient is small: ‖g‖ = {self.g:.3g}; a step along it would lower the loss by "
            f"at most {self.buyable:.3g}, ≤ {self.th.small_gradient:g} × loss scale "
            f"{self.scale:.3g}"
        )


#: A rule's test: the reasons (sentences with the numbers) when its case holds, else None.
Test = Callable[[Facts], "list[str] | None"]


@dataclass(frozen=True)
class Rule:
    """One line of the decision: when ``test`` finds its case in the facts, the state is
    ``state``, for the reasons the test returns."""

    state: StateEnum
    test: Test


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


def _overflowed(*curvature: float | None) -> bool:
    """Whether a measured curvature (the sharpness, the batch sharpness) is not finite: its
    products overflowed, or met an operation without a second derivative."""
    return any(c is not None and not math.isfinite(c) for c in curvature)


def _diverged(f: Facts) -> list[str] | None:
    if f.limit is not None and math.isnan(f.limit):  # what diagnose sets it to: see there
        return [
            "the optimizer's state is not finite: a NaN or Inf gradient reached its moments "
            "(its preconditioner has non-finite entries), so its next step writes them into "
            "the parameters"
        ]
    if not (_finite(f.loss) and _finite(f.g)):
        return [f"the loss ({f.loss}) or the gradient norm ({f.g}) is not finite"]
    if _overflowed(f.s, f.bs):
        return [
            f"the loss ({f.loss:.4g}) and the gradient are finite but the curvature is not: "
            "its products (or a training batch's loss, for the batch sharpness) overflowed, as "
            "they do once the parameters have run away — or an operation of the model has no "
            "second derivative at these parameters (a norm, square root or division at 0)"
        ]
    return None


def _flat(f: Facts) -> list[str] | None:
    if not (f.small and f.curv <= f.th.flat_curvature * f.scale) or f.unstable:
        return None
    return [
        f.gradient,
        (
            f"curvature is negligible both ways: max(|λ|) = {f.curv:.3g} ≤ "
            f"{f.th.flat_curvature:g} × loss scale"
        ),
    ]


def _saddle(f: Facts) -> list[str] | None:
    tau = f.th.negative_curvature
    if not (f.small and f.lmin is not None and f.s is not None and f.lmin < -tau * abs(f.s)):
        return None
    if f.unstable:
        return None
    if f.s < 0:  # no state of its own: said, where "a direction curves down" undersold it
        return [
            f.gradient,
            f"and every direction curves down (λ_max = {f.s:.3g} < 0): a local maximum",
        ]
    return [
        f.gradient,
        f"but a direction curves down: λ_min = {f.lmin:.3g} < −{tau:g} × |λ_max| ({abs(f.s):.3g})",
    ]


def _minimum(f: Facts) -> list[str] | None:
    """A small gradient, no direction curving down, the bottom of the local quadratic near —
    and the optimizer stable there (:attr:`Facts.unstable`)."""
    dec = f.dec if f.dec is not None else f.damped
    if not (f.small and (dec is None or 0.5 * dec <= f.th.small_decrement * f.scale)):
        return None
    if f.unstable:
        return None
    # said with its threshold: "no direction curves down" read as absolute beside a lab run
    # whose λ_min was −4.6e-7 of a λ_max 8e-5, "saddle" by stationary_point (a review)
    # with its accuracy (the residual: an eigenvalue lies within it): a −0.077 read +0.008,
    # printed to three digits as if measured (an outside review)
    res = f.evidence.get("lambda_min_residual")
    pm = f" ± {res:.2g}" if res is not None and math.isfinite(res) and res > 0 else ""
    why = (
        "λ_min was not measured"
        if f.lmin is None
        else f"λ_min = {f.lmin:.3g}{pm}: no direction curves down by more than "
        f"{f.th.negative_curvature:g}·|λ_max|"
    )
    if f.dec is not None:
        extra = f"; the bottom of the local quadratic is ½δ² = {0.5 * f.dec:.3g} below"
    elif f.damped is not None:  # CG met slight negative curvature: the damped decrement
        extra = f"; {_damped_sentence(f)}"
    elif f.lmin is not None and f.lmin < 0:  # CG met its negative curvature: no δ (a review)
        extra = (
            "; the local quadratic has no bottom along that slight negative curvature, so how "
            "far the loss is above a minimum is not known"
        )
    else:
        extra = ""
    return [f.gradient, why + extra]


def _batch_overshoots(f: Facts) -> list[str] | None:
    limit, bs, z = f.limit, f.bs, f.th.confidence
    if limit is None or bs is None or not f.overshoots(bs, f.bs_se):
        return None
    return [
        f.gradient,
        (
            f"the batch sharpness {_pm(bs, f.bs_se)} (the curvature each mini-batch step meets "
            f"along its own direction) exceeds the stability limit {limit:.4g} by "
            f"{100 * (bs / limit - 1):.0f}%, more than the {100 * f.th.margin:.0f}% margin by "
            f"over {z:g} standard errors: mini-batch steps overshoot"
        ),
    ]


def _pm(value: float, se: float) -> str:
    """A value with its standard error, "12.3 ± 0.4" (the value alone without one; "(one
    batch)" where it has none to judge by)."""
    if math.isinf(se):
        return f"{value:.4g} (one batch: no standard error)"
    return f"{value:.4g} ± {se:.2g}" if se > 0 else f"{value:.4g}"


def _stderr_of(se: Any) -> float:
    """A batch-sharpness standard error for the rules: 0 when not given (the value taken as
    it is), inf when not finite (one batch: nothing can be judged on it)."""
    if se is None:
        return 0.0
    return float(se) if math.isfinite(se) else math.inf


def _too_sharp(f: Facts) -> list[str] | None:
    limit, s, margin = f.limit, f.step_s, f.th.margin
    if limit is None or s is None or f.s is None or not f.overshoots(s):
        return None
    return [
        f.gradient,
        (
            f"the sharpness {_stepped(f, f.s)} exceeds the stability limit {limit:.4g} by "
            f"{100 * (s / limit - 1):.0f}% (> {100 * margin:.0f}%): steps overshoot"
        ),
    ]


def step_scaled(evidence: Mapping[str, Any], value: float | None) -> float | None:
    """A full-batch curvature as one training step meets it: times ``step_share`` (B/N) for a
    summed loss with training batches, as it is otherwise. A mini-batch run on a summed loss
    read *unstable* at every probe, where the same steps written as a mean loss read
    *learning* (an outside review)."""
    share = evidence.get("step_share")
    return value if value is None or share is None else value * share


def _stepped(f: Facts, value: float) -> str:
    """A full-batch curvature in words, with what a step meets of it where that differs."""
    share = f.evidence.get("step_share")
    if share is None:
        return f"{value:.4g}"
    return (
        f"{value * share:.4g} (a training step's share B/N = {share:.3g} of the summed "
        f"loss's {value:.4g})"
    )


def _step_overshoots(f: Facts) -> list[str] | None:
    c, lr, const = f.c_dir, f.lr, f.const
    if f.small or f.limit is None or f.s is None or c is None or lr is None or const is None:
        return None
    rate, eta, met = lr * f.clip, "η" if f.clip == 1.0 else "s·η", step_scaled(f.evidence, c)
    assert met is not None  # c is not None
    if not rate * met > const:
        return None
    return [
        f.gradient,
        (
            f"along the step direction the curvature is {_stepped(f, c)}: "
            f"{eta}·c = {rate * met:.3g} > {const:.3g}, so the quadratic model predicts "
            "the loss goes up"
        ),
    ]


def _update_overshoots(f: Facts) -> list[str] | None:
    """The step the optimizer actually took overshoots: unstable whatever the gradient's size
    (a small gradient is no settling when the steps along it overshoot)."""
    c, limit = step_scaled(f.evidence, f.c_update), f.limit
    if limit is None or c is None or f.c_update is None or not f.overshoots(c):
        return None
    return [
        f.gradient,
        (
            f"along the optimizer's last update the curvature is {_stepped(f, f.c_update)}, "
            f"{100 * (c / limit - 1):.0f}% above the stability limit {limit:.4g} "
            f"(> {100 * f.th.margin:.0f}%): the next step overshoots along it"
        ),
    ]


def _share(value: float, limit: float) -> str:
    """``value`` as a percentage of ``limit``: whole percents, two significant digits under 1%
    (a sharpness at 0.03% of its limit is not "0%")."""
    share = 100 * value / limit
    return f"{share:.0f}%" if abs(share) >= 1 else f"{share:.2g}%"


#: Why a "learning" verdict says nothing of stability: the limit needs the step's rule.
NOT_JUDGED = (
    "stability not judged: no optimizer or learning rate was given (pass optimizer= or lr=; "
    "--optimizer or --lr on the command line)"
)


def _damped_sentence(f: Facts) -> str:
    """What the damped decrement says (:attr:`Facts.damped`), with its damping."""
    sigma, damped = f.evidence.get("decrement_damping"), f.damped or 0.0
    by = "" if sigma is None else f" by σ = {sigma:.3g}"
    return (
        f"the local quadratic has no bottom along slight negative curvature; damped{by} past "
        f"it, a step would still lower the loss by ½δ_σ² = {0.5 * damped:.3g}"
    )


def _learning(f: Facts) -> list[str] | None:
    if f.small and f.dec is not None:  # no plateau, no saddle, the bottom far: a long valley
        return [
            f.gradient,
            (
                f"but the bottom of the local quadratic is ½δ² = {0.5 * f.dec:.3g} below the "
                f"loss (> {f.th.small_decrement:g} × loss scale): a long, shallow valley"
            ),
        ]
    if f.small and f.damped is not None:  # the same, past slight negative curvature
        return [
            f.gradient,
            f"but {_damped_sentence(f)} (> {f.th.small_decrement:g} × loss scale): not at a "
            "minimum yet",
        ]
    if not f.small and f.limit is None:  # said, not silently skipped
        return [f.gradient, NOT_JUDGED]
    if f.small or f.limit is None or f.s is None or f.step_s is None:
        return [f.gradient]
    if math.isinf(f.limit):  # a learning rate scheduled to 0: no step to overshoot
        if f.lr:  # one so small that c/η overflows (it read "learning rate 0" for 1e-320)
            return [f.gradient, f"learning rate {f.lr:.3g}: no finite stability limit"]
        return [f.gradient, "learning rate 0: no stability limit"]
    stepped, share = _stepped(f, f.s), _share(f.step_s, f.limit)
    full = f"the sharpness {stepped} is {share} of the limit {f.limit:.4g}"
    if f.bs is None:
        return [f.gradient, full]
    batch = (
        f"the batch sharpness {_pm(f.bs, f.bs_se)} is {_share(f.bs, f.limit)} of the limit "
        f"{f.limit:.4g} (the full-batch sharpness {stepped} is {share})"
    )
    return [f.gradient, batch]


#: The decision of one probe, in order: the first rule whose test holds decides. The last one
#: always holds.
RULES: tuple[Rule, ...] = (
    Rule(State.DIVERGED, _diverged),
    Rule(State.UNSTABLE, _update_overshoots),
    Rule(State.FLAT, _flat),
    Rule(State.SADDLE, _saddle),
    Rule(State.MINIMUM, _minimum),
    Rule(State.UNSTABLE, _batch_overshoots),
    Rule(State.UNSTABLE, _too_sharp),
    Rule(State.UNSTABLE, _step_overshoots),
    Rule(State.LEARNING, _learning),
)


def classify(
    evidence: Mapping[str, Any],
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    rules: Sequence[Rule] = RULES,
) -> tuple[StateEnum, list[str]]:
    """Decide the state from the evidence of one probe.

    Args:
        evidence: at least ``loss``, ``grad_norm``, ``sharpness``, ``lambda_min``; optionally
            ``stability_limit`` (s*), ``lr``, ``limit_constant`` (c in s* = c/η),
            ``directional_curvature`` (c = dᵀHd/gᵀd along the step direction d),
            ``grad_dot_step`` (gᵀd; ‖g‖² when absent), ``batch_sharpness`` and
            ``newton_decrement`` (δ², None where H is not positive definite).
        thresholds: the :class:`Thresholds`.
        rules: the decision, in order (default :data:`RULES`); the first whose test holds
            decides.

    Returns:
        (state, reasons): a :class:`State` (a member of the rules' vocabulary), and sentences
        with the numbers that decided.

    Raises:
        ValueError: no rule held (``rules`` must end with one that always holds).
    """
    facts = Facts(evidence, thresholds)
    for rule in rules:
        reasons = rule.test(facts)
        if reasons is not None:
            # (a run that diverged has no "yet": its loss is where its steps threw it)
            chance = None if rule.test is _diverged else facts.chance
            said = (facts.silent, chance, facts.clipping)
            return rule.state, [*reasons, *(r for r in said if r is not None)]
    raise ValueError(
        "no rule decided the state: the last of `rules` must always hold (RULES ends with learning)"
    )


# ------------------------------------------------------------------------------- history


def effective_sharpness(evidence: Mapping[str, Any]) -> float | None:
    """The sharpness that meets the limit: the batch sharpness in mini-batch training."""
    bs = evidence.get("batch_sharpness")
    return bs if bs is not None else step_scaled(evidence, evidence.get("sharpness"))


def _sharpness_name(evidence: Mapping[str, Any]) -> str:
    return "sharpness" if evidence.get("batch_sharpness") is None else "batch sharpness"


def _ran_away(losses: Sequence[float], first_loss: float | None) -> bool:
    top = math.inf if first_loss is None else EXPLOSION * max(abs(first_loss), 1e-12)
    return not all(math.isfinite(v) and v <= top for v in losses)


def _band(evidence: Mapping[str, Any], low: float, high: float, z: float) -> bool:
    """Whether the effective sharpness is within [low, high] times the stability limit, or
    not z standard errors outside it (the batch sharpness is an estimate) — and known to
    within the band's width (an estimate of ± more than that places nothing)."""
    s, limit = effective_sharpness(evidence), evidence.get("stability_limit")
    if s is None or limit is None or not math.isfinite(limit) or limit <= 0:
        return False
    se = (
        evidence.get("batch_sharpness_stderr")
        if evidence.get("batch_sharpness") is not None
        else None
    )
    noise = z * _stderr_of(se)
    if 2 * noise > (high - low) * limit:  # too uncertain to place in the band
        return False
    return s + noise >= low * limit and s - noise <= high * limit


def _near_limit(evidence: Mapping[str, Any], z: float) -> bool:
    return _band(evidence, 1 - EOS_BAND, 1 + EOS_BAND, z)


def _absorbed(
    evidence: Mapping[str, Any], losses: Sequence[float], previous_low: float | None
) -> list[str] | None:
    """The reasons an overshoot is being absorbed, or None: the training losses since the
    previous probe oscillate (rise, and fall after it) and reach their lowest point in their last
    :data:`ABSORB_END` steps, below every earlier loss (``previous_low``), the sharpness above
    the limit but within :data:`EOS_SWING` times it — full-batch training
    above its quadratic stability limit that still learns (the catapult of Lewkowycz et al.
    2020; the edge of stability of Cohen et al. 2021; a stable period-2 orbit whose low points
    fall). A loss that diverges from a quiet start falls monotonically until the growing
    direction shows, and from then on its newest losses are not its lowest."""
    if len(losses) < ABSORB_STEPS or not all(math.isfinite(v) for v in losses):
        return None
    s, limit = effective_sharpness(evidence), evidence["stability_limit"]
    if s is None or not limit < s <= EOS_SWING * limit:  # an overshoot of the sharpness, bounded
        return None
    before = list(losses[:-ABSORB_END]) + ([] if previous_low is None else [previous_low])
    if not (_risen_then_fallen(losses) and min(losses[-ABSORB_END:]) < min(before)):
        return None
    return [
        f"the sharpness {s:.4g} is {s / limit:.2f}x the stability limit {limit:.4g}, yet the "
        f"loss absorbs the overshoot: it oscillates and its last steps reached a new low "
        f"({min(losses):.4g}) — the edge of stability (a catapult), not instability",
        "a loss that stops reaching new lows would be instability",
    ]


def _sharpened_into(
    evidence: Mapping[str, Any],
    past: Sequence[Mapping[str, Any]],
    losses: Sequence[float],
    margin: float,
) -> list[str] | None:
    """The reasons a sharpness that rose past the limit is the edge, or None: at the previous
    probe it was not past it by the margin (not unstable: below it, or, probed a few steps
    earlier by the Monitor's forecast, just over it), it is now within a factor
    :data:`EOS_SWING` of it, and the loss since the previous probe has fallen. Gradient
    descent's own progressive sharpening meets the limit this way and then typically holds the
    sharpness there rather than diverging (Cohen et al. 2021); a quadratic has no sharpening,
    and a learning rate raised past the limit moves the limit, not the sharpness."""
    if not past or len(losses) < 2 or not all(math.isfinite(v) for v in losses):
        return None
    before = past[-1]
    s, limit = effective_sharpness(evidence), evidence["stability_limit"]
    s0, limit0 = effective_sharpness(before), before.get("stability_limit")
    if s is None or s0 is None or limit0 is None:
        return None
    if not (s0 <= (1 + margin) * limit0 and s <= EOS_SWING * limit and losses[-1] < losses[0]):
        return None
    return [
        f"the sharpness rose past the stability limit {limit:.4g} at a steady learning rate "
        f"(from {s0 / limit0:.2f}x at the previous probe to {s / limit:.2f}x) while the loss "
        f"fell ({losses[0]:.4g} to {losses[-1]:.4g}): training's own sharpening meets the "
        "edge of stability, where it holds the sharpness rather than diverging",
        "a loss that rises would be instability",
    ]


#: How many-fold the clip factor may fall across the probes that hold the edge (the gradient's
#: norm grow): a clipped run at its edge, its loss falling, raises it (0.11, 0.15, 0.20, 0.30
#: at the four probes of the README's run).
EOS_CLIP_FALL = 2.0


def _steady(evidence: Mapping[str, Any], past: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the stability limits of ``evidence`` and of the ``past`` probes given are within
    :data:`EOS_LIMIT_DRIFT` of each other: no schedule is moving the limit (a warm-up lowering
    it through the sharpness is a crossing, not the edge). For clipped steps, the limits of
    the rate set, c/η: the clipping's own share moves with the gradient, which is how it holds
    the sharpness at the limit of the clipped rate (an outside review: a clipped run held there
    never read edge_of_stability)."""
    limits = [_limit_of_rate_set(ev) for ev in (evidence, *past)]
    finite = [float(v) for v in limits if v is not None and math.isfinite(v)]
    if not (len(finite) == len(limits) and max(finite) <= (1 + EOS_LIMIT_DRIFT) * min(finite)):
        return False
    # and the clip factor not fallen more than EOS_CLIP_FALL-fold since those probes: a
    # gradient whose norm grew that much, clipped ever harder, holds no edge (an outside
    # review's synthetic run)
    clips = [ev.get("clip_factor") for ev in (evidence, *past)]
    known = [c for c in clips[1:] if c is not None]
    return clips[0] is None or not known or clips[0] * EOS_CLIP_FALL >= max(known)


def _limit_of_rate_set(evidence: Mapping[str, Any]) -> float | None:
    """The stability limit of the learning rate as set, c/η: ``stability_limit`` times the clip
    factor s where the steps were clipped (their limit is c/(s·η))."""
    limit, clip = evidence.get("stability_limit"), evidence.get("clip_factor")
    return limit if limit is None or clip is None else limit * clip


def _rose(losses: Sequence[float], best_loss: float | None, floor: float) -> bool:
    """Whether the mean training loss since the previous probe has risen above its running
    minimum ``best_loss`` by more than (:data:`EOS_LOSS_RISE` − 1) times max(|best_loss|,
    ``floor``) — twice it, for a positive loss; a loss that can be negative (a Gaussian
    negative log-likelihood) is measured on the same scale. (Not a loss that merely climbs
    for a while: at the edge of stability it climbs over tens of steps — gd-mse-edge in
    benchmarks/verdicts.py, 1.45x over 10 — and falls back.)"""
    return _risen_mean(losses, best_loss, EOS_LOSS_RISE, floor) is not None


def _risen_mean(
    losses: Sequence[float], best_loss: float | None, factor: float, floor: float
) -> float | None:
    """The mean of ``losses`` where it has risen above ``best_loss`` by more than
    (``factor`` − 1) times max(|best_loss|, ``floor``) — ``factor`` times it, for a positive
    loss; a loss that can be negative is measured on the same scale — else None."""
    mean = _window_mean(losses)
    if mean is None or best_loss is None:
        return None
    return mean if _risen(mean, best_loss, factor, floor) else None


def _risen(value: float, low: float, factor: float, floor: float) -> bool:
    """Whether ``value`` is above ``low`` by more than (``factor`` − 1) times max(|low|,
    ``floor``): ``factor`` times it, for a positive loss; a loss that can be negative is
    measured on the same scale."""
    return value - low > (factor - 1) * max(abs(low), floor)


def _loss_trend(losses: Sequence[float]) -> str:
    """The training losses since the previous probe, in words."""
    if len(losses) < 2:
        return "no training loss since the previous probe to judge by"
    fell = losses[-1] < losses[0]
    if _rises_and_falls(losses):
        return "the loss falls, not monotonically" if fell else "the loss swings without falling"
    return "the loss still falls" if fell else "the loss does not fall"


def _risen_then_fallen(losses: Sequence[float]) -> bool:
    """Whether the losses rose at some step and fell at a later one: an overshoot absorbed. A
    loss that fell at every step and rose at the last only is a divergence turning up (on a
    quadratic at 1.25x the limit, started with little of the top eigenvector, the losses
    0.0290, 0.0259, 0.0265 read *edge of stability*, "this is normal", its last probe before
    the blow-up: an outside review)."""
    diffs = [b - a for a, b in itertools.pairwise(losses)]
    first_rise = next((i for i, d in enumerate(diffs) if d > 0), None)
    return first_rise is not None and any(d < 0 for d in diffs[first_rise + 1 :])


def _rises_and_falls(losses: Sequence[float]) -> bool:
    diffs = [b - a for a, b in itertools.pairwise(losses)]
    return any(d > 0 for d in diffs) and any(d < 0 for d in diffs)


def explosion_base(first_loss: float | None, first_mean: float | None) -> float | None:
    """What a single training loss is held against for :data:`EXPLOSION`: the run's first
    loss, or once a mean of the training losses between two probes is known, the larger of
    the first loss and the first such mean. One batch's loss can be far below the run's level:
    fine-tuning an accurate classifier one sample a step, a first loss of 1e-4 put the limit at
    0.1, under one mislabelled sample's loss."""
    if first_loss is None or first_mean is None or not math.isfinite(first_mean):
        return first_loss
    # by magnitude, as the limit reads it: a negative log-likelihood's first loss of -3 and a
    # mean of 0.002 put the limit at 2 (taken as the larger signed value: a review)
    return first_mean if abs(first_mean) > abs(first_loss) else first_loss


def _loss_diverged(
    losses: Sequence[float],
    first_loss: float | None,
    best_loss: float | None,
    floor: float,
    first_mean: float | None = None,
) -> list[str] | None:
    """The reasons the training losses since the previous probe say *diverged*, or None: one
    not finite or above :data:`EXPLOSION` times the first (:func:`explosion_base`), or their
    mean stuck far above the running minimum (:func:`_stuck_high`)."""
    base = explosion_base(first_loss, first_mean)
    if _ran_away(losses, base):
        if base is None:
            return ["the training loss is not finite"]
        what = "its first value" if base == first_loss else "its mean before the first probe"
        return [
            f"the training loss ran away: above {EXPLOSION:g} times {what} {base:.3g}, or not "
            "finite"
        ]
    return _stuck_high(losses, best_loss, first_loss, floor)


def _stuck_high(
    losses: Sequence[float], best_loss: float | None, first_loss: float | None, floor: float
) -> list[str] | None:
    """The reasons a run's loss ran away and stayed there, or None: the mean training loss
    since the previous probe is above :data:`RAN_AWAY` times the lower of its running minimum
    ``best_loss`` and its first value (measured as :func:`_rose` measures a rise), as are three
    quarters of the window's recent half (:func:`_mostly_above`: of the whole window, a run
    climbing from 2.2 to 1500 over its last 7 of 10 losses read *learning*, a review), and
    above the first loss. The first value counts because a run can blow up before its first
    probe: its windows' means are then all high, and a 100x blow-up read as *learning* at every
    probe (an outside review)."""
    if first_loss is None:
        return None
    low = first_loss if best_loss is None else min(best_loss, first_loss)
    mean = _risen_mean(losses, low, RAN_AWAY, floor)
    recent = losses[len(losses) // 2 :]  # a blow-up late in the window: its recent half
    if mean is None or mean <= first_loss or not _mostly_above(recent, low, floor):
        return None
    above = (
        f"its first value {first_loss:.4g}"
        if low == first_loss
        else f"its lowest such mean {low:.4g} and above its first value {first_loss:.4g}"
    )
    return [
        f"the training loss ran away: its mean since the previous probe, {mean:.4g}, is above "
        f"{RAN_AWAY:g} times {above}",
        "stable-looking curvature there (a network blown into saturation has little) does not "
        "make it learning",
    ]


def _mostly_above(losses: Sequence[float], low: float, floor: float) -> bool:
    """Whether three quarters of the finite ``losses`` are above :data:`RAN_AWAY` times ``low``
    (:func:`_risen`): a run blown up and stuck there has its losses high, the lowest quarter
    too; a mean lifted by a few large batch losses is noise. A first loss is one batch's: a
    lucky one (0.0095 for a fine-tuned network whose batches of 8 average 0.05, one in twenty
    holding a noisy label at a loss of 5) made a healthy fine-tuning read *diverged*, "restore
    the last good checkpoint", at 6 of 45 probes (an outside review; √10 in place of 10 still
    read 1 of them)."""
    finite = sorted(v for v in losses if math.isfinite(v))
    return bool(finite) and _risen(finite[len(finite) // 4], low, RAN_AWAY, floor)


def _window_mean(losses: Sequence[float]) -> float | None:
    finite = [v for v in losses if math.isfinite(v)]
    return sum(finite) / len(finite) if finite and len(finite) == len(losses) else None


def _stays_at_edge(
    evidence: Mapping[str, Any], losses: Sequence[float], best_loss: float | None, z: float
) -> list[str] | None:
    """The reasons a probe of a run already at the edge is still there — its sharpness swung
    out of the band but stays within :data:`EOS_FLOOR`-:data:`EOS_SWING` times the limit (the
    caller has checked that the loss has not risen) — or None when it is not."""
    if not _band(evidence, EOS_FLOOR, EOS_SWING, z):
        return None
    mean = _window_mean(losses)
    s, limit = effective_sharpness(evidence), evidence["stability_limit"]
    held = (
        "the loss has not risen"
        if mean is None or best_loss is None
        else f"the loss ({mean:.3g} on average since the previous probe) stays within "
        f"{EOS_LOSS_RISE:g}x its running minimum {best_loss:.3g}"
    )
    assert s is not None  # _band holds
    return [
        f"training is at the edge of stability and stays there: the {_sharpness_name(evidence)} "
        f"{s:.4g} swings "
        f"around the stability limit {limit:.4g} (now {s / limit:.2f}x, within "
        f"{EOS_FLOOR:g}-{EOS_SWING:g}x)",
        held,
    ]


def classify_history(
    state: StateEnum,
    reasons: Sequence[str],
    evidence: Mapping[str, Any],
    *,
    past: Sequence[Mapping[str, Any]] = (),
    losses: Sequence[float] = (),
    first_loss: float | None = None,
    previous: StateEnum | str | None = None,
    best_loss: float | None = None,
    previous_low: float | None = None,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    full_batch: bool | None = None,
    steps: Sequence[int] | None = None,
    first_mean: float | None = None,
) -> tuple[StateEnum, list[str]]:
    """Refine one probe's verdict with what only history shows (the Monitor's rules).

    - **diverged** when a training loss since the previous probe is not finite or above
      :data:`EXPLOSION` (1e3) times the first loss of the run (once known, the larger of it
      and ``first_mean``: :func:`explosion_base`), or when their mean is above
      :data:`RAN_AWAY` (10) times the lower of its running minimum ``best_loss`` and the first
      loss, as are three quarters of the recent half of them, and above the first loss (a
      blow-up stuck high: a saturated network's collapsed curvature reads as stable steps);
    - otherwise a *learning* or *unstable* probe is **edge_of_stability** — never while the
      mean training loss since the previous probe is above :data:`EOS_LOSS_RISE` (2) times
      ``best_loss`` (a loss that rose) — when
      (a) its sharpness (the batch sharpness where measured) and those of the
      :data:`EOS_PROBES` − 1 probes before it are all within :data:`EOS_BAND` (±15%) of their
      stability limits (Cohen et al. 2021; for the batch sharpness: not
      ``thresholds.confidence`` standard errors outside the band, and known to within it),
      and those limits are within :data:`EOS_LIMIT_DRIFT` (5%) of each other (no warm-up
      moving the limit through the sharpness) — with ``steps``, as many probes back as it
      takes to span :data:`EOS_HOLD` (20) steps: held, not seen three steps in a row;
      (b) the previous probe was at the edge and the sharpness stays within
      :data:`EOS_FLOOR`-:data:`EOS_SWING` (0.5-3) times the limit: at the edge it swings past
      the limit and back, and a single probe outside the band is not instability;
      (c) for full-batch training, an *unstable* probe whose losses since the previous one
      absorb the overshoot: they oscillate and reach a new low in their last
      :data:`ABSORB_END` steps (a catapult, a period-2 orbit whose low points fall);
      (d) for full-batch training, an *unstable* probe whose sharpness rose past the same
      limit (no schedule moved it) since the previous probe, where it was not past it by the
      margin, to at most :data:`EOS_SWING` times it, while the loss fell: progressive
      sharpening meeting the edge;
      (e) for full-batch training, an *unstable* probe whose sharpness has stayed within
      1 − :data:`EOS_BAND` to :data:`EOS_SWING` times a steady limit for
      :data:`EOS_ABOVE_HOLD` steps (with ``steps``) while the probes' losses over that span
      are within 1 + :data:`EOS_BAND` of their least: held above the limit.

    Rules (b)–(e) need the limit steady (within :data:`EOS_LIMIT_DRIFT`) over the probes of
    the last :data:`EOS_HOLD` steps, not since the previous probe alone: a warm-up moving it
    a few percent between two probes a few steps apart entered the edge, and (b) held it there
    until the blow-up (an outside review).

    Below the limit, full-batch losses that fell at every step since the previous probe (at
    least :data:`MONOTONE_LOSSES` of them) hold no edge by (a) or (b): the steps do not
    overshoot there (at the edge, the loss falls non-monotonically).

    A run whose learning rate rises past its limit (a warm-up), or whose sharpness sits above
    the limit from the start (a quadratic), or whose loss stops falling, stays *unstable*.

    Args:
        state, reasons, evidence: the probe's verdict (from :func:`classify`) and evidence.
        past: the evidence of the earlier probes, oldest first.
        losses: the training losses since the previous probe.
        first_loss: the first finite training loss of the run (None: not known yet).
        previous: the previous probe's (refined) state, None for the first probe.
        best_loss: the lowest mean training loss between two earlier probes (None: unknown).
        previous_low: the lowest training loss before ``losses`` (None: unknown).
        full_batch: whether ``losses`` are full-batch losses (None: unknown, taken as full
            batch unless a batch sharpness was measured). Rules (c) and (d) read their shape,
            which mini-batch noise would make up.
        thresholds: the :class:`Thresholds` (``confidence``).
        steps: the steps of the ``past`` probes and of this one (None: rule (a) reads the last
            :data:`EOS_PROBES` probes whatever their steps).
        first_mean: the mean training loss between the first two probes that had any (the
            Monitor's first window; None: not known yet).

    Returns:
        (state, reasons): the refined verdict; the probe's own when history changes nothing.

    Raises:
        ValueError: ``steps`` not one for each past probe and this one, or decreasing.
    """
    if steps is not None:
        _check_steps(steps, len(past))
    floor = thresholds.loss_floor
    ran_away = (
        None
        if state == State.DIVERGED
        else _loss_diverged(losses, first_loss, best_loss, floor, first_mean)
    )
    if ran_away:
        return State.DIVERGED, ran_away
    limit, s = evidence.get("stability_limit"), effective_sharpness(evidence)
    if limit is None or s is None or state not in (State.LEARNING, State.UNSTABLE):
        return state, list(reasons)
    if _rose(losses, best_loss, thresholds.loss_floor):  # a loss that rose: no edge
        return state, list(reasons)
    # (c) and (d) read the losses' shape: not where mini-batch noise shapes them
    full_batch = (full_batch is None or full_batch) and evidence.get("batch_sharpness") is None
    edge = _edge(
        state,
        evidence,
        past,
        losses,
        previous,
        best_loss,
        previous_low,
        thresholds,
        full_batch,
        steps,
    )
    return (State.EDGE_OF_STABILITY, edge) if edge else (state, list(reasons))


def _edge(
    state: StateEnum,
    evidence: Mapping[str, Any],
    past: Sequence[Mapping[str, Any]],
    losses: Sequence[float],
    previous: StateEnum | str | None,
    best_loss: float | None,
    previous_low: float | None,
    thresholds: Thresholds,
    full_batch: bool,
    steps: Sequence[int] | None,
) -> list[str] | None:
    """The reasons rules (a)–(d) of :func:`classify_history` find the edge of stability, or
    None. Below the limit, steps do not overshoot: full-batch losses that fell at every step
    since the previous probe are not held at the edge by (a) or (b) — a quadratic at 0.95x its
    limit read the edge at 26 of 30 probes, and a run whose sharpness sank from 0.98x to 0.5x
    the limit with its loss falling stayed at the edge for 600 steps (an outside review). Above
    the limit a falling loss is the edge's own (self-stabilisation: gd-mse-edge2 of the verdict
    suite, at 1.12x with a loss falling at every step)."""
    z, s, limit = thresholds.confidence, effective_sharpness(evidence), evidence["stability_limit"]
    settled = full_batch and s is not None and s < limit and _fell_every_step(losses)
    # (b)–(d) with the limit steady over EOS_HOLD steps, not just since the previous probe: a
    # forecast's probe 2–4 steps on saw a warm-up move it less than 5%, entered the edge, and
    # (b) held it there — "normal" — until the blow-up (an outside review)
    steady = _steady(evidence, _within_hold(past, steps))
    edge = None
    at_edge = previous is not None and as_state(previous) == State.EDGE_OF_STABILITY
    if at_edge and not settled and steady:
        edge = _stays_at_edge(evidence, losses, best_loss, z)  # (b)
    if edge is None and state == State.UNSTABLE and full_batch and steady:
        edge = _absorbed(evidence, losses, previous_low) or _sharpened_into(
            evidence, past, losses, thresholds.margin
        )
    if not settled:
        edge = edge or _held_at_edge(evidence, past, losses, z, steps)  # (a)
    if edge is None and full_batch and state == State.UNSTABLE:
        edge = _held_above(evidence, past, losses, z, steps)
    return edge


#: Rule (e): the step-to-step changes of the loss since the previous probe growing more than
#: this many-fold from its first half to its second: an oscillation that grows, instability
EOS_SWINGS_GROW = 2.0


def _swings_grow(losses: Sequence[float]) -> bool:
    """Whether the loss's step-to-step changes since the previous probe grow, from the first
    half of them to the second, more than :data:`EOS_SWINGS_GROW`-fold (at least
    :data:`MONOTONE_LOSSES` losses; fewer say nothing)."""
    if len(losses) < MONOTONE_LOSSES or not all(math.isfinite(v) for v in losses):
        return False
    changes = [abs(b - a) for a, b in itertools.pairwise(losses)]
    half = len(changes) // 2
    first, second = sum(changes[:half]) / half, sum(changes[half:]) / (len(changes) - half)
    return second > EOS_SWINGS_GROW * first


def _held_above(
    evidence: Mapping[str, Any],
    past: Sequence[Mapping[str, Any]],
    losses: Sequence[float],
    z: float,
    steps: Sequence[int] | None,
) -> list[str] | None:
    """The reasons of rule (e) of :func:`classify_history`, or None: for :data:`EOS_ABOVE_HOLD`
    steps and at least :data:`EOS_PROBES` probes the sharpness has stayed between the band's
    floor and :data:`EOS_SWING` times a steady limit, and the probes' losses over that span are
    within :data:`EOS_BAND` of their least — above the limit, and held there without the loss
    running away: full-batch gradient descent at a learning rate held at 1.8
    on the digits MLP sat at 1.17–1.38x for 500 steps, its loss falling slowly, and read
    *unstable* at 121 probes in a row (an outside review)."""
    if steps is None:
        return None
    back = _probes_back(past, steps, EOS_ABOVE_HOLD)
    if steps[-1] - steps[-1 - back] < EOS_ABOVE_HOLD:
        return None
    recent = [evidence, *reversed(past[len(past) - back :])]
    if len(recent) < EOS_PROBES or not all(_band(ev, 1 - EOS_BAND, EOS_SWING, z) for ev in recent):
        return None
    if not _steady(evidence, recent[1:]):
        return None
    # the probes' losses over the span: not running away (a learning rate raised to a level
    # holds the loss above the lower rate's running minimum — 1.25–1.4x there — but level)
    probed = [ev.get("loss") for ev in recent]
    if not all(_finite(v) for v in probed) or max(probed) > (1 + EOS_BAND) * min(probed):
        return None
    # nor creeping up (the newer half of the span's probes above the older half), nor an
    # oscillation growing between the probes (an instability hidden in a level loss was called
    # the edge two probes before its blow-up: the diff review)
    half = len(probed) // 2
    newer, older = probed[:half], probed[len(probed) - half :]
    if sum(newer) > (1 + EOS_LIMIT_DRIFT) * sum(older) or _swings_grow(losses):
        return None
    s, limit = effective_sharpness(evidence), evidence["stability_limit"]
    assert s is not None  # _band holds
    ratios = [effective_sharpness(ev) / ev["stability_limit"] for ev in recent]
    return [
        f"the sharpness has stayed above the stability limit at a steady learning rate for "
        f"{steps[-1] - steps[-len(recent)]} steps ({min(ratios):.2f}–{max(ratios):.2f}x; now "
        f"{s:.4g} against {limit:.4g}) while the loss has not risen: gradient descent holds "
        "the sharpness there, the edge of stability, rather than diverging",
        _loss_trend(losses),
    ]


#: how many losses since the previous probe show that they fell at every step (fewer say
#: nothing: a probe every step or two)
MONOTONE_LOSSES = 4


def _probes_back(
    past: Sequence[Mapping[str, Any]], steps: Sequence[int] | None, span: int, least: int = 1
) -> int:
    """How many of the past probes, counted back from the previous one, it takes to reach
    ``span`` steps before this one (at least ``least``; without ``steps``, ``least``; never
    more than there are)."""
    back = least
    if steps is not None:
        while back < len(past) and steps[-1] - steps[-1 - back] < span:
            back += 1
    return min(back, len(past))


def _within_hold(
    past: Sequence[Mapping[str, Any]], steps: Sequence[int] | None
) -> Sequence[Mapping[str, Any]]:
    """The past probes within :data:`EOS_HOLD` steps of this one, and the one before them (at
    least the previous probe; without ``steps``, the previous probe alone)."""
    return past[len(past) - _probes_back(past, steps, EOS_HOLD) :]


def _fell_every_step(losses: Sequence[float]) -> bool:
    """Whether the losses since the previous probe fell at every step (at least
    :data:`MONOTONE_LOSSES` of them)."""
    return len(losses) >= MONOTONE_LOSSES and all(b < a for a, b in itertools.pairwise(losses))


def _check_steps(steps: Sequence[int], past: int) -> None:
    if len(steps) != past + 1:
        raise ValueError(
            f"steps must give the step of each past probe and of this one: expected "
            f"{past + 1} steps, got {len(steps)}"
        )
    if any(b < a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"steps must not decrease (the probes' steps, oldest first): {steps}")


def _held_at_edge(
    evidence: Mapping[str, Any],
    past: Sequence[Mapping[str, Any]],
    losses: Sequence[float],
    z: float,
    steps: Sequence[int] | None,
) -> list[str] | None:
    """The reasons the sharpness is held at the limit (rule (a) of :func:`classify_history`),
    or None: it and those of the :data:`EOS_PROBES` − 1 probes before it — and, with ``steps``,
    of as many more as it takes to span :data:`EOS_HOLD` steps — are near their limits, which
    a schedule has not moved more than :data:`EOS_LIMIT_DRIFT`."""
    back = _probes_back(past, steps, EOS_HOLD, EOS_PROBES - 1)
    if steps is not None and steps[-1] - steps[-1 - back] < EOS_HOLD:
        return None  # not held for long enough yet
    recent = [evidence, *reversed(past[len(past) - back :])]
    if len(recent) < EOS_PROBES or not all(_near_limit(ev, z) for ev in recent):
        return None
    if not _steady(evidence, recent[1:]):  # a schedule moving the limit
        return None
    s, limit = effective_sharpness(evidence), evidence["stability_limit"]
    span = "" if steps is None else f" over {steps[-1] - steps[-len(recent)]} steps"
    return [
        f"the {_sharpness_name(evidence)} has stayed within ±{100 * EOS_BAND:.0f}% of the "
        f"stability limit for {len(recent)} probes{span} (now {s:.4g} against {limit:.4g})",
        _loss_trend(losses),
    ]
