"""curvscope's optimizers under DDP, two processes on CPU (gloo): each rank's closure computes
its own shard's loss and the optimizer differentiates it itself, so DDP's gradient all-reduce
never reached it — AdaHessian's and NewtonCG's replicas drifted apart after one step, without a
word (an outside review). Now the loss, gradient, products and trial losses are averaged over
the ranks: the replicas stay equal, and equal to one process stepping on all the data."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import curvscope as cs
from tests import cases
from tests.distributed.test_distributed import _init, pytestmark, run_ranks  # noqa: F401

STEPS = 3
N = 20  # two equal shards of 10: DDP's mean over ranks is the mean over all samples


def _optimizers(params, group):
    return {
        "newton-cg": cs.optim.NewtonCG(params(), group=group),
        "hessian-free": cs.optim.HessianFree(params(), group=group),
        "cubic-newton": cs.optim.CubicNewton(params(), krylov_dim=5, group=group),
        "adahessian": cs.optim.AdaHessian(params(), lr=0.1, weight_decay=0.01, group=group),
        "sophia-h": cs.optim.Sophia(params(), lr=0.05, update_every=1, group=group),
        # labels sampled per rank from its own outputs: the replicas agree, but not with one
        # process sampling all the labels from the same stream
        "sophia-g": cs.optim.Sophia(
            params(),
            lr=0.05,
            update_every=1,
            estimator=cs.optim.GaussNewtonBartlett(nn.CrossEntropyLoss()),
            group=group,
        ),
        # its closure runs no backward: NormalizedGD's own is torch's, which DDP averages (it
        # took the rank's own gradient, and the replicas drifted apart: an outside review)
        "normalized-gd": cs.optim.NormalizedGD(params(), lr=0.1),
    }


def _train(model, X, y, name, group) -> list[torch.Tensor]:
    loss_fn = nn.CrossEntropyLoss()
    opt = _optimizers(model.parameters, group)[name]

    def closure():
        out = model(X)
        return loss_fn(out, y), out

    for _ in range(STEPS):
        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def _collectives_a_step(name: str, backward: bool) -> int:
    """How many all-reduces one step of optimizer ``name`` makes, its closure running its own
    backward or not, counted by wrapping torch.distributed's."""
    case = cases.mlp(n=N)
    opt = _optimizers(case.model.parameters, None)[name]

    def closure():
        opt.zero_grad()
        out = case.model(case.inputs)
        loss = nn.CrossEntropyLoss()(out, case.targets)
        if backward:
            loss.backward()
        return loss, out

    opt.step(closure)  # the first step sets the state up
    real, calls = dist.all_reduce, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_reduce = counted
    try:
        opt.step(closure)
    finally:
        dist.all_reduce = real
    return len(calls)


def _worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    case = cases.mlp(n=N)
    X, y = case.inputs, case.targets
    shard = slice(rank * N // 2, (rank + 1) * N // 2)
    result = {}
    for name in _optimizers(case.model.parameters, False):
        model = cases.mlp(n=N).model
        ddp = nn.parallel.DistributedDataParallel(model)
        result[name] = _train(ddp, X[shard], y[shard], name, None)  # the default group
        # the same optimizer on one process and all the data (group=False: this process alone)
        result[name + " alone"] = _train(cases.mlp(n=N).model, X, y, name, False)
    result["collectives"] = {
        (name, backward): _collectives_a_step(name, backward)
        for name in ("adahessian", "sophia-h")
        for backward in (False, True)
    }
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_the_replicas_stay_equal_and_equal_one_process_on_all_the_data(tmp_path):
    ranks = run_ranks(_worker, tmp_path, 2)
    # AdaHessian and Sophia: the ranks' agreement on the loss, one all-reduce of the gradient
    # with which parameters are used and the closure's own gradient (three before), the product
    assert ranks[0]["collectives"] == dict.fromkeys(ranks[0]["collectives"], 3)
    for name in ranks[0]:
        if name.endswith(" alone") or name == "collectives":
            continue
        for a, b in zip(ranks[0][name], ranks[1][name], strict=True):
            assert torch.equal(a, b), name  # bit for bit: every rank takes the same step
        if name != "sophia-g":
            for a, b in zip(ranks[0][name], ranks[0][name + " alone"], strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
        moved = cases.mlp(n=N).model.parameters()
        assert any(not torch.equal(a, m) for a, m in zip(ranks[0][name], moved, strict=True))


def _faults_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    case = cases.mlp(n=N)
    shard = slice(rank * N // 2, (rank + 1) * N // 2)
    X, y = case.inputs[shard], case.targets[shard]
    loss_fn = nn.CrossEntropyLoss()
    result = {}
    # a closure that raises at a trial point on rank 1 only: every rank raises, and a retry
    # of the step repeats it on both (the others waited in a collective paired with the
    # wrong one before: a mixed loss, then gloo's abort)
    model = cases.mlp(n=N).model
    opt = cs.optim.NewtonCG(model.parameters())
    calls = [0]

    def flaky():
        calls[0] += 1
        if rank == 1 and calls[0] == 2:
            raise MemoryError("out of memory (rank 1 only)")
        return loss_fn(model(X), y)

    before = [p.detach().clone() for p in model.parameters()]
    try:
        opt.step(flaky)
    except Exception as e:  # what each rank raised is the result
        result["raised"] = f"{type(e).__name__}: {e}"
    result["restored"] = all(
        torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True)
    )
    opt.step(flaky)
    result["after retry"] = [p.detach().clone() for p in model.parameters()]
    # a closure that runs its own backward on rank 0 only: both ranks finish, replicas equal
    model = cases.mlp(n=N).model
    opt = cs.optim.AdaHessian(model.parameters(), lr=0.1)

    def half():
        loss = loss_fn(model(X), y)
        if rank == 0:
            opt.zero_grad()
            loss.backward()
        return loss

    opt.step(half)
    result["one rank's backward"] = [p.detach().clone() for p in model.parameters()]
    # DDP with gradient_as_bucket_view: .grad after a step is the gradient where it started
    # (the trial's backward wrote into DDP's buckets, which .grad views, before)
    ddp = nn.parallel.DistributedDataParallel(cases.mlp(n=N).model, gradient_as_bucket_view=True)
    opt = cs.optim.NewtonCG(ddp.parameters())

    def with_backward():
        opt.zero_grad()
        loss = loss_fn(ddp(X), y)
        loss.backward()
        return loss

    start = [p.detach().clone() for p in ddp.parameters()]
    opt.step(with_backward)
    result["grad"] = [p.grad.clone() for p in ddp.parameters()]
    result["start"] = start
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_faults_on_one_rank_and_closures_that_differ_between_ranks(tmp_path):
    ranks = run_ranks(_faults_worker, tmp_path, 2)
    assert ranks[1]["raised"] == "MemoryError: out of memory (rank 1 only)"
    assert "the closure raised on 1 other rank(s)" in ranks[0]["raised"]
    assert ranks[0]["restored"] and ranks[1]["restored"]
    for key in ("after retry", "one rank's backward"):
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][key], ranks[1][key], strict=True)), (
            key
        )
    # the gradient at the step's start over all the data (the ranks' mean, as DDP gives it)
    case = cases.mlp(n=N)
    model = case.model
    with torch.no_grad():
        for p, s in zip(model.parameters(), ranks[0]["start"], strict=True):
            p.copy_(s)
    loss = nn.CrossEntropyLoss()(model(case.inputs), case.targets)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    for rank in ranks:
        for g, e in zip(rank["grad"], expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-12)
