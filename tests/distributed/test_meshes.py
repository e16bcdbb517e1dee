"""Meshes beyond FSDP2's one dimension, on CPU processes (gloo), by finite differences.

HSDP — ``fully_shard`` over a 2-D (replicate, shard) mesh of four ranks holding 1+2, 3+3, 2+2
and 3+4 samples: the engine reduce-scatters over the shard dimension, all-reduces over the
replicate one and divides by shard × replicate = 4 (or by what ``set_gradient_divide_factor``
set); the products, λ_max, the loss and the gradient equal the exact single-process ones on all
20 samples, for a mean and a summed loss, the shards and the user's sharded ``.grad`` left bit
for bit as found. FSDP2 with tensor parallelism on one 2-D mesh is refused with the fix.

Tensor parallelism — ``parallelize_module`` (column-wise, row-wise, column-wise with the logits
replicated) over two ranks that pass the same batches: one loss computed together, so nothing
may be summed over the ranks (a summed loss was counted twice before: its loss, gradient and
products came out doubled); the same checks, also with a layer left unparallelized (plain
parameters beside the DTensors, and those alone selected), and ranks that pass different data
get a clear error.

The dense references are jacfwd(grad(L)) and eigvalsh of the unsharded model on all the data.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import curvscope as cs
from curvscope.derivatives import finite_difference as fd
from tests import cases
from tests.derivatives.test_finite_difference import smooth
from tests.distributed.test_distributed import _end, _free_port
from tests.distributed.test_fsdp import _init, _local_state, _same, _vector

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
N = 20
FD = "finite_difference"
#: HSDP's four ranks' batches: uneven shards (3, 6, 4 and 7 samples), two batches each (every
#: sharded forward is a collective: the ranks pass the same number of batches)
HSDP_BATCHES = (
    (slice(0, 1), slice(1, 3)),
    (slice(3, 6), slice(6, 9)),
    (slice(9, 11), slice(11, 13)),
    (slice(13, 16), slice(16, 20)),
)
#: what every tensor-parallel rank passes: all the data, as two batches
TP_BATCHES = (slice(0, 13), slice(13, 20))


def _tp_plan(last: bool = True) -> dict:
    """Column-wise then row-wise around the tanh; the last layer column-wise with its logits
    replicated (the loss needs them whole), or left plain."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
    if last:
        plan["4"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def _products(C: cs.Curvature, eigenvalue: bool = True) -> dict:
    loss, g = C.loss_and_gradient()
    out = {"hv": C @ _vector(C.num_params), "loss": loss, "grad": g}
    if eigenvalue:
        r = cs.eigenvalues(C, k=1, which="largest")
        out.update(lam=r.values[0], converged=r.converged)
    return out


def _summed() -> nn.Module:
    return nn.CrossEntropyLoss(reduction="sum")


def _measure_all(model: nn.Module, loss_fn, data) -> dict:
    """The mean loss's products with λ_max, the summed loss's without, and whether the model
    (parameters, the user's .grad, the RNG) was left as found."""
    before = _local_state(model)
    result = {
        "mean": _products(cs.Curvature(model, loss_fn, data, backend=FD)),
        "sum": _products(cs.Curvature(model, _summed(), data, backend=FD), eigenvalue=False),
    }
    result["untouched"] = _same(before, _local_state(model))
    return result


def _hsdp_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    _init(rank, port, 4)
    case = smooth(n=N)
    X, y = case.data
    local = [(X[s], y[s]) for s in HSDP_BATCHES[rank]]
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = case.model
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    p = next(model.parameters())
    result: dict = {"layout": (type(p).__name__, str(p.placements), p.device_mesh.shape)}
    case.loss_fn(model(local[0][0]), local[0][1]).backward()  # a sharded .grad the user holds
    result.update(_measure_all(model, case.loss_fn, local))
    # the user's own divide factor (1: the engine sums the ranks' gradients)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
    before = _local_state(model)
    result["factor"] = _products(cs.Curvature(model, case.loss_fn, local, backend=FD), False)
    result["factor_untouched"] = _same(before, _local_state(model))
    # FSDP2 over the data-parallel dimension of a mesh whose other dimension is tensor-parallel
    both = smooth(n=N).model
    mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(both, mesh2["tp"], _tp_plan())
    fully_shard(both, mesh=mesh2["dp"])
    try:
        cs.Curvature(both, case.loss_fn, local, backend=FD)
    except ValueError as e:
        result["fsdp_tp_refused"] = str(e)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    _end()


def _tp_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    _init(rank, port, 2)
    case = smooth(n=N)
    X, y = case.data
    data = [(X[s], y[s]) for s in TP_BATCHES]  # the same on both ranks
    mesh = init_device_mesh("cpu", (2,))
    model = case.model
    parallelize_module(model, mesh, _tp_plan())
    result: dict = {"kinds": sorted({type(p).__name__ for p in model.parameters()})}
    case.loss_fn(model(X[:5]), y[:5]).backward()  # a sharded .grad the user holds
    result.update(_measure_all(model, case.loss_fn, data))
    # the last layer left unparallelized: plain parameters beside the DTensors
    mixed = smooth(n=N).model
    parallelize_module(mixed, mesh, _tp_plan(last=False))
    result["mixed_kinds"] = sorted({type(p).__name__ for p in mixed.parameters()})
    result["mixed"] = _products(cs.Curvature(mixed, _summed(), data, backend=FD), False)
    # only the plain layer selected: still one loss of both ranks, not summed over them
    last = cs.Curvature(mixed, _summed(), data, backend=FD, params=["4.weight", "4.bias"])
    result["plain_block"] = _products(last, False)
    # ranks that pass different data (a shard each, as for data parallelism) are refused
    theirs = data if rank == 0 else [(X[:12], y[:12]), (X[13:], y[13:])]
    try:
        cs.Curvature(model, case.loss_fn, theirs, backend=FD)
    except ValueError as e:
        result["different_data_refused"] = str(e)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    _end()


@pytest.fixture(scope="module")
def reference() -> dict:
    """The unsharded model's loss, gradient and jacfwd(grad) Hessian on all the data (mean)."""
    case = smooth(n=N)
    L, theta0 = cases.loss_fn_of_theta(case)
    H = cases.dense_hessian(case)
    return {
        "H": H,
        "loss": float(L(theta0)),
        "grad": torch.func.grad(L)(theta0),
    }


def _check(got: dict, reference: dict, scale: float = 1.0, block: slice = slice(None)) -> None:
    """Products, loss and gradient of ``scale`` × the mean loss (N: the summed loss) within the
    finite-difference accuracy (tests/distributed/test_fsdp.py's bound), λ_max within 1e-3;
    with ``block``, of those parameters only."""
    H = reference["H"][block, block] * scale
    u = torch.finfo(torch.float64).eps
    bound = fd.ACCURACY * u ** (2 / 3) * float(torch.linalg.matrix_norm(H, 2))
    V = _vector(H.shape[0])
    err = (got["hv"] - H @ V).norm(dim=0) / V.norm(dim=0)
    assert float(err.max()) <= bound, err
    assert float(got["loss"]) == pytest.approx(reference["loss"] * scale, rel=1e-12)
    want = reference["grad"][block] * scale
    torch.testing.assert_close(got["grad"], want, rtol=1e-10, atol=1e-13)
    if "lam" in got:
        assert got["converged"]
        lam = float(torch.linalg.eigvalsh(H)[-1])
        assert abs(float(got["lam"]) - lam) <= 1e-3 * lam


def test_hsdp_products_equal_the_exact_single_process_ones(tmp_path, reference):
    mp.start_processes(
        _hsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=4, start_method="spawn"
    )
    for rank in range(4):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["layout"] == ("DTensor", "(Replicate(), Shard(dim=0))", (2, 2))
        _check(got["mean"], reference)
        _check(got["sum"], reference, scale=N)
        _check(got["factor"], reference)
        assert got["untouched"]
        assert got["factor_untouched"]
        refused = got["fsdp_tp_refused"]
        assert "2-D FSDP × TP" in refused and "fully_shard alone" in refused


def test_tensor_parallel_products_are_not_summed_over_the_ranks(tmp_path, reference):
    mp.start_processes(
        _tp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["kinds"] == ["DTensor"]
        _check(got["mean"], reference)
        _check(got["sum"], reference, scale=N)  # was twice this: counted on both ranks
        assert got["untouched"]
        assert got["mixed_kinds"] == ["DTensor", "Parameter"]
        _check(got["mixed"], reference, scale=N)
        _check(got["plain_block"], reference, scale=N, block=slice(-(6 * 3 + 3), None))
        refused = got["different_data_refused"]
        assert "num_samples" in refused and "the same batches" in refused
