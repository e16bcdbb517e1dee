"""Trace and diagonal of a curvature operator: Hutchinson, Hutch++, an adaptive choice between
them, and exact values for small n. Each result has a standard error and its exact cost.

The probes and every sum over them are kept in the operator's working dtype (float32 at least:
a bfloat16 or float16 model's products run in its own dtype, the statistics in float32)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvscope.derivatives.seeding import rademacher
from curvscope.spectrum._operator import Operator, as_operator, check_budget, progress
from curvscope.spectrum.precision import autocast_off

TRACE_METHODS = ("auto", "hutchinson", "hutch++", "exact")
#: Probes multiplied per block product (memory: the probes, their products, and one block
#: product's working memory of about 3 CHUNK vectors of n).
CHUNK = 16


@dataclass(frozen=True)
class TraceResult:
    """An estimate of tr(A) (or tr(A²)) with its standard error and cost.

    Attributes:
        value: the estimate.
        stderr: its standard error (0 for ``method="exact"``).
        matvecs: products used (exactly the budget for the randomized methods).
        method: the method that produced it (for ``"auto"``, the one it chose).
        seconds: wall time.
        message: a sentence on what was done and why.
    """

    value: float
    stderr: float
    matvecs: int
    method: str
    seconds: float
    message: str

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """A normal-approximation confidence interval (95% by default)."""
        return self.value - z * self.stderr, self.value + z * self.stderr


@dataclass(frozen=True)
class DiagonalResult:
    """An estimate of diag(A): ``value`` and ``stderr`` are vectors of length n, in the
    operator's working dtype (float32 for a bfloat16 or float16 operator)."""

    value: Tensor
    stderr: Tensor
    matvecs: int
    method: str
    seconds: float


def _products(op: Operator, Z: Tensor, bar: Any) -> Tensor:
    """A Z in chunks (one block product each), counting progress."""
    outs = []
    for j in range(0, Z.shape[1], CHUNK):
        outs.append(op(Z[:, j : j + CHUNK]))
        bar.update(outs[-1].shape[1])
    return torch.cat(outs, dim=1) if outs else Z[:, :0]


def _mean_stderr(samples: Tensor) -> tuple[float, float]:
    m = samples.numel()
    mean = float(samples.mean())
    se = float(samples.std(unbiased=True) / math.sqrt(m)) if m > 1 else math.inf
    return mean, se


def _exact_trace(op: Operator, bar: Any) -> tuple[float, Tensor]:
    diag = torch.empty(op.n, dtype=op.work_dtype, device=op.device)
    for j in range(0, op.n, CHUNK):
        cols = torch.arange(j, min(j + CHUNK, op.n), device=op.device)
        E = torch.zeros(op.n, cols.numel(), dtype=op.work_dtype, device=op.device)
        E[cols, torch.arange(cols.numel(), device=op.device)] = 1
        diag[cols] = op(E)[cols, torch.arange(cols.numel(), device=op.device)]
        bar.update(cols.numel())
    return float(diag.sum()), diag


