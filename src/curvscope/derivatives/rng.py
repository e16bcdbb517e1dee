"""The global random number generators a forward pass or a loader may draw from — torch's,
numpy's legacy global RNG (``np.random.*``) and Python's ``random`` — read, seeded and put
back, so that curvscope's passes draw fixed numbers and the user's streams are left as found.

Every forward pass of a product does this, so its cost is a product's fixed cost on a small
model: a whole read, seed and restore takes about 26 µs (``timeit``, one thread): Python's
``random`` 16 µs of it (its state is a tuple of 625 integers), numpy's 7, torch's 3. numpy's
legacy RNG, an MT19937 of 2.5 kB, took 72 µs through ``np.random.get_state``/``set_state``
(which copy its 624 words one by one; 95 µs around a product, a sixth of a gradient of the
digits MLP): its state is copied as raw bytes instead, through numpy's public
``bit_generator.ctypes.state_address`` (the layout checked once against
``bit_generator.state``), in under a µs. The one part of the legacy state
outside those bytes is the second gaussian its polar method keeps for the next draw
(``has_gauss``, ``gauss``); it is read by one draw — a kept gaussian comes back without moving
the bit generator — and written back by ``set_state`` with a constant list for the words (a
list is read fast, an array word by word), which the saved bytes then replace. A global bit
generator other than MT19937 (``np.random.set_bit_generator``) is saved and restored through
``get_state(legacy=False)``; in both cases a bit generator replaced meanwhile (a forward that
calls ``np.random.set_bit_generator``) is put back, the user's own object. The words given to
``set_state`` are a valid state's (numpy's seed 0): all zeros, they left the generator
degenerate for that instant, and another thread drawing then got zeros or hung for good in
``standard_normal`` (an outside review).

Threads: curvscope's own save, seed, pass and restore hold :data:`LOCK`, so that two threads
running curvscope at once do not restore each other's states (the user's RNG left at a seeded
state, λ_max 1.03 for 1.29 alone: an outside review). Another thread of the user's drawing from
these global RNGs while curvscope runs draws from curvscope's seeded streams and is then
rewound: its draws repeat, and its draws move curvscope's operator (README, "Your model is left
exactly as found").
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import random
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

_LEGACY = np.random.mtrand._rand  # the RandomState behind np.random.seed, np.random.normal, ...
#: an MT19937's state in memory: ``uint32_t key[624]; int pos`` (numpy's mt19937_state)
_MT_WORDS = 624
_MT_BYTES = _MT_WORDS * 4 + ctypes.sizeof(ctypes.c_int)
#: set_state's words, replaced at once by the saved bytes: a valid state's (seed 0), as a list
_ANY_WORDS = np.random.MT19937(0).state["state"]["key"].tolist()
#: held by every curvscope save, seed, pass and restore of the global RNGs (re-entrant: a pass
#: inside a pass, a loader's step inside a forward's)
LOCK = threading.RLock()


@functools.cache
def _raw_layout_holds() -> bool:
    """Whether an MT19937's state lies in memory as ``key[624]`` then ``pos``: checked once, on a
    generator of our own, against what numpy's ``state`` says (if not, the slow path is taken)."""
    try:
        bg = np.random.MT19937(20241129)
        bg.random_raw(7)
        raw = ctypes.string_at(bg.ctypes.state_address, _MT_BYTES)
        full = bg.state
        state = full["state"]
        if set(full) != {"bit_generator", "state"} or set(state) != {"key", "pos"}:
            return False  # a field beyond the words and their position: not all in the bytes
        expected = np.asarray(state["key"], dtype=np.uint32).tobytes()
        return raw == expected + bytes(ctypes.c_int(int(state["pos"])))
    except Exception:  # no ctypes interface, another layout: numpy's own copies serve
        return False


class _NumpyState(NamedTuple):
    """numpy's legacy global state: its bit generator, and its MT19937 state as raw bytes and
    the kept gaussian (None: none) — or, for another bit generator, numpy's own state dict."""

    bit_generator: Any
    raw: bytes | dict[str, Any]
    gauss: float | None = None


def _fast(bg: Any) -> bool:
    return type(bg) is np.random.MT19937 and _raw_layout_holds()


def numpy_state() -> _NumpyState:
    """numpy's legacy global RNG state, as it was before this call's one draw (a gaussian, to
    learn whether one was kept): the generator has moved, so :func:`set_numpy_state` (or a
    seed) must follow."""
    bg = _LEGACY._bit_generator
    if not _fast(bg):
        return _NumpyState(bg, _LEGACY.get_state(legacy=False))
    address = bg.ctypes.state_address
    raw = ctypes.string_at(address, _MT_BYTES)
    drawn = float(_LEGACY.standard_normal())
    kept = ctypes.string_at(address, _MT_BYTES) == raw  # the draw did not move the generator
    return _NumpyState(bg, raw, drawn if kept else None)


def set_numpy_state(state: _NumpyState) -> None:
    """Put back what :func:`numpy_state` read."""
    if _LEGACY._bit_generator is not state.bit_generator:  # a forward replaced it
        np.random.mtrand.set_bit_generator(state.bit_generator)
    if isinstance(state.raw, dict):
        _LEGACY.set_state(state.raw)
        return
    # the kept gaussian, and words the bytes below replace (numpy's stubs ask for an array)
    words: Any = _ANY_WORDS
    gauss = 0.0 if state.gauss is None else state.gauss
    _LEGACY.set_state(("MT19937", words, 0, int(state.gauss is not None), gauss))
    ctypes.memmove(state.bit_generator.ctypes.state_address, state.raw, _MT_BYTES)


def seed_numpy(seed: int) -> None:
    """Seed numpy's legacy global RNG (no gaussian kept), whatever its bit generator."""
    bg = _LEGACY._bit_generator
    if type(bg) is np.random.MT19937:
        _LEGACY.seed(seed % 2**32)
    else:
        fresh = type(bg)(seed)
        _LEGACY.set_state({**fresh.state, "has_gauss": 0, "gauss": 0.0})


def rng_states(gens: Sequence[torch.Generator]) -> tuple[Any, ...]:
    """The states of the torch generators ``gens``, numpy's global RNG and Python's; numpy's
    has moved (:func:`numpy_state`): :func:`set_rng_states` or :func:`seed_rngs` must follow."""
    return [g.get_state() for g in gens], numpy_state(), random.getstate()


def set_rng_states(gens: Sequence[torch.Generator], state: tuple[Any, ...]) -> None:
    """Put back what :func:`rng_states` read: each RNG, whatever another raises."""
    try:
        for g, st in zip(gens, state[0], strict=True):
            g.set_state(st)
    finally:
        try:
            set_numpy_state(state[1])
        finally:
            random.setstate(state[2])


@contextlib.contextmanager
def kept_rngs(gens: Sequence[torch.Generator]) -> Iterator[None]:
    """The torch generators ``gens``, numpy's global RNG and Python's as found after the block,
    whatever it drew (:func:`rng_states`, :func:`set_rng_states`); the block draws from them as
    found too (numpy's, moved by its reading, is put back first: a plain function drawing from
    numpy drew the draw after the caller's next, 0.603 for 0.549: an outside review)."""
    with LOCK:
        state = rng_states(gens)
        try:
            set_numpy_state(state[1])
            yield
        finally:
            set_rng_states(gens, state)


def seed_rngs(gens: Sequence[torch.Generator], seed: int) -> None:
    """Seed the torch generators ``gens``, numpy's global RNG and Python's with ``seed``."""
    for g in gens:
        g.manual_seed(seed)
    seed_numpy(seed)
    random.seed(seed)
