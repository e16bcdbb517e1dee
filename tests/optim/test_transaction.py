"""A step is a transaction (issue 12.1): the cases the issue measured, reproduced; the refusal of
non-finite updates; the guard behind the snapshot. The contract over every registered optimizer
(faults at each closure call and product, retry bit-identical) is in test_contract.py."""

import copy
import math
import sys

import pytest
import torch
import torch.overrides
from torch import nn

import curvscope as cs
from curvscope.optim import _closure


class Fault(RuntimeError):
    pass


def failing_at(call, f):
    """f, but raising at its ``call``-th evaluation."""
    n = [0]

    def closure():
        n[0] += 1
        if n[0] == call:
            raise Fault(f"evaluation {call}")
        return f()

    return closure


def logreg():
    p = cs.problems.get("breast-cancer-logreg")
    (X, y), model = p.data, p.make_model(0)
    return model, (lambda: p.loss_fn(model(X), y))


def flat(model):
    return torch.cat([q.detach().reshape(-1) for q in model.parameters()])


@pytest.mark.parametrize("name", ["newton", "newton-cg", "cubic-newton", "saddle-free-newton"])
def test_a_closure_failing_at_the_trial_point_leaves_the_model_where_it_was(name):
    # the issue: newton left ‖θ − θ₀‖ = 6.9 (here: the logistic regression, loss 0.68 → 0.23),
    # the others 0.4–1.7; now nothing moves and the loss is what it was
    model, f = logreg()
    theta0, loss0 = flat(model), float(f().detach())
    twin, g = logreg()
    cs.optim.build(name, twin.parameters()).step(g)
    assert float((flat(twin) - theta0).norm()) > 0.3  # the step the trial was measuring
    opt = cs.optim.build(name, model.parameters())
    with pytest.raises(Fault, match="evaluation 2"):
        opt.step(failing_at(2, f))
    assert float((flat(model) - theta0).norm()) == 0.0 and float(f().detach()) == loss0
    assert opt.counts == cs.optim.Counts() and opt.info is None


def test_pure_newton_keeps_its_scale_when_the_step_fails():
    model, f = logreg()
    opt = cs.optim.build("pure-newton", model.parameters())
    with pytest.raises(Fault):
        opt.step(failing_at(2, f))
    kept = {k: opt.state["global"][k] for k in ("mu", "scale")}
    assert kept == {"mu": 0.0, "scale": 1.0}  # not the Hessian's scale, 2.93
    opt.step(f)
    assert opt.state["global"]["scale"] == pytest.approx(2.93, abs=0.01)


@pytest.mark.parametrize("name", ["adahessian", "sophia"])
def test_a_failed_step_does_not_advance_the_step_counter_or_the_probes(name):
    model, f = logreg()
    opt = cs.optim.build(name, model.parameters(), lr=0.01)
    opt.step(f)
    with pytest.raises(Fault):
        opt.step(failing_at(1, f))
    assert opt.state["global"]["step"] == 1


def test_hessian_free_restores_when_the_curvature_minibatch_fails():
    model, f = logreg()
    theta0 = flat(model)
    opt = cs.optim.HessianFree(model.parameters())
    with pytest.raises(Fault):
        opt.step(f, curvature_closure=failing_at(1, f))
    assert torch.equal(flat(model), theta0) and "previous" not in opt.state["global"]
    assert opt._curvature_closure is None


# ------------------------------------------------------------- non-finite updates refused
@pytest.mark.parametrize("name", ["adahessian", "sophia", "normalized-gd"])
def test_an_update_that_overflows_is_refused_and_nothing_is_written(name):
    # lr = 1e39 is a finite Python float, but lr·step overflows float32: AdaHessian wrote 26
    # Inf entries here (normalized GD's steps are lr·g/‖g‖, shorter: it overflows at 1e40)
    x = torch.linspace(-1, 1, 26).requires_grad_()
    opt = cs.optim.build(name, [x], lr=1e40 if name == "normalized-gd" else 1e39)
    before, state = x.detach().clone(), dict(opt.state)

    def closure():
        loss = (x - 2).square().sum()
        if name == "normalized-gd":
            opt.zero_grad()
            loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match=r"26 non-finite entries.*lower the learning"):
        opt.step(closure)
    assert torch.equal(x.detach(), before) and opt.state == state


