"""FSDP2 (``fully_shard``) on two CPU processes (gloo): finite-difference Hessian products of
the sharded model, over uneven data shards, equal the single-process exact product on the full
data within the stated accuracy; λ_max by them; the sharded parameters, their gradients and the
RNG left bit for bit as found; and the same for a plain (unsharded) model under the group.
A sharded model under a local operator, or ranks with different numbers of batches (each
forward is a collective), get a clear error on every rank. ``diagnose`` and ``update_curvature``
with ``backend="finite_difference"`` on the sharded model (gradient descent, SGD with momentum
and weight decay, Adam with its sharded state) equal the exact single-process diagnosis on the
full data within the products' accuracy, on every rank, the shards left as found."""

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
from tests import cases
from tests.derivatives.test_finite_difference import smooth
from tests.diagnosis.test_diagnose_backend import accuracy, assert_agrees, step_factor
from tests.distributed.test_distributed import _end, _free_port, run_ranks

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
        "errors": C.product_errors,
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


def failing_loss(loss_fn):
    """``loss_fn`` that raises "the loss failed" at its third call with gradients on: a
    product's −εv evaluation's first batch (two batches a pass; the first loss's checks
    evaluate it without gradients, not counted)."""
    calls = []

    def failing(out, target):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("the loss failed")
        return loss_fn(out, target)

    return failing


def _init(rank: int, port: int, world: int) -> None:
    """This process's gloo rank, one thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))


def _worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    _init(rank, port, WORLD)
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
    F = cs.Curvature(model, failing_loss(case.loss_fn), local, backend=FD, reduction="mean")
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
    # likewise train_batches (each measured by all ranks): one rank returned a verdict and the
    # other waited for it until the process group's timeout
    try:
        train = local if rank == 0 else local[:1]
        cs.diagnose(model, case.loss_fn, local, lr=0.5, backend=FD, train_batches=train)
    except ValueError as e:
        result["train_batches_refused"] = str(e)
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
        assert "train_batches ran out on 1 of 2 ranks" in got["train_batches_refused"]
    # every rank took the same steps: the same products, estimates and values (a plain model's
    # differences are summed over the ranks before the step is decided; before, each rank
    # decided on its own partial product and they could take different numbers of passes)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for key in ("plain", "fsdp"):
        assert got[0][key]["errors"] == got[1][key]["errors"]
        assert torch.equal(got[0][key]["hv"], got[1][key]["hv"])
        assert torch.equal(got[0][key]["lam"], got[1][key]["lam"])


# ----------------------------------------------------------------------------- diagnose
#: the optimizers the sharded diagnosis is judged with (tests/diagnosis/test_diagnose_backend.py)
JUDGED = ("gd", "momentum", "adam")


def _judge(name: str, model: torch.nn.Module) -> dict:
    """diagnose's keywords for an optimizer of ``model``: plain gradient descent, SGD with
    momentum and weight decay (L2), or Adam (stepped by :func:`_adam_steps`)."""
    if name == "gd":
        return {"lr": 0.5}
    if name == "momentum":
        return {
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.3)
        }
    return {"optimizer": torch.optim.Adam(model.parameters(), lr=0.01)}


def _adam_steps(model, opt, loss_fn, batches, weight: float) -> dict:
    """Three steps of ``opt`` on the gradient weight·Σ_b ∇L_b (under FSDP2 each rank passes its
    own batches with weight 1 and the engine averages the ranks: one process passes all of them
    with weight 1/2), then one more backward (a .grad the user holds); returns the parameters
    before the last step, by name."""
    for _ in range(3):
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        opt.zero_grad()
        for x, t in batches:
            (loss_fn(model(x), t) * weight).backward()
        opt.step()
    loss_fn(model(batches[0][0]), batches[0][1]).backward()
    return before


def _diagnose_all(model, loss_fn, data, batches, weight, train, measure=None, **backend) -> dict:
    """The diagnoses with every optimizer of :data:`JUDGED` (Adam after its steps, with the
    curvature along its last update), each with whether the model was left as found;
    ``measure(name, kw)`` is called where each diagnosis stands (the reference's dense
    Hessians)."""
    out: dict = {}
    for name in JUDGED:
        kw = _judge(name, model)
        if name == "adam":
            before = _adam_steps(model, kw["optimizer"], loss_fn, batches, weight)
        if measure is not None:
            measure(name, kw)
        found = _local_state(model)
        d = cs.diagnose(model, loss_fn, data, train_batches=train, **kw, **backend)
        out[name] = {"diagnosis": d, "untouched": _same(found, _local_state(model))}
    u = cs.diagnosis.update_curvature(
        model, loss_fn, data, before, kw["optimizer"], top=d.vectors["top"], **backend
    )
    out["update"] = u
    out["update_untouched"] = _same(found, _local_state(model))
    return out


def sharded_smooth(rank: int) -> tuple:
    """:func:`smooth` sharded by FSDP2 (each Linear, then the root), this rank's batches of
    :data:`BATCHES`, and a sharded ``.grad`` the user holds (one backward)."""
    from torch.distributed.fsdp import fully_shard

    case = smooth(n=N)
    X, y = case.data
    local = [(X[s], y[s]) for s in BATCHES[rank]]
    for layer in case.model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(case.model)
    case.loss_fn(case.model(local[0][0]), local[0][1]).backward()
    return case, local


def _diagnose_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port, WORLD)
    case, local = sharded_smooth(rank)
    model = case.model
    # each rank's i-th batch is its part of the i-th global mini-batch
    result = _diagnose_all(model, case.loss_fn, local, local, 1.0, local, backend=FD)
    result["sharded_params"] = type(next(model.parameters())).__name__
    torch.save(result, Path(out) / f"rank{rank}.pt")
    _end()


def _union(i: int) -> torch.Tensor:
    """The samples of the i-th global mini-batch: every rank's i-th local batch."""
    return torch.cat([torch.arange(N)[BATCHES[r][i]] for r in range(WORLD)])


