"""A review of the Monitor's forecast from outside (issue 14): cases its own tests did not
cover — a Monitor given ``lr=`` instead of an optimizer, learning rates set to 0 and raised
again, several parameter groups, evidence that is not a number."""

from __future__ import annotations

import pytest
import torch

import curvscope as cs
from tests.diagnosis.test_forecast import _UV, _half_mse, _loop


def _uv_data() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(1, 1, dtype=torch.float64), torch.full((1, 1), 4.0, dtype=torch.float64)


def test_a_monitor_given_lr_forecasts_the_growth_as_one_given_the_optimizer():
    """Plain gradient descent at η = 0.05, monitored with ``lr=0.05`` (the README's form for
    gradient descent) instead of the optimizer: the sharpness's growth between the probes at
    steps 10 and 20 forecasts the crossing of the alarm bound at the same step — the forecast
    does not need a schedule to read, only the rate (it was off: no optimizer, no rate)."""
    own = {}
    for kind in ("optimizer", "lr"):
        model, data = _UV(), _uv_data()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        given = {"optimizer": opt} if kind == "optimizer" else {"lr": 0.05}
        mon = cs.Monitor(model, _half_mse, data, every=1000, update_every=0, **given)
        own[kind] = _loop(model, _half_mse, data, opt, mon, 100, probe_at=(10, 20))
        s1, s2 = (h.evidence["sharpness"] for h in mon.history[:2])
        growth = (s2 / s1) ** (1 / 10)
        bound = (1 + mon.thresholds.margin) * 2 / 0.05
        crossing = next(k for k in range(21, 1000) if s2 * growth ** (k - 20) > bound)
        assert own[kind] == [crossing], kind
    assert own["lr"] == own["optimizer"]


class _Scalars:
    """A stand-in for a SummaryWriter that keeps what it is given (the Monitor's only use of
    one is ``add_scalar`` and ``flush``)."""

    def __init__(self) -> None:
        self.steps: dict[str, list[int]] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.steps.setdefault(tag, []).append(step)

    def flush(self) -> None:
        pass


def test_the_forecasts_probes_are_logged_and_plotted_at_their_own_steps(tmp_path):
    """A warm-up's forecast probes come off the cadence: each is a log record (read back by
    ``cs.read_log``) and a TensorBoard point at the step it was made, the steps of
    ``probe_steps`` — not the cadence's multiples."""
    p = cs.problems.get("least-squares")
    model = p.make_model(0)
    s = cs.diagnose(model, p.loss_fn, p.data, lr=0.1).evidence["sharpness"]
    peak, warm = 0.5 * 2 / s, 60
    opt = torch.optim.SGD(model.parameters(), lr=peak)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm))
    board = _Scalars()
    log = tmp_path / "run.jsonl"
    with cs.Monitor(
        model,
        p.loss_fn,
        p.data,
        optimizer=opt,
        every=25,
        update_every=0,
        log=log,
        tensorboard=board,
    ) as mon:
        own = _loop(model, p.loss_fn, p.data, opt, mon, 60, schedule, probe_at=(3,))
    assert own == [7, 15, 25, 50]  # 4/60 of the peak at the hand-made probe: 8/60, 16/60
    assert mon.probe_steps == [3, *own]
    _, records = cs.read_log(log)
    assert [r["step"] for r in records] == mon.probe_steps
    lr = [r["lr"] for r in records]
    assert lr == pytest.approx([peak * (k + 1) / warm for k in mon.probe_steps], rel=1e-12)
    assert board.steps["curvscope/state_code"] == mon.probe_steps


def test_a_rate_set_to_zero_then_raised_probes_once_when_it_is_raised():
    """A learning rate of 0 (a frozen phase: no stability limit, the verdict says so), then
    raised: the limit came down from infinity, so the Monitor probes at the step the rate is
    raised — once, not at every step after."""
    p = cs.problems.get("least-squares")
    model = p.make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mon = cs.Monitor(model, p.loss_fn, p.data, optimizer=opt, every=10, update_every=0)
    own = []
    for k in range(1, 31):
        opt.zero_grad()
        loss = p.loss_fn(model(p.data[0]), p.data[1])
        loss.backward()
        opt.step()
        if k == 13:
            opt.param_groups[0]["lr"] = 0.01
        if mon.step(loss) is not None:
            own.append(mon.steps)
    assert own == [10, 13, 20, 30]
    assert mon.history[0].evidence["stability_limit"] == float("inf")
    assert any("learning rate 0" in r for r in mon.history[0].reasons)
    assert mon.history[1].evidence["stability_limit"] == 2 / 0.01


