"""How sharp the loss may be before an optimizer's step overshoots: the stability limit.

On a quadratic with curvature s, gradient descent with learning rate η is stable iff η·s < 2;
heavy-ball momentum β (torch's SGD form) iff η·s < 2 + 2β; Nesterov iff η·s < (2 + 2β)/(1 + 2β);
Adam with β₁ iff η·s̃ < (2 + 2β₁)/(1 − β₁) (about 38 at β₁ = 0.9), where s̃ is the sharpness of
the *preconditioned* curvature P^-½ H P^-½, P = diag(√v̂ + ε) read from the optimizer's own state
(Cohen et al. 2021, 2022). So the limit is s* = c/η on the sharpness of S^½ H S^½, where S holds
each parameter's step factor relative to η (its group's learning rate ratio, times P⁻¹).

Coordinates the preconditioner has not scaled yet: Adam's (and RMSprop's) second moment v of a
coordinate stays exactly 0 until a gradient reaches it (an embedding row of a token no training
batch has contained yet). Its "step factor" 1/(√v̂ + ε) = 1/ε is then no step factor at all:
that coordinate has not moved (m = 0), and the first gradient g that reaches it sets v̂ ∝ g² in
the same step, so its first move is η·m̂/√v̂, about η·sign(g) whatever the curvature — a bounded
step that the linear stability analysis (a fixed P) does not describe. Such coordinates are left
out of the preconditioned operator (step factor 0, as for a parameter the optimizer does not
hold) and counted (:attr:`StabilityLimit.unscaled`); with 1/ε (1e8) they made the preconditioned
sharpness of a healthy run that of the unseen rows' curvature times 1e8.

Weight decay: torch's ``weight_decay`` in SGD, Adam and RMSprop is L2 regularization added to
the gradient, so it is part of the curvature the optimizer sees (H + λI): ``l2`` carries it.
AdamW's decay is decoupled (θ ← θ − ηλθ, outside the gradient): it is not part of H, and it
shrinks the limit by only λ per unit of preconditioned sharpness, which is ignored here.

**One rule per optimizer type.** How c and S are read off an optimizer is a
:class:`StabilityRule`: torch's SGD, Adam, AdamW and RMSprop have theirs in :data:`RULES`
(below); any other optimizer class declares its own as the class attribute ``stability_rule``
(curvscope's AdaHessian does), so this module imports no optimizer. A subclass uses its
nearest base's rule; a wrapper holding the real optimizer as ``.optimizer`` (accelerate,
Lightning, DeepSpeed) is unwrapped.

**Where the state is.** A torch optimizer keys its state by the parameters it steps
(:class:`_Held`; FSDP2's sharded parameters have sharded state, gathered or taken as this rank's
shard). A DeepSpeed ZeRO-3 engine's optimizer steps flat partitions of its own instead:
:class:`curvscope.derivatives.zero3.PartitionedState` finds each parameter's group and state
there. Both answer :class:`StateLayout`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvscope.derivatives import zero3 as _zero3
from curvscope.derivatives.checks import check_real
from curvscope.derivatives.sharded import local_entries

#: (name of the optimizer's type, its first group holding a parameter) -> (c, description, formula)
Constant = Callable[[str, Mapping[str, Any]], tuple[float, str, str]]
#: (optimizer, the state of a parameter, its group) -> P⁻¹ for that parameter as the next step
#: will use it, or None while that state does not exist yet (no step taken)
InversePreconditioner = Callable[[Optimizer, Mapping[str, Any], Mapping[str, Any]], Tensor | None]


@dataclass(frozen=True)
class StabilityRule:
    """How the stability limit s* = c/η of one optimizer type is read from its hyperparameters
    and state.

    Attributes:
        constant: c, a plain description and the formula, from the first parameter group that
            holds one of the parameters (β, dampening, Nesterov live there).
        preconditioner: per parameter, P⁻¹ (the step factor relative to η) for an adaptive
            method, whose limit is then on the sharpness of S^½ H S^½; None for a method that
            steps along the gradient itself.
        decoupled_decay: whether ``weight_decay`` is applied outside the gradient (AdamW),
            and so is not part of the curvature the optimizer sees.

    Example:
        >>> import torch, curvscope as cs
        >>> from curvscope.diagnosis.stability import StabilityRule
        >>> class HalfStepSGD(torch.optim.SGD):  # steps of lr/2: stable below 4/η
        ...     stability_rule = StabilityRule(lambda name, group: (4.0, name, "s* = 4/η"))
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> cs.stability_limit(HalfStepSGD([w], lr=0.1)).limit
        40.0
    """

    constant: Constant
    preconditioner: InversePreconditioner | None = None
    decoupled_decay: bool = False


def sgd_constant(name: str, group: Mapping[str, Any]) -> tuple[float, str, str]:
    """Gradient descent 2, heavy ball (2 + 2β)/(1 − dampening), Nesterov (2 + 2β)/(1 + 2β).

    Hyperparameters are read as numbers (torch takes tensors for them too).

    Raises:
        ValueError: momentum with ``dampening`` 1 or more, which torch accepts: at 1 the
            gradient enters the momentum at the first step only (no curvature feeds back: it
            raised a bare ZeroDivisionError), above 1 every later step climbs the gradient (a
            negative limit); neither has a limit to judge against.
    """
    beta, damp = float(group["momentum"]), float(group["dampening"])
    if group["nesterov"]:
        formula = "s* = (2 + 2β)/((1 + 2β)·η)"
        return (2 + 2 * beta) / (1 + 2 * beta), f"SGD (Nesterov, momentum {beta:g})", formula
    if beta > 0:
        formula = "s* = (2 + 2β)/η" + (" / (1 − dampening)" if damp else "")
        label = f"SGD (momentum {beta:g}" + (f", dampening {damp:g})" if damp else ")")
        if damp >= 1:
            raise ValueError(
                f"SGD with momentum and dampening {damp:g} adds (1 − dampening) = "
                f"{1 - damp:g} times the gradient to its momentum after the first step: "
                + ("no gradient enters it again" if damp == 1 else "it climbs the loss")
                + ", so there is no stability limit to judge it against. Use a dampening in "
                "[0, 1), or pass lr= to judge plain gradient descent"
            )
        return (2 + 2 * beta) / (1 - damp), label, formula
    return 2.0, "SGD", "s* = 2/η"


def adam_constant(name: str, group: Mapping[str, Any]) -> tuple[float, str, str]:
    """Adam's (2 + 2β₁)/(1 − β₁) on the preconditioned sharpness (about 38 at β₁ = 0.9)."""
    b1 = float(group["betas"][0])
    formula = "s* = (2 + 2β₁)/((1 − β₁)·η) on the sharpness of P^-½ H P^-½, P = √v̂ + ε"
    return (2 + 2 * b1) / (1 - b1), f"{name} (β₁ = {b1:g})", formula


