"""Workloads and timing shared by the benchmarks (the W2/W3 workloads of shared/PEERS.md)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Workload:
    name: str
    model: nn.Module
    loss_fn: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def data(self):
        return self.inputs, self.targets

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """A model built under a seed, the global RNG left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def mlp_w2(batch: int = 1024) -> Workload:
    """MLP 784-256-256-10, ReLU, cross-entropy, float32 (269,322 parameters)."""
    g = torch.Generator().manual_seed(0)
    model = seeded(
        0,
        lambda: nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        ),
    )
    return Workload(
        "W2 mlp 784-256-256-10, batch 1024",
        model,
        nn.CrossEntropyLoss(),
        torch.randn(batch, 784, generator=g),
        torch.randint(0, 10, (batch,), generator=g),
    )


def cnn_w3(batch: int = 256) -> Workload:
    """conv 3→16, conv 16→32 (ReLU + maxpool each), linear 2048→32→10; float32 (70,986)."""
    g = torch.Generator().manual_seed(1)
    model = seeded(
        1,
        lambda: nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2048, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        ),
    )
    return Workload(
        "W3 cnn 3x32x32, batch 256",
        model,
        nn.CrossEntropyLoss(),
        torch.randn(batch, 3, 32, 32, generator=g),
        torch.randint(0, 10, (batch,), generator=g),
    )


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], rounds: int = 7, inner: int = 3
) -> dict[str, float]:
    """Median seconds of each function, timed round-robin so that the machine's drift (a noisy
    shared host) hits every candidate alike.

    Each round runs each candidate ``inner`` times back to back and keeps all but the first:
    the steady state of a Krylov loop, in which the allocator has already served the sizes a
    product needs (the first call after another candidate pays page faults instead).
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for i in range(inner):
                start = time.perf_counter()
                fn()
                if i:
                    times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def saved_tensor_mib(fn: Callable[[], object]) -> float:
    """MiB of distinct tensor storage that autograd saves for backward while ``fn`` runs: the
    memory a cached graph keeps alive (each storage counted once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**20


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
