"""Moved to :mod:`curvscope.derivatives.checks` (public); this name is kept until the last
importers switch."""

from curvscope.derivatives.checks import (
    DENSE_LIMIT,
    check_dense_size,
    check_finite,
    check_int,
    check_point,
    check_scalar_loss,
    check_seed,
    check_vector,
)

__all__ = [
    "DENSE_LIMIT",
    "check_dense_size",
    "check_finite",
    "check_int",
    "check_point",
    "check_scalar_loss",
    "check_seed",
    "check_vector",
]
