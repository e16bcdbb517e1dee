"""The shared argument checks: the finiteness test that every product and loss passes."""

from __future__ import annotations

import pytest
import torch

import curvscope as cs
from curvscope.derivatives.checks import all_finite, check_finite, check_vector
from tests import cases


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_agrees_with_isfinite_entry_by_entry(dtype):
    big = torch.finfo(dtype).max
    tensors = [
        torch.randn(1000, dtype=dtype),
        torch.full((8,), big, dtype=dtype),  # finite entries whose sum overflows
        torch.tensor([big, -big, big], dtype=dtype),
        torch.tensor([1.0, float("nan")], dtype=dtype),
        torch.tensor([float("inf"), -float("inf")], dtype=dtype),  # a sum of NaN
        torch.tensor([-float("inf"), 1.0], dtype=dtype),
        torch.zeros(0, dtype=dtype),
        torch.tensor(float("nan"), dtype=dtype),  # a scalar
        torch.randn(3, 4, dtype=dtype)[:, ::2],  # not contiguous
    ]
    for t in tensors:
        assert all_finite(t) == bool(torch.isfinite(t).all()), t


def test_all_finite_of_integer_and_complex_tensors():
    assert all_finite(torch.arange(5))
    assert all_finite(torch.tensor([1 + 1j]))
    assert not all_finite(torch.tensor([complex(float("nan"), 0.0)]))


def test_a_vector_whose_entries_are_finite_but_sum_overflows_is_accepted():
    v = torch.full((4,), torch.finfo(torch.float32).max)
    assert check_vector(v, 4, torch.float32, torch.device("cpu")) is v
    assert check_finite(v, "x") is v
    with pytest.raises(ValueError, match="1 non-finite entries"):
        check_vector(torch.tensor([1.0, float("inf"), 2.0, 3.0]), 4, torch.float32, v.device)
    with pytest.raises(FloatingPointError, match="2 non-finite"):
        check_finite(torch.tensor([float("inf"), -float("inf")]), "x")


def test_a_product_with_a_non_finite_vector_is_refused():
    case = cases.mlp()
    C = cs.Curvature(case.model, case.loss_fn, case.data)
    v = torch.ones(C.num_params, dtype=torch.float64)
    v[3] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite entries"):
        C @ v
