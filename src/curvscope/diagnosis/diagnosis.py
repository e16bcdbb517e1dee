"""``diagnose()``: measure a model's loss where it stands, and say in words which state training
is in, with the numbers behind it and what to do."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from curvscope.derivatives import Curvature
from curvscope.derivatives import finite_difference as _fd
from curvscope.derivatives import zero3 as _zero3
from curvscope.derivatives.checks import all_finite, check_int
from curvscope.derivatives.curvature import BACKENDS as _PRODUCT_BACKENDS
from curvscope.derivatives.distributed import in_step, together, world_size
from curvscope.derivatives.objective import fixed_pass, inner_name, unwrapped
from curvscope.derivatives.sharded import ShardedCurvature
from curvscope.diagnosis.chance import chance_loss
from curvscope.diagnosis.classify import (
    DEFAULT_THRESHOLDS,
    Evidence,
    Facts,
    State,
    StateEnum,
    Thresholds,
    as_state,
    classify,
    step_scaled,
)
from curvscope.diagnosis.stability import (
    StabilityLimit,
    check_clip_factor,
    gathered,
    limit_of,
    stepped_selection,
)
from curvscope.spectrum import Operator, as_operator, eigenvalues
from curvscope.spectrum._operator import bars
from curvscope.spectrum.cg import cg
from curvscope.spectrum.eigen import (
    RANDOM_START_PRODUCTS,
    block_shares,
    block_sums,
    both_ends,
    local_block_sizes,
)
from curvscope.spectrum.precision import autocast_off, working_dtype

#: The default cost of one diagnosis, in curvature products.
DEFAULT_BUDGET = 80
#: The share of the budget Lanczos may use; one product goes along the step, CG gets the rest.
LANCZOS_SHARE = 0.6
#: Eigenvalue accuracy of a diagnosis: 1% of |λ_max| is ample to tell the states apart.
DIAGNOSIS_TOL = 1e-2
#: An adaptive diagnosis (the Monitor's) first runs Lanczos to this accuracy (5% of |λ_max|:
#: a Ritz value only underestimates λ_max) ...
ROUGH_TOL = 5e-2
#: the gradient's share in an adaptive probe's warm start (:func:`_warm_vector`)
GRADIENT_SHARE = 0.3
#: ... and refines it to DIAGNOSIS_TOL when the gradient is small or the sharpness is within this
#: share of the stability limit (the 10% margin and the 15% edge band, plus the rough error).
NEAR_LIMIT = 0.35
#: Where the gradient is small, λ_min decides saddle against minimum at −τ·|λ_max|
#: (``Thresholds.negative_curvature``): Lanczos is refined to this share of τ there.
SADDLE_SHARE = 0.1
#: The batch sharpness is measured on at least this many of ``train_batches`` ...
MIN_BATCHES = 8
#: ... and on more (up to ``max_batches``) until its standard error is at most this share of
#: the stability limit: then "above the limit by more than the 10% margin" is more than the
#: noise (the verdict asks for the excess beyond ``Thresholds.confidence`` standard errors).
#: At the edge of stochastic stability one batch's value spreads by about 0.2 of the limit
#: (teacher-student MLP, batch 8), so about 16 batches meet it.
BATCH_SHARPNESS_SE = 0.05
#: The default cap on the batches the batch sharpness is measured on.
MAX_BATCHES = 32
#: How a diagnosis computes its Hessian products (``backend=``): ``"double_backward"``, exact
#: (the default), or ``"finite_difference"``, central differences of the model's own gradients
#: (for a model only its engine can differentiate: FSDP2). Curvature's ``"auto"`` and
#: ``"forward_over_reverse"`` are refused: a diagnosis multiplies one or two vectors at a time,
#: where "auto" is double backward anyway and a vmapped forward-over-reverse pass gains nothing.
DIAGNOSIS_BACKENDS = ("double_backward", _fd.BACKEND)


def _sentence(reason: str) -> str:
    """A reason as a sentence: its first letter capitalised — a Latin one only (a reason that
    starts "λ_min = ..." read "Λ_min", another symbol: a review) — and a full stop."""
    first = reason[:1]
    return (first.upper() if first.isascii() else first) + reason[1:] + "."


@dataclass(frozen=True)
class Diagnosis:
    """Which state training is in, why, and what to do.

    Attributes:
        state: a :class:`~curvscope.diagnosis.State`, a string enum: ``"learning"`` |
            ``"unstable"`` | ``"edge_of_stability"`` | ``"flat"`` | ``"saddle"`` |
            ``"minimum"`` | ``"diverged"`` (``d.state == "learning"`` holds; given as a
            string, it is made the State of that name).
        evidence: the numbers behind it, an :class:`~curvscope.diagnosis.Evidence` (a
            read-only mapping, with the keys as attributes too) — ``loss``, ``grad_norm``,
            ``sharpness``, ``lambda_min``, ``stability_limit`` (None without optimizer or lr),
            ``directional_curvature``, ``newton_decrement`` (None where undefined),
            ``matvecs`` — and the thresholds, the learning rate and limit constant, the
            stable learning rate, and whether each estimate converged. A mapping given here
            is made an Evidence.
        reasons: the sentences that decided the state.
        advice: actionable sentences.
        confident: False when an estimate the verdict rests on did not converge (within the
            budget, or to the estimated accuracy of finite-difference products), was not
            measured, or was not finite beside a finite loss and gradient (an overflow or a
            kink: the reasons say which it may be).
        vectors: the top and bottom eigenvectors of the curvature the step sees, ``"top"`` and
            ``"bottom"`` (flat, over the measured parameters; this rank's entries of them with
            ``sharded=True``) — a warm start for the next diagnosis; empty where none was
            measured (diverged).

    Raises:
        ValueError: a state name that is not a state, or evidence without loss or grad_norm.
    """

    state: StateEnum
    evidence: Evidence
    reasons: list[str]
    advice: list[str]
    confident: bool = True
    vectors: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", as_state(self.state))
        object.__setattr__(self, "evidence", Evidence.from_mapping(self.evidence))

    @property
    def reasons_text(self) -> str:
        """The reasons as sentences: what ``str(d)`` says after its headline, before the
        advice (the Monitor's log lines carry it)."""
        return " ".join(_sentence(r) for r in self.reasons)

    def __str__(self) -> str:
        text = f"{self.state.headline}. {self.reasons_text}"
        if self.advice:
            text += " " + " ".join(self.advice)
        if not self.confident:
            text += (
                " (Some estimates did not converge, within the budget or to the accuracy of "
                "finite-difference products, or were not measured or not finite: treat this "
                "as tentative.)"
            )
        return text


class _Objective:
    """The objective the optimizer actually steps on: the loss plus the L2 penalty
    ½·Σ l2·θ² that torch's coupled ``weight_decay`` adds (none for AdamW or without decay).
    Its gradient, curvature and every quantity derived from them come from here.

    Its curvature is a composition of operators over C: the L2 term is a diagonal shift,
    H + diag(l2) (:meth:`~curvscope.spectrum.Operator.shifted`), and what a step scaled by the
    optimizer's step factors S sees is its congruence S^½ (H + diag(l2)) S^½
    (:meth:`~curvscope.spectrum.Operator.congruence`).

    Everything here is in the working dtype (float32 for a bfloat16 or float16 model, the
    parameters' dtype otherwise): only the curvature products run in the parameters' dtype.

    Over a sharded view (``space=C.sharded()``: an FSDP2 model, finite-difference products),
    every vector here — the gradient, l2·θ, the step factors, the eigenvectors — holds this
    rank's entries only, and every sum over a vector's entries is made whole over the ranks
    (:meth:`total`): nothing the size of the model is gathered."""

    def __init__(
        self, C: Curvature, limit: StabilityLimit | None, space: _Space | None = None
    ) -> None:
        self.C = C
        #: what the vectors are over: the Curvature, or this rank's part of it (``C.sharded()``)
        self.space: _Space = C if space is None else space
        self.dtype = working_dtype(C.dtype)
        self.scale = None if limit is None or limit.scale is None else limit.scale.to(self.dtype)
        self._curvature = as_operator(self.space)  # casts V to the parameters' dtype and back
        self._l2_gradient: Tensor | None = None  # l2·θ
        if limit is not None and limit.l2 is not None:
            l2 = limit.l2.to(self.dtype)
            self._curvature = self._curvature.shifted(l2)
            model = C.objective
            assert model is not None  # diagnose builds C from a model
            theta = _flatten(self.space, list(model.params.values()))
            self._l2_gradient = l2 * theta.to(self.dtype)
        self._seen = self._curvature
        #: S^½, where the optimizer scales its steps: the congruence's factor
        self.root = None if self.scale is None else self.scale.clamp_min(0).sqrt()
        if self.root is not None:
            self._seen = self._curvature.congruence(self.root)

    def total(self, t: Tensor) -> float:
        """A partial sum over this rank's entries made whole (as it is for whole vectors)."""
        return _total(self.space, t)

    def gradient(self) -> tuple[float, Tensor, Tensor]:
        """(the data loss, its gradient, the gradient of the objective)."""
        loss, g = self.space.loss_and_gradient()
        g = g.to(self.dtype)
        return loss, g, g if self._l2_gradient is None else g + self._l2_gradient

    def finite(self, g: Tensor) -> bool:
        """Whether every entry of g is finite (on every rank: they decide alike)."""
        return _finite_everywhere(self.space, g)

    def norm(self, g: Tensor) -> float:
        """‖g‖ over the whole vector."""
        return float(self._curvature.norm(g))

    def operator(self) -> Operator:
        """H + diag(l2) as an Operator (for CG)."""
        return self._curvature

    def scaled(self) -> Operator:
        """What the step sees: S^½ (H + diag(l2)) S^½ (S the optimizer's step factors)."""
        return self._seen

    def along(self, u: Tensor) -> float | None:
        """uᵀ(H + l2)u / uᵀS⁻¹u: the curvature along u in the metric the optimizer steps in
        (uᵀ(H + l2)u/‖u‖² without step factors; the coordinates S does not scale left out),
        from one product; None where u is 0 on the coordinates S scales."""
        metric = u * u
        if self.scale is not None:
            scaled = self.scale > 0
            u = torch.where(scaled, u, 0)
            metric = torch.where(scaled, metric / self.scale.where(scaled, 1), 0)
        norm = self.total(metric.sum())
        if not norm > 0:
            return None
        return self.total(u @ self._curvature(u[:, None])[:, 0]) / norm

    def directional(self, g: Tensor) -> tuple[float | None, float]:
        """(c, gᵀd): c = dᵀ(H + l2)d / gᵀd along the step direction d = S g — which is
        :meth:`along` d, since dᵀS⁻¹d = gᵀd (one product; None if gᵀd ≤ 0). A step −t·d
        changes the objective by −t·gᵀd + ½t²·c·gᵀd."""
        d = g if self.scale is None else self.scale * g
        gd = self.total(g @ d)
        return (self.along(d) if gd > 0 else None), gd


#: What a diagnosis's vectors are over: the whole Curvature, or this rank's part of it.
_Space = Curvature | ShardedCurvature


def _flatten(space: _Space, tensors: list[Tensor]) -> Tensor:
    """One tensor per measured parameter (sharded like it under FSDP2 or DeepSpeed ZeRO-3) as
    a vector of ``space``: gathered whole, or this rank's entries for a sharded view. A ZeRO-3
    engine's parameters hold only this rank's partition: whole, from every rank's entries (a
    collective)."""
    if isinstance(space, ShardedCurvature):
        return space.flatten(tensors)
    if _zero3_params(space):
        view = space.sharded()
        return view.gather(view.flatten(tensors))
    return space.flatten([gathered(t).detach() for t in tensors])


def _total(space: _Space, t: Tensor) -> float:
    """A sum over a vector's entries: this rank's partial sum made whole over the ranks for a
    sharded view; as it is for whole vectors (every rank holds them all)."""
    return float(space.reduce_sum(t) if isinstance(space, ShardedCurvature) else t)


def _finite_everywhere(space: _Space, t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite, on every rank (they decide alike): from one
    sum locally (:func:`all_finite`), the verdicts summed over a sharded view's ranks."""
    bad = 0.0 if all_finite(t) else 1.0
    return _total(space, torch.tensor(bad, dtype=torch.float64, device=t.device)) == 0


def zero_gradient(
    space: _Space,
    g: Tensor,
    thresholds: Thresholds,
    seed: int,
    params: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    """The parameter blocks that get no gradient, and the share of the measured parameters they
    hold: ``zero_gradient_blocks`` and ``zero_gradient_share``. A block's gradient (of the data
    loss: weight decay's l2·θ left out) must be exactly zero in every entry, so that an
    embedding's unused rows (or a pruned weight's masked entries) do not count; a network whose
    ReLUs all output 0 leaves every block before its output bias at exactly 0 — a minimum of
    that bias, with a stable learning rate of its own (an outside review read *minimum*, and
    *learning* at 10x the rate that killed it).

    Where such blocks hold at least ``thresholds.zero_gradient`` of the parameters, two products
    judge their curvature block by block:

    - H u, u random on them: a block whose own entries of H u are not all 0 has curvature of
      its own — its gradient of 0 is a stationary point of that block (every block at an exact
      minimum; an output bias at its optimum whose float16 gradient rounds to 0), not silence:
      it is left out of ``zero_gradient_blocks``;
    - H w, w random on every other block: of the rest, a block whose entries of H w are all 0
      has no curvature at all — dead units, which no step moves (``dead_blocks``,
      ``dead_share``) — while one whose entries are not is coupled to the others: a factor
      still at zero (a zero-initialized head as timm's ViT has, a LoRA adapter's B) that moves
      it once it moves.

    Where they are judged, ``zero_factor_blocks`` names the measured weights (two or more
    dimensions, or a single number) whose values are all exactly 0 (``params``: name → the
    parameter): a factor still at zero, which can leave the layers before it without gradient
    or curvature until it moves — two in series (a Fixup network's zero classifier and
    zero-initialized residual ends) leave them without curvature too, which no product shows.

    Reviews of this rule: its first version read a zero-initialized head as dead ("go back to a
    checkpoint"); its second judged all the blocks by one product, so that one stationary block
    (the float16 bias above), or a small zero-initialized branch beside a dead trunk holding 88%
    of the parameters, made a dead network read as a factor at zero."""
    nonzero, sizes = block_sums(space, (g != 0).to(torch.float64))
    silent = [i for i, n in enumerate(nonzero) if n == 0]
    found: dict[str, Any] = {}
    if silent and _share(silent, sizes) >= thresholds.zero_gradient:
        op = as_operator(space)  # the data loss's curvature: l2's shift would move every block
        gen, local = op.generator(seed), local_block_sizes(space)

        def rows(on: list[int]) -> list[float]:
            """Each block's count of nonzero entries of H u, u random on the blocks ``on``."""
            mask = _on(on, local, g.device)
            u = torch.randn(g.shape, generator=gen, dtype=g.dtype, device=g.device)
            Hu = op(torch.where(mask, u, 0)[:, None])[:, 0]
            return block_sums(space, (Hu != 0).to(torch.float64))[0]

        own = rows(silent)
        silent = [i for i in silent if own[i] == 0]  # no curvature of their own
        if silent and _share(silent, sizes) >= thresholds.zero_gradient:
            rest = [i for i in range(len(sizes)) if i not in silent]
            coupled = rows(rest) if rest else [0.0] * len(sizes)
            dead = [i for i in silent if coupled[i] == 0]
            found["dead_share"] = _share(dead, sizes)
            found["dead_blocks"] = [space.param_names[i] for i in dead]
            found["zero_factor_blocks"] = _zero_factors(space, params or {})
    found["zero_gradient_share"] = _share(silent, sizes)
    found["zero_gradient_blocks"] = [space.param_names[i] for i in silent]
    return found


def _zero_factors(space: _Space, params: Mapping[str, Tensor]) -> list[str]:
    """The measured weights — two or more dimensions, or one number (a ReZero gate) — whose
    values are all exactly 0: factors still at zero. Biases (one dimension) are left out: many
    initializations set them to 0, and they multiply nothing."""
    names = space.param_names
    if not all(n in params for n in names):
        return []
    theta = _flatten(space, [params[n] for n in names])
    nonzero, _ = block_sums(space, (theta != 0).to(torch.float64))
    shapes = [tuple(getattr(params[n], "ds_shape", params[n].shape)) for n in names]
    return [
        n
        for n, count, shape in zip(names, nonzero, shapes, strict=True)
        if count == 0 and (len(shape) >= 2 or math.prod(shape) == 1)
    ]


def _share(blocks: list[int], sizes: list[int]) -> float:
    """The share of the parameters the blocks (indices) hold."""
    return sum(sizes[i] for i in blocks) / max(sum(sizes), 1)


def _on(blocks: list[int], sizes: list[int], device: torch.device) -> Tensor:
    """A mask over a flat vector's entries: True on the blocks (indices)."""
    return torch.cat([torch.full((n,), i in blocks, device=device) for i, n in enumerate(sizes)])


def _zero3_params(C: Curvature) -> bool:
    """Whether the measured parameters are a DeepSpeed ZeRO-3 engine's (partitioned)."""
    model = C.objective
    return model is not None and any(_zero3.is_partitioned(p) for p in model.params.values())


def diagnose(
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    data: Any,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    lr: float | None = None,
    params: Iterable[nn.Parameter | str] | None = None,
    budget: int = DEFAULT_BUDGET,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    seed: int = 0,
    reduction: str | None = None,
    v0: Tensor | None = None,
    train_batches: Iterable[Any] | None = None,
    max_batches: int = MAX_BATCHES,
    accumulation: int = 1,
    adaptive: bool = False,
    backend: str = "double_backward",
    fd_eps: float | None = None,
    sharded: bool = False,
    clip_factor: float | None = None,
    progress_bar: bool | None = None,
) -> Diagnosis:
    """Say which state training is in, why, and what to do — from a few dozen curvature
    products, judged against the optimizer's own stability limit.

    It measures the loss and gradient (direction), the sharpness and the most negative
    curvature of the curvature the optimizer sees (for Adam and RMSprop the preconditioned
    P^-½ H P^-½, P from the optimizer's state), the curvature along the step direction, and the
    Newton decrement δ² = gᵀH⁻¹g (by CG; how far the loss is above the bottom of the local
    quadratic). Then :func:`~curvscope.diagnosis.classify.classify` decides.

    Precision: the curvature products run in the parameters' dtype; everything else (gradient,
    Lanczos, CG, the step factors) in float32 at least — a bfloat16 or float16 model is
    measured about as well as its products allow (eps(dtype)·|λ|), and ``vectors`` are float32
    for it (float64 for a float64 model). Inside ``torch.autocast`` the region is suspended for
    the diagnosis: the model is measured in its parameters' dtype.

    Args:
        model, loss_fn, data: as for :class:`~curvscope.Curvature` (the model is left as found).
        optimizer: a torch ``SGD``, ``Adam``, ``AdamW`` or ``RMSprop``: its learning rates,
            momentum, weight decay and state set the limit.
        lr: instead of an optimizer: plain gradient descent at this learning rate. With neither,
            stability cannot be judged; the other states can.
        params: restrict to some parameters (default: all that require grad — of them, those
            the optimizer steps, where it steps some only: a trainable backbone left out of
            a head's optimizer is not measured, and ``vectors`` are over the head).
        budget: cap on curvature products (default 80): Lanczos for both ends, then one
            product along the step direction, then CG with what is left.
        thresholds: what "small" and "margin" mean.
        seed: fixes the random start of Lanczos and the dropout masks.
        reduction: ``"mean"`` or ``"sum"``, how ``loss_fn`` reduces over a batch's samples
            (default: read from the loss or inferred, as for :class:`~curvscope.Curvature`). A
            summed loss is judged on the curvature of the sum, the one its steps follow.
        train_batches: for mini-batch training, the (inputs, targets) batches the optimizer
            steps on (a DataLoader, or a few of its batches). Then the *batch sharpness*
            E_B[d_Bᵀ H_B d_B / g_Bᵀ d_B] over up to ``max_batches`` of them — the curvature each
            mini-batch step meets along its own direction, which is what hovers at the limit in
            mini-batch training while the full-batch sharpness sits below it (Andreyev &
            Beneventano 2024) — is measured, with its standard error, and the verdict is
            about it (the full-batch sharpness beside it). The sample is sized from its own
            standard error: at least 8 batches, more until the standard error is at most 5%
            of the limit. Costs one gradient and one product per batch.
        max_batches: the most of ``train_batches`` to use (default 32; steps, under
            ``accumulation``).
        accumulation: the micro-batches each optimizer step accumulates (gradient
            accumulation: k backward passes, one ``opt.step()``): every ``accumulation``
            consecutive ``train_batches`` are taken as one step's batch, as the optimizer
            steps on them. Judged on the micro-batches, a step of k·B samples was read at B's
            batch sharpness — *unstable* at every probe while the loss fell, and for a summed
            loss *learning* while the run diverged (a review). Default 1.
        adaptive: measure only what the verdict needs (the Monitor's probes): the Newton
            decrement (CG, most of a diagnosis's products after Lanczos) only when the gradient
            is small — where it tells a minimum from a long valley; otherwise
            ``newton_decrement`` is None and ``decrement_converged`` None (not run).
        v0: warm start for Lanczos, e.g. ``previous.vectors["top"]`` and ``["bottom"]``
            stacked as columns: a nearby point then costs a few products (the Monitor does
            this).
        backend: how every Hessian product (the batch sharpness's too) is computed:
            ``"double_backward"`` (default; exact) or ``"finite_difference"`` — central
            differences (∇L(θ + εv) − ∇L(θ − εv))/(2ε) of the gradients the model's own forward
            and ``loss.backward()`` compute, for a model only its engine can differentiate
            (FSDP2's ``fully_shard``); each product is then off by O(eps(dtype)^(2/3)·‖H‖‖v‖)
            (about 4e-11·‖H‖ in float64, 2.4e-5·‖H‖ in float32; README "Accuracy"), below the
            1% of |λ_max| a diagnosis resolves, and costs two gradients; it needs float32 or
            float64 parameters. Curvature's ``"auto"`` and ``"forward_over_reverse"`` are
            refused: a diagnosis multiplies one or two vectors at a time, where ``"auto"``
            is double backward and a vmapped forward pass gains nothing.
        fd_eps: with ``backend="finite_difference"``, the step relative to the parameters'
            norm (default None: eps(dtype)^(1/3)), as for :class:`~curvscope.Curvature`.
        sharded: for a model larger than one device (FSDP2's ``fully_shard`` over one mesh
            dimension, or a DeepSpeed ZeRO-3 engine, with ``backend="finite_difference"``;
            every rank calls it together):
            every vector of the diagnosis — the gradient, the optimizer's step factors, the
            Lanczos and CG vectors — holds only this rank's entries (``C.sharded()``'s layout),
            so nothing the size of the model is gathered on one device. The evidence and the
            verdict are the same on every rank and equal the whole-vector diagnosis's (within
            the products' accuracy); ``vectors`` (and ``v0``) then hold this rank's entries
            (``cs.Curvature(...).sharded().gather(v)`` makes one whole).
        clip_factor: for clipped gradients, the fraction s in (0, 1] of the gradient the
            optimizer is given — ``clip_grad_norm_(params, max_norm)`` scales it by s =
            min(1, max_norm/‖g‖) — so that its steps are those of the rate s·η and the limit is
            c/(s·η) (:meth:`~curvscope.diagnosis.stability.StabilityLimit.clipped`); in the
            evidence as ``clip_factor``. The Monitor passes the median over the steps since its
            previous probe when given ``max_grad_norm``. Default None: unclipped steps.
        progress_bar: the products' progress bars (Lanczos, CG), as the estimators' —
            ``True`` always, ``False`` never (the Monitor's probes, inside a training loop),
            ``None`` (default) on a terminal once a run is seen to take seconds.

    Raises:
        ValueError: a budget under 8, a backend a diagnosis does not take, ``fd_eps`` without
            ``backend="finite_difference"`` or outside (0, 1), a 16-bit model with
            ``backend="finite_difference"``, ``sharded=True`` without
            ``backend="finite_difference"`` or on a model that is not sharded (by FSDP2 or
            DeepSpeed ZeRO-3); for a ZeRO-3 engine's parameters, an ``optimizer`` that is
            not the engine's, or whose state it offloads.
        TypeError: thresholds that are not :class:`~curvscope.Thresholds`, a non-numeric
            ``fd_eps``, a ``sharded`` that is not a bool.

    Example:
        >>> import torch, curvscope as cs
        >>> p = cs.problems.get("breast-cancer-logreg")
        >>> d = cs.diagnose(p.make_model(0), p.loss_fn, p.data, lr=1.0)
        >>> d.state, round(d.evidence["stability_limit"], 3)
        (<State.UNSTABLE: 'unstable'>, 2.0)
        >>> d.state == "unstable"  # a string enum
        True
    """
    if not isinstance(budget, int) or budget < 8:
        raise ValueError(f"budget must be an integer >= 8 (products), got {budget!r}")
    if not isinstance(thresholds, Thresholds):
        raise TypeError(f"thresholds must be a cs.Thresholds, got {type(thresholds).__name__}")
    check_int(max_batches, "max_batches", minimum=1)
    check_int(accumulation, "accumulation", minimum=1)
    clip = None if clip_factor is None else check_clip_factor(clip_factor)
    if clip is not None and optimizer is None and lr is None:
        raise ValueError(
            "clip_factor scales the stability limit of an optimizer (or of lr=), and there is "
            "neither: pass the optimizer that takes the clipped steps"
        )
    products = _Products.checked(backend, fd_eps, sharded)
    with _autocast_suspended(model), bars(progress_bar):
        return _diagnose(
            model,
            loss_fn,
            data,
            optimizer,
            lr,
            params,
            budget,
            thresholds,
            seed,
            reduction,
            v0,
            train_batches,
            max_batches,
            accumulation,
            adaptive,
            products,
            clip,
        )


def _diagnose(
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    data: Any,
    optimizer: torch.optim.Optimizer | None,
    lr: float | None,
    params: Iterable[nn.Parameter | str] | None,
    budget: int,
    thresholds: Thresholds,
    seed: int,
    reduction: str | None,
    v0: Tensor | None,
    train_batches: Iterable[Any] | None,
    max_batches: int,
    accumulation: int,
    adaptive: bool,
    products: _Products,
    clip: float | None,
) -> Diagnosis:
    start = time.perf_counter()
    if params is None:  # every product over them: the batch sharpness's too
        params = stepped_selection(model, optimizer)
    C = _curvature(model, loss_fn, data, params, seed, reduction, products)
    measured = C.objective
    assert measured is not None  # C is built from a model
    space = products.space(C)  # refused here, before any collective, if it cannot be
    limit = _limit(C, optimizer, lr, space)
    if limit is not None and clip is not None:
        limit = limit.clipped(clip)
    evidence = _first_evidence(limit, thresholds)
    if limit is not None and clip is not None:
        evidence["clip_factor"] = clip
    if _state_not_finite(limit, space):
        # a NaN gradient reached the optimizer's moments (Adam's v): its next step writes NaN
        # into the parameters — diverged, with no limit to measure against (it raised the
        # preconditioner's ValueError from inside mon.step before: an outside review)
        evidence["stability_limit"] = math.nan
        return _finish(evidence, thresholds, {}, True, start, C)
    objective = _Objective(C, limit, space)
    _check_start(v0, objective.scaled())  # before any pass over the data
    try:
        loss, data_g, g = objective.gradient()
    except FloatingPointError as e:  # a loss that is not finite says which (inf, or NaN)
        loss, data_g, g = getattr(e, "value", math.nan), None, None
    evidence["loss"] = loss
    evidence["grad_norm"] = math.nan if g is None else objective.norm(g)
    if g is None or not math.isfinite(loss) or not objective.finite(g):
        return _finish(evidence, thresholds, {}, True, start, C)
    assert data_g is not None  # g is
    replicas = _fd.replicas(measured, C.group) if products.backend == _fd.BACKEND else 1
    evidence["chance_loss"] = chance_loss(measured, C.group, replicas)
    averaged = _averaged_over(C, replicas)
    if averaged > 1:  # (before the curvature: an adaptive diagnosis refines near the limit
        # as a step meets it; train_batches' share replaces this one after)
        evidence["step_share"] = 1 / averaged
    try:
        evidence.update(zero_gradient(space, data_g, thresholds, seed, measured.params))
        vectors, converged = _measure_curvature(
            evidence, objective, C, g, budget, seed, v0, thresholds, adaptive
        )
    except FloatingPointError:  # a finite gradient, an overflowing curvature: diverged too —
        evidence.update(sharpness=math.nan, lambda_min=math.nan)  # not confidently where the
        kink = math.isfinite(evidence["grad_norm"])  # loss and ‖g‖ are finite: NaN at a kink
        return _finish(evidence, thresholds, {}, not kink, start, C)  # (‖x‖ at 0) reads so
    if train_batches is not None:
        evidence.update(
            _batch_sharpness(
                C,
                model,
                loss_fn,
                train_batches,
                max_batches,
                accumulation,
                limit,
                params,
                seed,
                products,
                averaged,
            )
        )
    if limit is not None:
        evidence["stable_lr"] = _stable_lr(limit, evidence)
    return _finish(evidence, thresholds, vectors, converged, start, C)


def _averaged_over(C: Curvature, replicas: int) -> float:
    """For a summed loss under a process group, the data-parallel ranks whose gradients a
    training step averages (DDP and FSDP divide the ranks' sum by their number; ``replicas``
    ranks share each sample under tensor parallelism): the operator is the sum over every
    rank's samples, and a step meets 1/R of it. It read the sum's curvature as the step's,
    R times too sharp (stop 39's review). 1 for a mean, or one process."""
    assert C.objective is not None  # C is built from a model
    if C.group is None or C.objective.reduction != "sum":
        return 1.0
    return world_size(C.group) / replicas


def _stable_lr(limit: StabilityLimit, evidence: Mapping[str, Any]) -> float:
    """The largest stable learning rate below both curvatures the verdict judges
    (:attr:`Facts.unstable`): the batch sharpness's alone named 5.58 beside *unstable* at lr 3,
    where the full-batch sharpness gives 1.77 and training at 3 blew up (an outside review)."""
    both = (step_scaled(evidence, evidence["sharpness"]), evidence.get("batch_sharpness"))
    met: list[float] = [v for v in both if v is not None and math.isfinite(v)]
    return limit.stable_lr(max(met)) if met else math.nan


def _state_not_finite(limit: StabilityLimit | None, space: _Space) -> bool:
    """Whether the optimizer's preconditioner has NaN/Inf entries (on any rank)."""
    if limit is None or limit.scale is None:
        return False
    return not _finite_everywhere(space, limit.scale)


class _Products(NamedTuple):
    """How a diagnosis computes its Hessian products: the backend and its step, and whether
    its vectors are sharded over the ranks like the parameters."""

    backend: str = "double_backward"
    fd_eps: float | None = None
    sharded: bool = False

    @classmethod
    def checked(cls, backend: object, fd_eps: object, sharded: object = False) -> _Products:
        """Validated: a backend of :data:`DIAGNOSIS_BACKENDS`, ``fd_eps`` as
        :class:`~curvscope.Curvature` checks it, and ``sharded`` only with finite
        differences."""
        if not isinstance(sharded, bool):
            raise TypeError(f"sharded must be True or False, got {sharded!r}")
        if sharded and backend != _fd.BACKEND:
            raise ValueError(
                "sharded=True shards the diagnosis's vectors like the parameters of a model "
                "sharded by FSDP2 or DeepSpeed ZeRO-3, whose products only finite differences "
                "of its own gradients give: pass backend='finite_difference' with it"
            )
        if backend not in DIAGNOSIS_BACKENDS:
            if backend in _PRODUCT_BACKENDS:
                raise ValueError(
                    f"a diagnosis multiplies one or two vectors at a time, where backend="
                    f"{backend!r} gains nothing over double backward; pass "
                    "backend='double_backward' (exact, the default), or "
                    "backend='finite_difference' for a model only its engine can differentiate "
                    "(FSDP2)"
                )
            raise ValueError(f"backend must be one of {DIAGNOSIS_BACKENDS}, got {backend!r}")
        return cls(str(backend), _fd.check_fd_eps(fd_eps, str(backend), "hessian"), sharded)

    def space(self, C: Curvature) -> _Space:
        """What the vectors are over: C, or this rank's part of it (a collective)."""
        if not self.sharded:
            return C
        try:
            return C.sharded()
        except ValueError as e:
            raise ValueError(
                f"sharded=True: {e} (here: drop sharded=True, and the diagnosis gathers its "
                "vectors whole)"
            ) from e


def _curvature(
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    data: Any,
    params: Iterable[nn.Parameter | str] | None,
    seed: int,
    reduction: str | None,
    products: _Products,
) -> Curvature:
    """The Hessian of the model's loss on ``data``, as the diagnosis measures it: by double
    backward (its blocks are small: a warm start of 2 vectors at most), or by finite
    differences of the model's own gradients where asked. ``params`` None: every parameter
    that requires grad — :func:`diagnose` and :func:`update_curvature` pass those the
    optimizer steps, where it steps some only (:func:`~curvscope.diagnosis.stability.
    stepped_selection`)."""
    return Curvature(
        model,
        loss_fn,
        data,
        params=params,
        seed=seed,
        backend=products.backend,
        reduction=reduction,
        fd_eps=products.fd_eps,
    )


def _limit(
    C: Curvature, optimizer: torch.optim.Optimizer | None, lr: float | None, space: _Space
) -> StabilityLimit | None:
    """The optimizer's stability limit, its step factors in the order of ``C``'s parameters
    (None without optimizer or lr); over a sharded ``space``: this rank's entries of them,
    and the unscaled coordinates counted over the whole vector (``space.reduce_sum``: over
    HSDP's shard dimension, not once per replica)."""
    sharded = isinstance(space, ShardedCurvature)
    if optimizer is None and lr is None:
        return None
    assert C.objective is not None  # C is built from a model
    limit = limit_of(optimizer, lr, list(C.objective.params.values()), local=sharded)
    if sharded and limit.preconditioned:  # every rank alike: the same optimizer
        count = torch.tensor(float(limit.unscaled), dtype=torch.float64, device=C.device)
        limit = replace(limit, unscaled=int(_total(space, count)))
    return limit


def _first_evidence(limit: StabilityLimit | None, thresholds: Thresholds) -> dict[str, Any]:
    """The fields of an :class:`Evidence` known before measuring (the rest are filled in as
    they are measured)."""
    return {
        "loss": math.nan,
        "grad_norm": math.nan,
        "stability_limit": None if limit is None else limit.limit,
        "lr": None if limit is None else limit.lr,
        "group_lrs": None if limit is None or not limit.group_lrs else list(limit.group_lrs),
        "limit_constant": None if limit is None else limit.constant,
        "optimizer": "none" if limit is None else limit.optimizer,
        "preconditioned": bool(limit and limit.preconditioned),
        "unscaled_coordinates": limit.unscaled if limit is not None and limit.unscaled else None,
        "thresholds": thresholds.as_dict(),
    }


def _measure_curvature(
    evidence: dict[str, Any],
    objective: _Objective,
    C: Curvature,
    g: Tensor,
    budget: int,
    seed: int,
    v0: Tensor | None,
    thresholds: Thresholds,
    adaptive: bool = False,
) -> tuple[dict[str, Tensor], bool]:
    """Both ends of the spectrum (Lanczos), the layer shares of the top eigenvector, the
    curvature along the step, and the Newton decrement by CG with the products left, into
    ``evidence``. Returns the eigenvectors and whether Lanczos converged.

    Lanczos runs to :data:`DIAGNOSIS_TOL`, and where the gradient is small — λ_min then decides
    saddle against minimum, at −τ·|λ_max| — on to a tenth of τ (:data:`SADDLE_SHARE`),
    warm-started from its vectors. ``adaptive``: only to the accuracy the verdict needs —
    first to :data:`ROUGH_TOL`, refined only where the gradient is small or the sharpness is
    within :data:`NEAR_LIMIT` of the stability limit (where the margin and the edge band are
    decided); CG only when the gradient is small. A warm start of several columns (the
    previous top and bottom eigenvectors) is then summed into one start vector."""
    op = objective.scaled()
    if op.dim == 1:  # any start is the eigenvector; the previous top and bottom (the same
        v0 = None  # vector: two columns of one dimension) were refused, ±1 mixed with ∓1 was 0
    warm = v0 is not None
    cap = max(6, int(LANCZOS_SHARE * budget))
    if not warm:  # a random start is judged from RANDOM_START_PRODUCTS on: room for them
        cap = max(cap, min(RANDOM_START_PRODUCTS, budget - 2))
    tol = ROUGH_TOL if adaptive else DIAGNOSIS_TOL
    if adaptive and v0 is not None and v0.ndim == 2:
        v0 = _warm_vector(objective, v0, g)
    r = eigenvalues(
        op,
        k=1,
        which=both_ends(op.dim, 1)[1],
        tol=tol,
        max_matvecs=max(1, cap - C.matvecs),  # the zero-gradient rule's products come first
        seed=seed,
        v0=v0,
        # the last probe's ends, summed into one vector where adaptive, judged at once (one
        # warm vector for two values waits for a random start's products by default)
        min_matvecs=0 if warm else None,
    )
    _record_spectrum(evidence, r)
    evidence["directional_curvature"], evidence["grad_dot_step"] = objective.directional(g)
    small = Facts(evidence, thresholds).small
    want = _refinement(evidence, thresholds, small, adaptive)
    if small:  # room for the refinement λ_min then needs: up to a random start's products
        cap = max(cap, min(C.matvecs + RANDOM_START_PRODUCTS, budget - 1))
    if want is not None and want < tol and cap > C.matvecs:
        r = _refined(op, r, want, max(2, cap - C.matvecs), seed, warm and small)
        _record_spectrum(evidence, r)
        small = Facts(evidence, thresholds).small
    assert r.vectors is not None  # return_vectors defaults to True
    vectors = {"top": r.vectors[:, 0], "bottom": r.vectors[:, -1]}
    # which parameter blocks carry the sharpest direction (free: the eigenvector is at hand)
    evidence["layer_shares"] = block_shares(objective.space, vectors["top"])
    if not adaptive or small:
        _decrement(objective, g, evidence, budget - C.matvecs, small)
    return vectors, r.all_converged


def _decrement(
    objective: _Objective, g: Tensor, evidence: dict[str, Any], left: int, small: bool
) -> None:
    """The Newton decrement δ² = gᵀH⁻¹g by CG within ``left`` products (where CG meets
    negative curvature and the gradient is small, the damped one: :func:`_damped_decrement`)."""
    gnorm = objective.norm(g)
    if gnorm == 0 and evidence["lambda_min"] > 0:  # δ² = 0, no CG (it was None: a review)
        evidence["newton_decrement"], evidence["decrement_converged"] = 0.0, True
    elif left >= 2 and gnorm > 0:
        sol = cg(objective.operator(), g, tol=1e-2, max_matvecs=left)
        if not sol.negative_curvature:
            evidence["newton_decrement"] = objective.total(g @ sol.x)
            evidence["decrement_converged"] = sol.converged
        elif small:  # only a small gradient's verdict reads it (minimum, or a long valley)
            _damped_decrement(objective, g, evidence, left - sol.matvecs)


def _damped_decrement(
    objective: _Objective, g: Tensor, evidence: dict[str, Any], left: int
) -> None:
    """Where CG met negative curvature — slight, or the gradient would not be small here — the
    Newton decrement is undefined, and *minimum* was said without it: healthy runs with most
    of their loss still to lose (a momentum MLP 129x above where it went on to, a label-noise
    run, gradient descent at the edge of stability) read "minimum … or stop", confident (an
    outside review). The decrement of the curvature shifted to be positive definite takes its
    place: δ_σ² = bᵀ(M + σI)⁻¹b in the metric the optimizer steps in (M its view of the
    curvature, b = S^½g; M = H, b = g without step factors), σ = 2(|λ_min| + its residual) —
    the decrease a step regularised past the negative curvature promises (below gᵀH⁻¹g along
    the positive curvature, the gradient along a flat direction counted at σ). CG's partial
    sums only grow towards it, so a run cut short by the budget gives a lower bound."""
    lmin = evidence.get("lambda_min")
    if left < 2 or lmin is None or not math.isfinite(lmin):
        return
    res = evidence.get("lambda_min_residual") or 0.0
    shift = 2.0 * (max(-lmin, 0.0) + (res if math.isfinite(res) else 0.0))
    if not shift > 0:
        return
    b = g if objective.root is None else objective.root * g
    sol = cg(objective.scaled(), b, tol=1e-2, max_matvecs=left, damping=shift)
    if not sol.negative_curvature:
        evidence["damped_decrement"] = objective.total(b @ sol.x)
        evidence["decrement_damping"] = shift
        evidence["decrement_converged"] = sol.converged


def _refinement(
    evidence: Mapping[str, Any], thresholds: Thresholds, small: bool, adaptive: bool
) -> float | None:
    """The accuracy Lanczos goes on to, if any: a tenth of τ where the gradient is small (λ_min
    to 1% of |λ_max| decided saddle against minimum at 1%: a saddle's −0.6% read +0.02 to
    +0.08, "minimum", confident — an outside review); for an adaptive diagnosis, 1% where the
    sharpness is near the limit."""
    if small:
        return SADDLE_SHARE * thresholds.negative_curvature
    return DIAGNOSIS_TOL if adaptive and _worth_refining(evidence) else None


def _refined(op: Operator, r: Any, tol: float, products: int, seed: int, mix: bool) -> Any:
    """Lanczos on to ``tol`` within ``products``, from the first run's vectors — mixed with a
    random vector and held to a random start's products where ``mix``: where the gradient is
    small λ_min decides saddle against minimum, and a warm start (the previous probe's vectors)
    holds little of a negative direction that appeared since (a review's Monitor-style start
    read *minimum*, λ_min ≈ 0, for −0.02 below a near-null cluster, 5 of 5 seeds)."""
    assert r.vectors is not None
    start, floor = r.vectors, None
    if mix:  # a review: a floor above max_matvecs raised
        start, floor = _mixed(op, r.vectors, seed), min(RANDOM_START_PRODUCTS, products)
    out = eigenvalues(
        op,
        k=1,
        which=both_ends(op.dim, 1)[1],
        tol=tol,
        max_matvecs=products,
        seed=seed,
        v0=start,
        min_matvecs=floor,
    )
    if floor is not None and floor < RANDOM_START_PRODUCTS:  # too few to judge a mixed start
        out = replace(
            out,
            converged=torch.zeros_like(out.converged),
            message=f"not converged: {products} products left, fewer than the "
            f"{RANDOM_START_PRODUCTS} a start with a random part is judged from; raise budget",
        )
    return out


def _mixed(op: Operator, vectors: Tensor, seed: int) -> Tensor:
    """One start vector: the warm ``vectors`` summed, plus a random vector of the same length —
    as rich in every eigenvector as half a random start, and in the warm ones still."""
    warm = vectors.sum(1)
    z = torch.randn(warm.shape, generator=op.generator(seed), dtype=warm.dtype, device=warm.device)
    return warm / op.norm(warm).clamp_min(1e-300) + z / op.norm(z)


def _check_start(v0: Tensor | None, op: Operator) -> None:
    """Refuse a warm start over other parameters than those measured now, naming why they
    change (a sharded one is left to the start vectors' own check, which names the shards)."""
    if isinstance(v0, Tensor) and v0.ndim in (1, 2) and len(v0) != op.n and op.shards is None:
        raise ValueError(
            f"v0's vectors have {len(v0)} entries, but this diagnosis measures {op.n}: what it "
            "measures is what the optimizer steps, which changes when a group's learning rate "
            "moves from or to 0, a parameter gets its first gradient, or one is frozen. Pass "
            "v0=None after such a change (the Monitor drops its warm start there), or params= "
            "to fix what is measured (this rank's entries of a sharded vector? "
            "C.sharded().gather(v) makes it whole)"
        )


def _warm_vector(objective: _Objective, v0: Tensor, g: Tensor) -> Tensor:
    """An adaptive probe's one start vector (a block of one: a product a step): the last
    probe's eigenvectors summed, rich in both ends, and :data:`GRADIENT_SHARE` of the gradient
    as the step sees it, S^½g — where the top of the spectrum moved to a direction the last
    probe's vectors hold little of, they alone converged on a lower eigenvalue, "converged"
    and confident: 8 of 204 probes of an outside review's fuzzing read the sharpness 5–15% low
    (2.46 for 2.60 under SGD on digits); the gradient, which training concentrates in the top
    eigenspace, holds it (3 of those 8 still above 5%, each under a |λ_min| several times
    λ_max, within 2.2·tol; the probes' products as before, `benchmarks/monitor.py`). A later
    review found one 14% low beside a small λ_min (the README says what a floor of products
    on the warm start would cost)."""
    start = v0.sum(1)
    seen = g.to(start.dtype) if objective.root is None else objective.root * g.to(start.dtype)
    size, g_size = objective.total(start @ start) ** 0.5, objective.total(seen @ seen) ** 0.5
    if not (size > 0 and g_size > 0 and math.isfinite(g_size)):
        return start
    return start / size + GRADIENT_SHARE * seen / g_size


def _record_spectrum(evidence: dict[str, Any], r: Any) -> None:
    evidence.update(
        sharpness=float(r.values[0]),
        lambda_min=float(r.values[-1]),
        sharpness_residual=float(r.residuals[0]),
        lambda_min_residual=float(r.residuals[-1]),
        eigen_converged=r.all_converged,
    )


def _worth_refining(evidence: Mapping[str, Any]) -> bool:
    """Whether the rough sharpness, as a step meets it (:func:`step_scaled`), is within
    :data:`NEAR_LIMIT` of the stability limit, where the verdict's margin and edge band are
    decided (an adaptive diagnosis refines it there; a summed loss under DDP was compared
    unscaled, R times too sharp, and a probe at the limit was left rough: the reread)."""
    limit = evidence.get("stability_limit")
    if limit is None or not math.isfinite(limit) or limit <= 0:
        return False
    return abs(step_scaled(evidence, evidence["sharpness"]) / limit - 1) <= NEAR_LIMIT


class UpdateCheck(NamedTuple):
    """What the Monitor's cheap tier measures (:func:`update_curvature`)."""

    #: uᵀ(H + l2)u / uᵀS⁻¹u along the last update u (None: a zero update).
    curvature: float | None
    #: The stability limit (None without optimizer or lr).
    limit: float | None
    #: vᵀAv/vᵀv for the previous top eigenvector v of the curvature A the step sees.
    top_curvature: float | None = None


def update_curvature(
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    data: Any,
    before: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    lr: float | None = None,
    params: Iterable[nn.Parameter | str] | None = None,
    seed: int = 0,
    reduction: str | None = None,
    top: Tensor | None = None,
    backend: str = "double_backward",
    fd_eps: float | None = None,
    sharded: bool = False,
    clip_factor: float | None = None,
) -> UpdateCheck:
    """The curvature along the optimizer's last update u = θ − θ_before, in the metric the
    optimizer steps in: uᵀ(H + l2)u / uᵀS⁻¹u (S its step factors: uᵀHu/‖u‖² for SGD; the
    Rayleigh quotient of the preconditioned P^-½ H P^-½ for Adam), from ONE curvature product
    on ``data``. It is at most the sharpness the step sees, and above the stability limit it
    says the next step overshoots along the direction training actually moves: the Monitor's
    cheap tier between full diagnoses. With ``top`` (a previous diagnosis's
    ``vectors["top"]``), one more product gives the curvature the step sees along that
    eigenvector — a lower bound on today's sharpness, close to it while the eigenvector turns
    slowly: the early warning, since the update itself lines up with the sharpest direction
    only once an overshoot along it has grown to dominate the gradient.

    Args:
        model, loss_fn, data, optimizer, lr, params, seed, reduction, backend, fd_eps, sharded,
            clip_factor: as for :func:`diagnose` (``backend="finite_difference"`` for a model
            only its engine can differentiate; ``sharded=True`` for one larger than one device,
            whose ``before`` and ``top`` are then sharded: nothing is gathered; ``clip_factor``
            for clipped steps: the limit returned is that of the clipped rate).
        before: the parameters before the update, by name (``model.named_parameters()``, of
            the model or of the module a DDP or torch.compile wrapper holds; under FSDP2,
            copies of its sharded parameters).
        top: a vector in the space of the curvature the step sees (S^½ (H + l2) S^½): this
            rank's entries of it with ``sharded=True``.

    Returns:
        An :class:`UpdateCheck`: the curvature along the update (None when the update is zero
        on the coordinates the step factors scale), the stability limit it meets (None without
        optimizer or lr), and the curvature along ``top`` (None without it). All None when
        nothing moved (before the optimizer's first step): there is no update to measure.

    Raises:
        KeyError: ``before`` lacks a measured parameter (the message names it).
        ValueError: ``top`` is not a vector of the measured parameters' length (of this rank's
            entries with ``sharded=True``); a ``before`` value that does not fit this rank's
            shard; a backend, ``fd_eps`` or ``sharded`` that :func:`diagnose` refuses; an
            optimizer that is not the DeepSpeed ZeRO-3 engine's, or whose state it offloads.
        TypeError: a ``sharded`` that is not a bool.
    """
    products = _Products.checked(backend, fd_eps, sharded)
    with _autocast_suspended(model):
        if params is None:
            params = stepped_selection(model, optimizer)
        C = _curvature(model, loss_fn, data, params, seed, reduction, products)
        measured = C.objective
        assert measured is not None  # C is built from a model
        inner, _, prefix = unwrapped(model)  # keys as a DDP or torch.compile wrapper names them
        known = dict(inner.named_parameters())
        before = {inner_name(k, prefix, known): t for k, t in before.items()}
        missing = [name for name in measured.params if name not in before]
        if missing:
            raise KeyError(f"`before` has no value for the parameter(s) {missing}")
        space = products.space(C)
        # sharded (FSDP2) parameters and values gathered whole, or this rank's entries
        u = _flatten(space, list(measured.params.values())) - _flatten(
            space, [before[name].to(p.device) for name, p in measured.params.items()]
        )
        if not _total(space, u.ne(0).sum().to(torch.float64)) > 0:
            return UpdateCheck(None, None, None)  # nothing moved (before the first step)
        limit = _limit(C, optimizer, lr, space)
        if limit is not None and clip_factor is not None:
            limit = limit.clipped(clip_factor)
        objective = _Objective(C, limit, space)
        bound = None if limit is None else limit.limit
        along_top = None
        if top is not None:
            t = together(lambda: _top(top, space, objective.dtype), C.group, C.device)
            seen = objective.scaled()(t[:, None])[:, 0]
            along_top = objective.total(t @ seen) / objective.total(t @ t)
        return UpdateCheck(objective.along(u.to(objective.dtype)), bound, along_top)


def _top(top: Tensor, space: _Space, dtype: torch.dtype) -> Tensor:
    """``update_curvature``'s ``top`` checked against the vectors' space, in ``dtype``."""
    n = space.num_params
    if top.ndim != 1 or top.numel() != n:
        whose = " of this rank's shards" if isinstance(space, ShardedCurvature) else ""
        raise ValueError(
            f"expected top of shape ({n},) — one entry per measured parameter{whose} — got "
            f"shape {tuple(top.shape)}: a previous probe's vectors['top'] over the same "
            "parameters"
        )
    return top.to(device=space.device, dtype=dtype)


def _autocast_suspended(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """An enclosing torch.autocast region suspended on the model's device: the diagnosis
    measures the model in its parameters' dtype, the loss and gradient as consistently as the
    curvature."""
    first = next(iter(model.parameters()), None)
    return autocast_off(first.device if first is not None else torch.device("cpu"))


def _batch_sharpness(
    C: Curvature,
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    batches: Iterable[Any],
    max_batches: int,
    accumulation: int,
    limit: StabilityLimit | None,
    params: Iterable[nn.Parameter | str] | None,
    seed: int,
    products: _Products,
    averaged: float = 1.0,
) -> dict[str, Any]:
    """The evidence of the batch sharpness on the training ``batches`` (beside ``C``, the
    operator on the probe data), each step's batch ``accumulation`` of them, at most
    ``max_batches`` steps: its value, its standard error and the steps it was measured on —
    and for a summed loss ``step_share``, B/N: a step of B samples meets B/N of the sum's
    curvature over N, B the largest step's (not their mean: an uneven last batch moved a mean
    with the batches read, 6% between two learning rates, a review). ``averaged``: the ranks
    a step averages a summed loss's gradients over (:func:`_averaged_over`), which divides
    both.

    The sample is sized from its own standard error: at least :data:`MIN_BATCHES` batches,
    then more until the standard error is at most :data:`BATCH_SHARPNESS_SE` of the stability
    limit (of the mean itself without one), or ``max_batches`` are used."""
    assert C.objective is not None  # C is built from a model
    reduction = C.objective.reduction
    values: list[float] = []
    sizes: list[float] = []
    # the user's RNGs untouched; under a process group each batch is measured by all ranks
    grouped = _grouped(fixed_pass(batches, seed), accumulation)
    try:
        for i, batch in enumerate(in_step(grouped, C.group, C.device, "train_batches")):
            if i >= max_batches or _precise_enough(values, limit):
                break
            Cb = _curvature(model, loss_fn, batch, params, seed + i, reduction, products)
            sizes.append(Cb.num_samples or 0.0)
            batch_objective = _Objective(Cb, limit, products.space(Cb))
            _, _, gb = batch_objective.gradient()
            c, _ = batch_objective.directional(gb)
            if c is not None:
                values.append(c / averaged)
    except FloatingPointError:  # a training batch's loss or curvature overflowed
        return {"batch_sharpness": math.nan, "batch_sharpness_stderr": math.inf, "batches": 1}
    if not sizes:  # an empty source: the verdict would lose the batch sharpness silently
        raise ValueError(
            "train_batches yielded no batch: pass (inputs, targets) batches like those the "
            "optimizer steps on (a DataLoader, or a list of a few of its batches), or leave it out"
        )
    ev: dict[str, Any] = {
        "batch_sharpness": statistics.fmean(values) if values else None,
        "batch_sharpness_stderr": _stderr(values) if values else None,
        "batches": len(values),
    }
    if reduction == "sum" and C.num_samples:
        ev["step_share"] = max(sizes) / C.num_samples / averaged
    return ev


def _grouped(batches: Iterable[Any], k: int) -> Iterator[Any]:
    """``batches`` as one step's each: one at a time, or lists of ``k`` consecutive ones (the
    last may be shorter: its step is taken too) — a list of batches is one step's data to a
    :class:`~curvscope.Curvature`, summed or weighed by their sizes as the loss reduces."""
    if k == 1:
        yield from batches
        return
    group: list[Any] = []
    for batch in batches:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group


def _stderr(values: list[float]) -> float:
    """The standard error of the mean of ``values`` (inf for fewer than two)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.inf


def _precise_enough(values: list[float], limit: StabilityLimit | None) -> bool:
    """Whether the batch-sharpness sample is large enough: :data:`MIN_BATCHES` values whose
    standard error is at most :data:`BATCH_SHARPNESS_SE` of the limit (of |mean| without a
    finite one)."""
    if len(values) < MIN_BATCHES:
        return False
    ref = limit.limit if limit is not None and math.isfinite(limit.limit) else None
    if ref is None:
        ref = abs(statistics.fmean(values))
    return _stderr(values) <= BATCH_SHARPNESS_SE * ref


def _finish(
    ev: dict[str, Any],
    th: Thresholds,
    vectors: dict[str, Tensor],
    confident: bool,
    start: float,
    C: Curvature,
) -> Diagnosis:
    ev["matvecs"] = C.matvecs + ev.get("batches", 0)
    ev["seconds"] = time.perf_counter() - start
    evidence = Evidence(**ev)
    state, reasons = classify(evidence, th)  # a non-finite loss or gradient: diverged
    unmeasured = ev.get("newton_decrement") is None and ev.get("damped_decrement") is None
    if state == State.MINIMUM and evidence.get("grad_norm") and unmeasured:
        confident = False  # the decrement it rests on was not measured (no products left)
    return Diagnosis(state, evidence, reasons, state.advice(evidence), confident, vectors)


def advice(state: str, ev: Mapping[str, Any]) -> list[str]:
    """What to do, for a state (or its name) and its evidence: ``state.advice(ev)``."""
    return as_state(state).advice(ev)
