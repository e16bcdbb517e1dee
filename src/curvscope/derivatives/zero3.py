"""DeepSpeed ZeRO-3 for the finite-difference backend: where an engine keeps its parameters and
gradients, and what of its state a product must put back.

``deepspeed.initialize`` with ``"zero_optimization": {"stage": 3}`` partitions every parameter
over the data-parallel ranks: ``p.data`` is an empty tensor between passes (``p.ds_shape`` is
the parameter's shape), this rank's slice of the flattened parameter lives in ``p.ds_tensor``
(padded to ⌈numel/world⌉ entries; rank r holds entries [r·m, r·m + m) of the m-entry slices,
clipped at ``p.ds_numel``), and the forward all-gathers it. Small parameters are *persistent*
(``stage3_param_persistence_threshold``, 1e5 entries by default): they stay gathered in
``p.data``, which the forward reads instead of ``p.ds_tensor``. The backward — the engine's,
``engine.backward(loss)`` — reduce-scatters each gradient, *averaged* over the ranks, into the
optimizer's flat buffer of gradient partitions (float32 even for float64 parameters), and adds
to it from the second backward after ``zero_grad`` on (gradient accumulation); ``p.grad`` stays
None. The optimizer's float32 master copy is separate, and only ``engine.step()`` writes it back
into the partitions.

So a product here (:class:`Zero3`, used by :mod:`curvscope.derivatives.finite_difference`)
writes θ₀ + εv into ``p.ds_tensor`` — this rank's entries, the padding left as found — and,
for a persistent parameter, into its full ``p.data`` (the ranks' entries gathered by one
all-reduce when only this rank's are given); runs the engine's own forward and
``engine.backward`` for each batch, the loss multiplied by the number of ranks (undoing the
average; ``scale_wrt_gas=False``: the gradient accumulation steps do not divide it); and reads
this rank's gradient partition without its padding. The user's state is kept on entry and put
back bit for bit after each product and on failure: the partitions and persistent parameters,
the buffer of gradient partitions, the micro-step counter and the backward bookkeeping the next
``engine.backward`` or ``engine.step()`` reads. The master copy and the optimizer's state are
never touched. The tests (tests/distributed/test_deepspeed.py) check that ``engine.step()``
after curvscope's products — also in the middle of a gradient accumulation — gives the same
parameters, bit for bit, as without them.

The stability limit reads the engine's optimizer here too (:class:`PartitionedState`, used by
:mod:`curvscope.diagnosis.stability`). ZeRO-3 hands the user's torch optimizer
(``engine.optimizer.optimizer``) one flat float32 partition per *sub-group* — a parameter group
split where its partitions pass ``sub_group_size`` entries — as the only parameter of the
group it came from, and only while it steps it: the group's ``params`` are empty in between, and
its state (``step``, ``exp_avg_sq``, ``momentum_buffer``, ...) is keyed by the flat partition.
Where a parameter sits is the engine's ``grad_position[p.ds_id]``: (sub-group, offset, padded
partition size); its group is ``param_groups[sub_group_to_group_id[sub-group]]``. So a
parameter's state is its sub-group's tensors narrowed to [offset, offset + its entries) — the
padding (zeros that no gradient reaches) left out — and its step count is its sub-group's.
Vectors over the parameters hold this rank's entries, or the whole vector on every rank by one
all-reduce (each rank writing its entries, zeros elsewhere).

Refused, with the fix: the engine's ``module`` instead of the engine (its backward is the
engine's), ZeRO stages 0–2, fp16/bf16 engines (their gradients keep two or three digits),
optimizer or parameter offload and sequence parallelism (untested); for the stability limit, an
optimizer that is not the engine's, and the engine's with optimizer offload.

DeepSpeed is never imported here: a model it manages was built after the user imported it
(``deepspeed.initialize`` patches torch process-wide), and is recognised by its attributes.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import math
import sys
from collections.abc import Callable
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn

from curvscope.derivatives.distributed import all_reduce_max, all_reduce_sum

try:  # torch.distributed is optional in torch builds
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - a torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]

#: what an engine must be, in the refusals' fixes
_CALL = (
    "engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config={..., "
    "'zero_optimization': {'stage': 3}}); cs.Curvature(engine, loss_fn, data, "
    "backend='finite_difference')"
)


def is_partitioned(p: Tensor) -> bool:
    """Whether ``p`` is a parameter partitioned by DeepSpeed's ZeRO-3."""
    return hasattr(p, "ds_tensor") and hasattr(p, "ds_numel")


