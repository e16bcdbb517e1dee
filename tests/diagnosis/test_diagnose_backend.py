"""``diagnose`` and ``update_curvature`` with ``backend="finite_difference"`` against the exact
(double backward) diagnosis, in float64 on a smooth MLP (tanh, softplus): the same state, and
every number within what the finite-difference products' stated accuracy allows — for gradient
descent, SGD with momentum and weight decay, and Adam with state; the model left bit for bit as
found; bad backends and steps refused with the fix.

The tolerance. Each finite-difference product is off by at most
δ_H = ACCURACY·u^(2/3)·‖H‖₂ per unit ‖v‖ (README "Accuracy"; u = eps(float64)). What a diagnosis
measures is the curvature the step sees, A = S^½ (H + l2) S^½ (S the optimizer's step factors, the
L2 term exact), whose products are then off by at most δ = max(S)·δ_H per unit ‖v‖. The
sharpness, λ_min, the directional curvature and the batch sharpness are Rayleigh quotients of A
(of each batch's A_B for the batch sharpness, δ from max_B ‖H_B‖₂), moved by at most δ; the Newton
decrement gᵀ(H + l2)⁻¹g moves by at most ‖g‖²·δ_H/μ² (μ the smallest eigenvalue of H + l2, to
first order in δ_H). The loss and gradient are the model's own forward and backward instead of
a functional one: equal to rounding (10⁻¹² relative).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvscope as cs
from curvscope.derivatives import finite_difference as fd
from curvscope.diagnosis import update_curvature
from tests import cases
from tests.derivatives.test_finite_difference import smooth, smooth_dropout_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")
FD = "finite_difference"
N = 30
#: the training batches of the batch sharpness: three of ten samples
BATCHES = (slice(0, 10), slice(10, 20), slice(20, 30))
OPTIMIZERS = ("gd", "momentum", "adam")
#: the scalars compared, each a Rayleigh quotient of the curvature the step sees
QUOTIENTS = ("sharpness", "lambda_min", "directional_curvature")


def accuracy(H: torch.Tensor, dtype: torch.dtype = torch.float64) -> float:
    """δ_H: the stated error of one finite-difference product per unit ‖v‖."""
    u = torch.finfo(dtype).eps
    return fd.ACCURACY * u ** (2 / 3) * float(torch.linalg.matrix_norm(H, 2))


def _hessians(case: cases.Case) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Dense float64 jacfwd(grad) Hessians of the case's data loss where its model stands: on
    all the data, and on each of :data:`BATCHES`."""
    full = cases.dense_hessian(case)
    parts = [
        cases.dense_hessian(cases.Case("batch", case.model, case.loss_fn, *_batch(case, s)))
        for s in BATCHES
    ]
    return full, parts


def _batch(case: cases.Case, s: slice) -> tuple[torch.Tensor, torch.Tensor]:
    return case.inputs[s], case.targets[s]


def _setup(name: str) -> tuple[cases.Case, dict]:
    """The case and the diagnose keywords for an optimizer: plain gradient descent (lr=),
    SGD with momentum and weight decay (L2: H + 0.3·I, positive definite here, so that the
    Newton decrement is defined), or Adam after three steps (its state sets the step factors)."""
    case = smooth(n=N)
    model = case.model
    if name == "gd":
        return case, {"lr": 0.5}
    if name == "momentum":
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.3)
        return case, {"optimizer": opt}
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for s in BATCHES:
        opt.zero_grad()
        case.loss_fn(model(case.inputs[s]), case.targets[s]).backward()
        opt.step()
    opt.zero_grad()
    return case, {"optimizer": opt}


def step_factor(model: nn.Module, kw: dict) -> float:
    """max(S): the largest step factor of the optimizer (1 for plain gradient descent)."""
    limit = cs.stability_limit(
        kw.get("optimizer"), lr=kw.get("lr"), params=list(model.parameters())
    )
    return 1.0 if limit.scale is None else float(limit.scale.max())


