"""Block Lanczos with full reorthogonalization and thick restarts: the basis and its products
in torch on the operator's device, the small projected problem on the host. The basis and the
recurrences are kept in the operator's working dtype (float32 at least); only the products run
in the operator's own dtype. The projected matrix H and the residual coupling R are kept on the
host in float64 (numpy): they are (m, m) and (b, b) for a basis of m vectors in blocks of b,
and every decision a step makes (convergence, restarts, a vanished direction) is read off them,
so a step reads the device once.

The basis Q grows a block at a time; the projected matrix H = QᵀAQ is filled from the
orthogonalization coefficients themselves (classical Gram-Schmidt, twice), so it stays exact
after a thick restart (Wu & Simon 2000; Stewart's Krylov-Schur), when the basis is cut back to
the wanted Ritz vectors. With F the residual block of the last step (A Q = Q H + F Eᵀ), a Ritz
pair (θ, Qs) has residual ‖A Qs − θ Qs‖ = ‖F s_last‖ — the number every estimate reports.

Host synchronisation: a *host read* is any read of a device tensor's values by Python
(``.item()``, ``float()``, ``bool()``, ``.tolist()``, ``.numpy()``); on an accelerator each one
waits for the queued work. :meth:`Krylov.extend` makes exactly one (the new column of H and the
residual coupling, read together), the constructor one, :meth:`Krylov.restart` and
:meth:`Krylov.vectors` none (they copy the small coefficients *to* the device without waiting
on it), and :func:`tridiagonal` one per step. What the operator's own product reads comes on
top: a :class:`~curvscope.Curvature` checks its input and output for NaN and, when cached, that
the model is unchanged (three reads a product on an accelerator); an object's own ``matmat``
(and a float16 matrix's product) is checked for NaN/Inf by the Operator, one read a product.

Sharded vectors (``Operator.shards``: each rank holds its entries of every vector) change only
the inner products: each is this rank's partial sum, all-reduced over the ranks
(:meth:`~curvscope.spectrum.Operator.dot`) — collectives, not host reads — and the block QR is
Gram-Schmidt over the columns with reduced inner products; every rank then holds the same H and
takes the same decisions.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from curvscope.spectrum._operator import Operator
from curvscope.spectrum.precision import scaled_column_norms, square_sums


def host(t: Tensor) -> np.ndarray:
    """The values of a device tensor on the host, float64: one host read (see the module
    docstring)."""
    return t.detach().to("cpu", torch.float64).numpy()


def to_device(a: np.ndarray, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host array copied to the device without waiting for the device's queued work (pinned
    memory and a non-blocking copy on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _replace_dead(
    op: Operator,
    Xn: Tensor,
    R: np.ndarray,
    dead: np.ndarray,
    Q: Tensor | None,
    gen: torch.Generator,
) -> None:
    """Columns of Xn whose direction vanished (an invariant subspace was found) become random
    directions orthogonal to everything so far — the basis Q and every other column of the
    block that is final (live, or replaced before) — with zero rows in R: the Krylov space
    continues. Device work only (and, for sharded vectors, collectives); the dead columns are
    known on the host. (Orthogonal to the block's earlier columns only, a replacement was not
    to its later live ones: the basis lost orthogonality step by step and a run over a small
    operator returned values off by 13 for 5, "exact" once it filled the space: a review.)"""
    for j in np.flatnonzero(dead).tolist():
        final = [i for i in range(Xn.shape[1]) if i != j and (i < j or not dead[i])]
        Xn[:, j : j + 1] = _fresh(op, gen, Q, Xn[:, final])
        R[j, :] = 0


def _fresh(op: Operator, gen: torch.Generator, Q: Tensor | None, others: Tensor) -> Tensor:
    """A random unit direction orthogonal to the basis Q and the block's ``others``."""
    r = torch.randn(others.shape[0], 1, generator=gen, dtype=others.dtype, device=others.device)
    return _orthonormal(op, r, Q, others)


def _orthonormal(op: Operator, r: Tensor, Q: Tensor | None, others: Tensor) -> Tensor:
    """r orthogonalized twice against Q and the block's other columns, and normalized."""
    for basis in (Q, others):
        if basis is not None and basis.shape[1]:
            r = r - basis @ op.dot(basis, r)
            r = r - basis @ op.dot(basis, r)
    return r / op.dot(r, r).sqrt()


