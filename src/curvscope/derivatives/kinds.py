"""Per-batch curvature products: Hessian, generalized Gauss-Newton, Fisher, empirical Fisher.

Each kind turns one batch into a *prepared product*: the autograd graph that one batch needs,
built once, and a method ``apply(blocks)`` that multiplies per-parameter blocks of shape
(k, *param.shape) by that batch's curvature of its loss as the loss reduces it (the mean or the
sum over the batch; ``ModelObjective.reduction``). With the data held in memory the prepared
products are cached, so each further product is a backward pass through a kept graph (the
cheapest product there is: about one gradient); from a loader they are rebuilt per pass.

The Gauss-Newton family is composed from one piece, :class:`_Jacobian` (Jv and Jᵀw of a
function of the parameters by the double-vjp trick, which needs no forward-mode AD):

- GGN              Jᵀ H_out J,  H_out = ∂²loss/∂out², by autograd, for any loss
- Fisher           (1/T) Σ_t J_tᵀ (1/M Σ_m g_mt g_mtᵀ) J_t,  g_mt = ∂ℓ_t(y_m)/∂out_t, y_m ~ p(·|out)
- empirical Fisher (1/T) Σ_t J_tᵀ g_t g_tᵀ J_t,  g_t = ∂ℓ_t(y)/∂out_t with the true labels

t runs over the likelihood terms ℓ_t the loss adds up (:class:`Likelihood`), T is what the mean
divides their sum by (1 for a summed loss); the two Fishers are one product,
:class:`_OuterProduct`, fed sampled or true-label gradient rows.

The products are built here and only here: ``curvature.KINDS`` maps each kind's name to its
preparation (a ``Preparer``), and the optimizers' closure evaluations take their Hessian and
Gauss-Newton products from :func:`hessian_product` and :func:`ggn_product` on the graph their
closure built. Adding a kind: its ``prepare_*`` here, its entry in ``curvature.KINDS``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvscope.derivatives.objective import (
    ENTRYWISE_MEANS,
    LABEL_MEANS,
    Batch,
    ModelObjective,
    counted_labels,
    loss_tolerance,
    refuse_known_cuts,
    torch_loss,
)
from curvscope.derivatives.seeding import FISHER_LABELS, generator


class PreparedProduct(Protocol):
    def apply(self, blocks: Sequence[Tensor]) -> list[Tensor]:
        """Blocks of shape (k, *param.shape) in, the same out."""
        ...


#: One batch's product: (objective, batch) -> the prepared product.
PrepareBatch = Callable[[ModelObjective, Batch], PreparedProduct]
#: A kind's preparation, called once when an operator is built: (objective, mc_samples) -> its
#: PrepareBatch. What can be refused without a forward pass is refused here (the Fisher of a
#: loss with no known likelihood).
Preparer = Callable[[ModelObjective, int], PrepareBatch]


def per_batch(prepare: PrepareBatch) -> Preparer:
    """The Preparer of a kind whose batches need nothing decided up front."""

    def preparer(objective: ModelObjective, mc_samples: int) -> PrepareBatch:
        return prepare

    return preparer


def _no_second_derivative(e: Exception) -> Exception:
    """torch's "the derivative for '_embedding_bag_backward' is not implemented" (nn.EmbeddingBag;
    a NotImplementedError) and "derivative for aten::_ctc_loss_backward is not implemented"
    (nn.CTCLoss, nn.MultiMarginLoss, nn.MultiLabelMarginLoss; a RuntimeError), with what it
    means and the ways around it (they said neither: outside reviews)."""
    said = str(e)
    if "derivative for" not in said or "not implemented" not in said:
        return e
    return NotImplementedError(
        f"{e} torch has no second derivative for an operation of the model or the loss "
        "(nn.EmbeddingBag's, nn.CTCLoss's, nn.MultiMarginLoss's, nn.MultiLabelMarginLoss's, "
        "for some), which curvature products by double backward need. Measure the Hessian with "
        "backend='finite_difference' (cs.Curvature, cs.diagnose, cs.Monitor: products from "
        "gradients alone; the Gauss-Newton and Fisher kinds have no such backend), or leave "
        "out that module's parameters and those of every layer before it — the curvature of "
        "a layer before the operation passes through its second derivative; select the "
        "layers after it with params= (a learnable fake-quantize mid-network failed with its "
        "own parameters frozen: an outside review); for nn.EmbeddingBag, "
        "nn.Embedding followed by a mean or sum over the bag is the same model with second "
        "derivatives"
    )


#: what each backward pass through a forward's graph runs inside (the model's attributes as
#: that forward left them: :meth:`ModelObjective.backward_state`)
Backward = Callable[[], AbstractContextManager[object]]


def _grad(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
    create_graph: bool = False,
    each: Backward = nullcontext,
) -> list[Tensor]:
    """Σ_i (∂outputs_i/∂inputs)ᵀ grad_outputs_i, with zeros for inputs that take no part.

    ``grad_outputs`` carry a leading batch dimension k; the k backward passes reuse the graph,
    each inside ``each()``.
    """
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
    k = grad_outputs[0].shape[0]
    if not pairs:
        return [torch.zeros(k, *x.shape, dtype=x.dtype, device=x.device) for x in inputs]
    outs, gos = zip(*pairs, strict=True)

    def column(j: int) -> list[Tensor]:
        try:
            with each():
                g = torch.autograd.grad(
                    outs,
                    inputs,
                    [go[j] for go in gos],
                    retain_graph=True,
                    create_graph=create_graph,
                    allow_unused=True,
                )
        except (NotImplementedError, RuntimeError) as e:
            said = _no_second_derivative(e)
            if said is e:
                raise
            raise said from e
        return [torch.zeros_like(x) if gi is None else gi for gi, x in zip(g, inputs, strict=True)]

    if k == 1:  # the common case: no stacking copy
        return [t[None] for t in column(0)]
    return [torch.stack(c) for c in zip(*(column(j) for j in range(k)), strict=True)]


class _Jacobian:
    """J v and Jᵀ w for y = y(θ), from one forward graph, without forward-mode AD.

    Jᵀu is linear in u, so Jv = ∂(Jᵀu)ᵀv/∂u: one backward through a graph kept once.
    """

    def __init__(self, y: Tensor, leaves: Sequence[Tensor], each: Backward = nullcontext) -> None:
        self.y, self.leaves, self.each = y, list(leaves), each
        self.u = torch.zeros_like(y, requires_grad=True)
        self.jt_u = _grad([y], self.leaves, [self.u[None]], create_graph=True, each=each)
        self.jt_u = [t[0] for t in self.jt_u]

    def jvp(self, blocks: Sequence[Tensor]) -> Tensor:
        """(k, *y.shape)."""
        (out,) = _grad(self.jt_u, [self.u], blocks, each=self.each)
        return out

    def vjp(self, w: Tensor) -> list[Tensor]:
        """w of shape (k, *y.shape) -> blocks (k, *param.shape)."""
        return _grad([self.y], self.leaves, [w], each=self.each)


@dataclass
class HessianProduct:
    """H v = ∂(∇Lᵀv)/∂θ through a kept gradient graph (Pearlmutter 1994): one backward a vector.

    ``grads`` is ∇L with respect to ``leaves``, computed with ``create_graph=True``."""

    leaves: list[Tensor]
    grads: list[Tensor]  # ∇L of this batch, with its graph
    loss: float = float("nan")  # L of this batch
    each: Backward = field(default=nullcontext)  # (a model's batch: its forward's attributes)

    def apply(self, blocks: Sequence[Tensor]) -> list[Tensor]:
        return _grad(self.grads, self.leaves, blocks, each=self.each)


def hessian_product(leaves: Sequence[Tensor], grads: Sequence[Tensor]) -> HessianProduct:
    """The Hessian product of a loss whose gradient ``grads`` (one per leaf, ``None`` for none:
    zeros) was taken with ``create_graph=True``: a closure's evaluation uses this one."""
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)]
    return HessianProduct(list(leaves), grads)