def test_adahessian_refuses_a_curvature_estimate_that_overflows_its_state():
    # |diag H| = 2e30 fits float32, its square does not: v would hold Inf for good
    x = torch.ones(4, requires_grad=True)
    opt = cs.optim.AdaHessian([x])
    with pytest.raises(FloatingPointError, match=r"state 'exp_hessian_diag_sq'.*float64"):
        opt.step(lambda: 1e30 * x.square().sum())
    assert torch.equal(x.detach(), torch.ones(4)) and opt.state["global"]["step"] == 0
    x64 = torch.ones(4, dtype=torch.float64, requires_grad=True)  # the remedy it names works
    cs.optim.AdaHessian([x64]).step(lambda: 1e30 * x64.square().sum())
    assert torch.isfinite(x64).all() and not torch.equal(x64.detach(), torch.ones(4).double())


def test_no_partial_update_when_a_later_parameter_overflows():
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = cs.optim.AdaHessian([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 1e39}])
    with pytest.raises(FloatingPointError, match=r"parameter 1 \(shape \(3,\).*lr = 1e\+39"):
        opt.step(lambda: (a.square() + b.square()).sum())
    assert torch.equal(a.detach(), torch.ones(3)) and a not in opt.state


# ------------------------------------------------------------------- the snapshot's guard
class _MutatesInPlace(cs.optim.AdaHessian):
    """A broken method: changes its state in place, then fails."""

    def update_param(self, p, g, d, group, t):
        if p in self.state:
            self.state[p]["exp_avg"].add_(1.0)
            raise Fault("after an in-place change")
        return super().update_param(p, g, d, group, t)


def test_a_state_changed_in_place_is_reported_not_restored_wrongly():
    x = torch.ones(2, requires_grad=True)
    opt = _MutatesInPlace([x])
    opt.step(lambda: x.square().sum())
    with pytest.raises(RuntimeError, match="changed a state tensor in place") as info:
        opt.step(lambda: x.square().sum())
    assert isinstance(info.value.__cause__, Fault)


# ------------------------------------------------------ torch's own, as torch ships them
def test_torch_optimizers_in_the_registry_are_not_transactions():
    # what the README says of them: LBFGS stays where its line search was when the closure
    # raises, SGD writes NaN from a NaN loss
    x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
    lbfgs = cs.optim.build("lbfgs", [x])
    rosen = cs.problems.get("rosenbrock").f
    n = [0]

    def closure():
        n[0] += 1
        if n[0] == 3:
            raise Fault("inside the line search")
        lbfgs.zero_grad()
        loss = rosen(x)
        loss.backward()
        return loss

    with pytest.raises(Fault):
        lbfgs.step(closure)
    assert not torch.equal(x.detach(), torch.tensor([-1.2, 1.0], dtype=torch.float64))
    y = torch.ones(2, requires_grad=True)
    sgd = cs.optim.build("gd", [y], lr=0.1)
    (y * math.nan).sum().backward()
    sgd.step()
    assert torch.isnan(y).all()


def _bn_dropout_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(8, 1),
    ).double()


@pytest.mark.parametrize("name", ["adahessian", "sophia", "newton-cg", "hessian-free"])
def test_a_refused_step_leaves_batchnorm_as_found(name):
    """A batch holding an inf: the step is refused and writes no parameter — but its own
    forward had made BatchNorm's running mean NaN and moved its batch count, which a loop that
    skips the batch then evaluated with (an outside review). The statistics come back too."""
    model = _bn_dropout_model()
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    X[3, 0] = math.inf
    opt = cs.optim.build(name, model.parameters())
    buffers = [b.clone() for b in model.buffers()]

    def closure():
        out = model(X)
        loss = torch.nn.functional.mse_loss(out, y)
        return (loss, out) if name == "hessian-free" else loss

    with pytest.raises(FloatingPointError):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


