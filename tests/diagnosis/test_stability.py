"""Stability limits read from live torch optimizers."""

import json

import numpy as np
import pytest
import torch

import curvscope as cs
from curvscope.diagnosis import State


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


def test_the_label_names_sgds_dampening():
    """The limit counted the dampening; the label left it out (a review)."""
    damped = torch.optim.SGD(params(), lr=0.1, momentum=0.5, dampening=0.5)
    assert cs.stability_limit(damped).optimizer == "SGD (momentum 0.5, dampening 0.5)"
    plain = torch.optim.SGD(params(), lr=0.1, momentum=0.9)
    assert cs.stability_limit(plain).optimizer == "SGD (momentum 0.9)"


def test_hyperparameters_given_as_tensors_are_read_as_numbers(tmp_path):
    """torch takes tensors for β, momentum and ε too: the limit, its constant and a diagnosis's
    stable learning rate came out as tensors, which a Monitor's logged scalars dropped and
    json.dumps refused (an outside review)."""
    t = torch.tensor
    for make in (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=t(0.9), dampening=t(0.5)),
        lambda p: torch.optim.Adam(p, lr=0.1, betas=(t(0.9), t(0.999)), eps=t(1e-8)),
        lambda p: torch.optim.RMSprop(p, lr=0.1, momentum=t(0.5), eps=t(1e-8)),
    ):
        p = params()
        opt = _stepped(make(p), p, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        r = cs.stability_limit(opt)
        assert type(r.limit) is float and type(r.constant) is float, opt
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    X, Y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(t(0.9), t(0.999)))
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), Y).backward()
        opt.step()
    d = cs.diagnose(model, torch.nn.MSELoss(), (X, Y), optimizer=opt)
    assert type(d.evidence["stability_limit"]) is float
    assert type(d.evidence["stable_lr"]) is float
    assert "stability_limit" in cs.diagnosis.monitor.scalars(d)
    json.dumps({k: v for k, v in d.evidence.items() if k != "thresholds"})


def test_a_group_whose_lr_is_no_number_is_not_read_as_held_still():
    """transformers' Adafactor keeps lr=None (relative steps): the selection's lr-0 rule raised
    float()'s TypeError where the refusal naming the fix was due (a diff review)."""
    from curvscope.diagnosis.stability import stepped_selection

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0]["lr"] = None
    assert stepped_selection(model, opt) is None


@pytest.mark.parametrize("dampening", [1.0, 1.5])
def test_a_dampening_with_no_limit_is_refused_with_the_reason(dampening):
    """SGD's dampening of 1 (torch takes it) lets the gradient into the momentum at the first
    step only, and above 1 each later step climbs it: (2 + 2β)/(1 − dampening) raised a bare
    ZeroDivisionError at 1 and gave a negative limit above (an outside review). Both are
    refused, by the Monitor at its construction."""
    opt = torch.optim.SGD(params(), lr=0.1, momentum=0.9, dampening=dampening)
    with pytest.raises(ValueError, match=r"dampening in \[0, 1\)"):
        cs.stability_limit(opt)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=dampening)
    data = (torch.randn(8, 3), torch.randn(8, 1))
    with pytest.raises(ValueError, match="no stability limit to judge it against"):
        cs.Monitor(model, torch.nn.MSELoss(), data, optimizer=opt)


@pytest.mark.parametrize(
    "lr", [np.float32(0.25), np.float64(0.25), torch.tensor(0.25), torch.tensor(0.25).double(), 1]
)
def test_a_learning_rate_is_any_real_number_torch_takes(lr, tmp_path):
    """lr=np.float32(0.1) or torch.tensor(0.1), as torch's optimizers take it, was refused as
    "not a positive number" by diagnose, and by the Monitor only at its first probe (an
    outside review)."""
    assert cs.stability_limit(lr=lr).limit == pytest.approx(2 / float(lr), rel=1e-7)
    assert isinstance(cs.stability_limit(lr=lr).lr, float)
    model = torch.nn.Linear(3, 1).double()
    data = (torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64))
    mon = cs.Monitor(model, torch.nn.MSELoss(), data, lr=lr, log=tmp_path / "r.jsonl")
    assert mon.lr == float(lr) and type(mon.lr) is float
    mon.close()


@pytest.mark.parametrize("lr", [True, "0.1", torch.tensor([0.1]), -0.1, float("nan"), 0])
def test_a_learning_rate_that_is_no_positive_number_is_refused_at_once(lr):
    with pytest.raises(ValueError, match="lr must be a positive number"):
        cs.stability_limit(lr=lr)
    model = torch.nn.Linear(3, 1)
    data = (torch.randn(16, 3), torch.randn(16, 1))
    with pytest.raises(ValueError, match="lr must be a positive number"):
        cs.Monitor(model, torch.nn.MSELoss(), data, lr=lr)


