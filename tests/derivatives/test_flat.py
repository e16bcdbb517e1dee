"""flatten / unflatten: one layout for flat vectors and per-parameter blocks."""

from __future__ import annotations

import pytest
import torch

from curvscope.derivatives.flat import flatten, unflatten

SHAPES = [(2, 3), (), (4,), (1, 2, 2)]  # a scalar parameter among them
N = 6 + 1 + 4 + 4


@pytest.mark.parametrize("k", [None, 1, 3])
def test_unflatten_inverts_flatten_for_every_layout(k):
    flat = torch.randn(N) if k is None else torch.randn(N, k)
    blocks = unflatten(flat, SHAPES)
    lead = () if k is None else (k,)
    assert [tuple(b.shape) for b in blocks] == [lead + s for s in SHAPES]
    assert torch.equal(flatten(blocks, batched=k is not None), flat)
    given = unflatten(flat, SHAPES, [6, 1, 4, 4])
    assert all(torch.equal(a, b) for a, b in zip(blocks, given, strict=True))


def test_column_j_of_a_block_is_the_unflattened_column():
    V = torch.randn(N, 3)
    blocks = unflatten(V, SHAPES)
    for j in range(3):
        for b, c in zip(blocks, unflatten(V[:, j].contiguous(), SHAPES), strict=True):
            assert torch.equal(b[j], c)


def test_one_vector_is_viewed_not_copied():
    flat = torch.randn(N)
    assert all(b.data_ptr() >= flat.data_ptr() for b in unflatten(flat, SHAPES))
    unflatten(flat, SHAPES)[0].zero_()
    assert torch.equal(flat[:6], torch.zeros(6))
    block = torch.randn(N, 1)
    unflatten(block, SHAPES)[2].zero_()
    assert torch.equal(block[7:11, 0], torch.zeros(4))
