"""Direction and shape of a plain function ``f: R^n -> R``.

``grad`` is the direction (first derivative), ``hvp`` and ``hessian`` the shape (second
derivative). ``f`` takes a 1-D tensor and returns a scalar tensor; it must be differentiable
twice by torch autograd. Nothing here changes ``x`` or its ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from curvscope.derivatives.checks import (
    FUNCTION_FIX,
    FUNCTION_VECTOR,
    check_dense_size,
    check_finite,
    check_point,
    check_scalar_loss,
    check_vector,
)
from curvscope.derivatives.kinds import _grad
from curvscope.derivatives.objective import watch_custom_functions
from curvscope.derivatives.rng import kept_rngs

Function = Callable[[Tensor], Tensor]

#: f(x) computed without its argument (where no graph at all, or one through other tensors)
NOT_OF_X = "f(x) does not depend on x: check that f uses its argument"


def _generators(x: Tensor) -> list[torch.Generator]:
    """The global torch generators ``f`` may draw from at ``x``: the CPU's, and x's GPU's."""
    gens = [torch.random.default_generator]
    if x.device.type == "cuda":
        index = torch.cuda.current_device() if x.device.index is None else x.device.index
        gens.append(torch.cuda.default_generators[index])
    return gens


def _value(f: Function, xl: Tensor) -> Tensor:
    """f(x), checked; with the global RNGs (torch's, numpy's, Python's) as found after it: an f
    that draws random numbers (a dropout-like mask) moved the user's generators, and two
    Hessians of it differed (an outside review) — each call now draws the same numbers."""
    with kept_rngs(_generators(xl)):
        out = f(xl)
    # (a plain function's: "the inputs and parameters ... the model" named what it has not)
    y = check_scalar_loss(
        out, "f(x)", fix="check x for NaN/Inf, and f for overflow or a value outside its domain"
    )
    if not y.requires_grad:
        if torch.is_inference_mode_enabled():  # it said "does not depend on x" (a review)
            raise RuntimeError(
                "derivatives are taken with torch.inference_mode() on, which records no graph; "
                "call curvscope outside the inference_mode block"
            )
        raise ValueError(NOT_OF_X)
    return y


def _gradient(y: Tensor, xl: Tensor, seed: Tensor | None = None, graph: bool = False) -> Tensor:
    """∇f(x) from ``y = f(xl)``; refused by name where ``y`` has a graph through other tensors
    only (a parameter ``f`` closes over, ``x`` detached or used as an index): torch's bare
    "appears to not have been used in the graph. Set allow_unused=True" before (an outside
    review's fuzzing)."""
    (g,) = torch.autograd.grad(y, xl, seed, create_graph=graph, allow_unused=True)
    if g is None:
        raise ValueError(f"{NOT_OF_X} (its value has a gradient only through other tensors)")
    return g


def _leaf(x: Tensor) -> Tensor:
    """A differentiable copy of ``x``, its own memory: an ``f`` that writes its argument in
    place (a projection, ``z.clamp_(-1, 1)`` under no_grad) wrote into the caller's ``x``
    through a detached view (an outside review's fuzzing)."""
    return x.detach().clone().requires_grad_(True)


def _grad_with_graph(f: Function, x: Tensor) -> tuple[Tensor, Tensor, float]:
    """Return (leaf copy of x, ∇f(x) with its graph kept for a second derivative, f(x))."""
    xl = _leaf(x)
    with torch.enable_grad():
        y = _value(f, xl)
        seed = watch_custom_functions(y, "second derivatives")
        g = _gradient(y, xl, seed, graph=True)
    return xl, g, float(y.detach())


def grad(f: Function, x: Tensor) -> Tensor:
    """Gradient ∇f(x): the direction of steepest ascent.

    Args:
        f: maps a 1-D tensor to a scalar tensor.
        x: the point, a 1-D floating tensor (not modified).

    Returns:
        A tensor like ``x``.

    Example:
        >>> import torch, curvscope as cs
        >>> cs.grad(lambda x: (x**2).sum(), torch.tensor([1.0, 2.0]))
        tensor([2., 4.])
    """
    x = check_point(x)
    xl = _leaf(x)
    with torch.enable_grad():
        g = _gradient(_value(f, xl), xl)
    return check_finite(g, "the gradient", FUNCTION_FIX)


def hvp(f: Function, x: Tensor, v: Tensor) -> Tensor:
    """Hessian-vector product H(x) v = ∇(∇f(x)ᵀ v), by double backward (Pearlmutter 1994).

    Costs about two gradients; the Hessian is never formed. ``v`` may also be a block of
    vectors of shape (n, k), giving H V.

    Example:
        >>> import torch, curvscope as cs
        >>> f = lambda x: x[0] ** 2 * x[1]
        >>> cs.hvp(f, torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]))
        tensor([4., 2.])
    """
    x = check_point(x)
    v = check_vector(v, x.numel(), x.dtype, x.device, **FUNCTION_VECTOR)
    xl, g, _ = _grad_with_graph(f, x)
    return check_finite(_hvp_from_grad(xl, g, v), "the Hessian-vector product", FUNCTION_FIX)


def _hvp_from_grad(xl: Tensor, g: Tensor, v: Tensor) -> Tensor:
    """H v (v of shape (n,) or (n, k)) from a gradient graph kept by :func:`_grad_with_graph`."""
    block = v[None] if v.ndim == 1 else v.T
    (hv,) = _grad([g], [xl], [block])
    return hv[0] if v.ndim == 1 else hv.T


def hessian(f: Function, x: Tensor, *, force: bool = False) -> Tensor:
    """Dense Hessian ∇²f(x), an (n, n) tensor, built from n Hessian-vector products.

    Built column by column with double backward from one cached gradient graph — not with
    ``torch.func.hessian``, which in torch 2.13 is wrong through LayerNorm and train-mode
    BatchNorm.

    Args:
        f: maps a 1-D tensor to a scalar tensor.
        x: the point, 1-D.
        force: build it even when n exceeds ``DENSE_LIMIT`` (5,000).

    Raises:
        ValueError: n > 5,000 without ``force=True``; the message says how much memory it needs.
    """
    x = check_point(x)
    n = x.numel()
    check_dense_size(n, x.dtype, force, "the Hessian")
    xl, g, _ = _grad_with_graph(f, x)
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    return check_finite(_hvp_from_grad(xl, g, eye), "the Hessian", FUNCTION_FIX)
