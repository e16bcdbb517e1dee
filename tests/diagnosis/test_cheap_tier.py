"""The Monitor's cheap tier: the curvature along the optimizer's last update, uᵀHu / uᵀS⁻¹u,
from one product between full probes — against a dense float64 reference, and what it does in
a training loop (an early full probe when it says the next step overshoots)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacfwd

import curvscope as cs
from curvscope.diagnosis import classify
from curvscope.diagnosis.diagnosis import update_curvature


def _problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=g, dtype=torch.float64)
    Y = torch.randn(64, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    return model, _mse, (X, Y)


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()  # written out: nn.MSELoss fails under jacfwd(grad) in 2.13


def _dense_hessian(model, loss_fn, data) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        chunks = flat.split([math.prod(s) for s in shapes])
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return loss_fn(functional_call(model, params, (data[0],)), data[1])

    return jacfwd(grad(f))(theta)


def _step(model, loss_fn, data, opt):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    loss_fn(model(data[0]), data[1]).backward()
    opt.step()
    u = torch.cat([(p.detach() - before[n]).reshape(-1) for n, p in model.named_parameters()])
    return before, u


def test_sgd_update_curvature_is_the_rayleigh_quotient_of_h_plus_l2_along_the_update():
    model, loss_fn, data = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        before, u = _step(model, loss_fn, data, opt)
    H = _dense_hessian(model, loss_fn, data) + 0.01 * torch.eye(len(u), dtype=torch.float64)
    v = torch.randn(len(u), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c, limit, along = update_curvature(model, loss_fn, data, before, opt, top=v)
    assert c == pytest.approx(float(u @ H @ u / (u @ u)), rel=1e-10)
    assert along == pytest.approx(float(v @ H @ v / (v @ v)), rel=1e-10)
    assert limit == pytest.approx((2 + 2 * 0.9) / 0.05)
    eig = torch.linalg.eigvalsh(H)
    assert eig[0] <= c <= eig[-1]  # a Rayleigh quotient: never above the sharpness


def test_adam_update_curvature_is_measured_in_the_metric_adam_steps_in():
    model, loss_fn, data = _problem()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(4):
        before, u = _step(model, loss_fn, data, opt)
    H = _dense_hessian(model, loss_fn, data)
    # Adam's step factors S = 1/(√v̂ + ε): the metric uᵀS⁻¹u = Σ u²(√v̂ + ε)
    sq = []
    for p in model.parameters():
        state = opt.state[p]
        vhat = state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))
        sq.append((vhat.sqrt() + 1e-8).reshape(-1))
    metric = float((u * u * torch.cat(sq)).sum())
    v = torch.randn(len(u), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c, limit, along = update_curvature(model, loss_fn, data, before, opt, top=v)
    assert c == pytest.approx(float(u @ H @ u) / metric, rel=1e-8)
    w = v / torch.cat(sq).sqrt()  # S^½ v: the step's curvature is S^½ H S^½
    assert along == pytest.approx(float(w @ H @ w / (v @ v)), rel=1e-8)
    assert limit == pytest.approx(38 / 0.01)


def test_a_zero_update_has_no_curvature_and_the_model_is_left_as_found():
    model, loss_fn, data = _problem()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    state = torch.get_rng_state()
    assert update_curvature(model, loss_fn, data, before, lr=0.1) == (None, None, None)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.training and torch.equal(torch.get_rng_state(), state)
    with pytest.raises(KeyError, match="no value for the parameter"):
        update_curvature(model, loss_fn, data, {}, lr=0.1)
    moved = {n: t - 1e-3 for n, t in before.items()}
    with pytest.raises(ValueError, match=r"expected top of shape \(50,\)"):
        update_curvature(model, loss_fn, data, moved, lr=0.1, top=torch.ones(20))


# ------------------------------------------------------------------------------ the Monitor
def _quadratic():
    p = cs.problems.get("least-squares")  # a constant Hessian
    return p, p.make_model(0)


def _train(mon, p, model, opt, steps, lr_after=None, at=None):
    losses = []
    for step in range(steps):
        if at is not None and step == at:
            for group in opt.param_groups:
                group["lr"] = lr_after
        opt.zero_grad()
        loss = p.loss_fn(model(p.data[0]), p.data[1])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        mon.step(loss)
    return losses


def test_the_cheap_tier_warns_between_probes_when_the_update_overshoots(tmp_path):
    """Gradient descent on a quadratic at a stable rate, then at 1.5x the largest stable one:
    the error along the sharpest direction doubles each step, from almost nothing. The
    scheduled probes are 500 steps apart; the cheap tier checks every 3 steps and calls a full
    probe the moment the update's curvature passes the limit — before the loss has moved."""
    p, model = _quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = cs.diagnose(model, p.loss_fn, p.data, lr=0.1).evidence["sharpness"]
    log = tmp_path / "run.jsonl"
    with cs.Monitor(
        model, p.loss_fn, p.data, optimizer=opt, every=500, update_every=3, log=log
    ) as mon:
        losses = _train(mon, p, model, opt, 120, lr_after=1.5 * 2 / s, at=20)
    first = mon.history[0]
    assert first.state == "unstable"
    assert first.evidence["update_curvature"] > 1.1 * first.evidence["stability_limit"]
    step = json.loads(log.read_text().splitlines()[1])["step"]
    running_min = [min(losses[: i + 1]) for i in range(len(losses))]
    blow_up = next(i + 1 for i, v in enumerate(losses) if v > 10 * running_min[i])
    assert 20 < step < blow_up  # warned between the scheduled probes, before the blow-up
    assert max(losses[20:step]) < 1.01 * losses[20]  # the loss had not even started to rise
    checked = [k for k, _ in mon.updates]
    # every 3 steps, counted afresh after a probe (the loss's run-away calls one, later)
    gaps = [(a, b) for a, b in itertools.pairwise(checked) if b - a != 3]
    assert checked and all(any(a < k <= b for k in mon.probe_steps) for a, b in gaps), gaps
    _, records = cs.read_log(log)
    warned = dict(mon.updates)[step]  # the check that called the probe
    assert records[0]["updates"][-1] == [step, warned.curvature, warned.top_curvature]
    assert warned.curvature == first.evidence["update_curvature"]