def full_shape(p: Tensor) -> torch.Size:
    """A parameter's shape: a ZeRO-3 parameter's own (``ds_shape``), not its empty ``.data``'s."""
    return torch.Size(p.ds_shape) if is_partitioned(p) else p.shape  # type: ignore[attr-defined]


def is_engine(model: object) -> bool:
    """Whether ``model`` is a ``deepspeed.DeepSpeedEngine`` (without importing DeepSpeed)."""
    module = sys.modules.get("deepspeed.runtime.engine")
    cls = getattr(module, "DeepSpeedEngine", None)
    return cls is not None and isinstance(model, cls)


def check_backend(params: list[Tensor], backend: str, sharded: bool = False) -> None:
    """Refuse a backend other than finite differences for ZeRO-3 parameters, and for a model
    sharded by FSDP2 or tensor parallelism (``sharded``: it has ``fully_shard`` modules; or
    DTensor parameters), with the fix: the exact backends call the model with the parameters'
    values, which the engine does not hold whole."""
    if backend != "finite_difference" and any(is_partitioned(p) for p in params):
        raise ValueError(
            f"backend={backend!r} differentiates the model's parameters as tensors, but a "
            "DeepSpeed ZeRO-3 engine keeps only this rank's partition of each; use "
            "backend='finite_difference', which differences the engine's own gradients"
        )
    if backend != "finite_difference" and (sharded or any(is_dtensor(p) for p in params)):
        # FSDP2's shards: the exact backends' λ_max read 0.0, "converged" (finite differences:
        # 0.733), without a word (an outside review)
        raise ValueError(
            f"backend={backend!r} differentiates the model with a double backward, which does "
            "not go through a sharded model's engine (FSDP2's fully_shard, tensor parallelism: "
            "DTensor parameters) — its products come out 0; use backend='finite_difference', "
            "which differences the engine's own gradients (README, Models larger than one "
            "device)"
        )


def is_dtensor(t: object) -> TypeGuard[DTensor]:
    """Whether ``t`` is a DTensor: a shard of FSDP2's ``fully_shard`` or of tensor parallelism."""
    return DTensor is not None and isinstance(t, DTensor)


