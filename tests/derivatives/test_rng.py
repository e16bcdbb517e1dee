"""The global RNGs around curvscope's passes: numpy's legacy RNG read and written as raw bytes
(its get_state/set_state cost 69 µs a forward), exactly as numpy's own copies would."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import curvscope as cs
from curvscope.derivatives import rng


def _full_state() -> tuple:
    """numpy's legacy global MT19937 state, every field: its words, its position, the kept
    gaussian."""
    st = np.random.mtrand._rand.get_state(legacy=False)
    return st["state"]["key"].tobytes(), st["state"]["pos"], st["has_gauss"], st["gauss"]


def _user_state(kept_gaussian: bool) -> None:
    np.random.seed(11)
    np.random.uniform(size=3)
    if kept_gaussian:
        np.random.standard_normal()  # the polar method makes two: the second is kept
    assert np.random.get_state()[3] == int(kept_gaussian)


def test_the_raw_layout_is_numpys_and_the_fast_path_is_taken():
    assert rng._raw_layout_holds()
    state = rng.numpy_state()
    rng.set_numpy_state(state)
    assert isinstance(state.raw, bytes)  # the raw bytes, not numpy's own state dict


@pytest.mark.parametrize("kept_gaussian", [False, True], ids=["no-gaussian", "gaussian-kept"])
@pytest.mark.parametrize("draws", ["none", "uniform", "odd-normals", "even-normals", "reseeded"])
def test_the_users_numpy_state_comes_back_exactly(kept_gaussian, draws):
    """Whatever was drawn between (a kept gaussian used, one made, the generator reseeded), every
    field of the state is as found and the user's next draws are the ones they would have had."""
    _user_state(kept_gaussian)
    before = _full_state()
    expected = np.random.mtrand.RandomState()
    expected.set_state(np.random.get_state())
    saved = rng.numpy_state()
    rng.seed_numpy(3)
    if draws == "uniform":
        np.random.uniform(size=700)  # past one regeneration of the 624 words
    elif draws == "odd-normals":
        np.random.standard_normal(size=5)
    elif draws == "even-normals":
        np.random.normal(size=4)
    elif draws == "reseeded":
        np.random.seed(99)
        np.random.standard_normal()
    rng.set_numpy_state(saved)
    assert _full_state() == before
    assert np.array_equal(np.random.standard_normal(size=3), expected.standard_normal(size=3))
    assert np.random.uniform() == expected.uniform()


@pytest.mark.parametrize("kept_gaussian", [False, True], ids=["no-gaussian", "gaussian-kept"])
def test_seeding_fixes_the_draws_whatever_the_user_kept(kept_gaussian):
    _user_state(kept_gaussian)
    saved = rng.numpy_state()
    rng.seed_numpy(2**32 + 5)  # reduced modulo 2**32, as numpy's seed requires
    drawn = np.random.standard_normal(size=3)
    rng.set_numpy_state(saved)
    assert np.array_equal(drawn, np.random.RandomState(5).standard_normal(size=3))


@pytest.mark.skipif(
    not hasattr(np.random, "set_bit_generator"), reason="numpy without set_bit_generator"
)
def test_another_global_bit_generator_is_kept_and_seeded_without_warnings():
    """np.random.set_bit_generator(PCG64): numpy's get_state() warns on every call for it (and
    every forward called it before); its state dict is saved and restored instead."""
    original = np.random.get_bit_generator()
    np.random.set_bit_generator(np.random.PCG64(4))
    try:
        np.random.standard_normal()
        before = np.random.mtrand._rand.get_state(legacy=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            saved = rng.numpy_state()
            rng.seed_numpy(8)
            first = np.random.uniform(size=2)
            rng.seed_numpy(8)
            assert np.array_equal(np.random.uniform(size=2), first)
            rng.set_numpy_state(saved)
        after = np.random.mtrand._rand.get_state(legacy=False)
        assert after["state"] == before["state"]
        assert (after["has_gauss"], after["gauss"]) == (before["has_gauss"], before["gauss"])
    finally:
        np.random.set_bit_generator(original)


@pytest.mark.skipif(
    not hasattr(np.random, "set_bit_generator"), reason="numpy without set_bit_generator"
)
def test_a_bit_generator_replaced_in_between_is_put_back():
    original = np.random.get_bit_generator()
    try:
        _user_state(True)
        before = _full_state()
        saved = rng.numpy_state()
        np.random.set_bit_generator(np.random.MT19937(1))
        rng.set_numpy_state(saved)
        assert np.random.get_bit_generator() is original and _full_state() == before
    finally:
        np.random.set_bit_generator(original)


class _NoisyNormals(nn.Module):
    """A forward adding numpy and Python noise to its output: an odd number of gaussians."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.as_tensor(np.random.standard_normal(size=3)[:1], dtype=x.dtype)
        return torch.tanh(self.lin(x)) * (1 + 0.1 * noise) + 0.01 * random.random()


@pytest.mark.parametrize("kept_gaussian", [False, True], ids=["no-gaussian", "gaussian-kept"])
def test_products_draw_the_same_gaussians_and_leave_the_users_state(kept_gaussian):
    """Through a product: the same operator on every call, and numpy's state — the kept gaussian
    too — and Python's as found."""
    torch.manual_seed(0)
    model = _NoisyNormals().double()
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    _user_state(kept_gaussian)
    random.seed(3)
    before, python = _full_state(), random.getstate()
    C = cs.Curvature(model, nn.CrossEntropyLoss(), [(X[:8], y[:8]), (X[8:], y[8:])])
    v = torch.randn(C.num_params, dtype=torch.float64)
    first = C @ v
    assert torch.equal(C @ v, first)
    assert _full_state() == before and random.getstate() == python


@pytest.mark.skipif(
    not hasattr(np.random, "set_bit_generator"), reason="numpy without set_bit_generator"
)
@pytest.mark.parametrize("theirs", ["MT19937", "Philox"])
def test_a_forward_replacing_a_non_mt_global_bit_generator_is_undone(theirs):
    """The user's global PCG64, and a forward that installs another bit generator: restoring
    raised "state must be for a MT19937 PRNG" (before and after the bytes path: an outside
    review) and left Python's random seeded."""
    original = np.random.get_bit_generator()
    users = np.random.PCG64(7)
    np.random.set_bit_generator(users)
    try:
        np.random.standard_normal()
        before = np.random.mtrand._rand.get_state(legacy=False)
        python = random.getstate()
        saved = rng.rng_states([])
        rng.seed_rngs([], 3)
        np.random.set_bit_generator(getattr(np.random, theirs)(1))
        np.random.uniform(size=3)
        rng.set_rng_states([], saved)
        assert np.random.get_bit_generator() is users and random.getstate() == python
        after = np.random.mtrand._rand.get_state(legacy=False)
        assert after["state"] == before["state"] and after["gauss"] == before["gauss"]
    finally:
        np.random.set_bit_generator(original)


def test_every_rng_is_put_back_when_one_fails(monkeypatch):
    random.seed(5)
    python = random.getstate()
    saved = rng.rng_states([torch.random.default_generator])
    random.seed(6)

    def fails(state):
        raise RuntimeError("numpy's state could not be written")

    restore = rng.set_numpy_state
    monkeypatch.setattr(rng, "set_numpy_state", fails)
    with pytest.raises(RuntimeError, match="numpy"):
        rng.set_rng_states([torch.random.default_generator], saved)
    assert random.getstate() == python
    restore(saved[1])
