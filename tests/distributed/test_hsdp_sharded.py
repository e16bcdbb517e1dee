"""Sharded vectors (``C.sharded()``) of an HSDP model: ``fully_shard`` over a 2-D (replicate,
shard) mesh of four CPU processes (gloo), ranks [[0, 1], [2, 3]] holding 3, 6, 4 and 7 samples
(tests/distributed/test_meshes.py's). Each shard is held by two ranks (0 and 2, 1 and 3): the
sums over a vector's entries reduce over the shard dimension only, and the replicas of a shard
draw the same random entries — so the products gathered equal the full-vector ones and the
exact ones, ``cs.eigenvalues`` finds eigvalsh's extreme eigenvalues, Hutchinson's trace is
within its standard errors, and ``diagnose(..., sharded=True)`` says what the exact diagnosis
on all the data says, the same on every rank, with the replicas holding the same entries of
every vector, bit for bit, and the model left as found. (Before, ``C.sharded()`` refused HSDP:
a sum over all four ranks would have counted each entry twice.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import curvscope as cs
from curvscope.derivatives import finite_difference as fd
from curvscope.diagnosis.diagnosis import DIAGNOSIS_TOL
from curvscope.spectrum import as_operator
from tests.derivatives.test_finite_difference import smooth
from tests.distributed.test_distributed import _end, run_ranks
from tests.distributed.test_fsdp import _init, _local_state, _same, _vector
from tests.distributed.test_meshes import FD, HSDP_BATCHES, N

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
WORLD = 4
#: the replicas of each rank's shard on the (2, 2) mesh [[0, 1], [2, 3]]: its column
REPLICA = {0: 2, 1: 3, 2: 0, 3: 1}
LR = 0.5


def _hsdp_model(rank: int) -> tuple:
    """:func:`smooth` sharded by HSDP (each Linear, then the root), this rank's batches, and a
    sharded ``.grad`` the user holds (one backward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    case = smooth(n=N)
    X, y = case.data
    local = [(X[s], y[s]) for s in HSDP_BATCHES[rank]]
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    for layer in case.model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(case.model, mesh=mesh)
    case.loss_fn(case.model(local[0][0]), local[0][1]).backward()
    return case, local


def _unscaled(model: nn.Module, C: cs.Curvature, S) -> tuple[int, int]:
    """The coordinates Adam has not scaled yet, as the sharded diagnosis counts them (this
    rank's, summed over the view) and as ``cs.stability_limit`` does (gathered), after one Adam
    step with
    two entries of each rank's shard of every second moment zeroed (the model is stepped:
    after the checks that it was left as found)."""
    from curvscope.diagnosis.diagnosis import _limit

    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    opt.step()  # on the user's .grad
    for state in opt.state.values():
        state["exp_avg_sq"].to_local().view(-1)[:2] = 0.0
    return _limit(C, opt, None, S).unscaled, cs.stability_limit(opt).unscaled


def _mixed_meshes_refused(loss_fn, local) -> str | None:
    """``C.sharded()``'s error for a model whose first layer HSDP shards over the (2, 2) mesh
    and the others FSDP2 over a 1-D mesh of the same four ranks (a sum over the first
    layer's entries would reduce over two ranks, over the others' four), or None."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = smooth(n=N).model
    flat = init_device_mesh("cpu", (WORLD,))
    hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    linear = [m for m in model if isinstance(m, nn.Linear)]
    fully_shard(linear[0], mesh=hsdp)
    for m in linear[1:]:
        fully_shard(m, mesh=flat)
    fully_shard(model, mesh=flat)
    try:
        cs.Curvature(model, loss_fn, local, backend=FD).sharded()
    except ValueError as e:
        return str(e)
    return None


def _worker(rank: int, port: int, out: str) -> None:
    _init(rank, port, WORLD)
    case, local = _hsdp_model(rank)
    model = case.model
    before = _local_state(model)
    C = cs.Curvature(model, case.loss_fn, local, backend=FD)
    S = C.sharded()
    V = _vector(C.num_params)
    result: dict = {
        "local": S.num_params,
        "total": S.total_params,
        "sum_group": dist.get_world_size(S.sum_group),
        "roundtrip": torch.equal(S.gather(S.shard(V)), V),
    }
    hv = S @ S.shard(V)
    result["hv"] = (hv, S.gather(hv), C @ V)
    r = cs.eigenvalues(S, k=1, which="both", tol=1e-6)
    result["eig"] = (r.values, r.all_converged, r.vectors, S.gather(r.vectors))
    t = cs.trace(S, matvecs=16)
    result["trace"] = (t.value, t.stderr)
    gen = as_operator(S).generator(7)  # this rank's entries of a random vector
    result["draw"] = torch.randn(S.num_params, generator=gen, dtype=torch.float64)
    d = cs.diagnose(model, case.loss_fn, local, lr=LR, backend=FD, sharded=True)
    result["diagnosis"] = (d.state, dict(d.evidence), d.vectors)
    # a start vector drawn per rank: the replicas of a shard would set θ ± εv at different
    # points, which the engine averages — silently wrong before; refused on every rank now
    mine = torch.randn(S.num_params, generator=torch.Generator().manual_seed(rank), dtype=V.dtype)
    try:
        cs.eigenvalues(S, k=1, v0=mine)
    except ValueError as e:
        result["replicas_refused"] = str(e)
    result["untouched"] = _same(before, _local_state(model))
    result["mixed_refused"] = _mixed_meshes_refused(case.loss_fn, local)
    result["unscaled"] = _unscaled(model, C, S)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    _end()


@pytest.mark.usefixtures("one_thread")
def test_sharded_vectors_of_an_hsdp_model(tmp_path):
    got = run_ranks(_worker, tmp_path, WORLD)
    case = smooth(n=N)
    H = cs.Curvature(case.model, case.loss_fn, case.data, backend="double_backward").to_dense()
    eig = torch.linalg.eigvalsh(H)
    norm_h = float(torch.linalg.matrix_norm(H, 2))
    bound = fd.ACCURACY * torch.finfo(torch.float64).eps ** (2 / 3) * norm_h
    exact = cs.diagnose(case.model, case.loss_fn, case.data, lr=LR)
    V = _vector(H.shape[0])
    # each shard group (one replica) partitions the vectors: two ranks of four hold them all
    assert got[0]["local"] + got[1]["local"] == H.shape[0] == got[0]["total"]
    for rank, g in enumerate(got):
        assert g["sum_group"] == 2 and 0 < g["local"] < g["total"]
        assert g["roundtrip"]
        _, sharded_hv, full_hv = g["hv"]
        torch.testing.assert_close(sharded_hv, full_hv, rtol=1e-9, atol=1e-12)
        err = (sharded_hv - H @ V).norm(dim=0) / V.norm(dim=0)
        assert float(err.max()) <= bound, err
        values, converged, _, Q = g["eig"]
        assert converged
        assert (values - torch.stack([eig[-1], eig[0]])).abs().max() <= 1e-6 * norm_h + bound
        torch.testing.assert_close(Q.norm(dim=0), torch.ones(2, dtype=Q.dtype))
        assert float((H @ Q - Q * values).norm(dim=0).max()) <= 1e-3 * norm_h
        value, se = g["trace"]
        assert 0 < se < math.inf
        assert abs(value - float(torch.trace(H))) <= 6 * se + bound * H.shape[0]
        state, evidence, _ = g["diagnosis"]
        assert state == exact.state
        want = exact.evidence["sharpness"]
        assert abs(evidence["sharpness"] - want) <= DIAGNOSIS_TOL * abs(want)
        assert g["untouched"]
        # every replica group differs: each rank names the problem
        assert "replicate dimension" in g.get("replicas_refused", ""), g.get("replicas_refused")
        # every rank decided alike, to the last bit (but the clock)
        theirs = got[0]["diagnosis"][1]
        assert {k for k in evidence if evidence[k] != theirs[k]} <= {"seconds"}
        assert torch.equal(values, got[0]["eig"][0]) and g["trace"] == got[0]["trace"]
        # the replicas of a shard hold the same entries of every vector, bit for bit
        other = got[REPLICA[rank]]
        assert torch.equal(g["hv"][0], other["hv"][0])
        assert torch.equal(g["eig"][2], other["eig"][2])
        assert torch.equal(g["draw"], other["draw"])
        for key, vector in g["diagnosis"][2].items():
            assert vector.shape == (g["local"],) and torch.equal(vector, other["diagnosis"][2][key])
        sharded, whole = g["unscaled"]
        assert sharded == whole > 0, (sharded, whole)  # each counted once, not per replica
        refused = g["mixed_refused"]
        assert refused is not None and "unlike the first parameter" in refused, refused
        assert "(Replicate(), Shard)" in refused and "Use C itself" in refused
    # the two shards of a replica draw different entries (a random vector of the whole space)
    assert not torch.equal(got[0]["draw"][:5], got[1]["draw"][:5])