def test_plain_gradient_descent_and_argument_errors():
    assert cs.stability_limit(lr=0.5).limit == 4.0
    with pytest.raises(ValueError, match="either optimizer= or lr="):
        cs.stability_limit()
    with pytest.raises(ValueError, match="either optimizer= or lr="):
        cs.stability_limit(torch.optim.SGD(params(), lr=0.1), lr=0.1)
    with pytest.raises(ValueError, match="positive number"):
        cs.stability_limit(lr=-1.0)
    with pytest.raises(TypeError, match="Pass lr=") as info:
        cs.stability_limit(torch.optim.Adagrad(params(), lr=0.1))
    # an adaptive method's steps are no gradient descent's at any lr: the message says so,
    # and what to do instead (it pointed every user to lr=: a review)
    assert "no lr makes its steps gradient descent's" in str(info.value)
    assert "leave out optimizer= and lr=" in str(info.value)


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


def test_the_advice_says_which_groups_rate_it_names():
    """With parameter groups at several rates, "the largest stable learning rate here is 0.507
    (now 0.8)" held for the largest group with the others scaled alike, and did not say so
    (the training-loop review). The limit and the evidence carry the groups' rates, and the
    advice names them and the common factor; scaled by it, every group is at the limit."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    data = (torch.randn(64, 4), torch.randint(0, 3, (64,)))
    loss_fn = torch.nn.CrossEntropyLoss()

    def sgd(head: float, body: float) -> torch.optim.SGD:
        groups = [{"params": model[2].parameters(), "lr": head}]
        return torch.optim.SGD([*groups, {"params": model[0].parameters(), "lr": body}])

    assert cs.stability_limit(sgd(2.0, 0.5)).group_lrs == (2.0, 0.5)
    assert cs.stability_limit(sgd(2.0, 2.0)).group_lrs is None
    d = cs.diagnose(model, loss_fn, data, optimizer=sgd(2.0, 0.5))
    assert d.evidence.group_lrs == [2.0, 0.5]
    said = [a for a in d.advice if "largest parameter group's" in a]
    factor = d.evidence.stable_lr / 2.0
    assert len(said) == 1 and "2, 0.5" in said[0] and f"{factor:.3g}x each" in said[0]
    at = cs.diagnose(model, loss_fn, data, optimizer=sgd(2.0 * factor, 0.5 * factor))
    assert at.evidence.sharpness == pytest.approx(at.evidence.stability_limit, rel=1e-3)
    alone = cs.diagnose(model, loss_fn, data, optimizer=sgd(2.0, 2.0))
    assert alone.evidence.group_lrs is None
    assert not any("parameter group" in a for a in alone.advice)
    # said only where a rate is named, with that rate's factor (the second diff review: said
    # in every state whose advice held the words "learning rate", and under *unstable* with
    # the sharpness's factor where the advice named the lower rate along the steps)
    groups = {"lr": 0.1, "group_lrs": [0.1, 0.01], "stable_lr": 0.2}
    for state in (State.EDGE_OF_STABILITY, State.MINIMUM, State.DIVERGED):
        assert not any("parameter group" in a for a in state.advice(groups))
    ev = {**groups, "stability_limit": 20.0, "sharpness": 10.0, "update_curvature": 80.0}
    said = State.UNSTABLE.advice(ev)
    assert any("lower it below that" in a and "0.025" in a for a in said)
    assert any("(0.25x each)" in a for a in said)


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


# ------------------------------------------------------------- one rule per optimizer type
def test_the_rules_are_a_table_and_declarations_and_the_module_imports_no_optimizer():
    import ast
    import inspect

    from curvscope.diagnosis import stability

    tree = ast.parse(inspect.getsource(stability))
    imported = [
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    ]
    # no optimizer (curvscope.optim's declare their rules): only the derivatives — zero3 says
    # where a DeepSpeed ZeRO-3 engine keeps its optimizer's state, sharded which entries of a
    # sharded parameter are this rank's
    ours = [m for m in imported if m and m.startswith("curvscope")]
    assert ours and all(m.startswith("curvscope.derivatives") for m in ours), ours
    assert set(stability.RULES) == {
        torch.optim.SGD,
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.RMSprop,
    }
    assert stability.rule_of(cs.optim.AdaHessian) is cs.optim.AdaHessian.stability_rule
    assert stability.rule_of(cs.optim.Sophia) is None


def test_a_class_declares_its_own_rule_and_a_subclass_inherits_its_bases():
    from curvscope.diagnosis.stability import StabilityRule

    class HalfStepSGD(torch.optim.SGD):  # lr/2 per step: stable below 4/η
        stability_rule = StabilityRule(lambda name, group: (4.0, name, "s* = 4/η"))

    class Quiet(torch.optim.Adam):  # no declaration: Adam's rule
        pass

    class Half2(HalfStepSGD):
        pass

    r = cs.stability_limit(HalfStepSGD(params(), lr=0.1, weight_decay=0.1))
    assert r.limit == pytest.approx(40.0) and r.optimizer == "HalfStepSGD" and r.l2 is not None
    assert cs.stability_limit(Half2(params(), lr=0.1)).limit == pytest.approx(40.0)
    p = params()
    quiet = _stepped(Quiet(p, lr=0.01), p, torch.ones(3, dtype=torch.float64))
    r = cs.stability_limit(quiet)
    assert r.limit == pytest.approx(38 / 0.01) and r.optimizer == "Quiet (β₁ = 0.9)"

    class Wrong(torch.optim.SGD):
        stability_rule = 2.0

    with pytest.raises(TypeError, match=r"Wrong\.stability_rule must be a .*StabilityRule"):
        cs.stability_limit(Wrong(params(), lr=0.1))


def test_momentum_is_read_from_the_first_group_that_holds_a_parameter():
    # RMSprop read it from the group of the first parameter passed, and took 0 when the
    # optimizer did not hold that one (SGD and Adam already read the first group holding one)
    held = params()
    opt = _stepped(
        torch.optim.RMSprop(held, lr=0.01, momentum=0.5), held, torch.ones(3, dtype=torch.float64)
    )
    r = cs.stability_limit(opt, params=params() + held)
    assert r.limit == pytest.approx(3.0 / 0.01) and r.optimizer == "RMSprop (momentum 0.5)"
    assert torch.equal(r.scale[:3], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("name", ["NewtonCG", "HessianFree", "Sophia", "NormalizedGD"])
def test_curvscopes_own_methods_without_a_rule_are_not_told_to_pass_lr(name):
    """diagnose(optimizer=NewtonCG) said "Pass lr= to judge against plain gradient descent",
    and NewtonCG has no learning rate (an outside review): curvscope's own methods without a
    stability rule are named as such, with the way that works."""
    with pytest.raises(TypeError, match=rf"{name} is one of curvscope's methods") as info:
        cs.stability_limit(getattr(cs.optim, name)(params()))
    assert "Pass lr=" not in str(info.value) and "leave out optimizer= and lr=" in str(info.value)


def test_sophia_gs_refusal_names_sophias_own_fix():
    """Sophia-G refused a weighted or smoothed cross-entropy as "GaussNewtonBartlett needs a
    loss that is a negative log-likelihood (nn.CrossEntropyLoss, …), got CrossEntropyLoss()",
    its cause naming kind='ggn', which Sophia has not (an outside review)."""
    from curvscope.optim.diagonal import GaussNewtonBartlett

    for loss, attr in [
        (torch.nn.CrossEntropyLoss(weight=torch.ones(3)), "weight"),
        (torch.nn.CrossEntropyLoss(label_smoothing=0.1), "label_smoothing"),
    ]:
        with pytest.raises(ValueError, match=rf"Sophia-G\) does not support .*\({attr}=") as e:
            GaussNewtonBartlett(loss)
        assert "Hutchinson()" in str(e.value) and "kind=" not in str(e.value)


def test_a_wrapper_that_holds_itself_is_refused_not_looped_over():
    class Loop:
        def __init__(self):
            self.optimizer = self

    with pytest.raises(TypeError, match="Pass lr="):
        cs.stability_limit(Loop())


# ------------------------------------- coordinates Adam has not scaled yet (v exactly 0)
class BagOfTokens(torch.nn.Module):
    """An embedding averaged over the sequence, then a linear classifier: the rows of tokens no
    training batch has contained get no gradient, so Adam's v stays exactly 0 there."""

    def __init__(self, vocab=12, width=3, classes=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(dim=1))


