"""Hessian products by central differences of the model's own gradients
(``backend="finite_difference"``) against the exact product: the stated accuracy in float64 and
float32, symmetry and linearity within it, and the model left bit for bit as found — also when
the loss fails half-way through a product."""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvscope as cs
from curvscope.derivatives import finite_difference as fd
from tests import cases

FD = "finite_difference"


def smooth(dtype: torch.dtype = torch.float64, n: int = 30, seed: int = 0) -> cases.Case:
    """A small MLP with tanh and softplus (a smooth loss: the accuracy statement's setting)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6), nn.Softplus(), nn.Linear(6, 3)
        ).to(dtype)
    X = torch.randn(n, 4, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return cases.Case("smooth", model, nn.CrossEntropyLoss(), X, y)


def smooth_dropout_batchnorm(n: int = 16, seed: int = 9) -> cases.Case:
    """Train-mode BatchNorm and dropout around a smooth activation."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)
        ).double()
    X = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return cases.Case("dropout-bn", model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (n,)))


def as_float64(case: cases.Case) -> cases.Case:
    """The same parameters (exactly: float32 → float64 is exact) and data in float64."""
    return cases.Case(
        case.name,
        copy.deepcopy(case.model).double(),
        case.loss_fn,
        case.inputs.double(),
        case.targets,
    )


@functools.cache
def dense_hessian(dtype: torch.dtype) -> torch.Tensor:
    """The float64 reference jacfwd(grad(L)) of :func:`smooth` in ``dtype`` (its parameters
    and data taken exactly to float64), built once."""
    return cases.dense_hessian(as_float64(smooth(dtype)))


def bound(dtype: torch.dtype, H: torch.Tensor) -> float:
    """The stated accuracy per unit ‖v‖: ACCURACY · u^(2/3) · ‖H‖₂."""
    u = torch.finfo(dtype).eps
    return fd.ACCURACY * u ** (2 / 3) * float(torch.linalg.matrix_norm(H, 2))