def batch_loss_and_grads(
    obj: ModelObjective, batch: Batch
) -> tuple[list[Tensor], list[Tensor], float]:
    """(leaves, ∇L per parameter, L) of one batch, zeros for parameters the loss ignores."""
    g = obj.rerun_on_recompute(_gradient, obj, batch, create_graph=False)
    return g.leaves, g.grads, g.loss


def _gradient(obj: ModelObjective, batch: Batch, create_graph: bool) -> HessianProduct:
    """One batch's gradient (zeros for parameters the loss ignores) and loss; with
    ``create_graph``, its graph kept for second derivatives."""
    theta = obj.leaves()
    leaves = list(theta.values())
    with obj.context(batch.index):
        loss = obj.loss(obj.forward(theta, batch), batch)
        seed = obj.watch(loss) if create_graph else None
        each = obj.backward_state()
        with each():
            raw = torch.autograd.grad(
                loss, leaves, seed, create_graph=create_graph, allow_unused=True
            )
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(raw, leaves, strict=True)]
    return HessianProduct(leaves, grads, float(loss.detach()), each)


def prepare_hessian(obj: ModelObjective, batch: Batch) -> HessianProduct:
    """Pearlmutter's product by double backward: H v = ∂(∇Lᵀv)/∂θ, the gradient graph kept."""
    return _gradient(obj, batch, create_graph=True)