def _refuse_config(engine: Any) -> None:
    """Refuse an engine whose gradients or state this module does not handle, with the fix."""
    stage = int(engine.zero_optimization_stage())
    if stage != 3:
        raise ValueError(
            f"backend='finite_difference' measures DeepSpeed engines with ZeRO stage 3, but this "
            f"engine uses stage {stage}, whose gradients live in the optimizer's own buffers "
            "between its hooks: measure with 'zero_optimization': {'stage': 3}, or measure a "
            "copy of the model outside DeepSpeed"
        )
    if engine.fp16_enabled() or engine.bfloat16_enabled():
        raise ValueError(
            "backend='finite_difference' needs float32 (or float64) parameters, but this "
            "DeepSpeed engine trains in fp16/bf16: a difference of two half-precision "
            "gradients keeps two or three digits. Measure an engine built without 'fp16' and "
            "'bf16' in its config (from a float32 copy of the model)"
        )
    optimizer = engine.optimizer
    if getattr(optimizer, "offload_optimizer", False) or getattr(optimizer, "offload_param", False):
        raise ValueError(
            "backend='finite_difference' does not support DeepSpeed's optimizer or parameter "
            "offload (its gradients then live in the offloaded float32 buffers; untested): "
            "measure an engine without 'offload_optimizer' and 'offload_param'"
        )
    if int(getattr(optimizer, "sequence_parallel_size", 1)) != 1:
        raise ValueError(
            "backend='finite_difference' does not support DeepSpeed's sequence parallelism "
            "(untested): measure an engine without it"
        )
    if getattr(optimizer, "grad_partitions_flat_buffer", None) is None:
        raise ValueError(
            "the DeepSpeed engine keeps no buffer of gradient partitions (was it built without "
            f"an optimizer?); backend='finite_difference' needs its backward: {_CALL}"
        )
    _refuse_features(engine)
    missing = [k for k in _REQUIRED if not hasattr(optimizer, k)]
    if missing:  # what a product must put back: without it, the next step would be wrong
        raise ValueError(
            f"the DeepSpeed engine's optimizer has no {missing}, which a finite-difference "
            "product must put back as found; this DeepSpeed version is not supported "
            f"(tested: {TESTED_VERSION})"
        )


#: The DeepSpeed version the tests ran (tests/distributed/test_deepspeed.py).
TESTED_VERSION = "0.19.8"
#: The optimizer's bookkeeping a product changes and must put back (see :data:`_OPTIMIZER_STATE`).
_REQUIRED = ("micro_step_id", "averaged_gradients", "params_already_reduced")

#: ZeRO-3 features under which the forward does not read the partitions a product sets, or the
#: gradients are not the float32 ones it differences: (the engine's query, what it is, the fix)
_FEATURES = (
    (
        "zero_hpz_partition_size",
        "ZeRO++'s hierarchical partitioning (zero_hpz_partition_size > 1): the forward gathers "
        "a secondary copy of the partitions, refreshed only by engine.step()",
        "'zero_hpz_partition_size': 1",
    ),
    (
        "zero_quantized_weights",
        "ZeRO++'s quantized weights: θ ± εv all-gathered in int8",
        "'zero_quantized_weights': false",
    ),
    (
        "zero_quantized_nontrainable_weights",
        "ZeRO++'s quantized non-trainable weights",
        "'zero_quantized_nontrainable_weights': false",
    ),
    (
        "zero_quantized_gradients",
        "ZeRO++'s quantized gradients: reduced in int4",
        "'zero_quantized_gradients': false",
    ),
    (
        "torch_autocast_enabled",
        "the engine's torch_autocast: its forward runs in 16 bits whatever curvscope asks",
        "no 'torch_autocast' section",
    ),
    (
        "is_deepcompile_enabled",
        "DeepCompile: it replaces the backward hooks the products rely on (untested)",
        "no 'compile' deepcompile section",
    ),
)


def _refuse_features(engine: Any) -> None:
    """Refuse, with the fix, a ZeRO-3 feature under which a finite-difference product would be
    silently wrong (:data:`_FEATURES`; a ZeRO++ hierarchical partition gave ‖Hv‖ 0.76 for
    0.93, its error estimated at 4e-5: confidently wrong)."""
    for query, what, fix in _FEATURES:
        ask = getattr(engine, query, None)
        value = ask() if callable(ask) else None
        if query == "zero_hpz_partition_size":
            value = value is not None and int(value) > 1
        if value:
            raise ValueError(
                f"backend='finite_difference' cannot measure this DeepSpeed engine: {what}. "
                f"Measure an engine built with {fix} in its config"
            )


