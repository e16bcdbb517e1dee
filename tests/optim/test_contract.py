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


SIZED = [
    n
    for n in OURS
    if isinstance(build(n, [torch.zeros(1, requires_grad=True)]), cs.optim.ModelStepOptimizer)
]


@pytest.mark.parametrize("name", SIZED)
def test_a_size_set_before_a_checkpoint_restarts_the_resumed_search(name):
    """Setting the group's radius, damping or σ — its own value too — restarts the search at
    the next step; set and then saved, the mark was lost on resume, and the resumed step went
    on from the adapted size (an outside review: HessianFree's damping 0.667 uninterrupted,
    0.132 resumed; Newton's lost for any value)."""
    p = cs.problems.get("rosenbrock")
    x = p.x0.clone().requires_grad_()
    opt = build(name, [x])
    run(name, opt, lambda: p.f(x), x, 4)
    size = opt.param_groups[0].size
    opt.param_groups[0][size] = opt.param_groups[0][size]  # restart from the group's value
    saved_opt, saved_x = copy.deepcopy(opt.state_dict()), x.detach().clone()
    run(name, opt, lambda: p.f(x), x, 1)

    y = saved_x.clone().requires_grad_()
    opt2 = build(name, [y])
    opt2.load_state_dict(saved_opt)
    run(name, opt2, lambda: p.f(y), y, 1)
    assert torch.equal(y.detach(), x.detach())
    key = opt.search.key
    assert opt2.state["global"][key] == opt.state["global"][key]


@pytest.mark.parametrize("name", OURS)
def test_a_state_dict_of_the_earlier_layout_loads(name):
    # before issue 13 the counts and the type were kept inside "state"
    p, x, f = quadratic()
    opt = build(name, [x])
    run(name, opt, f, x, 3)
    sd = copy.deepcopy(opt.state_dict())
    old = {
        "state": {"counts": sd["counts"], "optimizer": sd["optimizer"], **sd["state"]},
        "param_groups": sd["param_groups"],
    }
    saved_x = x.detach().clone()
    run(name, opt, f, x, 2)
    y = saved_x.clone().requires_grad_()
    opt2 = build(name, [y])
    opt2.load_state_dict(old)
    assert "counts" not in opt2.state and "optimizer" not in opt2.state
    assert opt2.state_dict()["counts"] == sd["counts"]
    run(name, opt2, lambda: p.f(y), y, 2)
    assert torch.equal(y.detach(), x.detach()) and opt2.counts == opt.counts


@pytest.mark.parametrize("name", OURS)
def test_a_state_dict_is_not_changed_by_later_steps_nor_by_the_optimizer_that_loaded_it(name):
    p, x, f = quadratic()
    opt = build(name, [x])
    run(name, opt, f, x, 2)
    sd = opt.state_dict()
    kept = copy.deepcopy(sd)
    run(name, opt, f, x, 2)
    assert same(sd, kept)
    y = x.detach().clone().requires_grad_()
    opt2 = build(name, [y])
    opt2.load_state_dict(sd)
    run(name, opt2, lambda: p.f(y), y, 2)
    assert same(sd, kept)


@pytest.mark.parametrize("name", OURS)
def test_a_copy_of_the_optimizer_keeps_its_counts_and_continues_identically(name):
    # torch's Optimizer pickles defaults, state and param_groups only: the counts, the last
    # StepInfo and the diagonal methods' estimator were lost by copy.deepcopy and pickle
    p, x, f = quadratic()
    opt = build(name, [x])
    run(name, opt, f, x, 2)
    x2, opt2 = copy.deepcopy((x, opt))
    assert opt2.counts == opt.counts and opt2.info == opt.info
    run(name, opt, f, x, 2)
    run(name, opt2, lambda: p.f(x2), x2, 2)
    assert torch.equal(x2.detach(), x.detach()) and opt2.counts == opt.counts


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
    # the closure's own backward, at every call (trial points too: it runs as written)
    assert opt_y.counts.gradients == opt_x.counts.gradients + opt_y.counts.closure_calls
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
    sd = opt.state_dict()  # the counts at its top level, not among the optimizer's state
    assert sd["counts"] == c.as_dict() and "counts" not in sd["state"]
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
    "cubic-newton": [{"sigma": 0}, {"krylov_dim": 1.5}, {"sigma": 1e-9, "min_sigma": 1e-3}],
    "adahessian": [{"lr": -1}, {"betas": (1.0, 0.9)}, {"hessian_power": 2}, {"update_every": 0}],
    "sophia": [{"lr": -1e-3}, {"rho": -1}, {"betas": (0.9,)}, {"seed": "a"}],
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


