"""What the curvature looks like: extreme eigenvalues, trace, spectral density, diagonal.

Every estimator is a plain function ``(operator, budget) -> result``; the operator is a
:class:`~curvscope.Curvature`, a square tensor, or anything with ``matmat`` and ``num_params``.
Every result reports its cost (``matvecs``, ``seconds``) and how good it is (residuals, standard
errors, converged flags). Randomized estimators take ``seed=`` (a fixed default, so results are
reproducible) and never touch the global RNG.
"""

from curvscope.spectrum._operator import Operator, as_operator
from curvscope.spectrum.cg import CGResult, cg
from curvscope.spectrum.density import DensityResult, density
from curvscope.spectrum.eigen import DEFAULT_TOL, EigenResult, LayerSpectrum, eigenvalues
from curvscope.spectrum.trace import (
    DiagonalResult,
    TraceResult,
    diagonal,
    trace,
    trace_of_square,
)

__all__ = [
    "DEFAULT_TOL",
    "CGResult",
    "DensityResult",
    "DiagonalResult",
    "EigenResult",
    "LayerSpectrum",
    "Operator",
    "TraceResult",
    "as_operator",
    "cg",
    "density",
    "diagonal",
    "eigenvalues",
    "trace",
    "trace_of_square",
]
