"""Conjugate gradients: solves SPD systems, stops at negative curvature."""

import pytest
import torch

import curvscope as cs
from tests.spectrum.test_eigen import with_spectrum


def test_solves_a_positive_definite_system():
    A = with_spectrum(torch.linspace(0.5, 5.0, 40, dtype=torch.float64))
    b = torch.ones(40, dtype=torch.float64)
    r = cs.spectrum.cg(A, b, tol=1e-10, max_matvecs=100)
    assert r.converged and not r.negative_curvature
    torch.testing.assert_close(r.x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    assert r.matvecs == r.iterations <= 40


def test_stops_at_negative_curvature_with_the_direction():
    A = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64))
    r = cs.spectrum.cg(A, torch.ones(3, dtype=torch.float64))
    assert r.negative_curvature and not r.converged
    assert float(r.direction @ A @ r.direction) <= 0


def test_damping_and_errors():
    A = torch.zeros(3, 3, dtype=torch.float64)
    r = cs.spectrum.cg(A, torch.ones(3, dtype=torch.float64), damping=2.0, tol=1e-12)
    torch.testing.assert_close(r.x, torch.full((3,), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        cs.spectrum.cg(A, torch.ones(4, dtype=torch.float64))
