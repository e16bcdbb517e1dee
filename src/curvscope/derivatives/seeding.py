"""Seeded randomness: the one place where a user's seed becomes a random stream.

curvscope never draws from (or seeds) the global RNG for its own randomness: every random draw
comes from a private ``torch.Generator`` made by :func:`generator` (the global generators —
torch's, numpy's, Python's — are seeded only around the user's own forward pass and a pass over
their loader, with a seed from a stream below, and put back after it:
:mod:`curvscope.derivatives.rng`).

One seed feeds several independent purposes, so each purpose derives its own seed by one
documented affine map, ``seed · stride + offset + index`` (a :class:`Stream`). The strides are
primes, and the derived seeds of two base seeds coincide only when an index reaches the stride.
These maps are part of what makes results reproducible across versions: changing one moves
every number that depends on it.

=================  =========  =======  ===========  =============================================
stream             stride     offset   index        draws
=================  =========  =======  ===========  =============================================
``PROBES``         1          0        (none)       the spectrum estimators' probes and random
                                                    starts; an optimizer's Lanczos start (its
                                                    seed is its gradient count); the quadratic
                                                    test problem's eigenvectors and points
``FORWARD``        1_000_003  0        batch index  the user's forward pass on that batch
                                                    (dropout masks; numpy, ``random``)
``DATA``           1_000_003  104_729  (none)       a pass over a loader: its shuffling and
                                                    workers' base seed, ``random``, numpy
``FISHER_LABELS``  7_919      0        batch index  the Fisher's labels sampled from the model
``STEP_PROBES``    1_000_003  0        step         AdaHessian's and Sophia's probes at step t
                                                    (a resumed run repeats them)
=================  =========  =======  ===========  =============================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from curvscope.derivatives.checks import check_seed


@dataclass(frozen=True)
class Stream:
    """A purpose's derivation of its seed: ``seed · stride + offset + index``."""

    name: str
    stride: int
    offset: int = 0

    def seed(self, seed: int, index: int = 0) -> int:
        """The derived seed of this stream for a base ``seed`` and an ``index``."""
        return seed * self.stride + self.offset + index


PROBES = Stream("probes", 1)
FORWARD = Stream("forward", 1_000_003)
DATA = Stream("data", 1_000_003, 104_729)
FISHER_LABELS = Stream("fisher_labels", 7_919)
STEP_PROBES = Stream("step_probes", 1_000_003)


def derive_seed(seed: object, stream: Stream = PROBES, index: int = 0) -> int:
    """The seed of ``stream`` at ``index`` for a base ``seed`` (a non-negative integer).

    Example:
        >>> derive_seed(2, FORWARD, index=3)  # batch 3's forward pass under seed 2
        2000009
    """
    return stream.seed(check_seed(seed), index)


def generator(
    seed: object, device: torch.device | str = "cpu", stream: Stream = PROBES, index: int = 0
) -> torch.Generator:
    """A private generator on ``device`` seeded with :func:`derive_seed` of (``seed``,
    ``stream``, ``index``); the global RNG is never touched.

    ``seed`` is a non-negative integer (1.7 and None are refused, not truncated or replaced)
    or, for the ``PROBES`` stream, a ``torch.Generator``, which is used as it is.

    Example:
        >>> g = generator(0)
        >>> torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=generator(0)))
        True
    """
    if isinstance(seed, torch.Generator):
        if stream != PROBES or index != 0:
            raise TypeError(
                f"the {stream.name} stream derives its seeds from an integer seed; "
                "pass an integer, not a torch.Generator"
            )
        return seed
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, stream, index))
    return g


def rademacher(
    n: int, k: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device | str
) -> Tensor:
    """An (n, k) block of independent ±1 entries drawn from ``gen``, made in ``dtype`` in place:
    drawn as int64 and mapped out of place, the block took five times its final memory at the
    peak (4.5 GB for 100 probes of a 2M-parameter model). The same draws either way."""
    z = torch.randint(0, 2, (n, k), generator=gen, device=device, dtype=dtype)
    return z.mul_(2).sub_(1)
