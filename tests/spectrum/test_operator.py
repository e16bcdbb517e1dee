"""Operator combinators (shifted, scaled, damped, congruence) against dense float64 matrices:
the products, the tags they keep, the matvec counts they pass through, and bad arguments."""

import pytest
import torch
from torch import nn

import curvscope as cs
from curvscope.spectrum import Operator, as_operator

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _spd(n=7, seed=0):
    Q = torch.randn(n, n, generator=_gen(seed), dtype=DT)
    return Q @ Q.T + 0.1 * torch.eye(n, dtype=DT)


def _sym(n=7, seed=1):
    Q = torch.randn(n, n, generator=_gen(seed), dtype=DT)
    return Q + Q.T


def _vec(n=7, seed=2, positive=False):
    v = torch.randn(n, generator=_gen(seed), dtype=DT)
    return v.abs() + 0.1 if positive else v


def _curvature(kind):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X = torch.randn(10, 3, generator=_gen(3), dtype=DT)
    y = torch.randint(0, 2, (10,), generator=_gen(4))
    return cs.Curvature(model, nn.CrossEntropyLoss(), (X, y), kind=kind, backend="double_backward")


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_each_combinator_is_the_dense_matrix_it_names():
    A, s, d = _sym(), _vec(), _vec(positive=True)
    op = as_operator(A)
    eye = torch.eye(7, dtype=DT)
    _close(op.shifted(0.7).to_dense(), A + 0.7 * eye)
    _close(op.shifted(-2.5).to_dense(), A - 2.5 * eye)
    _close(op.shifted(s).to_dense(), A + torch.diag(s))
    _close(op.scaled(-3.0).to_dense(), -3.0 * A)
    _close(op.damped(0.4).to_dense(), A + 0.4 * eye)
    _close(op.damped(0.4, d).to_dense(), A + 0.4 * torch.diag(d))
    _close(op.congruence(s).to_dense(), torch.diag(s) @ A @ torch.diag(s))


def test_compositions_compose_and_take_single_vectors():
    A, s, d = _spd(), _vec(), _vec(positive=True)
    op = as_operator(A).damped(0.3, d).congruence(s).scaled(2.0).shifted(-1.0)
    dense = 2.0 * torch.diag(s) @ (A + 0.3 * torch.diag(d)) @ torch.diag(s) - torch.eye(7, dtype=DT)
    _close(op.to_dense(), dense)
    v = _vec(seed=9)
    _close(op(v), dense @ v)  # a flat vector in, a flat vector out
    _close(op(v[:, None])[:, 0], dense @ v)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_a_curvature_composes_and_counts_every_product_on_itself_too(kind):
    C = _curvature(kind)
    H = C.to_dense()
    C.matvecs = 0
    base = as_operator(C)
    l2 = torch.linspace(0.0, 0.2, C.num_params, dtype=DT)
    half = torch.linspace(0.5, 1.5, C.num_params, dtype=DT)
    op = base.shifted(l2).congruence(half)
    _close(op.to_dense(), torch.diag(half) @ (H + torch.diag(l2)) @ torch.diag(half))
    V = torch.randn(C.num_params, 3, generator=_gen(5), dtype=DT)
    op(V)
    n = C.num_params
    assert op.matvecs == n + 3  # to_dense's n columns, then 3
    assert base.matvecs == n + 3 and C.matvecs == n + 3  # passed through to the wrapped ones


def test_the_cg_damping_is_the_damped_operator_bit_for_bit():
    A, b = _sym(), _vec(seed=4)
    for x0 in (None, _vec(seed=5)):
        by_hand = cs.spectrum.cg(A, b, damping=9.0, x0=x0, tol=1e-12, max_matvecs=20)
        composed = cs.spectrum.cg(as_operator(A).damped(9.0), b, x0=x0, tol=1e-12, max_matvecs=20)
        assert torch.equal(by_hand.x, composed.x)
        assert by_hand.iterations == composed.iterations and by_hand.matvecs == composed.matvecs
    assert by_hand.converged
    _close(by_hand.x, torch.linalg.solve(A + 9.0 * torch.eye(7, dtype=DT), b))


