"""diagnose() on cases whose true state is known."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import curvscope as cs
from curvscope.diagnosis import STATES, State, classify
from tests import cases


class FunctionModel(nn.Module):
    """A plain function f(x) of the parameter x, as a model whose loss is f."""

    def __init__(self, f, x0):
        super().__init__()
        self.f = f
        self.x = nn.Parameter(torch.as_tensor(x0, dtype=torch.float64).clone())

    def forward(self, inputs):
        return self.f(self.x).reshape(1).expand(len(inputs))


DATA = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))


def mean_loss(out, target):
    return out.mean()


def diag(f, x0, **kw):
    model = FunctionModel(f, x0)
    return cs.diagnose(model, mean_loss, DATA, **kw), model


A = torch.diag(torch.tensor([10.0, 1.0, 0.1], dtype=torch.float64))


def bowl(x):
    return 0.5 * x @ (A @ x)


FAR = [1.0, 1.0, 1.0]


def test_quadratic_unstable_above_two_over_lambda_max_and_learning_below():
    d, _ = diag(bowl, FAR, lr=0.25)  # 2/λ_max = 0.2
    assert d.state == "unstable"
    assert d.evidence["sharpness"] == pytest.approx(10.0, rel=1e-2)
    assert d.evidence["stability_limit"] == pytest.approx(8.0)
    assert d.evidence["stable_lr"] == pytest.approx(0.2, rel=1e-2)
    assert "0.2" in str(d) and d.confident
    d, _ = diag(bowl, FAR, lr=0.05)
    assert d.state == "learning"


class _Temperature(nn.Module):
    """Temperature scaling: one trainable scalar dividing fixed logits."""

    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.ones(1, dtype=torch.float64))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.t


def test_a_model_of_one_trainable_scalar_is_diagnosed_and_monitored(tmp_path):
    """Temperature scaling: every diagnose and Monitor probe of a one-parameter model raised
    "asked for 2 eigenvalues of a 1 x 1 operator" (which="both"; an outside review). Its one
    eigenvalue is both ends; the evidence is the exact second derivative."""
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(200, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (200,), generator=g)
    model = _Temperature()

    def loss(t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(z / t, y)

    h = float(torch.func.jacfwd(torch.func.grad(loss))(torch.ones(1, dtype=torch.float64))[0, 0])
    lr = 1.0 / h  # below the limit 2/h: learning
    d = cs.diagnose(model, nn.CrossEntropyLoss(), (z, y), lr=lr)
    assert d.state == State.LEARNING
    assert d.evidence["sharpness"] == pytest.approx(h, rel=1e-10)
    assert d.evidence["lambda_min"] == pytest.approx(h, rel=1e-10)
    assert cs.diagnose(model, nn.CrossEntropyLoss(), (z, y), lr=3 / h).state == State.UNSTABLE
    # later probes warm-start from the last one's vectors: its top and bottom, the same vector
    # (two columns of one dimension were refused), mixed with a random one (±1 and ∓1 made 0)
    warm = d.vectors["top"][:, None].repeat(1, 2)
    assert cs.diagnose(model, nn.CrossEntropyLoss(), (z, y), lr=lr, v0=warm).state == d.state
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for adaptive, seed in [(True, 4), (False, 5)]:
        log = tmp_path / f"{adaptive}.jsonl"
        mon = cs.Monitor(
            model,
            nn.CrossEntropyLoss(),
            (z, y),
            optimizer=opt,
            every=1,
            log=log,
            adaptive=adaptive,
            seed=seed,
        )
        for _ in range(6):  # on to the minimum, where the gradient is small
            opt.zero_grad()
            value = loss(model.t)
            value.backward()
            opt.step()
            assert mon.step(float(value.detach())).state in (State.LEARNING, State.MINIMUM)
        mon.close()


class _Bowl(nn.Module):
    """1 + ½θᵀAθ with A = diag(1, 0.5, 0.2), at its minimum θ = 0: the gradient exactly 0."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.register_buffer("A", torch.diag(torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + 0.5 * self.theta @ self.A @ self.theta) * torch.ones(len(x), dtype=x.dtype)


def test_the_newton_decrement_at_an_exact_minimum_is_zero():
    """At g = 0 exactly with H positive definite, δ² = gᵀH⁻¹g = 0 is defined; the evidence said
    None ("undefined", DESIGN) and no CG ran (an outside review)."""
    x = torch.zeros(8, 1, dtype=torch.float64)
    d = cs.diagnose(_Bowl(), lambda o, y: o.mean(), (x, x[:, 0]), reduction="mean", lr=0.1)
    assert d.state == State.MINIMUM and d.evidence["grad_norm"] == 0.0
    assert d.evidence["newton_decrement"] == 0.0 and d.evidence["decrement_converged"] is True
    assert d.evidence["lambda_min"] == pytest.approx(0.2, rel=1e-8)


