"""The argument checks every part of curvscope shares: one set of validators.

Every check raises with a message that says what was expected, what was given, and the fix:
``TypeError`` for the wrong kind of value (a float where an integer is due, a string for a
number), ``ValueError`` for a value of the right kind out of its range. A bool is never taken
for a number. Internal but public: the subpackages import these from here, never from another
subpackage's private module.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import types

import torch
from torch import Tensor

#: The largest n for which :func:`curvscope.hessian` and ``Curvature.to_dense`` build an
#: (n, n) matrix without ``force=True``: 5,000² float64 entries are 200 MB.
DENSE_LIMIT = 5_000


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite, from one sum: a NaN or an Inf entry makes the sum
    NaN or Inf, so a finite sum clears the tensor at the cost of a reduction (about 30x less
    than ``torch.isfinite(t).all()``, which writes a mask of t's size); a sum that is not finite
    (such an entry, or finite entries whose sum overflows) is decided entry by entry.

    Example:
        >>> all_finite(torch.tensor([3e38, 3e38])), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
    """
    if not t.is_floating_point() or t.numel() == 0:
        return not t.is_complex() or bool(torch.isfinite(t).all())
    if math.isfinite(float(t.detach().sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_point(x: object, name: str = "x") -> Tensor:
    """Check that ``x`` is a 1-D floating-point tensor and return it."""
    if not isinstance(x, Tensor):
        several = isinstance(x, (tuple, list, dict))
        raise TypeError(
            f"expected {name} to be a 1-D torch.Tensor, got {type(x).__name__}"
            + (
                "; for several tensors pass one flat vector, torch.cat([t.reshape(-1) for t in "
                "tensors]), and split it inside f (or wrap them as nn.Parameters of a module "
                "for cs.Curvature)"
                if several
                else ""
            )
        )
    if x.ndim != 1:
        raise ValueError(
            f"expected {name} to be a 1-D tensor, got shape {tuple(x.shape)}; "
            f"flatten it with {name}.reshape(-1)"
        )
    if x.is_complex():  # .double() would drop the imaginary part, silently
        raise TypeError(
            f"expected {name} to have a real floating dtype, got {x.dtype}: the curvature of a "
            f"real function of complex numbers is that of their real and imaginary parts; pass "
            f"torch.view_as_real({name}).reshape(-1) and rebuild the complex value inside f"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"expected {name} to have a floating dtype, got {x.dtype}; use {name}.double()"
        )
    if x.numel() == 0:  # (the Hessian said "not enough values to unpack")
        raise ValueError(f"expected {name} to have at least one entry, got an empty tensor")
    if x.is_inference():  # (torch: "Setting requires_grad=True on inference tensor ...")
        raise RuntimeError(
            f"{name} was made under torch.inference_mode(), and such a tensor cannot be "
            f"differentiated; pass a copy made outside it: {name}.clone() outside the block"
        )
    return x


#: :func:`check_vector`'s words for the vectors of a plain function f(x), which has no parameters
FUNCTION_VECTOR = {"entries": "one entry per entry of x", "whose": "x's"}


def check_vector(
    v: object,
    n: int,
    dtype: torch.dtype,
    device: torch.device,
    name: str = "v",
    entries: str = "one entry per parameter",
    whose: str = "the parameters'",
) -> Tensor:
    """Check a flat vector (n,) or a block of vectors (n, k) against the operator's size
    (``entries`` says what its n entries are, ``whose`` what sets its dtype and device)."""
    if not isinstance(v, Tensor):
        raise TypeError(
            f"expected {name} to be a torch.Tensor of shape ({n},) or ({n}, k), "
            f"got {type(v).__name__}; use torch.as_tensor({name})"
        )
    if v.ndim not in (1, 2) or v.shape[0] != n:
        raise ValueError(
            f"expected {name} of shape ({n},) or ({n}, k) — {entries} — got shape {tuple(v.shape)}"
        )
    if v.dtype != dtype:
        raise TypeError(
            f"expected {name} with dtype {dtype} ({whose} dtype), got {v.dtype}; "
            f"convert it with {name}.to({dtype})"
        )
    if v.device != device:
        raise ValueError(
            f"expected {name} on device {device} ({whose} device), got {v.device}; "
            f"move it with {name}.to('{device}')"
        )
    if v.ndim == 2 and v.shape[1] == 0:
        raise ValueError(
            f"expected {name} to hold at least one vector, got a block of shape {tuple(v.shape)}"
        )
    if not all_finite(v):
        bad = int((~torch.isfinite(v)).sum())
        raise ValueError(
            f"{name} has {bad} non-finite entries (NaN/Inf): the product would be NaN whatever "
            f"the curvature; check how {name} was computed"
        )
    return v


def check_scalar_loss(
    loss: object,
    what: str = "the loss",
    *,
    values: bool = True,
    fix: str = "check the inputs and parameters for NaN/Inf and the model for overflow",
) -> Tensor:
    """Check that a function value is a finite real scalar tensor (``values=False``: a scalar
    tensor, its finiteness checked by the caller — one host read, not two); ``fix``: what a
    value that is not finite asks the user to check."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"expected {what} to be a scalar torch.Tensor, got {type(loss).__name__}")
    if loss.is_complex():  # (torch: "grad can be implicitly created only for real scalar ...")
        raise TypeError(
            f"expected {what} to be real, got {loss.dtype}: curvature is that of a real "
            "function; return its .real, .abs() or squared modulus"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"expected {what} to be a scalar, got shape {tuple(loss.shape)}; "
            "reduce it to its mean (for a torch loss: reduction='mean')"
        )
    if values and not all_finite(loss):
        value = loss.item()
        raise NonFiniteLoss(f"{what} is {value}: not finite; {fix}", value)
    return loss.reshape(())


class NonFiniteLoss(FloatingPointError):
    """A loss that is not finite, with its value (inf, -inf or NaN): a diagnosis reports it as it
    is (an overflowing loss read "loss (nan)": an outside review)."""

    def __init__(self, message: str, value: float) -> None:
        super().__init__(message)
        self.value = value


#: what to check where a model's curvature is not finite
MODEL_FIX = "check the inputs and parameters, or lower the learning rate if training diverged"
#: and where a plain function's is (a learning rate means nothing there: an outside review)
FUNCTION_FIX = (
    "check that f is twice differentiable at x (√x, log x or 1/x at 0 is not) and that its "
    "values do not overflow"
)


def check_finite(t: Tensor, what: str, fix: str = MODEL_FIX) -> Tensor:
    """Check that every entry of ``t`` is finite (:func:`all_finite`) and return it; the
    error names ``fix``."""
    if not all_finite(t):
        bad = (~torch.isfinite(t)).sum().item()
        raise FloatingPointError(
            f"{what} has {bad} non-finite entries (NaN/Inf); the curvature is not defined here — "
            f"{fix}"
        )
    return t


def check_dense_size(n: int, dtype: torch.dtype, force: bool, what: str) -> None:
    if not isinstance(force, bool):  # force="no" built the matrix (a review)
        raise TypeError(f"expected force to be True or False, got {force!r}")
    if n > DENSE_LIMIT and not force:
        nbytes = n * n * torch.empty((), dtype=dtype).element_size()
        raise ValueError(
            f"{what} would be a dense {n} x {n} matrix ({nbytes / 2**30:.2f} GiB); "
            f"the limit without force=True is n = {DENSE_LIMIT}. Use matrix-free products "
            "(hvp, Curvature @ v) and the spectrum estimators instead, or pass force=True"
        )


def check_int(value: object, name: str, minimum: int | None = None) -> int:
    """An integer argument (a bool or a float such as 1.7 is refused, not truncated).

    Example:
        >>> check_int(3, "steps", minimum=1)
        3
        >>> check_int(1.7, "k")
        Traceback (most recent call last):
        ...
        TypeError: expected k to be an integer, got 1.7 (float); pass a whole number, e.g. k=0
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number = int(value)
    else:
        index = getattr(value, "__index__", None)  # numpy and torch integer scalars have one
        if index is None or isinstance(value, bool):
            raise TypeError(
                f"expected {name} to be an integer, got {value!r} ({type(value).__name__}); "
                f"pass a whole number, e.g. {name}={0 if minimum is None else max(minimum, 0)}"
            )
        number = int(index())
    if minimum is not None and number < minimum:
        raise ValueError(f"expected {name} to be an integer >= {minimum}, got {number}")
    return number


def check_real(
    value: object,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive: bool = False,
) -> float:
    """A finite real number (an int, a float, a numpy scalar or a 0-d real tensor, as torch's
    optimizers take a learning rate; a bool or a string is refused), within ``[minimum,
    maximum]`` — or ``(minimum, maximum)`` with ``exclusive=True`` — where the bounds are given.

    Example:
        >>> check_real(0.5, "tol", minimum=0, maximum=1, exclusive=True)
        0.5
        >>> check_real(0, "tol", minimum=0, maximum=1, exclusive=True)
        Traceback (most recent call last):
        ...
        ValueError: expected tol to be in (0, 1), got 0
    """
    scalar = (
        isinstance(value, Tensor)
        and value.ndim == 0
        and not (value.dtype == torch.bool or value.is_complex())
    )
    if not scalar and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"expected {name} to be a real number, got {type(value).__name__}")
    number = float(value)  # type: ignore[arg-type]  # a real number or a 0-d tensor
    if not math.isfinite(number):
        raise ValueError(f"expected {name} to be a finite number, got {value!r}")
    low_ok = minimum is None or (number > minimum if exclusive else number >= minimum)
    high_ok = maximum is None or (number < maximum if exclusive else number <= maximum)
    if not (low_ok and high_ok):
        raise ValueError(
            f"expected {name} to be {_range(minimum, maximum, exclusive)}, got {value!r}"
        )
    return number


def _range(minimum: float | None, maximum: float | None, exclusive: bool) -> str:
    """'in [a, b]', 'in (a, b)', '>= a', '> a', '<= b' or '< b'."""
    if minimum is not None and maximum is not None:
        left, right = ("(", ")") if exclusive else ("[", "]")
        return f"in {left}{minimum:g}, {maximum:g}{right}"
    if minimum is not None:
        return f"{'>' if exclusive else '>='} {minimum:g}"
    return f"{'<' if exclusive else '<='} {maximum:g}"


def check_seed(seed: object, name: str = "seed") -> int:
    """A seed: a non-negative integer. ``None`` is refused: the results are meant to be
    reproducible, so there is no 'random' default (pass any fixed integer)."""
    if seed is None:
        raise TypeError(
            f"{name}=None: curvscope's randomized results are reproducible by design; pass a "
            f"fixed integer ({name}=0 is the default) or a torch.Generator where accepted"
        )
    seed = check_int(seed, name, minimum=0)
    if seed >= 2**64:  # torch's "Overflow when unpacking long long" (a review)
        raise ValueError(f"expected {name} to be below 2**64 (a torch seed), got {seed}")
    return seed


#: curvscope's own directory: what a warning's stack level skips (:func:`callers_level`)
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def callers_level(inside: str | tuple[str, ...] = PACKAGE, start: int = 1) -> int:
    """The ``stacklevel`` of the first frame outside the directory ``inside`` (curvscope's, by
    default; or outside each of several), for a warning issued from a function of it that
    several paths reach: called by that function (``start`` 1), or through ``start - 1``
    helpers."""
    frame: types.FrameType | None = sys._getframe(start)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level
