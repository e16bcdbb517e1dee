"""The shipped datasets and model problems: shapes, dtypes, no global RNG use."""

import subprocess
import sys

import pytest
import torch

import curvscope as cs


def test_breast_cancer_is_standardised():
    x, y = cs.problems.load_breast_cancer()
    assert x.shape == (569, 30) and y.shape == (569, 1)
    torch.testing.assert_close(x.mean(0), torch.zeros(30, dtype=torch.float64), atol=1e-10, rtol=0)
    assert set(y.unique().tolist()) == {0.0, 1.0}


def test_digits_subsets_and_one_hot():
    x, y = cs.problems.load_digits(100, dtype=torch.float32)
    assert x.shape == (100, 64) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    assert y.dtype == torch.long
    _, oh = cs.problems.load_digits(100, one_hot=True)
    assert oh.shape == (100, 10) and torch.equal(oh.argmax(1), y)
    with pytest.raises(ValueError, match="between 1 and 1797"):
        cs.problems.load_digits(5000)


@pytest.mark.parametrize("name", ["breast-cancer-logreg", "digits-mlp"])
def test_model_problems_build_reproducibly_without_touching_the_rng(name):
    p = cs.problems.get(name)
    state = torch.get_rng_state()
    a, b = p.make_model(3), p.make_model(3)
    assert torch.equal(torch.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb) and pa.dtype == torch.float64
    loss = p.loss_fn(a(p.data[0]), p.data[1])
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_logistic_regression_is_convex_and_mlp_is_not():
    for name, convex in (("breast-cancer-logreg", True), ("digits-mlp", False)):
        p = cs.problems.get(name) if convex else cs.problems.get(name, hidden=8, n=200)
        lam = torch.linalg.eigvalsh(cs.Curvature(p.make_model(0), p.loss_fn, p.data).to_dense())
        assert (lam.min() > -1e-10) == convex
    with pytest.raises(ValueError, match="loss"):
        cs.problems.get("digits-mlp", loss="hinge")


def test_the_first_dataset_import_leaves_the_global_rngs_as_found():
    """sklearn.datasets' first import drew from Python's random: a script's stream depended on
    whether a problem had been loaded before (an outside review). A fresh interpreter, where the
    import is the first."""
    script = (
        "import random, numpy, torch, curvscope as cs\n"
        "random.seed(0); numpy.random.seed(0); torch.manual_seed(0)\n"
        "before = random.getstate(), numpy.random.get_state()[1].tolist(), torch.get_rng_state()\n"
        "cs.problems.get('digits-mlp')\n"
        "after = random.getstate(), numpy.random.get_state()[1].tolist(), torch.get_rng_state()\n"
        "assert before[:2] == after[:2] and torch.equal(before[2], after[2])\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
