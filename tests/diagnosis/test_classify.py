"""The pure decision, each threshold exercised on both sides."""

import math

import curvscope as cs
from curvscope.diagnosis import classify

BASE = {
    "loss": 1.0,
    "grad_norm": 1.0,
    "sharpness": 10.0,
    "lambda_min": -0.5,
    "stability_limit": 20.0,
    "lr": 0.1,
    "limit_constant": 2.0,
    "directional_curvature": 5.0,
    "newton_decrement": None,
}


def state(**changes):
    return classify({**BASE, **changes})[0]


def test_learning_and_unstable_around_the_margin():
    th = cs.Thresholds()
    assert state() == "learning"
    assert state(sharpness=20.0 * (1 + th.margin) * 0.99) == "learning"
    assert state(sharpness=20.0 * (1 + th.margin) * 1.01) == "unstable"
    assert state(directional_curvature=19.9) == "learning"  # η·c = 1.99 < 2
    assert state(directional_curvature=20.1) == "unstable"  # η·c = 2.01 > 2


def test_no_limit_means_no_stability_verdict():
    assert state(stability_limit=None, lr=None, sharpness=100.0) == "learning"


def test_diverged_first():
    assert state(loss=math.nan) == "diverged"
    assert state(grad_norm=math.inf, sharpness=1e9) == "diverged"


def test_small_gradient_threshold_both_sides():
    th = cs.Thresholds()
    # ½‖g‖²/c against small_gradient × loss scale (loss 1, curvature along g: 5)
    g_edge = math.sqrt(2 * 5 * th.small_gradient * 1.0)
    assert state(grad_norm=g_edge * 1.01) == "learning"
    assert state(grad_norm=g_edge * 0.99, lambda_min=0.1) == "minimum"


def test_direction_floor_both_sides():
    """Along a direction of almost no curvature a step still buys much: not small."""
    th = cs.Thresholds()
    floor = th.direction_floor * 10.0  # of max(|λ|) = 10
    g = math.sqrt(2 * floor * th.small_gradient * 1.0) * 0.99  # small at the floor
    assert state(grad_norm=g, directional_curvature=floor / 2, lambda_min=0.1) == "minimum"
    g = math.sqrt(2 * floor * 2 * th.small_gradient) * 0.99  # small only along c = 2·floor
    assert state(grad_norm=g, directional_curvature=floor * 2, lambda_min=0.1) == "minimum"
    assert state(grad_norm=g, directional_curvature=floor, lambda_min=0.1) == "learning"


def test_gradient_floor_and_loss_floor():
    th = cs.Thresholds()
    # at loss 0 the loss scale is the floor, not 0
    assert state(loss=0.0, grad_norm=th.gradient_floor / 2, lambda_min=0.1) == "minimum"
    g = math.sqrt(2 * 5 * th.small_gradient * th.loss_floor)
    assert state(loss=0.0, grad_norm=g * 0.9, lambda_min=0.1) == "minimum"
    assert state(loss=0.0, grad_norm=g * 1.1, lambda_min=0.1) == "learning"


def test_flat_threshold_both_sides():
    th = cs.Thresholds()
    c = th.flat_curvature * 1.0
    small = {"grad_norm": 1e-9}
    assert state(sharpness=c * 0.9, lambda_min=-c * 0.9, **small) == "flat"
    assert state(sharpness=c * 1.1, lambda_min=-c * 0.5, **small) == "saddle"


def test_saddle_threshold_both_sides():
    th = cs.Thresholds()
    small = {"grad_norm": 1e-9}
    assert state(lambda_min=-10 * th.negative_curvature * 1.01, **small) == "saddle"
    assert state(lambda_min=-10 * th.negative_curvature * 0.99, **small) == "minimum"


def test_newton_decrement_threshold_both_sides():
    th = cs.Thresholds()
    small = {"grad_norm": 1e-9, "lambda_min": 0.1}
    assert state(newton_decrement=2 * th.small_decrement * 0.9, **small) == "minimum"
    assert state(newton_decrement=2 * th.small_decrement * 1.1, **small) == "learning"


def test_thresholds_are_configurable():
    assert classify({**BASE, "sharpness": 21.0}, cs.Thresholds(margin=0.0))[0] == "unstable"
    assert classify({**BASE, "sharpness": 21.0})[0] == "learning"


def test_reasons_carry_the_numbers():
    s, reasons = classify({**BASE, "sharpness": 30.0})
    assert s == "unstable" and any("30" in r and "20" in r for r in reasons)
