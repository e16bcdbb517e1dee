"""The optimizers' hyperparameter checks are the shared checks (curvscope.derivatives.checks)
worded as torch.optim words them: a ValueError "Invalid <name>: <value> (expected ...)"."""

import math

import numpy as np
import pytest

from curvscope.optim.base import check_int, check_positive, check_unit


@pytest.mark.parametrize(
    ("check", "value", "match"),
    [
        (lambda v: check_positive("lr", v), -1, r"Invalid lr: -1 \(expected a finite number > 0\)"),
        (lambda v: check_positive("lr", v), 0.0, "Invalid lr: 0.0"),
        (lambda v: check_positive("lr", v), math.inf, "Invalid lr: inf"),
        (lambda v: check_positive("lr", v), "0.1", "Invalid lr: '0.1'"),
        (lambda v: check_positive("lr", v), True, "Invalid lr: True"),
        (lambda v: check_positive("eps", v, allow_zero=True), -1e-8, r"finite number >= 0"),
        (
            lambda v: check_int("krylov_dim", v),
            0,
            r"Invalid krylov_dim: 0 \(expected an integer >= 1\)",
        ),
        (lambda v: check_int("krylov_dim", v), 1.5, "Invalid krylov_dim: 1.5"),
        (lambda v: check_int("krylov_dim", v), True, "Invalid krylov_dim: True"),
        (
            lambda v: check_unit("beta1", v),
            1.0,
            r"Invalid beta1: 1.0 \(expected a number in \[0, 1\)\)",
        ),
        (lambda v: check_unit("beta1", v), -0.1, "Invalid beta1: -0.1"),
        (lambda v: check_unit("beta1", v), math.nan, "Invalid beta1: nan"),
        (lambda v: check_unit("beta1", v), None, "Invalid beta1: None"),
    ],
)
def test_bad_hyperparameters_are_refused_in_torch_words(check, value, match):
    with pytest.raises(ValueError, match=match):
        check(value)


def test_good_values_pass_as_plain_python_numbers():
    assert check_positive("lr", 1) == 1.0 and type(check_positive("lr", 1)) is float
    assert check_positive("lr", np.float32(0.5)) == 0.5  # numpy scalars are numbers too
    assert check_positive("eps", 0, allow_zero=True) == 0.0
    assert check_int("krylov_dim", np.int64(3)) == 3 and type(check_int("k", 3)) is int
    assert check_unit("beta1", 0) == 0.0 and check_unit("beta2", 0.999) == 0.999
