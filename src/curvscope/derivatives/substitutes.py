"""Differentiable substitutes for torch kernels whose higher derivatives are wrong or missing.

**Weight normalisation.** Both of torch's weight-norm APIs compute the weight as
``torch._weight_norm(v, g, dim)``: the parametrization
(``torch.nn.utils.parametrizations.weight_norm``, module ``_WeightNorm``) and the deprecated
forward pre-hook (``torch.nn.utils.weight_norm``, hook ``WeightNorm``, which imported the same
function object). In torch 2.13 that function sends ``dim=0`` and ``dim=v.ndim - 1`` (as
given: ``-2`` on a matrix takes the differentiable path; every floating dtype) to the fused
``_weight_norm_interface``, whose first derivatives are right but whose **double backward is
wrong** and which has **no forward-mode AD**:

- a 6x5 weight, ``tanh(W x)ᵀ tanh(W x)``: the Hessian by double backward is asymmetric by
  0.57 (1e-15 for the formula written out) and 0.58 away from the true one;
- an MLP 5-6-3 with a weight-normed first layer, cross-entropy on 40 samples: the exact
  Hessian products of :class:`~curvscope.Curvature` were 0.143 away from the true Hessian
  (largest entry), asymmetric by 0.170, λ_min -0.319 against -0.412 (23% off) with the
  Lanczos run reporting convergence; ``backend="forward_over_reverse"`` raised
  ``NotImplementedError`` (forward AD of ``_weight_norm_interface``);
- ``dim=None`` (``-1``) takes torch's differentiable path, whose double backward is right but
  whose forward-mode AD fails ("Trying to set a forward gradient that has a different size").

The Gauss-Newton kinds were right (their Jacobian products differentiate the backward only
with respect to its incoming gradient): 8e-17 from the dense reference.

While :class:`WrittenOutWeightNorm` is active, ``torch._weight_norm`` is computed as the
formula it stands for, from ops whose every derivative torch has right::

    w = v · g / ‖v‖,   ‖v‖ the 2-norm over every dimension of v but ``dim``
                       (over all of v for dim = -1, torch's ``norm_except_dim`` convention)

— torch's values to rounding (a few ulps: 9e-16 in float64; bit for bit in float16 and
bfloat16, computed in float32 where torch's fused kernel is), with correct double backward and
forward-mode AD (``torch.func.jvp``, ``vmap``) for every ``dim``. Nothing else is touched:
every other torch call passes through the mode unchanged. Enter it only for a model that uses
weight normalisation (:func:`uses_weight_norm`): the mode costs a Python call (about 1.5 µs
on a CPU) on every torch call while it is active, and the written-out formula 7 µs more than
the fused kernel — on the MLP 5-6-3 above, a forward 34 -> 52 µs, an uncached Hessian product
0.87 -> 1.02 ms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.weight_norm import WeightNorm

#: The parametrization of ``torch.nn.utils.parametrizations.weight_norm`` (a private class:
#: a torch without it has a weight norm this module does not know, and finds none)
_WeightNorm: type = getattr(parametrizations, "_WeightNorm", type(None))

#: The function both weight-norm APIs call (the deprecated one imported this very object).
_FUSED = torch._weight_norm
_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: What an operator says of a model whose weight norm is substituted during its products.
WEIGHT_NORM_NOTE = (
    "weight normalisation is computed written out (v·g/‖v‖) during curvature products: "
    "torch._weight_norm's double backward is wrong in torch 2.13 and it has no forward-mode AD"
)


def weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """``torch._weight_norm(v, g, dim)`` written out: ``v · g / ‖v‖``, the 2-norm taken over
    every dimension of ``v`` but ``dim`` (over all of ``v`` for ``dim=-1``, which is what
    ``dim=None`` means to both weight-norm APIs; other negative dims count from the end).

    Args:
        v: the direction, of the weight's shape.
        g: the magnitude, shaped like ``v`` with every dimension but ``dim`` of size 1 (0-d for
            ``dim=-1``).
        dim: the dimension whose slices are normalised one by one.

    Returns:
        The weight ``v * (g / ‖v‖)``, whose derivatives of every order are autograd's own.

    Example:
        >>> v, g = torch.tensor([[3.0, 4.0], [0.0, 2.0]]), torch.tensor([[10.0], [1.0]])
        >>> weight_norm(v, g, 0)
        tensor([[6., 8.],
                [0., 1.]])
    """
    if dim == -1:
        return v * (g / torch.linalg.vector_norm(v))
    if not -v.ndim <= dim < v.ndim:
        return _FUSED(v, g, dim)  # torch's own error for a dimension v does not have
    keep = dim % v.ndim
    dims = [i for i in range(v.ndim) if i != keep]
    out_dtype = v.dtype
    if v.dtype in _LOW_PRECISION and dim in (0, v.ndim - 1):
        # torch's fused kernel (these dims) computes in float32 and rounds once: so do we
        v, g = v.float(), g.float()
    # a 1-D v normalised along its only dimension: each entry is its own slice
    norm = torch.linalg.vector_norm(v, 2, dims, keepdim=True) if dims else v.abs()
    return (v * (g / norm)).to(out_dtype)


def substitute(func: Any) -> Any:
    """The differentiable substitute for the torch function ``func``, or None where torch's own
    is right: what a ``TorchFunctionMode`` that takes second derivatives calls instead
    (:class:`WrittenOutWeightNorm`, and the optimizers' closure mode)."""
    return weight_norm if func is _FUSED else None


class WrittenOutWeightNorm(torch.overrides.TorchFunctionMode):
    """While active (``with WrittenOutWeightNorm(): ...``), ``torch._weight_norm`` is computed by
    :func:`weight_norm`, whose double backward and forward-mode AD are right; every other torch
    call passes through unchanged. Local to the thread that enters it; nothing is patched.

    Example:
        >>> v = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
        >>> g = torch.norm_except_dim(v, 2, 0).detach().requires_grad_(True)
        >>> with WrittenOutWeightNorm():
        ...     w = torch._weight_norm(v, g, 0)
        >>> bool(torch.allclose(w, v))  # g = ‖v‖ row by row
        True
    """

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        # inside the handler the mode is off: the formula's own ops are not intercepted
        return (substitute(func) or func)(*args, **(kwargs or {}))


def uses_weight_norm(modules: list[nn.Module]) -> bool:
    """Whether any of ``modules`` (a model's ``list(model.modules())``) normalises a weight by
    ``torch._weight_norm``: a parametrization ``_WeightNorm``
    (``torch.nn.utils.parametrizations.weight_norm``) or a forward pre-hook ``WeightNorm``
    (the deprecated ``torch.nn.utils.weight_norm``). A forward that calls
    ``torch._weight_norm`` itself is not seen.

    Example:
        >>> layer = nn.Linear(3, 2)
        >>> uses_weight_norm(list(layer.modules()))
        False
        >>> _ = nn.utils.parametrizations.weight_norm(layer)
        >>> uses_weight_norm(list(layer.modules()))
        True
    """
    for m in modules:
        if isinstance(m, _WeightNorm):
            return True
        if any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values()):
            return True
        # the parametrizations of a module passed without its submodules
        if parametrize.is_parametrized(m) and any(
            isinstance(p, _WeightNorm) for p in cast(nn.Module, m.parametrizations).modules()
        ):
            return True
    return False
