"""The lab: every selected optimizer on every selected problem, the performance profile, and
what first-order methods learn about curvature — one JSON-able result."""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import scipy.stats
import torch

from curvscope import optim, problems
from curvscope.lab.runner import (
    BLOWUP,
    DEFAULT_PROBLEMS,
    GD_LR_FACTOR,
    GRAD_TOL,
    LEARNING_RATES,
    PROBLEM_ARGS,
    Budget,
    Run,
    Setup,
    curvature_at_start,
    make_setup,
    run_one,
)
from curvscope.spectrum import density, diagonal, eigenvalues

RESULTS_VERSION = 1
#: A problem counts as solved by a run once f ≤ f_best + PROFILE_TOL·(f₀ − f_best), f_best the
#: lowest loss any run reached (Moré & Wild's convergence test for data profiles).
PROFILE_TOL = 1e-4
#: The performance-profile axis: ratios τ to the best cost, 1 … 1000.
TAUS = np.logspace(0, 3, 61)
#: Diagnose the first-order runs on the MLP this many times along the way.
MLP_PROBES = 5


def selection(
    problem_names: Sequence[str] | None, optimizer_names: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """The problems and optimizers a lab run covers: those asked for, else the built-in
    problems and every registered optimizer; an unknown name gets the list of valid ones."""
    return (
        _check_names(problem_names, problems.names(), "problem") or list(DEFAULT_PROBLEMS),
        _check_names(optimizer_names, optim.names(), "optimizer") or optim.names(),
    )


def _check_names(asked: Sequence[str] | None, valid: Sequence[str], what: str) -> list[str]:
    if not asked:
        return []
    bad = [a for a in asked if a not in valid]
    if bad:
        raise ValueError(
            f"unknown {what} {', '.join(map(repr, bad))}; valid names: {', '.join(valid)}"
        )
    return list(asked)


def _solve_cost(run: Run, target: float, axis: str) -> float:
    if run.outcome in ("diverged", "skipped"):
        return math.inf
    xs = run.cost if axis == "cost" else run.seconds
    for f, x in zip(run.losses, xs, strict=True):
        if math.isfinite(f) and f <= target:
            return float(max(x, 1e-9 if axis == "time" else 1))
    return math.inf


def _profile_target(runs: list[Run]) -> float | None:
    """The loss a run must reach to count as solving the problem: f_best + tol·(f₀ − f_best)
    over the runs that ran; None when every run was skipped or never had a finite loss."""
    ran = [r for r in runs if r.outcome != "skipped" and r.losses]
    finals = [min((f for f in r.losses if math.isfinite(f)), default=math.inf) for r in ran]
    if not finals or not math.isfinite(min(finals)):
        return None
    f_best, f0 = min(finals), ran[0].losses[0]
    return f_best + PROFILE_TOL * (f0 - f_best)


def performance_profile(runs: Sequence[Run], axis: str) -> dict[str, Any]:
    """Dolan & Moré (2002): ρ_s(τ) = share of problems solver s solves within τ × the best cost,
    over the problems every solver ran (``problems``): an interrupted lab's unfinished problem
    counted the runs it never got to as failures, and a method that solved all it ran topped out
    at half (an outside review)."""
    by_problem: dict[str, list[Run]] = {}
    for r in runs:
        by_problem.setdefault(r.problem, []).append(r)
    solvers = sorted({r.optimizer for r in runs})
    by_problem = {
        p: rs for p, rs in by_problem.items() if {r.optimizer for r in rs} == set(solvers)
    }
    ratios: dict[str, list[float]] = {s: [] for s in solvers}
    for rs in by_problem.values():
        target = _profile_target(rs)
        if target is None:  # no solver solves this problem (it crashed the lab before)
            for s in solvers:
                ratios[s].append(math.inf)
            continue
        costs = {r.optimizer: _solve_cost(r, target, axis) for r in rs}
        best = min(costs.values())
        for s in solvers:
            c = costs.get(s, math.inf)
            ratios[s].append(c / best if math.isfinite(c) and best > 0 else math.inf)
    n = max(len(by_problem), 1)
    curves = {s: [sum(r <= t for r in ratios[s]) / n for t in TAUS] for s in solvers}
    return {"taus": TAUS.tolist(), "curves": curves, "ratios": ratios, "problems": list(by_problem)}


def _curvature_learned(setups: dict[str, tuple[Setup, Any]], budget: Budget) -> dict[str, Any]:
    """On the MLP: Adam's √v̂ against the Hessian diagonal; the effective steps of momentum and
    normalized GD against 2/λ_max."""
    out: dict[str, Any] = {}
    if "adam" in setups:
        setup, opt = setups["adam"]
        sqrt_v, step = [], None
        for p in setup.params:
            st = opt.state[p]
            step = float(st["step"])
            b2 = opt.param_groups[0]["betas"][1]
            sqrt_v.append((st["exp_avg_sq"] / (1 - b2**step)).sqrt().reshape(-1))
        C = setup.curvature()
        diag = diagonal(C, matvecs=budget.diagonal_probes, seed=0).value
        v = torch.cat(sqrt_v)
        # over the parameters the data reach: a weight of an input that is 0 in every sample
        # (8 of digits' pixels: 128 weights) has √v̂ = 0 and diag H = 0 exactly, and clamped to
        # 1e-12 they counted as perfect agreement (Pearson 0.965 for 0.826, Spearman 0.636 for
        # 0.492: an outside review); ties ranked by their mean rank, as scipy does
        reached = (v != 0) | (diag != 0)
        a = torch.log(v[reached].clamp_min(1e-12))
        b = torch.log(diag[reached].abs().clamp_min(1e-12))
        pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        spearman = float(scipy.stats.spearmanr(a.numpy(), b.numpy()).statistic)
        out["adam_vs_hessian"] = {
            "sqrt_v": v.tolist(),
            "hessian_diag": diag.tolist(),
            "pearson_log": pearson,
            "spearman": spearman,
            "unreached": int((~reached).sum()),
        }
    steps = {}
    for name, (setup, opt) in setups.items():
        if name not in ("gd", "momentum", "normalized-gd") or opt is None:
            continue
        C = setup.curvature()
        lam = float(eigenvalues(C, k=1, tol=1e-3).values[0])
        lr = opt.param_groups[0]["lr"]
        if name == "momentum":
            eff = lr / (1 - opt.param_groups[0]["momentum"])
        elif name == "normalized-gd":
            eff = lr / max(setup.grad_norm(), 1e-300)
        else:
            eff = lr
        steps[name] = {"effective_lr": eff, "lambda_max": lam, "limit": 2 / lam}
    out["effective_steps"] = steps
    return out


def _density_record(setup: Setup, budget: Budget) -> dict[str, Any]:
    C = setup.curvature()
    d = density(C, steps=budget.density_steps, probes=3, progress_bar=False)
    return {
        "grid": d.grid.tolist(),
        "values": d.values.tolist(),
        "negative_mass": d.negative_mass,
    }


class LabInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_lab`, carrying what was finished before it.

    A ``KeyboardInterrupt`` still (a caller that does not know this class stops as before);
    ``results`` is what :func:`run_lab` returns, for the runs that finished, with
    ``results["interrupted"]`` = {"runs_done": k, "runs_planned": n}. A problem none of whose
    runs finished is left out, and the MLP's curvature section unless its analysis finished.
    """

    def __init__(self, results: dict[str, Any]) -> None:
        super().__init__()
        self.results = results


def run_lab(
    problem_names: Sequence[str] | None = None,
    optimizer_names: Sequence[str] | None = None,
    *,
    budget: Budget | None = None,
    on_run: Callable[[Run], None] | None = None,
) -> dict[str, Any]:
    """Run the lab and return its results (JSON-able).

    Args:
        problem_names: problems (default: :data:`DEFAULT_PROBLEMS`).
        optimizer_names: registry names (default: all).
        budget: steps and seconds per run (default :class:`Budget`; ``QUICK`` for smoke tests).
        on_run: called after each run (progress display).

    Runs on one intra-op thread (torch's setting put back after): its problems are small, on
    which more threads only wait for each other — and on a busy 2-core machine torch's default
    two took a product of the digits MLP from 0.73 ms to 152 ms, ending runs by the time budget
    (the quick lab took 161 s instead of 14; an outside review).

    Raises:
        LabInterrupted: on Ctrl-C, with the results of the runs finished before it.
    """
    with one_thread():
        return _run_lab(problem_names, optimizer_names, budget, on_run)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread inside the block, its setting put back after: for the
    built-in problems (the lab's, ``curvscope probe --problem``), small enough that more
    threads only wait for each other — on a busy 2-core machine two made a product of the
    digits MLP 200 times slower (:func:`run_lab`). Not for a user's model, whose products may
    be large enough for threads to pay (1.4x at 2 threads on 269,322 parameters: README)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run_lab(
    problem_names: Sequence[str] | None,
    optimizer_names: Sequence[str] | None,
    budget: Budget | None,
    on_run: Callable[[Run], None] | None,
) -> dict[str, Any]:
    budget = budget or Budget()
    pnames, onames = selection(problem_names, optimizer_names)
    start = time.perf_counter()
    runs: list[Run] = []
    prob_info: list[dict[str, Any]] = []
    mlp: dict[str, Any] = {}
    try:
        _run_problems(pnames, onames, budget, on_run, runs, prob_info, mlp)
    except KeyboardInterrupt:
        done = {r.problem for r in runs}
        prob_info = [p for p in prob_info if p["name"] in done]
        partial = _results(onames, budget, runs, prob_info, mlp if "problem" in mlp else {}, start)
        partial["interrupted"] = {"runs_done": len(runs), "runs_planned": len(pnames) * len(onames)}
        raise LabInterrupted(partial) from None
    return _results(onames, budget, runs, prob_info, mlp, start)


def _run_problems(
    pnames: list[str],
    onames: list[str],
    budget: Budget,
    on_run: Callable[[Run], None] | None,
    runs: list[Run],
    prob_info: list[dict[str, Any]],
    mlp: dict[str, Any],
) -> None:
    """Every optimizer on every problem, filling ``runs``, ``prob_info`` and ``mlp`` as it goes
    (so that what finished before a Ctrl-C is kept)."""
    for pname in pnames:
        setup, prob = make_setup(pname)
        lam0, scale0 = curvature_at_start(setup, prob)
        lr_gd = GD_LR_FACTOR / scale0
        prob_info.append(
            {
                "name": pname,
                "description": prob.description,
                "well_behaved": prob.well_behaved,
                "n": setup.n,
                "lambda_max0": lam0,
                "gd_lr": lr_gd,
                "args": PROBLEM_ARGS.get(pname, {}),
            }
        )
        is_mlp = setup.model is not None and not prob.well_behaved
        if is_mlp:
            mlp["density_start"] = _density_record(setup, budget)
        kept: dict[str, tuple[Setup, Any]] = {}
        for oname in onames:
            steps = budget.model_steps
            every = (
                max(steps // MLP_PROBES, 1) if is_mlp and oname in ("gd", "momentum", "adam") else 0
            )
            run, s, opt = run_one(pname, oname, budget, probe_every=every, lr_gd=lr_gd)
            runs.append(run)
            if is_mlp and opt is not None and run.outcome != "diverged":
                kept[oname] = (s, opt)
            if on_run is not None:
                on_run(run)
        if is_mlp and kept:
            end = kept.get("adam") or next(iter(kept.values()))
            mlp["density_end"] = _density_record(end[0], budget)
            mlp["density_end_optimizer"] = "adam" if "adam" in kept else next(iter(kept))
            mlp.update(_curvature_learned(kept, budget))
            mlp["problem"] = pname  # last: the section is whole


def _results(
    onames: list[str],
    budget: Budget,
    runs: list[Run],
    prob_info: list[dict[str, Any]],
    mlp: dict[str, Any],
    start: float,
) -> dict[str, Any]:
    """What :func:`run_lab` returns (JSON-able)."""
    return {
        "version": RESULTS_VERSION,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "budget": asdict(budget),
        "rules": {
            "learning_rates": LEARNING_RATES,
            "gd_lr": (
                f"{GD_LR_FACTOR} / lambda_max(theta_0); where it is <= 0, "
                f"{GD_LR_FACTOR} / max|lambda(theta_0)|"
            ),
            "grad_tol": GRAD_TOL,
            "blowup": BLOWUP,
            "profile_tol": PROFILE_TOL,
        },
        "problems": prob_info,
        "optimizers": [
            {
                "name": n,
                "description": optim.get(n).description,
                "order": optim.get(n).order,
                "source": optim.get(n).source,
            }
            for n in onames
        ],
        "runs": [asdict(r) for r in runs],
        "profile": {
            "cost": performance_profile(runs, "cost"),
            "time": performance_profile(runs, "time"),
        },
        "mlp": mlp,
        "seconds": time.perf_counter() - start,
        "interrupted": None,
    }