@dataclass
class _ForwardOverReverseProduct:
    """H v = ∂/∂ε ∇L(θ + εv) by torch.func (jvp of grad), vmapped over a block of vectors.

    Keeps no graph between products (each one is a fresh forward and backward in dual
    numbers); over a block, vmap batches the vectors through one pass, which on some models
    (MLPs) is cheaper per vector than k backward passes through a kept graph.
    """

    obj: ModelObjective
    batch: Batch

    def apply(self, blocks: Sequence[Tensor]) -> list[Tensor]:
        obj, batch = self.obj, self.batch
        theta = {k: p.detach() for k, p in obj.params.items()}
        names = obj.names

        loss_fn = obj.loss_fn
        if torch_loss(loss_fn, (nn.MSELoss,)) is not None:
            loss_fn = partial(_mse, reduction=loss_fn.reduction)

        def loss_of(th: dict[str, Tensor]) -> Tensor:
            return loss_fn(obj.raw_forward(th, batch, copies=False), batch.targets)

        g = torch.func.grad(loss_of)

        def hvp(*vs: Tensor) -> tuple[Tensor, ...]:
            hv = torch.func.jvp(g, (theta,), (dict(zip(names, vs, strict=True)),))[1]
            return tuple(hv[n] for n in names)

        # P·H·P, as double backward gives it: torch's embedding keeps its padding row out of the
        # gradient, but forward-mode reads the row's tangent — P·H without this (an outside
        # review: 13% off, not symmetric). The result's rows too: a row tied to another module
        # has a gradient there (ModelObjective.leave_out_tied_padding); an untied one's is 0
        rows = [obj.padding.get(n) for n in names]
        blocks = [_without_row(b, row) for b, row in zip(blocks, rows, strict=True)]
        obj.learn(theta, batch)
        try:
            with obj.context(batch.index):
                if blocks[0].shape[0] == 1:
                    out = [h[None] for h in hvp(*(b[0] for b in blocks))]
                else:
                    out = list(torch.func.vmap(hvp, randomness="same")(*blocks))
        except (RuntimeError, NotImplementedError) as e:
            raise _forward_mode_failed(e) from e
        for h, row in zip(out, rows, strict=True):
            if row is not None:  # (the product's own tensors: zeroed in place, not copied)
                h[:, row] = 0
        return out


def _forward_mode_failed(e: BaseException) -> BaseException:
    """torch's own error from forward-mode AD or vmap (an op without a forward derivative or a
    batching rule: spectral norm's in-place power iteration, a packed RNN), with the fix; it was
    torch's bare words ("Cannot access data pointer of Tensor that doesn't have storage": an
    outside review). curvscope's own errors (checkpointing's, inference mode's) pass as they are."""
    if type(e) not in (RuntimeError, NotImplementedError) or e.__cause__ is not None:
        return e
    if str(e).startswith("curvscope"):
        return e
    said = str(e).splitlines()[0] if str(e) else type(e).__name__
    return type(e)(
        "backend='forward_over_reverse' failed on this model: torch's forward-mode AD (or vmap) "
        f"does not go through one of its operations (torch: {said}); use "
        "backend='double_backward', or 'auto', which falls back to it by itself"
    )


