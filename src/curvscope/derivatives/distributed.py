"""torch.distributed for the curvature operator: each rank holds a shard of the data; products,
losses and gradients are summed over the ranks (all-reduce), weighted by the shards' sample
counts, so every rank holds the curvature of the *global* mean loss and the same result.

Nothing here is home-made: it is the process group the user's training already runs on
(gloo on CPU, NCCL on GPUs). A rank that fails ends the others' collectives with an error
(gloo: the peer's connection closes; any backend: the process group's ``timeout``).
"""

from __future__ import annotations

import numbers
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

#: seconds :func:`released` waits at most for a process group to let go of a collective's tensor
RELEASE_TIMEOUT = 1.0
#: whether :func:`released` still waits (False once a wait timed out: it warned then)
_waiting = True


def resolve_group(group: Any) -> Any:
    """The process group to reduce over, or None for a single process.

    ``group=None`` (the default) uses the default group when torch.distributed is initialized;
    ``group=True`` requires it; ``group=False`` keeps the operator local to this process; a
    ``ProcessGroup`` is used as is.
    """
    if group is False:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError(
                "group= was given but torch.distributed is not initialized: call "
                "torch.distributed.init_process_group first (or leave group=None)"
            )
        return None
    group = None if group is True else group
    if dist.get_world_size(group) == 1:
        return None
    return dist.group.WORLD if group is None else group


def first_device(model: Any) -> torch.device:
    """Where a model's collectives run: its first parameter's device (the CPU for anything
    else — a model with no parameters, on the meta device, or not a module: refused later)."""
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    if not isinstance(first, Tensor) or first.device.type == "meta":
        return torch.device("cpu")
    return first.device


def collective_device(group: Any, device: Any) -> torch.device:
    """Where a small collective's tensor (a check, agreed numbers) lives: on the host for gloo
    and MPI, on ``device`` (the model's GPU) for NCCL, which reduces device tensors only."""
    import torch.distributed as dist

    return torch.device(device if dist.get_backend(group) == "nccl" else "cpu")


def all_reduce_sum(t: Tensor, group: Any) -> Tensor:
    """Σ over the ranks of ``t`` (in place on a contiguous copy); ``t`` itself when local."""
    return _reduce(t, group, "SUM")


def all_reduce_mean(t: Tensor, group: Any) -> Tensor:
    """The mean over the ranks of ``t`` (a contiguous copy); ``t`` itself when local."""
    return t if group is None else all_reduce_sum(t, group) / world_size(group)


def all_reduce_max(t: Tensor, group: Any) -> Tensor:
    """The elementwise maximum over the ranks of ``t`` (a contiguous copy); ``t`` when local."""
    return _reduce(t, group, "MAX")


def from_first_rank(t: Tensor, group: Any) -> Tensor:
    """The first rank's ``t`` on every rank of ``group`` (a broadcast into a contiguous copy);
    ``t`` itself when local. For what any rank's copy would do as well — a warm start — where
    the ranks' copies may differ in their last bits."""
    if group is None:
        return t
    import torch.distributed as dist

    src = dist.get_global_rank(group, 0)
    return _collective(
        t, lambda out: dist.broadcast(out, src=src, group=group), _failed("broadcast", group)
    )


def _reduce(t: Tensor, group: Any, op: str) -> Tensor:
    if group is None:
        return t
    import torch.distributed as dist

    how = getattr(dist.ReduceOp, op)
    return _collective(
        t, lambda out: dist.all_reduce(out, op=how, group=group), _failed("all-reduce", group)
    )


def _failed(what: str, group: Any) -> str:
    import torch.distributed as dist

    return (
        f"the {what} over {dist.get_world_size(group)} ranks failed — another rank has failed, "
        "left, or did not take this product (every rank must build the Curvature and compute "
        "each product together)"
    )


