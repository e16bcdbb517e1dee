"""``diagnose``, ``update_curvature`` and the ``Monitor`` with ``sharded=True`` on a model sharded
by FSDP2 over two CPU processes (gloo): every vector of the diagnosis holds only this rank's
entries, nothing the size of the model is gathered or all-reduced, and the evidence equals the
exact single-process diagnosis on the full data within the products' accuracy (started from
the same vector: the ranks' shards of it), on every rank, the shards left as found. Without a
common start each rank draws its own entries of the start vector: the verdict is the same and
the sharpness within the diagnosis's 1% accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import curvscope as cs
from curvscope.diagnosis.diagnosis import DIAGNOSIS_TOL
from tests import cases
from tests.derivatives.test_finite_difference import smooth
from tests.diagnosis.test_diagnose_backend import accuracy, assert_agrees, step_factor
from tests.distributed.test_distributed import _end, run_ranks
from tests.distributed.test_fsdp import (
    BATCHES,
    FD,
    JUDGED,
    WORLD,
    N,
    _adam_steps,
    _init,
    _judge,
    _local_state,
    _same,
    _union,
    sharded_smooth,
)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def _start(n: int) -> torch.Tensor:
    """The common start of Lanczos: two columns (both ends' block), fixed."""
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


class _Spy:
    """While active: the sizes of the tensors all-reduced, and calls of DTensor.full_tensor
    (a sharded parameter or state gathered whole)."""

    def __init__(self) -> None:
        from torch.distributed.tensor import DTensor

        self.sizes: list[int] = []
        self.gathers = 0
        self._reduce, self._full, self._cls = dist.all_reduce, DTensor.full_tensor, DTensor

    def __enter__(self) -> _Spy:
        reduce, full = self._reduce, self._full

        def all_reduce(t, *args, **kwargs):
            self.sizes.append(t.numel())
            return reduce(t, *args, **kwargs)

        def full_tensor(t, *args, **kwargs):
            self.gathers += 1
            return full(t, *args, **kwargs)

        dist.all_reduce = all_reduce
        self._cls.full_tensor = full_tensor
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_reduce = self._reduce
        self._cls.full_tensor = self._full


def _worker(rank: int, port: int, out: str) -> None:
    _init(rank, port, WORLD)
    case, local = sharded_smooth(rank)
    model, loss_fn = case.model, case.loss_fn
    result: dict = {"sharded_params": type(next(model.parameters())).__name__}
    spy = _Spy()
    for name in JUDGED:
        kw = _judge(name, model)
        if name == "adam":
            before = _adam_steps(model, kw["optimizer"], loss_fn, local, 1.0)
        S = cs.Curvature(model, loss_fn, local, backend=FD).sharded()
        v0 = S.shard(_start(S.total_params))
        found = _local_state(model)
        options = {"train_batches": local, "backend": FD, "sharded": True, **kw}
        with spy:
            d = cs.diagnose(model, loss_fn, local, v0=v0, **options)
            free = cs.diagnose(model, loss_fn, local, **options)
        result[name] = {
            "diagnosis": d,
            "free": free,
            "untouched": _same(found, _local_state(model)),
            "lengths": {k: v.shape for k, v in d.vectors.items()},
            "local": S.num_params,
            "top": S.gather(d.vectors["top"]),
        }
    with spy:
        result["update"] = cs.diagnosis.update_curvature(
            model,
            loss_fn,
            local,
            before,
            kw["optimizer"],
            top=d.vectors["top"],
            backend=FD,
            sharded=True,
        )
    result["update_untouched"] = _same(found, _local_state(model))
    # a user's mistakes, refused with the fix on every rank: whole parameters as `before`, a
    # sharded vector as the warm start of a whole-vector diagnosis
    whole = {k: v.full_tensor() for k, v in before.items()}
    for name, call in (
        (
            "whole_before",
            lambda: cs.diagnosis.update_curvature(
                model, loss_fn, local, whole, lr=0.5, backend=FD, sharded=True
            ),
        ),
        ("sharded_v0", lambda: cs.diagnose(model, loss_fn, local, lr=0.5, backend=FD, v0=v0)),
    ):
        try:
            call()
        except ValueError as e:
            result[name] = str(e)
    result["sizes"], result["gathers"] = spy.sizes, spy.gathers
    result["n"] = S.total_params
    torch.save(result, Path(out) / f"rank{rank}.pt")
    _end()


@pytest.mark.usefixtures("one_thread")
def test_a_sharded_diagnosis_equals_the_exact_one_without_gathering_the_model(tmp_path):
    got = run_ranks(_worker, tmp_path, WORLD)
    # one process, exact products, all the data, whole vectors: the same points and starts
    case = smooth(n=N)
    X, y = case.data
    model, loss_fn = case.model, case.loss_fn
    every = [(X[s], y[s]) for r in range(WORLD) for s in BATCHES[r]]
    train = [(X[_union(i)], y[_union(i)]) for i in range(len(BATCHES[0]))]
    want, tolerance = {}, {}
    for name in JUDGED:
        kw = _judge(name, model)
        if name == "adam":
            before = _adam_steps(model, kw["optimizer"], loss_fn, every, 1.0 / WORLD)
        parts = [cases.dense_hessian(cases.Case("b", model, loss_fn, *b)) for b in train]
        tolerance[name] = (cases.dense_hessian(case), parts, step_factor(model, kw))
        n = sum(p.numel() for p in model.parameters())
        want[name] = cs.diagnose(model, loss_fn, case.data, v0=_start(n), train_batches=train, **kw)
    update = cs.diagnosis.update_curvature(
        model, loss_fn, case.data, before, kw["optimizer"], top=want["adam"].vectors["top"]
    )

    for rank, result in enumerate(got):
        assert result["sharded_params"] == "DTensor"
        for name in JUDGED:
            r = result[name]
            assert r["untouched"], name
            H, parts, scale = tolerance[name]
            l2 = 0.3 if name == "momentum" else 0.0
            d = r["diagnosis"]
            assert_agrees(d, want[name], H, parts, scale, l2)
            assert d.evidence["layer_shares"] == pytest.approx(
                want[name].evidence["layer_shares"], abs=1e-6
            )
            # this rank's entries only; gathered, the exact diagnosis's eigenvector
            assert r["lengths"] == {"top": (r["local"],), "bottom": (r["local"],)}
            assert r["local"] < result["n"]
            top, exact = r["top"], want[name].vectors["top"]
            assert min((top - exact).norm(), (top + exact).norm()) < 1e-4
            # from each rank's own random start: the same verdict, within the 1% accuracy
            free = r["free"]
            assert free.state == want[name].state
            s, e = free.evidence["sharpness"], want[name].evidence["sharpness"]
            assert abs(s - e) <= DIAGNOSIS_TOL * abs(e), (name, s, e)
            if rank == 1:  # every rank decided alike, to the last bit (but the clock)
                for key in ("free", "diagnosis"):
                    a, b = dict(r[key].evidence), dict(got[0][name][key].evidence)
                    assert {k for k in a if a[k] != b[k]} == {"seconds"}, key
        u = result["update"]
        H, _, scale = tolerance["adam"]
        assert result["update_untouched"]
        assert u.limit == update.limit
        assert abs(u.curvature - update.curvature) <= scale * accuracy(H)
        assert abs(u.top_curvature - update.top_curvature) <= scale * accuracy(H)
        assert "pass copies of the sharded parameters" in result["whole_before"]
        assert "C.sharded().gather(v) makes it whole" in result["sharded_v0"]
        # nothing the size of the model was gathered or summed over the ranks: the largest
        # all-reduce is a block of Krylov inner products or the argument check's 16 numbers
        assert result["gathers"] == 0
        assert max(result["sizes"]) < result["n"] // 2, max(result["sizes"])


#: the Monitor's run: steps, the probes' cadence and the cheap tier's
STEPS, EVERY, UPDATE_EVERY = 12, 6, 2


def _monitor_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port, WORLD)
    case, local = sharded_smooth(rank)
    model, loss_fn = case.model, case.loss_fn
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    common = {"optimizer": opt, "every": EVERY, "update_every": UPDATE_EVERY, "backend": FD}
    sharded = cs.Monitor(model, loss_fn, local, sharded=True, **common)
    whole = cs.Monitor(model, loss_fn, local, **common)
    spy = _Spy()
    for step in range(STEPS):
        opt.zero_grad()
        x, t = local[step % len(local)]
        loss = loss_fn(model(x), t)
        loss.backward()
        opt.step()
        with spy:
            sharded.step(loss)
        whole.step(loss)
    torch.save(
        {
            "sharded": [d.evidence for d in sharded.history],
            "whole": [d.evidence for d in whole.history],
            "states": ([d.state for d in sharded.history], [d.state for d in whole.history]),
            "updates": ([u for _, u in sharded.updates], [u for _, u in whole.updates]),
            "warm": sharded._warm_start().shape,
            "gathers": spy.gathers,
        },
        Path(out) / f"rank{rank}.pt",
    )
    _end()


