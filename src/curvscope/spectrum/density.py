"""Spectral density by stochastic Lanczos quadrature (Golub & Meurant; Ghorbani, Krishnan & Xiao
2019): from a few random probes, the whole eigenvalue distribution of a curvature operator."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvscope.derivatives.checks import check_int, check_real
from curvscope.derivatives.seeding import rademacher
from curvscope.spectrum._operator import as_operator, progress
from curvscope.spectrum.lanczos import Krylov, column_norms, tridiagonal
from curvscope.spectrum.precision import autocast_off, eigh

#: Default resolution of ``negative_mass``: eigenvalues within this share of the spectral range
#: of zero count as zero (the default smoothing width is the same 1%).
RESOLUTION_SHARE = 0.01
#: ... and never less than this many eps(dtype)·max|λ| for products in a low precision: the
#: products' own rounding moves the nodes of a PSD operator this far below zero (measured about
#: 0.5 eps(dtype)·‖H‖ on small bfloat16 and float16 models: see tests/spectrum/test_precision.py).
ROUNDING_FLOOR = 2.0


@dataclass(frozen=True)
class DensityResult:
    """The spectral density φ(t) = (1/n) Σ_i δ(t − λ_i), smoothed by a Gaussian of width sigma.

    Attributes:
        grid: (G,) points t.
        values: (G,) density at the grid points; integrates to 1 over the grid.
        nodes, weights: (probes, steps) Gauss quadrature nodes (Ritz values) and weights of each
            probe; each probe's weights sum to 1.
        negative_mass: the fraction of eigenvalues below −``resolution``: the Gauss weight of the
            nodes below −resolution, averaged over the probes. Eigenvalues within
            ``resolution`` of zero count as zero, so a PSD operator with a bulk at zero reads ≈ 0.
        negative_mass_stderr: its standard error across probes (the sampling error).
        negative_mass_bounds: (lower, upper): what the quadrature itself guarantees about the
            probes' average fraction below −resolution — the Chebyshev–Markov–Stieltjes bounds
            of a Gauss–Radau rule with a node at −resolution, averaged over the probes (exact
            arithmetic; a wide bracket says more ``steps`` are needed to resolve the
            spectrum near −resolution). The truth lies within about
            [lower − 2·stderr, upper + 2·stderr] when the probes' spread is a fair sample of
            theirs (many negative eigenvalues); ``negative_mass_interval`` holds it also where
            few are.
        resolution: τ, the threshold of ``negative_mass``.
        sigma: the Gaussian broadening of the curve.
        matvecs, seconds: the cost.
        product_error: the largest estimated error of a product, per unit of ‖v‖
            (finite-difference products; 0 for exact ones). Each probe's nodes are within
            √steps times it of eigenvalues of the operator's compression, so the default
            ``resolution`` is at least that: a node closer to zero cannot be told from it.
            Infinite where some product's accuracy is unknown: ``negative_mass_stderr`` is
            then infinite too.
        negative_mass_interval: (low, high), about 95% for the fraction of eigenvalues below
            −resolution: ``negative_mass_bounds`` widened by two sampling errors, the larger of
            the probes' spread and the spread a fraction m allows a probe (a variance of at
            most 2m/n: few negative eigenvalues give skewed probes whose spread says too little).
            (0, 1) where the products' accuracy is unknown.
    """

    # the curve and the nodes out of the repr (165 lines of numbers before negative_mass
    # came: an outside review); d.plot() shows them
    grid: Tensor = field(repr=False)
    values: Tensor = field(repr=False)
    nodes: Tensor = field(repr=False)
    weights: Tensor = field(repr=False)
    negative_mass: float
    negative_mass_stderr: float
    sigma: float
    matvecs: int
    seconds: float
    negative_mass_bounds: tuple[float, float] = (0.0, 1.0)
    resolution: float = 0.0
    product_error: float = 0.0
    negative_mass_interval: tuple[float, float] = (0.0, 1.0)

    def plot(self, ax: Any = None, log: bool = False, **kwargs: Any) -> Any:
        """Plot the density on ``ax`` (matplotlib, imported here) and return the axes;
        ``log=True`` for a log density axis, where the outliers that set the sharpness become
        visible beside the bulk.

        Without ``ax``, the plot is drawn on a new ``matplotlib.figure.Figure`` of its own,
        which pyplot does not know: no backend is switched and no global figure is left open.
        Save it with ``ax.figure.savefig(path)``; to draw into a pyplot figure (a notebook's
        inline display), pass ``ax=plt.subplots()[1]``.
        """
        if ax is None:
            from matplotlib.figure import Figure

            # laid out when drawn: the x label fell below the figure's edge (an outside review)
            ax = Figure(figsize=(6, 3.5), layout="constrained").subplots()
        ax.plot(self.grid.cpu().numpy(), self.values.cpu().numpy(), **kwargs)
        if log:  # eight decades below the peak, one above (it ran three empty decades above)
            top = float(self.values.max())
            ax.set_yscale("log")
            ax.set_ylim(max(top * 1e-8, 1e-12), max(top, 1e-12) * 10)
        ax.axvline(0.0, color="0.6", lw=0.8, ls=":")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density" + (" (log)" if log else ""))
        ax.set_title(f"spectral density ({self.negative_mass:.1%} below −{self.resolution:.2g})")
        return ax


def density(
    A: Any,
    steps: int = 30,
    probes: int = 4,
    *,
    grid_points: int = 512,
    sigma: float | None = None,
    resolution: float | None = None,
    reorthogonalize: bool = False,
    seed: int | torch.Generator = 0,
    progress_bar: bool | None = None,
) -> DensityResult:
    """Stochastic Lanczos quadrature: ``probes`` Lanczos runs of ``steps`` products each.

    For a unit probe v, zᵀf(A)z = Σ_i f(λ_i)(u_iᵀ v)² is approximated by the Gauss quadrature
    Σ_j τ_j f(θ_j) read off the Lanczos tridiagonal (Ritz values θ_j, weights τ_j = (e₁ᵀs_j)²).
    Averaged over Rademacher probes it estimates the density; smoothed with a Gaussian of width
    ``sigma`` (default: 1% of the spectral range) it becomes a curve that integrates to 1.

    ``negative_mass`` is read off the nodes, not the curve: the weight of the nodes below
    −``resolution``, i.e. the fraction of eigenvalues clearly below zero. (The smoothed curve
    splits every eigenvalue within sigma of zero in half: on a network, whose spectrum is mostly
    a bulk at zero, its mass below zero reads ≈ 0.5 whatever the truth.)

    Args:
        A: a :class:`~curvscope.Curvature`, a square symmetric tensor, or an object with
            ``matmat``.
        steps: Lanczos steps per probe (resolution; capped at n).
        probes: independent probes (the error bars of ``negative_mass`` come from them).
        grid_points: resolution of the returned curve.
        sigma: Gaussian broadening width.
        resolution: τ: eigenvalues within τ of zero count as zero in ``negative_mass``. Default:
            1% of the spectral range, and at least 2·eps(dtype)·max|λ| for products in a low
            precision (bfloat16: 1.6%), the rounding of the products themselves, and at least
            √steps times the largest estimated error of a finite-difference product (the
            bound on how far those errors move a node: ``product_error``).
        reorthogonalize: keep the Lanczos basis orthogonal (memory O(steps·n) and O(n·steps)
            work per step). Off by default: quadrature needs only the three-term recurrence
            (memory O(n)), whose rounding-error "ghost" Ritz values share the weight of the
            eigenvalue they copy and leave the density unchanged.
        seed: seed or generator of the probes.
        progress_bar: show a progress bar (``True``), never (``False``), or — the default,
            ``None`` — on a terminal once the run is seen to take more than two seconds (it
            was on by default, which wrote the bar's lines into logs).

    The products run in the operator's dtype, the recurrences in its working dtype (float32 at
    least); nodes, weights, grid and curve are float64.

    Example:
        >>> import torch, curvscope as cs
        >>> A = torch.diag(torch.linspace(-1, 4, 200, dtype=torch.float64))  # 20% below 0
        >>> d = cs.density(A, steps=20, probes=8, progress_bar=False)
        >>> round(d.negative_mass, 1), round(d.resolution, 2)  # the fraction below -0.05
        (0.2, 0.05)
    """
    op = as_operator(A)
    op.same_on_ranks(
        "cs.density",
        steps=steps,
        probes=probes,
        grid_points=grid_points,
        sigma=sigma,
        resolution=resolution,
        reorthogonalize=reorthogonalize,
        seed=seed,
    )
    op.require_symmetric("cs.density")
    steps = check_int(steps, "steps", minimum=1)
    probes = check_int(probes, "probes", minimum=1)
    grid_points = check_int(grid_points, "grid_points", minimum=2)
    if sigma is not None:
        sigma = check_real(sigma, "sigma", minimum=0, exclusive=True)
    if resolution is not None:
        resolution = check_real(resolution, "resolution", minimum=0)
    steps = min(steps, op.dim)
    gen = op.generator(seed)
    start = time.perf_counter()
    used_before, seen = op.matvecs, len(op.error_norms)
    jacobi = []  # (T, β_m) of each probe
    with progress(steps * probes, "density (SLQ)", progress_bar) as bar, autocast_off(op.device):
        for _ in range(probes):
            z = rademacher(op.n, 1, gen, op.work_dtype, op.device)
            before = op.matvecs
            if reorthogonalize:
                kry = Krylov(op, z, gen)
                while kry.size < steps and kry.X.shape[1]:
                    kry.extend()
                T = torch.from_numpy(kry.Hh.copy())  # kept on the host in float64: no read
                beta_next = float(column_norms(kry.Rh.reshape(-1, 1))[0]) if kry.X.shape[1] else 0.0
            else:
                alpha, beta = tridiagonal(op, z, steps)
                off = beta[:-1]
                T = torch.diag(alpha) + torch.diag(off, 1) + torch.diag(off, -1)
                beta_next = float(beta[-1])
            bar.update(op.matvecs - before)
            jacobi.append(((T + T.T) / 2, beta_next))
    all_nodes, all_weights = [], []
    for T, _ in jacobi:
        theta, S = eigh(T)
        # an early stop (invariant subspace) gives fewer nodes: pad with zero weight
        pad = steps - theta.numel()
        all_nodes.append(torch.cat([theta, theta[-1:].expand(pad)]))
        all_weights.append(torch.cat([S[0, :] ** 2, torch.zeros(pad, dtype=S.dtype)]))
    nodes = torch.stack(all_nodes)
    weights = torch.stack(all_weights)
    weights = weights / weights.sum(dim=1, keepdim=True)
    lo, hi = float(nodes.min()), float(nodes.max())
    scale = max(abs(lo), abs(hi))
    # relative: an absolute floor of 1e-12 swamped a spectrum of width 3e-14 (negative_mass 0 for
    # a true 0.32, sigma 1e6 times the spectrum's width: an outside review)
    width = max(hi - lo, 1e-12 * scale) or 1e-12
    if sigma is None:
        sigma = RESOLUTION_SHARE * width
    # A V = V T + r eₘᵀ + F with F's columns the products' errors: T moves by at most ‖F‖ ≤ √m·e
    product_error = max(op.errors_since(seen), default=0.0)
    if resolution is None:
        resolution = max(
            RESOLUTION_SHARE * width,
            ROUNDING_FLOOR * torch.finfo(op.dtype).eps * scale,
            # an unknown accuracy (inf) raises no floor: it is said by the stderr below
            math.sqrt(steps) * product_error if math.isfinite(product_error) else 0.0,
        )
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_points, dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((grid[:, None] - nodes.reshape(1, -1)) / sigma) ** 2)
    values = kernel @ weights.reshape(-1) / (probes * sigma * math.sqrt(2 * math.pi))
    values = values / torch.trapezoid(values, grid)
    # each probe's Gauss weight below −τ, and the bracket the quadrature guarantees for it
    neg = (weights * (nodes < -resolution)).sum(dim=1)
    neg_se = float(neg.std(unbiased=True) / math.sqrt(probes)) if probes > 1 else math.inf
    if not math.isfinite(product_error):  # products of unknown accuracy: so is the mass
        neg_se = math.inf
    brackets = torch.tensor([cdf_bracket(T, b, -resolution) for T, b in jacobi])
    lower, upper = brackets.mean(dim=0).tolist()
    interval = mass_interval(lower, upper, neg_se, op.dim, probes)
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
        (lower, upper),
        float(resolution),
        product_error,
        interval,
    )


def mass_interval(
    lower: float, upper: float, se: float, n: int, probes: int
) -> tuple[float, float]:
    """An interval of about 95% for the fraction of eigenvalues below −τ: the quadrature's
    bracket widened by two sampling errors — the larger of the probes' spread and the spread
    the fraction m itself allows. A probe's value zᵀPz/n (P the projector onto those
    eigenvectors, z Rademacher) has variance 2(‖P‖²_F − Σ P_ii²)/n² ≤ 2m/n, so the mean of the
    probes lies within 2·√(2m/(n·probes)) of m: the interval holds every m for which the
    bracket does. The probes' spread alone, 4 of them, missed a few negative eigenvalues in
    21–32 of 100 seeds (0.0007 ± 0.0007 for a true 0.01: an outside review)."""
    if not math.isfinite(se):
        return 0.0, 1.0
    a = 2 * math.sqrt(2 / (n * probes))
    # m ∓ a·√m = bracket end, solved for √m: the extreme m the sampling error allows
    top = ((a + math.sqrt(a * a + 4 * upper)) / 2) ** 2
    bottom = ((-a + math.sqrt(a * a + 4 * lower)) / 2) ** 2
    return max(0.0, min(lower - 2 * se, bottom)), min(1.0, max(upper + 2 * se, top))


def cdf_bracket(T: Tensor, beta_next: float, x: float) -> tuple[float, float]:
    """Bounds on μ((−∞, x)) for the spectral measure μ whose Lanczos recurrence gave T and β_m.

    The Gauss–Radau rule with one node fixed at x (T extended by one row, its last diagonal
    entry chosen so that x is an eigenvalue: Golub 1973) is exact for polynomials of degree 2m;
    by the Chebyshev–Markov–Stieltjes inequalities every measure with those moments has
    Σ_{ξ_j < x} w_j ≤ μ((−∞, x)) ≤ Σ_{ξ_j ≤ x} w_j: the bracket is the weight the rule puts at
    x, the largest mass the moments allow there. When the Krylov space closed (β_m = 0) the
    Gauss rule is the measure itself and the bracket is a point.
    """
    # on T's own scale (the rule is scale-equivariant): β_m², and R's eigenproblem, overflowed
    # for a float64 spectrum at 1e160 (LAPACK's error) and underflowed at 1e-170 (a review)
    c = max(float(T.abs().max()), beta_next, abs(x))
    if 0 < c < math.inf:
        T, beta_next, x = T / c, beta_next / c, x / c
    m = T.shape[0]
    theta, S = eigh(T)
    w = S[0] ** 2
    w = w / w.sum()
    tiny = 1e-12 * max(float(theta.abs().max()), abs(x), 1e-300)
    if beta_next <= tiny:
        below = float(w[theta < x - tiny].sum())
        return below, below + float(w[(theta - x).abs() <= tiny].sum())
    e = torch.zeros(m, dtype=T.dtype)
    e[-1] = beta_next**2
    try:
        delta = torch.linalg.solve(T - x * torch.eye(m, dtype=T.dtype), e)
    except RuntimeError:  # x is a Ritz value: the Gauss rule already has a node at x
        below = float(w[theta < x - tiny].sum())
        return below, below + float(w[(theta - x).abs() <= tiny].sum())
    R = torch.zeros(m + 1, m + 1, dtype=T.dtype)
    R[:m, :m] = T
    R[m, m - 1] = R[m - 1, m] = beta_next
    R[m, m] = x + delta[-1]
    xi, V = eigh(R)
    wr = V[0] ** 2
    wr = wr / wr.sum()
    at = int((xi - x).abs().argmin())
    below = float(wr[xi < x].sum()) - (float(wr[at]) if xi[at] < x else 0.0)
    return below, below + float(wr[at])
