"""The model objective: the mean loss of ``loss_fn(model(inputs), targets)`` over a dataset, as a
function of (a subset of) the parameters — evaluated without touching the user's model.

Every forward pass goes through ``torch.func.functional_call`` with parameter tensors of our
own, so the user's parameters, ``.grad`` buffers and ``requires_grad`` flags are never written.
The rest of the model's state is protected as follows:

- **training flag**: never switched; the curvature is that of the mode the model is in.
- **buffers** are passed as copies, so an in-place update lands on the copy: BatchNorm in
  train mode normalises with batch statistics (that *is* the training loss) and updates
  copies of its running statistics, not yours.
- **randomness** (dropout): each batch is evaluated under a fixed seed derived from the
  operator's seed and the batch index, so every product sees the same mask (the operator is a
  fixed linear map), and the global RNGs are put back as found (:mod:`curvscope.derivatives.rng`).
- **the data**: every pass over a loader sees the same batches in the same order. The loader's
  randomness (the sampler's permutation, the workers' base seed, the loader's or sampler's own
  ``generator``, and main-process augmentation drawing from torch's, numpy's or Python's global
  RNG) is seeded per operator for the pass and restored after it. Each batch's fingerprint is
  recorded on the first pass and checked on every later one, so data that still varies (a
  dataset with an RNG of its own, workers that keep their state across epochs) is refused
  instead of silently changing the operator.
- **fused kernels without second derivatives**: scaled-dot-product attention runs on its math
  backend and cuDNN is disabled during our forward passes, so double backward and forward-mode
  AD work through transformers and RNNs.

Batches are ``(inputs, targets)`` pairs or dicts holding ``labels`` (the rest of the dict is the
model's keyword arguments). ``loss_fn=None`` means the model computes its own loss (a Hugging
Face model: :mod:`curvscope.derivatives.huggingface` adapts it to the rest).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import operator
import os
import sys
import warnings
from collections.abc import Callable, Container, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.nn.utils import parametrize

from curvscope.derivatives import rng
from curvscope.derivatives.checks import (
    PACKAGE,
    all_finite,
    callers_level,
    check_scalar_loss,
    check_seed,
)
from curvscope.derivatives.flat import flatten, map_tensors, tensors, unflatten
from curvscope.derivatives.huggingface import HuggingFaceLoss
from curvscope.derivatives.rng import kept_rngs, rng_states, seed_rngs, set_rng_states
from curvscope.derivatives.seeding import DATA, FORWARD
from curvscope.derivatives.substitutes import (
    WEIGHT_NORM_NOTE,
    WrittenOutWeightNorm,
    uses_weight_norm,
)
from curvscope.derivatives.zero3 import full_shape, is_dtensor

logger = logging.getLogger(__name__)

#: how many rows of a batch the check that a mean is over them reads (:meth:`ModelObjective.
#: _check_reduction_over_rows`): one loss on them all and one on each
ROWS_CHECKED = 8
#: the most batches data without a length may yield before it is refused as endless: a
#: DataLoader over an IterableDataset that repeats forever made Curvature, diagnose and the
#: Monitor loop without a word (an outside review); every product passes over all of them
MAX_UNSIZED_BATCHES = 10_000
#: reductions over samples a loss may have; "mean" averages the samples of a batch, "sum" adds
REDUCTIONS = ("mean", "sum")


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The torch generators a loader draws its shuffling and worker seeds from."""
    found: dict[int, torch.Generator] = {}
    for owner in (
        loader,
        getattr(loader, "sampler", None),
        getattr(loader, "batch_sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator):
            found[id(g)] = g
    return list(found.values())


def _sized(data: Any) -> bool:
    """Whether ``len(data)`` answers (a DataLoader over an IterableDataset raises TypeError)."""
    try:
        len(data)
    except TypeError:
        return False
    return True


def check_passes(data: Iterable[Any], name: str, why: str) -> None:
    """Refuse an iterator (a generator, ``zip``, ``map``) where ``data`` is passed over more
    than once, naming ``name``, ``why`` and the fix. (An iterable whose ``__iter__`` returns a
    spent iterator shows itself at its second pass: :meth:`ModelObjective._check_repeatable`
    — asking ``iter`` here twice opened a wrapped loader's workers twice, outside the passes'
    RNG protection: a review.)"""
    if isinstance(data, Iterator):
        raise TypeError(
            f"{name} is a one-shot iterator (a generator, zip or map?), but {why}; pass a "
            "list of (inputs, targets) pairs or a DataLoader"
        )


def fixed_pass(data: Iterable[Any], seed: int) -> Iterator[Any]:
    """One pass over ``data`` with a loader's randomness (shuffling, worker seeds, main-process
    augmentation) drawn from ``seed`` and the user's RNG states left as found — the same
    batches for the same seed. A list or tuple is iterated as it is; a loader with persistent
    workers through a copy of its own (:func:`own_loader`)."""
    if isinstance(data, (list, tuple)):
        return iter(data)
    data = own_loader(data)
    return _PassRandomness(_loader_generators(data), DATA.seed(seed)).iterate(data)


def own_loader(data: Any) -> Any:
    """A ``persistent_workers`` DataLoader as a shallow copy of curvscope's own, other
    loaders as they are. ``iter()`` of such a loader resets the one iterator it keeps — the
    one the user's loop is consuming: a Monitor given the training loader as
    ``train_batches`` cut the user's epochs to 5 and 4 steps of 10, and an operator built on
    one took the workers' one-time base seed off the user's stream, so the user's epochs came
    in another order (an outside review). The copy shares the dataset, the sampler and the
    generator (switched and put back around each step); it is made once a loader (kept on it,
    :data:`_OWN`: a copy a pass started workers for every Monitor probe, 2.5 s each under
    ``spawn``: the second diff review), and its workers are started at once under the user's
    RNG states, put back (:func:`_start_workers`). A wrapper around such a loader is not seen."""
    if not (
        isinstance(data, torch.utils.data.DataLoader)
        and data.persistent_workers
        and data.num_workers > 0
    ):
        return data
    held = data.__dict__.get(_OWN)
    mine = None if held is None else held.loader
    if mine is None:
        mine = copy.copy(data)
        mine.__dict__.pop(_OWN, None)
        mine._iterator = None
        _start_workers(mine)
        data.__dict__[_OWN] = _Own(mine)  # (not a setattr: DataLoader refuses some after init)
    return mine


#: where a persistent loader keeps curvscope's copy of it (:func:`own_loader`): on the loader,
#: so that both go together — a map from loaders to their copies kept a loader alive, and its
#: workers, where the copy refers back to it (a ``collate_fn`` bound to the loader: the third
#: diff review)
_OWN = "_curvscope_own_loader"


class _Own:
    """curvscope's copy of a loader, as the loader holds it: left out of a copy or a pickle of
    the loader (its live workers cannot be pickled: ``copy.deepcopy`` and ``pickle`` of a loader
    curvscope had used raised, and so did the first pass of a ``spawn`` loader whose
    ``collate_fn`` is bound to it, which pickles the loader: the fourth diff review)."""

    __slots__ = ("loader",)

    def __init__(self, loader: Any = None) -> None:
        self.loader = loader

    def __reduce__(self) -> tuple[Any, ...]:  # (copy.copy and copy.deepcopy read it too)
        return (_Own, ())


def _start_workers(loader: Any) -> None:
    """Create a ``persistent_workers`` loader's iterator once, under the user's RNG states
    (put back), so that every pass of curvscope's is a reset of it. Otherwise the first pass
    would draw the workers' base seed and then the sampler's permutation, and the later passes
    (resets) only the permutation: the first pass's order would differ from all others.
    Through DataLoader's own ``__iter__``: a subclass whose ``__iter__`` is a generator starts
    nothing when called (the first pass then drew the base seed, refused as data that changed:
    the second diff review)."""
    with kept_rngs([*_loader_generators(loader), torch.random.default_generator]):
        torch.utils.data.DataLoader.__iter__(loader)


#: an embedding's flags that :meth:`ModelObjective.context` turns off during curvscope's passes
_EMBEDDING_FLAGS = ("sparse", "scale_grad_by_freq")


def _check_distributed_sampler(loader: Any) -> None:
    """Refuse a loader whose ``DistributedSampler`` repeats samples to give every rank as many
    (its default) or drops some (``drop_last=True``): the ranks' shards together would not be the
    dataset, and the curvature of the global mean over them is of other data (23 samples on two
    ranks: the loss 3% off, the gradient 22%, products 12%, without a word: an outside review)."""
    from torch.utils.data import DistributedSampler

    batches = getattr(loader, "batch_sampler", None)
    for sampler in (getattr(loader, "sampler", None), getattr(batches, "sampler", None)):
        if not isinstance(sampler, DistributedSampler):
            continue
        n, total = len(sampler.dataset), sampler.total_size  # type: ignore[arg-type]
        if total == n:
            return
        how = (
            f"repeats {total - n} of its {n} samples"
            if total > n
            else f"drops {n - total} of its {n} samples (drop_last=True)"
        )
        raise ValueError(
            f"the loader's DistributedSampler {how} so that each of its {sampler.num_replicas} "
            "ranks gets as many: over the ranks together that is not the dataset, and the "
            "curvature would be of other data. Give each rank its shard without repeats — "
            "DataLoader(Subset(dataset, range(rank, len(dataset), world_size)), ...): curvscope "
            "weighs uneven shards by their sizes — or a dataset whose size the world size divides"
        )


class DataChangedError(ValueError):
    """The data of a pass differ from the first pass: the operator would not be one matrix."""


class _PassRandomness:
    """The randomness of one pass over a loader, fixed by a seed and kept apart from the user's.

    A loader draws its shuffling and its workers' base seed from its ``generator`` (or its
    sampler's), else from torch's global RNG, and main-process augmentation draws from torch's,
    numpy's or Python's global RNG. Around each step of the loader's iterator — and only there —
    these are switched to this pass's states (seeded on the first step) and back to the
    user's, so the user's states are never left changed, even when a product fails mid-pass.
    """

    def __init__(self, generators: list[torch.Generator], seed: int) -> None:
        self.gens = [*generators, torch.random.default_generator]
        self.seed = seed
        self.state: tuple[Any, ...] | None = None  # (torch states, numpy, python) of the pass

    def step(self, fn: Any) -> Any:
        with rng.LOCK:
            user = rng_states(self.gens)
            try:
                if self.state is None:
                    seed_rngs(self.gens, self.seed)
                else:
                    set_rng_states(self.gens, self.state)
                return fn()
            finally:
                self.state = rng_states(self.gens)
                set_rng_states(self.gens, user)

    def iterate(self, data: Any) -> Iterator[Any]:
        it = self.step(lambda: iter(data))
        done = object()
        while (item := self.step(lambda: next(it, done))) is not done:
            yield item


class ParameterWriteWarning(UserWarning):
    """A model's forward wrote into its parameters in place during a curvature product
    (:meth:`ModelObjective._written_in_forward`) — a clamp, ``nn.Embedding(max_norm=...)``
    (whose renormalisation counts as a write even where no row changes)."""


def refuse_complex(named: Iterable[tuple[str, Tensor]]) -> None:
    """Refuse a complex parameter among ``named``: its products were right, but Lanczos, trace
    and diagnose read complex vectors as real (λ 0.840 for 0.643, "converged": an outside
    review)."""
    for name, p in named:
        if p.is_complex():
            raise TypeError(
                f"{name!r} is a complex parameter ({p.dtype}); curvscope measures real "
                "parameters only (a real loss of complex weights curves in their real and "
                "imaginary parts): hold it as a real parameter with a last dimension of 2 and "
                "rebuild it in the forward with torch.view_as_complex, or leave it out with "
                "params="
            )


class AttributeWriteWarning(UserWarning):
    """A model's forward writes in place into a tensor held as a plain attribute, not a buffer
    (:meth:`ModelObjective._attributes_written`): curvscope's forwards write into copies, where
    they can (not a view of another tensor: then into yours, said)."""


def tensor_attributes(model: nn.Module) -> list[tuple[str, nn.Module, str, Tensor]]:
    """The tensors the model's modules hold as plain attributes (neither parameters nor
    buffers) that a forward could update in place: (name, module, attribute, tensor). Dense
    ones only — not an inference tensor (no version counter; made under inference_mode, as a
    cache filled by a validation pass is), nor a sparse one (a graph's adjacency: no storage
    to compare). Both raised from every product where a review held one."""
    return [
        (f"{name}.{key}" if name else key, mod, key, value)
        for name, mod in model.named_modules()
        for key, value in plain_tensors(mod)
    ]


#: tensors swapped for copies: (the dict holding it — a module's ``__dict__`` for a plain
#: attribute, its ``_buffers`` for a buffer —, the key, the original, the copy); or slots held
#: (:func:`_as_found`): the copy None, the original :data:`_ABSENT` where there was none
_Swapped = list[tuple[dict[str, Any], str, Any, "Tensor | None"]]

#: a slot that held nothing (:func:`_as_found`)
_ABSENT = object()

_T = TypeVar("_T")


def _as_found(slots: Sequence[tuple[str, nn.Module, str]], swapped: _Swapped) -> _Swapped:
    """The modules' attributes ``slots`` (name, module, attribute) set back to what they held
    before the first of ``swapped`` (a pass's: :meth:`ModelObjective._call`) that replaced
    them — the user's, which its forwards never write — and left as they are where none did.
    Returns what :func:`_swap_back` puts back: each as it is now."""
    first: dict[tuple[int, str], Any] = {}
    for where, key, t, _ in swapped:
        first.setdefault((id(where), key), t)
    back: _Swapped = []
    for _, mod, key in slots:
        where = mod.__dict__
        back.append((where, key, where.get(key, _ABSENT), None))
        if (id(where), key) in first:
            _put(where, key, first.pop((id(where), key)))
    return back


def bindings_unchanged(before: list[tuple[Any, ...]], now: list[tuple[Any, ...]]) -> bool:
    """Whether each module's attributes (:meth:`ModelObjective.model_state`'s bindings) are
    bound to the same objects as ``before``: by identity, in C (a value compared by equality
    would be a tensor's elementwise ``==``)."""
    return len(before) == len(now) and all(
        len(a) == len(b) and all(map(operator.is_, a, b)) for a, b in zip(before, now, strict=True)
    )


@dataclass
class _Recomputes:
    """Whether a graph's backward passes recompute a block (a module's forward runs in them:
    :meth:`ModelObjective._as_left`); None until its first backward."""

    recomputes: bool | None = None


class _Recomputation:
    """Watches a backward pass for a block recomputed in it (a module's forward running there:
    activation checkpointing) that sets the attributes of ``swapped`` to other values than
    they hold as it starts (:meth:`ModelObjective.backward_state`). A backward hook that sets
    one is no recomputation (its note named checkpointing on a model without any: the diff
    review)."""

    def __init__(self, swapped: _Swapped) -> None:
        # each slot's value as the backward starts: a copy's original (what the forward left),
        # or what was put there (a copy comes after what was put in its slot: it wins)
        self.start = {
            (id(where), key): (where, key, _at(where, key) if mine is None else t)
            for where, key, t, mine in swapped
        }
        self.forwards = 0

    def __enter__(self) -> None:
        self.handle = register_module_forward_pre_hook(self._counted)

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()

    def _counted(self, *_: object) -> None:
        self.forwards += 1

    def moved(self) -> set[tuple[int, str]]:
        """The slots (their dict's id, the key) set otherwise, if a forward ran — not one
        deleted (a backward hook that frees what a forward hook stored, outside the recomputed
        block, was named: the diff review)."""
        if not self.forwards:
            return set()
        return {
            s
            for s, (where, key, t) in self.start.items()
            if key in where and _differs(where[key], t)
        }


def _among(slot: Sequence[Any], slots: Iterable[tuple[str, nn.Module, str]]) -> bool:
    """Whether a module's attribute ``slot`` (name, module, attribute, …) is one of ``slots``:
    the same module's same attribute."""
    return any(m is slot[1] and key == slot[2] for _, m, key in slots)


def _differs(a: Any, b: Any) -> bool:
    """Whether two attribute values differ: tensors by value, plain values by equality,
    anything else by identity."""
    if a is b:
        return False
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b)
    return not (type(a) is type(b) and type(a) in (bool, int, float, str) and a == b)


def _copyable(
    attributes: list[tuple[str, nn.Module, str, Tensor]], model: nn.Module
) -> list[tuple[str, nn.Module, str]]:
    """The plain tensor attributes a forward can be given copies of: not one that views another
    tensor or shares its storage with another attribute, a parameter or a buffer (a copy would
    part it from what it views: a slot of a table, written, then the table read)."""
    shared = _storages([t for *_, t in attributes], model)
    return [
        (k, mod, key)
        for k, mod, key, t in attributes
        if t._base is None and shared.get(storage_of(t), 1) == 1
    ]


def _written_error() -> DataChangedError:
    """The data written in place since the operator was built (:meth:`ModelObjective.
    check_unchanged_data`)."""
    return DataChangedError(
        "the data was changed since this operator was built (a tensor of it written in "
        "place): its products would mix the old data, "
        "which the cached graphs and the first pass hold, with the new. A curvature "
        "operator is one fixed matrix: build a new Curvature on the new data (or pass "
        "copies, e.g. [(X.clone(), y.clone())], to keep measuring the old)"
    )


def _dataset_tensors(loader: Any) -> list[Tensor]:
    """The tensors a loader's dataset holds as attributes — a ``TensorDataset``'s, a dataset of
    your own's ``self.X``, through ``Subset``, ``ConcatDataset``, ``StackDataset`` and any
    dataset held by another — whose versions tell when its batches are read again
    (:meth:`ModelObjective.check_unchanged_data`: a kept operator over a loader did not read it
    again, and a dataset written in place gave the old data's products, 32% off: an outside
    review's sequence fuzzing). Plain lists, tuples and dicts of up to
    :data:`DATASET_WALK_LIMIT` items are looked into, each once (a dict holding itself hung the
    walk; a lazy mapping read every value at each product, and a list of 20,000 samples cost a
    walk over them: the second diff review): beyond, a dataset is read through its batches."""
    found: dict[int, Tensor] = {}
    seen: set[int] = set()
    stack: list[Any] = [getattr(loader, "dataset", None)]
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            found.setdefault(id(item), item)
        elif id(item) in seen:
            continue
        elif type(item) in (list, tuple, dict) and len(item) <= DATASET_WALK_LIMIT:
            seen.add(id(item))
            stack += item.values() if isinstance(item, dict) else item
        elif isinstance(item, torch.utils.data.Dataset):
            seen.add(id(item))
            stack += vars(item).values()
    return list(found.values())


#: the longest list, tuple or dict of a dataset's attributes whose tensors are read
DATASET_WALK_LIMIT = 64


def _counting(loss_fn: Any) -> tuple[Any, Any, Tensor | None]:
    """What a loss's batches are weighed by (:meth:`ModelObjective._check_loss_settings`): its
    reduction, ``ignore_index`` and class weights (the loss's own tensor)."""
    weight = getattr(loss_fn, "weight", None)
    return (
        getattr(loss_fn, "reduction", None),
        getattr(loss_fn, "ignore_index", None),
        weight.detach() if isinstance(weight, Tensor) else None,
    )


def _same_weights(a: Tensor | None, b: Tensor | None) -> bool:
    """Whether two class weights (or their absence) are the same values."""
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(torch.equal(a, b))


def _names_of(
    model: nn.Module,
    selected: Mapping[str, Tensor],
    named: Mapping[str, Tensor] | None = None,
) -> list[list[str]]:
    """Each selected parameter's names in ``model`` (all that hold that object: a tied weight's
    every name), in order: where a tie is undone or made the lists change."""
    if named is None:
        named = dict(model.named_parameters(remove_duplicate=False))
    names: dict[int, list[str]] = {}
    for k, p in named.items():
        names.setdefault(id(p), []).append(k)
    return [names.get(id(p), [k]) for k, p in selected.items()]


def _written_back(state: Mapping[str, Any], params: list[tuple[str, Tensor]]) -> bool:
    """What a batch's first forward wrote into the copies of parameters an earlier batch was
    seen writing (:meth:`ModelObjective._written_in_forward`), written into the user's, as
    the user's own pass over the batches writes them: an ``nn.Embedding(max_norm=...)`` tied
    to the output layer renormed the first batch's rows alone, each later batch its own in a
    copy, and the operator was at no one point (λ_max 6.20 for one batch's 9.48 on the same
    data: an outside review's fuzzing). Only where the values differ: a write-back bumps the
    version, and the next pass learns anew (:meth:`ModelObjective._pass_begins`). Returns
    whether it wrote."""
    wrote = False
    with torch.no_grad():
        for k, p in params:
            passed = state.get(k)
            if is_dtensor(p) or not isinstance(passed, Tensor):  # (a shard: left as it is)
                continue
            if not torch.equal(passed, p):
                p.copy_(passed)
                wrote = True
    return wrote


def _written(
    held: list[tuple[tuple[str, nn.Module, str, Tensor], int]], copies: _Swapped
) -> list[tuple[str, nn.Module, str, Tensor]]:
    """The plain tensor attributes (of ``held``, with their versions before) a forward wrote in
    place: into the user's (one it could not copy), or into its copy (of ``copies``: a fresh
    clone's version is 0)."""
    into = {
        (id(where), key) for where, key, _, mine in copies if mine is not None and mine._version
    }
    return [a for a, v in held if a[3]._version != v or (id(vars(a[1])), a[2]) in into]


#: a module's hook dicts whose handles the cache's check reads (:meth:`ModelObjective.
#: model_state`): a hook registered, or swapped for another, between two products was not
#: seen, 37–287% off (the diff reviews); each handle has a number of its own
_HOOKS_READ = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")

#: a module's dicts a forward may register things in, each put back as found after it: the
#: hooks a forward or its backward runs, the forward hooks' options (keyed by the same
#: handles), and its submodules (one a forward creates at its first call: put back as its
#: parent's attribute, it was stripped and the model broken, the third diff review)
_HOOK_DICTS = (
    *_HOOKS_READ,
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_modules",
)


def _hook_handles(found: Mapping[str, Any]) -> tuple[int, ...]:
    """The handles of a module's hooks (:data:`_HOOKS_READ`), each dict's size first, from its
    attributes ``found``; spelt out: the cache's check and each pass read it, and most modules
    have none."""
    a, b = found.get("_forward_hooks", ()), found.get("_forward_pre_hooks", ())
    c, d = found.get("_backward_hooks", ()), found.get("_backward_pre_hooks", ())
    if a or b or c or d:
        return (len(a), *a, len(b), *b, len(c), *c, len(d), *d)
    return ()


def _global_hooks() -> list[int]:
    """The handles of the hooks registered for every module (``register_module_forward_hook``
    and its kin), for the cache's check: each dict's size, then its handles."""
    found: list[int] = []
    for name in _HOOKS_READ:  # (``_global_forward_hooks`` beside a module's ``_forward_hooks``)
        hooks = getattr(torch.nn.modules.module, f"_global{name}", {})
        found.append(len(hooks))
        found += hooks
    return found


def _hook_dicts(mod: nn.Module) -> list[dict[Any, Any]]:
    """A module's dicts of hooks and submodules (:data:`_HOOK_DICTS`)."""
    found = (vars(mod).get(name) for name in _HOOK_DICTS)
    return [d for d in found if isinstance(d, dict)]


def _changed_keys(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys of a module's attributes that hold another object ``now`` than ``before``
    (created or deleted ones too)."""
    changed = [k for k, v in now.items() if before.get(k, _ABSENT) is not v]
    added = sum(1 for k in changed if k not in before)
    if len(now) - added != len(before):  # some were deleted
        changed += [k for k in before if k not in now]
    return changed


def _restore(found: dict[int, dict[str, Any]], model: nn.Module) -> _Swapped:
    """What :func:`_swap_back` puts back to leave every module's attributes as ``found`` (by
    the module's id; a key created since removed)."""
    return [  # (a module created since: no attributes of its own to put back)
        (vars(mod), key, found[id(mod)].get(key, _ABSENT), None)
        for mod in model.modules()
        if id(mod) in found
        for key in _changed_keys(found[id(mod)], vars(mod))
    ]


def attributes_as_found(model: nn.Module) -> Callable[[], None]:
    """A function that puts every module's attributes back as they are now (a key created
    since removed, one deleted put back) and removes the hooks registered since: for a backend
    that runs the model's own forward (finite differences), as :meth:`ModelObjective._call`
    does for curvscope's own forwards."""
    found = {id(mod): dict(vars(mod)) for mod in model.modules()}
    hooks = [(d, dict(d)) for mod in model.modules() for d in _hook_dicts(mod)]

    def put_back() -> None:
        _swap_back(_restore(found, model), kept=False)
        _dicts_back(hooks)

    return put_back


def _dicts_back(saved: Iterable[tuple[dict[Any, Any], dict[Any, Any]]]) -> list[dict[Any, Any]]:
    """Each of a module's hook and submodule dicts (:func:`_hook_dicts`) whose keys or what
    they hold changed since it was ``saved`` (the dict, a copy) put back as it was; returns
    those. (A forward that assigns a new submodule under an old name, ``self.act =
    nn.Tanh()``, left it in the user's model in place of theirs, and each pass learned anew:
    the diff review.)"""
    changed = []
    for d, was in saved:
        if d.keys() != was.keys() or any(d[k] is not v for k, v in was.items()):
            changed.append(d)
            d.clear()
            d.update(was)
    return changed


def _put(where: dict[str, Any], key: str, value: Any) -> None:
    """``where[key] = value``, or no ``key`` for :data:`_ABSENT`."""
    if value is _ABSENT:
        where.pop(key, None)
    else:
        where[key] = value


def _swap(slots: Iterable[tuple[dict[str, Any], str]]) -> _Swapped:
    """The tensors in ``slots`` (a dict and a key each) set to copies — one copy of a tensor two
    slots hold (two copies parted what one module wrote from what the other read: 21% off, the
    third diff review). A slot that holds no dense tensor is left alone. Returns what
    :func:`_swap_back` puts back."""
    copies: dict[int, Tensor] = {}
    swapped: _Swapped = []
    for where, key in slots:
        t = _at(where, key)
        if isinstance(t, Tensor) and t.layout == torch.strided and not t.is_inference():
            if id(t) not in copies:
                copies[id(t)] = t.clone()
            swapped.append((where, key, t, copies[id(t)]))
            where[key] = copies[id(t)]
    return swapped


def _swap_in(held: Sequence[tuple[str, nn.Module, str]]) -> _Swapped:
    """The modules' plain tensor attributes ``held`` (name, module, attribute) set to copies
    (:func:`_swap`)."""
    return _swap((mod.__dict__, key) for _, mod, key in held)


def _buffer_copies(model: nn.Module) -> _Swapped:
    """Every buffer of the model set to a copy (:func:`_swap`)."""
    return _swap((mod._buffers, key) for mod in model.modules() for key, _ in mod._buffers.items())


def _swap_back(swapped: _Swapped, kept: bool = True) -> None:
    """The originals :func:`_swap` replaced, put back — with ``kept``, only where the copy is
    still there: an attribute the forward set anew (``self.aux_loss = ...``, which a loss may
    read after it) keeps the forward's value, as without the copy (functional_call, which swaps
    such names too, put the old one back: the diff review)."""
    for where, key, t, mine in swapped:
        if not kept or mine is None or _at(where, key) is mine:
            _put(where, key, t)


def _at(where: Any, key: str) -> Any:
    """``where[key]``, None where there is none (a TorchScript module's ``_buffers`` has no
    ``get``, and is iterated by its items only)."""
    return where[key] if key in where else None  # noqa: SIM401  (no get: above)


def storage_of(t: Tensor) -> int:
    """Where a tensor's memory starts: a view and what it views, and tensors sharing one
    storage, have the same."""
    return t.untyped_storage().data_ptr()


def _storages(attributes: list[Tensor], model: nn.Module) -> dict[int, int]:
    """How many of the model's distinct tensors — plain attributes, parameters, buffers —
    use each storage."""
    tensors = {id(t): t for t in [*attributes, *model.parameters(), *model.buffers()]}
    counts: dict[int, int] = {}
    for t in tensors.values():
        if t.layout == torch.strided and t.device.type != "meta":
            counts[storage_of(t)] = counts.get(storage_of(t), 0) + 1
    return counts


def plain_tensors(mod: nn.Module) -> list[tuple[str, Tensor]]:
    """One module's tensors of :func:`tensor_attributes`: (attribute, tensor)."""
    return [
        (key, value)
        for key, value in vars(mod).items()
        if isinstance(value, Tensor)
        and not isinstance(value, nn.Parameter)
        and value.layout == torch.strided
        and not value.is_inference()
    ]


@dataclass(frozen=True)
class Batch:
    """One batch, moved to the parameters' device, and its place in the data.

    ``targets`` are what ``loss_fn(outputs, targets)`` takes (with ``loss_fn=None``, the labels
    as the model's loss compares them with the logits: shifted and flattened for a causal LM);
    ``labels`` the labels as the model takes them (``targets`` unless adapted); ``size`` what a
    mean-reduced loss averages over in this batch — its samples; for torch's mean cross-entropy
    its counted labels (:func:`counted_labels`); with ``loss_fn=None`` its target tokens for a
    language model — which weighs the batch in the mean over all the data.
    """

    index: int
    inputs: Any
    targets: Tensor
    size: float
    labels: Any = None


def _refuse_ignored_labels(t: Any) -> None:
    """A function's mean over class labels with an ignore_index (labels of one negative value,
    −2 or below, or −1 beside class 0: ±1 targets are not that) is over the counted labels,
    which curvscope cannot count through a function: weighed by rows, batches with more ignored
    labels than others were 6% off in the sharpness, 14% in the gradient's norm, without a
    word (an outside review)."""
    if not isinstance(t, Tensor) or t.is_floating_point() or t.is_complex():
        return
    negative = t[t < 0]
    if not negative.numel() or bool((negative != negative[0]).any()):
        return
    ignored = int(negative[0])
    if ignored == -1 and not bool((t == 0).any()):
        return
    raise ValueError(
        f"loss_fn does not declare its reduction and the labels hold {ignored} (an "
        "ignore_index?): its mean is over the counted labels, which curvscope cannot count "
        "through a function to weigh the batches. Pass it as nn.CrossEntropyLoss(ignore_index="
        "...) or nn.NLLLoss, whose counted labels weigh the batches; if these are not ignored "
        "labels, pass reduction='mean' or 'sum' (--reduction on the command line)"
    )


def _torch_reduction(loss_fn: object) -> str | None:
    """A torch loss's own ``reduction``, where its ``forward`` is torch's (one of your own that
    subclasses ``nn.modules.loss._Loss`` inherits ``reduction="mean"`` whatever it computes:
    the diff review); None otherwise."""
    forward = getattr(type(loss_fn), "forward", None)
    if getattr(forward, "__module__", None) != "torch.nn.modules.loss":
        return None
    return getattr(loss_fn, "reduction", None)


def _contradicted(reduction: str, why: str) -> str:
    """The refusal of a declared ``reduction`` (given, or the loss's own attribute) that the
    loss contradicts."""
    given = f"reduction={reduction!r} was given (or is the loss's own attribute)"
    if reduction == "sum":
        return (
            f"{given}, but loss_fn averages over the rows of a batch: {why}. "
            "Summed, the batches' means make a curvature as many times the mean's as there "
            "are batches; pass reduction='mean' (or leave it out), or a loss that sums"
        )
    return (
        f"{given}, but loss_fn sums over the rows of a batch: {why}. "
        "Pass reduction='sum' (or leave it out), or a loss that averages"
    )


def loss_tolerance(computed: Any) -> float:
    """The relative difference a loss's rounding allows between two ways of summing the same
    terms: 1e-9 for a float64 result, else 64 eps of its dtype (at least 1e-6) — of a tensor's,
    a float's (float64), or a dtype given. A loss computed in float32 inside, from float64
    outputs, rounds as float32 (it was held to 1e-9, and refused)."""
    dtype = computed if isinstance(computed, torch.dtype) else getattr(computed, "dtype", None)
    if dtype is None or dtype == torch.float64:
        return 1e-9
    return max(64 * torch.finfo(dtype).eps, 1e-6) if dtype.is_floating_point else 1e-6


def _what_batch(item: Any) -> str:
    """A batch that is not one, in words: "a tuple of 3" says more than "tuple"."""
    if isinstance(item, tuple | list):
        return f"a {type(item).__name__} of {len(item)}"
    return type(item).__name__


def _one_batch_hint(data: Any) -> str:
    """Data that is one batch of more than two tensors (inputs, targets, weights) was read as a
    list of batches, each a tensor ("got Tensor": an outside review)."""
    pair = isinstance(data, tuple | list) and len(data) == 2
    if pair and any(type(t).__module__ == "numpy" for t in data):  # "(got Tensor)" said nothing
        return (
            "; data looks like one batch holding a numpy array: inputs and targets are tensors "
            "— convert it with torch.as_tensor(...)"
        )
    # tensor or dict inputs (a review); two dicts, or two tuples, are two batches as often
    bundled = pair and (
        (isinstance(data[0], Tensor) and isinstance(data[1], tuple | list | Mapping))
        or (isinstance(data[0], Mapping) and isinstance(data[1], tuple | list))
    )
    if bundled:
        return (
            f"; data looks like one batch whose targets are a {type(data[1]).__name__}: the "
            "targets must be one tensor — stack or concatenate them (and split them in the "
            "loss), or pass them inside the inputs"
        )
    tensors = isinstance(data, tuple | list) and all(isinstance(t, Tensor) for t in data)
    if tensors and len(data) > 2:
        return (
            f"; data holds {len(data)} tensors: one batch is a pair "
            "(inputs, targets) — put per-sample extras such as weights in the inputs (a tuple "
            "the model takes) or in the loss"
        )
    return ""


def _is_pair(data: object) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)


def _split_dict(i: int, item: Mapping[str, Any], data: Any) -> tuple[dict[str, Any], Tensor]:
    """A dict batch of ``data`` as (the model's keyword arguments, its ``labels``)."""
    labels = item.get("labels")
    if not isinstance(labels, Tensor):
        raise TypeError(
            f"batch {i} of data is a dict whose 'labels' is "
            f"{'missing' if labels is None else type(labels).__name__} (keys: "
            f"{', '.join(map(str, item))}); a dict batch holds the model's keyword arguments and "
            f"a tensor of 'labels', the targets of loss_fn(outputs, labels)"
            f"{_one_batch_hint(data)}"
        )
    return {k: v for k, v in item.items() if k != "labels"}, labels


def _flattened_hint(out: Tensor, targets: Tensor) -> str:
    """The fix for outputs flattened over the targets' leading dimensions ((B·T, V) logits
    beside (B, T) labels, which a loss of the user's reshapes itself): the row check refused
    them naming no way out (an outside review)."""
    lead = targets.shape[0] if targets.ndim else 1
    for d in range(1, targets.ndim):
        lead *= targets.shape[d]
        if lead == out.shape[0]:
            return (
                f": the outputs' rows are the targets' first {d + 1} dimensions flattened, so "
                f"flatten the targets the same way in the data (y.flatten(0, {d})), each "
                "position a sample, or return the outputs unflattened"
            )
    return ""


def _rows(x: Any, sl: slice, n: int) -> Any:
    """Rows ``sl`` of every tensor in ``x`` whose first dimension counts the n samples."""
    return map_tensors(lambda t: t[sl] if t.ndim > 0 and t.shape[0] == n else t, x)


def _float64(x: Any) -> Any:
    """``x`` with every floating-point tensor in float64."""
    return map_tensors(lambda t: t.detach().double() if t.is_floating_point() else t, x)


def _version(t: Tensor) -> int | None:
    """A tensor's version counter; None for an inference tensor (it has none)."""
    return None if t.is_inference() else t._version


def _fingerprint(inputs: Any, targets: Tensor) -> tuple[Any, ...]:
    """Shape, dtype and two float64 sums per tensor of a batch over a strided sample of each
    row (about 256 entries a row) — one plain, one weighted by the row's position: equal for the
    same batch, different (almost surely) for other samples, another order, or augmentation
    that moves the sampled entries (crops, flips, noise), at a cost that does not grow with the
    size of a sample."""
    out: list[Any] = []
    for t in (*tensors(inputs), targets):
        flat = t.detach().reshape(t.shape[0] if t.ndim else 1, -1)
        stride = max(1, flat.shape[1] // 256)
        rows = flat[:, ::stride].to(torch.float64).sum(1)
        w = torch.arange(1, rows.numel() + 1, dtype=torch.float64, device=rows.device)
        out += [tuple(t.shape), t.dtype, float(rows.sum()), float((w * rows).sum())]
    return tuple(out)


def select_parameters(
    model: nn.Module, params: Iterable[nn.Parameter | str] | None, prefix: str = ""
) -> dict[str, Tensor]:
    """Name → parameter for the parameters the curvature is taken with respect to.

    ``params=None`` selects every parameter that requires grad (tied weights once). Otherwise a
    list of parameters or of names from ``model.named_parameters(remove_duplicate=False)``: a
    tied weight by any of its names (``lm_head.weight`` tied to ``transformer.wte.weight``), once.
    ``prefix``: what the wrappers of ``model`` add to its names (:func:`unwrapped`), taken off a
    name given with it — ``_orig_mod.0.weight`` of a compiled model is ``0.weight``.
    """
    named: dict[str, Tensor] = dict(model.named_parameters())
    if params is None:
        trainable = {k: p for k, p in named.items() if p.requires_grad}
        if not trainable:
            raise ValueError(
                "the model has no parameter that requires grad, so there is no curvature to "
                "measure; unfreeze some (p.requires_grad_(True)) or pass params=[...]"
            )
        return trainable
    wanted: Iterable[Tensor | str] = [params] if isinstance(params, (str, Tensor)) else params
    by_id = {id(p): k for k, p in named.items()}
    # tied weights by every name
    every: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
    chosen: dict[str, Tensor] = {}
    taken: set[int] = set()
    for p in wanted:
        if isinstance(p, str):
            name = inner_name(p, prefix, every)
            if name not in every:
                raise ValueError(
                    f"params: the model has no parameter named {p!r}; valid names: "
                    + ", ".join(every)
                )
        elif isinstance(p, Tensor):
            if id(p) not in by_id:
                raise ValueError(
                    "params: a tensor of shape "
                    f"{tuple(p.shape)} is not a parameter of this model; pass parameters from "
                    "model.parameters() or names from model.named_parameters()"
                )
            name = by_id[id(p)]
        else:
            raise TypeError(
                f"params: expected parameters or parameter names, got {type(p).__name__}"
            )
        param = every[name]
        if not param.requires_grad:
            raise ValueError(
                f"params: parameter {name!r} does not require grad; call "
                f"requires_grad_(True) on it or leave it out of params"
            )
        if id(param) not in taken:  # a tied weight named twice is one block
            taken.add(id(param))
            chosen[name] = param
    if not chosen:
        raise ValueError("params is empty: select at least one parameter, or pass params=None")
    return chosen


#: curvscope's own source folder: an error raised there says what it is itself
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_TORCH_ATTENTION = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.Transformer,
)
_MATH_NOTE = (
    "attention runs on the math backend of scaled_dot_product_attention during curvature "
    "products (the fused kernels have no double backward or forward-mode AD)"
)


def _attention_switches() -> list[tuple[Any, Any, bool]]:
    """(get, set, wanted) for each of torch's scaled-dot-product-attention backends, only math
    wanted. Read off torch's own flag functions (``_get_<name>_sdp_enabled`` /
    ``_set_sdp_use_<name>``), which ``sdpa_kernel`` switches from a fixed list of names: every
    backend this torch has is turned off (torch 2.13's FlashAttention-3 switch too, which that
    list lacks), and setting the flags directly costs 2 µs where ``sdpa_kernel`` costs 30 (a
    product of a small model costs 1 ms). Empty if torch no longer has a math switch there."""
    names = [
        n.removeprefix("_set_sdp_use_") for n in dir(torch._C) if n.startswith("_set_sdp_use_")
    ]
    switches = [
        (
            getattr(torch._C, f"_get_{n}_sdp_enabled"),
            getattr(torch._C, f"_set_sdp_use_{n}"),
            n == "math",
        )
        for n in sorted(names)
        if hasattr(torch._C, f"_get_{n}_sdp_enabled")
    ]
    return switches if any(wanted for _, _, wanted in switches) else []


_ATTENTION_SWITCHES = _attention_switches()


def compiling_used() -> bool:
    """Whether torch.compile may have been used in this process (``torch._dynamo`` imported:
    Hugging Face's transformers imports it too): compiled code may then run anywhere."""
    return "torch._dynamo" in sys.modules


_HAS_CUDNN = torch.backends.cudnn.is_available()  # a CPU-only build has no cuDNN to turn off


class DifferentiableKernels:
    """Kernels with second derivatives for the forward passes of curvature products:
    scaled-dot-product attention on its math backend (the fused ones have no double backward or
    forward-mode AD), cuDNN off where torch has it (its RNNs have no double backward), and for
    a model with an RNN, oneDNN (mkldnn) off: its fused CPU LSTM has no forward-mode AD, and
    differentiating its backward with ``create_graph=True`` costs more than torch's own LSTM
    (LSTM 16-64, seq 32, float32, one thread: a gradient with its graph 9.1 ms against 6.1 ms,
    a backward through the kept graph 17.0 against 12.6 ms; ``benchmarks/products.py --small``).
    With ``weight_norm``, torch's weight norm is computed written out too (its double
    backward is wrong in torch 2.13: :mod:`curvscope.derivatives.substitutes`). With
    ``compiled`` (torch.compile'd submodules, a module compiled in place by
    ``module.compile()``, or torch.compile used anywhere in the process), the compiler's stance
    is ``force_eager``: graphs compiled with AOTAutograd have no double backward, so compiled
    code runs its own eager code (13–70 µs to enter and leave: only then). Each switch is
    restored on exit (only ``enabled`` of cuDNN and oneDNN: their other settings are left
    alone)."""

    def __init__(self, rnn: bool, weight_norm: bool, compiled: bool = False) -> None:
        self.rnn, self.weight_norm, self.compiled = rnn, weight_norm, compiled
        #: what each entry found, a stack: one instance serves an optimizer's evaluation
        #: throughout, and an entry inside another puts back its own
        self._entered: list[tuple[list[Any], Any, Any, contextlib.ExitStack[Any]]] = []

    @classmethod
    def for_closures(cls) -> DifferentiableKernels:
        """The switches for a second-order optimizer's closure, whose model is unknown: no
        RNN's oneDNN switch (a cost, not a failure: a closure's RNN runs on oneDNN), no
        weight-norm mode (the closure's own mode substitutes it), the compiler's stance where
        :func:`compiling_used`."""
        return cls(rnn=False, weight_norm=False, compiled=compiling_used())

    def __enter__(self) -> None:
        saved = [get() for get, _, _ in _ATTENTION_SWITCHES]
        cudnn = torch.backends.cudnn.enabled if _HAS_CUDNN else None
        mkldnn = torch.backends.mkldnn.enabled if self.rnn else None
        # the modes: sdpa_kernel only where the switches were not found, the weight norm's
        modes = contextlib.ExitStack()
        if not _ATTENTION_SWITCHES:
            modes.enter_context(sdpa_kernel([SDPBackend.MATH]))
        if self.weight_norm:
            modes.enter_context(WrittenOutWeightNorm())
        if self.compiled and hasattr(torch.compiler, "set_stance"):  # torch >= 2.6
            modes.enter_context(torch.compiler.set_stance("force_eager"))
        for _, switch, wanted in _ATTENTION_SWITCHES:
            switch(wanted)
        if _HAS_CUDNN:
            torch.backends.cudnn.enabled = False
        if self.rnn:
            torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # a ContextProp
        self._entered.append((saved, cudnn, mkldnn, modes))

    def __exit__(self, *exc: Any) -> None:
        saved, cudnn, mkldnn, modes = self._entered.pop()
        for (_, switch, _), was in zip(_ATTENTION_SWITCHES, saved, strict=True):
            switch(was)
        if cudnn is not None:
            torch.backends.cudnn.enabled = cudnn
        if mkldnn is not None:
            torch.backends.mkldnn.enabled = mkldnn
        modes.__exit__(*exc)


def _attention_notes(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    """Where attention runs on its math backend: torch's attention modules, and attention
    modules of other libraries (a class named ``...Attention``) unless the model's config
    says they do not call scaled_dot_product_attention (Hugging Face's
    ``attn_implementation``: "sdpa" does, "eager" does not, a fused kernel of its own —
    flash attention — keeps it: said so, with the fix)."""
    if any(isinstance(m, _TORCH_ATTENTION) for m in modules):
        return [_MATH_NOTE]
    named = sorted({type(m).__name__ for m in modules if type(m).__name__.endswith("Attention")})
    if not named:
        return []
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    which = ", ".join(named[:3]) + (" …" if len(named) > 3 else "")
    if impl is None or impl == "sdpa":
        how = "" if impl is None else "attn_implementation='sdpa', "
        return [f"{_MATH_NOTE[:-1]}; {how}{which})"]
    if impl == "eager":
        return []
    return [
        f"attention ({which}) runs on attn_implementation={impl!r}, whose kernels may have no "
        "double backward or forward-mode AD; if a curvature product fails, load the model with "
        "attn_implementation='sdpa' (curvscope runs it on its math backend) or 'eager'"
    ]


def padding_rows(
    model: nn.Module, modules: list[nn.Module], selected: Mapping[str, Tensor]
) -> tuple[dict[str, int], dict[str, int]]:
    """Selected parameter → its padding row, of two kinds. First: the row of an embedding
    (``nn.Embedding`` or ``nn.EmbeddingBag`` with ``padding_idx``) that torch's gradient never
    updates, so the operator is P·H·P — where every module holding the weight is a lookup with
    that padding row (a table shared by two lookups, or one registered under two names, is
    one). Second: where a module of another kind reads the weight too (an output layer tied to
    it), or a lookup without that padding row, whose gradient updates the row
    (:func:`_padding_notes`; counting names instead said "tied" of a table shared by lookups
    only, whose operator is P·H·P: the diff review)."""
    holders: dict[int, list[nn.Module]] = {}
    for m in model.modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None and m not in holders.setdefault(id(p), []):
                holders[id(p)].append(m)
    chosen = {id(p): k for k, p in selected.items()}
    rows: dict[str, int] = {}
    tied: dict[str, int] = {}
    for m in modules:
        if not isinstance(m, (nn.Embedding, nn.EmbeddingBag)) or m.padding_idx is None:
            continue
        key = chosen.get(id(m.weight))
        if key is None:
            continue
        row = m.padding_idx % m.num_embeddings
        lookups = all(_pads(h, row) for h in holders[id(m.weight)])
        (rows if lookups else tied)[key] = row
    return rows, tied


def _pads(m: nn.Module, row: int) -> bool:
    """Whether ``m`` is a lookup whose padding row is ``row``."""
    return (
        isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        and m.padding_idx is not None
        and m.padding_idx % m.num_embeddings == row
    )


def few(names: Sequence[str]) -> str:
    """The first three of ``names`` for a message, and "…" where there are more."""
    return f"{list(names[:3])}{' …' if len(names) > 3 else ''}"


def _backward_hook_notes(named: list[tuple[str, nn.Module]]) -> list[str]:
    """Modules with backward hooks (``register_full_backward_hook`` / ``_pre_hook``), which run
    in every backward curvscope takes: what is differentiated is the gradient as they leave it
    (an outside review: a hook halving grad_input gave products equal to none of H, DH or
    DHD, without a word)."""
    hooked = [
        name or "the model" for name, m in named if m._backward_hooks or m._backward_pre_hooks
    ]
    if not hooked:
        return []
    return [
        f"module(s) {few(hooked)} have backward hooks "
        "(register_full_backward_hook / _pre_hook), which run in every backward curvscope "
        "takes: the gradient and the products are those of the gradient as the hooks leave it "
        "(a hook that rescales grad_input gives an operator that is neither H nor a rescaling "
        "of it); remove them while measuring"
    ]


def _frequency_notes(named: list[tuple[str, nn.Module]]) -> list[str]:
    """The note on embeddings whose gradient torch scales by each index's frequency in the
    batch (``scale_grad_by_freq=True``): curvscope's passes take the loss's own derivatives."""
    scaled = [
        name or "the model"
        for name, m in named
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.scale_grad_by_freq
    ]
    if not scaled:
        return []
    return [
        f"embedding(s) {few(scaled)} scale their gradient by each index's frequency in the batch "
        "(scale_grad_by_freq=True), which is not the loss's gradient: curvscope's gradients and "
        "products are the loss's own (the scaling off during its passes, then put back), not "
        "what the optimizer is given"
    ]


def _padding_notes(rows: Mapping[str, int], tied: Mapping[str, int]) -> list[str]:
    """What an embedding's padding row makes of the operator. Tied to another module (an
    output layer sharing the weight), the row is a constant of the lookup only: the operator
    was then neither H nor P·H·P, unsaid (λ_max 4.690 for H's 4.733: an outside review)."""
    return [
        f"{key}: row {row} is the padding row (padding_idx), which torch's gradient never "
        "updates; the operator is P·H·P, P the projection that zeroes that row, so its rows "
        "and columns of the curvature are 0"
        for key, row in rows.items()
    ] + [
        f"{key}: row {row} is the padding row (padding_idx) of an embedding whose weight is "
        "tied to another module: torch's gradient holds the row constant in the lookup only, "
        "and the operator is the derivative of that gradient (the curvature of the loss with "
        "the row constant in the lookup), neither H nor P·H·P"
        for key, row in tied.items()
    ]


def _check_loss(loss_fn: Any, reduction: str | None) -> None:
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(
            f"expected loss_fn to be callable as loss_fn(outputs, targets), or None for a "
            f"model that computes its own loss, got {type(loss_fn).__name__}"
        )
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction must be 'mean', 'sum' or None (read from the loss), got {reduction!r}"
        )
    if isinstance(loss_fn, nn.GaussianNLLLoss):  # (torch's bare "missing 'var'" at a product)
        raise TypeError(
            "nn.GaussianNLLLoss takes the variance as a third argument, and curvscope calls "
            "loss_fn(outputs, targets): wrap it in a function that splits the outputs, e.g. "
            "loss_fn=lambda out, y: gaussian_nll(out[:, :1], y, out[:, 1:].exp()) with "
            "gaussian_nll = nn.GaussianNLLLoss() for a model whose outputs are the mean and the "
            "log-variance"
        )
    if loss_fn is None and reduction == "sum":
        raise ValueError(
            "reduction='sum' does not apply with loss_fn=None: the model's own loss averages "
            "over its targets; leave reduction=None, or pass a summed loss_fn"
        )


def _compiled(module: nn.Module) -> bool:
    """Whether ``module`` is torch.compile's wrapper or was compiled in place
    (``module.compile()``)."""
    return (
        type(module).__name__ == "OptimizedModule"
        or getattr(module, "_compiled_call_impl", None) is not None
    )


def inner_name(name: str, prefix: str, known: Container[str]) -> str:
    """A parameter's name as the wrapped module names it: ``name`` itself where it is one of
    the module's (``known``), else with the wrappers' ``prefix`` (:func:`unwrapped`) taken off
    where it starts with it — a module whose child is called ``module`` keeps its names under
    DDP."""
    if name in known or not (prefix and name.startswith(prefix)):
        return name
    return name[len(prefix) :]


def unwrapped(model: Any) -> tuple[Any, bool, str]:
    """The module inside ``DistributedDataParallel`` (whose gradient hooks a product must never
    trigger), ``nn.DataParallel`` (whose replicas torch's functional_call refuses: "the stateless
    API can't be used with nn.DataParallel", an outside review) and ``torch.compile`` wrappers,
    in any nesting; whether one was compiled (an
    ``OptimizedModule``, told without importing torch._dynamo); and the prefix the wrappers add
    to its parameters' names (``module.`` for DDP, ``_orig_mod.`` for torch.compile, nested:
    ``module._orig_mod.``). curvscope names parameters as the module inside does, and takes
    the wrappers' names too (:func:`select_parameters`)."""
    compiled, prefix = False, ""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model, prefix = model.module, prefix + "module."
        elif type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):
            model, compiled, prefix = model._orig_mod, True, prefix + "_orig_mod."
        else:
            return model, compiled, prefix


