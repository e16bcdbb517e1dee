"""Every estimator, diagnose() and the Monitor on each device — ``cpu`` always, ``cuda`` where
``torch.cuda.is_available()`` (benchmarks/gpu_check.sh runs this file on a GPU machine) —
against the float64 CPU reference; and bfloat16 products (a bfloat16 model, and a float32 model
under ``torch.autocast(bfloat16)``) against the float32 product within a bfloat16-sized bound.

The references are the exact CPU float64 operators' dense matrices (each tested against
``jacfwd(grad)`` in tests/derivatives/) and ``torch.linalg.eigvalsh`` of them; a device result
is moved to the CPU only to be compared.
"""

from __future__ import annotations

import ast
import copy
import functools
import pathlib
import warnings

import pytest
import torch
from torch import nn

import curvscope as cs
from curvscope.derivatives import finite_difference as fd
from tests import cases

CUDA_ONLY = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here; benchmarks/gpu_check.sh runs these on a GPU machine",
)
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_ONLY)]
TOL = {"rtol": 1e-9, "atol": 1e-11}
#: A bfloat16 product's error against the float32 product of the same weights, in units of
#: eps(bfloat16)·‖H‖₂‖v‖ (tests/spectrum/test_precision.py measured at most 0.55 for a
#: bfloat16 model; autocast rounds the weights and activations of each matmul alike).
BF16_ERROR = 4.0


def on(device: str, case: cases.Case, dtype: torch.dtype = torch.float64):
    """A copy of the case's model on ``device`` in ``dtype``, and its data there."""
    model = copy.deepcopy(case.model).to(device=device, dtype=dtype)
    x = case.inputs.to(device=device, dtype=dtype)
    y = case.targets.to(device)
    return model, (x, y)


@functools.cache
def reference(kind: str) -> torch.Tensor:
    """The dense float64 CPU matrix of ``kind`` for :func:`cases.mlp`."""
    case = cases.mlp()
    return cs.Curvature(case.model, case.loss_fn, case.data, kind=kind).to_dense()


