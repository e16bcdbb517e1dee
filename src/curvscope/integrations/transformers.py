"""A Hugging Face ``TrainerCallback`` that runs a :class:`curvscope.Monitor` during training."""

from __future__ import annotations

import math
from typing import Any

import torch

from curvscope.derivatives.objective import REENTRANT_CHECKPOINT
from curvscope.diagnosis.monitor import Monitor, scalars
from curvscope.integrations._monitor import start_monitor

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "curvscope.integrations.transformers needs transformers: pip install transformers"
    ) from e


class CurvscopeTrainerCallback(TrainerCallback):
    """Diagnose a ``transformers.Trainer`` run.

    The Monitor is built at ``on_train_begin`` on the Trainer's model and optimizer, records a
    step at every optimizer step, and probes on its cadence. The loss reaches it as the
    Trainer logs it (every ``logging_steps``: the mean of that window): a step the Trainer is
    about to log is recorded at its ``on_log``, with that loss, the others at ``on_step_end``
    with none (a callback does not see each step's loss; the logged loss reached the Monitor
    one step late before). The diagnosis goes into the Trainer's log history as
    ``curvscope/...`` entries at each probe, with ``curvscope/preconditioned`` saying which
    sharpness the record holds: 1 for that of the preconditioned curvature P^-½ H P^-½ (Adam's,
    once it has stepped), 0 for that of H itself (plain SGD, or a learning rate scheduled to 0,
    where there is no step to judge and "learning rate 0: no stability limit" is said).
    The Trainer clips the gradient's norm to ``args.max_grad_norm`` (1.0 by default): the
    Monitor is given it, and the norm before clipping as the Trainer logs it (``grad_norm``,
    with the loss), so that the probes judge the steps by the rate the clipped steps took: log
    at least as often as the Monitor probes for a current clip factor.

    Args:
        loss_fn: ``None`` (the model's own loss, as the Trainer trains it: causal and masked
            LMs averaged over the target tokens of all of ``probe_data``, classifiers over the
            samples), or ``loss_fn(model(**inputs), labels)`` — e.g. cross-entropy on
            ``output.logits``; any model output works for the Hessian.
        probe_data: the batches the curvature is measured on: dict batches as a data collator
            makes them (``input_ids``, ``attention_mask``, ``labels``; ``pixel_values`` and
            ``labels``), ({input_ids, attention_mask, ...}, labels) pairs, or a list of either.
            Draw them once (a collator that masks tokens at random would change them).
        **monitor_kwargs: passed to :class:`~curvscope.Monitor`.

    Example (``model``, ``args``, ``train`` and ``probe_batches`` are yours)::

        callback = CurvscopeTrainerCallback(None, probe_batches, every=50, log="run.jsonl")
        Trainer(model=model, args=args, train_dataset=train, callbacks=[callback]).train()
        callback.monitor.last.state
    """

    def __init__(self, loss_fn: Any, probe_data: Any, **monitor_kwargs: Any) -> None:
        self.loss_fn, self.probe_data, self.kwargs = loss_fn, probe_data, monitor_kwargs
        self.monitor: Monitor | None = None
        self._deferred = False  # a step waiting for the Trainer's log of it
        self._late: Any = None  # a training log that came after its step was recorded

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if _checkpoints_reentrantly(model):  # refused now, not at the first probe, steps later
            raise RuntimeError(REENTRANT_CHECKPOINT)
        if self.loss_fn is None:  # refused now, not at the first probe, steps later
            _refuse_another_trained_loss(args, model)
        monitor_kwargs = dict(self.kwargs)
        clip: float | None = getattr(args, "max_grad_norm", None)
        if clip is not None and not 0 < clip < math.inf:  # the Trainer clips only then
            clip = None
        monitor_kwargs.setdefault("start_step", state.global_step)  # a resumed run goes on
        # a step's batch is the micro-batches it accumulates (judged at one before: a review)
        k = getattr(args, "gradient_accumulation_steps", 1)
        if isinstance(k, int) and k > 1:
            monitor_kwargs.setdefault("accumulation", k)
        # (a run that raised: the Trainer calls no callback then, and a retried train() with
        # the same log was refused: its Monitor is closed there)
        self.monitor = start_monitor(
            model,
            self.loss_fn,
            self.probe_data,
            optimizer,
            monitor_kwargs,
            self.monitor,
            None if clip is None else float(clip),
            torch.bfloat16
            if getattr(args, "bf16", False)
            else (torch.float16 if getattr(args, "fp16", False) else None),
        )
        if not _logs_every_step(args):  # the first logged loss is a window's mean, not the start
            self.monitor.measure_first_loss()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        self._flush(state)  # a step whose log never came
        if control.should_log:  # the Trainer logs this step next (on_log): step with its log
            self._deferred = True
            return
        self._step(state)  # between logs: no loss, no norm (but one logged late)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs:  # not a training log (an evaluation's)
            return
        # a log after its step was recorded (logging_strategy="epoch", whose log comes at
        # on_epoch_end; another callback's should_log) reaches the next step
        if self._deferred:
            self._deferred = False
            self._step(state, logs)
        else:
            self._late = logs

    def _flush(self, state: Any) -> None:
        if self._deferred:
            self._deferred = False
            self._step(state)

    def _step(self, state: Any, logs: Any = None) -> None:
        """One Monitor step: the logged loss (the mean of its logging window) and, for a
        clipped run, the logged norm before clipping — at the step they were logged, or at the
        next one for a log that came after its step."""
        assert self.monitor is not None
        logs, self._late = logs or self._late, None
        loss = None if logs is None else float(logs["loss"])
        norm = logs.get("grad_norm") if logs is not None and self.monitor.clipped else None
        d = self.monitor.step(loss, grad_norm=None if norm is None else float(norm))
        if d is not None:
            record = {f"curvscope/{k}": v for k, v in scalars(d).items()}
            record["curvscope/preconditioned"] = float(bool(d.evidence.get("preconditioned")))
            state.log_history.append({"step": state.global_step, **record})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self._flush(state)
            self.monitor.close()