def test_a_damped_residual_is_formed_term_by_term_as_cg_always_formed_it():
    A, B, X = _sym(), _vec(seed=6)[:, None], _vec(seed=7)[:, None]
    base = as_operator(A)
    op = base.damped(0.3).shifted(_vec(seed=8))
    d = _vec(seed=8)[:, None]
    assert torch.equal(op.residual(B, X), ((B - A @ X) - 0.3 * X) - d * X)
    assert op.matvecs == base.matvecs == 1
    scaled = base.scaled(2.0)  # not a shift: B − (cA)X in one piece
    assert torch.equal(scaled.residual(B, X), B - 2.0 * (A @ X))


def test_a_composition_never_narrows_the_vectors_it_is_given():
    A = _spd(5).float()
    base = as_operator(A)
    op = base.shifted(0.25)
    assert op.dtype == torch.float32
    V = torch.randn(5, 2, generator=_gen(9), dtype=DT)
    out = op(V)  # the product narrows to float32 inside; the shift is added in float64
    assert out.dtype == DT and torch.equal(out, base(V) + 0.25 * V)


def test_tags_psd_where_it_follows_and_symmetric_always():
    psd = as_operator(_curvature("ggn"))
    indefinite = as_operator(_curvature("hessian"))
    assert psd.psd and not indefinite.psd
    d = torch.ones(psd.n, dtype=DT)
    kept = [psd.shifted(0.0), psd.shifted(1.0), psd.shifted(d), psd.scaled(2.0), psd.damped(0.1)]
    kept += [psd.damped(0.1, d), psd.congruence(-d), psd.damped(1.0).congruence(d).scaled(0.5)]
    assert all(op.psd and op.symmetric for op in kept)
    lost = [psd.shifted(-0.1), psd.shifted(-d), psd.scaled(-1.0), indefinite.damped(1.0)]
    assert not any(op.psd for op in lost) and all(op.symmetric for op in lost)
    # a dense tensor is tagged by looking at it; PSD is never guessed
    assert as_operator(_spd()).symmetric and not as_operator(_spd()).psd
    assert not as_operator(torch.triu(_spd())).symmetric

    class Declared:
        num_params, is_psd = 3, True

        def matmat(self, V):
            return V

    assert as_operator(Declared()).psd


def test_compositions_compute_in_the_working_dtype_and_products_in_the_operators():
    A = _spd(6).to(torch.bfloat16)
    seen = []

    def matmat(V):
        seen.append(V.dtype)
        return A @ V

    op = Operator(matmat, 6, torch.bfloat16, torch.device("cpu")).shifted(0.5).scaled(3.0)
    assert op.dtype == torch.float32  # the working dtype of bfloat16
    V = torch.randn(6, 2, generator=_gen(6))
    out = op(V)
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    expected = 3.0 * ((A @ V.to(torch.bfloat16)).float() + 0.5 * V)
    assert torch.equal(out, expected)
    assert op(V.double()).dtype == DT  # a wider vector comes back in its own dtype


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda op: op.shifted("1"), TypeError, "sigma to be a real number, got str"),
        (lambda op: op.shifted(True), TypeError, "sigma to be a real number, got bool"),
        (lambda op: op.shifted(float("nan")), ValueError, "sigma to be a finite number"),
        (lambda op: op.shifted(torch.ones(3, dtype=DT)), ValueError, r"sigma .* shape \(7,\)"),
        (lambda op: op.shifted(torch.ones(7, dtype=torch.long)), ValueError, "floating-point"),
        (lambda op: op.scaled(float("inf")), ValueError, "c to be a finite number"),
        (lambda op: op.damped(-0.1), ValueError, "damping lam to be >= 0.*use shifted"),
        (
            lambda op: op.damped(0.1, -torch.ones(7, dtype=DT)),
            ValueError,
            "diagonal >= 0 everywhere.*minimum of -1",
        ),
        (
            lambda op: op.damped(0.1, torch.full((7,), float("nan"), dtype=DT)),
            ValueError,
            "diagonal has non-finite entries",
        ),
        (lambda op: op.congruence([1.0] * 7), TypeError, r"d to be a torch.Tensor of shape \(7,\)"),
    ],
)
def test_bad_arguments_are_named(build, error, match):
    with pytest.raises(error, match=match):
        build(as_operator(_sym()))


