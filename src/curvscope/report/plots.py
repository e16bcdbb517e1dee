"""Plots of lab results and run logs (PNG files). Reads results and logs only; never a model."""

from __future__ import annotations

import errno
import fnmatch
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from curvscope.diagnosis.classify import step_scaled

COLORS = {
    "gd": "#999999",
    "momentum": "#666666",
    "adam": "#1f77b4",
    "lbfgs": "#17becf",
    "normalized-gd": "#bcbd22",
    "newton": "#d62728",
    "pure-newton": "#ff9896",
    "newton-cg": "#2ca02c",
    "hessian-free": "#9467bd",
    "saddle-free-newton": "#8c564b",
    "cubic-newton": "#e377c2",
    "adahessian": "#ff7f0e",
    "sophia": "#393b79",  # grey beside gd's and momentum's greys was not told apart
}


def _figure(ncols: int = 1, figsize: tuple[float, float] = (6.5, 3.6)) -> tuple[Any, Any]:
    """A new figure and its axes (an array of them for ``ncols`` > 1), through matplotlib's
    object API: a ``Figure`` of its own, which pyplot does not know — no backend is switched,
    no global figure is kept, and nothing has to be closed (PNG output needs no GUI)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency of the lab
        raise ImportError("plots need matplotlib: pip install 'curvscope[plot]'") from e
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)  # a renderer to measure a legend by (:func:`_legend_beside`)
    return fig, fig.subplots(1, ncols)


def _legend_beside(fig: Any, title: str | None = None) -> float:
    """One legend of the figure's labelled lines (a label once), outside its axes on the right:
    the figure is widened by the legend's width, the axes keep theirs. Inside an axes it
    covered what it labels: the lab's thirteen optimizers hid the Newton methods' last
    iterations, and the sharpness plot's legend Adam's stability limit. Returns the axes'
    right edge that leaves the legend its room (``_save(..., right=)``)."""
    named: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            named.setdefault(label, handle)
    legend = fig.legend(
        list(named.values()),
        list(named),
        loc="center right",
        bbox_to_anchor=(0.995, 0.5),
        fontsize=7,
        title=title,
        title_fontsize=7,
        ncol=math.ceil(len(named) / LEGEND_ROWS),  # (44 in one column ran off the figure)
    )
    _literal(fig)  # (measured as drawn: `$$` as mathtext would stop the measure)
    inches = legend.get_window_extent(fig.canvas.get_renderer()).width / fig.dpi
    axes_width = fig.get_figwidth() * 0.97  # (the right edge _save gives without a legend)
    fig.set_figwidth(axes_width + inches + 0.3)
    return axes_width / fig.get_figwidth()


def _style(results: dict[str, Any], name: str) -> dict[str, Any]:
    """An optimizer's line: its colour, dashed where it uses gradients only (order 1) — told
    apart from the curvature methods at a glance, and gd's, momentum's and Sophia's dark
    lines apart from each other."""
    orders = {o.get("name"): o.get("order") for o in results.get("optimizers", [])}
    return {"color": COLORS.get(name), "linestyle": "--" if orders.get(name) == 1 else "-"}


def _listed_at(results: dict[str, Any], name: str) -> int:
    """Where the lab lists an optimizer (first order first, as its tables), for a legend in
    that order; one it does not list goes last."""
    names = [o.get("name") for o in results.get("optimizers", [])]
    return names.index(name) if name in names else len(names)


#: The most entries a column of a legend beside the axes holds (7-point type, 3.6 in tall).
LEGEND_ROWS = 18


def _orders(fig: Any) -> str | None:
    """The title of a legend of optimizers drawn by :func:`_style`, where a line is dashed."""
    dashed = any(line.get_linestyle() == "--" for ax in fig.axes for line in ax.lines)
    return "dashed: gradients only" if dashed else None


def replace_atomically(path: Path, write: Any) -> None:
    """``write(tmp)`` into a hidden file beside ``path``, then rename it over ``path`` (one
    step on POSIX): a write that fails half-way — a full disk, a killed process — leaves the
    old file or none, never a truncated one (a report.html cut mid-image was left before: a
    review); the hidden file is removed on failure, and an error that names no file (a full
    disk's) names ``path`` (the message named the folder: a review)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None or e.filename == str(tmp):
            e.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


#: The files the last report written into a folder wrote there, one name a line, after a first
#: line "#<kind>" naming the kind of report (hidden).
MANIFEST = ".curvscope-report-files"
#: The names of the plots each kind of report writes (fnmatch patterns): a file of such a name
#: that no report of curvscope's wrote is the user's — refused before a report of that kind is
#: written (a user's own log.png and profile.png were replaced without a word: an outside
#: review); a name the report would not write is not its business (a run log's report refused a
#: user's profile.png: a second review)
PLOTS = {
    "lab": (
        "curves-*.png",
        "paths-*.png",
        "profile.png",
        "mlp-density.png",
        "mlp-sharpness.png",
        "adam-vs-hessian.png",
    ),
    "log": ("log.png", "layers.png"),
    "probe": ("slices.png",),
}
#: The title of each kind's page, which tells a report written before manifests were kept
TITLES = {"lab": "curvscope lab", "log": "curvscope run report", "probe": "curvscope probe"}


def manifest(out: Path) -> tuple[str | None, set[str]]:
    """The kind of report the folder's manifest says was written there last (None: unknown)
    and the files it wrote."""
    try:
        lines = (out / MANIFEST).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError):
        return None, set()
    names = {n for n in lines if n and not n.startswith("#")}
    kind = lines[0][1:] if lines and lines[0].startswith("#") else None
    if kind is None and "results.json" in names:  # a manifest from before kinds: a lab's
        kind = "lab"
    return kind, names


