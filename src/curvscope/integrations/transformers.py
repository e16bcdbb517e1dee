"""A Hugging Face ``TrainerCallback`` that runs a :class:`curvscope.Monitor` during training."""

from __future__ import annotations

from typing import Any

from curvscope.diagnosis.monitor import Monitor, scalars

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "curvscope.integrations.transformers needs transformers: pip install transformers"
    ) from e


class CurvscopeTrainerCallback(TrainerCallback):
    """Diagnose a ``transformers.Trainer`` run.

    The Monitor is built at ``on_train_begin`` on the Trainer's model and optimizer, records a
    step at every ``on_step_end`` (the loss the Trainer logs arrives through ``on_log``), and
    probes on its cadence. The diagnosis goes into the Trainer's log history as
    ``curvscope/...`` entries at each probe.

    Args:
        loss_fn: ``loss_fn(model(**inputs), targets)`` — e.g. cross-entropy on
            ``output.logits``; any model output works for the Hessian.
        probe_data: an ({input_ids, attention_mask, ...}, targets) pair, or a list of them.
        **monitor_kwargs: passed to :class:`~curvscope.Monitor`.
    """

    def __init__(self, loss_fn: Any, probe_data: Any, **monitor_kwargs: Any) -> None:
        self.loss_fn, self.probe_data, self.kwargs = loss_fn, probe_data, monitor_kwargs
        self.monitor: Monitor | None = None
        self._loss: float | None = None

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        self.monitor = Monitor(
            model, self.loss_fn, self.probe_data, optimizer=optimizer, **self.kwargs
        )

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self._loss = float(logs["loss"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        d = self.monitor.step(self._loss)
        if d is not None:
            state.log_history.append(
                {"step": state.global_step, **{f"curvscope/{k}": v for k, v in scalars(d).items()}}
            )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()