def _refuse_another_trained_loss(args: Any, model: Any) -> None:
    """Refuse ``loss_fn=None`` (the model's own loss, taken from the logits) where the Trainer
    trains another: a label-smoothed one, or a mixture of experts' with its routers' term."""
    smoothing = getattr(args, "label_smoothing_factor", 0) or 0
    if smoothing > 0:
        raise ValueError(
            f"the Trainer trains a label-smoothed loss (label_smoothing_factor={smoothing:g}), "
            "computed outside the model, and loss_fn=None measures the model's own loss, "
            "unsmoothed: another loss's curvature (a tiny GPT-2 read sharpness 3.99 where "
            "the trained loss had 2.79, against a limit of 4: an outside review). Pass the "
            "loss the Trainer trains as loss_fn(output, labels), or train without smoothing"
        )
    if getattr(getattr(model, "config", None), "output_router_logits", False):
        raise ValueError(
            "the Trainer trains the model's own loss, which with output_router_logits=True "
            "adds router_aux_loss_coef times the routers' load-balancing loss (a mixture of "
            "experts: Mixtral, Qwen-MoE), and loss_fn=None takes the loss from the logits "
            "alone. Pass the loss the Trainer trains: loss_fn=lambda out, labels: "
            "F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()) + "
            "model.config.router_aux_loss_coef * out.aux_loss for a causal LM; or train "
            "with output_router_logits=False"
        )


def _checkpoints_reentrantly(model: Any) -> bool:
    """Whether Hugging Face's gradient checkpointing is on in ``model`` with torch's reentrant
    kind: a module's ``gradient_checkpointing`` flag set and its checkpoint function a
    ``functools.partial`` of torch's whose ``use_reentrant`` is True or left out (torch's
    default then). A function of another make is left to the first probe's own check."""
    for module in model.modules() if model is not None else ():
        if getattr(module, "gradient_checkpointing", False) is not True:
            continue
        keywords = getattr(getattr(module, "_gradient_checkpointing_func", None), "keywords", None)
        if isinstance(keywords, dict) and keywords.get("use_reentrant", True) is not False:
            return True
    return False


def _logs_every_step(args: Any) -> bool:
    """Whether the Trainer logs the training loss at every step (then the first logged loss is
    the first step's, as a plain loop reports it)."""
    strategy = getattr(args, "logging_strategy", "steps")
    strategy = str(getattr(strategy, "value", strategy))  # an IntervalStrategy, or a string
    return strategy == "steps" and getattr(args, "logging_steps", 1) == 1
