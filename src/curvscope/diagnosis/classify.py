"""The pure decision: evidence (numbers) in, a state and the reasons for it out.

The states are decided in this order, the first that holds wins: **diverged**; then, when the
gradient is small, **flat** › **saddle** › **minimum**; otherwise **unstable** › **learning**
(**edge_of_stability** needs a history of probes: the Monitor's). "Small" is judged against the
curvature and the loss scale, with absolute floors, so that a saddle at loss ≈ 0 and a plateau
at loss ≈ 1 are both recognised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

STATES = ("learning", "unstable", "edge_of_stability", "flat", "saddle", "minimum", "diverged")


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
    """

    small_gradient: float = 1e-3
    direction_floor: float = 1e-2
    gradient_floor: float = 1e-8
    loss_floor: float = 1e-3
    flat_curvature: float = 1e-2
    negative_curvature: float = 1e-2
    small_decrement: float = 1e-3
    margin: float = 0.1

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


DEFAULT_THRESHOLDS = Thresholds()


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


def classify(
    evidence: Mapping[str, Any], thresholds: Thresholds = DEFAULT_THRESHOLDS
) -> tuple[str, list[str]]:
    """Decide the state from the evidence of one probe.

    Args:
        evidence: at least ``loss``, ``grad_norm``, ``sharpness``, ``lambda_min``; optionally
            ``stability_limit`` (s*), ``lr``, ``limit_constant`` (c in s* = c/η),
            ``directional_curvature`` (c = dᵀHd/gᵀd along the step direction d),
            ``grad_dot_step`` (gᵀd; ‖g‖² when absent) and
            ``newton_decrement`` (δ², None where H is not positive definite).
        thresholds: the :class:`Thresholds`.

    Returns:
        (state, reasons): one of :data:`STATES`, and sentences with the numbers that decided.
    """
    th = thresholds
    loss, g = evidence["loss"], evidence["grad_norm"]
    if not _finite(loss) or not _finite(g):
        return "diverged", [f"the loss ({loss}) or the gradient norm ({g}) is not finite"]
    s, lmin = evidence.get("sharpness"), evidence.get("lambda_min")
    scale = max(abs(loss), th.loss_floor)
    curv = max(abs(s or 0.0), abs(lmin or 0.0))
    # the decrease the best step along the optimizer's direction d can still buy under the local
    # quadratic, ½·gᵀd/c (d = g for gradient descent: ½‖g‖²/c), with c the curvature along d,
    # floored at a fraction of the extreme curvature (along a direction with almost none, the
    # quadratic model stops being a guide)
    c_dir = evidence.get("directional_curvature")
    gd = evidence.get("grad_dot_step")
    gd = g * g if gd is None or not _finite(gd) else abs(gd)
    along = curv if c_dir is None else abs(c_dir)
    buyable = 0.5 * gd / max(along, th.direction_floor * curv, 1e-300)
    small = g <= th.gradient_floor or buyable <= th.small_gradient * scale
    if small:
        reasons = [
            f"the gradient is small: ‖g‖ = {g:.3g}; a step along it would lower the loss by at "
            f"most {buyable:.3g}, ≤ {th.small_gradient:g} × loss scale {scale:.3g}"
        ]
        if curv <= th.flat_curvature * scale:
            return "flat", [
                *reasons,
                (
                    f"curvature is negligible both ways: max(|λ|) = {curv:.3g} ≤ "
                    f"{th.flat_curvature:g} × loss scale"
                ),
            ]
        if lmin is not None and s is not None and lmin < -th.negative_curvature * abs(s):
            return "saddle", [
                *reasons,
                (
                    f"but a direction curves down: λ_min = {lmin:.3g} < −{th.negative_curvature:g} "
                    f"× |λ_max| ({abs(s):.3g})"
                ),
            ]
        dec = evidence.get("newton_decrement")
        if dec is None or 0.5 * dec <= th.small_decrement * scale:
            why = (
                "no direction curves down"
                if lmin is None or lmin >= 0
                else f"λ_min = {lmin:.3g} is within −{th.negative_curvature:g}·|λ_max|"
            )
            extra = (
                ""
                if dec is None
                else f"; the bottom of the local quadratic is ½δ² = {0.5 * dec:.3g} below"
            )
            return "minimum", [*reasons, why + extra]
        reasons.append(
            f"but the bottom of the local quadratic is ½δ² = {0.5 * dec:.3g} below the loss "
            f"(> {th.small_decrement:g} × loss scale): a long, shallow valley"
        )
        return "learning", reasons
    reasons = [f"the gradient is not small: ‖g‖ = {g:.3g}"]
    limit, lr, const = (evidence.get(k) for k in ("stability_limit", "lr", "limit_constant"))
    bs = evidence.get("batch_sharpness")
    if limit is not None and bs is not None and bs > (1 + th.margin) * limit:
        return "unstable", [
            *reasons,
            (
                f"the batch sharpness {bs:.4g} (the curvature each mini-batch step meets along its "
                f"own direction) exceeds the stability limit {limit:.4g} by "
                f"{100 * (bs / limit - 1):.0f}%: mini-batch steps overshoot"
            ),
        ]
    if limit is not None and s is not None:
        if s > (1 + th.margin) * limit:
            return "unstable", [
                *reasons,
                (
                    f"the sharpness {s:.4g} exceeds the stability limit {limit:.4g} by "
                    f"{100 * (s / limit - 1):.0f}% (> {100 * th.margin:.0f}%): steps overshoot"
                ),
            ]
        c_dir = evidence.get("directional_curvature")
        if c_dir is not None and lr is not None and const is not None and lr * c_dir > const:
            return "unstable", [
                *reasons,
                (
                    f"along the step direction the curvature is {c_dir:.4g}: "
                    f"η·c = {lr * c_dir:.3g} > {const:.3g}, so the quadratic model predicts "
                    "the loss goes up"
                ),
            ]
        reasons.append(f"the sharpness {s:.4g} is {100 * s / limit:.0f}% of the limit {limit:.4g}")
    return "learning", reasons
