"""Optimizers from first to second order on the ``torch.optim.Optimizer`` contract.

Each is driven by a closure that re-evaluates the loss (``opt.step(closure)``); the
optimizer differentiates it itself, so the user's loop never calls
``backward(create_graph=True)``. Each keeps :class:`Counts` of its work in ``opt.counts``
(also in ``state_dict()``) and a :class:`StepInfo` of its last step in ``opt.info``. Each step is
a transaction: if anything raises inside it, the parameters, the state and the counts are put
back as they were at its start before the exception propagates.

The second-order methods are each a *descent* (:mod:`curvscope.optim.descents`) paired with a
*search* (:mod:`curvscope.optim.searches`) on :class:`ModelStepOptimizer`, which runs the step.

>>> import torch, curvscope as cs
>>> x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
>>> opt = cs.optim.NewtonCG([x])
>>> for _ in range(30):
...     loss = opt.step(lambda: cs.problems.get("rosenbrock").f(x))
>>> cs.optim.stationary_point(lambda: cs.problems.get("rosenbrock").f(x), [x]).kind
'minimum'
"""

from curvscope.optim import descents, searches
from curvscope.optim._closure import ClosureGradIgnoredWarning, ClosureWroteWarning, Counts
from curvscope.optim.base import CurvscopeOptimizer, StepInfo
from curvscope.optim.diagonal import (
    AdaHessian,
    DiagonalEstimator,
    GaussNewtonBartlett,
    Hutchinson,
    Sophia,
)
from curvscope.optim.first_order import NormalizedGD
from curvscope.optim.hessian_free import HessianFree
from curvscope.optim.krylov import CubicNewton, SaddleFreeNewton
from curvscope.optim.model_step import ModelStepOptimizer
from curvscope.optim.newton import Newton, NewtonCG
from curvscope.optim.registry import REGISTRY, OptimizerInfo, build, get, names
from curvscope.optim.stationary import PointType, stationary_point

__all__ = [
    "REGISTRY",
    "AdaHessian",
    "ClosureGradIgnoredWarning",
    "ClosureWroteWarning",
    "Counts",
    "CubicNewton",
    "CurvscopeOptimizer",
    "DiagonalEstimator",
    "GaussNewtonBartlett",
    "HessianFree",
    "Hutchinson",
    "ModelStepOptimizer",
    "Newton",
    "NewtonCG",
    "NormalizedGD",
    "OptimizerInfo",
    "PointType",
    "SaddleFreeNewton",
    "Sophia",
    "StepInfo",
    "build",
    "descents",
    "get",
    "names",
    "searches",
    "stationary_point",
]
