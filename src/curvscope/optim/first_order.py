"""Normalized gradient descent: the first-order method torch does not ship."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from curvscope.derivatives.objective import walk_graph
from curvscope.optim._closure import Counts, _call, _undone, check_closure
from curvscope.optim.base import (
    CurvscopeOptimizer,
    Snapshot,
    StepInfo,
    check_lr,
    check_positive,
)


class NormalizedGD(CurvscopeOptimizer):
    """Normalized gradient descent: θ ← θ − lr · g/‖g‖ — steps of fixed length ``lr``.

    The step length does not depend on the gradient's size, so it neither stalls on plateaus
    nor overshoots by the gradient's scale; what it cannot do is settle: near a minimum it
    oscillates at distance ~lr (decay lr to converge). ‖g‖ is the norm over all parameters;
    each group moves by its own lr. Without a closure it reads ``p.grad``, like
    ``torch.optim.SGD``: call ``loss.backward()`` first. With one it differentiates the loss
    the closure returns, or reads ``.grad`` as a closure that runs its own backward leaves it.

    Example:
        >>> import torch, curvscope as cs
        >>> x = torch.tensor([3.0, 4.0], requires_grad=True)
        >>> opt = cs.optim.NormalizedGD([x], lr=0.5)
        >>> (x**2).sum().backward(); _ = opt.step()
        >>> x.detach()
        tensor([2.7000, 3.6000])
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, eps: float = 1e-12) -> None:
        super().__init__(params, {"lr": lr, "eps": eps})  # checked by _check_group

    def _check_group(self, group: Mapping[str, Any]) -> None:
        """A group's own values, checked as the constructor's are (a group's lr=-1 stepped
        uphill, lr=nan and eps=0 were taken: an outside review), and before each step."""
        check_lr(group["lr"])
        check_positive("eps", group["eps"])

    def _step(self, closure: Any, snapshot: Snapshot) -> Tensor | None:
        counts, loss = self.counts, None
        if closure is not None:  # the gradient of the loss it returns, as every method's
            grads, loss = self._closure_gradient(closure, counts)
        else:
            grads = [(p, p.grad) for p in self._params() if p.grad is not None]
            counts.gradients += 1
        if not grads:
            raise ValueError(
                "NormalizedGD found no gradient: call loss.backward() before step(), or pass "
                "a closure that returns the loss"
            )
        norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for _, g in grads])))
        if not math.isfinite(norm):  # as AdaHessian and Sophia: it skipped the step silently
            raise FloatingPointError(
                "NormalizedGD: the gradient has non-finite entries (its norm is "
                f"{norm}); nothing was written — check the model for overflow (a smaller step, "
                "or float64), or skip the step yourself as torch.amp.GradScaler does"
            )
        of = {p: g for p, g in grads}
        updates = [
            (p, of[p] * (group["lr"] / (norm + group["eps"])))
            for group in self.param_groups
            for p in group["params"]
            if p in of
        ]
        self._commit([(p, p - delta, None) for p, delta in updates])
        # the step taken, each group at its own lr (it was group 0's lr for all: a review)
        taken = float(torch.stack([d.square().sum() for _, d in updates]).sum()) ** 0.5
        info = StepInfo(
            float("nan") if loss is None else float(loss),
            norm,
            taken,
            None,
            None,
            None,
            True,
            0,
            "",
        )
        self._end(counts, info)
        return loss

    def _closure_gradient(
        self, closure: Any, counts: Counts
    ) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """(parameter, gradient) and the loss: ``.grad`` as a closure that runs its own
        backward, or sets ``.grad`` itself, leaves it (clipped, masked: as ``SGD`` reads it);
        else the gradient of the loss it returns, by torch's own backward, as the user's
        would run (DDP averages it over the ranks), into ``.grad`` taken out of its way and
        put back as found. A closure without ``backward()`` raised "found no gradient", or was
        stepped along a ``.grad`` left from before (an outside review)."""
        params = self._params()
        before = [(p.grad, None if p.grad is None else p.grad._version) for p in params]
        called = _call(
            check_closure(closure, type(self).__name__), counts, params, "as_written", None
        )
        called.check_finite()  # as every method's (it stepped on an inf loss: the fuzzing)
        if called.ran_here or _set_by_hand(params, before):
            return [(p, p.grad) for p in params if p.grad is not None], called.loss.detach()
        if not called.loss.requires_grad:
            raise ValueError(
                "the closure's loss does not depend on the optimized parameters; compute it "
                "from the model inside the closure (or call loss.backward() in it)"
            )
        # every leaf's .grad put back as found, not the optimized parameters' alone: torch's
        # backward fills the other optimizer's parameters of a shared graph too (a model's head
        # under another optimizer: its .grad summed over steps, NaN after a refused one: an
        # outside review's fuzzing). Whole, not inputs=: under DDP each bucket waits for all,
        # reentrant checkpointing refuses inputs=, and the hooks fire as the user's own
        # backward fires them (the second diff review; the walk costs 2 ms a step on a
        # 12-layer transformer)
        mine = {id(p) for p in params}
        others = [t for t in walk_graph(called.loss).leaves if id(t) not in mine]
        with _undone([*params, *others]):
            called.loss.backward()
            counts.gradients += 1
            found = [(p, p.grad) for p in params if p.grad is not None]
        return found, called.loss.detach()


def _set_by_hand(params: list[Tensor], before: list[tuple[Tensor | None, int | None]]) -> bool:
    """Whether a closure that ran no backward set ``.grad`` itself: a new one, or one written in
    place (``p.grad.copy_(g)``) that is not all zeros (``zero_grad(set_to_none=False)`` wrote
    nothing to step along). ``before``: each ``.grad`` and its version counter before the call.
    (A host read a parameter whose ``.grad`` changed: asked only where no backward ran.)"""
    return any(
        p.grad is not None and (p.grad is not g or p.grad._version != v) and bool(p.grad.any())
        for p, (g, v) in zip(params, before, strict=True)
    )