def test_the_stable_learning_rate_is_below_both_sharpnesses_the_verdict_judges():
    """With train_batches the advice named the batch sharpness's stable rate, 5.58, beside
    *unstable* at lr 3 from the full-batch sharpness (whose rate is 1.77), and mini-batch SGD
    at 3 blew up (an outside review). It is the rate below both now."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X[:320] / 16.0), torch.tensor(y[:320])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    batches = [(X[i : i + 32], y[i : i + 32]) for i in range(0, 320, 32)]
    d = cs.diagnose(model, nn.CrossEntropyLoss(), (X, y), lr=3.0, train_batches=batches)
    e = d.evidence
    assert d.state == State.UNSTABLE and e["batch_sharpness"] < e["sharpness"]
    assert e["stable_lr"] == pytest.approx(2 / e["sharpness"], rel=1e-12) and e["stable_lr"] < 3
    assert f"{e['stable_lr']:.3g} (now 3)" in str(d)


def _digits_batches(n=320, size=32):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X[:n] / 16.0), torch.tensor(y[:n])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    return model, (X, y), [(X[i : i + size], y[i : i + size]) for i in range(0, n, size)]


@pytest.mark.parametrize("lr, state", [(0.5, State.LEARNING), (3.0, State.UNSTABLE)])
def test_a_summed_loss_with_training_batches_is_judged_at_a_steps_share(lr, state):
    """Mini-batch SGD on a summed loss at lr/B takes the same steps as on the mean loss at lr.
    The full-batch sharpness of the sum over N samples is N/B times what a step of B meets,
    and such a run read *unstable* at every probe where the mean read *learning* (an outside
    review). With train_batches B is known: the stability rules judge the sum's full-batch
    curvature times B/N (``step_share``), and the verdict and stable rate are the mean's."""
    model, data, batches = _digits_batches()
    mean = cs.diagnose(model, nn.CrossEntropyLoss(), data, lr=lr, train_batches=batches)
    summed = nn.CrossEntropyLoss(reduction="sum")
    d = cs.diagnose(model, summed, data, lr=lr / 32, train_batches=batches)
    e, m = d.evidence, mean.evidence
    assert mean.state == state and d.state == state
    assert e["step_share"] == pytest.approx(0.1, rel=1e-12) and "step_share" not in m
    assert e["sharpness"] == pytest.approx(320 * m["sharpness"], rel=1e-6)  # as measured
    assert e["batch_sharpness"] == pytest.approx(32 * m["batch_sharpness"], rel=1e-6)
    assert e["stable_lr"] == pytest.approx(m["stable_lr"] / 32, rel=1e-6)
    said = " ".join(d.reasons)
    assert f"B/N = 0.1 of the summed loss's {e['sharpness']:.4g}" in said
    if state == State.UNSTABLE:  # the step's share past the limit: its rate is the mean's / B
        assert f"{e['stable_lr']:.3g} (now {lr / 32:.3g})" in str(d)
    # without training batches a summed loss's steps are taken to be full-batch: judged on it
    full = cs.diagnose(model, summed, data, lr=lr / 32)
    assert full.state == State.UNSTABLE and "step_share" not in full.evidence


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_accumulation_is_judged_on_the_batch_a_step_takes(reduction):
    """k micro-batches of B accumulated into one step: ``train_batches`` of the micro-batches
    were judged at B's batch sharpness — a review's run read *unstable* at every probe while
    its loss fell, and for a summed loss *learning* (stable rate 1.6x the lr) while it diverged.
    ``accumulation=k`` takes every k consecutive batches as one step's: the same evidence as
    ``train_batches`` of the k·B batches themselves, and the same verdict."""
    model, data, micro = _digits_batches(size=8)  # 40 micro-batches of 8
    merged = [
        (torch.cat([x for x, _ in micro[i : i + 4]]), torch.cat([y for _, y in micro[i : i + 4]]))
        for i in range(0, 40, 4)
    ]
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    lr = 2.0 if reduction == "mean" else 2.0 / 32
    want = cs.diagnose(model, loss_fn, data, lr=lr, train_batches=merged)
    got = cs.diagnose(model, loss_fn, data, lr=lr, train_batches=micro, accumulation=4)
    alone = cs.diagnose(model, loss_fn, data, lr=lr, train_batches=micro)
    w, e = want.evidence, got.evidence
    assert got.state == want.state and e["batches"] == w["batches"] == 10
    for key in ("batch_sharpness", "batch_sharpness_stderr", "stable_lr"):
        assert e[key] == pytest.approx(w[key], rel=1e-9)
    if reduction == "sum":  # a step of 8 of the sum's 320: its rate 4x too high, "learning"
        assert e["step_share"] == pytest.approx(32 / 320, rel=1e-12)
        assert got.state == State.UNSTABLE and alone.state == State.LEARNING
        assert alone.evidence["stable_lr"] == pytest.approx(4 * e["stable_lr"], rel=1e-6)
    else:  # B's batch sharpness, not k·B's (the full-batch sharpness decides here)
        assert alone.evidence["batch_sharpness"] > 1.3 * e["batch_sharpness"]
    with pytest.raises(ValueError, match="accumulation"):
        cs.diagnose(model, loss_fn, data, lr=lr, train_batches=micro, accumulation=0)


def test_a_summed_losss_step_share_counts_the_terms_it_adds():
    """B and N counted rows: a probe whose labels were 60% ignored beside training batches
    with none gave a share of 0.1 for the 0.25 the summed labels make, and the sum read
    *learning* where the mean read *unstable*; (B, T) targets counted B (the diff review). They
    count what the loss adds: its counted labels, as the mean divides by."""
    torch.manual_seed(0)
    X, y = torch.randn(400, 4, dtype=torch.float64), torch.randint(0, 3, (400,))
    probe = y.clone()
    probe[torch.arange(400) % 5 < 3] = -100
    batches = [(X[i : i + 40], y[i : i + 40]) for i in range(0, 400, 40)]
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    mean = cs.diagnose(model, nn.CrossEntropyLoss(), (X, probe), lr=3.3, train_batches=batches)
    summed = nn.CrossEntropyLoss(reduction="sum")
    d = cs.diagnose(model, summed, (X, probe), lr=3.3 / 40, train_batches=batches)
    assert mean.state == d.state == State.UNSTABLE
    assert d.evidence["step_share"] == pytest.approx(40 / 160, rel=1e-12)
    assert d.evidence["stable_lr"] == pytest.approx(mean.evidence["stable_lr"] / 40, rel=1e-6)
    tokens = (torch.randn(2, 5, 4, dtype=torch.float64), torch.randint(0, 3, (2, 5)))
    seq = nn.Linear(4, 3).double()
    C = cs.Curvature(seq, lambda o, t: summed(o.transpose(1, 2), t), tokens, reduction="sum")
    assert C.num_samples == 2  # a function's: rows (what it adds is not known)
    probe[:] = -100
    d = cs.diagnose(model, summed, (X[:10], probe[:10]), lr=0.1)  # nothing counted: a sum of 0
    assert d.evidence["loss"] == 0.0


def test_a_summed_loss_in_a_monitored_mini_batch_run_reads_as_the_mean_does():
    """The review's run: 80 steps of SGD at batch 32 on the mean at 0.5 and on the sum at
    0.5/32, the same steps; the Monitor with train_batches read *unstable* at every probe of
    the sum, and its cheap checks compared the sum's full-batch curvature along the update
    with the limit as well."""
    import copy

    base, data, batches = _digits_batches()
    runs = {}
    for name, loss, lr in (
        ("mean", nn.CrossEntropyLoss(), 0.5),
        ("sum", nn.CrossEntropyLoss(reduction="sum"), 0.5 / 32),
    ):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        mon = cs.Monitor(model, loss, data, optimizer=opt, every=20, train_batches=batches)
        for _ in range(8):
            for xb, yb in batches:
                opt.zero_grad()
                value = loss(model(xb), yb)
                value.backward()
                opt.step()
                mon.step(value)
        mon.close()
        runs[name] = ([d.state for d in mon.history], list(mon.probe_causes))
    assert runs["sum"] == runs["mean"]
    assert set(runs["sum"][0]) == {State.LEARNING}


def test_momentum_changes_the_limit():
    m = FunctionModel(bowl, FAR)
    plain = cs.diagnose(m, mean_loss, DATA, torch.optim.SGD(m.parameters(), lr=0.25))
    heavy = cs.diagnose(m, mean_loss, DATA, torch.optim.SGD(m.parameters(), lr=0.25, momentum=0.9))
    assert plain.state == "unstable" and heavy.state == "learning"
    assert heavy.evidence["stability_limit"] == pytest.approx(3.8 / 0.25)


