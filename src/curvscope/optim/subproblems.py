"""Local-model subproblems the second-order methods solve at each step, as pure functions of
the gradient g and a curvature product (or a small projected matrix).

- :func:`steihaug`: min gᵀs + ½sᵀHs subject to ‖s‖ ≤ Δ by truncated CG (Steihaug 1983,
  Toint 1981): stops at the boundary, at negative curvature (then follows it to the boundary),
  or when the residual is small.
- :func:`lanczos_subspace`: an orthonormal Krylov basis Q of span{g, Hg, …} and T = QᵀHQ, from
  the spectrum part's Lanczos (full reorthogonalization).
- :func:`cubic_in_eigenbasis`: min wᵀu + ½Σθᵢuᵢ² + σ/3‖u‖³ exactly (the ARC subproblem
  reduced to a Krylov space and diagonalised; Cartis, Gould & Toint 2011, §6).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from curvscope.derivatives.seeding import generator
from curvscope.spectrum import Operator
from curvscope.spectrum.lanczos import Krylov


@dataclass(frozen=True)
class TrustStep:
    """A trust-region step s, H s (for the model value), and how CG ended."""

    step: Tensor
    Hs: Tensor
    boundary: bool
    iterations: int
    note: str


def _boundary_roots(z: Tensor, d: Tensor, radius: float) -> tuple[float, float]:
    """The two t with ‖z + t d‖ = Δ (t_a ≤ 0 ≤ t_b for ‖z‖ ≤ Δ)."""
    a, b, c = float(d @ d), 2 * float(z @ d), float(z @ z) - radius**2
    sq = math.sqrt(max(b * b - 4 * a * c, 0.0))
    aux = b + math.copysign(sq, b)  # the stable form of the quadratic formula
    ta, tb = (-aux / (2 * a), -2 * c / aux) if aux != 0 else (-sq / (2 * a), sq / (2 * a))
    return min(ta, tb), max(ta, tb)


def steihaug(
    hvp: Callable[[Tensor], Tensor], g: Tensor, radius: float, tol: float, max_iter: int
) -> TrustStep:
    """Truncated CG on H s = −g inside the ball ‖s‖ ≤ Δ (as scipy's trust-ncg, with H s carried
    along so the model value costs no further product)."""
    z, Hz = torch.zeros_like(g), torch.zeros_like(g)
    r = g.clone()
    d = -r
    rr = float(r @ r)

    def model(p: Tensor, Hp: Tensor) -> float:
        return float(g @ p + 0.5 * (p @ Hp))

    for it in range(1, max_iter + 1):
        Hd = hvp(d)
        dHd = float(d @ Hd)
        if dHd <= 0:
            ta, tb = _boundary_roots(z, d, radius)
            cands = [(z + t * d, Hz + t * Hd) for t in (ta, tb)]
            p, Hp = min(cands, key=lambda c: model(*c))
            return TrustStep(p, Hp, True, it, "negative curvature: followed to the trust boundary")
        alpha = rr / dHd
        z_next = z + alpha * d
        if float(z_next.norm()) >= radius:
            _, tb = _boundary_roots(z, d, radius)
            return TrustStep(z + tb * d, Hz + tb * Hd, True, it, "step reached the trust boundary")
        z, Hz = z_next, Hz + alpha * Hd
        r = r + alpha * Hd
        rr_new = float(r @ r)
        if math.sqrt(rr_new) < tol:
            return TrustStep(z, Hz, False, it, "")
        d = -r + (rr_new / rr) * d
        rr = rr_new
    return TrustStep(z, Hz, False, max_iter, f"CG stopped at its cap of {max_iter} iterations")


def lanczos_subspace(
    matmat: Callable[[Tensor], Tensor], g: Tensor, dim: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """(Q, T): an orthonormal basis (n, m) of the Krylov space started at g, m = min(dim, n),
    and T = QᵀHQ (m, m). Lanczos with full reorthogonalization; an invariant subspace is
    continued with a random direction (seeded), so m is always reached."""
    n = g.numel()
    op = Operator(matmat, n, g.dtype, g.device)
    gen = generator(seed, g.device)  # the PROBES stream: the seed as it is
    kr = Krylov(op, g[:, None], gen)
    while kr.size < min(dim, n):
        kr.extend()
    return kr.Q.clone(), kr.H.clone()


def cubic_in_eigenbasis(theta: Tensor, w: Tensor, sigma: float) -> tuple[Tensor, float]:
    """The global minimizer u of wᵀu + ½Σθᵢuᵢ² + σ/3‖u‖³ and its multiplier λ = σ‖u‖.

    u(λ) = −w/(θ + λ) with λ ≥ max(0, −θ_min) solving ‖u(λ)‖ = λ/σ (the secular equation, by
    bisection: ‖u(λ)‖ − λ/σ decreases in λ). In the "hard case" (w has no component along the
    bottom eigenvector and the equation has no root above −θ_min), that eigenvector is added
    to reach ‖u‖ = λ/σ (Nesterov & Polyak 2006, §5).
    """
    theta, w = theta.double(), w.double()
    lo = max(0.0, -float(theta.min()))
    tiny = 1e-12 * max(1.0, float(theta.abs().max()))
    at_bottom = (theta + lo).abs() <= tiny

    def norm_u(lam: float) -> float:
        den = theta + lam
        return float((w / den).norm()) if bool((den > 0).all()) else math.inf

    hard = lo > 0 and float(w[at_bottom].abs().max()) <= 1e-12 * max(float(w.abs().max()), 1e-300)
    if hard:
        u = torch.where(at_bottom, torch.zeros_like(w), -w / (theta + lo).where(~at_bottom, 1.0))
        if float(u.norm()) <= lo / sigma:
            tau = math.sqrt(max((lo / sigma) ** 2 - float(u.norm()) ** 2, 0.0))
            e = torch.zeros_like(w)
            e[int(torch.nonzero(at_bottom)[0])] = 1.0
            return u + tau * e, lo
    left, right = lo, lo + 1.0
    while norm_u(right) > right / sigma:
        right = lo + 2 * (right - lo)
    for _ in range(200):
        mid = 0.5 * (left + right)
        if norm_u(mid) > mid / sigma:
            left = mid
        else:
            right = mid
        if right - left <= 1e-15 * max(right, 1e-300):
            break
    lam = right
    return -w / (theta + lam), lam


def cubic_model(theta: Tensor, w: Tensor, u: Tensor, sigma: float) -> float:
    """wᵀu + ½Σθᵢuᵢ² + σ/3‖u‖³."""
    return float(w @ u + 0.5 * (theta * u * u).sum() + sigma / 3 * u.norm() ** 3)
