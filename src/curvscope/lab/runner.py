"""Run optimizers side by side on problems with known answers and record what happened.

Every run gets the same stated budget (steps and seconds). The outcome is read from the
problem, not from the optimizer's own word: *diverged* (a non-finite loss, or one that grew
by more than ``BLOWUP``; with the step it happened and the peak loss), *minimum* / *saddle* /
*maximum* (‖g‖ small; the type from the extreme eigenvalues), or *stalled* (budget spent).
"""

from __future__ import annotations

import dataclasses
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
from curvscope.derivatives.flat import flatten
from curvscope.diagnosis import Diagnosis, diagnose, stability_limit
from curvscope.diagnosis.classify import NOT_JUDGED
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
        return float(flatten([t for t in g if t is not None]).norm())

    def point(self) -> list[float]:
        return flatten([p.detach() for p in self.params]).tolist()

    @property
    def n(self) -> int:
        return sum(p.numel() for p in self.params)

    def require_model(self) -> nn.Module:
        """The model of a model problem (a TypeError for a plain function)."""
        if self.model is None:
            raise TypeError(
                f"{self.name} is a plain function, not a model: it has no curvature operator"
            )
        return self.model

    def curvature(self) -> Curvature:
        """The Hessian operator of a model problem's loss over its data."""
        return Curvature(self.require_model(), self.loss_fn, self.data)


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
    return curvature_at_start(setup, prob)[0]


