"""Problems with known answers: test functions with exact derivatives, and small real datasets
that ship with scikit-learn.

>>> import curvscope as cs
>>> p = cs.problems.get("rosenbrock")
>>> float(p.f(p.minima[0]))
0.0
>>> sorted(cs.problems.names())[:3]
['beale', 'breast-cancer-logreg', 'brown-badly-scaled']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from curvscope.problems.data import (
    ModelProblem,
    digits_mlp,
    least_squares,
    load_breast_cancer,
    load_diabetes,
    load_digits,
    logistic_regression,
)
from curvscope.problems.functions import (
    FunctionProblem,
    beale,
    himmelblau,
    quadratic,
    rosenbrock,
    saddle,
    sqrt_one_plus_square,
)
from curvscope.problems.mgh import (
    brown_badly_scaled,
    extended_rosenbrock,
    freudenstein_roth,
    helical_valley,
    powell_singular,
    wood,
)

Problem = FunctionProblem | ModelProblem

#: name -> factory; keyword arguments of :func:`get` go to the factory.
REGISTRY: dict[str, Callable[..., Problem]] = {
    "rosenbrock": rosenbrock,
    "quadratic": quadratic,
    "beale": beale,
    "himmelblau": himmelblau,
    "saddle": saddle,
    "sqrt1px2": sqrt_one_plus_square,
    "freudenstein-roth": freudenstein_roth,
    "brown-badly-scaled": brown_badly_scaled,
    "helical-valley": helical_valley,
    "powell-singular": powell_singular,
    "wood": wood,
    "extended-rosenbrock": extended_rosenbrock,
    "breast-cancer-logreg": logistic_regression,
    "least-squares": least_squares,
    "digits-mlp": digits_mlp,
}


def names() -> list[str]:
    """The registered problem names."""
    return list(REGISTRY)


def get(name: str, **kwargs: Any) -> Problem:
    """Build a problem by name; keyword arguments go to its factory (e.g. ``n=10``)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown problem {name!r}; valid names: {', '.join(REGISTRY)}")
    return REGISTRY[name](**kwargs)


__all__ = [
    "REGISTRY",
    "FunctionProblem",
    "ModelProblem",
    "Problem",
    "beale",
    "brown_badly_scaled",
    "digits_mlp",
    "extended_rosenbrock",
    "freudenstein_roth",
    "get",
    "helical_valley",
    "himmelblau",
    "least_squares",
    "load_breast_cancer",
    "load_diabetes",
    "load_digits",
    "logistic_regression",
    "names",
    "powell_singular",
    "quadratic",
    "rosenbrock",
    "saddle",
    "sqrt_one_plus_square",
    "wood",
]