class _Spy:
    """Counts the vectors the finite-difference backend multiplied (it runs as it is)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.columns = 0
        real = fd.FiniteDifferenceProducts.matmat

        def counted(products: fd.FiniteDifferenceProducts, V: torch.Tensor) -> torch.Tensor:
            self.columns += V.shape[1]
            return real(products, V)

        monkeypatch.setattr(fd.FiniteDifferenceProducts, "matmat", counted)


def _l2(kw: dict) -> float:
    opt = kw.get("optimizer")
    return 0.0 if opt is None or isinstance(opt, torch.optim.Adam) else 0.3


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_finite_difference_diagnosis_agrees_with_the_exact_one(name, monkeypatch):
    case, kw = _setup(name)
    model, train = case.model, [_batch(case, s) for s in BATCHES]
    spy = _Spy(monkeypatch)
    exact = cs.diagnose(model, case.loss_fn, case.data, train_batches=train, **kw)
    assert spy.columns == 0  # the default is exact
    got = cs.diagnose(model, case.loss_fn, case.data, train_batches=train, backend=FD, **kw)
    # every product of the diagnosis went through the finite differences, the batches' too
    assert spy.columns == got.evidence["matvecs"]
    H, parts = _hessians(case)
    assert_agrees(got, exact, H, parts, step_factor(model, kw), _l2(kw))
    if name == "momentum":  # H + 0.3·I is positive definite here: the decrement was compared
        assert exact.evidence["newton_decrement"] is not None


def assert_agrees(
    got: cs.Diagnosis,
    exact: cs.Diagnosis,
    H: torch.Tensor,
    batch_hessians: list[torch.Tensor],
    scale: float,
    l2: float,
) -> None:
    """A finite-difference diagnosis against the exact one, within the tolerance of the
    module's docstring: H the dense Hessian of the data loss, ``batch_hessians`` those of the
    training batches, ``scale`` the largest step factor max(S), ``l2`` the L2 coefficient."""
    e, g = exact.evidence, got.evidence
    assert got.state == exact.state and got.confident == exact.confident
    assert g["matvecs"] == e["matvecs"]
    assert g["stability_limit"] == e["stability_limit"]
    assert g["loss"] == pytest.approx(e["loss"], rel=1e-12)
    assert g["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-10)
    delta = scale * accuracy(H)
    for key in QUOTIENTS:
        assert abs(g[key] - e[key]) <= delta, (key, g[key], e[key], delta)
    batch_delta = scale * max(accuracy(Hb) for Hb in batch_hessians)
    assert g["batches"] == e["batches"] == len(batch_hessians)
    assert abs(g["batch_sharpness"] - e["batch_sharpness"]) <= batch_delta
    assert abs(g["batch_sharpness_stderr"] - e["batch_sharpness_stderr"]) <= 2 * batch_delta
    assert (g["newton_decrement"] is None) == (e["newton_decrement"] is None)
    if e["newton_decrement"] is not None:  # gᵀA⁻¹g moves by ‖g‖²·δ_H/μ², to first order
        mu = float(torch.linalg.eigvalsh(H + l2 * torch.eye(H.shape[0], dtype=H.dtype))[0])
        assert mu > 0  # the bound is for a positive definite A
        bound = e["grad_norm"] ** 2 * accuracy(H) / mu**2
        assert abs(g["newton_decrement"] - e["newton_decrement"]) <= bound


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_update_curvature_agrees_with_the_exact_one(name, monkeypatch):
    case, kw = _setup(name)
    model = case.model
    previous = cs.diagnose(model, case.loss_fn, case.data, **kw)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    # move the parameters as a step would (the optimizer's own step where there is one)
    opt = kw.get("optimizer") or torch.optim.SGD(model.parameters(), lr=kw["lr"])
    for s in BATCHES[:2]:
        opt.zero_grad()
        case.loss_fn(model(case.inputs[s]), case.targets[s]).backward()
        opt.step()
    opt.zero_grad()
    H = cases.dense_hessian(case)  # at the new point
    top = previous.vectors["top"]
    spy = _Spy(monkeypatch)
    exact = update_curvature(model, case.loss_fn, case.data, before, top=top, **kw)
    got = update_curvature(model, case.loss_fn, case.data, before, top=top, backend=FD, **kw)
    assert spy.columns == 2  # one product along the update, one along top
    delta = step_factor(model, kw) * accuracy(H)
    assert got.limit == exact.limit
    assert exact.curvature is not None and exact.top_curvature is not None
    assert abs(got.curvature - exact.curvature) <= delta
    assert abs(got.top_curvature - exact.top_curvature) <= delta


def test_a_finite_difference_diagnosis_leaves_the_model_as_found():
    """Train-mode BatchNorm and dropout, a .grad from the user's own backward, and a graph the
    user still holds: after diagnose and update_curvature by finite differences, all as found."""
    case = smooth_dropout_batchnorm()
    model = case.model
    model.train()
    model[3].eval()  # one module in eval mode: the flags are restored one by one
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    case.loss_fn(model(case.inputs), case.targets).backward()
    before_step = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt.step()
    held = case.loss_fn(model(case.inputs), case.targets)  # the user's graph, not yet used
    held.backward(retain_graph=True)
    snap = cases.snapshot(model)
    grads = [p.grad for p in model.parameters()]
    versions = [p._version for p in model.parameters()]
    train = [(case.inputs[:8], case.targets[:8]), (case.inputs[8:], case.targets[8:])]

    d = cs.diagnose(model, case.loss_fn, case.data, opt, train_batches=train, backend=FD)
    u = update_curvature(
        model, case.loss_fn, case.data, before_step, opt, top=d.vectors["top"], backend=FD
    )
    assert d.evidence["batches"] == 2 and u.curvature is not None  # it did measure

    cases.assert_unchanged(snap, cases.snapshot(model))
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))
    assert [p._version for p in model.parameters()] == versions
    held.backward()  # the user's graph is still usable


@pytest.mark.parametrize("call", ["diagnose", "update_curvature"])
@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"backend": "auto"}, ValueError, "backend='double_backward'.*'finite_difference'"),
        ({"backend": "forward_over_reverse"}, ValueError, "one or two vectors at a time"),
        ({"backend": "nope"}, ValueError, "backend must be one of"),
        ({"fd_eps": 1e-3}, ValueError, "pass backend='finite_difference' too"),
        ({"backend": FD, "fd_eps": 2.0}, ValueError, r"must lie in \(0, 1\)"),
        ({"backend": FD, "fd_eps": "small"}, TypeError, "expected fd_eps to be a number"),
        ({"sharded": True}, ValueError, "pass backend='finite_difference' with it"),
        ({"backend": FD, "sharded": 1}, TypeError, "sharded must be True or False"),
        # sharded vectors need a model sharded by FSDP2 (here: one process, plain parameters)
        (
            {"backend": FD, "sharded": True},
            ValueError,
            r"sharded=True: .*are not sharded.*drop sharded=True",
        ),
    ],
)
def test_bad_backends_and_steps_are_refused_with_the_fix(call, options, error, match):
    case = smooth(n=8)
    snap = cases.snapshot(case.model)
    with pytest.raises(error, match=match):
        _call(call, case, **options)
    cases.assert_unchanged(snap, cases.snapshot(case.model))


@pytest.mark.parametrize("call", ["diagnose", "update_curvature"])
def test_a_16_bit_model_is_refused_by_finite_differences_with_the_fix(call):
    case = smooth(torch.bfloat16, n=8)
    with pytest.raises(ValueError, match=r"float32 or float64.*model\.float\(\)"):
        _call(call, case, backend=FD)


def test_a_monitor_refuses_a_16_bit_model_at_construction_not_at_its_first_probe():
    case = smooth(torch.bfloat16, n=8)
    with pytest.raises(ValueError, match=r"float32 or float64.*model\.float\(\)"):
        cs.Monitor(case.model, case.loss_fn, case.data, lr=0.1, backend=FD)
    # selected float32 parameters of a mixed model are fine; an iterator of them is read once
    mixed = smooth(n=8)
    mixed.model[0].to(torch.bfloat16)
    chosen = (p for p in mixed.model[2:].parameters())
    mon = cs.Monitor(mixed.model, mixed.loss_fn, mixed.data, lr=0.1, backend=FD, params=chosen)
    assert len(mon.params) == len(list(mixed.model[2:].parameters()))


def test_a_monitor_refuses_sharded_vectors_of_an_unsharded_model_at_construction():
    case = smooth(n=8)
    with pytest.raises(ValueError, match=r"sharded=True: parameters \['0.weight'.*drop sharded"):
        cs.Monitor(case.model, case.loss_fn, case.data, lr=0.1, backend=FD, sharded=True)


def _call(call: str, case: cases.Case, **options) -> object:
    if call == "diagnose":
        return cs.diagnose(case.model, case.loss_fn, case.data, lr=0.1, **options)
    before = {k: p.detach() - 0.01 for k, p in case.model.named_parameters()}
    return update_curvature(case.model, case.loss_fn, case.data, before, lr=0.1, **options)
