"""The model objective: the mean loss of ``loss_fn(model(inputs), targets)`` over a dataset, as a
function of (a subset of) the parameters — evaluated without touching the user's model.

Every forward pass goes through ``torch.func.functional_call`` with parameter tensors of our
own, so the user's parameters, ``.grad`` buffers and ``requires_grad`` flags are never written.
The rest of the model's state is protected as follows:

- **training flag**: never switched; the curvature is that of the mode the model is in.
- **BatchNorm in train mode** normalises with batch statistics (that *is* the training loss)
  but its running statistics are not passed in, so they are not updated; other buffers are
  passed as copies, so an in-place update lands on the copy.
- **randomness** (dropout): each batch is evaluated under a fixed seed derived from the
  operator's seed and the batch index, inside ``torch.random.fork_rng``, so every product sees
  the same mask (the operator is a fixed linear map) and the global RNG is left as found.
- **fused kernels without second derivatives**: scaled-dot-product attention runs on its math
  backend and cuDNN is disabled during our forward passes, so double backward and forward-mode
  AD work through transformers and RNNs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvscope.derivatives._checks import check_scalar_loss

logger = logging.getLogger(__name__)

#: Running-statistics buffers of normalisation layers; not passed in train mode (so not updated).
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")
_SEED_STRIDE = 1_000_003  # decorrelates the per-batch seeds of nearby base seeds


@dataclass(frozen=True)
class Batch:
    """One (inputs, targets) pair, moved to the parameters' device, and its place in the data."""

    index: int
    inputs: Any
    targets: Tensor
    size: int


def _is_pair(data: object) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _tensors(x: Any) -> Iterator[Tensor]:
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)


