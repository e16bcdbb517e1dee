"""The contract every registered curvscope optimizer keeps (run over the registry)."""

import copy
import math

import pytest
import torch

import curvscope as cs
from curvscope.optim import REGISTRY

OURS = [n for n, e in REGISTRY.items() if e.source == "curvscope"]
CLOSURE_DRIVEN = [n for n in OURS if not REGISTRY[n].reads_grad]
LR = {"normalized-gd": 0.3, "adahessian": 0.1, "sophia": 0.2}


def build(name, params, **kw):
    e = REGISTRY[name]
    if e.lr and "lr" not in kw:
        kw["lr"] = LR[name]
    return e.build(params, **kw)


def run(name, opt, f, x, steps):
    for _ in range(steps):
        if REGISTRY[name].reads_grad:
            opt.zero_grad()
            loss = f()
            loss.backward()
            opt.step()
        else:
            opt.step(f)


def quadratic(dtype=torch.float64):
    p = cs.problems.get("quadratic", n=6, condition=10.0)
    x = p.x0.clone().to(dtype).requires_grad_()
    return p, x, (lambda: p.f(x))


@pytest.mark.parametrize("name", OURS)
def test_descends_on_a_convex_quadratic(name):
    _, x, f = quadratic()
    opt = build(name, [x])
    f0 = float(f().detach())
    run(name, opt, f, x, 20)
    assert float(f().detach()) < 0.5 * f0
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", [n for n in OURS if REGISTRY[n].exact])
def test_exact_methods_reach_the_rosenbrock_minimum(name):
    p = cs.problems.get("rosenbrock")
    x = p.x0.clone().requires_grad_()
    opt = build(name, [x])
    run(name, opt, lambda: p.f(x), x, 150)
    assert torch.allclose(x.detach(), torch.ones(2, dtype=torch.float64), atol=1e-6)
    assert cs.optim.stationary_point(lambda: p.f(x), [x]).kind == "minimum"


@pytest.mark.parametrize("name", [n for n in OURS if not REGISTRY[n].exact])
def test_first_order_and_diagonal_methods_make_progress_on_rosenbrock(name):
    p = cs.problems.get("rosenbrock")
    x = p.x0.clone().requires_grad_()
    opt = build(name, [x], lr=0.01)
    run(name, opt, lambda: p.f(x), x, 300)
    assert float(p.f(x).detach()) < 0.25 * float(p.f(p.x0))


@pytest.mark.parametrize("name", OURS)
def test_state_dict_round_trip_resumes_identically(name):
    p, x, f = quadratic()
    opt = build(name, [x])
    run(name, opt, f, x, 3)
    saved_opt, saved_x = copy.deepcopy(opt.state_dict()), x.detach().clone()
    run(name, opt, f, x, 3)
    expected = x.detach().clone()

    y = saved_x.clone().requires_grad_()
    opt2 = build(name, [y])
    opt2.load_state_dict(saved_opt)
    run(name, opt2, lambda: p.f(y), y, 3)
    assert torch.equal(y.detach(), expected)
    assert opt2.counts == opt.counts


@pytest.mark.parametrize("name", OURS)
def test_float32_parameters_and_state_stay_float32(name):
    _, x, f = quadratic(torch.float32)
    opt = build(name, [x])
    run(name, opt, f, x, 3)
    assert x.dtype == torch.float32
    for st in opt.state.values():
        for v in st.values() if isinstance(st, dict) else ():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype == torch.float32


@pytest.mark.parametrize("name", CLOSURE_DRIVEN)
def test_a_missing_closure_is_a_clear_error(name):
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="needs a closure"):
        build(name, [x]).step()


@pytest.mark.parametrize("name", OURS)
def test_a_non_scalar_closure_is_a_clear_error(name):
    x = torch.ones(2, requires_grad=True)
    opt = build(name, [x])
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(lambda: x**2)


