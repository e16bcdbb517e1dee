"""Flat vectors sharded like the parameters: the Krylov vectors of a model larger than one
device.

A :class:`~curvscope.Curvature` over FSDP2-sharded parameters (``fully_shard``) with
``backend="finite_difference"`` shards the *parameters*, but its flat vectors are full length on
every rank: one vector is the whole model's size, and Lanczos keeps tens of them. Its
:meth:`~curvscope.Curvature.sharded` view, a :class:`ShardedCurvature`, takes and returns only
this rank's entries of each vector — for every parameter, in order, the entries of this rank's
shard (its DTensor's local tensor, flattened) — so a vector costs 1/world of the model per rank,
like the parameters. The products are the same central differences of the engine's own
gradients (FSDP2's reduce-scatter leaves each rank the shard of the summed gradient it needs:
nothing is gathered); what spans the ranks is a sum over a vector's entries, which the
estimators take through :meth:`ShardedCurvature.reduce_sum`, one all-reduce of a few numbers.

``cs.eigenvalues`` accepts the view (its eigenvectors come back sharded the same way), and
so do ``cs.trace``, ``cs.trace_of_square`` (Hutchinson), ``cs.diagonal`` (this rank's
entries), ``cs.density`` and ``cs.spectrum.cg``; ``by_layer=True`` refuses it with the fix.
``diagnose``, ``update_curvature`` and the Monitor use it with ``sharded=True``.

HSDP (``fully_shard`` over a 2-D (replicate, shard) mesh) too: each shard is held by the
``replicate`` ranks of one coordinate of the shard dimension, so a sum over a vector's entries
reduces over the shard dimension's process group only (:attr:`ShardedCurvature.sum_group`,
:func:`~curvscope.derivatives.finite_difference.shard_group`) — over all the ranks it would
count each entry once per replica — and a random vector's entries are drawn from the rank in
that group (:func:`rank_generator`), so that the replicas of a shard draw the same ones. The
replicas then hold the same entries of every vector, bit for bit: the engine all-reduces the
gradient over the replicate dimension (every replica gets the same shard of it) and every
other step is the same arithmetic on the same numbers. (The alternative — sums over all the
ranks divided by the number of replicas — would also agree on every rank, but it is exact only
while the replicas' entries are, and for a replicate size that is a power of two.) What every
rank must agree on — the checks that the ranks made the same call, a loss that fails on one
rank — still spans all the ranks (:attr:`ShardedCurvature.group`). Tensor parallelism, alone or
with FSDP2 on one mesh, replicates some entries within a shard group: refused. A DeepSpeed
ZeRO-3 engine's
vectors are laid out the same way, its partition of each parameter in place of the shard: the
flattened parameter's entries [r·m, r·m + m) on rank r, without the padding
(:mod:`curvscope.derivatives.zero3`).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from curvscope.derivatives import finite_difference as _fd
from curvscope.derivatives import zero3 as _zero3
from curvscope.derivatives.checks import check_finite, check_vector
from curvscope.derivatives.distributed import all_reduce_max, all_reduce_sum, together

if TYPE_CHECKING:
    from curvscope.derivatives.curvature import Curvature

try:  # torch.distributed is optional in torch builds
    from torch.distributed.tensor import Replicate, Shard
except ImportError:  # pragma: no cover - a torch built without distributed
    Replicate = Shard = None  # type: ignore[assignment,misc]


def _fix() -> str:
    return (
        "a sharded view needs cs.Curvature(model, loss_fn, data, backend='finite_difference') "
        "over a model sharded by FSDP2's fully_shard (every selected parameter a DTensor in "
        "the operator's process group, sharded over a 1-D mesh, or over the shard dimension "
        "of HSDP's 2-D (replicate, shard) mesh), or over a DeepSpeed ZeRO-3 engine"
    )


def _layout_refused(p: Any) -> bool:
    """Whether a DTensor is laid out otherwise than FSDP2 lays out a parameter: ``Shard`` over
    a 1-D mesh, or HSDP's ``Replicate()`` on one dimension of a 2-D mesh and ``Shard`` on the
    other (FSDP2 × TP's ``_StridedShard`` is not a ``Shard``)."""
    kinds = [type(pl) for pl in p.placements]
    return kinds not in ([Shard], [Replicate, Shard], [Shard, Replicate])


def _layout(p: Any) -> tuple[Any, int]:
    """A DTensor's mesh and the mesh dimension it is sharded over."""
    return p.device_mesh, next(i for i, pl in enumerate(p.placements) if type(pl) is Shard)


def _check_fsdp(model: Any, params: list[Tensor], named: dict[str, Tensor]) -> None:
    """Refuse, with the fix, parameters that FSDP2 does not shard over one mesh dimension
    (a 1-D mesh, or HSDP's shard dimension), all over one mesh and dimension."""
    plain = [k for k, p in named.items() if not _zero3.is_dtensor(p)]
    if plain:
        raise ValueError(
            f"C.sharded(): parameters {plain[:3]} are not sharded (not DTensors); {_fix()}. "
            "An unsharded model's vectors fit wherever the model does: use C itself"
        )
    if _fd._data_parallel(model) is None:  # tensor parallelism: one loss, replicated biases
        raise ValueError(
            "C.sharded(): the model is not sharded by FSDP2 (a tensor-parallel model "
            "replicates some parameters on every rank, whose entries a sum over the ranks "
            "would count more than once); use C itself (full-length vectors)"
        )
    first: Any = params[0]
    for name, p in named.items():
        dt: Any = p
        odd = _layout_refused(dt)
        if odd or _layout(dt) != _layout(first):
            raise ValueError(
                f"C.sharded(): parameter {name!r} is laid out as {tuple(dt.placements)} over "
                f"a mesh of shape {tuple(dt.device_mesh.shape)}"
                + ("" if odd else ", unlike the first parameter")
                + ": sharded vectors need every parameter sharded by FSDP2 over one mesh "
                "dimension, the same one — Shard over a 1-D mesh, or (Replicate(), Shard) over "
                "HSDP's (replicate, shard) mesh (a layout with tensor parallelism, 2-D FSDP × "
                "TP, replicates entries within a shard group). Use C itself (full-length "
                "vectors)"
            )


class ShardedCurvature:
    """This rank's part of the flat vectors of a finite-difference :class:`~curvscope.Curvature`
    over FSDP2-sharded parameters; build it with ``C.sharded()`` (module docstring).

    ``S @ v`` takes this rank's ``S.num_params`` entries of a vector (or an (n_local, k)
    block) and returns this rank's entries of the product; every rank calls it together, as a
    training step's forward and backward. ``S.total_params`` is the operator's dimension (the
    full vector's length), ``S.shard(v)`` and ``S.gather(v)`` convert full vectors and local
    parts, and ``S.reduce_sum(t)`` sums per-rank partial sums over the ranks of
    ``S.sum_group`` (what an inner product of two sharded vectors needs: the operator's group,
    or HSDP's shard dimension). A random vector whose entries each shard draws independently
    is a random vector of the whole space (HSDP's replicas of a shard draw the same). On a
    single rank (FSDP2 over a world of one) the shard is the whole vector.

    Example (on every rank of a gloo or NCCL group)::

        fully_shard(model)
        C = cs.Curvature(model, loss_fn, my_batches, backend="finite_difference")
        top = cs.eigenvalues(C.sharded())        # every rank: the same value
        v = C.sharded().gather(top.vectors[:, 0])  # the full eigenvector, if it fits
    """

    def __init__(self, curvature: Curvature) -> None:
        differences = curvature._differences
        obj = curvature.objective
        if differences is None or obj is None:
            raise ValueError(
                f"C.sharded(): this Curvature uses backend={curvature.backend!r}; {_fix()}"
            )
        params = list(obj.params.values())
        #: a ZeRO-3 engine's parameters: this rank's entries [lo, hi) of each (its partition,
        #: without the padding); None for FSDP2's DTensors
        partitioned = _zero3.is_partitioned(params[0])
        self._spans = _zero3.Partitions.spans_of(params) if partitioned else None
        if self._spans is None:
            _check_fsdp(obj.model, params, obj.params)
        self._curvature, self._differences = curvature, differences
        self._params = params
        #: the operator's process group: every rank takes each product, and makes each call,
        #: together (the checks that the ranks' calls agree span it)
        self.group = curvature.group
        #: the group a sum over a vector's entries reduces over: the ranks whose shards
        #: partition the parameters — ``group`` itself, or HSDP's shard dimension, whose
        #: replicas hold the same entries (:func:`~.finite_difference.shard_group`); the
        #: products' own norms reduce over the same group
        self.sum_group: Any = differences.sum_group
        #: HSDP's replicate dimension: ranks holding the same shard (None for other layouts)
        self._replicas = _fd.replica_group(params, self.group)
        self.kind = curvature.kind
        self.dtype: torch.dtype = curvature.dtype
        self.device: torch.device = curvature.device
        self.is_psd = False
        #: this rank's entries of a flat vector
        self.num_params: int = sum(math.prod(s) for s in _fd.local_shapes(params))
        #: the operator's dimension: a full vector's length
        self.total_params: int = curvature.num_params
        self.matvecs = 0
        counted = all_reduce_sum(
            torch.tensor([float(self.num_params)], dtype=torch.float64, device=self.device),
            self.sum_group,
        )
        # (the count is the same on every rank whatever the layout: a refusal is everyone's)
        if int(counted[0]) != self.total_params:  # a layout whose shards overlap or miss
            raise ValueError(
                f"C.sharded(): the ranks' shards hold {int(counted[0])} entries in all, but the "
                f"operator has {self.total_params}: the parameters are not partitioned over "
                "the operator's process group (or HSDP's shard dimension); use C itself "
                "(full-length vectors)"
            )

    @property
    def product_errors(self) -> list[float]:
        """The estimated errors of the products so far (the Curvature's: they are its)."""
        return self._curvature.product_errors

    @property
    def shape(self) -> tuple[int, int]:
        """The local block's shape: (num_params, total_params)."""
        return (self.num_params, self.total_params)

    def matmat(self, V: Tensor) -> Tensor:
        """This rank's entries of C V for this rank's entries V, (n_local,) or (n_local, k);
        counts k products (here and on the Curvature)."""
        V = self._local(V)
        single = V.ndim == 1
        out = self._differences.matmat(V[:, None] if single else V, local=True)
        out = together(lambda: check_finite(out, "the sharded product"), self.group, self.device)
        k = out.shape[1]
        self.matvecs += k
        self._curvature.matvecs += k
        return out[:, 0] if single else out

    def __matmul__(self, V: Tensor) -> Tensor:
        return self.matmat(V)

    @property
    def param_names(self) -> list[str]:
        """The measured parameters' names, in the order of a vector's blocks."""
        return self._curvature.param_names

    @property
    def block_sizes(self) -> list[int]:
        """How many of this rank's entries each parameter's block holds, in order."""
        return [math.prod(s) for s in _fd.local_shapes(self._params)]

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """The loss (the same on every rank) and this rank's entries of its gradient, by the
        engine's own backward: nothing is gathered (a collective: every rank calls it)."""
        return self._differences.loss_and_gradient(local=True)

    def flatten(self, tensors: list[Tensor]) -> Tensor:
        """This rank's entries of one tensor per parameter (each a DTensor laid out like its
        parameter — a parameter itself, its optimizer state — a ZeRO-3 parameter itself, or
        already its local shard), as a flat vector in the view's order. Every rank calls it
        together: a value that does not fit this rank's shard is refused on every rank."""
        return together(lambda: self._flatten(tensors), self.group, self.device)

    def _flatten(self, tensors: list[Tensor]) -> Tensor:
        if len(tensors) != len(self._params):
            raise ValueError(
                f"expected one tensor per measured parameter ({len(self._params)}), got "
                f"{len(tensors)}"
            )
        shapes = _fd.local_shapes(self._params)
        parts = [
            local_entries(t, p).reshape(-1).to(self.device)
            for t, p in zip(tensors, self._params, strict=True)
        ]
        for name, part, shape in zip(self.param_names, parts, shapes, strict=True):
            if part.numel() != math.prod(shape):
                raise ValueError(
                    f"the value given for {name!r} holds {part.numel()} entries on this rank, "
                    f"but this rank's shard of the parameter holds {math.prod(shape)} "
                    f"{tuple(shape)}: pass copies of the sharded parameters themselves "
                    "(p.detach().clone() of an FSDP2 DTensor, or its to_local()), not whole ones"
                )
        return torch.cat(parts) if parts else torch.zeros(0, dtype=self.dtype, device=self.device)

    def reduce_sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks of :attr:`sum_group` (a new tensor, or ``t`` itself on a
        single process): each rank's partial sums over its entries of the vectors become the
        sums over the whole vectors — on every rank, HSDP's replicas included (each replica
        sums over its own shard dimension, and they hold the same entries)."""
        return all_reduce_sum(t, self.sum_group)

    def shard(self, v: Tensor) -> Tensor:
        """This rank's entries of a full flat vector (n,) or block (n, k) — no communication."""
        v = check_vector(v, self.total_params, self.dtype, self.device)
        obj = self._curvature.objective
        assert obj is not None
        cols = v[:, None] if v.ndim == 1 else v
        parts = []
        for j in range(cols.shape[1]):
            blocks = obj.unflatten(cols[:, j])
            local = self._local_blocks(blocks)
            parts.append(torch.cat(local) if local else cols.new_zeros(0))
        out = torch.stack(parts, dim=1)
        return out[:, 0] if v.ndim == 1 else out

    def gather(self, v: Tensor) -> Tensor:
        """The full flat vector (n,) or block (n, k) from every rank's entries: a collective
        (all ranks call it), and the whole vector on every rank.

        Each rank writes its entries where they sit in the full vector (zeros elsewhere: the
        shards partition it, so the sum is exact) and one all-reduce sums them — curvscope's
        own, which returns only once the process group has let go of its tensor. (DTensor's
        ``full_tensor`` all-gathers instead, and gloo's worker could still hold that tensor
        when a script's ``dist.barrier()`` came next: an abort at exit, 2 of 24 runs.)"""
        v = self._local(v)
        cols = v[:, None] if v.ndim == 1 else v
        full = cols.new_zeros(self.total_params, cols.shape[1])
        full[self._positions] = cols
        flat = all_reduce_sum(full, self.sum_group)
        return flat[:, 0] if v.ndim == 1 else flat

    def _local(self, V: object) -> Tensor:
        """``V`` checked as this rank's entries of vectors, on every rank at once (a vector
        refused on one rank alone raises on all of them); on HSDP's mesh, the same on the
        replicas of this rank's shard."""
        out = together(
            lambda: check_vector(
                V, self.num_params, self.dtype, self.device, _LOCAL_V, _LOCAL_ENTRIES
            ),
            self.group,
            self.device,
        )
        if self._replicas is not None:
            self._same_on_replicas(out)
        return out

    def _same_on_replicas(self, V: Tensor) -> None:
        """Raise on every rank unless the replicas of each shard hold the same entries of V
        (one all-reduce of its sum and sum of squares over the replicate dimension): they set
        θ ± εV on the same shard, and the engine averages their gradients — different
        entries (a start vector drawn per rank) would mix two points into one product,
        silently wrong. Vectors curvscope returns, and ``S.shard(v)``, are the same there."""
        stats = torch.stack([V.sum(), V.pow(2).sum()]).to(torch.float64)
        spread = all_reduce_max(torch.cat([stats, -stats]), self._replicas)
        differs = bool((spread[:2] != -spread[2:]).any())

        def check() -> None:
            if differs:
                raise ValueError(
                    "the replicas of a shard (HSDP's replicate dimension) hold different "
                    "entries of a vector: each rank of a replica group must pass the same "
                    "entries — S.shard(v) of one full vector, or the vectors curvscope returned "
                    "— not vectors drawn per rank"
                )

        together(check, self.group, self.device)

    @functools.cached_property
    def _positions(self) -> Tensor:
        """Where this rank's entries sit in a full flat vector (int64, in the local order;
        computed once per view: the layout does not change)."""
        obj = self._curvature.objective
        assert obj is not None
        index = torch.arange(self.total_params, device=self.device)
        local = self._local_blocks(obj.unflatten(index))
        return torch.cat(local) if local else index[:0]

    def _local_blocks(self, blocks: list[Tensor]) -> list[Tensor]:
        """This rank's entries of one full block per parameter, flat: its DTensor shard's, or
        its ZeRO-3 partition's (without the padding); no communication."""
        if self._spans is not None:
            return [b.reshape(-1)[lo:hi] for b, (lo, hi) in zip(blocks, self._spans, strict=True)]
        return [
            _fd.shard_of(b, p).to_local().reshape(-1)
            for b, p in zip(blocks, self._params, strict=True)
        ]

    def __repr__(self) -> str:
        return (
            f"ShardedCurvature(kind={self.kind!r}, num_params={self.num_params} of "
            f"{self.total_params}, dtype={self.dtype}, device={self.device}, "
            f"matvecs={self.matvecs})"
        )