def _collective(t: Tensor, run: Callable[[Tensor], Any], failed: str) -> Tensor:
    """``run`` (a collective, in place) on a contiguous copy of ``t``, which is returned once the
    process group has let go of it (:func:`released`); a peer's failure raised as ``failed``
    says, with what the process group said."""
    out = t.contiguous().clone()
    holders = references(out)
    try:
        run(out)
    except RuntimeError as e:  # gloo/NCCL errors when a peer has died or timed out
        said = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RuntimeError(f"curvscope: {failed}; the process group said: {said}") from e
    released(out, holders)
    return out


def references(t: Tensor) -> int:
    """How many C++ references hold ``t``'s tensor (0 where torch does not say)."""
    use_count = getattr(t, "_use_count", None)
    return int(use_count()) if use_count is not None else 0


def released(t: Tensor, holders: int, timeout: float = RELEASE_TIMEOUT) -> None:
    """Return once no more than ``holders`` references hold ``t`` (what held it before it was
    handed to a collective that has now finished): the process group has let go of it. Host
    tensors only; at most ``timeout`` seconds — then a warning, once, and no more waiting in
    this process (something that holds such tensors for good, a future torch or a profiler,
    must not cost every collective a second).

    Why: gloo runs each collective on a worker thread of the process group, and the worker
    drops its reference to the tensors *after* the caller's wait has returned. For a tensor
    Python knows, that takes the GIL on the worker — and a thread that reaches for the GIL
    while the interpreter shuts down is ended by Python mid-destructor: ``terminate called
    without an active exception`` (SIGABRT) on one rank, after its results. A script's
    ``dist.barrier()`` called while a worker still held curvscope's last all-reduce kept that
    work alive until the barrier's own work was dropped — on the worker, racing the exit
    (README, "Sharded vectors"). Waiting here, the GIL released, until the worker has let go
    (well under a millisecond) leaves no collective of curvscope's behind when a call returns.
    Device tensors are not waited for (NCCL's watchdog thread releases works on its own
    schedule, and waiting would synchronize with the device).
    """
    global _waiting
    if t.device.type != "cpu" or holders == 0 or not _waiting:
        return
    start, pause = time.perf_counter(), 0.0
    while references(t) > holders:
        if time.perf_counter() - start > timeout:
            _waiting = False
            warnings.warn(
                f"curvscope: the process group still held a collective's tensor {timeout:g} s "
                "after the collective; curvscope no longer waits for it in this process (a "
                "gloo script may then abort at exit: end it with dist.barrier() and "
                "dist.destroy_process_group())",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        time.sleep(pause)  # releases the GIL, which the worker may need to let go
        pause = min(2 * pause + 1e-6, 1e-3)


def global_count(n: float, group: Any, device: torch.device) -> float:
    """The total over the ranks of what their losses average over (samples, counted labels:
    a float where class weights count)."""
    t = torch.tensor([float(n)], dtype=torch.float64, device=device)
    return float(all_reduce_sum(t, group).item())


def in_step(items: Iterable[T], group: Any, device: Any, what: str) -> Iterator[T]:
    """``items`` one at a time while every rank of ``group`` has one, for a loop whose every
    step is a collective: each step the ranks count who has an item (one all-reduce) — all:
    it is yielded; none: the loop ends; some: a ValueError on every rank, where the ranks with
    more would otherwise wait for the others forever. Without a group, ``items`` as they are."""
    done = object()
    it = iter(items)
    while True:
        item = next(it, done)
        if group is None:
            if item is done:
                return
        else:
            has = torch.tensor([float(item is not done)], device=collective_device(group, device))
            count = int(all_reduce_sum(has, group)[0])
            if count == 0:
                return
            world = world_size(group)
            if count < world:
                raise ValueError(
                    f"{what} ran out on {world - count} of {world} ranks before "
                    "the others: every rank must pass the same number of batches (each is "
                    "measured by all ranks together)"
                )
        yield item  # type: ignore[misc]  # not `done`: checked above


def world_size(group: Any) -> int:
    import torch.distributed as dist

    return int(dist.get_world_size(group))


def check_same_on_ranks(
    group: Any, device: Any = "cpu", *, call: str | None = None, **fields: Any
) -> None:
    """Raise the same clear error on every rank when the ranks' operators differ in any field
    (or, given ``call``, when the ranks made that call with different arguments).

    Each field is reduced to a number — integers as they are, a tensor by a CRC-32 of its bytes,
    a ``torch.Generator`` by one of its state, anything else by one of its ``repr`` — and one
    all-reduce of (x, −x) with MAX gives every rank the maxima and minima: a field differs
    somewhere exactly where they differ. Run before any collective whose size or meaning
    depends on the fields (a mismatched all-reduce aborts gloo; products of different vectors
    summed over the ranks are silently wrong). The first number names the call itself, and
    every check reduces :data:`_SLOTS` numbers whatever it compares: ranks that make different
    calls at once (``cs.eigenvalues`` on one, ``cs.trace`` on another) get this error too, not
    an all-reduce of mismatched sizes (SIGABRT in gloo) nor a check that happens to pass.
    """
    if group is None:
        return
    import torch.distributed as dist

    x = torch.tensor(_fingerprint(call, fields), dtype=torch.float64)
    both = torch.cat([x, -x])
    doing = f"calls {call}" if call else "builds the same operator"
    both = _collective(
        both.to(collective_device(group, device)),
        lambda out: dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group),
        f"checking that every rank {doing} failed — another rank has failed or is not doing "
        "the same now",
    )
    high, low = both[:_SLOTS].cpu(), -both[_SLOTS:].cpu()
    if high[0] != low[0]:
        raise ValueError(
            "the ranks made different calls at once: this rank called "
            f"{call if call else 'cs.Curvature (building the operator)'}, another rank "
            "something else. Under a process group every rank takes each product together, so "
            "every rank must make the same calls in the same order — the same arguments, the "
            "same integer seed (not one per rank) and the same vectors"
        )
    names = list(fields)
    if len(names) > _SLOTS - 1:  # the fields that share the last slot
        names[_SLOTS - 2 :] = [", ".join(names[_SLOTS - 2 :])]
    used = slice(1, 1 + len(names))
    differ = [n for n, hi, lo in zip(names, high[used], low[used], strict=True) if hi != lo]
    if not differ:
        return
    differ = [name for part in differ for name in part.split(", ")]
    verb = "differs" if len(differ) == 1 else "differ"
    mine = ", ".join(
        f"{name}={_shown(fields[name])}" for name in differ if name not in ("params", "values")
    )
    if "params" in differ:
        mine += (", " if mine else "") + f"{len(fields['params'])} parameter tensors"
    if "values" in differ:  # build the model from one seed on every rank, or broadcast it
        mine += (", " if mine else "") + "the parameters' values differ"
    if call is not None:
        raise ValueError(
            f"the ranks called {call} differently: {', '.join(differ)} {verb} between ranks "
            f"(this rank: {mine}). Under a process group every rank takes each product "
            "together, so every rank must make the same call — the same arguments, the same "
            "integer seed (not one per rank) and the same vectors: otherwise the products sum "
            "different vectors over the ranks (the results are wrong) or the ranks wait for "
            "each other until the group's timeout"
        )
    raise ValueError(
        f"the ranks built different curvature operators: {', '.join(differ)} {verb} between "
        f"ranks (this rank: {mine}). Every rank must build the same Curvature — the same "
        "model, parameters, dtype, kind and seed — over its own shard of the data"
    )


