"""Stability limits read from live torch optimizers."""

import pytest
import torch

import curvscope as cs


def params(n=3):
    return [torch.nn.Parameter(torch.ones(n, dtype=torch.float64))]


@pytest.mark.parametrize(
    ("make", "limit"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 20.0),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 38.0),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 3.8 / 2.8 / 0.1),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.5), 3.0 / 0.5 / 0.1),
    ],
)
def test_sgd_limits(make, limit):
    r = cs.stability_limit(make(params()))
    assert r.limit == pytest.approx(limit)
    assert not r.preconditioned and r.scale is None and r.l2 is None


def test_plain_gradient_descent_and_argument_errors():
    assert cs.stability_limit(lr=0.5).limit == 4.0
    with pytest.raises(ValueError, match="either optimizer= or lr="):
        cs.stability_limit()
    with pytest.raises(ValueError, match="either optimizer= or lr="):
        cs.stability_limit(torch.optim.SGD(params(), lr=0.1), lr=0.1)
    with pytest.raises(ValueError, match="positive number"):
        cs.stability_limit(lr=-1.0)
    with pytest.raises(TypeError, match="Pass lr="):
        cs.stability_limit(torch.optim.Adagrad(params(), lr=0.1))


def _stepped(opt, p, grad):
    p[0].grad = grad.clone()
    opt.step()
    p[0].grad = None
    return opt


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_limit_is_on_the_preconditioned_curvature(cls):
    p = params()
    opt = cls(p, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    with pytest.raises(ValueError, match="no step yet"):
        cs.stability_limit(opt)
    _stepped(opt, p, torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    r = cs.stability_limit(opt)
    assert r.limit == pytest.approx(3.8 / 0.1 / 0.01)  # (2 + 2β₁)/((1 − β₁)η) = 38/η
    assert r.preconditioned
    v_hat = torch.tensor([1.0, 4.0, 16.0], dtype=torch.float64)  # g² after bias correction
    torch.testing.assert_close(r.scale, 1.0 / (v_hat.sqrt() + 1e-8))


def test_rmsprop_and_weight_decay():
    p = params()
    opt = _stepped(
        torch.optim.RMSprop(p, lr=0.01, momentum=0.5, weight_decay=0.1),
        p,
        torch.ones(3, dtype=torch.float64),
    )
    r = cs.stability_limit(opt)
    assert r.limit == pytest.approx(3.0 / 0.01)
    torch.testing.assert_close(r.l2, torch.full((3,), 0.1, dtype=torch.float64))
    # AdamW's decay is decoupled: not part of the curvature
    q = params()
    adamw = _stepped(
        torch.optim.AdamW(q, lr=0.01, weight_decay=0.1), q, torch.ones(3, dtype=torch.float64)
    )
    assert cs.stability_limit(adamw).l2 is None
    sgd = torch.optim.SGD(params(), lr=0.1, weight_decay=0.01)
    assert cs.stability_limit(sgd).l2 is not None


def test_per_group_learning_rates_scale_the_curvature():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.05}], lr=0.1)
    r = cs.stability_limit(opt)
    assert r.lr == 0.1 and r.limit == pytest.approx(20.0)
    torch.testing.assert_close(r.scale, torch.tensor([1.0, 1.0, 0.5, 0.5, 0.5]))


def test_a_zero_learning_rate_has_no_limit_and_foreign_parameters_are_refused():
    p = params()
    r = cs.stability_limit(torch.optim.SGD(p, lr=0.0))
    assert r.limit == float("inf") and r.stable_lr(5.0) == float("inf")
    with pytest.raises(ValueError, match="updates none of these parameters"):
        cs.stability_limit(torch.optim.SGD(p, lr=0.1), params=params())


def test_wrapped_optimizers_are_unwrapped():
    class Wrapper(torch.optim.Optimizer):  # like accelerate's AcceleratedOptimizer
        def __init__(self, inner):
            self.optimizer = inner
            self.param_groups = inner.param_groups
            self.state = inner.state

    inner = torch.optim.SGD(params(), lr=0.1, momentum=0.9)
    assert cs.stability_limit(Wrapper(inner)).limit == pytest.approx(38.0)


def test_adahessian_limit_is_adams_on_its_hessian_preconditioner():
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = cs.optim.AdaHessian([x], lr=0.1, weight_decay=0.01)
    with pytest.raises(ValueError, match="no step yet"):
        cs.stability_limit(opt)
    for _ in range(3):
        opt.step(lambda: (x**2 * torch.tensor([1.0, 10.0], dtype=torch.float64)).sum())
    lim = cs.stability_limit(opt)
    assert lim.limit == pytest.approx(38 / 0.1) and lim.preconditioned
    v_hat = opt.state[x]["exp_hessian_diag_sq"] / (1 - 0.999**3)
    torch.testing.assert_close(lim.scale, 1 / (v_hat.sqrt() + 1e-4))
    assert lim.l2 is None  # AdamW-style decoupled decay: not part of the curvature
    # and the diagnosis reads it: the preconditioned sharpness against 38/η
    model = torch.nn.Linear(2, 1).double()
    X = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = X @ torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    opt = cs.optim.AdaHessian(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.step(lambda: torch.nn.functional.mse_loss(model(X), y))
    d = cs.diagnose(model, torch.nn.MSELoss(), (X, y), optimizer=opt)
    assert d.evidence["preconditioned"] and d.evidence["stability_limit"] == pytest.approx(380)
