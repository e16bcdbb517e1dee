"""What a stateful sequence fuzzer of the optimizers found (an outside review: about 1,190
random sequences of steps, faults, edits, resumes and copies over every registered method):
each case reproduced, against what torch's optimizers or the README promise."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import curvscope as cs

DATA = Path(__file__).parent / "data"


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return cs.problems.get("rosenbrock").f(x)


def test_normalized_gd_leaves_the_gradients_of_parameters_it_does_not_own_as_found():
    """A closure without ``backward()``: NormalizedGD ran torch's backward itself, which filled
    every leaf of the graph — a head under another optimizer had its ``.grad`` summed over the
    steps, and NaN after a refused step."""
    torch.manual_seed(0)
    body, head = nn.Linear(4, 4), nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt = cs.optim.NormalizedGD(body.parameters(), lr=0.1)

    def closure() -> torch.Tensor:
        return nn.functional.mse_loss(head(body(x)), y)

    w0 = body.weight.detach().clone()
    opt.step(closure)
    opt.step(closure)
    assert head.weight.grad is None and head.bias.grad is None and body.weight.grad is None
    assert not torch.equal(body.weight, w0)  # it stepped
    kept = torch.ones(1, 4)
    head.weight.grad = kept
    with pytest.raises(FloatingPointError):
        opt.step(lambda: closure() * float("nan"))
    assert head.weight.grad is kept and torch.equal(kept, torch.ones(1, 4))


def test_normalized_gd_refuses_a_loss_that_is_not_finite_as_every_method_does():
    """It stepped along the finite gradient of an infinite loss and returned inf, where
    AdaHessian, Sophia and NewtonCG refuse it."""
    model = nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    w0 = model.weight.detach().clone()
    opt = cs.optim.NormalizedGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(inf\)"):
        opt.step(lambda: nn.functional.mse_loss(model(x), y) + float("inf"))
    assert torch.equal(model.weight, w0)


def _collapsed() -> tuple[torch.Tensor, cs.optim.NewtonCG]:
    """NewtonCG on Rosenbrock whose radius every rejected step (a NaN at each trial point)
    has collapsed to 2.4e-4."""
    x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
    opt = cs.optim.NewtonCG([x], radius=1.0)
    for _ in range(6):

        def nan_at_trials(calls: list[int] = []) -> torch.Tensor:  # noqa: B006 (one a step)
            calls.append(1)
            return rosenbrock(x) * (1.0 if len(calls) == 1 else float("nan"))

        opt.step(nan_at_trials)
    assert opt.state["global"]["radius"] < 1e-3
    return x, opt


@pytest.mark.parametrize("edit", ["assigned", "update", "assigned, then a failed step"])
def test_a_size_edit_is_read_by_the_next_step_that_completes(edit):
    """The README: any assignment to the radius restarts the search, the constructor's value
    too. A step that failed at its trial point, put back, lost the edit (the retry went on at
    2.4e-4 where an uninterrupted run took 0.155), and ``group.update(radius=1.0)`` was no
    edit at all."""
    x0, reference = _collapsed()
    reference.param_groups[0]["radius"] = 1.0
    reference.step(lambda: rosenbrock(x0))
    x, opt = _collapsed()
    group = opt.param_groups[0]
    if edit == "update":
        group.update(radius=1.0)
    else:
        group["radius"] = 1.0
    if edit.endswith("failed step"):
        calls = []

        def flaky() -> torch.Tensor:
            calls.append(1)
            if len(calls) == 2:
                raise ConnectionError("a data loader worker died")
            return rosenbrock(x)

        with pytest.raises(ConnectionError):
            opt.step(flaky)
    opt.step(lambda: rosenbrock(x))
    assert opt.info.step_norm == pytest.approx(0.155, abs=1e-3)
    assert opt.info.step_norm == reference.info.step_norm
    assert torch.equal(x, x0)


def test_a_size_edit_made_inside_the_closure_is_the_next_steps():
    """An edit taken as read at the step's end dropped one the closure made during the step
    (a radius reset on a plateau): the next step went on at 0.00098 (the diff review)."""
    x0, reference = _collapsed()
    reference.param_groups[0]["radius"] = 1.0
    reference.step(lambda: rosenbrock(x0))
    x, opt = _collapsed()
    calls = []

    def resetting() -> torch.Tensor:
        if not calls:
            opt.param_groups[0]["radius"] = 1.0
        calls.append(1)
        return rosenbrock(x)

    opt.step(resetting)  # (began at the collapsed radius)
    opt.step(lambda: rosenbrock(x))
    assert opt.info.step_norm == pytest.approx(reference.info.step_norm, rel=1e-2)


def test_newton_decomposes_in_float64_where_lapacks_float32_solver_fails():
    """A finite float32 Hessian (a small CNN's, entries from 1e-42 to 8, most of its 47
    eigenvalues near 0) on which LAPACK's float32 eigensolver does not converge: Newton's step
    failed with torch's bare ``_LinAlgError``; it is decomposed again in float64."""
    A = torch.load(DATA / "eigh_float32_fails.pt")
    M = 2 * A  # (a closure's Hessian ½(M + Mᵀ) is M exactly: halving would round denormals)
    n = M.shape[0]
    b = torch.linspace(-1, 1, n)
    x = torch.zeros(n, requires_grad=True)
    opt = cs.optim.Newton([x])
    opt.step(lambda: 0.5 * x @ (M @ x) + b @ x)
    assert torch.isfinite(x).all() and x.dtype == torch.float32
    lam, V = cs.spectrum.precision.eigh(M)
    assert lam.dtype == V.dtype == torch.float32
    residual = (M.double() @ V.double() - V.double() * lam.double()).norm()
    assert float(residual) < 1e-5 * float(M.abs().max())
    ones = torch.ones(3, 3, dtype=torch.float64)
    with pytest.raises(torch.linalg.LinAlgError):  # a non-finite matrix is not retried
        cs.spectrum.precision.eigh(ones * float("nan"))