def vectors(n: int, k: int, dtype=torch.float64, seed: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, dtype=torch.float64, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_products_are_within_the_stated_accuracy_of_the_exact_product(dtype):
    case = smooth(dtype)
    H = dense_hessian(dtype)
    C = cs.Curvature(case.model, case.loss_fn, case.data, backend=FD)
    V = vectors(C.num_params, 6, dtype)
    got = (C @ V).double()
    want = H @ V.double()
    errors = (got - want).norm(dim=0) / V.double().norm(dim=0)
    assert float(errors.max()) <= bound(dtype, H)
    # what that means against |Hv| for these random vectors
    relative = float(((got - want).norm(dim=0) / want.norm(dim=0)).max())
    assert relative < (1e-8 if dtype == torch.float64 else 1e-3)
    assert C.matvecs == 6 and C.backend == FD


def test_a_block_and_a_loader_of_uneven_batches_give_the_same_operator():
    case = smooth(n=30)
    X, y = case.data
    batches = [(X[:7], y[:7]), (X[7:19], y[7:19]), (X[19:], y[19:])]
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)
    H = dense_hessian(torch.float64)
    V = vectors(H.shape[0], 3)
    for data in (batches, loader):
        C = cs.Curvature(case.model, case.loss_fn, data, backend=FD)
        err = (C @ V - H @ V).norm(dim=0) / V.norm(dim=0)
        assert float(err.max()) <= bound(torch.float64, H)
        torch.testing.assert_close(C @ V[:, 1], (C @ V)[:, 1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_symmetric_and_linear_within_the_accuracy_and_exactly_homogeneous(dtype):
    case = smooth(dtype)
    H = dense_hessian(dtype)
    C = cs.Curvature(case.model, case.loss_fn, case.data, backend=FD)
    u, v = vectors(C.num_params, 2, dtype).unbind(1)
    cu, cv = C @ u, C @ v
    tol = bound(dtype, H)
    asym = abs(float(u.double() @ cv.double() - v.double() @ cu.double()))
    assert asym <= 2 * tol * float(u.double().norm() * v.double().norm())
    a, b = 0.7, -1.9
    w = a * u + b * v
    lin = (C @ w).double() - (a * cu.double() + b * cv.double())
    assert float(lin.norm()) <= 2 * tol * float(
        abs(a) * u.double().norm() + abs(b) * v.double().norm()
    )
    # the perturbation εv does not depend on |v|: scaling v by 2 is exact
    assert torch.equal(C @ (2 * v), 2 * cv)
    assert torch.equal(C @ torch.zeros_like(v), torch.zeros_like(v))


def test_train_mode_batchnorm_and_dropout_equal_the_exact_backend():
    """The model's own forward in train mode: batch statistics (running ones restored), and
    the same dropout masks as the exact backends draw."""
    case = smooth_dropout_batchnorm()
    exact = cs.Curvature(case.model, case.loss_fn, case.data, backend="double_backward")
    H = exact.to_dense()
    C = cs.Curvature(case.model, case.loss_fn, case.data, backend=FD)
    V = vectors(C.num_params, 3)
    err = (C @ V - H @ V).norm(dim=0) / V.norm(dim=0)
    assert float(err.max()) <= bound(torch.float64, H)


def test_loss_and_gradient_by_the_models_own_backward():
    case = smooth_dropout_batchnorm()
    exact = cs.Curvature(case.model, case.loss_fn, case.data, backend="double_backward")
    C = cs.Curvature(case.model, case.loss_fn, case.data, backend=FD)
    before = cases.snapshot(case.model)
    loss, g = C.loss_and_gradient()
    cases.assert_unchanged(before, cases.snapshot(case.model))
    loss0, g0 = exact.loss_and_gradient()
    assert loss == pytest.approx(loss0, rel=1e-13)
    torch.testing.assert_close(g, g0, rtol=1e-12, atol=1e-14)


def test_largest_eigenvalue_by_finite_difference_products():
    case = smooth()
    H = dense_hessian(torch.float64)
    C = cs.Curvature(case.model, case.loss_fn, case.data, backend=FD)
    r = cs.eigenvalues(C, k=1, which="largest")
    lam = torch.linalg.eigvalsh(H)
    assert r.converged
    assert abs(float(r.values[0]) - float(lam[-1])) <= 1e-3 * float(lam.abs().max())
    assert r.matvecs == C.matvecs


def test_the_model_is_left_bit_for_bit_as_found():
    case = smooth_dropout_batchnorm()
    model = case.model
    for p in model.parameters():  # the user's gradients, mid-accumulation
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in model.parameters()]
    before = cases.snapshot(model)
    versions = [p._version for p in model.parameters()]
    C = cs.Curvature(model, case.loss_fn, case.data, backend=FD)
    C @ vectors(C.num_params, 2)
    C.to_dense()
    cases.assert_unchanged(before, cases.snapshot(model))
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))
    assert [p._version for p in model.parameters()] == versions  # a held graph stays valid