def curvature_at_start(setup: Setup, prob: problems.Problem) -> tuple[float, float]:
    """(λ_max(H(θ₀)), the curvature's scale there, which sizes gradient descent's step):
    the scale is λ_max, or where no direction curves up the largest |λ| (Himmelblau starts
    where both eigenvalues are negative, −42 and −26: η = 1/λ_max was negative, and the lab
    raised torch's "Invalid learning rate", losing the runs before it: an outside review).
    Exact from the closed form for functions, Lanczos for models."""
    if isinstance(prob, problems.FunctionProblem):
        lam = torch.linalg.eigvalsh(prob.hess(prob.x0))
        top, largest = float(lam.max()), float(lam.abs().max())
    else:
        C = setup.curvature()
        top = float(eigenvalues(C, k=1, tol=1e-3).values[0])
        largest = top if top > 0 else float(eigenvalues(C, k=1, which="both").values.abs().max())
    scale = top if top > 0 else largest
    if not scale > 0:
        raise ValueError(
            f"{prob.name}: the Hessian at the start is 0, so gradient descent's step cannot be "
            "sized by its curvature"
        )
    return top, scale


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
    the optimizer (torch's SGD, Adam, ...), curvature-only otherwise — and then it says why
    stability was not judged: the diagnosis' own sentence asks for an optimizer or a learning
    rate ("pass optimizer= or lr=; --optimizer or --lr on the command line"), which the lab
    passed and ``curvscope lab`` has no flag for (normalized GD's and Sophia's end-of-run
    diagnoses said it: an outside review)."""
    try:
        stability_limit(opt)
    except TypeError:  # an optimizer the stability limits do not cover: curvature only
        d = _no_limit_known(
            diagnose(setup.require_model(), setup.loss_fn, setup.data), type(opt).__name__
        )
    else:
        d = diagnose(setup.require_model(), setup.loss_fn, setup.data, optimizer=opt)
    ev = {k: v for k, v in d.evidence.items() if isinstance(v, int | float | str | type(None))}
    return {"state": d.state, "text": str(d), "evidence": ev, "advice": list(d.advice)}


def _no_limit_known(d: Diagnosis, optimizer: str) -> Diagnosis:
    """``d``, a diagnosis made without an optimizer, saying that stability was not judged
    because no stability limit is known for ``optimizer``, in place of its advice to pass one."""
    said = f"stability not judged: curvscope knows no stability limit for {optimizer}'s steps"

    def swap(sentences: list[str]) -> list[str]:
        return [said if s == NOT_JUDGED else s for s in sentences]

    return dataclasses.replace(d, reasons=swap(d.reasons), advice=swap(d.advice))


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
    f0 = setup.loss()
    if info.dense and setup.n > DENSE_LAB_LIMIT:
        skipped = Run(
            problem, optimizer, "skipped", 0, [f0], [0], [0.0], f0, math.nan, 0, 0, 0, 0.0, kwargs
        )
        skipped.note = f"the dense Hessian of {setup.n} parameters is too costly here"
        return skipped, setup, None
    opt = info.build(setup.params, **{k: v for k, v in kwargs.items() if k not in info.defaults})
    driver = _Driver(setup, opt, info.reads_grad)
    steps = budget.model_steps if setup.model is not None else budget.function_steps
    trace = _Trace([f0], [0], [0.0], [setup.point()] if setup.n <= 2 else [], peak=f0)
    for k in range(1, steps + 1):
        if _step(driver, trace, k, budget.seconds, probe_every):
            trace.out_of_time = trace.out_of_time and k < steps  # its steps were spent too
            break
    return _record(problem, optimizer, kwargs, driver, trace), setup, opt


class _Driver:
    """Steps an optimizer on a setup and counts what it costs. Optimizers that read ``.grad``
    (torch's) get a closure that calls ``backward()``, whose calls are counted here; the
    others differentiate the setup's closure themselves and keep their own counts."""

    def __init__(self, setup: Setup, opt: Any, reads_grad: bool) -> None:
        # Any: torch types a step's closure as returning a float; a loss tensor is what they take
        self.setup, self.opt, self.reads_grad = setup, opt, reads_grad
        self.calls = 0

    def _with_backward(self) -> Tensor:
        self.opt.zero_grad()
        loss = self.setup.loss_tensor()
        loss.backward()
        self.calls += 1
        return loss

    def step(self) -> None:
        self.opt.step(self._with_backward if self.reads_grad else self.setup.closure)

    def counts(self) -> tuple[int, int, int]:
        """(gradients, curvature products, closure evaluations) so far."""
        if self.reads_grad:
            return self.calls, 0, self.calls
        c = self.opt.counts
        return c.gradients, c.products, c.closure_calls


@dataclass
class _Trace:
    """What a run records step by step, and how it ended."""

    losses: list[float]
    cost: list[int]  # gradients + curvature products after each step
    seconds: list[float]
    path: list[list[float]]
    probes: list[dict[str, Any]] = field(default_factory=list)
    outcome: str = "stalled"
    diverged_at: int | None = None
    peak: float = -math.inf
    wall: float = 0.0  # the optimizer's own time: the lab's measurements are not charged to it
    steps: int = 0
    out_of_time: bool = False  # stopped by the budget's seconds, before its steps


def _step(driver: _Driver, trace: _Trace, k: int, seconds: float, probe_every: int) -> bool:
    """Take step ``k`` and record it; True when the run is over (diverged, converged, or out
    of time)."""
    setup = driver.setup
    start = time.perf_counter()
    driver.step()
    trace.wall += time.perf_counter() - start
    trace.steps = k
    f = setup.loss()
    trace.losses.append(f)
    trace.seconds.append(trace.wall)
    gradients, products, _ = driver.counts()
    trace.cost.append(gradients + products)
    if setup.n <= 2:
        trace.path.append(setup.point())
    if math.isfinite(f):
        trace.peak = max(trace.peak, f)
    f0 = trace.losses[0]
    if not math.isfinite(f) or f > BLOWUP * (abs(f0) + 1):
        trace.outcome, trace.diverged_at = "diverged", k
        return True
    if probe_every and setup.model is not None and k % probe_every == 0:
        trace.probes.append({"step": k, **diagnosis_record(setup, driver.opt)})
    if setup.grad_norm() <= GRAD_TOL * max(1.0, abs(f)):
        trace.outcome = "converged"
        return True
    trace.out_of_time = trace.wall > seconds
    return trace.out_of_time


def _record(
    problem: str, optimizer: str, kwargs: dict[str, Any], driver: _Driver, trace: _Trace
) -> Run:
    """The run's record, with the type of the point it stopped at and its diagnosis."""
    setup, outcome = driver.setup, trace.outcome
    finite = all(torch.isfinite(p).all() for p in setup.params)
    gradients, products, evaluations = driver.counts()
    run = Run(
        problem,
        optimizer,
        outcome,
        trace.steps,
        trace.losses,
        trace.cost,
        trace.seconds,
        trace.losses[-1],
        setup.grad_norm() if finite else math.nan,
        gradients,
        products,
        evaluations,
        trace.wall,
        kwargs,
        diverged_at=trace.diverged_at,
        peak_loss=trace.peak if outcome == "diverged" else None,
        path=trace.path,
        probes=trace.probes,
    )
    if trace.out_of_time and outcome == "stalled":  # said: a busy machine ends runs sooner
        run.note = (
            f"stopped by the time budget after {trace.steps} steps ({trace.wall:.2g} s), before "
            "its step budget: a slower or busier machine ends such a run sooner"
        )
    if outcome != "diverged" and finite:
        point = optim.stationary_point(setup.loss_tensor, setup.params, grad_tol=1e-4)
        run.lambda_min, run.lambda_max = point.lambda_min, point.lambda_max
        if outcome == "converged":
            run.outcome = point.kind if point.kind != "not stationary" else "converged"
        if setup.model is not None:
            run.diagnosis = diagnosis_record(setup, driver.opt)
    return run