def _polish_weak(op: Operator, Xn: Tensor, weak: np.ndarray, dead: np.ndarray, Q: Tensor) -> None:
    """The ``weak`` columns, which nearly died — R's diagonal below √eps of the scale but above
    rounding's level — orthogonalized again after their normalization: dividing by so small a
    norm magnifies what the two passes left of the basis (eps·‖AX‖/r_jj), and the basis lost
    its orthogonality (a PSD matrix of rank 4 gave Ritz values down to −720 once the run went
    on past its invariant subspace)."""
    for j in np.flatnonzero(weak).tolist():
        others = [i for i in range(Xn.shape[1]) if i != j and not dead[i]]  # dead: replaced
        Xn[:, j : j + 1] = _orthonormal(op, Xn[:, j : j + 1].clone(), Q, Xn[:, others])


def _qr(op: Operator, W: Tensor) -> tuple[Tensor, Tensor]:
    """W = QR with orthonormal columns Q: torch's Householder QR for whole vectors; for sharded
    ones classical Gram-Schmidt twice over the block's columns, each inner product reduced over
    the ranks (a dead column — R's diagonal at rounding level — is left for the caller)."""
    if op.shards is None:
        Q, R = torch.linalg.qr(W)
        return Q, R
    Q, R = W.clone(), W.new_zeros(W.shape[1], W.shape[1])
    for j in range(W.shape[1]):
        q = Q[:, j : j + 1]
        for _ in range(2 if j else 0):
            c = op.dot(Q[:, :j], q)
            q -= Q[:, :j] @ c
            R[:j, j : j + 1] += c
        norm = op.dot(q, q).sqrt()
        R[j, j] = norm[0, 0]
        q /= torch.where(norm > 0, norm, torch.ones_like(norm))
    return Q, R


def _dead(R: np.ndarray, dtype: torch.dtype, scale: float) -> np.ndarray:
    """Which columns of a QR's R lost their direction: a diagonal at rounding level."""
    tiny = torch.finfo(dtype).eps * 100 * max(scale, 1e-300)
    return np.abs(np.diag(R)) <= tiny


