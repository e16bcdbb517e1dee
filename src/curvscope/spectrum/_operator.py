"""What the estimators accept as an operator, its combinators, and the pieces the estimators
share (budgets, progress).

Precision (:mod:`curvscope.spectrum.precision`): the products run in the operator's own dtype (a
half or bfloat16 model's curvature is computed in half or bfloat16), but every estimator's own
arithmetic — orthogonalization, projected eigenproblems, accumulations, probe statistics — runs
in the *working dtype*, float32 at least (:func:`~curvscope.spectrum.precision.working_dtype`).
:class:`Operator` casts each block to the product dtype just for the product and casts the
result back.
"""

from __future__ import annotations

import contextvars
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvscope.derivatives import Curvature, ShardedCurvature
from curvscope.derivatives.checks import all_finite, check_int, check_real
from curvscope.derivatives.distributed import check_same_on_ranks
from curvscope.derivatives.seeding import generator
from curvscope.derivatives.sharded import rank_generator
from curvscope.spectrum.precision import autocast_off, working_dtype

__all__ = [
    "Operator",
    "as_operator",
    "autocast_off",
    "check_budget",
    "check_progress_bar",
    "progress",
    "symmetry_tolerance",
    "working_dtype",
]


@dataclass
class Operator:
    """A symmetric linear map seen through block products: ``matmat(V)`` for V of shape (n, k).

    Built by :func:`as_operator` from a :class:`~curvscope.Curvature`, a dense symmetric
    tensor, or any object with ``matmat`` (or ``@``) and ``num_params``. ``dtype`` is the dtype
    ``matmat`` takes and returns (a Curvature's: its parameters'); calling the operator accepts
    any wider floating dtype (the estimators pass :attr:`work_dtype`), casts each column to
    ``dtype`` for the product and the result back.

    Operators compose, as lineax's do: :meth:`shifted` (A + σI), :meth:`scaled` (cA),
    :meth:`damped` (A + λD, the Levenberg-Marquardt damping) and :meth:`congruence` (DAD) return
    new operators over this one. A composition runs its own arithmetic in the dtype of the
    vectors it is given, at least the working dtype (:attr:`work_dtype`; it never narrows them),
    and calls this operator for the product, so the products still run in the wrapped
    operator's dtype and are counted on it as well (``matvecs`` of a composition counts the
    products taken through it; the wrapped operator's, and a Curvature's, count them too).
    Every composition is symmetric again — there is deliberately no one-sided diagonal scaling
    DA, which is not.

    Tags (declared, as lineax's are; the estimators rely on symmetry, PSD is informative):
        symmetric: Aᵀ = A. True for every Curvature and composition; for a dense tensor,
            whether it equals its transpose up to rounding: ``asymmetry`` at most
            :func:`symmetry_tolerance` (cs.eigenvalues, cs.density, cs.spectrum.cg and
            cs.trace_of_square refuse an operator that is not; cs.trace and cs.diagonal need
            no symmetry).
        psd: A is declared positive semi-definite: a Curvature of the Gauss-Newton family
            (``is_psd``), an object with a true ``is_psd``, and the compositions that keep it
            (a shift, scale or damping by non-negative amounts, any congruence). False means
            "not declared", not "indefinite".
    """

    matmat: Callable[[Tensor], Tensor]
    n: int
    dtype: torch.dtype
    device: torch.device
    source: Any = None
    matvecs: int = 0
    symmetric: bool = True
    psd: bool = False
    #: a composition: computes in its vectors' dtype (at least ``dtype``), never narrows them
    composed: bool = False
    #: for a shifted composition, the term σX it adds to the wrapped operator's product
    shift: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)
    #: sharded vectors (a :class:`~curvscope.derivatives.sharded.ShardedCurvature` below):
    #: a vector holds this rank's ``n`` entries, and a sum over a vector's entries (an inner
    #: product, a norm) is the ranks' partial sums reduced; None: whole vectors
    shards: ShardedCurvature | None = field(default=None, repr=False)
    #: for a dense tensor, ‖A − Aᵀ‖_F / ‖A‖_F; for an object, as probed (:meth:`require_symmetric`)
    asymmetry: float = 0.0
    #: an object's ``matmat``, whose symmetry is probed once, when an estimator that needs it
    #: asks (:meth:`require_symmetric`)
    probe_symmetry: bool = field(default=False, repr=False)
    #: check every product for NaN/Inf (one host read a product): an object's own ``matmat``
    #: and a float16 matrix's (whose products can overflow); a Curvature checks its own, a
    #: float32/float64 matrix is checked once, when it is wrapped
    check_products: bool = field(default=False, repr=False)
    #: for a composition, how the wrapped operator's product errors become this one's (the
    #: identity for a shift, c· for a scale, D· for a congruence DAD: the error of A(Dv) is
    #: scaled by D on the way out); see :meth:`_record_errors`
    errors_map: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)
    #: over finite-difference products (a Curvature with ``backend="finite_difference"``
    #: below): each call's estimated product errors, one a column, per unit of the column's
    #: norm — as this operator's products have them (a preconditioner's large factors
    #: multiply them). Tensors: read once, by the estimator that asks (:meth:`errors_since`)
    error_norms: list[Tensor] = field(default_factory=list, repr=False)
    #: whether the last call's error vectors are kept (:attr:`last_errors`): for a
    #: composition over this operator, which maps them, or an estimator that reads them
    keep_errors: bool = field(default=False, repr=False)
    #: the last call's estimated error vectors, (n, k), absolute for its input (with
    #: :attr:`keep_errors`; a composition takes its wrapped operator's, leaving None)
    last_errors: Tensor | None = field(default=None, repr=False)

    @property
    def dim(self) -> int:
        """The operator's dimension: ``n``, or the full length of sharded vectors."""
        return self.n if self.shards is None else self.shards.total_params

    def total(self, t: Tensor) -> Tensor:
        """Sums over vectors' entries made whole: ``t`` as it is for whole vectors; for sharded
        ones ``t`` holds this rank's partial sums, which are summed over the ranks whose shards
        partition the vectors (``ShardedCurvature.reduce_sum``: the operator's group, or HSDP's
        shard dimension) — the one place an estimator's arithmetic crosses ranks."""
        return t if self.shards is None else self.shards.reduce_sum(t)

    def dot(self, A: Tensor, B: Tensor) -> Tensor:
        """AᵀB for blocks of vectors (n, a) and (n, b), summed over the ranks' shards."""
        return self.total(A.T @ B)

    def norm(self, v: Tensor) -> Tensor:
        """‖v‖ of one vector (n,) over all its entries (a 0-d tensor: no host read)."""
        return v.norm() if self.shards is None else self.total(v @ v).sqrt()

    def generator(self, seed: object) -> torch.Generator:
        """The generator of this rank's entries of an estimator's random vectors, from its
        ``seed`` (:func:`~curvscope.derivatives.seeding.generator` on this device; a generator
        is used as it is): for whole vectors that one; for sharded ones a generator seeded from
        one draw of it and the rank in the group the vectors' sums reduce over, so that the
        shards' entries are independent and HSDP's replicas of a shard draw the same ones
        (:func:`~curvscope.derivatives.sharded.rank_generator`)."""
        gen = generator(seed, self.device)
        return gen if self.shards is None else rank_generator(gen, self.shards.sum_group)

    @property
    def group(self) -> Any:
        """The process group whose ranks take each product together (a Curvature's or a sharded
        view's, through any composition), or None."""
        if self.shards is not None:
            return self.shards.group
        return getattr(self.source, "group", None)

    def same_on_ranks(self, call: str, **arguments: Any) -> None:
        """Under a process group, raise on every rank unless every rank called ``call`` with
        the same ``arguments`` (one all-reduce; tensors and generators compared by their bytes).
        Each product sums the ranks' products of *their* vectors: a seed or a start vector that
        differs between ranks (``seed=rank``) gave a silently wrong, "converged" λ_max, and a
        differing ``k`` or budget a hang in the next collective."""
        if self.group is not None:
            check_same_on_ranks(self.group, self.device, call=call, **arguments)

    def alike(self, v: Any, values: bool = True) -> Any:
        """What every rank must hold alike of a vector argument (for :meth:`same_on_ranks`):
        a whole vector itself (its shape only, with ``values=False``: where the first rank's
        is taken), a sharded one — whose entries and length differ by rank — its shape past
        the first dimension (its length is checked on each rank, and a rank that refuses it
        stops them all); anything else as it is. A whole vector of the wrong length is refused
        by the estimator's own check, which says why: the lengths of a sharded vector given
        where whole ones go, different on every rank, are not called a difference between the
        ranks' calls."""
        if not isinstance(v, Tensor):
            return v
        if self.shards is not None:
            return tuple(v.shape[1:])
        if v.ndim == 0 or v.shape[0] != self.n:
            return "a vector of another length"
        return v if values else tuple(v.shape)

    def require_symmetric(self, what: str) -> None:
        """Refuse an operator not tagged symmetric, with its asymmetry and the fix. An object's
        ``matmat`` is probed first: two products (not counted in the estimator's ``matvecs``)
        on two seeded random vectors u, v, and |uᵀAv − vᵀAu| against their sizes — trusted
        unprobed, a non-symmetric one read 15.0, converged, for a largest real eigenvalue of
        6.18 (an outside review)."""
        if isinstance(self.source, Operator):  # a composition: its operand's probe too (an
            self.source.require_symmetric(what)  # object's went unprobed: the spectrum review)
        if self.probe_symmetry:
            self.probe_symmetry = False
            self.asymmetry = self._probed_asymmetry()
            if self.asymmetry > probed_symmetry_tolerance(self.dtype, self.dim):
                raise ValueError(
                    f"{what} needs a symmetric operator, and {type(self.source).__name__}."
                    f"matmat is not symmetric: |uᵀAv − vᵀAu| is {self.asymmetry:.3g} of "
                    "‖Au‖‖v‖ on two random vectors, more than rounding explains; return its "
                    "symmetric part (A + Aᵀ)/2 (cs.trace and cs.diagonal take any square "
                    "operator)"
                )
        if not self.symmetric:
            tolerance = symmetry_tolerance(self.dtype, self.dim)
            raise ValueError(
                f"{what} needs a symmetric operator, and this matrix is not symmetric: "
                f"‖A − Aᵀ‖_F/‖A‖_F = {self.asymmetry:.3g}, more than rounding explains (at most "
                f"{tolerance:.2g} for a {self.dim} x {self.dim} {dtype_name(self.dtype)} "
                "matrix); pass its symmetric part (A + A.T) / 2 (cs.trace and cs.diagonal take "
                "any square matrix)"
            )

    def _probed_asymmetry(self) -> float:
        """|uᵀAv − vᵀAu| / mean(‖Av‖‖u‖, ‖Au‖‖v‖) for two random vectors from a fixed seed
        (the global RNG untouched)."""
        gen = torch.Generator(device=self.device).manual_seed(0)
        U = torch.randn(self.n, 2, generator=gen, dtype=self.work_dtype, device=self.device)
        before = self.matvecs
        AU = torch.cat([self(U[:, :1]), self(U[:, 1:])], dim=1)  # as an estimator's first call
        self.matvecs = before  # the estimator's count is its own
        norms = torch.linalg.vector_norm(torch.cat([U, AU], dim=1), dim=0)
        read = torch.cat([torch.stack([U[:, 0] @ AU[:, 1], U[:, 1] @ AU[:, 0]]), norms])
        uav, vau, u, v, au, av = read.tolist()  # one host read
        size = (av * u + au * v) / 2
        return abs(uav - vau) / size if size > 0 else 0.0

    def require_whole(self, what: str) -> None:
        """Refuse sharded vectors, with the fix, in an estimator that needs whole ones."""
        if self.shards is not None:
            raise TypeError(
                f"{what} needs whole vectors; C.sharded() shards them over the ranks, which "
                "cs.eigenvalues, cs.trace and cs.trace_of_square (Hutchinson), cs.diagonal, "
                "cs.density and cs.spectrum.cg support: call it with the Curvature C itself "
                "(full-length vectors on every rank)"
            )

    @property
    def work_dtype(self) -> torch.dtype:
        """The dtype of the estimators' own arithmetic: :func:`working_dtype` of ``dtype``."""
        return working_dtype(self.dtype)

    def __call__(self, V: Tensor) -> Tensor:
        """A V, in V's dtype: the product runs in :attr:`dtype` (see the class docstring).

        Counts on :attr:`matvecs` every product the call causes: V's columns, or more where
        the wrapped object counts more (a Curvature with ``backend="auto"`` times its first
        large block both ways; a composition passes its wrapped operator's count on).
        """
        before = _count(self.source)
        out = self._product(V)
        self._tally(V.shape[1] if V.ndim == 2 else 1, before)
        if self.check_products and not all_finite(out):
            raise FloatingPointError(_non_finite(self.source, out, V))
        self._record_errors(V)
        return out

    def _record_errors(self, V: Tensor) -> None:
        """Over finite-difference products, this call's estimated errors (:attr:`error_norms`,
        and with :attr:`keep_errors` the vectors, :attr:`last_errors`): the products' own
        (``FiniteDifferenceProducts.errors``, per unit of ‖v‖), through every composition's
        :attr:`errors_map` — a diagonal preconditioner's congruence S^½ H S^½ multiplies the
        error of H(S^½v) by S^½ on the way out, which a relative error of H's products missed
        (an outside review: Adam's step factors up to 1e8 on a bias before BatchNorm, float32,
        a sharpness 30% off reported confident). Nothing for exact products."""
        if self.errors_map is None:
            fd = getattr(self.source, "_differences", None)
            if fd is None:  # exact products: nothing more on this hot path
                return
            block = V if V.ndim == 2 else V[:, None]
            k = block.shape[1]
            self.error_norms.append(torch.tensor(fd.errors[-k:], dtype=torch.float64, device="cpu"))
            if self.keep_errors:  # per unit of each column: made absolute for this V
                unit, fd.error_vectors = torch.stack(fd.error_vectors, dim=1), []
                self.last_errors = unit * self.total((block * block).sum(0)).sqrt().to(unit)
            return
        inner = getattr(self.source, "last_errors", None)
        if inner is None:
            return
        self.source.last_errors = None  # taken: the wrapped operator keeps no copy
        block = V if V.ndim == 2 else V[:, None]
        E = self.errors_map(inner)
        E = torch.where(torch.isnan(E), math.inf, E)  # 0·inf: an unknown error stays unknown
        sums = self.total(torch.stack([(E * E).sum(0), (block * block).sum(0).to(E.dtype)]))
        self.error_norms.append(torch.where(sums[1] > 0, (sums[0] / sums[1]).sqrt(), 0.0))
        if self.keep_errors:
            self.last_errors = E

    def errors_since(self, seen: int) -> list[float]:
        """The estimated product errors (per unit of a column's norm) of the calls after the
        first ``seen`` (``len(op.error_norms)`` before them): one host read."""
        fresh = self.errors_after(seen, torch.empty(0, dtype=torch.float64, device="cpu"))
        return [] if fresh is None else fresh.tolist()

    def errors_after(self, seen: int, like: Tensor) -> Tensor | None:
        """:meth:`errors_since` as one tensor of ``like``'s dtype and device, no host read (None
        for exact products: there are none)."""
        fresh = self.error_norms[seen:]
        return torch.cat([t.to(like) for t in fresh]) if fresh else None

    def _keep_errors(self) -> None:
        """Keep each call's error vectors (:attr:`last_errors`), and have a finite-difference
        Curvature below record them."""
        self.keep_errors = True
        fd = getattr(self.source, "_differences", None)
        if self.errors_map is None and fd is not None:
            fd.keep_vectors = True

    @contextmanager
    def errors_kept(self) -> Iterator[None]:
        """Within: :attr:`last_errors` after each call (for an estimator that reads them); as
        it was after, with nothing kept."""
        fd = getattr(self.source, "_differences", None) if self.errors_map is None else None
        was = self.keep_errors, None if fd is None else fd.keep_vectors
        self._keep_errors()
        try:
            yield
        finally:
            self.keep_errors, self.last_errors = was[0], None
            if fd is not None:
                fd.keep_vectors = was[1]

    def _product(self, V: Tensor) -> Tensor:
        if V.dtype == self.dtype:
            return self.matmat(V)
        if torch.finfo(V.dtype).bits <= torch.finfo(self.dtype).bits:
            return self.matmat(V.to(self.dtype)).to(V.dtype)
        if self.composed:  # its own arithmetic in V's dtype; the wrapped product narrows
            return self.matmat(V)
        return _narrowed_product(self.matmat, V, self.dtype)

    def residual(self, B: Tensor, X: Tensor) -> Tensor:
        """B − AX for blocks of shape (n, k): one product a column.

        For a shifted (or damped) operator A = S + σI it is (B − SX) − σX, term by term — the
        order in which ``cg``'s damping always formed a warm start's residual, which
        Hessian-free's damped solves follow to the last bit.
        """
        if self.shift is None:
            return B - self(X)
        before = _count(self.source)
        out = self.source.residual(B, X) - self.shift(X)
        self._tally(X.shape[1], before)
        return out

    def _tally(self, columns: int, before: int | None) -> None:
        """Count a call's products: its ``columns``, or what the wrapped operator counted
        since ``before`` where it counted more (a Curvature's backend tuning)."""
        after = _count(self.source)
        delta = 0 if before is None or after is None else after - before
        self.matvecs += max(columns, delta)

    # ------------------------------------------------------------------------ combinators
    def _over(
        self,
        matmat: Callable[[Tensor], Tensor],
        psd: bool,
        shift: Callable[[Tensor], Tensor] | None = None,
        errors_map: Callable[[Tensor], Tensor] = lambda E: E,
    ) -> Operator:
        """A composition over this operator: same size and device, the working dtype;
        ``errors_map``: how this operator's product errors become the composition's (which
        takes this operator's error vectors after each of its calls)."""
        self._keep_errors()
        dt, sym = self.work_dtype, self.symmetric
        return Operator(
            matmat,
            self.n,
            dt,
            self.device,
            self,
            0,
            sym,
            psd,
            True,
            shift,
            self.shards,
            self.asymmetry,
            errors_map=errors_map,
        )

    def shifted(self, sigma: float | Tensor) -> Operator:
        """A + σI for a number σ, or A + diag(σ) for a vector σ of length n.

        Any real shift (a negative one too: A − σI moves the spectrum; :meth:`damped` is the
        non-negative kind). PSD when A is declared PSD and σ ≥ 0 everywhere.

        Example:
            >>> import torch
            >>> from curvscope.spectrum import as_operator
            >>> A = as_operator(torch.diag(torch.tensor([1.0, 2.0]))).shifted(0.5)
            >>> A(torch.eye(2))
            tensor([[1.5000, 0.0000],
                    [0.0000, 2.5000]])
        """
        term: Callable[[Tensor], Tensor]
        if isinstance(sigma, Tensor):
            d = _check_diagonal(sigma, self, "sigma", nonnegative=False)
            psd = self.psd and bool(d.min() >= 0)

            def term(V: Tensor) -> Tensor:
                return _diag_times(d, V)
        else:
            s = check_real(sigma, "sigma")
            psd = self.psd and s >= 0

            def term(V: Tensor) -> Tensor:
                return s * V

        return self._over(lambda V: self(V) + term(V), psd, term)

    def scaled(self, c: float) -> Operator:
        """cA for a real number c. PSD when A is declared PSD and c ≥ 0."""
        c = check_real(c, "c")
        return self._over(lambda V: c * self(V), self.psd and c >= 0, errors_map=lambda E: c * E)

    def damped(self, lam: float, diagonal: Tensor | None = None) -> Operator:
        """A + λD: Levenberg-Marquardt (Tikhonov) damping, λ ≥ 0.

        D = I by default: then A + λI, the damping of Hessian-free and of ``cg(damping=λ)``
        (Martens 2010), the same product as :meth:`shifted` by λ. With ``diagonal`` d ≥ 0
        (length n), D = diag(d): Marquardt's (1963) scale-invariant damping, e.g. d = diag(A)
        or d = 1/s² for parameters of typical size s, computed as A + diag(λ·d).

        What sets it apart from :meth:`shifted`: a damping only adds curvature (λ ≥ 0, d ≥ 0
        are checked), so it keeps a PSD operator PSD and is what regularizes a Newton step;
        a shift may move the spectrum either way.
        """
        lam = check_real(lam, "lam")
        if lam < 0:
            raise ValueError(
                f"expected the damping lam to be >= 0, got {lam!r}; a damping adds curvature "
                "(use shifted() to move the spectrum down)"
            )
        if diagonal is None:
            return self.shifted(lam)
        d = _check_diagonal(diagonal, self, "diagonal", nonnegative=True)
        return self.shifted(lam * d)

    def congruence(self, d: Tensor) -> Operator:
        """DAD for D = diag(d), d a vector of length n: A seen in the coordinates x = Dy, e.g.
        a diagonal preconditioner's P^-½ A P^-½ (d = P^-½). Symmetric again, and PSD when A
        is declared PSD (yᵀDADy = (Dy)ᵀA(Dy))."""
        dd = _check_diagonal(d, self, "d", nonnegative=False)
        return self._over(
            lambda V: _diag_times(dd, self(_diag_times(dd, V))),
            self.psd,
            errors_map=lambda E: _diag_times(dd, E),
        )

    def to_dense(self) -> Tensor:
        """The (n, n) matrix in the working dtype, from n products (for small n and tests)."""
        self.require_whole("to_dense()")
        return self(torch.eye(self.n, dtype=self.work_dtype, device=self.device))