@pytest.mark.parametrize("name", CLOSURE_DRIVEN)
def test_a_closure_that_calls_backward_gives_the_same_step(name):
    p, x, f = quadratic()
    y = x.detach().clone().requires_grad_()
    opt_x, opt_y = build(name, [x]), build(name, [y])

    def with_backward():
        opt_y.zero_grad()
        loss = p.f(y)
        loss.backward()
        return loss

    for _ in range(3):
        start = y.detach().clone()
        opt_x.step(f)
        opt_y.step(with_backward)
    assert torch.allclose(x, y, rtol=1e-12, atol=0)
    assert opt_y.counts.gradients == opt_x.counts.gradients + 3  # the closure's own backward
    # .grad is what the closure computed: the gradient where the last step started
    assert y.grad is not None and torch.allclose(y.grad, p.grad(start), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", OURS)
def test_counts_and_step_info(name):
    _, x, f = quadratic()
    opt = build(name, [x])
    run(name, opt, f, x, 2)
    c, info = opt.counts, opt.info
    assert c.gradients >= 2 and info is not None and info.grad_norm > 0
    if REGISTRY[name].order == 2:
        assert c.products > 0 and info.products >= 0
    if REGISTRY[name].dense:
        assert c.hessians == 2
    assert opt.state_dict()["state"]["counts"] == c.as_dict()
    before = x.detach().clone()
    run(name, opt, f, x, 1)
    moved = float((x.detach() - before).norm())
    assert opt.info.step_norm == pytest.approx(moved, rel=1e-9, abs=1e-15)


BAD = {
    "newton": [{"damping": -1.0}],
    "pure-newton": [{"damping": float("nan")}],
    "newton-cg": [
        {"radius": 0.0},
        {"eta": 0.5},
        {"max_cg": 0},
        {"radius": 10, "max_radius": 1},
        {"tolerance_grad": -1.0},
    ],
    "hessian-free": [{"damping": 0}, {"curvature": "fisher"}, {"decay": 1.5}],
    "saddle-free-newton": [{"krylov_dim": 0}, {"damping": -1}],
    "cubic-newton": [{"sigma": 0}, {"krylov_dim": 1.5}],
    "adahessian": [{"lr": -1}, {"betas": (1.0, 0.9)}, {"hessian_power": 2}, {"update_every": 0}],
    "sophia": [{"lr": 0}, {"rho": -1}, {"betas": (0.9,)}, {"seed": "a"}],
    "normalized-gd": [{"lr": -0.1}, {"eps": 0}],
}


@pytest.mark.parametrize("name", OURS)
def test_invalid_hyperparameters_are_rejected_in_init(name):
    x = torch.ones(2, requires_grad=True)
    for kw in BAD[name]:
        with pytest.raises(ValueError, match="Invalid"):
            REGISTRY[name].build([x], **({"lr": 0.1} if REGISTRY[name].lr else {}) | kw)


def test_registry_names_and_unknown_name():
    assert set(OURS) >= {
        "newton",
        "newton-cg",
        "hessian-free",
        "saddle-free-newton",
        "cubic-newton",
        "adahessian",
        "sophia",
        "normalized-gd",
    }
    assert {"gd", "momentum", "adam", "lbfgs"} <= set(cs.optim.names("torch"))
    with pytest.raises(ValueError, match="valid names: gd"):
        cs.optim.get("newtown")


def test_second_order_methods_need_one_parameter_group():
    a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="one parameter group"):
        cs.optim.NewtonCG([{"params": [a]}, {"params": [b]}])


def test_dense_newton_refuses_large_models():
    x = torch.zeros(6000, requires_grad=True)
    with pytest.raises(ValueError, match="NewtonCG"):
        cs.optim.Newton([x])


@pytest.mark.parametrize(
    "name", [n for n in CLOSURE_DRIVEN if REGISTRY[n].order == 2 and not REGISTRY[n].stochastic]
)
def test_a_step_into_a_non_finite_region_is_never_written(name):
    # (x − 2)² for x < 1, NaN beyond: every model-based step aims at 2 and lands in NaN
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)

    def f():
        return torch.where(x < 1, (x - 2) ** 2, torch.full_like(x, math.nan)).sum()

    opt = build(name, [x])
    for _ in range(30):
        opt.step(f)
        assert torch.isfinite(x).all() and float(x.detach()) < 1
    if name == "pure-newton":  # it has no safeguard but this one: it stays where it was
        assert float(x.detach()) == 0.0 and "not finite" in opt.info.note
    else:
        assert float(x.detach()) > 0.9


def test_a_non_finite_loss_at_the_current_point_is_a_clear_error():
    x = torch.full((1,), math.nan, requires_grad=True)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        cs.optim.NewtonCG([x]).step(lambda: (x**2).sum())


def test_normalized_gd_needs_a_gradient():
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="no gradient"):
        cs.optim.NormalizedGD([x]).step()


def test_normalized_gd_step_has_fixed_length():
    x = torch.tensor([30.0, 40.0], requires_grad=True)
    opt = cs.optim.NormalizedGD([x], lr=0.1)
    (x**2).sum().backward()
    opt.step()
    assert float(opt.info.step_norm) == pytest.approx(0.1)
    assert torch.allclose(x.detach(), torch.tensor([29.94, 39.92]))


@pytest.mark.parametrize("name", [n for n in CLOSURE_DRIVEN if REGISTRY[n].exact])
def test_tolerance_grad_skips_the_step_at_a_converged_point(name):
    p = cs.problems.get("quadratic", n=4, condition=10.0)
    x = p.minima[0].clone().add_(1e-9).requires_grad_()
    opt = build(name, [x], tolerance_grad=1e-6)
    before = x.detach().clone()
    opt.step(lambda: p.f(x))
    assert torch.equal(x.detach(), before) and opt.counts.products == 0
    assert "converged" in opt.info.note and opt.counts.gradients == 1
