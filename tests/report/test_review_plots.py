"""What the plots draw of values a log axis cannot draw, and of text that looks like TeX (an
outside review of the command line): a report is written, and what is left out is said."""

import math

import numpy as np
import pytest

from curvscope.report import plots


def _capture(monkeypatch):
    """The figures the plots save, kept (each saved for real, so that drawing is tested)."""
    figures = []
    save = plots._save

    def keep(fig, path, right=0.97):
        figures.append(fig)
        return save(fig, path, right)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def _records(**series):
    n = len(next(iter(series.values())))
    return [
        {"step": 5 * (i + 1), "state": "learning", **{k: v[i] for k, v in series.items()}}
        for i in range(n)
    ]


def test_a_loss_beyond_what_a_log_axis_draws_is_counted_not_a_traceback(tmp_path, monkeypatch):
    """A diverging float64 run's loss of 1e280 beside one of 1 put matplotlib's log ticks past
    1e308, and `curvscope report` stopped with OverflowError (an outside review). Such a value
    is treated as one that is not finite: counted in the title, not drawn."""
    figures = _capture(monkeypatch)
    records = _records(
        loss=[1.0, 1e280, 3.0, -1e200],
        grad_norm=[1.0, 1e-200, 2.0, 1e100],
        sharpness=[1.0, 2.0, 1e300, 1.0],
    )
    assert plots.log_plots(records, tmp_path) == ["log.png"]
    titles = [ax.get_title() for ax in figures[0].axes]
    assert titles == [
        "loss\n(2 |v| > 1e150, not drawn)",
        "gradient norm\n(1 0 < |v| < 1e-150, not drawn)",
        "sharpness vs stability limit\n(1 |v| > 1e150, not drawn)",
    ]
    loss = figures[0].axes[0].lines[0].get_ydata()
    assert np.isnan(loss[[1, 3]]).all() and list(loss[[0, 2]]) == [1.0, 3.0]
    assert figures[0].axes[1].lines[0].get_ydata()[3] == 1e100  # within the range: drawn


@pytest.mark.parametrize("low", [1e-300, 1e-16, 1.0, -1.0, 0.0])
@pytest.mark.parametrize("high", [1e200, 1e250, 1e280, 1e300, 1.7e308])
def test_no_pair_of_values_stops_a_log_plot(tmp_path, low, high):
    """Every pair the review's runs could log, on each kind of panel (log, symlog)."""
    records = _records(loss=[low, high], grad_norm=[high, low], sharpness=[low, -high])
    assert plots.log_plots(records, tmp_path) == ["log.png"]


def test_the_curvatures_the_verdict_judges_are_drawn_beside_the_limit(tmp_path, monkeypatch):
    """A mini-batch run's plot drew the full-batch sharpness alone: a summed loss's, N/B times
    what a step meets, stood far above the limit beside *learning*. The batch sharpness and a
    summed loss's sharpness times B/N (``step_share``) are drawn too."""
    figures = _capture(monkeypatch)
    records = _records(
        loss=[2.0, 1.0],
        sharpness=[300.0, 500.0],
        stability_limit=[128.0, 128.0],
        batch_sharpness=[40.0, 45.0],
        step_share=[0.1, 0.1],
    )
    assert plots.log_plots(records, tmp_path) == ["log.png"]
    ax = figures[0].axes[2]
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert lines["batch sharpness"] == [40.0, 45.0]
    assert lines["sharpness × B/N (a step's share of the summed loss)"] == [30.0, 50.0]
    assert ax.get_ylim()[0] < 30.0
    figures.clear()
    plots.log_plots(_records(loss=[1.0], sharpness=[3.0], stability_limit=[20.0]), tmp_path)
    drawn = [line.get_label() for line in figures[0].axes[2].get_lines()]
    assert drawn == ["sharpness", "stability limit"]  # only what the records hold