def _diag_times(d: Tensor, V: Tensor) -> Tensor:
    """diag(d) V for a vector (n,) or a block (n, k)."""
    return d[:, None] * V if V.ndim == 2 else d * V


def _check_diagonal(d: object, op: Operator, name: str, nonnegative: bool) -> Tensor:
    """A diagonal as a vector (n,) of finite entries (≥ 0 if asked), in the working dtype."""
    if not isinstance(d, Tensor):
        raise TypeError(
            f"expected {name} to be a torch.Tensor of shape ({op.n},), got {type(d).__name__}"
        )
    if d.shape != (op.n,) or not d.is_floating_point():
        raise ValueError(
            f"expected {name} to be a floating-point vector of shape ({op.n},), one entry per "
            f"row of the operator, got {d.dtype} of shape {tuple(d.shape)}"
        )
    if not torch.isfinite(d).all():
        raise ValueError(f"{name} has non-finite entries (NaN/Inf); check how it was computed")
    if nonnegative and bool((d < 0).any()):
        raise ValueError(
            f"expected {name} >= 0 everywhere (a damping adds curvature), got a minimum of "
            f"{float(d.min()):.3g}"
        )
    return d.to(dtype=op.work_dtype, device=op.device)


def _narrowed_product(matmat: Callable[[Tensor], Tensor], V: Tensor, dtype: torch.dtype) -> Tensor:
    """matmat(V) for V wider than the product dtype: each column is scaled by a power of two to
    a largest entry in [1, 2) before the cast (exact, and float16's narrow range — 6e-5 to
    65504 — then neither flushes the small entries of a unit vector of a large model nor
    overflows), and the result is scaled back in V's dtype."""
    V2 = V if V.ndim == 2 else V[:, None]
    top = V2.abs().amax(dim=0)
    scale = torch.where(top > 0, torch.exp2(torch.floor(torch.log2(top))), torch.ones_like(top))
    scale = torch.where(torch.isfinite(scale), scale, torch.ones_like(top))
    out = matmat((V2 / scale).to(dtype)).to(V.dtype) * scale
    return out if V.ndim == 2 else out[:, 0]