def rmsprop_constant(name: str, group: Mapping[str, Any]) -> tuple[float, str, str]:
    """RMSprop's 2 + 2β (heavy-ball momentum β) on the preconditioned sharpness."""
    beta = float(group["momentum"])
    formula = "s* = (2 + 2β)/η on the sharpness of P^-½ H P^-½, P = √v + ε"
    return 2 + 2 * beta, f"RMSprop (momentum {beta:g})" if beta else "RMSprop", formula


def adam_preconditioner(
    opt: Optimizer, state: Mapping[str, Any], group: Mapping[str, Any]
) -> Tensor | None:
    """P⁻¹ = 1/(√v̂ + ε), v̂ = v/(1 − β₂ᵗ) (the running maximum of v with ``amsgrad``); 0 where
    v is exactly 0 (no gradient has reached the coordinate yet: see the module's docstring)."""
    if "exp_avg_sq" not in state:
        return None
    b2 = float(group["betas"][1])
    step = float(state["step"])
    v = state["exp_avg_sq"]
    if group.get("amsgrad") and "max_exp_avg_sq" in state:
        v = state["max_exp_avg_sq"]
    return unscaled_left_out(v, 1.0 / ((v / (1 - b2**step)).sqrt() + float(group["eps"])))


def rmsprop_preconditioner(
    opt: Optimizer, state: Mapping[str, Any], group: Mapping[str, Any]
) -> Tensor | None:
    """P⁻¹ = 1/(√v + ε), v centered by the mean gradient's square when ``centered``; 0 where
    the running square is exactly 0 (no gradient has reached the coordinate yet)."""
    if "square_avg" not in state:
        return None
    square = v = state["square_avg"]
    if group.get("centered"):
        v = v - state["grad_avg"] ** 2
    return unscaled_left_out(square, 1.0 / (v.sqrt() + float(group["eps"])))