def test_the_labs_plots_leave_out_what_a_log_axis_cannot_draw(tmp_path):
    """The lab's convergence curves and sharpness plot are log axes too: a diverged run's last
    loss of 1e280 stopped the lab's report the same way."""
    run = {
        "problem": "sqrt1px2",
        "optimizer": "pure-newton",
        "outcome": "diverged",
        "losses": [1.0, 10.0, 1e280],
        "cost": [0, 2, 4],
        "seconds": [0.0, 0.1, 0.2],
    }
    assert plots.problem_curves({"runs": [run]}, "sqrt1px2", tmp_path) == "curves-sqrt1px2.png"
    probes = [
        {"step": s, "evidence": {"sharpness": v, "stability_limit": 2.0}}
        for s, v in ((1, 1.0), (2, 1e290), (3, -math.inf))
    ]
    runs = [{"optimizer": "gd", "probes": probes}]
    assert plots.sharpness_vs_limit(runs, tmp_path) == "mlp-sharpness.png"
    assert np.isnan(plots._gap([1.0, 1e280, math.inf, math.nan, None], 1.0)[1:]).all()


def test_every_value_that_is_not_finite_is_counted_and_none_is_drawn(tmp_path, monkeypatch):
    """A diverged run's NaN losses and gradient norms vanished without a word (NaN stood for a
    missing value: the title said "1 not finite" for 4, and nothing for 5 NaN norms), and a
    -inf was drawn as a line to the axis' edge while the title said "not drawn" (a review)."""
    figures = _capture(monkeypatch)
    nan, inf = math.nan, math.inf
    records = _records(
        loss=[1.0, inf, nan, nan, nan, None],
        grad_norm=[1.0, nan, nan, -inf, nan, nan],
        sharpness=[1.0, 2.0, None, None, None, None],
    )
    plots.log_plots(records, tmp_path)
    loss_ax, norm_ax, _ = figures[0].axes
    assert loss_ax.get_title() == "loss\n(4 not finite, not drawn)"  # None: not held, not counted
    assert norm_ax.get_title() == "gradient norm\n(5 not finite, not drawn)"
    for ax in (loss_ax, norm_ax):
        y = ax.lines[0].get_ydata()
        assert y[0] == 1.0 and np.isnan(y[1:]).all()
        assert np.isfinite(ax.get_ylim()).all()


def test_names_with_dollar_signs_are_drawn_as_written(tmp_path, monkeypatch):
    """Layer names went into the legend as mathtext: a block named `$$` or `$\\frac$` stopped
    the report with a ParseException, `a_$x^2$` came out typeset (an outside review). Every
    text a plot sets is drawn literally; the tick labels keep their mathtext (10⁻⁶)."""
    figures = _capture(monkeypatch)
    names = ["$$", "$\\frac$", "a_$x^2$", "x.$y$.z"]
    shares = {n: 0.25 for n in names}
    records = [{**r, "layer_shares": shares} for r in _records(loss=[1.0, 0.5])]
    assert plots.log_plots(records, tmp_path) == ["log.png", "layers.png"]
    legend = figures[1].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == sorted(names)
    assert not any(t.get_parse_math() for t in legend.get_texts())
    ticks = figures[0].axes[0].yaxis.get_ticklabels()
    assert ticks and all(t.get_parse_math() for t in ticks)
    run = {
        "problem": "$\\frac$",
        "optimizer": "$$",
        "outcome": "stalled",
        "losses": [2.0, 1.0],
        "cost": [0, 1],
        "seconds": [0.0, 0.1],
    }
    assert plots.problem_curves({"runs": [run]}, "$\\frac$", tmp_path) == "curves-$\\frac$.png"
    assert figures[-1]._suptitle.get_text() == "$\\frac$"
    assert not figures[-1]._suptitle.get_parse_math()


