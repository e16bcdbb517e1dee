"""Block Lanczos with full reorthogonalization and thick restarts, in torch on the operator's
device and dtype (no host round-trips but the small projected eigenproblem).

The basis Q grows a block at a time; the projected matrix H = QᵀAQ is filled from the
orthogonalization coefficients themselves (classical Gram-Schmidt, twice), so it stays exact
after a thick restart (Wu & Simon 2000; Stewart's Krylov-Schur), when the basis is cut back to
the wanted Ritz vectors. With F the residual block of the last step (A Q = Q H + F Eᵀ), a Ritz
pair (θ, Qs) has residual ‖A Qs − θ Qs‖ = ‖F s_last‖ — the number every estimate reports.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class Krylov:
    """A growing orthonormal basis Q of a Krylov space of A, and H = QᵀAQ."""

    op: Operator
    gen: torch.Generator
    Q: Tensor  # (n, m)
    H: Tensor  # (m, m)
    X: Tensor  # the next block, orthonormal and ⟂ Q
    R: Tensor  # the residual block F = X R of the last step (A Q = Q H + X R E_lastᵀ)
    scale: float = 0.0

    @classmethod
    def start(cls, op: Operator, X0: Tensor, gen: torch.Generator) -> Krylov:
        X, _ = _orthonormalize(X0, None, gen, float(X0.abs().max()))
        empty = torch.zeros(op.n, 0, dtype=op.dtype, device=op.device)
        h = torch.zeros(0, 0, dtype=op.dtype, device=op.device)
        return cls(op, gen, empty, h, X, torch.zeros(0, 0, dtype=op.dtype, device=op.device))

    @property
    def size(self) -> int:
        return self.Q.shape[1]

    def extend(self) -> None:
        """One block step: W = A X, orthogonalize against [Q, X] twice, record H."""
        X = self.X
        W = self.op(X)
        basis = torch.cat([self.Q, X], dim=1)
        coef = basis.T @ W
        W = W - basis @ coef
        c2 = basis.T @ W
        W = W - basis @ c2
        coef = coef + c2
        m, b = self.size, X.shape[1]
        H = torch.zeros(m + b, m + b, dtype=self.H.dtype, device=self.H.device)
        H[:m, :m] = self.H
        H[:, m:] = coef
        H[m:, :m] = coef[:m].T
        H[m:, m:] = (coef[m:] + coef[m:].T) / 2
        self.Q, self.H = basis, H
        self.scale = max(self.scale, float(H.abs().max()))
        if self.size < self.op.n:
            self.X, self.R = _orthonormalize(W, basis, self.gen, self.scale)
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

    def restart(self, S_keep: Tensor, theta_keep: Tensor) -> None:
        """Cut the basis back to the Ritz vectors Q S_keep (thick restart); H becomes diagonal."""
        self.Q = self.Q @ S_keep
        self.H = torch.diag(theta_keep)
        # the residual block stays the next block: A Y = Y Θ + X R E_lastᵀ S_keep
        self.R = torch.zeros(0, 0, dtype=self.H.dtype, device=self.H.device)


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