def page_kind(page: Path) -> str | None:
    """The kind of report a page is by its title (:data:`TITLES`; "" for a curvscope title of
    no known kind), or None: not a page of curvscope's, or no page."""
    try:
        with page.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    for kind, title in TITLES.items():
        if f"<title>{title}</title>".encode() in head:
            return kind
    return "" if b"<title>curvscope" in head else None


def legacy(out: Path) -> str | None:
    """The kind of report ``out`` holds that curvscope wrote before manifests were kept (no
    manifest; its report.html's title says which: :func:`page_kind`) — its plots are
    curvscope's too — or None."""
    return None if (out / MANIFEST).exists() else page_kind(out / "report.html")


def refuse_foreign(path: Path, what: str) -> None:
    """A FileExistsError where ``path`` exists and no report of curvscope's wrote it (its
    folder's manifest does not list it): ``what`` would replace the user's file."""
    if path.exists() and path.name not in manifest(path.parent)[1] and legacy(path.parent) is None:
        raise FileExistsError(
            errno.EEXIST,
            f"the folder holds {path.name}, which curvscope did not write there (no report of "
            f"its lists it), and {what} would replace it; write the report into another folder "
            "or move the file",
            str(path),
        )


def plot_names(out: Path, kind: str) -> set[str]:
    """The files in ``out`` named as a ``kind`` of report's plots (:data:`PLOTS`)."""
    files = sorted(out.iterdir()) if out.is_dir() else []
    return {f.name for f in files if any(fnmatch.fnmatch(f.name, p) for p in PLOTS[kind])}


def write_manifest(out: Path, kind: str | None, names: set[str]) -> None:
    lines = ([f"#{kind}"] if kind else []) + sorted(names)
    replace_atomically(out / MANIFEST, lambda tmp: tmp.write_text("\n".join(lines), "utf-8"))


def _listed(path: Path) -> None:
    """Add ``path``'s name to its folder's manifest before the file is written: a report cut
    short after its plots (a failure, Ctrl-C) left them unlisted, and its own rerun was refused
    as replacing files curvscope had not written (a review). A folder of a report from before
    manifests gets its manifest when the report is whole (listing the older report's plots then
    made the end of the report delete a user's files of plot names: a review)."""
    out = path.parent
    if legacy(out):
        return
    kind, names = manifest(out)
    if path.name not in names:
        write_manifest(out, kind, names | {path.name})


