"""The self-contained HTML report: images embedded as data URIs, every piece of text escaped."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from curvscope.report import plots

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right}
td:first-child,td:nth-child(2),td:nth-child(3),th{text-align:left}
.minimum{color:#2a7d2a}.diverged{color:#c0392b;font-weight:bold}.saddle,.maximum{color:#d35400}
.stalled,.skipped{color:#777}
figure{margin:1.5em 0}img{max-width:100%}figcaption{font-size:13px;color:#555}
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, fmt: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—" if x is None else esc(x)
    return format(x, fmt) if isinstance(x, int | float) else esc(x)


def _image(out: Path, name: str | None, caption: str) -> str:
    if not name:
        return ""
    data = base64.b64encode((out / name).read_bytes()).decode()
    return (
        f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def _settings(results: dict[str, Any]) -> str:
    """The budget and the rules of the run, as a definition list."""
    items = {**{f"budget: {k}": v for k, v in results["budget"].items()}, **results["rules"]}
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items.items())
    return f"<details><summary>Budget and rules</summary><dl>{rows}</dl></details>"


def runs_table(runs: list[dict[str, Any]]) -> str:
    head = (
        "<tr><th>problem</th><th>optimizer</th><th>outcome</th><th>steps</th><th>final loss</th>"
        "<th>‖g‖</th><th>gradients</th><th>products</th><th>seconds</th></tr>"
    )
    rows = []
    for r in runs:
        outcome = r["outcome"]
        if outcome == "diverged":
            outcome += f" at step {r['diverged_at']} (peak {_num(r['peak_loss'])})"
        rows.append(
            f"<tr><td>{esc(r['problem'])}</td><td>{esc(r['optimizer'])}</td>"
            f'<td class="{esc(r["outcome"])}">{esc(outcome)}</td><td>{r["steps"]}</td>'
            f"<td>{_num(r['final_loss'])}</td><td>{_num(r['final_grad_norm'], '.2e')}</td>"
            f"<td>{r['gradients']}</td><td>{r['products']}</td>"
            f"<td>{_num(r['wall'], '.2f')}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>{body}</body></html>"
    )


def write_lab(results: dict[str, Any], out: Path) -> Path:
    """results.json, the PNG plots and report.html into ``out``; returns the report's path."""
    from curvscope import problems

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    figs: list[str] = []
    figs.append(_image(out, plots.performance_profiles(results, out), "Performance profiles"))
    for p in results["problems"]:
        name = p["name"]
        sections = [
            f"<h2>{esc(name)}</h2><p>{esc(p['description'])} — {p['n']} parameters; "
            f"λ_max at the start {_num(p['lambda_max0'])}, so gradient descent's η = "
            f"{_num(p['gd_lr'])}.</p>"
        ]
        if name in problems.names():
            prob = problems.get(name, **p.get("args", {}))
            if isinstance(prob, problems.FunctionProblem) and prob.n == 2:
                sections.append(
                    _image(out, plots.contour_paths(results, name, prob.f, out), f"{name}: paths")
                )
        sections.append(
            _image(out, plots.problem_curves(results, name, out), f"{name}: convergence")
        )
        figs.append("".join(sections))
    mlp = results.get("mlp", {})
    mlp_runs = [r for r in results["runs"] if r["problem"] == mlp.get("problem")]
    learned = ""
    if mlp:
        learned += "<h2>The MLP: curvature along the way, and what first-order methods learn</h2>"
        learned += _image(out, plots.mlp_density(mlp, out), "Hessian spectral density")
        learned += _image(
            out, plots.sharpness_vs_limit(mlp_runs, out), "Sharpness vs stability limit"
        )
        learned += _image(out, plots.adam_vs_hessian(mlp, out), "Adam's √v̂ vs |diag H|")
        d = mlp.get("adam_vs_hessian")
        if d:
            learned += (
                f"<p>Adam's √v̂ and the Hessian diagonal: Spearman rank correlation "
                f"{d['spearman']:.2f}, Pearson of the logs {d['pearson_log']:.2f} — Adam's "
                "preconditioner is a cheap, partial stand-in for the curvature.</p>"
            )
        rows = "".join(
            f"<tr><td>{esc(k)}</td><td>{_num(v['effective_lr'])}</td><td>{_num(v['limit'])}</td>"
            f"<td>{_num(v['effective_lr'] / v['limit'])}</td></tr>"
            for k, v in mlp.get("effective_steps", {}).items()
        )
        if rows:
            learned += (
                "<table><tr><th>method</th><th>effective step</th><th>2/λ_max</th>"
                f"<th>ratio</th></tr>{rows}</table>"
            )
        diag = "".join(
            f"<li><b>{esc(r['optimizer'])}</b>: {esc(r['diagnosis']['text'])}</li>"
            for r in mlp_runs
            if r.get("diagnosis")
        )
        learned += f"<h3>Diagnosis at the end of each run</h3><ul>{diag}</ul>"
    intro = (
        "<p>Second-order methods converge in a handful of steps on well-behaved problems and, "
        "unsafeguarded, go to saddles or blow up on badly-behaved ones; first-order methods "
        "take many cheap steps. Outcomes are read from the problem (the gradient norm and the "
        "extreme eigenvalues at the end), not from the optimizer's own word.</p>"
        + _settings(results)
    )
    body = intro + runs_table(results["runs"]) + "".join(figs) + learned
    path = out / "report.html"
    path.write_text(page("curvscope lab", body), encoding="utf-8")
    return path


def write_log_report(header: dict[str, Any], records: list[dict[str, Any]], out: Path) -> Path:
    """The HTML report of a Monitor run log: curves, the state timeline, the changes."""
    out.mkdir(parents=True, exist_ok=True)
    captions = ["loss, gradient norm, sharpness", "per-layer share of the sharpest direction"]
    imgs = "".join(
        _image(out, n, c) for n, c in zip(plots.log_plots(records, out), captions, strict=False)
    )
    changes, last = [], None
    for r in records:
        if r.get("state") != last:
            changes.append(
                f"<tr><td>{r['step']}</td><td>{esc(r.get('state'))}</td>"
                f"<td>{esc(' '.join(r.get('advice') or []))}</td></tr>"
            )
            last = r.get("state")
    timeline = (
        "<h2>State timeline (changes)</h2><table><tr><th>step</th><th>state</th><th>advice</th>"
        f"</tr>{''.join(changes)}</table>"
    )
    run = f"<p>{esc(json.dumps(header, default=str))}</p>" if header else ""
    path = out / "report.html"
    path.write_text(page("curvscope run report", run + imgs + timeline), encoding="utf-8")
    return path


def write_probe_report(result: dict[str, Any], out: Path) -> Path:
    """The HTML of ``curvscope probe --report``: the diagnosis and the loss slices."""
    out.mkdir(parents=True, exist_ok=True)
    body = (
        f"<p>{esc(result['text'])}</p><ul>"
        + "".join(f"<li>{esc(a)}</li>" for a in result["advice"])
        + "</ul>"
    )
    body += _image(out, plots.slices(result.get("slices", {}), out), "loss slices")
    path = out / "report.html"
    path.write_text(page("curvscope probe", body), encoding="utf-8")
    return path
