"""The self-contained HTML report: images embedded as data URIs, every piece of text escaped.

Escaping is by construction, not per field: the pages are Jinja2 templates (``templates/``)
rendered with autoescaping on, so every value a template prints — a problem name, an advice
sentence, a log's ``step`` — is escaped, and the only markup on a page is what the templates
themselves write. No template uses ``|safe`` and no Python code builds HTML from strings.
"""

from __future__ import annotations

import base64
import errno
import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from curvscope.diagnosis.runlog import jsonable
from curvscope.report import plots


@cache
def environment() -> jinja2.Environment:
    """The one Jinja2 environment of the reports: autoescaping on for every template, and an
    undefined name is an error (not an empty string)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("curvscope.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


def _num(x: Any, fmt: str = ".3g") -> str:
    """A number for a table: formatted; None as a dash; anything else as its text (which the
    template escapes)."""
    if x is None:
        return "—"
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return format(x, fmt)
    return str(x)


def _image(out: Path, name: str | None, caption: str) -> dict[str, str] | None:
    if not name:
        return None
    data = base64.b64encode((out / name).read_bytes()).decode()
    return {"caption": caption, "data": data, "name": name}


MANIFEST = plots.MANIFEST
#: Each kind of report: what it is called, and the files it always writes (beside its plots,
#: which have names of their own) — for the refusal of another kind's folder or a user's files.
_KINDS = {
    "lab": ("a lab report", ("report.html", "results.json")),
    "log": ("a run log's report", ("report.html",)),
    "probe": ("a probe's report", ("report.html",)),
}


def _foreign(path: Path) -> bool:
    """Whether ``path`` exists and is not a file some report of curvscope's wrote (one written
    before manifests were kept is known by its content: a page titled "curvscope ...", a lab's
    results with its environment)."""
    if not path.exists():
        return False
    try:
        if path.name == "report.html":
            return plots.page_kind(path) is None
        results = json.loads(path.read_text(encoding="utf-8"))
        return not (isinstance(results, dict) and {"problems", "environment"} <= set(results))
    except (OSError, ValueError):
        return True


def claim_folder(out: Path, kind: str) -> None:
    """Refuse to write a report of ``kind`` into a folder that holds another kind's: a run
    log's report written into a lab's folder replaced its report.html and removed its
    results.json and plots as its own (an outside review) — or files of the names it writes
    (its page, its plots: :data:`plots.PLOTS`) that no report of curvscope's wrote (no manifest
    lists them): a user's own report.html was replaced without a word (a second review). Then
    records the folder's kind in its manifest, so that a report cut short is still known as
    this kind's. A folder written before manifests were kept is known by its page's title."""
    found, names = plots.manifest(out)
    older = plots.legacy(out)
    found = older or found
    called, always = _KINDS[kind]
    if found and found != kind and found in _KINDS:
        other, files = _KINDS[found]
        if any((out / f).exists() for f in files):  # (not a manifest left with nothing)
            raise FileExistsError(
                errno.EEXIST,
                f"the folder holds {other} ({', '.join(files)}, its plots), which {called} "
                "would replace",
                str(out / "report.html"),
            )
    theirs = [n for n in always if n not in names and _foreign(out / n)]
    if older is None:  # its plots' names, before a lab spends its minutes
        theirs += sorted(plots.plot_names(out, kind) - names)
    if theirs:
        raise FileExistsError(
            errno.EEXIST,
            f"the folder holds {' and '.join(theirs)}, which curvscope did not write there (no "
            f"report of its lists it), and {called} would replace it",
            str(out / theirs[0]),
        )
    if older is None and out.is_dir():
        plots.write_manifest(out, kind, names)


def _written(out: Path, images: list[dict[str, str] | None], *files: str, kind: str) -> None:
    """Record what this report wrote into ``out``, and remove what the previous report there
    wrote and this one did not: a lab rerun on fewer problems, or a run log without per-layer
    shares, left the older plots beside the new page as if they were its (a review). Only names
    the manifest lists are removed — files curvscope wrote itself — so nothing of the user's in
    the folder is touched; the manifest is replaced once the report is whole."""
    names = {i["name"] for i in images if i} | set(files)
    _, before = plots.manifest(out)
    for name in sorted(before - names):
        if name == Path(name).name and not name.startswith("."):  # a plain file name
            (out / name).unlink(missing_ok=True)
    plots.write_manifest(out, kind, names)


def runs_table(runs: list[dict[str, Any]]) -> Markup:
    """The lab's table of runs, rendered (escaped) by the template macro."""
    macros: Any = environment().get_template("macros.html").module  # its names are the macros
    return macros.runs_table(runs)