class _TemperedLoss(nn.Module):
    """A loss with a learnable temperature of its own: a leaf outside the model."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, out, y):
        return nn.functional.cross_entropy(out / self.temperature, y)


def test_no_gradient_is_written_outside_the_selected_parameters_nor_a_hook_run():
    """The gradients are ``torch.autograd.grad`` over the selected parameters: a
    ``backward()`` wrote ``.grad`` into inputs that require grad and into a loss module's own
    parameters, and ran post-accumulate hooks (an optimizer stepped in backward) — the exact
    backends do neither (an outside review)."""
    case = smooth()
    X = case.inputs.clone().requires_grad_(True)
    loss_fn = _TemperedLoss()
    loss_fn.temperature.grad = torch.zeros((), dtype=torch.float64)
    ran = []
    for p in case.model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: ran.append(p))
    C = cs.Curvature(case.model, loss_fn, (X, case.targets), backend=FD)
    v = vectors(C.num_params, 1)
    got = C @ v
    assert X.grad is None and float(loss_fn.temperature.grad) == 0.0 and not ran
    want = cs.Curvature(case.model, loss_fn, (X, case.targets)) @ v
    assert float((got - want).norm()) <= bound(torch.float64, C.to_dense()) * float(v.norm())


@pytest.mark.parametrize("row", ["zero", "trained"])
def test_an_embeddings_padding_row_is_held_as_the_exact_backends_project_it(row):
    """torch's gradient of an embedding's padding row is always 0, and the exact backends'
    operator is P·H·P; a step along that row gave P·H (48% off, asymmetric, estimated exact:
    an outside review). The step now leaves the row alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 3, padding_idx=0), nn.Flatten(), nn.Linear(6, 2))
    model = model.double()
    if row == "trained":
        with torch.no_grad():
            model[0].weight[0] = 0.7
    x = torch.tensor([[0, 1], [2, 0], [3, 4], [5, 6], [0, 3]])
    y = torch.tensor([0, 1, 1, 0, 1])
    exact = cs.Curvature(model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    C = cs.Curvature(model, nn.CrossEntropyLoss(), (x, y), backend=FD)
    torch.testing.assert_close(C.to_dense(), exact, rtol=0, atol=1e-8)
    assert float(exact[:3].abs().sum()) == 0.0


def test_parameters_sharing_memory_are_refused_naming_them():
    """Two Parameters over one memory (``dec.weight = nn.Parameter(enc.weight.data.t())``):
    θ ± εv written into one moved the other, products 56% off, estimated exact. Refused,
    naming both and the fixes; Parameters that are views of one buffer without overlapping
    are not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 4)).double()
    model[2].weight = nn.Parameter(model[0].weight.data.t())
    data = (torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\['0.weight', '2.weight'\].*sharing memory"):
        cs.Curvature(model, nn.MSELoss(), data, backend=FD)
    cs.Curvature(model, nn.MSELoss(), data, backend=FD, params=["0.bias", "2.bias"])
    flat = torch.zeros(7, dtype=torch.float64)  # two Parameters, disjoint views of one buffer
    model[2].weight = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    model[0].bias, model[2].bias = nn.Parameter(flat[:3]), nn.Parameter(flat[3:])
    cs.Curvature(model, nn.MSELoss(), data, backend=FD)


def test_a_parameters_own_gradient_hook_is_said():
    """A hook on a parameter's gradient (``p.register_hook``) changes what is differenced: said
    in a warning and in ``C.notes`` (the exact backends ignore it)."""
    case = smooth()
    case.model[0].weight.register_hook(lambda g: 0.1 * g)
    with pytest.warns(UserWarning, match=r"gradient hooks"):
        C = cs.Curvature(case.model, case.loss_fn, case.data, backend=FD)
    assert any("'0.weight'" in n and "register_hook" in n for n in C.notes)


def _relu_batchnorm(dtype: torch.dtype, seed: int = 0):
    """A float32 ReLU MLP with BatchNorm (its kinks and the bias before the BatchNorm, whose
    gradient is 0, make finite differences inaccurate), after five Adam steps."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    model = model.to(dtype)
    X, y = torch.randn(128, 10, dtype=dtype), torch.randint(3, (128,))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model, nn.CrossEntropyLoss(), (X, y), opt


def test_a_preconditioner_multiplies_the_products_errors_it_is_judged_by():
    """Adam's preconditioned curvature S^½HS^½ multiplies the error of H(S^½u) by S^½ on the
    way out — up to 1e8 here, on the bias before the BatchNorm. The errors were judged
    relative to H's own scale: a sharpness 30% off, confident (an outside review). Each
    composition now maps its products' error vectors (``Operator.product_errors``): the
    float32 verdict says it is not confident; float64's, accurate, still is."""
    from curvscope.spectrum import as_operator

    model, loss_fn, data, opt = _relu_batchnorm(torch.float32)
    d = cs.diagnose(model, loss_fn, data, opt, backend=FD)
    exact = cs.diagnose(model, loss_fn, data, opt)
    off = abs(d.evidence.sharpness - exact.evidence.sharpness) / exact.evidence.sharpness
    # (9–30% off, by the thread count's rounding: the products are float32 differences)
    assert off > 0.05 and not d.confident
    model, loss_fn, data, opt = _relu_batchnorm(torch.float64)
    d = cs.diagnose(model, loss_fn, data, opt, backend=FD)
    exact = cs.diagnose(model, loss_fn, data, opt)
    assert d.confident
    assert d.evidence.sharpness == pytest.approx(exact.evidence.sharpness, rel=1e-6)
    # the map itself: a congruence's estimated error against its true error (the float64
    # exact product): 0.6-1.6 times it here, where the products' own estimates, relative to
    # H's scale, were 4·10⁴ times too small for a scaling from 1e-2 to 1e3
    case = smooth(torch.float32)
    C = cs.Curvature(case.model, case.loss_fn, case.data, backend=FD)
    exact = cs.Curvature(as_float64(case).model, case.loss_fn, as_float64(case).data)
    scale = torch.logspace(-2, 3, C.num_params)
    u = vectors(C.num_params, 3, torch.float32)
    op = as_operator(C).congruence(scale)
    got = op(u).double()
    d = scale.double()[:, None]
    true = (got - d * (exact @ (d * u.double()))).norm(dim=0) / u.double().norm(dim=0)
    ratio = op.error_norms[-1] / true
    assert float(ratio.min()) > 1 / 3 and float(ratio.max()) < 3, ratio
    assert op.last_errors is None and as_operator(C).last_errors is None  # nothing kept


def test_trace_and_diagonal_count_the_products_errors():
    """cs.trace and cs.diagonal took finite-difference products as exact: an exact trace of
    this float32 model came out 47.8 for 8.25 with a standard error of 0. The products'
    estimated errors now enter the standard errors (n × their mean for a trace, each unit
    vector's for the exact diagonal) and the message."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 3))
    data, loss_fn = (torch.randn(128, 10), torch.randint(3, (128,))), nn.CrossEntropyLoss()
    C = cs.Curvature(model, loss_fn, data, backend=FD)
    ref = copy.deepcopy(model).double()
    E = cs.Curvature(ref, loss_fn, (data[0].double(), data[1]))
    t, t_exact = cs.trace(C, method="exact"), cs.trace(E, method="exact").value
    assert t.stderr >= abs(t.value - t_exact) > 1.0
    assert "finite-difference" in t.message
    assert cs.trace(E, method="exact").stderr == 0.0  # exact products: nothing added
    diag, diag_exact = cs.diagonal(C, method="exact"), cs.diagonal(E, method="exact").value
    covered = (diag.stderr.double() >= (diag.value.double() - diag_exact).abs()).double().mean()
    assert float(covered) >= 0.9  # estimates, not bounds: most entries' errors are covered
    assert float(cs.diagonal(E, method="exact").stderr.abs().max()) == 0.0
    assert float(cs.diagonal(C, 10).stderr.min()) > 0.0


class _LogScale(nn.Module):
    """A learned scale near the edge of its logarithm's domain."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.sigma = nn.Parameter(torch.tensor([2e-3]))

    def forward(self, x):
        return self.lin(x) * (1 - 0.01 * torch.log(self.sigma))


def test_a_step_out_of_the_losss_domain_names_the_step_and_fd_eps():
    """A float32 step that takes a scale of 2e-3 below 0 made the loss NaN, and the error said
    to check the inputs and parameters for NaN/Inf (an outside review): it names the step."""
    torch.manual_seed(0)
    model = _LogScale()
    data = (torch.randn(16, 6), torch.randint(3, (16,)))
    C = cs.Curvature(model, nn.CrossEntropyLoss(), data, backend=FD)
    v = C.flatten({n: torch.ones_like(p) * (n == "sigma") for n, p in model.named_parameters()})
    with pytest.raises(FloatingPointError, match=r"finite-difference step .* smaller fd_eps"):
        C @ v
    assert float(model.sigma) == pytest.approx(2e-3)


def test_a_graph_the_user_holds_stays_usable_across_a_product():
    case = smooth()
    loss = case.loss_fn(case.model(case.inputs), case.targets)
    C = cs.Curvature(case.model, case.loss_fn, case.data, backend=FD)
    C @ vectors(C.num_params, 1)[:, 0]
    loss.backward()  # no "modified by an inplace operation"
    assert all(p.grad is not None for p in case.model.parameters())


class FailsAfter:
    """A mean loss that raises on its n-th call with gradients on: a product that fails half-way
    (the first loss's checks evaluate it without gradients: not counted)."""

    reduction = "mean"

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += torch.is_grad_enabled()
        if self.calls == self.n:
            raise RuntimeError("the loss failed")
        return nn.functional.cross_entropy(out, y)


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4, 6])
def test_a_failing_loss_leaves_the_model_exactly_as_found(fail_at):
    """Batches of the +εv evaluation (calls 1-2), of the −εv one (3-4), of the second vector."""
    case = smooth_dropout_batchnorm()
    X, y = case.data
    model = case.model
    model.train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = cases.snapshot(model)
    loss_fn = FailsAfter(fail_at)
    C = cs.Curvature(model, loss_fn, [(X[:8], y[:8]), (X[8:], y[8:])], backend=FD)
    with pytest.raises(RuntimeError, match="the loss failed"):
        C @ vectors(C.num_params, 2)
    cases.assert_unchanged(before, cases.snapshot(model))