def _spectral_model():
    """Spectral norm both ways torch has it: its power iteration's vectors are buffers that
    every train-mode forward writes in place."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(4, 8)),
        torch.nn.Tanh(),
        torch.nn.utils.spectral_norm(torch.nn.Linear(8, 1)),
    ).double()


@pytest.mark.parametrize("build", [_bn_dropout_model, _spectral_model])
@pytest.mark.parametrize("name", ["newton-cg", "hessian-free", "cubic-newton"])
def test_a_retried_step_is_the_step_that_never_failed_with_batchnorm_and_dropout(name, build):
    """A closure failing at its trial point, retried: the parameters came back, but not the
    BatchNorm statistics (its batch count one further) nor the dropout masks the failed
    attempt drew, so the retry differed from an uninterrupted step (an outside review).
    Spectral norm's vectors moved at every trial point, the retry 3e-3 off after two more
    steps (an outside review): every buffer a forward writes in place is put back."""
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    runs = []
    for fail in (False, True):
        model = build()
        opt = cs.optim.build(name, model.parameters())

        def f(model=model):
            out = model(X)
            loss = torch.nn.functional.mse_loss(out, y)
            return (loss, out) if name == "hessian-free" else loss

        torch.manual_seed(1)
        if fail:
            with pytest.raises(Fault):
                opt.step(failing_at(2, f))
        opt.step(f)
        runs.append([flat(model), *[b.clone() for b in model.buffers()], torch.rand(1)])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("name", ["newton-cg", "cubic-newton"])
def test_a_step_moves_spectral_norm_once_as_its_own_forward_does(name):
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    model, once = _spectral_model(), _spectral_model()
    once(X)  # the one forward a first-order step would take
    opt = cs.optim.build(name, model.parameters())
    opt.step(lambda: torch.nn.functional.mse_loss(model(X), y))
    assert opt.counts.closure_calls > 1  # trial points were evaluated
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), once.buffers(), strict=True))


@pytest.mark.parametrize(
    "name", ["newton-cg", "hessian-free", "cubic-newton", "saddle-free-newton"]
)
def test_steps_taken_inside_an_autocast_region_measure_their_trial_points(name):
    """Inside a torch.autocast region autocast keeps each parameter's bfloat16 copy until the
    region exits: every trial point was measured at the old weights (actual reduction 0), every
    step rejected and the trust region collapsed, silently (an outside review)."""
    model = _bn_dropout_model().float().eval()
    X, y = torch.randn(64, 4), torch.randn(64, 1)
    opt = cs.optim.build(name, model.parameters())

    def f():
        out = model(X)
        loss = torch.nn.functional.mse_loss(out.float(), y)
        return (loss, out) if name == "hessian-free" else loss

    def loss():
        return float(torch.nn.functional.mse_loss(model(X), y))

    start = loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        accepted = 0
        for _ in range(5):
            opt.step(f)
            accepted += bool(opt.info.accepted)
    assert accepted >= 3 and loss() < 0.9 * start


@pytest.mark.parametrize(
    "name", ["newton-cg", "hessian-free", "cubic-newton", "saddle-free-newton"]
)
def test_a_model_step_measures_its_trial_points_under_its_own_dropout_masks(name):
    """Each trial forward drew fresh dropout masks, so ρ compared f(θ; mask₁) with
    f(θ + s; mask₂): between −2e5 and 3e5 at a small radius, 11 of 20 steps kept (an outside
    review). A step's evaluations now share its first forward's draws, and it leaves torch's
    RNG where one forward would."""
    X, y = torch.randn(64, 4, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    model = _bn_dropout_model().double()
    small = {"radius": 1e-6}, {"sigma": 1e6}, {"damping": 1e4}  # steps the model predicts
    sizes = dict(zip(["newton-cg", "cubic-newton", "saddle-free-newton"], small, strict=True))
    opt = cs.optim.build(name, model.parameters(), **sizes.get(name, {}))

    def f():
        out = model(X)
        loss = torch.nn.functional.mse_loss(out, y)
        return (loss, out) if name == "hessian-free" else loss

    kept = 0
    for seed in range(6):
        torch.manual_seed(seed)
        opt.step(f)
        after_step = torch.get_rng_state()
        torch.manual_seed(seed)
        model.eval(), model.train()
        with torch.no_grad():
            torch.nn.functional.dropout(torch.ones(64, 8), 0.2, training=True)  # one forward's
        assert torch.equal(after_step, torch.get_rng_state())
        kept += bool(opt.info.accepted)
        assert opt.info.ratio is None or 0.2 < opt.info.ratio < 5, opt.info
    assert kept >= 5


@pytest.mark.parametrize(
    ("name", "at"),
    [
        ("Sophia", "_ClosureBackward"),
        ("NewtonCG", "_ClosureBackward"),
        ("AdaHessian", "KeptStatistics"),
        ("NewtonCG", "KeptStatistics"),
    ],
)
def test_a_ctrl_c_that_skips_an_exit_leaves_nothing_behind(name, at):
    """A Ctrl-C landing as an ``__exit__`` is entered (what random real SIGINTs hit; here a
    trace function raises there) skipped it: the closure's function mode stayed on torch's
    stack for the process (a later plain backward filled no .grad), or the step's forward
    pre-hook stayed registered and BatchNorm's statistics kept the step's update (an outside
    review). The step's transaction now undoes what such an exit left."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    opt = getattr(cs.optim, name)(model.parameters())

    def closure():
        return nn.functional.cross_entropy(model(X), y)

    before = copy.deepcopy(model.state_dict())
    hooks = len(nn.modules.module._global_forward_pre_hooks)
    fired = []

    def tracer(frame, event, arg):
        me = frame.f_locals.get("self") if event == "call" else None
        if not fired and frame.f_code.co_name == "__exit__" and type(me).__name__ == at:
            fired.append(1)
            raise KeyboardInterrupt
        return None

    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            opt.step(closure)
    finally:
        sys.settrace(None)
    assert fired
    assert torch.overrides._get_current_function_mode_stack() == []
    assert len(nn.modules.module._global_forward_pre_hooks) == hooks
    assert not _closure.KeptStatistics._open
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    net = nn.Linear(4, 3)  # an unrelated model's plain backward fills its .grad
    nn.functional.cross_entropy(net(X), y).backward()
    assert net.weight.grad is not None