def _tokens(vocab, rows, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (rows, length), generator=g)
    return ids, (ids.float().mean(dim=1) >= (vocab - 1) / 2).long()


def _trained_on_half_the_vocabulary(steps=3, lr=1e-2, warmup=None):
    """AdamW steps on batches of tokens 0-5 only; the probe batch holds all 12 tokens."""
    torch.manual_seed(0)
    model = BagOfTokens().double()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = None
    if warmup is not None:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warmup))
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = []
    for step in range(steps):
        ids, y = _tokens(6, 8, 5, seed=step)
        opt.zero_grad()
        loss = loss_fn(model(ids), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
    return model, opt, loss_fn, _tokens(12, 32, 5, seed=99), losses


def _dense_hessian(model, loss_fn, data):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        params, at = {}, 0
        for n, shape in zip(names, shapes, strict=True):
            params[n] = flat[at : at + shape.numel()].reshape(shape)
            at += shape.numel()
        return loss_fn(torch.func.functional_call(model, params, (data[0],)), data[1])

    return torch.func.jacfwd(torch.func.grad(f))(theta)


def test_rows_adam_has_not_scaled_are_left_out_of_the_preconditioned_operator():
    model, opt, loss_fn, probe, _ = _trained_on_half_the_vocabulary()
    lim = cs.stability_limit(opt, params=list(model.parameters()))
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    unseen = v == 0
    assert int(unseen.sum()) == 6 * 3 == lim.unscaled  # the rows of tokens 6-11
    v_hat = v / (1 - 0.999**3)
    expected = torch.where(unseen, torch.zeros_like(v), 1 / (v_hat.sqrt() + 1e-8))
    torch.testing.assert_close(lim.scale, expected)
    # the operator defined: S^½ H S^½ with S = 0 on the unseen rows; dense float64 reference
    H = _dense_hessian(model, loss_fn, probe)
    root = lim.scale.sqrt()
    reference = torch.linalg.eigvalsh(root[:, None] * H * root[None, :])
    d = cs.diagnose(model, loss_fn, probe, opt)
    assert d.evidence["sharpness"] == pytest.approx(float(reference[-1]), rel=1e-6)
    assert d.evidence["lambda_min"] == pytest.approx(float(reference[0]), rel=1e-6, abs=1e-9)
    # the unseen rows do curve on the probe batch: at 1/ε they dominated the operator
    assert H[unseen][:, unseen].abs().max() > 1e-4
    # an optimizer whose every coordinate has a gradient leaves nothing out
    full = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn(model(probe[0]), probe[1]).backward()
    full.step()
    model.zero_grad()
    assert cs.stability_limit(full).unscaled == 0


@pytest.mark.parametrize("cls", [torch.optim.RMSprop, torch.optim.Adam])
def test_a_zero_second_moment_has_step_factor_zero_in_every_variant(cls):
    p = params()
    opt = cls(
        p, lr=0.01, **({"centered": True} if cls is torch.optim.RMSprop else {"amsgrad": True})
    )
    _stepped(opt, p, torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64))
    r = cs.stability_limit(opt)
    assert r.unscaled == 2 and r.scale[0] == 0 == r.scale[2] and r.scale[1] > 0