def test_restrict_keeps_the_backend_and_the_step():
    case = smooth()
    C = cs.Curvature(case.model, case.loss_fn, case.data, backend=FD, fd_eps=1e-5)
    names = C.param_names[:2]
    R = C.restrict(names)
    assert R.backend == FD and R._differences is not None and R._differences.step == 1e-5
    H = dense_hessian(torch.float64)
    n = R.num_params
    v = vectors(n, 1)[:, 0]
    torch.testing.assert_close(R @ v, H[:n, :n] @ v, rtol=1e-8, atol=1e-9)


def test_a_step_too_large_is_halved_and_one_too_small_is_reported():
    """fd_eps is where the step starts. From 100x the default the halvings bring the product
    back within the accuracy; from 1/300 of it rounding dominates, which halving cannot mend,
    and the product's estimated error (C.product_errors, relative to ‖v‖ times the scale seen)
    says so, within a factor of 3 of the true error."""
    case = smooth(torch.float32)
    H = dense_hessian(torch.float32)
    norm_h = float(torch.linalg.matrix_norm(H, 2))
    u = torch.finfo(torch.float32).eps
    start = fd.default_step(torch.float32)
    for v in vectors(H.shape[0], 3, torch.float32).T:
        want = H @ v.double()

        def product(step, v=v, want=want):
            C = cs.Curvature(case.model, case.loss_fn, case.data, backend=FD, fd_eps=step)
            err = float(((C @ v).double() - want).norm())
            estimate = C.product_errors[-1] * C._differences.scale * float(v.norm())
            return err, estimate, C._differences.accepted

        default, _, _ = product(None)
        large, _, accepted = product(100 * start)
        assert max(default, large) <= fd.ACCURACY * u ** (2 / 3) * norm_h * float(v.norm())
        assert accepted <= 100 * start / 4  # halved at least twice
        small, estimate, _ = product(start / 300)
        assert small > 10 * default
        assert small / 3 <= estimate <= 3 * small


