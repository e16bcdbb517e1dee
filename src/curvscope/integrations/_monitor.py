"""What both training-framework callbacks do alike when training starts: the Monitor built."""

from __future__ import annotations

import os
from typing import Any

import torch

from curvscope.diagnosis.monitor import Monitor


def start_monitor(
    model: Any,
    loss_fn: Any,
    probe_data: Any,
    optimizer: Any,
    kwargs: dict[str, Any],
    previous: Monitor | None,
    clip: float | None = None,
    mixed: torch.dtype | None = None,
) -> Monitor:
    """The Monitor of a run starting, on the trainer's ``optimizer`` and the callback's
    ``kwargs`` (the trainer's other settings already defaulted into them); ``clip``: the norm
    the trainer clips the gradient to, the Monitor's ``max_grad_norm`` unless given — where
    there are steps it clips (an optimizer, or ``lr=``). ``mixed``: the autocast dtype the
    trainer's precision runs the forward in — the Monitor reads it off the loss's graph, and a
    callback hands it floats (:meth:`Monitor.step`'s full-batch test).

    - ``optimizer=`` among the callback's own keywords is yours: ``None`` reads the curvature
      alone (the refusal of an optimizer no stability rule covers — Adafactor, NAdam — names
      it, and through a callback both fixes it names failed: ``optimizer=None`` was a second
      value for the keyword, ``lr=`` a second rate; an outside review). ``lr=`` judges the
      steps as plain gradient descent at that rate, without the trainer's optimizer.
    - ``previous``: the Monitor of an earlier run of the same callback, closed here if still
      open (a run that raised: no framework calls an end hook then). A retry writes on in the
      log that run opened, as a new run appended to it: the default ``log_mode="x"`` refused
      the file the first attempt had made (an outside review).
    """
    kwargs = dict(kwargs)
    if previous is not None:
        previous.close()
        log = kwargs.get("log")
        if (
            isinstance(log, (str, os.PathLike))
            and kwargs.get("log_mode", "x") == "x"
            and previous._log_path == os.path.abspath(log)
        ):
            kwargs["log_mode"] = "a"
    if "optimizer" in kwargs or "lr" in kwargs:
        optimizer = kwargs.pop("optimizer", None)
    if clip is not None and (optimizer is not None or kwargs.get("lr") is not None):
        kwargs.setdefault("max_grad_norm", clip)
    monitor = Monitor(model, loss_fn, probe_data, optimizer=optimizer, **kwargs)
    if mixed is not None:
        monitor.trained_in(mixed)
    return monitor