def vectors(n: int, k: int, device: str, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    return torch.randn(n, k, dtype=torch.float64, generator=g).to(device=device, dtype=dtype)


def spectral_norm(H: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(H, 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "backend", ["double_backward", "forward_over_reverse", "finite_difference"]
)
def test_hessian_products(device, backend):
    case = cases.mlp()
    model, data = on(device, case)
    C = cs.Curvature(model, case.loss_fn, data, backend=backend)
    assert C.device.type == device
    V = vectors(C.num_params, 3, device)
    got = (C @ V).cpu()
    H = reference("hessian")
    if backend == "finite_difference":
        u = torch.finfo(torch.float64).eps
        err = (got - H @ V.cpu()).norm(dim=0) / V.cpu().norm(dim=0)
        assert float(err.max()) <= fd.ACCURACY * u ** (2 / 3) * spectral_norm(H)
    else:
        torch.testing.assert_close(got, H @ V.cpu(), **TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher"])
def test_gauss_newton_products(device, kind):
    case = cases.mlp()
    model, data = on(device, case)
    C = cs.Curvature(model, case.loss_fn, data, kind=kind)
    V = vectors(C.num_params, 3, device)
    torch.testing.assert_close((C @ V).cpu(), reference(kind) @ V.cpu(), **TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_fisher_products(device):
    """The sampled labels come from a generator on the device (another stream on each), so
    the Monte Carlo Fisher is compared with its expectation, the GGN."""
    case = cases.mlp()
    model, data = on(device, case)
    F = cs.Curvature(model, case.loss_fn, data, kind="fisher", mc_samples=32).to_dense().cpu()
    G = reference("ggn")
    torch.testing.assert_close(F, F.T, **TOL)
    assert float(torch.linalg.eigvalsh(F)[0]) >= -1e-10 * spectral_norm(F)
    assert float(torch.linalg.matrix_norm(F - G, 2)) <= 0.25 * spectral_norm(G)


@pytest.mark.parametrize("device", DEVICES)
def test_eigenvalues_at_both_ends(device):
    case = cases.mlp()
    model, data = on(device, case)
    r = cs.eigenvalues(cs.Curvature(model, case.loss_fn, data), k=2, which="both")
    lam = torch.linalg.eigvalsh(reference("hessian"))
    want = torch.cat([lam[-2:].flip(0), lam[:2].flip(0)])
    assert bool(torch.as_tensor(r.converged).all())
    assert torch.allclose(r.values.cpu().double(), want, rtol=0, atol=1e-3 * float(lam.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_trace(device):
    case = cases.mlp()
    model, data = on(device, case)
    C = cs.Curvature(model, case.loss_fn, data)
    tr = float(torch.trace(reference("hessian")))
    exact = cs.trace(C, method="exact")
    assert exact.value == pytest.approx(tr, rel=1e-9, abs=1e-11)
    est = cs.trace(C, matvecs=30, method="hutch++")
    assert abs(est.value - tr) <= 6 * est.stderr + 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_density(device):
    case = cases.mlp()
    model, data = on(device, case)
    d = cs.density(cs.Curvature(model, case.loss_fn, data), steps=30, probes=2)
    lam = torch.linalg.eigvalsh(reference("hessian"))
    scale = float(lam.abs().max())
    grid, values = d.grid.cpu().double(), d.values.cpu().double()
    assert float(torch.trapezoid(values, grid)) == pytest.approx(1.0, abs=1e-3)
    nodes = d.nodes.cpu().double()
    assert float(nodes.max()) == pytest.approx(float(lam[-1]), abs=1e-3 * scale)
    assert float(nodes.min()) == pytest.approx(float(lam[0]), abs=1e-3 * scale)


@pytest.mark.parametrize("device", DEVICES)
def test_diagnose(device):
    case = cases.mlp()
    want = cs.diagnose(case.model, case.loss_fn, case.data, lr=0.5)
    model, data = on(device, case)
    got = cs.diagnose(model, case.loss_fn, data, lr=0.5)
    assert got.state == want.state
    scale = abs(want.evidence["sharpness"])
    for key in ("sharpness", "lambda_min"):
        assert got.evidence[key] == pytest.approx(want.evidence[key], abs=1e-3 * scale)
    for key in ("loss", "grad_norm"):
        assert got.evidence[key] == pytest.approx(want.evidence[key], rel=1e-9)


def _monitored_run(device: str) -> tuple[list, list]:
    """Three SGD steps with a probe at each: the probes' (state, sharpness), and the
    parameters each probe saw (as CPU float64 copies)."""
    case = cases.mlp()
    model, data = on(device, case)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon = cs.Monitor(model, case.loss_fn, data, optimizer=opt, every=1)
    seen = []
    for _ in range(3):
        opt.zero_grad()
        loss = case.loss_fn(model(data[0]), data[1])
        loss.backward()
        opt.step()
        seen.append(copy.deepcopy(model).to("cpu"))
        mon.step(loss)
    mon.close()
    return [(d.state, d.evidence["sharpness"]) for d in mon.history], seen


@functools.cache
def _cpu_states() -> list:
    return [state for state, _ in _monitored_run("cpu")[0]]


@pytest.mark.parametrize("device", DEVICES)
def test_monitor(device):
    """Each probe's sharpness against λ_max of the dense CPU Hessian at the parameters it saw;
    on an accelerator, the verdicts against the same run on the CPU."""
    case = cases.mlp()
    probes, seen = _monitored_run(device)
    assert len(probes) == 3
    for (_, sharpness), model in zip(probes, seen, strict=True):
        H = cs.Curvature(model, case.loss_fn, case.data).to_dense()
        lam = float(torch.linalg.eigvalsh(H)[-1])
        assert sharpness == pytest.approx(lam, abs=1e-3 * abs(lam))
    if device != "cpu":
        assert [state for state, _ in probes] == _cpu_states()


def _bf16_bound(H32: torch.Tensor, v: torch.Tensor) -> float:
    eps = torch.finfo(torch.bfloat16).eps
    return BF16_ERROR * eps * spectral_norm(H32.double()) * float(v.double().norm())


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_model_products(device):
    """A bfloat16 model's product against the float32 product of the same (rounded) weights."""
    case = cases.mlp()
    model16, (x16, y) = on(device, case, torch.bfloat16)
    model32 = copy.deepcopy(model16).float()
    C16 = cs.Curvature(model16, case.loss_fn, (x16, y))
    C32 = cs.Curvature(model32, case.loss_fn, (x16.float(), y))
    v = vectors(C16.num_params, 1, device, torch.bfloat16)[:, 0]
    got, want = C16 @ v, C32 @ v.float()
    assert got.dtype == torch.bfloat16 and got.device.type == device
    err = float((got.float() - want).norm())
    assert err <= _bf16_bound(C32.to_dense(), v)


@pytest.mark.parametrize("device", DEVICES)
def test_products_under_bfloat16_autocast(device):
    """A float32 model's product inside torch.autocast(bfloat16): the matmuls run in bfloat16,
    the result stays float32 and within a bfloat16-sized bound of the float32 product."""
    case = cases.mlp()
    model, data = on(device, case, torch.float32)
    v = vectors(sum(p.numel() for p in model.parameters()), 1, device, torch.float32)[:, 0]
    exact = cs.Curvature(model, case.loss_fn, data)
    want = exact @ v
    with torch.autocast(device, dtype=torch.bfloat16):
        got = cs.Curvature(model, case.loss_fn, data) @ v
    assert got.dtype == torch.float32
    err = float((got - want).norm())
    assert err <= _bf16_bound(exact.to_dense(), v)
    assert err > 0  # autocast did act: the bfloat16 matmuls rounded something


def _cuda_waits(fn) -> tuple[int, object]:
    """How many times ``fn`` made the host wait for the GPU, as CUDA's own bookkeeping counts
    them (``torch.cuda.set_sync_debug_mode("warn")``: a warning at each synchronising call)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught), out


def _waits_per_step(A, tag: str) -> float:
    """Lanczos's synchronisations a step on ``A`` (k=1): the count at 20 steps less the count at
    10 (what the start and the end cost cancels), after a run that warms the caches (the
    pinned host buffers the coefficients travel through are allocated on first use)."""

    def run(steps: int):
        return cs.eigenvalues(A, k=1, tol=1e-12, max_matvecs=steps, max_basis=12)

    run(10)
    counts = {}
    for steps in (10, 20):
        counts[steps], r = _cuda_waits(lambda s=steps: run(s))
        assert r.matvecs == steps
    print(f"{tag}: {counts[10]} synchronisations in 10 steps, {counts[20]} in 20")
    return (counts[20] - counts[10]) / 10


@CUDA_ONLY
def test_lanczos_waits_for_the_gpu_at_most_once_a_step():
    """The host-read count of tests/spectrum/test_host_reads.py, on a real GPU as CUDA counts
    it: Lanczos on a dense operator (whose product waits for nothing) synchronises at most once
    a step, and a Curvature's product adds at most the three reads the lanczos module documents
    (its input and output NaN checks and the cached graph's model check)."""
    from curvscope.spectrum._operator import as_operator

    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen, dtype=torch.float64))
    A = ((q * torch.linspace(-1.0, 2.0, 200, dtype=torch.float64)) @ q.T).cuda()
    assert _waits_per_step(as_operator((A + A.T) / 2), "dense operator") <= 1

    case = cases.mlp()
    model, data = on("cuda", case)
    C = cs.Curvature(model, case.loss_fn, data)
    assert _waits_per_step(C, "Curvature") <= 1 + 3


OURS = [name for name, e in cs.optim.REGISTRY.items() if e.source == "curvscope"]


def _trained(name: str, device: str, steps: int = 4) -> tuple[list[float], nn.Module]:
    """``steps`` steps of optimizer ``name`` on the MLP case on ``device``: the losses and the
    model."""
    case = cases.mlp()
    model, (x, y) = on(device, case)
    info = cs.optim.REGISTRY[name]
    torch.manual_seed(0)
    opt = info.build(model.parameters(), **({"lr": 0.1} if info.lr else {}))

    def loss() -> torch.Tensor:
        return case.loss_fn(model(x), y)

    losses = []
    for _ in range(steps):
        if info.reads_grad:
            opt.zero_grad()
            loss().backward()
            opt.step()
        else:
            opt.step(loss)
        losses.append(float(loss().detach()))
    return losses, model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OURS)
def test_optimizers(device, name):
    """Every curvscope optimizer on the device: the parameters stay there, finite, and the loss
    goes down (but for pure Newton, whose demonstration is that it need not); a deterministic
    method's losses are the CPU run's (float64)."""
    losses, model = _trained(name, device)
    case = cases.mlp()
    first = float(case.loss_fn(case.model(case.inputs), case.targets).detach())
    assert all(p.device.type == device for p in model.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert losses[-1] < first or name == "pure-newton"
    if device != "cpu" and not cs.optim.REGISTRY[name].stochastic:
        want, _ = _trained(name, "cpu")
        print(f"{name}: losses on {device} {losses}, on the CPU {want}")
        assert losses == pytest.approx(want, rel=1e-6)


#: torch's factory functions: a tensor made by one of these lands on the CPU unless told
FACTORIES = {"zeros", "ones", "empty", "full", "randn", "rand", "randint", "randperm", "arange"}
FACTORIES |= {"eye", "tensor", "as_tensor", "linspace", "logspace"}
#: where the library makes host tensors on purpose (a location is ``path::Class.function``; an
#: entry covers the locations it begins with), and why
HOST_SIDE = {
    "curvscope/problems/": "the built-in problems and data sets are made on the CPU",
    "curvscope/report/": "plots are computed on the host",
    "curvscope/derivatives/checks.py::check_dense_size": "reads a dtype's element size",
    "curvscope/derivatives/curvature.py::Curvature.to_scipy": "scipy's vector, then .to(device)",
    "curvscope/derivatives/distributed.py::check_same_on_ranks": "moved to NCCL's device below",
    "curvscope/diagnosis/chance.py::": "the targets' counts, on the host (moved for collectives)",
    "curvscope/lab/probe.py::_slice": "the step sizes of a loss slice, read as floats",
    "curvscope/spectrum/density.py::": "Gauss quadrature of the small tridiagonals, on the host",
    "curvscope/spectrum/lanczos.py::tridiagonal": "the coefficients it read, kept on the host",
}


class _FactoryCalls(ast.NodeVisitor):
    """The locations (``path::Class.function``) of the factory calls in one file that name no
    device."""

    def __init__(self, path: str) -> None:
        self.path, self.scope, self.found = path, [], []

    def visit_scope(self, node) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_scope

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        if (
            isinstance(f, ast.Attribute)
            and isinstance(f.value, ast.Name)
            and f.value.id == "torch"
            and f.attr in FACTORIES
            and not any(k.arg == "device" for k in node.keywords)
        ):
            self.found.append((f"{self.path}::{'.'.join(self.scope)}", node.lineno, f.attr))
        self.generic_visit(node)


def test_every_tensor_the_library_makes_names_its_device():
    """A tensor made without ``device=`` is a CPU tensor, and a CPU-only test run cannot see the
    mismatch: ``diagnose`` and the Monitor failed on their first CUDA run (a CPU vector of zeros
    in the layer shares). Every factory call in the library names its device, or is listed in
    HOST_SIDE with the reason it belongs on the host (and every entry there is still needed)."""
    root = pathlib.Path(cs.__file__).parent
    calls = []
    for path in sorted(root.rglob("*.py")):
        visit = _FactoryCalls(path.relative_to(root.parent).as_posix())
        visit.visit(ast.parse(path.read_text()))
        calls += visit.found
    unlisted = [
        f"{where} (line {line}): torch.{name}"
        for where, line, name in calls
        if not any(where.startswith(place) for place in HOST_SIDE)
    ]
    assert unlisted == []
    stale = [p for p in HOST_SIDE if not any(where.startswith(p) for where, _, _ in calls)]
    assert stale == []