def local_entries(t: Tensor, param: Tensor | None = None) -> Tensor:
    """This rank's entries of a DTensor, of a ZeRO-3 parameter (its partition without the
    padding), or a plain tensor's own (detached) — given the ZeRO-3 ``param`` it is a value of,
    a copy of its padded partition (``p.ds_tensor.clone()``) without the padding."""
    if _zero3.is_dtensor(t):
        return t.to_local().detach()
    if _zero3.is_partitioned(t):
        param, t = t, t.ds_tensor  # type: ignore[attr-defined]
    if param is not None and _zero3.is_partitioned(param):
        (lo, hi), *_ = _zero3.Partitions.spans_of([param])
        if t.numel() == param.ds_tensor.numel():  # type: ignore[attr-defined]
            return t.detach().reshape(-1)[: hi - lo]
    return t.detach()


#: what a vector's checks call it: this rank's entries, with the fix for a full-length vector
_LOCAL_V = "V (this rank's entries of the vectors; S.shard(v) gives them from a full vector)"
_LOCAL_ENTRIES = "one entry per entry of this rank's parameter shards"


def rank_generator(gen: torch.Generator, group: Any) -> torch.Generator:
    """A generator for this rank's entries of random vectors: seeded from one draw of ``gen``
    (the same on every rank) and the rank in ``group`` — a sharded view's
    :attr:`~ShardedCurvature.sum_group`, whose ranks hold different entries — so that the
    shards' entries are independent, and HSDP's replicas of a shard (one rank each in their
    shard groups) draw the same ones; ``gen`` itself for a single process (one rank's shard
    is the whole vector)."""
    if group is None:
        return gen
    import torch.distributed as dist

    base = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
    out = torch.Generator(device=gen.device)
    out.manual_seed((base + 1_000_003 * dist.get_rank(group)) % 2**63)
    return out


__all__ = ["ShardedCurvature", "local_entries", "rank_generator"]