def _without_row(block: Tensor, row: int | None) -> Tensor:
    """``block`` (k vectors of one parameter) with an embedding's padding ``row`` zeroed."""
    if row is None:
        return block
    block = block.clone()
    block[:, row] = 0
    return block


def _mse(out: Tensor, target: Tensor, reduction: str) -> Tensor:
    """nn.MSELoss written out: torch 2.13's own raises "ZeroTensors are immutable" in
    forward-over-reverse (its double backward writes into a zero tangent). Its reduction is the
    loss's (this took the mean of a summed loss: products 1/N of the Hessian, found in review)."""
    squares = (out - target).pow(2)
    return squares.sum() if reduction == "sum" else squares.mean()


def prepare_hessian_forward(obj: ModelObjective, batch: Batch) -> _ForwardOverReverseProduct:
    if not obj._loss_checked:  # the checks and the reduction need a plain forward, not a
        prepare_hessian(obj, batch)  # transformed one; settled here, before the batch's weight
    return _ForwardOverReverseProduct(obj, batch)


@dataclass
class _GGNProduct:
    jac: _Jacobian
    out_leaf: Tensor
    loss_grad: Tensor  # ∂loss/∂out with its graph: H_out w = ∂(loss_gradᵀ w)/∂out

    def apply(self, blocks: Sequence[Tensor]) -> list[Tensor]:
        jv = self.jac.jvp(blocks)
        (h_jv,) = _grad([self.loss_grad], [self.out_leaf], [jv])
        return self.jac.vjp(h_jv)


def _curves(loss_grad: Tensor, at: Tensor) -> bool:
    """Whether the loss's second derivative in the outputs is not 0 here: H_out applied to a
    seeded random direction (its own generator: the user's RNG is not touched; a patterned one
    can be constant along the classes, in cross-entropy's null space — a review of this
    check). One more backward through the loss alone, and a host read."""
    gen = torch.Generator(device=at.device).manual_seed(0)
    w = torch.randn(at.shape, generator=gen, device=at.device, dtype=at.dtype)
    (h,) = _grad([loss_grad], [at], [w[None]])
    return bool(h.any())


#: The Gauss-Newton matrix Jᵀ H_out J of a loss linear in the outputs is 0: nn.NLLLoss after a
#: LogSoftmax layer (the tutorials' pattern) gave λ_max 0 "converged", trace 0, without a word
#: where the Hessian's is 0.70 (an outside review). Refused where H_out is 0 on every batch
#: (:func:`prepare_ggn`; one batch of saturated outputs, or of Huber residuals past delta, has a
#: GGN of 0 of its own: the first batch alone judged the data by it — a review).
LINEAR_LOSS = (
    "the Gauss-Newton matrix is 0: loss_fn's second derivative in the model's outputs is 0 on "
    "every batch (a loss linear in them — nn.NLLLoss after a LogSoftmax layer, nn.L1Loss, a "
    "hinge loss — or outputs saturated to the precision), so Jᵀ H_out J = 0. Move the last "
    "nonlinearity into the loss (logits and nn.CrossEntropyLoss for LogSoftmax + nn.NLLLoss, "
    "or for LogSoftmax + nn.KLDivLoss with its target distributions as CrossEntropyLoss's "
    "probability targets), or use kind='hessian'"
)


def ggn_product(
    outputs: Tensor,
    leaves: Sequence[Tensor],
    loss: Tensor,
    at: Tensor | None = None,
    seed: Tensor | None = None,
    each: Backward = nullcontext,
) -> _GGNProduct:
    """Jᵀ H_out J for ``outputs`` computed from ``leaves`` and a scalar ``loss`` computed from
    them: J the Jacobian of the outputs, H_out = ∂²loss/∂out² (by autograd, any loss).

    ``at`` is the tensor the loss was computed from: the outputs themselves (the default: a
    closure's evaluation), or a detached copy of them (:func:`prepare_ggn`), which keeps the
    loss's graph apart from the model's. ``seed``: the gradient the loss's backward starts
    from (a watched one: :func:`~curvscope.derivatives.objective.watch_custom_functions`), or
    None. ``each``: what each backward through the model's graph runs inside.
    """
    at = outputs if at is None else at
    jac = _Jacobian(outputs, leaves, each)
    (loss_grad,) = torch.autograd.grad(loss, at, seed, create_graph=True)
    return _GGNProduct(jac, at, loss_grad)


