"""bfloat16 and float16 models: every estimator against a float64 reference on the same rounded
weights (the low-precision model copied to float64, its inputs likewise), and the result dtypes.

The premise, tested first: a product in dtype d differs from the exact product of the same
rounded model by at most PRODUCT_ERROR·eps(d)·‖H‖₂ =: δ (measured at most 0.55·eps(d)·‖H‖₂ on
these models). Every tolerance below follows from it:

- eigenvalues: within δ + tol·|λ_max| of the exact ones (a Ritz pair's residual against the
  exact operator is its residual against the computed products plus at most δ);
- trace, diagonal (same probes as the float64 run): within √n·δ (‖E‖_F ≤ √n‖E‖₂: the rounding
  acts like noise, not aligned with the probes; measured at most 2.1·eps(d)·‖H‖₂);
  the exact diagonal within δ (|E_ii| ≤ ‖E‖₂); tr(H²) within 4√n·δ·‖H‖₂;
- density: the extreme nodes within δ + 1e-3·‖H‖₂ of λ_min, λ_max; the fraction below
  −resolution within the quadrature bracket and 3 standard errors of the dense count, the
  threshold blurred by δ;
- CG on H + 1.5‖H‖I (eigenvalues in [0.5, 2.5]·‖H‖): ‖x − x*‖/‖x*‖ ≤ δ/(0.5‖H‖) + κ·tol.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import pytest
import torch

import curvscope as cs
from curvscope.spectrum._operator import as_operator
from tests import cases
from tests.spectrum.test_eigen import with_spectrum

#: The stated bound on one product's rounding error, in units of eps(dtype)·‖H‖₂.
PRODUCT_ERROR = 2.0
DTYPES = [torch.bfloat16, torch.float16]
MODELS = {"mlp": cases.mlp, "layernorm": cases.residual_layernorm}
DT_IDS = ["bf16", "fp16"]


@dataclass(frozen=True)
class Rounded:
    """A model in a low precision and its float64 copy (the same rounded weights and inputs)."""

    C: cs.Curvature
    ref: cs.Curvature
    H: torch.Tensor  # dense float64 reference of the rounded model
    eps: float

    @property
    def n(self) -> int:
        return self.H.shape[0]

    @property
    def norm(self) -> float:
        return float(torch.linalg.matrix_norm(self.H, 2))

    @property
    def delta(self) -> float:
        """δ: the stated bound on one product's error, for a unit vector."""
        return PRODUCT_ERROR * self.eps * self.norm


def rounded_case(case: cases.Case, dtype: torch.dtype) -> tuple[cases.Case, cases.Case]:
    def cast(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        return t.to(dt) if t.is_floating_point() else t

    low = cases.Case(
        case.name,
        copy.deepcopy(case.model).to(dtype),
        case.loss_fn,
        cast(case.inputs, dtype),
        cast(case.targets, dtype),
    )
    ref = cases.Case(
        case.name,
        copy.deepcopy(low.model).to(torch.float64),
        case.loss_fn,
        cast(low.inputs, torch.float64),
        cast(low.targets, torch.float64),
    )
    return low, ref


@functools.cache
def rounded(name: str, dtype: torch.dtype, kind: str = "hessian") -> Rounded:
    low, ref = rounded_case(MODELS[name](), dtype)
    dense = cases.dense_hessian if kind == "hessian" else cases.dense_ggn
    return Rounded(
        cs.Curvature(low.model, low.loss_fn, low.data, kind=kind),
        cs.Curvature(ref.model, ref.loss_fn, ref.data, kind=kind),
        dense(ref),
        torch.finfo(dtype).eps,
    )


CASES = [(m, d) for m in MODELS for d in DTYPES]
IDS = [f"{m}-{i}" for m in MODELS for i in DT_IDS]


@pytest.mark.parametrize(("name", "dtype"), CASES, ids=IDS)
def test_the_premise_products_are_within_the_stated_rounding(name, dtype):
    r = rounded(name, dtype)
    assert r.C.dtype == dtype
    dense = as_operator(r.C)(torch.eye(r.n, dtype=torch.float32)).double()
    err = float(torch.linalg.matrix_norm(dense - r.H, 2))
    assert err <= r.delta
    assert err > 0.05 * r.delta  # the rounding is real: the tests below would see a bf16 sum


@pytest.mark.parametrize(("name", "dtype"), CASES, ids=IDS)
@pytest.mark.parametrize(("k", "which"), [(2, "largest"), (2, "smallest"), (1, "both")])
def test_eigenvalues(name, dtype, k, which):
    from tests.spectrum.test_eigen import truth

    r = rounded(name, dtype)
    res = cs.eigenvalues(r.C, k=k, which=which)
    ev = torch.linalg.eigvalsh(r.H)
    err = (res.values.double() - truth(ev, k, which)).abs()
    assert res.all_converged, res.message
    assert (err <= r.delta + cs.spectrum.DEFAULT_TOL * r.norm).all()
    assert (err <= res.errors.double()).all()  # the reported errors include the rounding
    assert res.values.dtype == res.vectors.dtype == res.errors.dtype == torch.float32
    assert str(dtype).removeprefix("torch.") in res.message
    # the vectors are orthonormal to float32 accuracy, not to the products' precision
    gram = res.vectors.T @ res.vectors
    torch.testing.assert_close(gram, torch.eye(len(res.values)), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "dtype"), CASES, ids=IDS)