@pytest.mark.usefixtures("one_thread")
def test_a_sharded_monitor_says_what_a_whole_vector_one_says_without_gathering(tmp_path):
    """A Monitor with sharded=True beside one with whole vectors, on the same FSDP2 training
    run: the same probes, verdicts and cheap-tier checks (within the probes' accuracy: each
    draws its own start), its warm start kept as this rank's entries, nothing gathered."""
    got = run_ranks(_monitor_worker, tmp_path, WORLD)
    n = sum(p.numel() for p in smooth(n=N).model.parameters())
    for result in got:
        assert result["gathers"] == 0
        sharded, whole = result["states"]
        assert len(sharded) == STEPS // EVERY and sharded == whole
        for a, b in zip(result["sharded"], result["whole"], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-9)
            assert a["sharpness"] == pytest.approx(b["sharpness"], rel=0.05)
        ours, theirs = result["updates"]
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs, strict=True):
            assert a.limit == b.limit
            assert a.curvature == pytest.approx(b.curvature, rel=1e-4)
        assert result["warm"][0] < n  # this rank's entries of the top and bottom vectors
    assert got[0]["states"] == got[1]["states"]


def _one_rank_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    _init(rank, port, 1)
    case = smooth(n=N)
    fully_shard(case.model)
    common = {"lr": 0.5, "backend": FD}
    d = cs.diagnose(case.model, case.loss_fn, case.data, sharded=True, **common)
    whole = cs.diagnose(case.model, case.loss_fn, case.data, **common)
    torch.save({"sharded": d, "whole": whole}, Path(out) / "rank0.pt")
    _end()


@pytest.mark.usefixtures("one_thread")
def test_on_one_rank_the_shard_is_the_whole_vector(tmp_path):
    """FSDP2 over a world of one (a script tried on one device first): sharded=True is taken,
    draws the same start as whole vectors, and diagnoses alike."""
    (got,) = run_ranks(_one_rank_worker, tmp_path, 1)
    d, whole = got["sharded"], got["whole"]
    assert d.state == whole.state
    assert d.evidence["matvecs"] == whole.evidence["matvecs"]
    for key in ("sharpness", "lambda_min", "grad_norm", "directional_curvature"):
        assert d.evidence[key] == pytest.approx(whole.evidence[key], rel=1e-9), key
    torch.testing.assert_close(d.vectors["top"], whole.vectors["top"], rtol=0, atol=1e-9)