def page(title: str, body: Markup | str) -> str:
    """A page around ``body``: markup a template rendered (e.g. :func:`runs_table`) goes in as
    it is; a plain string is text and is escaped."""
    return render("base.html", title=title, body=body)


def write_lab(results: dict[str, Any], out: Path, *, draw: bool = True) -> Path:
    """results.json, the PNG plots and report.html into ``out``; returns the report's path.

    ``draw=False``: the page and results.json without the plots, in a moment — what
    ``curvscope lab`` writes when it is interrupted while drawing them (seconds of matplotlib),
    so that the finished runs are kept (they were all lost: an outside review); the plots an
    earlier report left in the folder are removed with the others it wrote, as always.
    """
    from curvscope import problems

    out.mkdir(parents=True, exist_ok=True)
    claim_folder(out, "lab")
    sections = []
    for p in results["problems"]:
        name = p["name"]
        images: list[dict[str, str] | None] = []
        if not draw:
            sections.append({**p, "images": images})
            continue
        if name in problems.names():
            prob = problems.get(name, **p.get("args", {}))
            if isinstance(prob, problems.FunctionProblem) and prob.n == 2:
                paths = plots.contour_paths(results, name, prob.f, out)
                images.append(_image(out, paths, f"{name}: paths"))
        curves = plots.problem_curves(results, name, out)
        images.append(_image(out, curves, f"{name}: convergence"))
        sections.append({**p, "images": images})
    mlp = results.get("mlp", {})
    mlp_view = None
    mlp_images: list[dict[str, str] | None] = []
    if mlp:
        mlp_runs = [r for r in results["runs"] if r["problem"] == mlp.get("problem")]
        if draw:
            mlp_images = [
                _image(out, plots.mlp_density(mlp, out), "Hessian spectral density"),
                _image(
                    out, plots.sharpness_vs_limit(mlp_runs, out), "Sharpness vs stability limit"
                ),
                _image(out, plots.adam_vs_hessian(mlp, out), "Adam's √v̂ vs |diag H|"),
            ]
        mlp_view = {
            "images": mlp_images,
            "adam": mlp.get("adam_vs_hessian") or None,
            "effective_steps": [
                (k, v["effective_lr"], v["limit"], v["effective_lr"] / v["limit"])
                for k, v in mlp.get("effective_steps", {}).items()
            ],
            "diagnoses": [
                (r["optimizer"], r["diagnosis"]["text"]) for r in mlp_runs if r.get("diagnosis")
            ],
        }
    settings = [(f"budget: {k}", v) for k, v in results["budget"].items()]
    settings += list(results["rules"].items())
    profile = (
        _image(out, plots.performance_profiles(results, out), "Performance profiles")
        if draw
        else None
    )
    html = render(
        "lab.html",
        title=plots.TITLES["lab"],
        settings=settings,
        runs=results["runs"],
        profile=profile,
        problems=sections,
        mlp=mlp_view,
        interrupted=results.get("interrupted"),
    )
    path = out / "report.html"
    plots.replace_atomically(path, lambda tmp: tmp.write_text(html, encoding="utf-8"))
    # the data last: a results.json beside a report says the report was written in full; strict
    # JSON, its non-finite numbers as "inf"/"nan" as in the run log (a bare Infinity, which
    # JavaScript's JSON.parse refuses, was in almost every lab's profile ratios: a review)
    text = json.dumps(jsonable(results), indent=1, default=str, allow_nan=False)
    plots.replace_atomically(out / "results.json", lambda tmp: tmp.write_text(text))
    images = [profile, *(i for p in sections for i in p["images"]), *mlp_images]
    _written(out, images, path.name, "results.json", kind="lab")
    return path


