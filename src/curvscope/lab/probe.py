"""``curvscope probe``: diagnose and measure one model, and the 1-D slices of its loss along
the gradient and the extreme eigenvectors with the local quadratic model over them."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from curvscope.derivatives import Curvature
from curvscope.diagnosis import diagnose
from curvscope.spectrum import eigenvalues, trace

#: Slice points t (the step along a unit direction is t · SLICE_SCALE / sqrt(max(|λ|, …))).
SLICE_POINTS = 41


def _slice(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    C: Curvature,
    v: torch.Tensor,
    g: torch.Tensor,
    f0: float,
    half_width: float,
) -> dict[str, Any]:
    from torch.func import functional_call

    v = v / v.norm()
    curv = float(v @ C.matmat(v[:, None])[:, 0])
    slope = float(g @ v)
    theta = C.flatten({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    ts = torch.linspace(-half_width, half_width, SLICE_POINTS, dtype=theta.dtype).tolist()
    X, y = data
    losses = []
    with torch.no_grad():
        for t in ts:
            params = C.unflatten(theta + t * v)
            losses.append(float(loss_fn(functional_call(model, params, (X,)), y)))
    model_vals = [f0 + slope * t + 0.5 * curv * t * t for t in ts]
    return {"t": ts, "loss": losses, "quadratic": model_vals, "slope": slope, "curvature": curv}


def probe(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    lr: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    slices: bool = False,
) -> dict[str, Any]:
    """The diagnosis, a spectrum summary, the cost next to the dense Hessian's, and (with
    ``slices``) the loss along the gradient and the top and bottom eigenvectors."""
    start = time.perf_counter()
    d = diagnose(model, loss_fn, data, optimizer=optimizer, lr=lr)
    C = Curvature(model, loss_fn, data)
    top = eigenvalues(C, k=3, which="both")
    tr = trace(C, matvecs=60)
    n = C.num_params
    out: dict[str, Any] = {
        "state": d.state,
        "text": str(d),
        "advice": list(d.advice),
        "evidence": {
            k: v for k, v in d.evidence.items() if isinstance(v, int | float | str | None)
        },
        "num_params": n,
        "eigenvalues": top.values.tolist(),
        "eigenvalue_errors": top.errors.tolist(),
        "trace": float(tr.value),
        "trace_stderr": float(tr.stderr),
        "matvecs": int(d.evidence.get("matvecs", 0)) + top.matvecs + tr.matvecs,
        "seconds": time.perf_counter() - start,
        "dense_hessian_bytes": 8 * n * n,
    }
    if slices and isinstance(data, tuple | list) and len(data) == 2:
        f0, g = C.loss_and_gradient()
        lam = max(abs(v) for v in out["eigenvalues"]) or 1.0
        width = 2.0 / lam**0.5
        dirs = {
            "gradient": -g,
            "top eigenvector": top.vectors[:, 0],
            "bottom eigenvector": top.vectors[:, -1],
        }
        out["slices"] = {
            k: _slice(model, loss_fn, data, C, v, g, f0, width) for k, v in dirs.items()
        }
    return out
