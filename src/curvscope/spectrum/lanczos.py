"""Block Lanczos with full reorthogonalization and thick restarts, in torch on the operator's
device (no host round-trips but the small projected eigenproblem). The basis, the projected
matrix and the recurrences are kept in the operator's working dtype (float32 at least); only
the products run in the operator's own dtype.

The basis Q grows a block at a time; the projected matrix H = QᵀAQ is filled from the
orthogonalization coefficients themselves (classical Gram-Schmidt, twice), so it stays exact
after a thick restart (Wu & Simon 2000; Stewart's Krylov-Schur), when the basis is cut back to
the wanted Ritz vectors. With F the residual block of the last step (A Q = Q H + F Eᵀ), a Ritz
pair (θ, Qs) has residual ‖A Qs − θ Qs‖ = ‖F s_last‖ — the number every estimate reports.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvscope.spectrum._operator import Operator


def _orthonormalize(
    X: Tensor, Q: Tensor | None, gen: torch.Generator, scale: float
) -> tuple[Tensor, Tensor]:
    """Orthonormal columns spanning X ⟂ Q, and R with X⊥ = Xn R.

    A column that vanishes (an invariant subspace was found) is replaced by a random direction
    orthogonal to everything so far, with a zero row in R: the Krylov space continues.
    """
    Xn, R = torch.linalg.qr(X)
    tiny = torch.finfo(X.dtype).eps * 100 * max(scale, 1e-300)
    dead = R.diagonal().abs() <= tiny
    if dead.any():
        for j in torch.nonzero(dead).flatten().tolist():
            r = torch.randn(X.shape[0], 1, generator=gen, dtype=X.dtype, device=X.device)
            for basis in (Q, Xn[:, :j]):
                if basis is not None and basis.numel():
                    r -= basis @ (basis.T @ r)
                    r -= basis @ (basis.T @ r)
            Xn[:, j : j + 1] = r / r.norm()
            R[j, :] = 0
    return Xn, R


class Krylov:
    """A growing orthonormal basis Q of a Krylov space of A, and H = QᵀAQ.

    The basis is stored as the rows of a preallocated buffer (Qᵀ, contiguous), which grows by
    doubling: both projections Qᵀw and Q c then run on contiguous memory, and a step costs
    O(n·m) for the orthogonalization and nothing for copying the basis.
    """

    def __init__(self, op: Operator, X0: Tensor, gen: torch.Generator) -> None:
        self.op, self.gen = op, gen
        dt = op.work_dtype
        X0 = X0.to(dtype=dt)
        self.X, _ = _orthonormalize(X0, None, gen, float(X0.abs().max()))
        self._buf = torch.empty(max(8, 2 * X0.shape[1]), op.n, dtype=dt, device=op.device)
        self._m = 0
        self.H = torch.zeros(0, 0, dtype=dt, device=op.device)
        self.R = torch.zeros(0, 0, dtype=dt, device=op.device)  # F = X R (last step)
        self.scale = 0.0

    @property
    def size(self) -> int:
        return self._m

    @property
    def Q(self) -> Tensor:
        """(n, m) view of the basis."""
        return self._buf[: self._m].T

    def _reserve(self, m: int) -> None:
        if m > self._buf.shape[0]:
            cap = min(self.op.n, max(m, 2 * self._buf.shape[0]))
            buf = torch.empty(cap, self.op.n, dtype=self._buf.dtype, device=self._buf.device)
            buf[: self._m] = self._buf[: self._m]
            self._buf = buf

    def extend(self) -> None:
        """One block step: W = A X, orthogonalize against [Q, X], record H.

        Classical Gram-Schmidt, repeated only when the first pass cancelled much of W
        (the "twice is enough" test of Daniel, Gragg, Kaufman & Stewart 1976).
        """
        X = self.X
        m, b = self._m, X.shape[1]
        W = self.op(X)
        self._reserve(m + b)
        self._buf[m : m + b] = X.T
        Bt = self._buf[: m + b]  # rows: the basis
        before = W.norm(dim=0)
        coef = Bt @ W
        W = W - Bt.T @ coef
        if bool((W.norm(dim=0) < 0.7 * before).any()):
            c2 = Bt @ W
            W = W - Bt.T @ c2
            coef = coef + c2
        H = torch.zeros(m + b, m + b, dtype=self.H.dtype, device=self.H.device)
        H[:m, :m] = self.H
        H[:, m:] = coef
        H[m:, :m] = coef[:m].T
        H[m:, m:] = (coef[m:] + coef[m:].T) / 2
        self._m, self.H = m + b, H
        self.scale = max(self.scale, float(H.abs().max()))
        if self.size < self.op.n:
            self.X, self.R = _orthonormalize(W, Bt.T, self.gen, self.scale)
            keep = min(self.X.shape[1], self.op.n - self.size)
            self.X, self.R = self.X[:, :keep], self.R[:keep]
        else:  # the whole space: every Ritz pair is exact
            self.X = torch.zeros(self.op.n, 0, dtype=W.dtype, device=W.device)
            self.R = torch.zeros(0, b, dtype=W.dtype, device=W.device)

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (ascending), their coordinates S in Q, and residual norms."""
        theta, S = torch.linalg.eigh(self.H)
        if self.R.numel() == 0:  # the whole space: exact
            return theta, S, torch.zeros_like(theta)
        return theta, S, (self.R @ S[-self.R.shape[1] :, :]).norm(dim=0)

    def vectors(self, S: Tensor) -> Tensor:
        """Ritz vectors Q S, (n, j)."""
        return (S.T @ self._buf[: self._m]).T

    def restart(self, S_keep: Tensor, theta_keep: Tensor) -> None:
        """Cut the basis back to the Ritz vectors Q S_keep (thick restart); H becomes diagonal.

        The residual block stays the next block: A Y = Y Θ + X R E_lastᵀ S_keep, and the next
        step's projections recover that coupling in H.
        """
        p = S_keep.shape[1]
        self._buf[:p] = S_keep.T @ self._buf[: self._m]
        self._m = p
        self.H = torch.diag(theta_keep)
        self.R = torch.zeros(0, 0, dtype=self.H.dtype, device=self.H.device)