@pytest.mark.parametrize("backward", ["none", "own", "clipped", "assigned", "in_place"])
def test_normalized_gd_differentiates_a_closures_loss_or_reads_its_backwards_grad(backward):
    """DESIGN's closure contract, as every curvscope optimizer keeps it: a closure that only
    returns the loss raised "found no gradient", and with a .grad left from before the step
    went along that stale gradient (an outside review). Without a backward in the closure the
    step is along the gradient of the loss it returns; with one, along .grad as it left it
    (clipped: as SGD reads it). One closure call and one gradient either way."""
    x = torch.tensor([30.0, 40.0], dtype=torch.float64, requires_grad=True)
    (7 * x).sum().backward()  # a stale .grad, from before the step
    opt = cs.optim.NormalizedGD([x], lr=0.1)

    def closure():
        loss = (x**2).sum()
        if backward in ("assigned", "in_place"):  # .grad set by hand, clipped, no backward()
            (g,) = torch.autograd.grad(loss, [x], retain_graph=True)
            if backward == "assigned":
                x.grad = g.clamp(max=70.0)
            else:  # into the .grad left from before (torch's "backward twice" error before)
                x.grad.copy_(g.clamp(max=70.0))
        elif backward != "none":
            opt.zero_grad()
            loss.backward()
            if backward == "clipped":
                torch.nn.utils.clip_grad_value_(x, 70.0)  # (60, 80) -> (60, 70)
        return loss

    loss = opt.step(closure)
    assert float(loss) == 2500.0
    clipped = backward in ("clipped", "assigned", "in_place")
    g = torch.tensor([60.0, 70.0] if clipped else [60.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(x.detach(), torch.tensor([30.0, 40.0]).double() - 0.1 * g / g.norm())
    assert opt.counts.closure_calls == 1
    by_hand = backward in ("assigned", "in_place")
    assert opt.counts.gradients == (0 if by_hand else 1)  # (autograd.grad in it: not seen)
    if backward == "none":  # .grad as the user left it
        torch.testing.assert_close(x.grad, torch.full((2,), 7.0, dtype=torch.float64))


@pytest.mark.parametrize("name", [n for n in CLOSURE_DRIVEN if REGISTRY[n].exact])
def test_tolerance_grad_skips_the_step_at_a_converged_point(name):
    p = cs.problems.get("quadratic", n=4, condition=10.0)
    x = p.minima[0].clone().add_(1e-9).requires_grad_()
    opt = build(name, [x], tolerance_grad=1e-6)
    before = x.detach().clone()
    opt.step(lambda: p.f(x))
    assert torch.equal(x.detach(), before) and opt.counts.products == 0
    assert opt.info.note.startswith("stationary") and opt.counts.gradients == 1


# ---------------------------------------------------------- a step is a transaction
class Fault(BaseException):
    """Raised at a planned point inside a step (a BaseException, like KeyboardInterrupt: the
    transaction must hold for those too)."""


class Plan:
    """Counts the closure's calls and the curvature products through the loss; raises
    :class:`Fault` at the armed closure call or product."""

    def __init__(self):
        self.call_at = self.product_at = None
        self.calls = self.products = 0

    def arm(self, call_at=None, product_at=None):
        self.call_at, self.product_at = call_at, product_at
        self.calls = self.products = 0

    def call(self):
        self.calls += 1
        if self.calls == self.call_at:
            raise Fault(f"closure call {self.calls}")

    def product(self):
        self.products += 1
        if self.products == self.product_at:
            raise Fault(f"curvature product {self.products}")


class _Tripwire(torch.autograd.Function):
    """The identity; differentiating its gradient (one curvature product: a Hessian-vector
    product is the derivative of the gradient) goes through ``_TripwireBack.backward``."""

    @staticmethod
    def forward(ctx, x, plan):
        ctx.plan = plan
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return _TripwireBack.apply(g, ctx.plan), None


class _TripwireBack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, plan):
        ctx.plan = plan
        return g.clone()

    @staticmethod
    def backward(ctx, gg):
        ctx.plan.product()
        return gg, None


ROSEN6 = cs.problems.get("extended-rosenbrock", n=6)


def faulty_setup(name, warm):
    """x, its optimizer after ``warm`` clean steps, the plan and the closure (which calls
    backward for the methods that read .grad)."""
    x = ROSEN6.x0.clone().requires_grad_()
    opt, plan = build(name, [x], **({"lr": 0.01} if REGISTRY[name].lr else {})), Plan()

    def closure():
        plan.call()
        loss = ROSEN6.f(_Tripwire.apply(x, plan))
        if REGISTRY[name].reads_grad:
            opt.zero_grad()
            loss.backward()
        return loss

    for _ in range(warm):
        opt.step(closure)
    return x, opt, plan, closure


def same(a, b):
    """Bit-identical: tensors by torch.equal (and dtype), containers entry by entry."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


@pytest.mark.parametrize("warm", [0, 2])
@pytest.mark.parametrize("name", OURS)
def test_a_step_that_raises_anywhere_leaves_parameters_and_state_as_before(name, warm):
    # the reference never faults; its step warm+1 shows where the closure and products run
    x_ref, opt_ref, plan, closure = faulty_setup(name, warm)
    plan.arm()
    opt_ref.step(closure)
    calls, products = plan.calls, plan.products
    opt_ref.step(closure)
    faults = [{"call_at": k} for k in sorted({1, calls // 2 + 1, calls}) if k <= calls]
    if products:
        faults += [{"product_at": j} for j in sorted({1, products // 2 + 1, products})]
    # faults at the first call, at a trial point, inside CG / Lanczos / the diagonal estimate
    if REGISTRY[name].order == 2 and not REGISTRY[name].stochastic:
        assert calls >= 2 and products >= 1, (calls, products)
    if REGISTRY[name].order == 2 and warm == 0:
        assert products >= 1

    for fault in faults:
        x, opt, plan, closure = faulty_setup(name, warm)
        x0, sd0 = x.detach().clone(), copy.deepcopy(opt.state_dict())
        counts0, info0 = opt.counts, opt.info
        plan.arm(**fault)
        with pytest.raises(Fault):
            opt.step(closure)
        assert torch.equal(x.detach(), x0), fault
        assert same(opt.state_dict(), sd0), fault
        assert opt.counts == counts0 and opt.info is info0
        plan.arm()  # the retry: bit-identical to the run that never faulted
        opt.step(closure)
        opt.step(closure)
        assert torch.equal(x.detach(), x_ref.detach()), fault
        assert same(opt.state_dict(), opt_ref.state_dict()), fault


@pytest.mark.parametrize("name", OURS)
def test_state_tensors_are_replaced_never_changed_in_place(name):
    # the transaction keeps the state's tensors by reference: exact only if a step never
    # writes into one
    _, opt, _, closure = faulty_setup(name, 2)
    versions = [
        (t, t._version)
        for st in opt.state.values()
        if isinstance(st, dict)
        for t in st.values()
        if isinstance(t, torch.Tensor)
    ]
    opt.step(closure)
    assert all(t._version == v for t, v in versions)


def _other_type(name):
    return next(n for n in OURS if REGISTRY[n].cls is not REGISTRY[name].cls)


@pytest.mark.parametrize("name", OURS)
def test_load_state_dict_refuses_another_optimizers_state(name):
    _, opt, _, closure = faulty_setup(name, 1)
    other = _other_type(name)
    _, donor, _, _ = faulty_setup(other, 1)
    before = copy.deepcopy(opt.state_dict())
    theirs, ours = REGISTRY[other].cls.__name__, REGISTRY[name].cls.__name__
    with pytest.raises(ValueError, match=f"saved by {theirs}, not {ours}"):
        opt.load_state_dict(donor.state_dict())
    assert same(opt.state_dict(), before)  # refused before anything was loaded
    opt.step(closure)  # and it goes on as before


@pytest.mark.parametrize("name", OURS)
def test_load_state_dict_refuses_torch_optimizers_state(name):
    x = torch.ones(3, requires_grad=True)
    adam = torch.optim.Adam([x])
    with pytest.raises(ValueError, match="not a curvscope one"):
        build(name, [x]).load_state_dict(adam.state_dict())


@pytest.mark.parametrize("name", OURS)
def test_load_state_dict_refuses_other_shapes_where_the_state_has_them(name):
    _, opt, _, _ = faulty_setup(name, 2)  # 6 parameters
    saved = opt.state_dict()
    y = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    fresh = build(name, [y], **({"lr": 0.01} if REGISTRY[name].lr else {}))
    shaped = any(
        isinstance(t, torch.Tensor) and t.ndim > 0
        for st in opt.state.values()
        if isinstance(st, dict)
        for t in st.values()
    )
    if shaped:  # AdaHessian, Sophia (per-parameter moments), Hessian-free (previous solution)
        with pytest.raises(ValueError, match="another shape"):
            fresh.load_state_dict(saved)
    else:  # radius, damping, σ, counts: nothing depends on the shape, so it loads and runs
        fresh.load_state_dict(saved)
        run(name, fresh, lambda: (y - 1).square().sum(), y, 1)
        assert float(y.detach().sum()) > 0


def test_load_state_dict_refuses_other_parameter_groups():
    a, b = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = cs.optim.AdaHessian([{"params": [a]}, {"params": [b]}])
    with pytest.raises(ValueError, match="2 parameter group"):
        cs.optim.AdaHessian([a, b]).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="holds 1 parameters in the state dict and 2 here"):
        cs.optim.AdaHessian([{"params": [a, b]}, {"params": []}]).load_state_dict(opt.state_dict())
    with pytest.raises(TypeError, match=r"expected what AdaHessian\.state_dict"):
        cs.optim.AdaHessian([a]).load_state_dict({"radius": 1.0})


@pytest.mark.parametrize("name", ["adahessian", "sophia"])
def test_a_parameter_the_loss_does_not_use_is_left_alone(name):
    """torch's optimizers skip a parameter whose .grad is None (a conditional head, an idle
    expert); AdaHessian and Sophia moved it by weight decay and old momentum (a review)."""
    torch.manual_seed(0)
    heads = torch.nn.ModuleList(torch.nn.Linear(3, 1).double() for _ in range(2))
    X, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    opt = build(name, heads.parameters(), weight_decay=0.1)
    for head in (0, 1, 0, 0):  # head 1 is used once, then not
        before = [p.detach().clone() for p in heads[1 - head].parameters()]
        opt.step(lambda h=head: torch.nn.functional.mse_loss(heads[h](X), y))
        after = list(heads[1 - head].parameters())
        assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "name", ["newton", "newton-cg", "hessian-free", "saddle-free-newton", "cubic-newton"]
)
def test_a_16_bit_model_steps_with_its_dense_algebra_in_float32(name, dtype):
    """Dense Newton's eigh has no bfloat16, and the Lanczos methods mixed their float32 basis
    with the 16-bit gradient: torch's bare dtype errors (a review)."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model = model.to(dtype)
    X, y = torch.randn(64, 4), torch.randn(64, 1)
    opt = build(name, model.parameters())

    def f():
        return torch.nn.functional.mse_loss(model(X.to(dtype)).float(), y)

    first = float(f().detach())
    for _ in range(4):
        opt.step(f)
    assert float(f().detach()) < first and all(p.dtype == dtype for p in model.parameters())


