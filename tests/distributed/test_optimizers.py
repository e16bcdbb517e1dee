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
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_the_replicas_stay_equal_and_equal_one_process_on_all_the_data(tmp_path):
    ranks = run_ranks(_worker, tmp_path, 2)
    for name in ranks[0]:
        if name.endswith(" alone"):
            continue
        for a, b in zip(ranks[0][name], ranks[1][name], strict=True):
            assert torch.equal(a, b), name  # bit for bit: every rank takes the same step
        if name != "sophia-g":
            for a, b in zip(ranks[0][name], ranks[0][name + " alone"], strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
        moved = cases.mlp(n=N).model.parameters()
        assert any(not torch.equal(a, m) for a, m in zip(ranks[0][name], moved, strict=True))