def as_operator(A: Any) -> Operator:
    """``A`` as an :class:`Operator` (an Operator is returned as it is), with its tags: a
    Curvature is PSD for the Gauss-Newton family; a tensor is tagged symmetric if it equals its
    transpose up to rounding (:func:`symmetry_tolerance`); an object declares PSD by a true
    ``is_psd``.

    Raises:
        FloatingPointError: a tensor with NaN or Inf entries (and, later, a product of an
            object's ``matmat`` or of a float16 matrix that is not finite).
        TypeError, ValueError: what is neither a Curvature, a square floating tensor, nor an
            object with ``matmat`` (or ``@``) and a positive integer ``num_params``, or such an
            object's ``dtype`` that is not a floating torch dtype.
    """
    if isinstance(A, Operator):
        return A
    if isinstance(A, Curvature):
        return Operator(A.matmat, A.num_params, A.dtype, A.device, A, psd=A.is_psd)
    if isinstance(A, ShardedCurvature):
        return Operator(A.matmat, A.num_params, A.dtype, A.device, A, shards=A)
    if isinstance(A, Tensor):
        return _dense_operator(A)
    n = getattr(A, "num_params", None)
    if n is None or not (hasattr(A, "matmat") or hasattr(A, "__matmul__")):
        raise TypeError(
            "expected a cs.Curvature, a square torch.Tensor, or an object with matmat/@ and "
            f"num_params; got {type(A).__name__}. Build one with cs.Curvature(model, loss_fn, data)"
            + (
                ", or convert the array: torch.from_numpy(A)"
                if type(A).__module__.startswith("numpy")
                else "; a scipy LinearOperator L: an object with num_params = L.shape[0] and "
                "matmat(V) = torch.from_numpy(L.matmat(V.numpy()))"
                if hasattr(A, "matmat") and hasattr(A, "shape")
                else ""
            )
        )
    try:
        n = check_int(n, "num_params", minimum=1)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{type(A).__name__}: {e} (the operator's size: A is n x n)") from None
    dtype, assumed = _object_dtype(A)
    device = torch.device(getattr(A, "device", "cpu"))
    product = _ObjectProduct(A, n, dtype, assumed)
    psd = getattr(A, "is_psd", False) is True
    return Operator(product, n, dtype, device, A, psd=psd, check_products=True, probe_symmetry=True)


#: A dense matrix counts as symmetric when ‖A − Aᵀ‖_F ≤ SYMMETRY_ROUNDING·√n·eps(dtype)·‖A‖_F:
#: the rounding of a matrix built by products of inner dimension n grows like √n·eps (measured
#: at most 0.4·√n·eps for a chain of four float64 factors, n = 10 to 3000, and 6·eps in float32).
SYMMETRY_ROUNDING = 4.0


#: ...and never more than this: a relative asymmetry of 5% is no rounding in any dtype (the
#: √n term passed √2 for bfloat16 at n = 2000, accepting random and triangular matrices).
SYMMETRY_MOST = 0.05


def probed_symmetry_tolerance(dtype: torch.dtype, n: int) -> float:
    """The largest probed |uᵀAv − vᵀAu| / ‖Au‖‖v‖ an object's ``matmat`` may show and count as
    symmetric: √eps(dtype), at least :func:`symmetry_tolerance`, at most ``SYMMETRY_MOST``. A
    product's inner dimension, which its rounding grows with, is not known from outside: a
    float32 Gauss-Newton-shaped product Bᵀ(D(BV)) over 100,000 rows was refused as not
    symmetric in 22 of 80 draws at 4·√n·eps (the spectrum review); an operator truly not
    symmetric shows an asymmetry of order 1."""
    rounding = math.sqrt(torch.finfo(dtype).eps)
    return min(max(rounding, symmetry_tolerance(dtype, n)), SYMMETRY_MOST)


def symmetry_tolerance(dtype: torch.dtype, n: int) -> float:
    """The largest ‖A − Aᵀ‖_F / ‖A‖_F that rounding explains for an n x n matrix of ``dtype``:
    ``SYMMETRY_ROUNDING``·√n·eps(dtype), at most ``SYMMETRY_MOST``.

    Example:
        >>> f"{symmetry_tolerance(torch.float32, 100):.2g}"
        '4.8e-06'
    """
    return min(SYMMETRY_ROUNDING * math.sqrt(n) * torch.finfo(dtype).eps, SYMMETRY_MOST)


def _dense_operator(A: Tensor) -> Operator:
    """A square floating tensor as an Operator: its entries checked finite and its asymmetry
    measured once, here (two reductions over A, one host read)."""
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(A.shape)}")
    if A.shape[0] == 0:  # "lower k" was no fix (an outside review)
        raise ValueError("expected a square matrix with at least one row, got shape (0, 0)")
    if not A.is_floating_point():
        raise TypeError(f"expected a floating-point matrix, got {A.dtype}")
    M, skew = _entries(A)
    norms = torch.stack(
        [
            torch.linalg.vector_norm(skew, dtype=torch.float64),
            torch.linalg.vector_norm(M, dtype=torch.float64),
        ]
    ).tolist()
    if not all(math.isfinite(x) for x in norms):
        nan, inf = int(torch.isnan(M).sum()), int(torch.isinf(M).sum())
        if nan or inf:
            raise FloatingPointError(
                f"the {A.shape[0]} x {A.shape[1]} matrix has {nan} NaN and {inf} Inf entries: "
                "no spectrum, trace or solve is defined; check how it was computed"
            )
        scale = float(M.abs().max())  # finite entries whose norm overflows: scale them
        norms = [
            float(torch.linalg.vector_norm(skew / scale, dtype=torch.float64)),
            float(torch.linalg.vector_norm(M / scale, dtype=torch.float64)),
        ]
    elif norms[1] < 1e-100 and (scale := float(M.abs().max())) > 0:
        # entries whose squares underflow: a random 1e-170 matrix read symmetric (a review)
        norms = [
            float(torch.linalg.vector_norm(skew / scale, dtype=torch.float64)),
            float(torch.linalg.vector_norm(M / scale, dtype=torch.float64)),
        ]
    asymmetry = norms[0] / norms[1] if norms[1] > 0 else 0.0
    symmetric = asymmetry <= symmetry_tolerance(A.dtype, A.shape[0])
    return Operator(
        lambda V: A @ V,
        A.shape[0],
        A.dtype,
        A.device,
        A,
        symmetric=symmetric,
        asymmetry=asymmetry,
        check_products=A.dtype == torch.float16,  # 65504: a product can overflow
    )