# --------------------------------------------------------- what the estimators refuse, and why
def _asymmetric(n=40, seed=5):
    return _sym(n, seed) + torch.triu(torch.ones(n, n, dtype=DT))


NEEDS_SYMMETRY = {
    "cs.eigenvalues": lambda A: cs.eigenvalues(A),
    "cs.density": lambda A: cs.density(A, steps=5, probes=2),
    "cs.spectrum.cg": lambda A: cs.spectrum.cg(A, torch.ones(A.shape[0], dtype=A.dtype)),
    "cs.trace_of_square": lambda A: cs.trace_of_square(A, 10),
}


@pytest.mark.parametrize("name", NEEDS_SYMMETRY)
def test_a_non_symmetric_matrix_is_refused_where_symmetry_is_assumed(name):
    """It used to be accepted silently: eigenvalues gave 51.1 for a matrix whose symmetric
    part has λ_max 3 (review e3)."""
    with pytest.raises(
        ValueError, match=rf"{name} needs a symmetric.*‖_F = 0\.\d+.*\(A \+ A\.T\) / 2"
    ):
        NEEDS_SYMMETRY[name](_asymmetric())


def test_trace_and_diagonal_take_any_square_matrix():
    A = _asymmetric()
    assert cs.trace(A, method="exact").value == pytest.approx(float(torch.trace(A)))
    torch.testing.assert_close(cs.diagonal(A, method="exact").value, A.diagonal())
    r = cs.trace(A, 30, method="hutchinson")
    assert abs(r.value - float(torch.trace(A))) <= 5 * r.stderr


def test_float32_matrices_symmetric_up_to_rounding_are_accepted():
    """B QΛQᵀ Bᵀ formed in float32 is symmetric to about 5 eps only (torch.allclose said no);
    an asymmetry of 1e-4, far above rounding, is refused."""
    n = 300
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(0)))
    B = torch.randn(n, n, generator=_gen(1)) / n**0.5
    A = B @ (q * torch.linspace(-1.0, 1.0, n)) @ q.T @ B.T
    assert not torch.equal(A, A.T)
    op = as_operator(A)
    assert op.symmetric and 0 < op.asymmetry < 20 * torch.finfo(torch.float32).eps
    ref = torch.linalg.eigvalsh(((A + A.T) / 2).double())
    r = cs.eigenvalues(A, k=1, which="both")
    torch.testing.assert_close(r.values.double(), ref[[-1, 0]], atol=2e-3, rtol=0)
    E = torch.randn(n, n, generator=_gen(2))
    with pytest.raises(ValueError, match="not symmetric"):
        cs.eigenvalues(A + 1e-4 * A.norm() / E.norm() * E)


def _with_nan(value):
    A = _spd(20)
    A[3, 3] = value
    return A


ESTIMATORS = {
    "eigenvalues": lambda A: cs.eigenvalues(A),
    "density": lambda A: cs.density(A, steps=5, probes=2),
    "trace": lambda A: cs.trace(A, 10),
    "trace exact": lambda A: cs.trace(A, method="exact"),
    "trace_of_square": lambda A: cs.trace_of_square(A, 10),
    "diagonal": lambda A: cs.diagonal(A, 10),
    "cg": lambda A: cs.spectrum.cg(A, torch.ones(20, dtype=DT)),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ESTIMATORS)
