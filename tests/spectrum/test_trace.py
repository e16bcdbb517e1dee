"""Trace, trace of the square and diagonal estimators: exactness where promised, unbiasedness,
honest standard errors, exact budgets, and Hutch++ where it belongs."""

import pytest
import torch

import curvscope as cs
from tests import cases
from tests.spectrum.test_eigen import with_spectrum

N = 200
DECAYING_PSD = with_spectrum(1.0 / torch.arange(1, N + 1, dtype=torch.float64) ** 2, seed=1)
INDEFINITE = with_spectrum(torch.linspace(-1.0, 1.2, N, dtype=torch.float64), seed=2)


def errors(A, method, matvecs, seeds=range(60)):
    true = float(torch.trace(A))
    return torch.tensor([abs(cs.trace(A, matvecs, method, seed=s).value - true) for s in seeds])


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "auto"])
@pytest.mark.parametrize("budget", [3, 10, 31, 48])
def test_budget_is_honoured_exactly(method, budget):
    r = cs.trace(INDEFINITE, budget, method)
    assert r.matvecs == budget
    assert r.method in ("hutchinson", "hutch++") and r.message


def test_exact_trace_and_diagonal_of_a_real_model():
    case = cases.cnn()
    C = cs.Curvature(case.model, case.loss_fn, case.data)
    H = cases.dense_hessian(case)
    r = cs.trace(C, method="exact")
    assert r.value == pytest.approx(float(torch.trace(H)), rel=1e-10, abs=1e-12)
    assert r.stderr == 0 and r.matvecs == C.num_params
    d = cs.diagonal(C, method="exact")
    torch.testing.assert_close(d.value, H.diagonal(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_unbiased_with_standard_errors_that_cover_the_truth(method):
    true = float(torch.trace(INDEFINITE))
    results = [cs.trace(INDEFINITE, 30, method, seed=s) for s in range(300)]
    values = torch.tensor([r.value for r in results])
    se = torch.tensor([r.stderr for r in results])
    # unbiased: the mean of 300 estimates is within 4 standard errors of that mean
    assert abs(values.mean() - true) < 4 * values.std() / 300**0.5
    # a 95% interval covers the truth about 95% of the time
    coverage = float(((values - true).abs() <= 1.96 * se).double().mean())
    assert 0.88 <= coverage <= 0.99


def test_hutchpp_wins_on_a_decaying_psd_spectrum_and_auto_follows():
    plain = errors(DECAYING_PSD, "hutchinson", 30).mean()
    pp = errors(DECAYING_PSD, "hutch++", 30).mean()
    auto = errors(DECAYING_PSD, "auto", 30).mean()
    assert pp * 2 < plain
    assert auto <= 1.2 * pp
    assert cs.trace(DECAYING_PSD, 30).method == "hutch++"


def test_hutchinson_wins_on_a_flat_indefinite_spectrum_and_auto_follows():
    plain = errors(INDEFINITE, "hutchinson", 30).mean()
    pp = errors(INDEFINITE, "hutch++", 30).mean()
    auto = errors(INDEFINITE, "auto", 30).mean()
    assert plain < pp
    assert auto <= 1.2 * plain
    assert cs.trace(INDEFINITE, 30).method == "hutchinson"


def test_trace_of_square_is_the_squared_frobenius_norm():
    true = float((INDEFINITE**2).sum())
    results = [cs.trace_of_square(INDEFINITE, 40, seed=s) for s in range(100)]
    values = torch.tensor([r.value for r in results])
    assert abs(values.mean() - true) < 4 * values.std() / 10
    inside = [abs(r.value - true) <= 2.5 * r.stderr for r in results]
    assert sum(inside) >= 90
    assert results[0].matvecs == 40


def test_hutchinson_diagonal_is_unbiased_and_its_errors_are_honest():
    A = INDEFINITE
    r = cs.diagonal(A, 400, seed=0)
    assert r.matvecs == 400 and r.value.shape == (N,)
    z = (r.value - A.diagonal()) / r.stderr
    assert float((z.abs() <= 1.96).double().mean()) >= 0.88
    mean = torch.stack([cs.diagonal(A, 20, seed=s).value for s in range(200)]).mean(0)
    assert float((mean - A.diagonal()).abs().max()) < 0.1 * float(A.diagonal().abs().max() + 1)


def test_reproducible_and_the_global_rng_is_untouched():
    state = torch.get_rng_state()
    a = cs.trace(INDEFINITE, 20, seed=5)
    b = cs.trace(INDEFINITE, 20, seed=5)
    c = cs.trace(INDEFINITE, 20, seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.value == b.value != c.value


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: cs.trace(INDEFINITE, 10, "lanczos"), ValueError, "method must be one of"),
        (
            lambda: cs.trace(INDEFINITE, 1),
            ValueError,
            "trace: expected matvecs to be an integer >= 2",
        ),
        (lambda: cs.trace(INDEFINITE, 2, "hutch++"), ValueError, ">= 3"),
        (lambda: cs.trace(INDEFINITE, 10.5), TypeError, "matvecs to be an integer, got 10.5"),
        (lambda: cs.trace(INDEFINITE, 10, seed=None), TypeError, "seed=None"),
        (lambda: cs.trace(INDEFINITE, 10, seed=1.7), TypeError, "seed to be an integer"),
        (lambda: cs.diagonal(INDEFINITE, 10, "hutch++"), ValueError, "hutchinson"),
        (lambda: cs.diagonal(INDEFINITE, 0), ValueError, "matvecs to be an integer >= 2"),
        (lambda: cs.diagonal(INDEFINITE, 10, seed=None), TypeError, "seed=None"),
        (lambda: cs.trace_of_square(INDEFINITE, 0), ValueError, "integer >= 2"),
        (lambda: cs.trace_of_square(INDEFINITE, 5.0), TypeError, "matvecs to be an integer"),
        (lambda: cs.trace_of_square(INDEFINITE, 5, seed=2.5), TypeError, "seed"),
    ],
)
def test_invalid_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_estimators_accept_any_object_with_matmat_and_num_params():
    class Diagonal:
        num_params, dtype, device = 50, torch.float64, torch.device("cpu")

        def __init__(self):
            self.d = torch.linspace(1.0, 2.0, 50, dtype=torch.float64)

        def matmat(self, V):
            return self.d[:, None] * V

    op = Diagonal()
    assert cs.trace(op, method="exact").value == pytest.approx(75.0)
    assert cs.eigenvalues(op, k=1).values[0] == pytest.approx(2.0, abs=1e-3)


def test_auto_trace_on_real_curvature():
    case = cases.cnn()
    for kind in ("hessian", "ggn"):
        C = cs.Curvature(case.model, case.loss_fn, case.data, kind=kind)
        exact = cs.trace(C, method="exact").value
        r = cs.trace(C, matvecs=30)
        assert r.matvecs == 30
        assert abs(r.value - exact) <= 4 * r.stderr + 1e-12