def _entries(A: Tensor) -> tuple[Tensor, Tensor]:
    """The entries of A and of A − Aᵀ (what their norms and finiteness are read from): the
    matrices themselves, or for a sparse matrix (COO, CSR, CSC) its stored values (norms of a
    sparse tensor raised torch's NotImplementedError: a review)."""
    if A.layout == torch.strided:
        M = A.detach()
        return M, M - M.mT
    C = A.detach().to_sparse_coo().coalesce()
    return C.values(), (C - C.t()).coalesce().values()


def _object_dtype(A: Any) -> tuple[torch.dtype, bool]:
    """An object's ``dtype`` (a torch dtype or its name, "float64"), and whether it was assumed
    (no attribute: float32)."""
    dtype = getattr(A, "dtype", None)
    if dtype is None:
        return torch.float32, True
    if isinstance(dtype, str):
        named = getattr(torch, dtype.removeprefix("torch."), None)
        dtype = named if isinstance(named, torch.dtype) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"expected {type(A).__name__}.dtype to be a floating torch.dtype (the dtype its "
            f"matmat takes and returns), got {dtype!r}; set it to e.g. torch.float64"
        )
    return dtype, False


class _ObjectProduct:
    """An object's ``matmat`` (or ``@``), checked: a failure says what the object declared
    (``num_params``, ``dtype``) and how to fix it, and a result of the wrong shape or kind is
    refused before it reaches an estimator's arithmetic."""

    def __init__(self, A: Any, n: int, dtype: torch.dtype, assumed: bool) -> None:
        self.A, self.n, self.dtype, self.assumed = A, n, dtype, assumed
        self.name = f"{type(A).__name__}.matmat" if hasattr(A, "matmat") else "A @ V"
        self.mm: Callable[[Tensor], Any] = getattr(A, "matmat", None) or (lambda V: A @ V)

    def _declared(self) -> str:
        dt = dtype_name(self.dtype)
        return f"num_params={self.n}, dtype {dt}" + (
            " (assumed: it has no dtype attribute)" if self.assumed else ""
        )

    def __call__(self, V: Tensor) -> Tensor:
        try:
            out = self.mm(V)
        except Exception as e:  # the object's own code: say what it was given and declared
            fix = (
                "if its matmat computes in another dtype, give it a dtype attribute "
                "(e.g. dtype = torch.float64)"
                if self.assumed
                else "check num_params (its size) and dtype (what matmat takes and returns)"
            )
            raise _again(
                e,
                f"{self.name} failed on a block of shape {tuple(V.shape)} and dtype "
                f"{dtype_name(V.dtype)} — the operator declares {self._declared()}; {fix}. "
                f"It raised {type(e).__name__}: {e}",
            ) from e
        if not isinstance(out, Tensor) or not out.is_floating_point():
            got = f"a {out.dtype} tensor" if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(
                f"{self.name} returned {got}; it must return A @ V as a floating-point tensor"
            )
        if out.shape != V.shape:
            raise ValueError(
                f"{self.name} returned shape {tuple(out.shape)} for a block of shape "
                f"{tuple(V.shape)}: it must return A @ V, of V's shape (n, k) — the operator "
                f"declares {self._declared()}; check num_params"
            )
        if out.dtype != V.dtype:  # torch's bare "expected m1 and m2 to have the same dtype"
            raise TypeError(
                f"{self.name} returned {dtype_name(out.dtype)} for a {dtype_name(V.dtype)} "
                f"block — the operator declares {self._declared()}: matmat must return its "
                "declared dtype; set dtype to what it computes in, or cast its result"
            )
        return out


