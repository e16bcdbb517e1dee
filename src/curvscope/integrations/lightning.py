"""A PyTorch Lightning ``Callback`` that runs a :class:`curvscope.Monitor` during ``fit``."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from curvscope.diagnosis.monitor import Monitor, scalars
from curvscope.integrations._monitor import start_monitor

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise ImportError(
        "curvscope.integrations.lightning needs PyTorch Lightning: pip install lightning"
    ) from e


class CurvscopeCallback(Callback):
    """Diagnose a LightningModule as it trains.

    At the start of ``fit`` it builds a :class:`~curvscope.Monitor` on the module and the
    trainer's first optimizer; after every optimizer step (under ``accumulate_grad_batches``,
    every so many batches) it records the step with the mean loss of its batches, and at each
    probe it logs the sharpness, stability limit and state code through ``pl_module.log``
    (``curvscope/...``; ``state_code`` is the state's
    :attr:`~curvscope.diagnosis.State.code`, append-only: a code keeps its meaning). A trainer
    that clips the gradient's norm (``gradient_clip_val`` with the default
    ``gradient_clip_algorithm="norm"``) gives the Monitor its ``max_grad_norm`` and, before
    each optimizer step (``on_before_optimizer_step``, before Lightning clips), the norm of the
    optimizer's gradients: the probes judge the steps by the rate the clipped steps took. The
    norm is of the gradients each rank holds: the whole gradient under DDP, a shard under FSDP
    (where the probes take rank 0's clip factor, that of its shard, not the whole gradient's).

    Args:
        loss_fn: ``loss_fn(pl_module(inputs), targets)``, the batch-mean loss.
        probe_data: an (inputs, targets) pair or batches the curvature is measured on.
        **monitor_kwargs: passed to :class:`~curvscope.Monitor` (``every``, ``log``, ...).

    Example (a sketch; ``module``, ``loss_fn`` and ``probe`` are yours)::

        callback = CurvscopeCallback(loss_fn, probe)
        lightning.Trainer(callbacks=[callback]).fit(module)
        callback.monitor.last.state
    """

    def __init__(self, loss_fn: Any, probe_data: Any, **monitor_kwargs: Any) -> None:
        super().__init__()
        self.loss_fn, self.probe_data, self.kwargs = loss_fn, probe_data, monitor_kwargs
        self.monitor: Monitor | None = None
        self._step = 0  # the trainer's optimizer steps the Monitor has seen
        self._pending: list[Any] = []  # the micro-batch losses since the last optimizer step
        self._norm: torch.Tensor | None = None  # the gradient's norm before clipping

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        kwargs = dict(self.kwargs)
        kwargs.setdefault("start_step", trainer.global_step)  # a resumed run goes on
        # a step's batch is the micro-batches it accumulates (judged at one before: a review)
        k = getattr(trainer, "accumulate_grad_batches", 1)
        if isinstance(k, int) and k > 1:
            kwargs.setdefault("accumulation", k)
        # the probe data in the module's precision, as Lightning converts each batch it feeds
        # ("bf16-true", "64-true": the first probe raised torch's bare dtype error, ending
        # fit(): an outside review); "-mixed" precisions convert nothing
        convert = getattr(getattr(trainer, "precision_plugin", None), "convert_input", None)
        probe = convert(self.probe_data) if callable(convert) else self.probe_data
        # (a run that raised never reached on_train_end: its Monitor is closed there)
        self.monitor = start_monitor(
            pl_module,
            self.loss_fn,
            probe,
            optimizer,
            kwargs,
            self.monitor,
            _norm_clipping(trainer),
            _MIXED.get(str(getattr(trainer, "precision", ""))),
        )
        self._step, self._pending, self._norm = trainer.global_step, [], None

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """The norm of the gradients Lightning is about to clip (of ``optimizer``'s
        parameters, as its clipping takes them), when the Monitor was told the clipping."""
        if self.monitor is None or not self.monitor.clipped:
            return
        grads = [
            p.grad.detach()
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if grads:  # kept on its device: read at the Monitor's step, with the loss
            self._norm = _total_norm(grads)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:  # kept on its device: read once an optimizer step is done
            loss = loss.detach() if hasattr(loss, "detach") else loss
            # Lightning hands on the loss it backpropagates: under automatic optimization the
            # training step's divided by accumulate_grad_batches (the Monitor got 1/4 of the
            # mean loss at 4, and warned of a diverging step at 128: an outside review)
            if getattr(pl_module, "automatic_optimization", True):
                loss = loss * getattr(trainer, "accumulate_grad_batches", 1)
            self._pending.append(loss)
        if trainer.global_step == self._step:  # accumulating gradients: no optimizer step yet
            return
        self._step = trainer.global_step
        pending, self._pending = self._pending, []
        # one Monitor step per optimizer step, with the mean loss of its micro-batches
        norm, self._norm = self._norm, None
        d = self.monitor.step(
            float(sum(pending)) / len(pending) if pending else None, grad_norm=norm
        )
        if d is not None:
            for key, value in scalars(d).items():
                pl_module.log(f"curvscope/{key}", value, on_step=True, on_epoch=False)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """A run that raised closes its Monitor: its log stayed locked, and a retried fit()
        with the same log raised LogInUseError (a review)."""
        if self.monitor is not None:
            self.monitor.close()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()


#: Lightning's mixed precisions: the autocast dtype of the forward
_MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all of ``grads``, as ``clip_grad_norm_`` computes it (torch's fused
    ``get_total_norm`` where it has one, from torch 2.6)."""
    total = getattr(torch.nn.utils, "get_total_norm", None)
    if total is not None:
        return total(grads)
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g).float() for g in grads])
    )


def _norm_clipping(trainer: Any) -> float | None:
    """The norm a trainer clips the gradient to (``gradient_clip_val`` with the "norm"
    algorithm), or None (no clipping, or an infinite norm: none); clipping by value is said
    in a warning: it is not modelled."""
    value = getattr(trainer, "gradient_clip_val", None)
    if not value or not 0 < float(value) < math.inf:
        return None
    algorithm = getattr(trainer, "gradient_clip_algorithm", None) or "norm"
    algorithm = str(getattr(algorithm, "value", algorithm))  # Lightning's enum, or a string
    if not algorithm.lower().endswith("norm"):
        warnings.warn(
            f"the trainer clips gradients by value ({algorithm}, {value:g}): curvscope models "
            "clipping by norm only, so the probes judge the steps as unclipped",
            stacklevel=2,
        )
        return None
    return float(value)