def prepare_ggn(obj: ModelObjective, batch: Batch) -> PreparedProduct:
    theta = obj.leaves()
    with obj.context(batch.index):
        out = obj.forward(theta, batch, tensor=True)
        out_leaf = out.detach().requires_grad_(True)
        loss = obj.loss(out_leaf, batch)
        # the model's backward is seeded by the Jacobian's u, which requires grad; the loss's
        seed = obj.watch(out, loss)
        each = obj.backward_state()
        product = ggn_product(out, list(theta.values()), loss, out_leaf, seed, each)
        # until a batch whose loss curves in the outputs; refused when none does. Under a
        # process group one rank's data is not the data's (its saturated outputs alone refused
        # a GGN of norm 0.51: a review): the ranks decide together at the product's sum
        # (Curvature._summed_over_ranks), refusing only where no rank's batch curves
        if not obj.ggn_checked:
            if _curves(product.loss_grad, out_leaf):
                obj.ggn_checked = True
            elif batch.index == obj.num_batches - 1:
                if not obj.across_ranks:
                    raise ValueError(LINEAR_LOSS)
                obj.ggn_linear = True
    return product


# ------------------------------------------------------------------------------- Fisher
def _all_terms(loss_fn: object, rows: Tensor, targets: Tensor) -> Tensor:
    return torch.ones(rows.shape[0], dtype=rows.dtype, device=rows.device)


def _categorical_terms(loss_fn: object, rows: Tensor, targets: Tensor) -> Tensor:
    """Each row's weight in the mean's divisor (:func:`~curvscope.derivatives.objective.
    counted_labels`; targets given as class probabilities: 1 every row)."""
    if targets.is_floating_point():
        return _all_terms(loss_fn, rows, targets)
    return counted_labels(loss_fn, targets, rows.dtype)


@dataclass(frozen=True)
class Likelihood:
    """The predictive distribution whose negative log-likelihood a loss is (up to scale).

    The outputs are viewed as a (rows, classes) matrix by ``as_terms``: one row per
    log-likelihood term the loss sums or averages (the class vector of a sample or of a
    position for cross-entropy; each output entry for MSE and BCE).
    ``sample_grad(rows, generator, m)`` draws m label sets y ~ p(·|out) and returns the gradients
    ∂(−log p(y|out))/∂out of each row, shape (m, rows, classes); their second moment is the
    output Hessian of the loss, so the Fisher equals the GGN in expectation.
    ``counted(loss_fn, rows, targets)`` is each row's weight in the divisor of the loss's mean:
    1 for a term, 0 for a row the loss skips (``ignore_index``), the class weight under
    ``weight=``; the mean is then (Σ_t ℓ_t) / Σ_t counted_t.
    """

    name: str
    as_terms: Callable[[Tensor], Tensor]
    sample_grad: Callable[[Tensor, torch.Generator, int], Tensor]
    counted: Callable[[object, Tensor, Tensor], Tensor] = _all_terms


def _classes_last(out: Tensor) -> Tensor:
    return (out.movedim(1, -1) if out.ndim > 2 else out).reshape(-1, out.shape[1])


def _entries(out: Tensor) -> Tensor:
    return out.reshape(-1, 1)


def _categorical_grad(rows: Tensor, gen: torch.Generator, m: int) -> Tensor:
    p = rows.softmax(-1)
    y = torch.multinomial(p, m, replacement=True, generator=gen).T  # (m, terms)
    return p - F.one_hot(y, p.shape[-1]).to(p.dtype)


def _bernoulli_grad(rows: Tensor, gen: torch.Generator, m: int) -> Tensor:
    p = rows.sigmoid().expand(m, *rows.shape)
    return p - torch.bernoulli(p, generator=gen)


def _gaussian_grad(rows: Tensor, gen: torch.Generator, m: int) -> Tensor:
    # (out − y)² = −log N(y; out, ½) + const: y = out + ε/√2, so ∂/∂out = −√2 ε
    eps = torch.randn((m, *rows.shape), generator=gen, dtype=rows.dtype, device=rows.device)
    return -math.sqrt(2.0) * eps