def test_saddle_with_zero_gradient():
    p = cs.problems.get("saddle")
    d, _ = diag(p.f, [1e-6, 1e-6], lr=0.1)
    assert d.state == "saddle"
    assert d.evidence["lambda_min"] == pytest.approx(-2.0, rel=1e-2)
    assert d.vectors["bottom"].abs()[1] == pytest.approx(1.0, abs=1e-3)  # escape along y
    assert "saddle-free" in " ".join(d.advice)


def test_the_top_of_a_hill_is_a_saddle_that_says_it_is_a_maximum():
    """No state of its own; the reason said "a direction curves down" where every one does
    (an outside review): it names the maximum, with λ_max < 0."""
    d, _ = diag(lambda x: -bowl(x), [1e-7, 1e-7, 1e-7], lr=0.1)
    assert d.state == "saddle" and d.evidence["sharpness"] == pytest.approx(-0.1, rel=1e-2)
    assert any("every direction curves down" in r and "local maximum" in r for r in d.reasons)


def _quadratic_with_lowest(lowest):
    """½xᵀAx with λ_max = 30, a bulk in [0, 3] and λ_min = ``lowest``, at x = 0 (and 1e-9 off)."""
    gen = torch.Generator().manual_seed(0)
    lam = torch.cat(
        [
            torch.tensor([lowest, 30.0], dtype=torch.float64),
            torch.rand(198, generator=gen, dtype=torch.float64) * 3,
        ]
    )
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen, dtype=torch.float64))
    A = (q * lam) @ q.T
    A = (A + A.T) / 2
    return (lambda x: 0.5 * x @ A @ x), torch.full((200,), 1e-9, dtype=torch.float64)


@pytest.mark.parametrize(("lowest", "state"), [(-0.18, "minimum"), (-0.6, "saddle")])
def test_saddle_against_minimum_is_decided_on_a_lambda_min_ten_times_finer_than_tau(lowest, state):
    """λ_min decides saddle against minimum at −τ·|λ_max| (τ = 1%), and was measured to 1% of
    |λ_max|: a linear network's saddle with λ_min −0.6% of λ_max read +0.02 to +0.08, printed as
    measured (an outside review). Where the gradient is small it is refined to 0.1% of |λ_max|,
    and said with its accuracy."""
    f, x = _quadratic_with_lowest(lowest)
    for seed in range(3):
        m = FunctionModel(f, x)
        d = cs.diagnose(m, mean_loss, DATA, torch.optim.SGD(m.parameters(), lr=0.01), seed=seed)
        assert d.state == state and d.confident
        assert abs(d.evidence["lambda_min"] - lowest) <= 1e-3 * 30
        if state == "minimum":
            assert any(f"λ_min = {d.evidence['lambda_min']:.3g} ± " in r for r in d.reasons)
            assert "λ_min = " in str(d) and "Λ" not in str(d)  # not capitalised to another symbol


def test_bottom_of_a_convex_bowl_is_a_minimum():
    d, _ = diag(bowl, [1e-7, -1e-7, 1e-7], lr=0.1)
    assert d.state == "minimum"
    assert d.evidence["newton_decrement"] == pytest.approx(0.0, abs=1e-12)


def test_far_out_plateau_is_flat():
    d, _ = diag(lambda x: 1 - torch.exp(-(x @ x)), [3.0, 0.0])
    assert d.state == "flat"
    assert d.evidence["loss"] == pytest.approx(1.0, abs=1e-3)


def test_nan_is_diverged():
    d, _ = diag(lambda x: torch.log(x).sum(), [-1.0, 2.0], lr=0.1)
    assert d.state == "diverged" and math.isnan(d.evidence["loss"])
    assert d.evidence["sharpness"] is None and "Restore" in d.advice[0]


def test_an_infinite_loss_is_reported_as_infinite():
    """An overflowing loss read "the loss (nan)" where torch gave inf (an outside review)."""
    d, _ = diag(lambda x: (x * 1e300).pow(2).sum(), [1e10, 0.0], lr=0.1)
    assert d.state == "diverged" and d.evidence["loss"] == math.inf
    assert "the loss (inf)" in d.reasons[0]


def test_an_adaptive_optimizers_stable_learning_rate_comes_with_its_caveat():
    """After one Adam step at lr 0.01 the advice named 38 as the largest stable learning rate;
    followed, the loss peaked at 1,296x its start (an outside review): the limit holds for the
    present preconditioner, which a larger learning rate changes."""
    x = FunctionModel(lambda x: 5 * x[0] ** 2 + 0.5 * x[1] ** 2, [1.0, 1.0])
    opt = torch.optim.Adam(x.parameters(), lr=0.01)
    opt.zero_grad()
    mean_loss(x(DATA[0]), DATA[1]).backward()
    opt.step()
    d = cs.diagnose(x, mean_loss, DATA, optimizer=opt)
    assert d.state == "learning" and d.evidence["stable_lr"] > 100 * 0.01
    assert "raise it gradually, not to the limit" in d.advice[0]
    sgd, _ = diag(lambda x: 5 * x[0] ** 2 + 0.5 * x[1] ** 2, [1e-3, 1.0], lr=0.01)
    assert "gradually" not in sgd.advice[0]  # a fixed preconditioner: the limit is the limit


def test_a_learning_rate_within_the_margin_past_the_limit_is_not_called_stable():
    """Gradient descent 5% past 2/λ_max diverges (loss 7 to 1e17 in 200 steps): the verdict
    stays learning (the margin allows for the estimates' error), but the advice said "Steps are
    stable" against its own numbers (an outside review)."""
    d, _ = diag(lambda x: 5 * x[0] ** 2 + 0.5 * x[1] ** 2, [1e-3, 1.0], lr=0.21)
    assert d.state == "learning" and d.evidence["stable_lr"] == pytest.approx(0.2, rel=1e-3)
    assert "Steps are stable" not in d.advice[0]
    assert d.advice[0].startswith("The learning rate is 1.05x the largest stable one")
    below, _ = diag(lambda x: 5 * x[0] ** 2 + 0.5 * x[1] ** 2, [1e-3, 1.0], lr=0.19)
    assert below.advice[0].startswith("Steps are stable")


def test_adam_sharpness_is_the_preconditioned_one():
    m = FunctionModel(bowl, FAR)
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    loss = mean_loss(m(DATA[0]), DATA[1])
    loss.backward()
    opt.step()
    opt.zero_grad()
    d = cs.diagnose(m, mean_loss, DATA, opt)
    v_hat = opt.state[m.x]["exp_avg_sq"] / (1 - 0.999)
    p_inv = 1 / (v_hat.sqrt() + 1e-8)
    expected = torch.linalg.eigvalsh(p_inv.sqrt()[:, None] * A * p_inv.sqrt()[None, :])[-1]
    assert d.evidence["sharpness"] == pytest.approx(float(expected), rel=1e-2)
    assert d.evidence["preconditioned"] and d.evidence["stability_limit"] == pytest.approx(3800)