def find(model: nn.Module, params: list[Tensor], group: Any) -> Zero3 | None:
    """The ZeRO-3 engine ``model`` with the selected ``params``; None where neither ``model`` is
    a DeepSpeed engine nor any parameter partitioned. Refuses, with the fix, what this module
    does not handle (``engine.module`` passed instead of the engine, stages 0–2, ...)."""
    engine = is_engine(model)
    partitioned = [is_partitioned(p) for p in params]
    if not engine and not any(partitioned):
        return None
    if not engine:
        raise ValueError(
            "the model's parameters are partitioned by DeepSpeed ZeRO-3, but the model is not "
            "the DeepSpeed engine (engine.module?): the gradients are the engine's backward's "
            f"(engine.backward(loss)). Pass the engine itself: {_CALL}"
        )
    _refuse_config(model)
    if not all(partitioned):
        raise ValueError(
            "some selected parameters of the DeepSpeed engine are not partitioned by ZeRO-3; "
            "select the parameters the engine manages (params=None: every trainable one)"
        )
    return Zero3(model, params, group)


class Partitions:
    """Where this rank's entries of ZeRO-3 parameters are: [lo, hi) of each flattened parameter
    (its partition without the padding), and the whole flat vector assembled from every rank's
    entries over ``group`` (one all-reduce). Shared by the products (:class:`Zero3`) and the
    optimizer's state (:class:`PartitionedState`)."""

    def __init__(self, params: list[Tensor], group: Any) -> None:
        self.params, self.group = params, group
        #: this rank's entries [lo, hi) of each parameter's flattened block
        self.spans = self.spans_of(params)
        self.numels = [math.prod(full_shape(p)) for p in params]
        #: where the partitions (and the small collectives about them) live
        self.device: torch.device = params[0].ds_tensor.device  # type: ignore[attr-defined]

    @staticmethod
    def spans_of(params: list[Tensor]) -> list[tuple[int, int]]:
        """This rank's entries [lo, hi) of each ZeRO-3 parameter's flattened block: rank r of
        its partition group holds [r·m, r·m + m) clipped at its size, m its partition's size."""
        import torch.distributed as dist

        spans = []
        for p in params:
            m, n = p.ds_tensor.numel(), p.ds_numel  # type: ignore[attr-defined]
            lo = min(dist.get_rank(p.ds_process_group) * m, n)  # type: ignore[attr-defined]
            spans.append((lo, min(lo + m, n)))
        return spans

    @property
    def local_numels(self) -> list[int]:
        """How many entries of each parameter this rank holds (its partition, unpadded)."""
        return [hi - lo for lo, hi in self.spans]

    @functools.cached_property
    def positions(self) -> Tensor:
        """Where this rank's entries sit in a full flat vector, in order."""
        offsets = [0, *itertools.accumulate(self.numels)]
        return torch.cat(
            [
                torch.arange(o + lo, o + hi, device=self.device)
                for o, (lo, hi) in zip(offsets, self.spans, strict=False)
            ]
        )

    def whole(self, mine: Tensor) -> Tensor:
        """The whole flat vector on every rank from each rank's entries ``mine``: each rank
        writes its own, zeros elsewhere — the partitions are disjoint — and one all-reduce
        sums them."""
        full = mine.new_zeros(sum(self.numels))
        full[self.positions] = mine
        return all_reduce_sum(full, self.group)


