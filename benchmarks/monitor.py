"""Overhead of the Monitor in a real training loop on the digits MLP.

    python benchmarks/monitor.py [--steps 2000] [--repeats 3]

Trains the same model with plain SGD three ways — no Monitor, the default Monitor (adaptive
cadence, 5% overhead budget), and a fixed cadence of every 50 steps — interleaved, and reports
the median wall time and the overhead relative to no Monitor, with the number of probes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import markdown_table

import curvscope as cs


def train(steps: int, batch: int, monitor: str) -> tuple[float, int, float]:
    p = cs.problems.get("digits-mlp", hidden=32, n=None)
    X, Y = p.data
    model = p.make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probe = (X[:512], Y[:512])
    mon = None
    if monitor == "default":
        mon = cs.Monitor(model, p.loss_fn, probe, optimizer=opt)
    elif monitor == "every 50":
        mon = cs.Monitor(model, p.loss_fn, probe, optimizer=opt, every=50)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(X), (batch,), generator=gen)
        opt.zero_grad()
        loss = p.loss_fn(model(X[idx]), Y[idx])
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(loss)
    share = 0.0 if mon is None else mon.probe_seconds / mon.train_seconds
    return time.perf_counter() - start, 0 if mon is None else len(mon.history), share


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    modes = ["none", "default", "every 50"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    probes: dict[str, int] = {}
    shares: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            t, n, share = train(args.steps, args.batch, m)
            times[m].append(t)
            probes[m] = n
            shares[m].append(share)
    base = statistics.median(times["none"])
    rows = []
    for m in modes:
        t = statistics.median(times[m])
        rows.append(
            [
                f"Monitor: {m}",
                str(probes[m]),
                f"{t:.2f}",
                f"{100 * (t / base - 1):+.1f}%",
                f"{100 * statistics.median(shares[m]):.1f}%",
            ]
        )
    print(
        f"### Monitor overhead: digits MLP 64-32-10, SGD momentum 0.9, batch {args.batch}, "
        f"{args.steps} steps, probe batch 512 (median of {args.repeats})\n"
    )
    print(
        markdown_table(
            ["run", "probes", "seconds", "wall-time overhead vs none", "probe time / loop time"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
