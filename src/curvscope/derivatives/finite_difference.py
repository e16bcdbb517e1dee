"""Hessian products by central differences of gradients: the path for any engine that computes
gradients, models sharded over devices (FSDP2) included.

    H v ≈ (∇L(θ + εv) − ∇L(θ − εv)) / (2ε)

Each gradient is the model's *own* forward and backward — the pass a training step runs — so
whatever the engine does there (FSDP2's all-gathers and reduce-scatters of ``DTensor``
parameters, hooks, fused kernels) is done as in training: the engine's ``loss.backward()``
(FSDP2, tensor parallelism, DeepSpeed's ``engine.backward``), and for plain parameters
``torch.autograd.grad`` over the selected ones, which writes no ``.grad`` elsewhere
(:func:`_accumulate`). Nothing goes through
``torch.func.functional_call``, which a sharded model does not support, and no second
derivative is taken: the memory is that of a training step, plus one copy of the parameters.

**The step.** With h = ε‖v‖ the step's length and v̂ = v/‖v‖, Taylor's theorem gives

    (∇L(θ + εv) − ∇L(θ − εv)) / (2ε) = Hv + (ε²/6) ∇⁴L[v, v, v] + O(ε⁴‖v‖⁵),

a truncation error of (h²/6)·M‖v‖, M = ‖∇⁴L[v̂, v̂, v̂]‖ (the third derivative of the gradient;
the even terms cancel). Rounding adds, per unit of ‖v‖, about u·(γ + ‖H‖‖θ‖)/h: u the unit
roundoff of the parameters' dtype, γ the size of the terms the gradient sums (≥ ‖∇L‖; each
evaluation is off by about u·γ, and the difference is divided by 2ε), and ‖H‖‖θ‖ from storing
θ ± εv in that dtype (each entry rounded by up to u|θᵢ|). The sum of the two is smallest at
h ∝ (u·(γ + ‖H‖‖θ‖)/M)^(1/3). M and γ are not known without the derivatives being sought, so
the default assumes the loss varies on the scale of the parameters themselves (M ≈ ‖H‖/‖θ‖²,
γ ≈ ‖H‖‖θ‖), which gives the standard central-difference choice

    h = u^(1/3)·‖θ‖,   i.e.   ε = u^(1/3)·‖θ‖/‖v‖       (fd_eps = u^(1/3): the relative step)

(‖θ‖ over the selected parameters; 1 where it is 0). Both errors are then O(u^(2/3)·‖H‖‖v‖):
about 4e-11·‖H‖‖v‖ in float64, 2.4e-5 in float32, 1e-3 in bfloat16 (bfloat16's u^(1/3) = 0.2
is no longer a small step: finite differences need float32 or float64 parameters). The error
is relative to ‖H‖‖v‖, not to ‖Hv‖: a vector that H nearly annihilates gets a product whose
relative error is larger. Measured: ‖FD − Hv‖/(u^(2/3)·‖H‖₂‖v‖) was 0.1–0.5 on small tanh,
softplus and cross-entropy MLPs, 2.5 with train-mode BatchNorm, 10 on a tied embedding, in
float64 and float32 alike, for random directions; the tests assert :data:`ACCURACY` = 100
(tests/derivatives/test_finite_difference.py).

**Two steps, and what they say.** The default's assumption fails where it matters most: along
the top eigenvector of a float32 transformer the loss is far from quadratic at that step (a
tiny GPT-2: λ_max 18.6 against 26.4, the product 3·10⁴ times the bound above), and where
embeddings dominate ‖θ‖ float32 gradients are too noisy for any step (the 2M causal transformer
of ``benchmarks/scale.py``: at best 14% of ‖H‖ along its top eigenvector) — both were silent. So
each product takes the difference D at two steps, ε and ε/2, and returns their Richardson
extrapolation (4·D(ε/2) − D(ε))/3, whose ε² term cancels. Its error is estimated by the gap
‖D(ε) − D(ε/2)‖ (the error of D(ε/2), truncation and rounding alike) or, once the step has been
halved, by how far the extrapolation moved from the previous pair's if that is less (where
truncation dominates the extrapolation is far better than D(ε/2)); an estimate, not a bound —
0.6–1.3 times the true error where rounding dominates, conservative where truncation does. While
it exceeds :data:`TARGET` times the operator's scale (the largest ‖Hv‖/‖v‖ returned), the step
is halved, up to :data:`HALVINGS` times, until halving stops helping (see :class:`_Search`: a
gap that grows as rounding's does, 1/ε, near rounding's expected level, or fails twice to halve
once it has shrunk, or five halvings without a better estimate; a gap that grows far above
rounding's level together with the product is a step so large that the gradient's change
saturates, and halving goes on); the best pair wins, and the next product starts near the step
it took (:data:`STEP_GROWTH`). A product costs four gradient passes, more
where the step shrinks; ``fd_eps`` is where the step starts. Every rank takes the same steps:
the differences are summed over the ranks (or reduced by the engine) before a step is decided,
and a loss that fails on one rank (not finite, not a scalar) stops every rank at once
(``distributed.together``) rather than leaving the others in the engine's next collective.
Each estimate is kept (``Curvature.product_errors``): ``cs.eigenvalues`` adds it to its
``errors`` and is not converged when it exceeds tol/2 (a diagnosis is then not confident, and
says why), and ``C.notes`` states the largest. The GPT-2 above now gets λ_max within 1e-6; the
2M transformer's λ_max (0.9% off) is reported as not accurate to 1e-3, its products' errors
estimated at up to 0.13·‖H‖, with the fix: float64 parameters or an exact backend
(tests/derivatives/test_fd_transformers.py).

**Kinks.** All this assumes a loss smooth along the segment θ ± εv. Through ReLU, max pooling
or other piecewise-linear pieces, a unit that changes sides within the step adds its gradient's
jump, divided by 2ε, to the difference; the exact backends differentiate one piece and never
see it. In float64 (a relative step of 6e-6) few units change sides and the products agree with
the exact ones to the accuracy above on this project's ReLU test models; in float32 (4.9e-3)
the error was up to 0.1·‖H‖‖v‖ on a small ReLU transformer and 1·‖H‖‖v‖ on a ReLU MLP with
BatchNorm, for some directions. For such models use float64 parameters, or smooth activations
(GELU, SiLU, softplus, tanh: the common ones in today's transformers), or a smaller ``fd_eps``
(measured: 1e-3 there gave errors near 1e-5·‖H‖‖v‖).

**Steps the forward does not see.** All this also assumes the forward computes with θ ± εv
as stored. One that computes in a narrower dtype (FSDP2's ``MixedPrecisionPolicy`` with a
bfloat16 ``param_dtype``, a layer that casts its weights, quantized weights) rounds a step
below that dtype's resolution away: the two gradients are then the same to the bit, every
difference is exactly 0, and so is the product's estimated error — FSDP2 under a bfloat16
policy gave λ_max 0 "converged" for 1.857. FSDP2 policies narrower than the parameters are
refused (:func:`_check_precision`); for the rest, a product whose differences are all exactly
zero takes one more at a step where the loss, by its slope along v, must move by a thousand
times its rounding (:meth:`FiniteDifferenceProducts._unseen`): if it moved and the gradient
stayed the same to the bit (a piecewise-linear loss: L1, hinge) — or the loss has no slope
along v (a parameter it does not use) — 0 is exact; if the loss did not move, or the gradient
changed, the zero was the forward's and the product's error is unknown (inf: not converged, not
confident).

Because ε scales as 1/‖v‖, the perturbation εv does not depend on the length of v, only on its
direction and on the step the products before it settled on: the product of 2v is twice that of
v, and sums and symmetry hold, within the accuracy above.

**The model, as found.** Every evaluation sets each selected parameter from a kept copy
(θ₀ + εv is computed from θ₀, never θ + εv − εv) through ``.data``, so its autograd version
counter does not move (a graph the user holds stays valid), and after the product — also when
the loss or the engine raises — the copy is copied back: the parameters are bit-for-bit as
found. ``.grad`` of every parameter is the user's tensor again (ours are discarded), every
buffer (BatchNorm's running statistics, which a train-mode forward updates) is restored before
each evaluation and after the last, the training flags are never switched, and the global RNG
is seeded per batch (dropout: the same masks for θ + εv and θ − εv, and as the exact backends
draw them) and restored.

**Ranks.** Plain parameters (one process, or DDP — curvscope differentiates the unwrapped
module, whose backward does not all-reduce): each rank's gradients are local and the product is
summed over the operator's process group, as for the exact backends. ``DTensor`` parameters
(FSDP2's ``fully_shard``, HSDP on a 2-D (replicate, shard) mesh): the engine itself reduces the
gradients over its data-parallel ranks (reduce-scatter over the shard dimension, all-reduce
over the replicate dimension), dividing their sum by its gradient divide factor (the number of
data-parallel ranks, shard × replicate, unless ``set_gradient_divide_factor`` changed it); each
rank's loss is multiplied by that factor so that the engine's result is the sum over the ranks,
weighted by their sample counts, and the sharded gradient is gathered (``full_tensor``) into
the flat product every rank holds. Tensor parallelism (``parallelize_module``, no FSDP2): the
ranks hold the same batches and compute one loss together; the gradient of each shard is that
loss's, nothing is summed over the ranks, so each rank's loss has weight 1, the sample count is
one rank's (:func:`replicas`) and the loss is not summed over the ranks either. Plain
parameters next to tensor-parallel ones (a layer left unparallelized) have the same full
gradient on every rank. FSDP2 and tensor parallelism on one mesh (2-D FSDP × TP) is refused
(untested). DeepSpeed ZeRO-3 (the engine ``deepspeed.initialize`` returns, passed as the model):
θ₀ + εv is written into each rank's partition of the parameters (and into the persistent ones
the engine keeps gathered), the gradient is the engine's ``engine.backward``, which averages
over the ranks — so each rank's loss is multiplied by their number, as for FSDP2's divide
factor — and is read from this rank's partitions of it; the engine's gradient partitions and
micro-step counter are put back with the parameters (:mod:`curvscope.derivatives.zero3`). Its
gradients are float32 even for float64 parameters: the step and the accuracy are float32's.
A Curvature's flat vectors are full length on every rank; its ``sharded()`` view
(:mod:`curvscope.derivatives.sharded`) takes this rank's entries of each vector only
(``matmat(..., local=True)`` here: the shards set and read without gathering, and a sum over
their entries — a norm — reduced over :func:`shard_group`: the operator's group, or HSDP's
shard dimension, whose replicas hold the same entries).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from curvscope.derivatives import zero3
from curvscope.derivatives.checks import callers_level
from curvscope.derivatives.distributed import all_reduce_sum, check_same_on_ranks, together
from curvscope.derivatives.objective import (
    Batch,
    ModelObjective,
    attributes_as_found,
    few,
    plain_tensors,
    storage_of,
    walk_graph,
)

#: The estimated error a product aims below, relative to ‖v‖ times the operator's scale (the
#: largest ‖Hv‖/‖v‖ seen): the step is halved until the two steps' difference says so.
TARGET = 1e-4
#: At most this many halvings of the step a product.
HALVINGS = 8
#: A gap that grows like rounding's counts as rounding only within this factor of the rounding
#: level expected at that step (u·(‖∇L‖ + scale·‖θ‖)/(ε‖v‖)); far above it, a gap that doubles
#: with each halving is a step so large that the gradient's change saturates (D ∝ 1/ε).
ROUNDING_LEVEL = 100.0
#: Halvings in a row that may fail to improve the best estimate before the search ends: a
#: step too large for the Taylor series can take four to turn the corner (measured), noise that
#: grows more slowly than rounding never does.
PATIENCE = 5
#: A gap that grows by this factor when the step is halved is rounding's (which grows as 1/ε:
#: a factor of 2), not a step too large for the Taylor series.
ROUNDING_GROWTH = 1.8
#: A product starts at this multiple of the last product's accepted step (at most the default),
#: so that a Lanczos run pays a small step's halvings once, and can grow back.
STEP_GROWTH = 4.0

#: Where every difference of a product is exactly zero, one more is taken at the step where
#: the loss's slope along v, 2ε|∇L·v|, is this many times its rounding u·|L| — a change the
#: loss shows if the forward sees the step (:meth:`FiniteDifferenceProducts._unseen`) ...
UNSEEN_LEVEL = 1000.0
#: ... and that step is at most this share of ‖θ‖ (the relative step ‖εv‖/‖θ‖).
UNSEEN_LARGEST = 0.1

#: The backend's name in ``Curvature(..., backend=...)``.
BACKEND = "finite_difference"
#: The accuracy the tests assert, for a smooth loss (see the module's docstring; measured up to
#: 10): ‖FD product − Hv‖ ≤ ACCURACY·u^(2/3)·‖H‖₂‖v‖, u the parameters' dtype's unit roundoff.
ACCURACY = 100.0

try:  # torch.distributed is optional in torch builds
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover - a torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = Shard = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]


def _moving_parts(model: nn.Module, params: Mapping[str, Tensor]) -> list[str]:
    """The model's modules whose forward computes from the selected ``params`` something that
    moves with every evaluation: an embedding's ``max_norm`` (torch renormalizes the rows a batch
    reads in place) and spectral norm in train mode (a power iteration on the weight it is
    given). One whose weight is not selected (frozen, or left out by ``params=``) is never
    perturbed: not one of them (a review: a frozen max_norm table was refused)."""
    from torch.nn.utils.parametrizations import _SpectralNorm
    from torch.nn.utils.parametrize import ParametrizationList
    from torch.nn.utils.spectral_norm import SpectralNorm

    selected = {id(p) for p in params.values()}
    found = []
    for name, m in model.named_modules():
        where = name or "the model"
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None:
            if id(m.weight) in selected:
                found.append(f"{where} (max_norm={m.max_norm:g})")
        elif isinstance(m, ParametrizationList) and id(m.original) in selected:
            if any(
                isinstance(f, _SpectralNorm) and f.training and f.n_power_iterations > 0 for f in m
            ):
                found.append(f"{where} (spectral norm in train mode)")
        elif m.training and any(isinstance(h, SpectralNorm) for h in m._forward_pre_hooks.values()):
            hooks = [h for h in m._forward_pre_hooks.values() if isinstance(h, SpectralNorm)]
            if any(id(getattr(m, h.name + "_orig")) in selected for h in hooks):
                found.append(f"{where} (spectral norm in train mode)")
    return found


def _check_steady_forward(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    """Refuse a model whose forward evaluated at θ ± εv is not the loss at θ ± εv
    (:func:`_moving_parts`): its differences were of another function — an embedding with
    ``max_norm`` 43% off the exact operator and not symmetric, spectral norm 0.3% (an outside
    review), beyond the accuracy promised and not seen by the products' error estimates."""
    moving = _moving_parts(model, params)
    if moving:
        raise ValueError(
            f"backend='finite_difference' differences gradients at θ ± εv, but {few(moving)} "
            "compute from the parameters something that moves with each evaluation "
            "(max_norm renormalizes the perturbed rows in place; spectral norm in train mode "
            "runs a power iteration on the perturbed weight), so the differences are of "
            "another function; use backend='double_backward' (exact), or measure with "
            "max_norm=None and the spectral-norm modules in eval mode"
        )