def unscaled_left_out(second_moment: Tensor, inverse: Tensor) -> Tensor:
    """P⁻¹ with the coordinates whose second moment is still exactly 0 set to 0: the
    preconditioner has not scaled them yet (their 1/ε is not the step they will take)."""
    return torch.where(second_moment == 0, torch.zeros_like(inverse), inverse)


#: torch's optimizers, by type; any other optimizer class declares ``stability_rule``
RULES: dict[type, StabilityRule] = {
    torch.optim.SGD: StabilityRule(sgd_constant),
    torch.optim.Adam: StabilityRule(adam_constant, adam_preconditioner),
    torch.optim.AdamW: StabilityRule(adam_constant, adam_preconditioner, decoupled_decay=True),
    torch.optim.RMSprop: StabilityRule(rmsprop_constant, rmsprop_preconditioner),
}


def rule_of(cls: type) -> StabilityRule | None:
    """The rule of an optimizer type: its own or its nearest base's declaration
    (``stability_rule``) or entry in :data:`RULES`; None when it has none."""
    for base in cls.__mro__:
        declared = base.__dict__.get("stability_rule")
        if declared is not None:
            if not isinstance(declared, StabilityRule):
                raise TypeError(
                    f"{base.__name__}.stability_rule must be a "
                    f"curvscope.diagnosis.stability.StabilityRule, got {type(declared).__name__}"
                )
            return declared
        if base in RULES:
            return RULES[base]
    return None


@dataclass(frozen=True)
class StabilityLimit:
    """The sharpness limit s* = constant / lr of an optimizer (or of plain gradient descent).

    Attributes:
        limit: s*, compared with the sharpness of the (preconditioned) curvature.
        lr: the reference learning rate η (the largest of the parameter groups).
        constant: c in s* = c/η (2 for gradient descent).
        optimizer: a plain description, e.g. ``"SGD (momentum 0.9)"``.
        preconditioned: whether the sharpness is that of S^½ H S^½ rather than of H.
        scale: per-parameter step factors S relative to η (flat, in the order of ``params``),
            or None for the identity.
        l2: per-parameter L2 coefficients the optimizer adds to the gradient (flat), or None.
        formula: the limit in words and symbols.
        unscaled: how many coordinates the optimizer holds that its preconditioner has not
            scaled yet (Adam's v still exactly 0): left out of the preconditioned curvature
            (their step factor is 0 in ``scale``).
        clip: the fraction s of the gradient the optimizer is given (gradient clipping,
            :meth:`clipped`; 1: all of it): the limit is then c/(s·η).
        group_lrs: the stepping parameter groups' learning rates, largest first, where they
            differ (None for one rate): a rate read at η holds for the largest group with the
            others scaled in proportion.
    """

    limit: float
    lr: float
    constant: float
    optimizer: str
    preconditioned: bool
    scale: Tensor | None
    l2: Tensor | None
    formula: str
    unscaled: int = 0
    clip: float = 1.0
    group_lrs: tuple[float, ...] | None = None

    def stable_lr(self, sharpness: float) -> float:
        """The largest learning rate that is stable at this (preconditioned) sharpness (for
        clipped steps, at this clipping: c/(s·λ))."""
        return math.inf if sharpness <= 0 else self.constant / (self.clip * sharpness)

    def clipped(self, fraction: float) -> StabilityLimit:
        """The limit of steps that take ``fraction`` s of the gradient, s* = c/(s·η): what
        ``clip_grad_norm_(params, max_norm)`` does when it scales the gradient g by s =
        max_norm/‖g‖ before the optimizer sees it. A step linear in the gradient given the
        optimizer's state (SGD's momentum, Adam's moments over its own clipped history) is
        then the step of learning rate s·η.

        Example:
            >>> w = torch.nn.Parameter(torch.zeros(3))
            >>> limit = stability_limit(torch.optim.SGD([w], lr=0.1)).clipped(0.25)
            >>> round(limit.limit, 6), limit.stable_lr(40.0)
            (80.0, 0.2)
        """
        fraction = check_clip_factor(fraction, "fraction")
        if fraction == 1.0:
            return self
        return replace(
            self,
            limit=self.limit / fraction,
            clip=self.clip * fraction,
            formula=f"{self.formula}, with s·η for η: steps clipped to s = {fraction:.3g}",
        )


