"""Input checks shared by the derivative functions and the curvature operator.

Every check raises with a message that says what was expected, what was given, and the fix.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The largest n for which :func:`curvscope.hessian` and ``Curvature.to_dense`` build an
#: (n, n) matrix without ``force=True``: 5,000² float64 entries are 200 MB.
DENSE_LIMIT = 5_000


def check_point(x: object, name: str = "x") -> Tensor:
    """Check that ``x`` is a 1-D floating-point tensor and return it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected {name} to be a 1-D torch.Tensor, got {type(x).__name__}")
    if x.ndim != 1:
        raise ValueError(
            f"expected {name} to be a 1-D tensor, got shape {tuple(x.shape)}; "
            f"flatten it with {name}.reshape(-1)"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"expected {name} to have a floating dtype, got {x.dtype}; use {name}.double()"
        )
    return x


def check_vector(v: object, n: int, dtype: torch.dtype, device: torch.device, name="v") -> Tensor:
    """Check a flat vector (n,) or a block of vectors (n, k) against the operator's size."""
    if not isinstance(v, Tensor):
        raise TypeError(
            f"expected {name} to be a torch.Tensor of shape ({n},) or ({n}, k), "
            f"got {type(v).__name__}; use torch.as_tensor({name})"
        )
    if v.ndim not in (1, 2) or v.shape[0] != n:
        raise ValueError(
            f"expected {name} of shape ({n},) or ({n}, k) — one entry per parameter — "
            f"got shape {tuple(v.shape)}"
        )
    if v.dtype != dtype:
        raise TypeError(
            f"expected {name} with dtype {dtype} (the parameters' dtype), got {v.dtype}; "
            f"convert it with {name}.to({dtype})"
        )
    if v.device != device:
        raise ValueError(
            f"expected {name} on device {device} (where the parameters are), got {v.device}; "
            f"move it with {name}.to('{device}')"
        )
    if v.ndim == 2 and v.shape[1] == 0:
        raise ValueError(
            f"expected {name} to hold at least one vector, got a block of shape {tuple(v.shape)}"
        )
    if not torch.isfinite(v).all():
        bad = int((~torch.isfinite(v)).sum())
        raise ValueError(
            f"{name} has {bad} non-finite entries (NaN/Inf): the product would be NaN whatever "
            f"the curvature; check how {name} was computed"
        )
    return v


def check_scalar_loss(loss: object, what: str = "the loss") -> Tensor:
    """Check that a function value is a finite real scalar tensor."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"expected {what} to be a scalar torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"expected {what} to be a scalar, got shape {tuple(loss.shape)}; "
            "reduce it to its mean (for a torch loss: reduction='mean')"
        )
    if not torch.isfinite(loss).all():
        raise FloatingPointError(
            f"{what} is {loss.item()}: not finite; check the inputs and parameters for NaN/Inf "
            "and the model for overflow"
        )
    return loss.reshape(())


def check_finite(t: Tensor, what: str) -> Tensor:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise FloatingPointError(
            f"{what} has {bad} non-finite entries (NaN/Inf); the curvature is not defined here — "
            "check the inputs and parameters, or lower the learning rate if training diverged"
        )
    return t


def check_dense_size(n: int, dtype: torch.dtype, force: bool, what: str) -> None:
    if n > DENSE_LIMIT and not force:
        nbytes = n * n * torch.empty((), dtype=dtype).element_size()
        raise ValueError(
            f"{what} would be a dense {n} x {n} matrix ({nbytes / 2**30:.2f} GiB); "
            f"the limit without force=True is n = {DENSE_LIMIT}. Use matrix-free products "
            "(hvp, Curvature @ v) and the spectrum estimators instead, or pass force=True"
        )


def check_int(value: object, name: str, minimum: int | None = None) -> int:
    """An integer argument (a bool or a float such as 1.7 is refused, not truncated)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if hasattr(value, "__index__") and not isinstance(value, bool):
            value = value.__index__()  # numpy and torch integer scalars
        else:
            raise TypeError(
                f"expected {name} to be an integer, got {value!r} ({type(value).__name__}); "
                f"pass a whole number, e.g. {name}={0 if minimum is None else max(minimum, 0)}"
            )
    if minimum is not None and value < minimum:
        raise ValueError(f"expected {name} to be an integer >= {minimum}, got {value}")
    return int(value)


def check_seed(seed: object, name: str = "seed") -> int:
    """A seed: a non-negative integer. ``None`` is refused: the results are meant to be
    reproducible, so there is no 'random' default (pass any fixed integer)."""
    if seed is None:
        raise TypeError(
            f"{name}=None: curvscope's randomized results are reproducible by design; pass a "
            f"fixed integer ({name}=0 is the default) or a torch.Generator where accepted"
        )
    return check_int(seed, name, minimum=0)
