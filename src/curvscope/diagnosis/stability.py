"""How sharp the loss may be before an optimizer's step overshoots: the stability limit.

On a quadratic with curvature s, gradient descent with learning rate η is stable iff η·s < 2;
heavy-ball momentum β (torch's SGD form) iff η·s < 2 + 2β; Nesterov iff η·s < (2 + 2β)/(1 + 2β);
Adam with β₁ iff η·s̃ < (2 + 2β₁)/(1 − β₁) (about 38 at β₁ = 0.9), where s̃ is the sharpness of
the *preconditioned* curvature P^-½ H P^-½, P = diag(√v̂ + ε) read from the optimizer's own state
(Cohen et al. 2021, 2022). So the limit is s* = c/η on the sharpness of S^½ H S^½, where S holds
each parameter's step factor relative to η (its group's learning rate ratio, times P⁻¹).

Weight decay: torch's ``weight_decay`` in SGD, Adam and RMSprop is L2 regularization added to
the gradient, so it is part of the curvature the optimizer sees (H + λI): ``l2`` carries it.
AdamW's decay is decoupled (θ ← θ − ηλθ, outside the gradient): it is not part of H, and it
shrinks the limit by only λ per unit of preconditioned sharpness, which is ignored here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_TORCH = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)


def _known() -> tuple[type, ...]:
    from curvscope.optim import AdaHessian  # a sibling part: imported when asked for

    return (*_TORCH, AdaHessian)


@dataclass(frozen=True)
class StabilityLimit:
    """The sharpness limit s* = constant / lr of an optimizer (or of plain gradient descent).

    Attributes:
        limit: s*, compared with the sharpness of the (preconditioned) curvature.
        lr: the reference learning rate η (the largest of the parameter groups).
        constant: c in s* = c/η (2 for gradient descent).
        optimizer: a plain description, e.g. ``"SGD (momentum 0.9)"``.
        preconditioned: whether the sharpness is that of S^½ H S^½ rather than of H.
        scale: per-parameter step factors S relative to η (flat, in the order of ``params``),
            or None for the identity.
        l2: per-parameter L2 coefficients the optimizer adds to the gradient (flat), or None.
        formula: the limit in words and symbols.
    """

    limit: float
    lr: float
    constant: float
    optimizer: str
    preconditioned: bool
    scale: Tensor | None
    l2: Tensor | None
    formula: str

    def stable_lr(self, sharpness: float) -> float:
        """The largest learning rate that is stable at this (preconditioned) sharpness."""
        return math.inf if sharpness <= 0 else self.constant / sharpness


def _group_of(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> list[dict | None]:
    by_id = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return [by_id.get(id(p)) for p in params]


def _flat(values: list[Tensor | float], params: list[Tensor]) -> Tensor:
    ref = params[0]
    parts = [
        (v.reshape(-1) if isinstance(v, Tensor) else torch.full((p.numel(),), float(v))).to(
            dtype=ref.dtype, device=ref.device
        )
        for v, p in zip(values, params, strict=True)
    ]
    return torch.cat(parts)


def stability_limit(
    optimizer: torch.optim.Optimizer | None = None,
    *,
    lr: float | None = None,
    params: list[Tensor] | None = None,
) -> StabilityLimit:
    """The stability limit of ``optimizer`` (read from its hyperparameters and state), or of
    plain gradient descent with learning rate ``lr``.

    Args:
        optimizer: a ``torch.optim.SGD``, ``Adam``, ``AdamW`` or ``RMSprop``, or curvscope's
            ``AdaHessian`` (Adam's rule with P = (√v̂)^k + ε from the Hessian diagonal), or a
            wrapper holding one as ``.optimizer``, as accelerate and Lightning do.
        lr: instead of an optimizer: plain gradient descent at this learning rate.
        params: the parameters, in the order of the flat vectors the scale should follow
            (default: the optimizer's own order).

    Raises:
        TypeError: an optimizer this function does not know (pass ``lr=`` instead).
        ValueError: neither or both of optimizer and lr; a non-positive lr; Adam or RMSprop
            before their first step (their preconditioner does not exist yet).

    Example:
        >>> import torch, curvscope as cs
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> round(cs.stability_limit(torch.optim.SGD([w], lr=0.1, momentum=0.9)).limit, 6)
        38.0
    """
    if (optimizer is None) == (lr is None):
        raise ValueError("give either optimizer= or lr= (for plain gradient descent), not both")
    if optimizer is None:
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        return StabilityLimit(
            2.0 / lr, float(lr), 2.0, "gradient descent", False, None, None, "s* = 2/η"
        )
    # wrappers (accelerate's AcceleratedOptimizer, Lightning's) hold the real one
    known = _known()
    while not isinstance(optimizer, known) and isinstance(
        getattr(optimizer, "optimizer", None), torch.optim.Optimizer
    ):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, known):
        raise _unknown(optimizer)
    if params is None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
    groups = _group_of(optimizer, params)
    lrs = [g["lr"] for g in groups if g is not None]
    if not lrs:
        raise ValueError("the optimizer updates none of these parameters: pass its model's")
    eta = float(max(lrs))
    if eta <= 0:  # e.g. a schedule that has decayed to 0: no step can overshoot
        return StabilityLimit(
            math.inf,
            0.0,
            math.inf,
            type(optimizer).__name__ + " (lr = 0)",
            False,
            None,
            None,
            "s* = ∞ at η = 0",
        )
    ratio = [0.0 if g is None else g["lr"] / eta for g in groups]  # frozen: never stepped
    wd = [0.0 if g is None else g.get("weight_decay", 0.0) for g in groups]
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.SGD):
        g0 = next(g for g in groups if g is not None)
        beta, damp, nesterov = g0["momentum"], g0["dampening"], g0["nesterov"]
        if nesterov:
            c, what = (2 + 2 * beta) / (1 + 2 * beta), f"SGD (Nesterov, momentum {beta:g})"
            formula = "s* = (2 + 2β)/((1 + 2β)·η)"
        elif beta > 0:
            c, what = (2 + 2 * beta) / (1 - damp), f"SGD (momentum {beta:g})"
            formula = "s* = (2 + 2β)/η" + (" / (1 − dampening)" if damp else "")
        else:
            c, what, formula = 2.0, "SGD", "s* = 2/η"
        scale = None if all(r == 1.0 for r in ratio) else _flat(ratio, params)
        return StabilityLimit(
            c / eta, eta, c, what, False, scale, _flat(wd, params) if any(wd) else None, formula
        )
    adaptive = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, known[-1])
    if isinstance(optimizer, adaptive):
        precond = []
        for p, g in zip(params, groups, strict=True):
            if g is None:
                precond.append(torch.zeros_like(p))
                continue
            state = optimizer.state.get(p, {})
            if not {"square_avg", "exp_avg_sq", "exp_hessian_diag_sq"} & set(state):
                raise ValueError(
                    f"{name} has taken no step yet, so its preconditioner √v̂ + ε does not exist; "
                    "diagnose after the first optimizer.step(), or pass lr= for plain GD"
                )
            precond.append(_inverse_preconditioner(optimizer, state, g))
        scale = _flat([r * q for r, q in zip(ratio, precond, strict=True)], params)
        if isinstance(optimizer, torch.optim.RMSprop):
            beta = groups[0]["momentum"] if groups[0] is not None else 0.0
            c = 2 + 2 * beta
            formula = "s* = (2 + 2β)/η on the sharpness of P^-½ H P^-½, P = √v + ε"
            what = f"RMSprop (momentum {beta:g})" if beta else "RMSprop"
        else:
            b1 = next(g for g in groups if g is not None)["betas"][0]
            c = (2 + 2 * b1) / (1 - b1)
            formula = "s* = (2 + 2β₁)/((1 − β₁)·η) on the sharpness of P^-½ H P^-½, P = √v̂ + ε"
            what = f"{name} (β₁ = {b1:g})"
        decoupled = isinstance(optimizer, (torch.optim.AdamW, known[-1]))
        l2 = None if decoupled or not any(wd) else _flat(wd, params)
        return StabilityLimit(c / eta, eta, c, what, True, scale, l2, formula)
    raise _unknown(optimizer)


def _unknown(optimizer: object) -> TypeError:
    return TypeError(
        "stability_limit knows torch.optim.SGD, Adam, AdamW, RMSprop and cs.optim.AdaHessian; got "
        f"{type(optimizer).__name__}. Pass lr= to judge against plain gradient descent instead"
    )


def _inverse_preconditioner(opt: torch.optim.Optimizer, state: dict, group: dict) -> Tensor:
    """P⁻¹ = 1/(√v̂ + ε) from the optimizer's state, as its next step will use it."""
    eps = group["eps"]
    if isinstance(opt, torch.optim.RMSprop):
        v = state["square_avg"]
        if group.get("centered"):
            v = v - state["grad_avg"] ** 2
        return 1.0 / (v.sqrt() + eps)
    b2 = group["betas"][1]
    if "exp_hessian_diag_sq" in state:  # AdaHessian: P = (√v̂)^k + ε, v̂ of the Hessian diagonal
        step = float(opt.state["global"]["step"])
        v_hat = state["exp_hessian_diag_sq"] / (1 - b2**step)
        return 1.0 / (v_hat.sqrt().pow(group["hessian_power"]) + eps)
    step = float(state["step"])
    v = state["exp_avg_sq"]
    if group.get("amsgrad") and "max_exp_avg_sq" in state:
        v = state["max_exp_avg_sq"]
    return 1.0 / ((v / (1 - b2**step)).sqrt() + eps)