@pytest.mark.usefixtures("one_thread")
def test_fsdp2_diagnose_by_finite_differences_equals_the_exact_single_process_diagnosis(tmp_path):
    mp.start_processes(
        _diagnose_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    # one process, exact products, all the data: the same points, the same Adam state
    case = smooth(n=N)
    X, y = case.data
    model = case.model
    every = [(X[s], y[s]) for r in range(WORLD) for s in BATCHES[r]]
    train = [(X[_union(i)], y[_union(i)]) for i in range(len(BATCHES[0]))]
    tolerance = {}  # name -> (H, the training batches' H, max(S)) where each diagnosis stands

    def measure(name: str, kw: dict) -> None:
        parts = [cases.dense_hessian(cases.Case("b", model, case.loss_fn, *b)) for b in train]
        tolerance[name] = (cases.dense_hessian(case), parts, step_factor(model, kw))

    want = _diagnose_all(model, case.loss_fn, case.data, every, 1.0 / WORLD, train, measure)
    # H + 0.3·I is positive definite where SGD's diagnosis stands: its Newton decrement is compared
    assert want["momentum"]["diagnosis"].evidence["newton_decrement"] is not None

    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["sharded_params"] == "DTensor"
        for name in JUDGED:
            assert got[name]["untouched"], name
            H, parts, scale = tolerance[name]
            l2 = 0.3 if name == "momentum" else 0.0
            assert_agrees(got[name]["diagnosis"], want[name]["diagnosis"], H, parts, scale, l2)
        H, _, scale = tolerance["adam"]
        u, v = got["update"], want["update"]
        assert got["update_untouched"]
        assert u.limit == v.limit
        assert abs(u.curvature - v.curvature) <= scale * accuracy(H)
        assert abs(u.top_curvature - v.top_curvature) <= scale * accuracy(H)


#: FSDP2's switches of a gradient accumulation in progress (finite_difference._MODES)
SWITCHES = (
    "set_is_last_backward",
    "set_requires_gradient_sync",
    "set_requires_all_reduce",
    "set_reshard_after_backward",
)


def _one_rank_worker(rank: int, port: int, out: str) -> None:
    """FSDP2 on a world of one: the model under mixed-precision policies, and measured after an
    evaluation forward (no backward), against a twin that is not measured."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _init(rank, port, 1)
    result: dict = {}
    narrow = {
        "param_dtype": MixedPrecisionPolicy(param_dtype=torch.bfloat16),
        "reduce_dtype": MixedPrecisionPolicy(reduce_dtype=torch.bfloat16),
        "output_dtype": MixedPrecisionPolicy(output_dtype=torch.float16),
        "none": MixedPrecisionPolicy(),
    }
    for name, policy in narrow.items():
        case = smooth(torch.float32, n=N)
        fully_shard(case.model, mp_policy=policy)
        try:
            C = cs.Curvature(case.model, case.loss_fn, case.data, backend=FD)
            result[name] = float(cs.eigenvalues(C, k=1).values[0])
        except ValueError as e:
            result[name] = str(e)
    # an evaluation forward under no_grad leaves fully_shard's root with plain unsharded
    # parameters (their storage freed by the next forward): measured through them, a product
    # wrote into freed memory (a segfault) — now the modules are resharded first
    models = []
    for _ in range(2):
        case = smooth(n=N)
        fully_shard(case.model)
        opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
        case.loss_fn(case.model(case.inputs), case.targets).backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            case.model(case.inputs)
        models.append((case, opt))
    (case, _), (twin, _) = models
    result["unsharded"] = [type(p).__name__ for p in case.model.parameters()]
    # the exact backends on it, sharded or (after that forward) not: refused with the fix
    result["exact"] = []
    for model in (case.model, twin.model):
        for backend in ("auto", "double_backward"):
            try:
                cs.Curvature(model, case.loss_fn, case.data, backend=backend)
                result["exact"].append("not refused")
            except ValueError as e:
                result["exact"].append(str(e))
    # curvscope's optimizers on a sharded model's parameters: refused with the fix
    fresh = smooth(n=N)
    fully_shard(fresh.model)
    result["optimizers"] = {}
    for name in cs.optim.names():
        try:
            built = cs.optim.build(name, fresh.model.parameters())
            result["optimizers"][name] = type(built).__module__
        except ValueError as e:
            result["optimizers"][name] = str(e)
    C = cs.Curvature(case.model, case.loss_fn, case.data, backend=FD)
    result["eval_hv"] = C @ _vector(C.num_params)
    result["eval_diagnosis"] = cs.diagnose(
        case.model, case.loss_fn, case.data, lr=0.5, backend=FD, sharded=True
    )
    for c, o in models:  # the user's training goes on
        c.loss_fn(c.model(c.inputs), c.targets).backward()
        o.step()
    result["stepped_alike"] = all(
        torch.equal(a.full_tensor(), b.full_tensor())
        for a, b in zip(case.model.parameters(), twin.model.parameters(), strict=True)
    )
    # a gradient accumulation in progress, one of its switches off: refused before any pass,
    # and the user's accumulation and step are a twin's
    for setter in SWITCHES:
        pair = []
        for _ in range(2):
            case = smooth(n=N)
            fully_shard(case.model)
            opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
            getattr(case.model, setter)(False)
            case.loss_fn(case.model(case.inputs[:10]), case.targets[:10]).backward()
            pair.append((case, opt))
        try:
            cs.Curvature(case.model, case.loss_fn, case.data, backend=FD)
            result[setter] = "not refused"
        except ValueError as e:
            result[setter] = str(e)
        for c, o in pair:
            getattr(c.model, setter)(True)
            c.loss_fn(c.model(c.inputs[10:]), c.targets[10:]).backward()
            o.step()
        result[setter + " stepped alike"] = all(
            torch.equal(a.full_tensor(), b.full_tensor())
            for a, b in zip(
                pair[0][0].model.parameters(), pair[1][0].model.parameters(), strict=True
            )
        )
    torch.save(result, Path(out) / f"rank{rank}.pt")
    _end()


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> dict:
    (got,) = run_ranks(_one_rank_worker, tmp_path_factory.mktemp("one_rank"), 1)
    return got


def test_a_mixed_precision_policy_narrower_than_the_parameters_is_refused_with_the_fix(one_rank):
    """FSDP2 computing (or reducing, or returning) in 16 bits rounds θ ± εv and the gradients:
    refused at construction with the fix — before, a float32 MLP under param_dtype=bfloat16
    gave products 13–89% of ‖H‖‖v‖ off, two of three estimated exact, and λ_max 0 "converged"
    (exact 1.857). The default policy (the parameters' dtype throughout) is measured."""
    for field in ("param_dtype", "reduce_dtype", "output_dtype"):
        message = one_rank[field]
        assert isinstance(message, str), field
        assert f"MixedPrecisionPolicy has {field}=torch." in message
        assert "mp_policy=MixedPrecisionPolicy()" in message and "load the state dict" in message
    case = smooth(torch.float32, n=N)
    exact = cs.eigenvalues(cs.Curvature(case.model, case.loss_fn, case.data)).values[0]
    assert one_rank["none"] == pytest.approx(float(exact), rel=1e-3)


def test_a_model_measured_after_an_evaluation_forward_is_resharded_first(one_rank):
    """After a no_grad forward the root's parameters were plain unsharded tensors (a segfault
    when measured): the products and the sharded diagnosis equal the exact ones at the same
    point, and the user's next step equals a twin's that was not measured."""
    assert one_rank["unsharded"] == ["Parameter"] * len(one_rank["unsharded"])
    case = smooth(n=N)
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    case.loss_fn(case.model(case.inputs), case.targets).backward()
    opt.step()
    H = cases.dense_hessian(case)
    V = _vector(H.shape[0])
    err = (one_rank["eval_hv"] - H @ V).norm(dim=0) / V.norm(dim=0)
    assert float(err.max()) <= accuracy(H)
    d = one_rank["eval_diagnosis"]
    assert d.state == cs.diagnose(case.model, case.loss_fn, case.data, lr=0.5).state
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert d.evidence["sharpness"] == pytest.approx(top, rel=1e-6)
    assert one_rank["stepped_alike"]


def test_the_exact_backends_are_refused_on_a_sharded_model(one_rank):
    """FSDP2's products by double backward came out 0 — λ_max 0.0, "converged", where finite
    differences read 0.733 (an outside review): refused at construction, naming the fix, also
    after an evaluation forward left the root's parameters plain tensors."""
    assert len(one_rank["exact"]) == 4
    for message in one_rank["exact"]:
        assert "backend='finite_difference'" in message and "fully_shard" in message


def test_curvscopes_optimizers_refuse_a_sharded_models_parameters_with_the_fix(one_rank):
    """NewtonCG and AdaHessian on FSDP2's shards failed with DTensor's "Cannot flatten unevenly
    sharded tensor" (an outside review), and on even shards their double backward would give
    products of 0, as the exact backends' did: every curvscope optimizer refuses DTensor
    parameters at construction, naming torch.optim and the finite-difference backend; torch's
    own entries of the registry build as ever."""
    built = one_rank["optimizers"]
    for name in cs.optim.names():
        if cs.optim.get(name).source == "torch":
            assert built[name].startswith("torch.optim"), (name, built[name])
        else:
            assert "fully_shard" in built[name] and "torch.optim" in built[name], name
            assert "backend='finite_difference'" in built[name], name


@pytest.mark.parametrize("setter", SWITCHES)
def test_a_gradient_accumulation_in_progress_is_refused_before_any_pass(one_rank, setter):
    """With one of FSDP2's accumulation switches off, a product was wrong and said converged
    (set_is_last_backward(False): λ_max 0.58 for 1.85), or refused only after its backward had
    been added to the user's accumulated gradient (set_requires_gradient_sync(False)): now it is
    refused at construction with the fix, and the user's step equals a twin's."""
    message = one_rank[setter]
    assert f"{setter}(False) is in effect" in message and f"{setter}(True) is back" in message
    assert one_rank[setter + " stepped alike"]
