"""Run optimizers side by side on problems with known answers and record what happened.

Every run gets the same stated budget (steps and seconds). The outcome is read from the
problem, not from the optimizer's own word: *diverged* (a non-finite loss, or one that grew
by more than ``BLOWUP``; with the step it happened and the peak loss), *minimum* / *saddle* /
*maximum* (‖g‖ small; the type from the extreme eigenvalues), or *stalled* (budget spent).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvscope import optim, problems
from curvscope.derivatives import Curvature
from curvscope.diagnosis import diagnose, stability_limit
from curvscope.spectrum import eigenvalues

#: The built-in problems: well-behaved first, then badly-behaved.
DEFAULT_PROBLEMS = (
    "quadratic",
    "breast-cancer-logreg",
    "least-squares",
    "rosenbrock",
    "saddle",
    "sqrt1px2",
    "digits-mlp",
)
#: Learning rates of the methods that take one; the others (gd, momentum) get η from the
#: curvature at the start (GD_LR_FACTOR / λ_max).
LEARNING_RATES = {"adam": 0.01, "normalized-gd": 0.05, "adahessian": 0.1, "sophia": 0.01}
#: Gradient descent and momentum get η = GD_LR_FACTOR / λ_max(θ₀): half the stability limit.
GD_LR_FACTOR = 1.0
#: A run has converged when ‖g‖ ≤ GRAD_TOL · max(1, |f|).
GRAD_TOL = 1e-6
#: A run has diverged when the loss exceeds BLOWUP · (|f₀| + 1) or is not finite.
BLOWUP = 1e6
#: The dense Newton methods are skipped above this many parameters.
DENSE_LAB_LIMIT = 600
#: Problem settings: a small quadratic with κ = 10⁴ and a modest MLP keep the lab fast.
PROBLEM_ARGS: dict[str, dict[str, Any]] = {
    "quadratic": {"n": 50, "condition": 1e4},
    "digits-mlp": {"hidden": 16, "n": 500},
}


@dataclass(frozen=True)
class Budget:
    """Steps and wall seconds per run, for plain functions and for models."""

    function_steps: int = 200
    model_steps: int = 150
    seconds: float = 3.0
    #: Lanczos steps per probe of the MLP's spectral density, and Hutchinson probes for its
    #: Hessian diagonal (against Adam's √v̂).
    density_steps: int = 40
    diagonal_probes: int = 200


QUICK = Budget(function_steps=40, model_steps=20, seconds=0.4, density_steps=15, diagonal_probes=50)


@dataclass
class Setup:
    """One fresh instance of a problem: parameters, closures, and how to measure it."""

    name: str
    params: list[Tensor]
    closure: Callable[[], Any]  # loss, or (loss, outputs)
    model: nn.Module | None = None
    loss_fn: Any = None
    data: Any = None

    def loss(self) -> float:
        with torch.no_grad():
            out = self.closure()
        return float((out[0] if isinstance(out, tuple) else out).detach())

    def loss_tensor(self) -> Tensor:
        out = self.closure()
        return out[0] if isinstance(out, tuple) else out

    def grad_norm(self) -> float:
        with torch.enable_grad():
            g = torch.autograd.grad(self.loss_tensor(), self.params, allow_unused=True)
        return float(torch.cat([t.reshape(-1) for t in g if t is not None]).norm())

    def point(self) -> list[float]:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).tolist()

    @property
    def n(self) -> int:
        return sum(p.numel() for p in self.params)


@functools.cache
def _problem(name: str) -> problems.Problem:
    """Each problem built once per process (its data loaded once); every run makes a fresh
    model or start point from it, so runs share nothing mutable."""
    return problems.get(name, **PROBLEM_ARGS.get(name, {}))


def make_setup(name: str) -> tuple[Setup, problems.Problem]:
    p = _problem(name)
    if isinstance(p, problems.FunctionProblem):
        x = p.x0.clone().requires_grad_()
        return Setup(name, [x], lambda: p.f(x)), p
    model = p.make_model(0)
    X, y = p.data

    def closure() -> tuple[Tensor, Tensor]:
        out = model(X)
        return p.loss_fn(out, y), out

    return Setup(name, list(model.parameters()), closure, model, p.loss_fn, p.data), p


def lambda_max_at_start(setup: Setup, prob: problems.Problem) -> float:
    """λ_max(H(θ₀)): exact from the closed form for functions, Lanczos for models."""
    if isinstance(prob, problems.FunctionProblem):
        return float(torch.linalg.eigvalsh(prob.hess(prob.x0)).max())
    C = Curvature(setup.model, setup.loss_fn, setup.data)
    return float(eigenvalues(C, k=1, tol=1e-3).values[0])


@dataclass
class Run:
    """One optimizer on one problem."""

    problem: str
    optimizer: str
    outcome: str
    steps: int
    losses: list[float]
    cost: list[int]  # gradients + curvature products after each step
    seconds: list[float]
    final_loss: float
    final_grad_norm: float
    gradients: int
    products: int
    evaluations: int
    wall: float
    hyperparameters: dict[str, Any]
    lambda_min: float | None = None
    lambda_max: float | None = None
    diverged_at: int | None = None
    peak_loss: float | None = None
    path: list[list[float]] = field(default_factory=list)
    diagnosis: dict[str, Any] | None = None
    probes: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""


def diagnosis_record(setup: Setup, opt: Any) -> dict[str, Any]:
    """The diagnosis of a model setup as plain data; optimizer-aware where the diagnosis knows
    the optimizer (torch's SGD, Adam, ...), curvature-only otherwise."""
    try:
        stability_limit(opt)
    except TypeError:  # an optimizer the stability limits do not cover: curvature only
        opt = None
    d = diagnose(setup.model, setup.loss_fn, setup.data, optimizer=opt)
    ev = {k: v for k, v in d.evidence.items() if isinstance(v, int | float | str | type(None))}
    return {"state": d.state, "text": str(d), "evidence": ev, "advice": list(d.advice)}


def run_one(
    problem: str,
    optimizer: str,
    budget: Budget,
    *,
    probe_every: int = 0,
    lr_gd: float | None = None,
) -> tuple[Run, Setup, Any]:
    """Run ``optimizer`` on ``problem`` within ``budget``; with ``probe_every`` > 0 (models),
    diagnose the training state every that many steps."""
    setup, _ = make_setup(problem)
    info = optim.get(optimizer)
    kwargs: dict[str, Any] = dict(info.defaults)
    if info.lr:
        kwargs["lr"] = LEARNING_RATES.get(optimizer, lr_gd)  # gd, momentum: from the curvature
    is_model = setup.model is not None
    steps = budget.model_steps if is_model else budget.function_steps
    f0 = setup.loss()
    if info.dense and setup.n > DENSE_LAB_LIMIT:
        note = f"skipped: the dense Hessian of {setup.n} parameters is too costly here"
        nan = math.nan
        skipped = Run(
            problem, optimizer, "skipped", 0, [f0], [0], [0.0], f0, nan, 0, 0, 0, 0.0, kwargs
        )
        skipped.note = note
        return skipped, setup, None
    opt = info.build(setup.params, **{k: v for k, v in kwargs.items() if k not in info.defaults})
    calls = {"n": 0}

    def with_backward() -> Tensor:
        opt.zero_grad()
        loss = setup.loss_tensor()
        loss.backward()
        calls["n"] += 1
        return loss

    losses, cost, secs = [f0], [0], [0.0]
    path = [setup.point()] if setup.n <= 2 else []
    probes: list[dict[str, Any]] = []
    outcome, diverged_at, peak = "stalled", None, f0
    wall = 0.0  # the optimizer's own time: the lab's measurements below are not charged to it
    k = 0
    for k in range(1, steps + 1):
        start = time.perf_counter()
        if info.reads_grad:
            opt.step(with_backward)
        else:
            opt.step(setup.closure)
        wall += time.perf_counter() - start
        f = setup.loss()
        losses.append(f)
        secs.append(wall)
        if info.reads_grad:
            cost.append(calls["n"])
        else:
            c = opt.counts  # type: ignore[attr-defined]
            cost.append(c.gradients + c.products)
        if setup.n <= 2:
            path.append(setup.point())
        if math.isfinite(f):
            peak = max(peak, f)
        if not math.isfinite(f) or f > BLOWUP * (abs(f0) + 1):
            outcome, diverged_at = "diverged", k
            break
        if probe_every and is_model and k % probe_every == 0:
            probes.append({"step": k, **diagnosis_record(setup, opt)})
        if setup.grad_norm() <= GRAD_TOL * max(1.0, abs(f)):
            outcome = "converged"
            break
        if wall > budget.seconds:
            break
    counts = None if info.reads_grad else opt.counts  # type: ignore[attr-defined]
    finite = all(torch.isfinite(p).all() for p in setup.params)
    run = Run(
        problem,
        optimizer,
        outcome,
        k,
        losses,
        cost,
        secs,
        losses[-1],
        setup.grad_norm() if finite else math.nan,
        calls["n"] if counts is None else counts.gradients,
        0 if counts is None else counts.products,
        calls["n"] if counts is None else counts.closure_calls,
        wall,
        kwargs,
        diverged_at=diverged_at,
        peak_loss=peak if outcome == "diverged" else None,
        path=path,
        probes=probes,
    )
    if outcome != "diverged" and finite:
        point = optim.stationary_point(setup.loss_tensor, setup.params, grad_tol=1e-4)
        run.lambda_min, run.lambda_max = point.lambda_min, point.lambda_max
        if outcome == "converged":
            run.outcome = point.kind if point.kind != "not stationary" else "converged"
    if is_model and finite and outcome != "diverged":
        run.diagnosis = diagnosis_record(setup, opt)
    return run, setup, opt