def test_adahessian_resumes_bit_for_bit_on_a_model_of_two_dtypes():
    """A float32 head after a float64 layer: its diagonal estimate was kept in float64, which
    ``load_state_dict`` casts to the parameter's dtype, and the resumed run drifted 6e-8 from
    the one not interrupted (the README: a resume continues bit for bit)."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(5, 4).double(), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(self.a(x.double())).float())

    torch.manual_seed(0)
    model = Mixed()
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))

    def closure_of(m: nn.Module):
        return lambda: nn.functional.cross_entropy(m(x), y)

    opt = cs.optim.AdaHessian(model.parameters(), lr=0.05, update_every=3)
    opt.step(closure_of(model))
    assert opt.state[model.b.weight]["hessian_diag"].dtype == torch.float32
    resumed = copy.deepcopy(model)
    opt2 = cs.optim.AdaHessian(resumed.parameters(), lr=0.05, update_every=3)
    opt2.load_state_dict(opt.state_dict())
    for _ in range(3):
        opt.step(closure_of(model))
        opt2.step(closure_of(resumed))
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("method", ["NewtonCG", "Newton", "CubicNewton"])
def test_a_step_stopped_by_tolerance_grad_reports_the_gradient_it_saw(method):
    """``info.grad_norm`` read 0.0 where the note beside it said ‖g‖ = 0.000896."""
    x = torch.tensor([1.0 + 1e-6, 1.0], dtype=torch.float64, requires_grad=True)
    g = torch.autograd.grad(rosenbrock(x), x)[0]
    opt = getattr(cs.optim, method)([x], tolerance_grad=1e-2)
    opt.step(lambda: rosenbrock(x))
    assert opt.info.note.startswith("stationary")
    assert opt.info.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)


def test_names_refuses_an_unknown_source():
    """``cs.optim.names("bogus")`` returned [] as if no optimizer came from it."""
    assert "newton-cg" in cs.optim.names("curvscope") and "adam" in cs.optim.names("torch")
    with pytest.raises(ValueError, match=r"unknown source 'bogus'.*curvscope, torch"):
        cs.optim.names("bogus")
