"""Sharded flat vectors (``C.sharded()``) of an FSDP2 model on two CPU processes (gloo): each rank
holds its shard of every vector; the products, gathered, equal the full-vector finite-difference
products of the same model and the exact single-process Hessian products on all the data;
``cs.eigenvalues`` on the sharded view finds the exact extreme eigenvalues with eigenvectors
sharded the same way, the same values on every rank; the model is left as found; ``cs.trace``,
``trace_of_square`` and ``diagonal`` estimate by Hutchinson probes whose entries each rank draws
for itself, and CG solves a damped system with reduced inner products; what needs whole vectors,
or is not FSDP2-sharded, is refused with the fix."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import curvscope as cs
from curvscope.derivatives import finite_difference as fd
from tests.derivatives.test_finite_difference import smooth
from tests.distributed.test_distributed import _end, _free_port
from tests.distributed.test_fsdp import FD, WORLD, N, _init, _local_state, _same, sharded_smooth
from tests.distributed.test_meshes import _tp_plan

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


#: Lanczos steps of the density's probes
N_STEPS = 12


def _vectors(n: int) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _refusals(rank: int, model, plain, loss_fn, local, everything) -> dict:
    """The errors each refused use gives (message, or None if nothing was raised)."""

    def message(fn):
        try:
            fn()
        except (TypeError, ValueError, FloatingPointError) as e:
            return str(e)
        return None

    calls = []

    def nan_on_rank_1(out, target):  # rank 1's loss turns NaN at its third evaluation
        calls.append(torch.is_grad_enabled())  # (not the first loss's checks, without grad)
        loss = loss_fn(out, target)
        return loss * float("nan") if rank == 1 and sum(calls) == 3 and calls[-1] else loss

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    exact = cs.Curvature(plain, loss_fn, local, backend="double_backward")
    S = cs.Curvature(model, loss_fn, local, backend=FD).sharded()
    # a tensor-parallel model: every parameter a DTensor on a 1-D mesh, but RowwiseParallel's
    # bias replicated on both ranks (accepted before: lambda_max 2.9% off, "converged")
    tp = copy.deepcopy(plain)
    parallelize_module(tp, init_device_mesh("cpu", (WORLD,)), _tp_plan())
    one_rank = S.num_params + (1 if rank == 1 else 0)  # only rank 1's vector is refused
    return {
        "exact": message(exact.sharded),
        "unsharded": message(cs.Curvature(plain, loss_fn, local, backend=FD).sharded),
        # (tensor-parallel ranks pass the same batches)
        "tensor_parallel": message(cs.Curvature(tp, loss_fn, everything, backend=FD).sharded),
        "trace": message(lambda: cs.trace(S, matvecs=4, method="hutch++")),
        "by_layer": message(lambda: cs.eigenvalues(S, by_layer=True)),
        # a check that fails on one rank only raises on both (before: the other one waited)
        "one_rank": message(lambda: S @ torch.zeros(one_rank, dtype=torch.float64)),
        "one_rank_v0": message(
            lambda: cs.eigenvalues(S, v0=torch.ones(one_rank, dtype=torch.float64))
        ),
        # a loss that fails on one rank inside the products: every rank stops at once (before,
        # the others waited in the engine's collective for the process group's timeout)
        "nan_one_rank": timed(
            lambda: message(
                lambda: (
                    cs.Curvature(model, nan_on_rank_1, local, backend=FD, reduction="mean")
                    .sharded()
                    .matmat(torch.ones(S.num_params, dtype=torch.float64))
                )
            )
        ),
    }


def timed(fn) -> tuple:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _still_held(S) -> dict:
    """How many of the tensors curvscope handed to the process group were still held by it
    when the call that handed them returned. Gloo's worker thread lets go of a collective's
    tensors after the caller's wait has returned, taking the GIL to do it; a script's
    ``dist.barrier()`` right after kept such a work until the barrier's own was dropped, on the
    worker, and when that raced the interpreter's exit the process aborted ("terminate called
    without an active exception", 6 of 36 runs of the README's FSDP2 script). Without the wait
    in ``distributed.released``, 13-20% of the reductions were still held on return."""
    handed: list[torch.Tensor] = []
    real = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        handed.append(tensor)
        return real(tensor, *args, **kwargs)

    dist.all_reduce = recording
    try:
        # each checked at once (the next call's wait would let the worker catch up)
        held_sums = sum(
            S.reduce_sum(torch.ones(3, dtype=torch.float64))._use_count() > 1 for _ in range(60)
        )
        before = len(handed)
        r = cs.eigenvalues(S, k=1)
        held_eig = sum(t._use_count() > 1 for t in handed[before:])
        # gather too (before, DTensor's all-gather: 2 of 24 runs aborted so when it came last)
        gathers = len(handed)
        held_gather = 0
        for _ in range(20):
            S.gather(r.vectors[:, 0])
            held_gather += handed[-1]._use_count() > 1
    finally:
        dist.all_reduce = real
    return {
        "sums": (held_sums, 60),
        "eigenvalues": (held_eig, gathers - before),
        "gather": (held_gather, len(handed) - gathers),
    }


def _worker(rank: int, port: int, out: str) -> None:
    _init(rank, port, WORLD)
    case, local = sharded_smooth(rank)  # with a sharded .grad the user holds
    plain, (X, y) = smooth(n=N).model, case.data
    model = case.model
    before = _local_state(model)
    C = cs.Curvature(model, case.loss_fn, local, backend=FD)
    S = C.sharded()
    V = _vectors(C.num_params)
    result: dict = {"local": S.num_params, "total": S.total_params, "repr": repr(S)}
    result["roundtrip"] = torch.equal(S.gather(S.shard(V)), V)
    result["sharded_hv"] = S.gather(S @ S.shard(V))
    result["single_hv"] = S.gather(S @ S.shard(V[:, 0]))
    result["full_hv"] = C @ V
    r = cs.eigenvalues(S, k=1, which="both", tol=1e-6, block_size=2)  # a sharded block QR
    result["values"], result["converged"] = r.values, r.all_converged
    result["vectors_shape"] = tuple(r.vectors.shape)
    result["vectors"] = S.gather(r.vectors)
    warm = cs.eigenvalues(S, k=1, v0=r.vectors[:, :1], tol=1e-6)
    result["warm"] = (float(warm.values[0]), warm.matvecs)
    # Hutchinson on sharded probes: each rank draws its own entries, sums reduced
    t = cs.trace(S, matvecs=24)
    t2 = cs.trace_of_square(S, matvecs=24)
    d = cs.diagonal(S, matvecs=24)
    result["trace"] = (t.value, t.stderr, t.method)
    result["trace_of_square"] = (t2.value, t2.stderr)
    result["diagonal"] = (d.value.shape[0], S.gather(d.value), S.gather(d.stderr))
    # CG on sharded vectors, damped past the most negative eigenvalue: (H + δI) x = b
    damping = 2 * abs(float(r.values[-1])) + 1.0
    b = S.shard(V[:, 0])
    sol = cs.spectrum.cg(S, b, tol=1e-10, max_matvecs=200, damping=damping)
    result["cg"] = (damping, S.gather(sol.x), sol.converged, sol.matvecs)
    # the spectral density by SLQ on sharded probes: plain and reorthogonalized Lanczos
    result["density"] = [
        (dens.nodes, dens.weights)
        for dens in (
            cs.density(S, steps=N_STEPS, probes=2, progress_bar=False),
            cs.density(S, steps=N_STEPS, probes=2, reorthogonalize=True, progress_bar=False),
        )
    ]
    result["untouched"] = _same(before, _local_state(model))
    result["matvecs"] = (S.matvecs, C.matvecs)
    result["refused"] = _refusals(rank, model, plain, case.loss_fn, local, (X, y))
    result["still_held"] = _still_held(S)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    _end()


@pytest.fixture(scope="module")
def reference():
    case = smooth(n=N)
    H = cs.Curvature(case.model, case.loss_fn, case.data, backend="double_backward").to_dense()
    return {"H": H, "eig": torch.linalg.eigvalsh(H)}


@pytest.mark.usefixtures("one_thread")
def test_sharded_vectors_of_an_fsdp2_model(tmp_path, reference):
    mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    H, eig = reference["H"], reference["eig"]
    u = torch.finfo(torch.float64).eps
    norm_h = float(torch.linalg.matrix_norm(H, 2))
    bound = fd.ACCURACY * u ** (2 / 3) * norm_h
    V = _vectors(H.shape[0])
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    # each rank holds its shard: the shards add up to the whole, and every rank holds less
    assert sum(g["local"] for g in got) == H.shape[0] == got[0]["total"]
    assert all(0 < g["local"] < g["total"] for g in got)
    for g in got:
        assert g["roundtrip"]
        # the same central differences as the full-vector operator (up to the order of sums)
        torch.testing.assert_close(g["sharded_hv"], g["full_hv"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g["single_hv"], g["full_hv"][:, 0], rtol=1e-9, atol=1e-12)
        err = (g["sharded_hv"] - H @ V).norm(dim=0) / V.norm(dim=0)
        assert float(err.max()) <= bound
        # the extreme eigenvalues, and eigenvectors whose gathered residuals are small
        assert g["converged"]
        want = torch.stack([eig[-1], eig[0]])
        assert (g["values"] - want).abs().max() <= 1e-6 * norm_h + bound
        assert g["vectors_shape"] == (g["local"], 2)
        Q = g["vectors"]
        torch.testing.assert_close(Q.norm(dim=0), torch.ones(2, dtype=Q.dtype))
        residual = (H @ Q - Q * g["values"]).norm(dim=0)
        assert float(residual.max()) <= 1e-3 * norm_h
        # warm-started from its own sharded eigenvector: a few products
        assert abs(g["warm"][0] - float(eig[-1])) <= 1e-6 * norm_h + bound
        assert g["warm"][1] <= 6
        # trace, tr(H²) and diag(H) by sharded Hutchinson probes, within 6 standard errors
        value, se, method = g["trace"]
        assert method == "hutchinson" and 0 < se < math.inf
        assert abs(value - float(torch.trace(H))) <= 6 * se + bound * H.shape[0]
        value, se = g["trace_of_square"]
        assert abs(value - float((H * H).sum())) <= 6 * se
        damping, x, converged, used = g["cg"]
        want = torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), V[:, 0])
        assert converged and used < 200
        assert float((x - want).norm() / want.norm()) <= 1e-8 + 2 * bound / damping
        for nodes, weights in g["density"]:  # Gauss nodes inside the spectrum, weights sum 1
            assert float(nodes.min()) >= float(eig[0]) - 1e-6 * norm_h - bound
            assert float(nodes.max()) <= float(eig[-1]) + 1e-6 * norm_h + bound
            torch.testing.assert_close(weights.sum(-1), torch.ones(2, dtype=weights.dtype))
        n_local, diag, diag_se = g["diagonal"]
        assert n_local == g["local"]
        assert bool(((diag - H.diagonal()).abs() <= 6 * diag_se + 1e-9).all())
        assert g["untouched"]
        assert g["matvecs"][1] == g["matvecs"][0] + 2 > 2  # C counts its own 2 too
        assert "of" in g["repr"] and str(g["total"]) in g["repr"]
        # every reduction's tensor let go of by the process group before the call returned
        assert g["still_held"]["sums"] == (0, 60)
        held, handed = g["still_held"]["eigenvalues"]
        assert held == 0 and handed > 10
        assert g["still_held"]["gather"] == (0, 40)  # the check every rank passes, and the sum
    # one operator: the ranks agree exactly
    torch.testing.assert_close(got[0]["values"], got[1]["values"], rtol=0, atol=0)
    for (n0, w0), (n1, w1) in zip(got[0]["density"], got[1]["density"], strict=True):
        assert torch.equal(n0, n1) and torch.equal(w0, w1)
    refused = got[0]["refused"]
    assert "backend='double_backward'" in refused["exact"]
    assert "not sharded" in refused["unsharded"]
    assert "cs.trace(method='hutch++') needs whole vectors" in refused["trace"]
    assert "method='hutchinson'" in refused["trace"]
    assert "by_layer=True needs whole vectors" in refused["by_layer"]
    assert "not sharded by FSDP2" in refused["tensor_parallel"]
    assert "rank 1 failed (this is rank 0)" in refused["one_rank"]
    assert "rank 1 failed (this is rank 0)" in refused["one_rank_v0"]
    (said0, seconds0), (said1, seconds1) = (
        got[0]["refused"]["nan_one_rank"],
        got[1]["refused"]["nan_one_rank"],
    )
    assert "rank 1 failed (this is rank 0)" in said0 and "nan" in said1.lower()
    assert max(seconds0, seconds1) < 20  # not the 60 s timeout of tests/distributed
    refused1 = got[1]["refused"]
    assert "S.shard(v)" in refused1["one_rank"] and "S.shard(v)" in refused1["one_rank_v0"]
    assert "one entry per entry of this rank's parameter shards" in refused1["one_rank"]
    assert "per parameter —" not in refused1["one_rank"]


def test_released_waits_only_while_another_reference_holds_the_tensor(monkeypatch):
    """``distributed.released`` returns at once for a tensor nothing else holds, and gives up
    after its timeout when something keeps holding it — here the autograd graph, which saves
    the tensor for the backward pass — with a warning, once: it waits no more in this process."""
    from curvscope.derivatives import distributed
    from curvscope.derivatives.distributed import references, released

    monkeypatch.setattr(distributed, "_waiting", True)
    t = torch.ones(3, requires_grad=True)
    holders = references(t)
    assert holders == 1
    start = time.perf_counter()
    released(t, holders)
    assert time.perf_counter() - start < 0.05
    y = (t * t).sum()  # the graph holds t
    assert references(t) > holders
    start = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="no longer waits"):
        released(t, holders, timeout=0.05)
    assert 0.05 <= time.perf_counter() - start < 1.0
    start = time.perf_counter()
    released(t, holders, timeout=5.0)  # still held, but no more waiting
    assert time.perf_counter() - start < 0.05
    monkeypatch.setattr(distributed, "_waiting", True)
    del y
    released(t, holders, timeout=5.0)  # the graph is gone: nothing else holds it
    assert references(t) == holders
