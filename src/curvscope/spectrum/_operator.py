"""What the estimators accept as an operator, and the pieces they share (probes, progress).

Precision: the products run in the operator's own dtype (a half or bfloat16 model's curvature is
computed in half or bfloat16), but every estimator's own arithmetic — orthogonalization,
projected eigenproblems, accumulations, probe statistics — runs in the *working dtype*, float32
at least (:func:`working_dtype`). :class:`Operator` casts each block to the product dtype just
for the product and casts the result back.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvscope.derivatives import Curvature
from curvscope.derivatives._checks import check_int, check_seed


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an estimator computes in: float32 at least, float64 for a float64 operator.

    bfloat16 keeps 8 significant bits and float16 11: a Gram-Schmidt, a sum over probes or a
    projected eigenproblem in them loses what the products measured (and torch has no QR for
    them on the CPU).
    """
    return torch.promote_types(dtype, torch.float32)


@dataclass
class Operator:
    """A symmetric linear map seen through block products: ``matmat(V)`` for V of shape (n, k).

    Built by :func:`as_operator` from a :class:`~curvscope.Curvature`, a dense symmetric
    tensor, or any object with ``matmat`` (or ``@``) and ``num_params``. ``dtype`` is the dtype
    ``matmat`` takes and returns (a Curvature's: its parameters'); calling the operator accepts
    any wider floating dtype (the estimators pass :attr:`work_dtype`), casts each column to
    ``dtype`` for the product and the result back.
    """

    matmat: Callable[[Tensor], Tensor]
    n: int
    dtype: torch.dtype
    device: torch.device
    source: Any = None
    matvecs: int = 0

    @property
    def work_dtype(self) -> torch.dtype:
        """The dtype of the estimators' own arithmetic: :func:`working_dtype` of ``dtype``."""
        return working_dtype(self.dtype)

    def __call__(self, V: Tensor) -> Tensor:
        self.matvecs += V.shape[1] if V.ndim == 2 else 1
        if V.dtype == self.dtype:
            return self.matmat(V)
        if torch.finfo(V.dtype).bits <= torch.finfo(self.dtype).bits:
            return self.matmat(V.to(self.dtype)).to(V.dtype)
        return _narrowed_product(self.matmat, V, self.dtype)


def _narrowed_product(matmat: Callable[[Tensor], Tensor], V: Tensor, dtype: torch.dtype) -> Tensor:
    """matmat(V) for V wider than the product dtype: each column is scaled by a power of two to
    a largest entry in [1, 2) before the cast (exact, and float16's narrow range — 6e-5 to
    65504 — then neither flushes the small entries of a unit vector of a large model nor
    overflows), and the result is scaled back in V's dtype."""
    V2 = V if V.ndim == 2 else V[:, None]
    top = V2.abs().amax(dim=0)
    scale = torch.where(top > 0, torch.exp2(torch.floor(torch.log2(top))), torch.ones_like(top))
    scale = torch.where(torch.isfinite(scale), scale, torch.ones_like(top))
    out = matmat((V2 / scale).to(dtype)).to(V.dtype) * scale
    return out if V.ndim == 2 else out[:, 0]


def as_operator(A: Any) -> Operator:
    if isinstance(A, Operator):
        return A
    if isinstance(A, Curvature):
        return Operator(A.matmat, A.num_params, A.dtype, A.device, A)
    if isinstance(A, Tensor):
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(A.shape)}")
        if not A.is_floating_point():
            raise TypeError(f"expected a floating-point matrix, got {A.dtype}")
        return Operator(lambda V: A @ V, A.shape[0], A.dtype, A.device, A)
    n = getattr(A, "num_params", None)
    mm = getattr(A, "matmat", None) or (lambda V: A @ V)
    if n is None or not (hasattr(A, "matmat") or hasattr(A, "__matmul__")):
        raise TypeError(
            "expected a cs.Curvature, a square torch.Tensor, or an object with matmat/@ and "
            f"num_params; got {type(A).__name__}. Build one with cs.Curvature(model, loss_fn, data)"
        )
    return Operator(
        mm, int(n), getattr(A, "dtype", torch.float32), torch.device(getattr(A, "device", "cpu")), A
    )


def generator(seed: int | torch.Generator, device: torch.device) -> torch.Generator:
    """A private generator: the global RNG is never touched. ``seed`` is a non-negative integer
    (1.7 and None are refused, not truncated or replaced) or a ``torch.Generator``."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator(device=device)
    g.manual_seed(check_seed(seed))
    return g


def rademacher(
    n: int, k: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    z = torch.randint(0, 2, (n, k), generator=gen, device=device)
    return (2 * z - 1).to(dtype)


def check_budget(matvecs: object, minimum: int, what: str) -> int:
    """A product budget: an integer >= minimum (TypeError for 10.5, ValueError for 1)."""
    try:
        return check_int(matvecs, "matvecs", minimum)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{what}: {e}") from None


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="product", leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def progress(total: int, desc: str, enabled: bool | None) -> Iterator[_Progress]:
    """A progress bar over products; ``enabled=None`` shows it on a terminal for long jobs."""
    if enabled is None:
        enabled = total >= 200 and sys.stderr.isatty()
    bar = _Progress(total, desc, enabled)
    try:
        yield bar
    finally:
        bar.close()


@contextmanager
def autocast_off(device: torch.device) -> Iterator[None]:
    """Suspend an enclosing ``torch.autocast`` region: inside one, ``@`` would silently run the
    estimators' own arithmetic in bfloat16 or float16, and the products in something other than
    the parameters' dtype that the operator promises."""
    if not torch.amp.is_autocast_available(device.type):
        yield
        return
    with torch.autocast(device.type, enabled=False):
        yield
