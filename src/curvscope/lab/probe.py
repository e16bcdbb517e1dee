"""``curvscope probe``: diagnose and measure one model, and the 1-D slices of its loss along
the gradient and the extreme eigenvectors with the local quadratic model over them."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from curvscope.derivatives import Curvature
from curvscope.derivatives.distributed import all_reduce_sum, global_count
from curvscope.derivatives.flat import flatten
from curvscope.derivatives.objective import ModelObjective
from curvscope.diagnosis import diagnose
from curvscope.spectrum import eigenvalues, trace
from curvscope.spectrum.eigen import both_ends

#: Slice points t (the step along a unit direction runs over ±2/sqrt(max |λ|)).
SLICE_POINTS = 41


def _describe(x: Any) -> str:
    """A short description of a model's inputs or outputs for an error message."""
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    if isinstance(x, Mapping):
        return "a dict of " + ", ".join(f"{k}: {_describe(v)}" for k, v in x.items())
    if isinstance(x, tuple | list):
        return f"a {type(x).__name__} of " + ", ".join(_describe(v) for v in x)
    return f"a {type(x).__name__}"


def check_runs(model: nn.Module, loss_fn: Any, data: Any) -> None:
    """Run the model and the loss once on the first batch, so that code that does not fit its
    data fails with a message that says which part failed on what, before any curvature.

    The forward pass is the curvature operator's own (``functional_call`` on copies: the
    model, its buffers and the global RNG are left as found), without gradients.

    Raises:
        ValueError / TypeError: what :class:`~curvscope.Curvature` refuses at construction
            (no trainable parameter, data that is not (inputs, targets) batches, NaN in the
            data), or a ValueError naming the model or the loss when either raises on the first
            batch (the cause chained).
    """
    obj = ModelObjective(model, loss_fn, data)
    batch = next(obj.batches())
    theta = {k: p.detach() for k, p in obj.params.items()}
    with obj.context(batch.index), torch.no_grad():
        try:
            out = obj.raw_forward(theta, batch)
        except Exception as e:  # the user's model on the user's data
            raise ValueError(
                f"the model fails on the first batch of the data (inputs: "
                f"{_describe(batch.inputs)}): {type(e).__name__}: {e}; check that the model "
                "and the data belong together"
            ) from e
        try:
            obj.loss_fn(out, batch.targets)  # with loss_fn=None, the model's own loss
        except Exception as e:  # the user's loss on the model's outputs
            raise ValueError(
                f"the loss fails on the model's outputs ({_describe(out)}) and the targets "
                f"({_describe(batch.targets)}): {type(e).__name__}: {e}; check that the "
                "targets fit the outputs (their rows, dtype, label range) and that the loss "
                "takes (outputs, targets)"
            ) from e


def _objective(C: Curvature) -> ModelObjective:
    if C.objective is None:
        raise TypeError("loss slices need a Curvature built from a model")
    return C.objective


def slice_losses(C: Curvature, theta: Tensor, v: Tensor, ts: list[float]) -> list[float]:
    """The loss of ``C``'s model over all of ``C``'s data at the parameters θ + t·v, each t.

    Evaluated exactly as the curvature is (the same batches, batch weights, randomness and
    model mode, summed over the ranks of ``C.group``), so that at t = 0 it is
    ``C.loss_and_gradient()[0]``; the model is left as found.
    """
    obj = _objective(C)
    total = global_count(obj.num_samples, C.group, obj.device)
    summed = getattr(obj, "reduction", "mean") == "sum"
    losses = torch.zeros(len(ts), dtype=torch.float64, device=obj.device)
    with torch.no_grad():
        for batch in obj.batches():
            weight = 1.0 if summed else batch.size / total
            for i, t in enumerate(ts):
                theta_t = dict(zip(obj.names, obj.unflatten(theta + t * v), strict=True))
                with obj.context(batch.index):
                    out = obj.raw_forward(theta_t, batch)
                    losses[i] += weight * float(obj.loss_fn(out, batch.targets))
    return all_reduce_sum(losses, C.group).tolist()


def _slice(C: Curvature, v: Tensor, g: Tensor, f0: float, half_width: float) -> dict[str, Any]:
    v = v / v.norm()
    curv = float(v @ C.matmat(v[:, None])[:, 0])
    slope = float(g @ v)
    theta = flatten([p.detach() for p in _objective(C).params.values()])
    ts = torch.linspace(-half_width, half_width, SLICE_POINTS, dtype=torch.float64).tolist()
    losses = slice_losses(C, theta, v, ts)
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
    reduction: str | None = None,
) -> dict[str, Any]:
    """The diagnosis, a spectrum summary, the cost next to the dense Hessian's, and (with
    ``slices``) the loss along the gradient and the top and bottom eigenvectors.

    ``data`` is anything :class:`~curvscope.Curvature` takes: an (inputs, targets) pair, a list
    of such batches or a loader; inputs a tensor, a tuple or a dict (Hugging Face). The model
    and the loss are first run once on the first batch (:func:`check_runs`). ``reduction``:
    as :class:`~curvscope.Curvature`'s, for a loss whose own cannot be read or told.
    """
    start = time.perf_counter()
    check_runs(model, loss_fn, data)
    d = diagnose(model, loss_fn, data, optimizer=optimizer, lr=lr, reduction=reduction)
    C = Curvature(model, loss_fn, data, reduction=reduction)
    k, which = both_ends(C.num_params, 3)
    top = eigenvalues(C, k=k, which=which)
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
    if slices:
        f0, g = C.loss_and_gradient()
        lam = max(abs(v) for v in out["eigenvalues"]) or 1.0
        width = 2.0 / lam**0.5
        vectors = top.vectors
        assert vectors is not None  # eigenvalues returns them by default (return_vectors=True)
        dirs = {
            "gradient": -g,
            "top eigenvector": vectors[:, 0],
            "bottom eigenvector": vectors[:, -1],
        }
        out["slices"] = {k: _slice(C, v, g, f0, width) for k, v in dirs.items()}
    return out


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The spectrum and the cost of a :func:`probe` result in words: what the command line
    prints under the diagnosis, and the HTML report shows (it left them out: a review)."""
    n, size = result["num_params"], _bytes(result["dense_hessian_bytes"])
    return [
        f"extreme eigenvalues: {', '.join(f'{v:.4g}' for v in result['eigenvalues'])}; "
        f"trace ≈ {result['trace']:.4g} ± {result['trace_stderr']:.2g}",
        f"cost: {result['matvecs']} curvature products in {result['seconds']:.2f} s; the dense "
        f"Hessian of {n:,} parameters would need {size} (8n² bytes)",
    ]


def _bytes(n: int) -> str:
    """A size in KiB, MiB or GiB, whichever reads best ("0.0 MiB" for 17 KB: a review)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 2**10:,.1f} KiB"