def test_unseen_embedding_rows_no_longer_make_a_healthy_adamw_run_unstable():
    """The false alarm of issue 14 (a): AdamW with linear warm-up, the loss falling, a probe batch
    with tokens no training batch held yet. At 1/ε their preconditioned curvature was 200 times
    the limit and the probe said "unstable: lower the learning rate"."""
    model, opt, loss_fn, probe, losses = _trained_on_half_the_vocabulary(steps=5, warmup=10)
    assert losses[-1] < losses[0]
    lim = cs.stability_limit(opt, params=list(model.parameters()))
    H = _dense_hessian(model, loss_fn, probe)
    as_before = torch.where(lim.scale == 0, torch.full_like(lim.scale, 1e8), lim.scale).sqrt()
    before = torch.linalg.eigvalsh(as_before[:, None] * H * as_before[None, :])[-1]
    assert before > 100 * lim.limit  # what the probe judged before: 217 times the limit
    d = cs.diagnose(model, loss_fn, probe, opt)
    assert d.state == "learning" and d.evidence["sharpness"] < lim.limit
    mon = cs.Monitor(model, loss_fn, probe, optimizer=opt, every=1)
    assert mon.probe().state == "learning"


def test_a_parameter_adam_holds_without_state_is_left_out_not_an_error():
    """A branch no gradient has reached yet has no Adam state (review finding): its step
    factors are 0 and counted, like rows whose second moment is still 0; only an optimizer
    with no state at all has taken no step."""
    torch.manual_seed(0)
    used, unused = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    opt = torch.optim.Adam([*used.parameters(), *unused.parameters()], lr=1e-2)
    with pytest.raises(ValueError, match="has taken no step yet"):
        cs.stability_limit(opt)
    x = torch.randn(8, 3)
    for _ in range(3):
        opt.zero_grad()
        used(x).pow(2).mean().backward()
        opt.step()
    limit = cs.stability_limit(opt)
    assert limit.unscaled == 4  # the unused layer's 3 weights and bias
    assert torch.count_nonzero(limit.scale[4:]) == 0 and bool((limit.scale[:4] > 0).all())


