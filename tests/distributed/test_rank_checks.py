"""What the ranks compare before they sum anything (an outside review found each accepted, the
result silently of no model): the parameters' values, the loss's settings and class weights; a
DistributedSampler that repeats or drops samples; a run log rank 0 cannot open."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import curvscope as cs
from tests.distributed.test_distributed import _end, _init, run_ranks

G = torch.Generator().manual_seed(0)
X, Y = torch.randn(20, 5, generator=G), torch.randint(0, 3, (20,), generator=G)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _said(build) -> str:
    try:
        build()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    shard = (X[rank::2], Y[rank::2])
    said = {
        "values": _said(lambda: cs.Curvature(_model(rank), nn.CrossEntropyLoss(), shard)),
        "reduction": _said(
            lambda: cs.Curvature(
                _model(0), nn.CrossEntropyLoss(reduction=("mean", "sum")[rank]), shard
            )
        ),
        "weights": _said(
            lambda: cs.Curvature(
                _model(0), nn.CrossEntropyLoss(weight=torch.tensor([1.0, 1.0, 1.0 + rank])), shard
            )
        ),
        "same": _said(lambda: cs.Curvature(_model(0), nn.CrossEntropyLoss(), shard)),
    }
    log = Path(out) / "run.jsonl"
    if rank == 0:
        log.write_text("")  # exists: log_mode="x" refuses it, on rank 0 alone
    torch.distributed.barrier()
    said["log"] = _said(
        lambda: cs.Monitor(_model(0), nn.CrossEntropyLoss(), shard, lr=0.1, log=log)
    )
    torch.save(said, f"{out}/rank{rank}.pt")
    _end()


def test_ranks_refuse_different_values_losses_and_a_log_rank_0_cannot_open(tmp_path):
    for rank, said in enumerate(run_ranks(_worker, tmp_path, 2)):
        assert "values differs between ranks" in said["values"]
        assert "the parameters' values differ" in said["values"]
        for field in ("reduction", "weights"):
            assert "loss differs between ranks" in said[field], said[field]
        assert said["same"] == "no error"
        # rank 0 raised its FileExistsError; rank 1 was told, at once, not left waiting
        assert said["log"].startswith(("FileExistsError", "ValueError: rank 0 failed")[rank])


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_distributed_sampler_that_repeats_or_drops_samples_is_refused(drop_last):
    dataset = TensorDataset(X[:19], Y[:19])  # 19 samples on 2 ranks: one repeated, or dropped
    sampler = DistributedSampler(dataset, num_replicas=2, rank=0, drop_last=drop_last)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler)
    said = "drops 1 of its 19" if drop_last else "repeats 1 of its 19"
    with pytest.raises(ValueError, match=f"DistributedSampler {said}.*Subset"):
        cs.Curvature(_model(0), nn.CrossEntropyLoss(), loader)
    even = DistributedSampler(TensorDataset(X, Y), num_replicas=2, rank=0, drop_last=drop_last)
    cs.Curvature(_model(0), nn.CrossEntropyLoss(), DataLoader(TensorDataset(X, Y), sampler=even))