def test_a_one_group_method_refuses_add_param_group_and_survives_a_frozen_layer():
    """add_param_group was accepted and its options ignored (HessianFree then failed with "x0
    of shape (29,)"); freezing a layer mid-training failed the same way (a review)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model = model.double()
    X, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    extra = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    for name in ("newton-cg", "hessian-free", "newton"):
        opt = build(name, model.parameters())
        with pytest.raises(ValueError, match="takes one parameter group; to train more"):
            opt.add_param_group({"params": [extra]})
    opt = cs.optim.HessianFree(model.parameters())

    def closure():
        out = model(X)
        return torch.nn.functional.mse_loss(out, y), out

    opt.step(closure)
    model[0].requires_grad_(False)  # fine-tuning: the first layer frozen
    frozen = model[0].weight.detach().clone()
    loss = float(closure()[0])
    opt.step(closure)  # CG starts cold: its warm start was for 21 entries, now 5
    assert float(closure()[0]) < loss and torch.equal(model[0].weight, frozen)
    # a checkpoint saved with the layer frozen, resumed with it trainable again: refused as
    # "a model of another shape" (its warm start is for 5 entries); now it loads, and the warm
    # start is dropped at the next step as in the run above
    saved = opt.state_dict()
    model[0].requires_grad_(True)
    resumed = cs.optim.HessianFree(model.parameters())
    resumed.load_state_dict(saved)
    loss = float(closure()[0])
    resumed.step(closure)
    assert float(closure()[0]) < loss
    other = torch.nn.Linear(3, 2).double()  # another model still is refused
    with pytest.raises(ValueError, match="build the optimizer on the parameters it was saved"):
        cs.optim.HessianFree(other.parameters()).load_state_dict(saved)


@pytest.mark.parametrize(
    "make,key", [(cs.optim.NewtonCG, "radius"), (cs.optim.CubicNewton, "sigma")]
)
def test_editing_the_groups_size_between_steps_takes_effect(make, key):
    """The radius, damping or σ in param_groups were read once, at construction; editing them
    did nothing (a review). Torch reads its lr at each step: so now do these."""
    steps = {}
    for edited in (False, True):
        _, x, f = quadratic()
        opt = make([x])
        opt.step(f)
        if edited:
            opt.param_groups[0][key] = 1e-4 if key == "radius" else 1e8
        before = x.detach().clone()
        opt.step(f)
        steps[edited] = float((x.detach() - before).norm())
    assert steps[True] < 1e-2 * steps[False]  # a radius of 1e-4, or σ = 1e8: a tiny step
    if key == "radius":
        assert steps[True] <= 1e-4 * (1 + 1e-9)
    assert opt.state_dict()["param_groups"][0][key] == opt.param_groups[0][key]


def test_setting_the_groups_size_to_its_own_value_restarts_the_search():
    """A radius collapsed on rejections and set back to the constructor's value (the fix the
    error and the README name) was compared with the last value asked — the same — and ignored
    (an outside review): any assignment of the size restarts the search."""
    _, x, f = quadratic()
    opt = cs.optim.NewtonCG([x], radius=1.0)
    opt.step(f)
    opt._set_global({**opt._global(), "radius": 1e-9})  # as if collapsed on rejections
    opt.param_groups[0]["radius"] = 1.0  # the value it was built with
    before = x.detach().clone()
    opt.step(f)
    assert float((x.detach() - before).norm()) > 1e-3
    opt._set_global({**opt._global(), "radius": 1e-9})  # no assignment: no restart
    before = x.detach().clone()
    opt.step(f)
    assert float((x.detach() - before).norm()) <= 1e-9 * (1 + 1e-6)  # (x moves by rounding)


@pytest.mark.parametrize("name", ["adahessian", "sophia"])
def test_a_gradient_clipped_or_masked_in_the_closure_is_the_one_stepped_along(name):
    """torch's habit — clip or mask .grad between backward and step — was ignored: AdaHessian
    moved a weight whose .grad the closure had zeroed by 11.4 (a review). When the closure runs
    its own backward, the first moment reads .grad as the closure left it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    X, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    opt = build(name, model.parameters(), weight_decay=0.0)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), y)
        loss.backward()
        model.weight.grad.zero_()  # masked: the weight must not move
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        return loss

    weight, bias = model.weight.detach().clone(), model.bias.detach().clone()
    opt.step(closure)
    assert torch.equal(model.weight, weight) and not torch.equal(model.bias, bias)
    assert opt.info.grad_norm == pytest.approx(1e-3, rel=1e-6)  # the clipped gradient's


@pytest.mark.parametrize("name", ["hessian-free"])
def test_a_warm_start_loaded_into_parameters_of_other_shapes_in_order_is_refused(name):
    """Parameters of the same count and total size in another order passed the size checks,
    and Hessian-free's warm start was applied to the wrong coordinates (an outside review):
    the state records the parameters' shapes, in order, and a warm start is refused there."""
    a = [torch.zeros(2, 3, dtype=torch.float64, requires_grad=True), torch.zeros(4)]
    b = [torch.zeros(4, dtype=torch.float64, requires_grad=True), torch.zeros(2, 3)]
    a[1] = a[1].double().requires_grad_()
    b[1] = b[1].double().requires_grad_()

    def closure():
        out = torch.cat([a[0].reshape(-1), a[1]])
        loss = ((out - 1) ** 2).sum()
        return loss, out

    opt = build(name, a)
    opt.step(closure)
    saved = opt.state_dict()
    with pytest.raises(ValueError, match="in another order"):
        build(name, b).load_state_dict(saved)
    build(name, [p.detach().clone().requires_grad_() for p in a]).load_state_dict(saved)
