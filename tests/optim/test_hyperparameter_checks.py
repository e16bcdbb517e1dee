"""The optimizers' hyperparameter checks are the shared checks (curvscope.derivatives.checks)
worded as torch.optim words them: a ValueError "Invalid <name>: <value> (expected ...)"."""

import math

import numpy as np
import pytest
import torch

import curvscope as cs
from curvscope.optim.base import check_int, check_positive, check_unit


@pytest.mark.parametrize(
    ("check", "value", "match"),
    [
        (lambda v: check_positive("lr", v), -1, r"Invalid lr: -1 \(expected a finite number > 0\)"),
        (lambda v: check_positive("lr", v), 0.0, "Invalid lr: 0.0"),
        (lambda v: check_positive("lr", v), math.inf, "Invalid lr: inf"),
        (lambda v: check_positive("lr", v), "0.1", "Invalid lr: '0.1'"),
        (lambda v: check_positive("lr", v), True, "Invalid lr: True"),
        (lambda v: check_positive("eps", v, allow_zero=True), -1e-8, r"finite number >= 0"),
        (
            lambda v: check_int("krylov_dim", v),
            0,
            r"Invalid krylov_dim: 0 \(expected an integer >= 1\)",
        ),
        (lambda v: check_int("krylov_dim", v), 1.5, "Invalid krylov_dim: 1.5"),
        (lambda v: check_int("krylov_dim", v), True, "Invalid krylov_dim: True"),
        (
            lambda v: check_unit("beta1", v),
            1.0,
            r"Invalid beta1: 1.0 \(expected a number in \[0, 1\)\)",
        ),
        (lambda v: check_unit("beta1", v), -0.1, "Invalid beta1: -0.1"),
        (lambda v: check_unit("beta1", v), math.nan, "Invalid beta1: nan"),
        (lambda v: check_unit("beta1", v), None, "Invalid beta1: None"),
    ],
)
def test_bad_hyperparameters_are_refused_in_torch_words(check, value, match):
    with pytest.raises(ValueError, match=match):
        check(value)


def test_good_values_pass_as_plain_python_numbers():
    assert check_positive("lr", 1) == 1.0 and type(check_positive("lr", 1)) is float
    assert check_positive("lr", np.float32(0.5)) == 0.5  # numpy scalars are numbers too
    assert check_positive("eps", 0, allow_zero=True) == 0.0
    assert check_int("krylov_dim", np.int64(3)) == 3 and type(check_int("k", 3)) is int
    assert check_unit("beta1", 0) == 0.0 and check_unit("beta2", 0.999) == 0.999


def test_review_findings_on_hyperparameters():
    """lr = 0 is accepted as torch accepts it; σ below min_sigma, and a second group with its
    own update_every or seed (the method's, read from group 0 only), are refused (a review)."""
    x = torch.zeros(2, requires_grad=True)
    y = torch.zeros(2, requires_grad=True)
    for make in (cs.optim.AdaHessian, cs.optim.Sophia, cs.optim.NormalizedGD):
        make([x], lr=0.0)
    with pytest.raises(ValueError, match="below min_sigma"):
        cs.optim.CubicNewton([x], sigma=1e-10, min_sigma=1.0)
    for key, value in (("update_every", 3), ("seed", 7)):
        with pytest.raises(ValueError, match=f"{key}={value} in a parameter group differs"):
            cs.optim.Sophia([{"params": [x]}, {"params": [y], key: value}])
        opt = cs.optim.AdaHessian([x])
        with pytest.raises(ValueError, match="it is the method's, not a group's"):
            opt.add_param_group({"params": [y], key: value})
    cs.optim.Sophia([{"params": [x]}, {"params": [y], "lr": 0.1}])  # a group's own lr is fine


@pytest.mark.parametrize("key", ["update_every", "seed"])
def test_the_methods_own_value_edited_in_one_group_after_construction_is_refused(key):
    """``update_every`` and ``seed`` edited in a second group after construction were ignored
    (group 0's was read): the step refuses the disagreement, before it moves anything; edited
    in every group they take effect."""
    x = torch.ones(2, requires_grad=True)
    y = torch.ones(2, requires_grad=True)

    def closure():  # the loss only: the method takes its own derivatives
        return (x**4).sum() + (y**4).sum()

    opt = cs.optim.AdaHessian([{"params": [x]}, {"params": [y]}], lr=0.1)
    opt.step(closure)
    opt.param_groups[1][key] = 5
    before = (x.detach().clone(), y.detach().clone())
    with pytest.raises(ValueError, match=f"{key}=5 in a parameter group differs.*every group"):
        opt.step(closure)
    assert torch.equal(x, before[0]) and torch.equal(y, before[1])
    opt.param_groups[0][key] = 5
    opt.step(closure)
    assert not torch.equal(x, before[0])


