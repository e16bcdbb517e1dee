"""Lanczos reads the device once a step (issue 16.4): every host read of a tensor's values —
``.item()``, ``float()``, ``bool()``, ``int()``, ``.tolist()``, ``.numpy()`` — is counted by a
TorchFunctionMode while ``eigenvalues`` and the density's plain Lanczos run on a dense operator
(whose product reads nothing), and the count must grow by exactly one per step."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import curvscope as cs
from curvscope.spectrum._operator import as_operator
from curvscope.spectrum.lanczos import tridiagonal

READS = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__"}


class HostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _matrix(n: int = 200) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    lam = torch.linspace(-1.0, 2.0, n, dtype=torch.float64)
    return (q * lam) @ q.T


def _reads(fn) -> tuple[int, object]:
    with HostReads() as mode:
        out = fn()
    return mode.count, out


def test_the_counter_sees_every_kind_of_read():
    t = torch.ones(3)
    n, _ = _reads(lambda: (bool(t[0] > 0), float(t[0]), t[0].item(), t.tolist(), t.numpy()))
    assert n == 5


def test_eigenvalues_read_the_device_once_a_step():
    A = _matrix()
    op = as_operator((A + A.T) / 2)  # built outside: its symmetry check reads once
    counts = {}
    for steps in (10, 20, 35):  # a basis of 12 forces thick restarts: they read nothing
        reads, r = _reads(
            lambda s=steps: cs.eigenvalues(op, k=1, tol=1e-12, max_matvecs=s, max_basis=12)
        )
        assert r.matvecs == steps and not r.all_converged
        counts[steps] = reads
    assert counts[20] - counts[10] == 10
    assert counts[35] - counts[20] == 15
    assert counts[10] - 10 <= 4  # the start (warm-start and start-block checks) and the end


def test_block_steps_read_once_each_too():
    op = as_operator(_matrix())
    a, ra = _reads(lambda: cs.eigenvalues(op, k=3, tol=1e-12, max_matvecs=12))
    b, rb = _reads(lambda: cs.eigenvalues(op, k=3, tol=1e-12, max_matvecs=24))
    assert (ra.matvecs, rb.matvecs) == (12, 24)
    assert b - a == 6  # six more block steps of two vectors


@pytest.mark.parametrize(
    ("dtype", "scale"), [(torch.float64, 1.0), (torch.float32, 1e-13), (torch.float64, 1e-140)]
)
def test_plain_lanczos_reads_once_a_step(dtype, scale):
    """At any scale: the norm's fallback for a spectrum far from 1 read β again, a second read
    a step (a review)."""
    op = as_operator((_matrix() * scale).to(dtype))
    z = torch.randn(op.n, 1, generator=torch.Generator().manual_seed(1), dtype=dtype)
    a, _ = _reads(lambda: tridiagonal(op, z, 10))
    b, _ = _reads(lambda: tridiagonal(op, z, 30))
    assert b - a == 20
