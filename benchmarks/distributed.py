"""Strong scaling of curvature products over torch.distributed processes on this machine.

    python benchmarks/distributed.py [--products 50] [--repeats 3]

The same total data (the W2 MLP's 1,024 samples, float32) and 50 Hessian-vector products:
one process with 1 thread, one process with 2 threads (all this machine's cores), and two gloo
processes with 1 thread each over the halves of the data. Efficiency = T(1 process, 1 thread) /
(2 · T(2 processes)). Median of the repeats; the first product (graph build) is not timed.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import markdown_table, mlp_w2

import curvscope as cs


def timed_products(data, products: int) -> float:
    w = mlp_w2()
    C = cs.Curvature(w.model, w.loss_fn, data, backend="double_backward")
    v = torch.randn(C.num_params, generator=torch.Generator().manual_seed(0))
    C @ v  # builds and caches the graph
    start = time.perf_counter()
    for _ in range(products):
        v = C @ v
        v = v / v.norm()
    return time.perf_counter() - start


def worker(rank: int, port: int, products: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    w = mlp_w2()
    half = len(w.inputs) // 2
    s = slice(rank * half, (rank + 1) * half)
    t = timed_products((w.inputs[s], w.targets[s]), products)
    if rank == 0:
        out["t"] = t
    dist.barrier()  # leave together: a rank exiting while gloo's threads wind down can abort
    dist.destroy_process_group()


def two_processes(products: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as m:
        out = m.dict()
        mp.start_processes(worker, args=(port, products, out), nprocs=2, start_method="spawn")
        return out["t"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--products", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    w = mlp_w2()
    times: dict[str, list[float]] = {
        "1 process, 1 thread": [],
        "1 process, 2 threads": [],
        "2 processes, 1 thread each": [],
    }
    for _ in range(args.repeats):  # interleaved
        torch.set_num_threads(1)
        times["1 process, 1 thread"].append(timed_products(w.data, args.products))
        torch.set_num_threads(2)
        times["1 process, 2 threads"].append(timed_products(w.data, args.products))
        times["2 processes, 1 thread each"].append(two_processes(args.products))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["1 process, 1 thread"]
    rows = [
        [k, f"{t:.2f}", f"{base / t:.2f}x", f"{base / (2 * t):.0%}" if "2 processes" in k else "—"]
        for k, t in med.items()
    ]
    print(
        markdown_table(
            [
                f"{args.products} products, W2 MLP, 1,024 samples",
                "seconds",
                "speed-up",
                "efficiency",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
