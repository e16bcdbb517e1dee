"""Direction and shape: gradients, curvature-vector products, dense Hessians for small n, and
the :class:`Curvature` operator of a model's mean loss."""

from curvscope.derivatives.checks import DENSE_LIMIT
from curvscope.derivatives.curvature import BACKENDS, KINDS, Curvature, KindInfo
from curvscope.derivatives.functions import grad, hessian, hvp
from curvscope.derivatives.objective import AttributeWriteWarning, ParameterWriteWarning
from curvscope.derivatives.sharded import ShardedCurvature

__all__ = [
    "BACKENDS",
    "DENSE_LIMIT",
    "KINDS",
    "AttributeWriteWarning",
    "Curvature",
    "KindInfo",
    "ParameterWriteWarning",
    "ShardedCurvature",
    "grad",
    "hessian",
    "hvp",
]