def _recomputes(model: nn.Module) -> bool:
    """Whether a Hugging Face model recomputes its forward in the backward (activation, or
    gradient, checkpointing — transformers 5 renamed the attribute and warns on the old name)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def torch_loss(loss_fn: object, classes: Iterable[type]) -> type | None:
    """The torch loss among ``classes`` that ``loss_fn`` computes: its class, or a subclass
    that keeps that class's ``forward`` (``class MyCE(nn.CrossEntropyLoss): pass`` with
    ``weight=`` was weighed by rows, 42% off: an outside review); None for any other loss,
    a subclass overriding ``forward`` included (it may average otherwise)."""
    for cls in classes:
        if isinstance(loss_fn, cls) and getattr(type(loss_fn), "forward", None) is getattr(
            cls, "forward", cls
        ):
            return cls
    return None


def counted_labels(loss_fn: Any, labels: Tensor, dtype: torch.dtype) -> Tensor:
    """Each class label's weight in the divisor of a mean cross-entropy (``nn.CrossEntropyLoss``,
    ``nn.NLLLoss``), flattened: 0 at ``ignore_index``, the class weight of the label under
    ``weight=``, else 1; the mean is (Σ_t ℓ_t) / Σ_t counted_t."""
    flat = labels.reshape(-1)
    ignored = getattr(loss_fn, "ignore_index", None)  # nn.LinearCrossEntropyLoss's None: -100
    kept = flat != (-100 if ignored is None else ignored)
    counted = kept.to(dtype)
    weight = getattr(loss_fn, "weight", None)
    if weight is not None:  # indexed as integers: torch reads a uint8 index as a mask
        index = torch.where(kept, flat, 0).long()
        counted = counted * weight.to(device=flat.device, dtype=dtype)[index]
    return counted


#: torch's losses whose mean is over every entry of the targets (their numel divides it;
#: ``nn.KLDivLoss`` with ``reduction="mean"``: its ``"batchmean"`` is over the rows)
ENTRYWISE_MEANS: tuple[type, ...] = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCEWithLogitsLoss,
    nn.BCELoss,
    nn.SoftMarginLoss,
    nn.PoissonNLLLoss,
    nn.KLDivLoss,
    nn.HingeEmbeddingLoss,
    nn.GaussianNLLLoss,  # takes a third argument (the variance): only through a function
)
#: torch's cross-entropies, whose mean is over their counted labels (:func:`counted_labels`)
LABEL_MEANS: tuple[type, ...] = (
    nn.CrossEntropyLoss,
    nn.NLLLoss,
    *(getattr(nn, name) for name in ("LinearCrossEntropyLoss",) if hasattr(nn, name)),  # 2.13
)
#: torch's losses with one term a row (a sample), whose mean is over the rows. Every loss in
#: ``torch.nn.modules.loss`` is in one of these three tuples (a test holds torch to it): a
#: built-in loss left out was weighed by rows whatever it averaged over — ``nn.PoissonNLLLoss``
#: and ``nn.KLDivLoss`` over sequences of different lengths, λ_max 7% and the curvature 19–23%
#: off, without a word (an outside review)
ROW_MEANS: tuple[type, ...] = (
    nn.MultiMarginLoss,
    nn.MultiLabelMarginLoss,
    nn.MultiLabelSoftMarginLoss,
    nn.CosineEmbeddingLoss,
    nn.MarginRankingLoss,
    nn.TripletMarginLoss,
    nn.TripletMarginWithDistanceLoss,
    nn.CTCLoss,
)


def _divisor(loss_fn: Any, targets: Tensor) -> str | None:
    """What a torch loss's mean divides a batch's summed terms by, where torch's own loss says
    (:func:`torch_loss`; a subclass overriding ``forward`` is a loss of its own): "labels" for
    cross-entropy (:data:`LABEL_MEANS`) with class labels, "positions" for
    it with (N, C, d…) class probabilities, "entries" for an entrywise mean
    (:data:`ENTRYWISE_MEANS`); None where a mean is over the rows (or not known to be over
    anything else). Told from the loss and the targets' type and shape: no values read. The
    same loss summed adds those terms (the share of them a training step adds, ``step_share``:
    counted by rows, a probe of 16-token sequences beside training batches of 64-token ones
    read *learning* where the loss ran to 1e19, an outside review)."""
    if getattr(loss_fn, "reduction", None) not in ("mean", "sum"):
        return None
    if torch_loss(loss_fn, ENTRYWISE_MEANS) is not None:
        return "entries"
    if torch_loss(loss_fn, LABEL_MEANS) is None:
        return None
    if not targets.is_floating_point():
        return "labels"
    return "positions" if targets.ndim > 2 else None


def mean_count(loss_fn: Any, targets: Tensor) -> float | None:
    """The number :func:`_divisor` names for a batch: its counted class labels
    (:func:`counted_labels`), its positions (rows × d… of (N, C, d…) targets, whatever
    ``weight=`` — weighed by rows, sequences of different lengths were 40% off: an outside
    review), or its targets' entries (sequences of different lengths weigh as their entries
    do); None where a mean is over the rows."""
    divisor = _divisor(loss_fn, targets)
    if divisor == "labels":
        return float(counted_labels(loss_fn, targets, torch.float64).sum())
    if divisor == "positions":
        return float(targets.numel() // targets.shape[1])
    return None if divisor is None else float(targets.numel())


def _reshard(modules: list[nn.Module]) -> None:
    """Register FSDP2's sharded parameters on each of its modules (``reshard()``: the values are
    the same, the unsharded copies are freed). After a forward that is not followed by a
    backward — an evaluation under ``torch.no_grad()`` — ``fully_shard``'s root (and any module
    with ``reshard_after_forward=False``) keeps plain unsharded parameters, whose storage the
    next forward frees: measured through them, a product wrote into freed memory (a segfault).
    A module kept unsharded on purpose (``set_reshard_after_backward(False)``: a gradient
    accumulation reusing them) is left as it is; the finite-difference backend refuses it."""
    for m in modules:
        groups = getattr(m._get_fsdp_state(), "_fsdp_param_groups", ())  # type: ignore[operator]
        if all(getattr(g, "reshard_after_backward", True) for g in groups):
            m.reshard()  # type: ignore[operator]


@dataclass
class GraphSeen:
    """What one walk over a loss's autograd graph found (:func:`walk_graph`)."""

    #: the leaf tensors it reaches (AccumulateGrad nodes), outside any reentrant checkpoint
    leaves: list[Tensor]
    #: whether it goes through torch's reentrant checkpointing (a CheckpointFunction node)
    reentrant: bool
    #: the nodes of custom ``torch.autograd.Function`` s on it (:func:`watch_custom_functions`)
    custom: list[Any] = field(default_factory=list)