def check_dtype(dtype: torch.dtype) -> None:
    """Refuse parameters too narrow to difference (bfloat16, float16), with the fix."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(
            "backend='finite_difference' needs float32 or float64 parameters: a difference "
            f"of two {dtype} gradients keeps about two significant digits. Measure a float32 "
            "copy (model.float()), or use an exact backend, which multiplies in the "
            "parameters' dtype"
        )


def default_step(dtype: torch.dtype) -> float:
    """The default relative step u^(1/3) for parameters of ``dtype`` (u its unit roundoff):
    about 6.1e-6 for float64, 4.9e-3 for float32.

    Example:
        >>> round(default_step(torch.float32), 5)
        0.00492
    """
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


def check_fd_eps(fd_eps: object, backend: str, kind: str) -> float | None:
    """Validate ``fd_eps`` (the relative step ‖εv‖/‖θ‖) against the backend and the kind."""
    if backend != BACKEND:
        if fd_eps is not None:
            raise ValueError(
                f"fd_eps sets the step of backend='finite_difference', but backend={backend!r}; "
                "pass backend='finite_difference' too, or leave fd_eps=None"
            )
        return None
    if kind != "hessian":
        raise ValueError(
            f"backend='finite_difference' differences gradients, which gives Hessian products "
            f"only; kind={kind!r} is a product of Jacobians. Use kind='hessian' with "
            f"backend='finite_difference', or keep kind={kind!r} with backend='auto'"
        )
    if fd_eps is None:
        return None
    if isinstance(fd_eps, bool) or not isinstance(fd_eps, numbers.Real):
        raise TypeError(
            f"expected fd_eps to be a number (the step relative to ‖θ‖, e.g. 1e-3) or None "
            f"(chosen from the dtype), got {type(fd_eps).__name__}"
        )
    value = float(fd_eps)
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(
            f"fd_eps is the step relative to the parameters' norm and must lie in (0, 1), got "
            f"{fd_eps!r}; leave fd_eps=None for the default eps(dtype)^(1/3)"
        )
    return value


@dataclass(frozen=True)
class _Engine:
    """How the gradients a backward pass leaves in ``.grad`` relate to the ranks' losses."""

    #: the engine's gradients (DTensor parameters, or any of a tensor-parallel model's): gathered
    #: where sharded, never summed over the ranks by us
    sharded: bool
    #: each rank's loss is multiplied by this (the engine divides the ranks' sum by it)
    loss_scale: float
    #: how many ranks of the group hold each sample: the tensor-parallel ranks, which pass the
    #: same batches (1: every rank its own shard of the data)
    replicas: int = 1
    #: a DeepSpeed ZeRO-3 engine: where its partitions are set and read (:mod:`.zero3`)
    zero3: zero3.Zero3 | None = None


