"""The plots draw through matplotlib's object API: PNG files written, and neither the global
backend nor pyplot's list of open figures changed by them."""

import matplotlib
import matplotlib.pyplot as plt

from curvscope.report import plots


def _records():
    return [
        {
            "step": s,
            "loss": 1.0 / s,
            "grad_norm": 0.5 / s,
            "sharpness": 1.5 + 0.1 * s,
            "stability_limit": 2.0 if s > 1 else None,
            "layer_shares": {"0": 0.7, "2": 0.3},
        }
        for s in (1, 2, 3)
    ]


def _slice():
    ts = [-1.0, 0.0, 1.0]
    return {
        "t": ts,
        "loss": [1.5, 1.0, 1.6],
        "quadratic": [1.5, 1.0, 1.5],
        "slope": 0.0,
        "curvature": 1.0,
    }


def test_plots_write_pngs_without_touching_pyplot(tmp_path):
    plt.close("all")
    before = matplotlib.get_backend()
    plt.switch_backend("svg")  # a user's backend, not the Agg the plots render with
    try:
        _plot_all(tmp_path)
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == []
    finally:
        plt.switch_backend(before)


def _plot_all(tmp_path):
    names = plots.log_plots(_records(), tmp_path)
    names.append(plots.slices({"gradient": _slice(), "top eigenvector": _slice()}, tmp_path))
    (tmp_path / "one").mkdir()
    names.append(plots.slices({"gradient": _slice()}, tmp_path / "one"))  # one axes, no array
    assert names[:3] == ["log.png", "layers.png", "slices.png"]
    for name in names[:3]:
        assert (tmp_path / name).stat().st_size > 1000


def test_values_a_log_scale_cannot_draw_are_drawn_or_counted(tmp_path):
    """Every panel of a run log's plots was on a log scale: a negative loss or sharpness (a
    maximum's) vanished and NaN/inf left gaps, without a word (a review). Where a value is 0
    or negative the scale is symlog; the title counts what is not finite."""
    from matplotlib.figure import Figure

    for values, scale, title in (
        ([1.0, 0.5, 0.1], "log", "loss"),
        ([1.0, -0.5, 0.0], "symlog", "loss"),
        ([1.0, float("nan"), float("inf")], "log", "loss\n(2 not finite, not drawn)"),
    ):
        ax = Figure().add_subplot()
        plots._value_scale(ax, "loss", values)
        assert (ax.get_yscale(), ax.get_title()) == (scale, title)
    records = _records()
    records[0]["loss"] = -1.0
    records[1]["sharpness"] = float("nan")
    assert plots.log_plots(records, tmp_path)  # drawn, without matplotlib's warning


def test_a_write_that_fails_half_way_leaves_the_old_file_not_a_truncated_one(tmp_path):
    """A full disk left a report.html cut mid-image (a review): files are written beside
    their name and renamed over it once whole."""
    import pytest

    path = tmp_path / "report.html"
    path.write_text("the old report")

    def half_then_full(tmp):
        tmp.write_text("the new rep")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        plots.replace_atomically(path, half_then_full)
    assert path.read_text() == "the old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    plots.replace_atomically(path, lambda tmp: tmp.write_text("the new report"))
    assert path.read_text() == "the new report"


def test_many_layers_are_the_nine_largest_and_one_band_for_the_rest(tmp_path):
    """A transformer's hundred parameter blocks made the per-layer legend taller than the
    figure (a review): the plot names the nine with the largest share and sums the rest."""
    names = [f"block{i:02d}.weight" for i in range(30)]
    shares = []
    for s in range(3):
        raw = [1.0 + i + (20 if i == 5 and s == 2 else 0) for i in range(30)]  # block05: one peak
        shares.append({k: v / sum(raw) for k, v in zip(names, raw, strict=True)})
    layers, ys = plots._top_layers(shares)
    assert len(layers) == plots.SHOWN_LAYERS + 1 and layers[-1] == "other (21 blocks)"
    assert layers[:-1] == sorted([*names[22:], "block05.weight"])  # largest at any probe
    for j, x in enumerate(shares):  # every probe's shares add up as before
        assert abs(sum(y[j] for y in ys) - sum(x.values())) < 1e-12
    records = [{**r, "layer_shares": x} for r, x in zip(_records(), shares, strict=True)]
    assert plots.log_plots(records, tmp_path) == ["log.png", "layers.png"]
    few, _ = plots._top_layers([{"0": 0.7, "2": 0.3}])
    assert few == ["0", "2"]  # no "other" band when every layer is named


def test_a_clipped_runs_limit_is_labelled_as_that_of_the_clipped_rate(tmp_path, monkeypatch):
    """With gradient clipping the limit drawn is c/(s·η), which moves with the clip factor:
    the legend says whose limit it is."""
    legends = []

    def keep(fig, path, right=0.97):
        legends.append([t.get_text() for legend in fig.legends for t in legend.get_texts()])
        return path.name

    monkeypatch.setattr(plots, "_save", keep)
    records = _records()
    plots.log_plots(records, tmp_path)
    assert "stability limit" in legends[0]
    for r in records:
        r["clip_factor"] = 0.5
    legends.clear()
    plots.log_plots(records, tmp_path)
    assert "stability limit of the clipped rate s·η" in legends[0]