def tridiagonal(op: Operator, z: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Plain three-term Lanczos from z, without reorthogonalization: (α, β) of the tridiagonal,
    float64; β holds one entry per α, the last being the coupling β_m to the next (unbuilt)
    Lanczos vector (0 at an invariant subspace), so the off-diagonal is β[:-1].

    Memory O(n) and no O(n·m) projections. In finite precision the Ritz values acquire "ghost"
    copies, but the Gauss quadrature the tridiagonal defines stays a good approximation of the
    spectral measure (Knizhnerman 1996) — which is all stochastic Lanczos quadrature needs.
    Stops early at an invariant subspace. Runs in the operator's working dtype.
    """
    z = z.to(op.work_dtype)
    q = z[:, 0] / z.norm()
    q_prev = torch.zeros_like(q)
    alphas, betas = [], []
    beta = 0.0
    for _ in range(steps):
        w = op(q[:, None])[:, 0] - beta * q_prev
        alpha = float(q @ w)
        w = w - alpha * q
        alphas.append(alpha)
        beta = float(w.norm())
        if beta <= 1e3 * torch.finfo(w.dtype).eps * abs(alpha) + 1e-300:
            betas.append(0.0)  # an invariant subspace: the quadrature is exact
            break
        betas.append(beta)
        if len(alphas) == steps:
            break
        q_prev, q = q, w / beta
    return torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64)


def error_bounds(theta: Tensor, res: Tensor) -> Tensor:
    """Estimated eigenvalue errors: min(r, r²/gap).

    r bounds the distance to *some* eigenvalue; r²/gap is the sharper bound for an isolated one
    (Parlett, The Symmetric Eigenvalue Problem, §11-7). The gap is taken to the nearest other
    Ritz value *less that value's own residual*: an unconverged neighbour may hide eigenvalues
    closer than it looks, and then the estimate falls back to r.
    """
    if theta.numel() < 2:
        return res.clone()
    d = (theta[:, None] - theta[None, :]).abs() - res[None, :]
    d.fill_diagonal_(float("inf"))
    gap = d.min(dim=1).values.clamp_min(torch.finfo(theta.dtype).tiny)
    return torch.minimum(res, res**2 / gap)