def walk_graph(loss: Tensor) -> GraphSeen:
    """One walk over ``loss``'s graph: its leaves, whether a reentrant checkpoint is on it, and
    the custom autograd Functions on it."""
    seen: set[Any] = set()
    stack, leaves, reentrant = [loss.grad_fn], [], False
    custom: list[Any] = []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf tensor
        if leaf is not None:
            leaves.append(leaf)
        checkpoint = type(node).__name__ == "CheckpointFunctionBackward"
        reentrant = reentrant or checkpoint
        if isinstance(node, torch.autograd.function.BackwardCFunction) and not checkpoint:
            custom.append(node)
        stack.extend(child for child, _ in node.next_functions)
    return GraphSeen(leaves, reentrant, custom)


#: what else to do where a custom autograd Function cuts the graph, by who asked
CUT_FIXES = {
    "curvature products": "or measure with backend='finite_difference', which runs the "
    "model's own backward",
    "second derivatives": "or differentiate a function without it",
    "a second-order optimizer": "or train with a first-order method (curvscope's NormalizedGD, "
    "torch's optimizers), which needs only the gradient",
    "the empirical Fisher's per-sample gradients": "or pass nn.LinearCrossEntropyLoss itself "
    "as loss_fn, whose empirical Fisher needs only its gradient",
}