def _again(e: Exception, message: str) -> Exception:
    """An exception of e's type with ``message`` (a RuntimeError where that type cannot be
    built from one string)."""
    try:
        return type(e)(message)
    except Exception:
        return RuntimeError(message)


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as messages name it: "float32", not "torch.float32"."""
    return str(dtype).removeprefix("torch.")


def _count(source: Any) -> int | None:
    """The product counter of what an operator wraps — a Curvature's or an Operator's, whose
    counts are products; an object's own ``matvecs`` may count anything (it read 64 a column
    and stopped a run at its cap: a review), so it is not read — or None."""
    if not isinstance(source, (Operator, Curvature, ShardedCurvature)):
        return None
    count = getattr(source, "matvecs", None)
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def _non_finite(source: Any, out: Tensor, V: Tensor) -> str:
    """The message of a product with NaN/Inf entries: which operator, and whether its input
    was finite (an error path: the entries are counted)."""
    what = (
        f"the {source.shape[0]} x {source.shape[1]} {dtype_name(source.dtype)} matrix's product"
        if isinstance(source, Tensor)
        else f"{type(source).__name__}.matmat"
    )
    bad = int((~torch.isfinite(out)).sum())
    if not all_finite(V):
        return (
            f"{what} was given a block with NaN/Inf entries (and returned {bad}): a vector "
            "passed in (b, x0, v0) or an earlier product was not finite"
        )
    hint = (
        "it overflowed the float16 range (65504): use A.float()"
        if isinstance(source, Tensor)
        else "the operator is not defined there; check it"
    )
    return (
        f"{what} returned {bad} non-finite entries (NaN/Inf) for a finite block of shape "
        f"{tuple(V.shape)}: {hint}"
    )


def check_budget(matvecs: object, minimum: int, what: str) -> int:
    """A product budget: an integer >= minimum (TypeError for 10.5, ValueError for 1)."""
    try:
        return check_int(matvecs, "matvecs", minimum)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{what}: {e}") from None


#: Unless asked (``progress_bar=True``/``False``), a bar appears on a terminal once a job has
#: run AUTO_AFTER seconds and the rate so far says it will take AUTO_LONGER in all.
AUTO_AFTER, AUTO_LONGER = 1.0, 2.0


#: an override of ``progress_bar=None`` for the estimators a caller runs (:func:`bars`)
_BARS: contextvars.ContextVar[bool | None] = contextvars.ContextVar("curvscope_bars", default=None)


@contextmanager
def bars(enabled: bool | None) -> Iterator[None]:
    """The progress bars of the estimators run inside, where they are left at None: shown
    (True), never (False), or as each decides (None) — a ``diagnose`` inside a training loop
    drew its Lanczos bar under the loop's own (an outside review)."""
    check_progress_bar(enabled)
    token = _BARS.set(enabled)
    try:
        yield
    finally:
        _BARS.reset(token)