def local_shapes(params: Iterable[Tensor]) -> list[torch.Size]:
    """The shapes of this rank's shards of the parameters (a DTensor's local tensor, a ZeRO-3
    parameter's partition without its padding, flat; a plain tensor whole), in order: the
    layout of the local part of a flat vector."""
    params = list(params)
    if params and zero3.is_partitioned(params[0]):
        spans = zero3.Partitions.spans_of(params)
        return [torch.Size([hi - lo]) for lo, hi in spans]
    return [(p.to_local() if zero3.is_dtensor(p) else p).shape for p in params]


def shard_of(full: Tensor, like: Tensor) -> DTensor:
    """This rank's shard of a full block laid out like the DTensor ``like``, as a DTensor; no
    communication (every rank holds the full block)."""
    assert zero3.is_dtensor(like)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def from_shard(local: Tensor, like: Tensor) -> DTensor:
    """This rank's shard ``local`` as a DTensor laid out like ``like`` (no communication)."""
    assert zero3.is_dtensor(like)
    return DTensor.from_local(
        local,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def split_local(v: Tensor, params: Iterable[Tensor]) -> list[Tensor]:
    """The local part of a flat vector as one block per parameter shard."""
    shapes = local_shapes(params)
    parts = v.split_with_sizes([math.prod(s) for s in shapes])
    return [t.reshape(s) for t, s in zip(parts, shapes, strict=True)]


def shard_group(params: Iterable[Tensor], group: Any) -> Any:
    """The process group over whose ranks this rank's shards partition the parameters: the
    group a sum over the entries of a sharded vector (this rank's entries of each parameter,
    :func:`local_shapes`) reduces over. ``group`` itself for FSDP2 over one mesh dimension and
    for DeepSpeed ZeRO-3 (partitioned over all its ranks); for HSDP — DTensors on a 2-D
    (replicate, shard) mesh, placed ``Replicate()`` on one dimension and ``Shard`` on the
    other — the shard dimension's group: the ranks of one replica, which hold each entry once
    (a sum over all the ranks would count it once per replica). Any other layout: ``group``
    (the sharded view refuses it). No communication: the mesh made its groups."""
    hsdp = _hsdp(params, group)
    return group if hsdp is None else hsdp[0].get_group(hsdp[1])


def replica_group(params: Iterable[Tensor], group: Any) -> Any:
    """HSDP's replicate dimension's group — the ranks that hold the same shard, and must hold
    the same entries of every sharded vector — or None for any other layout."""
    hsdp = _hsdp(params, group)
    return None if hsdp is None else hsdp[0].get_group(hsdp[2])


def _hsdp(params: Iterable[Tensor], group: Any) -> tuple[Any, int, int] | None:
    """(mesh, shard dimension, replicate dimension) of DTensors on HSDP's 2-D mesh (placed
    ``Shard`` on one dimension and ``Replicate()`` on the other); None for any other layout."""
    first = next((p for p in params if zero3.is_dtensor(p)), None)
    if first is None or group is None or first.device_mesh.ndim != 2:
        return None
    dims = [i for i, pl in enumerate(first.placements) if type(pl) is Shard]
    kept = [i for i, pl in enumerate(first.placements) if type(pl) is Replicate]
    if len(dims) != 1 or len(kept) != 1:
        return None
    return first.device_mesh, dims[0], kept[0]


def _data_parallel(model: nn.Module) -> tuple[int, float] | None:
    """FSDP2's data-parallel ranks (shard × replicate: HSDP's 2-D mesh counts both) and what it
    divides their summed gradients by — its ``set_gradient_divide_factor`` where one was set
    (read from its state), else that number of ranks; None for a model FSDP2 does not manage."""
    sizes: set[int] = set()
    factors: set[float] = set()
    for m in model.modules():
        state_of = getattr(m, "_get_fsdp_state", None)
        if state_of is None:
            continue
        state = state_of()
        _check_precision(m, getattr(state, "_mp_policy", None))
        _check_modes(state)
        for group in getattr(state, "_fsdp_param_groups", ()):
            info = group.mesh_info
            size = getattr(info, "shard_mesh_size", 1) * getattr(info, "replicate_mesh_size", 1)
            factor = getattr(group, "gradient_divide_factor", None)
            sizes.add(size)
            factors.add(float(size) if factor is None else float(factor))
    if len(factors) > 1 or len(sizes) > 1:
        raise ValueError(
            "the model's FSDP modules divide their gradients by different factors "
            f"({sorted(factors)}) or shard over meshes of different sizes ({sorted(sizes)}); "
            "finite-difference products need one: shard every module over the same mesh, and "
            "call set_gradient_divide_factor with the same factor on every module, or not at all"
        )
    return (sizes.pop(), factors.pop()) if sizes else None


def _check_precision(module: nn.Module, policy: Any) -> None:
    """Refuse an FSDP2 ``MixedPrecisionPolicy`` that computes, reduces or returns in a dtype
    narrower than the parameters' (bfloat16 for float32 parameters): the forward then sees
    θ ± εv rounded to it, and a step below its resolution vanishes — measured on a float32 MLP
    under ``param_dtype=torch.bfloat16``: products 13–89% of ‖H‖‖v‖ off, two of three
    estimated exact, λ_max 0 reported converged (the differences were exactly zero)."""
    dtype = next((p.dtype for p in module.parameters()), None)
    if policy is None or dtype is None:
        return
    for field in ("param_dtype", "reduce_dtype", "output_dtype"):
        narrow = getattr(policy, field, None)
        if narrow is None or not narrow.is_floating_point:
            continue
        if torch.finfo(narrow).eps > torch.finfo(dtype).eps:
            raise ValueError(
                f"backend='finite_difference' cannot measure this FSDP2 model: its "
                f"MixedPrecisionPolicy has {field}={narrow}, narrower than its {dtype} "
                "parameters, so the gradients it differences see θ ± εv rounded to "
                f"{narrow}, and a step below its resolution vanishes. Measure "
                "the same weights in a model sharded by fully_shard(..., "
                "mp_policy=MixedPrecisionPolicy()) (its shards are in the parameters' dtype "
                "already: load the state dict into it)"
            )


#: FSDP2's switches for a gradient accumulation in progress, which a product must not run under:
#: (where the switch is: the state's context or each parameter group, its attribute, the setter
#: that turned it off, what a product's backward would do under it)
_MODES = (
    (
        "context",
        "is_last_backward",
        "set_is_last_backward",
        "skip finalizing its gradients (measured: λ_max 0.58 for 1.85, reported converged, and "
        "the user's next gradient changed)",
    ),
    (
        "group",
        "reduce_grads",
        "set_requires_gradient_sync",
        "add its gradient to the unsharded one being accumulated for the user's step",
    ),
    (
        "group",
        "all_reduce_grads",
        "set_requires_all_reduce",
        "leave its gradient unreduced over HSDP's replicas",
    ),
    (
        "group",
        "reshard_after_backward",
        "set_reshard_after_backward",
        "keep the parameters it set unsharded for the user's next forward",
    ),
)


def _check_modes(state: Any) -> None:
    """Refuse, before any pass, an FSDP2 model in the middle of a gradient accumulation: one of
    the switches of :data:`_MODES` turned off. Found by an outside review: with
    ``set_is_last_backward(False)`` left on, λ_max came out 0.58 for 1.85, converged; with
    ``set_requires_gradient_sync(False)`` the error came after the product's backward had been
    added to the user's accumulated gradient."""
    holders = {
        "context": [getattr(state, "_state_ctx", None)],
        "group": list(getattr(state, "_fsdp_param_groups", ())),
    }
    for where, attribute, setter, consequence in _MODES:
        if any(getattr(h, attribute, True) is False for h in holders[where]):
            raise ValueError(
                f"backend='finite_difference' cannot measure this FSDP2 model now: "
                f"{setter}(False) is in effect, under which a product's backward would "
                f"{consequence}. Measure once the step's last backward is done and "
                f"{setter}(True) is back (after the optimizer step)"
            )


def _engine(model: nn.Module, params: Mapping[str, Tensor], group: Any) -> _Engine:
    partitions = zero3.find(model, list(params.values()), group)
    if partitions is not None:  # the engine averages the ranks' gradients
        return _Engine(True, partitions.loss_scale, 1, partitions)
    sharded = [zero3.is_dtensor(p) for p in params.values()]
    fsdp = _data_parallel(model)
    first = next((p for p in params.values() if zero3.is_dtensor(p)), None)
    if first is None and fsdp is None:  # plain parameters of a tensor-parallel model too
        first = next((p for p in model.parameters() if zero3.is_dtensor(p)), None)
    if first is None:
        return _Engine(False, 1.0)
    import torch.distributed as dist

    assert zero3.is_dtensor(first)
    ranks = first.device_mesh.size()
    ours = 1 if group is None else dist.get_world_size(group)
    if ranks != ours:
        raise ValueError(
            f"the model's parameters are sharded over {ranks} ranks, but the Curvature reduces "
            f"over {ours}; build it in the same process group as the model (group=None uses "
            "the default group) so that each rank passes its own shard of the data"
        )
    if fsdp is None:  # tensor parallelism alone: every rank the same batches, the same loss
        return _Engine(True, 1.0, ranks)
    if not all(sharded):
        plain = [k for k, s in zip(params, sharded, strict=True) if not s]
        raise ValueError(
            f"some selected parameters are sharded (DTensor) and others not ({plain[:3]}): "
            "apply fully_shard to the root module too (fully_shard(model)), or select one kind "
            "with params="
        )
    size, factor = fsdp
    if size != ranks:
        raise ValueError(
            f"the model's parameters are laid out over {ranks} ranks of which FSDP2 reduces "
            f"the gradients over {size}: FSDP2 with tensor parallelism on one mesh (2-D FSDP × "
            "TP) is not supported by backend='finite_difference' (its weighting is untested): "
            "measure a copy parallelized by fully_shard alone (FSDP2 or HSDP), or by "
            "parallelize_module alone"
        )
    return _Engine(True, factor)


def replicas(objective: ModelObjective, group: Any) -> int:
    """How many ranks of ``group`` hold each of the objective's samples: the tensor-parallel
    ranks of a model parallelized by ``parallelize_module`` alone (they pass the same batches),
    else 1. The operator's sample count is the ranks' sum divided by this."""
    return _engine(objective.model, objective.params, group).replicas


class _Kept:
    """The model's mutable state, kept on entry and put back by :meth:`restore`: the selected
    parameters' values (a copy), every parameter's ``.grad`` (the tensor objects) and every
    buffer (object and values); for a ZeRO-3 engine its partitions and gradient state
    (:class:`.zero3.Zero3State`), whose ``values`` are this rank's entries of θ₀."""

    def __init__(self, model: nn.Module, params: Mapping[str, Tensor], engine: _Engine) -> None:
        self.params = list(params.values())
        self.zero3 = None if engine.zero3 is None else engine.zero3.keep()
        if self.zero3 is None:
            self.values = [p.detach().clone() for p in self.params]
        else:
            self.values = self.zero3.zero3.values(self.zero3)
        self.all_params = list(model.parameters())
        self.grads = [p.grad for p in self.all_params]
        # and the tensors held as plain attributes: a forward that updated one (a running
        # statistic kept as self.scale) moved it at every evaluation, two products of one
        # vector 86% apart (a review) — not an engine's (sharded: its own), nor a view of θ
        plain = not engine.sharded and self.zero3 is None
        weights = _storages(model) if plain else set()
        self.buffers = []  # (where it is held, its name, the tensor, its values)
        # and every other attribute and hook, put back with them: a forward that grows a table
        # and the length beside it (a rotary cache) had the table put back and not the length,
        # and the next pass failed on the two, leaving the user's model so (the diff review)
        self.attributes = attributes_as_found(model) if plain else None
        for m in model.modules():
            self.buffers += [
                (m._buffers, name, b, None if b is None else b.detach().clone())
                for name, b in m._buffers.items()
            ]
            self.buffers += [
                (vars(m), key, t, t.detach().clone())
                for key, t in (plain_tensors(m) if plain else ())
                if t.numel() == 0 or storage_of(t) not in weights
            ]

    def restore_modules(self) -> None:
        """Every module as found: its attributes and hooks (a plain model's), its buffers and
        plain tensors."""
        if self.attributes is not None:
            self.attributes()
        for holder, name, b, value in self.buffers:
            if holder.get(name) is not b:  # reassigned by the forward
                holder[name] = b
            if b is not None and value is not None:
                if b.shape == value.shape:
                    b.data.copy_(value)
                else:  # resized in place by the forward (an observer's first min/max, a
                    b.data = value.clone()  # lazily sized buffer): copy_ raised, half restored

    def clear_grads(self) -> None:
        if self.zero3 is not None:
            self.zero3.zero3.clear_grads()
        for p in self.all_params:
            p.grad = None

    def restore(self) -> None:
        if self.zero3 is not None:
            self.zero3.restore()
        else:
            for p, value in zip(self.params, self.values, strict=True):
                p.data.copy_(value)  # .data: no version-counter bump, bit for bit
        for p, g in zip(self.all_params, self.grads, strict=True):
            p.grad = g
        self.restore_modules()


def _storages(model: nn.Module) -> set[int]:
    """Where the model's plain parameters' memory starts (a tensor that shares it is a view)."""
    return {
        storage_of(p)
        for p in model.parameters()
        if p.numel() and p.layout == torch.strided and not zero3.is_dtensor(p)
    }


def _check_aliases(model: nn.Module, params: Mapping[str, Tensor], engine: _Engine) -> None:
    """Refuse a selected plain parameter whose memory another parameter of the model shares
    (``dec.weight = nn.Parameter(enc.weight.data.t())``, a tie by storage rather than by one
    Parameter): θ ± εv is written into the parameters' memory, so a step along one moves the
    other too, which the exact backends hold fixed (an outside review: products 56% off,
    estimated exact; λ_max 0.503 for 0.519, converged)."""
    if engine.sharded or engine.zero3 is not None:
        return
    # groups of parameters whose memory overlaps: one sweep over their spans, sorted
    spans = sorted(
        (p.device.type, p.device.index or 0, *_span(p), name)
        for name, p in model.named_parameters()
        if not zero3.is_dtensor(p) and p.numel() > 0
    )
    groups: list[list[str]] = []
    end, where = -1, None
    for kind, index, lo, hi, name in spans:
        if (kind, index) == where and lo < end:
            groups[-1].append(name)
        else:
            groups.append([name])
            where = (kind, index)
            end = hi
        end = max(end, hi)
    selected = set(params)
    for shared in groups:
        if len(shared) > 1 and selected.intersection(shared):
            key = next(n for n in shared if n in selected)
            raise ValueError(
                f"parameters {shared} are different Parameters sharing memory, and {key!r} is "
                "selected: backend='finite_difference' writes θ ± εv into the parameters' "
                "memory, so a step along one would move the others too. Tie them as one "
                "Parameter (dec.weight = enc.weight), leave all of them out with params=, or "
                "use an exact backend, which treats them as separate parameters"
            )


def _estimate(gap: float, moved: float, apart: Tensor, change: Tensor) -> tuple[float, Tensor]:
    """A pair's error estimate and its vector: the gap ‖D(ε) − D(ε/2)‖ (``apart``), D(ε/2)'s
    error — or, where less, how far the extrapolation moved since the previous pair
    (``moved``, ``change``; NaN for the first pair), which bounds the extrapolation's, far
    smaller where truncation dominates (its ε² term cancels), rounding of both included."""
    gap = gap if math.isfinite(gap) else math.inf
    if math.isfinite(moved) and moved < gap:
        return moved, change
    return gap, apart


def _hooked(params: Mapping[str, Tensor]) -> list[str]:
    """A note, and a warning, for selected parameters with gradient hooks of their own
    (``p.register_hook``: a gradient scaled, clipped or masked per parameter). The differences
    are of the gradient as those hooks leave it, where the exact backends differentiate the
    loss itself (an outside review: a hook scaling by 0.1 gave products 52–56% off the exact
    ones, estimated exact, and an asymmetric operator)."""
    hooked = [k for k, p in params.items() if getattr(p, "_backward_hooks", None)]
    if not hooked:
        return []
    note = (
        f"parameters {few(hooked)} have gradient hooks (Tensor.register_hook): the finite "
        "differences are of the gradient as the hooks leave it, not of the loss's — the exact "
        "backends ignore those hooks. Remove them while measuring, or use an exact backend"
    )
    warnings.warn(note, stacklevel=callers_level())
    return [note]


def _span(t: Tensor) -> tuple[int, int]:
    """The bytes a tensor's elements occupy, [first, past the last) (empty for no elements)."""
    start = t.data_ptr()
    if t.numel() == 0:
        return start, start
    extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) + 1
    return start, start + extent * t.element_size()


