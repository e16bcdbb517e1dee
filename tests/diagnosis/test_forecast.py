"""The Monitor's forecast: a probe at once when the last verdict is stale by what is free to
know every step — a schedule that halved the stability limit (a warm-up doubling the learning
rate), or the sharpness's growth between the last two probes carried forward to the alarm
bound — whatever the cadence's budget allows."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from torch import nn

import curvscope as cs


class _UV(nn.Module):
    """f(x) = u·v·x fitted to 4 from u = v = 0.2: gradient descent sharpens from about 2.8 to
    u² + v² = 8 on the way to the minimum manifold uv = 4 (progressive sharpening)."""

    def __init__(self) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.tensor([0.2], dtype=torch.float64))
        self.v = nn.Parameter(torch.tensor([0.2], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.u * self.v


def _half_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).mean()


def _loop(model, loss_fn, data, opt, mon, steps, schedule=None, probe_at=()):
    """Train; ``mon.probe()`` by hand after the steps in ``probe_at``. Returns the steps at
    which the Monitor probed by itself."""
    own = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(data[0]), data[1])
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        if mon.step(loss) is not None:
            own.append(mon.steps)
        if mon.steps in probe_at:
            mon.probe()
    return own


def test_a_warm_up_probes_each_time_it_has_halved_the_limit():
    """Least squares (a constant Hessian) under a linear warm-up that stays below the limit:
    nothing else calls a probe, and one comes at each step where η first reaches twice the
    rate of the previous probe — none once the warm-up has ended."""
    p = cs.problems.get("least-squares")
    model = p.make_model(0)
    s = cs.diagnose(model, p.loss_fn, p.data, lr=0.1).evidence["sharpness"]
    peak, warm = 0.5 * 2 / s, 60  # half the limit at the end of the warm-up
    opt = torch.optim.SGD(model.parameters(), lr=peak)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm))
    log = io.StringIO()
    mon = cs.Monitor(model, p.loss_fn, p.data, optimizer=opt, every=1000, update_every=0, log=log)
    own = _loop(model, p.loss_fn, p.data, opt, mon, 120, schedule, probe_at=(3,))
    lr = [peak * min(1.0, (k + 1) / warm) for k in range(121)]  # the rate after step k
    expected, last = [], lr[3]
    for k in range(4, 121):
        if lr[k] >= 2 * last:
            expected.append(k)
            last = lr[k]
    assert own == expected == [7, 15, 31]  # 4/60 → 8/60 → 16/60 → 32/60 of the peak
    assert mon.probe_steps == [3, 7, 15, 31]  # the hand-made probe's step too
    assert mon.probe_causes == ["manual", "forecast", "forecast", "forecast"]
    records = [json.loads(line) for line in log.getvalue().splitlines()[1:]]  # after the header
    assert [(r["step"], r["cause"]) for r in records] == list(
        zip(mon.probe_steps, mon.probe_causes, strict=True)
    )
    assert {d.state for d in mon.history} == {"learning"}


def test_the_sharpness_growth_between_two_probes_forecasts_the_crossing():
    """Progressive sharpening at a constant rate: probes by hand at steps 10 and 20 measure the
    growth g per step; the Monitor probes by itself at the first step k where s₂·g^(k−20)
    passes the alarm bound 1.1 × the limit — and, that probe finding the sharpness levelling
    off (the growth re-measured), not again."""
    model = _UV()
    data = (torch.ones(1, 1, dtype=torch.float64), torch.full((1, 1), 4.0, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # limit 40
    mon = cs.Monitor(model, _half_mse, data, optimizer=opt, every=1000, update_every=0)
    own = _loop(model, _half_mse, data, opt, mon, 100, probe_at=(10, 20))
    (s1, s2), limit = [h.evidence["sharpness"] for h in mon.history[:2]], 40.0
    assert mon.history[0].evidence["stability_limit"] == limit
    growth = (s2 / s1) ** (1 / 10)
    assert growth > 1.05  # sharpening: 2.8 → 7.7
    bound = (1 + mon.thresholds.margin) * limit
    crossing = next(k for k in range(21, 1000) if s2 * growth ** (k - 20) > bound)
    assert own == [crossing]
    assert mon.history[2].evidence["sharpness"] < 0.25 * limit  # not confirmed: levelled off
    assert {d.state for d in mon.history} <= {"learning", "minimum"}


def test_a_rising_rate_adds_no_probe_once_the_verdict_is_unstable():
    """Past the limit the verdict already is unstable (the alarm is raised): a schedule that
    keeps raising the rate adds no forecast's probe — the loss running away past 1000x its
    first value calls one (cause "loss"), which says diverged, and nothing after it."""
    p = cs.problems.get("least-squares")
    model = p.make_model(0)
    s = cs.diagnose(model, p.loss_fn, p.data, lr=0.1).evidence["sharpness"]
    opt = torch.optim.SGD(model.parameters(), lr=1.5 * 2 / s)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 + k / 5)
    mon = cs.Monitor(model, p.loss_fn, p.data, optimizer=opt, every=1000, update_every=0)
    own = _loop(model, p.loss_fn, p.data, opt, mon, 12, schedule, probe_at=(1,))
    assert mon.history[0].state == "unstable"
    assert "forecast" not in mon.probe_causes
    ran_away = next(k for k, v in enumerate(mon.losses, 1) if v > 1e3 * mon.first_loss)
    assert own == [ran_away] and mon.probe_causes == ["manual", "loss"]
    assert mon.history[-1].state == "diverged"


def test_the_monitor_probes_and_checks_with_the_backend_it_is_given():
    """``Monitor(backend="finite_difference")`` hands the backend to its probes and to the
    cheap tier: on a smooth float64 MLP the same verdicts as the exact Monitor, the sharpness
    and the checks' curvatures within 1e-6 relative (the products' error is ~1e-10 there);
    a backend a diagnosis does not take is refused at construction, naming the fix."""
    runs = {}
    for backend in ("double_backward", "finite_difference"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        X = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        data = (X, X[:, :2].sin())
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
        mon = cs.Monitor(
            model, _half_mse, data, optimizer=opt, every=6, update_every=2, backend=backend
        )
        _loop(model, _half_mse, data, opt, mon, 18)
        runs[backend] = mon
    exact, fd = runs["double_backward"], runs["finite_difference"]
    assert [d.state for d in fd.history] == [d.state for d in exact.history]
    for a, b in zip(exact.history, fd.history, strict=True):
        assert abs(a.evidence["sharpness"] - b.evidence["sharpness"]) <= 1e-6 * abs(
            a.evidence["sharpness"]
        )
    # ... and they were computed otherwise: not equal to the last bit
    assert any(
        a.evidence["sharpness"] != b.evidence["sharpness"]
        for a, b in zip(exact.history, fd.history, strict=True)
    )
    assert len(fd.updates) == len(exact.updates) > 0
    assert any(
        a.curvature != b.curvature for (_, a), (_, b) in zip(exact.updates, fd.updates, strict=True)
    )
    for (_, a), (_, b) in zip(exact.updates, fd.updates, strict=True):
        assert abs(a.curvature - b.curvature) <= 1e-6 * abs(a.curvature)
    p = cs.problems.get("least-squares")
    with pytest.raises(ValueError, match="backend='double_backward'"):
        cs.Monitor(p.make_model(0), p.loss_fn, p.data, lr=0.1, backend="auto")


def test_the_limit_factor_is_the_hyperparameters_part_of_the_limit():
    """c/η, read at every step: what a schedule moves (the rate, and β or the momentum where it
    cycles them); 2/lr for plain gradient descent, inf at η = 0, None without a rule."""
    from curvscope.diagnosis.stability import limit_factor

    w = nn.Parameter(torch.zeros(2))
    assert limit_factor(lr=0.1) == pytest.approx(20.0)
    assert limit_factor(torch.optim.SGD([w], lr=0.1)) == pytest.approx(20.0)
    heavy = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    assert limit_factor(heavy) == pytest.approx(cs.stability_limit(heavy).limit)  # 38
    adam = torch.optim.Adam([w], lr=0.01, betas=(0.95, 0.999))
    assert limit_factor(adam) == pytest.approx((2 + 2 * 0.95) / (1 - 0.95) / 0.01)

    class Wrapper:  # accelerate's and Lightning's: the optimizer held as .optimizer
        optimizer = heavy

    assert limit_factor(Wrapper()) == limit_factor(heavy)
    assert limit_factor(torch.optim.SGD([w], lr=0.0)) == math.inf
    assert limit_factor(torch.optim.LBFGS([w])) is None
    assert limit_factor() is None


def test_a_schedule_that_lowers_adams_beta1_halves_its_limit_and_probes():
    """OneCycleLR cycles Adam's β₁ as well as its rate: β₁ from 0.95 to 0.85 lowers the limit's
    constant (2 + 2β₁)/(1 − β₁) from 78 to 24.7 at the same η — a halving the forecast sees (it
    reads c/η, not η alone). And ``forecast=False`` keeps the probes to the cadence; each probe's
    cause is recorded."""
    p = cs.problems.get("least-squares")
    steps = {}
    for forecast in (True, False):
        model = p.make_model(0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.95, 0.999))
        mon = cs.Monitor(
            model, p.loss_fn, p.data, optimizer=opt, every=1000, update_every=0, forecast=forecast
        )
        for k in range(1, 13):
            if k == 8:
                opt.param_groups[0]["betas"] = (0.85, 0.999)
            opt.zero_grad()
            loss = p.loss_fn(model(p.data[0]), p.data[1])
            loss.backward()
            opt.step()
            mon.step(loss)
            if k == 3:
                mon.probe()
        steps[forecast] = (mon.probe_steps, mon.probe_causes)
    assert steps[True] == ([3, 8], ["manual", "forecast"])
    assert steps[False] == ([3], ["manual"])
    with pytest.raises(TypeError, match="forecast must be True or False"):
        cs.Monitor(model, p.loss_fn, p.data, optimizer=opt, forecast="yes")


def test_a_loss_that_is_not_finite_calls_a_probe_at_once():
    """Free, like the forecast: the step a non-finite training loss is reported, a probe runs
    (cause "loss") and says diverged — not at the cadence's next probe, 1000 steps away — and
    no other after it for the same reason."""
    p = cs.problems.get("least-squares")
    model = p.make_model(0)
    mon = cs.Monitor(model, p.loss_fn, p.data, lr=0.01, every=1000, update_every=0)
    for loss in (1.0, 0.9, math.nan, math.nan, 0.8):
        mon.step(loss)
    assert mon.probe_steps == [3] and mon.probe_causes == ["loss"]
    assert mon.last.state == "diverged"
    assert (
        mon.last.reasons[0]
        == "the training loss ran away: above 1000 times its first value 1, or not finite"
    )


def test_a_growth_within_what_a_probe_resolves_is_not_carried_forward():
    """Two probes a step apart whose sharpness differs by less than GROWTH_FLOOR (5%, what an
    adaptive probe resolves): no growth is forecast (before, 1.3e-4 between two probes of
    unchanged parameters fired a probe 27,041 steps later)."""
    from curvscope.diagnosis.monitor import GROWTH_FLOOR

    assert GROWTH_FLOOR == 0.05
    model = _UV()
    data = (torch.ones(1, 1, dtype=torch.float64), torch.full((1, 1), 4.0, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = cs.Monitor(model, _half_mse, data, optimizer=opt, every=1000, update_every=0)
    own = _loop(model, _half_mse, data, opt, mon, 60, probe_at=(30, 31))  # near uv = 4: 8.0
    s1, s2 = (d.evidence["sharpness"] for d in mon.history)
    assert s1 < s2 < (1 + GROWTH_FLOOR) * s1
    assert own == [] and mon._growth == 1.0


def test_every_must_be_a_whole_number_of_steps_not_a_bool():
    p = cs.problems.get("least-squares")
    with pytest.raises(ValueError, match="every must be a positive integer"):
        cs.Monitor(p.make_model(0), p.loss_fn, p.data, lr=0.1, every=True)