class _Progress:
    """A tqdm bar over products: shown at once (``enabled=True``), never (False), or — auto,
    on a terminal — from the moment the job is seen to be long (an estimate from the products
    so far: a few-second λ_max on a large model shows one, a fast one on a small model none)."""

    def __init__(self, total: int, desc: str, enabled: bool | None) -> None:
        check_progress_bar(enabled)
        enabled = _BARS.get() if enabled is None else enabled
        self.total, self.desc, self.done = total, desc, 0
        self.auto = enabled is None and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.bar: Any = None
        if enabled:
            self._open()

    def _open(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=self.total, initial=self.done, desc=self.desc, unit="product", leave=False
        )

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is None and self.auto and self.done < self.total:
            elapsed = time.perf_counter() - self.start
            if elapsed >= AUTO_AFTER and elapsed * self.total / self.done >= AUTO_LONGER:
                self._open()
                return
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_progress_bar(enabled: object) -> None:
    """``progress_bar`` is True, False or None (a string such as "no" would read as true)."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(
            "expected progress_bar to be True (always), False (never) or None (on a terminal "
            f"once the run is seen to be long), got {enabled!r} ({type(enabled).__name__})"
        )


@contextmanager
def progress(total: int, desc: str, enabled: bool | None) -> Iterator[_Progress]:
    """A progress bar over products; ``enabled=None`` shows it on a terminal once the job is
    seen to take more than :data:`AUTO_LONGER` seconds (:class:`_Progress`)."""
    bar = _Progress(total, desc, enabled)
    try:
        yield bar
    finally:
        bar.close()