def check_clip_factor(value: object, name: str = "clip_factor") -> float:
    """A fraction of the gradient in (0, 1], checked: what ``clip_grad_norm_`` leaves of it,
    min(1, max_norm/‖g‖) (0 would be no step at all)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"expected {name} to be a real number, got {type(value).__name__}")
    fraction = float(value)
    if not 0 < fraction <= 1:  # NaN too
        raise ValueError(
            f"expected {name} in (0, 1] — the fraction min(1, max_norm/‖g‖) of the gradient the "
            f"optimizer is given — got {value!r}"
        )
    return fraction


class StateLayout(Protocol):
    """Where an optimizer keeps the groups and state of the measured parameters, and how flat
    vectors over them are laid out (whole, or this rank's entries)."""

    #: each parameter's group (None: the optimizer does not step it)
    groups: list[dict[str, Any] | None]

    def state(self, i: int) -> Mapping[str, Any]:
        """Parameter ``i``'s state (empty before the optimizer has stepped it)."""
        ...

    def zeros(self, i: int) -> Tensor:
        """P⁻¹ = 0 for parameter ``i`` (one the optimizer holds no state for)."""
        ...

    def entries(self, t: Tensor) -> Tensor:
        """A parameter's P⁻¹ as computed from its state, as :meth:`flat` and :meth:`unscaled`
        take it (a sharded one gathered, or this rank's shard)."""
        ...

    def flat(self, values: list[Tensor | float]) -> Tensor:
        """One flat vector of per-parameter values (tensors as :meth:`state` holds them, or
        numbers filled in)."""
        ...

    def unscaled(self, inverse: list[Tensor]) -> int:
        """How many coordinates of the stepped parameters have P⁻¹ = 0."""
        ...


class _Held:
    """A torch optimizer's groups and state, keyed by the parameters themselves; a sharded
    parameter's (FSDP2's DTensor) state is sharded like it: gathered whole, or with ``local``
    this rank's shard."""

    def __init__(self, optimizer: Optimizer, params: list[Tensor], local: bool) -> None:
        self.optimizer, self.params, self.local = optimizer, params, local
        by_id = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self.groups: list[dict[str, Any] | None] = [by_id.get(id(p)) for p in params]

    def state(self, i: int) -> Mapping[str, Any]:
        return self.optimizer.state.get(self.params[i], {})

    def zeros(self, i: int) -> Tensor:
        return torch.zeros_like(self.params[i])

    def entries(self, t: Tensor) -> Tensor:
        return local_entries(t) if self.local else gathered(t)

    def flat(self, values: list[Tensor | float]) -> Tensor:
        return _flat(values, self.params, self.local)

    def unscaled(self, inverse: list[Tensor]) -> int:
        return sum(
            int((q == 0).sum()) for q, g in zip(inverse, self.groups, strict=True) if g is not None
        )


def gathered(t: Tensor) -> Tensor:
    """A sharded ``DTensor`` (FSDP2's parameters and their optimizer state) gathered whole on
    every rank (a collective: every rank calls it together); a plain tensor as it is."""
    full = getattr(t, "full_tensor", None)
    return t if full is None else full()


def _flat(values: Sequence[Tensor | float], params: list[Tensor], local: bool) -> Tensor:
    """One flat vector of per-parameter values (tensors shaped like the parameters, or numbers
    filled in): whole, or with ``local`` this rank's entries of sharded parameters."""
    ref = params[0]
    part = local_entries if local else gathered
    # a number is filled in the parameters' dtype: through float32 first, a float64 model's
    # weight decay 0.01 would become 0.0099999998
    parts = [
        part(v).reshape(-1).to(dtype=ref.dtype, device=ref.device)
        if isinstance(v, Tensor)
        else torch.full(
            ((local_entries(p) if local else p).numel(),),
            float(v),
            dtype=ref.dtype,
            device=ref.device,
        )
        for v, p in zip(values, params, strict=True)
    ]
    return torch.cat(parts)


def stability_limit(
    optimizer: Optimizer | None = None,
    *,
    lr: float | None = None,
    params: list[Tensor] | None = None,
) -> StabilityLimit:
    """The stability limit of ``optimizer`` (read from its hyperparameters and state), or of
    plain gradient descent with learning rate ``lr``.

    Args:
        optimizer: a ``torch.optim.SGD``, ``Adam``, ``AdamW`` or ``RMSprop``, an optimizer whose
            class declares a ``stability_rule`` (curvscope's ``AdaHessian``: Adam's rule with
            P = (√v̂)^k + ε from the Hessian diagonal), or a wrapper holding one as
            ``.optimizer``, as accelerate and Lightning do; a DeepSpeed ZeRO-3 engine's
            (``engine.optimizer`` around a torch optimizer: its state read from the engine's
            partitions, the vectors gathered whole by one all-reduce — a collective: every
            rank calls it).
        lr: instead of an optimizer: plain gradient descent at this learning rate.
        params: the parameters, in the order of the flat vectors the scale should follow
            (default: the optimizer's own order; a ZeRO-3 engine's: its sub-groups' order).

    Raises:
        TypeError: an optimizer without a rule (pass ``lr=`` instead).
        ValueError: neither or both of optimizer and lr; a non-positive lr; Adam or RMSprop
            before their first step (their preconditioner does not exist yet); for ZeRO-3
            parameters, another optimizer than their engine's, or its state offloaded.

    Example:
        >>> import torch, curvscope as cs
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> round(cs.stability_limit(torch.optim.SGD([w], lr=0.1, momentum=0.9)).limit, 6)
        38.0
    """
    return limit_of(optimizer, lr, params)


def limit_of(
    optimizer: Optimizer | None,
    lr: float | None,
    params: list[Tensor] | None,
    local: bool = False,
) -> StabilityLimit:
    """:func:`stability_limit`; with ``local``, the step factors and L2 coefficients hold this
    rank's entries of FSDP2-sharded parameters or of a DeepSpeed ZeRO-3 engine's partitions (a
    sharded diagnosis's vectors: nothing gathered), and ``unscaled`` counts this rank's
    coordinates."""
    if (optimizer is None) == (lr is None):
        raise ValueError("give either optimizer= or lr= (for plain gradient descent), not both")
    if optimizer is None:
        return _gradient_descent(lr)
    inner, rule = _unwrapped(optimizer)
    if params is None:
        params = _zero3.optimizer_params(optimizer) or [
            p for g in inner.param_groups for p in g["params"]
        ]
    layout: StateLayout | None = _zero3.optimizer_state(optimizer, inner, params, local)
    if layout is None:
        layout = _Held(inner, params, local)
    held = [g for g in layout.groups if g is not None]
    if not held:
        if not any(g["params"] for g in inner.param_groups):  # DeepSpeed empties them
            raise ValueError(
                "the optimizer's parameter groups hold no parameters — the torch optimizer a "
                "DeepSpeed ZeRO-3 engine steps between its steps? pass engine.optimizer (the "
                "optimizer deepspeed.initialize returned) and the model's parameters"
            )
        raise ValueError("the optimizer updates none of these parameters: pass its model's")
    eta = max(float(g["lr"]) for g in held)
    if eta <= 0:  # e.g. a schedule that has decayed to 0: no step can overshoot
        what = type(inner).__name__ + " (lr = 0)"
        return StabilityLimit(math.inf, 0.0, math.inf, what, False, None, None, "s* = ∞ at η = 0")
    return _limit(inner, rule, layout, eta)


def check_readable(optimizer: object, params: list[Tensor]) -> None:
    """Refuse at once, with the fix, what :func:`limit_of` would refuse for a DeepSpeed ZeRO-3
    engine's parameters — an optimizer without a rule, another than the engine's, the engine's
    with its state offloaded — without reading any state (no collective)."""
    if optimizer is not None and any(_zero3.is_partitioned(p) for p in params):
        inner, _ = _unwrapped(optimizer)
        _zero3.optimizer_state(optimizer, inner, params, local=True)


def limit_factor(optimizer: Optimizer | None = None, *, lr: float | None = None) -> float | None:
    """The part of the stability limit s* = c/η that the hyperparameters set, c/η now — what a
    schedule moves (the learning rate; β or the momentum where it cycles them) — without the
    optimizer's state: cheap enough to read at every step (the Monitor's forecast). ``2/lr``
    for plain gradient descent; inf at η = 0; None for an optimizer without a rule.

    Over the optimizer's groups, the smallest c_g/η_g (each group's constant and learning
    rate): the limit of its most constrained group, as :func:`stability_limit` weighs them.
    """
    if optimizer is None:
        return None if lr is None or lr <= 0 else 2.0 / lr
    try:
        inner, rule = _unwrapped(optimizer)
    except TypeError:
        return None
    name = type(inner).__name__
    stepping = [g for g in inner.param_groups if float(g["lr"]) > 0]
    if not stepping:
        return math.inf if inner.param_groups else None
    return min(rule.constant(name, g)[0] / float(g["lr"]) for g in stepping)


def optimizer_name(optimizer: object) -> str:
    """The optimizer's class name, through the wrappers that hold it as ``.optimizer``
    (accelerate's ``AcceleratedOptimizer``: ``"AdamW"``); the wrapper's for one without a rule."""
    try:
        return type(_unwrapped(optimizer)[0]).__name__
    except TypeError:
        return type(optimizer).__name__


def check_descent_lr(lr: object) -> float:
    """``lr=`` for plain gradient descent (not an optimizer group's learning rate, which may be
    0: :func:`curvscope.optim.base.check_lr`): a positive finite real number — an int, a float, a
    numpy scalar or a 0-d tensor, as torch's optimizers take one (``np.float32(0.1)`` and
    ``torch.tensor(0.1)`` were refused as not positive numbers, and ``True`` taken for 1: an
    outside review) — as a float."""
    try:
        return check_real(lr, "lr", minimum=0, exclusive=True)
    except (TypeError, ValueError):
        raise ValueError(
            f"lr must be a positive number (an int, a float, a numpy scalar or a 0-d tensor), "
            f"got {lr!r}"
        ) from None


def _gradient_descent(lr: object) -> StabilityLimit:
    eta = check_descent_lr(lr)
    return StabilityLimit(2.0 / eta, eta, 2.0, "gradient descent", False, None, None, "s* = 2/η")


def _limit(
    optimizer: Optimizer, rule: StabilityRule, layout: StateLayout, eta: float
) -> StabilityLimit:
    """s* = c/η by the optimizer's rule, with the step factors S and the L2 coefficients laid
    out as ``layout``'s flat vectors (whole, or this rank's entries)."""
    groups = layout.groups
    name = type(optimizer).__name__
    _check_descends(name, [g for g in groups if g is not None])
    c, what, formula = rule.constant(name, next(g for g in groups if g is not None))
    ratio, own = _group_ratios(name, rule, groups, eta, c)
    if own:
        what += ", each group's constant by its own hyperparameters"
    l2 = _l2(rule, groups, layout)
    # (a tensor learning rate read as a number, as everywhere)
    rates = sorted({float(g["lr"]) for g in groups if g is not None} - {0.0}, reverse=True)
    spread = tuple(rates) if len(rates) > 1 else None
    if rule.preconditioner is None:
        scale = None if all(r == 1.0 for r in ratio) else layout.flat(list(ratio))
        return StabilityLimit(c / eta, eta, c, what, False, scale, l2, formula, group_lrs=spread)
    inverse = [layout.entries(q) for q in _preconditioners(optimizer, rule.preconditioner, layout)]
    scale = layout.flat([r * q for r, q in zip(ratio, inverse, strict=True)])
    unscaled = layout.unscaled(inverse)
    return StabilityLimit(
        c / eta, eta, c, what, True, scale, l2, formula, unscaled=unscaled, group_lrs=spread
    )


def _group_ratios(
    name: str, rule: StabilityRule, groups: list[Any], eta: float, c: float
) -> tuple[list[float], bool]:
    """Each group's step relative to η and to its own constant c_g (momentum, β₁, Nesterov): a
    group is stable where lr_g·s < c_g, i.e. (lr_g/η)(c/c_g)·s < c/η (0 for a frozen one: never
    stepped); and whether the groups' constants differ."""
    consts = [None if g is None else rule.constant(name, g)[0] for g in groups]
    ratio = [
        0.0 if g is None or k is None else float(g["lr"]) / eta * c / k
        for g, k in zip(groups, consts, strict=True)
    ]
    return ratio, any(k is not None and k != c for k in consts)


def _l2(rule: StabilityRule, groups: list[Any], layout: StateLayout) -> Tensor | None:
    """The L2 coefficients added to the gradient (torch's ``weight_decay`` in SGD, Adam,
    RMSprop), or None where the decay is decoupled — AdamW's, and Adam's with
    ``decoupled_weight_decay=True`` (torch 2.13: the same optimizer) — or absent."""
    wd = [0.0 if g is None else float(g.get("weight_decay", 0.0)) for g in groups]
    decoupled = rule.decoupled_decay or any(
        g is not None and g.get("decoupled_weight_decay") for g in groups
    )
    return None if decoupled or not any(wd) else layout.flat(list(wd))


def stepped_selection(model: Any, optimizer: object) -> list[torch.nn.Parameter] | None:
    """The model's parameters that require grad and that ``optimizer`` steps, where it steps
    some of them but not all — what a diagnosis measures by default: the others, never moved,
    are no part of the landscape training explores, and measured (their step factors 0) they
    put exact zeros into the spectrum and their gradient into ‖g‖ (an outside review: a head
    at its minimum read ‖g‖ 0.946 and λ_min 2e-16, its own 1.6e-6, from a backbone left
    trainable but outside the optimizer). A group whose learning rate is 0 does not step its
    parameters (a backbone its schedule holds still: measured, it read as the head's numbers
    did beside an unfinished freeze, an outside review). Nor has an optimizer that keeps state
    a parameter (momentum, Adam's moments) stepped one it holds no state for while it holds some
    for others: no gradient has reached it (an auxiliary head unused in this phase: torch skips
    it, weight decay included, and measured with its decay it read a run at its minimum as
    *learning*, an outside review). Where every group is at 0 (a warm-up's first step), or it
    holds state for none, those rules leave out nothing. None where it steps every one, none of
    them (a DeepSpeed engine's optimizer holds flat partitions of its own), or there is no
    optimizer (``.optimizer`` holders are looked through by their ``param_groups``)."""
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        return None
    held = [p for g in groups for p in g["params"]]
    held = [p for g in groups if not _held_still(g) for p in g["params"]] or held
    state = getattr(optimizer, "state", None)
    if isinstance(state, Mapping):  # (no gradient has reached those it holds no state for)
        held = [p for p in held if state.get(p)] or held
    stepped = {id(p) for p in held}
    trainable = [p for p in model.parameters() if p.requires_grad]
    chosen = [p for p in trainable if id(p) in stepped]
    return chosen if 0 < len(chosen) < len(trainable) else None


def _held_still(group: Mapping[str, Any]) -> bool:
    """Whether a parameter group's learning rate is 0 (a number or tensor; another kind of
    ``lr``, transformers' Adafactor's None, is not read here)."""
    lr = group.get("lr")
    return isinstance(lr, numbers.Real | Tensor) and float(lr) == 0


def check_judgeable(optimizer: object, model: Any = None) -> None:
    """Refuse, without reading any state, an optimizer :func:`stability_limit` has no rule for
    (TypeError, naming ``lr=``), one that maximizes or whose rule refuses its hyperparameters
    (ValueError), and — given the ``model`` —
    one that steps on none of its parameters (ValueError: built for another model, or a copy
    of this one; its limit and state would be read for parameters the probes do not measure):
    what a Monitor's first probe would refuse, at its construction."""
    inner, rule = _unwrapped(optimizer)
    groups = list(inner.param_groups)
    _check_descends(type(inner).__name__, groups)
    for g in groups:  # a rule refuses hyperparameters it has no limit for (SGD's dampening > 1)
        if g["params"]:
            rule.constant(type(inner).__name__, g)
    if model is not None:
        own = {id(p) for p in model.parameters()}
        stepped = [p for g in groups for p in g["params"]]
        if stepped and not any(id(p) in own for p in stepped):
            raise ValueError(
                f"the optimizer ({type(inner).__name__}) steps on none of the model's "
                "parameters: it was built for another model (or a copy of this one); pass "
                "the optimizer that trains this model"
            )


def _check_descends(name: str, groups: Sequence[Mapping[str, Any]]) -> None:
    """Refuse an optimizer that ascends (``maximize=True``): its steps follow −∇L, so its
    stability is that of descending −L, whose curvature is −H — judged against H, a run blowing
    up read as learning and a maximum as a saddle."""
    if any(g.get("maximize") for g in groups):
        raise ValueError(
            f"the {name} maximizes (maximize=True): it climbs the loss, whose curvature along "
            "its steps is that of −loss, and curvscope judges descent on loss_fn. Diagnose the "
            "negated objective — loss_fn returning −reward — with an optimizer that minimizes "
            "it (the same steps)"
        )


def _unwrapped(optimizer: object) -> tuple[Optimizer, StabilityRule]:
    """The optimizer that has a rule, unwrapping ``.optimizer`` holders, and its rule."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        rule = rule_of(type(optimizer))
        if rule is not None and isinstance(optimizer, Optimizer):
            return optimizer, rule
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, Optimizer):
            break
        optimizer = inner
    name = type(optimizer).__name__
    if type(optimizer).__module__.startswith("curvscope.optim"):  # "pass lr=" fits none of
        raise TypeError(  # them: a model-step method has no lr (an outside review)
            f"{name} is one of curvscope's methods whose steps no stability limit describes "
            "(the model-step methods size theirs by the model's radius, damping or σ; Sophia "
            "clips its, NormalizedGD normalises its), so no lr= stands for it either: leave "
            "out optimizer= and lr= to read the curvature alone"
        )
    raise TypeError(
        "stability_limit knows torch.optim.SGD, Adam, AdamW, RMSprop and the optimizers whose "
        "class declares a stability_rule (cs.optim.AdaHessian); got "
        f"{type(optimizer).__name__}. Pass lr= to judge against plain gradient descent instead "
        "where the method steps as gradient descent does; an adaptive one (Adagrad, NAdam, "
        "RAdam, Adamax) rescales each coordinate, so no lr makes its steps gradient descent's: "
        "leave out optimizer= and lr= to read the curvature alone, or declare a StabilityRule "
        "on a subclass (DeepSpeed's own Adam, FusedAdam: 'torch_adam': True in its config's "
        "params makes it torch's)"
    )


class NotSteppedError(ValueError):
    """An adaptive optimizer that has taken no step yet: its preconditioner does not exist (a
    ``GradScaler`` that skipped the first steps on overflow leaves Adam so; the Monitor puts
    its probes off until the first step, where this error crashed the training loop: an
    outside review)."""


def _preconditioners(
    optimizer: Optimizer, preconditioner: InversePreconditioner, layout: StateLayout
) -> list[Tensor]:
    """P⁻¹ per parameter: 0 for a parameter the optimizer does not hold, and 0 for one it holds
    but has no state for yet — no gradient has reached it (an unused branch, a head not in the
    graph yet): like a row whose second moment is still 0, the optimizer has not scaled it
    (counted in :attr:`StabilityLimit.unscaled`).

    Raises:
        NotSteppedError: the optimizer has state for none of them: it has taken no step yet.
    """
    states = [
        None if g is None else preconditioner(optimizer, layout.state(i), g)
        for i, g in enumerate(layout.groups)
    ]
    if all(q is None for q in states):
        raise NotSteppedError(
            f"{type(optimizer).__name__} has taken no step yet, so its preconditioner (built "
            "from the squared gradients it has seen) does not exist; diagnose after the first "
            "optimizer.step() (a Monitor waits for it by itself)"
        )
    # a sharded parameter's state is sharded like it (the layout gathers it or takes its shard)
    return [layout.zeros(i) if q is None else q for i, q in enumerate(states)]
