"""torch.distributed for the curvature operator: each rank holds a shard of the data; products,
losses and gradients are summed over the ranks (all-reduce), weighted by the shards' sample
counts, so every rank holds the curvature of the *global* mean loss and the same result.

Nothing here is home-made: it is the process group the user's training already runs on
(gloo on CPU, NCCL on GPUs). A rank that fails ends the others' collectives with an error
(gloo: the peer's connection closes; any backend: the process group's ``timeout``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


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


def all_reduce_sum(t: Tensor, group: Any) -> Tensor:
    """Σ over the ranks of ``t`` (in place on a contiguous copy); ``t`` itself when local."""
    if group is None:
        return t
    import torch.distributed as dist

    out = t.contiguous().clone()
    try:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as e:  # gloo/NCCL errors when a peer has died or timed out
        raise RuntimeError(
            f"curvscope: the all-reduce over {dist.get_world_size(group)} ranks failed — another "
            "rank has failed, left, or did not take this product (every rank must build the "
            "Curvature and compute each product together); the process group said: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    return out


def global_count(n: int, group: Any, device: torch.device) -> int:
    """The total number of samples over the ranks."""
    t = torch.tensor([float(n)], dtype=torch.float64, device=device)
    return int(all_reduce_sum(t, group).item())