LIKELIHOODS: dict[type, Likelihood] = {
    nn.CrossEntropyLoss: Likelihood(
        "categorical", _classes_last, _categorical_grad, _categorical_terms
    ),
    nn.BCEWithLogitsLoss: Likelihood("bernoulli", _entries, _bernoulli_grad),
    nn.MSELoss: Likelihood("gaussian", _entries, _gaussian_grad),
}


def likelihood_of(
    loss_fn: object,
    who: str = "kind='fisher'",
    instead: str = "kind='ggn' (equal to the Fisher in expectation for them) or "
    "kind='empirical_fisher'",
) -> Likelihood:
    """The likelihood behind a torch loss, or a ValueError naming the supported ones, for
    ``who`` (what samples labels from it), with the fix ``instead`` (Sophia-G's estimator's
    refusal named ``kind='ggn'``, which Sophia has not: an outside review)."""
    cls = torch_loss(loss_fn, LIKELIHOODS)
    if cls is None:
        names = ", ".join(f"nn.{t.__name__}" for t in LIKELIHOODS)
        nll = (  # the losses of a nonlinearity the model applies: the same loss on logits
            " (for nn.NLLLoss after log_softmax: nn.CrossEntropyLoss on the logits)"
            if isinstance(loss_fn, nn.NLLLoss)
            else " (for nn.BCELoss after a sigmoid: nn.BCEWithLogitsLoss on the logits)"
            if isinstance(loss_fn, nn.BCELoss)
            else ""
        )
        raise ValueError(
            f"{who} samples labels from the model's predictive distribution, which is known "
            f"for {names}; got {type(loss_fn).__name__}. Use one of those losses{nll}, or "
            f"{instead}"
        )
    lik = LIKELIHOODS[cls]
    for attr, neutral in {"weight": None, "pos_weight": None, "label_smoothing": 0.0}.items():
        value = getattr(loss_fn, attr, neutral)
        if value is not None and not (isinstance(value, float) and value == neutral):
            raise ValueError(
                f"{who} does not support {type(loss_fn).__name__}({attr}=...): the loss is then "
                f"not a log-likelihood; drop {attr} or use {instead}"
            )
    return lik


def terms_of(loss_fn: object) -> Likelihood | None:
    """The likelihood whose terms a torch loss sums or averages (:func:`torch_loss`): the other
    cross-entropies' (:data:`~curvscope.derivatives.objective.LABEL_MEANS`) are cross-entropy's
    — nn.NLLLoss's over the log-probabilities it is given, nn.LinearCrossEntropyLoss's over the
    features its own linear layer maps to logits, a row a term either way, counted alike
    (through the per-sample path, class weights cancelled in each sample's loss and ignored
    labels counted: 0.23x the empirical Fisher of the same nn.CrossEntropyLoss, and 0.32x with
    the linear one's weight=, found by outside reviews); None for any other loss."""
    cls = torch_loss(loss_fn, (*LIKELIHOODS, *LABEL_MEANS))
    return None if cls is None else LIKELIHOODS[cls if cls in LIKELIHOODS else nn.CrossEntropyLoss]


def mean_divisor(reduction: str, counted: Tensor | float) -> Tensor | float:
    """What a batch loss of ``reduction`` divides its sum of terms by: Σ counted for "mean",
    1 for "sum" (also Sophia-G's estimator's scale: ``optim.diagonal``)."""
    if reduction == "sum":
        return 1.0
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return counted.sum() if isinstance(counted, Tensor) else float(counted)


@dataclass
class _OuterProduct:
    """Jᵀ (scale Σ_m Σ_t g_mt g_mtᵀ) J: the Fisher and the empirical Fisher alike.

    ``jac`` is that of the outputs viewed as (rows, classes); ``grads`` (m, rows, classes) hold
    one gradient row per term and draw — sampled labels (Fisher) or the true ones (empirical
    Fisher, m = 1) — with zero rows for what the loss skips.
    """

    jac: _Jacobian
    grads: Tensor  # (m, rows, classes)
    scale: Tensor | float

    def apply(self, blocks: Sequence[Tensor]) -> list[Tensor]:
        jv = self.jac.jvp(blocks)[:, None]  # (k, 1, rows, classes)
        g = self.grads[None]  # (1, m, rows, classes)
        w = self.scale * ((jv * g).sum(-1, keepdim=True) * g).sum(1)
        return self.jac.vjp(w)


