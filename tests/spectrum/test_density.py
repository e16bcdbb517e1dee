"""Stochastic Lanczos quadrature: a density that integrates to 1, and a negative mass — the
fraction of eigenvalues below -resolution — that matches the dense spectrum within its error
bars and its quadrature bracket."""

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


def test_negative_mass_of_a_real_hessian_is_its_fraction_below_minus_resolution():
    case = cases.residual_layernorm()
    C = cs.Curvature(case.model, case.loss_fn, case.data)
    ev = torch.linalg.eigvalsh(cases.dense_hessian(case))
    d = cs.density(C, steps=40, probes=8, progress_bar=False)
    assert d.resolution == pytest.approx(0.01 * float(d.nodes.max() - d.nodes.min()))
    truth = float((ev < -d.resolution).double().mean())
    lower, upper = d.negative_mass_bounds
    assert lower - 3 * d.negative_mass_stderr <= truth <= upper + 3 * d.negative_mass_stderr
    assert abs(d.negative_mass - truth) <= 3 * d.negative_mass_stderr + 0.02
    assert 0 < d.negative_mass_stderr < 0.1


def test_a_psd_ggn_with_a_large_null_space_has_no_negative_mass():
    """The GGN of 4 samples, 3 classes has rank <= 8 of 43: 81% of its eigenvalues are 0.

    The smoothed curve splits that bulk in half (its mass below zero is about 0.4, what
    negative_mass used to report); the nodes below -resolution weigh nothing."""
    case = cases.mlp(n=4)
    C = cs.Curvature(case.model, case.loss_fn, case.data, kind="ggn")
    ev = torch.linalg.eigvalsh(cases.dense_ggn(case))
    assert float((ev.abs() < 1e-10).double().mean()) > 0.8
    d = cs.density(C, steps=30, probes=6, progress_bar=False)
    below = d.grid < 0
    assert float(torch.trapezoid(d.values[below], d.grid[below])) > 0.3
    assert d.negative_mass == 0.0 and d.negative_mass_stderr == 0.0
    assert d.negative_mass_bounds[1] < 1e-6


def test_finite_difference_errors_raise_the_resolution_of_the_negative_mass():
    """A convex loss (logistic regression of 40 samples in 120 dimensions: 2/3 of its Hessian's
    eigenvalues are 0) by float32 finite differences at a small step, whose products are off by
    about 0.04·‖v‖: the nodes of the zero bulk spread to −0.2, and the negative mass read 0.14 ±
    0.02 of a PSD matrix. The default resolution is at least √steps times the largest estimated
    product error, the bound on how far those errors move a node; exact products keep 1%."""
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 120, generator=gen), torch.randint(0, 2, (40,), generator=gen)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Linear(120, 2)
    loss_fn, steps = torch.nn.CrossEntropyLoss(), 40
    exact = cs.density(cs.Curvature(model, loss_fn, [(X, y)]), steps, 6, progress_bar=False)
    span = float(exact.nodes.max() - exact.nodes.min())
    assert exact.product_error == 0.0 and exact.resolution <= 0.0101 * span
    C = cs.Curvature(model, loss_fn, [(X, y)], backend="finite_difference", fd_eps=1e-5)
    d = cs.density(C, steps, 6, progress_bar=False)
    assert d.product_error > 0.01 and d.resolution >= steps**0.5 * d.product_error
    assert float(d.nodes.min()) < -0.05  # the errors moved nodes well past 1% of the range
    assert float(d.nodes.min()) > -d.resolution and d.negative_mass == 0.0
    assert d.negative_mass_bounds[1] < 0.05


def test_products_of_unknown_accuracy_leave_the_mass_unknown_not_zero(monkeypatch):
    """A finite-difference product of unknown accuracy (an error estimate of inf) raised the
    resolution to inf, and the negative mass of a half-negative spectrum read 0 (a review):
    the resolution keeps its other floors, the mass's standard error is inf."""
    from curvscope.spectrum._operator import Operator

    monkeypatch.setattr(Operator, "errors_since", lambda self, seen: [float("inf")])
    A = torch.diag(torch.linspace(-1.0, 1.0, 50, dtype=torch.float64))
    d = cs.density(A, steps=20, probes=4, progress_bar=False)
    assert d.product_error == float("inf") and d.resolution < 0.1
    assert d.negative_mass > 0.3 and d.negative_mass_stderr == float("inf")


@pytest.mark.parametrize("negative", [1, 10])
def test_the_interval_holds_a_few_negative_eigenvalues_that_the_probes_spread_misses(negative):
    """Four probes of a fraction made of one or ten eigenvalues are skewed: the truth fell outside
    the bracket ± 2 stderr in 21–32 of 100 seeds (0.0007 ± 0.0007 for a true 0.01: an outside
    review). ``negative_mass_interval`` widens it by the spread the fraction itself allows."""
    lam = torch.cat(
        [
            -torch.linspace(1.0, 3.0, negative, dtype=torch.float64),
            torch.linspace(0.5, 3.0, 300 - negative, dtype=torch.float64),
        ]
    )
    A, truth = with_spectrum(lam), negative / 300
    outside = inside_old = 0
    for seed in range(20):
        d = cs.density(A, seed=seed, progress_bar=False)
        low, high = d.negative_mass_interval
        outside += not low <= truth <= high
        lower, upper = d.negative_mass_bounds
        se = d.negative_mass_stderr
        inside_old += lower - 2 * se <= truth <= upper + 2 * se
        assert low <= lower and high >= upper and high - low < 0.06
    assert outside == 0 and inside_old < 20  # the old range missed here: the case is a real one