def _accumulate(params: list[Tensor], loss: Tensor, reentrant: bool) -> None:
    """``.grad`` += ∇loss for plain parameters, by ``torch.autograd.grad`` over them alone: a
    ``backward()`` also wrote ``.grad`` into every other leaf the loss reaches — inputs that
    require grad, a loss module's own parameters (a learnable temperature) — and ran the
    parameters' post-accumulate hooks (an optimizer stepped in backward); the exact backends
    touch neither (an outside review). A graph through torch's reentrant checkpointing
    (``reentrant``, :func:`.objective.walk_graph`), which ``torch.autograd.grad`` cannot go
    through, runs ``backward()``, the other leaves' ``.grad`` put back after it."""
    if reentrant:
        mine = {id(p) for p in params}
        others = [(t, t.grad) for t in walk_graph(loss).leaves if id(t) not in mine]
        try:
            loss.backward()
        finally:
            for t, g in others:
                t.grad = g
        return
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g


@dataclass
class _Search:
    """Whether halving the step of one product still helps, from the gaps ‖D(ε) − D(ε/2)‖ and
    the sizes of the pairs so far (see :meth:`FiniteDifferenceProducts._column`).

    It stops helping when the gap, having once halved with the step, twice fails to; when it
    grows as rounding's share does (×:data:`ROUNDING_GROWTH` a halving, as 1/ε) within
    :data:`ROUNDING_LEVEL` of rounding's expected level — twice; or after :data:`PATIENCE`
    halvings without a better estimate (noise that grows more slowly than rounding, √2 a
    halving on float32 transformers, never turns; a step still too large for the Taylor series
    does, after up to four on a tanh MLP's top direction). A gap that grows as fast together
    with the product, far above rounding's level, is a step so large that the gradient's change
    saturates (D ∝ 1/ε): halving goes on, and such a pair is never kept for its small gap."""

    previous: float | None = None  # the last pair's gap
    size: float = 0.0  # the last pair's ‖extrapolation‖/‖v‖
    stalled: int = 0  # halvings in a row that did not halve the gap, where that means rounding
    since_best: int = 0  # halvings in a row that did not improve the best estimate
    shrunk: bool = False  # the gap has halved with the step at least once
    saturating: bool = False  # the last pair was at a step far too large

    def halving_helps(self, gap: float, size: float, improved: bool, rounding: float) -> bool:
        previous, before = self.previous, self.size
        self.previous, self.size = gap, size
        if previous is None:
            return True
        grew = gap >= ROUNDING_GROWTH * previous
        # at a step far too large the gradient's change saturates: the difference, its gap and
        # the product all grow as 1/ε, far above rounding's level — smaller steps are the cure
        self.saturating = (
            grew and size >= ROUNDING_GROWTH * before and gap > ROUNDING_LEVEL * rounding
        )
        if gap <= previous / 2:
            self.shrunk, self.stalled = True, 0
        elif self.shrunk or (grew and gap <= ROUNDING_LEVEL * rounding):
            self.stalled += 1
        if improved:
            self.since_best = 0
        elif not self.saturating:
            self.since_best += 1
        return self.stalled < 2 and self.since_best < PATIENCE


