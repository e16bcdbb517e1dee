"""Stochastic Lanczos quadrature: a density that integrates to 1 and a negative mass that
matches the dense spectrum within its error bars."""

import matplotlib
import pytest
import torch

import curvscope as cs
from tests import cases
from tests.spectrum.test_eigen import with_spectrum

matplotlib.use("Agg")


def test_integrates_to_one_and_has_the_stated_shape():
    A = with_spectrum(torch.linspace(-1.0, 3.0, 150, dtype=torch.float64))
    d = cs.density(A, steps=25, probes=3, grid_points=300, progress_bar=False)
    assert d.grid.shape == d.values.shape == (300,)
    assert float(torch.trapezoid(d.values, d.grid)) == pytest.approx(1.0, abs=1e-10)
    assert (d.values >= 0).all()
    assert d.nodes.shape == d.weights.shape == (3, 25)
    torch.testing.assert_close(d.weights.sum(1), torch.ones(3, dtype=torch.float64))
    assert d.matvecs == 75
    assert d.grid[0] < -1.0 and d.grid[-1] > 3.0  # the support is covered


def test_negative_mass_matches_the_dense_fraction():
    lam = torch.cat(
        [
            torch.linspace(-2.0, -0.5, 60, dtype=torch.float64),
            torch.linspace(0.5, 4.0, 240, dtype=torch.float64),
        ]
    )
    A = with_spectrum(lam, seed=3)
    d = cs.density(A, steps=30, probes=10, progress_bar=False)
    assert abs(d.negative_mass - 0.2) <= 3 * d.negative_mass_stderr + 0.01
    assert 0 < d.negative_mass_stderr < 0.1


def test_negative_mass_of_a_real_hessian_matches_its_smoothed_spectrum():
    case = cases.residual_layernorm()
    C = cs.Curvature(case.model, case.loss_fn, case.data)
    ev = torch.linalg.eigvalsh(cases.dense_hessian(case))
    d = cs.density(C, steps=40, probes=8, progress_bar=False)
    smoothed = float(torch.special.ndtr(-ev / d.sigma).mean())
    assert abs(d.negative_mass - smoothed) <= 3 * d.negative_mass_stderr + 0.02


def test_plot_linear_and_log(tmp_path):
    A = with_spectrum(torch.linspace(-1.0, 3.0, 100, dtype=torch.float64))
    d = cs.density(A, steps=20, probes=2, progress_bar=False)
    ax = d.plot(log=True)
    assert ax.get_yscale() == "log"
    ax.figure.savefig(tmp_path / "density.png")
    assert (tmp_path / "density.png").stat().st_size > 1000
    assert d.plot().get_yscale() == "linear"


def test_progress_bar_can_be_shown_and_silenced(capsys):
    A = torch.diag(torch.linspace(0.0, 1.0, 50, dtype=torch.float64))
    cs.density(A, steps=10, probes=2, progress_bar=True)
    assert "density" in capsys.readouterr().err
    cs.density(A, steps=10, probes=2, progress_bar=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"steps": 0}, "steps"), ({"probes": -1}, "probes"), ({"sigma": 0.0}, "sigma")],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cs.density(torch.eye(5, dtype=torch.float64), **kwargs)


def test_three_term_and_reorthogonalized_lanczos_agree():
    lam = torch.cat(
        [
            torch.linspace(-2.0, -0.5, 40, dtype=torch.float64),
            torch.linspace(0.5, 4.0, 160, dtype=torch.float64),
        ]
    )
    A = with_spectrum(lam, seed=4)
    plain = cs.density(A, steps=60, probes=6, progress_bar=False)
    ortho = cs.density(A, steps=60, probes=6, reorthogonalize=True, progress_bar=False)
    assert plain.matvecs == ortho.matvecs == 360
    assert abs(plain.negative_mass - ortho.negative_mass) < 0.02
    assert float(torch.trapezoid((plain.values - ortho.values).abs(), plain.grid)) < 0.1


def test_an_invariant_subspace_stops_early_without_breaking_the_quadrature():
    A = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=torch.float64))  # 2 distinct values
    d = cs.density(A, steps=4, probes=2, progress_bar=False)
    assert d.matvecs < 8
    torch.testing.assert_close(d.weights.sum(1), torch.ones(2, dtype=torch.float64))
    assert d.negative_mass < 1e-6