#: how many numbers :func:`check_same_on_ranks` reduces: the call's, then one a field (fields
#: past the last slot share it)
_SLOTS = 16


def _fingerprint(call: str | None, fields: dict[str, Any]) -> list[float]:
    """The :data:`_SLOTS` numbers of a call and its fields (zeros after the last field)."""
    codes = [_code(value) for value in fields.values()]
    if len(codes) > _SLOTS - 1:
        codes[_SLOTS - 2 :] = [float(zlib.crc32(repr(codes[_SLOTS - 2 :]).encode()))]
    return [_code(call or "cs.Curvature"), *codes] + [0.0] * (_SLOTS - 1 - len(codes))


def _code(value: Any) -> float:
    """A number that differs between two values that differ (up to CRC-32 collisions): a real
    number by its value (``3``, ``3.0`` and ``numpy.int64(3)`` alike), a tensor by a CRC-32 of
    its bytes (read in place on the host: no copy), anything else by one of its ``repr``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        exact = float(value)
        if exact == value and abs(exact) < 2**52:  # NaN, huge integers: by their repr below
            return exact
    if isinstance(value, torch.Generator):
        value = value.get_state()
    if isinstance(value, Tensor):
        raw = value.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy()
        return float(zlib.crc32(raw.data) ^ zlib.crc32(repr((value.shape, value.dtype)).encode()))
    return float(zlib.crc32(repr(value).encode()))


#: The settings of torch's losses that change what they compute (the ranks compare them)
LOSS_SETTINGS = (
    "reduction",
    "ignore_index",
    "label_smoothing",
    "delta",
    "beta",
    "margin",
    "p",
    "eps",
    "log_input",
    "full",
    "blank",
    "zero_infinity",
    "swap",
    "log_target",
)


def loss_signature(loss_fn: Any, group: Any) -> str:
    """What a loss computes, for the ranks of ``group`` to compare: its type, and for torch's
    own losses their settings (:data:`LOSS_SETTINGS`) and class weights by value. A loss of
    one's own is compared by its type only: its attributes may be per-rank bookkeeping (a
    logged value, a counter), which is no difference in what it computes (a review)."""
    if group is None:
        return "one process"
    name = getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__)
    if not type(loss_fn).__module__.startswith("torch.nn.modules.loss"):
        return name
    settings = [(k, getattr(loss_fn, k)) for k in LOSS_SETTINGS if hasattr(loss_fn, k)]
    weights = [
        (k, _code(t))
        for k in ("weight", "pos_weight")
        if isinstance(t := getattr(loss_fn, k, None), Tensor)
    ]
    return repr((name, settings, weights))


def values_signature(params: list[Tensor], group: Any) -> Tensor | str:
    """The parameters' values, for the ranks of ``group`` to compare: each tensor's bits as
    32-bit words, summed as integers (all of them, and every other one) — exact, so the same on
    every rank whatever its thread count or device (float sums rounded otherwise: identical
    parameters refused on ranks with other thread counts, a review), and one pass over them on
    their device, only under a process group. Sharded parameters (FSDP2's DTensors, a ZeRO-3
    partition) hold other entries on each rank by design: not compared."""
    if group is None:
        return "one process"
    from curvscope.derivatives.zero3 import is_dtensor, is_partitioned  # (zero3 imports this)

    if any(is_dtensor(p) or is_partitioned(p) for p in params):
        return "sharded"
    sums = []
    with torch.no_grad():
        for p in params:
            raw = p.detach().contiguous().reshape(-1).view(torch.uint8)
            words = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw
            sums.append(
                torch.stack([words.sum(dtype=torch.int64), words[::2].sum(dtype=torch.int64)])
            )
    return torch.stack(sums)


def _shown(value: Any) -> str:
    """A field's value as the error shows it (a tensor or generator by what it is, not its
    entries)."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, torch.Generator):
        return f"a torch.Generator with seed {value.initial_seed()}"
    return repr(value)


def together(check: Callable[[], T], group: Any, device: torch.device) -> T:
    """``check()``'s result, or its error raised on *every* rank of ``group`` (None: just
    ``check()``): a check that fails on one rank alone — its shard of a vector, a loss that is
    not finite on its batch — would otherwise leave the others waiting in the next collective
    until the process group's timeout. ``check`` must not itself communicate. The ranks whose
    check passed raise a ValueError naming the ranks that failed."""
    if group is None:
        return check()
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    error: Exception | None = None
    try:
        result = check()
    except Exception as e:  # any error: the others must hear of it
        error = e
    failed = torch.zeros(world, device=device)
    if error is not None:
        failed[rank] = 1.0
    failed = all_reduce_sum(failed, group)
    if error is not None:
        raise error
    if bool(failed.any()):
        which = ", ".join(str(i) for i in torch.nonzero(failed).flatten().tolist())
        raise ValueError(
            f"rank {which} failed (this is rank {rank}), and every rank stops with it: that "
            "rank's error names the problem"
        )
    return result