def test_trace_estimators(name, dtype):
    r = rounded(name, dtype)
    bound = math.sqrt(r.n) * r.delta
    for method in ("hutchinson", "hutch++", "auto"):
        low, ref = cs.trace(r.C, 30, method, seed=1), cs.trace(r.ref, 30, method, seed=1)
        assert low.method == ref.method
        assert abs(low.value - ref.value) <= bound, method
        assert low.stderr == pytest.approx(ref.stderr, rel=0.1)
    exact = cs.trace(r.C, method="exact")
    assert abs(exact.value - float(torch.trace(r.H))) <= bound
    low, ref = cs.trace_of_square(r.C, 20, seed=2), cs.trace_of_square(r.ref, 20, seed=2)
    assert abs(low.value - ref.value) <= 4 * math.sqrt(r.n) * r.delta * r.norm


@pytest.mark.parametrize(("name", "dtype"), CASES, ids=IDS)
def test_diagonal(name, dtype):
    r = rounded(name, dtype)
    low, ref = cs.diagonal(r.C, 30, seed=3), cs.diagonal(r.ref, 30, seed=3)
    assert low.value.dtype == low.stderr.dtype == torch.float32
    assert float((low.value.double() - ref.value).abs().max()) <= math.sqrt(r.n) * r.delta
    exact = cs.diagonal(r.C, method="exact")
    assert float((exact.value.double() - r.H.diagonal()).abs().max()) <= r.delta


@pytest.mark.parametrize(("name", "dtype"), CASES, ids=IDS)
def test_density(name, dtype):
    r = rounded(name, dtype)
    d = cs.density(r.C, steps=30, probes=6, progress_bar=False)
    ev = torch.linalg.eigvalsh(r.H)
    assert d.nodes.dtype == d.weights.dtype == d.grid.dtype == d.values.dtype == torch.float64
    tol = r.delta + 1e-3 * r.norm
    assert abs(float(d.nodes.min()) - float(ev[0])) <= tol  # the grid covers the spectrum
    assert abs(float(d.nodes.max()) - float(ev[-1])) <= tol
    assert d.resolution >= PRODUCT_ERROR * r.eps * float(d.nodes.abs().max())
    lower, upper = d.negative_mass_bounds
    se = d.negative_mass_stderr
    below = float((ev < -d.resolution - r.delta).double().mean())
    above = float((ev < -d.resolution + r.delta).double().mean())
    assert lower - 3 * se <= above and below <= upper + 3 * se
    assert below - 3 * se - 0.05 <= d.negative_mass <= above + 3 * se + 0.05
    assert float(torch.trapezoid(d.values, d.grid)) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_a_psd_ggn_with_a_null_space_has_no_negative_mass_in_low_precision(dtype):
    """The rounding moves the nodes of a PSD GGN about 0.3·eps·‖G‖ below zero; the default
    resolution is never below 2·eps·max|θ|, so they still count as zero."""
    low, _ = rounded_case(cases.mlp(n=4), dtype)
    C = cs.Curvature(low.model, low.loss_fn, low.data, kind="ggn")
    d = cs.density(C, steps=30, probes=6, progress_bar=False)
    assert d.negative_mass == 0.0
    assert d.negative_mass_bounds[1] < 1e-6