def test_the_cheap_tier_does_not_alarm_on_a_stable_run_and_leaves_the_model_as_found():
    p, model = _quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = cs.Monitor(model, p.loss_fn, p.data, optimizer=opt, every=25, update_every=3)
    _train(mon, p, model, opt, 50)
    assert [d.state for d in mon.history] == ["learning", "learning"]
    assert len(mon.updates) >= 10
    limit = mon.history[0].evidence["stability_limit"]
    assert all(check.curvature < limit for _, check in mon.updates)
    # the checks changed nothing: the same run without them ends at the same parameters
    p2, model2 = _quadratic()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    _train(cs.Monitor(model2, p2.loss_fn, p2.data, optimizer=opt2, every=25), p2, model2, opt2, 50)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_compiled_model_is_checked_and_warm_started_as_its_module_is():
    """A Monitor on ``torch.compile(model)``: the cheap tier keyed the parameters before the
    update by the wrapper's names (``_orig_mod.*``) where the check names them as the module
    does — a KeyError at the first check — and the warm start never matched, so each probe
    paid a cold start (an outside review: 11–15 products against 4–5). Now both runs are the
    same: the same checks, the same products a probe."""
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model, loss_fn, data = _problem()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        watched = torch.compile(model, backend="aot_eager") if compiled else model
        mon = cs.Monitor(watched, loss_fn, data, optimizer=opt, every=5, update_every=2)
        for _ in range(20):
            opt.zero_grad()
            loss = loss_fn(watched(data[0]), data[1])
            loss.backward()
            opt.step()
            mon.step(loss)
        runs.append(mon)
    plain, compiled_run = runs
    assert len(compiled_run.updates) == len(plain.updates) >= 4
    assert [d.evidence.matvecs for d in compiled_run.history] == [
        d.evidence.matvecs for d in plain.history
    ]
    assert plain.history[-1].evidence.matvecs < plain.history[0].evidence.matvecs  # warm


@pytest.mark.parametrize(("every", "update_every"), [(4, 3), (6, 5), (10, 9), (5, 2)])
def test_a_copy_due_the_step_before_a_probe_waits_for_the_probe(every, update_every):
    """The copy is checked at the next step, which a probe's step skipped: update_every =
    every - 1 ran no check in 60 steps (a review). Now the copy waits until after the probe:
    a check every update_every + 1 steps, one fewer per probe it meets."""
    p, model = _quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = cs.Monitor(
        model, p.loss_fn, p.data, optimizer=opt, every=every, update_every=update_every
    )
    _train(mon, p, model, opt, 60)
    checked = [step for step, _ in mon.updates]
    assert len(checked) >= 60 // max(every, update_every + 2) - 1
    assert all(step % every for step in checked)  # never at a probe's step