class Zero3(Partitions):
    """The selected parameters of a ZeRO-3 engine: this rank's entries of each (its partition
    without the padding), how the engine weighs the ranks, and its state kept and put back
    (:meth:`keep`)."""

    def __init__(self, engine: Any, params: list[Tensor], group: Any) -> None:
        import torch.distributed as dist

        super().__init__(params, group)
        self.engine, self.optimizer = engine, engine.optimizer
        ours = 1 if group is None else dist.get_world_size(group)
        sizes = {dist.get_world_size(p.ds_process_group) for p in params}  # type: ignore[attr-defined]
        if sizes != {ours}:
            raise ValueError(
                f"the DeepSpeed engine partitions its parameters over {sorted(sizes)} ranks, but "
                f"the Curvature reduces over {ours}; build it in the engine's data-parallel "
                "process group (group=None uses the default group) so that each rank passes its "
                "own shard of the data"
            )
        #: the engine averages the ranks' gradients: each rank's loss is multiplied by this
        self.loss_scale = float(ours)
        #: the dtype the gradients are accumulated in (float32 for float64 parameters too)
        self.gradient_dtype: torch.dtype = self.optimizer.gradient_accumulation_dtype

    def _whole(self, p: Tensor) -> bool:
        """A parameter the forward reads whole from ``p.data``: a persistent one, gathered."""
        return p.data.numel() == p.ds_numel  # type: ignore[attr-defined]

    def keep(self) -> Zero3State:
        """The engine's state as it is now, to be put back by :meth:`Zero3State.restore`."""
        return Zero3State(self)

    # ------------------------------------------------------------------------- values
    def set(self, state: Zero3State, blocks: list[Tensor], eps: float, local: bool) -> None:
        """The partitions (and persistent parameters) := θ₀ + ε·block, from the kept θ₀.
        ``blocks``: one per parameter, the full block, or with ``local`` this rank's entries."""
        flat = [b.reshape(-1) for b in blocks]
        local_blocks = (
            flat if local else [b[lo:hi] for b, (lo, hi) in zip(flat, self.spans, strict=True)]
        )
        full: list[Tensor | None] = list(flat) if not local else [None] * len(flat)
        if local and self._whole_on_every_rank(state):
            full = self._gather_persistent(local_blocks, state)
        state.reset_layout()
        for i, p in enumerate(self.params):
            part = p.ds_tensor.data  # type: ignore[attr-defined]
            part.copy_(state.partitions[i])
            n = self.local_numels[i]
            part[:n].add_(local_blocks[i].to(part.dtype), alpha=eps)
            whole = state.whole[i]
            if whole is not None:
                block = full[i]
                assert block is not None
                p.data.copy_(whole)
                p.data.view(-1).add_(block.to(p.dtype), alpha=eps)

    def _whole_on_every_rank(self, state: Zero3State) -> bool:
        """Whether some parameters are held whole (persistent, gathered) — the same ones on
        every rank, checked once per kept state (one all-reduce): which ones are whole is read
        off this rank's ``.data``, and ranks that disagreed would enter the gather below with
        different sizes, or not at all (a hang)."""
        if state.agreed is None:
            flags = torch.tensor(
                [float(w is not None) for w in state.whole], dtype=torch.float64, device=self.device
            )
            spread = all_reduce_max(torch.cat([flags, -flags]), self.group)
            if bool((spread[: len(flags)] != -spread[len(flags) :]).any()):
                raise ValueError(
                    "the DeepSpeed engine holds some persistent parameters gathered on some "
                    "ranks and not on others, which a finite-difference product cannot set "
                    "alike; run one forward of the engine on every rank first"
                )
            state.agreed = bool(flags.any())
        return state.agreed

    def _gather_persistent(self, local: list[Tensor], state: Zero3State) -> list[Tensor | None]:
        """The full blocks of the persistent parameters from every rank's entries: each rank
        writes its own where they sit (zeros elsewhere: the partitions are disjoint) and one
        all-reduce sums them."""
        which = [i for i, w in enumerate(state.whole) if w is not None]
        sizes = [self.numels[i] for i in which]
        buf = local[which[0]].new_zeros(sum(sizes))
        start = 0
        for i, size in zip(which, sizes, strict=True):
            lo, hi = self.spans[i]
            buf[start + lo : start + hi] = local[i]
            start += size
        summed = all_reduce_sum(buf, self.group).split(sizes)
        out: list[Tensor | None] = [None] * len(local)
        for i, block in zip(which, summed, strict=True):
            out[i] = block
        return out

    def values(self, state: Zero3State) -> list[Tensor]:
        """This rank's entries of θ₀ (the kept partitions without their padding)."""
        return [t[:n] for t, n in zip(state.partitions, self.local_numels, strict=True)]

    # ---------------------------------------------------------------------- gradients
    def clear_grads(self) -> None:
        """Before a pass: the next backward copies into the gradient partitions instead of
        adding (the optimizer's ``zero_grad``: its micro-step counter back to 0), and a
        parameter the pass leaves without a gradient reads 0."""
        self.optimizer.zero_grad()
        self.optimizer.grad_partitions_flat_buffer.zero_()

    def backward(self, loss: Tensor) -> None:
        """The engine's backward: its reduce-scatter of the gradients into the partitions."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def gradient(self, local: bool) -> Tensor:
        """The gradient the last pass left: this rank's entries (``local``) in the order of
        :attr:`local_numels`, or the full flat vector on every rank (one all-reduce)."""
        read: Callable[[Tensor], Tensor] = importlib.import_module(
            "deepspeed.utils"
        ).safe_get_local_grad
        parts = [read(p)[:n] for p, n in zip(self.params, self.local_numels, strict=True)]
        mine = torch.cat(parts).to(self.params[0].dtype)  # float32 for float64 parameters
        return mine if local else self.whole(mine)


class Zero3State:
    """A ZeRO-3 engine's state that a product changes, kept on entry: this rank's partitions
    (with their padding), the persistent parameters' full values, the buffer of gradient
    partitions, the optimizer's backward bookkeeping (micro-step counter, hook state, the
    gradient lists and flags its ``step`` reads) and the engine's count of backward passes
    (:data:`_ENGINE_COUNTERS`)."""

    def __init__(self, zero3: Zero3) -> None:
        self.zero3 = zero3
        opt = zero3.optimizer
        self.partitions = [p.ds_tensor.detach().clone() for p in zero3.params]  # type: ignore[attr-defined]
        self.whole = [p.data.detach().clone() if zero3._whole(p) else None for p in zero3.params]
        #: whether some are whole, once every rank agreed on which (Zero3._whole_on_every_rank)
        self.agreed: bool | None = None
        # a persistent parameter the engine has not gathered yet (empty .data) is gathered by
        # the first forward and kept so: put back as found, or the next forward would read the
        # values of θ₀ + εv there instead of gathering the partitions
        self.layout = [(p.data, p.ds_status) for p in zero3.params]  # type: ignore[attr-defined]
        self.grads = opt.grad_partitions_flat_buffer.detach().clone()
        # each attribute's object and a copy of what it holds: put back as that same object
        # (whatever holds it sees the restored contents), refilled in place
        held = {k: getattr(opt, k) for k in _OPTIMIZER_STATE if hasattr(opt, k)}
        self.attributes = {k: (v, _copy(v)) for k, v in held.items()}
        engine = zero3.engine
        self.counters = {k: getattr(engine, k) for k in _ENGINE_COUNTERS if hasattr(engine, k)}
        hooks = getattr(opt, "_backward_hook_state", None)
        self.hooks = None if hooks is None else dict(vars(hooks))

    def reset_layout(self) -> None:
        """Each parameter's ``.data`` (whole or empty) and gathering status as kept."""
        for p, (data, status) in zip(self.zero3.params, self.layout, strict=True):
            p.data = data
            p.ds_status = status  # type: ignore[attr-defined]

    def restore(self) -> None:
        """Everything kept, back bit for bit (``.data``: no version-counter bump)."""
        zero3, opt = self.zero3, self.zero3.optimizer
        self.reset_layout()
        for p, part, whole in zip(zero3.params, self.partitions, self.whole, strict=True):
            p.ds_tensor.data.copy_(part)  # type: ignore[attr-defined]
            if whole is not None:
                p.data.copy_(whole)
        opt.grad_partitions_flat_buffer.copy_(self.grads)
        for k, (kept, contents) in self.attributes.items():
            setattr(opt, k, _refilled(kept, contents))
        for k, count in self.counters.items():
            setattr(zero3.engine, k, count)
        if self.hooks is not None:
            vars(opt._backward_hook_state).update(self.hooks)