def _literal(fig: Any) -> None:
    """Every text of the figure that a plot set — titles, axis labels, legends and their
    titles, free text — drawn as written: matplotlib reads a string with two ``$`` as mathtext
    (TeX), so a block named ``$$`` or ``$\\frac$`` stopped the report with a ParseException, and
    ``a_$x^2$`` came out typeset (an outside review). Turned off once here, for every plot, not
    by escaping each field; the tick labels keep it (a log axis writes 10⁻⁶ in mathtext)."""
    texts = list(fig.texts)
    legends = list(fig.legends)
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        legends.append(ax.get_legend())
    for legend in legends:
        if legend is not None:
            texts += [legend.get_title(), *legend.get_texts()]
    for text in texts:
        text.set_parse_math(False)


def _save(fig: Any, path: Path, right: float = 0.97) -> str:
    refuse_foreign(path, "a report's plot")  # the last guard: claim_folder checked first
    _listed(path)
    _literal(fig)
    # fixed margins: tight_layout measured every tick label again and cost ~0.3 s a figure
    n = len(fig.axes)
    # one axes: room for a y label beside log ticks (10⁻⁶; the density's label was cut off)
    left = 0.12 if n == 1 else 0.08 if n < 3 else 0.06
    fig.subplots_adjust(left=left, right=right, bottom=0.15, top=0.88, wspace=0.3)
    replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    return path.name


def _gap(losses: list[float], f_best: float) -> np.ndarray:
    """Each loss's distance above the best, floored at 1e-16, NaN where a log axis draws none
    (:func:`_drawn`: a diverged run's loss of 1e280 stopped the report as a run log's did)."""
    y = np.array([f if f is not None else np.nan for f in losses], dtype=float) - f_best
    return _drawn(np.where(np.isfinite(y), np.maximum(y, 1e-16), np.nan))


def problem_curves(results: dict[str, Any], problem: str, out: Path) -> str | None:
    """Loss − best loss against iteration, derivative evaluations and wall time (None where
    every run was skipped: three empty axes and an empty legend box before)."""
    runs = [r for r in results["runs"] if r["problem"] == problem and r["outcome"] != "skipped"]
    if not runs:
        return None
    finite = [f for r in runs for f in r["losses"] if f is not None and math.isfinite(f)]
    f_best = min(finite) if finite else 0.0
    fig, axes = _figure(3, figsize=(14, 3.6))
    for r in runs:
        y = _gap(r["losses"], f_best)
        style = _style(results, r["optimizer"])
        axes[0].plot(np.arange(len(y)), y, label=r["optimizer"], **style)
        axes[1].plot(r["cost"], y, **style)
        axes[2].plot(r["seconds"], y, **style)
    labels = ("iteration", "gradients + curvature products", "seconds")
    for ax, xl in zip(axes, labels, strict=True):
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("loss − best loss")
    axes[1].set_xscale("symlog", linthresh=1)
    axes[1].set_xlim(left=0)
    fig.suptitle(problem)
    right = _legend_beside(fig, _orders(fig))
    return _save(fig, out / f"curves-{problem}.png", right)


def contour_paths(results: dict[str, Any], problem: str, f: Any, out: Path) -> str | None:
    """A 2-D contour map of f with each optimizer's path (problems with two parameters)."""
    runs = [r for r in results["runs"] if r["problem"] == problem and r["path"]]
    if not runs or len(runs[0]["path"][0]) != 2:
        return None
    import torch

    pts = np.array([p for r in runs for p in r["path"] if all(map(math.isfinite, p))])
    lo, hi = pts.min(0), pts.max(0)
    pad = 0.25 * np.maximum(hi - lo, 1.0)
    lo, hi = np.maximum(lo - pad, -5), np.minimum(hi + pad, 5)
    xs, ys = np.linspace(lo[0], hi[0], 160), np.linspace(lo[1], hi[1], 160)
    gx, gy = np.meshgrid(xs, ys)
    grid = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float64)
    with torch.no_grad():
        Z = torch.vmap(f)(grid).reshape(gx.shape).numpy()
    fig, ax = _figure(figsize=(6.5, 5))
    zmin = Z.min()
    ax.contour(xs, ys, np.log1p(Z - zmin), levels=30, cmap="Greys", linewidths=0.6)
    for r in runs:
        p = np.array(r["path"], dtype=float)
        p = p[np.isfinite(p).all(1)]
        p = p[(p >= lo).all(1) & (p <= hi).all(1)]
        if len(p):
            ax.plot(
                p[:, 0],
                p[:, 1],
                marker=".",
                ms=2.5,
                lw=1,
                label=r["optimizer"],
                **_style(results, r["optimizer"]),
            )
    ax.set_title(f"{problem}: paths (contours of log(1 + f − min))")
    right = _legend_beside(fig, _orders(fig))
    return _save(fig, out / f"paths-{problem}.png", right)


