"""The curvature operator: Hessian, Gauss-Newton, Fisher and empirical Fisher as a linear map.

``C = Curvature(model, loss_fn, data, kind=...)`` is the curvature of the mean loss over all the
samples in ``data``, never stored: ``C @ v`` multiplies by it at the cost of a few gradients.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from curvscope.derivatives import finite_difference as _fd
from curvscope.derivatives import kinds as _k
from curvscope.derivatives.checks import (
    FUNCTION_VECTOR,
    NonFiniteLoss,
    all_finite,
    check_dense_size,
    check_finite,
    check_int,
    check_point,
    check_vector,
)
from curvscope.derivatives.distributed import (
    all_reduce_sum,
    check_same_on_ranks,
    first_device,
    global_count,
    loss_signature,
    resolve_group,
    together,
    values_signature,
    world_size,
)
from curvscope.derivatives.functions import _grad_with_graph
from curvscope.derivatives.objective import Batch, ModelObjective, bindings_unchanged
from curvscope.derivatives.sharded import ShardedCurvature
from curvscope.derivatives.zero3 import check_backend


@dataclass(frozen=True)
class KindInfo:
    """What a kind of curvature is, and how its products are made: the one table of kinds.

    Attributes:
        name: the ``kind=`` spelling.
        psd: positive semi-definite (for losses convex in the outputs).
        formula: the matrix, in one line.
        prepare: its Preparer (``derivatives/kinds.py``): called with (objective, mc_samples)
            when an operator is built (and may refuse the loss there), it returns the function
            that prepares one batch's product.
        forward: a forward-over-reverse preparation of one batch's product, or None (the
            backends ``"forward_over_reverse"`` and ``"auto"`` choose between it and
            ``prepare``; only the Hessian has one).
        keeps_gradient: its prepared products keep the batch's loss and gradient graph (a
            :class:`~curvscope.derivatives.kinds.HessianProduct`): a cached operator reads
            ``loss_and_gradient()`` off them.
    """

    name: str
    psd: bool
    formula: str
    prepare: _k.Preparer
    forward: _k.PrepareBatch | None = None
    keeps_gradient: bool = False


#: Ways to compute a Hessian product: "auto" measures both on the first large block product
#: and keeps the faster (see MIN_TUNED_BLOCK); "finite_difference" differences the gradients
#: of the model's own backward pass (any engine, sharded models included; derivatives/
#: finite_difference.py).
BACKENDS = ("auto", "double_backward", "forward_over_reverse", _fd.BACKEND)
#: "auto" measures blocks of at least this many vectors. Smaller ones use double backward: the
#: vmapped pass gains little there, and once torch.func's forward-mode AD has run in a process,
#: later eager training steps run about 10% slower in torch 2.13 (measured on the digits MLP),
#: a cost that a Monitor's small warm-start blocks must not impose on the user's loop.
MIN_TUNED_BLOCK = 8

_T = TypeVar("_T")

#: Why "auto" takes double backward, untimed, for a model with a tied padding row.
TIED_PADDING_CHOICE = (
    "block products: double backward (an embedding's padding row is tied to another module: "
    "forward-over-reverse would leave the row out, P·H·P, where double backward keeps it)"
)

#: The kinds of curvature a model's loss has (name → what it is and how its products are made):
#: the only table of kinds. The exact Hessian is indefinite away from a minimum; the
#: Gauss-Newton family is PSD for convex losses. A new kind is its ``prepare_*`` in
#: ``kinds.py`` and an entry here.
KINDS: dict[str, KindInfo] = {
    "hessian": KindInfo(
        "hessian",
        False,
        "H = ∂²L/∂θ²",
        _k.per_batch(_k.prepare_hessian),
        forward=_k.prepare_hessian_forward,
        keeps_gradient=True,
    ),
    "ggn": KindInfo("ggn", True, "G = Jᵀ (∂²ℓ/∂f²) J", _k.per_batch(_k.prepare_ggn)),
    "fisher": KindInfo(
        "fisher",
        True,
        "F = E_{y~p(y|f)} Jᵀ ∇_f log p ∇_f log pᵀ J (Monte Carlo)",
        _k.fisher_preparer,
    ),
    "empirical_fisher": KindInfo(
        "empirical_fisher",
        True,
        "E = (1/T) Σ_t ∇ℓ_t ∇ℓ_tᵀ over the likelihood terms",
        _k.per_batch(_k.prepare_empirical_fisher),
    ),
}


class _FunctionSource:
    """A plain function f: R^n -> R at a point x, seen as a one-batch objective."""

    def __init__(self, f: Callable[[Tensor], Tensor], x: Tensor) -> None:
        self.f, self.x = f, check_point(x)
        self.num_params, self.dtype, self.device = x.numel(), x.dtype, x.device
        self.names = ["x"]
        self.notes: list[str] = []
        self.in_memory = True
        self.vector_words = FUNCTION_VECTOR  # what a vector's entries are, in errors

    def model_state(
        self,
    ) -> tuple[tuple[bool, ...], list[tuple[Any, ...]], list[tuple[str, Tensor]]]:
        return (), [], [("x", self.x)]

    def attribute_state(self) -> list[tuple[str, Tensor]]:
        return []

    def recomputation_kept(
        self, graph: int | None = None
    ) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def kernels(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def check_unchanged_data(self) -> None:
        """x is the model state here, compared by value (:meth:`model_state`)."""

    def weight(self, batch: Any) -> float:
        return 1.0

    def prepare(
        self, forward: bool = False, rebuilt: bool = False
    ) -> Iterator[tuple[float, _k.PreparedProduct]]:
        xl, g, y = _grad_with_graph(self.f, self.x)
        yield 1.0, _k.HessianProduct([xl], [g], y)

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        return [flat] if flat.ndim == 1 else [flat.T]

    def flatten(self, blocks: list[Tensor], batched: bool = False) -> Tensor:
        return blocks[0].T if batched else blocks[0]


class _ModelSource:
    """Prepares each batch's product for one kind of curvature of a :class:`ModelObjective`."""

    def __init__(
        self,
        objective: ModelObjective,
        kind: str,
        mc_samples: int,
        group: Any = None,
        replicas: int = 1,
    ) -> None:
        self.obj = objective
        self.group = group
        self.total = (  # no tensor (a host-device round trip) for a single process
            objective.num_samples
            if group is None
            # ``replicas`` ranks hold each sample (tensor parallelism): counted once
            else global_count(objective.num_samples, group, objective.device) / replicas
        )
        self.num_params, self.dtype, self.device = (
            objective.num_params,
            objective.dtype,
            objective.device,
        )
        self.names = objective.names
        self.notes = objective.notes
        self.in_memory = objective.in_memory
        self.unflatten, self.flatten = objective.unflatten, objective.flatten
        info = KINDS[kind]
        self._prepare = info.prepare(objective, mc_samples)  # may refuse the loss here
        self._forward = info.forward
        self.model_state, self.attribute_state = objective.model_state, objective.attribute_state
        self.recomputation_kept = objective.recomputation_kept
        self.kernels = objective.kernels
        self.check_unchanged_data = objective.check_unchanged_data

    def weight(self, batch: Batch) -> float:
        """A batch's weight in the operator: its share of all samples (over all ranks) for a
        mean-reduced loss, 1 for a summed one. Known once the batch's loss has been taken."""
        return batch.size / self.total if self.obj.reduction == "mean" else 1.0

    def prepare(
        self, forward: bool = False, rebuilt: bool = False
    ) -> Iterator[tuple[float, _k.PreparedProduct]]:
        """Each batch's weight and prepared product, in a pass over the data; ``rebuilt``: the
        pass rebuilds a kept operator's graphs after the model changed."""
        prepare = self._forward if forward and self._forward is not None else self._prepare
        self.obj.graphs_built(rebuilt)
        for batch in self.obj.batches():
            product = self.obj.rerun_on_recompute(prepare, self.obj, batch)
            yield self.weight(batch), product


