"""What every curvscope optimizer needs from the user's closure: the loss, its gradient, and
curvature products — all from one forward pass, without the user's loop doing anything special.

The closure is called with gradients enabled. If it calls ``loss.backward()`` itself (the
``torch.optim.LBFGS`` habit), that backward runs with ``retain_graph=True`` so that the graph is
still there for our own derivatives; ``.grad`` is filled as the closure expects (that backward
is an extra gradient, and counted as one). Loss-only
evaluations (trial points of a trust region or line search) run under ``torch.no_grad()`` and
turn such a ``backward()`` into a no-op: they are counted as closure calls, not gradients.

The interception swaps ``torch.autograd.backward`` for the duration of the closure call: another
thread that calls ``backward`` at that very moment would see it too (optimizers are not used
from several threads at once in practice; the swap is undone even when the closure raises).

A closure may return the loss or a pair ``(loss, outputs)``; with the outputs, Gauss-Newton
products (Jᵀ H_out J) and the Gauss-Newton-Bartlett estimator become available.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvscope.derivatives.kinds import _grad, _Jacobian

Closure = Callable[[], Any]


@dataclass
class Counts:
    """The work an optimizer has done, each kind counted on its own.

    closure_calls: forward passes of the closure (with or without a gradient);
    gradients: gradients computed (backward passes through the loss);
    products: curvature-vector products (Hessian or Gauss-Newton);
    hessians: dense Hessians formed (each also costs n products, counted there);
    cg_iterations, lanczos_iterations: inner iterations of the subproblem solvers.
    """

    closure_calls: int = 0
    gradients: int = 0
    products: int = 0
    hessians: int = 0
    cg_iterations: int = 0
    lanczos_iterations: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@contextmanager
def _backward_patched(mode: str, counts: Counts | None = None) -> Iterator[None]:
    """Within the closure: ``keep`` runs backward with the graph retained (and counts it as a
    gradient in ``counts``), ``skip`` skips it."""
    original = torch.autograd.backward

    def backward(
        tensors: Any, grad_tensors: Any = None, retain_graph: Any = None, *args: Any, **kw: Any
    ) -> None:
        if mode == "skip":
            return None
        if counts is not None:
            counts.gradients += 1
        return original(tensors, grad_tensors, True, *args, **kw)

    torch.autograd.backward = backward  # Tensor.backward looks it up at each call
    try:
        yield
    finally:
        torch.autograd.backward = original


def _split(out: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(out, tuple | list) and len(out) == 2:
        loss, outputs = out
    else:
        loss, outputs = out, None
    if not isinstance(loss, Tensor):
        raise TypeError(
            "the closure must return the loss as a torch.Tensor (or a pair (loss, outputs)), "
            f"got {type(loss).__name__}; end it with `return loss`"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"the closure must return a scalar loss, got shape {tuple(loss.shape)}; "
            "reduce it with .mean() or .sum()"
        )
    if outputs is not None and not isinstance(outputs, Tensor):
        raise TypeError(f"the closure's second value must be the outputs tensor, got {outputs!r}")
    return loss.reshape(()), outputs


def check_closure(closure: Any, name: str) -> Closure:
    if closure is None:
        raise ValueError(
            f"{name}.step needs a closure that re-evaluates the model and returns the loss, "
            "e.g. opt.step(lambda: loss_fn(model(x), y)); it differentiates the loss itself"
        )
    if not callable(closure):
        raise TypeError(f"{name}.step expected a callable closure, got {type(closure).__name__}")
    return closure


def loss_only(closure: Closure, params: Sequence[Tensor], counts: Counts) -> float:
    """The closure's loss value at the current parameters, without any derivative; ``.grad``
    is left as it was (a closure's ``zero_grad()`` would otherwise clear it)."""
    grads = [p.grad for p in params]
    with torch.no_grad(), _backward_patched("skip"):
        loss, _ = _split(closure())
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    counts.closure_calls += 1
    return float(loss)


class Evaluation:
    """The closure at the current parameters: loss, gradient, and curvature products.

    With ``curvature`` (the default) the gradient graph is kept (``create_graph=True``), so a
    Hessian-vector product is one more backward pass through it (Pearlmutter 1994); with the
    closure's outputs, Gauss-Newton products come from the same forward pass.
    """

    def __init__(
        self, params: Sequence[Tensor], closure: Closure, counts: Counts, curvature: bool = True
    ) -> None:
        self.params, self.counts = list(params), counts
        with torch.enable_grad(), _backward_patched("keep", counts):
            loss, outputs = _split(closure())
        counts.closure_calls += 1
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the closure returned a non-finite loss ({float(loss.detach())}) at the current "
                "parameters: nothing to optimize from; check the data and the initialisation"
            )
        if not loss.requires_grad:
            raise ValueError(
                "the closure's loss does not depend on the optimized parameters; "
                "compute it from the model inside the closure"
            )
        self.loss_tensor, self.outputs = loss, outputs
        self.loss = float(loss.detach())
        with torch.enable_grad():
            grads = torch.autograd.grad(
                loss, self.params, create_graph=curvature, allow_unused=True
            )
        counts.gradients += 1
        self.grads = [
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params, strict=True)
        ]
        self.flat_grad = torch.cat([g.detach().reshape(-1) for g in self.grads])
        if not torch.isfinite(self.flat_grad).all():
            raise FloatingPointError(
                "the gradient has non-finite entries at the current parameters; "
                "check the model for overflow (a smaller step, or float64)"
            )
        self._jac: _Jacobian | None = None

    @property
    def n(self) -> int:
        return self.flat_grad.numel()

    def _blocks(self, V: Tensor) -> list[Tensor]:
        """(n, k) flat columns -> per-parameter blocks (k, *shape)."""
        out, i = [], 0
        for p in self.params:
            out.append(V[i : i + p.numel()].T.reshape(V.shape[1], *p.shape))
            i += p.numel()
        return out

    @staticmethod
    def _flat(blocks: Sequence[Tensor]) -> Tensor:
        return torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=1).T

    def hvp(self, V: Tensor) -> Tensor:
        """H V for V of shape (n, k)."""
        with torch.enable_grad():
            out = self._flat(_grad(self.grads, self.params, self._blocks(V.to(self.flat_grad))))
        self.counts.products += V.shape[1]
        return out

    def ggn(self, V: Tensor) -> Tensor:
        """Jᵀ H_out J V: the Gauss-Newton product, from the closure's (loss, outputs)."""
        if self.outputs is None:
            raise ValueError(
                "Gauss-Newton products need the model's outputs: let the closure return "
                "(loss, outputs), or use curvature='hessian'"
            )
        with torch.enable_grad():
            if self._jac is None:
                self._jac = _Jacobian(self.outputs, self.params)
                (self._out_grad,) = torch.autograd.grad(
                    self.loss_tensor, self.outputs, create_graph=True
                )
            jv = self._jac.jvp(self._blocks(V.to(self.flat_grad)))
            (hjv,) = _grad([self._out_grad], [self.outputs], [jv])
            out = self._flat(self._jac.vjp(hjv))
        self.counts.products += V.shape[1]
        return out


def flat_params(params: Sequence[Tensor]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def write_flat(params: Sequence[Tensor], x: Tensor) -> None:
    """Copy a flat vector into the parameters (in place, under no_grad)."""
    i = 0
    with torch.no_grad():
        for p in params:
            p.copy_(x[i : i + p.numel()].view_as(p))
            i += p.numel()