def performance_profiles(results: dict[str, Any], out: Path) -> str | None:
    if not any(results["profile"][axis]["curves"] for axis in ("cost", "time")):
        return None  # nothing ran: no curve to draw
    fig, axes = _figure(2, figsize=(10, 3.8))
    for ax, axis in zip(axes, ("cost", "time"), strict=True):
        prof = results["profile"][axis]
        for name, curve in sorted(prof["curves"].items(), key=lambda c: _listed_at(results, c[0])):
            ax.step(prof["taus"], curve, where="post", label=name, **_style(results, name))
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(
            "τ (times the best " + ("derivative count" if axis == "cost" else "time") + ")"
        )
        n = len(prof.get("problems", ())) or None  # (a results.json from before: not named)
        ax.set_ylabel("share of problems solved" + (f" (of {n})" if n else ""))
        ax.set_title(f"performance profile ({axis})")
    right = _legend_beside(fig, _orders(fig))
    return _save(fig, out / "profile.png", right)


def mlp_density(mlp: dict[str, Any], out: Path) -> str | None:
    if "density_start" not in mlp:
        return None
    fig, ax = _figure()
    for key, label in (("density_start", "at start"), ("density_end", "after training")):
        if key in mlp:
            d = mlp[key]
            ax.plot(
                d["grid"],
                _drawn(d["values"]),
                label=f"{label} (negative mass {d['negative_mass']:.2f})",
            )
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-6)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title("Hessian spectrum of the MLP")
    return _save(fig, out / "mlp-density.png", _legend_beside(fig))


def sharpness_vs_limit(
    runs: list[dict[str, Any]], out: Path, name: str = "mlp-sharpness"
) -> str | None:
    """Sharpness and the optimizer's stability limit at each probe."""
    rows = [(r["optimizer"], r["probes"]) for r in runs if r.get("probes")]
    if not rows:
        return None
    fig, ax = _figure()
    for opt_name, probes in rows:
        steps = [p["step"] for p in probes]
        s = [p["evidence"].get("sharpness") for p in probes]
        lim = [p["evidence"].get("stability_limit") for p in probes]
        c = COLORS.get(opt_name)
        # Adam's is the sharpness of P^-½ H P^-½, not λ_max of H: said (it read "adam:
        # sharpness" 238.7 on the axis of GD's λ_max 1.5, an outside review)
        pre = any(p["evidence"].get("preconditioned") for p in probes)
        what = "sharpness of P^-½ H P^-½ (preconditioned)" if pre else "sharpness (λ_max)"
        ax.plot(steps, _drawn(s), "o-", color=c, label=f"{opt_name}: {what}")
        if any(v is not None for v in lim):
            ax.plot(steps, _drawn(lim), "x--", color=c, label=f"{opt_name}: stability limit")
    ax.set_yscale("log")
    _readable_ticks(ax.yaxis)
    ax.set_xlabel("step")
    ax.set_ylabel("sharpness (each in its optimizer's metric)")
    ax.set_title("sharpness against the optimizer's stability limit")
    return _save(fig, out / f"{name}.png", _legend_beside(fig))


def adam_vs_hessian(mlp: dict[str, Any], out: Path) -> str | None:
    d = mlp.get("adam_vs_hessian")
    if not d:
        return None
    fig, ax = _figure(figsize=(5.5, 4.2))
    ax.loglog(_drawn(np.abs(d["hessian_diag"])), _drawn(d["sqrt_v"]), ".", ms=2, alpha=0.5)
    ax.set_xlabel("|Hessian diagonal| (Hutchinson estimate)")
    ax.set_ylabel("Adam's √v̂")
    ax.set_title(f"Adam's preconditioner vs curvature (Spearman {d['spearman']:.2f})")
    return _save(fig, out / "adam-vs-hessian.png")