def trace(
    A: Any,
    matvecs: int = 100,
    method: str = "auto",
    *,
    seed: int | torch.Generator | None = 0,
    progress_bar: bool | None = None,
) -> TraceResult:
    """Estimate tr(A) within a budget of exactly ``matvecs`` products.

    - ``"hutchinson"``: the mean of zᵀAz over Rademacher probes z; variance 2(‖A‖²_F − Σ A_ii²)
      per probe.
    - ``"hutch++"`` (Meyer, Musco, Musco & Woodruff 2021): a third of the budget sketches the
      dominant range Q = orth(A S), a third computes tr(QᵀAQ) exactly, the rest runs Hutchinson
      on the deflated (I − QQᵀ)A(I − QQᵀ). Far better when a few large eigenvalues dominate
      (PSD curvature: GGN, Fisher, trained networks); worse on flat or strongly indefinite
      spectra (a network's Hessian at initialisation), where the deflation removes little.
    - ``"auto"`` (default): spends the first third as Rademacher probes, which serve both
      methods, and estimates from them how much of ‖A‖²_F the sketch would deflate; it
      continues with Hutch++ when that makes the variance smaller and with Hutchinson (reusing
      the probes) otherwise.
    - ``"exact"``: n products with unit vectors (no budget; for small n).

    With sharded vectors (``C.sharded()``, FSDP2) the estimate is Hutchinson's (``"auto"``
    means it there): each rank draws its own entries of the probes, and zᵀAz is its partial
    sums reduced over the ranks; every rank gets the same value.

    Args:
        A: a :class:`~curvscope.Curvature`, a square tensor, or an object with ``matmat``.
        matvecs: the budget (ignored by ``"exact"``).
        method: ``"auto"`` | ``"hutchinson"`` | ``"hutch++"`` | ``"exact"``.
        seed: seed or generator of the probes (the global RNG is never used).
        progress_bar: show a progress bar (default: on a terminal, once the run is seen to
            take more than two seconds).

    Example:
        >>> import torch, curvscope as cs
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> cs.trace(A, method="exact").value
        55.0
    """
    op = as_operator(A)
    op.same_on_ranks("cs.trace", matvecs=matvecs, method=method, seed=seed)
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}, got {method!r}")
    if op.shards is not None and method not in ("auto", "hutchinson"):
        raise ValueError(
            f"cs.trace(method={method!r}) needs whole vectors; with sharded ones (C.sharded()) "
            "it estimates by Hutchinson's probes: method='hutchinson' (or 'auto', which means "
            "it there), or call it with the Curvature C itself (full-length vectors)"
        )
    start = time.perf_counter()
    used_before = op.matvecs
    if method == "exact":
        with progress(op.n, "trace (exact)", progress_bar) as bar, autocast_off(op.device):
            value, _ = _exact_trace(op, bar)
        return TraceResult(
            value,
            0.0,
            op.matvecs - used_before,
            "exact",
            time.perf_counter() - start,
            f"exact: {op.n} products",
        )
    check_budget(matvecs, 3 if method == "hutch++" else 2, "trace")
    gen = op.generator(seed)
    with progress(matvecs, f"trace ({method})", progress_bar) as bar, autocast_off(op.device):
        if method == "hutchinson" or op.shards is not None:
            Z = rademacher(op.n, matvecs, gen, op.work_dtype, op.device)
            value, se = _mean_stderr(op.total((Z * _products(op, Z, bar)).sum(0)))
            chosen, why = "hutchinson", f"{matvecs} Rademacher probes"
        else:
            value, se, chosen, why = _hutchpp(op, matvecs, gen, bar, adaptive=method == "auto")
    return TraceResult(
        value, se, op.matvecs - used_before, chosen, time.perf_counter() - start, why
    )