class Curvature:
    """The curvature of the loss over a dataset, as a matrix-free linear operator.

    For parameters θ (all that require grad, or ``params=``) and a mean-reduced loss, the mean
    loss L(θ) = Σ_b (N_b/N) loss_fn(model(x_b; θ), y_b) over batches b of N_b samples (for
    torch's mean cross-entropy with class labels, N_b counts its labels less those at
    ``ignore_index``, weighed by ``weight=``: what its mean divides by); for a summed loss
    (``reduction="sum"``) the sum L(θ) = Σ_b loss_fn(model(x_b; θ), y_b). ``kind``:

    - ``"hessian"``: H = ∇²L, by Pearlmutter's double-backward product (exact).
    - ``"ggn"``: generalized Gauss-Newton Jᵀ H_out J, H_out the Hessian of the loss in the
      model's outputs (exact; PSD for a loss convex in the outputs: MSE, cross-entropy, BCE).
    - ``"fisher"``: the Fisher Jᵀ E[g gᵀ] J with labels sampled from the model's predictive
      distribution (``mc_samples`` per input, fixed by ``seed``, so the operator is fixed). For
      ``nn.MSELoss``, ``nn.CrossEntropyLoss`` and ``nn.BCEWithLogitsLoss``; its expectation is
      the GGN.
    - ``"empirical_fisher"``: (1/T) Σ_t ∇ℓ_t ∇ℓ_tᵀ with the true labels, over the same
      likelihood terms t as the Fisher (a class vector per sample or position for
      cross-entropy, each output entry for MSE and BCE; T the number the mean divides by, 1
      for a sum), so that with labels drawn from the model its expectation is the Fisher. For
      a loss without a known likelihood: the per-sample terms, (1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ.

    ``C @ v`` takes a flat vector of length ``C.num_params`` (the parameters' dtype and device,
    in the order of ``C.param_names``: ``model.named_parameters()`` order, or with ``params=``
    the order given there) or a block (num_params, k) and returns the same shape.
    The model is left exactly as found: parameters, ``.grad``, ``training`` flags, BatchNorm
    statistics, ``requires_grad`` and the global RNGs — torch's, numpy's, Python's (dropout
    masks and other draws are fixed per batch by ``seed``). Products use the parameters'
    current values: after an optimizer step, or any other change of a parameter or buffer
    (``p.data.add_()``, ``vector_to_parameters``, ``load_state_dict(..., assign=True)``),
    ``C`` is the curvature at the new point. Every pass
    over a loader sees the same batches in the same order (its shuffling and worker seeds are
    fixed from ``seed`` for the pass, the user's RNGs restored): ``C`` is one fixed matrix.

    Args:
        model: a ``torch.nn.Module`` (a ``DistributedDataParallel`` wrapper is unwrapped).
        loss_fn: ``loss_fn(outputs, targets)`` -> the batch loss, averaged or summed over the
            batch's samples.
        data: an ``(inputs, targets)`` pair, a list of pairs, or a ``DataLoader``.
        kind: ``"hessian"`` (default), ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
        params: parameters or parameter names to restrict to (that block of the curvature),
            laid out in flat vectors in the order given (``C.param_names``).
        seed: a non-negative integer; fixes dropout masks, the Fisher's sampled labels and a
            loader's shuffling.
        mc_samples: label samples per input for ``kind="fisher"``.
        cache: keep each batch's autograd graph between products (about one gradient per
            product instead of two; memory of one forward-backward graph per batch). Default:
            on for data held in memory (a pair or a list), off for loaders. The cache also
            keeps one copy of the model's parameters and buffers, compared with the model
            before each product: any change rebuilds the graphs.
        backend: how Hessian products are computed: ``"double_backward"`` (reverse over
            reverse; through the kept graph when cached), ``"forward_over_reverse"``
            (``torch.func`` jvp of grad, vmapped over a block), or ``"auto"`` (default):
            single products and blocks under 8 vectors use double backward; the first larger
            block product is computed both ways (each after an untimed warm-up vector) and the
            faster is kept where the two agree. ``C.notes`` says which and why; ``matvecs``
            counts the extra products. ``"finite_difference"`` (Hessian only): central
            differences (∇L(θ + εv) − ∇L(θ − εv))/(2ε) of the gradients the model's own
            forward and ``loss.backward()`` compute — for models only an engine can
            differentiate (FSDP2); two gradients a product, error O(eps(dtype)^(2/3)·‖H‖‖v‖),
            parameters restored bit for bit (:mod:`curvscope.derivatives.finite_difference`).
        fd_eps: with ``backend="finite_difference"``, the step relative to the parameters'
            norm, ‖εv‖ = fd_eps·‖θ‖; ``None`` (default): eps(dtype)^(1/3), the choice that
            balances truncation and rounding (6e-6 in float64, 4.9e-3 in float32).
        group: torch.distributed: with the default ``None``, inside an initialized process
            group each rank passes its own shard of the data and every product, loss and
            gradient is summed over the ranks weighted by the shards' sample counts — the
            curvature of the global mean loss, the same on every rank (all ranks must build the
            operator and take each product together). A ``ProcessGroup`` selects the group;
            ``True`` requires an initialized one; ``False`` keeps the operator local. Under a
            group, ``backend="auto"`` means double backward (no per-rank timing). The ranks'
            operators are checked to agree (size, dtype, kind, parameters, seed) at
            construction: a mismatch is the same clear error on every rank.
        reduction: ``"mean"`` or ``"sum"``, how ``loss_fn`` reduces over a batch's samples;
            ``None`` (default): a torch loss's own ``reduction``, else inferred at the first
            product from the loss of a batch and of its halves (refused where undecidable).

    Raises:
        ValueError / TypeError: at construction for what can be seen without a forward pass
        (no trainable parameter, empty data, unknown kind, bad params, NaN in the data, a
        loader whose batches change between passes); at the first product for what needs one
        (non-scalar loss, a reduction that cannot be told, outputs and targets counting
        different samples, a loss that does not depend on the parameters, non-finite values).

    Example:
        >>> import torch, curvscope as cs
        >>> model = torch.nn.Linear(3, 1)
        >>> X, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> C = cs.Curvature(model, torch.nn.MSELoss(), (X, y))
        >>> (C @ torch.ones(C.num_params)).shape
        torch.Size([4])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor],
        data: Any,
        kind: str = "hessian",
        params: Iterable[nn.Parameter | str] | None = None,
        *,
        seed: int = 0,
        mc_samples: int = 1,
        cache: bool | None = None,
        backend: str = "auto",
        group: Any = None,
        reduction: str | None = None,
        fd_eps: float | None = None,
    ) -> None:
        self.kind = _check_kind(kind)
        if cache is not None and not isinstance(cache, bool):
            raise TypeError(
                f"cache must be True, False or None (on for data in memory), got {cache!r}"
            )
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        fd_eps = _fd.check_fd_eps(fd_eps, backend, self.kind)
        if backend == "forward_over_reverse" and KINDS[self.kind].forward is None:
            raise ValueError(
                "backend='forward_over_reverse' computes Hessian products; the Gauss-Newton "
                f"kinds use Jacobian products; got kind={kind!r}. Leave backend='auto'"
            )
        if backend != _fd.BACKEND and _scripted(model):
            raise TypeError(
                "the model is a TorchScript module (torch.jit.script / trace), which "
                "cannot be called at other parameters (torch.func.functional_call refuses "
                "Jitted modules), as exact curvature products must: pass the original nn.Module, "
                "or use backend='finite_difference' (Hessian products from the model's own "
                "gradients; the Gauss-Newton and Fisher kinds need the original module)"
            )
        mc_samples = check_int(mc_samples, "mc_samples", minimum=1)
        self.group = resolve_group(group)
        # the data's and the model's checks may fail on one rank only (NaN in its shard): every
        # rank raises then, instead of the others waiting in the next collective
        where = first_device(model) if self.group is not None else torch.device("cpu")
        objective = together(
            partial(
                ModelObjective, model, loss_fn, data, params=params, seed=seed, reduction=reduction
            ),
            self.group,
            where,
        )
        # (the finite-difference backend agrees on a failing rank before its sums: together)
        objective.defer_nonfinite = self.group is not None and backend != _fd.BACKEND
        objective.across_ranks = self.group is not None
        check_same_on_ranks(
            self.group,
            num_params=objective.num_params,
            dtype=objective.dtype,
            kind=self.kind,
            params=objective.names,
            seed=objective.seed,
            mc_samples=mc_samples,
            backend=backend,
            reduction=reduction,  # as declared (an inferred one is not compared: the same
            # function infers the same on every rank, and a rank whose loss is not finite
            # infers it again at its next finite loss, its products refused meanwhile)
            # what the ranks' losses and parameters are: a loss summed on one rank and
            # averaged on another, other class weights, or a model built from another seed
            # on each rank gave a "global" λ_max of neither, converged (an outside review)
            loss=loss_signature(objective.loss_fn, self.group),
            values=values_signature(list(objective.params.values()), self.group),
            device=objective.device,
        )
        # DeepSpeed ZeRO-3, FSDP2 (its modules: after an evaluation forward its root holds
        # plain unsharded parameters), tensor parallelism
        check_backend(list(objective.params.values()), backend, bool(objective.fsdp_modules))
        if self.group is not None and backend == "auto":
            backend = "double_backward"  # the same choice on every rank, without timing
        if backend in ("forward_over_reverse", _fd.BACKEND):
            objective.leave_out_tied_padding()  # (before the source reads its notes)
        replicas = _fd.replicas(objective, self.group) if backend == _fd.BACKEND else 1
        source = _ModelSource(objective, self.kind, mc_samples, self.group, replicas)
        self._init(source, cache, backend)
        self._differences = (
            _fd.FiniteDifferenceProducts(objective, source.weight, self.group, fd_eps)
            if backend == _fd.BACKEND
            else None
        )
        #: the model's objective; None for an operator built from a plain function
        self.objective: ModelObjective | None = objective
        self._args = {
            "model": model,
            "loss_fn": loss_fn,
            "data": data,
            "kind": self.kind,
            "seed": seed,
            "mc_samples": mc_samples,
            "cache": cache,
            "backend": backend,
            "group": group,
            "reduction": reduction,
            "fd_eps": fd_eps,
        }

    @classmethod
    def from_function(cls, f: Callable[[Tensor], Tensor], x: Tensor) -> Curvature:
        """The Hessian of a plain function ``f: R^n -> R`` at ``x`` as a Curvature operator.

        Example:
            >>> import torch, curvscope as cs
            >>> C = cs.Curvature.from_function(lambda x: (x**4).sum(), torch.ones(3))
            >>> C @ torch.tensor([1.0, 0.0, 0.0])
            tensor([12.,  0.,  0.])
        """
        self = cls.__new__(cls)
        self.kind = "hessian"
        self.objective = None
        self.group = None
        self._init(_FunctionSource(f, x), cache=True, backend="double_backward")
        return self

    def _init(
        self, source: _FunctionSource | _ModelSource, cache: bool | None, backend: str
    ) -> None:
        self._source = source
        self.backend = backend
        self._block_backend: str | None = None  # what "auto" measured faster for blocks
        self._choice_notes: list[str] = []
        self.num_params: int = source.num_params
        self.dtype: torch.dtype = source.dtype
        self.device: torch.device = source.device
        self.cache = source.in_memory if cache is None else bool(cache)
        self._cached: list[tuple[float, _k.PreparedProduct]] | None = None
        self._differences = None  # finite-difference products (set by __init__)
        #: the cached graphs' model state (:meth:`_unchanged`): the flags (with the caller's
        #: autocast state) and the attributes' bindings as the graphs' pass left them, the
        #: parameters and buffers as it found them, the plain attributes it writes as it left
        #: them
        self._snapshot: tuple[tuple[Any, ...], list[Any], _Snapshot, _Snapshot] | None = None
        #: whether the graphs' first product has shown whether a product changes the flags
        #: (:meth:`_settle`), and whether it does
        self._settled = self._volatile = False
        self.matvecs = 0
        self.seconds = 0.0

    # ------------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    @property
    def is_psd(self) -> bool:
        """True for the Gauss-Newton family (for losses convex in the outputs)."""
        return KINDS[self.kind].psd

    @property
    def num_samples(self) -> float | None:
        """The samples the operator is over, across the ranks of its process group (each
        counted once), as its loss counts them: for torch's losses the terms a mean divides by
        and a sum adds (a cross-entropy's counted labels, a squared error's entries), else the
        targets' rows; None for a plain function."""
        return self._source.total if isinstance(self._source, _ModelSource) else None

    @property
    def param_names(self) -> list[str]:
        """Names of the parameter blocks, in the order of the flat vectors."""
        return list(self._source.names)

    @property
    def notes(self) -> list[str]:
        """What the products do differently from a plain forward pass (fallback kernels), and
        which backend the ``"auto"`` choice settled on, with the timings behind it; for
        finite differences, how accurate the products so far are estimated to be."""
        notes = list(self._source.notes)
        fd = self._differences
        if fd is None:
            return notes + self._choice_notes
        assert self.objective is not None  # finite differences need a model
        kernels = self.objective.kernel_notes
        worst = f"{max(fd.relative_errors()):.2g}" if fd.errors else "none yet"
        unseen = (
            [
                f"{fd.unseen} finite-difference products are of unknown accuracy (error inf): "
                "every difference was exactly zero, and at a step where the loss's slope "
                "along v says it must move the loss did not, or the gradient changed — the "
                "model's forward does not see steps that small (it computes in a narrower "
                "dtype than its parameters: a cast to bfloat16, quantized weights); use an "
                "exact backend"
            ]
            if fd.unseen
            else []
        )
        return [n for n in notes if n not in kernels] + [
            "finite-difference products: central differences of the model's own gradients "
            "(its own kernels), extrapolated from two steps; the largest estimated error of "
            f"a product so far, relative to ‖v‖ times the operator's scale: {worst} "
            "(C.product_errors)",
            *unseen,
            *fd.notes,
        ]

    @property
    def product_errors(self) -> list[float]:
        """For ``backend="finite_difference"``: each product's estimated error, relative to
        ‖v‖ times the operator's scale (the largest ‖Cv‖/‖v‖ of its products so far), from the
        gap between its two steps' differences (see
        :mod:`curvscope.derivatives.finite_difference`); empty for the exact backends, whose
        products are exact to rounding."""
        return [] if self._differences is None else self._differences.relative_errors()

    # -------------------------------------------------------------------------- products
    def _products(self) -> Iterator[tuple[float, _k.PreparedProduct]]:
        if not self.cache:
            yield from self._source.prepare()
            return
        if self._cached is None or not self._unchanged():
            rebuilt = self._cached is not None

            def build(again: bool) -> tuple[_Snapshot, list[tuple[float, _k.PreparedProduct]]]:
                self._cached = self._snapshot = None
                before = _Snapshot(self._state_now()[2])
                return before, list(self._source.prepare(rebuilt=rebuilt or again))

            # (checks the data) — built once more where the pass wrote: a parameter first
            # seen written was passed by its storage, which the graphs then held, and a
            # forward of the user's that writes it without changing it (a max-norm renorm
            # under the norm bumps the version) broke them with torch's bare in-place error
            # (an outside review's fuzzing); the second pass passes a copy
            before, self._cached = self._at_values_written(build)
            # the parameters and buffers as the pass found them, the attributes it writes as
            # it left them (its graph saved those values: a rebuild would start elsewhere and
            # disagree), and the flags and bindings as the pass left them (what it set is
            # curvscope's: a backward hook that stores a value rebuilt the graphs at the
            # product after loss_and_gradient, the diff review)
            flags, bindings, _ = self._state_now()
            self._snapshot = (flags, bindings, before, _Snapshot(self._source.attribute_state()))
            self._settled = False  # (whether a product changes the flags: :meth:`_settle`)
        else:  # the cached graphs hold the data they were built on
            self._source.check_unchanged_data()
        assert self._cached is not None  # (built above)
        yield from self._cached

    def _summed(self, blocks: list[Tensor], impl: str) -> Tensor:
        """Σ_b w_b C_b V over this rank's batches, summed flat, by ``impl``."""
        if impl == "double_backward":
            products = self._products()
        else:
            products = self._source.prepare(forward=True)
        total: Tensor | None = None
        for graph, (weight, product) in enumerate(products):
            # as the forward ran: checkpointing recomputes it (and what it writes, put back)
            with self._source.kernels(), self._source.recomputation_kept(graph):
                applied = product.apply(blocks)
            part = self._source.flatten(applied, batched=True).detach()
            if total is None:
                total = part if weight == 1.0 else part.mul_(weight)
            else:
                total.add_(part, alpha=weight)
        assert total is not None  # the data is never empty (checked at construction)
        return total

    def _at_values_written(self, compute: Callable[[bool], _T]) -> _T:
        """``compute(False)``, a pass over the data, and ``compute(True)`` once more at once
        where the model's forward wrote into its parameters during it
        (:attr:`ModelObjective.writes`): the pass's batches before the write ran at the values
        before, and the first product (and ``loss_and_gradient``) mixed the two — 36% off with
        a later batch's clamp, a tied max-norm embedding's loss 0.2% off and its gradient 2%
        (an outside review's fuzzing). The one place a pass is run again for this: the kept
        graphs' build, an uncached product, an uncached gradient."""
        writes = self._writes()
        out = compute(False)
        return compute(True) if self._writes() != writes else out

    def _writes(self) -> int:
        """How many times the model's forward wrote into its parameters
        (:attr:`ModelObjective.writes`; 0 for a plain function)."""
        return self.objective.writes if self.objective is not None else 0

    def _settle(self) -> None:
        """After a product through the cached graphs: the flags' snapshot taken anew where a
        product itself changes them — a backward hook that stores a value (``mod.gnorm =
        g.norm().item()``), a loss module that counts its calls — so that only a change made
        between products rebuilds the graphs (each product rebuilt them: 26 builds for 26
        products, the diff review). Learned at the graphs' first product: one more read of
        the flags then, and none after for a model whose products change nothing."""
        assert self._snapshot is not None
        if self._settled and not self._volatile:
            return
        flags, bindings, _ = self._state_now()
        if not self._settled:
            was, bound = self._snapshot[:2]
            self._settled = True
            self._volatile = flags != was or not bindings_unchanged(bound, bindings)
        if self._volatile:
            self._snapshot = (flags, bindings, *self._snapshot[2:])

    def _state_now(self) -> tuple[tuple[Any, ...], list[Any], list[tuple[str, Tensor]]]:
        """The model's state (:meth:`ModelObjective.model_state`), the caller's autocast state
        among its flags."""
        flags, bindings, tensors = self._source.model_state()
        return (*flags, autocast_state(self.device)), bindings, tensors

    def _unchanged(self) -> bool:
        """Whether the model is exactly as when the cached graphs were built: the same flags,
        its modules' attributes bound to the same objects, and, for every parameter and
        buffer, the same name, shape, dtype, device and values.

        Values are compared, not trusted to in-place version counters: ``p.data.add_()``,
        ``vector_to_parameters`` and ``load_state_dict(..., assign=True)`` change parameters
        without bumping the version the graph saw. The comparison reads the model's state once,
        from one walk over its modules (``benchmarks/products.py`` prices it against a product).
        The caller's ``torch.autocast`` state is one of the flags: a graph built inside a
        bfloat16 region gave every later product, and the estimators, which suspend the region,
        bfloat16's accuracy (an outside review: λ_max 1.3e-3 off, reported converged to 9e-7).
        """
        assert self._snapshot is not None
        flags, bound, saved, written = self._snapshot
        flags_now, bindings, now = self._state_now()
        if flags_now != flags or not bindings_unchanged(bound, bindings):
            return False
        return saved.holds(now) and written.holds(self._source.attribute_state())

    @property
    def _vector_words(self) -> dict[str, str]:
        """What a vector's entries are, for :func:`check_vector`'s errors: a plain function's
        are x's (its errors named "the parameters' dtype": a review)."""
        return getattr(self._source, "vector_words", {})

    def matmat(self, V: Tensor) -> Tensor:
        """C V for a block of vectors V of shape (num_params, k); counts k products."""
        V = check_vector(V, self.num_params, self.dtype, self.device, **self._vector_words)
        single = V.ndim == 1
        blocks = self._source.unflatten(V[:, None] if single else V)
        k = blocks[0].shape[0]
        impl = self._backend_for(k)
        out = self._tune(blocks, k) if impl is None else self._apply(blocks, impl)
        return out[:, 0] if single else out

    def _apply(self, blocks: list[Tensor], impl: str) -> Tensor:
        start = time.perf_counter()
        if self._differences is not None:  # the whole data at once, summed over the ranks
            out = self._differences.matmat(self._source.flatten(blocks, batched=True))
            self.matvecs += blocks[0].shape[0]
            self.seconds += time.perf_counter() - start
            return check_finite(out, "the finite-difference Hessian product")
        if impl == "double_backward" and self.cache:  # (_products builds again itself)
            total = self._summed(blocks, impl)
        else:
            total = self._at_values_written(lambda _: self._summed(blocks, impl))
        if self.group is None:
            out, refusals = total, None
        else:  # a loss not finite, or refused, on this rank's data: NaN on every rank
            out, refusals = self._summed_over_ranks(total)
        self.matvecs += blocks[0].shape[0]
        self.seconds += time.perf_counter() - start
        if self._snapshot is not None and impl == "double_backward":
            self._settle()
        if all_finite(out):
            return out
        self._raise_refusal(refusals)
        where = (
            ""
            if self.group is None
            else " summed over the ranks (a loss not finite on a rank's data: NaN on every rank)"
        )
        return check_finite(out, f"the {self.kind} product{where}")  # raises: not finite

    def _summed_over_ranks(self, total: Tensor) -> tuple[Tensor, Tensor]:
        """Σ over the ranks of each rank's ``total``, and how many ranks refused their data, in
        one all-reduce. A rank whose data made its part void — a loss that was not finite, or
        one a check refused (:attr:`ModelObjective.refusal`: under a process group a check
        cannot raise on one rank alone) — sends NaN, so every rank's sum is not finite. The
        same all-reduce counts the ranks none of whose batches' losses curve in the outputs
        (the Gauss-Newton kind's first product): where that is every rank, the matrix is 0 and
        every rank refuses it (:data:`~curvscope.derivatives.kinds.LINEAR_LOSS`)."""
        obj = self.objective
        refused = obj is not None and obj.refusal is not None
        if refused or (obj is not None and obj.nonfinite_batches):
            total.fill_(math.nan)
        linear = obj is not None and obj.ggn_linear
        flags = total.new_zeros(2)  # filled on the device: no copy from the host a product
        flags[0], flags[1] = float(refused), float(linear)
        both = all_reduce_sum(torch.cat([total.reshape(-1), flags]), self.group)
        if linear:
            assert obj is not None
            obj.ggn_linear, obj.ggn_checked = False, True  # decided, once for all ranks
            if round(float(both[-1])) == world_size(self.group):
                raise ValueError(_k.LINEAR_LOSS)
        return both[:-2].reshape(total.shape), both[-2]

    def _raise_refusal(self, refusals: Tensor | None) -> None:
        """After a sum whose result is not finite: this rank's refusal of its data, or — where
        another rank refused its own — a ValueError on this one too (the same kind on every
        rank: a FloatingPointError here read as *diverged* to diagnose and the Monitor, whose
        next collective then waited for the refusing rank: a review)."""
        if self.objective is not None and self.objective.refusal is not None:
            raise self.objective.refusal
        if refusals is not None and float(refusals) > 0:
            raise ValueError(
                f"the data of {int(float(refusals))} other rank(s) was refused (their error says "
                "why: a loss that is not a mean over the rows of a batch, one whose reduction "
                "cannot be told, ...); every rank stops with them"
            )

    def _backend_for(self, k: int) -> str | None:
        """The backend for a product of k vectors, or None when "auto" has yet to measure."""
        if self.backend != "auto":
            return self.backend
        if KINDS[self.kind].forward is None or self.objective is None:
            return "double_backward"
        if k < MIN_TUNED_BLOCK:  # measured: neither wins small blocks consistently
            return "double_backward"
        if self.objective.tied_padding and self._block_backend is None:
            self._block_backend = "double_backward"  # (forward-over-reverse leaves it out)
            self._choice_notes.append(TIED_PADDING_CHOICE)
        return self._block_backend

    def _tune(self, blocks: list[Tensor], k: int) -> Tensor:
        """Compute the first block product both ways, keep the faster where they agree.

        Double backward (k backward passes, through the kept graph when cached) against
        forward-over-reverse (one vmapped pass): which is faster depends on the model — on
        this project's benchmarks vmapped blocks win on MLPs and lose several-fold on CNNs.
        Both are warmed up on one vector first (the kept graph is built; torch loads its
        forward-AD decompositions on first use), so that the timing compares steady states.
        """
        one = [blk[:1] for blk in blocks]
        self._apply(one, "double_backward")
        start = time.perf_counter()
        a = self._apply(blocks, "double_backward")
        t_db = time.perf_counter() - start
        choice, why = "double_backward", ""
        try:
            self._apply(one, "forward_over_reverse")
            start = time.perf_counter()
            b = self._apply(blocks, "forward_over_reverse")
            t_for = time.perf_counter() - start
        except Exception as e:  # an op without forward-mode AD or a batching rule
            why = f"forward-over-reverse failed ({type(e).__name__})"
        else:
            rtol = 1e-6 if self.dtype == torch.float64 else 1e-3
            scale = float(a.abs().max()) or 1.0
            if not torch.allclose(a, b, rtol=rtol, atol=rtol * scale):
                why = "forward-over-reverse disagreed with double backward"
            else:
                why = (
                    f"double backward {t_db * 1e3:.1f} ms, "
                    f"forward-over-reverse {t_for * 1e3:.1f} ms"
                )
                if t_for < t_db:
                    choice = "forward_over_reverse"
        self._block_backend = choice
        self._choice_notes.append(
            f"block products ({k} vectors measured): {choice.replace('_', ' ')} ({why})"
        )
        return a

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matmat(v)

    def matvec(self, v: Tensor) -> Tensor:
        """C v for one flat vector (same as ``C @ v``)."""
        return self.matmat(v)

    # ------------------------------------------------------------------ flat <-> named
    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """A flat vector as a dict name → tensor shaped like that parameter."""
        v = check_vector(v, self.num_params, self.dtype, self.device, **self._vector_words)
        if v.ndim != 1:
            raise ValueError(f"unflatten takes one flat vector, got shape {tuple(v.shape)}")
        return dict(zip(self.param_names, self._source.unflatten(v), strict=True))

    def flatten(self, tensors: dict[str, Tensor] | Iterable[Tensor]) -> Tensor:
        """Per-parameter tensors (a dict by name, or a sequence in order) as one flat vector."""
        if isinstance(tensors, dict):
            missing = [n for n in self.param_names if n not in tensors]
            if missing:
                raise ValueError(f"flatten: missing entries for parameters {missing}")
            tensors = [tensors[n] for n in self.param_names]
        return self._source.flatten(list(tensors))

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """The mean loss and its flat gradient, on the same data, randomness and mode as the
        products; the model is left as found. For a cached Hessian they are read off the kept
        gradient graphs (which the next products then reuse); otherwise one gradient a batch."""
        if self._differences is not None:
            return self._differences.loss_and_gradient()
        parts: list[tuple[float, list[Tensor], float]] = []
        if self.cache and KINDS[self.kind].keeps_gradient:
            for w, product in self._products():
                assert isinstance(product, _k.HessianProduct)  # what keeps_gradient promises
                parts.append((w, product.grads, product.loss))
        else:
            obj = self.objective
            assert obj is not None  # a plain function's operator is always cached

            def gradients(again: bool) -> list[tuple[float, list[Tensor], float]]:
                found = []
                for b in obj.batches():  # (a batch's weight is known once its loss is taken)
                    _, grads, value = _k.batch_loss_and_grads(obj, b)
                    found.append((self._source.weight(b), grads, value))
                return found

            parts = self._at_values_written(gradients)
        loss = sum(w * value for w, _, value in parts)
        flat = [w * self._source.flatten([g.detach() for g in grads]) for w, grads, _ in parts]
        grad = flat[0]
        for f in flat[1:]:
            grad = grad + f
        if self.group is None:  # the loss as computed (it rode with a bfloat16 gradient,
            return float(loss), grad  # and came back rounded to 8 bits: a review)
        if torch.finfo(grad.dtype).bits >= 32:  # one sum over the ranks for both
            both, refusals = self._summed_over_ranks(torch.cat([grad, grad.new_tensor([loss])]))
            total, grad = float(both[-1]), both[:-1]
        else:  # the loss summed apart, in float64: not rounded to a half-precision gradient's
            grad, refusals = self._summed_over_ranks(grad)  # dtype (nor the gradient copied)
            summed = all_reduce_sum(grad.new_tensor([loss], dtype=torch.float64), self.group)
            total = float(summed[0]) if float(refusals) == 0 else math.nan
        if not math.isfinite(total):  # on every rank at once: the loss of one rank's data
            self._raise_refusal(refusals)
            raise NonFiniteLoss(
                f"the loss is {total} summed over the ranks: not finite on some rank's data; "
                "check its inputs and parameters for NaN/Inf and the model for overflow",
                total,
            )
        return total, grad

    def sharded(self) -> ShardedCurvature:
        """This rank's part of the flat vectors, for a model sharded by FSDP2 with
        ``backend="finite_difference"``: products of this rank's entries of vectors, so that
        Krylov vectors are sharded like the parameters (:class:`ShardedCurvature`; every rank
        calls it together). ``cs.eigenvalues``, ``cs.trace``, ``cs.trace_of_square``,
        ``cs.diagonal``, ``cs.density`` and ``cs.spectrum.cg`` take it."""
        return ShardedCurvature(self)

    def restrict(self, params: Iterable[nn.Parameter | str]) -> Curvature:
        """The same curvature (model, loss, data, kind, seed) on a subset of the parameters:
        the diagonal block for ``params``, computed with products over that block only."""
        if self.objective is None:
            raise TypeError("restrict() needs a Curvature built from a model")
        return Curvature(**{**self._args, "params": params})

    # ------------------------------------------------------------------------- exports
    def to_dense(self, *, force: bool = False) -> Tensor:
        """The (n, n) matrix, from n products; refuses n above ``DENSE_LIMIT`` unless forced."""
        check_dense_size(self.num_params, self.dtype, force, f"the {self.kind} matrix")
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        # n columns at once: no backend measurement, and no vmap over n (its memory is O(n²))
        impl = "double_backward" if self.backend == "auto" else self.backend
        return self._apply(self._source.unflatten(eye), impl)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` view: float64 in, float64 out.

        Products run in the parameters' dtype on their device; for ``eigsh``, ``cg`` & co.
        """
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(self.num_params, -1))
            out = self.matmat(t.to(dtype=self.dtype, device=self.device))
            return out.detach().cpu().double().numpy()

        return LinearOperator(
            self.shape,
            matvec=lambda x: mv(x)[:, 0],
            matmat=mv,
            rmatvec=lambda x: mv(x)[:, 0],
            rmatmat=mv,
            dtype=np.float64,
        )

    def __repr__(self) -> str:
        return (
            f"Curvature(kind={self.kind!r}, num_params={self.num_params}, dtype={self.dtype}, "
            f"device={self.device}, matvecs={self.matvecs})"
        )


def autocast_state(device: torch.device) -> tuple[bool, torch.dtype | None]:
    """Whether a ``torch.autocast`` region is open for the device's type, and its dtype (a
    flag read: no context entered)."""
    if not torch.amp.is_autocast_available(device.type) or not torch.is_autocast_enabled(
        device.type
    ):
        return False, None
    return True, torch.get_autocast_dtype(device.type)


class _Snapshot:
    """Named tensors' layout (name, shape, dtype, device) and values, to tell whether they
    still hold: values compared, not version counters (see :meth:`Curvature._unchanged`)."""

    def __init__(self, tensors: list[tuple[str, Tensor]]) -> None:
        self.layout = _layout(tensors)
        self.values = [t.detach().clone() for _, t in tensors]

    def holds(self, now: list[tuple[str, Tensor]]) -> bool:
        if _layout(now) != self.layout:
            return False
        pairs = zip(now, self.values, strict=True)
        if not self.values or self.values[0].device.type == "cpu":
            return all(torch.equal(t, t0) for (_, t), t0 in pairs)  # stops at the first change
        # on an accelerator, one host synchronisation for all tensors, not one per tensor
        return not bool(torch.stack([torch.ne(t.detach(), t0).any() for (_, t), t0 in pairs]).any())


def _layout(tensors: list[tuple[str, Tensor]]) -> list[tuple[Any, ...]]:
    """Name, shape, dtype and device of each tensor: compared in one go."""
    return [(k, t.shape, t.dtype, t.device) for k, t in tensors]


def _check_kind(kind: object) -> str:
    if kind not in KINDS:
        raise ValueError(
            f"unknown kind {kind!r}; expected one of: " + ", ".join(repr(k) for k in KINDS)
        )
    return str(kind)


def _scripted(model: Any) -> bool:
    """Whether ``model`` is a TorchScript module (one that only holds a scripted submodule is
    called at other parameters as any: ``functional_call`` refuses the top level alone)."""
    return isinstance(model, torch.jit.ScriptModule)