def test_a_spectrum_far_below_one_is_resolved_at_its_own_scale():
    """The smoothing width had an absolute floor of 1e-12: a spectrum from -1e-14 to 2e-14 read
    no negative mass (truth 0.33) with a width a million times the spectrum's (a review)."""
    for scale in (1e-14, 1e-20, 1.0):
        A = with_spectrum(scale * torch.linspace(-1.0, 2.0, 300, dtype=torch.float64))
        d = cs.density(A, progress_bar=False)
        assert d.sigma < 0.05 * scale and d.resolution < 0.05 * scale
        low, high = d.negative_mass_interval
        assert low <= 100 / 300 <= high and abs(d.negative_mass - 1 / 3) < 0.1


BULK = torch.cat(
    [
        torch.linspace(-1.0, -0.2, 30, dtype=torch.float64),  # 10% clearly negative
        1e-4 * torch.randn(210, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
        torch.linspace(0.5, 4.0, 60, dtype=torch.float64),
    ]
)


@pytest.mark.parametrize("steps", [10, 40])
def test_indefinite_spectrum_with_a_bulk_at_zero_against_eigvalsh(steps):
    """70% of the eigenvalues within 1e-4 of zero (of both signs), 10% clearly negative.

    With 40 steps the estimate is right and the quadrature's bracket is tight; with 10 it is
    not resolved — and the bracket says so instead of hiding it."""
    A = with_spectrum(BULK, seed=1)
    d = cs.density(A, steps=steps, probes=8, progress_bar=False)
    truth = float((torch.linalg.eigvalsh(A) < -d.resolution).double().mean())
    assert truth == pytest.approx(0.1)
    lower, upper = d.negative_mass_bounds
    se = d.negative_mass_stderr
    assert lower - 3 * se <= truth <= upper + 3 * se
    assert lower <= d.negative_mass + 3 * se and d.negative_mass - 3 * se <= upper
    if steps == 40:
        assert upper - lower < 0.01
        assert abs(d.negative_mass - truth) <= 3 * se + 0.01
    else:
        assert upper - lower > 0.2  # honest: the bulk at zero is not yet told from -resolution


def test_the_resolution_is_a_threshold_the_caller_can_set():
    A = with_spectrum(BULK, seed=1)
    ev = torch.linalg.eigvalsh(A)
    d = cs.density(A, steps=40, probes=8, resolution=0.5, progress_bar=False)
    assert d.resolution == 0.5
    truth = float((ev < -0.5).double().mean())  # 5/8 of the clearly negative tenth
    assert abs(d.negative_mass - truth) <= 3 * d.negative_mass_stderr + 0.02
    zero = cs.density(A, steps=40, probes=8, resolution=0.0, progress_bar=False)
    assert zero.negative_mass > d.negative_mass  # below 0 itself: part of the bulk counts


def test_the_quadrature_bracket_holds_for_every_threshold():
    """For one probe, in float64 with a reorthogonalized recurrence, the probe's exact spectral
    measure μ((-∞, x)) = Σ_{λ_i < x} (u_iᵀz)²/‖z‖² lies within cdf_bracket at every x."""
    from curvscope.spectrum._operator import as_operator
    from curvscope.spectrum.density import cdf_bracket
    from curvscope.spectrum.lanczos import Krylov

    lam = torch.cat([BULK[::3], torch.tensor([6.0], dtype=torch.float64)])
    z = torch.randn(len(lam), 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    op = as_operator(torch.diag(lam))
    kry = Krylov(op, z, torch.Generator().manual_seed(0))
    while kry.size < 8:
        kry.extend()
    w = (z[:, 0] ** 2) / (z**2).sum()
    widths = []
    for x in torch.linspace(-1.5, 6.5, 81).tolist():
        lower, upper = cdf_bracket(kry.H, float(kry.R.norm()), x)
        truth = float(w[lam < x].sum())
        assert lower - 1e-9 <= truth <= upper + 1e-9, (x, lower, truth, upper)
        widths.append(upper - lower)
    assert max(widths) < 1 and min(widths) < 1e-3  # informative, not vacuous


def test_plot_linear_and_log_without_pyplot_state(tmp_path):
    import matplotlib.pyplot as plt

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    A = with_spectrum(torch.linspace(-1.0, 3.0, 100, dtype=torch.float64))
    d = cs.density(A, steps=20, probes=2, progress_bar=False)
    ax = d.plot(log=True)
    assert ax.get_yscale() == "log"
    top = float(d.values.max())  # one decade above the peak (three empty ones before)
    assert ax.get_ylim() == pytest.approx((top * 1e-8, top * 10))
    ax.figure.savefig(tmp_path / "density.png")
    assert (tmp_path / "density.png").stat().st_size > 1000
    # every label inside the figure as saved (the x label fell 5 px below its edge)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(ax.figure).get_renderer()
    box = ax.figure.bbox
    for text in (ax.xaxis.label, ax.yaxis.label, ax.title):
        inside = text.get_window_extent(renderer)
        assert box.x0 <= inside.x0 and inside.x1 <= box.x1
        assert box.y0 <= inside.y0 and inside.y1 <= box.y1
    assert d.plot().get_yscale() == "linear"
    # the figures are objects of their own: no backend switched, no pyplot figure left open
    assert matplotlib.get_backend() == backend and plt.get_fignums() == figures
    fig, mine = plt.subplots()  # the caller's own axes are drawn on
    try:
        assert d.plot(ax=mine) is mine and len(mine.lines) == 2  # the curve and the zero line
    finally:
        plt.close(fig)


def test_the_results_repr_leaves_the_curve_and_the_vectors_out():
    """repr(density(...)) was 13,576 characters, negative_mass after 165 lines of grid."""
    A = with_spectrum(torch.linspace(-1.0, 3.0, 100, dtype=torch.float64))
    text = repr(cs.density(A, steps=20, probes=2, progress_bar=False))
    assert len(text) < 600 and text.startswith("DensityResult(negative_mass=")
    text = repr(cs.eigenvalues(A, k=2))
    assert "vectors" not in text and len(text) < 1000


def test_progress_bar_can_be_shown_and_silenced(capsys):
    A = torch.diag(torch.linspace(0.0, 1.0, 50, dtype=torch.float64))
    cs.density(A, steps=10, probes=2, progress_bar=True)
    assert "density" in capsys.readouterr().err
    cs.density(A, steps=10, probes=2, progress_bar=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 0}, ValueError, "steps to be an integer >= 1"),
        ({"steps": 2.5}, TypeError, "steps to be an integer"),
        ({"probes": -1}, ValueError, "probes"),
        ({"grid_points": 1}, ValueError, "grid_points"),
        ({"sigma": 0.0}, ValueError, "expected sigma to be > 0, got 0.0"),
        ({"sigma": float("nan")}, ValueError, "expected sigma to be a finite number"),
        ({"sigma": "0.1"}, TypeError, "expected sigma to be a real number, got str"),
        ({"sigma": True}, TypeError, "expected sigma to be a real number, got bool"),
        ({"resolution": -0.1}, ValueError, "expected resolution to be >= 0, got -0.1"),
        ({"resolution": float("inf")}, ValueError, "resolution to be a finite number"),
        ({"seed": None}, TypeError, "seed=None"),
        ({"seed": 1.7}, TypeError, "seed to be an integer"),
        ({"seed": -1}, ValueError, "seed to be an integer >= 0"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        cs.density(torch.eye(5, dtype=torch.float64), progress_bar=False, **kwargs)


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


@pytest.mark.parametrize("scale", [1e20, 1e30])
def test_a_float32_operator_whose_squares_overflow_float32(scale):
    """Products of 1e20 square past float32's 3.4e38: density's three-term recurrence read
    β = inf (LAPACK's failure at 1e20, NaN nodes and a negative mass of 0 at 1e30), and
    trace_of_square read inf (an outside review). The norms are taken scaled there."""
    A = (scale * with_spectrum(torch.linspace(-1.0, 2.0, 300, dtype=torch.float64))).float()
    d = cs.density(A, steps=20, probes=2, progress_bar=False)
    assert bool(torch.isfinite(d.nodes).all()) and bool(torch.isfinite(d.values).all())
    low, high = d.negative_mass_interval
    assert low <= 100 / 300 <= high
    t = cs.trace_of_square(A, matvecs=30)
    truth = float((A.double() ** 2).sum())
    assert abs(t.value - truth) <= 4 * t.stderr + 1e-3 * truth


@pytest.mark.parametrize("reorthogonalize", [False, True])
@pytest.mark.parametrize("scale", [1e-200, 1e-170, 1e160, 1e200])
def test_a_float64_spectrum_far_from_one_has_the_density_it_has_at_one(scale, reorthogonalize):
    """A review: 25% of a spectrum below 0 read a negative mass of 0, interval (0, 0.067), at
    1e-170 (β's squares underflowed: "an invariant subspace", one node) and raised LAPACK's
    error at 1e160 (β's overflowed: NaN nodes; the Gauss–Radau bracket squares β too)."""
    A = with_spectrum(torch.linspace(-1.0, 3.0, 40, dtype=torch.float64))
    kw = {"steps": 15, "probes": 3, "reorthogonalize": reorthogonalize, "progress_bar": False}
    one, far = cs.density(A, **kw), cs.density(A * scale, **kw)
    assert far.negative_mass == pytest.approx(one.negative_mass, rel=1e-9)
    assert far.negative_mass_interval == pytest.approx(one.negative_mass_interval, rel=1e-9)
    assert far.resolution / scale == pytest.approx(one.resolution, rel=1e-9)
    torch.testing.assert_close(far.nodes / scale, one.nodes, rtol=1e-9, atol=1e-12)
