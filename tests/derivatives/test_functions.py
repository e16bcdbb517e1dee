"""grad, hvp, hessian of plain functions against closed forms, jacfwd and finite differences."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import curvscope as cs
from curvscope.problems import REGISTRY, FunctionProblem

FUNCTION_PROBLEMS = [n for n, f in REGISTRY.items() if isinstance(f(), FunctionProblem)]


@pytest.mark.parametrize("name", FUNCTION_PROBLEMS)
def test_grad_and_hessian_match_closed_forms(name):
    p = cs.problems.get(name)
    gen = torch.Generator().manual_seed(0)
    x = p.x0 + 0.3 * torch.randn(p.n, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(cs.grad(p.f, x), p.grad(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cs.hessian(p.f, x), p.hess(x), rtol=1e-10, atol=1e-10)
    v = torch.randn(p.n, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(cs.hvp(p.f, x, v), p.hess(x) @ v, rtol=1e-10, atol=1e-10)


def test_hessian_against_jacfwd_grad_and_finite_differences():
    def f(x):
        return torch.log1p(x.exp()).sum() + (x[:-1] * x[1:] ** 3).sum() + torch.sin(x).prod()

    x = torch.linspace(-0.9, 1.1, 7, dtype=torch.float64)  # no entry near 0, where prod's
    # double backward divides by the entry and loses digits
    ref = torch.func.jacfwd(torch.func.grad(f))(x)
    H = cs.hessian(f, x)
    torch.testing.assert_close(H, ref, rtol=1e-12, atol=1e-12)
    eps, v = 1e-5, torch.cos(torch.arange(7, dtype=torch.float64))
    fd = (cs.grad(f, x + eps * v) - cs.grad(f, x - eps * v)) / (2 * eps)
    torch.testing.assert_close(cs.hvp(f, x, v), fd, rtol=1e-7, atol=1e-8)


def test_block_hvp_equals_columns():
    p = cs.problems.get("rosenbrock", n=5)
    V = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    HV = cs.hvp(p.f, p.x0, V)
    for j in range(3):
        torch.testing.assert_close(HV[:, j], cs.hvp(p.f, p.x0, V[:, j]))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(-3, 3), st.floats(-3, 3))
def test_hvp_symmetric_and_linear(seed, a, b):
    p = cs.problems.get("rosenbrock", n=4)
    gen = torch.Generator().manual_seed(seed)
    x, u, v = (torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(3))
    hu, hv = cs.hvp(p.f, x, u), cs.hvp(p.f, x, v)
    torch.testing.assert_close(u @ hv, v @ hu, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(
        cs.hvp(p.f, x, a * u + b * v), a * hu + b * hv, rtol=1e-10, atol=1e-8
    )


def test_nothing_is_written_to_x():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    x.grad = torch.tensor([5.0, 6.0], dtype=torch.float64)
    cs.grad(lambda t: (t**2).sum(), x)
    cs.hessian(lambda t: (t**3).sum(), x)
    assert torch.equal(x.grad, torch.tensor([5.0, 6.0], dtype=torch.float64))
    assert torch.equal(x.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_an_f_that_writes_its_argument_in_place_leaves_x_as_found():
    """A projection inside f (``z.clamp_`` under no_grad) wrote into the caller's x through a
    detached view of it: [0.3, −0.7, 1.1] became [0.3, −0.7, 1.0], its version moved (an
    outside review's fuzzing). Every entry point now hands f a copy."""

    def f(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z.clamp_(-1, 1)
        return (z**3).sum()

    calls = [
        lambda x: cs.grad(f, x),
        lambda x: cs.hessian(f, x),
        lambda x: cs.hvp(f, x, torch.ones(3, dtype=torch.float64)),
        lambda x: cs.Curvature.from_function(f, x) @ torch.ones(3, dtype=torch.float64),
    ]
    for call in calls:
        x = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
        call(x)
        assert x._version == 0 and x.tolist() == [0.3, -0.7, 1.1]


def test_an_f_whose_value_has_a_gradient_through_other_tensors_only_is_named():
    """A parameter f closes over, with x detached or only an index: torch's bare "appears to
    not have been used in the graph. Set allow_unused=True", a fix the user cannot apply (an
    outside review's fuzzing); it is the same refusal as an f with no graph at all."""
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    for f in (lambda z: (w**2).sum(), lambda z: w[z.argmax()] ** 2, lambda z: w @ z.detach()):
        for call in (cs.grad, cs.hessian, lambda f, x: cs.hvp(f, x, torch.ones_like(x))):
            with pytest.raises(ValueError, match=r"f\(x\) does not depend on x.*other tensors"):
                call(f, x)


def test_the_quadratic_problem_refuses_what_makes_no_quadratic():
    """n = 0 and no eigenvalues raised torch's bare max() error, n = 3.7 logspace's, and a NaN
    eigenvalue was described as a saddle (an outside review's fuzzing)."""
    with pytest.raises(ValueError, match="n to be an integer >= 1"):
        cs.problems.get("quadratic", n=0)
    with pytest.raises(TypeError, match="n to be an integer"):
        cs.problems.get("quadratic", n=3.7)
    for condition in (float("nan"), float("inf"), 0.5):
        with pytest.raises(ValueError, match="condition must be a finite number >= 1"):
            cs.problems.get("quadratic", condition=condition)
    for bad in ([], [1.0, float("nan")], [float("inf")]):
        with pytest.raises(ValueError, match="eigenvalues must be one or more finite numbers"):
            cs.problems.get("quadratic", eigenvalues=torch.tensor(bad))


def test_affine_function_has_zero_hessian():
    x = torch.ones(3, dtype=torch.float64)
    assert torch.equal(cs.hessian(lambda t: t.sum() * 2, x), torch.zeros(3, 3, dtype=torch.float64))


def test_hessian_refuses_large_n_with_memory_figure():
    x = torch.zeros(cs.DENSE_LIMIT + 1)
    with pytest.raises(ValueError, match=r"GiB.*force=True"):
        cs.hessian(lambda t: (t**2).sum(), x)


@pytest.mark.parametrize(
    ("f", "x", "v", "error", "match"),
    [
        (lambda t: t**2, torch.ones(3), None, ValueError, "scalar"),
        (lambda t: (t**2).sum(), torch.ones(2, 2), None, ValueError, "1-D"),
        (lambda t: (t**2).sum(), [1.0, 2.0], None, TypeError, "torch.Tensor"),
        (lambda t: (t**2).sum(), torch.tensor([1, 2]), None, TypeError, "floating"),
        # complex: x.double() was the advice, which drops the imaginary part
        (
            lambda t: t.abs().sum(),
            torch.ones(2, dtype=torch.cfloat),
            None,
            TypeError,
            "view_as_real",
        ),
        (
            lambda t: torch.log(t).sum(),
            -torch.ones(2),
            None,
            FloatingPointError,
            "not finite; check x for NaN/Inf, and f for overflow",
        ),
        (lambda t: torch.tensor(1.0), torch.ones(2), None, ValueError, "does not depend on x"),
        (
            lambda t: (t**2).sum(),
            torch.ones(3),
            torch.ones(4),
            ValueError,
            r"shape \(3,\) or \(3, k\) — one entry per entry of x",
        ),
        (  # a plain function has no parameters: its v takes x's dtype (a review)
            lambda t: (t**2).sum(),
            torch.ones(3),
            torch.ones(3, dtype=torch.float64),
            TypeError,
            r"dtype torch.float32 \(x's dtype\)",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(f, x, v, error, match):
    with pytest.raises(error, match=match):
        if v is None:
            cs.grad(f, x)
        else:
            cs.hvp(f, x, v)


def test_more_bad_input_named_with_the_fix():
    """Each was torch's bare error, a crash deep inside, or accepted silently (an outside
    review): an empty x, a complex value, several tensors, a dict, force="no", a seed past
    torch's range, inference mode inside and an inference tensor outside."""

    def f(t):
        return (t**4).sum()

    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="at least one entry"):
        cs.hessian(f, torch.ones(0, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"to be real.*\.real"):
        cs.grad(lambda t: (t * (1 + 1j)).sum(), x)
    for several in ((x, x), {"a": x}):
        with pytest.raises(TypeError, match=r"one flat vector, torch\.cat"):
            cs.grad(f, several)
    with pytest.raises(TypeError, match="force to be True or False"):
        cs.hessian(f, x, force="no")
    with pytest.raises(ValueError, match="below 2\\*\\*64"):
        cs.eigenvalues(torch.eye(3, dtype=torch.float64), seed=2**70)
    with torch.inference_mode():
        for call in (lambda: cs.grad(f, x), lambda: cs.hessian(f, x)):
            with pytest.raises(RuntimeError, match="outside the inference_mode block"):
                call()
        inference = torch.tensor([1.0, 2.0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"made under torch.inference_mode\(\).*clone"):
        cs.hessian(f, inference)


def test_a_functions_operator_names_x_in_its_vector_errors():
    """A review: ``Curvature.from_function(f, x) @ v`` still said "the parameters' dtype" and
    "one entry per parameter"."""
    C = cs.Curvature.from_function(lambda t: (t**3).sum(), torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"\(x's dtype\)"):
        C @ torch.ones(3)
    with pytest.raises(ValueError, match="one entry per entry of x"):
        C @ torch.ones(4, dtype=torch.float64)


def test_a_random_function_leaves_the_global_rngs_as_found_and_its_hessian_repeats():
    """An f that draws random numbers (a dropout-like mask) moved torch's global generator,
    and two Hessians of it differed (an outside review): each call draws from the state the
    user left, which is as found after it."""
    import random

    import numpy as np

    def f(x: torch.Tensor) -> torch.Tensor:
        mask = (torch.rand(x.shape, dtype=x.dtype) > 0.3).to(x.dtype)
        return (mask * x**3).sum() + np.random.rand() + random.random()

    x = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    drawn = []  # numpy's draws inside f are the caller's next ones (its state was read by a
    cs.grad(lambda z: drawn.append(np.random.rand()) or (z**2).sum(), x)  # draw: 0.603 for
    assert drawn == [np.random.rand()]  # 0.549, an outside review's fuzzing)
    np.random.seed(3)
    first, second = cs.hessian(f, x), cs.hessian(f, x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    cs.grad(f, x), cs.hvp(f, x, torch.ones_like(x))
    assert torch.equal(torch.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]


def test_a_plain_function_whose_curvature_is_not_finite_names_a_plain_functions_fix():
    """It advised "lower the learning rate if training diverged", which means nothing for a
    plain function (an outside review)."""
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="twice differentiable at x") as e:
        cs.hessian(lambda z: z.sqrt().sum(), x)
    assert "learning rate" not in str(e.value)