class FiniteDifferenceProducts:
    """Hessian products of a :class:`ModelObjective` by central differences of the gradients
    its model's own backward pass computes (see the module's docstring for the step, the
    accuracy and what is restored).

    Args:
        objective: the model, loss and data.
        weight: a batch's weight in the loss (its share of all samples for a mean, 1 for a
            sum), known once the batch's loss has been taken.
        group: the process group the products are summed over (None: one process). With
            sharded parameters every rank must pass the same number of batches (checked).
        fd_eps: the relative step ‖εv‖/‖θ‖; None: :func:`default_step` of the dtype.
    """

    def __init__(
        self,
        objective: ModelObjective,
        weight: Callable[[Batch], float],
        group: Any = None,
        fd_eps: float | None = None,
    ) -> None:
        engine = _engine(objective.model, objective.params, group)
        #: the dtype the gradients are differenced in: the parameters', or a ZeRO-3 engine's
        #: gradients' where coarser (float32, for float64 parameters too)
        self.dtype = objective.dtype
        if engine.zero3 is not None and engine.zero3.gradient_dtype.itemsize < self.dtype.itemsize:
            self.dtype = engine.zero3.gradient_dtype
        check_dtype(self.dtype)
        self.obj, self.weight, self.group = objective, weight, group
        #: per selected parameter, an embedding's padding row (:func:`.objective.padding_rows`):
        #: its gradient is always 0 there, so a step along it would give P·H, not the exact
        #: backends' P·H·P (an outside review: 48% off, asymmetric, estimated exact)
        self._rows = [objective.padding.get(k) for k in objective.params]
        _check_aliases(objective.model, objective.params, engine)
        _check_steady_forward(objective.model, objective.params)
        #: whether the model's graph goes through reentrant checkpointing (:func:`_accumulate`)
        self._reentrant: bool | None = None
        #: what these products differ in from the exact backends' (``C.notes``)
        self.notes = _hooked(objective.params)
        #: the group a sum over this rank's entries of sharded vectors reduces over
        #: (:func:`shard_group`: HSDP's shard dimension; else ``group``) — the local path's
        #: norms here, and every sum of ``ShardedCurvature``, which takes it from here
        self.sum_group = shard_group(objective.params.values(), group)
        #: the relative step ‖εv‖/‖θ‖ a product starts at
        self.step = default_step(self.dtype) if fd_eps is None else float(fd_eps)
        resolution = float(torch.finfo(self.dtype).eps)
        if self.step < resolution:
            raise ValueError(
                f"fd_eps={fd_eps!r} is below the resolution of {self.dtype} "
                f"({resolution:.2g}): θ ± εv would round back to θ and the differences to "
                "rounding noise; leave fd_eps=None (eps(dtype)^(1/3)) or pass a larger step"
            )
        #: the relative step the last product accepted
        self.accepted = self.step
        #: the operator's scale: the largest ‖Hv‖/‖v‖ of the products returned so far (≤ ‖H‖)
        self.scale = 0.0
        #: each product's estimated error per unit of ‖v‖: ‖D(ε) − D(ε/2)‖/‖v‖ (inf: unknown)
        self.errors: list[float] = []
        #: with :attr:`keep_vectors`, the last block's estimated error vectors, one a column,
        #: per unit of its norm (‖e‖ is the column's entry of :attr:`errors`; inf where
        #: unknown, 0 for a zero column): what the compositions of an operator map to their
        #: own products' errors, and estimators read (``spectrum.Operator.last_errors``)
        self.error_vectors: list[Tensor] = []
        #: record :attr:`error_vectors` (set by an operator that reads them; a vector of the
        #: parameters' size a column, so not by default)
        self.keep_vectors = False
        #: products whose steps the model's forward did not see (:data:`SEEN_STEP`)
        self.unseen = 0
        if engine.replicas > 1:
            # tensor-parallel ranks compute one forward together: they pass the same batches
            try:
                check_same_on_ranks(
                    group,
                    device=objective.device,
                    num_batches=objective.num_batches,
                    num_samples=objective.num_samples,
                )
            except ValueError as e:
                raise ValueError(
                    f"the model is tensor-parallel over {engine.replicas} ranks, which compute "
                    "one forward together: every rank must pass the same batches, not a shard "
                    f"of the data each ({e})"
                ) from e
        elif engine.sharded:
            # every forward and backward of a sharded model is a collective: a rank with more
            # batches than another would wait for it forever
            check_same_on_ranks(group, device=objective.device, num_batches=objective.num_batches)

    # ------------------------------------------------------------------------- gradients
    def _outputs(self, batch: Batch) -> Any:
        """The model's own forward on the batch (hooks and all)."""
        obj = self.obj
        args, kwargs = obj.arguments(batch)
        out = obj.model(*args, **kwargs)
        return out if obj.adapter is None else obj.adapter.outputs(out)

    def _backward_pass(self, kept: _Kept, engine: _Engine) -> Tensor:
        """One pass over the data: Σ_b w_b ∇L_b (times the engine's scale) left in ``.grad``
        by ``backward()``; returns this rank's Σ_b w_b L_b."""
        kept.clear_grads()
        total: Tensor | None = None
        # in the parameters' dtype: under an autocast region (bfloat16) the differences would
        # be of bfloat16 gradients, which keep two digits (check_dtype); a model's own autocast
        # inside its forward stays on
        no_autocast = torch.autocast(self.obj.device.type, enabled=False)
        # a sharded engine's every forward and backward is a collective: the ranks agree on each
        # loss (finite, a scalar) before the backward, so that one rank's failure stops all
        group = self.group if engine.sharded else None
        for batch in self.obj.batches():
            # each forward from the model as found, as in the exact backends (put back once a
            # pass, a batch read what the one before it set: 21% off the exact operator with
            # a longer batch first, the diff review)
            kept.restore_modules()
            # the exact backends' seeds; fused kernels kept: first derivatives are all it needs
            with self.obj.context(batch.index, second_order=False), no_autocast:
                out = self._outputs(batch)
                loss = together(
                    partial(self.obj.loss, out, batch, at_copies=False), group, self.obj.device
                )
                w = self.weight(batch)
                scaled = loss * (w * engine.loss_scale)
                if engine.zero3 is not None:  # the engine's own: its reduce-scatter
                    engine.zero3.backward(scaled)
                elif engine.sharded:  # FSDP2's or tensor parallelism's hooks reduce
                    scaled.backward()
                else:
                    if self._reentrant is None:  # the model's graph, walked once
                        self._reentrant = walk_graph(scaled).reentrant
                    _accumulate(kept.params, scaled, self._reentrant)
            part = loss.detach() * w
            total = part if total is None else total + part
        assert total is not None  # the data is never empty (checked at construction)
        return total

    def _gradient(
        self, params: Mapping[str, Tensor], engine: _Engine, local: bool = False
    ) -> Tensor:
        """The flat gradient the last backward pass left: gathered where sharded, or with
        ``local`` this rank's shards of it (:func:`local_shapes`' order)."""
        if engine.zero3 is not None:
            return engine.zero3.gradient(local)
        parts, found = [], False
        for p in params.values():
            g = p.grad
            if g is None:
                like = p.to_local() if local and zero3.is_dtensor(p) else p
                parts.append(torch.zeros(like.shape, dtype=p.dtype, device=self.obj.device))
                continue
            found = True
            if zero3.is_dtensor(g):
                g = g.to_local() if local else g.full_tensor()
            parts.append(g)
        if not found:
            raise RuntimeError(
                "after loss.backward() no selected parameter has a .grad, so there is no "
                "gradient to difference: the engine did not produce one (FSDP2 with "
                "set_requires_gradient_sync(False)? re-enable gradient sync for the product)"
            )
        return self.obj.flatten(parts)

    def _theta_norm(self, values: list[Tensor], local: bool = False) -> float:
        """‖θ‖ over every rank's parameters (1 for θ = 0). With ``local`` (the shards partition
        θ over :attr:`sum_group`), one all-reduce of the shards' sum of squares over it;
        otherwise each DTensor's norm is reduced by DTensor (replicated entries once)."""
        sq = torch.zeros((), dtype=torch.float64, device=self.obj.device)
        for t in values:
            if local and zero3.is_dtensor(t):
                t = t.to_local()
            n = torch.linalg.vector_norm(t, dtype=torch.float64)
            if zero3.is_dtensor(n):
                n = n.full_tensor()
            sq = sq + n * n
        if local:
            sq = all_reduce_sum(sq.reshape(1), self.sum_group)[0]
        norm = math.sqrt(float(sq))
        return norm if norm > 0 else 1.0

    def _set(self, kept: _Kept, v: Tensor, eps: float, local: bool = False) -> None:
        """Parameters := θ₀ + εv, computed from the kept copy θ₀; with ``local``, v holds this
        rank's shards only (:func:`local_shapes`)."""
        blocks = split_local(v, kept.params) if local else self.obj.unflatten(v)
        if kept.zero3 is not None:
            kept.zero3.zero3.set(kept.zero3, blocks, eps, local)
            return
        for p, value, b, row in zip(kept.params, kept.values, blocks, self._rows, strict=True):
            if local:  # the shard as a DTensor laid out like p: adding it is local
                b = from_shard(b, p)
            elif zero3.is_dtensor(p):  # this rank's shard of the block, without communication
                b = shard_of(b, p)
            elif row is not None:  # an embedding's padding row stays: the operator is P·H·P
                b = b.clone()
                b[row] = 0
            p.data.copy_(value)
            p.data.add_(b, alpha=eps)

    # -------------------------------------------------------------------------- products
    def matmat(self, V: Tensor, local: bool = False) -> Tensor:
        """H V for an (n, k) block, each column by :meth:`_column`; summed over the ranks.
        With ``local`` (FSDP2), V and H V hold this rank's shards of the vectors only."""
        params = self.obj.params
        engine = _engine(self.obj.model, params, self.group)
        kept = _Kept(self.obj.model, params, engine)
        columns, self.error_vectors = [], []
        try:  # a ZeRO-3 engine's values are this rank's partitions: their norms are summed
            theta = self._theta_norm(kept.values, local or engine.zero3 is not None)
            norms = [float(x) for x in self._norms(V, self._entries(local))]
            for j, norm in enumerate(norms):
                v = V[:, j]
                if norm == 0.0:
                    columns.append(torch.zeros_like(v))
                    self.errors.append(0.0)  # exact: one entry a product, in order
                    if self.keep_vectors:
                        self.error_vectors.append(torch.zeros_like(v))
                    continue
                start = min(self.step, STEP_GROWTH * self.accepted) * theta / norm
                hv, eps = self._column(kept, engine, params, v, norm, start, local, theta)
                if not local:  # P·H·P: a row tied to another module has a gradient there
                    for block, row in zip(self.obj.unflatten(hv), self._rows, strict=True):
                        if row is not None:
                            block[row] = 0  # (a view of hv)
                self.accepted = eps * norm / theta
                columns.append(hv)
        finally:
            kept.restore()
        return torch.stack(columns, dim=1)  # summed over the ranks already (_difference)

    def _entries(self, local: bool) -> Any:
        """What a sum over a vector's entries reduces over: with ``local`` (this rank's shards
        of the vectors) :attr:`sum_group`; whole vectors: nothing (every rank holds them)."""
        return self.sum_group if local else None

    def _norms(self, V: Tensor, over: Any) -> Tensor:
        """The columns' norms, float64, their squares summed over the ranks of ``over`` (None:
        this rank's entries are the whole vectors)."""
        sq = V.pow(2).sum(dim=0, dtype=torch.float64)
        return all_reduce_sum(sq, over).sqrt()

    def _difference(
        self,
        kept: _Kept,
        engine: _Engine,
        params: Mapping[str, Tensor],
        v: Tensor,
        eps: float,
        local: bool,
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(∇L(θ + εv) − ∇L(θ − εv)) / (2ε) — two gradient passes; summed over the ranks where
        the engine does not (plain parameters under a process group), so that every rank holds
        the same difference and decides the same next step — ∇L(θ + εv) (this rank's), and
        this rank's losses at θ + εv and θ − εv."""
        diff, losses = [], []
        for sign in (1.0, -1.0):
            self._set(kept, v, sign * eps, local)
            try:
                losses.append(self._pass(kept, engine))
            except FloatingPointError as e:  # said where: at a step from the parameters
                raise FloatingPointError(
                    f"{e} — at θ {'+' if sign > 0 else '−'} εv, a finite-difference step of "
                    f"ε‖v‖ = {eps * float(v.norm()):.3g} from the parameters: where the loss is "
                    "finite at them, the step leaves its domain (a parameter near the edge of "
                    "a log or a square root); pass a smaller fd_eps, or use an exact backend"
                ) from e
            diff.append(self._gradient(params, engine, local))
        out = (diff[0] - diff[1]) / (2.0 * eps)
        return out if engine.sharded else all_reduce_sum(out, self.group), diff[0], losses

    def _pass(self, kept: _Kept, engine: _Engine) -> Tensor:
        """:meth:`_backward_pass`, its failure on one rank raised on every rank: per batch for a
        sharded engine (inside it), once for plain parameters under a group (whose ranks may
        pass different numbers of batches, and communicate only after the pass)."""
        if engine.sharded:
            return self._backward_pass(kept, engine)
        return together(lambda: self._backward_pass(kept, engine), self.group, self.obj.device)

    def _column(
        self,
        kept: _Kept,
        engine: _Engine,
        params: Mapping[str, Tensor],
        v: Tensor,
        norm: float,
        eps: float,
        local: bool,
        theta: float = 1.0,
    ) -> tuple[Tensor, float]:
        """One product and the step it used: the differences D(ε) and D(ε/2) extrapolated,
        (4·D(ε/2) − D(ε))/3 (Richardson: the ε² term of the truncation cancels), with the error
        estimate (:attr:`errors`, per unit of ‖v‖) the gap ‖D(ε) − D(ε/2)‖ — or, from the
        second pair on, how far the extrapolation moved from the previous pair's, if less. The
        step is halved while the estimate exceeds :data:`TARGET` times the operator's scale
        (:attr:`scale`, or this product's own size if larger), at most :data:`HALVINGS` times,
        and while halving helps (:class:`_Search`); the pair with the smallest estimate wins.
        Every rank takes the same steps: the differences it measures are the reduced ones."""
        wide, grad, _ = self._difference(kept, engine, params, v, eps, local)
        entries = self._entries(local)
        # rounding's share of a difference per unit of ‖v‖ at the step ε: about u·γ/(ε‖v‖), γ
        # the size of the gradient's terms — at least ‖∇L‖ + ‖H‖‖θ‖ (module docstring)
        u = float(torch.finfo(self.dtype).eps) / 2
        # (the same on every rank: summed over the ranks unless the engine gathered it whole —
        # plain parameters' gradients are this rank's, summed over the operator's group)
        over = self.group if not (local or engine.sharded) else self._entries(local)
        gamma = float(self._norms(grad[:, None], over)[0])
        # estimate, value, step, size, and the estimate's vector (‖·‖ = estimate·‖v‖)
        best: tuple[float, Tensor, float, float, Tensor] | None = None
        best_losses: list[Tensor] = []  # the losses at θ ± εv of the best pair's smaller step
        last: Tensor | None = None  # the previous pair's extrapolation
        search = _Search()
        for _ in range(HALVINGS + 1):
            narrow, _, losses = self._difference(kept, engine, params, v, eps / 2, local)
            value = (4.0 * narrow - wide) / 3.0
            change = value - (value if last is None else last)
            apart = wide - narrow
            gap, size, moved = (
                self._norms(torch.stack([apart, value, change], dim=1), entries) / norm
            ).tolist()
            estimate, error = _estimate(gap, moved if last is not None else math.nan, apart, change)
            rounding = u * (gamma + max(self.scale, size) * theta) / (eps / 2 * norm)
            improved = best is None or estimate < best[0]
            go_on = search.halving_helps(gap, size, improved, rounding)
            if improved or search.saturating:  # a saturated pair's small gap means nothing
                best, best_losses = (estimate, value, eps / 2, size, error), losses
            last = value
            if estimate <= TARGET * max(self.scale, size) or not go_on:
                break
            wide, eps = narrow, eps / 2
        assert best is not None
        estimate, value, eps, size, error = best
        # exactly zero at every step: a Hessian product of 0, or steps the forward did not see
        if size == 0.0 and estimate == 0.0:
            probe = partial(self._difference, kept, engine, params, v, local=local)
            largest = UNSEEN_LARGEST * theta / norm
            if self._unseen(probe, best_losses, grad, v, (over, entries), u, largest):
                estimate, error = math.inf, torch.full_like(v, math.inf)
                self.unseen += 1
        self.scale = max(self.scale, size if math.isfinite(size) else 0.0)
        self.errors.append(estimate)
        if self.keep_vectors:
            self.error_vectors.append(error / norm)
        return value, eps

    def _unseen(
        self,
        probe: Callable[[float], tuple[Tensor, Tensor, list[Tensor]]],
        losses: list[Tensor],
        grad: Tensor,
        v: Tensor,
        sums: tuple[Any, Any],
        u: float,
        largest: float,
    ) -> bool:
        """Whether a product whose differences were all exactly zero is of steps the model's
        forward did not see. A loss with no slope along v (a parameter it does not use) has a
        Hessian product of 0 indeed; otherwise one more difference (``probe(ε)``) at the step
        where the loss's slope, 2ε|∇L·v|, is :data:`UNSEEN_LEVEL` times its rounding u·|L|
        (at most ``largest``): a forward that sees the step moves the loss there, and a
        gradient constant along v (piecewise linear: L1, hinge, units that stay dead) stays
        the same to the bit — then 0 is exact; a loss the same to the bit, or a gradient that
        changed, says the zero was the forward's: of unknown accuracy. ``losses``: this rank's
        at θ ± εv of the zero pair; ``sums``: what a sum over ∇L's entries and over a
        difference's reduce over (as in :meth:`_column`)."""
        over, entries = sums
        slope = abs(float(all_reduce_sum((grad.double() @ v.double()).reshape(1), over)[0]))
        if slope == 0.0:
            return False
        level = abs(float(all_reduce_sum(losses[0].double().reshape(1), self.group)[0]))
        diff, _, (plus, minus) = probe(min(UNSEEN_LEVEL * u * level / (2 * slope), largest))
        moved = float(all_reduce_sum((plus != minus).double().reshape(1), self.group)[0])
        changed = float(self._norms(diff[:, None], entries)[0])
        return moved == 0.0 or changed != 0.0

    def relative_errors(self) -> list[float]:
        """:attr:`errors` relative to the operator's scale as it stands now."""
        return [e / self.scale if self.scale > 0 else e for e in self.errors]

    def loss_and_gradient(self, local: bool = False) -> tuple[float, Tensor]:
        """The loss and its flat gradient at θ, by the model's own backward; as found after.
        With ``local`` (FSDP2), this rank's shards of the gradient only (nothing gathered)."""
        params = self.obj.params
        engine = _engine(self.obj.model, params, self.group)
        kept = _Kept(self.obj.model, params, engine)
        try:
            loss = self._pass(kept, engine)
            grad = self._gradient(params, engine, local)
        finally:
            kept.restore()
        if engine.sharded:  # the engine reduced the gradient; the loss is this rank's
            total = float(all_reduce_sum(loss.reshape(1), self.group)[0])
            return total / engine.replicas, grad  # tensor-parallel ranks: one loss, held by all
        both = all_reduce_sum(torch.cat([grad, loss.reshape(1).to(grad.dtype)]), self.group)
        return float(both[-1]), both[:-1]