def test_a_lone_probe_and_a_probe_without_layer_shares_are_drawn_as_they_are(tmp_path, monkeypatch):
    """A report of one probe drew its stability limit as a dashed line through one point
    (nothing) and its layer shares as a stack over one step (nothing, beside a full legend);
    a diverged probe's missing shares were drawn as 0, every band ramping down to nothing (an
    outside review). A lone point gets a mark and a lone probe a stacked bar; a probe without
    shares is a gap."""
    figures = _capture(monkeypatch)
    one = _records(loss=[1.0], sharpness=[3.0], stability_limit=[20.0])
    one[0]["layer_shares"] = {"0.weight": 0.75, "2.weight": 0.25}
    assert plots.log_plots(one, tmp_path) == ["log.png", "layers.png"]
    limit = figures[0].axes[2].get_lines()[-1]
    assert limit.get_marker() not in ("None", "", None) and limit.get_ydata()[0] == 20.0
    bars = figures[1].axes[0].patches
    assert [b.get_height() for b in bars] == [0.75, 0.25] and bars[1].get_y() == 0.75
    shares = [{"0": 0.5, "2": 0.5}, {}, {"0": 0.25, "2": 0.75}]
    _, ys = plots._top_layers(shares)
    assert all(math.isnan(y[1]) for y in ys) and [y[2] for y in ys] == [0.25, 0.75]
    # a run that diverged after its first probe: shares there alone — a bar, over the whole run
    # (a stack beside gaps drew nothing, and the axis stopped at the last share: the diff review)
    run = _records(loss=[1.0, math.nan, math.nan])
    run[0]["layer_shares"] = {"0": 0.5, "2": 0.5}
    figures.clear()
    assert plots.log_plots(run, tmp_path) == ["log.png", "layers.png"]
    layers = figures[1].axes[0]
    assert [b.get_height() for b in layers.patches] == [0.5, 0.5]
    assert layers.get_xlim() == (5.0, 15.0)
    runs = [
        {
            "optimizer": "adam",
            "probes": [{"step": 1, "evidence": {"sharpness": 238.7, "preconditioned": True}}],
        },
        {"optimizer": "gd", "probes": [{"step": 1, "evidence": {"sharpness": 1.5}}]},
    ]
    plots.sharpness_vs_limit(runs, tmp_path)
    labels = [t.get_text() for t in figures[-1].legends[0].get_texts()]
    assert labels == ["adam: sharpness of P^-½ H P^-½ (preconditioned)", "gd: sharpness (λ_max)"]


def test_no_legend_covers_what_a_plot_draws(tmp_path, monkeypatch):
    """Every legend was drawn inside an axes: on the lab's Rosenbrock the thirteen optimizers'
    legend covered the Newton methods' last iterations, and the sharpness plot's legend covered
    Adam's stability limit (a look at the lab's report). A legend now stands beside the axes,
    the figure widened for it, inside the figure; the gradient-only methods are dashed."""
    import curvscope as cs
    from curvscope import lab

    figures = _capture(monkeypatch)
    results = lab.run_lab(["rosenbrock"], budget=lab.Budget(function_steps=8, seconds=1.0))
    width = 14.0
    assert plots.problem_curves(results, "rosenbrock", tmp_path) == "curves-rosenbrock.png"
    assert figures[-1].get_figwidth() > width  # widened, the three axes as wide as they were
    assert plots.contour_paths(results, "rosenbrock", cs.problems.get("rosenbrock").f, tmp_path)
    assert plots.performance_profiles(results, tmp_path) == "profile.png"
    dashed = {line.get_label(): line.get_linestyle() for line in figures[-1].axes[0].lines}
    assert dashed["gd"] == "--" and dashed["newton"] == "-"
    grid = np.linspace(-1.0, 1.0, 50)
    density = {"grid": grid, "values": np.exp(-(grid**2)), "negative_mass": 0.5}
    assert plots.mlp_density({"density_start": density, "density_end": density}, tmp_path)
    probes = [{"step": s, "evidence": {"sharpness": 2.0, "stability_limit": 2.0}} for s in (1, 2)]
    runs = [{"optimizer": name, "probes": probes} for name in ("gd", "momentum", "adam")]
    assert plots.sharpness_vs_limit(runs, tmp_path) == "mlp-sharpness.png"
    records = _records(
        loss=[1.0, 0.5],
        sharpness=[3.0, 3.0],
        stability_limit=[2.0, 2.0],
        batch_sharpness=[1.0, 1.0],
        step_share=[0.5, 0.5],
    )
    for r in records:
        r["layer_shares"] = {"0.weight": 0.75, "2.weight": 0.25}
    assert plots.log_plots(records, tmp_path) == ["log.png", "layers.png"]
    slope = {"t": [-1.0, 0.0, 1.0], "loss": [1.0, 0.0, 1.0], "quadratic": [1.0, 0.0, 1.0]}
    slices = {"gradient": {**slope, "slope": 0.0, "curvature": 2.0}}
    assert plots.slices({**slices, "top eigenvector": slices["gradient"]}, tmp_path)
    # forty-four lines (a legend of one column ran off the figure's top and bottom), and curvature
    # methods alone: no "dashed" title over solid lines (the diff review)
    runs = results["runs"] * 4
    many = [{**run, "problem": "p", "optimizer": f"opt-{i}"} for i, run in enumerate(runs)]
    assert plots.problem_curves({"runs": many[:44]}, "p", tmp_path)
    solid = {**results, "runs": [r for r in results["runs"] if r["optimizer"] == "newton"]}
    assert plots.problem_curves(solid, "rosenbrock", tmp_path)
    assert figures[-1].legends[0].get_title().get_text() == ""
    assert len(figures) == 10
    for fig in figures:
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes)]
        legends = [legend for legend in legends if legend is not None]
        assert legends, fig.axes[0].get_title()
        for legend in legends:
            box = legend.get_window_extent()
            assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 + 1, "cut off"
            assert fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1 + 1, "cut off"
            for ax in fig.axes:
                assert not box.overlaps(ax.get_window_extent()), ax.get_title()