def prepare_fisher(
    obj: ModelObjective, batch: Batch, likelihood: Likelihood, mc_samples: int, seed: int
) -> _OuterProduct:
    """F = (1/T) Σ_t Jᵀ_t E[g_t g_tᵀ] J_t, by ``mc_samples`` draws of every term's label.

    t runs over the likelihood terms the loss counts (rows at ``ignore_index`` are skipped),
    T is their number for a mean-reduced loss and 1 for a summed one.
    """
    theta = obj.leaves()
    with obj.context(batch.index):
        out = obj.forward(theta, batch, tensor=True)
        obj.loss(out.detach().requires_grad_(True), batch)  # the checks every kind makes
        rows = likelihood.as_terms(out)
        jac = _Jacobian(rows, list(theta.values()), obj.backward_state())
    counted = likelihood.counted(obj.loss_fn, rows, batch.targets)
    gen = generator(seed, out.device, FISHER_LABELS, batch.index)
    with torch.no_grad():
        g = likelihood.sample_grad(rows.detach(), gen, mc_samples)
        g = g * (counted > 0).to(g.dtype)[:, None]
    return _OuterProduct(jac, g, 1.0 / (mean_divisor(obj.reduction, counted) * mc_samples))


def fisher_preparer(objective: ModelObjective, mc_samples: int) -> PrepareBatch:
    """The Fisher's Preparer: the loss's likelihood is looked up when the operator is built (a
    loss without one is refused there), the labels of each batch drawn from ``seed``."""
    likelihood, seed = likelihood_of(objective.loss_fn), objective.seed

    def prepare(obj: ModelObjective, batch: Batch) -> PreparedProduct:
        return prepare_fisher(obj, batch, likelihood, mc_samples, seed)

    return prepare


# --------------------------------------------------------------------- empirical Fisher
def per_sample_losses(loss_fn: Callable, out: Tensor, targets: Tensor) -> Tensor:
    """The N terms ℓ_i = loss_fn(out[i:i+1], targets[i:i+1]) whose mean (or sum) is the batch
    loss."""

    def one(o: Tensor, t: Tensor) -> Tensor:
        return loss_fn(o[None], t[None])

    try:
        with warnings.catch_warnings():  # torch's note on its slower fallback, not the user's
            warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
            return torch.vmap(one)(out, targets)
    except Exception:  # a loss without batching rules: loop instead
        return torch.stack([loss_fn(out[i : i + 1], targets[i : i + 1]) for i in range(len(out))])


def _check_terms(whole: Tensor, losses: Tensor, reduction: str, index: int) -> None:
    """Refuse an empirical Fisher by per-sample terms where the batch's loss is not their mean
    (or sum): a loss over the whole batch (contrastive, InfoNCE: each row alone gives 0) made
    it the zero matrix, λ_max 0 "converged", without a word (an outside review)."""
    parts = losses.detach().to(torch.float64)
    made = parts.mean() if reduction == "mean" else parts.sum()
    size = parts.abs().mean() if reduction == "mean" else parts.abs().sum()  # rounding's scale
    value = float(whole.detach())
    tol = loss_tolerance(whole) * max(1.0, math.sqrt(parts.numel()))
    if abs(value - float(made)) <= tol * max(abs(value), float(size), 1e-30):
        return
    raise ValueError(
        f"kind='empirical_fisher' takes loss_fn's value on each row of a batch alone as that "
        f"sample's term, but on batch {index} their {reduction} is {float(made):.6g} where the "
        f"batch's loss is {value:.6g}: a loss over the whole batch (contrastive, InfoNCE, "
        "batch statistics) has no per-sample terms, and a function that weighs or leaves out "
        "labels does not average its rows. Use kind='hessian' or 'ggn'; for class weights or "
        "ignored labels pass nn.CrossEntropyLoss(weight=..., ignore_index=...) itself, whose "
        "terms are counted as torch counts them"
    )


