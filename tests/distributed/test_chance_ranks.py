"""The chance loss over two processes (gloo, loopback) with uneven shards — classes only one rank
sees, targets far from zero — equals the single-process value on the full data; a rank whose
targets have no closed form makes it None on every rank, without a hang."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import curvscope as cs
from curvscope.diagnosis.chance import chance_loss
from tests.distributed.test_distributed import _end, _init, run_ranks

DT = torch.float64
G = torch.Generator().manual_seed(0)
# 230 samples: enough labels to pin 5 classes' frequencies down (the chance loss's rule)
X = torch.zeros(230, 3, dtype=DT)
LABELS = torch.cat(
    [torch.randint(0, 3, (150,), generator=G), torch.tensor([4, 4, 1, 0, 2, 4, 3, 1]).repeat(10)]
)
VALUES = 1e4 + torch.randn(230, 3, dtype=DT, generator=G)
BITS = (torch.rand(230, 3, dtype=DT, generator=G) < 0.3).to(DT)
SHARDS = ([slice(0, 100), slice(100, 150)], [slice(150, 230)])  # rank 1 alone sees 3 and 4
LOSSES = {
    "classes": (nn.CrossEntropyLoss(reduction="sum"), LABELS, 5),
    "squared": (nn.MSELoss(), VALUES, 3),
    "binary": (nn.BCEWithLogitsLoss(), BITS, 3),
}


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)  # the same model on every rank (the ranks compare the values)
    return nn.Linear(3, width, dtype=DT)


def _values(shards: list[slice]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, (loss_fn, targets, width) in LOSSES.items():
        data = [(X[s], targets[s]) for s in shards]
        C = cs.Curvature(_model(width), loss_fn, data)
        out[name] = chance_loss(C.objective, C.group)
    return out


def _worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    found = _values(SHARDS[rank])
    # rank 1's cross-entropy targets are class probabilities: no closed form, on every rank
    soft = torch.softmax(torch.randn(8, 5, dtype=DT, generator=torch.Generator().manual_seed(1)), 1)
    data = [(X[:10], LABELS[:10])] if rank == 0 else [(X[:8], soft)]
    C = cs.Curvature(_model(5), nn.CrossEntropyLoss(), data)
    found["soft on one rank"] = chance_loss(C.objective, C.group)
    torch.save(found, f"{out}/rank{rank}.pt")
    _end()


def test_two_ranks_chance_equals_one_process_on_the_full_data(tmp_path):
    ranks = run_ranks(_worker, tmp_path, 2)
    whole = _values([slice(0, 230)])
    for found in ranks:
        for name, expected in whole.items():
            assert expected is not None and found[name] is not None
            assert abs(found[name] - expected) <= 1e-12 * abs(expected), name
        assert found["soft on one rank"] is None
    assert not dist.is_initialized()