def _hutchpp(
    op: Operator, m: int, gen: torch.Generator, bar: Any, adaptive: bool
) -> tuple[float, float, str, str]:
    s = max(1, m // 3)
    g = m - 2 * s
    S = rademacher(op.n, s, gen, op.work_dtype, op.device)
    Y = _products(op, S, bar)
    if adaptive and g >= 2:
        phi = _deflation_left(Y)
        if phi >= g / m:
            Z = rademacher(op.n, m - s, gen, op.work_dtype, op.device)
            samples = torch.cat([(S * Y).sum(0), (Z * _products(op, Z, bar)).sum(0)])
            value, se = _mean_stderr(samples)
            return (
                value,
                se,
                "hutchinson",
                (
                    f"auto chose Hutchinson ({m} probes): a {s}-dimensional sketch would "
                    f"deflate only {100 * (1 - phi):.0f}% of the squared Frobenius norm"
                ),
            )
    Q, _ = torch.linalg.qr(Y)
    AQ = _products(op, Q, bar)
    t_top = float((Q * AQ).sum())
    if g < 1:
        return t_top, math.inf, "hutch++", "hutch++ with no budget left for the remainder"
    Z = rademacher(op.n, g, gen, op.work_dtype, op.device)
    Qt = Q.T.contiguous()  # projections on contiguous rows are several times faster
    Zp = Z - Qt.T @ (Qt @ Z)
    mean, se = _mean_stderr((Zp * _products(op, Zp, bar)).sum(0))  # zᵀ(I−P)A(I−P)z
    why = f"hutch++: {s}-dimensional sketch, {g} probes on the remainder"
    if adaptive:
        why = "auto chose " + why
    return t_top + mean, se, "hutch++", why


def _deflation_left(Y: Tensor) -> float:
    """Estimate, from the sketch Y = A S alone, the fraction φ of ‖A‖²_F that deflating by
    orth(Y) would leave — the part Hutch++ still estimates by Hutchinson.

    The second half of Y's columns tests the first: orth(Y[:, :s/2]) leaves φ₂ of
    ‖Y[:, s/2:]‖², orth(Y[:, :s/4]) leaves φ₄. The full sketch has twice the columns, so φ is
    extrapolated by the same ratio: φ ≈ φ₂·(φ₂/φ₄) — no change on a flat spectrum, a fast
    fall where the spectrum decays. Hutch++'s variance is then about 2φ‖A‖²_F/g against
    Hutchinson's 2‖A‖²_F/m.
    """
    s = Y.shape[1]
    half = s // 2
    if half < 1:
        return 1.0
    test = Y[:, half:]
    total = test.pow(2).sum().clamp_min(1e-300)

    def left(k: int) -> float:
        Q, _ = torch.linalg.qr(Y[:, :k])
        Qt = Q.T.contiguous()
        return float((test - Qt.T @ (Qt @ test)).pow(2).sum() / total)

    phi2 = left(half)
    if half < 2:
        return phi2
    phi4 = left(half // 2)
    return phi2 * min(1.0, phi2 / max(phi4, 1e-300))


def trace_of_square(
    A: Any,
    matvecs: int = 50,
    *,
    seed: int | torch.Generator | None = 0,
    progress_bar: bool | None = None,
) -> TraceResult:
    """tr(A²) = ‖A‖²_F = E‖Az‖² over Rademacher probes, with its standard error.

    Unlike the trace, it cannot cancel: for an indefinite Hessian whose positive and negative
    curvature sum to nearly zero, tr(A²) still measures the size of the curvature.
    """
    op = as_operator(A)
    op.same_on_ranks("cs.trace_of_square", matvecs=matvecs, seed=seed)
    check_budget(matvecs, 2, "trace_of_square")
    start = time.perf_counter()
    used_before = op.matvecs
    gen = op.generator(seed)
    with progress(matvecs, "trace of square", progress_bar) as bar, autocast_off(op.device):
        Z = rademacher(op.n, matvecs, gen, op.work_dtype, op.device)
        value, se = _mean_stderr(op.total(_products(op, Z, bar).pow(2).sum(0)))
    return TraceResult(
        value,
        se,
        op.matvecs - used_before,
        "hutchinson",
        time.perf_counter() - start,
        f"{matvecs} Rademacher probes of ‖Az‖²",
    )


def diagonal(
    A: Any,
    matvecs: int = 100,
    method: str = "hutchinson",
    *,
    seed: int | torch.Generator | None = 0,
    progress_bar: bool | None = None,
) -> DiagonalResult:
    """Estimate diag(A): the mean of z ⊙ Az over Rademacher probes (Bekas et al. 2007).

    Entry i has variance Σ_{j≠i} A_ij² per probe; ``stderr`` is the per-entry sample standard
    error. ``method="exact"`` uses n unit-vector products (no budget). This is the estimator
    AdaHessian and Sophia use for their preconditioners. With sharded vectors
    (``C.sharded()``) ``value`` and ``stderr`` are this rank's entries (``S.gather`` for the
    whole); ``"exact"`` needs whole vectors.
    """
    op = as_operator(A)
    op.same_on_ranks("cs.diagonal", matvecs=matvecs, method=method, seed=seed)
    if method not in ("hutchinson", "exact"):
        raise ValueError(f"method must be 'hutchinson' or 'exact', got {method!r}")
    if method == "exact":
        op.require_whole("cs.diagonal(method='exact')")
    start = time.perf_counter()
    used_before = op.matvecs
    if method == "exact":
        with progress(op.n, "diagonal (exact)", progress_bar) as bar, autocast_off(op.device):
            _, diag = _exact_trace(op, bar)
        return DiagonalResult(
            diag,
            torch.zeros_like(diag),
            op.matvecs - used_before,
            "exact",
            time.perf_counter() - start,
        )
    check_budget(matvecs, 2, "diagonal")
    gen = op.generator(seed)
    with progress(matvecs, "diagonal", progress_bar) as bar, autocast_off(op.device):
        Z = rademacher(op.n, matvecs, gen, op.work_dtype, op.device)
        samples = Z * _products(op, Z, bar)
        value = samples.mean(dim=1)
        stderr = samples.std(dim=1, unbiased=True) / math.sqrt(matvecs)
    return DiagonalResult(
        value, stderr, op.matvecs - used_before, "hutchinson", time.perf_counter() - start
    )