def custom_function_cut(what: str, name: str) -> str:
    """The refusal of a custom autograd Function whose backward leaves autograd's graph."""
    return (
        f"{what} cannot go through the custom autograd.Function {name}: its backward "
        + (
            "is declared @once_differentiable"
            if name.endswith("(@once_differentiable)")
            else "computes its result outside autograd's graph (under torch.no_grad(), from "
            ".detach()ed tensors, or in a fused kernel)"
        )
        + ", which cuts every second derivative that passes through it — the curvature of "
        "everything before it too, without an error from torch (AdaHessian took a loss from "
        "1.10 to 88.8 in one step on such a model: an outside review). Write its backward in "
        "differentiable torch operations (or give it a double backward), use the plain torch "
        f"operation, {CUT_FIXES[what]}"
    )


def reentrant_refusal(what: str) -> str:
    """The refusal of torch's reentrant activation checkpointing where ``what`` (a key of
    :data:`CUT_FIXES`) takes second derivatives: its backward runs a backward of its own into
    ``.grad``, which ``torch.autograd.grad`` does not go through (torch's error, or a gradient
    of 0: a second-order optimizer stopped "stationary", an outside review), and a checkpointed
    block whose inputs do not require grad gives its parameters no gradient at all."""
    return (
        f"{what} cannot go through torch.utils.checkpoint(..., use_reentrant=True): its "
        "backward runs a backward of its own into .grad, which torch.autograd.grad does not "
        "go through (its gradient comes out 0, or torch refuses), and a checkpointed block "
        "whose inputs do not require grad gives its parameters no gradient at all. Checkpoint "
        "with use_reentrant=False (torch's recommendation; Hugging Face: "
        "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
        f"{{'use_reentrant': False}})), {CUT_FIXES[what]}"
    )


#: torch's reentrant activation checkpointing, refused with the fixes: ``torch.autograd.grad``
#: cannot go through it, and a checkpointed block whose inputs do not require grad (its first
#: layer left out by ``params=``) gave its parameters a gradient and curvature of exactly 0,
#: with only torch's warning (an outside review: λ_max 0.103 for 0.165, a verdict on it).
REENTRANT_CHECKPOINT = reentrant_refusal("curvature products")


def watch_custom_functions(
    t: Tensor, what: str, refused: Callable[[], None] | None = None
) -> Tensor:
    """Hooks on the custom autograd Functions of ``t``'s graph that refuse, during a backward
    taken with ``create_graph=True``, a gradient their backward returned outside autograd's
    graph (where a gradient flowing into it has one) or through @once_differentiable's error
    node: the products through such a node are silently missing (an outside review). A
    first-order backward is not checked (nothing is missing from it). ``what``: a key of
    :data:`CUT_FIXES`; ``refused`` is called before a refusal (an operator then watches its
    next backward again).

    Returns the gradient to start that backward from: ones that require grad themselves, so
    that every gradient flowing into a custom Function has a graph and a cut shows — from plain
    ones, a fused loss at the top of the graph, or a term 10·f(w), met constant gradients, and
    their cut Hessian read 0, or 3.03 for 22.98, unrefused (the diff review). Not a leaf: a loss
    Function scaling its incoming gradient in place hit torch's "a view of a leaf Variable that
    requires grad is being used in an in-place operation" (the refusal review)."""

    def check(
        name: str, wired: Sequence[bool], grad_inputs: Sequence[Any], grad_outputs: Sequence[Any]
    ) -> None:
        if not torch.is_grad_enabled():
            return
        given = [
            g for on, g in zip(wired, grad_inputs, strict=False) if on and isinstance(g, Tensor)
        ]
        if any(type(g.grad_fn).__name__ == "Error" for g in given):  # once_differentiable's
            cut(f"{name} (@once_differentiable)")
        incoming = [g for g in grad_outputs if isinstance(g, Tensor)]
        # every gradient it returns without a graph while one flowing in has one: its backward
        # left the graph. Not where one of them keeps it (a linear two-output Function, one of
        # whose outputs reaches the loss through round(): the refusal review), nor a gradient
        # of exact zeros for a gradient flowing in that is not all zeros (a derivative that is
        # truly 0); zeros for zeros are cut (the GGN's Jᵀu, at u = 0, sees nothing else)
        if not given or not any(g.requires_grad for g in incoming):
            return
        if all(not g.requires_grad for g in given):
            if any(g.any() for g in incoming) and not any(g.any() for g in given):
                return
            cut(name)

    def cut(said: str) -> None:
        if refused is not None:
            refused()
        raise RuntimeError(custom_function_cut(what, said))

    seen = walk_graph(t)
    if seen.reentrant:  # a custom Function too, whose gradients bypass the graph entirely
        if refused is not None:
            refused()
        raise RuntimeError(reentrant_refusal(what))
    refuse_known_cuts(t, what, refused, seen)
    for node in seen.custom:
        # the hook holds the Function's name and which inputs are on the graph, not the node:
        # node -> hook -> node was a cycle that kept each graph, and its saved tensors, alive
        # until the garbage collector ran (a step's graph per second-order step)
        name = getattr(node, "_forward_cls", type(node)).__name__
        wired = [child is not None for child, _ in node.next_functions]
        node.register_hook(partial(check, name, wired))
    with torch.enable_grad():  # (under a step's no_grad the seed lost its graph: no check fired)
        return torch.ones_like(t, requires_grad=True).clone()


def refuse_known_cuts(
    t: Tensor,
    what: str,
    refused: Callable[[], None] | None = None,
    seen: GraphSeen | None = None,
) -> None:
    """Refuse ``t`` whose graph goes through one of torch's operations known to return a
    gradient computed in the forward (:func:`_known_cut`), naming ``what`` cannot go through
    it: curvature products, a second-order step — and the empirical Fisher's per-sample
    gradients, which came out 0 through it (an outside review)."""
    for node in (walk_graph(t) if seen is None else seen).custom:
        said = _known_cut(type(node).__name__)
        if said is not None:
            if refused is not None:
                refused()
            raise RuntimeError(f"{what} cannot go through {said}, {CUT_FIXES[what]}")


def _known_cut(node: str) -> str | None:
    """What torch's own operation behind an autograd node of that class name is and why no
    second derivative goes through it, for those whose backward returns gradients saved by
    the forward: scaled by the incoming gradient, they pass the hooks' check
    (:func:`watch_custom_functions`) as a linear function's would, and every product through
    them lacks the loss's curvature — torch's chunked linear cross-entropy gave λ_max 0 for
    0.198, with no word (an outside review)."""
    if "linear_cross_entropy" in node and "chunked" in node:
        return (
            "torch's chunked linear cross-entropy (nn.LinearCrossEntropyLoss(options=...), "
            "F.linear_cross_entropy(..., options=...)): its forward computes the gradient "
            "and its backward returns it, so it has no second derivative (torch documents "
            "this), and the loss's curvature would be missing from every product. Measure "
            "with options=None, torch's reference path (the same loss)"
        )
    return None


def _reads_parameters(seen: GraphSeen, params: Mapping[str, Tensor]) -> str | None:
    """The name of a parameter among ``params`` (the model's own tensors) that the loss's graph
    reaches as a leaf, or None."""
    ids = {id(p): name for name, p in params.items()}
    return next((ids[id(t)] for t in seen.leaves if id(t) in ids), None)


#: what torch says of the two (its warning for a block whose inputs need no grad, its error)
REENTRANT_SAID = (
    "None of the inputs have requires_grad=True",
    "torch.utils.checkpoint is incompatible with .grad()",
)


def _checkpoint_error(e: BaseException) -> Exception | None:
    """curvscope's error, with the fixes, for torch's own from activation checkpointing (None
    for any other): the reentrant kind's, torch.func's (forward-over-reverse) and the
    recomputation's mismatch (CheckpointError)."""
    if isinstance(e, RuntimeError) and REENTRANT_SAID[1] in str(e):
        return RuntimeError(REENTRANT_CHECKPOINT)
    if "don't yet support saved tensor hooks" in str(e):  # torch.func under checkpointing
        return RuntimeError(
            "the model runs activation checkpointing (torch.utils.checkpoint, or Hugging Face's "
            "gradient checkpointing), whose saved-tensor hooks torch.func's transforms do not "
            "support, so backend='forward_over_reverse' cannot go through it: use "
            "backend='double_backward' (or 'auto'), or turn checkpointing off while measuring"
        )
    if type(e).__name__ == "CheckpointError":
        said = str(e).splitlines()[0] if str(e) else "CheckpointError"
        return RuntimeError(
            "activation checkpointing recomputed the model's forward with tensors other than "
            f"the product's forward saw (torch: {said}); measure with params=None (every "
            "parameter), or with backend='finite_difference', which runs the model's own "
            "backward"
        )
    return None