def _sharpness_series(
    ax: Any, steps: list[Any], sharpness: np.ndarray, records: list[dict[str, Any]]
) -> None:
    """The sharpness of each record as the series it belongs to: that of the preconditioned
    curvature P^-½ H P^-½ (Adam's) and that of H are two lines, never one through both (a
    schedule to learning rate 0 switches a run from the first to the second)."""
    pre = [bool(r.get("preconditioned")) for r in records]
    for flag, label in ((True, "sharpness of P^-½ H P^-½ (preconditioned)"), (False, "sharpness")):
        series = [v if p is flag else np.nan for v, p in zip(sharpness, pre, strict=True)]
        if not np.isnan(series).all():
            ax.plot(steps, series, "o-" if flag else "s-", label=label)


#: The largest magnitude a log or symlog axis of these plots draws, and 1/LOG_RANGE the smallest
#: nonzero one. matplotlib's log ticks run up to two strides past the data, a stride being about
#: a seventh of the decades shown: a loss of 1e280 beside one of 1 put a tick past 1e308, which is
#: infinite, and the tick labels raised OverflowError — the report stopped (a diverging float64
#: run: an outside review). Data within ±150 decades put the ticks at 1e±246 at most (on log and
#: symlog axes of every size the plots use); a value beyond is treated as one that is not
#: finite: counted in the panel's title, not drawn.
LOG_DECADES = 150
LOG_RANGE = 10.0**LOG_DECADES


def _drawable(v: float) -> bool:
    """Whether a log or symlog axis draws ``v``: finite, and 0 or of a magnitude within
    [1/LOG_RANGE, LOG_RANGE]."""
    return math.isfinite(v) and (v == 0 or 1 / LOG_RANGE <= abs(v) <= LOG_RANGE)


def _drawn(values: Any) -> np.ndarray:
    """``values`` as floats, each that :func:`_drawable` refuses (and None) as NaN, which
    matplotlib leaves out (a -inf was drawn as a line to the axis' edge: a review)."""
    y = np.array([np.nan if v is None else v for v in values], dtype=float).reshape(-1)
    return np.where([_drawable(float(v)) for v in y], y, np.nan)


def _value_scale(ax: Any, title: str, values: list[float]) -> None:
    """A log scale where every value is positive; symlog where some are zero or negative (a
    maximum's negative sharpness, a loss below 0: a log scale dropped them without a word — a
    review). ``values`` are those the records hold (NaN included: a diverged run's NaN losses
    vanished unsaid when NaN stood for a missing value, a review); the title counts the ones no
    scale draws — not finite, or beyond :data:`LOG_RANGE` — which are left out."""
    drawable = [v for v in values if _drawable(v)]
    if drawable and min(drawable) > 0:
        ax.set_yscale("log")
        _readable_ticks(ax.yaxis)
    elif drawable:
        # the linear part reaches to the smallest magnitude, or LOG_RANGE below the largest:
        # each logarithmic side then spans at most as many decades as a log scale may
        nonzero = [abs(v) for v in drawable if v != 0]
        linthresh = max(min(nonzero), max(nonzero) / LOG_RANGE) if nonzero else 1.0
        ax.set_yscale("symlog", linthresh=float(linthresh))
    counts = (
        (sum(not math.isfinite(v) for v in values), "not finite"),
        (sum(math.isfinite(v) and abs(v) > LOG_RANGE for v in values), f"|v| > 1e{LOG_DECADES}"),
        (sum(0 < abs(v) < 1 / LOG_RANGE for v in values), f"0 < |v| < 1e-{LOG_DECADES}"),
    )
    left_out = [f"{n} {why}" for n, why in counts if n]
    # the count on a line of its own: beside a long title it ran past the figure's edge
    ax.set_title(title + (f"\n({', '.join(left_out)}, not drawn)" if left_out else ""), fontsize=10)