def write_log_report(
    header: dict[str, Any],
    records: list[dict[str, Any]],
    out: Path,
    *,
    run: tuple[int, int] | None = None,
) -> Path:
    """The HTML report of a Monitor run log: curves, the state timeline, the changes.

    ``run``: (index, count) when the log holds several runs (``log_mode="a"``): the page says
    which one it shows (index from 0, as ``curvscope report --run`` counts).
    """
    out.mkdir(parents=True, exist_ok=True)
    claim_folder(out, "log")
    captions = ["loss, gradient norm, sharpness", "per-layer share of the sharpest direction"]
    images = [
        _image(out, n, c) for n, c in zip(plots.log_plots(records, out), captions, strict=False)
    ]
    changes, last = [], None
    for r in records:
        if r.get("state") != last:
            changes.append((r["step"], r.get("state"), " ".join(r.get("advice") or [])))
            last = r.get("state")
    shown = [
        (k, v if isinstance(v, str) else json.dumps(v, default=str, ensure_ascii=False))
        for k, v in header.items()
    ]
    if run is not None and run[1] > 1:
        shown.insert(0, ("run", f"{run[0]} of the {run[1]} in this log (0 the first)"))
    lost = max((r.get("records_lost") or 0 for r in records), default=0)
    # a probe measures the model in the mode it finds it in: eval mode is another matrix
    in_eval = [r["step"] for r in records if r.get("train_mode") is False]
    html = render(
        "log.html",
        title=plots.TITLES["log"],
        header=shown,
        records_lost=lost,
        in_eval=(in_eval, len(records)),
        clipping=_clipping(header, records),
        images=images,
        changes=changes,
    )
    path = out / "report.html"
    plots.replace_atomically(path, lambda tmp: tmp.write_text(html, encoding="utf-8"))
    _written(out, images, path.name, kind="log")
    return path


def _clipping(header: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the page says of a clipped run (``max_grad_norm`` in the header): the range of the
    probes' clip factors, how many probes had no norm in their window (and took the latest
    earlier one), and how many had none at all (no norm reported yet)."""
    if header.get("max_grad_norm") is None:
        return None
    factors = [r["clip_factor"] for r in records if r.get("clip_factor") is not None]
    return {
        "max_norm": _num(header["max_grad_norm"]),
        "low": _num(min(factors)) if factors else None,
        "high": _num(max(factors)) if factors else None,
        "stale": sum(
            r.get("clip_factor") is not None and r.get("clip_norms") == 0 for r in records
        ),
        "unknown": len(records) - len(factors),
    }


def write_probe_report(result: dict[str, Any], out: Path) -> Path:
    """The HTML of ``curvscope probe --report``: the diagnosis and the loss slices."""
    out.mkdir(parents=True, exist_ok=True)
    claim_folder(out, "probe")
    slices = _image(out, plots.slices(result.get("slices", {}), out), "loss slices")
    from curvscope.lab.probe import summary_lines

    html = render(
        "probe.html",
        title=plots.TITLES["probe"],
        text=result["text"],
        # the text ends with the advice already: listed again, it read twice (a review)
        advice=[a for a in result["advice"] if a not in result["text"]],
        summary=summary_lines(result) if "eigenvalues" in result else [],
        slices=slices,
    )
    path = out / "report.html"
    plots.replace_atomically(path, lambda tmp: tmp.write_text(html, encoding="utf-8"))
    _written(out, [slices], path.name, kind="probe")
    return path