def test_bad_arguments_name_the_fix():
    case = smooth()
    args = (case.model, case.loss_fn, case.data)
    with pytest.raises(ValueError, match="kind='hessian' with backend='finite_difference'"):
        cs.Curvature(*args, kind="ggn", backend=FD)
    with pytest.raises(ValueError, match="pass backend='finite_difference' too"):
        cs.Curvature(*args, fd_eps=1e-3)
    for bad in (0.0, 1.5, float("nan"), -1e-3):
        with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
            cs.Curvature(*args, backend=FD, fd_eps=bad)
    for bad in ("1e-3", True):
        with pytest.raises(TypeError, match="expected fd_eps to be a number"):
            cs.Curvature(*args, backend=FD, fd_eps=bad)
    # a step below the dtype's resolution would difference rounding noise (it used to give a
    # zero or a 2.6x wrong product silently); numpy's numbers are numbers
    for bad in (1e-17, 1e-300):
        with pytest.raises(ValueError, match=r"below the resolution of torch\.float64"):
            cs.Curvature(*args, backend=FD, fd_eps=bad)
    case32 = smooth(torch.float32)
    with pytest.raises(ValueError, match=r"below the resolution of torch\.float32"):
        cs.Curvature(case32.model, case32.loss_fn, case32.data, backend=FD, fd_eps=1e-9)
    for ok in (np.float32(1e-3), np.float64(1e-3)):
        assert cs.Curvature(*args, backend=FD, fd_eps=ok)._differences.step == pytest.approx(1e-3)