def _engine_optimizer(optimizer: object) -> Any | None:
    """The ZeRO-3 optimizer (``DeepSpeedZeroOptimizer_Stage3``) that ``optimizer`` is or wraps
    as ``.optimizer``; None if it is neither."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if hasattr(optimizer, "fp32_partitioned_groups_flat") and hasattr(
            optimizer, "grad_position"
        ):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def optimizer_params(optimizer: object) -> list[Tensor] | None:
    """The parameters a ZeRO-3 engine's optimizer steps (its sub-groups', in order); None for
    an optimizer that is not one."""
    engine_optimizer = _engine_optimizer(optimizer)
    if engine_optimizer is None:
        return None
    return [p for sub_group in engine_optimizer.fp16_groups for p in sub_group]


def optimizer_state(
    optimizer: object, inner: torch.optim.Optimizer, params: list[Tensor], local: bool
) -> PartitionedState | None:
    """Where the ZeRO-3 engine's optimizer keeps the groups and state of ``params`` (with
    ``local``, vectors of this rank's entries); None when no parameter is partitioned.
    ``optimizer`` is what the user passed, ``inner`` the torch optimizer with a stability
    rule found in it. Refuses, with the fix, another optimizer than the engine's, and the
    engine's with its state offloaded."""
    partitioned = [is_partitioned(p) for p in params]
    if not any(partitioned):
        return None
    if not all(partitioned):
        raise ValueError(
            "some of the parameters are partitioned by DeepSpeed ZeRO-3 and some not: measure "
            "the parameters one engine manages (params=None: every trainable one)"
        )
    owners = {id(getattr(p, "_z3_optimizer", None)) for p in params}
    engine_optimizer = getattr(params[0], "_z3_optimizer", None)
    if len(owners) != 1 or engine_optimizer is None or engine_optimizer.optimizer is not inner:
        raise ValueError(
            f"optimizer= ({type(optimizer).__name__}) is not the optimizer of the DeepSpeed "
            "ZeRO-3 engine that partitions these parameters, which keeps their state: pass "
            "the engine's (engine.optimizer, the optimizer deepspeed.initialize returned)"
        )
    if getattr(engine_optimizer, "offload_optimizer", False) or getattr(
        engine_optimizer, "swap_optimizer", False
    ):
        raise ValueError(
            "the DeepSpeed engine offloads its optimizer's state ('offload_optimizer'), which "
            "the stability limit does not read (untested): pass lr= instead of optimizer= "
            "(the limit 2/lr of plain gradient descent), or build the engine without "
            "'offload_optimizer'"
        )
    return PartitionedState(engine_optimizer, params, local)


