"""Spectral density by stochastic Lanczos quadrature (Golub & Meurant; Ghorbani, Krishnan & Xiao
2019): from a few random probes, the whole eigenvalue distribution of a curvature operator."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvscope.spectrum._operator import as_operator, generator, progress, rademacher
from curvscope.spectrum.lanczos import Krylov, tridiagonal


@dataclass(frozen=True)
class DensityResult:
    """The spectral density φ(t) = (1/n) Σ_i δ(t − λ_i), smoothed by a Gaussian of width sigma.

    Attributes:
        grid: (G,) points t.
        values: (G,) density at the grid points; integrates to 1 over the grid.
        nodes, weights: (probes, steps) Gauss quadrature nodes (Ritz values) and weights of each
            probe; each probe's weights sum to 1.
        negative_mass: the fraction of the spectrum below zero (the mass of the smoothed
            density below 0), and ``negative_mass_stderr`` its standard error across probes.
            Eigenvalues within about sigma of zero are split between the two sides.
        sigma: the Gaussian broadening used.
        matvecs, seconds: the cost.
    """

    grid: Tensor
    values: Tensor
    nodes: Tensor
    weights: Tensor
    negative_mass: float
    negative_mass_stderr: float
    sigma: float
    matvecs: int
    seconds: float

    def plot(self, ax: Any = None, log: bool = False, **kwargs: Any) -> Any:
        """Plot the density (matplotlib, imported here); ``log=True`` for a log density axis,
        where the outliers that set the sharpness become visible beside the bulk."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(self.grid.cpu().numpy(), self.values.cpu().numpy(), **kwargs)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(float(self.values.max()) * 1e-8, 1e-12))
        ax.axvline(0.0, color="0.6", lw=0.8, ls=":")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density" + (" (log)" if log else ""))
        ax.set_title(f"spectral density ({self.negative_mass:.1%} below zero)")
        return ax


def density(
    A: Any,
    steps: int = 30,
    probes: int = 4,
    *,
    grid_points: int = 512,
    sigma: float | None = None,
    reorthogonalize: bool = False,
    seed: int | torch.Generator | None = 0,
    progress_bar: bool | None = True,
) -> DensityResult:
    """Stochastic Lanczos quadrature: ``probes`` Lanczos runs of ``steps`` products each.

    For a unit probe v, zᵀf(A)z = Σ_i f(λ_i)(u_iᵀ v)² is approximated by the Gauss quadrature
    Σ_j τ_j f(θ_j) read off the Lanczos tridiagonal (Ritz values θ_j, weights τ_j = (e₁ᵀs_j)²).
    Averaged over Rademacher probes it estimates the density; smoothed with a Gaussian of width
    ``sigma`` (default: 1% of the spectral range) it becomes a curve that integrates to 1.

    Args:
        A: a :class:`~curvscope.Curvature`, a square tensor, or an object with ``matmat``.
        steps: Lanczos steps per probe (resolution; capped at n).
        probes: independent probes (the error bars of ``negative_mass`` come from them).
        grid_points: resolution of the returned curve.
        sigma: Gaussian broadening width.
        reorthogonalize: keep the Lanczos basis orthogonal (memory O(steps·n) and O(n·steps)
            work per step). Off by default: quadrature needs only the three-term recurrence
            (memory O(n)), whose rounding-error "ghost" Ritz values share the weight of the
            eigenvalue they copy and leave the density unchanged.
        seed: seed or generator of the probes.
        progress_bar: show a progress bar (default on; ``False`` for quiet, ``None`` only on a
            terminal).

    Example:
        >>> import torch, curvscope as cs
        >>> A = torch.diag(torch.linspace(-1, 4, 200, dtype=torch.float64))  # 20% below 0
        >>> round(cs.density(A, steps=20, probes=8, progress_bar=False).negative_mass, 1)
        0.2
    """
    op = as_operator(A)
    for name, value in (("steps", steps), ("probes", probes), ("grid_points", grid_points)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    steps = min(steps, op.n)
    gen = generator(seed, op.device)
    start = time.perf_counter()
    used_before = op.matvecs
    all_nodes, all_weights = [], []
    with progress(steps * probes, "density (SLQ)", progress_bar) as bar:
        for _ in range(probes):
            z = rademacher(op.n, 1, gen, op.dtype, op.device)
            before = op.matvecs
            if reorthogonalize:
                kry = Krylov(op, z, gen)
                while kry.size < steps:
                    kry.extend()
                T = kry.H.double().cpu()
            else:
                alpha, beta = tridiagonal(op, z, steps)
                T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
            bar.update(op.matvecs - before)
            theta, S = torch.linalg.eigh(T)
            # an early stop (invariant subspace) gives fewer nodes: pad with zero weight
            pad = steps - theta.numel()
            all_nodes.append(torch.cat([theta, theta[-1:].expand(pad)]))
            all_weights.append(torch.cat([S[0, :] ** 2, torch.zeros(pad, dtype=S.dtype)]))
    nodes = torch.stack(all_nodes).double().cpu()
    weights = torch.stack(all_weights).double().cpu()
    weights = weights / weights.sum(dim=1, keepdim=True)
    lo, hi = float(nodes.min()), float(nodes.max())
    width = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    if sigma is None:
        sigma = 0.01 * width
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_points, dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((grid[:, None] - nodes.reshape(1, -1)) / sigma) ** 2)
    values = kernel @ weights.reshape(-1) / (probes * sigma * math.sqrt(2 * math.pi))
    values = values / torch.trapezoid(values, grid)
    # the mass of each probe's smoothed density below zero: a node near 0 stands for
    # eigenvalues on both sides of it, and is split as the plotted curve splits it
    neg = (weights * torch.special.ndtr(-nodes / sigma)).sum(dim=1)
    neg_se = float(neg.std(unbiased=True) / math.sqrt(probes)) if probes > 1 else math.inf
    return DensityResult(
        grid,
        values,
        nodes,
        weights,
        float(neg.mean()),
        neg_se,
        float(sigma),
        op.matvecs - used_before,
        time.perf_counter() - start,
    )
