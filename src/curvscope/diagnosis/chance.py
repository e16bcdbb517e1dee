"""The chance loss: the loss of the best prediction that ignores the inputs, on the data a
diagnosis measures — what a model that has learnt nothing from its inputs reaches.

A network stuck at chance by vanishing gradients (a deep sigmoid stack) sits where the gradient
and the curvature are tiny and no direction curves down: by the curvature alone a *minimum*,
"stop". Beside the chance loss it is not a fit: its loss is what predicting the label
frequencies gives. The best input-independent prediction has a closed form for torch's common
losses, from the targets alone (no forward pass):

- ``nn.CrossEntropyLoss`` / ``nn.NLLLoss`` with class labels (``ignore_index`` and ``weight=``
  as torch counts them; no ``label_smoothing``): predict the (weighted) label frequencies p;
  the mean loss is their entropy H(p) = −Σ_c p_c log p_c — for (N, d₁, …) labels (sequences,
  pixels) each position's own, the mean weighted by their counts (at most ``MAX_TABLE``
  positions × classes). Only where the probe's labels pin the frequencies down: the fit of
  the frequencies to the probe's own labels (Miller and Madow's (K − 1)/(2n)) at most
  ``OPTIMISM`` of the entropy — else the frequencies pooled over the positions, else none.
- ``nn.MSELoss``: predict each target coordinate's mean; the mean loss is the coordinates' mean
  variance (R² = 0).
- ``nn.BCEWithLogitsLoss`` / ``nn.BCELoss`` (no ``weight=`` or ``pos_weight=``; targets 0 or
  1): predict each coordinate's mean ȳ; the mean loss is the mean over coordinates of
  −ȳ log ȳ − (1−ȳ) log(1−ȳ).

A summed loss's chance loss is the sum (the mean times what the mean divides by). A Hugging
Face model's own loss (``loss_fn=None``) is the cross-entropy over its flattened target tokens:
its chance loss is their unigram entropy. Anything else — another loss, a function, soft
labels, targets whose shape beyond the batch varies — has none (None). Under a process group
the statistics are summed over the ranks (every rank calls it together).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from curvscope.derivatives.distributed import all_reduce_max, all_reduce_sum, collective_device
from curvscope.derivatives.objective import ModelObjective, counted_labels, torch_loss

_CLASSES = (nn.CrossEntropyLoss, nn.NLLLoss)
_SQUARED = (nn.MSELoss,)
_BINARY = (nn.BCEWithLogitsLoss, nn.BCELoss)


def _kind(loss_fn: Any) -> str | None:
    """Which closed form ``loss_fn`` has: "classes", "squared", "binary", or None."""
    if getattr(loss_fn, "reduction", None) not in ("mean", "sum"):
        return None
    if torch_loss(loss_fn, _CLASSES) is not None:
        return None if getattr(loss_fn, "label_smoothing", 0.0) else "classes"
    if torch_loss(loss_fn, _SQUARED) is not None:
        return "squared"
    if torch_loss(loss_fn, _BINARY) is not None:
        weighted = getattr(loss_fn, "weight", None) is not None
        return None if weighted or getattr(loss_fn, "pos_weight", None) is not None else "binary"
    return None


def chance_loss(objective: ModelObjective, group: Any = None, replicas: int = 1) -> float | None:
    """The loss of the best input-independent prediction over ``objective``'s data (the module's
    docstring), reduced as the objective's loss is; None where it has no closed form here.

    One pass over the data's targets (no forward pass); under a process group two or three
    small collectives, which every rank makes whatever its data (a rank whose targets do not
    fit makes it None on all); ``replicas``: how many ranks hold each sample (tensor
    parallelism), as for the operator's own count."""
    kind = _kind(objective.loss_fn)
    if kind is None:
        return None
    where = collective_device(group, objective.device) if group is not None else torch.device("cpu")
    if kind == "classes":
        value, count = _classes(objective, group, where)
    else:
        value, count = _coordinates(objective, group, where, kind)
    if value is None or not math.isfinite(value):
        return None
    # tensor-parallel ranks pass the same batches: their counts are summed ``replicas`` times
    return value * count / replicas if objective.reduction == "sum" else value


#: The most entries a table of label counts per position may have (positions × classes: a
#: segmentation's pixels, a sequence's places): beyond it, no chance loss (None)
MAX_TABLE = 1 << 22


def _agreed_width(
    fits: bool, width: int | None, extra: float, group: Any, where: torch.device
) -> tuple[bool, int, float]:
    """Whether every rank's targets fit, with one and the same width (entries per row; a rank
    without rows counts in neither), that width, and the ranks' largest ``extra``: one
    all-reduce, made by every rank whatever its data."""
    flag = torch.tensor(
        [
            0.0 if fits else 1.0,
            -1.0 if width is None else float(width),
            -1e300 if width is None else -float(width),
            extra,
        ],
        dtype=torch.float64,
    )
    agreed = all_reduce_max(flag.to(where), group).cpu()
    ok = bool(agreed[0] == 0 and agreed[1] >= 0 and agreed[1] == -agreed[2])
    return ok, int(agreed[1]) if ok else 0, float(agreed[3])


