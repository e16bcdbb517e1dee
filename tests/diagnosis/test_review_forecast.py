"""A review of the Monitor's forecast from outside (issue 14): cases its own tests did not
cover — a Monitor given ``lr=`` instead of an optimizer, learning rates set to 0 and raised
again, several parameter groups, evidence that is not a number."""

from __future__ import annotations

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