class Krylov:
    """A growing orthonormal basis Q of a Krylov space of A, and H = QᵀAQ.

    The basis is stored as the rows of a preallocated buffer (Qᵀ, contiguous) of ``capacity``
    rows, or growing by doubling: both projections Qᵀw and Q c then run on contiguous memory,
    and a step costs O(n·m) for the orthogonalization and nothing for copying the basis. Each
    step orthogonalizes twice, always: one pass of classical Gram-Schmidt was tried (it halves
    the projections) and, in float32 at the default tolerance, gave a value 12 off on a spectrum
    with a 1e-4 gap at the top (``which="both"``). H and R live on the
    host (float64 numpy, :attr:`Hh`, :attr:`Rh`); :attr:`H` and :attr:`R` are device copies.
    """

    def __init__(
        self, op: Operator, X0: Tensor, gen: torch.Generator, capacity: int | None = None
    ) -> None:
        self.op, self.gen = op, gen
        dt = op.work_dtype
        X0 = X0.to(dtype=dt)
        X, R = _qr(op, X0)
        # the scale below which a column is dead: its largest entry, or with sharded vectors
        # the largest column norm (no further collective)
        top = X0.abs().max() if op.shards is None else R.diagonal().abs().max()
        read = host(torch.cat([R.flatten(), top.reshape(1)]))  # the one read
        b = X0.shape[1]
        Rh = read[:-1].reshape(b, b)
        _replace_dead(op, X, Rh, _dead(Rh, dt, float(read[-1])), None, gen)
        self.X = X
        # ``capacity``: the largest basis the caller will keep, allocated at once — on the CPU
        # its pages are touched (and count as memory) only as the basis grows, and the basis is
        # never copied; without it (on accelerators) the buffer grows by doubling
        rows = max(8, 2 * b) if capacity is None else max(capacity, b)
        self._buf = torch.empty(min(rows, op.dim), op.n, dtype=dt, device=op.device)
        self._m = 0
        self.Hh = np.zeros((0, 0))
        self.Rh = np.zeros((0, 0))  # F = X R (last step)
        self.scale = 0.0
        #: whether the last step found an invariant subspace (a direction of the block died,
        #: or nearly, and a fresh one, not yet multiplied, took its place)
        self.broke = False

    @property
    def size(self) -> int:
        return self._m

    @property
    def Q(self) -> Tensor:
        """(n, m) view of the basis."""
        return self._buf[: self._m].T

    @property
    def H(self) -> Tensor:
        """QᵀAQ (m, m) in the working dtype on the operator's device."""
        return to_device(self.Hh, self.op.work_dtype, self.op.device)

    @property
    def R(self) -> Tensor:
        """The residual coupling of the last step (F = X R), working dtype, on the device."""
        return to_device(self.Rh, self.op.work_dtype, self.op.device)

    def _reserve(self, m: int) -> None:
        if m > self._buf.shape[0]:
            cap = min(self.op.dim, max(m, 2 * self._buf.shape[0]))
            buf = torch.empty(cap, self.op.n, dtype=self._buf.dtype, device=self._buf.device)
            buf[: self._m] = self._buf[: self._m]
            self._buf = buf

    def extend(self) -> None:
        """One block step: W = A X, orthogonalize against [Q, X], record H. One host read.

        Where a direction of W vanishes (the Krylov space became invariant: a breakdown), the
        next block gets a fresh random direction instead, with zero coupling in R.

        Classical Gram-Schmidt twice, always ("twice is enough": Giraud, Langou & Rozložník
        2005): deciding whether the second pass is needed would cost a host read.
        """
        X = self.X
        m, b = self._m, X.shape[1]
        W = self.op(X)
        self._reserve(m + b)
        self._buf[m : m + b] = X.T
        Bt = self._buf[: m + b]  # rows: the basis
        op = self.op
        coef = op.dot(Bt.T, W)
        W = W - Bt.T @ coef
        c2 = op.dot(Bt.T, W)
        W = W - Bt.T @ c2
        coef = coef + c2
        whole = m + b >= op.dim
        if whole:  # the whole space: every Ritz pair is exact
            read = host(coef).reshape(m + b, b)
        else:
            Xn, R = _qr(op, W)
            read = host(torch.cat([coef.flatten(), R.flatten()]))
        H = np.zeros((m + b, m + b))
        H[:m, :m] = self.Hh
        c = read[: (m + b) * b].reshape(m + b, b)
        H[:, m:] = c
        H[m:, :m] = c[:m].T
        H[m:, m:] = (c[m:] + c[m:].T) / 2
        self._m, self.Hh = m + b, H
        self.scale = max(self.scale, float(np.abs(H).max()))
        if whole:
            self.X = W[:, :0]
            self.Rh = np.zeros((0, b))
            return
        Rh = read[(m + b) * b :].reshape(b, b).copy()
        keep = min(b, op.dim - self._m)
        dead, size = _dead(Rh, W.dtype, self.scale), np.abs(np.diag(Rh))
        eps = torch.finfo(W.dtype).eps
        _polish_weak(op, Xn, (size < math.sqrt(eps) * self.scale) & ~dead, dead, Bt.T)
        # a column that nearly died (within eps^¾ of the scale: in float64 a residual of 1e-13
        # was above the dead's 2e-14) closed the space as well — what continues it is
        # rounding's noise, a fresh direction in effect; in float32 the dead's own threshold
        # is the larger, and a Hessian's small bulk (β near √eps of λ_max) is no closing
        closing = size <= eps**0.75 * self.scale
        _replace_dead(op, Xn, Rh, dead, Bt.T, self.gen)
        self.broke = bool((dead | closing)[:keep].any())
        self.X, self.Rh = Xn[:, :keep], Rh[:keep]

    def widen(self) -> None:
        """One more column in the next block: a random direction orthogonal to the basis and
        the block, with no coupling to the last step (a zero row of R: the residuals stay
        exact). The block keeps its new width. Device work only."""
        fresh = _fresh(self.op, self.gen, self._buf[: self._m].T, self.X)
        self.X = torch.cat([self.X, fresh], dim=1)
        self.Rh = np.vstack([self.Rh, np.zeros((1, self.Rh.shape[1]))])

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), their coordinates S in Q, and residual norms: host arrays
        (float64), no host read."""
        theta, S = np.linalg.eigh(self.Hh)
        if self.Rh.size == 0:  # the whole space: exact
            return theta, S, np.zeros_like(theta)
        return theta, S, column_norms(self.Rh @ S[-self.Rh.shape[1] :, :])

    def vectors(self, S: np.ndarray) -> Tensor:
        """Ritz vectors Q S, (n, j), for coordinates S on the host."""
        St = to_device(S, self._buf.dtype, self._buf.device)
        return (St.T @ self._buf[: self._m]).T

    def restart(self, S_keep: np.ndarray, theta_keep: np.ndarray) -> None:
        """Cut the basis back to the Ritz vectors Q S_keep (thick restart); H becomes diagonal.

        The residual block stays the next block: A Y = Y Θ + X R E_lastᵀ S_keep, and the next
        step's projections recover that coupling in H.
        """
        p = S_keep.shape[1]
        St = to_device(S_keep, self._buf.dtype, self._buf.device)
        self._buf[:p] = St.T @ self._buf[: self._m]
        self._m = p
        self.Hh = np.diag(np.asarray(theta_keep, dtype=np.float64))
        self.Rh = np.zeros((0, 0))


def tridiagonal(op: Operator, z: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Plain three-term Lanczos from z, without reorthogonalization: (α, β) of the tridiagonal,
    float64; β holds one entry per α, the last being the coupling β_m to the next (unbuilt)
    Lanczos vector (0 at an invariant subspace), so the off-diagonal is β[:-1].

    Memory O(n) and no O(n·m) projections. In finite precision the Ritz values acquire "ghost"
    copies, but the Gauss quadrature the tridiagonal defines stays a good approximation of the
    spectral measure (Knizhnerman 1996) — which is all stochastic Lanczos quadrature needs.
    Stops early at an invariant subspace. Runs in the operator's working dtype; one host read a
    step (α and β together), besides what the operator's product reads.
    """
    z = z.to(op.work_dtype)
    q = z[:, 0] / _scaled_norm(op, z[:, 0])
    q_prev = torch.zeros_like(q)
    alphas: list[float] = []
    betas: list[float] = []
    beta_t = torch.zeros((), dtype=q.dtype, device=q.device)
    info = torch.finfo(q.dtype)
    scale = 0.0  # the largest |α| or β so far
    for _ in range(steps):
        w = op(q[:, None])[:, 0] - beta_t * q_prev
        alpha_t = op.total(q @ w)
        w = w - alpha_t * q
        # scaled (an O(n) pass more, beside a product): from its plain sum of squares a float64
        # spectrum at 1e-170 read β = 0, "an invariant subspace", one node, the negative mass
        # 0 for 0.25, and at 1e160 β = inf, then NaN nodes (a review); read with α, one read
        beta_t = _scaled_norm(op, w)
        alpha, beta = host(torch.stack([alpha_t, beta_t])).tolist()
        alphas.append(alpha)
        scale = max(scale, abs(alpha), betas[-1] if betas else 0.0)
        if beta <= 1e3 * info.eps * scale:
            betas.append(0.0)  # an invariant subspace: the quadrature is exact
            break
        betas.append(beta)
        if len(alphas) == steps:
            break
        q_prev, q = q, w / beta_t
    return torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64)


