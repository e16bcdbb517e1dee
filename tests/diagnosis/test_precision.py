"""diagnose() and the Monitor on bfloat16 and float16 models, and under torch.autocast.

A low-precision model is diagnosed against a float64 copy of the same rounded weights. Its
products are within δ = 2·eps(dtype)·‖H‖₂ of the exact ones (tests/spectrum/test_precision.py);
from that: the loss and gradient norm within 2·eps(dtype) relative (one forward and backward;
measured at most 0.41·eps), the sharpness and λ_min within δ + DIAGNOSIS_TOL·‖H‖ (Weyl, plus
the diagnosis' own Lanczos tolerance), the directional curvature within 3δ (one product, along a
gradient that is itself rounded), the Newton decrement within 5% (CG's 1e-2 relative residual
dominates), the state the same.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvscope as cs
from curvscope.diagnosis import read_log
from curvscope.diagnosis.diagnosis import DIAGNOSIS_TOL
from tests import cases
from tests.spectrum.test_precision import PRODUCT_ERROR, rounded_case

DTYPES = [torch.bfloat16, torch.float16]
DT_IDS = ["bf16", "fp16"]


def linear_case() -> cases.Case:
    """Softmax regression: a convex loss, so with weight decay H + λI is positive definite and
    the Newton decrement is defined."""
    base = cases.mlp()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Linear(4, 3).to(torch.float64)
    return cases.Case("linear", model, base.loss_fn, base.inputs, base.targets)


def compare(low, ref, dtype, lr, weight_decay=0.0):
    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)

    d = cs.diagnose(low.model, low.loss_fn, low.data, optimizer=sgd(low.model))
    e = cs.diagnose(ref.model, ref.loss_fn, ref.data, optimizer=sgd(ref.model))
    a, b = d.evidence, e.evidence
    eps = torch.finfo(dtype).eps
    H = cases.dense_hessian(ref)
    H = H + weight_decay * torch.eye(H.shape[0], dtype=torch.float64)
    norm = float(torch.linalg.matrix_norm(H, 2))
    delta = PRODUCT_ERROR * eps * norm
    assert d.state == e.state
    assert a["loss"] == pytest.approx(b["loss"], rel=2 * eps)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2 * eps)
    for key in ("sharpness", "lambda_min"):
        assert abs(a[key] - b[key]) <= delta + DIAGNOSIS_TOL * norm, key
    assert abs(a["directional_curvature"] - b["directional_curvature"]) <= 3 * delta
    assert a["stability_limit"] == pytest.approx(b["stability_limit"], rel=2 * eps)
    assert d.vectors["top"].dtype == d.vectors["bottom"].dtype == torch.float32
    assert e.vectors["top"].dtype == torch.float64  # a float64 model stays float64
    assert sum(a["layer_shares"].values()) == pytest.approx(1.0, abs=1e-5)
    return d, e


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize(("lr", "state"), [(0.5, "learning"), (5.0, "unstable")])
def test_diagnose_a_half_precision_model_against_its_float64_copy(dtype, lr, state):
    low, ref = rounded_case(cases.residual_layernorm(), dtype)
    d, _ = compare(low, ref, dtype, lr)
    assert d.state == state


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_newton_decrement_and_weight_decay_in_half_precision(dtype):
    low, ref = rounded_case(linear_case(), dtype)
    d, e = compare(low, ref, dtype, lr=0.5, weight_decay=0.1)
    a, b = d.evidence["newton_decrement"], e.evidence["newton_decrement"]
    assert a is not None and b is not None and b > 0
    assert a == pytest.approx(b, rel=0.05)


def test_a_monitor_in_a_training_loop_under_autocast():
    """A float32 model trained with torch.autocast(bfloat16), the Monitor called inside the
    region: the probes measure the float32 model (the region is suspended for them), exactly as
    a diagnosis outside the region does, and leave the model as found."""
    case = cases.mlp(n=32)
    model = case.model.float()
    x, y = case.inputs.float(), case.targets
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    mon = cs.Monitor(model, case.loss_fn, (x, y), optimizer=opt, every=3)
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            assert out.dtype == torch.bfloat16  # the region is real
            loss = case.loss_fn(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            before = cases.snapshot(model)
            mon.step(loss)
            cases.assert_unchanged(before, cases.snapshot(model))
    assert len(mon.history) == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = cs.diagnose(model, case.loss_fn, (x, y), optimizer=opt)
    outside = cs.diagnose(model, case.loss_fn, (x, y), optimizer=opt)
    for key in ("loss", "grad_norm", "sharpness", "lambda_min", "directional_curvature"):
        assert inside.evidence[key] == outside.evidence[key], key
    assert inside.vectors["top"].dtype == torch.float32
    # the last probe saw the same parameters (warm-started: the same values within tolerance)
    probe = mon.last.evidence
    assert probe["loss"] == outside.evidence["loss"]
    assert probe["sharpness"] == pytest.approx(outside.evidence["sharpness"], rel=DIAGNOSIS_TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_a_monitor_on_a_half_precision_model_warm_starts_and_logs(dtype, tmp_path):
    low, _ = rounded_case(cases.mlp(n=32), dtype)
    opt = torch.optim.SGD(low.model.parameters(), lr=0.2)
    path = tmp_path / "run.jsonl"
    mon = cs.Monitor(low.model, low.loss_fn, low.data, optimizer=opt, every=3, log=path)
    X, Y = low.data
    for _ in range(6):
        opt.zero_grad()
        loss = low.loss_fn(low.model(X), Y)
        loss.backward()
        opt.step()
        mon.step(loss)
    mon.close()
    _, records = read_log(path)
    assert [r["step"] for r in records] == [3, 6]
    assert all(r["sharpness"] > 0 and r["state"] == "learning" for r in records)
    assert mon.history[-1].vectors["top"].dtype == torch.float32
    # the probes warm-start from the previous probe's float32 vectors: same values as cold
    cold = cs.diagnose(low.model, low.loss_fn, low.data, optimizer=opt)
    assert mon.history[-1].evidence["sharpness"] == pytest.approx(
        cold.evidence["sharpness"], rel=2 * DIAGNOSIS_TOL
    )
