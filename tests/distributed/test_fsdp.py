"""FSDP2 (``fully_shard``) on two CPU processes (gloo): finite-difference Hessian products of
the sharded model, over uneven data shards, equal the single-process exact product on the full
data within the stated accuracy; λ_max by them; the sharded parameters, their gradients and the
RNG left bit for bit as found; and the same for a plain (unsharded) model under the group.
A sharded model under a local operator, or ranks with different numbers of batches (each
forward is a collective), get a clear error on every rank."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import curvscope as cs
from curvscope.derivatives import finite_difference as fd
from tests.derivatives.test_finite_difference import smooth
from tests.distributed.test_distributed import _end, _free_port

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
WORLD = 2
N = 20
# uneven shards (13 and 7 samples), each rank two batches: under FSDP2 every forward is a
# collective, so the ranks pass the same number of batches
BATCHES = ((slice(0, 6), slice(6, 13)), (slice(13, 16), slice(16, 20)))
FD = "finite_difference"


def _vector(n: int) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _measure(C: cs.Curvature) -> dict:
    r = cs.eigenvalues(C, k=1, which="largest")
    loss, g = C.loss_and_gradient()
    return {
        "hv": C @ _vector(C.num_params),
        "lam": r.values[0],
        "converged": r.converged,
        "loss": loss,
        "grad": g,
    }


def _local_state(model: torch.nn.Module) -> dict:
    """This rank's shards of the parameters and of their gradients, and the RNG."""

    def local(t):
        if t is None:
            return None
        return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()

    return {
        "params": [local(p) for p in model.parameters()],
        "grads": [local(p.grad) for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "rng": torch.get_rng_state(),
    }


def _same(a: dict, b: dict) -> bool:
    pairs = [
        *zip(a["params"], b["params"], strict=True),
        *zip(a["grads"], b["grads"], strict=True),
    ]
    tensors_equal = all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in pairs
    )
    return tensors_equal and a["grad_ids"] == b["grad_ids"] and torch.equal(a["rng"], b["rng"])


def _worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    case = smooth(n=N)
    X, y = case.data
    local = [(X[s], y[s]) for s in BATCHES[rank]]
    result: dict = {}
    # a plain model: each rank's gradients are local, the product is all-reduced
    result["plain"] = _measure(cs.Curvature(case.model, case.loss_fn, local, backend=FD))
    # the same model sharded by FSDP2, after one training step (the user's sharded .grad kept)
    model = case.model
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    result["sharded_params"] = type(next(model.parameters())).__name__
    case.loss_fn(model(local[0][0]), local[0][1]).backward()
    before = _local_state(model)
    C = cs.Curvature(model, case.loss_fn, local, backend=FD)
    result["fsdp"] = _measure(C)
    result["fsdp_untouched"] = _same(before, _local_state(model))
    # a failing loss leaves the shards as found too
    calls = []

    def failing(out, target):
        calls.append(1)
        if len(calls) == 3:  # the −εv evaluation's first batch
            raise RuntimeError("the loss failed")
        return case.loss_fn(out, target)

    F = cs.Curvature(model, failing, local, backend=FD, reduction="mean")
    try:
        F @ _vector(F.num_params)[:, 0]
    except RuntimeError as e:
        result["failed_with"] = str(e)
    result["failure_untouched"] = _same(before, _local_state(model))
    # a sharded model under a local operator is refused with the fix
    try:
        cs.Curvature(model, case.loss_fn, local, backend=FD, group=False)
    except ValueError as e:
        result["local_refused"] = str(e)
    # ranks with different numbers of batches: each rank gets the same error, not a hang
    try:
        cs.Curvature(model, case.loss_fn, local if rank == 0 else local[:1], backend=FD)
    except ValueError as e:
        result["batches_refused"] = str(e)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    _end()


@pytest.fixture(scope="module")
def reference():
    case = smooth(n=N)
    C = cs.Curvature(case.model, case.loss_fn, case.data, backend="double_backward")
    H = C.to_dense()
    loss, g = C.loss_and_gradient()
    return {"H": H, "lam": torch.linalg.eigvalsh(H)[-1], "loss": loss, "grad": g}


def test_fsdp2_finite_difference_products_equal_the_exact_single_process_product(
    tmp_path, reference
):
    mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    H = reference["H"]
    u = torch.finfo(torch.float64).eps
    bound = fd.ACCURACY * u ** (2 / 3) * float(torch.linalg.matrix_norm(H, 2))
    V = _vector(H.shape[0])
    want = H @ V
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["sharded_params"] == "DTensor"
        for key in ("plain", "fsdp"):
            r = got[key]
            err = (r["hv"] - want).norm(dim=0) / V.norm(dim=0)
            assert float(err.max()) <= bound, (key, err)
            assert r["converged"]
            assert abs(float(r["lam"]) - float(reference["lam"])) <= 1e-3 * float(reference["lam"])
            assert float(r["loss"]) == pytest.approx(reference["loss"], rel=1e-12)
            torch.testing.assert_close(r["grad"], reference["grad"], rtol=1e-10, atol=1e-13)
        assert got["fsdp_untouched"]
        assert got["failed_with"] == "the loss failed"
        assert got["failure_untouched"]
        assert "sharded over 2 ranks" in got["local_refused"]
        assert "num_batches" in got["batches_refused"]
