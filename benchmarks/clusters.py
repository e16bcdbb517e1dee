"""Repeated eigenvalues the block cannot see at once: how often ``cs.eigenvalues`` reports a
wrong value as converged, and what it spends, on dense float64 matrices Q diag(λ) Qᵀ (random
orthogonal Q, seeded).

    python benchmarks/clusters.py

- ``null``: the k = 2, 3, 4 smallest of a 300 x 300 PSD matrix of rank 5, 10, 50 (a null space
  of 250–295 zeros, not declared PSD), 30 seeds a cell — read [0, 0, 1.0] "converged" in 21–23
  of 30 seeds for k = 3 before the block widened past a cluster that fills it.
- ``three``: the k = 4 largest (and both ends) of a 200 x 200 matrix with three copies of ±1,
  then ±0.9 and a bulk in [-0.8, 0.8], 10 seeds — [1, 1, 0.9, 0.8] "converged" in 10 of 10
  while a widened block waited only a fresh start's products.

Products are counts: the same on any machine.
"""

from __future__ import annotations

import statistics

import numpy as np
import torch

import curvscope as cs


def orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def null(n: int = 300, seeds: int = 30) -> None:
    for rank in (5, 10, 50):
        for k in (2, 3, 4):
            right, used = 0, []
            for seed in range(seeds):
                q = orthogonal(n, 10_000 + seed)
                zeros, rest = np.zeros(n - rank), np.random.default_rng(seed).uniform(1, 2, rank)
                a = (q * torch.as_tensor(np.sort(np.r_[zeros, rest]))) @ q.T
                r = cs.eigenvalues((a + a.T) / 2, k=k, which="smallest", seed=seed)
                right += bool(r.all_converged and float(r.values.abs().max()) <= 2e-3)
                used.append(r.matvecs)
            print(
                f"null: rank {rank}, k={k}: {right}/{seeds} converged and right, median "
                f"{statistics.median(used):g} products"
            )


def three(n: int = 200, seeds: int = 10) -> None:
    ends = torch.tensor([1.0] * 3 + [0.9] + [-1.0] * 3 + [-0.9], dtype=torch.float64)
    ev = torch.cat([ends, torch.linspace(-0.8, 0.8, n - 8, dtype=torch.float64)])
    for which in ("largest", "both"):
        wrong, used = 0, []
        for seed in range(seeds):
            q = orthogonal(n, seed)
            r = cs.eigenvalues((q * ev) @ q.T, k=4, which=which, seed=seed)
            want = [1, 1, 1, 0.9] + ([-0.9, -1, -1, -1] if which == "both" else [])
            off = (r.values - torch.tensor(want, dtype=torch.float64)).abs().max()
            wrong += bool(r.converged.all() and off > 1e-3)
            used.append(r.matvecs)
        print(
            f"three: {which}: {wrong}/{seeds} wrong but converged, {min(used)}–{max(used)} products"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    null()
    three()