class ModelObjective:
    """Evaluates ``loss_fn(model(inputs), targets)`` per batch at parameters given as a dict.

    Args:
        model: the user's module (never modified).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch loss, averaged or summed over
            the batch's samples (see ``reduction``). ``None``: the model computes its own loss
            (a Hugging Face ``*ForCausalLM``, ``*ForMaskedLM``, ``*ForSequenceClassification``
            or ``*ForImageClassification``; :class:`~curvscope.derivatives.huggingface.
            HuggingFaceLoss`), averaged over what that loss averages over (target tokens).
        data: an ``(inputs, targets)`` pair, a dict batch, a list of them, or a re-iterable of
            them (a ``DataLoader``). ``inputs`` may be a tensor, a tuple (positional arguments)
            or a dict (keyword arguments); ``targets`` is a tensor whose first dimension counts
            samples. A dict batch holds the keyword arguments and the targets as ``labels``.
        params: the parameters to differentiate (see :func:`select_parameters`).
        seed: base seed of the per-batch randomness (dropout) and of the loader's randomness.
        reduction: ``"mean"`` or ``"sum"``: how ``loss_fn`` reduces over a batch's samples.
            ``None`` (default) reads a torch loss's ``reduction`` attribute, and for any other
            callable infers it at the first loss by comparing the loss of a batch with the
            losses of its two halves (refused, with an error naming ``reduction``, where that
            cannot decide).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        params: Iterable[nn.Parameter | str] | None = None,
        seed: int = 0,
        reduction: str | None = None,
    ) -> None:
        #: a torch.compile'd model's compiled graphs have no double backward: its module, eager
        model, self.compiled, prefix = unwrapped(model)
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected model to be a torch.nn.Module, got {type(model).__name__}")
        _check_loss(loss_fn, reduction)
        self.model = model
        #: FSDP2's (``fully_shard``) modules, resharded before the parameters are read
        #: (:meth:`params`); the exact backends are refused where there are any
        self.fsdp_modules = [
            m for m in model.modules() if callable(getattr(m, "_get_fsdp_state", None))
        ]
        _reshard(self.fsdp_modules)
        #: loss_fn=None: the model's own loss, adapted (decides self.loss_fn with the data)
        self.adapter = HuggingFaceLoss(model) if loss_fn is None else None
        #: a loss that is not finite is left for a collective to carry to every rank (set by a
        #: Curvature under a process group), not refused on this rank alone: the batches whose
        #: last loss was not finite
        self.defer_nonfinite = False
        self.nonfinite_batches: set[int] = set()
        #: whether other ranks' batches join this one's in the mean (set by a Curvature under a
        #: process group): a mean over all the data then weighs batches across ranks too
        self.across_ranks = False
        #: an error of this rank's data found inside a product under a process group, raised
        #: after the product's sum (which it makes NaN, so every rank refuses it): for good
        self.refusal: ValueError | None = None
        #: whether a batch's loss was seen to curve in the outputs (the Gauss-Newton kind's
        #: check that its matrix is not 0: :func:`curvscope.derivatives.kinds.prepare_ggn`)
        self.ggn_checked = False
        #: under a process group: no batch of this rank's curved in the outputs, to be decided
        #: with the other ranks' at the product's sum (Curvature._summed_over_ranks)
        self.ggn_linear = False
        self.loss_fn = loss_fn
        self.seed = check_seed(seed)
        self._params = select_parameters(model, params, prefix)
        first = next(iter(self._params.values()))
        self.device, self.dtype = first.device, first.dtype
        if self.device.type == "meta":
            raise ValueError(
                "the model's parameters are on the meta device: they have shapes but no values, "
                "so there is no curvature to measure; materialise them first (e.g. "
                "model.to_empty(device='cpu') and load the weights)"
            )
        refuse_complex(self._params.items())
        for name, p in self._params.items():
            if p.dtype != self.dtype or p.device != self.device:
                raise TypeError(
                    f"all selected parameters must share one dtype and device; {name!r} is "
                    f"{p.dtype} on {p.device}, others {self.dtype} on {self.device}; "
                    "convert the model with model.to(...) or select a uniform subset with params="
                )
        self.names = list(self._params)
        # a ZeRO-3 parameter's own shape, not its empty .data's (derivatives/zero3.py)
        self.shapes = [full_shape(p) for p in self._params.values()]
        #: each selected parameter's names (a tied weight's every name), to tell a tie undone or
        #: made since (:attr:`params`)
        self._tied = _names_of(model, self._params)
        self.numels = [math.prod(s) for s in self.shapes]
        self.num_params = sum(self.numels)
        self._selected = set(self.names)
        self._data = self._normalise_data(data)
        self.in_memory = isinstance(self._data, list)
        self._fingerprints: list[tuple[Any, ...]] = []
        self.num_batches, self.num_samples = self._count()
        #: data in memory: each tensor and its version counter when the operator was built
        self._data_versions = self._versions_now()
        if self.adapter is not None:  # settled by the first batch's labels
            self.loss_fn = self.adapter.loss_fn
        #: the loss's settings its batches' weights were counted with (:meth:`_count`), a copy
        #: of the class weights (:meth:`_check_loss_settings`: compared by value at each pass)
        counted = _counting(self.loss_fn)
        self._loss_settings = (*counted[:2], None if counted[2] is None else counted[2].clone())
        self._check_repeatable()
        self._read_modules(model)
        self._forward_generators = [torch.random.default_generator]
        if self.device.type == "cuda":
            index = torch.cuda.current_device() if self.device.index is None else self.device.index
            self._forward_generators.append(torch.cuda.default_generators[index])
        self._loss_checked = False
        self._watched = False  # custom autograd Functions checked (:meth:`watch`)
        #: the batches (their place in a pass) whose first forward in this operator has run
        #: (:meth:`_learning_forward`): what a forward writes and sets is learned from each
        self._learned: set[int] = set()
        #: those learned at least once, never cleared: only there is a write into a copy of a
        #: parameter written back (:func:`_written_back`), once per batch, not at each relearning
        self._ever_learned: set[int] = set()
        #: how many times a forward wrote into the user's parameters — a write first seen (by
        #: their storage) or a copy's written back: a pass that wrote is run again at once
        #: (``Curvature._products`` and ``_apply``), its earlier batches having run before
        self.writes = 0
        #: the parameters' versions and the modules' modes at the last pass (:meth:`_pass_begins`)
        self._passed_at: list[Any] = []
        #: the parameters a forward writes into, passed as copies (:meth:`_written_in_forward`)
        self._written: set[str] = set()
        #: the tensors held as plain attributes that a forward writes into in place, copies
        #: during its forwards (:meth:`_attributes_written`): (name, module, attribute)
        self._attributes: list[tuple[str, nn.Module, str]] = []
        #: every plain tensor attribute a forward writes in place, copied or not, or assigns
        #: (:meth:`_attributes_changed`): the cache's check reads them (:meth:`attribute_state`),
        #: and a block recomputed in a backward gets copies of them
        self._attribute_writes: list[tuple[str, nn.Module, str]] = []
        #: every attribute a batch's first forward wrote in place (into a copy), assigned,
        #: created or deleted, tensor or not: held by each forward and put back as its pass ends
        #: (:func:`_as_found`), so that the model is left as found
        self._held: list[tuple[str, nn.Module, str]] = []
        #: the modules' hook dicts a batch's first forward registered hooks in (:meth:`_forward`)
        self._hooks_changed: list[dict[Any, Any]] = []
        #: per graph (its batch's place in a pass over the data), whether a product's backward
        #: writes into the model's buffers (a forward recomputed there: :meth:`recomputation_
        #: kept`); a graph not in it has not been through a product yet
        self._recomputation_writes: dict[int, bool] = {}
        #: whether a block recomputed in a pass's backward set the attributes again, said
        #: (:meth:`backward_state`)
        self._recomputation_said = False
        #: per :meth:`context` entered, the attributes swapped for copies during it, put back
        #: as it ends (a loss that reads an attribute the forward wrote read the user's, the
        #: previous batch's, when they were put back as the forward returned: 3.7% off, the
        #: third diff review)
        self._passes: list[_Swapped] = []
        #: the batches whose adapted loss was checked against the model's own (loss_fn=None)
        self._own_checked: set[int] = set()
        #: the batches whose reduction was checked (:meth:`_check_reduction_over_rows`)
        self._rows_checked: set[int] = set()
        #: the batches whose empirical-Fisher terms were checked (:mod:`~curvscope.derivatives.
        #: kinds`: per-sample terms that add up to the batch's loss), once each, as above
        self.terms_checked: set[int] = set()
        #: how loss_fn reduces over the samples of a batch: "mean" or "sum" (the curvature is
        #: then that of the mean over all the data, or of the sum); settled by the first loss
        declared = reduction or getattr(self.loss_fn, "reduction", None)
        if declared == "batchmean":  # nn.KLDivLoss's: the rows' mean of each row's sum
            declared = "mean"
        self._declared = declared in REDUCTIONS or declared == "none"
        self.reduction: str = declared if declared in REDUCTIONS else "mean"

    # ----------------------------------------------------------------------- parameters
    @property
    def params(self) -> dict[str, Tensor]:
        """Name → the model's *current* parameter of that name.

        Looked up on every access, so a parameter that was replaced (``load_state_dict(...,
        assign=True)``, ``module.weight = nn.Parameter(...)``) is followed, not the old object.
        """
        _reshard(self.fsdp_modules)
        named: dict[str, Tensor] = dict(self.model.named_parameters(remove_duplicate=False))
        current: dict[str, Tensor] = {}
        for (name, old), shape in zip(self._params.items(), self.shapes, strict=True):
            p = named.get(name)
            if p is None:
                raise RuntimeError(
                    f"the model no longer has a parameter named {name!r}; build a new Curvature "
                    "for the changed model"
                )
            if not is_dtensor(p) and full_shape(p) != shape:  # (resized, or replaced)
                raise RuntimeError(
                    f"parameter {name!r} is now of shape {tuple(full_shape(p))}, but the "
                    f"operator was built for {tuple(shape)} (resized in place, `.data = ...`, or "
                    "replaced, `resize_token_embeddings`); build a new Curvature for the changed "
                    "model"
                )
            if p.dtype != self.dtype or p.device != self.device:
                raise ValueError(
                    f"parameter {name!r} is now {p.dtype} on {p.device}, but the operator was "
                    f"built for {self.dtype} on {self.device} (the model was converted, e.g. "
                    "model.double() or model.to(device)); build a new Curvature for it"
                )
            if p is not old:
                if p.shape != old.shape:
                    raise RuntimeError(
                        f"parameter {name!r} was replaced by one of shape {tuple(p.shape)}, "
                        f"{p.dtype} on {p.device} (the operator was built for "
                        f"{tuple(old.shape)}, {old.dtype} on {old.device}); build a new Curvature"
                    )
                self._params[name] = p
            current[name] = p
        tied = _names_of(self.model, current, named)
        if tied != self._tied:
            moved = [(a, b) for a, b in zip(self._tied, tied, strict=True) if a != b][:3]
            then = "; ".join(" = ".join(a) for a, _ in moved)
            now = "; ".join(" = ".join(b) for _, b in moved)
            raise RuntimeError(
                "the model's weights are tied differently from when the operator was built "
                f"(the names that hold one weight: then {then}, now {now}; a tie "
                "undone by load_state_dict(..., assign=True) or a parameter assigned anew, or "
                "made since): the operator measured the old parameters (a kept one gave its "
                "tied products, 44–135% off); build a new Curvature for the changed model"
            )
        return current

    def model_state(
        self,
    ) -> tuple[tuple[int, ...], list[tuple[Any, ...]], list[tuple[str, Tensor]]]:
        """What the cache checks before every product, from one walk over the modules of the
        model and of a loss module (:meth:`_modules_read`): each parameter's
        ``requires_grad`` and the handles of each module's hooks (and the global ones:
        :data:`_HOOKS_READ`); what each module's attributes are bound to (its ``training``, a
        temperature, a flag, a stride, a plain tensor: compared by identity,
        :func:`bindings_unchanged`); and every tensor a forward pass reads from them — all
        parameters and buffers — by name (the plain tensor attributes it writes, by value:
        :meth:`attribute_state`). A temperature the user lowered between two products of a
        kept operator was not seen: the second product was the first's, 73% off a new
        operator's (a review)."""
        flags: list[int] = []  # (bools among them)
        bindings: list[tuple[Any, ...]] = []
        tensors: list[tuple[str, Tensor]] = []
        seen: dict[int, int] = {}  # a parameter's id -> its place among them
        for mod_name, mod in self._modules_read():
            prefix = f"{mod_name}." if mod_name else ""
            found = vars(mod)
            bindings.append(tuple(found.values()))
            flags += _hook_handles(found)  # (:data:`_HOOKS_READ`)
            for k, p in mod._parameters.items():
                if p is not None:  # which earlier one it is, if any: a tie undone or made
                    # with equal values was not seen (44–135% off: a sequence fuzzing); one
                    # object replaced by an equal one is no change
                    flags += (p.requires_grad, seen.setdefault(id(p), len(seen)))
                    tensors.append((prefix + k, p))
            tensors += [(prefix + k, b) for k, b in mod._buffers.items() if b is not None]
            if mod_name.startswith("loss_fn"):  # the graphs hold a loss's own buffers (class
                # weights): written in place, even to equal values, they failed with torch's
                # bare "modified by an inplace operation" (the diff review): rebuilt
                flags += [b._version for b in mod._buffers.values() if b is not None]
        return (*flags, *_global_hooks()), bindings, tensors

    def _modules_read(self) -> Iterator[tuple[str, nn.Module]]:
        """The model's modules by name, and a loss that is a module's (``loss_fn.…``): its
        class weights, assigned anew between two products of a kept operator, were not seen
        (the first product again, 35% off), and written in place failed with torch's bare
        "modified by an inplace operation" (a review)."""
        yield from self.model.named_modules()
        if isinstance(self.loss_fn, nn.Module):
            yield from self.loss_fn.named_modules(prefix="loss_fn")

    def attribute_state(self) -> list[tuple[str, Tensor]]:
        """The plain tensor attributes a forward writes in place or assigns
        (:attr:`_attribute_writes`), by name: a cached graph saved them, and the user's own
        forward that moved one made the next product fail with torch's bare "modified by an
        inplace operation", or read the stale graph (an outside review). The cache reads them as
        the graphs' pass left them."""
        found = [(k, mod.__dict__.get(key)) for k, mod, key in self._attribute_writes]
        return [(k, t) for k, t in found if isinstance(t, Tensor)]

    # ----------------------------------------------------------------------------- data
    @staticmethod
    def check_data(data: Any) -> None:
        """Refuse what a curvature operator cannot pass over more than once — a one-shot
        iterator — or cannot read at all, with the fix (what :meth:`_normalise_data` refuses),
        for a caller that builds its operators later (the Monitor, at its probes)."""
        ModelObjective._normalise_data(data)

    @staticmethod
    def _normalise_data(data: Any) -> Any:
        if _is_pair(data):
            return [tuple(data)]
        if isinstance(data, Mapping):  # one dict batch (a BatchEncoding is one too)
            return [dict(data)]
        if isinstance(data, Sequence) and not isinstance(data, (str, bytes, Tensor)):
            return list(data)
        if isinstance(data, Iterable):
            check_passes(data, "data", "a curvature operator passes over the data once per product")
            _check_distributed_sampler(data)
            return own_loader(data)
        raise TypeError(
            "expected data to be an (inputs, targets) pair, a dict batch with 'labels', or an "
            f"iterable of such batches (a list, a DataLoader), got {type(data).__name__}"
        )

    def _generators(self) -> list[torch.Generator]:
        return _loader_generators(self._data)

    def _data_is_list(self) -> bool:
        return isinstance(self._data, list)

    def _raw_batches(self) -> Generator[tuple[int, Any, Tensor, Tensor], None, None]:
        """(index, inputs, targets, labels) of every batch, in order."""
        if self._data_is_list():
            items: Iterator[Any] = iter(self._data)
        else:
            rng = _PassRandomness(self._generators(), DATA.seed(self.seed))
            items = rng.iterate(self._data)
        for i, item in enumerate(items):
            if isinstance(item, Mapping):
                inputs, labels = _split_dict(i, item, self._data)
            elif _is_pair(item):
                inputs, labels = item[0], item[1]
            else:
                raise TypeError(
                    f"batch {i} of data is not an (inputs, targets) pair with a tensor of "
                    f"targets, nor a dict batch with 'labels' (got {_what_batch(item)}); a "
                    "DataLoader over a TensorDataset of (inputs, targets) gives such pairs, a "
                    f"Hugging Face data collator such dicts{_one_batch_hint(self._data)}"
                )
            targets = labels if self.adapter is None else self.adapter.targets(i, labels)
            yield i, inputs, targets, labels

    def _size(self, targets: Tensor) -> float:
        """What a mean-reduced loss averages over in a batch, its weight in the mean over all
        the data: its samples (the targets' rows); for torch's mean cross-entropy with class
        labels its counted labels (positions too, for (N, d…) labels: less those at
        ``ignore_index``, weighed by ``weight=``; float with class weights), so that the same
        data batched differently is the same loss — before, batches were weighted by their
        rows, and a loader gave λ_max 0.90 where the same data as one batch gave 0.75; with
        loss_fn=None what the model's own loss averages over (target tokens)."""
        if self.adapter is not None:
            return float(self.adapter.count(targets))
        count = mean_count(self.loss_fn, targets)
        return float(targets.shape[0]) if count is None else count

    def _count(self) -> tuple[int, float]:
        """(batches, samples) of the data; each batch's rows and size kept (:meth:`batches`)."""
        #: per batch, its rows and what a mean loss averages over in it (:meth:`_size`): read
        #: once, not on every pass (counting labels reads the targets' values)
        self._sizes: list[tuple[int, float]] = []
        batches, samples = 0, 0.0
        sized = _sized(self._data)
        for i, inputs, targets, _ in self._raw_batches():
            size = self._size(targets) if targets.ndim else 0.0
            if self.adapter is not None and size == 0:
                raise self.adapter.nothing_counted(i, self._drop_advice())
            if targets.ndim == 0 or targets.shape[0] == 0:
                raise ValueError(
                    f"batch {i} has no samples (targets of shape {tuple(targets.shape)}); "
                    "the first dimension of the targets counts the samples"
                )
            if size == 0 and getattr(self.loss_fn, "reduction", None) != "sum":
                raise ValueError(
                    f"batch {i} has no label the loss counts (each is its ignore_index, or "
                    f"of a class whose weight is 0): its mean loss is 0/0; {self._drop_advice()}"
                )
            for t in (*tensors(inputs), targets):
                if not all_finite(t):
                    raise ValueError(
                        f"batch {i} of data contains NaN or Inf; clean the data (e.g. "
                        "torch.nan_to_num) or drop those samples"
                    )
            if not self._data_is_list():
                self._fingerprints.append(_fingerprint(inputs, targets))
            self._sizes.append((int(targets.shape[0]), size))
            batches += 1
            samples += size
            if batches > MAX_UNSIZED_BATCHES and not sized:
                raise ValueError(
                    f"data has yielded {MAX_UNSIZED_BATCHES} batches and not ended, and has no "
                    "len(): an endless stream (an IterableDataset that repeats)? A curvature "
                    "operator passes over all the data at every product: pass a finite part "
                    "of it, e.g. list(itertools.islice(loader, 16))"
                )
        if batches == 0:
            raise ValueError(
                "data is empty: the curvature of the mean loss needs at least one "
                "(inputs, targets) batch"
            )
        return batches, samples

    def _drop_advice(self) -> str:
        """How to leave out a batch with nothing to average: from a list, drop it; a loader's
        batches are drawn (the user cannot drop one: a review)."""
        if self._data_is_list():
            return "drop the batch"
        return (
            "drop the batch — from a loader: drop_last=True where it is a small last batch, "
            "or another seed= (the shuffle curvscope fixes draws from it), or the batches "
            "drawn once as a list without it"
        )

    def _check_repeatable(self) -> None:
        """A loader's first batch, drawn again, must be the same: the cheap check that the
        randomness curvscope fixes is all there is."""
        if self._data_is_list():
            return
        batches = self._raw_batches()
        try:
            first = next(batches, None)
            if first is None:  # no bare StopIteration: map() and list() read it as their end
                raise self._changed(
                    "the data yielded no batch on its second pass (data that can be read only "
                    "once — an __iter__ that returns the same iterator each time?)"
                )
            i, inputs, targets, _ = first
            self._check_fingerprint(i, inputs, targets)
        finally:
            batches.close()

    def _versions_now(self) -> list[tuple[Tensor, int | None]]:
        """Each tensor of data in memory, with its version counter (None for an inference
        tensor, which has none and cannot be written outside inference mode): a list's, or
        those a loader's dataset holds (:func:`_dataset_tensors`)."""
        if not self._data_is_list():
            return [(t, _version(t)) for t in _dataset_tensors(self._data)]
        return [(t, _version(t)) for item in self._data for t in tensors(item)]

    def check_unchanged_data(self, in_pass: bool = False) -> None:
        """Data in memory (a list of batches, or one batch) must be what the operator was built
        on, as a loader's batches are (their fingerprints; the list is the operator's own copy,
        so a batch replaced in the user's list is not used): a tensor written in place since
        (``X.copy_(new_batch)``, ``X[:] = ...``) gave products of the old data through the
        cached graphs — λ_max 2.160 "converged" for 2.067, the exact trace 9.44 for 10.97 — or
        torch's bare "modified by an inplace operation" (an outside review). Checked before
        every pass and every cached product (a version counter a tensor: under a microsecond);
        a write that bypasses the version counter (``X.data`` assigned, numpy memory shared
        with ``torch.from_numpy`` written through numpy) is not seen. A loader's dataset's
        tensors (:func:`_dataset_tensors`) before a cached product only — a pass fingerprints
        each batch it reads — and where they moved, its batches decide
        (:meth:`_batches_as_built`)."""
        loader = not self._data_is_list()
        if loader and in_pass:  # its batches were fingerprinted as the pass read them: what the
            self._data_versions = self._versions_now()  # dataset wrote itself then, taken in
            return
        if not self._written_since():
            return
        if loader and self._batches_as_built():  # (written where its batches do not read:
            self._data_versions = self._versions_now()  # another split; or by its own reads)
            return
        if in_pass:  # checked at the pass's start: written by the model's own forward
            raise DataChangedError(
                "the model's forward writes the data it is given in place (an in-place layer "
                "first — nn.ReLU(inplace=True), nn.Dropout(inplace=True) — or an in-place op "
                "on the inputs), so each product would see other data; make that operation "
                "out of place, or pass the model a copy (a first layer that clones its input)"
            )
        raise _written_error()

    def _written_since(self) -> bool:
        """Whether a tensor of the data (:meth:`_versions_now`) was written, or replaced, since
        the operator was built or last took the data in."""
        now, then = self._versions_now(), self._data_versions
        return len(now) != len(then) or any(
            t is not t0 or v != v0 for (t, v), (t0, v0) in zip(now, then, strict=True)
        )

    def _batches_as_built(self) -> bool:
        """Whether a loader's batches are those of the first pass, by their fingerprints: one
        pass over the loader, without the model, where its dataset's tensors were written since
        (:meth:`check_unchanged_data`) — a loader over one split of a dataset was refused for a
        write to another's rows (the diff review)."""
        count = 0
        for i, inputs, targets, _ in self._raw_batches():
            if (
                i >= len(self._fingerprints)
                or _fingerprint(inputs, targets) != self._fingerprints[i]
            ):
                return False
            count += 1
        return count == len(self._fingerprints)

    def _check_fingerprint(self, i: int, inputs: Any, targets: Tensor) -> None:
        if i < len(self._fingerprints) and _fingerprint(inputs, targets) != self._fingerprints[i]:
            if self._written_since():  # (the dataset's tensors written in place: said so)
                raise _written_error()
            raise DataChangedError(
                f"batch {i} of the data differs from the same batch on the first pass, although "
                "curvscope fixes the loader's shuffling, worker seeds and the global RNGs for "
                "every pass: something else draws randomness or changed the data (a dataset "
                "with a random generator of its own, random augmentation in persistent workers, "
                "a sampler with an RNG of its own, DistributedSampler.set_epoch called since the "
                "operator was built). A curvature operator must be one fixed matrix: make the "
                "data deterministic (no augmentation or a seeded one), build a new Curvature "
                "after set_epoch, or pass a list of batches drawn once"
            )

    def batches(self) -> Iterator[Batch]:
        """The batches on the parameters' device, the same on every pass; raises if the data
        or the loss's settings changed since construction. A pass begins here
        (:meth:`_pass_begins`), whatever it is for."""
        if self._data_is_list():  # (a loader's batches are fingerprinted as they are read)
            self.check_unchanged_data()
        self._pass_begins()
        dev = self.device
        move = partial(map_tensors, lambda t: t.to(dev))
        count = 0
        for i, inputs, targets, labels in self._raw_batches():
            if not self._data_is_list():
                self._check_fingerprint(i, inputs, targets)
            rows = int(targets.shape[0])
            if i >= len(self._sizes) or rows != self._sizes[i][0]:
                raise self._changed(f"batch {i} has {rows} samples")
            count += 1
            yield Batch(i, move(inputs), targets.to(dev), self._sizes[i][1], move(labels))
        if count != len(self._sizes):
            raise self._changed(f"the data yielded {count} batches")
        self.check_unchanged_data(in_pass=True)

    def _changed(self, now: str) -> DataChangedError:
        """The data differ in size from when the operator was built."""
        rows = sum(r for r, _ in self._sizes)
        return DataChangedError(
            f"{now}, but the data had {len(self._sizes)} batches of {rows} samples when the "
            "operator was built; a curvature operator needs the same data on every pass (no "
            "growing or shrinking datasets)"
        )

    # -------------------------------------------------------------------------- forward
    def leaves(self) -> dict[str, Tensor]:
        """Fresh differentiable copies (sharing storage) of the selected parameters."""
        return {k: p.detach().requires_grad_(True) for k, p in self.params.items()}

    def _state(self, theta: Mapping[str, Tensor]) -> dict[str, Any]:
        """Every parameter and buffer a forward reads, in each module that holds it (a weight
        tied between two modules under both names, so that ``functional_call`` need not search
        the model for ties again): ``theta`` for the selected parameters (every name of a tied
        one), detached parameters and copied buffers for the rest (a buffer shared by two
        modules one copy). BatchNorm's running statistics are copies too, not None, in train
        mode: a train-mode BatchNorm normalises by the batch's statistics either way and
        updates the copies, but torch's fused quantization-aware ``ConvBn`` modules read
        their ``bn``'s running variance themselves (every product raised torch's bare
        "running_var must not be None": an outside review). One walk over the modules, each
        module once."""
        params: list[tuple[str, Tensor]] = []
        state: dict[str, Any] = {}
        copies: dict[int, Tensor] = {}
        # each module once: functional_call swaps a module registered under two names twice
        # and restores the second swap's tensor, leaving the model a detached parameter
        for mod_name, mod in self.model.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            params += [(prefix + k, p) for k, p in mod._parameters.items() if p is not None]
            for name, b in mod._buffers.items():
                if b is not None:
                    if id(b) not in copies:
                        copies[id(b)] = b.clone()
                    state[prefix + name] = copies[id(b)]
        state.update(self._parameters_passed(params, theta))
        return state

    def _parameters_passed(
        self, params: list[tuple[str, Tensor]], theta: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Each name of a parameter (a tied one's every name) -> what a forward is passed for
        it: ``theta``'s for the selected, detached for the rest — copies of those a forward
        writes into (:meth:`_written_in_forward`). The selected are matched by object, not by
        name: a module registered twice (``self.b = self.a``) is walked under its first name
        only, and its weight selected as ``b.weight`` was passed detached — a block of zeros,
        λ_max 0.36 for 0.50, unrefused (an outside review)."""
        copy = {id(p) for k, p in params if k in self._written} if self._written else set()
        chosen = {id(self._params[k]): t for k, t in theta.items()}
        tied = {
            id(p): chosen[id(p)].clone() if id(p) in copy else chosen[id(p)]
            for k, p in params
            if id(p) in chosen
        }
        passed = {}
        for k, p in params:
            mine = tied.get(id(p))
            if mine is None:  # not selected: a constant, unless a recomputation must match it
                mine = p.detach().clone() if id(p) in copy else p.detach()
                if self._checkpointing and p.requires_grad:  # (never inside torch.func)
                    mine.requires_grad_(True)
            passed[k] = mine
        return passed

    def _read_modules(self, model: nn.Module) -> None:
        """What the model's modules ask of a product's passes, from one walk over them, and
        the notes that say so."""
        named = list(model.named_modules())  # one walk, names and modules
        modules = [m for _, m in named]
        self._has_rnn = any(isinstance(m, nn.RNNBase) for m in modules)
        #: torch's weight norm is computed written out during products (derivatives/substitutes)
        self._weight_norm = uses_weight_norm(modules)
        #: embeddings, whose :data:`_EMBEDDING_FLAGS` are off during curvscope's passes
        #: (:meth:`context`): sparse gradients dense (the same values, where torch has neither a
        #: double backward nor a flat view of a sparse gradient: its bare "reshape is not
        #: implemented for sparse tensors" before), and the gradient the loss's own
        self._embeddings = [m for m in modules if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
        #: torch.compile'd modules inside the model (the wrapper around it is taken off)
        self._compiled_inside = [name for name, m in named if _compiled(m)]
        #: a model that recomputes its forward in the backward (Hugging Face's gradient
        #: checkpointing): the recomputation reads the model's own parameters, so parameters
        #: not selected are passed requiring grad like them, or its tensors' metadata differs
        #: from the forward's (torch's CheckpointError)
        self._checkpointing = _recomputes(model)
        #: selected embeddings' padding rows (their curvature is P·H·P: :func:`padding_rows`)
        self.padding, self.tied_padding = padding_rows(model, modules, self._params)
        self.notes = self._fallback_notes(named)

    def rerun_on_recompute(self, run: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``run(*args, **kwargs)`` (a batch's pass), run again once if activation
        checkpointing's recomputation failed to match a forward that passed the parameters
        left out by ``params=`` as constants (torch's CheckpointError, as :meth:`context`
        raised it): from then on they are passed requiring grad, as for Hugging Face's gradient
        checkpointing. Every kind's pass (the Gauss-Newton's, the Fishers' failed with torch's
        error: the diff review)."""
        try:
            return run(*args, **kwargs)
        except RuntimeError as e:
            if self._checkpointing or type(e.__cause__).__name__ != "CheckpointError":
                raise
            self._checkpointing = True
        return run(*args, **kwargs)

    @contextlib.contextmanager
    def context(self, batch_index: int, second_order: bool = True) -> Iterator[None]:
        """Fixed randomness per batch, global RNG restored, gradients on, and — for passes whose
        second derivatives are taken (``second_order``) — differentiable kernels; a pass that
        needs first derivatives only (the finite-difference backend) keeps the fused ones.

        Only the torch generators a forward pass on this device draws from are seeded (the
        CPU's and, on an accelerator, that device's), and exactly those are restored: seeding
        through ``torch.manual_seed`` would reseed every CUDA device while restoring one. numpy's
        and Python's global RNGs are seeded and restored too: a forward that draws from them
        (Hugging Face's LayerDrop in wav2vec2 draws from numpy) would otherwise change the
        operator between products — two products of one vector 56% apart, λ_max 1.67 to 2.88
        with the seed, each "converged" — and advance the user's RNGs (about 26 µs a forward:
        :mod:`curvscope.derivatives.rng`). A generator the model holds itself is not seen.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "curvscope was called inside torch.inference_mode(), under which no tensor "
                "records a graph, so no derivative can be taken; call it outside that block "
                "(torch.no_grad() around the call is fine: curvscope turns gradients on itself)"
            )
        gens = self._forward_generators
        # first derivatives (finite differences) are right through the fused kernels
        kernels = self.kernels() if second_order else nullcontext()
        # an embedding's flags that change its gradient, off during the pass and put back as
        # found: ``sparse`` (the same gradient, dense: sparse ones have no derivatives) and
        # ``scale_grad_by_freq`` (torch scales the gradient by the inverse frequency of each
        # index in the batch, which is no derivative of the loss: the operator was neither the
        # Hessian nor symmetric, 39% and 59% off, without a word: an outside review)
        switched = [(m, f) for m in self._embeddings for f in _EMBEDDING_FLAGS if getattr(m, f)]
        rng.LOCK.acquire()  # (released in the finally below: one thread's RNGs at a time)
        try:
            saved = rng_states(gens)  # (numpy's has moved: restored in the finally below)
        except BaseException:  # (a device's error: nothing switched yet, the lock let go)
            rng.LOCK.release()
            raise
        for m, f in switched:
            setattr(m, f, False)
        # inside torch's parametrize.cached(), a forward at curvscope's copies filled the cache
        # with a weight the user's own backward then went through (its gradient lost: an outside
        # review), and a forward of the user's before curvscope's was read as a loss reading the
        # parameters: no cache during curvscope's passes
        cache_was = parametrize._cache_enabled
        parametrize._cache_enabled = 0
        self._passes.append([])  # the plain attributes its forwards copy (:meth:`_call`)
        try:
            with kernels, torch.enable_grad(), self.recomputation_kept():
                seed_rngs(gens, FORWARD.seed(self.seed, batch_index))
                yield
        except RuntimeError as e:
            ours = _checkpoint_error(e)
            if ours is None:
                raise
            raise ours from e
        finally:
            _swap_back(self._passes.pop()[::-1])
            try:
                set_rng_states(gens, saved)
            finally:
                rng.LOCK.release()
            for m, f in switched:
                setattr(m, f, True)
            parametrize._cache_enabled = cache_was

    def recomputation_kept(
        self, graph: int | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Around backward passes: the model's buffers are copies, so that a forward recomputed
        there — activation checkpointing reruns a block with the model's own, not the copies
        the pass's forward was given — writes into those. A BatchNorm in a checkpointed block
        moved the user's running statistics at every product (its kernel does so without
        bumping their version counters), and every product rebuilt the cached graph (an
        outside review). In a pass these are copies beside the forward's own (:meth:`_state`),
        not the same: a recomputed block then starts from what the forward started from.
        Copies swapped in, not values written back: a graph the recomputation built saved the
        tensors it wrote, and a write back bumped the counters it checks. In a pass
        (:meth:`context`, no ``graph``) every time; around the products of a batch's graph
        (``graph``: the batch's place in the pass), from its first product on only if its
        backward wrote — learned per graph, as :meth:`backward_state` learns it: learned once
        for all, a model that checkpoints its larger batches only moved the user's running
        statistics at every product (the reread) — otherwise nothing (a cached product's hot
        path). The plain attributes a forward changes: :meth:`backward_state`."""
        if graph is not None and self._recomputation_writes.get(graph) is False:
            return nullcontext()
        return self._recomputation_copies(graph)

    @contextlib.contextmanager
    def _recomputation_copies(self, graph: int | None) -> Iterator[None]:
        """:meth:`recomputation_kept`'s copies, swapped in and put back (learning, for a
        ``graph``, whether its backward wrote)."""
        buffers = _buffer_copies(self.model)
        put = [(where, key, _at(where, key)) for where, key, _, _ in buffers]
        try:
            yield
        finally:
            if graph is not None and graph not in self._recomputation_writes:
                # (a host read a tensor on a GPU, once a graph)
                self._recomputation_writes[graph] = any(
                    _at(where, key) is not there for where, key, there in put
                ) or any(not torch.equal(t, mine) for _, _, t, mine in buffers if mine is not None)
            # the user's buffers, whatever a recomputation assigned (every forward of
            # curvscope's gets copies of them)
            _swap_back(buffers, kept=False)

    def backward_state(self) -> Callable[[], contextlib.AbstractContextManager[None]]:
        """In a pass, after its loss and before any backward: what each backward pass through
        this forward's graph runs inside (:data:`curvscope.derivatives.kinds.Backward`), in the
        pass or through a cached graph after it — the plain attributes the forward changed as
        it left them, as in torch's own backward, with fresh copies of those it writes in place
        (for a block that activation checkpointing recomputes there to write), and as found
        again after. A full backward hook that reads what a forward hook stored (``mod.a =
        input``, as K-FAC does) found the attribute put back, absent, once the pass had ended
        (``AttributeError``); resetting the attributes to as the forward began, for a block
        that reads what it writes, gave a block that reads what the forward set before it a
        gradient 134% off, and the columns of a block of vectors drifted apart (one copy
        written by each column's recomputation): the diff review. Nothing for a model whose
        forward changes none."""
        if not self._passes or not (self._held or self._attribute_writes):
            return nullcontext
        left: _Swapped = [
            (vars(m), key, vars(m).get(key, _ABSENT), None) for _, m, key in self._held
        ]
        return partial(self._as_left, left, _Recomputes())

    @contextlib.contextmanager
    def _as_left(self, left: _Swapped, graph: _Recomputes) -> Iterator[None]:
        """:meth:`backward_state`'s context: the attributes as ``left``; while a backward may
        recompute a block (learned at this graph's first backward: a model that checkpoints
        some batches only drifted 8–15% a product when it was learned once for all, the diff
        review), copies of the written ones for it to write, and — until said — whether it
        set them otherwise. (Copies at every backward cost a block of 8 vectors 1.75–6.2x on a
        model whose forward stores a 128 MB tensor and recomputes nothing: the diff review.)"""
        swapped = _as_found(self._held, left)
        watch = None
        if graph.recomputes is not False:
            swapped += _swap_in(self._attribute_writes)
            watch = _Recomputation(swapped)
        try:
            with watch or nullcontext():
                yield
        finally:
            if watch is not None:
                graph.recomputes = graph.recomputes or bool(watch.forwards)
                moved = watch.moved()
                if moved and not self._recomputation_said:
                    self._recomputation_said = True
                    self._say_recomputed(moved)
            _swap_back(swapped[::-1])

    def _say_recomputed(self, moved: set[tuple[int, str]]) -> None:
        """The note that a block recomputed in a backward set the attributes ``moved``
        (:class:`_Recomputation`) to other values than its forward left."""
        slots = [*self._held, *self._attribute_writes]
        names = list(dict.fromkeys(k for k, m, key in slots if (id(vars(m)), key) in moved))
        note = (
            "a block that activation checkpointing recomputes in the backward sets "
            f"{few(names)} to other values than its forward did: it starts from the values the "
            "forward left, not from those the forward started from. If the block reads what it "
            "sets (a running statistic updated, then used), your training's gradients and "
            "curvscope's numbers, which follow torch's backward, are not the loss's "
            "derivatives; keep such state out of the checkpointed block"
        )
        self.notes.append(note)
        # (said as a context manager is left: contextlib's frame is not the caller's)
        level = callers_level((PACKAGE, contextlib.__file__))
        warnings.warn(note, AttributeWriteWarning, stacklevel=level)

    def graphs_built(self, rebuilt: bool = False) -> None:
        """New graphs (a pass): whether their backward writes into the model is learned anew
        at their first product (:meth:`recomputation_kept`) — a model switched to train mode,
        or to checkpointing, after an operator's first product moved the user's running
        statistics at every later one (the diff review). Graphs ``rebuilt`` because the model
        changed: what each batch's forward sets is learned anew too (as after any change the
        pass sees: :meth:`_pass_begins`)."""
        self._recomputation_writes.clear()
        if rebuilt:
            self._learned.clear()

    def _pass_begins(self) -> None:
        """What every pass over the data (:meth:`batches`: a product's, a gradient's, a
        diagnosis's) begins with: the loss's settings checked (:meth:`_check_loss_settings`),
        and, where a parameter, a module's mode, the modules or their hooks changed since the
        last pass (:meth:`_moved`, a few µs), what each batch's forward sets learned anew and
        written again as the user's own next pass would — not where curvscope's forwards
        themselves wrote the parameters (:meth:`_wrote`).

        Without it a forward that sets an attribute past a threshold, or in train mode, left a
        kept operator's model moved (17% off a new operator), a tied max-norm table moved back
        over the norm was 6.8% off (diff reviews); and done at a product's pass alone, an
        uncached ``loss_and_gradient()`` gave a changed loss's gradient 14% off and left a new
        hook's state on the model (outside sequence fuzzing)."""
        self._check_loss_settings()
        moved = self._moved()
        if moved != self._passed_at:
            self._learned.clear()
            self._ever_learned.clear()
        self._passed_at = moved

    def _check_loss_settings(self) -> None:
        """Refuse a loss whose reduction, ``ignore_index`` or class weights (``weight=``)
        changed since the operator was built, over several batches: each batch's weight in the mean
        (the labels it counts under them) was read at construction, and the products came out
        18–67% off a new operator, the loss 1.175 for 1.161 (an outside review's sequence
        fuzzing). Settings that weigh no batch (``label_smoothing``, ``pos_weight``, a Huber
        ``delta``) are followed; one batch weighs 1 whatever they are: only a changed reduction
        is refused there. Compared by value, a few µs a pass (class weights written through
        ``.data`` too: the diff review)."""
        now, then = _counting(self.loss_fn), self._loss_settings
        weights = "as they were" if _same_weights(now[2], then[2]) else "changed"
        several = self.num_batches > 1
        if now[0] != then[0] or (several and (now[1] != then[1] or weights == "changed")):
            raise RuntimeError(
                "the loss's reduction, ignore_index or class weights changed since the operator "
                f"was built (reduction {then[0]!r} -> {now[0]!r}, ignore_index {then[1]!r} -> "
                f"{now[1]!r}, class weights {weights}), and the batches' weights in the loss "
                "were counted with the old ones; build a new Curvature for the changed loss"
            )

    def _moved(self) -> list[Any]:
        """The modules (which, their modes, the handles of their hooks), the hooks of every
        module's, and the parameters' versions (:meth:`_pass_begins`): a hook registered or a
        stateful submodule swapped in after an uncached operator's first pass was never
        learned — what it set stayed on the user's model, and two products of one vector
        were 42–51% apart (an outside review's sequence fuzzing)."""
        modules = list(self.model.modules())
        moved: list[Any] = []
        for m in modules:
            moved.append((id(m), m.training, _hook_handles(vars(m))))
        moved += [
            (id(p), p._version) for m in modules for p in m._parameters.values() if p is not None
        ]
        moved.append(tuple(_global_hooks()))
        return moved

    def _wrote(self) -> None:
        """A forward of curvscope's wrote into the user's parameters: counted (a pass that
        wrote is run again, :attr:`writes`), and the versions it moved taken as the last
        pass's, so that it is not read as the user's change (:meth:`_pass_begins`)."""
        self.writes += 1
        self._passed_at = self._moved()

    def kernels(self) -> contextlib.AbstractContextManager[None]:
        """The kernel switches a second-order forward runs under (in :meth:`context`), alone
        also for the backward passes of a product through a kept graph: a forward recomputed
        there (activation checkpointing) must run on the kernels the forward did, or its
        tensors differ from the forward's."""
        return DifferentiableKernels(self._has_rnn, self._weight_norm, self._any_compiled())

    def _any_compiled(self) -> bool:
        """Whether compiled code may run in a product: a torch.compile'd module inside the
        model, or anything once torch.compile has been used in this process (``torch._dynamo``
        imported: Hugging Face's transformers imports it too) — a compiled function called in
        the forward, a compiled loss (torch's bare "does not currently support double
        backward" from both: an outside review). Asked at each use: compiling comes later."""
        return bool(self._compiled_inside) or compiling_used()

    def arguments(self, batch: Batch, **extra: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The model's positional and keyword arguments for a batch: a mapping's items as
        keywords, a tuple or list spread, anything else the one argument; the adapter's extra
        keywords (Hugging Face) and ``extra`` added."""
        inputs = batch.inputs
        if self.adapter is not None:
            extra = {**self.adapter.extra, **extra}
        if isinstance(inputs, Mapping):
            return (), {**inputs, **extra}
        return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), extra

    def _call(
        self, theta: Mapping[str, Tensor], batch: Batch, copies: bool = True, **extra: Any
    ) -> Any:
        """The model's own output on the batch at parameters ``theta`` (keyword arguments
        ``extra`` added to the batch's); ``copies=False`` inside a torch.func transform
        (:meth:`raw_forward`)."""
        args, kwargs = self.arguments(batch, **extra)
        state = self._state(theta)
        # once per batch: torch's warning of a reentrant checkpoint heard, and what the
        # forward writes into its parameters or sets of its modules' attributes seen
        learn = batch.index not in self._learned  # (:meth:`learn` before a transform)
        held = []  # what a forward assigns or writes, put back as its pass ends
        if self._held:  # (each forward starts from the attributes as found: the user's, put
            # aside by the outermost pass that replaced them — a pass inside a pass, the own
            # loss's check, found a Hugging Face model's flag that its output-capturing hooks
            # were installed, set by the outer pass's forward, and with the hooks removed
            # captured nothing: a Mixtral's router logits, torch's bare IndexError)
            held = _as_found(self._held, [s for swapped in self._passes for s in swapped])
            if self._passes:
                self._passes[-1] += held
        try:
            if learn:
                first = batch.index not in self._ever_learned
                out = self._learning_forward(state, args, kwargs, first)
                self._learned.add(batch.index)
                self._ever_learned.add(batch.index)
                return out
            return self._call_copying(state, args, kwargs, copies)
        except Exception as e:
            self._name_the_batch(e, batch)
            raise
        finally:
            if not self._passes:  # (a forward outside a pass: put back at once)
                _swap_back(held)

    def _name_the_batch(self, e: Exception, batch: Batch) -> None:
        """A note on an error the model's forward raised, naming the batch it raised on: a
        loader's last batch of one sample through a train-mode BatchNorm raised torch's bare
        "Expected more than 1 value per channel" at every product, which batch unsaid (an
        outside review). Once, at the innermost forward."""
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        code = None if tb is None else tb.tb_frame.f_code
        # (curvscope's torch-function modes pass the model's operations through: not its own;
        # with a weight norm the note was lost — the diff review)
        ours = (
            code is not None
            and code.co_filename.startswith(_PACKAGE)
            and code.co_name != "__torch_function__"
        )
        if ours or getattr(e, "_curvscope_batch", False):  # (curvscope's own errors say it)
            return
        e._curvscope_batch = True  # type: ignore[attr-defined]
        rows = self._sizes[batch.index][0] if batch.index < len(self._sizes) else None
        note = f"(raised by the model's forward on batch {batch.index + 1}"
        if rows is not None:
            note += f" of {len(self._sizes)}, {rows} row{'s' if rows != 1 else ''}"
        if "more than 1 value per channel" in str(e):
            note += (
                "; a train-mode BatchNorm cannot normalise one sample: drop the short last "
                "batch (DataLoader(..., drop_last=True)) or measure in eval mode"
            )
        add_note = getattr(e, "add_note", None)  # (Python 3.11+; 3.10 shows no notes)
        if add_note is not None:
            add_note(note + ")")

    def _call_copying(self, state: dict[str, Any], args: Any, kwargs: Any, copies: bool) -> Any:
        """A later forward (:meth:`_call`), with copies of the plain attributes it writes."""
        if not self._attributes or not copies:
            # (inside a torch.func transform no copies: the user's attributes, which it will
            # not write, raising torch's error)
            return self._forward(state, args, kwargs)
        swapped = _swap_in(self._attributes)
        if self._passes:  # the copies stay until the pass ends: its loss may read them
            self._passes[-1] += swapped
            return self._forward(state, args, kwargs)
        try:  # (a forward outside a pass: put back at once)
            return self._forward(state, args, kwargs)
        finally:
            _swap_back(swapped)

    def _forward(
        self,
        state: dict[str, Any],
        args: Any,
        kwargs: Any,
        hooks: list[dict[Any, Any]] | None = None,
    ) -> Any:
        """The model's forward at ``state``, and the hooks it registers removed after it: a
        Hugging Face model installs its output-capturing hooks at a forward, beside a flag that
        says so, which curvscope puts back; each forward then installed them again, and the
        user's next forward returned 23 hidden states for 3 (the diff review). ``hooks``: the
        modules' hook dicts to watch (the first forward: all; later ones: those it changed)."""
        watched = self._hooks_changed if hooks is None else hooks
        before = [(d, dict(d)) for d in watched]
        try:
            return functional_call(self.model, state, args, kwargs or None, tie_weights=False)
        finally:
            changed = _dicts_back(before)
            if hooks is not None:  # (a batch's first forward: what it changed, added)
                known = {id(d) for d in self._hooks_changed}
                self._hooks_changed += [d for d in changed if id(d) not in known]

    def _learning_forward(
        self, state: dict[str, Any], args: Any, kwargs: Any, first: bool = False
    ) -> Any:
        """A batch's first forward in an operator (:meth:`_call`): torch's warnings heard, and
        what it wrote into the parameters and changed of the modules' attributes (tensors
        written in place, into copies, seen by their version counters; anything assigned,
        created or deleted) added to what the later forwards copy and put back as their pass
        ends (:meth:`_attributes_changed`). Each batch's, not the operator's first only: a
        forward that sets an attribute for some batches only (a dynamic rotary embedding
        that grows its cache for a longer sequence) left the model moved after every
        product, and a new operator 1.3e-4 off (stop 40's diff review)."""
        versions = [(k, p, p._version) for k, p in self.model.named_parameters()]
        earlier = set(self._written)  # (passed as copies: :meth:`_parameters_written`)
        held = [(a, a[3]._version) for a in tensor_attributes(self.model)]
        hooks = [d for mod in self.model.modules() for d in _hook_dicts(mod)]
        # what every module's attributes held before, and copies of its plain tensors: the
        # first forward writes into those too (its writes stood before, and each operator's,
        # each Monitor probe's, moved a training run's statistics once more: a review)
        found = {id(mod): dict(vars(mod)) for mod in self.model.modules()}
        copies = _swap_in(_copyable([a for a, _ in held], self.model))
        given = dict(found)  # (with the copies in)
        for mod in {id(a[1]): a[1] for a, _ in held}.values():
            given[id(mod)] = dict(vars(mod))
        try:
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                out = self._forward(state, args, kwargs, hooks)
            if any(REENTRANT_SAID[0] in str(w.message) for w in said):
                raise RuntimeError(REENTRANT_CHECKPOINT)
        except BaseException:
            _swap_back([*copies, *_restore(found, self.model)][::-1])
            raise
        for w in said:  # the model's other warnings, as they were
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self._parameters_written(state, versions, earlier if first else set())
        self._attributes_changed(_written(held, copies), [a for a, _ in held], given)
        put_back = [*copies, *_restore(found, self.model)]
        if self._passes:  # the loss may read them: put back as the pass ends (the rest of the
            self._passes[-1] += put_back  # pass, a block recomputed in it, writes the copies)
        else:
            _swap_back(put_back[::-1])
        return out

    def _parameters_written(
        self,
        state: Mapping[str, Any],
        versions: Sequence[tuple[str, Tensor, int]],
        copied: set[str],
    ) -> None:
        """After a batch's first forward: the parameters it wrote by their storage (their
        versions moved: :meth:`_written_in_forward`), and, at its first forward in this
        operator, what it wrote into the copies of those in ``copied`` written back
        (:func:`_written_back`)."""
        self._written_in_forward([k for k, p, v in versions if p._version != v])
        if copied and _written_back(state, [(k, p) for k, p, _ in versions if k in copied]):
            self._wrote()

    def _written_in_forward(self, written: list[str]) -> None:
        """A forward that writes into its parameters in place (a max-norm clamp, weight clipping
        in a forward pre-hook) wrote into the user's, which curvscope's forwards pass by their
        storage: every product wrote again, unseen (an outside review). Its first forward is
        let be — its write is the one the user's next forward makes — and said; the later ones
        write into copies of those parameters (:meth:`_state`)."""
        written = [k for k in written if k not in self._written]
        if not written:
            return
        self._written |= set(written)
        self._wrote()
        note = (
            f"the model's forward writes into its parameter(s) {few(written)} in place (a "
            "max-norm clamp, weight clipping?): curvscope's first forward wrote them as your "
            "next forward will; its later forwards write into copies of them. The curvature is "
            "at the parameters as written"
        )
        self.notes.append(note)
        warnings.warn(note, ParameterWriteWarning, stacklevel=callers_level())

    def _attributes_written(
        self,
        written: list[tuple[str, nn.Module, str, Tensor]],
        held: list[tuple[str, nn.Module, str, Tensor]],
    ) -> None:
        """A forward that updates a tensor it holds as a plain attribute in place (a running
        statistic kept as ``self.scale = torch.ones(...)``, no ``register_buffer``) moved the
        user's at every product, and the operator changed between products: two products of
        one vector 24% apart through a loader, eigenvalues "converged" (an outside review).
        Every forward, the first too, writes into copies (:func:`_swap_in`), so that products
        agree and the user's are left as found (a lazily initialised module's flag beside them
        is put back with them: :meth:`_attributes_changed`). Not an attribute that views
        another tensor or shares its storage with another attribute, a parameter or a buffer
        (:func:`_copyable`): such a one is written, and said. ``held``: every plain tensor
        attribute (:func:`tensor_attributes`) as the first forward found them."""
        written = [a for a in written if not _among(a[:3], self._attribute_writes)]
        if not written:
            return
        self._attribute_writes += [(k, mod, key) for k, mod, key, _ in written]
        copyable = {(id(mod), key) for _, mod, key in _copyable(held, self.model)}
        copied = [(k, mod, key) for k, mod, key, _ in written if (id(mod), key) in copyable]
        views = [k for k, _, _, _ in written if k not in {n for n, _, _ in copied}]
        self._attributes += copied
        notes = []
        if copied:
            notes.append(
                f"the model's forward writes in place into {few([k for k, _, _ in copied])}, "
                "held as plain tensor attributes: curvscope's forwards write into copies, and "
                "yours are left as found, but its cache sees your own forward move them only "
                "by their values; register them with module.register_buffer(...)"
            )
        if views:
            notes.append(
                f"the model's forward writes in place into {few(views)}, plain tensor "
                "attributes that view or share storage with other tensors of the model: "
                "curvscope cannot pass copies of them, so each of its forwards moves them, and "
                "the curvature changes from one product to the next; register them with "
                "module.register_buffer(...), whose values curvscope passes as copies"
            )
        for note in notes:
            self.notes.append(note)
            warnings.warn(note, AttributeWriteWarning, stacklevel=callers_level())

    def _attributes_changed(
        self,
        written: list[tuple[str, nn.Module, str, Tensor]],
        held: list[tuple[str, nn.Module, str, Tensor]],
        given: dict[int, dict[str, Any]],
    ) -> None:
        """What a batch's first forward changed of the modules' attributes, added to what is
        kept (:meth:`_learning_forward`): ``written`` in place
        (:meth:`_attributes_written`), and anything assigned, created or deleted — tensors
        (``self.scale = 0.5 * self.scale + s``, ``self.last = out.detach()``, a statistic
        created at the first call) or not (a flag, a count) — against each module's attributes
        as the forward was given them (``given``, by the module's id). Assigned ones moved the
        user's at every product, 2% apart, and the cache did not see the user's own forward
        move them, products 24–30% off a new operator's; the first forward's write stood, so
        every operator, every Monitor probe, moved a training run's statistics once more (the
        outside and diff reviews). Each forward now starts from the attributes as found, and
        every change is put back as its pass ends (after the loss, which may read it); the
        cache's check reads the tensors."""
        self._attributes_written(written, held)
        changed = [
            (f"{name}.{key}" if name else key, mod, key)
            for name, mod in self.model.named_modules()
            for key in _changed_keys(given.get(id(mod), {}), vars(mod))
            if not _among((name, mod, key), self._held)
        ]
        self._held += changed
        self._held += [a for a in self._attributes if not _among(a, self._held)]
        # an assigned tensor, read by the cache; written in place by a later forward (a
        # statistic created at the first call, updated after): into a copy (not one that views
        # another tensor: a copy would part them)
        assigned = [
            a
            for a in changed
            if isinstance(vars(a[1]).get(a[2]), Tensor) and not _among(a, self._attribute_writes)
        ]
        self._attribute_writes += assigned
        self._attributes += [(k, m, key) for k, m, key in assigned if vars(m)[key]._base is None]
        if changed:
            self.notes.append(
                f"the model's forward sets {few([k for k, _, _ in changed])}: curvscope puts "
                "them back as found after each of its passes (each of its forwards starts "
                "from them as found)"
            )

    def learn(self, theta: Mapping[str, Tensor], batch: Batch) -> None:
        """A batch's first forward (:meth:`_learning_forward`), run here if it has not run yet:
        before a torch.func transform, inside which nothing is copied. With
        ``backend="forward_over_reverse"`` pinned, the batches after the first ran only there,
        and what their forwards set was never learned: a model that grows a cache for a
        longer batch was left moved, repeated products up to 1.49 apart, a new operator 70%
        off, and a dynamic-RoPE Llama failed inside forward-mode AD (the diff review)."""
        if batch.index not in self._learned:
            with self.context(batch.index):
                self._call(theta, batch)

    def raw_forward(self, theta: Mapping[str, Tensor], batch: Batch, copies: bool = True) -> Any:
        """Model outputs at parameters ``theta``, unchecked (usable inside torch.func
        transforms, with ``copies=False``: a plain attribute the forward writes then stays the
        user's, which torch.func refuses to write — a copy made inside the transform took the
        tangents of a write under ``torch.no_grad()``, 3.4% off, unsaid: the diff review);
        call inside :meth:`context`. With ``loss_fn=None`` the logits as the model's own loss
        uses them (:meth:`HuggingFaceLoss.outputs`)."""
        out = self._call(theta, batch, copies)
        return out if self.adapter is None else self.adapter.outputs(out)

    def forward(self, theta: Mapping[str, Tensor], batch: Batch, tensor: bool = False) -> Any:
        """Model outputs at parameters ``theta``, checked; call inside :meth:`context`.

        Any output the loss accepts will do for the Hessian (e.g. a Hugging Face
        ``ModelOutput``); ``tensor=True`` demands a tensor, as the Gauss-Newton kinds need.
        """
        out = self.raw_forward(theta, batch)
        if not isinstance(out, Tensor):
            if tensor:
                raise TypeError(
                    f"the model returned {type(out).__name__}; the Gauss-Newton and Fisher "
                    "kinds need a tensor of outputs: wrap the model so that it returns the "
                    "tensor the loss is computed from (kind='hessian' takes any output)"
                )
            return out
        if not out.requires_grad:
            raise ValueError(
                "the model's outputs do not depend on the selected parameters; check params= "
                "(and that the forward pass does not detach or run under torch.no_grad)"
            )
        return out

    def _first_loss_of_output(self, out: Any, batch: Batch) -> Any:
        """``loss_fn(out, targets)`` for an output that is not a tensor (a Hugging Face
        ``ModelOutput``), at the first loss: a loss that takes only tensors raised torch's bare
        "must be Tensor, not TokenClassifierOutput" (an outside review); the error now names
        the fix."""
        try:
            return self.loss_fn(out, batch.targets)
        except (TypeError, AttributeError) as e:
            logits = " (its .logits, say)" if hasattr(out, "logits") else ""
            raise TypeError(
                f"loss_fn(model(inputs), targets) failed on the model's {type(out).__name__}: "
                f"{e}. Give loss_fn what it takes: wrap the model so that it returns the tensor "
                f"the loss is computed from{logits}, or a loss_fn that reads it from the "
                "output (lambda out, y: F.cross_entropy(out.logits, y)); for a Hugging Face "
                "model with its own loss, loss_fn=None"
            ) from e

    def loss(self, out: Any, batch: Batch, at_copies: bool = True) -> Tensor:
        """``loss_fn(out, targets)``, checked: a finite scalar; at the first call also that the
        outputs and targets count the same samples, (for a loss that does not declare it)
        whether the loss averages or sums over them, and — for outputs computed at copies of the
        parameters (``at_copies``: the exact backends) — that the loss does not also read the
        model's own parameters (:func:`_reads_parameters`)."""
        if not self._loss_checked:
            rows = batch.targets.shape[0]
            if isinstance(out, Tensor) and out.ndim > 0 and out.shape[0] != rows:
                raise ValueError(
                    f"the model's outputs have {out.shape[0]} rows but the targets "
                    f"{rows} (shapes {tuple(out.shape)} and {tuple(batch.targets.shape)}); "
                    "the first dimension of both counts the samples — a loss that broadcasts "
                    "them would count the batch as one sample. Give targets one row per sample"
                    + _flattened_hint(out, batch.targets)
                )
        if self._loss_checked or isinstance(out, Tensor):
            value = self.loss_fn(out, batch.targets)
        else:
            value = self._first_loss_of_output(out, batch)
        what = f"loss_fn(model(inputs), targets) on batch {batch.index}"
        if self.defer_nonfinite and isinstance(value, Tensor) and value.numel() == 1:
            if not all_finite(value):
                # under a process group: a loss not finite on this rank's batch alone raised
                # here, and the other ranks waited in the sum until the group's timeout (an
                # outside review); the batch is marked, every product's sum carries the mark to
                # every rank (a loss of inf can leave its gradient finite), which refuse it
                # alike — and no first-loss check reads it: the next finite loss's do
                self.nonfinite_batches.add(batch.index)
                return value.reshape(())
            self.nonfinite_batches.discard(batch.index)
            loss = check_scalar_loss(value, what, values=False)  # its values just checked
        else:
            loss = check_scalar_loss(value, what)
        if not self._loss_checked:
            self._first_loss(out, loss, batch, at_copies)
        if batch.index not in self._rows_checked:  # every batch once, as below
            self.refuse(self._check_reduction_over_rows, out, batch)
            self._rows_checked.add(batch.index)
        if self.adapter is not None and batch.index not in self._own_checked:
            # every batch once: a model's own loss may agree on one batch and not another (a
            # loss_function averaging per sequence agrees where the sequences are as long)
            self._check_own_loss(batch)
            self._own_checked.add(batch.index)
        return loss

    def watch(self, *ts: Tensor) -> Tensor | None:
        """Before an operator's first backwards that keep their graph: hooks on the custom
        autograd Functions of the graphs of ``ts`` that refuse one whose backward leaves the
        graph (:func:`watch_custom_functions`); once an operator. Returns the gradient to seed
        the last one's backward with, or None once watched."""
        if self._watched:
            return None
        seeds = [watch_custom_functions(t, "curvature products", self._unwatch) for t in ts]
        self._watched = True
        return seeds[-1]

    def _unwatch(self) -> None:
        self._watched = False

    def _first_loss(self, out: Any, loss: Tensor, batch: Batch, at_copies: bool) -> None:
        """The checks of an operator's first loss (:meth:`loss`): its reduction, where not
        declared; that it depends on the parameters; no reentrant checkpoint; that it does not
        read the model's own parameters."""
        if not self._declared:  # (a refusal under a process group: the product's NaN)
            inferred = self.refuse(self._infer_reduction, out, batch, loss.requires_grad)
            self.reduction = inferred or "mean"
        if not loss.requires_grad:
            raise ValueError(
                "the loss does not depend on the selected parameters (no gradient flows "
                "from it to them); check that loss_fn uses the model's outputs and that "
                "params= selects parameters the model uses"
            )
        seen = walk_graph(loss) if at_copies else None  # once: at the first loss
        if seen is not None and seen.reentrant:  # Hugging Face's makes its inputs require
            raise RuntimeError(REENTRANT_CHECKPOINT)  # grad: no warning, the gradient 0
        read = None if seen is None else _reads_parameters(seen, self.params)
        if read is not None:
            raise ValueError(
                f"the loss reads the model's parameter {read!r} itself, not the copy "
                "curvature products pass through the forward — an L2 penalty over "
                "model.parameters() in loss_fn, or a hook or attribute of the model that "
                "holds the Parameter — so that use would count in the loss but not in the "
                "gradient or the curvature (an L2 penalty of 0.05 took λ_max 0.72 for 0.82 "
                "before this was refused). Leave a penalty to the optimizer (weight_decay: "
                "diagnose and the Monitor read it from there), leave that parameter out with "
                "params=, or measure with backend='finite_difference', which differentiates "
                "the parameters themselves"
            )
        self._loss_checked = True

    def _check_own_loss(self, batch: Batch) -> None:
        """With loss_fn=None: the adapted loss must be ``model(**batch).loss`` — both from one
        forward with the labels, without gradients (the model's config, which its first loss
        writes to, left as found): one forward, not a second one beside the products' (a model
        whose forward moved a plain tensor attribute was refused as "a loss of its own" when the
        two started from different values: an outside review)."""
        assert self.adapter is not None
        theta = {k: p.detach() for k, p in self.params.items()}
        with self.context(batch.index), torch.no_grad(), self.adapter.config_kept():
            out = self._call(theta, batch, labels=batch.labels)
            ours = self.loss_fn(self.adapter.outputs(out, labelled=True), batch.targets)
        self.adapter.check(batch.index, float(ours), out, ours.dtype)

    def _infer_reduction(self, out: Any, batch: Batch, depends: bool) -> str:
        """ "mean" or "sum", from the loss of a batch against the losses of its two halves: a
        mean satisfies L = (n₁L₁ + n₂L₂)/n, a sum L = L₁ + L₂."""
        n = batch.targets.shape[0]  # rows: what the halves split (batch.size may count tokens)
        fix = (
            "pass reduction='mean' (the loss averages over the samples of a batch) or "
            "reduction='sum' (it adds them) to Curvature, diagnose or Monitor (--reduction on "
            "the command line)"
        )
        if self.weighs_batches:
            _refuse_ignored_labels(batch.targets)
        given = out
        if n < 2 and self.num_samples == 1:
            return "mean"  # one sample in all: its mean and its sum are the same loss
        if n < 2:
            raise ValueError(
                f"cannot tell whether loss_fn averages or sums over samples from a batch of one "
                f"sample; {fix}"
            )
        h = n // 2
        # in float64 where the loss accepts it (a bfloat16 loss rounds by 0.4%), else as given
        out64, targets64 = _float64(out), _float64(batch.targets)
        try:
            with torch.no_grad():
                whole64 = self.loss_fn(out64, targets64)
            # to the precision the loss computed in: one that casts back to float32 inside
            # (F.cross_entropy(out.float(), y)) was held to 1e-9 and refused (an outside review)
            out, targets, tol = out64, targets64, loss_tolerance(whole64)
        except Exception:
            targets, tol = batch.targets, loss_tolerance(self.dtype)
        with torch.no_grad():  # the whole batch's errors (NaN, not a scalar) are the loss's own
            whole = float(
                check_scalar_loss(whole64 if out is out64 else self.loss_fn(out, targets))
            )
            try:
                first, second = (
                    float(check_scalar_loss(self.loss_fn(_rows(out, sl, n), targets[sl])))
                    for sl in (slice(0, h), slice(h, None))
                )
            except Exception as e:
                raise ValueError(
                    f"cannot tell whether loss_fn averages or sums over samples (evaluating it "
                    f"on half a batch failed: {type(e).__name__}: {e}); {fix}"
                ) from e
        scale = max(abs(whole), abs(first) + abs(second), 1e-30)
        same = max(abs(first - whole), abs(second - whole)) <= tol * scale
        # (a loss that depends on nothing is left to the first loss's check of the parameters)
        moved = self._moved_half(given, batch.targets, h) if same and depends else None
        if moved is not None and abs(moved - first) <= tol * scale:
            # both halves give the whole's value: a mean by the test below, yet a loss that does
            # not read the rows it is given — `lambda out, y: out.loss` — weighed by rows came
            # out 85% off, λ_max 29.1 for 16.7, converged (an outside review)
            raise ValueError(
                f"loss_fn gives {whole:.6g} on a batch of {n} and on each of its halves: it does "
                "not read the rows it is given (a model's own output.loss, computed from labels "
                "inside the inputs?). For a Hugging Face model's own loss pass loss_fn=None; "
                f"otherwise {fix}"
            )
        is_mean = abs(whole - (h * first + (n - h) * second) / n) <= tol * scale
        is_sum = abs(whole - (first + second)) <= tol * scale
        if is_mean != is_sum:
            return "mean" if is_mean else "sum"
        raise ValueError(
            f"cannot tell whether loss_fn averages or sums over samples: on a batch of {n} its "
            f"value {whole:.6g} is {'both' if is_mean else 'neither'} the mean "
            f"{'and' if is_mean else 'nor'} the sum of its values on the two halves "
            f"({first:.6g}, {second:.6g}); {fix}"
            + (
                ""
                if is_mean
                else ". A mean over something other than the rows (class weights, ignored "
                "labels, tokens) is neither: pass nn.CrossEntropyLoss(weight=..., "
                "ignore_index=...) or nn.NLLLoss, whose counted labels curvscope weighs"
            )
        )

    @property
    def weighs_batches(self) -> bool:
        """Whether a mean over all the data is made of several batches' means — more than one
        batch, or ranks (one batch's mean is the whole mean, whatever it averages over)."""
        return self.num_batches > 1 or self.across_ranks

    def refuse(self, check: Callable[..., Any], *args: Any) -> Any:
        """``check(*args)``'s result, or its ValueError — raised here in one process, and by the
        finite-difference backend, whose passes run inside ``together`` (every rank raises);
        under a process group with the exact backends this rank's data's alone, so it is kept
        (:attr:`refusal`, the first) and raised after the product's sum, which carries it to
        every rank (:meth:`Curvature._summed_over_ranks`): no rank waits in the collective.
        Then None."""
        try:
            return check(*args)
        except ValueError as e:
            if not self.defer_nonfinite:
                raise
            self.refusal = self.refusal or e
            return None

    def _check_reduction_over_rows(self, out: Any, batch: Batch) -> None:
        """A mean loss whose batches are weighed by their rows (a function, a loss module of
        the user's: torch's own are weighed by what their mean divides by, :func:`mean_count`)
        must be the mean of its rows' losses, or the batches' means do not add up to the mean
        over all the data: a function with class weights, ignored or padding labels, or a mean
        over tokens was 41–47% off, without a word (an outside review; equal halves passed the
        reduction's test). Checked once a batch, where there is more than one batch (or rank)
        to weigh — one batch's mean is the whole mean, whatever it averages over — on up to
        :data:`ROWS_CHECKED` of its rows against each of them alone (in float64 where the
        loss takes it, to the rounding of its dtype: :func:`loss_tolerance`); a row that alone
        is not finite while the batch is (an ignored label: 0/0) is one the mean does not count.
        Not decided where no row alone gives a mean of its own: an error, no finite value, or
        the same value for every row (a loss over the whole batch, contrastive: 0 alone).

        ``reduction="sum"`` declared for a loss that averages (a torch loss with
        ``reduction="mean"``, or a function whose batch value is its rows' mean, not their sum)
        is refused the same way: the batches' means were added, λ_max 3.0 times the mean's for
        three batches, and ``diagnose`` read a loss of 7.13 for 2.38 (an outside review) — on
        one batch too, whose operator it leaves alone but whose share of a training step it
        sets: a mean read as a sum took a tenth of the curvature as the step's (a mini-batch
        of 50 among 500) and read *learning* for *unstable* (an outside review)."""
        if self.adapter is not None:
            return
        own = _torch_reduction(self.loss_fn)
        if own in ("mean", "sum") and own != self.reduction:
            raise ValueError(_contradicted(self.reduction, f"its reduction is {own!r}"))
        if not (self.weighs_batches or self._declared):
            return  # one batch's mean is the whole mean, whatever it averages over
        if self.reduction == "mean" and _divisor(self.loss_fn, batch.targets) is not None:
            return  # torch's own mean: weighed by what it divides by
        values = self._sampled_rows(out, batch.targets)
        if values is not None:  # (one batch: only a contradicted reduction is refused)
            self._judge_rows(*values, batch.index, over_rows=self.weighs_batches)

    def _sampled_rows(self, out: Any, targets: Tensor) -> tuple[float, list[float], float] | None:
        """The loss on up to :data:`ROWS_CHECKED` evenly spread rows of a batch, on each alone,
        and its tolerance (:meth:`_row_values`): in float64 where the loss takes it (class
        weights may not), else as given; None where it cannot be told (fewer than two rows, a
        loss that needs more than one row)."""
        n = targets.shape[0]
        where = targets.device
        rows = torch.linspace(0, n - 1, min(n, ROWS_CHECKED), device=where).round().long().unique()
        if len(rows) < 2:
            return None
        out = map_tensors(lambda t: t[rows] if t.ndim and t.shape[0] == n else t, out)
        targets, m = targets[rows], len(rows)
        try:
            return self._row_values(_float64(out), _float64(targets), m)
        except Exception:
            try:
                return self._row_values(out, targets, m)
            except Exception:  # a loss that needs more than one row: not decided
                return None

    def _judge_rows(
        self, whole: float, alone: list[float], tol: float, index: int, over_rows: bool = True
    ) -> None:
        """The batch's value against its rows' mean and sum (:meth:`_check_reduction_over_rows`):
        the other reduction's value refuses the declared one; a declared mean that is neither is
        a mean over something else than the rows (refused ``over_rows``: where the batches'
        means are weighed by their rows)."""
        m = len(alone)
        finite = [v for v in alone if math.isfinite(v)]
        if not math.isfinite(whole) or not finite or len(set(alone)) == 1:
            return  # no mean of the rows to compare with (a loss over the whole batch)
        # a row that alone is not finite while the batch is: one its mean does not count (an
        # ignored label, 0/0 alone) — weighed by rows, the batch counts it all the same
        total = math.fsum(finite) if len(finite) == m else math.nan
        mean = total / m

        def near(x: float) -> bool:  # (False for NaN)
            return abs(whole - x) <= tol * max(abs(whole), abs(x), 1e-30)

        said, other = ("sum", mean) if self.reduction == "sum" else ("mean", total)
        if near(other):  # the other reduction's value: the declared one contradicted
            did, not_ = ("mean", total) if said == "sum" else ("sum", mean)
            raise ValueError(
                _contradicted(
                    said,
                    f"on {m} rows of batch {index} it gives {whole:.6g}, the {did} of "
                    f"its values on each row alone, not their {said} {not_:.6g}",
                )
            )
        if said == "sum" or near(mean) or not over_rows:
            return  # a sum (or neither: not decided), or the mean over the rows
        raise ValueError(
            f"loss_fn is a mean, but not over the rows of a batch: on {m} rows of batch "
            f"{index} it gives {whole:.6g}, "
            + (
                f"the mean of its values on each row alone {mean:.6g}"
                if math.isfinite(mean)
                else "and on some of those rows alone a value that is not finite"
            )
            + " (class weights, ignored or padding labels, a mean over tokens, statistics of "
            "the whole batch?). "
            "curvscope weighs each batch's mean by its rows to make the mean over all the data, "
            "which such a loss does not add up to. Pass it as nn.CrossEntropyLoss(weight=..., "
            "ignore_index=...) or nn.NLLLoss, whose counted labels weigh the batches; or give "
            "all the data as one batch; or a loss that sums (reduction='sum': the curvature of "
            "the sum)"
        )

    def _row_values(self, out: Any, targets: Tensor, m: int) -> tuple[float, list[float], float]:
        """The loss on m rows, on each of them alone, and the relative tolerance its dtype
        allows (:func:`loss_tolerance`); no gradients, its warnings (the products say them)
        left out."""
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = self.loss_fn(out, targets)
            alone = [
                float(self.loss_fn(_rows(out, slice(i, i + 1), m), targets[i : i + 1]))
                for i in range(m)
            ]
        return float(value), alone, loss_tolerance(value)

    def _moved_half(self, out: Any, targets: Tensor, h: int) -> float | None:
        """The loss on a batch's first ``h`` rows with their outputs moved (by seeded random
        amounts: a shift constant along the classes, as arange % 7 was over 7x7 positions, a
        softmax ignores — a review), or None where it cannot be evaluated. A loss whose halves
        equal its whole and whose value this leaves unmoved does not read the rows it is given
        (rows of equal loss — a zero-initialised classifier's log C each — do move it)."""
        n = targets.shape[0]

        def move(t: Tensor) -> Tensor:
            if not (t.is_floating_point() and t.ndim and t.shape[0] == h):
                return t
            gen = torch.Generator(device=t.device).manual_seed(0)
            return t.detach() + torch.rand(t.shape, generator=gen, device=t.device, dtype=t.dtype)

        try:
            with torch.no_grad():
                return float(
                    self.loss_fn(map_tensors(move, _rows(out, slice(0, h), n)), targets[:h])
                )
        except Exception:  # nothing to conclude: the test that follows decides
            return None

    def leave_out_tied_padding(self) -> None:
        """For the backends that differentiate along a direction (forward-over-reverse, finite
        differences): an embedding's padding row tied to another module is left out, P·H·P.
        torch's gradient holds that row constant in the lookup only; a product along v moves
        it in the lookup too, and gave the derivative of that gradient along v, which is not
        symmetric (24% off double backward's operator and λ_max 1% low, "converged": an
        outside review's fuzzing). Double backward keeps the row (:func:`_padding_notes`)."""
        if not self.tied_padding:
            return
        said = _padding_notes({}, self.tied_padding)
        self.notes = [n for n in self.notes if n not in said] + [
            f"{key}: row {row} is the padding row (padding_idx) of an embedding whose weight "
            "is tied to another module: torch's gradient holds the row constant in the lookup "
            "only, which a product along a direction (this backend) cannot, so the row is "
            "left out: the operator is P·H·P, P the projection that zeroes it (double "
            "backward keeps it: the Hessian of the loss with the row constant in the lookup); "
            "the gradient (loss_and_gradient) keeps the row's, through the tied module"
            for key, row in self.tied_padding.items()
        ]
        self.padding = {**self.padding, **self.tied_padding}
        self.tied_padding = {}

    def _fallback_notes(self, named: list[tuple[str, nn.Module]]) -> list[str]:
        """The notes on what products do differently; sets :attr:`kernel_notes`, those about
        the kernels switched for second derivatives (not said of finite differences, which
        keep the model's own)."""
        modules = [m for _, m in named]
        self.kernel_notes = _attention_notes(self.model, modules)
        if self._has_rnn:
            self.kernel_notes.append(
                "cuDNN is disabled during curvature products (cuDNN RNNs have no double backward)"
            )
        if self._weight_norm:
            self.kernel_notes.append(WEIGHT_NORM_NOTE)
        compiled = [
            "the model is torch.compile'd: products run its original module eagerly "
            "(graphs compiled with AOTAutograd have no double backward); the compiled "
            "model itself is untouched"
        ]
        if self._compiled_inside:
            which = few([n or "the model" for n in self._compiled_inside])
            self.kernel_notes.append(
                f"torch.compile'd module(s) {which} run eagerly during curvature products "
                "(torch.compiler.set_stance('force_eager'): graphs compiled with AOTAutograd "
                "have no double backward)"
            )
        return (
            self.kernel_notes
            + (compiled if self.compiled else [])
            + _padding_notes(self.padding, self.tied_padding)
            + _backward_hook_notes(named)
            + _frequency_notes(named)
        )

    # ------------------------------------------------------------------ flat <-> blocks
    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Split a flat (n,) or (n, k) tensor into per-parameter blocks.

        A 1-D input gives tensors shaped like the parameters; a 2-D input gives tensors of shape
        (k, *param.shape).
        """
        return unflatten(flat, self.shapes, self.numels)

    def flatten(self, blocks: Sequence[Tensor], batched: bool = False) -> Tensor:
        """Inverse of :meth:`unflatten`."""
        return flatten(blocks, batched)
