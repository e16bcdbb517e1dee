"""What the estimators accept as an operator, and the pieces they share (probes, progress)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvscope.derivatives import Curvature


@dataclass
class Operator:
    """A symmetric linear map seen through block products: ``matmat(V)`` for V of shape (n, k).

    Built by :func:`as_operator` from a :class:`~curvscope.Curvature`, a dense symmetric
    tensor, or any object with ``matmat`` (or ``@``) and ``num_params``.
    """

    matmat: Callable[[Tensor], Tensor]
    n: int
    dtype: torch.dtype
    device: torch.device
    source: Any = None
    matvecs: int = 0

    def __call__(self, V: Tensor) -> Tensor:
        self.matvecs += V.shape[1] if V.ndim == 2 else 1
        return self.matmat(V)


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


def generator(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator:
    """A private generator: the global RNG is never touched."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else int(seed))
    return g


def rademacher(
    n: int, k: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    z = torch.randint(0, 2, (n, k), generator=gen, device=device)
    return (2 * z - 1).to(dtype)


def check_budget(matvecs: object, minimum: int, what: str) -> int:
    if not isinstance(matvecs, int) or isinstance(matvecs, bool) or matvecs < minimum:
        raise ValueError(f"{what}: matvecs must be an integer >= {minimum}, got {matvecs!r}")
    return matvecs


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