@pytest.mark.parametrize("every", [1, 2])
def test_a_cadence_that_leaves_no_room_for_a_check_is_refused(every):
    """A check takes two steps between probes; every=2 with update_every=1 ran none in 60 steps
    without a word (an outside review): refused with the fix. update_every=0 is allowed."""
    p, model = _quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"no check would ever run.*every=3.*update_every=0"):
        cs.Monitor(model, p.loss_fn, p.data, optimizer=opt, every=every, update_every=1)
    cs.Monitor(model, p.loss_fn, p.data, optimizer=opt, every=every, update_every=0)


def test_the_cheap_tier_runs_with_the_default_cadence_and_a_fixed_one_only_when_asked():
    p, model = _quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fixed = cs.Monitor(model, p.loss_fn, p.data, optimizer=opt, every=5)
    off = cs.Monitor(model, p.loss_fn, p.data, optimizer=opt, update_every=0)
    _train(fixed, p, model, opt, 20)
    assert fixed.updates == [] and not fixed._updates_on
    assert not off._updates_on
    assert cs.Monitor(model, p.loss_fn, p.data, optimizer=opt)._updates_on


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (-1, ValueError, "update_every"),
        (1.5, TypeError, "update_every"),
        (True, TypeError, r"update_every.*bool"),
    ],
)
def test_update_every_is_checked(value, error, match):
    p, model = _quadratic()
    with pytest.raises(error, match=match):
        cs.Monitor(model, p.loss_fn, p.data, lr=0.1, update_every=value)


def test_an_update_curvature_above_the_limit_is_unstable_on_its_own():
    evidence = {
        "loss": 1.0,
        "grad_norm": 1.0,
        "sharpness": 1.0,  # an old sharpness estimate, below the limit
        "lambda_min": 0.0,
        "stability_limit": 2.0,
        "update_curvature": 2.5,
    }
    state, reasons = classify(evidence)
    assert state == "unstable"
    assert reasons[-1] == (
        "along the optimizer's last update the curvature is 2.5, 25% above the stability limit "
        "2 (> 10%): the next step overshoots along it"
    )
    assert classify({**evidence, "update_curvature": 2.1})[0] == "learning"
    # the update overshoots: unstable even where the gradient is small (no settling there)
    small = {**evidence, "grad_norm": 1e-9, "update_curvature": None}
    assert classify(small)[0] == "minimum"
    assert classify({**small, "update_curvature": 2.5})[0] == "unstable"


def test_the_previous_top_eigenvector_warns_as_soon_as_the_limit_falls_below_the_sharpness():
    """A learning rate raised past the limit (a warm-up overshooting): the update does not line
    up with the sharpest direction until the overshoot along it dominates the gradient (about
    40 steps here), but the curvature along the previous probe's top eigenvector is the
    sharpness at once: the cheap tier's first check after the change calls a full probe."""
    p, model = _quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = cs.diagnose(model, p.loss_fn, p.data, lr=0.1).evidence["sharpness"]
    changes = []
    mon = cs.Monitor(
        model,
        p.loss_fn,
        p.data,
        optimizer=opt,
        every=500,
        update_every=3,
        callback=lambda d, previous: changes.append((mon.steps, d.state)),
    )
    mon_probe_at_10 = None
    for step in range(1, 41):
        if step == 21:
            for group in opt.param_groups:
                group["lr"] = 1.5 * 2 / s
        opt.zero_grad()
        loss = p.loss_fn(model(p.data[0]), p.data[1])
        loss.backward()
        opt.step()
        if step == 10:
            mon_probe_at_10 = mon.probe()  # the top eigenvector the checks start from
        mon.step(loss)
    assert mon_probe_at_10.state == "learning"
    warned = [d for d in mon.history[1:] if d.state == "unstable"]
    assert warned, "no escalated probe"
    first = mon.history.index(warned[0])
    assert first == 1
    limit = warned[0].evidence["stability_limit"]
    assert warned[0].evidence["sharpness"] > 1.4 * limit
    assert changes[1][1] == "unstable" and 21 <= changes[1][0] <= 25  # the first check after
    # the update's own curvature was still far below the limit then
    assert all(
        check.curvature < 0.5 * check.limit for k, check in mon.updates if k <= changes[1][0]
    )