def test_normalized_gd_reports_the_step_it_took_with_per_group_rates():
    x = torch.tensor([3.0, 4.0], requires_grad=True)
    y = torch.tensor([1.0], requires_grad=True)
    opt = cs.optim.NormalizedGD([{"params": [x], "lr": 1.0}, {"params": [y], "lr": 0.1}])
    before = torch.cat([x.detach(), y.detach()])
    ((x**2).sum() + (y**2).sum()).backward()
    opt.step()
    taken = float((torch.cat([x.detach(), y.detach()]) - before).norm())
    assert opt.info.step_norm == pytest.approx(taken, rel=1e-6)


@pytest.mark.parametrize(
    ("make", "group", "match"),
    [
        (cs.optim.AdaHessian, {"lr": -1.0}, "Invalid learning rate: -1.0"),
        (cs.optim.AdaHessian, {"betas": (0.9,)}, "Invalid betas"),
        (cs.optim.AdaHessian, {"hessian_power": 3.0}, "Invalid hessian_power: 3.0"),
        (cs.optim.AdaHessian, {"eps": 0.0}, "Invalid eps: 0.0"),
        (cs.optim.Sophia, {"rho": -0.1}, "Invalid rho"),
    ],
)
def test_a_groups_own_values_are_checked_as_the_constructors(make, group, match):
    """``add_param_group`` (and a group passed to the constructor as a dict) took its own
    values unchecked: hessian_power=3, eps=0, lr=-1; betas failed only at the step."""
    x, w = (torch.ones(2, requires_grad=True) for _ in range(2))
    opt = make([x])
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [w], **group})
    with pytest.raises(ValueError, match=match):
        make([{"params": [w], **group}])


def test_a_parameter_listed_twice_is_refused():
    """torch only warns; AdaHessian stepped it twice and diverged to 1e8 on a quadratic. As
    torch's named parameters, (name, tensor) pairs, it passed (an outside review), and a
    complex one failed only at the step, with torch's bare message."""
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="appears twice"):
        cs.optim.AdaHessian([x, x])
    with pytest.raises(ValueError, match="appears twice"):
        cs.optim.AdaHessian([("a", x), ("b", x)])
    with pytest.raises(ValueError, match="appears twice"):
        cs.optim.Newton([("a", x), ("b", x)])
    z = torch.ones(2, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match="real parameters only"):
        cs.optim.AdaHessian([("z", z)])
    opt = cs.optim.AdaHessian([("a", x)], lr=0.1)  # named, once: as torch's
    assert opt.param_groups[0]["param_names"] == ["a"]


@pytest.mark.parametrize("make", [cs.optim.NormalizedGD, cs.optim.NewtonCG, cs.optim.AdaHessian])
def test_a_torch_hyperparameter_the_method_does_not_read_is_refused_in_a_group(make):
    """An outside review: a group's weight_decay=10 was taken and ignored by NormalizedGD and
    the model-step methods (torch's SGD applies it). Where it asks for nothing (0, False: a
    group built for any optimizer, as Hugging Face's Trainer builds them), it is taken."""
    w = torch.ones(2, requires_grad=True)
    asks = {"momentum": 0.9} if make is cs.optim.AdaHessian else {"weight_decay": 10.0}
    (key,) = asks
    with pytest.raises(ValueError, match=f"reads no '{key}'"):
        make([{"params": [w], **asks}])
    make([{"params": [w], key: 0.0, "maximize": False}])
    with pytest.raises(ValueError, match="reads no 'nesterov'"):
        make([{"params": [w], "nesterov": True}])


def test_newton_checks_its_size_at_every_step():
    """Newton refused more than DENSE_LIMIT parameters when built only: a layer unfrozen
    later asked for a 10,201 x 10,201 Hessian."""
    from curvscope.derivatives import DENSE_LIMIT

    small = torch.ones(10, dtype=torch.float64, requires_grad=True)
    big = torch.ones(DENSE_LIMIT, dtype=torch.float64, requires_grad=False)
    opt = cs.optim.Newton([small, big])
    big.requires_grad_(True)
    with pytest.raises(ValueError, match="dense"):
        opt.step(lambda: (small**2).sum() + (big**2).sum())
    assert torch.equal(small, torch.ones(10, dtype=torch.float64))


@pytest.mark.parametrize(("key", "value"), [("lr", -1.0), ("lr", float("nan")), ("eps", 0.0)])
def test_normalized_gd_checks_a_groups_own_values(key, value):
    """A group's own lr=-1 stepped uphill; lr=nan and eps=0 were taken (an outside review),
    where the constructor's own arguments were checked."""
    x, y = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=f"Invalid {'learning rate' if key == 'lr' else key}"):
        cs.optim.NormalizedGD([{"params": [x], key: value}])
    opt = cs.optim.NormalizedGD([x], lr=0.1)
    with pytest.raises(ValueError, match="Invalid"):
        opt.add_param_group({"params": [y], key: value})
    assert len(opt.param_groups) == 1


def _closure(x: torch.Tensor, loss_of):
    """A closure computing ``loss_of(x)`` and its gradient (``x.grad`` set afresh)."""

    def closure():
        x.grad = None
        loss = loss_of(x)
        loss.backward()
        return loss

    return closure


