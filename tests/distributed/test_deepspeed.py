"""DeepSpeed ZeRO-3 on two CPU processes (gloo): finite-difference Hessian products of the
engine (``cs.Curvature(engine, ...)``), each rank its own shard of the data, equal the exact
single-process product on all the data within the stated accuracy in float32 (ZeRO-3's
gradients are float32); λ_max by them; the sharded view (``C.sharded()``: this rank's partition
of each parameter) gives the same products; ``diagnose(..., sharded=True)`` the exact
diagnosis's verdict and sharpness; the engine is left bit for bit as found — partitions, the
user's gradient partitions, the micro-step counter, so that ``engine.step()`` after curvscope's
products, in the middle of a gradient accumulation, gives the same parameters as without them
— also when the loss fails. What is not supported is refused with the fix: ``engine.module``
passed instead of the engine, ZeRO stage 2, bf16.

DeepSpeed is imported only in the spawned workers (with DS_ACCELERATOR=cpu and without its
shm op, which would need a compiler): ``deepspeed.initialize`` patches torch process-wide."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import curvscope as cs
from curvscope.derivatives import finite_difference as fd
from curvscope.diagnosis.diagnosis import DIAGNOSIS_TOL
from tests import cases
from tests.derivatives.test_finite_difference import as_float64, smooth
from tests.distributed.test_distributed import _free_port
from tests.distributed.test_fsdp import BATCHES, FD, WORLD, N, _union

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
    pytest.mark.skipif(
        __import__("importlib.util").util.find_spec("deepspeed") is None,
        reason="deepspeed is not installed (it is in the dev extra: pip install -e '.[dev]')",
    ),
]

#: the plain gradient descent the diagnosis judges
LR = 0.5


def _config(stage: int = 3, **extra: object) -> dict:
    """A float32 ZeRO config: the biases (at most 8 entries) stay gathered ("persistent"),
    the weights are partitioned; two micro-batches a step."""
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {
            "stage": stage,
            "stage3_param_persistence_threshold": 10,
            # its default replaces F.linear process-wide with a function without forward AD
            "memory_efficient_linear": False,
        },
        "zero_allow_untested_optimizer": True,
        **extra,
    }


def _deepspeed(rank: int, port: int) -> object:
    """This process's rank in DeepSpeed's gloo group, on the CPU, one thread."""
    os.environ.update(
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no g++ build
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def _engine(deepspeed, config: dict, dtype: torch.dtype = torch.float32):
    """A fresh engine over :func:`smooth`'s model and this rank's batches."""
    case = smooth(dtype, n=N)
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1, momentum=0.9)
    engine, _, _, _ = deepspeed.initialize(model=case.model, optimizer=opt, config=config)
    X, y = case.data
    local = [(X[s], y[s]) for s in BATCHES[dist.get_rank()]]
    return engine, case.loss_fn, local


def _state(engine, padding: bool = True) -> dict:
    """What a step reads: the partitions (and persistent parameters' values), the gradient
    partitions, the float32 master copy, the optimizer's micro-step counter; without the
    partitions' padding where ``padding`` is False."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad

    opt = engine.optimizer
    params = list(engine.module.parameters())
    if padding:
        grads = [opt.grad_partitions_flat_buffer]
        master = list(opt.fp32_partitioned_groups_flat)
        partitions = [p.ds_tensor for p in params]
    else:
        real = [
            max(0, min(p.ds_numel - dist.get_rank() * p.ds_tensor.numel(), p.ds_tensor.numel()))
            for p in params
        ]
        grads = [safe_get_local_grad(p)[:n] for p, n in zip(params, real, strict=True)]
        master = [safe_get_local_fp32_param(p)[:n] for p, n in zip(params, real, strict=True)]
        partitions = [p.ds_tensor[:n] for p, n in zip(params, real, strict=True)]
    return {
        "partitions": [t.clone() for t in partitions],
        "data": [p.data.clone() for p in params],
        "grads": [t.clone() for t in grads],
        "master": [t.clone() for t in master],
        "micro_step": opt.micro_step_id,
        "epilogue": opt._epilogue_ran_this_backward,
    }


def _same(a: dict, b: dict) -> bool:
    tensors = ("partitions", "data", "master", "grads")
    return all(torch.equal(x, y) for k in tensors for x, y in zip(a[k], b[k], strict=True)) and (
        a["micro_step"],
        a["epilogue"],
    ) == (b["micro_step"], b["epilogue"])


def _user_step(engine, loss_fn, batch) -> None:
    """One micro-batch of the user's training: forward, the engine's backward and its step
    (which updates the parameters every ``gradient_accumulation_steps`` micro-batches)."""
    x, t = batch
    engine.backward(loss_fn(engine(x), t))
    engine.step()


def _vector(n: int) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _worker(rank: int, port: int, out: str) -> None:
    deepspeed = _deepspeed(rank, port)
    result: dict = {}
    # the engine measured, and a twin that is not: the same training on both
    engine, loss_fn, local = _engine(deepspeed, _config())
    twin, _, _ = _engine(deepspeed, _config())
    params = list(engine.module.parameters())
    for e in (engine, twin):  # one micro-batch of a two-batch accumulation
        _user_step(e, loss_fn, local[0])
    # a bias the engine keeps gathered (whole), two it has not gathered yet, the weights
    result["persistent"] = [(p.data.numel() == p.ds_numel, p.ds_persist) for p in params]
    found = _state(engine)
    C = cs.Curvature(engine, loss_fn, local, backend=FD)
    V = _vector(C.num_params).float()
    result["hv"] = C @ V
    top = cs.eigenvalues(C, k=1, which="largest")
    result["lam"], result["converged"] = float(top.values[0]), top.converged
    result["loss"], result["grad"] = C.loss_and_gradient()
    result["errors"] = C.product_errors
    result["untouched"] = _same(found, _state(engine))
    # the sharded view: this rank's partition of each parameter, padding excluded
    S = C.sharded()
    result["local"], result["n"] = S.num_params, S.total_params
    result["sharded_hv"] = S.gather(S @ S.shard(V))
    result["sharded_lam"] = float(cs.eigenvalues(S, k=1, which="largest").values[0])
    _, g = S.loss_and_gradient()
    result["sharded_grad"] = S.gather(g)
    result["sharded_untouched"] = _same(found, _state(engine))
    # the diagnosis, its vectors sharded
    result["diagnosis"] = cs.diagnose(
        engine, loss_fn, local, lr=LR, train_batches=local, backend=FD, sharded=True
    )
    result["diagnosis_untouched"] = _same(found, _state(engine))
    # a loss that fails on one evaluation leaves the engine as found too
    calls = []

    def failing(out, target):
        calls.append(1)
        if len(calls) == 3:  # the −εv evaluation's first batch
            raise RuntimeError("the loss failed")
        return loss_fn(out, target)

    F = cs.Curvature(engine, failing, local, backend=FD, reduction="mean")
    try:
        F @ V[:, 0]
    except RuntimeError as e:
        result["failed_with"] = str(e)
    result["failure_untouched"] = _same(found, _state(engine))
    # the user's training goes on: the second micro-batch and the update, on both engines;
    # the Monitor's copy of the parameters before it (this rank's partitions: .data is empty)
    mon = cs.Monitor(engine, loss_fn, local, lr=LR, backend=FD, sharded=True)
    before = mon._trainable_copy()
    for e in (engine, twin):
        _user_step(e, loss_fn, local[1])
    # the curvature along the update, on sharded vectors and on whole ones
    result["update"] = [
        cs.diagnosis.update_curvature(
            engine, loss_fn, local, before, lr=LR, backend=FD, sharded=sharded
        ).curvature
        for sharded in (True, False)
    ]
    result["theta"] = [S.gather(S.flatten(list(before.values()))), S.gather(S.flatten(params))]
    # (the partitions' padding left out: torch.empty's, different in the two engines)
    result["stepped_alike"] = _same(_state(engine, padding=False), _state(twin, padding=False))
    result["moved"] = not torch.equal(found["partitions"][0], _state(engine)["partitions"][0])
    # the engine's module instead of the engine: refused with the fix
    try:
        cs.Curvature(engine.module, loss_fn, local, backend=FD)
    except ValueError as e:
        result["module_refused"] = str(e)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    os._exit(0)  # gloo's threads may abort an interpreter's teardown


@pytest.fixture(scope="module")
def reference():
    """The exact float64 Hessian of the float32 model (its values taken exactly) on all the
    data, and the exact diagnosis in float64 on the same batches."""
    case = as_float64(smooth(torch.float32, n=N))
    H = cases.dense_hessian(case)
    C = cs.Curvature(case.model, case.loss_fn, case.data, backend="double_backward")
    loss, g = C.loss_and_gradient()
    X, y = case.data
    train = [(X[_union(i)], y[_union(i)]) for i in range(len(BATCHES[0]))]
    d = cs.diagnose(case.model, case.loss_fn, case.data, lr=LR, train_batches=train)
    return {"H": H, "lam": float(torch.linalg.eigvalsh(H)[-1]), "loss": loss, "grad": g, "d": d}


def test_zero3_products_equal_the_exact_single_process_product(tmp_path, reference):
    mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    H = reference["H"]
    # float32's bound: the gradients are float32 (ZeRO-3 reduces and accumulates them so)
    bound = fd.ACCURACY * torch.finfo(torch.float32).eps ** (2 / 3)
    bound *= float(torch.linalg.matrix_norm(H, 2))
    V = _vector(H.shape[0]).float().double()
    want = H @ V
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in got:
        assert r["persistent"] == [
            (False, False),
            (True, True),
            (False, False),
            (False, True),
            (False, False),
            (False, True),
        ]
        for key in ("hv", "sharded_hv"):
            err = (r[key].double() - want).norm(dim=0) / V.norm(dim=0)
            assert float(err.max()) <= bound, (key, err, bound)
        # the view's products are the full-vector ones (the same differences, fewer entries)
        torch.testing.assert_close(r["sharded_hv"], r["hv"], rtol=0, atol=bound / 10)
        assert r["converged"]
        for key in ("lam", "sharded_lam"):
            assert abs(r[key] - reference["lam"]) <= 1e-3 * reference["lam"], key
        assert r["loss"] == pytest.approx(reference["loss"], rel=1e-6)
        for key in ("grad", "sharded_grad"):
            torch.testing.assert_close(r[key].double(), reference["grad"], rtol=1e-5, atol=1e-6)
        assert 0 < r["local"] < r["n"] == H.shape[0]
        d, e = r["diagnosis"], reference["d"]
        assert d.state == e.state
        s, t = d.evidence["sharpness"], e.evidence["sharpness"]
        assert abs(s - t) <= DIAGNOSIS_TOL * abs(t), (s, t)
        for key in ("untouched", "sharded_untouched", "diagnosis_untouched", "failure_untouched"):
            assert r[key], key
        assert r["failed_with"] == "the loss failed"
        assert r["moved"] and r["stepped_alike"]
        # the curvature along the update uᵀHu/uᵀu, H where the update ended (float64, exact)
        H_after, u = _hessian_at(r["theta"][1]), (r["theta"][1] - r["theta"][0]).double()
        want_u = float(u @ H_after @ u / (u @ u))
        norm = float(torch.linalg.matrix_norm(H_after, 2))
        for got_u in r["update"]:
            assert (
                abs(got_u - want_u)
                <= fd.ACCURACY * torch.finfo(torch.float32).eps ** (2 / 3) * norm
            ), (got_u, want_u)
        assert "engine.module" in r["module_refused"]
        assert "deepspeed.initialize" in r["module_refused"]
    # every rank took the same steps: the same products and values
    assert got[0]["errors"] == got[1]["errors"]
    assert torch.equal(got[0]["hv"], got[1]["hv"])


def _hessian_at(theta: torch.Tensor) -> torch.Tensor:
    """The exact float64 Hessian of :func:`smooth`'s loss on all the data at the float32
    parameters ``theta`` (flat)."""
    case = as_float64(smooth(torch.float32, n=N))
    torch.nn.utils.vector_to_parameters(theta.double(), case.model.parameters())
    return cases.dense_hessian(case)


def _refusals_worker(rank: int, port: int, out: str) -> None:
    deepspeed = _deepspeed(rank, port)
    result: dict = {}
    for name, config in (
        ("stage2", _config(stage=2)),
        ("bf16", _config(bf16={"enabled": True})),
    ):
        engine, loss_fn, local = _engine(deepspeed, config)
        try:
            cs.Curvature(engine, loss_fn, local, backend=FD)
        except ValueError as e:
            result[name] = str(e)
    # an exact backend cannot differentiate the engine's empty parameters
    engine, loss_fn, local = _engine(deepspeed, _config())
    try:
        cs.Curvature(engine, loss_fn, local)
    except ValueError as e:
        result["exact"] = str(e)
    # the stability limit cannot read the engine's optimizer (its own flat partitions): refused
    # with the fix, by diagnose and — at construction — by the Monitor
    for name, call in (
        ("diagnose", lambda: cs.diagnose(engine, loss_fn, local, engine.optimizer, backend=FD)),
        ("monitor", lambda: cs.Monitor(engine, loss_fn, local, engine.optimizer, backend=FD)),
    ):
        try:
            call()
        except ValueError as e:
            result[name] = str(e)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    os._exit(0)


def test_what_zero3_products_do_not_support_is_refused_with_the_fix(tmp_path):
    mp.start_processes(
        _refusals_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert "stage 2" in got["stage2"] and "'stage': 3" in got["stage2"]
        assert "bf16" in got["bf16"] and "float32" in got["bf16"]
        assert "backend='finite_difference'" in got["exact"]
        for name in ("diagnose", "monitor"):
            assert "ZeRO-3" in got[name] and "pass lr=" in got[name], name