def test_a_warm_up_that_lowers_the_limit_under_the_sharpness_calls_a_probe_at_once():
    """The Monitor reads the learning rate every step (free): once a schedule has moved the
    limit 2/η under the last probe's sharpness by the margin, it probes at once — here at the
    first step where η > 1.1 · 2/λ_max, long before the loss runs away."""
    p, model = _quadratic()
    s = cs.diagnose(model, p.loss_fn, p.data, lr=0.1).evidence["sharpness"]
    opt = torch.optim.SGD(model.parameters(), lr=3 * 2 / s)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, 0.02 + k / 100))
    steps = []
    mon = cs.Monitor(
        model,
        p.loss_fn,
        p.data,
        optimizer=opt,
        every=30,
        update_every=0,
        callback=lambda d, previous: steps.append((mon.steps, d.state)),
    )
    losses = []
    for _ in range(80):
        opt.zero_grad()
        loss = p.loss_fn(model(p.data[0]), p.data[1])
        loss.backward()
        opt.step()
        warm.step()
        losses.append(float(loss.detach()))
        mon.step(loss)
    assert steps[0] == (30, "learning")  # η = 0.96 · 2/λ_max at step 30
    unstable = [k for k, state in steps if state == "unstable"]
    assert unstable, steps
    lr_at = [3 * 2 / s * min(1.0, 0.02 + k / 100) for k in range(1, 81)]
    first_past = next(k + 1 for k, lr in enumerate(lr_at) if lr * s / 2 > 1.1)
    assert unstable[0] == first_past < 60  # the step whose scheduled rate crossed the margin
    running_min = [min(losses[: i + 1]) for i in range(len(losses))]
    blow_up = next((i + 1 for i, v in enumerate(losses) if v > 10 * running_min[i]), None)
    assert blow_up is None or unstable[0] < blow_up


def test_the_checks_survive_parameters_frozen_or_added_and_copy_only_trainable_ones():
    """A layer frozen, a parameter group added between checks: the checks and probes go on
    (a warm start of another length is dropped, an update with a new parameter is not
    measured), and a frozen backbone is never copied."""
    torch.manual_seed(0)
    X, Y = torch.randn(64, 6, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1), nn.Linear(1, 1)).double()
    model[3].requires_grad_(False)
    opt = torch.optim.SGD([*model[0].parameters(), *model[2].parameters()], lr=0.05)
    mon = cs.Monitor(model, _mse, (X, Y), optimizer=opt, every=5, update_every=2)
    copies = []
    for step in range(1, 21):
        if step == 7:
            model[0].requires_grad_(False)  # freeze a layer
        if step == 12:
            model[3].requires_grad_(True)
            opt.add_param_group({"params": list(model[3].parameters())})
        opt.zero_grad()
        loss = _mse(model(X), Y)
        loss.backward()
        opt.step()
        mon.step(loss)
        if mon._before is not None:
            copies.append(set(mon._before))
    assert [d.state for d in mon.history] == ["learning"] * 4
    assert copies[0] == {"0.weight", "0.bias", "2.weight", "2.bias"}  # not the frozen 3.*
    assert {"2.weight", "2.bias"} in copies  # while layer 0 was frozen


def test_a_check_that_meets_an_overflow_calls_a_probe_instead_of_raising():
    """A new user's warm-up past the limit: once training overflows, the loss on the probe data
    is inf and the check's products cannot be taken; it called FloatingPointError out of
    mon.step (ending the user's loop) where a probe says diverged. SGD at 5x past 2/λ on a
    linear regression, a check every step."""
    torch.manual_seed(0)
    X = torch.randn(64, 8)
    Y = X @ torch.randn(8, 1)
    model = nn.Linear(8, 1)
    loss_fn = nn.functional.mse_loss
    sharpness = cs.diagnose(model, loss_fn, (X, Y), lr=0.01).evidence["sharpness"]
    opt = torch.optim.SGD(model.parameters(), lr=10 / sharpness)
    mon = cs.Monitor(model, loss_fn, (X, Y), optimizer=opt, every=30, update_every=1)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model(X), Y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        mon.step()  # no loss reported: the loss watch cannot see it (before: FloatingPointError)
    assert not math.isfinite(losses[-1])
    states = [(c, str(d.state)) for c, d in zip(mon.probe_causes, mon.history, strict=True)]
    assert ("check", "diverged") in states, states  # the check met the overflow: a probe
    assert mon.last.state == "diverged"
