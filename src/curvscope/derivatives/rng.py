"""The global random number generators a forward pass or a loader may draw from — torch's,
numpy's legacy global RNG (``np.random.*``) and Python's ``random`` — read, seeded and put
back, so that curvscope's passes draw fixed numbers and the user's streams are left as found.

Every forward pass of a product does this, so its cost is a product's fixed cost on a small
model. torch's generators and Python's take a few µs. numpy's legacy RNG, an MT19937 of
2.5 kB, took 69 µs through ``np.random.get_state``/``set_state`` (which copy its 624 words one
by one; 95 µs around a product, a sixth of a gradient of the digits MLP): its state is copied
as raw bytes instead, through numpy's public ``bit_generator.ctypes.state_address`` (the layout
checked once against ``bit_generator.state``), in under a µs. The one part of the legacy state
outside those bytes is the second gaussian its polar method keeps for the next draw
(``has_gauss``, ``gauss``); it is read by one draw — a kept gaussian comes back without moving
the bit generator — and written back through ``set_state`` only when there was one. A global
bit generator other than MT19937 (``np.random.set_bit_generator``) is saved and restored through
``get_state(legacy=False)``.
"""

from __future__ import annotations

import ctypes
import functools
import random
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

_LEGACY = np.random.mtrand._rand  # the RandomState behind np.random.seed, np.random.normal, ...
#: an MT19937's state in memory: ``uint32_t key[624]; int pos`` (numpy's mt19937_state)
_MT_WORDS = 624
_MT_BYTES = _MT_WORDS * 4 + ctypes.sizeof(ctypes.c_int)


@functools.cache
def _raw_layout_holds() -> bool:
    """Whether an MT19937's state lies in memory as ``key[624]`` then ``pos``: checked once, on a
    generator of our own, against what numpy's ``state`` says (if not, the slow path is taken)."""
    try:
        bg = np.random.MT19937(20241129)
        bg.random_raw(7)
        raw = ctypes.string_at(bg.ctypes.state_address, _MT_BYTES)
        state = bg.state["state"]
        expected = np.asarray(state["key"], dtype=np.uint32).tobytes()
        return raw == expected + bytes(ctypes.c_int(int(state["pos"])))
    except Exception:  # no ctypes interface, another layout: numpy's own copies serve
        return False


class _NumpyState(NamedTuple):
    """numpy's legacy global state as raw MT19937 bytes and the kept gaussian (None: none)."""

    bit_generator: Any  # numpy's MT19937
    raw: bytes
    gauss: float | None


def _fast(bg: Any) -> bool:
    return type(bg) is np.random.MT19937 and _raw_layout_holds()


def numpy_state() -> _NumpyState | dict[str, Any]:
    """numpy's legacy global RNG state (draws one number from it, which the state excludes)."""
    bg = _LEGACY._bit_generator
    if not _fast(bg):
        return _LEGACY.get_state(legacy=False)
    address = bg.ctypes.state_address
    raw = ctypes.string_at(address, _MT_BYTES)
    drawn = float(_LEGACY.standard_normal())
    kept = ctypes.string_at(address, _MT_BYTES) == raw  # the draw did not move the generator
    return _NumpyState(bg, raw, drawn if kept else None)


def set_numpy_state(state: _NumpyState | dict[str, Any]) -> None:
    """Put back what :func:`numpy_state` read."""
    if isinstance(state, dict):
        _LEGACY.set_state(state)
        return
    if _LEGACY._bit_generator is not state.bit_generator:  # replaced meanwhile (numpy >= 1.25)
        np.random.mtrand.set_bit_generator(state.bit_generator)
    if state.gauss is None:
        _LEGACY.seed(0)  # drops a kept gaussian (the bytes below replace the seeded words)
        ctypes.memmove(state.bit_generator.ctypes.state_address, state.raw, _MT_BYTES)
    else:
        key = np.frombuffer(state.raw, dtype=np.uint32, count=_MT_WORDS)
        pos = ctypes.c_int.from_buffer_copy(state.raw, _MT_WORDS * 4).value
        _LEGACY.set_state(("MT19937", key, pos, 1, state.gauss))


def seed_numpy(seed: int) -> None:
    """Seed numpy's legacy global RNG (no gaussian kept), whatever its bit generator."""
    bg = _LEGACY._bit_generator
    if type(bg) is np.random.MT19937:
        _LEGACY.seed(seed % 2**32)
    else:
        fresh = type(bg)(seed)
        _LEGACY.set_state({**fresh.state, "has_gauss": 0, "gauss": 0.0})


def rng_states(gens: Sequence[torch.Generator]) -> tuple[Any, ...]:
    """The states of the torch generators ``gens``, numpy's global RNG and Python's."""
    return [g.get_state() for g in gens], numpy_state(), random.getstate()


def set_rng_states(gens: Sequence[torch.Generator], state: tuple[Any, ...]) -> None:
    """Put back what :func:`rng_states` read."""
    for g, st in zip(gens, state[0], strict=True):
        g.set_state(st)
    set_numpy_state(state[1])
    random.setstate(state[2])


def seed_rngs(gens: Sequence[torch.Generator], seed: int) -> None:
    """Seed the torch generators ``gens``, numpy's global RNG and Python's with ``seed``."""
    for g in gens:
        g.manual_seed(seed)
    seed_numpy(seed)
    random.seed(seed)