def test_l2_weight_decay_is_part_of_the_curvature():
    m = FunctionModel(bowl, FAR)
    d = cs.diagnose(m, mean_loss, DATA, torch.optim.SGD(m.parameters(), lr=0.01, weight_decay=0.5))
    assert d.evidence["sharpness"] == pytest.approx(10.5, rel=1e-2)
    # the gradient, the step's curvature and the Newton decrement are the penalised objective's:
    # g = (A + 0.5 I) x, δ² = gᵀ(A + 0.5 I)⁻¹g = Σ (a_i + 0.5) x_i² at x = (1, 1, 1)
    g = torch.tensor([10.5, 1.5, 0.6], dtype=torch.float64)
    assert d.evidence["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-10)
    assert d.evidence["newton_decrement"] == pytest.approx(12.6, rel=1e-6)
    c = float(g @ (torch.tensor([10.5, 1.5, 0.6], dtype=torch.float64) * g) / (g @ g))
    assert d.evidence["directional_curvature"] == pytest.approx(c, rel=1e-10)


def test_evidence_has_the_contract_keys_and_the_cost():
    case = cases.mlp()
    d = cs.diagnose(case.model, case.loss_fn, case.data, lr=0.1)
    for key in (*cases.CONTRACT_KEYS, "thresholds"):
        assert key in d.evidence
    assert 0 < d.evidence["matvecs"] <= cs.diagnose.__kwdefaults__["budget"]
    assert d.state in STATES


def test_budget_caps_the_products():
    case = cases.residual_layernorm()
    d = cs.diagnose(case.model, case.loss_fn, case.data, lr=0.1, budget=20)
    assert d.evidence["matvecs"] <= 20
    with pytest.raises(ValueError, match="budget"):
        cs.diagnose(case.model, case.loss_fn, case.data, budget=3)


def test_the_model_and_optimizer_are_left_as_found():
    case = cases.dropout_batchnorm()
    opt = torch.optim.Adam(case.model.parameters(), lr=1e-3)
    case.loss_fn(case.model(case.inputs), case.targets).backward()
    opt.step()
    before = cases.snapshot(case.model)
    state = {
        k: {n: t.clone() for n, t in v.items() if torch.is_tensor(t)}
        for k, v in ((id(p), opt.state[p]) for p in case.model.parameters())
    }
    cs.diagnose(case.model, case.loss_fn, case.data, opt)
    cases.assert_unchanged(before, cases.snapshot(case.model))
    for p in case.model.parameters():
        for n, t in state[id(p)].items():
            assert torch.equal(opt.state[p][n], t)


def test_batch_sharpness_is_the_mean_rayleigh_quotient_along_batch_gradients():
    case = cases.mlp(n=24)
    X, y = case.data
    batches = [(X[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
    d = cs.diagnose(case.model, case.loss_fn, case.data, lr=0.1, train_batches=batches)
    expected = []
    for xb, yb in batches:
        sub = cases.Case("b", case.model, case.loss_fn, xb, yb)
        L, theta0 = cases.loss_fn_of_theta(sub)
        g = torch.func.grad(L)(theta0)
        H = cases.dense_hessian(sub)
        expected.append(float(g @ H @ g / (g @ g)))
    assert d.evidence["batch_sharpness"] == pytest.approx(sum(expected) / 3, rel=1e-8)
    assert d.evidence["batches"] == 3 and d.evidence["batch_sharpness_stderr"] > 0


def test_batch_sharpness_above_the_limit_is_unstable():
    s, reasons = classify(
        {
            "loss": 1.0,
            "grad_norm": 1.0,
            "sharpness": 10.0,
            "lambda_min": 0.0,
            "stability_limit": 20.0,
            "lr": 0.1,
            "limit_constant": 2.0,
            "batch_sharpness": 23.0,
        }
    )
    assert s == "unstable" and "batch sharpness" in reasons[-1]


def test_layer_shares_are_the_top_eigenvectors_weight_per_block():
    p = cs.problems.get("digits-mlp", hidden=8, n=100)
    model = p.make_model(0)
    d = cs.diagnose(model, p.loss_fn, p.data, lr=0.1)
    shares = d.evidence["layer_shares"]
    assert list(shares) == [n for n, _ in model.named_parameters()]
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
    v = d.vectors["top"]
    assert shares["0.weight"] == pytest.approx(float((v[: 64 * 8] ** 2).sum()), rel=1e-9)


def test_the_batch_sharpness_sample_is_sized_from_its_standard_error():
    """At least 8 batches; more until the standard error is at most 5% of the limit; at most
    max_batches."""
    case = cases.mlp(n=96)
    X, y = case.data
    same = [(X[:8], y[:8])] * 40  # no spread: 8 batches are enough
    varied = [(X[i : i + 4], y[i : i + 4]) for i in range(0, 96, 4)]  # 24 small batches

    def used(batches, lr, **kw):
        d = cs.diagnose(case.model, case.loss_fn, case.data, lr=lr, train_batches=batches, **kw)
        return d.evidence

    assert used(same, 0.1)["batches"] == 8 and used(same, 0.1)["batch_sharpness_stderr"] == 0
    loose, tight = used(varied, 1e-3), used(varied, 10.0)  # limits 2000 and 0.2
    assert loose["batches"] == 8  # 5% of 2000 is far above any spread
    assert tight["batches"] == 24  # all of them: the spread is large against 0.2
    assert tight["batch_sharpness_stderr"] > 0.05 * 0.2
    assert used(varied, 10.0, max_batches=12)["batches"] == 12


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (2.5, TypeError)])
def test_max_batches_is_checked(value, error):
    case = cases.mlp(n=24)
    with pytest.raises(error, match="max_batches"):
        cs.diagnose(
            case.model, case.loss_fn, case.data, lr=0.1, train_batches=[], max_batches=value
        )


def test_a_warm_start_of_another_length_is_refused():
    """diagnose's v0 must be over the measured parameters (the Monitor drops its own stale
    vectors when parameters are frozen or added; a caller's mistake is named)."""
    case = cases.mlp(n=24)
    n = sum(p.numel() for p in case.model.parameters())
    with pytest.raises(ValueError, match=rf"v0's vectors have {n - 1} entries, .* measures {n}"):
        cs.diagnose(case.model, case.loss_fn, case.data, lr=0.1, v0=torch.ones(n - 1, 2))


def test_an_overflowing_training_batch_says_diverged_instead_of_raising():
    """A probe never raises on overflow (the Monitor would end the user's loop): a training
    batch whose loss overflows (finite inputs of 1e20 in float32, squared) makes the batch
    sharpness NaN and the verdict diverged, the probe data's numbers kept."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    X, Y = torch.randn(16, 3), torch.randn(16, 1)
    batches = [(X[:8], Y[:8]), (torch.full((8, 3), 1e20), Y[8:])]
    d = cs.diagnose(model, torch.nn.functional.mse_loss, (X, Y), lr=0.1, train_batches=batches)
    assert d.state == "diverged" and math.isnan(d.evidence["batch_sharpness"])
    assert math.isfinite(d.evidence["sharpness"])
    assert "the curvature is not" in d.reasons[0]


def test_a_verdict_without_an_optimizer_says_stability_was_not_judged():
    """Without an optimizer or lr there is no stability limit: "learning" said nothing of it,
    so a Monitor built without either looked like one that had judged the steps stable."""
    from curvscope.diagnosis.classify import NOT_JUDGED

    p = cs.problems.get("digits-mlp", hidden=8, n=100)
    model = p.make_model(0)
    bare = cs.diagnose(model, p.loss_fn, p.data)
    assert bare.state == "learning" and NOT_JUDGED in bare.reasons
    judged = cs.diagnose(model, p.loss_fn, p.data, lr=0.1)
    assert judged.state == "learning" and NOT_JUDGED not in judged.reasons


def test_a_learning_rate_too_small_for_a_finite_limit_is_not_called_zero():
    """At lr = 1e-320 the limit 2/η overflows to ∞, and the reason read "learning rate 0: no
    stability limit" beside "(now 1e-320)" in the advice; an SGD whose lr is 0 still reads so."""
    p = cs.problems.get("digits-mlp", hidden=8, n=100)
    model = p.make_model(0)
    for lr, said in (
        (1e-320, "learning rate 1e-320: no finite stability limit"),
        (0.0, "learning rate 0: no stability limit"),
    ):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        d = cs.diagnose(model, p.loss_fn, p.data, optimizer=opt)
        assert d.state == "learning" and said in d.reasons, d.reasons


def test_a_fit_at_zero_loss_is_not_sent_to_cross_a_plateau():
    """Logistic regression on separable data, trained until the loss is ~0: the gradient and the
    curvature are tiny, *flat* — and the advice was to cross a plateau faster and look for dead
    units (an outside review). At a loss below the loss floor it says the fit is done."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(100, 2, generator=gen, dtype=torch.float64)
    y = (X[:, 0] > 0).to(torch.float64)
    X[:, 0] += torch.where(y > 0, 2.0, -2.0)  # a wide margin: separable
    model = nn.Linear(2, 1, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[40.0, 0.0]], dtype=torch.float64))
        model.bias.zero_()

    def loss_fn(out, t):
        return nn.functional.binary_cross_entropy_with_logits(out[:, 0], t)

    d = cs.diagnose(model, loss_fn, (X, y), torch.optim.SGD(model.parameters(), lr=0.1))
    assert d.evidence["loss"] < 1e-12 and d.state == "flat"
    assert d.advice[0].startswith("The loss is about zero") and "weight decay" in d.advice[0]
    plateau = cs.diagnose(model, lambda o, t: loss_fn(o, t) + 1.0, (X, y), reduction="mean")
    assert "plateau faster" in " ".join(plateau.advice)


def _digits_mlp(seed=0):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    return model, (X[:256], y[:256])


def _killed(model):
    """Every ReLU outputs 0 on every input (what a blow-up leaves), and the
    output bias at its own optimum (the log class frequencies): a minimum of the output bias."""
    _, (_, y) = _digits_mlp()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
        model[2].bias.fill_(-100.0)
        freq = torch.bincount(y, minlength=10).double() / len(y)
        model[4].bias.copy_(freq.log())
    return model


def test_a_network_whose_relus_all_died_is_not_called_converged():
    """A network a step killed sits at a true minimum of its output bias: the verdict says
    that most of the parameters get no gradient, and the advice does not say "stop"."""
    model, data = _digits_mlp()
    _killed(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    d = cs.diagnose(model, nn.CrossEntropyLoss(), data, optimizer=opt)
    assert d.state == "minimum"
    ev = d.evidence
    n = sum(p.numel() for p in model.parameters())
    assert ev.zero_gradient_share == pytest.approx((n - 10) / n)
    assert ev.zero_gradient_blocks == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight"]
    assert ev.dead_blocks == ev.zero_gradient_blocks  # no curvature on them either
    assert ev.dead_share == ev.zero_gradient_share
    assert (
        "99.71% of the parameters (0.weight, 0.bias, 2.weight and 2 more) get exactly zero "
        "gradient and curvature on this data"
    ) in str(d)
    assert "of the parameters get neither gradient nor curvature" in d.advice[0]
    assert not any("stop" in a for a in d.advice)
    for budget in (8, 12, 20):  # the rule's two products are within the budget (a review)
        small = cs.diagnose(model, nn.CrossEntropyLoss(), data, optimizer=opt, budget=budget)
        assert small.evidence.matvecs <= budget, budget
    # trained there by a too-large step instead: *learning*, with the same sentence and advice
    model, data = _digits_mlp()
    big = torch.optim.SGD(model.parameters(), lr=5.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        i = torch.randint(0, 256, (64,), generator=gen)
        big.zero_grad()
        nn.functional.cross_entropy(model(data[0][i]), data[1][i]).backward()
        big.step()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    d = cs.diagnose(model, nn.CrossEntropyLoss(), data, optimizer=opt)
    assert d.evidence.zero_gradient_share > 0.99
    assert "get exactly zero gradient and curvature on this data" in str(d)
    assert "of the parameters get neither gradient nor curvature" in d.advice[0]


def test_weight_decay_does_not_hide_a_dead_network():
    """Coupled weight decay adds l2·θ to every block's gradient: the zero-gradient blocks are
    read from the data loss's gradient."""
    model, data = _digits_mlp()
    _killed(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3)
    d = cs.diagnose(model, nn.CrossEntropyLoss(), data, optimizer=opt)
    assert d.evidence.zero_gradient_share > 0.99


def test_zero_gradient_blocks_are_judged_whole():
    """A healthy network, an embedding whose rows the batch leaves unused and a pruned weight
    (masked entries) have no zero-gradient block; a module the loss does not use is listed,
    and said only where such blocks hold at least the threshold's share (a LoRA-style adapter
    at initialisation: B = 0 leaves A exactly none)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 8)
            self.fc = nn.Linear(8, 3)
            self.unused = nn.Linear(2, 2)
            self.A = nn.Parameter(torch.randn(4, 8))
            self.B = nn.Parameter(torch.zeros(3, 4))

        def forward(self, tokens):
            h = self.emb(tokens).mean(1)
            return self.fc(h) + h @ self.A.T @ self.B.T

    torch.manual_seed(0)
    net = Net()
    prune.random_unstructured(net.fc, "weight", amount=0.5)
    tokens = torch.randint(0, 10, (32, 5))  # rows 10..99 of the embedding unused
    data = (tokens, torch.randint(0, 3, (32,)))
    d = cs.diagnose(net, nn.CrossEntropyLoss(), data, lr=0.1)
    assert d.evidence.zero_gradient_blocks == ["A", "unused.weight", "unused.bias"]
    n = sum(p.numel() for p in net.parameters())  # fc's weight_orig is the measured one
    assert d.evidence.zero_gradient_share == pytest.approx(38 / n) == pytest.approx(38 / 877)
    assert "exactly zero" not in str(d) and d.evidence.dead_share is None  # not judged
    said = cs.diagnose(
        net,
        nn.CrossEntropyLoss(),
        data,
        lr=0.1,
        thresholds=cs.diagnosis.Thresholds(zero_gradient=0.04),
    )
    assert "4.333% of the parameters get exactly zero gradient" in str(said)
    assert "the curvature couples A to the rest: a factor still at zero (B)" in str(said)
    assert "unused.weight, unused.bias get no curvature either: dead units, or waiting on B" in str(
        said
    )
    # A is coupled to B = 0 (and unused is not): not dead, no alarm
    assert said.evidence.dead_blocks == ["unused.weight", "unused.bias"]  # 0.7%: no alarm
    assert "neither gradient nor curvature" not in said.advice[0]
    healthy, data = _digits_mlp()
    d = cs.diagnose(healthy, nn.CrossEntropyLoss(), data, lr=0.1)
    assert d.evidence.zero_gradient_share == 0 and d.evidence.zero_gradient_blocks == []


def test_a_zero_initialized_head_is_a_factor_at_zero_not_dead_units():
    """A review of the zero-gradient rule: a zero-initialized classifier head (timm's ViT
    default) leaves every hidden block a gradient of exactly 0 at initialisation — and read as
    a network a step killed ("go back to a checkpoint"), though it trains normally. The
    curvature couples those blocks to the head: not dead, and said so."""
    model, data = _digits_mlp()
    with torch.no_grad():
        model[4].weight.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    d = cs.diagnose(model, nn.CrossEntropyLoss(), data, optimizer=opt)
    ev = d.evidence
    assert ev.zero_gradient_blocks == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert ev.zero_gradient_share > 0.5 and ev.dead_blocks == []
    assert (
        "but the curvature couples 0.weight, 0.bias, 2.weight and 1 more to the rest: a factor "
        "still at zero (4.weight) that moves them once it moves"
    ) in str(d)
    assert ev.zero_factor_blocks == ["4.weight"]
    assert not any("checkpoint" in a for a in d.advice)
    assert "raise the learning rate gradually, not to the limit" in d.advice[-1]
    # a threshold of 0 judges every zero-gradient block, and no dead one is none (a review: "0%
    # of the parameters () get exactly zero gradient and curvature", "go back to a checkpoint")
    zero = cs.diagnose(
        model,
        nn.CrossEntropyLoss(),
        data,
        optimizer=opt,
        thresholds=cs.diagnosis.Thresholds(zero_gradient=0.0),
    )
    assert zero.evidence.dead_blocks == [] and "()" not in str(zero)
    assert not any("checkpoint" in a for a in zero.advice)
    # and they move after the head's first step
    nn.functional.cross_entropy(model(data[0]), data[1]).backward()
    opt.step()
    opt.zero_grad()
    d = cs.diagnose(model, nn.CrossEntropyLoss(), data, optimizer=opt)
    assert d.evidence.zero_gradient_blocks == []


def test_a_small_gradient_state_past_the_stability_limit_is_unstable():
    """A review: a least-squares minimum whose loss dwarfs its curvature read *flat* at 1.5x
    and 3x the limit, advising a larger learning rate (gradient descent reached 3e31), and a
    saddle at 2x and 4x read *saddle* (NaN). Flat, saddle and minimum are states the optimizer
    stays in only where its steps do not overshoot; below the limit they stand, and *flat*
    bounds its "larger learning rate" by the stable one."""
    C2 = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))

    def offset_bowl(x):  # a minimum at loss 1000, curvature 2 ≤ 0.01 × loss scale: "flat"
        return 1000.0 + 0.5 * x @ (C2 @ x)

    for lr, state in [(0.5, "flat"), (1.5, "unstable"), (3.0, "unstable")]:
        d, _ = diag(offset_bowl, [0.0, 0.0], lr=lr)
        assert d.state == state, lr
    d, _ = diag(offset_bowl, [0.0, 0.0], lr=0.5)
    assert "a larger learning rate (up to 1, the largest stable one here; now 0.5)" in str(d)
    d, _ = diag(offset_bowl, [0.0, 0.0], lr=1.05)  # within the margin past the limit: flat
    assert d.state == "flat" and "(not a larger learning rate: 1.05 is at or past" in str(d)
    S = torch.diag(torch.tensor([2.0, -2.0], dtype=torch.float64))

    def saddle(x):
        return 1.0 + 0.5 * x @ (S @ x)

    for lr, state in [(0.5, "saddle"), (2.0, "unstable"), (4.0, "unstable")]:
        d, _ = diag(saddle, [0.0, 0.0], lr=lr)
        assert d.state == state, lr


def test_a_block_at_its_own_stationary_point_is_not_silent():
    """A review of the zero-gradient rule: one block whose gradient is exactly 0 because it sits
    at its own optimum (a float16 output bias, its gradient rounded to 0) joined the dead
    blocks, its own curvature made H u ≠ 0, and the dead network read as a factor at zero,
    "stop"; at an exact stationary point every block was said to be "coupled to the rest".
    Blocks with curvature of their own are left out of the silent ones."""
    model, data = _digits_mlp()
    model = _killed(model).half()
    X, y = data[0].half(), data[1]
    loss = nn.functional.cross_entropy(model(X), y)
    assert all(not g.any() for g in torch.autograd.grad(loss, list(model.parameters())))
    d = cs.diagnose(model, nn.CrossEntropyLoss(), (X, y), lr=0.1)
    ev = d.evidence
    assert d.state == "minimum" and ev.dead_share == pytest.approx(0.9971, abs=1e-4)
    assert ev.zero_gradient_blocks == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight"]
    assert "of the parameters get neither gradient nor curvature" in d.advice[0]
    # an exact stationary point: every gradient 0, every block curved — no silent block
    S = torch.diag(torch.tensor([10.0, -1.0, 0.1], dtype=torch.float64))
    for f, state in [(bowl, "minimum"), (lambda x: 0.5 * x @ (S @ x), "saddle")]:
        d, _ = diag(f, [0.0, 0.0, 0.0], lr=0.05)
        assert d.state == state and d.evidence.zero_gradient_blocks == []
        assert d.evidence.dead_share is None and "exactly zero" not in str(d)


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_warm_start_does_not_hide_a_new_negative_direction(adaptive):
    """A review: warm-started as a Monitor probe is (the previous probe's top and bottom
    vectors), a diagnosis at a small gradient read *minimum*, λ_min ≈ 0, confident, for a saddle
    −0.02 below a near-null cluster (1,169 eigenvalues within 1e-5 of 0), 5 of 5 seeds: the
    start held none of the new direction, and a warm start is not held to the 20 products of a
    random one. The refinement that decides saddle against minimum mixes in a random vector."""
    H, q = cases.below_a_null_cluster()
    x0 = 1e-4 * q[:, 29]  # a small gradient, along the top eigenvector
    warm = torch.stack([q[:, 29], q[:, 100]], 1)  # the top one and one of the cluster
    for seed in range(3):
        d, _ = diag(
            lambda x: 1.0 + 0.5 * x @ (H @ x), x0, lr=0.5, v0=warm, seed=seed, adaptive=adaptive
        )
        assert d.state == "saddle" and d.confident, seed
        assert d.evidence.lambda_min == pytest.approx(-0.02, abs=1e-3)
    # a budget without room for the mixed start's 20 products: not judged, said (a review:
    # "min_matvecs=20 is more than max_matvecs=19" raised, and killed a Monitor's loop)
    d, _ = diag(
        lambda x: 1.0 + 0.5 * x @ (H @ x), x0, lr=0.5, v0=warm, adaptive=adaptive, budget=20
    )
    assert not d.confident and d.evidence.matvecs <= 20


def test_a_cold_diagnosis_makes_room_for_a_random_starts_products():
    """Lanczos's 60% of a budget below 34 cannot reach the 20 products a random start is judged
    from (a review: budgets 16–33, confident before the floor, never were after it): a cold
    diagnosis gives Lanczos at least those, where the budget holds them and two more."""
    p = cs.problems.get("digits-mlp", hidden=8, n=100)
    model = p.make_model(0)
    d = cs.diagnose(model, p.loss_fn, p.data, lr=0.1, budget=24)
    assert d.confident and d.evidence.matvecs <= 24
    d = cs.diagnose(model, p.loss_fn, p.data, lr=0.1, budget=16)
    assert not d.confident and d.evidence.matvecs <= 16


def test_a_small_zero_initialized_branch_does_not_hide_a_dead_trunk():
    """A review: a dead branch holding 88% of the parameters beside a small branch with a
    zero-initialized head — one product over all the zero-gradient blocks was not 0 (the
    small branch couples to its head), and the dead 88% read as "a factor still at zero",
    "raise the learning rate gradually". Each block is judged: the dead ones are named."""

    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.dead = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))
            self.small = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
            with torch.no_grad():
                self.dead[0].bias.fill_(-100.0)
                self.small[2].weight.zero_()

        def forward(self, x):
            return self.dead(x) + self.small(x)

    torch.manual_seed(0)
    model = TwoBranches()
    _, data = _digits_mlp()
    d = cs.diagnose(model, nn.CrossEntropyLoss(), data, lr=0.1)
    ev = d.evidence
    assert ev.zero_gradient_blocks == [
        "dead.0.weight",
        "dead.0.bias",
        "dead.2.weight",
        "small.0.weight",
        "small.0.bias",
    ]
    assert ev.dead_blocks == ["dead.0.weight", "dead.0.bias", "dead.2.weight"]
    assert ev.dead_share > 0.5 and ev.zero_factor_blocks == ["small.2.weight"]
    # beside a factor still at zero the trunk may be waiting on it (a Fixup network's layers
    # before two zero factors get no curvature either): named, not alarmed — the price of no
    # false alarm on Fixup (below)
    assert "dead.0.weight, dead.0.bias, dead.2.weight get no curvature either: dead units" in str(d)
    assert not any("checkpoint" in a for a in d.advice)


def test_a_fixup_network_at_initialisation_is_not_called_dead():
    """A review: a Fixup network (zero classifier, zero-initialized residual-branch ends) read
    79% dead at initialisation, "go back to a checkpoint" — its branches' first layers get
    neither gradient nor curvature until both zero factors move, and then train normally."""

    class Fixup(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(64, 32)
            self.c1, self.c2 = nn.Linear(32, 32), nn.Linear(32, 32)
            self.head = nn.Linear(32, 10)
            with torch.no_grad():
                self.c2.weight.zero_()
                self.head.weight.zero_()

        def forward(self, x):
            h = torch.relu(self.stem(x))
            h = h + self.c2(torch.relu(self.c1(h)))
            return self.head(h)

    torch.manual_seed(0)
    model = Fixup()
    _, data = _digits_mlp()
    d = cs.diagnose(model, nn.CrossEntropyLoss(), data, lr=0.1)
    ev = d.evidence
    assert ev.dead_share > 0.2 and set(ev.zero_factor_blocks) == {"c2.weight", "head.weight"}
    assert "dead units, or waiting on c2.weight, head.weight" in str(d)
    assert not any("checkpoint" in a for a in d.advice)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), True, "0.5"])
def test_a_threshold_that_is_not_a_finite_non_negative_number_is_refused(value):
    """A review: zero_gradient=-1 put "go back to a checkpoint" on a 0.8% unused module."""
    with pytest.raises(ValueError, match=r"Thresholds\.margin must be a finite number >= 0"):
        cs.diagnosis.Thresholds(margin=value)
    with pytest.raises(ValueError, match="zero_gradient is a share of the parameters"):
        cs.diagnosis.Thresholds(zero_gradient=2.0)


class _Quadratic(nn.Module):
    """1 + ½ Σ h_i θ_i², the same for every sample: a known gradient and Hessian."""

    def __init__(self, theta: list[float]) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(x.shape[0], -1)


_H = torch.tensor([10.0, 1e-3, -1e-3], dtype=torch.float64)


def _quadratic_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 1 + 0.5 * (_H * out**2).sum(1).mean()


@pytest.mark.parametrize(
    ("theta", "state"), [([0.01, 3.0, 1.0], "learning"), ([0.001, 0.1, 1.0], "minimum")]
)
def test_a_small_gradient_past_slight_negative_curvature_reads_the_damped_decrement(theta, state):
    """Where CG meets slight negative curvature the Newton decrement is undefined, and the
    minimum rule passed without it: healthy runs with most of their loss still to lose read
    "minimum … or stop", confident (an outside review). The decrement of the curvature damped
    by σ = 2(|λ_min| + residual) takes its place: a lower bound of Σ g_i²/(h_i + σ)."""
    model = _Quadratic(theta)
    data = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1))
    d = cs.diagnose(model, _quadratic_loss, data, lr=0.1)
    ev = d.evidence
    assert ev.newton_decrement is None and ev.lambda_min == pytest.approx(-1e-3, rel=1e-6)
    sigma = ev.decrement_damping
    assert sigma == pytest.approx(2 * (1e-3 + ev.lambda_min_residual), rel=1e-9)
    g = _H * torch.tensor(theta, dtype=torch.float64)
    exact = float((g**2 / (_H + sigma)).sum())
    assert 0.85 * exact <= ev.damped_decrement <= exact * (1 + 1e-9)  # CG's partial sum
    assert d.state == state
    if state == "learning":
        assert "damped by σ" in str(d) and "not at a minimum yet" in str(d)
    else:
        assert d.confident and ev.decrement_converged  # measured: a minimum said with it


@pytest.mark.parametrize("held", ["outside the optimizer", "in a group at lr 0"])
def test_the_parameters_an_optimizer_does_not_step_are_not_measured(held):
    """A head trained by its own optimizer, its backbone left trainable but outside it (an
    unfinished freeze, or two optimizers): the backbone was measured with step factors of 0 —
    exact zeros in the spectrum and its gradient in ‖g‖ — so a head at its least-squares minimum
    read ‖g‖ 0.946 and λ_min 2e-16 (its own 1.6e-6) under "the gradient is small", and no
    Newton decrement (an outside review). What is measured is what the optimizer steps, as if
    the backbone were frozen; params= still chooses. A backbone in the optimizer whose group's
    learning rate is 0 (held still by its schedule) is not stepped either: it read the same
    wrong numbers (‖g‖ 0.169 for a head's 9e-13, no decrement; an outside review)."""

    torch.manual_seed(0)
    X = torch.randn(200, 3, dtype=torch.float64)
    Y = torch.sin(X.sum(1, keepdim=True))
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    with torch.no_grad():  # the head at its exact minimum given the backbone
        features = torch.cat([torch.tanh(net[0](X)), torch.ones(200, 1, dtype=X.dtype)], 1)
        solution = torch.linalg.lstsq(features, Y).solution
        net[2].weight.copy_(solution[:16].T)
        net[2].bias.copy_(solution[16])
    if held == "outside the optimizer":
        opt = torch.optim.SGD(net[2].parameters(), lr=0.05)
    else:
        groups = [{"params": net[0].parameters(), "lr": 0.0}, {"params": net[2].parameters()}]
        opt = torch.optim.SGD(groups, lr=0.05)
    d = cs.diagnose(net, nn.MSELoss(), (X, Y), optimizer=opt)
    head = cs.Curvature(net, nn.MSELoss(), (X, Y), params=["2.weight", "2.bias"])
    eigs = torch.linalg.eigvalsh(head.to_dense())
    assert d.state == State.MINIMUM and d.confident
    assert d.evidence["grad_norm"] < 1e-10
    assert d.evidence["lambda_min"] == pytest.approx(float(eigs[0]), rel=1e-4)
    assert d.evidence["newton_decrement"] is not None
    assert d.vectors["top"].numel() == 17 and set(d.evidence["layer_shares"]) <= {
        "2.weight",
        "2.bias",
    }
    before = {
        k: p.detach() - 0.01 * (k in ("2.weight", "2.bias")) for k, p in net.named_parameters()
    }
    check = cs.diagnosis.update_curvature(
        net, nn.MSELoss(), (X, Y), before, opt, top=d.vectors["top"]
    )
    assert check.top_curvature == pytest.approx(float(eigs[-1]), rel=1e-6)
    every = cs.diagnose(net, nn.MSELoss(), (X, Y), optimizer=opt, params=list(net.parameters()))
    assert every.evidence["grad_norm"] > 0.1  # the backbone's gradient, when asked for
    # every group held at 0 (a warm-up's first step): what the optimizer holds is measured, not
    # the backbone outside it (a diff review: it was measured again there)
    for g in opt.param_groups:
        g["lr"] = 0.0
    still = cs.diagnose(net, nn.MSELoss(), (X, Y), optimizer=opt)
    head_only = held == "outside the optimizer"
    assert (still.vectors["top"].numel() == 17) == head_only
    # a warm start from vectors over other parameters than are measured now is named as such
    with pytest.raises(ValueError, match="v0's vectors have 17 entries, but this diagnosis"):
        cs.diagnose(net, nn.MSELoss(), (X, Y), lr=0.1, v0=d.vectors["top"])


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.5, weight_decay=0.01),
        lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.01),
    ],
    ids=["sgd-momentum", "adam"],
)
def test_a_parameter_no_gradient_has_reached_is_not_measured(make):
    """An auxiliary head in the optimizer but unused in this phase: torch skips a parameter
    without a gradient, weight decay included, so it never moves — measured with its decay,
    a run at its minimum read *learning* (‖g‖ 0.07 for 8e-16; an outside review). An optimizer
    that keeps state holds none for it: it is left out as an unstepped one is."""
    torch.manual_seed(0)
    X = torch.randn(40, 3, dtype=torch.float64)
    Y = X @ torch.randn(3, 2, dtype=torch.float64)
    net = cases.OneUnused(3, 2).double()
    opt = make(net.parameters())
    for _ in range(300):
        opt.zero_grad()
        nn.functional.mse_loss(net(X), Y).backward()
        opt.step()
    d = cs.diagnose(net, nn.MSELoss(), (X, Y), optimizer=opt)
    body = cs.diagnose(
        net, nn.MSELoss(), (X, Y), optimizer=opt, params=["used.weight", "used.bias"]
    )
    for key in ("grad_norm", "sharpness", "lambda_min"):
        assert d.evidence[key] == pytest.approx(body.evidence[key], rel=1e-9), key
    assert d.state == body.state and set(d.evidence["layer_shares"]) <= {"used.weight", "used.bias"}


def test_an_adaptive_diagnosis_refines_near_the_limit_as_a_step_meets_it():
    """An adaptive diagnosis (a Monitor's probe) refines the sharpness where it is near the
    stability limit. It compared the sharpness as measured: for a summed loss under DDP, whose
    step meets 1/R of it (``step_share``), a probe right at the limit read R times past it and
    was left rough, and one far below it was refined (the reread)."""
    from curvscope.diagnosis.diagnosis import _worth_refining

    at_limit = {"stability_limit": 10.0, "sharpness": 19.0, "step_share": 0.5}
    assert _worth_refining(at_limit)
    assert not _worth_refining({**at_limit, "sharpness": 30.0})  # 1.5x the limit, as met
    assert not _worth_refining({"stability_limit": 10.0, "sharpness": 19.0})  # one process
    assert _worth_refining({"stability_limit": 10.0, "sharpness": 9.5})