def test_a_log_axis_under_two_decades_is_labelled_in_plain_numbers(tmp_path, monkeypatch):
    """A sharpness from 0.59 to 1.6 beside its limit of 1.33 had one labelled tick, "10⁰"
    (and "6×10⁻¹" as a minor label): no value could be read off the plot. Under two decades
    the ticks are plain numbers, several in view; wider axes keep their powers of ten."""
    figures = _capture(monkeypatch)
    sharpness = [1.77, 1.47, 1.13, 1.0, 0.89, 0.81, 0.74, 0.67, 0.62, 0.59]
    records = _records(
        loss=[10.0**-k for k in range(10)], sharpness=sharpness, stability_limit=[1.33] * 10
    )
    plots.log_plots(records, tmp_path)
    loss_ax, _, sharp_ax = figures[0].axes

    def labelled(ax):
        low, high = ax.get_ylim()
        return [
            t.get_text()
            for t in ax.yaxis.get_ticklabels()
            if t.get_text() and low <= t.get_position()[1] <= high
        ]

    labels = labelled(sharp_ax)
    assert len(labels) >= 4, labels
    assert all(0.5 <= float(t) <= 2 for t in labels)  # plain numbers, not 10^k in mathtext
    assert all("10^" in t for t in labelled(loss_ax))  # nine decades: powers of ten
    probes = [
        {"step": k, "evidence": {"sharpness": v, "stability_limit": 1.33}}
        for k, v in enumerate(sharpness)
    ]
    plots.sharpness_vs_limit([{"optimizer": "gd", "probes": probes}], tmp_path)  # the lab's
    assert len(labelled(figures[-1].axes[0])) >= 4
    # a lone probe: matplotlib widens each log axis around its value to up to two decades;
    # the labels span the axis (evenly spaced ticks over a gradient norm's axis from 0.008 to
    # 1.26 were labelled 0.25 to 1.25, piled up at its top, and none near the value: the diff
    # review)
    figures.clear()
    plots.log_plots(_records(loss=[0.5], grad_norm=[0.1], sharpness=[1.2]), tmp_path)
    for ax in figures[0].axes:
        low, high = ax.get_ylim()
        shown = [t for t in ax.yaxis.get_ticklabels() if t.get_text()]
        heights = [t.get_window_extent().y0 for t in shown if low <= t.get_position()[1] <= high]
        assert max(heights) - min(heights) >= 0.5 * ax.get_window_extent().height, ax.get_title()