def test_a_matrix_with_nan_or_inf_is_named_by_every_estimator(name, value):
    """It gave numpy's LinAlgError (eigenvalues), a silent 0.0 (density) or nan (trace)."""
    with pytest.raises(FloatingPointError, match=r"20 x 20 matrix has \d NaN and \d Inf"):
        ESTIMATORS[name](_with_nan(value))


class Custom:
    """An operator of the user's own: ``matmat`` and ``num_params``, and what it declares."""

    def __init__(self, A, num_params=None, dtype="unset", out=None):
        self.A, self.num_params, self.out = A, num_params or A.shape[0], out
        if dtype != "unset":
            self.dtype = dtype

    def matmat(self, V):
        return self.A @ V if self.out is None else self.out(self.A, V)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_a_custom_product_with_nan_is_named_by_every_estimator(name):
    op = Custom(_spd(20), dtype=DT, out=lambda A, V: (A @ V) * float("nan"))
    with pytest.raises(FloatingPointError, match=r"Custom\.matmat returned \d+ non-finite"):
        ESTIMATORS[name](op)


def test_a_float64_operator_without_dtype_says_to_declare_it():
    with pytest.raises(RuntimeError, match=r"assumed: it has no dtype.*dtype = torch\.float64"):
        cs.eigenvalues(Custom(_spd(20)))
    ref = torch.linalg.eigvalsh(_spd(20))[-1]
    r = cs.eigenvalues(Custom(_spd(20), dtype="float64"))  # a dtype's name is taken
    assert r.values.dtype == DT and r.values[0] == pytest.approx(float(ref), rel=1e-3)
    with pytest.raises(TypeError, match=r"Custom\.dtype to be a floating torch\.dtype"):
        cs.eigenvalues(Custom(_spd(20), dtype="double precision"))
    with pytest.raises(TypeError, match=r"Custom\.dtype to be a floating torch\.dtype"):
        cs.eigenvalues(Custom(_spd(20), dtype=torch.int64))


@pytest.mark.parametrize(
    ("op", "error", "match"),
    [
        (
            Custom(_spd(20), num_params=15, dtype=DT),
            RuntimeError,
            "declares num_params=15.*num_params",
        ),
        (
            Custom(_spd(20), num_params=2.5, dtype=DT),
            TypeError,
            "Custom: expected num_params to be an integer",
        ),
        (Custom(_spd(20), num_params=-3, dtype=DT), ValueError, "num_params to be an integer >= 1"),
        (
            Custom(_spd(20), dtype=DT, out=lambda A, V: (A @ V)[:, 0]),
            ValueError,
            r"returned shape \(20,\) for a block of shape \(20, 1\).*check num_params",
        ),
        (
            Custom(_spd(20), dtype=DT, out=lambda A, V: torch.cat([A @ V, V[:1]])),
            ValueError,
            r"returned shape \(21, 1\)",
        ),
        (Custom(_spd(20), dtype=DT, out=lambda A, V: (A @ V).tolist()), TypeError, "returned list"),
        # another dtype than declared: torch's "expected m1 and m2 to have the same dtype"
        (
            Custom(_spd(20), dtype=DT, out=lambda A, V: (A @ V).float()),
            TypeError,
            "returned float32 for a float64 block.*declared dtype",
        ),
    ],
)
def test_a_custom_operator_that_does_not_match_its_declaration_is_named(op, error, match):
    """These gave raw torch or QR errors (review e4)."""
    with pytest.raises(error, match=match):
        cs.eigenvalues(op)


def test_arrays_and_scipy_operators_are_named_with_the_conversion():
    import numpy as np
    from scipy.sparse.linalg import aslinearoperator

    A = np.eye(4)
    with pytest.raises(TypeError, match=r"torch\.from_numpy\(A\)"):
        cs.eigenvalues(A)
    with pytest.raises(TypeError, match=r"num_params = L\.shape\[0\]"):
        cs.eigenvalues(aslinearoperator(A))