def _ranks_worker(rank: int, port: int, out: str, spike: float) -> None:
    """Both ranks sharpen alike (the same data, the curvature summed over them), but rank 1's
    loop reports a loss that ran away at step 15: the ranks' mean loss calls the probe at
    step 20 *diverged* on both (each rank's own history did before: rank 0 said *learning*).
    The forecast must fire on both at the same step (a probe is a collective: a rank probing
    alone would hang)."""
    from tests.distributed.test_distributed import _end, _init

    _init(rank, port)
    model, data = _UV(), _uv_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = cs.Monitor(model, _half_mse, data, optimizer=opt, every=1000, update_every=0)
    own = []
    for _ in range(60):
        opt.zero_grad()
        loss = _half_mse(model(data[0]), data[1])
        loss.backward()
        opt.step()
        reported = loss.detach() * spike if rank == 1 and mon.steps + 1 == 15 else loss
        if mon.step(reported) is not None:
            own.append(mon.steps)
        if mon.steps in (10, 20):
            mon.probe()
    torch.save(
        {"own": own, "steps": mon.probe_steps, "states": [str(d.state) for d in mon.history]},
        f"{out}/r{rank}.pt",
    )
    _end()


@pytest.mark.parametrize(("spike", "state"), [(1e6, "diverged"), (3.0, "learning")])
def test_every_rank_forecasts_at_the_same_step_when_their_losses_differ(tmp_path, spike, state):
    import torch.multiprocessing as mp

    from tests.distributed.test_distributed import WORLD, _free_port

    mp.start_processes(
        _ranks_worker,
        args=(_free_port(), str(tmp_path), spike),
        nprocs=WORLD,
        start_method="spawn",
    )
    got = [torch.load(tmp_path / f"r{rank}.pt") for rank in range(WORLD)]
    # the ranks' mean loss decides, alike on every rank: rank 1's own history called a 1e6
    # spike diverged where rank 0's said learning before; and the loss watch calls that probe
    # on both ranks the step after the spike (it waited for the probe at 20 before)
    assert got[0]["states"] == got[1]["states"] and got[0]["states"][1] == state
    assert got[0]["own"] == got[1]["own"] and got[0]["steps"] == got[1]["steps"]
    if state == "diverged":
        assert got[0]["own"][0] == 16 and got[0]["steps"][:3] == [10, 16, 20]
    else:
        assert got[0]["own"] == [38] and got[0]["steps"] == [10, 20, 38]  # as one process


class _Holder:
    """An optimizer wrapper that holds it as ``.optimizer`` without ``param_groups`` of its own:
    the form stability_limit (and so diagnose and the Monitor's probes) unwraps."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer


def test_a_wrapped_optimizer_warm_up_is_forecast_as_the_optimizer_itself():
    """The probes judge a wrapped optimizer by the one it holds; so does the forecast: the same
    warm-up probes as the bare optimizer's (it read no rate through the wrapper, and was off)."""
    p = cs.problems.get("least-squares")
    s = cs.diagnose(p.make_model(0), p.loss_fn, p.data, lr=0.1).evidence["sharpness"]
    peak, warm = 0.5 * 2 / s, 60
    own = {}
    for wrapped in (False, True):
        model = p.make_model(0)
        opt = torch.optim.SGD(model.parameters(), lr=peak)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm))
        given = _Holder(opt) if wrapped else opt
        mon = cs.Monitor(model, p.loss_fn, p.data, optimizer=given, every=1000, update_every=0)
        own[wrapped] = _loop(model, p.loss_fn, p.data, opt, mon, 40, schedule, probe_at=(3,))
        assert mon.history[0].evidence["stability_limit"] == pytest.approx(2 / (peak * 4 / warm))
    assert own[True] == own[False] == [7, 15, 31]