def test_an_autocast_region_does_not_narrow_the_differences():
    """Under torch.autocast(bfloat16) the gradients would be bfloat16's: the differences run
    in the parameters' dtype (before: 8.2e-2 relative error against 2.7e-6 outside)."""
    case = smooth(torch.float32)
    H = dense_hessian(torch.float32)
    v = vectors(H.shape[0], 1, torch.float32)[:, 0]
    C = cs.Curvature(case.model, case.loss_fn, case.data, backend=FD)
    outside = C @ v
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = C @ v
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)
    u = torch.finfo(torch.float32).eps
    bound = fd.ACCURACY * u ** (2 / 3) * float(torch.linalg.matrix_norm(H, 2) * v.norm())
    assert float((inside.double() - H @ v.double()).norm()) <= bound


def test_a_hugging_face_model_with_its_own_loss():
    """loss_fn=None: the model's own forward (with labels adapted) and its token-weighted loss,
    against the exact product, a parameter subset selected."""
    pytest.importorskip("transformers")
    from tests.derivatives.test_huggingface import reference

    ref = reference("gpt2")
    params = list(ref.case.params)
    exact = cs.Curvature(ref.model, None, ref.batches, params=params, backend="double_backward")
    H = exact.to_dense()
    before = cases.snapshot(ref.model)
    C = cs.Curvature(ref.model, None, ref.batches, params=params, backend=FD)
    V = vectors(C.num_params, 2)
    err = (C @ V - H @ V).norm(dim=0) / V.norm(dim=0)
    assert float(err.max()) <= bound(torch.float64, H)
    cases.assert_unchanged(before, cases.snapshot(ref.model))


def test_a_16_bit_model_is_refused_with_the_fix():
    """A difference of two bfloat16 gradients keeps about two digits (2% off the float32
    product, measured): refused, naming model.float() and the exact backends."""
    case = smooth()
    model = copy.deepcopy(case.model).to(torch.bfloat16)
    data = tuple(t.to(torch.bfloat16) for t in case.data)
    with pytest.raises(ValueError, match=r"float32 or float64 parameters.*model\.float\(\)"):
        cs.Curvature(model, case.loss_fn, data, backend=FD) @ torch.ones(
            sum(p.numel() for p in model.parameters()), dtype=torch.bfloat16
        )


class _Bfloat16Linear(torch.nn.Linear):
    """A float32 layer whose forward computes in bfloat16 (as a hand-written mixed-precision
    or quantized layer does): it does not see a change of its weights below 2^-8 of them."""

    def forward(self, x):
        w, b = self.weight.bfloat16(), self.bias.bfloat16()
        return torch.nn.functional.linear(x.bfloat16(), w, b).float()


