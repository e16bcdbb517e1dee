"""Small real datasets that ship inside scikit-learn (nothing is downloaded), and model problems
built on them: logistic regression on breast cancer, a small MLP on digits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvscope.derivatives.rng import kept_rngs


def _datasets() -> Any:
    """``sklearn.datasets``, imported with the global RNGs (torch's, numpy's, Python's) as
    found: its first import draws from Python's ``random``, so a script's stream depended on
    whether a problem had been loaded before (an outside review)."""
    with kept_rngs([torch.random.default_generator]):
        import sklearn.datasets
    return sklearn.datasets


def _standardise(x: Tensor) -> Tensor:
    std = x.std(dim=0, keepdim=True)
    return (x - x.mean(dim=0, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))


def load_breast_cancer(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Wisconsin breast cancer (569 samples, 30 features, standardised); targets 0/1 as float
    of shape (569, 1), for ``nn.BCEWithLogitsLoss``."""
    d = _datasets().load_breast_cancer()
    x = _standardise(torch.as_tensor(d.data, dtype=dtype))
    y = torch.as_tensor(d.target, dtype=dtype).reshape(-1, 1)
    return x, y


def load_diabetes(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Diabetes progression (442 samples, 10 features, standardised); targets standardised,
    shape (442, 1), for ``nn.MSELoss``."""
    d = _datasets().load_diabetes()
    x = _standardise(torch.as_tensor(d.data, dtype=dtype))
    y = _standardise(torch.as_tensor(d.target, dtype=dtype).reshape(-1, 1))
    return x, y


def load_digits(
    n: int | None = None, dtype: torch.dtype = torch.float64, one_hot: bool = False
) -> tuple[Tensor, Tensor]:
    """8x8 handwritten digits (1,797 samples, 64 features scaled to [0, 1]).

    Args:
        n: keep the first n samples (all by default).
        one_hot: targets as one-hot floats (for ``nn.MSELoss``) instead of class indices.
    """
    d = _datasets().load_digits()
    x = torch.as_tensor(d.data, dtype=dtype) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.long)
    if n is not None:
        if not 1 <= n <= len(x):
            raise ValueError(f"n must be between 1 and {len(x)}, got {n}")
        x, y = x[:n], y[:n]
    if one_hot:
        return x, nn.functional.one_hot(y, 10).to(dtype)
    return x, y


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module under a fixed seed without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@dataclass(frozen=True)
class ModelProblem:
    """A model, a loss and a full batch of real data: ``make_model(seed)`` builds a fresh model.

    Attributes:
        name: registry name.
        make_model: seed -> a freshly initialised ``nn.Module`` (in the data's dtype).
        loss_fn: the batch-mean loss.
        data: the (inputs, targets) full batch.
        description: one sentence on what the problem shows.
        well_behaved: True for convex problems.
    """

    name: str
    make_model: Callable[[int], nn.Module]
    loss_fn: nn.Module
    data: tuple[Tensor, Tensor]
    description: str
    well_behaved: bool

    @property
    def num_samples(self) -> int:
        return len(self.data[1])


def _linear(
    name: str, data: tuple[Tensor, Tensor], loss_fn: nn.Module, description: str
) -> ModelProblem:
    """A linear model (one output) on ``data``: a convex problem."""
    X, _ = data

    def make(seed: int = 0) -> nn.Module:
        return _seeded(seed, lambda: nn.Linear(X.shape[1], 1).to(X.dtype))

    return ModelProblem(name, make, loss_fn, data, description, well_behaved=True)


def logistic_regression(dtype: torch.dtype = torch.float64) -> ModelProblem:
    """Logistic regression on breast cancer: convex, smooth, ill-conditioned (31 parameters).

    The standardised data are linearly separable (a linear program finds a separating
    hyperplane), so the loss has no minimizer: its infimum 0 is approached as ‖w‖ grows, and
    every method ends where the gradient and the curvature vanish together (the lab reads that
    *degenerate*). For a unique minimum add an L2 term, as ``benchmarks/optim.py`` does
    (1e-3·‖w‖²/2: Newton-CG in 9 steps, as scipy's trust-ncg)."""
    return _linear(
        "breast-cancer-logreg",
        load_breast_cancer(dtype),
        nn.BCEWithLogitsLoss(),
        "logistic regression on the breast-cancer data: convex and smooth, and separable (no "
        "minimizer: the loss falls toward 0 as the weights grow), where Newton-type methods "
        "get within 1e-6 of it in a handful of steps and first-order ones crawl",
    )


def least_squares(dtype: torch.dtype = torch.float64) -> ModelProblem:
    """Linear least squares on the diabetes data: a convex quadratic in 11 parameters, whose
    Hessian is the (ill-conditioned) feature covariance — Newton solves it in one step."""
    return _linear(
        "least-squares",
        load_diabetes(dtype),
        nn.MSELoss(),
        "linear least squares on the diabetes data: a convex quadratic with correlated features",
    )


def digits_mlp(
    hidden: int = 32,
    n: int | None = 500,
    dtype: torch.dtype = torch.float64,
    loss: str = "cross_entropy",
) -> ModelProblem:
    """A 64-hidden-10 tanh MLP on digits: non-convex, with negative curvature at the start.

    Args:
        hidden: width of the hidden layer.
        n: number of samples (the first n; all 1,797 with None).
        loss: ``"cross_entropy"`` or ``"mse"`` (one-hot targets, the edge-of-stability setting).
    """
    if loss not in ("cross_entropy", "mse"):
        raise ValueError(f"loss must be 'cross_entropy' or 'mse', got {loss!r}")
    mse = loss == "mse"
    data = load_digits(n, dtype, one_hot=mse)

    def make(seed: int = 0) -> nn.Module:
        return _seeded(
            seed,
            lambda: nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)),
        ).to(dtype)

    return ModelProblem(
        "digits-mlp",
        make,
        nn.MSELoss() if mse else nn.CrossEntropyLoss(),
        data,
        f"a 64-{hidden}-10 tanh MLP on {len(data[0])} digits: non-convex, indefinite curvature",
        well_behaved=False,
    )