class _Averaging(torch.nn.Module):
    """A running average of its inputs, a buffer it may share with another module."""

    def __init__(self, buffer, update):
        super().__init__()
        self.lin, self.update = torch.nn.Linear(4, 4), update
        self.register_buffer("avg", buffer)

    def forward(self, x):
        if self.update and self.training:
            with torch.no_grad():
                self.avg.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return torch.tanh(self.lin(x - self.avg))


def test_a_buffer_two_modules_share_moves_once_a_step():
    """The diff review: saved per module, the second module's copy of a shared buffer was
    taken after the first had written it, and trial points moved it."""
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)

    def make():
        torch.manual_seed(0)
        buffer = torch.zeros(4, dtype=torch.float64)
        return torch.nn.Sequential(
            _Averaging(buffer, True), _Averaging(buffer, False), torch.nn.Linear(4, 1)
        ).double()

    for name in ("newton-cg", "cubic-newton"):
        model, once = make(), make()
        once(X)
        opt = cs.optim.build(name, model.parameters())
        opt.step(lambda model=model: torch.nn.functional.mse_loss(model(X), y))
        assert opt.counts.closure_calls > 1
        assert torch.equal(model[0].avg, once[0].avg) and model[1].avg is model[0].avg


@pytest.mark.parametrize("name", ["normalized-gd", "adahessian", "newton-cg"])
def test_a_failed_step_raises_the_users_error_when_a_buffer_was_resized(name):
    """The diff review: torch's per-channel observer resizes its buffers at its first forward
    ([0] -> [3]); putting back the saved [0] copy raised torch's size error over the user's."""
    from torch.ao.quantization import PerChannelMinMaxObserver

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = torch.nn.Linear(4, 3), torch.nn.Linear(3, 1)
            self.obs = PerChannelMinMaxObserver(ch_axis=1)

        def forward(self, x):
            h = torch.tanh(self.lin(x))
            self.obs(h.detach())
            return self.out(h)

    torch.manual_seed(0)
    model, X, y = Net(), torch.randn(16, 4), torch.randn(16, 1)
    opt = cs.optim.build(name, model.parameters(), **({} if name == "newton-cg" else {"lr": 0.1}))

    def closure():
        torch.nn.functional.mse_loss(model(X), y)
        raise KeyError("the user's own error")

    with pytest.raises(KeyError, match="the user's own error"):
        opt.step(closure)
    assert model.obs.min_val.shape == (0,)  # as found