def _readable_ticks(axis: Any) -> None:
    """Ticks labelled as plain numbers on a log axis whose view spans less than two decades:
    there a log axis labels one power of ten or none (a sharpness from 0.59 to 1.6 beside its
    limit of 1.33 read "10⁰" alone, with "6×10⁻¹" as a minor label). Under a decade, evenly
    spaced values (0.6, 0.8, …, 1.6); under two, 1, 2 and 5 times the powers of ten. (The
    view, not the data: matplotlib widens a lone value's log axis to two decades, where even
    spacing piled its labels up at the top: the diff review.)"""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    low, high = axis.get_view_interval()
    ratio = high / low if low > 0 else math.inf
    if ratio >= 100:
        return
    if ratio < 10:
        axis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    else:
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _judged_series(ax: Any, steps: list[Any], records: list[dict[str, Any]]) -> list[float]:
    """The curvatures the verdict compares with the limit, where they are not the sharpness
    drawn: the batch sharpness (``train_batches``), and a summed loss's sharpness as a step of
    B samples meets it (times ``step_share``, B/N). A mini-batch run on a summed loss drew
    its full-batch sum alone, far above the limit, beside *learning*. Returns the scaled
    sharpnesses (the records hold the others)."""
    batch = _drawn([r.get("batch_sharpness") for r in records])
    if not np.isnan(batch).all():
        ax.plot(steps, batch, "d-", label="batch sharpness")
    stepped = _drawn(
        [
            step_scaled(r, r.get("sharpness")) if r.get("step_share") is not None else None
            for r in records
        ]
    )
    if not np.isnan(stepped).all():
        ax.plot(steps, stepped, "v-", label="sharpness × B/N (a step's share of the summed loss)")
    return [float(v) for v in stepped if np.isfinite(v)]


def log_plots(records: list[dict[str, Any]], out: Path) -> list[str]:
    """Loss, gradient norm, and sharpness against the stability limit, from a Monitor log."""
    steps = [r["step"] for r in records]

    def held(k: str) -> list[float]:
        """The values the records hold under ``k`` (a missing one or null is none)."""
        return [float(r[k]) for r in records if r.get(k) is not None]

    def col(k: str) -> np.ndarray:
        """One value a step, NaN where there is none or none is drawn (:func:`_drawn`)."""
        return _drawn([r.get(k) for r in records])

    fig, axes = _figure(3, figsize=(13, 3.6))
    axes[0].plot(steps, col("loss"), "o-")
    axes[1].plot(steps, col("grad_norm"), "o-")
    _sharpness_series(axes[2], steps, col("sharpness"), records)
    judged = _judged_series(axes[2], steps, records)
    clipped = any(r.get("clip_factor") is not None for r in records)  # c/(s·η): see README
    label = "stability limit of the clipped rate s·η" if clipped else "stability limit"
    axes[2].plot(steps, col("stability_limit"), "x--", label=label)  # (a lone probe: a mark)
    shown = (
        ("loss", ["loss"]),
        ("gradient norm", ["grad_norm"]),
        ("sharpness vs stability limit", ["sharpness", "stability_limit", "batch_sharpness"]),
    )
    for ax, (title, keys) in zip(axes, shown, strict=True):
        ax.set_xlabel("step")
        more = judged if keys[0] == "sharpness" else []
        _value_scale(ax, title, [v for k in keys for v in held(k)] + more)
    names = [_save(fig, out / "log.png", _legend_beside(fig))]
    shares = [x if isinstance(x, dict) else {} for x in (r.get("layer_shares") for r in records)]
    if any(shares):
        layers, ys = _top_layers(shares)
        prefix, labels = _legend_labels(layers)
        fig, ax = _figure(figsize=(8, 3.6))
        _stacked(ax, steps, ys, labels)
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.set_ylabel("share of the top eigenvector")
        ax.set_title("which layers carry the sharpest direction")
        ax.legend(
            fontsize=7,
            loc="center left",
            bbox_to_anchor=(1, 0.5),
            title=f"{prefix}…" if prefix else None,
            title_fontsize=7,
        )
        names.append(_save(fig, out / "layers.png", right=0.72))
    return names