def test_an_optimizer_whose_groups_hold_no_parameters_gets_the_deepspeed_fix():
    """The torch optimizer a DeepSpeed ZeRO-3 engine wraps has empty groups between its steps
    (the engine hands it flat partitions only while it steps): say so, not "pass its model's"."""
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=0.1)
    opt.param_groups[0]["params"] = []
    with pytest.raises(ValueError, match=r"hold no parameters.*pass engine\.optimizer"):
        cs.stability_limit(opt)


def _diverges(make, curvatures, steps=300) -> list[bool]:
    """Whether each coordinate of the quadratic ½ Σ s_i x_i² blows up under the optimizer
    ``make(params)`` (one parameter per coordinate, in its own group)."""
    xs = [torch.nn.Parameter(torch.ones(1, dtype=torch.float64)) for _ in curvatures]
    opt = make(xs)
    for _ in range(steps):
        opt.zero_grad()
        sum(0.5 * s * (x**2).sum() for s, x in zip(curvatures, xs, strict=True)).backward()
        opt.step()
    return [float(x.detach().abs()) > 1e3 for x in xs]


@pytest.mark.parametrize(
    ("groups", "curvatures"),
    [
        # the first group heavy ball (c = 3.8), the second plain (c = 2): 0.1·21 = 2.1 > 2
        ([{"momentum": 0.9}, {"momentum": 0.0}], [1.0, 21.0]),
        # the reverse: the sharp direction in the heavy-ball group, stable (2.1 < 3.8)
        ([{"momentum": 0.0}, {"momentum": 0.9}], [1.0, 21.0]),
        # heavy ball and Nesterov (c = 3.8/2.8 = 1.36): 0.1·15 = 1.5 > 1.36
        ([{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}], [1.0, 15.0]),
    ],
    ids=["plain-group-sharp", "momentum-group-sharp", "nesterov-group-sharp"],
)
def test_each_groups_constant_is_its_own(groups, curvatures):
    """The limit's constant was read from the first group only: a diverging group read as
    learning, a stable one as unstable (a review). On a diagonal quadratic each group's
    coordinate diverges exactly where its scaled curvature exceeds the limit."""

    def make(xs):
        return torch.optim.SGD(
            [{"params": [x], **g} for x, g in zip(xs, groups, strict=True)], lr=0.1
        )

    r = cs.stability_limit(make(params(1) + params(1)))
    scaled = [float(r.scale[i]) * s if r.scale is not None else s for i, s in enumerate(curvatures)]
    assert [v > r.limit for v in scaled] == _diverges(make, curvatures)
    # the forecast's factor is the most constrained group's c_g/η_g
    consts = [
        (2 + 2 * g["momentum"]) / (1 + 2 * g["momentum"] if g.get("nesterov") else 1)
        if g["momentum"]
        else 2.0
        for g in groups
    ]
    assert cs.diagnosis.stability.limit_factor(make(params(1) + params(1))) == pytest.approx(
        min(consts) / 0.1
    )


def test_an_optimizer_that_maximizes_is_refused_with_the_fix():
    """maximize=True climbs the loss: judged as descent, a run blowing up read as learning and
    a maximum as a saddle (a review)."""
    for opt in (
        torch.optim.SGD(params(), lr=0.1, maximize=True),
        torch.optim.Adam(params(), lr=0.1, maximize=True),
    ):
        with pytest.raises(ValueError, match=r"maximize=True.*negated objective"):
            cs.stability_limit(opt)


def test_adam_with_decoupled_weight_decay_is_adamw():
    """torch 2.13's Adam(decoupled_weight_decay=True) is AdamW: its decay is not part of the
    curvature (it was taken as L2: sharpness 160x too large, a false unstable)."""
    p = params()
    opt = _stepped(
        torch.optim.Adam(p, lr=0.1, weight_decay=0.1, decoupled_weight_decay=True),
        p,
        torch.ones(3, dtype=torch.float64),
    )
    assert cs.stability_limit(opt).l2 is None


def test_learning_rates_given_as_tensors():
    """torch accepts a tensor lr per group: read as numbers (two groups failed with a shape
    error)."""
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD(
        [{"params": [a], "lr": torch.tensor(0.1)}, {"params": [b], "lr": torch.tensor(0.05)}],
        lr=0.1,
    )
    r = cs.stability_limit(opt)
    assert r.limit == pytest.approx(20.0)
    torch.testing.assert_close(r.scale, torch.tensor([1.0, 1.0, 0.5, 0.5, 0.5]))
