"""Hugging Face models as they come: ``loss_fn=None`` means the model computes its own loss.

A Hugging Face model called as ``model(**batch)`` with ``labels`` in the batch returns ``.loss``
and ``.logits``. Its loss is one of a few standard ones, fixed by its head:

============================== ============================================================
head                           the model's own loss, and what it averages over
============================== ============================================================
``*ForCausalLM``,              cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]``
``*LMHeadModel``               (the causal shift), mean over every target token ≠ −100
``*ForMaskedLM``               cross-entropy of ``logits[:, t]`` against ``labels[:, t]``,
                               mean over every target token ≠ −100
``*ForSequenceClassification`` by ``config.problem_type`` (else inferred from the labels):
``*ForImageClassification``    single-label cross-entropy (mean over the samples whose label is
                               not −100), multi-label ``BCEWithLogitsLoss`` or regression
                               ``MSELoss`` (mean over every entry of every sample)
============================== ============================================================

:class:`HuggingFaceLoss` turns such a model and its batches into what every curvature kind
already takes: outputs are the logits *as the model's loss uses them* (shifted and flattened to
one row per token for the language models, half-precision logits upcast to float32 as the
model's loss does), targets are the labels likewise, and the loss is the equivalent explicit
torch loss (``nn.CrossEntropyLoss(ignore_index=-100)``, ``nn.BCEWithLogitsLoss``,
``nn.MSELoss``). A batch's weight counts what that loss averages over — its target tokens for
the language models, its samples for classification — so the operator is the curvature of the
loss averaged over *all* of the data's targets: batches are weighted by their numbers of target
tokens, not of sequences. At the first product the adapted loss is checked against
``model(**batch).loss``; a model whose own loss is something else (label smoothing, a loss of
its own) is refused with an error saying to pass ``loss_fn`` explicitly.

Only this module knows about Hugging Face; it imports nothing from ``transformers``.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

#: The label the models' losses skip.
IGNORE_INDEX = -100

#: Class-name patterns of the heads whose loss is known, and what it is.
HEADS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(ForCausalLM|LMHeadModel)$"), "causal_lm"),
    (re.compile(r"ForMaskedLM$"), "masked_lm"),
    (re.compile(r"For(Sequence|Image)Classification$"), "classification"),
)

_EXPLICIT = (
    "pass the loss explicitly as loss_fn(outputs, labels), with (inputs, labels) batches or dict "
    "batches holding 'labels'; for kind='ggn', 'fisher' or 'empirical_fisher' the model must "
    "then return the tensor the loss is computed from (wrap it: a module whose forward returns "
    "model(**inputs).logits). An encoder-decoder model (T5, BART) is then called without its "
    "labels, from which it builds its decoder's inputs: put 'decoder_input_ids' in the batch "
    "(model.prepare_decoder_input_ids_from_labels(labels))"
)


def is_hugging_face(model: object) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (without importing transformers:
    a model of that class can only exist once it has been imported)."""
    transformers = sys.modules.get("transformers")
    base = getattr(transformers, "PreTrainedModel", None)
    return isinstance(base, type) and isinstance(model, base)


def trainer_parameter_groups(model: nn.Module) -> list[list[Tensor]] | None:
    """The parameter groups of the optimizer a ``transformers.Trainer`` builds for ``model``:
    the trainable parameters it decays, then the others (biases, norms), each in the model's
    order — which is how a Trainer checkpoint's ``optimizer.pt`` numbers them. None for a
    model that is not a Hugging Face model."""
    if not is_hugging_face(model):
        return None
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [[p for n, p in named if n in decay], [p for n, p in named if n not in decay]]


def head_of(model: nn.Module) -> str | None:
    """``"causal_lm"``, ``"masked_lm"`` or ``"classification"`` from the model's class name, or
    None for any other model."""
    name = type(model).__name__
    return next((head for pattern, head in HEADS if pattern.search(name)), None)


def _problem_type(config: Any, labels: Tensor) -> str:
    """What a classification head's loss is, decided as ``transformers`` decides it (without
    writing the decision into ``config``, as the model's own first loss does)."""
    declared = getattr(config, "problem_type", None)
    if declared is not None:
        return str(declared)
    if getattr(config, "num_labels", 2) == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