def _scaled_norm(op: Operator, v: Tensor) -> Tensor:
    """‖v‖ where its sum of squares underflows or overflows the working dtype, in v's dtype:
    of v divided by its largest entry for whole vectors (a float64 vector at 1e±200 too); for
    sharded ones each rank's sum of squares in float64 (:func:`square_sums`: a float32
    operator's range), summed over the ranks. No host read."""
    if op.shards is not None:  # one collective: each rank's sum in float64
        return op.total(square_sums(v)).sqrt().to(v.dtype)
    return scaled_column_norms(op, v[:, None])[0]


def error_bounds(theta: np.ndarray, res: np.ndarray) -> np.ndarray:
    """Estimated eigenvalue errors: min(r, r²/gap), on host arrays.

    r is a bound: some eigenvalue lies within r of θ. r²/gap is an *estimate*: it bounds the
    error when the gap to every other eigenvalue is at least ``gap`` (Parlett, The Symmetric
    Eigenvalue Problem, §11-7), and the gap is only known from the Ritz values: it is taken to
    the nearest other Ritz value *less that value's own residual* (an unconverged neighbour may
    hide eigenvalues closer than it looks, and then the estimate falls back to r). An
    eigenvalue Lanczos has not resolved at all — a cluster member closer than r that no Ritz
    value approximates yet — makes the true error exceed r²/gap (measured up to 4000x for six
    eigenvalues within 1e-4 of λ_max); r still bounds the distance to the nearest eigenvalue.
    """
    theta, res = np.asarray(theta, dtype=np.float64), np.asarray(res, dtype=np.float64)
    if theta.size < 2:
        return res.copy()
    d = np.abs(theta[:, None] - theta[None, :]) - res[None, :]
    np.fill_diagonal(d, np.inf)
    gap = np.maximum(d.min(axis=1), np.finfo(np.float64).tiny)
    with np.errstate(over="ignore"):  # r·(r/gap) overflows to inf where the gap vanishes: then r
        return np.minimum(res, res * (res / gap))  # (r² underflowed for a spectrum at 1e-200)


def column_norms(M: np.ndarray) -> np.ndarray:
    """The 2-norms of M's columns, scaled by each column's largest entry: the sum of squares
    underflowed for a float64 operator at 1e-200 (residuals of 0: a wrong value "converged" after
    3 products) and overflowed at 1e200 (right values "not converged": an outside review)."""
    top = np.abs(M).max(axis=0) if M.size else np.zeros(M.shape[1])
    top = np.where(top > 0, top, 1.0)
    return np.linalg.norm(M / top, axis=0) * top
