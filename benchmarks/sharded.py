"""The diagnosis of a model sharded by FSDP2 on two gloo processes: ``sharded=True`` (every
vector of the diagnosis this rank's entries) against whole vectors (gathered on every rank).

    python benchmarks/sharded.py [--width 256] [--vocab 1024] [--repeats 3] [--quick]

A two-layer pre-norm causal transformer (width ``--width``, vocabulary ``--vocab``, 8 tokens,
each rank two batches of 8 sequences, float32), ``fully_shard`` on each layer and the root,
three SGD steps (momentum 0.9, weight decay 0.01), then one ``cs.diagnose(...,
backend="finite_difference")`` per fresh pair of processes — a process's peak resident set only
grows, so each mode and repeat gets its own: per rank, the growth of the peak resident set
(``getrusage``'s ``ru_maxrss``) over the diagnosis, its wall time, the products it took and the
sharpness. Medians over the repeats and both ranks; one thread a process.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import markdown_table
from torch import nn

import curvscope as cs

T = 8  # tokens a sequence


class CausalLM(nn.Module):
    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.emb = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        layer.norm_first = True
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T))

    def forward(self, x):
        return self.head(self.enc(self.emb(x), mask=self.mask, is_causal=True))


def worker(rank: int, port: int, args: argparse.Namespace, sharded: bool, out: dict) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(minutes=10))
    torch.manual_seed(0)
    model = CausalLM(args.vocab, args.width)
    for layer in model.enc.layers:
        fully_shard(layer)
    fully_shard(model)
    tokens = torch.randint(args.vocab, (32, T + 1), generator=torch.Generator().manual_seed(0))
    mine = tokens[rank::2]
    batches = [(mine[i : i + 8, :-1], mine[i : i + 8, 1:]) for i in (0, 8)]

    def loss_fn(out, y):
        return nn.functional.cross_entropy(out.reshape(-1, args.vocab), y.reshape(-1))

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        opt.zero_grad()
        for x, y in batches:
            (loss_fn(model(x), y) / len(batches)).backward()
        opt.step()
    dist.barrier()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    d = cs.diagnose(model, loss_fn, batches, opt, backend="finite_difference", sharded=sharded)
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    out[rank] = (grown, seconds, d.evidence["matvecs"], d.evidence["sharpness"], d.state.value)
    dist.barrier()
    dist.destroy_process_group()


def run(args: argparse.Namespace, sharded: bool) -> list[tuple]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(worker, args=(port, args, sharded, out), nprocs=2, start_method="spawn")
        return [out[r] for r in range(2)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="width 32, vocabulary 64, one repeat")
    args = ap.parse_args()
    if args.quick:
        args.width, args.vocab, args.repeats = 32, 64, 1
    n = sum(p.numel() for p in CausalLM(args.vocab, args.width).parameters())
    rows = []
    for sharded in (False, True):
        runs = [r for _ in range(args.repeats) for r in run(args, sharded)]
        med = [statistics.median(r[i] for r in runs) for i in range(4)]
        rows.append(
            [
                "sharded=True (this rank's entries)" if sharded else "whole vectors",
                f"{med[0]:.0f} MiB",
                f"{med[1]:.1f} s",
                f"{med[2]:.0f}",
                f"{med[3]:.4g}",
                ", ".join(sorted({r[4] for r in runs})),
            ]
        )
    print(
        f"FSDP2, two gloo ranks, causal transformer of {n:,} parameters (width {args.width}, "
        f"vocabulary {args.vocab}), float32, SGD; medians of {args.repeats} run(s) x 2 ranks\n"
    )
    header = ["diagnosis", "peak RSS growth a rank", "time", "products", "sharpness", "states"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
