"""Flat vectors and per-parameter blocks: the one flatten / unflatten.

Parameters θ₁, …, θ_m of shapes s₁, …, s_m are one flat vector of n = Σ numel(s_i) entries:
the blocks in order, each in row-major order. A block of k flat vectors is a matrix (n, k),
whose per-parameter form is tensors of shape (k, *s_i) (the leading axis indexes the vectors,
as ``torch.func`` and ``torch.autograd.grad(is_grads_batched=True)`` expect).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def flatten(blocks: Sequence[Tensor], batched: bool = False) -> Tensor:
    """Per-parameter tensors as one flat vector (n,), or with ``batched=True`` blocks of shape
    (k, *s_i) as the columns of an (n, k) matrix. The inverse of :func:`unflatten`.

    Example:
        >>> flatten([torch.ones(2, 2), torch.zeros(1)]).tolist()
        [1.0, 1.0, 1.0, 1.0, 0.0]
    """
    if not batched:
        return torch.cat([b.reshape(-1) for b in blocks])
    return torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=1).T


def unflatten(
    flat: Tensor, shapes: Sequence[Sequence[int]], sizes: Sequence[int] | None = None
) -> list[Tensor]:
    """A flat (n,) vector as tensors of the given shapes, or an (n, k) matrix as blocks of
    shape (k, *s_i); views of ``flat`` where the layout allows. The inverse of :func:`flatten`.
    ``sizes``, the number of entries of each shape, may be given to save computing them.

    Example:
        >>> [t.shape for t in unflatten(torch.arange(5.0), [(2, 2), (1,)])]
        [torch.Size([2, 2]), torch.Size([1])]
    """
    sizes = [math.prod(s) for s in shapes] if sizes is None else sizes
    if flat.ndim == 1:
        chunks = flat.split_with_sizes(sizes)
        return [c.reshape(s) for c, s in zip(chunks, shapes, strict=True)]
    k = flat.shape[1]  # one split of the transposed block, not one transpose per chunk
    chunks = flat.T.split_with_sizes(sizes, dim=1)
    return [c.reshape(k, *s) for c, s in zip(chunks, shapes, strict=True)]


def tensors(x: Any) -> Iterator[Tensor]:
    """Every tensor in a nest of mappings, tuples and lists, in order."""
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from tensors(v)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from tensors(v)


def map_tensors(fn: Callable[[Tensor], Tensor], x: Any) -> Any:
    """``x`` with ``fn`` applied to every tensor in it, the nest's types kept (a Hugging Face
    ``ModelOutput`` or another mapping type is rebuilt from keywords); other leaves as they are."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        items = {k: map_tensors(fn, v) for k, v in x.items()}
        if type(x) is not dict:
            try:
                return type(x)(**items)
            except TypeError:  # a mapping not built from keywords (e.g. BatchEncoding)
                pass
        return items
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(fn, v) for v in x)
    return x