def test_a_tiny_matrix_is_judged_symmetric_on_its_own_scale():
    """Entries of 1e-170 have squares that underflow: a random matrix's asymmetry read 0 and
    was accepted (an outside review)."""
    N = torch.randn(50, 50, generator=torch.Generator().manual_seed(0), dtype=DT) * 1e-170
    with pytest.raises(ValueError, match="not symmetric"):
        cs.eigenvalues(N)
    cs.eigenvalues((N + N.T) / 2, progress_bar=False)  # its symmetric part is taken


@pytest.mark.parametrize("bad", ["no", 0.0, 1, "False"])
@pytest.mark.parametrize(
    "call",
    [
        lambda pb: cs.eigenvalues(_spd(), progress_bar=pb),
        lambda pb: cs.trace(_spd(), 10, progress_bar=pb),
        lambda pb: cs.trace_of_square(_spd(), 10, progress_bar=pb),
        lambda pb: cs.diagonal(_spd(), 10, progress_bar=pb),
        lambda pb: cs.density(_spd(), steps=3, progress_bar=pb),
    ],
)
def test_progress_bar_takes_true_false_or_none(call, bad):
    """ "no" read as true and showed a bar (review p1)."""
    with pytest.raises(TypeError, match=r"progress_bar to be True .*False .*None.*got"):
        call(bad)


def test_cg_refuses_a_right_hand_side_with_nan():
    b = torch.ones(7, dtype=DT)
    b[2] = float("nan")
    with pytest.raises(ValueError, match="b has non-finite entries"):
        cs.spectrum.cg(_spd(), b)


def test_a_bfloat16_matrix_that_is_not_symmetric_is_refused_at_any_size():
    """4·√n·eps passed √2 for bfloat16 at n = 2000: random and triangular matrices counted as
    symmetric (a review); the tolerance is capped at SYMMETRY_MOST."""
    from curvscope.spectrum._operator import SYMMETRY_MOST, symmetry_tolerance

    assert symmetry_tolerance(torch.bfloat16, 3000) == SYMMETRY_MOST
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3000, 3000, generator=g).bfloat16()
    with pytest.raises(ValueError, match="not symmetric"):
        cs.eigenvalues(A, k=1)
    S = (A.float() @ A.float().T / 3000).bfloat16()  # symmetric up to bfloat16 rounding
    assert as_operator(S).symmetric


def test_an_objects_own_matvecs_attribute_is_not_read_as_products():
    """An object whose matvecs counted 64 a column stopped a run at its cap (a review): only a
    Curvature's or an Operator's counter counts products."""
    A = torch.diag(torch.arange(1.0, 31.0, dtype=torch.float64))

    class Op:
        num_params, dtype, matvecs = 30, torch.float64, 0

        def matmat(self, V):
            self.matvecs += 64 * V.shape[1]
            return A @ V

    r = cs.eigenvalues(Op(), k=1)
    assert r.all_converged and r.values[0] == pytest.approx(30.0)
    assert r.matvecs < 64
    assert cs.trace(Op(), 20, "hutchinson").matvecs == 20


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_a_sparse_matrix_is_an_operator_checked_like_a_dense_one(layout):
    """A sparse matrix raised torch's NotImplementedError from the symmetry check (a review):
    its stored values are checked, and its products are torch's sparse ones."""
    n = 60
    i = torch.arange(n)
    rows, cols = torch.cat([i, i[:-1], i[1:]]), torch.cat([i, i[1:], i[:-1]])
    vals = torch.cat([2 * torch.ones(n), -torch.ones(n - 1), -torch.ones(n - 1)]).double()
    L = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n)).coalesce()

    def sparse(M):
        return M.to_sparse() if layout == "coo" else M.to_sparse_csr()

    dense = L.to_dense()
    ev = torch.linalg.eigvalsh(dense)
    r = cs.eigenvalues(sparse(dense), k=2, tol=1e-8)
    torch.testing.assert_close(r.values, ev[-2:].flip(0), rtol=0, atol=1e-6)
    assert cs.trace(sparse(dense), method="exact").value == pytest.approx(2.0 * n)
    skew = dense.clone()
    skew[0, 5] = 3.0
    with pytest.raises(ValueError, match="not symmetric"):
        cs.eigenvalues(sparse(skew), k=1)
    bad = dense.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="1 NaN"):
        cs.eigenvalues(sparse(bad), k=1)


