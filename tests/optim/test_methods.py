"""Known answers for each method, the traps of scipy and torch reproduced and avoided, and the
curvature pieces (products, estimators) against dense float64 references."""

import math
from itertools import pairwise

import numpy as np
import pytest
import scipy.optimize as so
import torch
from torch import nn

import curvscope as cs
from curvscope.optim._closure import Counts, Evaluation
from tests import cases

DT = torch.float64


def at(fn, x):
    """The closure fn(x) (bound now, not at call time)."""
    return lambda: fn(x)


def minimize(opt, f, steps, gtol=None, grad=None):
    for k in range(steps):
        if gtol is not None and grad().norm() < gtol:
            return k
        opt.step(f)
    return steps


def test_newton_solves_a_convex_quadratic_in_one_step():
    p = cs.problems.get("quadratic", n=30, condition=1e4)
    x = p.x0.clone().requires_grad_()
    cs.optim.Newton([x]).step(lambda: p.f(x))
    assert torch.allclose(x.detach(), p.minima[0], atol=1e-8)


def _softmax_regression(extra_column: bool = False):
    """Multinomial logistic regression on noisy labels: its Hessian is singular (every class's
    weights shifted by one vector changes nothing), the gradient has none of that null space."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 8, generator=g, dtype=DT) * torch.logspace(-1.5, 1, 8, dtype=DT)
    if extra_column:
        X = torch.cat([X, torch.zeros(400, 1, dtype=DT)], dim=1)  # a feature zero everywhere
    y = torch.randint(0, 4, (400,), generator=g)
    W = torch.zeros(4, X.shape[1], dtype=DT, requires_grad=True)
    b = torch.zeros(4, dtype=DT, requires_grad=True)
    return [W, b], lambda: nn.functional.cross_entropy(X @ W.T + b, y)


@pytest.mark.parametrize("extra_column", [False, True])
def test_newton_leaves_out_directions_of_no_curvature_and_no_gradient(extra_column):
    """Any eigenvalue <= 0 was "indefinite": a Hessian with an exact null space — softmax
    regression, a feature zero everywhere, an unused parameter — got a shift of 1e-3·max|λ| every
    step and converged linearly (‖g‖ 2e-3 after 15 steps; an outside review). Directions with
    no curvature and no gradient are left out of the step: quadratic convergence, as pure
    Newton's."""
    params, f = _softmax_regression(extra_column)
    opt = cs.optim.Newton(params)
    norms = []
    for _ in range(6):
        opt.step(f)
        norms.append(opt.info.grad_norm)
    assert norms[4] < 1e-12, norms
    assert "singular Hessian" in opt.info.note or norms[-1] < 1e-14
    # a quadratic of condition 1e4 beside an unused parameter: one step, as without it
    q = cs.problems.get("quadratic", n=6, condition=1e4)
    x, unused = q.x0.clone().requires_grad_(), torch.zeros(3, dtype=DT, requires_grad=True)
    cs.optim.Newton([x, unused]).step(lambda: q.f(x))
    assert torch.allclose(x.detach(), q.minima[0], atol=1e-8) and not unused.any()


def test_newton_still_shifts_where_the_gradient_lies_along_no_curvature():
    """f = (x − 1)² + y: the model is unbounded along y, where H has no curvature but g has a
    component — the shift of the indefinite case applies, and the step goes downhill in y."""
    z = torch.tensor([0.0, 0.0], dtype=DT, requires_grad=True)
    opt = cs.optim.Newton([z])
    opt.step(lambda: (z[0] - 1) ** 2 + z[1])
    assert opt.info.accepted and float(z[1]) < 0 and "shifted" in opt.info.note


@pytest.mark.parametrize(
    "name", ["newton", "newton-cg", "cubic-newton", "saddle-free-newton", "hessian-free"]
)
def test_steps_at_a_minimum_within_rounding_leave_the_size_as_it_was(name):
    """Run past convergence, ρ is rounding over rounding: every step was rejected and the size
    wrecked (a damping of 2.7e9, a radius of 4.5e-13), so that new data took 17–43 steps where a
    fresh optimizer took 4–5 (an outside review). Such steps are kept, ρ read as 1."""
    g = torch.Generator().manual_seed(0)

    def data():
        X = torch.randn(500, 10, generator=g, dtype=DT)
        y = (torch.rand(500, generator=g, dtype=DT) < torch.sigmoid(X.sum(1) * 0.5)).to(DT)
        return X, y

    (XA, yA), (XB, yB) = data(), data()
    w = torch.zeros(10, dtype=DT, requires_grad=True)

    def loss(X, y):
        return lambda: nn.functional.binary_cross_entropy_with_logits(X @ w, y) + 5e-4 * w @ w

    def steps_to_converge(opt, X, y):
        for k in range(60):
            opt.step(loss(X, y))
            if opt.info.grad_norm < 1e-10:
                return k
        return 60

    opt = cs.optim.build(name, [w])
    steps_to_converge(opt, XA, yA)
    for _ in range(20):
        opt.step(loss(XA, yA))
        assert opt.info.accepted, opt.info.note  # within rounding: kept
    at_minimum = w.detach().clone()
    after = steps_to_converge(opt, XB, yB)
    with torch.no_grad():
        w.copy_(at_minimum)
    assert after <= steps_to_converge(cs.optim.build(name, [w]), XB, yB) + 1


