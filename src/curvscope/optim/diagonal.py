"""Diagonal-curvature optimizers: AdaHessian and Sophia, each a diagonal estimator (an injected
component) plus a preconditioned momentum rule. The user's loop only passes a closure: the
estimator takes its products from the closure's graph (no ``backward(create_graph=True)``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvscope.derivatives.distributed import all_reduce_mean
from curvscope.derivatives.flat import flatten
from curvscope.derivatives.kinds import likelihood_of, mean_divisor
from curvscope.derivatives.seeding import STEP_PROBES, rademacher
from curvscope.diagnosis.stability import StabilityRule, adam_constant, unscaled_left_out
from curvscope.optim._closure import Counts, Evaluation, model_outputs
from curvscope.optim.base import (
    CurvscopeOptimizer,
    Snapshot,
    StepInfo,
    Update,
    check_betas,
    check_int,
    check_lr,
    check_positive,
)


class DiagonalEstimator(Protocol):
    """Estimates diag of the curvature at the closure's point: flat (n,)."""

    def __call__(self, ev: Evaluation, generator: torch.Generator, counts: Counts) -> Tensor:
        """The estimate, the same on every rank of ``ev.group``: products through ``ev`` are the
        ranks' mean already; derivatives an estimator takes itself must be averaged by it
        (:func:`~curvscope.derivatives.distributed.all_reduce_mean`). An estimator whose
        ``products`` attribute is False takes no products through ``ev``'s graph (first
        derivatives only): a custom autograd Function whose backward leaves the graph is then
        not refused (it is where products are taken: absent, True)."""
        ...


def _settings(estimator: Any) -> dict[str, Any]:
    """What an estimator's ``settings()`` returns (the built-in ones': the arguments they were
    built with), or nothing for one without it — guessing from its attributes refused a user's
    own checkpoint over a counter it kept (a review)."""
    settings = getattr(estimator, "settings", None)
    return dict(settings()) if callable(settings) else {}


class Hutchinson:
    """diag(H) ≈ (1/m) Σ_j z_j ⊙ H z_j with Rademacher z_j (Bekas, Kokiopoulou & Saad 2007):
    unbiased; m Hessian-vector products. Used by AdaHessian and Sophia-H."""

    #: Hessian products through the step's graph
    products = True

    def __init__(self, samples: int = 1) -> None:
        self.samples = check_int("samples", samples)

    def __call__(self, ev: Evaluation, generator: torch.Generator, counts: Counts) -> Tensor:
        g = ev.flat_grad
        Z = rademacher(ev.n, self.samples, generator, g.dtype, g.device)
        return (Z * ev.hvp(Z)).mean(dim=1)

    def settings(self) -> dict[str, Any]:
        """What a state dict records of it, for ``load_state_dict`` to compare."""
        return {"samples": self.samples}

    def __repr__(self) -> str:
        return f"Hutchinson(samples={self.samples})"