_EDITED = [
    (cs.optim.CubicNewton, "sigma", -1.0, "Invalid sigma"),  # hung in its subproblem
    (cs.optim.CubicNewton, "sigma", 0.0, "Invalid sigma"),  # a bare ZeroDivisionError
    (cs.optim.SaddleFreeNewton, "krylov_dim", 0, "Invalid krylov_dim"),
    (cs.optim.HessianFree, "damping", -1.0, "Invalid damping"),
    (cs.optim.Newton, "damping", -1.0, "Invalid damping"),  # the unsafeguarded step, silently
    (cs.optim.NewtonCG, "radius", 0.0, "Invalid radius"),  # stalled, every step 0
    (cs.optim.NewtonCG, "radius", -5.0, "Invalid radius"),  # taken as |radius|
    (cs.optim.NewtonCG, "max_cg", 0, "Invalid max_cg"),
    (cs.optim.NormalizedGD, "lr", -1.0, "Invalid learning rate"),  # stepped uphill
    (cs.optim.AdaHessian, "hessian_power", 2.0, "Invalid hessian_power"),
    (cs.optim.AdaHessian, "eps", 0.0, "Invalid eps"),
    (cs.optim.Sophia, "betas", (1.5, 0.999), "Invalid beta1"),
    (cs.optim.Sophia, "rho", -1.0, "Invalid rho"),
]


@pytest.mark.parametrize(
    ("make", "key", "value", "match"),
    _EDITED,
    ids=[f"{m.__name__}-{k}={v}" for m, k, v, _ in _EDITED],
)
def test_a_value_edited_between_steps_is_checked_at_the_next_step(make, key, value, match):
    """An outside review: a group's value set between steps (as a scheduler, or the README's
    way of scheduling a radius, damping or σ, sets it) was taken unchecked — CubicNewton's
    σ = −1 hung, NewtonCG's radius 0 stalled for good, NormalizedGD's lr = −1 stepped uphill.
    Now refused at the step, as the constructor refuses it, with nothing written; and in a
    group passed to the constructor."""
    torch.manual_seed(0)
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)

    closure = _closure(x, lambda t: (t**4).sum() + (t**2).sum())

    opt = make([x])
    opt.step(closure)
    before = x.detach().clone()
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=match):
        opt.step(closure)
    assert torch.equal(x.detach(), before)
    with pytest.raises(ValueError, match=match):
        make([{"params": [x], key: value}])


def test_a_max_radius_lowered_between_steps_bounds_the_next_step():
    """An outside review: max_radius edited below the radius reached, the next step kept it
    (a step of norm 2.0 for a max_radius of 0.1)."""
    x = torch.full((3,), 10.0, dtype=torch.float64, requires_grad=True)

    closure = _closure(x, lambda t: ((t - 1) ** 2).sum())

    opt = cs.optim.NewtonCG([x], radius=0.05, max_radius=4.0)
    while opt.info is None or opt.info.radius <= 0.2:  # full steps to the boundary: it grows
        opt.step(closure)
    opt.param_groups[0]["max_radius"] = 0.1  # above the radius asked (0.05), below the reached
    before = x.detach().clone()
    opt.step(closure)
    assert float((x.detach() - before).norm()) <= 0.1 + 1e-12
    assert opt.info.radius <= 0.1
    # below the radius asked too (0.05): bounded, not refused (a review: "Invalid radius:
    # 0.05 exceeds max_radius", a value the user never touched)
    opt.param_groups[0]["max_radius"] = 0.01
    before = x.detach().clone()
    opt.step(closure)
    assert float((x.detach() - before).norm()) <= 0.01 + 1e-12


def test_a_min_sigma_raised_between_steps_bounds_sigma():
    x = torch.full((3,), 3.0, dtype=torch.float64, requires_grad=True)

    closure = _closure(x, lambda t: ((t - 1) ** 4).sum())

    opt = cs.optim.CubicNewton([x])  # σ = 1 asked
    opt.step(closure)
    opt.param_groups[0]["min_sigma"] = 10.0
    opt.step(closure)
    assert opt.info.sigma >= 10.0


@pytest.mark.parametrize("make", [cs.optim.NormalizedGD, cs.optim.AdaHessian, cs.optim.Sophia])
def test_a_schedulers_rounding_and_a_tensor_lr_are_taken(make):
    """A review: torch's LinearLR decaying to 0 ends at -1.85e-19 — refused at the step, it
    ended the run (torch's own optimizers go on); a LambdaLR returning a tensor writes one."""
    x = torch.ones(3, requires_grad=True)

    closure = _closure(x, lambda t: (t**2).sum())

    opt = make([x], lr=0.1)
    schedule = torch.optim.lr_scheduler.LinearLR(opt, end_factor=0.0, total_iters=4)
    for _ in range(6):
        opt.step(closure)
        schedule.step()
    assert -1e-12 <= opt.param_groups[0]["lr"] <= 0
    opt.param_groups[0]["lr"] = torch.tensor(0.01)
    opt.step(closure)
    opt.param_groups[0]["lr"] = -1e-6  # not rounding: refused
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.step(closure)