def test_newton_cg_past_convergence_does_not_drift_along_an_exact_symmetry():
    """Softmax regression's loss is unchanged by shifting every class's logits: past
    convergence the gradient's rounding pointed CG along that null space to the trust boundary
    at every step, each step kept as "rounding over rounding" and the radius doubling — ‖θ‖
    0.5 → 222 in 200 steps, the loss unchanged (an outside review). A rounding step the radius
    set is not taken now; the radius still grows (here until the loss resolves the step and
    the ratio test rejects it: 2, 4, 8, 2, ...), never collapsing."""
    params, f = _softmax_regression()
    opt = cs.optim.NewtonCG(params)
    norms, radii, untaken = [], [], 0
    for _ in range(60):
        opt.step(f)
        norms.append(float(torch.cat([p.detach().flatten() for p in params]).norm()))
        radii.append(opt.info.radius)
        untaken += "within the loss's rounding: not taken" in opt.info.note
    assert max(norms[15:]) == norms[15] and opt.info.grad_norm < 1e-12, norms[15::15]
    assert untaken >= 20 and min(radii[15:]) >= 1.0


def test_newton_cg_at_its_largest_radius_still_takes_rounding_level_steps():
    """A rounding-level step on the trust boundary is not taken so that the radius grows; at
    ``max_radius`` it cannot, and every such step was refused: a float32 loss of 1e4 + BCE under
    ``max_radius=0.05`` stalled 0.3 above its optimum (the diff review). It is kept there."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(400, 20, generator=g)
    y = (A @ torch.randn(20, generator=g) > 0).float()
    w = torch.zeros(20, requires_grad=True)

    def loss() -> torch.Tensor:
        return 1e4 + nn.functional.binary_cross_entropy_with_logits(A @ w, y) + 1e-3 * (w @ w)

    opt = cs.optim.NewtonCG([w], radius=0.05, max_radius=0.05)
    for _ in range(40):
        opt.step(loss)
        assert opt.info.accepted, opt.info.note
    assert float(w.norm()) > 1.9  # 40 steps of 0.05 along one direction, about


@pytest.mark.parametrize("name", ["newton-cg", "hessian-free"])
def test_a_float32_loss_of_bfloat16_parameters_is_never_stepped_uphill(name):
    """The rounding taken for "rounding over rounding" was the parameters' dtype's: a bfloat16
    GPT-2, whose loss transformers computes in float32, had a step from 3.141 to 3.329 kept,
    ρ read as 1, at 10·eps(bfloat16)·|f| = 0.25 (an outside review). An increase beyond the
    loss's own rounding, or one eps of bfloat16 (its activations' rounding: the diff review's
    7e-4 relative increases, rejected, collapsed the radius), is now measured, and no kept
    step makes one."""
    w = torch.tensor([0.3, -0.2], dtype=torch.bfloat16, requires_grad=True)

    def closure():
        v = w.float()  # a wavy valley, the loss in float32
        return 10 + 0.01 * (v**2).sum() + 0.1 * torch.cos(30 * v).sum()

    opt = cs.optim.build(name, [w])
    for _ in range(10):
        with torch.no_grad():
            before = float(closure())
        opt.step(closure)
        with torch.no_grad():
            after = float(closure())
        if opt.info.accepted:
            assert after <= before + torch.finfo(torch.bfloat16).eps * before, opt.info.note


def test_newton_cg_needs_no_more_iterations_than_scipy_trust_ncg_on_rosenbrock():
    p = cs.problems.get("rosenbrock")
    x = p.x0.clone().requires_grad_()
    opt = cs.optim.NewtonCG([x])
    ours = minimize(opt, lambda: p.f(x), 200, 1e-8, lambda: p.grad(x.detach()))
    ref = so.minimize(
        so.rosen,
        np.array([-1.2, 1.0]),
        jac=so.rosen_der,
        hessp=so.rosen_hess_prod,
        method="trust-ncg",
        options={"gtol": 1e-8},
    )
    assert ref.success and p.grad(x.detach()).norm() < 1e-8
    assert ours <= ref.nit
    # and with fewer curvature products: the model value is carried along, not recomputed
    assert opt.counts.products <= ref.nhev


def test_newton_goes_to_the_saddle_and_the_saddle_escaping_methods_to_a_minimum():
    p = cs.problems.get("saddle")
    ends = {}
    for name in ("pure-newton", "newton", "saddle-free-newton", "cubic-newton", "newton-cg"):
        x = p.x0.clone().requires_grad_()
        opt = cs.optim.build(name, [x])
        minimize(opt, at(p.f, x), 60)
        ends[name] = cs.optim.stationary_point(at(p.f, x), [x]).kind
        if ends[name] == "minimum":
            assert float(p.f(x.detach())) == pytest.approx(-1.0, abs=1e-10)
    assert ends["pure-newton"] == "saddle"
    assert ends["saddle-free-newton"] == ends["cubic-newton"] == "minimum"
    assert ends["newton"] == ends["newton-cg"] == "minimum"


def test_pure_newton_diverges_on_sqrt_one_plus_square_and_the_safeguarded_ones_decrease_it():
    p = cs.problems.get("sqrt1px2")  # x0 = 1.5
    x = p.x0.clone().requires_grad_()
    pure = cs.optim.build("pure-newton", [x])
    path = [abs(float(x.detach()))]
    for _ in range(3):
        pure.step(lambda: p.f(x))
        path.append(abs(float(x.detach())))
    assert path == sorted(path) and path[-1] > 1e4  # |x| ← |x|³
    for name in ("newton", "newton-cg", "hessian-free", "saddle-free-newton", "cubic-newton"):
        x = p.x0.clone().requires_grad_()
        opt = cs.optim.build(name, [x])
        values = []
        for _ in range(30):
            opt.step(at(p.f, x))
            values.append(float(p.f(x.detach())))
        assert all(b <= a for a, b in pairwise(values)), name
        assert values[-1] == pytest.approx(1.0, abs=1e-10), name


def _digits_split():
    X, y = cs.problems.load_digits(None, DT)
    return (X[:500], y[:500]), (X[500:], y[500:])


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("adahessian", {"lr": 0.1}),
        ("sophia", {"lr": 0.01, "update_every": 5}),
        ("sophia", {"lr": 0.01, "estimator": cs.optim.GaussNewtonBartlett(nn.CrossEntropyLoss())}),
    ],
)
def test_adahessian_and_sophia_train_the_digits_mlp(name, kwargs):
    (X, y), (Xt, yt) = _digits_split()
    p = cs.problems.get("digits-mlp")
    model = p.make_model(0)
    opt = cs.optim.build(name, model.parameters(), **kwargs)

    def closure():
        out = model(X)
        return p.loss_fn(out, y), out

    for _ in range(100):
        opt.step(closure)
    with torch.no_grad():
        train = (model(X).argmax(1) == y).double().mean()
        test = (model(Xt).argmax(1) == yt).double().mean()
    assert train >= 0.99 and test >= 0.88  # stated in the README


def test_hessian_free_uses_gauss_newton_from_outputs_and_a_curvature_minibatch():
    p = cs.problems.get("breast-cancer-logreg")
    X, y = p.data
    model = p.make_model(0)
    opt = cs.optim.HessianFree(model.parameters())
    losses = []
    for k in range(15):

        def closure():
            out = model(X)
            return p.loss_fn(out, y), out

        def curvature_closure(k=k):
            i = slice(64 * (k % 8), 64 * (k % 8) + 64)
            out = model(X[i])
            return p.loss_fn(out, y[i]), out

        losses.append(float(opt.step(closure, curvature_closure=curvature_closure)))
    assert losses[-1] < 0.1 * losses[0]
    assert all(b <= a for a, b in pairwise(losses))
    # one product per CG iteration, and one per warm start (every step after the first)
    assert opt.counts.products == opt.counts.cg_iterations + 14


def test_hessian_free_backtracks_past_iterates_whose_loss_is_not_finite():
    """A quadratic undefined where x₀ ≥ 5 (NaN there), its minimizer at x = 10: CG's iterates
    1–11 lower the loss from 0 to −1637, iterates 14 and 18 are NaN. Walking back from the
    last, a NaN kept as the best ended the walk at the second iterate, and the whole step was
    rejected (24 steps of it, the damping growing: a review); a non-finite loss counts as
    +inf, so the walk goes on to iterate 11 and the first step takes it."""
    n = 20
    A = torch.diag(torch.logspace(-2, 1, n, dtype=DT))
    b = A @ torch.full((n,), 10.0, dtype=DT)

    def f(x):
        return 0.5 * x @ A @ x - b @ x + 0.0 * torch.log(5.0 - x[0])

    x = torch.zeros(n, dtype=DT, requires_grad=True)
    opt = cs.optim.HessianFree([x], damping=1e-6, curvature="hessian", max_cg=50)
    opt.step(at(f, x))
    assert opt.info.accepted, opt.info.note
    assert float(f(x.detach())) < -1637  # iterate 11's loss, −1637.3
    assert float(x.detach()[0]) < 5


def test_backtracking_walks_past_a_non_finite_iterate_wherever_it_lies():
    """Losses 1, NaN, 5 walking back: the NaN tells nothing of the iterates before it (it ended
    the walk at 5: a review of the first fix); all non-finite: +inf, which the step rejects."""
    from curvscope.optim.descents import _backtrack

    saved = [(i, torch.full((2,), float(i)), torch.zeros(2)) for i in (1, 2, 3)]
    losses = {1.0: 1.0, 2.0: math.nan, 3.0: 5.0}
    best = _backtrack(saved, lambda x: losses[float(x[0])])
    assert best is not None and best[0] == 1.0 and float(best[1][0]) == 1.0
    nowhere = _backtrack(saved, lambda x: math.inf)
    assert nowhere is not None and nowhere[0] == math.inf and float(nowhere[1][0]) == 3.0


def _penalized_closure(model, X, y, how):
    """(loss, outputs) of a linear classifier whose loss also reads the parameters ("l2"), or an
    activation ("activation"), other than through the outputs it returns; None: it does not."""
    hidden = model[0]

    def closure():
        h = hidden(X)
        out = model[1:](h)
        loss = nn.functional.cross_entropy(out, y)
        if how == "l2":
            return loss + 0.25 * sum((p**2).sum() for p in model.parameters()), out
        if how == "activation":
            return loss + 0.25 * (h**2).mean(), out
        return loss, out  # the outputs' loss alone

    return closure


@pytest.mark.parametrize("how", ["l2", "activation"])
@pytest.mark.parametrize("where", ["closure", "curvature_closure"])
def test_hessian_free_refuses_gauss_newton_for_a_loss_read_around_the_outputs(how, where):
    """With (CE(out) + λ/2‖θ‖², out) the Gauss-Newton product was G_CE, not G_CE + λI: the
    penalty's curvature dropped without a word, the first six steps rejected at damping 1e-4,
    27 steps to ‖g‖ < 1e-8 where the Hessian's took 4 (a review). Refused, naming the fix,
    the step undone; curvature="hessian" counts the penalty, every step taken."""
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(60, 5, generator=gen, dtype=DT), torch.randint(0, 2, (60,), generator=gen)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 2)).double()
    closure, plain = _penalized_closure(model, X, y, how), _penalized_closure(model, X, y, None)
    before = [p.detach().clone() for p in model.parameters()]
    for curvature in ("ggn", "auto"):
        opt = cs.optim.HessianFree(model.parameters(), damping=1e-4, curvature=curvature)
        with pytest.raises(ValueError, match=r"other than through the outputs(.|\n)*'hessian'"):
            if where == "closure":
                opt.step(closure)
            else:
                opt.step(plain, curvature_closure=closure)
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    if how != "l2":
        return
    opt = cs.optim.HessianFree(model.parameters(), damping=1e-4, curvature="hessian")
    for _ in range(6):
        opt.step(closure)
        assert opt.info.accepted
    assert opt.info.grad_norm < 1e-8  # ‖g‖ where the sixth step started


def test_a_read_around_the_outputs_through_a_shared_split_is_seen():
    """logits, aux = out.split(...) are two outputs of one node: a penalty on aux reads around
    the logits (a review: the walk stopped at the shared node and missed it)."""
    from curvscope.optim._closure import read_around_outputs

    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    logits, aux = lin(x).split([3, 1], dim=1)
    loss = nn.functional.cross_entropy(logits, y) + 10 * aux.pow(2).mean()
    assert read_around_outputs(loss, logits, list(lin.parameters())) == 0
    alone = nn.functional.cross_entropy(logits, y)
    assert read_around_outputs(alone, logits, list(lin.parameters())) is None


@pytest.mark.parametrize("how", ["l2", "activation"])
def test_sophia_g_refuses_a_loss_read_around_the_outputs(how):
    """The Gauss-Newton-Bartlett estimate left a penalty's curvature out as Hessian-free's
    products did: refused, naming Sophia-H and the decoupled weight decay; nothing written."""
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(60, 5, generator=gen, dtype=DT), torch.randint(0, 2, (60,), generator=gen)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 2)).double()
    before = [p.detach().clone() for p in model.parameters()]
    estimator = cs.optim.GaussNewtonBartlett(nn.CrossEntropyLoss())
    opt = cs.optim.Sophia(model.parameters(), lr=0.1, estimator=estimator)
    with pytest.raises(ValueError, match=r"other than through the outputs(.|\n)*weight_decay="):
        opt.step(_penalized_closure(model, X, y, how))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    opt.step(_penalized_closure(model, X, y, None))  # the loss of the outputs alone: taken
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


# ------------------------------------------------------------------ traps of the anchors
def test_scipy_newton_cg_declares_success_at_a_maximum_ours_says_maximum():
    f_np = lambda z: np.cos(z[0]) + np.cos(z[1])  # noqa: E731
    jac = lambda z: -np.sin(z)  # noqa: E731
    hess = lambda z: np.diag(-np.cos(z))  # noqa: E731
    ref = so.minimize(f_np, np.zeros(2), jac=jac, hess=hess, method="Newton-CG")
    assert ref.success and np.allclose(ref.x, 0)  # scipy/scipy#20213
    x = torch.zeros(2, dtype=DT, requires_grad=True)
    point = cs.optim.stationary_point(lambda: torch.cos(x).sum(), [x])
    assert point.kind == "maximum" and point.lambda_max == pytest.approx(-1.0)


def test_lbfgsb_stops_at_a_saddle_of_wood_ours_reach_the_minimum_and_say_so():
    wood = cs.problems.get("wood").f

    def fg(z):
        x = torch.tensor(z, requires_grad=True)
        (g,) = torch.autograd.grad(wood(x), x)
        return float(wood(x.detach())), g.numpy()

    ref = so.minimize(fg, np.array([-3.0, -1.0, -3.0, -1.0]), jac=True, method="L-BFGS-B")
    assert ref.success
    x = torch.tensor(ref.x, requires_grad=True)
    assert cs.optim.stationary_point(lambda: wood(x), [x], grad_tol=1e-3).kind == "saddle"
    for name in ("newton-cg", "cubic-newton", "saddle-free-newton"):
        x = torch.tensor([-3.0, -1.0, -3.0, -1.0], dtype=DT, requires_grad=True)
        opt = cs.optim.build(name, [x])
        minimize(opt, at(wood, x), 200)
        point = cs.optim.stationary_point(at(wood, x), [x])
        assert point.kind == "minimum" and point.loss < 1e-12, name


def test_a_badly_scaled_minimum_is_a_minimum_and_vanishing_curvature_stays_degenerate():
    """Brown's badly scaled function at its exact minimizer (f = 0, g = 0, eigenvalues 2 and
    2·10¹²) read *degenerate*: 2 is below 10⁻⁶·max|λ|, though eigh resolves it to 4·10⁻⁴ (an
    outside review; the lab recorded Newton's, Hessian-free's and the cubic method's ends
    so). A resolved positive curvature with the Newton decrement within the gradient's
    tolerance is a minimum; logistic regression on separable data, whose curvature vanishes
    with the loss, stays *degenerate*: its decrement is far above that tolerance."""
    p = cs.problems.get("brown-badly-scaled")
    x = p.minima[0].clone().to(DT).requires_grad_(True)
    point = cs.optim.stationary_point(lambda: p.f(x), [x])
    assert point.kind == "minimum" and point.lambda_min == pytest.approx(2.0)
    from curvscope import lab

    budget = lab.Budget(seconds=600.0)
    assert lab.run_one("brown-badly-scaled", "newton", budget)[0].outcome == "minimum"
    assert lab.run_one("breast-cancer-logreg", "newton", budget)[0].outcome == "degenerate"


def test_torch_lbfgs_writes_nan_ours_never_do():
    def f(x):
        return (x * torch.log(x)).sum()  # NaN for x < 0; minimum at 1/e

    x = torch.full((1,), 2.0, dtype=DT, requires_grad=True)
    lbfgs = torch.optim.LBFGS([x])

    def closure():
        lbfgs.zero_grad()
        loss = f(x)
        loss.backward()
        return loss

    for _ in range(3):
        lbfgs.step(closure)
    assert torch.isnan(x).all()  # pytorch/pytorch#5953
    for name in cs.optim.names("curvscope"):
        if cs.optim.get(name).lr or name == "pure-newton":
            continue
        x = torch.full((1,), 2.0, dtype=DT, requires_grad=True)
        opt = cs.optim.build(name, [x])
        minimize(opt, at(f, x), 40)
        assert float(x.detach()) == pytest.approx(math.exp(-1), abs=1e-8), name


# ------------------------------------------------------- curvature pieces vs references
def _evaluation(case):
    params = list(case.model.parameters())

    def closure():
        out = case.model(case.inputs)
        return case.loss_fn(out, case.targets), out

    return Evaluation(params, closure, Counts())


@pytest.mark.parametrize("make", [cases.mlp, cases.mlp_mse, cases.logreg_bce])
def test_closure_products_match_dense_references(make):
    case = make()
    ev = _evaluation(case)
    eye = torch.eye(ev.n, dtype=DT)
    assert torch.allclose(ev.hvp(eye), cases.dense_hessian(case), atol=1e-10)
    assert torch.allclose(ev.ggn(eye), cases.dense_ggn(case), atol=1e-10)
    assert ev.counts.products == 2 * ev.n


def test_diagonal_estimators_are_unbiased():
    case = cases.mlp(n=12)
    ev = _evaluation(case)
    H, G = cases.dense_hessian(case), cases.dense_ggn(case)
    gen = torch.Generator().manual_seed(0)
    hutch = cs.optim.Hutchinson(samples=4000)(ev, gen, Counts())
    gnb = torch.stack(
        [cs.optim.GaussNewtonBartlett(case.loss_fn)(ev, gen, Counts()) for _ in range(4000)]
    ).mean(0)
    scale = float(H.diagonal().abs().max())
    assert (hutch - H.diagonal()).abs().max() < 0.1 * scale
    assert (gnb - G.diagonal()).abs().max() < 0.1 * float(G.diagonal().max())


def test_gauss_newton_bartlett_needs_outputs_and_a_likelihood():
    with pytest.raises(ValueError, match="Hutchinson"):
        cs.optim.GaussNewtonBartlett(nn.L1Loss())
    x = torch.ones(2, requires_grad=True)
    opt = cs.optim.Sophia([x], estimator=cs.optim.GaussNewtonBartlett(nn.MSELoss()))
    with pytest.raises(ValueError, match=r"return \(loss, outputs\)"):
        opt.step(lambda: (x**2).sum())


def test_a_rejected_step_leaves_parameters_bit_identical_and_flags_as_found():
    case = cases.mlp()
    model = case.model.train()
    before = cases.snapshot(model)
    x = torch.full((1,), 1.5, dtype=DT, requires_grad=True)
    opt = cs.optim.NewtonCG([x], radius=100.0, max_radius=100.0)
    opt.step(lambda: torch.sqrt(1 + x**2).sum())  # the Newton point −x³ is uphill
    assert not opt.info.accepted and "ratio" in opt.info.note
    assert float(x.detach()) == 1.5 and opt.info.step_norm == 0.0
    assert opt.state_dict()["state"]["global"]["radius"] == 25.0
    opt = cs.optim.NewtonCG(model.parameters())
    opt.step(lambda: case.loss_fn(model(case.inputs), case.targets))
    after = cases.snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]


def _quadratic_closure(x, w, use_w):
    a = torch.tensor([2.0, 3.0], dtype=torch.float64)
    b = torch.tensor([1.0, 4.0], dtype=torch.float64)

    def closure():
        loss = 0.5 * (a * x * x).sum()
        return loss + 0.5 * (b * w * w).sum() if use_w[0] else loss

    return closure


def _pair():
    return [torch.ones(2, dtype=torch.float64, requires_grad=True) for _ in range(2)]


@pytest.mark.parametrize("how", ["unused_at_the_refresh", "added_mid_cycle", "added_late"])
def test_adahessian_steps_a_parameter_only_with_its_own_estimate_and_step_count(how):
    """A parameter without a Hessian-diagonal estimate of its own — unused at the refresh step
    and used at the next (an idle expert), or added mid-cycle with ``update_every`` > 1 —
    was stepped by m/ε: 526 and 2105 for lr 0.1 (an outside review); one added after 3000
    steps took 3·lr (the method's step count in its bias correction). Now such a parameter is
    left as it is at a step that does not refresh the estimate, the next step refreshes it, and
    each parameter counts its own steps, as torch's Adam: its first step is lr, like a fresh
    optimizer's."""
    x, w = _pair()
    use_w = [False]
    closure = _quadratic_closure(x, w, use_w)
    if how == "unused_at_the_refresh":
        opt = cs.optim.AdaHessian([x, w], lr=0.1, update_every=4)
        opt.step(closure)
    else:
        opt = cs.optim.AdaHessian([x], lr=0.1, update_every=4 if how == "added_mid_cycle" else 1)
        for _ in range(1 if how == "added_mid_cycle" else 3000):
            opt.step(closure)
        opt.add_param_group({"params": [w]})
    use_w[0] = True
    before = w.detach().clone()
    opt.step(closure)
    if how != "added_late":  # no refresh at this step: w waits for its estimate
        assert torch.equal(w.detach(), before) and w not in opt.state
        opt.step(closure)
    step = (before - w.detach()).abs()
    torch.testing.assert_close(step, torch.full((2,), 0.1, dtype=torch.float64), atol=2e-3, rtol=0)
    D = opt.state[w]["hessian_diag"].abs()
    torch.testing.assert_close(D, torch.tensor([1.0, 4.0], dtype=torch.float64))


def test_adahessian_resumes_a_state_saved_before_per_parameter_counts():
    """A state dict saved before each parameter kept its own step count (no "step" entry) resumes
    with the method's count, as it stepped before; and a parameter the loss never uses does not
    force the curvature graph at every step."""
    x, w = _pair()
    closure = _quadratic_closure(x, w, [False])
    opt = cs.optim.AdaHessian([x, w], lr=0.1, update_every=3)
    for _ in range(4):
        opt.step(closure)
    saved = opt.state_dict()
    for key, entry in saved["state"].items():
        if key != "global":  # the method's own count stays
            entry.pop("step", None)
    again = cs.optim.AdaHessian([x, w], lr=0.1, update_every=3)
    again.load_state_dict(saved)
    products = again.counts.products
    again.step(closure)
    assert float(again.state[x]["step"]) == 5.0
    assert again.counts.products == products  # step 5: no refresh, w (never used) asks none


def test_adahessian_averages_only_conv2d_and_conv3d_kernels_over_positions():
    """A (1, T, d) position embedding (3-D) was averaged over its trailing dimensions as a
    convolution kernel: channels whose curvature is 1, 100 and 0.01 all read 33.67 (an
    outside review). 4-D and 5-D kernels are averaged (the paper's code); 3-D ones are not."""
    curv = torch.tensor([1.0, 100.0, 0.01], dtype=torch.float64)
    pos = torch.ones(1, 1, 3, dtype=torch.float64, requires_grad=True)
    kernel = torch.ones(1, 1, 1, 3, dtype=torch.float64, requires_grad=True)

    def closure():
        return (
            0.5 * (curv * pos.reshape(3) ** 2).sum() + 0.5 * (curv * kernel.reshape(3) ** 2).sum()
        )

    opt = cs.optim.AdaHessian([pos, kernel], lr=0.01, estimator=cs.optim.Hutchinson(4))
    opt.step(closure)
    torch.testing.assert_close(opt.state[pos]["hessian_diag"].reshape(3).abs(), curv)
    torch.testing.assert_close(
        opt.state[kernel]["hessian_diag"].reshape(3), curv.abs().mean().expand(3)
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mean", "sum", "padding"])
def test_sophia_g_estimates_the_gauss_newton_diagonal_of_the_loss_as_reduced(case):
    """Sophia-G's estimator, averaged over 200 seeds, against the exact Gauss-Newton diagonal
    (softmax regression: the Hessian's). It scaled by the rows always: 1/32 of it for a summed
    loss (ratio 0.03), and padding rows (``ignore_index``) added curvature (median ratio 2.0)
    — an outside review."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=g)
    if case == "padding":
        y[16:] = -100
        X[16:] *= 4.0  # the padding rows would add much curvature
    loss_fn = nn.CrossEntropyLoss(reduction="sum" if case == "sum" else "mean")
    lin = nn.Linear(5, 3, bias=False).double()
    exact = cs.Curvature(lin, loss_fn, (X, y), kind="ggn").to_dense().diagonal()
    total = torch.zeros_like(exact)
    for seed in range(200):
        opt = cs.optim.Sophia(
            lin.parameters(),
            lr=0.0,
            weight_decay=0.0,
            betas=(0.9, 0.0),
            update_every=1,
            estimator=cs.optim.GaussNewtonBartlett(loss_fn),
            seed=seed,
        )

        def closure():
            out = lin(X)
            return loss_fn(out, y), out

        opt.step(closure)
        total += opt.state[lin.weight]["hessian"].reshape(-1)
    ratio = float((total / 200 / exact).median())
    assert 0.85 < ratio < 1.15, ratio


def _next_token_case():
    """A tiny causal language model's next-token loss, as Hugging Face computes it: (B, T, V)
    logits, shifted by one position, flattened with the classes last, padding at -100."""
    g = torch.Generator().manual_seed(0)
    V = 6
    model = nn.Sequential(nn.Embedding(V, 4), nn.Tanh(), nn.Linear(4, V)).double()
    ids = torch.randint(0, V, (3, 5), generator=g)
    labels = ids.clone()
    labels[2, 3:] = -100  # a shorter sequence, padded

    def loss_fn(logits, labels):
        return nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100
        )

    return model, ids, labels, loss_fn


def test_sophia_g_reads_a_language_models_classes_from_the_last_dimension():
    """A causal language model's (B, T, V) logits read as nn.CrossEntropyLoss's (N, C, ...):
    the positions taken for the classes, the Gauss-Newton diagonal 74% off on a GPT-2 (its
    LayerNorm's bias 1e-35 for 4e-4: an outside review). The classes are now where the loss's
    gradient sums to zero, the shifted and padded positions skipped: the estimate averaged over
    300 seeds is the exact diagonal's to Monte Carlo noise."""
    model, ids, labels, loss_fn = _next_token_case()
    C = cs.Curvature(model, loss_fn, (ids, labels), kind="ggn", reduction="mean")
    exact = C.to_dense().diagonal()
    estimator = cs.optim.GaussNewtonBartlett(nn.CrossEntropyLoss())
    ev = Evaluation(
        list(model.parameters()),
        lambda: (lambda out: (loss_fn(out, labels), out))(model(ids)),
        Counts(),
    )
    gen = torch.Generator().manual_seed(0)
    mean = torch.stack([estimator(ev, gen, Counts()) for _ in range(300)]).mean(0)
    assert float((mean - exact).norm() / exact.norm()) < 0.1


def test_sophia_g_tells_the_classes_of_a_square_output_by_the_curvature():
    """A pointer-style (B, T, T) output, labels a permutation, near-uniform predictions: the
    gradient's rows sum to zero along both dimensions, and dimension 1 was taken — 47% off the
    exact diagonal (the diff review). The dimension a shift of the logits leaves the loss flat
    along is taken now."""
    torch.manual_seed(0)
    V = 8
    embed, head = nn.Embedding(V, 6).double(), nn.Linear(6, V).double()
    for p in (*embed.parameters(), head.weight):
        nn.init.normal_(p, std=0.02)
    nn.init.zeros_(head.bias)
    x = torch.stack([torch.randperm(V) for _ in range(4)])
    y = x.argsort(-1)
    model = nn.Sequential(embed, head)

    def loss_fn(out, y):
        return nn.functional.cross_entropy(out.reshape(-1, V), y.reshape(-1))

    C = cs.Curvature(model, loss_fn, (x, y), kind="ggn", reduction="mean")
    exact = C.to_dense().diagonal()
    ev = Evaluation(
        list(model.parameters()), lambda: (lambda o: (loss_fn(o, y), o))(model(x)), Counts()
    )
    estimator, gen = cs.optim.GaussNewtonBartlett(nn.CrossEntropyLoss()), torch.Generator()
    mean = torch.stack([estimator(ev, gen.manual_seed(s), Counts()) for s in range(300)]).mean(0)
    assert float((mean - exact).norm() / exact.norm()) < 0.15


def test_sophia_g_refuses_outputs_its_loss_did_not_read():
    """A reshaped copy of the logits (``logits.view(-1, V)``, as a user might pass after reading
    the (N, C) convention) is not on the loss's graph: which rows the loss skips cannot be read
    (every row was counted: 22% off on a GPT-2). Refused, naming the fix."""
    model, ids, labels, loss_fn = _next_token_case()
    opt = cs.optim.Sophia(
        model.parameters(), estimator=cs.optim.GaussNewtonBartlett(nn.CrossEntropyLoss())
    )

    def closure():
        out = model(ids)
        return loss_fn(out, labels), out.reshape(-1, out.shape[-1])

    with pytest.raises(ValueError, match=r"does not depend on the outputs.*out\.logits"):
        opt.step(closure)

    def not_cross_entropy():
        out = model(ids)
        return out.pow(2).mean(), out

    with pytest.raises(ValueError, match="not a cross-entropy"):
        opt.step(not_cross_entropy)