def test_an_objects_matmat_is_probed_for_symmetry_where_it_is_needed():
    """An object's matmat was trusted: a non-symmetric one read 15.0, converged, for a largest
    real eigenvalue of 6.18 (an outside review). Where symmetry is needed it is probed — two
    products on seeded vectors, not counted in the estimator's matvecs, the global RNG untouched
    — and refused; trace and diagonal need none and take it; a symmetric one runs as before."""
    N = torch.randn(30, 30, generator=torch.Generator().manual_seed(0), dtype=DT)
    state = torch.get_rng_state()
    for call in (
        lambda op: cs.eigenvalues(op),
        lambda op: cs.spectrum.cg(op, torch.ones(30, dtype=DT)),
        lambda op: cs.density(op, steps=5, probes=1),
        lambda op: cs.trace_of_square(op, matvecs=4),
    ):
        with pytest.raises(ValueError, match=r"Custom\.matmat is not symmetric.*\(A \+ Aᵀ\)/2"):
            call(Custom(N, dtype=DT))
    assert torch.equal(torch.get_rng_state(), state)
    assert cs.trace(Custom(N, dtype=DT), matvecs=30).value == pytest.approx(float(N.trace()))
    S = Custom((N + N.T) / 2, dtype=DT)
    r = cs.eigenvalues(S, k=1)
    assert r.values[0] == pytest.approx(float(torch.linalg.eigvalsh((N + N.T) / 2)[-1]), rel=1e-3)
    assert r.matvecs == cs.eigenvalues((N + N.T) / 2, k=1).matvecs


def test_an_objects_symmetry_probe_allows_a_long_products_rounding_and_survives_composition():
    """The spectrum review: (1) a float32 Gauss-Newton-shaped product Bᵀ(D(BV)) over 100,000
    rows, exactly symmetric, was refused as "not symmetric" in 22 of 80 draws — the probe's
    tolerance was a dense matrix's, 4·√n·eps, blind to the product's inner dimension; (2) a
    composition (shifted, scaled, damped) of a non-symmetric object skipped its probe and read
    λ_max 5.37, converged, for an operator whose eigenvalues are 1 and 2."""

    class GaussNewton:
        def __init__(self, B, D):
            self.B, self.D, self.num_params, self.dtype = B, D, B.shape[1], B.dtype

        def matmat(self, V):
            return self.B.T @ (self.D[:, None] * (self.B @ V))

    g = torch.Generator().manual_seed(1)
    B, D = torch.randn(100_000, 10, generator=g), torch.randn(100_000, generator=g)
    truth = torch.linalg.eigvalsh((B.double().T * D.double()) @ B.double())
    r = cs.eigenvalues(GaussNewton(B, D), which="both", progress_bar=False)
    torch.testing.assert_close(
        r.values.double(), truth[[-1, 0]], rtol=1e-3, atol=1e-3 * float(truth.abs().max())
    )
    skew = Custom(torch.tensor([[1.0, 4.0], [0.0, 2.0]], dtype=DT), dtype=DT)
    for composed in (
        as_operator(skew).shifted(0.0),
        as_operator(skew).scaled(1.0),
        as_operator(skew).damped(0.0),
    ):
        with pytest.raises(ValueError, match=r"Custom\.matmat is not symmetric"):
            cs.eigenvalues(composed, k=1)