def select_parameters(
    model: nn.Module, params: Iterable[nn.Parameter | str] | None
) -> dict[str, Tensor]:
    """Name → parameter for the parameters the curvature is taken with respect to.

    ``params=None`` selects every parameter that requires grad (tied weights once). Otherwise a
    list of parameters or of names from ``model.named_parameters()``.
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen = {k: p for k, p in named.items() if p.requires_grad}
        if not chosen:
            raise ValueError(
                "the model has no parameter that requires grad, so there is no curvature to "
                "measure; unfreeze some (p.requires_grad_(True)) or pass params=[...]"
            )
        return chosen
    if isinstance(params, (str, Tensor)):
        params = [params]
    by_id = {id(p): k for k, p in named.items()}
    chosen = {}
    for p in params:
        if isinstance(p, str):
            if p not in named:
                raise ValueError(
                    f"params: the model has no parameter named {p!r}; valid names: "
                    + ", ".join(named)
                )
            name = p
        elif isinstance(p, Tensor):
            if id(p) not in by_id:
                raise ValueError(
                    "params: a tensor of shape "
                    f"{tuple(p.shape)} is not a parameter of this model; pass parameters from "
                    "model.parameters() or names from model.named_parameters()"
                )
            name = by_id[id(p)]
        else:
            raise TypeError(
                f"params: expected parameters or parameter names, got {type(p).__name__}"
            )
        if not named[name].requires_grad:
            raise ValueError(
                f"params: parameter {name!r} does not require grad; call "
                f"requires_grad_(True) on it or leave it out of params"
            )
        chosen[name] = named[name]
    if not chosen:
        raise ValueError("params is empty: select at least one parameter, or pass params=None")
    return chosen


class ModelObjective:
    """Evaluates ``loss_fn(model(inputs), targets)`` per batch at parameters given as a dict.

    Args:
        model: the user's module (never modified).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch-mean loss.
        data: an ``(inputs, targets)`` pair, a list of pairs, or a re-iterable of pairs (a
            ``DataLoader``). ``inputs`` may be a tensor, a tuple (positional arguments) or a dict
            (keyword arguments); ``targets`` is a tensor whose first dimension counts samples.
        params: the parameters to differentiate (see :func:`select_parameters`).
        seed: base seed of the per-batch randomness (dropout).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        params: Iterable[nn.Parameter | str] | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # never trigger DDP's gradient hooks
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected model to be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(
                f"expected loss_fn to be callable as loss_fn(outputs, targets), "
                f"got {type(loss_fn).__name__}"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.seed = int(seed)
        self.params = select_parameters(model, params)
        first = next(iter(self.params.values()))
        self.device, self.dtype = first.device, first.dtype
        for name, p in self.params.items():
            if p.dtype != self.dtype or p.device != self.device:
                raise TypeError(
                    f"all selected parameters must share one dtype and device; {name!r} is "
                    f"{p.dtype} on {p.device}, others {self.dtype} on {self.device}; "
                    "convert the model with model.to(...) or select a uniform subset with params="
                )
        self.names = list(self.params)
        self.shapes = [p.shape for p in self.params.values()]
        self.numels = [p.numel() for p in self.params.values()]
        self.num_params = sum(self.numels)
        selected = {id(p) for p in self.params.values()}
        self._frozen_names = [k for k, p in model.named_parameters() if id(p) not in selected]
        self._data = self._normalise_data(data)
        self.in_memory = isinstance(self._data, list)
        self.num_batches, self.num_samples = self._count()
        self.notes = self._fallback_notes()
        self._loss_checked = False
        #: how loss_fn reduces over the samples of a batch: "mean" or "sum" (the curvature is
        #: then that of the mean over all the data, or of the sum); settled by the first loss
        self.reduction: str = "mean"

    # ----------------------------------------------------------------------------- data
    @staticmethod
    def _normalise_data(data: Any) -> Any:
        if _is_pair(data):
            return [tuple(data)]
        if isinstance(data, Sequence) and not isinstance(data, (str, bytes, Tensor)):
            return list(data)
        if isinstance(data, Iterable):
            if iter(data) is data:
                raise TypeError(
                    "data is a one-shot iterator (a generator?): a curvature operator passes "
                    "over the data once per product; pass a list of (inputs, targets) pairs or "
                    "a DataLoader"
                )
            return data
        raise TypeError(
            "expected data to be an (inputs, targets) pair or an iterable of such pairs "
            f"(a list, a DataLoader), got {type(data).__name__}"
        )

    def _raw_batches(self) -> Iterator[tuple[int, Any, Tensor]]:
        for i, item in enumerate(self._data):
            if not _is_pair(item):
                raise TypeError(
                    f"batch {i} of data is not an (inputs, targets) pair with a tensor of "
                    f"targets (got {type(item).__name__}); a DataLoader over a TensorDataset "
                    "of (inputs, targets) gives such pairs"
                )
            yield i, item[0], item[1]

    def _count(self) -> tuple[int, int]:
        batches = samples = 0
        for i, inputs, targets in self._raw_batches():
            if targets.ndim == 0 or targets.shape[0] == 0:
                raise ValueError(
                    f"batch {i} has no samples (targets of shape {tuple(targets.shape)}); "
                    "the first dimension of the targets counts the samples"
                )
            for t in (*_tensors(inputs), targets):
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise ValueError(
                        f"batch {i} of data contains NaN or Inf; clean the data (e.g. "
                        "torch.nan_to_num) or drop those samples"
                    )
            batches += 1
            samples += targets.shape[0]
        if batches == 0:
            raise ValueError(
                "data is empty: the curvature of the mean loss needs at least one "
                "(inputs, targets) batch"
            )
        return batches, samples

    def batches(self) -> Iterator[Batch]:
        """The batches on the parameters' device; raises if the data changed since construction."""
        seen = 0
        for i, inputs, targets in self._raw_batches():
            n = targets.shape[0]
            seen += n
            yield Batch(i, _to_device(inputs, self.device), targets.to(self.device), n)
        if seen != self.num_samples:
            raise RuntimeError(
                f"the data yielded {seen} samples but {self.num_samples} when the operator was "
                "built; a curvature operator needs the same data on every pass (no "
                "drop_last with shuffling, no growing datasets)"
            )

    # -------------------------------------------------------------------------- forward
    def leaves(self) -> dict[str, Tensor]:
        """Fresh differentiable copies (sharing storage) of the selected parameters."""
        return {k: p.detach().requires_grad_(True) for k, p in self.params.items()}

    def versions(self) -> tuple[int, ...]:
        """In-place versions of the selected parameters: they change when an optimizer steps."""
        return tuple(p._version for p in self.params.values())

    def _state(self, theta: Mapping[str, Tensor]) -> dict[str, Tensor | None]:
        named = dict(self.model.named_parameters())
        state: dict[str, Tensor | None] = dict(theta)
        for k in self._frozen_names:
            state[k] = named[k].detach()
        for mod_name, mod in self.model.named_modules():
            is_norm_train = isinstance(mod, nn.modules.batchnorm._NormBase) and mod.training
            for b_name, b in mod.named_buffers(recurse=False):
                key = f"{mod_name}.{b_name}" if mod_name else b_name
                if is_norm_train and b_name in _RUNNING_STATS:
                    state[key] = None  # batch statistics are used, nothing is updated
                else:
                    state[key] = None if b is None else b.clone()
        return state

    @contextlib.contextmanager
    def context(self, batch_index: int) -> Iterator[None]:
        """Fixed randomness per batch, global RNG restored, differentiable kernels."""
        devices = [self.device] if self.device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=devices),
            sdpa_kernel([SDPBackend.MATH]),
            torch.backends.cudnn.flags(enabled=False),
            torch.enable_grad(),
        ):
            torch.manual_seed(self.seed * _SEED_STRIDE + batch_index)
            yield

    def raw_forward(self, theta: Mapping[str, Tensor], batch: Batch) -> Any:
        """Model outputs at parameters ``theta``, unchecked (usable inside torch.func
        transforms); call inside :meth:`context`."""
        inputs = batch.inputs
        state = self._state(theta)
        if isinstance(inputs, Mapping):
            return functional_call(self.model, state, (), dict(inputs))
        if isinstance(inputs, (tuple, list)):
            return functional_call(self.model, state, tuple(inputs))
        return functional_call(self.model, state, (inputs,))

    def forward(self, theta: Mapping[str, Tensor], batch: Batch, tensor: bool = False) -> Any:
        """Model outputs at parameters ``theta``, checked; call inside :meth:`context`.

        Any output the loss accepts will do for the Hessian (e.g. a Hugging Face
        ``ModelOutput``); ``tensor=True`` demands a tensor, as the Gauss-Newton kinds need.
        """
        out = self.raw_forward(theta, batch)
        if not isinstance(out, Tensor):
            if tensor:
                raise TypeError(
                    f"the model returned {type(out).__name__}; the Gauss-Newton and Fisher "
                    "kinds need a tensor of outputs: wrap the model so that it returns the "
                    "tensor the loss is computed from (kind='hessian' takes any output)"
                )
            return out
        if not out.requires_grad:
            raise ValueError(
                "the model's outputs do not depend on the selected parameters; check params= "
                "(and that the forward pass does not detach or run under torch.no_grad)"
            )
        return out

    def loss(self, out: Tensor, batch: Batch) -> Tensor:
        """``loss_fn(out, targets)``, checked: a finite scalar that is a mean over samples."""
        loss = self.loss_fn(out, batch.targets)
        if not self._loss_checked:
            reduction = getattr(self.loss_fn, "reduction", "mean")
            if reduction != "mean" and isinstance(loss, Tensor) and loss.numel() == 1:
                raise ValueError(
                    f"loss_fn has reduction={reduction!r}; the curvature is that of the mean "
                    "loss over samples, so construct the loss with reduction='mean'"
                )
        loss = check_scalar_loss(loss, "loss_fn(model(inputs), targets)")
        if not self._loss_checked:
            if not loss.requires_grad:
                raise ValueError(
                    "the loss does not depend on the selected parameters (no gradient flows "
                    "from it to them); check that loss_fn uses the model's outputs and that "
                    "params= selects parameters the model uses"
                )
            self._loss_checked = True
        return loss

    def _fallback_notes(self) -> list[str]:
        notes = []
        kinds = {type(m) for m in self.model.modules()}
        if any(
            issubclass(
                k,
                (
                    nn.MultiheadAttention,
                    nn.TransformerEncoderLayer,
                    nn.TransformerDecoderLayer,
                    nn.Transformer,
                ),
            )
            for k in kinds
        ):
            notes.append(
                "attention runs on the math backend of scaled_dot_product_attention during "
                "curvature products (the fused kernels have no double backward or forward-mode AD)"
            )
        if any(issubclass(k, nn.RNNBase) for k in kinds):
            notes.append(
                "cuDNN is disabled during curvature products (cuDNN RNNs have no double backward)"
            )
        return notes

    # ------------------------------------------------------------------ flat <-> blocks
    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Split a flat (n,) or (n, k) tensor into per-parameter blocks.

        A 1-D input gives tensors shaped like the parameters; a 2-D input gives tensors of shape
        (k, *param.shape).
        """
        chunks = torch.split(flat, self.numels, dim=0)
        if flat.ndim == 1:
            return [c.reshape(s) for c, s in zip(chunks, self.shapes, strict=True)]
        k = flat.shape[1]
        return [c.T.reshape(k, *s) for c, s in zip(chunks, self.shapes, strict=True)]

    def flatten(self, blocks: Sequence[Tensor], batched: bool = False) -> Tensor:
        """Inverse of :meth:`unflatten`."""
        if not batched:
            return torch.cat([b.reshape(-1) for b in blocks])
        return torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=1).T
