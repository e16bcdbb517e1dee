"""curvscope called from two threads at once (a thread-pool sweep, a dashboard)."""

import random
import threading

import numpy as np
import torch
from torch import nn

import curvscope as cs
from curvscope.derivatives import rng


def _job(seed: int) -> cs.Curvature:
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 3))
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=16, shuffle=True
    )
    return cs.Curvature(model, nn.CrossEntropyLoss(), data, seed=seed)


def test_two_threads_get_their_own_answers_and_leave_the_users_rngs_as_found():
    """Each thread's save, seed and restore of the global RNGs interleaved with the other's:
    the user's RNGs were left at a seeded state, dropout masks came from the other thread's
    stream (λ_max 1.03 or 1.23 for 1.29 alone), and numpy's generator, set to all-zero words for
    an instant between set_state and the bytes copied in, hung the process for good in a
    standard_normal (an outside review). curvscope's RNG handling holds one lock now."""
    v = torch.randn(8 * 10 + 8 + 3 * 8 + 3, generator=torch.Generator().manual_seed(0))
    alone = {s: _job(s).loss_and_gradient()[1] for s in (0, 1)}
    alone_products = {s: _job(s) @ v for s in (0, 1)}
    ops = {s: _job(s) for s in (0, 1)}  # (building a model draws from torch's RNG)
    np.random.seed(42)
    random.seed(42)
    torch.manual_seed(42)
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def run(seed: int) -> None:
        C = ops[seed]
        for _ in range(15):
            results[seed].append(C.loss_and_gradient()[1])
            results[seed].append(C @ v)

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)  # (it hung before)
    for s in (0, 1):
        assert len(results[s]) == 30
        assert all(torch.equal(g, alone[s]) for g in results[s][::2])
        assert all(torch.equal(p, alone_products[s]) for p in results[s][1::2])
    torch_next, np_next, py_next = torch.rand(3), np.random.rand(3), random.random()
    np.random.seed(42)
    random.seed(42)
    torch.manual_seed(42)
    assert torch.equal(torch_next, torch.rand(3)) and np.array_equal(np_next, np.random.rand(3))
    assert py_next == random.random()


def test_numpys_state_is_never_left_degenerate_between_set_state_and_the_bytes():
    """The words set_state is given before the saved bytes replace them are a valid state's:
    all zeros, a thread drawing at that instant got zeros, or hung in standard_normal."""
    words = np.asarray(rng._ANY_WORDS, dtype=np.uint32)
    assert words.shape == (624,) and words.any()
    probe = np.random.RandomState()
    probe.set_state(("MT19937", words, 0))
    assert probe.standard_normal() != 0.0 and probe.randint(1, 2**31) != 0
