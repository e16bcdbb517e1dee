"""The estimators' precision rules, shared with the diagnosis: the working dtype and autocast.

Products run in the operator's own dtype (a half or bfloat16 model's curvature is computed in
half or bfloat16), but every estimator's own arithmetic — orthogonalization, projected
eigenproblems, accumulations, probe statistics — runs in the *working dtype*, float32 at least
(:func:`working_dtype`), outside any enclosing ``torch.autocast`` region (:func:`autocast_off`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from curvscope.derivatives.curvature import autocast_state


def eigh(A: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a symmetric matrix, computed again in float64 where LAPACK's
    solver in a lower precision does not converge, and returned in ``A``'s dtype: a finite
    105×105 float32 Hessian with 97 eigenvalues near zero failed Newton's step with torch's
    bare ``LinAlgError``, and decomposes in float64 (an outside review's fuzzing)."""
    try:
        return torch.linalg.eigh(A)
    except torch.linalg.LinAlgError:
        if A.dtype == torch.float64 or not bool(torch.isfinite(A).all()):
            raise
        lam, V = torch.linalg.eigh(A.double())
        return lam.to(A.dtype), V.to(A.dtype)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an estimator computes in: float32 at least, float64 for a float64 operator.

    bfloat16 keeps 8 significant bits and float16 11: a Gram-Schmidt, a sum over probes or a
    projected eigenproblem in them loses what the products measured (and torch has no QR for
    them on the CPU).

    Example:
        >>> working_dtype(torch.bfloat16), working_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.promote_types(dtype, torch.float32)


@contextmanager
def autocast_off(device: torch.device) -> Iterator[None]:
    """Suspend an enclosing ``torch.autocast`` region: inside one, ``@`` would silently run the
    estimators' own arithmetic in bfloat16 or float16, and the products in something other than
    the parameters' dtype that the operator promises."""
    if not autocast_state(device)[0]:  # no region open, nearly always: nothing to enter
        yield
        return
    with torch.autocast(device.type, enabled=False):
        yield


def square_sums(M: Tensor, dim: int | None = None) -> Tensor:
    """Σ M² — over ``dim``, or every entry — in float64, from M divided by its largest entry
    (one pass more than the plain sum): the squares of a float32 operator's products of 1e20
    overflowed, and β read inf (LAPACK's failure, NaN nodes) and ``trace_of_square`` inf (an
    outside review). No host read."""
    top = M.abs().amax()
    top = torch.where(top > 0, top, torch.ones_like(top))
    squares = (M / top).pow(2)
    summed = squares.sum() if dim is None else squares.sum(dim)
    return summed.to(torch.float64) * top.to(torch.float64) ** 2


def scaled_column_norms(op: Any, M: Tensor) -> Tensor:
    """The 2-norms of M's columns, vectors of ``op`` (an :class:`~curvscope.spectrum.Operator`;
    sharded ones summed over the ranks), from M divided by a scale common to every rank (the
    sum of the ranks' largest entries: one collective more): a float64 operator's squares
    overflowed at 1e200. No host read."""
    top = op.total(M.abs().amax())
    top = torch.where(top > 0, top, torch.ones_like(top))
    return op.total((M / top).pow(2).sum(0)).sqrt() * top
