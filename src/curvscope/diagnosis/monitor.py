"""The Monitor: a diagnosis every few steps of the user's own training loop, with what only
history shows (edge of stability, a loss that ran away), and a JSONL run log."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import math
import numbers
import os
import statistics
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import Tensor, nn

from curvscope.derivatives import finite_difference as _fd
from curvscope.derivatives import zero3 as _zero3
from curvscope.derivatives.checks import callers_level, check_int, check_real
from curvscope.derivatives.distributed import (
    all_reduce_max,
    all_reduce_sum,
    collective_device,
    first_device,
    from_first_rank,
    together,
)
from curvscope.derivatives.objective import (
    ModelObjective,
    check_passes,
    inner_name,
    refuse_complex,
    unwrapped,
)
from curvscope.derivatives.sharded import local_entries
from curvscope.diagnosis.classify import (
    DEFAULT_THRESHOLDS,
    EOS_ABOVE_HOLD,
    EOS_BAND,
    EOS_PROBES,
    EOS_SWING,
    EXPLOSION,
    Evidence,
    State,
    StateEnum,
    Thresholds,
    _ran_away,
    classify,
    classify_history,
    effective_sharpness,
    explosion_base,
    step_scaled,
)
from curvscope.diagnosis.diagnosis import (
    DEFAULT_BUDGET,
    Diagnosis,
    UpdateCheck,
    _curvature,
    _Products,
    diagnose,
    update_curvature,
)
from curvscope.diagnosis.runlog import LOG_VERSION, RunLogWriter, check_log_mode
from curvscope.diagnosis.runlog import read_log as read_log  # where it lived before runlog
from curvscope.diagnosis.stability import (
    NotSteppedError,
    check_descent_lr,
    check_judgeable,
    check_readable,
    limit_factor,
    optimizer_name,
    stepped_selection,
)

logger = logging.getLogger(__name__)

__all__ = ["EOS_BAND", "EOS_PROBES", "EXPLOSION", "Monitor", "read_log", "scalars"]

#: Default cadence: probes take at most this share of the wall time ...
OVERHEAD = 0.05
#: ... and come at least this many steps apart (the first one after this many steps).
MIN_EVERY = 10
#: The cheap tier (two products a check) may use at most this share of the overhead budget,
#: which it shares with the probes, and its checks come at least this many steps apart.
UPDATE_SHARE = 0.5
UPDATE_MIN_EVERY = 2
#: A probe is due at once when a schedule has raised the learning rate this many times since
#: the last probe (the limit halved: a warm-up), whatever the budget.
LIMIT_HALVED = 2.0
#: Every this many probes one starts cold (a random start, judged from 20 products), as does a
#: probe called by a halved limit: warm starts only refine the directions the previous probe
#: found, so a block of the curvature they hold nothing of stayed unseen — a model of two
#: independent towers read its sharpness 0.248, then 0.154, for 0.3, *learning* at 1.25x the
#: limit, until the loss blew up (an outside review).
REFRESH_PROBES = 10
#: The history rules (classify_history) look back at most this many steps (and EOS_PROBES
#: probes): the probes before are not handed to them.
HISTORY_SPAN = EOS_ABOVE_HOLD
#: ... and the forecast carries a sharpness's growth between two probes forward only when it
#: grew by more than this (an adaptive probe resolves the spectrum to 5%: less is noise).
GROWTH_FLOOR = 0.05


class _StepWatch:
    """Whether the optimizer a Monitor reads is still the one training: its steps are counted
    by a step post-hook and compared, at each probe, with the parameters' version counters. A
    loop that built a new optimizer (after unfreezing) without telling the Monitor — or gave
    it another optimizer than the one it steps — was judged against that one's rule in silence
    (outside reviews). A wrapper that takes no hook (one that never ran
    ``Optimizer.__init__``, as accelerate's ``AcceleratedOptimizer``) is watched through the
    optimizer it holds (``.optimizer``), if any; else not at all."""

    def __init__(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.steps = 0
        self.handle: Any = None
        self.mark: tuple[int, int | None] = (0, None)  # steps and versions at the last probe
        me = weakref.ref(self)  # the hook holds no Monitor: dropped without close(), its hook
        # stayed on the optimizer, each one 0.15 µs on every step (a review: 3,000 of them)

        def count(*_: object) -> None:
            watch = me()
            if watch is not None:
                watch.steps += 1

        seen: set[int] = set()
        while optimizer is not None and id(optimizer) not in seen:
            seen.add(id(optimizer))
            try:  # a wrapper without hook registries (accelerate's): the optimizer it holds
                self.handle = optimizer.register_step_post_hook(count)
                break
            except AttributeError:
                optimizer = getattr(optimizer, "optimizer", None)
        if self.handle is not None:
            weakref.finalize(self, self.handle.remove)

    def stale(self, versions: int, window: int) -> bool:
        """Whether the optimizer took none of the ``window`` (≥ 2) steps since the previous
        call while the parameters' ``versions`` moved (a skipped step, a GradScaler's on
        overflow, moves none)."""
        steps, before = self.mark
        self.mark = (self.steps, versions)
        moved = before is not None and versions != before
        return self.handle is not None and self.steps == steps and moved and window >= 2

    def remove(self) -> None:
        """Stop watching (the hook off the optimizer: a loop building a Monitor per run on
        one optimizer added a hook each time); never stale after."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _is_writer() -> bool:
    """Only rank 0 writes under torch.distributed."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _selected(model: nn.Module, params: list[Any] | None) -> list[Tensor]:
    """The parameters a Monitor's probes will select (names or tensors; all that require grad
    by default)."""
    return [p for _, p in _named_selection(model, params)]


def _named_selection(model: nn.Module, params: list[Any] | None) -> list[tuple[str, Tensor]]:
    """The parameters that require grad, of ``params`` where given, named as the probes'
    Curvature names them: as the module inside a DDP or torch.compile wrapper does (a name with
    the wrapper's prefix is taken too) — the wrapper's names made the cheap tier's check fail
    (the parameters before the update were keyed ``module.0.weight``, the check's ``0.weight``)
    and the warm start never match."""
    inner, _, prefix = unwrapped(model)
    named = list(inner.named_parameters())
    chosen = None
    if params is not None:
        known = {name for name, _ in named}
        chosen = {inner_name(p, prefix, known) if isinstance(p, str) else id(p) for p in params}
    return [
        (name, p)
        for name, p in named
        if p.requires_grad and (chosen is None or name in chosen or id(p) in chosen)
    ]


def _check_finite_difference(
    model: nn.Module, params: list[Any] | None, products: _Products, optimizer: object
) -> None:
    """What the probes would refuse at the first probe, refused at construction: the
    finite-difference backend's dtypes (float32 or float64), ``sharded=True`` on parameters
    that are not sharded (FSDP2's DTensors or a DeepSpeed ZeRO-3 engine's), an optimizer whose
    state the limit cannot read (for a ZeRO-3 engine: another than its own, or offloaded)."""
    selected = _selected(model, params)
    for t in selected:
        _fd.check_dtype(t.dtype)
    plain = [t for t in selected if not _zero3.is_dtensor(t) and not _zero3.is_partitioned(t)]
    if products.sharded and plain:
        names = {id(p): k for k, p in model.named_parameters()}
        raise ValueError(
            f"sharded=True: parameters {[names.get(id(t)) for t in plain[:3]]} are not sharded "
            "(neither FSDP2's DTensors nor a DeepSpeed ZeRO-3 engine's): an unsharded model's "
            "vectors fit wherever the model does — drop sharded=True"
        )
    check_readable(optimizer, selected)


def _check_data(probe_data: Any, train_batches: Any) -> None:
    """Refuse now, not at a probe thousands of steps in, data the Monitor cannot read at every
    probe: a generator as ``probe_data``, or as ``train_batches`` (spent by the first probe,
    the later verdicts lost the batch sharpness without a word: an outside review)."""
    ModelObjective.check_data(probe_data)
    if train_batches is not None:
        check_passes(train_batches, "train_batches", "the Monitor reads it at every probe")


class Monitor:
    """Diagnose training as it runs: ``mon.step(loss)`` in your loop.

    Between probes a step records the loss (and, now and then, the cheap tier below). At each
    probe :func:`~curvscope.diagnose` runs on ``probe_data``, warm-started from the previous
    probe's eigenvectors (every :data:`REFRESH_PROBES`-th probe, and one after the limit
    halved, from a random start) and measuring only what the verdict needs (``adaptive``), so
    it costs a few products; history refines its verdict
    (:func:`~curvscope.diagnosis.classify.classify_history`):

    - **diverged** when the loss is not finite or above ``EXPLOSION`` (1e3) times the first
      (once the first window between probes closed, the larger of the first and that
      window's mean), or when its mean since the previous probe is above ``RAN_AWAY`` (10)
      times the lower of its running minimum and the first loss, as are three quarters of
      the window's recent half, and above the first loss (a blow-up stuck high);
    - **edge_of_stability** when the sharpness has been within ``EOS_BAND`` (±15%) of the
      stability limit at ``EOS_PROBES`` (3) consecutive probes, over at least ``EOS_HOLD``
      (20) steps (Cohen et al. 2021): full-batch
      training drives it there and holds it, the loss falling non-monotonically; and where
      an overshoot is seen absorbed, or the sharpness rose past a constant limit while the loss
      fell — all while the loss has not risen to twice its running minimum (the rules:
      :func:`~curvscope.diagnosis.classify.classify_history`).

    Between probes, a **cheap tier** (:func:`~curvscope.diagnosis.update_curvature`, two
    products on ``probe_data``) measures the curvature along the optimizer's last update,
    uᵀHu/uᵀS⁻¹u — the quantity that decides whether the next step overshoots — and along the
    previous probe's top eigenvector (today's sharpness, nearly: the early warning). When
    either is above the stability limit by the margin (and training is not already known to
    be unstable, or at the edge — there only beyond EOS_SWING), a full probe runs at once,
    with the update's curvature as evidence (``update_curvature``): the warning does not wait
    for the next scheduled probe. Each check copies the trainable parameters at one step and
    measures at the next; the values are in :attr:`updates`, in the next probe's log record
    (``"updates"``: [step, curvature, top curvature] lists) and in TensorBoard. And every step,
    for free, the Monitor **forecasts**: it reads the limit's hyperparameter part c/η (the
    learning rate, β, the momentum) and probes at once, whatever the cadence, when a schedule
    has halved the limit since the last probe (a warm-up), or when the sharpness the last probe
    saw, grown at the rate the last two probes measured, has passed the alarm bound of the
    limit as the schedule moved it: a verdict is looked at again when it has gone stale, not
    only when the budget allows. (The default cadence charges these probes to its budget: the
    next planned probe waits until it is repaid.) A training loss that is not finite, or above
    EXPLOSION times the first, calls a probe at once too.

    Each probe appends one JSON object to ``log``: "step", "cause", "state", "advice", "reasons",
    "train_mode" (the model's ``training`` flag: the curvature is measured in the mode found)
    and the evidence keys at top level, after a header line (``"curvscope_log": 1``, the
    version, the optimizer, the cadence) that starts the run. The log loses nothing
    (:mod:`curvscope.diagnosis.runlog`): each line reaches the OS as it is made, a second writer
    on the same file is refused (a lock, released at :meth:`close` or when the process dies),
    and a failed write (disk full) warns once and is counted (:attr:`records_lost`) instead of
    stopping training. :func:`~curvscope.read_log` reads it back. State *changes* go to
    ``logging`` (logger ``curvscope.diagnosis.monitor``) and to ``callback(diagnosis, previous)``.
    Use the Monitor as a context manager, or call :meth:`close`, to close the log.

    Args:
        model, loss_fn, probe_data: what to diagnose (a fixed probe batch or loader: the
            curvature is measured on it).
        optimizer: the live optimizer (its limit and preconditioner are read at each probe).
        lr: instead, plain gradient descent at this rate.
        every: steps between probes; by default (None) the cadence adapts so that probes take
            at most ``overhead`` (5%) of the wall time, timing the loop and the probes. The
            forecast's probes come between, at any cadence (log₂(η_peak/η) of them in a
            warm-up, one when the sharpness's growth is forecast to pass the limit); the default
            cadence counts them against its budget, a fixed ``every`` adds them.
        overhead: the share of wall time the default cadence may spend on its planned probes.
        full_batch: whether the loop trains on the whole of ``probe_data`` each step (the
            edge-of-stability rules that read the shape of the training loss apply only then).
            By default (None) it is seen: the loss reported at the step after a probe was
            computed at the parameters the probe measured, and equals the probe's loss on
            full-batch training (to 1e-4), not on mini-batch training.
        adaptive: probes measure only what the verdict needs (``diagnose(adaptive=True)``:
            the spectrum to 5% where the sharpness is far from the limit and the gradient not
            small, no Newton decrement then; warm-started from the previous probe): 20-40% of
            a cold diagnosis's products (benchmarks/monitor.py) while the gradient is not
            small; where it is, λ_min's refinement mixes a random vector into the warm start
            and takes at least 20 products (a negative direction new since the last probe is
            not in it). False: every probe is a full diagnosis.
        log: a path (or an open text file, which you close) for the JSONL run log, or None.
        log_mode: for a path, as for :func:`open`: ``"x"`` (default) refuses an existing file,
            ``"a"`` appends a new run (with its own header) to it, ``"w"`` overwrites it.
        budget, thresholds, params, seed, reduction: as for :func:`~curvscope.diagnose`.
        update_every: steps between the cheap tier's checks. By default (None) they adapt,
            like the probes, within half of the overhead budget (the probes and the checks
            together stay within ``overhead``) — with the default cadence only:
            a fixed ``every`` runs no cheap tier unless ``update_every`` is given too. 0 turns
            the tier off.
        callback: called as ``callback(diagnosis, previous_state)`` when the state changes.
        tensorboard: a ``SummaryWriter`` (or a log directory) to receive ``curvscope/...``
            scalars at each probe.
        train_batches: for mini-batch training, batches like those the optimizer steps on:
            the batch sharpness is measured at each probe and is what the edge of stability
            and the unstable verdict are judged on (see :func:`~curvscope.diagnose`).
        accumulation: under gradient accumulation, the micro-batches each optimizer step
            accumulates: every ``accumulation`` consecutive ``train_batches`` are one step's
            batch (see :func:`~curvscope.diagnose`; the Lightning and Hugging Face callbacks
            pass the trainer's own). Call :meth:`step` once per optimizer step, with the
            step's loss (the mean of its micro-batches' losses, not the last one's).
        backend, fd_eps: how the probes and the cheap tier compute their products, as for
            :func:`~curvscope.diagnose`: ``"finite_difference"`` for a model only its engine
            can differentiate (FSDP2).
        sharded: with ``backend="finite_difference"`` on a model sharded by FSDP2, the probes'
            and the checks' vectors hold this rank's entries only, as for
            :func:`~curvscope.diagnose` (for a model larger than one device: nothing the size
            of the model is gathered); the warm start is kept sharded too.
        forecast: probe off the cadence when the last verdict has gone stale (above; default
            True). False keeps the probes to the cadence — e.g. a fixed ``every`` under a cyclic
            schedule, whose every rise halves the limit several times over.
        max_grad_norm: the ``max_norm`` your loop clips the gradient's norm to
            (``torch.nn.utils.clip_grad_norm_``), for a clipped run: :meth:`step` then takes
            the norm before clipping, ``mon.step(loss, grad_norm=clip_grad_norm_(...))``, and a
            probe judges the steps by the rate they took, s·η, s = min(1, max_norm/‖g‖) the
            median over the steps since the previous probe that reported a norm
            (``diagnose(..., clip_factor=s)``; the cheap tier too). None (default), or
            ``math.inf`` (``clip_grad_norm_``'s idiom for measuring only): unclipped steps.
        start_step: the steps already taken before this Monitor (a resumed run): its step
            count, the log's and TensorBoard's step axis and a fixed ``every`` continue from
            there (a resumed run's log restarted at step 0 before: a review); the first probe of
            the default cadence still comes 10 steps in.

    Raises:
        ValueError, TypeError: an invalid argument (the message names it).
        FileExistsError: ``log`` exists and ``log_mode="x"`` (the message names the options).
        LogInUseError: another Monitor (in this or another process) writes to ``log``.

    Example:
        >>> import torch, curvscope as cs
        >>> p = cs.problems.get("breast-cancer-logreg")
        >>> model = p.make_model(0)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> mon = cs.Monitor(model, p.loss_fn, p.data, optimizer=opt, every=5)
        >>> for _ in range(10):
        ...     opt.zero_grad()
        ...     loss = p.loss_fn(model(p.data[0]), p.data[1])
        ...     loss.backward()
        ...     opt.step()
        ...     d = mon.step(loss)
        >>> mon.last.state
        <State.LEARNING: 'learning'>
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor],
        probe_data: Any,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        lr: float | None = None,
        every: int | None = None,
        update_every: int | None = None,
        overhead: float = OVERHEAD,
        adaptive: bool = True,
        full_batch: bool | None = None,
        log: str | Path | TextIO | None = None,
        log_mode: str = "x",
        budget: int = DEFAULT_BUDGET,
        thresholds: Thresholds = DEFAULT_THRESHOLDS,
        params: Iterable[nn.Parameter | str] | None = None,
        seed: int = 0,
        reduction: str | None = None,
        callback: Callable[[Diagnosis, str | None], None] | None = None,
        train_batches: Iterable[Any] | None = None,
        accumulation: int = 1,
        tensorboard: Any = None,
        backend: str = "double_backward",
        fd_eps: float | None = None,
        forecast: bool = True,
        sharded: bool = False,
        start_step: int = 0,
        max_grad_norm: float | None = None,
    ) -> None:
        _check_cadence(every, update_every, overhead, forecast)
        if optimizer is not None and lr is not None:
            raise ValueError(
                "give either optimizer= (its limit and preconditioner are read at each probe) "
                "or lr= (plain gradient descent at that rate), not both"
            )
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable as callback(diagnosis, previous_state)")
        check_log_mode(log_mode)
        self._products = _Products.checked(backend, fd_eps, sharded)
        params = None if params is None else list(params)  # an iterator is read once
        if optimizer is not None:  # an optimizer without a rule, or one that maximizes:
            check_judgeable(optimizer, model)  # refused now, not at the first probe
        _check_data(probe_data, train_batches)
        refuse_complex(_named_selection(model, params))  # now, not from the first probe's step
        if backend == _fd.BACKEND:
            _check_finite_difference(model, params, self._products, optimizer)
        self.forecast = forecast
        self.model, self.loss_fn, self.probe_data = model, loss_fn, probe_data
        self._optimizer = optimizer
        self.lr = None if lr is None else check_descent_lr(lr)  # now, not at a probe
        self._stepping = _StepWatch(optimizer)
        self._stale_said = False  # whether an optimizer that stopped stepping was said
        self._calls_said = False  # whether mon.step called more often than it steps was said
        self._init_clipping(max_grad_norm)
        self.every, self.budget, self.thresholds = every, budget, thresholds
        self.overhead, self.adaptive = overhead, adaptive
        self.full_batch = full_batch
        self._seen_full_batch: bool | None = None
        self._probe_loss: float | None = None  # to compare with the next step's loss
        self._probe_loss_as_trained: float | None = None  # the same, in the loop's precision
        #: the lower precision the training loss was computed in (autocast), read off the
        #: first reported loss's graph: the probe's loss is compared as computed in it
        self._trained_in: torch.dtype | None = None
        self._trained_read = False
        self._scale_checked = False  # whether the reported losses' scale was compared
        self._eval_warned = False  # whether a probe in eval mode was warned about
        self.train_seconds = 0.0  # wall time between step() calls, probes excluded
        self.probe_seconds = 0.0
        self._last_probe_seconds = 0.0
        self._loss_mark = 0
        self._window_means: list[float] = []  # the mean training loss between two probes
        self._best_mean: float | None = None  # the lowest of them
        self._first_window_diverged = False  # whether the probe closing the first said so
        self._low: float | None = None  # the lowest training loss before the current window
        # the cheap tier: off with update_every=0, or with a fixed `every` and no update_every
        self.update_every = update_every
        self._updates_on = update_every != 0 and (every is None or update_every is not None)
        self.update_seconds = 0.0
        self._last_update_seconds = 0.0
        self._since_update = 0
        self._before: dict[str, Tensor] | None = None  # the parameters one step back
        #: The cheap tier's checks: (step, :class:`~curvscope.diagnosis.diagnosis.UpdateCheck`).
        self.updates: list[tuple[int, UpdateCheck]] = []
        self._next_probe = MIN_EVERY  # the adaptive cadence's plan (see _plan)
        self._next_update: int | None = None  # planned at the first probe
        self._updates_mark = 0
        #: The step of each diagnosis in :attr:`history` (the forecast's probes come between
        #: the cadence's).
        self.probe_steps: list[int] = []
        #: Why each probe in :attr:`history` ran: "cadence", "loss" (a training loss not
        #: finite or above EXPLOSION times the first), "forecast", "check" (the cheap tier's
        #: alarm, or an overflow it met) or "manual" (:meth:`probe`); also each log record's
        #: ``"cause"``.
        self.probe_causes: list[str] = []
        self._probe_factor: float | None = None  # the limit's c/η at the last probe, and the
        self._growth = 1.0  # sharpness's growth a step from the probe before to it (forecast)
        self._probe_sharpness: tuple[float | None, float | None] = (None, None)  # s, limit
        self._state: StateEnum | None = None  # the last probe's state, as rank 0 decided it
        #: under torch.distributed, the loss watch's all-reduce of the previous step, in
        #: flight (:meth:`_watch_ranks`), and whether it said a rank's loss ran away
        self._watch: tuple[Any, Tensor] | None = None
        self._ranks_ran_away = False
        self._put_off_said = False  # whether a probe put off for an unstepped optimizer was said
        self._curvature_alone = False  # whether the last probe's *diverged* rests on that
        self._warm_in_a_row = 0  # probes warm-started since the last cold one
        self._clock: float | None = None
        self._in_manual_probe = False  # (:meth:`probe`)
        self.params = None if params is None else list(params)
        self.seed, self.callback, self.reduction = seed, callback, reduction
        self.train_batches = train_batches
        self.accumulation = check_int(accumulation, "accumulation", minimum=1)
        self._writer: Any = None
        self._own_writer = False  # whether the Monitor made the writer (from a directory)
        self._log: RunLogWriter | None = None
        self._log_path: str | None = None  # the run log's path, where this Monitor opened one
        self.steps = self._start = check_int(start_step, "start_step", minimum=0)
        # rank 0 opens the writers; a failure there (a log that exists under log_mode="x")
        # raises on every rank, or the others waited in their first probe until the process
        # group's timeout (an outside review)
        world = torch.distributed.group.WORLD if _world_size() > 1 else None
        where = collective_device(world, first_device(model)) if world is not None else "cpu"
        together(
            partial(self._open_writers, tensorboard, log, log_mode), world, torch.device(where)
        )
        self._next_probe += self._start
        #: Every probe's diagnosis, in order; only the last (:attr:`last`) keeps its
        #: eigenvectors (``vectors``), the warm start of the next probe: each held 2n numbers
        #: for the whole run before, 15 MB a probe at 1.9M float32 parameters, on the model's
        #: device.
        self.history: list[Diagnosis] = []
        self.losses: list[float] = []
        self.first_loss: float | None = None
        self._vectors: Tensor | None = None
        self._vector_names: tuple[str, ...] = ()  # the parameters the vectors are over
        self._after_close = 0  # probe records after close(): not written

    def _open_writers(self, tensorboard: Any, log: Any, log_mode: str) -> None:
        """The TensorBoard writer and the run log, on the rank that writes (rank 0)."""
        if tensorboard is not None and _is_writer():
            if hasattr(tensorboard, "add_scalar"):
                self._writer = tensorboard
            else:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise ImportError(
                        "tensorboard= with a directory needs the tensorboard package: "
                        "pip install tensorboard (or pass a SummaryWriter)"
                    ) from e
                self._writer = SummaryWriter(log_dir=str(tensorboard))
                self._own_writer = True  # closed at close(): its thread lived on (a review)
        if log is not None and _is_writer():
            try:
                self._open_log(log, log_mode)
            except BaseException:  # (a log that exists: the writer's thread lived on)
                if self._own_writer:
                    self._writer.close()
                raise

    def _open_log(self, log: Any, log_mode: str) -> None:
        """The run log, its header written."""
        if isinstance(log, (str, os.PathLike)):
            self._log_path = os.path.abspath(log)
        self._log = RunLogWriter(
            log,
            log_mode,
            {
                "curvscope_log": LOG_VERSION,
                "version": _version(),
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "optimizer": optimizer_name(self.optimizer)
                if self.optimizer is not None
                else (f"gradient descent (lr={self.lr})" if self.lr is not None else "none"),
                "every": self.every
                if self.every is not None
                else f"auto ({self.overhead:.0%} overhead)",
                "budget": self.budget,
                "start_step": self._start,
                **self._clipping_header(),
                "thresholds": self.thresholds.as_dict(),
            },
        )

    # ----------------------------------------------------------------------------- use
    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer whose rule and state the probes judge stability by. A loop that
        replaces its optimizer sets ``mon.optimizer = new`` (checked as at construction; it
        replaces ``lr=`` too)."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is not None:
            check_judgeable(optimizer, self.model)
        self._check_clipped_steps(optimizer)  # (the next probe raised, inside the loop)
        self._stepping.remove()
        self._optimizer, self._stepping = optimizer, _StepWatch(optimizer)
        self._stale_said = False
        if optimizer is not None:  # it replaces a Monitor(lr=...)'s plain gradient descent
            self.lr = None  # (both raised "give either optimizer= or lr=" at the next probe)

    @property
    def last(self) -> Diagnosis | None:
        return self.history[-1] if self.history else None

    def step(
        self, loss: Tensor | float | None = None, *, grad_norm: Tensor | float | None = None
    ) -> Diagnosis | None:
        """Record one training step; probe when one is due. Returns the diagnosis at a
        probe, None otherwise. ``grad_norm``: with ``max_grad_norm``, the gradient's norm
        before clipping (what ``clip_grad_norm_`` returns), at every step or at some (the
        median over those since the previous probe is the probe's clip factor)."""
        self._record_clip(grad_norm)
        now = time.perf_counter()
        if self._clock is not None:
            self.train_seconds += now - self._clock
        self._clock = now
        self.steps += 1
        if loss is not None:
            value = _scalar_loss(loss)
            self.losses.append(value)
            if not self._trained_read and isinstance(loss, Tensor) and loss.grad_fn is not None:
                self.trained_in(_lowest_precision(loss))
            # under torch.distributed the ranks' mean decides it, at a probe (_agree_window)
            if self.first_loss is None and math.isfinite(value) and _world_size() < 2:
                self.first_loss = value
            if self._probe_loss is not None:  # this loss was computed where the probe measured
                self._seen_full_batch = any(
                    abs(value - probed) <= 1e-4 * max(abs(probed), 1e-12)
                    for probed in (self._probe_loss, self._probe_loss_as_trained)
                    if probed is not None
                )
        self._probe_loss = self._probe_loss_as_trained = None
        self._watch_ranks(loss is not None)
        d = self._probe_or_check(reported=loss is not None)
        self._clock = time.perf_counter()  # probes and checks are not training time
        return d

    def _check_clipped_steps(self, optimizer: object) -> None:
        """Refuse ``max_grad_norm`` without steps it could clip: no optimizer, nor ``lr``."""
        if self.max_grad_norm is not None and optimizer is None and self.lr is None:
            raise ValueError(
                "max_grad_norm= says how the optimizer's steps are clipped, and this Monitor has "
                "no optimizer (nor lr=): pass the optimizer, or leave max_grad_norm out"
            )

    def _init_clipping(self, max_grad_norm: object) -> None:
        self.max_grad_norm = _checked_max_norm(max_grad_norm)
        self._check_clipped_steps(self.optimizer)
        #: the fraction of the gradient clipping left, min(1, max_norm/‖g‖), of each step
        #: since the previous probe that reported its norm; and the latest of any step
        self._window: list[float] = []
        self._latest_clip: float | None = None
        self._clip_warned = False  # whether a probe without any norm was warned about
        self._agreed_at: int = -1  # the step _agreed_clip last agreed at, and its value
        self._agreed: float | None = None

    def _clipping_header(self) -> dict[str, float]:
        """The log header's record of the clipping (nothing for unclipped steps)."""
        norm = self.max_grad_norm
        return {"max_grad_norm": norm} if self.clipped and norm is not None else {}

    @property
    def clipped(self) -> bool:
        """Whether the probes judge clipped steps: a finite ``max_grad_norm`` (``math.inf``
        measures the norm only)."""
        return self.max_grad_norm is not None and self.max_grad_norm < math.inf

    def _record_clip(self, grad_norm: Tensor | float | None) -> None:
        """The fraction of this step's gradient that clipping left (torch's clip
        coefficient max_norm/(‖g‖ + 1e-6), at most 1); a norm that is not finite is not
        counted (the loss watch and the next probe judge such a step)."""
        if self.max_grad_norm is None:
            if grad_norm is not None:
                raise ValueError(
                    "mon.step(grad_norm=...) needs the norm the gradient is clipped to: pass "
                    "Monitor(..., max_grad_norm=max_norm), the max_norm of your clip_grad_norm_"
                )
            return
        if grad_norm is None or not self.clipped:  # a step that did not say (a Trainer says at
            return  # its logging steps), or one never clipped: nothing to read
        norm = _scalar_loss(grad_norm, "grad_norm", "the total norm clip_grad_norm_ returns")
        if norm < 0:
            raise ValueError(
                f"mon.step got grad_norm={norm:g}: a norm is not negative — pass the total norm "
                "clip_grad_norm_ returns"
            )
        if math.isfinite(norm):
            self._latest_clip = min(1.0, self.max_grad_norm / (norm + 1e-6))
            self._window.append(self._latest_clip)

    def _clip_factor(self) -> float | None:
        """The median fraction of the gradient the steps since the previous probe took (of
        those that reported their norm; the latest known before then; None: no clipping
        declared, or no finite norm reported yet — warned once, at a probe)."""
        return statistics.median(self._window) if self._window else self._latest_clip

    def _agreed_clip(self) -> float | None:
        """:meth:`_clip_factor` as rank 0 has it (one broadcast under torch.distributed, where
        ranks whose norms differ would otherwise judge different limits and call probes — a
        collective — at different steps); no collective without ``max_grad_norm``."""
        if not self.clipped:
            return None
        if self._agreed_at != self.steps:  # once a step: a check that calls a probe reuses it
            clip = self._clip_factor()
            (agreed,) = _agreed([math.nan if clip is None else clip], self.model, op="rank0")
            self._agreed_at, self._agreed = self.steps, None if math.isnan(agreed) else agreed
        return self._agreed

    def _check_clipping(self) -> None:
        """Warn, once, at a probe of a Monitor given ``max_grad_norm`` (a finite one) that no
        step has reported a finite gradient norm: the probe judges unclipped steps."""
        if not self.clipped or self._latest_clip is not None or self._clip_warned:
            return
        self._clip_warned = True
        warnings.warn(
            f"Monitor(max_grad_norm={self.max_grad_norm:g}) has had no finite gradient norm "
            "yet, so this probe judges unclipped steps: pass each step's norm before clipping, "
            "mon.step(loss, grad_norm=torch.nn.utils.clip_grad_norm_(params, max_norm)); under "
            "the Hugging Face callback, which passes the norm the Trainer logs, log at least "
            "as often as the Monitor probes (TrainingArguments(logging_steps=...))",
            stacklevel=_callers_level(),
        )

    def _probe_or_check(self, reported: bool) -> Diagnosis | None:
        cause = self._probe_cause(reported)
        try:
            if cause is not None:
                self._before = None
                return self._probe(cause)
            if not self._updates_on:
                return None
            self._since_update += 1
            if self._before is not None:
                return self._check_update()
        except NotSteppedError:
            if cause == "loss":  # a loss that ran away is said at once, stability unjudged:
                return self._probe(cause, judged=False)  # (put off, it waited forever: a review)
            self._put_off()
            return None
        # the copy is checked at the next step: not when that step is a probe's, which drops
        # it (update_every = every - 1 never ran a check); it is taken after the probe instead
        if self._update_due() and not self._due(self.steps + 1):
            self._before = self._trainable_copy()
            self._since_update = 0  # update_every counts from the copy
        return None

    def _put_off(self) -> None:
        """A probe (or check) due while the optimizer has taken no step: put off — a planned
        one runs at the next step the cadence allows after the optimizer's first — and said
        once, where it raised from ``mon.step`` and stopped the training loop (an outside
        review: a ``GradScaler`` skipping its first steps on overflow left Adam without state
        at the first probe)."""
        if self._put_off_said:
            return
        self._put_off_said = True
        warnings.warn(
            f"the Monitor's probe at step {self.steps} is put off: "
            f"{type(self.optimizer).__name__} has taken no step yet (a GradScaler that "
            "skipped its steps on overflow? or an optimizer that is not the one training: set "
            "mon.optimizer), so its preconditioner does not exist; the probes run once it has "
            "stepped, and a loss that runs away is probed meanwhile without it",
            stacklevel=_callers_level(),
        )

    def _probe_cause(self, reported: bool) -> str | None:
        """Why a probe is due at this step (``reported``: whether it reported a loss), or
        None: the cadence, then a loss that ran away, then the forecast."""
        if self._due():
            return "cadence"
        if self._loss_ran_away(reported):
            return "loss"
        return "forecast" if self._forecast_due() else None

    def _loss_ran_away(self, reported: bool = True) -> bool:
        """Whether the loss just reported is not finite or above EXPLOSION times the first
        (free: the diverged verdict need not wait for the next probe, which the budget may put
        thousands of steps away); once the Monitor says diverged, not again. Under
        torch.distributed, whether any rank's did at the previous step (:meth:`_watch_ranks`):
        a probe is a collective that every rank must call at the same step."""
        if self._state == State.DIVERGED and not self._curvature_alone:
            return False
        return self._ranks_ran_away if _world_size() > 1 else self._own_ran_away(reported)

    def _own_ran_away(self, reported: bool) -> bool:
        """Whether this process's loss just reported ran away (:meth:`_loss_ran_away`)."""
        base = explosion_base(self.first_loss, self._first_mean())
        return reported and _ran_away(self.losses[-1:], base)

    def _watch_ranks(self, reported: bool) -> None:
        """Under torch.distributed, the loss watch over every rank: each rank reported its own
        shard's loss, and one whose loss was NaN went unseen until the next planned probe —
        at the default cadence hundreds of steps later (an outside review). Every step, on
        every rank whether it reported a loss or not, sends whether this rank's ran away in an
        all-reduce (the maximum) that runs while the next step trains; that step reads it
        (its wait is the collective's, done by then), so every rank calls the probe at the
        same step, one step after the loss. Waited for by :meth:`close`."""
        if _world_size() < 2:
            return
        self._ranks_ran_away = self._end_watch()
        world = torch.distributed.group.WORLD
        device = collective_device(world, first_device(self.model))
        flag = torch.tensor(
            [float(self._own_ran_away(reported))], dtype=torch.float64, device=device
        )
        work = torch.distributed.all_reduce(
            flag, op=torch.distributed.ReduceOp.MAX, group=world, async_op=True
        )
        self._watch = (work, flag)

    def _end_watch(self) -> bool:
        """Wait for the loss watch's all-reduce in flight (:meth:`_watch_ranks`); whether it
        said a rank's loss ran away (False when none is in flight)."""
        watch, self._watch = self._watch, None
        if watch is None:
            return False
        work, flag = watch
        work.wait()
        return bool(flag.item() > 0)

    def _trainable(self) -> list[tuple[str, Tensor]]:
        """The parameters a probe and a check measure now: those that require grad, of
        ``params`` where given — else of those the optimizer steps, where it steps some only
        (:func:`~curvscope.diagnosis.stability.stepped_selection`), as a diagnosis does."""
        return _named_selection(self.model, self._selection())

    def _selection(self) -> list[Any] | None:
        """``params``, or the parameters the optimizer steps where it steps some only."""
        return stepped_selection(self.model, self.optimizer) if self.params is None else self.params

    def _trainable_names(self) -> list[str]:
        return [name for name, _ in self._trainable()]

    def _trainable_copy(self) -> dict[str, Tensor]:
        """A copy of the parameters the checks measure: a frozen backbone is not copied; of a
        DeepSpeed ZeRO-3 engine's, this rank's entries (its ``.data`` is empty between
        passes)."""
        return {
            name: local_entries(p).clone() if _zero3.is_partitioned(p) else p.detach().clone()
            for name, p in self._trainable()
        }

    def _warm_start(self) -> Tensor | None:
        """The previous probe's eigenvectors, while they are over the parameters measured now
        (none once a parameter was frozen or added)."""
        if self._vectors is None or list(self._vector_names) != self._trainable_names():
            return None
        return self._vectors

    def _limit_halved(self, factor: float | None) -> bool:
        """Whether a schedule has lowered the stability limit by :data:`LIMIT_HALVED` since the
        last probe: ``factor``, its hyperparameter part c/η now (:meth:`_limit_factor`)."""
        if self._probe_factor is None or factor is None or not 0 < factor < math.inf:
            return False  # (η = 0: no step to overshoot)
        return LIMIT_HALVED * factor <= self._probe_factor

    def _start_vectors(self) -> Tensor | None:
        """Where a probe's Lanczos starts: the previous probe's vectors, or a random start
        (None) where there are none, where the limit halved since the last probe (the
        schedule moved the question: the old vectors may hold nothing of the new answer — a
        probe warm-started from them read 0.248 for 0.3), whether the forecast or the cadence
        called it, or after :data:`REFRESH_PROBES` − 1 warm starts in a row."""
        v0 = self._warm_start()
        halved = self._limit_halved(self._limit_factor())
        if v0 is None or halved or self._warm_in_a_row >= REFRESH_PROBES - 1:
            self._warm_in_a_row = 0
            return None
        self._warm_in_a_row += 1
        return v0

    def _limit_factor(self) -> float | None:
        """The stability limit's hyperparameter part now, c/η (:func:`~curvscope.diagnosis.
        stability.limit_factor`): what a schedule moves between probes."""
        return limit_factor(self.optimizer, lr=self.lr)

    def _forecast_due(self) -> bool:
        """Whether the last verdict is stale, from what is free to know every step: the limit's
        hyperparameter part c/η (the learning rate, and β or the momentum where a schedule
        cycles them) and the sharpness's growth between the last two probes.

        A probe is due at once when (i) a schedule has halved the limit since the last probe
        (η doubled: a warm-up) — the verdict was judged against a limit that no longer holds —
        or (ii) the forecast sharpness s·g^Δk (g the growth per step the last two probes
        measured, 1 when it did not grow or at the edge of stability) has crossed the alarm
        bound (the margin; EOS_SWING at the edge) of the limit as the schedule moved it, from
        below it at that probe: a probe that saw the sharpness past the bound had its say.
        Both are bounded: (i) comes log₂(η_peak/η) times in a warm-up, and (ii) re-measures g,
        so a forecast the probe does not confirm is not repeated."""
        if not self.forecast or not self.history or self._probe_factor is None:
            return False
        factor = self._limit_factor()
        if self._state in (State.UNSTABLE, State.DIVERGED) or factor is None:
            return False
        if not 0 < factor < math.inf:  # η = 0: no step to overshoot
            return False
        if self._limit_halved(factor):  # (the factor read once a step: mon.step's hot path)
            return True
        s, limit = self._probe_sharpness
        if s is None or limit is None or not math.isfinite(limit) or s <= 0:
            return False
        bound = self._alarm_bound() * limit
        if s > bound:
            return False
        since = self.steps - self.probe_steps[-1]  # in logs: g^Δk overflows a float
        moved = math.log(self._probe_factor / factor)  # the limit fell by this (in logs)
        return math.log(s) + since * math.log(self._growth) + moved > math.log(bound)

    def _alarm_bound(self) -> float:
        """The multiple of the limit past which an early probe is called: the margin, and at
        the edge (where the sharpness swings past the limit) EOS_SWING."""
        return EOS_SWING if self._state == State.EDGE_OF_STABILITY else 1 + self.thresholds.margin

    def _update_due(self) -> bool:
        if self.update_every is not None:
            return self._since_update >= self.update_every
        return self._next_update is not None and self.steps >= self._next_update

    def _plan(self) -> None:
        """The adaptive cadence: the steps of the next probe and of the next cheap check, from
        the timings so far, so that probes and checks together stay within ``overhead`` of the
        wall time (checks within UPDATE_SHARE of it) as the loop keeps its pace. Under
        torch.distributed the timings are agreed first (their maximum over the ranks, at a
        probe or check, which every rank runs together), so every rank plans the same steps:
        probes are collectives, and a rank that probed alone would hang."""
        if self.every is not None and (self.update_every is not None or not self._updates_on):
            return  # both cadences fixed: nothing to plan
        spent, checks, last_probe, last_check, train = _agreed(
            [
                self.probe_seconds + self.update_seconds,
                self.update_seconds,
                self._last_probe_seconds,
                self._last_update_seconds,
                self.train_seconds,
            ],
            self.model,
        )
        step = train / max(self.steps - self._start, 1)  # the loop's seconds a step

        def after(cost: float, least: int) -> int:
            if step <= 0:
                return self.steps + least
            return self.steps + max(least, math.ceil(cost / step - train / step))

        budget = self.overhead
        self._next_probe = after((spent + last_probe) / budget, MIN_EVERY)
        self._next_update = after(
            max((checks + last_check) / (UPDATE_SHARE * budget), (spent + last_check) / budget),
            UPDATE_MIN_EVERY,
        )

    def measure_first_loss(self) -> float | None:
        """Take the run's first loss from ``probe_data`` now, at the parameters as they are
        (the model's own mode: a model in eval mode is measured without dropout): for a loop
        whose first reported loss is not its start's — a mean over a logging window (the
        ``transformers.Trainer`` callback reports those): a run blown up inside its first
        window reported a first loss of 2,567 where it started at 3, and with that as its
        start never read *diverged* (an outside review). Costs one gradient over
        ``probe_data``, with the Monitor's ``backend``; leaves the model as found. Under
        torch.distributed a collective (every rank calls it; the loss over every rank's
        data). A loss that is not finite leaves the first loss unknown (the first probe
        reads it). Returns the first loss."""
        loss = self._probe_data_loss()
        if loss is None:  # not finite: the first probe says diverged
            return self.first_loss
        self.first_loss = loss
        return loss

    def trained_in(self, dtype: torch.dtype | None) -> None:
        """Say the precision the training loop's forward runs in (its autocast dtype): where
        it is below the model's parameters', the full-batch test also compares the probe
        data's loss computed under that autocast. Read off the first loss :meth:`step` gets
        as a tensor; the callbacks, which pass floats, say it from the trainer's precision."""
        own = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        lower = (  # (the same or a higher precision is no autocast)
            dtype is not None and own is not None and torch.finfo(dtype).eps > torch.finfo(own).eps
        )
        self._trained_in, self._trained_read = (dtype if lower else None), True

    def _probe_data_loss(self, autocast: torch.dtype | None = None) -> float | None:
        """The loss on ``probe_data`` at the parameters as they are (one gradient, with the
        Monitor's backend; under ``torch.autocast`` in ``autocast`` where given), or None
        where it is not finite."""
        C = _curvature(
            self.model,
            self.loss_fn,
            self.probe_data,
            self.params,
            self.seed,
            self.reduction,
            self._products,
        )
        region = (
            contextlib.nullcontext()
            if autocast is None
            else torch.autocast(C.device.type, dtype=autocast)
        )
        try:
            with region:
                loss, _ = C.loss_and_gradient()
        except FloatingPointError:
            return None
        return loss if math.isfinite(loss) else None

    def _measuring(self) -> dict[str, Any]:
        """What a probe and a cheap check measure alike: the rate without an optimizer, the
        parameters, the seed, the loss's reduction and how the products are computed."""
        return {
            "lr": self.lr,
            "params": self._selection(),
            "seed": self.seed,
            "reduction": self.reduction,
            "backend": self._products.backend,
            "fd_eps": self._products.fd_eps,
            "sharded": self._products.sharded,
        }

    def _check_update(self) -> Diagnosis | None:
        """The cheap tier: the curvature along the last update; a full probe at once when it
        says the next step overshoots."""
        start = time.perf_counter()
        before, self._before = self._before, None
        assert before is not None
        if set(before) != set(self._trainable_names()):  # parameters frozen or added since
            return None
        warm = self._warm_start()
        try:
            check = update_curvature(
                self.model,
                self.loss_fn,
                self.probe_data,
                before,
                self.optimizer,
                top=None if warm is None else warm[:, 0],
                clip_factor=self._agreed_clip(),
                **self._measuring(),
            )
        except FloatingPointError:  # the loss or gradient on the probe data is not finite
            check = None
        self._last_update_seconds = time.perf_counter() - start
        self.update_seconds += self._last_update_seconds
        self._plan()
        if check is None:  # training has overflowed: a probe says so (diverged), not a raise
            return self._probe("check")
        if check.curvature is None and check.top_curvature is None:
            return None
        self.updates.append((self.steps, check))
        if self._writer is not None:
            for key in ("curvature", "top_curvature"):
                value = getattr(check, key)
                if value is not None:
                    self._writer.add_scalar(f"curvscope/update_{key}", value, self.steps)
        if self._alarming(check):
            return self._probe("check", update=check.curvature)
        return None

    def _alarming(self, check: UpdateCheck) -> bool:
        """Whether a cheap check calls for a full probe now: the curvature along the update,
        or along the previous probe's top eigenvector, is above the limit (of the clipped
        steps' rate, with ``max_grad_norm``: :func:`update_curvature` was given it) by the
        margin, and training is not already known to be unstable or at the edge (where the
        sharpness swings past the limit: then only beyond EOS_SWING)."""
        limit = check.limit
        if limit is None or not math.isfinite(limit):
            return False
        if self._state in (State.UNSTABLE, State.DIVERGED):
            return False
        bound = self._alarm_bound()
        # as a step meets them: a summed loss's B/N of the probe's (the previous probe's share)
        last = self.history[-1].evidence if self.history else {}
        met = (step_scaled(last, check.curvature), step_scaled(last, check.top_curvature))
        return any(c > bound * limit for c in met if c is not None)

    def _due(self, step: int | None = None) -> bool:
        """Whether the cadence puts a probe at ``step`` (default: this step)."""
        step = self.steps if step is None else step
        if self.every is not None:
            return step % self.every == 0
        return step >= self._next_probe  # planned at the previous probe (the first: 10)

    def probe(self, update: float | None = None) -> Diagnosis:
        """Diagnose now, whatever the step (``update``: the curvature along the last update,
        from the cheap tier, as evidence). Its log record's ``"cause"`` is ``"manual"``; its
        time is not training time (it was counted as both, and the overhead read 49.5% for
        92%: an outside review's fuzzing)."""
        start, outer = time.perf_counter(), not self._in_manual_probe
        self._in_manual_probe = True
        try:
            return self._probe("manual", update)
        finally:
            if outer:  # the step clock moved past the probe, once (a callback's probe inside
                self._in_manual_probe = False  # it moved it twice: the second diff review)
                if self._clock is not None:
                    self._clock += time.perf_counter() - start

    def _diagnose(self, judged: bool) -> Diagnosis:
        """A probe's diagnosis, warm-started; without ``judged``, of the curvature alone."""
        return diagnose(
            self.model,
            self.loss_fn,
            self.probe_data,
            self.optimizer if judged else None,
            budget=self.budget,
            thresholds=self.thresholds,
            v0=self._start_vectors(),
            train_batches=self.train_batches,
            accumulation=self.accumulation,
            adaptive=self.adaptive,
            clip_factor=self._agreed_clip() if judged else None,
            progress_bar=False,  # inside the user's loop, under its own bar
            **self._measuring(),
        )

    def _probe(self, cause: str, update: float | None = None, judged: bool = True) -> Diagnosis:
        """A probe, for ``cause`` (one of runlog.PROBE_CAUSES), written to the log record and
        :attr:`probe_causes`; without ``judged``, of the curvature alone (no stability limit:
        an optimizer that has taken no step has none yet)."""
        start = time.perf_counter()
        self._check_clipping()
        self._check_stepping()
        d = self._diagnose(judged)
        norms, self._window = len(self._window), []  # the window's reported norms; a new one
        if update is not None:
            evidence = Evidence.from_mapping({**d.evidence, "update_curvature": update})
            state, reasons = classify(evidence, self.thresholds)
            d = Diagnosis(state, evidence, reasons, state.advice(evidence), d.confident, d.vectors)
        self._check_loss_scale(d.evidence["loss"])
        self._check_mode()
        self._agree_window()
        d = self._with_history(d)
        was_curvature_alone = self._curvature_alone
        self._agree_state(d)
        self._remember(d)
        previous = self.history[-1].state if self.history else None
        if self.history:  # only the last keeps its eigenvectors: every probe's 2n numbers were
            self.history[-1] = dataclasses.replace(self.history[-1], vectors={})  # kept (GPU)
        self.history.append(d)
        self.probe_steps.append(self.steps)
        self.probe_causes.append(cause)
        self._write(
            {
                "step": self.steps,
                "cause": cause,
                "state": d.state,
                "advice": d.advice,
                "reasons": d.reasons,
                "confident": d.confident,
                "train_mode": self.model.training,  # dropout and BatchNorm measured as in it
                **({"clip_norms": norms} if self.clipped else {}),
                **d.evidence,
                **self._updates_since_last_probe(),
            }
        )
        if self._writer is not None:
            for key, value in scalars(d).items():
                self._writer.add_scalar(f"curvscope/{key}", value, self.steps)
        try:
            if d.state != previous or (was_curvature_alone and not self._curvature_alone):
                self._said(d, previous)
        finally:  # (a callback that raised skipped these: the next step probed again, and the
            # probe's time was not counted: an outside review's fuzzing)
            self._last_probe_seconds = time.perf_counter() - start
            self.probe_seconds += self._last_probe_seconds
            self._plan()
            self._close_window(d)
        return d

    def _said(self, d: Diagnosis, previous: StateEnum | None) -> None:
        """A change of state, logged and handed to the callback: a run that went wrong is a
        warning, with why — every reason, the one that decided among them (it was INFO and the
        bare states — Python's default logging showed a diverged run nothing — and then the
        last reason alone, often a caveat: reviews)."""
        bad = d.state in (State.UNSTABLE, State.DIVERGED)
        level = logging.WARNING if bad else logging.INFO
        logger.log(level, "step %d: %s -> %s: %s", self.steps, previous, d.state, d.reasons_text)
        if self.callback is not None:
            self.callback(d, previous)

    def _agree_state(self, d: Diagnosis) -> None:
        """What later steps decide on (an early probe, a check's alarm): rank 0's verdict, and
        whether it is a curvature-only *diverged*. The training losses are the ranks' mean now
        (_agree_window), but a history rule may still read a fact of this rank's (whether its
        loss is the probe's full batch), and every rank must decide alike."""
        code, alone = _agreed(
            [float(d.state.code), float(self._diverged_by_curvature(d))], self.model, op="rank0"
        )
        self._state, self._curvature_alone = d.state, bool(alone)
        if int(code) != d.state.code:
            self._state = next((x for x in State if x.code == int(code)), d.state)

    def _remember(self, d: Diagnosis) -> None:
        """What the steps until the next probe read of this one: the sharpness's growth, the
        limit's factor, the sharpness and limit, the loss, the warm start."""
        self._remember_growth(d)
        self._probe_factor = self._limit_factor()  # inf at η = 0: any rate halves it
        self._probe_sharpness = (
            effective_sharpness(d.evidence),
            d.evidence.get("stability_limit"),
        )
        self._probe_loss = d.evidence["loss"] if math.isfinite(d.evidence["loss"]) else None
        if (
            self._trained_in is not None
            and self.full_batch is None
            and self._probe_loss is not None
        ):
            # either may match: a lower precision in the loss's graph is not always autocast
            # (a model that casts its logits to bfloat16 and back was taken for mini-batch
            # training: the diff review)
            # the probe data's loss as the loop computes its own, under autocast: the probe's
            # float32 loss differs from a bfloat16 forward's by up to 1.2%, as much as a
            # mini-batch's from the full batch's, and a healthy full-batch run under autocast
            # read *unstable* at 13 of 31 probes, its edge rules off (an outside review)
            self._probe_loss_as_trained = self._probe_data_loss(self._trained_in)
        if "top" in d.vectors:
            self._vectors = torch.stack([d.vectors["top"], d.vectors["bottom"]], dim=1)
            self._vector_names = tuple(d.evidence.get("layer_shares") or ())

    def _close_window(self, d: Diagnosis) -> None:
        """The training losses since the previous probe: their mean, the lowest mean and loss
        so far; a new window starts."""
        window = [v for v in self.losses[self._loss_mark :] if math.isfinite(v)]
        if window:
            if not self._window_means:
                self._first_window_diverged = (  # not a kink's curvature-only verdict,
                    d.state == State.DIVERGED and not self._curvature_alone  # which lowered
                )  # the explosion limit to the lucky first batch's (a review)
            self._window_means.append(sum(window) / len(window))
            low = math.inf if self._best_mean is None else self._best_mean  # (0.0 is a mean)
            self._best_mean = min(low, self._window_means[-1])
            self._low = min(window) if self._low is None else min(self._low, *window)
        self._loss_mark = len(self.losses)

    def _diverged_by_curvature(self, d: Diagnosis) -> bool:
        """Whether ``d`` says *diverged* on its curvature alone — not confident, its loss finite
        and not run away since the previous probe: an operation without a second derivative at
        the parameters (‖x‖ of a zero vector) reads so at every probe. The loss watch then stays
        on, and a confident *diverged* after it is said again (a model with such a kink read
        *diverged* from its first probe, and its real blow-up later went unprobed until the
        next planned probe, the callback silent: a review)."""
        return d.state == State.DIVERGED and not d.confident  # (see _with_history)

    def _check_stepping(self) -> None:
        """Warn, once, where the optimizer read took no step since the previous probe while
        the parameters changed (:class:`_StepWatch`): another one is training."""
        versions = sum(getattr(p, "_version", 0) for _, p in self._trainable())
        window = self.steps - (self.probe_steps[-1] if self.probe_steps else self._start)
        taken = self._stepping.steps - self._stepping.mark[0]
        watched = self._stepping.handle is not None and self._stepping.mark[1] is not None
        if watched and taken >= 1 and window >= max(4, 2 * taken) and not self._calls_said:
            self._calls_said = True  # (mon.step a micro-batch: an outside review)
            warnings.warn(
                f"mon.step was called {window} times since the previous probe, over {taken} "
                f"steps of {type(self.optimizer).__name__}: call it once per optimizer step, "
                "after optimizer.step(), with the step's loss (the mean of its micro-batches' "
                "losses; accumulation= says how many): the Monitor's steps, cadence and loss "
                "windows count its calls. (Steps a GradScaler skipped on overflow count as "
                "not taken: if that is all it is, ignore this.)",
                stacklevel=_callers_level(),
            )
        if self._stepping.stale(versions, window) and not self._stale_said:
            self._stale_said = True
            warnings.warn(
                f"{type(self.optimizer).__name__}, the optimizer this Monitor judges stability "
                f"by, took none of the {window} steps since the previous probe while the "
                "parameters changed: if your loop replaced it, set mon.optimizer = "
                "new_optimizer (until then the probes read the old one's rule and state)",
                stacklevel=_callers_level(),
            )

    def _first_mean(self) -> float | None:
        """The mean training loss of the first window between probes that had any, unless the
        probe that closed it said *diverged* (a blow-up's mean raised the explosion's limit
        for the rest of the run: a review)."""
        if not self._window_means or self._first_window_diverged:
            return None
        return self._window_means[0]

    def _check_loss_scale(self, probed: float) -> None:
        """Warn, once (at the first probe with a training loss to compare), when the losses
        passed to :meth:`step` are on another scale than the probe's own loss: a GradScaler's
        scaled loss (``scaler.scale(loss)``) was taken silently, and as the scale grew the
        divergence rules called a falling loss *diverged* (an outside review)."""
        if self._scale_checked or not self.losses:
            return
        self._scale_checked = True
        reported = self.losses[-1]
        if not (math.isfinite(reported) and math.isfinite(probed) and reported * probed > 0):
            return
        ratio = max(reported / probed, probed / reported)
        if ratio <= LOSS_SCALE_MISMATCH:
            return
        said = f"the training loss passed to mon.step ({reported:.4g}) is "
        if reported > probed:  # a GradScaler's scale is >= 1: its loss is the larger one
            said += (
                f"{ratio:.3g} times the loss the probe measured ({probed:.4g}): if it is a "
                "GradScaler's scaled loss, pass the loss itself (mon.step(loss), not "
                "scaler.scale(loss)) — the divergence rules read it"
            )
        else:  # it read "7.68e+03 times" for 1/7680, and named a GradScaler there was none
            said += (
                f"1/{ratio:.3g} of the loss the probe measured ({probed:.4g}): the loss rose "
                "that much since it was computed (a diverging step), or it is on another "
                "scale than the Monitor's loss_fn (a mean where that is a sum)"
            )
        warnings.warn(said, stacklevel=_callers_level())

    def _check_mode(self) -> None:
        """Warn, once, when a probe finds the model in eval mode: a loop that evaluates and
        forgets ``model.train()`` trains — and is measured — without dropout and with
        BatchNorm on its running statistics; the log's ``train_mode`` and the report said so,
        the run did not (an outside review)."""
        if self.model.training or self._eval_warned:
            return
        self._eval_warned = True
        warnings.warn(
            f"the model is in eval mode at this probe (step {self.steps}): the curvature is "
            "measured as the model is found — no dropout, BatchNorm on its running statistics; "
            "if training runs in train mode, call model.train() after evaluating",
            stacklevel=_callers_level(),
        )

    def _remember_growth(self, d: Diagnosis) -> None:
        """The sharpness's growth per step from the previous probe to this one (for the
        forecast; 1 when it grew by less than GROWTH_FLOOR — within what an adaptive probe
        resolves —, when either is unknown, and at the edge of stability, where the sharpness
        swings rather than grows)."""
        before = effective_sharpness(self.history[-1].evidence) if self.history else None
        now = effective_sharpness(d.evidence)
        since = self.steps - self.probe_steps[-1] if self.probe_steps else 0
        self._growth = 1.0
        if before is None or now is None or self._state == State.EDGE_OF_STABILITY:
            return
        if before > 0 and now > (1 + GROWTH_FLOOR) * before and since > 0:
            self._growth = (now / before) ** (1 / since)

    def _updates_since_last_probe(self) -> dict[str, Any]:
        new, self._updates_mark = self.updates[self._updates_mark :], len(self.updates)
        if not new:
            return {}
        return {"updates": [[step, c.curvature, c.top_curvature] for step, c in new]}

    def _agree_window(self) -> None:
        """Under torch.distributed each rank reports its own shard's losses, and the history's
        rules (diverged, a spike) read them: a rank whose shard spiked said *diverged* where
        the others said *learning* — its callback fired alone, and a loop that stops on it
        leaves the others waiting (an outside review). At a probe the losses since the previous
        one become their mean over the ranks, the training loss of the whole batch (two small
        collectives; a NaN on one rank reaches every rank)."""
        if _world_size() < 2:
            return
        window = self.losses[self._loss_mark :]
        (longest,) = _agreed([float(len(window))], self.model)
        n, k = int(longest), len(window)
        if n == 0:
            return
        pad = [0.0] * (n - k)
        summed = _agreed([*window, *pad, *[1.0] * k, *pad], self.model, "sum")
        pairs = zip(summed[:n], summed[n:], strict=True)
        means = [total / count for total, count in pairs if count > 0]
        self.losses[self._loss_mark :] = means
        if self.first_loss is None:  # the first finite mean is the run's start, on every rank
            self.first_loss = next((v for v in means if math.isfinite(v)), None)

    def _with_history(self, d: Diagnosis) -> Diagnosis:
        """The probe's diagnosis, refined by what only history shows. A *diverged* said on the
        curvature alone (not confident beside a finite loss: a NaN at a kink reads so) is
        confident where the losses ran away too, for both reasons."""
        if d.state == State.DIVERGED and not d.confident and math.isfinite(d.evidence["loss"]):
            state, reasons = self._history(State.LEARNING, d)  # as if the curvature said none
            if state != State.DIVERGED:
                return d
            return Diagnosis(state, d.evidence, [*reasons, *d.reasons], d.advice, True, d.vectors)
        state, reasons = self._history(d.state, d)
        if state == d.state:
            return d
        advice = state.advice(d.evidence)
        return Diagnosis(state, d.evidence, reasons, advice, d.confident, d.vectors)

    def _history(self, state: StateEnum, d: Diagnosis) -> tuple[StateEnum, list[str]]:
        """The state history makes of a probe that said ``state`` (``d``'s reasons and
        evidence)."""
        start = self._history_start()
        return classify_history(
            state,
            d.reasons,
            d.evidence,
            past=[h.evidence for h in self.history[start:]],
            losses=self.losses[self._loss_mark :],  # the losses since the previous probe
            first_loss=self.first_loss,
            previous=self.history[-1].state if self.history else None,
            best_loss=self._best_mean,
            first_mean=self._first_mean(),
            previous_low=self._low,
            full_batch=self.full_batch if self.full_batch is not None else self._seen_full_batch,
            thresholds=self.thresholds,
            steps=[*self.probe_steps[start:], self.steps],
        )

    def _history_start(self) -> int:
        """The first past probe the history rules can read: those within HISTORY_SPAN steps of
        this one, the one before them, and at least EOS_PROBES (every probe's evidence was
        handed over, a list rebuilt at each probe: 12 ms a probe after 100,000, and the run's
        cost growing with their square — a review)."""
        steps, start = self.probe_steps, len(self.probe_steps)
        while start > 0 and (
            self.steps - steps[start - 1] < HISTORY_SPAN or len(steps) - start < EOS_PROBES
        ):
            start -= 1
        return max(start - 1, 0)

    # ---------------------------------------------------------------------------- log
    def _write(self, record: dict[str, Any]) -> None:
        if self._log is None:
            return
        if not self._log.closed:
            self._log.write(record)  # never raises OSError: a failed write is counted
            return
        # a probe after close(): lost, and said once (they were dropped unsaid, records_lost 0)
        self._after_close += 1
        if self._after_close == 1:
            warnings.warn(
                f"the Monitor's run log is closed (close(), or the end of its with block): the "
                f"probe record of step {record.get('step')} and any later one are not written "
                "(counted in records_lost); keep the training loop inside the with block, or "
                "call close() after it",
                stacklevel=_callers_level(),
            )

    @property
    def records_lost(self) -> int:
        """Probe records that could not be written to the run log (e.g. disk full), and those
        of probes after :meth:`close`."""
        return 0 if self._log is None else self._log.lost + self._after_close

    def close(self) -> None:
        """Close the run log (if the Monitor opened it: this releases its lock; warns if
        records were lost) and TensorBoard's writer (if the Monitor made it from a directory;
        yours is flushed), and take the Monitor's hook off the optimizer. Probes after closing
        are not logged: the first such probe warns, and each counts in
        :attr:`records_lost`."""
        self._end_watch()
        self._stepping.remove()
        if self._log is not None:
            self._log.close()
        if self._writer is not None and self._own_writer:
            self._writer.close()
            self._writer = None
        elif self._writer is not None:
            self._writer.flush()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _callers_level() -> int:
    """The ``stacklevel`` of the first frame outside curvscope's diagnosis package, for a
    warning issued from one of its functions (a probe is reached by several paths)."""
    return callers_level(os.path.dirname(os.path.abspath(__file__)), 2)


#: A training loss this many times the probe's own (or its inverse) is on another scale.
LOSS_SCALE_MISMATCH = 100.0


def _lowest_precision(loss: Tensor, nodes: int = 64) -> torch.dtype | None:
    """The lowest-precision real floating dtype among the tensors of the loss's graph near its
    top (its first ``nodes`` nodes, read off their input metadata), or None where this torch
    does not say."""
    lowest: torch.dtype | None = None
    queue: list[Any] = [loss.grad_fn]
    seen = 0
    while queue and seen < nodes:
        node = queue.pop(0)
        seen += 1
        for meta in getattr(node, "_input_metadata", ()):
            dtype = getattr(meta, "dtype", None)
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                continue
            if dtype.is_complex:
                continue
            if lowest is None or torch.finfo(dtype).eps > torch.finfo(lowest).eps:
                lowest = dtype
        queue += [child for child, _ in node.next_functions if child is not None]
    return lowest


def _scalar_loss(
    loss: Tensor | float,
    what: str = "the training loss",
    fix: str = "reduce it (loss.mean()), as the optimizer's loss is",
) -> float:
    """The training loss (or another number, ``what``) :meth:`Monitor.step` records, refused
    with the fix when it is not one number (a per-sample vector raised torch's "only one element
    tensors" before)."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"mon.step expects {what} as one number, got a tensor of shape "
                f"{tuple(loss.shape)}: {fix}"
            )
        return float(loss.item())  # (a third of float(loss.detach())'s time, every step)
    if isinstance(loss, np.ndarray) and loss.size == 1:  # a 0-d array, numpy's float
        return float(loss.reshape(()))
    if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        raise TypeError(
            f"mon.step expects {what} (a scalar tensor or a number), got {type(loss).__name__}"
        )
    return float(loss)


def _checked_max_norm(value: object) -> float | None:
    """``max_grad_norm``: None, or a positive number (inf: the norm is measured, never
    clipped — ``clip_grad_norm_``'s idiom, which :func:`check_real` would refuse)."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value == math.inf:
        return math.inf
    return check_real(value, "max_grad_norm", minimum=0, exclusive=True)


def _check_cadence(every: object, update_every: object, overhead: object, forecast: object) -> None:
    """The Monitor's cadence arguments, each refused with what it must be."""
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"every must be a positive integer (steps) or None, got {every!r}")
    if update_every is not None:
        check_int(update_every, "update_every", minimum=0)
    if every is not None and every < 3 and update_every:  # (every checked above)
        # a check copies the parameters at one step and compares at the next: two steps
        # between probes, which every=2 never leaves (it ran none, silently: an outside review)
        raise ValueError(
            f"update_every={update_every} with every={every}: a cheap-tier check takes two "
            f"steps between probes (a copy, then the comparison), and every={every} leaves at "
            f"most {every - 1} step between two probes, so no check would ever run; pass "
            "every=3 or more, or update_every=0 (no cheap tier)"
        )
    if not isinstance(overhead, (int, float)) or not 0 < overhead < 1:
        raise ValueError(f"overhead must be a fraction in (0, 1), got {overhead!r}")
    if not isinstance(forecast, bool):
        raise TypeError(f"forecast must be True or False, got {forecast!r}")


def scalars(d: Diagnosis) -> dict[str, float]:
    """The numbers of a diagnosis worth plotting over training (finite ones only), and the
    state as its ``code`` (append-only: a code keeps its meaning across versions)."""
    out = {"state_code": float(d.state.code)}
    for key in (
        "loss",
        "grad_norm",
        "sharpness",
        "lambda_min",
        "stability_limit",
        "clip_factor",
        "batch_sharpness",
        "update_curvature",
        "directional_curvature",
        "newton_decrement",
        "matvecs",
    ):
        value = d.evidence.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def _world_size() -> int:
    """The number of torch.distributed ranks (1 without a process group)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _agreed(values: list[float], model: nn.Module, op: str = "max") -> list[float]:
    """``values`` as every rank sees them under torch.distributed: their maximum over the
    ranks (``op="max"``, one all-reduce), their sum (``"sum"``) or rank 0's (``op="rank0"``,
    one broadcast); on the model's device for NCCL. As given in a single process."""
    if _world_size() < 2:
        return values
    world = torch.distributed.group.WORLD
    device = collective_device(world, first_device(model))
    t = torch.tensor(values, dtype=torch.float64, device=device)
    agree = {"rank0": from_first_rank, "sum": all_reduce_sum}.get(op, all_reduce_max)
    return [float(v) for v in agree(t, world).tolist()]


def _version() -> str:
    from curvscope import __version__

    return __version__