def prepare_empirical_fisher(obj: ModelObjective, batch: Batch) -> _OuterProduct:
    """E = (1/T) Σ_t ∇ℓ_t ∇ℓ_tᵀ over the loss's likelihood terms, with the true labels.

    For ``nn.CrossEntropyLoss`` (and ``nn.NLLLoss``), ``nn.BCEWithLogitsLoss`` and
    ``nn.MSELoss`` the terms ℓ_t are the Fisher's (what ``reduction="none"`` returns: a class
    vector per sample or position for cross-entropy, every output entry for MSE and BCE) and T
    is what the mean divides their sum by (their number, less the rows at ``ignore_index``; the
    sum of the class weights under ``weight=``), 1 for a summed loss. So E has the Fisher's
    structure with each term's sampled gradient replaced by its true-label gradient g_t =
    ∂ℓ_t/∂out_t, and with labels drawn from the model its expectation is the Fisher, hence the
    GGN.

    The g_t come from autograd: ∂L/∂out of the batch loss L = (1/T) Σ_t ℓ_t is g_t/T row by
    row, since each term depends on its own row only. That is the derivative of the loss as
    the user configured it (label smoothing, targets as class probabilities, ``pos_weight``,
    ``ignore_index``) with no formula to keep in step with torch's, for one backward pass
    through the loss alone.

    torch's other elementwise losses (those of
    :data:`~curvscope.derivatives.objective.ENTRYWISE_MEANS`: ``nn.BCELoss``,
    ``nn.PoissonNLLLoss``, ``nn.L1Loss``, ``nn.HuberLoss``, ``nn.KLDivLoss``, …): each output
    entry a term, T their number (the rows for ``"batchmean"``).

    Any other loss (a custom function): the per-sample decomposition
    E = (1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ, ℓ_i = loss_fn(out[i:i+1], targets[i:i+1]) (N → 1 when summed).
    """
    theta = obj.leaves()
    leaves = list(theta.values())
    lik = terms_of(obj.loss_fn)
    with obj.context(batch.index):
        out = obj.forward(theta, batch, tensor=True)
        if lik is None and torch_loss(obj.loss_fn, ENTRYWISE_MEANS) is not None:
            # torch's other elementwise losses, each entry a term as `reduction="none"` returns
            # them (a sample's k entries made one term: nn.BCELoss had 0.33x the empirical
            # Fisher of nn.BCEWithLogitsLoss on the same model, an outside review); each term a
            # function of its own entry: ∂L/∂out_t = g_t / T, and T Σ (g_t/T)(g_t/T)ᵀ is E
            out_leaf = out.detach().requires_grad_(True)
            (d_out,) = torch.autograd.grad(obj.loss(out_leaf, batch), out_leaf)
            jac = _Jacobian(out.reshape(-1, 1), leaves, obj.backward_state())
            # T: the batch's size, which counts the entries of such a mean (the rows of
            # KLDivLoss's "batchmean": :meth:`ModelObjective._size`)
            return _OuterProduct(
                jac, d_out.reshape(1, -1, 1), mean_divisor(obj.reduction, batch.size)
            )
        if lik is None:
            whole = obj.loss(out, batch)  # the checks every kind makes
            losses = per_sample_losses(obj.loss_fn, out, batch.targets).reshape(-1, 1)
            if batch.index not in obj.terms_checked:  # once a batch, not at every product
                refuse_known_cuts(whole, "the empirical Fisher's per-sample gradients")
                # through refuse: a refusal on one rank's data alone reaches every rank
                obj.refuse(_check_terms, whole, losses, obj.reduction, batch.index)
                if obj.refusal is None:  # passed: a refused batch is checked again next time
                    obj.terms_checked.add(batch.index)
            jac = _Jacobian(losses, leaves, obj.backward_state())
            ones = torch.ones(1, *losses.shape, dtype=out.dtype, device=out.device)
            return _OuterProduct(jac, ones, 1.0 / mean_divisor(obj.reduction, losses.shape[0]))
        out_leaf = out.detach().requires_grad_(True)
        (d_out,) = torch.autograd.grad(obj.loss(out_leaf, batch), out_leaf)
        rows = lik.as_terms(out)
        jac = _Jacobian(rows, leaves, obj.backward_state())
    counted = lik.counted(obj.loss_fn, rows, batch.targets)
    # ∂L/∂row_t = g_t / T: the outer products of these, times T, are (1/T) Σ_t g_t g_tᵀ
    return _OuterProduct(jac, lik.as_terms(d_out)[None], mean_divisor(obj.reduction, counted))