def _classes(
    objective: ModelObjective, group: Any, where: torch.device
) -> tuple[float | None, float]:
    """The mean over positions of the entropy of each position's counted label frequencies
    (one position for (N,) labels; each of d₁…d_k for (N, d₁, …, d_k) labels: a constant per
    position ignores the inputs too), and the total count."""
    counts = torch.zeros(0, 0, dtype=torch.float64)  # positions × classes
    seen = torch.zeros(0, dtype=torch.float64)  # the labels counted a position, unweighted
    width: int | None = None
    fits = True
    for batch in objective.batches():
        t = batch.targets
        if t.is_floating_point() or t.is_complex() or t.ndim == 0:  # class probabilities
            fits = False
            continue
        if t.shape[0] == 0:
            continue
        if width is not None and t[0].numel() != width:
            fits = False  # sequences of different lengths: no constant per position
            continue
        width = t[0].numel()
        w = counted_labels(objective.loss_fn, t, torch.float64).cpu()
        labels = torch.where(w > 0, t.reshape(-1).cpu(), 0).long()
        if int(labels.min()) < 0 or width * (int(labels.max()) + 1) > MAX_TABLE:
            fits = False
            continue
        grown = torch.zeros(width, max(counts.shape[1], int(labels.max()) + 1), dtype=torch.float64)
        if counts.numel():
            grown[:, : counts.shape[1]] += counts
        positions = torch.arange(width).repeat(t.shape[0])
        grown.index_put_((positions, labels), w, accumulate=True)
        counts = grown
        seen = (seen if seen.numel() else torch.zeros(width, dtype=torch.float64)).index_add(
            0, positions, (w > 0).to(torch.float64)
        )
    ok, width, classes = _agreed_width(fits, width, float(counts.shape[1]), group, where)
    if not ok:
        return None, 0.0
    if counts.numel() == 0:  # a rank without rows adds nothing
        counts, seen = torch.zeros(width, 0, dtype=torch.float64), torch.zeros(width)
    pad = counts.new_zeros(width, int(classes) - counts.shape[1])
    table = torch.cat([counts, pad, seen.to(torch.float64)[:, None]], 1)
    table = all_reduce_sum(table.to(where), group).cpu()
    counts, seen = table[:, :-1], table[:, -1]
    total = float(counts.sum())
    if total <= 0:
        return None, 0.0
    return _pinned_entropy(counts, float(seen.sum())), total


#: the largest share of the chance loss that the constant prediction's fit to the probe's own
#: labels may make up: its optimism, Miller and Madow's (K − 1)/(2n) nats for K classes seen
#: among n labels — a table of label frequencies per position fitted to 4 sequences has at most
#: ln 4 nats whatever the vocabulary, and a trained model 53% right (5% by chance) read "at
#: chance" beside it (an outside review)
OPTIMISM = 0.05


def _pinned_entropy(counts: torch.Tensor, seen: float) -> float | None:
    """The mean entropy of each position's label frequencies (``counts``: positions × classes,
    weighted; ``seen`` labels counted in all, unweighted) where the probe's labels pin them
    down (:data:`OPTIMISM`), else of the frequencies pooled over the positions, else None."""
    for table in (counts, counts.sum(0, keepdim=True)):
        share = torch.where(table > 0, table / table.sum(1, keepdim=True).clamp_min(1e-300), 1.0)
        entropy = float(-(table * share.log()).sum()) / float(table.sum())
        optimism = float(((table > 0).sum(1) - 1).clamp_min(0).sum()) / (2 * seen)
        if optimism <= OPTIMISM * entropy:
            return entropy
    return None


def _coordinates(
    objective: ModelObjective, group: Any, where: torch.device, kind: str
) -> tuple[float | None, float]:
    """Each target coordinate's mean (and, for squared error, variance, merged stably over
    batches and ranks), and the loss of predicting the means; with the number of entries."""
    n, mean, m2 = 0, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    shape: tuple[int, ...] | None = None
    fits = True
    for batch in objective.batches():
        t = batch.targets
        if not t.is_floating_point() or t.ndim == 0:  # class labels, or no rows to average
            fits = False
            continue
        if t.shape[0] == 0:
            continue
        if kind == "binary" and not bool(((t == 0) | (t == 1)).all()):
            # soft targets: the best any model does is their own entropy, not 0, and a
            # model that matches them exactly read "at chance" (a review)
            fits = False
            continue
        if shape is not None and tuple(t.shape[1:]) != shape:
            fits = False  # sequences of different lengths: no coordinate-wise constant
            continue
        shape = tuple(t.shape[1:])
        rows = t.detach().reshape(t.shape[0], -1).to(device="cpu", dtype=torch.float64)
        k, bmean = rows.shape[0], rows.mean(0)
        bm2 = ((rows - bmean) ** 2).sum(0)
        if n == 0:
            n, mean, m2 = k, bmean, bm2
        else:  # Chan et al.'s pairwise merge
            delta = bmean - mean
            mean = mean + delta * (k / (n + k))
            m2 = m2 + bm2 + delta**2 * (n * k / (n + k))
            n += k
    ok, d, _ = _agreed_width(fits, None if shape is None else math.prod(shape), 0.0, group, where)
    if not ok:
        return None, 0.0  # a rank that did not fit, no rows at all, or coordinates that differ
    if shape is None:  # this rank had no rows: it adds nothing
        mean, m2 = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    weighted = torch.cat([torch.tensor([float(n)], dtype=torch.float64), n * mean])
    summed = all_reduce_sum(weighted.to(where), group).cpu()
    total = float(summed[0])
    if total <= 0:
        return None, 0.0
    overall = summed[1:] / total
    if kind == "binary":
        p = overall.clamp(0.0, 1.0)
        entropy = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))
        return float(entropy.mean()), total * d
    spread = m2 + n * (mean - overall) ** 2
    variance = all_reduce_sum(spread.to(where), group).cpu() / total
    return float(variance.mean()), total * d