class PartitionedState(Partitions):
    """The groups and state of ZeRO-3 parameters in their engine's optimizer (see the module's
    docstring), in the form :func:`curvscope.diagnosis.stability.limit_of` reads any
    optimizer's: per parameter its group and its state, and flat vectors over the parameters —
    this rank's entries (``local``) or whole on every rank (one all-reduce)."""

    def __init__(self, engine_optimizer: Any, params: list[Tensor], local: bool) -> None:
        # over the engine's data-parallel group, which partitions the parameters
        super().__init__(params, params[0].ds_process_group)  # type: ignore[attr-defined]
        self.engine_optimizer, self.local = engine_optimizer, local
        #: (sub-group, offset in its flat partition) of each parameter; None: not stepped
        self.where: list[tuple[int, int] | None] = []
        for p in params:
            at = engine_optimizer.grad_position.get(engine_optimizer.get_param_id(p))
            self.where.append(None if at is None else (int(at[0]), int(at[1])))
        groups = engine_optimizer.optimizer.param_groups
        to_group = engine_optimizer.sub_group_to_group_id
        #: each parameter's group in the torch optimizer (None: one it does not step)
        self.groups: list[dict[str, Any] | None] = [
            None if at is None else groups[to_group[at[0]]] for at in self.where
        ]

    def state(self, i: int) -> dict[str, Any]:
        """Parameter ``i``'s state: its sub-group's, each tensor over the sub-group's flat
        partition narrowed to this rank's entries of the parameter (no padding); the rest (the
        step count) as it is."""
        at = self.where[i]
        if at is None:
            return {}
        sub_group, offset = at
        flat = self.engine_optimizer.fp32_partitioned_groups_flat[sub_group]
        lo, hi = self.spans[i]
        return {
            key: value.narrow(0, offset, hi - lo)
            if isinstance(value, Tensor) and value.ndim == 1 and value.numel() == flat.numel()
            else value
            for key, value in self.engine_optimizer.optimizer.state.get(flat, {}).items()
        }

    def zeros(self, i: int) -> Tensor:
        """Zeros over this rank's entries of parameter ``i``."""
        lo, hi = self.spans[i]
        return torch.zeros(hi - lo, device=self.device)

    def entries(self, t: Tensor) -> Tensor:
        """P⁻¹ from :meth:`state`: already this rank's entries."""
        return t

    def flat(self, values: list[Tensor | float]) -> Tensor:
        """One flat vector of per-parameter values (this rank's entries, as :meth:`state`
        gives them, or numbers filled in), in the parameters' dtype: this rank's entries with
        ``local``, else whole on every rank."""
        dtype = self.params[0].dtype
        parts = [
            v.reshape(-1).to(dtype=dtype, device=self.device)
            if isinstance(v, Tensor)
            else torch.full((hi - lo,), float(v), dtype=dtype, device=self.device)
            for v, (lo, hi) in zip(values, self.spans, strict=True)
        ]
        mine = torch.cat(parts)
        return mine if self.local else self.whole(mine)

    def unscaled(self, inverse: list[Tensor]) -> int:
        """How many entries of the stepped parameters have P⁻¹ = 0 (their second moment still
        0): this rank's with ``local``, else all the ranks'."""
        mine = sum(
            int((q == 0).sum()) for q, g in zip(inverse, self.groups, strict=True) if g is not None
        )
        if self.local:
            return mine
        count = torch.tensor([float(mine)], dtype=torch.float64, device=self.device)
        return int(all_reduce_sum(count, self.group)[0])