@pytest.mark.parametrize(("name", "dtype"), CASES, ids=IDS)
def test_cg(name, dtype):
    r = rounded(name, dtype)
    damping = 1.5 * r.norm  # H + damping·I has its eigenvalues in [0.5, 2.5]·‖H‖
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(r.n, generator=gen).to(dtype)  # e.g. a gradient, in the model's dtype
    sol = cs.spectrum.cg(r.C, b, damping=damping, tol=1e-6, max_matvecs=100)
    # products in bfloat16 or float16 cannot show ‖b − Ax‖ ≤ 1e-6·‖b‖: not said converged (it
    # was, on the recurrence's residual), the residual the checked one — yet x is as accurate as
    # the products allow
    assert not sol.converged and sol.residual > 1e-6 and sol.x.dtype == torch.float32
    assert sol.iterations <= 20 and sol.matvecs <= sol.iterations + 1  # stopped at the check
    A = r.H + damping * torch.eye(r.n, dtype=torch.float64)
    x = torch.linalg.solve(A, b.double())
    rel = float((sol.x.double() - x).norm() / x.norm())
    assert rel <= r.delta / (0.5 * r.norm) + 5 * 1e-6


def test_float64_and_float32_operators_keep_their_dtype():
    for dt in (torch.float64, torch.float32):
        A = with_spectrum(torch.linspace(-1.0, 2.0, 60, dtype=torch.float64)).to(dt)
        r = cs.eigenvalues(A, k=2, which="both")
        assert r.values.dtype == r.vectors.dtype == r.errors.dtype == dt
        assert cs.diagonal(A, 10).value.dtype == dt
        assert cs.diagonal(A, method="exact").value.dtype == dt
        b = torch.ones(60, dtype=dt)
        assert cs.spectrum.cg(A + 3 * torch.eye(60, dtype=dt), b).x.dtype == dt
    # b wider than the operator: CG runs in b's precision (products still in the operator's)
    A = torch.diag(torch.linspace(1.0, 2.0, 60))
    sol = cs.spectrum.cg(A, torch.ones(60, dtype=torch.float64), tol=1e-12, max_matvecs=100)
    assert sol.x.dtype == torch.float64


def test_an_autocast_region_leaves_the_estimators_in_their_dtypes():
    """Inside torch.autocast, `@` runs in bfloat16: the estimators suspend it, so a float32
    operator gives bit-identical results inside and outside the region."""
    A = with_spectrum(torch.linspace(-1.0, 2.0, 80, dtype=torch.float64), seed=5).float()
    b = torch.ones(80)

    def run():
        return (
            cs.eigenvalues(A, k=2, which="both").values,
            torch.tensor(cs.trace(A, 20).value),
            cs.diagonal(A, 10).value,
            torch.tensor(cs.density(A, steps=15, probes=2, progress_bar=False).negative_mass),
            cs.spectrum.cg(A + 2 * torch.eye(80), b, tol=1e-6).x,
        )

    outside = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (A @ A).dtype == torch.bfloat16  # the region is real
        inside = run()
    for a, b_ in zip(outside, inside, strict=True):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("size", [1e-7, 1e6])
def test_float16_products_of_tiny_or_huge_vectors_neither_flush_nor_overflow(size):
    """float16 spans 6e-8 to 65504: each column is scaled by a power of two before the cast
    (exactly) and back after it, so CG on a right-hand side of any size keeps its accuracy."""
    lam = torch.linspace(1.0, 3.0, 50)
    A = torch.diag(lam).half()
    b = size * torch.linspace(0.5, 1.5, 50)
    sol = cs.spectrum.cg(A, b, tol=1e-6, max_matvecs=100)
    x = b / lam.half().float()  # the rounded operator's exact solution
    assert torch.isfinite(sol.x).all()
    assert float((sol.x - x).norm() / x.norm()) <= 2 * torch.finfo(torch.float16).eps