def test_steps_the_forward_does_not_see_are_of_unknown_accuracy_not_exact():
    """Where the model's gradient and loss are the same to the bit at θ ± εv although the
    loss's slope along v says it should have moved, the product's error is unknown (inf), not
    0: before,
    a float32 MLP computing in bfloat16 gave products of exactly 0 (the exact ones 7–10 in
    norm) with an estimated error of 0, and λ_max 0 "converged in 2 products" (exact 4.09)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Bfloat16Linear(8, 16), torch.nn.Tanh(), _Bfloat16Linear(16, 1))
    data = (torch.randn(64, 8), torch.randn(64, 1))
    C = cs.Curvature(model, torch.nn.MSELoss(), data, backend=FD)
    V = vectors(C.num_params, 3, torch.float32, seed=1)
    HV = C @ V
    unseen = [j for j in range(3) if not HV[:, j].any()]
    assert unseen, "no product lost its step: the test no longer tests the guard"
    assert all(math.isinf(C.product_errors[j]) for j in unseen)
    assert any("unknown accuracy" in n and "use an exact backend" in n for n in C.notes)
    top = cs.eigenvalues(C)
    assert not top.all_converged and "unknown accuracy" in top.message
    assert "exact backend" in top.message
    d = cs.diagnose(model, torch.nn.MSELoss(), data, lr=0.1, backend=FD)
    assert not d.confident


def test_a_product_that_is_exactly_zero_is_exact():
    """v on a parameter the loss does not use (no slope along v), or a piecewise-linear loss
    (L1 of a linear model: its gradient is piecewise constant, its Hessian 0, its loss moves
    along v): every difference is exactly 0 and the product 0 is exact (error 0), not of
    unknown accuracy (a first version of the guard said so of the L1 loss: a review)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 1).double()
    data = (torch.randn(32, 8, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64))
    L1 = cs.Curvature(linear, torch.nn.L1Loss(), data, backend=FD)
    assert not (L1 @ vectors(L1.num_params, 1)[:, 0]).any()
    assert L1.product_errors == [0.0] and L1._differences.unseen == 0
    case = smooth()
    model = copy.deepcopy(case.model)
    model.register_parameter("unused", torch.nn.Parameter(torch.ones(3, dtype=torch.float64)))
    C = cs.Curvature(model, case.loss_fn, case.data, backend=FD)
    blocks = C.unflatten(torch.zeros(C.num_params, dtype=torch.float64))
    blocks["unused"] = torch.ones(3, dtype=torch.float64)
    v = C.flatten(blocks)
    assert float((C @ v).abs().max()) == 0.0
    assert C.product_errors == [0.0] and C._differences.unseen == 0


def test_a_warm_start_along_a_far_from_quadratic_direction_is_accurate():
    """A fresh operator's first product along the top eigenvector of a tanh MLP with widely
    scaled inputs: as the step halves, the gap first *grows* (the step is still too large for
    the Taylor series), which the first stopping rule took for rounding — 67% off, and a warm
    start 3.9% off (an outside review). Halving goes on until the gap shrinks, or it grows as
    rounding does."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(100, 512), nn.Tanh(), nn.Linear(512, 10))
    X = torch.randn(512, 100, generator=g) * torch.logspace(-1, 2, 100)
    y = torch.randint(0, 10, (512,), generator=g)
    args = (model, nn.CrossEntropyLoss(), (X, y))
    exact = cs.eigenvalues(cs.Curvature(*args), k=1, tol=1e-6)
    lam, top = float(exact.values[0]), exact.vectors[:, 0]
    r = cs.eigenvalues(cs.Curvature(*args, backend=FD), k=1, v0=top)
    assert r.all_converged, r.message
    assert abs(float(r.values[0]) - lam) <= 1e-4 * lam
    assert abs(float(r.values[0]) - lam) <= float(r.errors[0])