_LOSSES: dict[str, Callable[[], nn.Module]] = {
    "single_label_classification": lambda: nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX),
    "multi_label_classification": nn.BCEWithLogitsLoss,
    "regression": nn.MSELoss,
}


class HuggingFaceLoss:
    """A Hugging Face model's own loss, seen as outputs, targets and an explicit torch loss.

    Args:
        model: a model whose class name ends in ``ForCausalLM``, ``LMHeadModel``,
            ``ForMaskedLM``, ``ForSequenceClassification`` or ``ForImageClassification`` and
            that has a ``config`` (any ``transformers`` model with such a head).

    Raises:
        TypeError: any other model, with what to pass instead.

    Example (a causal LM's labels, shifted: 5 target tokens in 2 sequences):
        >>> import torch
        >>> from curvscope.derivatives.huggingface import HuggingFaceLoss
        >>> class TinyForCausalLM(torch.nn.Module):  # any model of that head, with a config
        ...     config = None
        >>> TinyForCausalLM.config = object()
        >>> hf = HuggingFaceLoss(TinyForCausalLM())
        >>> targets = hf.targets(0, torch.tensor([[1, 2, 3, -100], [4, 5, 6, 1]]))
        >>> targets.tolist(), hf.count(targets)
        ([2, 3, -100, 5, 6, 1], 5)
    """

    def __init__(self, model: nn.Module) -> None:
        head = head_of(model)
        config = getattr(model, "config", None)
        if head is None or config is None:
            what = (
                "a Hugging Face model"
                if is_hugging_face(model)
                else "a model that computes its own loss"
            )
            raise TypeError(
                "loss_fn=None means the model computes its own loss, which curvscope knows for "
                "Hugging Face *ForCausalLM (and *LMHeadModel), *ForMaskedLM, "
                f"*ForSequenceClassification and *ForImageClassification models; got "
                f"{type(model).__name__}{'' if config is not None else ' (no config)'}, not "
                f"{what} with one of those heads. Otherwise {_EXPLICIT}"
            )
        self.head = head
        self.model_name = type(model).__name__
        self.config = config
        self.problem_type: str | None = "language_model" if head != "classification" else None
        self.loss_fn: nn.Module = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        try:
            accepted = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
            accepted = {}  # type: ignore[assignment]
        #: keyword arguments every forward gets: no key-value cache (nothing reads it back)
        self.extra: dict[str, Any] = {"use_cache": False} if "use_cache" in accepted else {}

    # ----------------------------------------------------------------------------- data
    def targets(self, i: int, labels: Tensor) -> Tensor:
        """The labels as the loss compares them with :meth:`outputs`, one row per term."""
        if not isinstance(labels, Tensor):
            raise TypeError(
                f"batch {i}: labels must be a tensor, got {type(labels).__name__}; collate the "
                "batches (a DataLoader with a Hugging Face data collator does)"
            )
        if self.problem_type is None:  # the first batch settles it, as the model's first loss
            problem = _problem_type(self.config, labels)
            if problem not in _LOSSES:
                raise ValueError(
                    f"loss_fn=None: {self.model_name} has config.problem_type={problem!r}; "
                    f"transformers knows {', '.join(map(repr, _LOSSES))}. Set one of those, or "
                    f"{_EXPLICIT}"
                )
            self.problem_type, self.loss_fn = problem, _LOSSES[problem]()
        if self.head == "causal_lm":
            if labels.ndim < 2:
                raise ValueError(
                    f"batch {i}: a causal LM's labels are (batch, sequence) token ids, got shape "
                    f"{tuple(labels.shape)}"
                )
            return labels[..., 1:].reshape(-1)
        if self.head == "masked_lm" or self.problem_type == "single_label_classification":
            return labels.reshape(-1)
        if self.problem_type == "regression" and getattr(self.config, "num_labels", 0) == 1:
            return labels.reshape(-1, 1)
        return labels

    def count(self, targets: Tensor) -> int:
        """What the loss averages over in a batch: the target tokens (or samples) whose label is
        not −100 for cross-entropy, the samples otherwise."""
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            return int((targets != IGNORE_INDEX).sum())
        return int(targets.shape[0])

    def nothing_counted(self, i: int, drop: str = "drop the batch") -> ValueError:
        what = (
            ("target token" if self.head != "classification" else "labelled sample")
            + " (every label is -100"
            + (
                ", or every sequence has one token, which predicts nothing)"
                if self.head == "causal_lm"
                else ")"
            )
        )
        return ValueError(
            f"batch {i} has no {what}: the model's loss averages over none, so it is not a "
            f"number; give it labels, or {drop}"
        )

    # -------------------------------------------------------------------------- outputs
    def outputs(self, out: Any, labelled: bool = False) -> Tensor:
        """The logits of a model output as the loss uses them: (tokens, vocabulary) for the
        language models, (samples, labels) for classification; ``labelled``: of an output the
        model was called for with its labels (its loss first in a tuple)."""
        logits = _logits(out, self.model_name, labelled)
        if self.head == "classification":  # (samples, labels), as the losses view them
            return logits.reshape(-1, getattr(self.config, "num_labels", logits.shape[-1]))
        if logits.dtype in (torch.float16, torch.bfloat16):  # as the models' losses upcast
            logits = logits.float()
        if self.head == "causal_lm":
            logits = logits[..., :-1, :]
        return logits.reshape(-1, logits.shape[-1])

    @contextlib.contextmanager
    def config_kept(self) -> Iterator[None]:
        """The model's first loss writes its problem type into ``config``: undo that."""
        before = getattr(self.config, "problem_type", None)
        try:
            yield
        finally:
            if getattr(self.config, "problem_type", None) != before:
                self.config.problem_type = before

    def check(self, i: int, ours: float, out: Any, dtype: torch.dtype) -> None:
        """Refuse a model whose own loss on batch ``i`` (in its output ``out``, called with the
        labels) is not the adapted one, ``ours``, computed in ``dtype``."""
        theirs = getattr(out, "loss", None)
        if theirs is None and isinstance(out, (tuple, list)) and out:
            theirs = out[0]  # return_dict=False: the loss comes first when labels are given
        if not isinstance(theirs, Tensor) or theirs.numel() != 1:
            raise TypeError(
                f"loss_fn=None: {self.model_name}(**batch) with labels returned no loss (got "
                f"{type(theirs).__name__}); {_EXPLICIT}"
            )
        value = float(theirs)
        # a masked LM in bfloat16 or float16 takes its cross-entropy in that precision, where
        # curvscope upcasts (every such model was refused as "a loss of its own": a review)
        low = max(dtype, theirs.dtype, key=lambda t: torch.finfo(t).eps)  # bfloat16 > float16
        tol = max(1e-4, 4 * torch.finfo(low).eps)
        if abs(value - ours) <= tol * max(abs(ours), 1.0):
            return
        what = {
            "causal_lm": "the mean cross-entropy of the logits against the labels shifted by one "
            "token, over the labels ≠ -100",
            "masked_lm": "the mean cross-entropy of the logits against the labels, over the "
            "labels ≠ -100",
        }.get(self.head, f"the {self.problem_type} loss of the logits against the labels")
        aux = getattr(out, "aux_loss", None)
        if isinstance(aux, Tensor) and aux.numel() == 1:  # a mixture of experts' router term
            raise ValueError(
                f"loss_fn=None: on batch {i}, {self.model_name}(**batch).loss is {value:.6g}: "
                f"the loss curvscope takes from its logits ({what}: {ours:.6g}) plus the "
                f"routers' auxiliary load-balancing loss (its output's aux_loss, {float(aux):.6g})"
                " times the config's router_aux_loss_coef, which output_router_logits=True "
                "adds. To measure the language model's loss, pass "
                "output_router_logits=False in the batches (or set it in model.config); to "
                f"measure the sum, {_EXPLICIT}"
            )
        raise ValueError(
            f"loss_fn=None: on batch {i}, {self.model_name}(**batch).loss is {value:.6g}, but "
            f"the loss curvscope takes from its logits ({what}, as transformers computes it) is "
            f"{ours:.6g}: the model computes a loss of its own (label smoothing, class weights, "
            f"an auxiliary term?). To measure the curvature of that loss, {_EXPLICIT}"
        )


def _logits(out: Any, model_name: str, labelled: bool = False) -> Tensor:
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and len(out) > labelled:
        # return_dict=False: the logits come first, after the loss where labels were given
        logits = out[int(labelled)]
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"loss_fn=None: {model_name} returned {type(out).__name__} without logits; {_EXPLICIT}"
        )
    return logits