class GaussNewtonBartlett:
    """diag(G) ≈ T·ĝ⊙ĝ, ĝ the gradient of the loss on labels *sampled from the model*
    (Liu et al. 2023, Sophia-G): for a loss that is a negative log-likelihood, E[N ĝĝᵀ] is the
    Gauss-Newton matrix (Bartlett's second identity), so its diagonal costs one backward pass
    and is never negative. The closure must return ``(loss, outputs)``, the outputs the loss
    was computed from (its rows at ``ignore_index`` are then told, and skipped); ``loss_fn``
    names the likelihood (``nn.CrossEntropyLoss``, ``nn.BCEWithLogitsLoss``, ``nn.MSELoss``)
    and the reduction ("mean": divided by the counted terms; "sum": not)."""

    #: first derivatives only: right through a custom Function whose backward leaves the graph
    products = False

    def __init__(self, loss_fn: Any) -> None:
        self.reduction = getattr(loss_fn, "reduction", "mean")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(
                f"GaussNewtonBartlett needs the loss's reduction, 'mean' or 'sum', to scale its "
                f"estimate; got reduction={self.reduction!r}: pass the loss the closure "
                "returns (reduced)"
            )
        self.likelihood = likelihood_of(
            loss_fn,
            who="GaussNewtonBartlett (Sophia-G)",
            instead="Hutchinson() (Sophia-H: the Hessian's diagonal, for any loss)",
        )
        self.loss_fn = loss_fn

    def __call__(self, ev: Evaluation, generator: torch.Generator, counts: Counts) -> Tensor:
        # on the evaluation's kernels: a checkpointed forward recomputed in these backward
        # passes must run on the kernels the forward did (torch's CheckpointError otherwise)
        with ev.kernels, torch.enable_grad():
            outputs = model_outputs(ev)
            # (outputs the loss does not depend on are refused here first, more precisely)
            as_terms, counted = self._terms(ev, outputs)
            # a penalty on the parameters in the closure's loss was left out of the estimate,
            # unsaid (as of Hessian-free's products: a review)
            ev.check_outputs_alone(
                outputs,
                "Use Hutchinson() (Sophia-H), which counts every term's curvature, or Sophia's "
                "decoupled weight_decay= in place of an L2 penalty, with the loss computed "
                "from the outputs alone",
            )
            rows = as_terms(outputs)
            s = self.likelihood.sample_grad(rows.detach(), generator, 1)[0]
            s = s * counted[:, None]
            # ĝ = (1/T) Σ_t J_tᵀ s_t; E[T ĝĝᵀ] = (1/T) Σ_t J_tᵀ F_t J_t: the Fisher of the loss,
            # T its divisor — the counted terms for a mean, 1 for a sum (it was the rows always:
            # 1/N too small for a summed loss, padding rows counted)
            T = mean_divisor(self.reduction, counted)
            if isinstance(T, Tensor):  # every row skipped: no term, no estimate (not 0/0)
                T = T.clamp_min(1)
            g_hat = torch.autograd.grad(rows, ev.params, s / T, retain_graph=True)
        counts.gradients += 1
        # each rank's own labels and gradient: the ranks' estimates averaged (a product
        # through ``ev`` is the ranks' mean already, so Hutchinson's needs none)
        return all_reduce_mean(T * flatten(g_hat) ** 2, ev.group)

    def _terms(self, ev: Evaluation, outputs: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        """How the outputs split into the loss's terms, and 1 for each term the loss counts, 0
        for one it skips — both read off the loss's own gradient in the outputs. For
        cross-entropy a row whose gradient is exactly 0 is skipped (``ignore_index``: a padding
        position; the last position of a causal language model's shifted loss; a row so
        confident that its float16 gradient underflows counts as skipped too, T then a little
        small), and the classes are where that gradient sums to zero over each row: dimension 1
        as ``nn.CrossEntropyLoss`` reads an (N, C, ...) tensor, or the last one, as a language
        model's loss reads its (B, T, V) logits (``logits.view(-1, V)``). Read as dimension 1,
        a GPT-2's (B, T, V) logits gave a Gauss-Newton diagonal 74% off, its LayerNorm's bias
        1e-35 for 4e-4 (an outside review). The other likelihoods count every entry."""
        if self.likelihood.name != "categorical":
            return self.likelihood.as_terms, outputs.new_ones(outputs.numel())
        (read,) = torch.autograd.grad(ev.loss_tensor, outputs, retain_graph=True, allow_unused=True)
        if read is None:
            raise ValueError(
                "GaussNewtonBartlett reads which rows the cross-entropy counts from the loss's "
                "gradient in the outputs, but the closure's loss does not depend on the outputs "
                "it returned (a reshaped copy such as logits.view(-1, V), or another forward's "
                "outputs): return the tensor the loss was computed from, e.g. "
                "(out.loss, out.logits)"
            )
        layouts = {1: self.likelihood.as_terms}  # class dimension → the rows' view
        if outputs.ndim > 2:
            layouts[outputs.ndim - 1] = lambda t: t.reshape(-1, t.shape[-1])
        passing = [dim for dim, as_terms in layouts.items() if _sums_to_zero(as_terms(read))]
        if len(passing) > 1:  # both: decided by the curvature, below
            passing = self._flat_along(ev, outputs, passing)
        if len(passing) == 1:
            terms = layouts[passing[0]](read)
            return layouts[passing[0]], terms.ne(0).any(-1).to(outputs.dtype)
        raise ValueError(
            f"GaussNewtonBartlett({self.loss_fn!r}): the closure's loss is not a cross-entropy "
            f"of the outputs it returned (shape {tuple(outputs.shape)}) over dimension 1 or the "
            "last, or is one over either alike: its gradient in them does not sum to zero over "
            "one of them alone; return the logits the cross-entropy was computed from, or use "
            "Hutchinson()"
        )

    @staticmethod
    def _flat_along(ev: Evaluation, outputs: Tensor, dims: list[int]) -> list[int]:
        """Of the class dimensions whose gradient rows both sum to zero — a (B, T, V) output
        with T = V, labels a permutation and near-uniform predictions: dimension 1 was taken,
        47% off (the diff review) — the one along which the loss is flat to second order too
        (a cross-entropy is unchanged by a shift of a row of logits: its output Hessian maps
        such a shift to 0, a shift along another dimension not): a random shift constant along
        each, one double backward through the loss's head each. Both or neither: none."""
        (g,) = torch.autograd.grad(ev.loss_tensor, outputs, create_graph=True, retain_graph=True)
        gen = torch.Generator(device=outputs.device).manual_seed(0)
        bent = []
        for dim in dims:
            shape = [1 if d == dim else n for d, n in enumerate(outputs.shape)]
            shift = torch.randn(shape, generator=gen, dtype=outputs.dtype, device=outputs.device)
            (moved,) = torch.autograd.grad(g, outputs, shift.expand_as(outputs), retain_graph=True)
            bent.append(float(moved.norm()) / float(shift.expand_as(outputs).norm()))
        flat = [dim for dim, b in zip(dims, bent, strict=True) if b <= FLAT * max(bent)]
        return flat if len(flat) == 1 else []

    def settings(self) -> dict[str, Any]:
        """What a state dict records of it: the likelihood's loss and its reduction."""
        return {"loss": type(self.loss_fn).__name__, "reduction": self.reduction}

    def __repr__(self) -> str:
        return f"GaussNewtonBartlett({self.loss_fn!r})"


#: how far from zero, relative to their entries, the row sums of a cross-entropy's gradient in
#: the outputs may be when its classes are read where they are: rounding's (half an eps of
#: bfloat16 at most, 0.004); read along another dimension they are of the entries' order (≈1)
ZERO_SUM = 0.05


#: a shift along the class dimension bends a cross-entropy this much less, at most, than one
#: along another (rounding's: exactly 0 in exact arithmetic)
FLAT = 1e-3


def _sums_to_zero(terms: Tensor) -> bool:
    """Whether the rows of a cross-entropy's gradient in its logits, (rows, classes), sum to
    zero — each is softmax minus the (smoothed, class-weighted) one-hot target, times the row's
    weight — taken over all rows at once: Σ_rows |Σ_c g| ≤ ZERO_SUM · Σ_rows Σ_c |g| (so that
    one very confident row's float32 softmax does not decide). True where every row is 0."""
    t = terms.detach().double()
    return bool(t.sum(-1).abs().sum() <= ZERO_SUM * t.abs().sum())


def _generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """Step t's probes: the documented ``STEP_PROBES`` derivation (seed · 1,000,003 + t)."""
    return torch.Generator(device=device).manual_seed(STEP_PROBES.seed(seed, step))


class _DiagonalMethod(CurvscopeOptimizer):
    """Shared: evaluate the closure, refresh the diagonal estimate every ``update_every`` steps,
    hand per-parameter (gradient, diagonal) to ``update_param``."""

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        estimator: Any,
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        update_every: int,
        seed: int,
        group: Any = None,
    ) -> None:
        """Checks and stores the hyperparameters both methods share; ``defaults`` holds the
        method's own (checked with every group's, :meth:`_check_group`)."""
        check_int("update_every", update_every)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"Invalid seed: {seed!r} (expected an integer)")
        defaults = dict(
            defaults,
            lr=lr,
            betas=tuple(betas) if isinstance(betas, tuple | list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            update_every=update_every,
            seed=seed,
        )
        if estimator is not None and not callable(estimator):
            raise TypeError(f"estimator must be callable (e.g. Hutchinson()), got {estimator!r}")
        super().__init__(params, defaults, group=group)
        self.estimator = estimator if estimator is not None else Hutchinson()
        self._set_global({"step": 0})

    #: options of the whole method, not of a group: one estimate refreshes every parameter
    SHARED = ("update_every", "seed")

    def state_dict(self) -> dict[str, Any]:
        """The base's, with ``"estimator"``: the name of the estimator's type, and
        ``"estimator_settings"``: its plain settings (``Hutchinson``'s ``samples``), which
        ``load_state_dict`` checks."""
        return {
            **super().state_dict(),
            "estimator": type(self.estimator).__name__,
            "estimator_settings": _settings(self.estimator),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The base's, refusing a state whose curvature estimate another type of estimator
        made: a Sophia-G checkpoint loaded into a default Sophia went on with Hutchinson's
        Hessian diagonal in place of the Gauss-Newton one, 2e-3 off in three steps, without a
        word (an outside review). A state dict saved without the entry loads as before."""
        saved, ours = state_dict.get("estimator"), type(self.estimator).__name__
        if saved is not None and saved != ours:
            name = type(self).__name__
            raise ValueError(
                f"{name}.load_state_dict: this state dict was saved with the estimator {saved}, "
                f"this {name} has {ours}: the curvature estimate in its state is another "
                f"matrix's diagonal. Build {name}(..., estimator={saved}(...)) to continue the "
                "run, or start afresh"
            )
        settings, mine = state_dict.get("estimator_settings"), _settings(self.estimator)
        if settings is not None and settings != mine:  # Hutchinson(samples=1) into samples=4:
            # the run went on with the other sampling, without a word (an outside review)
            name = type(self).__name__
            raise ValueError(
                f"{name}.load_state_dict: this state dict was saved with the estimator "
                f"{ours} {settings}, this {name} has {ours} {mine}: the run would go on with "
                f"another estimate than its state's. Build {name}(..., estimator={ours}(...)) "
                "with the saved settings to continue the run, or start afresh"
            )
        super().load_state_dict(state_dict)

    def _check_group(self, group: Mapping[str, Any]) -> None:
        """A group's hyperparameters, checked as the constructor's are — a group's own
        (``add_param_group``, or a dict passed to the constructor) was taken unchecked:
        ``hessian_power=3``, ``eps=0``, ``lr=-1``, and betas that failed only at the step; and
        before each step (:meth:`CurvscopeOptimizer._check_group`)."""
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_positive("eps", group["eps"])
        check_positive("weight_decay", group["weight_decay"], allow_zero=True)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``, its values checked (:meth:`_check_group`),
        refusing a group whose ``update_every`` or ``seed`` differs from the others': one
        diagonal estimate, drawn from one seed, refreshes every parameter at once (a second
        group's own value was ignored)."""
        if self.param_groups:
            for key in self.SHARED:
                self._same(key, param_group.get(key, self.defaults[key]))
        super().add_param_group(param_group)

    def _same(self, key: str, *own: Any) -> Any:
        """The method's ``key`` (one of :attr:`SHARED`): group 0's, refused where another group
        holds (or ``own``, a group being added, would hold) another value — a group edited
        after construction was ignored. Edit every group's to change it."""
        first = self.param_groups[0][key]
        for value in own or [g[key] for g in self.param_groups[1:]]:
            if value != first:
                raise ValueError(
                    f"{type(self).__name__}: {key}={value!r} in a parameter group differs "
                    f"from the others' {first!r}; it is the method's, not a group's: one "
                    "diagonal estimate refreshes every parameter at once (set it in every group)"
                )
        return first

    def update_param(
        self, p: Tensor, g: Tensor, d: Tensor | None, group: dict, t: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The step Δ for ``p`` (θ ← θ − Δ) and its new state, from its state ``self.state[p]``
        (read, never changed: the step commits the new one only when every value is finite)."""
        raise NotImplementedError

    #: the names of the per-parameter state tensors, in the order ``update_param`` reads them
    STATE: tuple[str, ...] = ()
    _kept = (*CurvscopeOptimizer._kept, "estimator")

    def _needs_estimate(self, p: Tensor) -> bool:
        """Whether ``p`` has no curvature estimate of its own yet, which a step must not be
        taken without (AdaHessian's: its step divides by it). Such a parameter, used at a step
        that does not refresh the estimate, is left as it is there, and the next step refreshes
        it — with ``update_every`` > 1 it was stepped by m/ε, 500–2,000 times lr; and a
        parameter the loss never uses costs no refresh."""
        return False

    def _step(self, closure: Any, snapshot: Snapshot) -> Tensor:
        closure, counts = self._begin(closure)
        method = self._global()
        t = method["step"] + 1
        # a refresh on schedule, or the one a parameter without an estimate of its own asked
        # for at the last step (:meth:`_needs_estimate`)
        refresh = (t - 1) % self._same("update_every") == 0 or bool(method.get("refresh", False))
        params = snapshot.params
        products_before = counts.products
        # products through the step's graph (a custom estimator is taken to take them)
        products = getattr(self.estimator, "products", True)
        ev = Evaluation(
            params,
            closure,
            counts,
            curvature=refresh,
            group=self.group,
            first_order=True,
            watched=products,
        )
        diag = None
        if refresh:
            gen = _generator(self._same("seed"), t, ev.flat_grad.device)
            diag = self.estimator(ev, gen, counts).detach()
        i, updates, step_sq = 0, list[Update](), list[Tensor]()
        assert ev.used is not None  # first_order
        used = iter(ev.used)
        grad = ev.flat_grad if ev.closure_grad is None else ev.closure_grad.to(ev.flat_grad)
        waiting = False  # a parameter used without an estimate of its own: refresh next step
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                k = p.numel()
                if not next(used):  # the loss does not use it: left as it is, as torch does
                    i += k
                    continue
                if diag is None and self._needs_estimate(p):  # none of its own: waits a step
                    waiting, i = True, i + k
                    continue
                g = grad[i : i + k].view_as(p)
                d = None if diag is None else diag[i : i + k].view_as(p)
                delta, new_state = self.update_param(p, g, d, group, t)
                updates.append((p, p - delta, new_state))
                step_sq.append(delta.square().sum())
                i += k
        self._commit(updates)  # nothing is written unless every value is finite
        self._set_global({**method, "step": t, "refresh": waiting})
        info = StepInfo(
            ev.loss,
            float(grad.norm()),
            float(torch.stack(step_sq).sum()) ** 0.5 if step_sq else 0.0,
            None,
            None,
            None,
            True,
            counts.products - products_before,
            "curvature estimate refreshed" if refresh else "",
        )
        self._end(counts, info)
        return ev.loss_tensor.detach()


def _adahessian_preconditioner(
    opt: Optimizer, state: Mapping[str, Any], group: Mapping[str, Any]
) -> Tensor | None:
    """AdaHessian's P⁻¹ = 1/((√v̂)^k + ε), v̂ the bias-corrected average of D², as its next step
    will use it (None before its first step); 0 where v̂ is still exactly 0, as for Adam."""
    if "exp_hessian_diag_sq" not in state:
        return None
    b2 = float(group["betas"][1])
    method_state: dict[Any, Any] = opt.state  # "global": the step counter, a str key
    step = float(method_state["global"]["step"])
    if "step" in state:  # this parameter's own count (a state from before: the method's)
        step = float(state["step"])
    v_hat = state["exp_hessian_diag_sq"] / (1 - b2**step)
    inverse = 1.0 / (v_hat.sqrt().pow(float(group["hessian_power"])) + float(group["eps"]))
    return unscaled_left_out(v_hat, inverse)  # a zero average: not scaled yet, not 1/ε


class AdaHessian(_DiagonalMethod):
    """AdaHessian (Yao et al. 2021): Adam with the squared Hessian diagonal in place of g².

    m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)D²,  D = the estimator's diag(H) (averaged over each
    convolution kernel's spatial positions when ``spatial_average``: 4-D and 5-D parameters,
    Conv2d's and Conv3d's, as the paper's code; a 3-D one may be a Conv1d kernel, a (1, T, d)
    position embedding or (E, d_in, d_out) experts, whose entries are not positions of one
    kernel, and is not averaged);
    θ ← θ − lr·( m̂ / (v̂^{k/2} + ε) + wd·θ ), m̂, v̂ bias-corrected by each parameter's own step
    count (as torch's Adam: a group added, or a layer unfrozen, after 3000 steps took a first
    step of 3·lr), k = ``hessian_power``. A parameter is never stepped without its own estimate
    of D: one used for the first time at a step that does not refresh it — added mid-cycle, or
    idle at the last refresh — is left as it is there and the next step refreshes the estimate
    (it stepped by m/ε, hundreds of lr, with ``update_every`` > 1).

    Args:
        lr, betas, eps, weight_decay (decoupled), hessian_power: as in the paper (defaults its).
        update_every: refresh D every this many steps (reusing it in between).
        estimator: a :class:`DiagonalEstimator` (default ``Hutchinson()``).
        seed: fixes the random probes (step t uses seed and t, so a resumed run repeats them).
        group: the process group to average over (default: the initialized one; ``False``:
            this process alone): :class:`~curvscope.optim.base.CurvscopeOptimizer`.
    """

    #: per-parameter state: momentum m, the average v of D², the last estimate D, and the
    #: parameter's own step count (a 0-d tensor)
    STATE = ("exp_avg", "exp_hessian_diag_sq", "hessian_diag", "step")
    #: read by ``cs.stability_limit``: Adam's limit (2 + 2β₁)/((1 − β₁)·η) on the sharpness
    #: preconditioned by P = (√v̂)^k + ε; the weight decay is decoupled (not in the gradient)
    stability_rule = StabilityRule(adam_constant, _adahessian_preconditioner, decoupled_decay=True)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_every: int = 1,
        spatial_average: bool = True,
        estimator: DiagonalEstimator | None = None,
        seed: int = 0,
        *,
        group: Any = None,
    ) -> None:
        super().__init__(
            params,
            {"hessian_power": hessian_power, "spatial_average": spatial_average},
            estimator,
            group=group,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            update_every=update_every,
            seed=seed,
        )

    def _check_group(self, group: Mapping[str, Any]) -> None:
        super()._check_group(group)
        power = group["hessian_power"]
        if isinstance(power, bool) or not isinstance(power, int | float) or not 0 < power <= 1:
            raise ValueError(f"Invalid hessian_power: {power!r} (expected in (0, 1])")

    def _needs_estimate(self, p: Tensor) -> bool:
        return "hessian_diag" not in self.state.get(p, {})

    def update_param(
        self, p: Tensor, g: Tensor, d: Tensor | None, group: dict, t: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        st = self.state.get(p, {})
        m = st["exp_avg"] if "exp_avg" in st else torch.zeros_like(p)
        v = st["exp_hessian_diag_sq"] if "exp_hessian_diag_sq" in st else torch.zeros_like(p)
        # its own count, as torch's Adam keeps it (a CPU tensor: read without a device sync);
        # 1 for a new parameter, and a state saved before counts kept the method's
        before = float(st["step"]) if "step" in st else float(t - 1 if st else 0)
        count = torch.tensor(before + 1, dtype=torch.float32, device="cpu")
        if d is not None:
            if group["spatial_average"] and p.ndim in (4, 5):
                d = d.abs().mean(dim=tuple(range(2, p.ndim)), keepdim=True).expand_as(p)
            # kept in the parameter's dtype, as load_state_dict casts it: a float32 layer of a
            # model with float64 ones kept a float64 estimate, and a resumed run drifted 6e-8
            # from the one not interrupted (an outside review's fuzzing)
            D = d.to(p.dtype, copy=True)
        else:  # an estimate of its own, made at an earlier step (_needs_estimate)
            D = st["hessian_diag"]
        b1, b2 = group["betas"]
        m = m.mul(b1).add_(g, alpha=1 - b1)
        v = v.mul(b2).addcmul_(D, D, value=1 - b2)
        m_hat = m / (1 - b1 ** float(count))
        v_hat = v / (1 - b2 ** float(count))
        denom = v_hat.sqrt().pow(group["hessian_power"]).add_(group["eps"])
        delta = group["lr"] * (m_hat / denom + group["weight_decay"] * p)
        return delta, dict(zip(self.STATE, (m, v, D, count), strict=True))


class Sophia(_DiagonalMethod):
    """Sophia (Liu et al. 2023): momentum preconditioned by a diagonal curvature estimate and
    clipped element-wise.

    m ← β₁m + (1−β₁)g;  every k steps h ← β₂h + (1−β₂)ĥ (ĥ from the estimator);
    θ ← θ(1 − lr·wd) − lr·sign(m)·min(|m| / max(ρ·h, ε), 1).

    The clip bounds every coordinate's step by lr however flat or negative the estimate is.
    Defaults are the paper's (ρ = 0.04, k = 10, β = (0.965, 0.99), wd = 0.1); the estimator is
    ``Hutchinson()`` (Sophia-H) or ``GaussNewtonBartlett(loss_fn)`` (Sophia-G). Sophia-H's
    probes are Rademacher where the paper's Algorithm 1 draws u ~ N(0, I): the same mean,
    diag(H), and a lower variance per probe (Σ_{j≠i} H_ij² for entry i, against that plus
    2H_ii²).

    Args:
        lr, betas, rho, weight_decay (decoupled), update_every, eps: as above.
        estimator: a :class:`DiagonalEstimator` (default ``Hutchinson()``).
        seed: fixes the random probes (step t uses seed and t, so a resumed run repeats them).
        group: the process group to average over (default: the initialized one; ``False``:
            this process alone): :class:`~curvscope.optim.base.CurvscopeOptimizer`.
    """

    #: per-parameter state: momentum m, the curvature average h
    STATE = ("exp_avg", "hessian")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        update_every: int = 10,
        eps: float = 1e-12,
        estimator: DiagonalEstimator | None = None,
        seed: int = 0,
        *,
        group: Any = None,
    ) -> None:
        super().__init__(
            params,
            {"rho": rho},
            estimator,
            group=group,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            update_every=update_every,
            seed=seed,
        )

    def _check_group(self, group: Mapping[str, Any]) -> None:
        super()._check_group(group)
        check_positive("rho", group["rho"])

    def update_param(
        self, p: Tensor, g: Tensor, d: Tensor | None, group: dict, t: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        st = self.state.get(p) or {k: torch.zeros_like(p) for k in self.STATE}
        m, h = (st[k] for k in self.STATE)
        b1, b2 = group["betas"]
        if d is not None:
            h = h.mul(b2).add_(d, alpha=1 - b2)
        m = m.mul(b1).add_(g, alpha=1 - b1)
        ratio = (m.abs() / (group["rho"] * h).clamp_min(group["eps"])).clamp_max(1)
        delta = group["lr"] * (group["weight_decay"] * p + m.sign() * ratio)
        return delta, dict(zip(self.STATE, (m, h), strict=True))
