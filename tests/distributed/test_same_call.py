"""Under a process group every rank takes each product together, so every rank must call an
estimator the same way. Measured before the check (two gloo ranks, the MLP case): with
``seed=rank`` ``cs.eigenvalues`` returned λ_max 0.7768 on one rank and 0.7647 on the other for
0.7715, both "converged" at tol 1e-6, and ``cs.trace`` 2.01 and 0.74 for 2.72 — the all-reduce
summed the ranks' products of *different* probes; a ``k`` that differs between the ranks left
them waiting in a collective until the group's timeout. Now every rank raises at once, naming
what differs. Each call below is made with a difference on rank 1 only."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import curvscope as cs
from tests import cases
from tests.distributed.test_distributed import SHARDS, WORLD, _end, _free_port, _init

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


#: each call, and the field its error must name (None: the same call on every rank)
NAMES = {
    "seed": "seed",
    "generator": "seed",
    "k": "k",
    "v0_columns": "v0",
    # a warm start is any start: every rank starts from the first rank's (eigenvectors the ranks
    # computed alike can differ in their last bits, which must not stop a Monitor mid-run)
    "v0": None,
    "diagonal": "matvecs",
    "density": "seed",
    "cg": "b",
    "same": None,
    # different estimators at once: before, a check of another size aborted gloo (SIGABRT),
    # and one of the same size (trace and diagonal: three fields each) passed
    "estimator": "call",
    "same_size": "call",
}


def _calls(C: cs.Curvature, rank: int) -> dict:
    """Each call of :data:`NAMES`, with rank 1's difference."""
    n = C.num_params
    b = torch.ones(n, dtype=torch.float64)
    v0 = torch.randn(n, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    return {
        "seed": lambda: cs.eigenvalues(C, k=1, seed=rank),
        "generator": lambda: cs.trace(C, matvecs=6, seed=torch.Generator().manual_seed(rank)),
        "k": lambda: cs.eigenvalues(C, k=1 + rank),
        "v0_columns": lambda: cs.eigenvalues(C, k=1, v0=v0[:, None].repeat(1, 1 + rank)),
        "v0": lambda: cs.eigenvalues(C, k=1, v0=v0, max_matvecs=3),
        "diagonal": lambda: cs.diagonal(C, matvecs=4 + rank),
        "density": lambda: cs.density(C, steps=5, probes=1, seed=rank),
        "cg": lambda: cs.spectrum.cg(C, b * (1 + rank), max_matvecs=3),
        "same": lambda: cs.eigenvalues(C, k=1, v0=b),
        "estimator": lambda: cs.eigenvalues(C, k=1) if rank == 0 else cs.trace(C, matvecs=6),
        "same_size": lambda: (cs.trace if rank == 0 else cs.diagonal)(C, matvecs=6),
    }


def _worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    case = cases.mlp(n=20)
    X, y = case.data
    C = cs.Curvature(case.model, case.loss_fn, (X[SHARDS[rank]], y[SHARDS[rank]]))
    lines = []
    for name, call in _calls(C, rank).items():
        start = time.perf_counter()
        value = ""
        try:
            result = call()
            message = "no error"
            value = repr(result.values.tolist()) if hasattr(result, "values") else ""
        except ValueError as e:
            message = str(e)
        lines.append(f"{name}\t{time.perf_counter() - start:.2f}\t{message}\t{value}")
    (Path(out) / f"rank{rank}.txt").write_text("\n".join(lines))
    _end()


def test_a_call_that_differs_between_ranks_is_refused_on_every_rank(tmp_path):
    mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    values = []
    for rank in range(WORLD):
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        got = {name: (float(t), m, v) for name, t, m, v in (x.split("\t") for x in lines)}
        assert set(got) == set(NAMES)
        values.append(got["v0"][2])
        for name, want in NAMES.items():
            seconds, message, _ = got[name]
            assert seconds < 10  # at once (well under a second alone), not at the 20-s timeout
            if want is None:
                assert message == "no error", name
            elif want == "call":  # each rank names its own call
                mine = {
                    "estimator": ("cs.eigenvalues", "cs.trace"),
                    "same_size": ("cs.trace", "cs.diagonal"),
                }[name][rank]
                assert f"different calls at once: this rank called {mine}," in message, message
                assert "same integer seed" in message
            else:
                assert "differently" in message and f"{want} differ" in message, (name, message)
                assert "same integer seed" in message
    # three products from different warm starts would differ; from the first rank's, not a bit
    assert values[0] == values[1] != ""


def test_every_check_reduces_the_same_number_of_values():
    """A check of any number of fields reduces :data:`_SLOTS` numbers (the call's first), so
    ranks making different calls meet in one all-reduce of one size; fields past the last slot
    share it, and a change in any of them still changes the fingerprint."""
    from curvscope.derivatives.distributed import _SLOTS, _fingerprint

    few = _fingerprint("cs.trace", {"matvecs": 6, "method": "hutchinson", "seed": 0})
    assert len(few) == _SLOTS and few[4:] == [0.0] * (_SLOTS - 4)
    assert few != _fingerprint("cs.diagonal", {"matvecs": 6, "method": "hutchinson", "seed": 0})
    many = {f"f{i}": i for i in range(2 * _SLOTS)}
    assert len(_fingerprint("x", many)) == _SLOTS
    changed = _fingerprint("x", {**many, f"f{2 * _SLOTS - 1}": -1})
    base = _fingerprint("x", many)
    assert changed[:-1] == base[:-1] and changed[-1] != base[-1]


def test_a_value_is_fingerprinted_by_what_it_is_not_how_it_was_written():
    """Numbers by value (an int, a float, a numpy scalar of the same value match: a rank whose
    k came from numpy is not refused), tensors by their bytes — read in place: no copy of the
    vector on the host, whose size is the model's."""
    import tracemalloc

    import numpy as np

    from curvscope.derivatives.distributed import _code

    assert _code(np.int64(3)) == _code(3) == _code(3.0) != _code(4)
    assert _code(1e-3) == _code(0.001) == _code(np.float64(0.001)) != _code(0.002)
    assert _code(float("nan")) == _code(float("nan")) and _code(True) != _code(1)
    assert _code(2**60) != _code(2**60 + 1)
    x = torch.randn(1_000_000)
    assert _code(x) == _code(x.clone()) != _code(x.double())
    y = x.clone()
    y[-1] += 1
    assert _code(y) != _code(x)
    tracemalloc.start()
    try:
        _code(x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < x.numel() * x.element_size() / 4, peak
