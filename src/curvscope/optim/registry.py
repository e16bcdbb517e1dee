"""Every optimizer the lab, the command line and the contract tests know, by name — torch's
first-order ones included, used as torch ships them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from curvscope.optim.diagonal import AdaHessian, Sophia
from curvscope.optim.first_order import NormalizedGD
from curvscope.optim.hessian_free import HessianFree
from curvscope.optim.krylov import CubicNewton, SaddleFreeNewton
from curvscope.optim.newton import Newton, NewtonCG


@dataclass(frozen=True)
class OptimizerInfo:
    """A registered optimizer.

    Attributes:
        name: registry name (the lab's and CLI's spelling).
        cls: the ``torch.optim.Optimizer`` subclass.
        defaults: keyword arguments this entry adds to the class's own (e.g. momentum=0.9).
        order: 1 (uses gradients only) or 2 (uses curvature).
        source: "curvscope" or "torch".
        description: one line.
        lr: whether the entry takes a learning rate (the lab sets it per problem).
        dense: forms the dense Hessian (n ≤ 5,000).
        stochastic: draws random probes (seeded).
        exact: converges to a stationary point to machine precision on smooth problems.
        closure_returns_outputs: can use a closure returning (loss, outputs).
        reads_grad: steps from ``p.grad`` like torch's own optimizers (the closure, if any,
            must call ``backward()``); False: differentiates the closure's loss itself.
    """

    name: str
    cls: type[Optimizer]
    order: int
    source: str
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    lr: bool = False
    dense: bool = False
    stochastic: bool = False
    exact: bool = False
    closure_returns_outputs: bool = False
    reads_grad: bool = False

    def build(self, params: Any, **kwargs: Any) -> Optimizer:
        """The optimizer on ``params``, with this entry's defaults under ``kwargs``."""
        return self.cls(params, **{**self.defaults, **kwargs})


_ENTRIES = [
    OptimizerInfo("gd", torch.optim.SGD, 1, "torch", "gradient descent", lr=True, reads_grad=True),
    OptimizerInfo(
        "momentum",
        torch.optim.SGD,
        1,
        "torch",
        "heavy-ball momentum (β = 0.9)",
        {"momentum": 0.9},
        lr=True,
        reads_grad=True,
    ),
    OptimizerInfo("adam", torch.optim.Adam, 1, "torch", "Adam", lr=True, reads_grad=True),
    OptimizerInfo(
        "lbfgs",
        torch.optim.LBFGS,
        1,
        "torch",
        "torch's L-BFGS with strong-Wolfe line search (one step = up to 20 iterations)",
        {"line_search_fn": "strong_wolfe", "max_iter": 20},
        reads_grad=True,
    ),
    OptimizerInfo(
        "normalized-gd",
        NormalizedGD,
        1,
        "curvscope",
        "steps of fixed length along −g/‖g‖",
        lr=True,
        reads_grad=True,
    ),
    OptimizerInfo(
        "newton",
        Newton,
        2,
        "curvscope",
        "Newton with the dense Hessian, Levenberg-Marquardt safeguarded",
        dense=True,
        exact=True,
    ),
    OptimizerInfo(
        "pure-newton",
        Newton,
        2,
        "curvscope",
        "pure Newton (damping=0): no safeguard, for demonstrations",
        {"damping": 0.0},
        dense=True,
        exact=True,
    ),
    OptimizerInfo(
        "newton-cg",
        NewtonCG,
        2,
        "curvscope",
        "trust-region Newton-CG (Steihaug), matrix-free",
        exact=True,
    ),
    OptimizerInfo(
        "hessian-free",
        HessianFree,
        2,
        "curvscope",
        "Martens' Hessian-free: damped Gauss-Newton by CG",
        exact=True,
        closure_returns_outputs=True,
    ),
    OptimizerInfo(
        "saddle-free-newton",
        SaddleFreeNewton,
        2,
        "curvscope",
        "saddle-free Newton: |H| in a Lanczos subspace",
        exact=True,
    ),
    OptimizerInfo(
        "cubic-newton",
        CubicNewton,
        2,
        "curvscope",
        "cubic-regularized Newton (adaptive σ) in a Lanczos subspace",
        exact=True,
    ),
    OptimizerInfo(
        "adahessian",
        AdaHessian,
        2,
        "curvscope",
        "AdaHessian: Adam with a Hutchinson Hessian diagonal",
        lr=True,
        stochastic=True,
    ),
    OptimizerInfo(
        "sophia",
        Sophia,
        2,
        "curvscope",
        "Sophia: clipped momentum preconditioned by a diagonal estimate",
        lr=True,
        stochastic=True,
    ),
]

#: name -> :class:`OptimizerInfo`
REGISTRY: dict[str, OptimizerInfo] = {e.name: e for e in _ENTRIES}


def names(source: str | None = None) -> list[str]:
    """Registered names, optionally only those from ``source`` ("curvscope" or "torch")."""
    sources = sorted({e.source for e in REGISTRY.values()})
    if source is not None and source not in sources:  # ([] before: an outside review)
        raise ValueError(f"unknown source {source!r}; valid sources: {', '.join(sources)}")
    return [n for n, e in REGISTRY.items() if source is None or e.source == source]


def get(name: str) -> OptimizerInfo:
    """The entry for ``name``; an unknown name gets the list of valid ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def build(name: str, params: Any, **kwargs: Any) -> Optimizer:
    """``get(name).build(params, **kwargs)``."""
    return get(name).build(params, **kwargs)