def _stacked(ax: Any, steps: list[Any], ys: list[list[float]], labels: list[str]) -> None:
    """The layers' shares stacked over the probes, a gap where a probe measured none (NaN), a
    stacked bar at a probe with none measured beside it — a stack over one step has no width:
    a lone probe, or one between gaps, drew nothing (reviews) — over the run's whole span."""
    try:
        x = np.asarray(steps, dtype=float)
    except (TypeError, ValueError):  # steps a log holds that are not numbers: drawn in order
        x = np.arange(len(steps), dtype=float)
    measured = ~np.isnan(np.asarray(ys[0], dtype=float))
    lone = [
        i
        for i in range(len(x))
        if measured[i]
        and not (i > 0 and measured[i - 1])
        and not (i + 1 < len(x) and measured[i + 1])
    ]
    colors = [f"C{j % 10}" for j in range(len(ys))]
    if len(lone) < measured.sum():
        ax.stackplot(x, ys, labels=labels, colors=colors)
    width = 0.8 * (float(np.diff(x).min()) if len(x) > 1 else 1.0)
    bottom = np.zeros(len(lone))
    for j, (y, label) in enumerate(zip(ys, labels, strict=True)):
        heights = np.asarray(y, dtype=float)[lone]
        drawn = label if len(lone) == measured.sum() else None  # (one legend entry a layer)
        ax.bar(x[lone], heights, bottom=bottom, width=width, color=colors[j], label=drawn)
        bottom += heights
    if len(x) > 1:
        ax.set_xlim(x[0], x[-1])
    else:
        ax.set_xticks(x)


#: The per-layer plot names this many layers; the rest are one band, "other".
SHOWN_LAYERS = 9


def _top_layers(shares: list[dict[str, Any]]) -> tuple[list[str], list[list[float]]]:
    """The layers to draw and their shares at each probe: the SHOWN_LAYERS with the largest
    share at any probe, in name order, and the rest summed into one band (a transformer's
    hundred parameter blocks made a legend taller than the figure and bands too thin to tell
    apart: a review)."""

    def share(x: dict[str, Any], k: str) -> float:
        """A layer's share at a probe; NaN at a probe that measured none (a diverged one):
        a gap, where 0 drew every band ramping down to nothing (an outside review)."""
        if not x:
            return math.nan
        v = x.get(k)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else 0.0

    names = sorted({k for x in shares for k in x})
    peak = {k: max(share(x, k) for x in shares if x) for k in names}
    top = sorted(sorted(names, key=lambda k: -peak[k])[:SHOWN_LAYERS])
    ys = [[share(x, k) for x in shares] for k in top]
    rest = sorted(set(names) - set(top))
    if rest:
        top.append(f"other ({len(rest)} blocks)")
        ys.append([sum(share(x, k) for k in rest) if x else math.nan for x in shares])
    return top, ys


#: The longest legend label that fits beside the per-layer plot (7-point type, 28% of 8 in).
LABEL_CHARS = 30


def _legend_labels(names: list[str]) -> tuple[str, list[str]]:
    """The per-layer legend's labels: the dotted components every layer name shares in front
    taken off (said once, as the legend's title), and a name still too long kept at its first
    component and its end — a BERT's "model.encoder.layer.10.attention.self.query.weight" was
    cut at the image's edge, query, key and value alike (an outside review). The full names
    where the shortened ones would collide."""
    layers = [n for n in names if not n.startswith("other (")]
    parts = [n.split(".") for n in layers]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    prefix = ".".join(parts[0][:common]) + "." if common else ""

    def short(name: str) -> str:
        if name.startswith("other ("):
            return name
        name = name[len(prefix) :]
        if len(name) <= LABEL_CHARS:
            return name
        head = name.split(".")[0]
        if len(head) > LABEL_CHARS // 2:  # a long first component: the end alone
            return f"…{name[-(LABEL_CHARS - 1) :]}"
        return f"{head}.…{name[-(LABEL_CHARS - len(head) - 2) :]}"

    labels = [short(n) for n in names]
    if len(set(labels)) < len(labels):
        return "", names
    return prefix, labels


def slices(data: dict[str, Any], out: Path) -> str | None:
    """The loss along each direction (solid) with the local quadratic model (dashed)."""
    if not data:
        return None
    fig, axes = _figure(len(data), figsize=(4.2 * len(data), 3.4))
    for ax, (name, d) in zip(np.atleast_1d(axes), data.items(), strict=True):
        ax.plot(d["t"], d["loss"], label="loss")
        ax.plot(d["t"], d["quadratic"], "--", label="quadratic model")
        ax.set_title(f"along the {name}\nslope {d['slope']:.3g}, curvature {d['curvature']:.3g}")
        ax.set_xlabel("t")
    return _save(fig, out / "slices.png", _legend_beside(fig))