#: the optimizer's attributes a backward changes and its next backward or step reads
_OPTIMIZER_STATE = (
    "micro_step_id",
    "averaged_gradients",
    "params_already_reduced",
    "_is_gradient_accumulation_boundary",
    "_offload_boundary_param_ids",
)


#: the engine's own counters its backward advances: with ``managed_gradient_accumulation``
#: false, each ``engine.backward`` counts a micro-batch that ``engine.step()`` adds to
#: ``global_samples`` (two uncounted products would have added four)
_ENGINE_COUNTERS = ("_unmanaged_backward_count",)


def _refilled(kept: Any, contents: Any) -> Any:
    """``kept`` (a dict, list or set) holding ``contents`` again, refilled in place; a value
    that is not a container: ``contents`` itself."""
    if isinstance(kept, dict):
        kept.clear()
        kept.update(_copy(contents))
    elif isinstance(kept, list):
        kept[:] = contents
    elif isinstance(kept, set):
        kept.clear()
        kept.update(contents)
    else:
        return contents
    return kept


def _copy(value: Any) -> Any:
    """A shallow copy of a container (its tensors shared: they are views of kept buffers)."""
    if isinstance(value, dict):
        return {k: list(v) if isinstance(v, list) else v for k, v in value.items()}
    if isinstance(value, (list, set)):
        return type(value)(value)
    return value


__all__ = [
    "PartitionedState",
    "Partitions",
    "Zero3",
    "Zero3State",
    "check_backend",
    "find",
    "full_shape",
    "is_engine",
    "is_partitioned",
    "optimizer_params",
    "optimizer_state",
]
