"""Searches: the rules that size a second-order step and judge it (optimistix's searches).

Each keeps one number in the method's state — a trust radius Δ, a damping μ or λ, a cubic
weight σ — hands it to the descent, keeps or refuses the step the descent proposed, and adapts
the number from ρ = actual / predicted reduction of the loss. They are small frozen objects:
their constants (thresholds, factors) are fields; the user's hyperparameters (``eta``,
``max_radius``, ``min_sigma``, the initial value) are read from the parameter group at each
step, like torch's.

- :class:`TrustRadius`: Δ ← Δ/4 when ρ < ¼, min(2Δ, max_radius) when ρ > ¾ on the boundary;
  keep when ρ > η (Nocedal & Wright, Alg. 4.1).
- :class:`LevenbergMarquardt`: μ ← max(4μ, floor) when ρ < ¼, μ/3 when ρ > ¾; keep when the
  loss decreased (or ρ above a threshold) (Levenberg 1944, Marquardt 1963).
- :class:`MartensDamping`: λ ← 3/2·λ when ρ < ¼, 2/3·λ when ρ > ¾, never below the negative
  curvature CG met (Martens 2010, §4.1).
- :class:`AdaptiveCubic`: σ ← max(σ/2, min_sigma) when ρ ≥ 0.9, 2σ when ρ < 0.1; keep when
  ρ ≥ 0.1 (Cartis, Gould & Toint 2011).
- :class:`Unsafeguarded`: keeps every finite step and never changes its number (pure Newton).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from curvscope.optim.model_step import Proposal


@dataclass(frozen=True)
class TrustRadius:
    """The trust radius Δ of Nocedal & Wright's Algorithm 4.1.

    Δ ← shrink·Δ when ρ < low; Δ ← min(grow·Δ, max_radius) when ρ > high and the step reached
    the boundary; unchanged otherwise. The step is kept when ρ > η. Reads ``radius`` (Δ₀),
    ``max_radius`` and ``eta`` from the group.
    """

    size: ClassVar[str] = "radius"
    key: ClassVar[str] = "radius"
    low: float = 0.25
    high: float = 0.75
    shrink: float = 0.25
    grow: float = 2.0

    def init(self, group: Mapping[str, Any]) -> float:
        return float(group["radius"])

    def bounded(self, value: float, group: Mapping[str, Any]) -> float:
        """The radius within ``max_radius`` as the group has it now (lowered between steps
        below the radius reached, the next step kept the radius: an outside review)."""
        return min(value, float(group["max_radius"]))

    def accepts(self, ratio: float, actual: float, group: Mapping[str, Any]) -> bool:
        return ratio > group["eta"]

    def update(
        self, value: float, ratio: float, proposal: Proposal, group: Mapping[str, Any]
    ) -> float:
        if ratio < self.low:
            return value * self.shrink
        if ratio > self.high and proposal.boundary:
            return min(self.grow * value, group["max_radius"])
        return value


@dataclass(frozen=True)
class LevenbergMarquardt:
    """A damping μ added to the curvature, adapted from ρ (Levenberg 1944, Marquardt 1963).

    With μ the damping the descent used (``proposal.used``, else the current one) and ``floor``
    the least damping its curvature asks for (``proposal.floor``):
    μ ← max(increase·μ, floor) when ρ < low; μ ← max(μ/decrease, minimum) when ρ > high, or 0
    once μ ≤ zero_below·floor (the undamped step is taken again where it is trusted); unchanged
    otherwise. Where the descent knows the curvature's lowest eigenvalue λ_min > 0
    (``proposal.lowest``: dense Newton) a trusted step takes μ to min(μ/decrease, μ²/λ_min):
    below λ_min/3 the damping's share μ/λ_min squares each step, so Newton's quadratic
    convergence returns after a rejected step (÷3 a step left it superlinear, e_{k+1}/e_k²
    growing to 1e7 on Rosenbrock, two Hessians more to 1e-15; an outside review). The step is
    kept when ρ > ``accept``, or, with ``accept=None``, when the loss decreased.

    Attributes:
        key: the state entry ("mu").
        initial: μ₀; None: the group's ``damping``.
        accept: the least ρ of a kept step; None: any decrease of the loss.
    """

    size: ClassVar[str] = "damping"
    key: str = "mu"
    initial: float | None = None
    low: float = 0.25
    high: float = 0.75
    increase: float = 4.0
    decrease: float = 3.0
    minimum: float = 1e-12
    zero_below: float = 1e-9
    accept: float | None = None

    def init(self, group: Mapping[str, Any]) -> float:
        return float(group["damping"]) if self.initial is None else self.initial

    def accepts(self, ratio: float, actual: float, group: Mapping[str, Any]) -> bool:
        return actual > 0 if self.accept is None else ratio > self.accept

    def update(
        self, value: float, ratio: float, proposal: Proposal, group: Mapping[str, Any]
    ) -> float:
        mu = value if proposal.used is None else proposal.used
        if ratio < self.low:
            return max(mu * self.increase, proposal.floor)
        if ratio > self.high:
            if mu <= self.zero_below * proposal.floor:
                return max(0.0, self.minimum)
            smaller, lowest = mu / self.decrease, proposal.lowest
            if lowest is not None and lowest > 0:
                smaller = min(smaller, mu * mu / lowest)
            return max(smaller, self.minimum)
        return mu


@dataclass(frozen=True)
class MartensDamping:
    """Hessian-free's damping λ (Martens 2010, §4.1): λ ← increase·λ when ρ < low,
    λ ← decrease·λ when ρ > high, and in every case at least 3/2 of the negative curvature CG
    met (``proposal.floor``) and ``minimum``. A step is kept when it decreased the loss."""

    size: ClassVar[str] = "damping"
    key: ClassVar[str] = "damping"
    low: float = 0.25
    high: float = 0.75
    increase: float = 1.5
    decrease: float = 2 / 3
    past_negative: float = 1.5
    minimum: float = 1e-12

    def init(self, group: Mapping[str, Any]) -> float:
        return float(group["damping"])

    def accepts(self, ratio: float, actual: float, group: Mapping[str, Any]) -> bool:
        return actual > 0

    def update(
        self, value: float, ratio: float, proposal: Proposal, group: Mapping[str, Any]
    ) -> float:
        lam = value
        if ratio < self.low:
            lam *= self.increase
        elif ratio > self.high:
            lam *= self.decrease
        return max(lam, self.past_negative * proposal.floor, self.minimum)


@dataclass(frozen=True)
class AdaptiveCubic:
    """The cubic weight σ of adaptive regularization (ARC; Cartis, Gould & Toint 2011):
    σ ← max(σ/2, min_sigma) when ρ ≥ very_good; σ ← 2σ when ρ < good; the step is kept when
    ρ ≥ good. Reads ``sigma`` (σ₀) and ``min_sigma`` from the group."""

    size: ClassVar[str] = "sigma"
    key: ClassVar[str] = "sigma"
    good: float = 0.1
    very_good: float = 0.9

    def init(self, group: Mapping[str, Any]) -> float:
        return float(group["sigma"])

    def bounded(self, value: float, group: Mapping[str, Any]) -> float:
        """σ at least ``min_sigma`` as the group has it now (raised between steps)."""
        return max(value, float(group["min_sigma"]))

    def accepts(self, ratio: float, actual: float, group: Mapping[str, Any]) -> bool:
        return ratio >= self.good

    def update(
        self, value: float, ratio: float, proposal: Proposal, group: Mapping[str, Any]
    ) -> float:
        if ratio >= self.very_good:
            return max(value / 2, group["min_sigma"])
        if ratio < self.good:
            return value * 2
        return value


@dataclass(frozen=True)
class Unsafeguarded:
    """No safeguard: every step with a finite loss is kept, and the number (a damping of 0 for
    pure Newton) never changes. For demonstrations of what the safeguards prevent."""

    size: ClassVar[str] = "damping"
    key: str = "mu"

    def init(self, group: Mapping[str, Any]) -> float:
        return 0.0

    def accepts(self, ratio: float, actual: float, group: Mapping[str, Any]) -> bool:
        return True

    def update(
        self, value: float, ratio: float, proposal: Proposal, group: Mapping[str, Any]
    ) -> float:
        return value
