"""The closure evaluation: its products are the Curvature's own (one product path), and a
closure's own ``backward()`` is intercepted locally — on the closure's thread, while it runs —
not by patching ``torch.autograd.backward`` for the whole process."""

import copy
import io
import threading
import warnings

import pytest
import torch
from torch import nn

import curvscope as cs
from curvscope.derivatives.flat import flatten
from curvscope.optim._closure import Counts, Evaluation, loss_only
from tests import cases

DT = torch.float64


def _closure(case, backward=None):
    params = list(case.model.parameters())

    def closure():
        for p in params:
            p.grad = None
        out = case.model(case.inputs)
        loss = case.loss_fn(out, case.targets)
        if backward == "method":
            loss.backward()
        elif backward == "function":
            torch.autograd.backward(loss)
        return loss, out

    return params, closure


@pytest.mark.parametrize("make", [cases.mlp, cases.logreg_bce])
def test_closure_products_are_the_curvature_products_bit_for_bit(make):
    case = make()
    params, closure = _closure(case)
    ev = Evaluation(params, closure, Counts())
    V = torch.randn(ev.n, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    for kind, product in (("hessian", ev.hvp), ("ggn", ev.ggn)):
        C = cs.Curvature(
            case.model,
            case.loss_fn,
            (case.inputs, case.targets),
            kind=kind,
            backend="double_backward",
        )
        assert torch.equal(product(V), C @ V), kind
    assert ev.counts.products == 6


@pytest.mark.parametrize("backward", ["method", "function"])
def test_a_closures_own_backward_keeps_the_graph_and_fills_grad(backward):
    case = cases.mlp()
    params, closure = _closure(case, backward)
    counts = Counts()
    ev = Evaluation(params, closure, counts)
    assert torch.equal(torch.cat([p.grad.reshape(-1) for p in params]), ev.flat_grad)
    plain = Evaluation(params, _closure(case)[1], Counts())
    assert torch.equal(ev.flat_grad, plain.flat_grad)
    eye = torch.eye(ev.n, dtype=DT)
    torch.testing.assert_close(ev.hvp(eye), cases.dense_hessian(case), rtol=0, atol=1e-10)
    assert counts.gradients == 2 and counts.closure_calls == 1  # its backward, and ours


@pytest.mark.parametrize("backward", ["method", "function"])
def test_a_loss_only_evaluation_runs_the_closure_as_written_and_undoes_it(backward):
    """A trial point's closure runs as written — its backward too (counted), so a closure that
    reads .grad finds it (it crashed on None: a review) — and .grad is put back: the same
    tensors, not zeroed in place by the closure's zero_grad(set_to_none=False) (they were)."""
    case = cases.mlp()
    params = list(case.model.parameters())
    seen = []

    def closure():
        for p in params:
            if p.grad is not None:
                p.grad.zero_()  # zero_grad(set_to_none=False)
        loss = case.loss_fn(case.model(case.inputs), case.targets)
        (loss.backward() if backward == "method" else torch.autograd.backward(loss))
        seen.append(sum(float(p.grad.norm()) for p in params))  # logging the gradient
        return loss

    before = [torch.full_like(p, 7.0) for p in params]
    for p, g in zip(params, before, strict=True):
        p.grad = g
    counts = Counts()
    value = loss_only(closure, params, counts)
    with torch.no_grad():
        expected = float(case.loss_fn(case.model(case.inputs), case.targets))
    assert value == pytest.approx(expected) and seen[0] > 0
    assert all(p.grad is g and bool((g == 7.0).all()) for p, g in zip(params, before, strict=True))
    assert counts.gradients == 1 and counts.closure_calls == 1


def test_a_loss_that_differentiates_itself_works_at_trial_points():
    """A physics-informed residual (u'' + u = 0, by autograd.grad inside the loss) failed at
    every second-order method's trial point, evaluated under no_grad (a review)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.linspace(0, 3, 30, dtype=DT).reshape(-1, 1)

    def closure():
        t = x.clone().requires_grad_()
        u = net(t)
        du = torch.autograd.grad(u.sum(), t, create_graph=True)[0]
        d2u = torch.autograd.grad(du.sum(), t, create_graph=True)[0]
        return ((d2u + u) ** 2).mean() + (net(torch.zeros(1, 1, dtype=DT)) - 1).pow(2).sum()

    for opt in (cs.optim.NewtonCG(net.parameters()), cs.optim.HessianFree(net.parameters())):
        first = float(opt.step(closure))
        for _ in range(4):
            last = float(opt.step(closure))
        assert last < first


def test_trial_points_leave_batchnorm_statistics_as_found():
    """A trial point (often rejected) is not a training step: the running statistics moved at
    every trial and backtracking evaluation, at parameters the step then threw away (a review).
    Now a step updates them once, at the evaluation where it starts, as a first-order step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()
    X, y = torch.randn(32, 4, dtype=DT), torch.randn(32, 1, dtype=DT)
    bn = model[1]
    for make in (cs.optim.NewtonCG, cs.optim.HessianFree, cs.optim.CubicNewton):
        opt = make(model.parameters())
        tracked = int(bn.num_batches_tracked)
        opt.step(lambda: nn.functional.mse_loss(model(X), y))
        assert int(bn.num_batches_tracked) == tracked + 1, make.__name__
    # the statistics after a step are those of the one evaluation at its start
    opt = cs.optim.NewtonCG(model.parameters())
    with torch.no_grad():
        expected = (1 - bn.momentum) * bn.running_mean + bn.momentum * model[0](X).mean(dim=0)
    opt.step(lambda: nn.functional.mse_loss(model(X), y))
    torch.testing.assert_close(bn.running_mean, expected, rtol=0, atol=1e-12)


def test_nothing_global_is_patched_and_other_threads_are_untouched():
    case = cases.mlp()
    params, user_closure = _closure(case, "method")
    original = torch.autograd.backward
    seen = {}

    def elsewhere():
        # another thread's backward while the closure runs: torch's own, graph freed after it
        w = torch.ones(3, dtype=DT, requires_grad=True)
        y = (w**3).sum()
        y.backward()
        try:
            y.backward()
        except RuntimeError as e:
            seen["second backward"] = str(e)

    def closure():
        seen["backward is torch's"] = torch.autograd.backward is original
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        return user_closure()

    counts = Counts()
    Evaluation(params, closure, counts)
    assert seen["backward is torch's"]
    assert "backward through the graph a second time" in seen["second backward"]
    assert counts.gradients == 2  # the closure's backward and ours, not the other thread's
    assert torch.autograd.backward is original


def test_a_failing_closure_leaves_backward_as_torch_has_it():
    original = torch.autograd.backward
    x = torch.ones(2, dtype=DT, requires_grad=True)

    def failing():
        raise KeyError("boom")

    with pytest.raises(KeyError):
        Evaluation([x], failing, Counts())
    assert torch.autograd.backward is original
    y = (x**2).sum()
    y.backward()  # an ordinary backward afterwards frees its graph as usual
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()


def test_a_closure_without_outputs_has_no_gauss_newton_product():
    x = torch.ones(2, dtype=DT, requires_grad=True)
    ev = Evaluation([x], lambda: (x**4).sum(), Counts())
    torch.testing.assert_close(ev.hvp(torch.eye(2, dtype=DT)), 12 * torch.eye(2, dtype=DT))
    with pytest.raises(ValueError, match=r"return \(loss, outputs\)"):
        ev.ggn(torch.eye(2, dtype=DT))


def test_a_model_in_eval_mode_with_attention_gives_the_same_loss_for_trials_and_evaluations():
    """Inside the closure's mode torch's fused attention fast path (eval, no grad) is off:
    the trial loss is computed like the evaluated one (with the fast path, seed 4 differs in
    the last bit)."""
    X = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(1), dtype=DT)
    for seed in range(5):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        model = layer.to(DT).eval()
        params = list(model.parameters())

        def closure(model=model):
            return model(X).pow(2).mean()

        evaluated = Evaluation(params, closure, Counts()).loss
        assert loss_only(closure, params, Counts()) == evaluated, seed


def test_a_compiled_module_in_the_closure_steps_as_its_original_module():
    """torch.compile's graphs have no double backward: every second-order step failed with
    torch's bare error (a review), then with the fix named (``model._orig_mod``). The closure's
    compiled code now runs eagerly during a second-order evaluation, as ``cs.Curvature``'s
    products do: the step is the one through the original module, bit for bit."""
    data = torch.randn(8, 3), torch.randn(8, 1)
    stepped = []
    for compile_it in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        run = torch.compile(model, backend="aot_eager") if compile_it else model
        opt = cs.optim.NewtonCG(model.parameters())
        for _ in range(2):
            opt.step(lambda run=run: nn.functional.mse_loss(run(data[0]), data[1]))
        stepped.append(flatten([p.detach() for p in model.parameters()]))
    torch.testing.assert_close(stepped[1], stepped[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "name", ["newton-cg", "hessian-free", "cubic-newton", "adahessian", "sophia"]
)
def test_a_transformer_layer_on_fused_attention_takes_second_order_steps(name):
    """``nn.TransformerEncoderLayer`` runs scaled-dot-product attention on torch's fused CPU
    kernel, which has no double backward: every second-order optimizer's step raised torch's
    "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented" (an outside review), where ``cs.Curvature`` switches to the math backend
    itself. The closure's evaluations now run on it too: the step is taken, its loss lower,
    and the user's switches are as found after it."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Linear(8, 1))
    X, y = torch.randn(4, 6, 8), torch.randn(4, 6, 1)
    opt = cs.optim.build(name, model.parameters())

    def closure():
        return nn.functional.mse_loss(model(X), y)

    flags = [torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()]
    first = closure().item()
    for _ in range(3):
        opt.step(closure)
    assert closure().item() < first
    assert [torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()] == (
        flags
    )


def test_a_trial_points_backward_touches_only_the_optimized_parameters():
    """A body trained by another optimizer, and an input that requires grad: a trial point's
    backward added into their .grad (2.98 gradients after one step: a review). It now fills the
    optimized parameters' .grad only (fresh tensors, put back after)."""
    torch.manual_seed(0)
    body, head = nn.Linear(3, 4).double(), nn.Linear(4, 1).double()
    X = torch.randn(16, 3, dtype=DT, requires_grad=True)
    y = torch.randn(16, 1, dtype=DT)
    opt = cs.optim.HessianFree(head.parameters())

    def closure():
        opt.zero_grad()  # the head's: the body's and the input's accumulate, as torch's do
        out = head(torch.tanh(body(X)))
        loss = nn.functional.mse_loss(out, y)
        loss.backward()
        return loss, out

    closure()
    once = [body.weight.grad.clone(), X.grad.clone()]
    body.zero_grad()
    X.grad = None
    opt.step(closure)  # one evaluation where the step starts adds once; trial points never
    assert opt.counts.closure_calls > 1  # trial points ran the closure, backward and all
    torch.testing.assert_close(body.weight.grad, once[0], rtol=0, atol=0)
    torch.testing.assert_close(X.grad, once[1], rtol=0, atol=0)


def test_a_parameter_masked_by_a_none_grad_is_not_stepped():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    X, y = torch.randn(16, 3, dtype=DT), torch.randn(16, 1, dtype=DT)
    opt = cs.optim.AdaHessian(model.parameters(), lr=0.1, weight_decay=0.1)
    bias = model.bias.detach().clone()

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), y)
        loss.backward()
        model.bias.grad = None  # torch's way to leave a parameter out of a step
        return loss

    opt.step(closure)
    assert torch.equal(model.bias, bias)


MODEL_STEPS = ("NewtonCG", "CubicNewton", "SaddleFreeNewton", "Newton", "HessianFree")


@pytest.mark.parametrize("name", MODEL_STEPS)
@pytest.mark.parametrize(
    "edit", ["clipped", "masked", "by value", "rows", "scaled", None, "accumulated"]
)
def test_a_closure_that_clips_or_masks_grad_is_told_a_model_step_method_does_not_read_it(
    name, edit
):
    """Clipped to 1e-3 inside the closure (the README's advice for AdaHessian and Sophia), five
    NewtonCG steps were bit for bit the unclipped ones, and a layer whose .grad was zeroed moved
    by 0.28–0.98, without a word (an outside review): the model-step methods step on their own
    gradient of the closure's loss. Said once a call site; a closure that leaves .grad as its
    backward made it — accumulated over calls without zero_grad too — says nothing."""
    case = cases.mlp(n=10)
    model, loss_fn = case.model, case.loss_fn
    X, y = case.data

    def closure():
        if edit != "accumulated":
            opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        if edit == "clipped":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        elif edit == "masked":
            model[0].weight.grad = None
        elif edit == "by value":
            torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)
        elif edit == "rows":
            model[0].weight.grad[:2] = 0.0
        elif edit == "scaled":  # (a closure that backpropagates 0.5 * loss)
            for q in model.parameters():
                q.grad.mul_(0.5)
        return loss

    opt = getattr(cs.optim, name)(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(closure)
        opt.step(closure)
    said = [w for w in caught if issubclass(w.category, cs.optim.ClosureGradIgnoredWarning)]
    if edit not in (None, "accumulated"):
        message = f"the closure clipped, scaled or masked .grad, which {name} does not read"
        assert said and message in str(said[0].message)
        assert said[0].filename == __file__  # at the step's call, past torch's wrappers
    else:
        assert not said


def test_newton_switched_to_pure_by_its_damping_reports_no_damping():
    """Editing damping to 0 switches Newton to the pure step; it reported the old μ (1.55)."""
    p = cs.problems.get("rosenbrock")
    x = torch.tensor([-0.5, 1.5], dtype=DT, requires_grad=True)  # an indefinite Hessian
    opt = cs.optim.Newton([x])
    opt.step(lambda: p.f(x))
    assert opt.info.damping > 0
    opt.param_groups[0]["damping"] = 0.0
    opt.step(lambda: p.f(x))
    assert opt.pure and opt.info.damping == 0.0


def test_hessian_free_on_a_curvature_mini_batch_updates_batchnorm_once_and_keeps_grad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()
    X, y = torch.randn(32, 4, dtype=DT), torch.randn(32, 1, dtype=DT)
    opt = cs.optim.HessianFree(model.parameters())

    def closure(rows=slice(None)):
        opt.zero_grad()
        out = model(X[rows])
        loss = nn.functional.mse_loss(out, y[rows])
        loss.backward()
        return loss, out

    tracked = int(model[1].num_batches_tracked)
    opt.step(closure, curvature_closure=lambda: closure(slice(0, 8)))
    assert int(model[1].num_batches_tracked) == tracked + 1  # was + 2
    twin = copy.deepcopy(model)  # the point where the next step starts, BatchNorm and all
    opt.step(closure, curvature_closure=lambda: closure(slice(0, 8)))
    expected = torch.autograd.grad(nn.functional.mse_loss(twin(X), y), list(twin.parameters()))
    for p, g in zip(model.parameters(), expected, strict=True):  # not the mini-batch's
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-12)


def test_a_metric_returned_as_the_outputs_is_named_with_the_fix():
    """``return loss, accuracy``: the second value is the outputs Gauss-Newton products and
    Sophia-G's labels go through — torch's "One of the differentiated Tensors does not require
    grad" (HessianFree) and an IndexError (Sophia-G) before."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,))

    def closure():
        out = model(X)
        return nn.functional.cross_entropy(out, y), (out.argmax(1) == y).double().mean()

    for opt in (
        cs.optim.HessianFree(model.parameters()),
        cs.optim.Sophia(
            model.parameters(), estimator=cs.optim.GaussNewtonBartlett(nn.CrossEntropyLoss())
        ),
    ):
        with pytest.raises(ValueError, match="a metric"):
            opt.step(closure)


def test_sparse_gradients_and_a_non_finite_normalized_gradient_are_refused():
    """A sparse embedding's gradient gave torch's "reshape is not implemented for sparse
    tensors"; NormalizedGD skipped a NaN gradient silently where AdaHessian and Sophia raise."""
    emb = nn.Embedding(5, 2, sparse=True).double()
    idx = torch.tensor([0, 1, 3])
    with pytest.raises(TypeError, match="sparse=False"):
        cs.optim.AdaHessian(emb.parameters()).step(lambda: emb(idx).pow(2).sum())
    x = torch.ones(2, requires_grad=True)
    opt = cs.optim.NormalizedGD([x], lr=0.1)
    x.grad = torch.tensor([float("nan"), 1.0])
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    assert torch.equal(x, torch.ones(2))


def test_a_state_made_by_another_estimator_is_refused_at_load():
    """A Sophia-G checkpoint loaded into a default Sophia went on with Hutchinson's Hessian
    diagonal in place of the Gauss-Newton one (2e-3 off in three steps, without a word)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,))

    def closure():
        out = model(X)
        return nn.functional.cross_entropy(out, y), out

    saved = cs.optim.Sophia(
        model.parameters(), estimator=cs.optim.GaussNewtonBartlett(nn.CrossEntropyLoss())
    )
    saved.step(closure)
    state = saved.state_dict()
    assert state["estimator"] == "GaussNewtonBartlett"
    with pytest.raises(
        ValueError, match=r"saved with the estimator GaussNewtonBartlett.*Hutchinson"
    ):
        cs.optim.Sophia(model.parameters()).load_state_dict(state)
    again = cs.optim.Sophia(
        model.parameters(), estimator=cs.optim.GaussNewtonBartlett(nn.CrossEntropyLoss())
    )
    again.load_state_dict(state)  # the same estimator: loads
    older = {k: v for k, v in state.items() if not k.startswith("estimator")}
    cs.optim.Sophia(model.parameters()).load_state_dict(older)  # saved before the entry: loads


def test_a_state_made_by_the_same_estimator_with_other_settings_is_refused_at_load():
    """An AdaHessian(Hutchinson(samples=1)) checkpoint loaded into one with samples=4 took the
    learning rate back from the checkpoint and kept 4 samples: the resumed run left the
    uninterrupted one, without a word (an outside review)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,))

    def closure():
        return nn.functional.cross_entropy(model(X), y)

    saved = cs.optim.AdaHessian(model.parameters())
    saved.step(closure)
    state = saved.state_dict()
    assert state["estimator_settings"] == {"samples": 1}
    four = cs.optim.AdaHessian(model.parameters(), estimator=cs.optim.Hutchinson(samples=4))
    with pytest.raises(ValueError, match=r"Hutchinson \{'samples': 1\}.*\{'samples': 4\}"):
        four.load_state_dict(state)
    cs.optim.AdaHessian(model.parameters(), estimator=cs.optim.Hutchinson()).load_state_dict(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)  # torch.load's default weights_only=True takes the entry
    assert torch.load(io.BytesIO(buffer.getvalue()))["estimator_settings"] == {"samples": 1}


@pytest.mark.parametrize("name", ["AdaHessian", "Sophia", "NormalizedGD"])
def test_a_complex_parameter_added_later_is_refused_as_at_construction(name):
    """Through add_param_group it reached the step's torch internals ("check_random_bounds
    handles only integral, floating-point and boolean types")."""
    real = torch.ones(2, dtype=DT, requires_grad=True)
    opt = getattr(cs.optim, name)([real])
    with pytest.raises(TypeError, match="real parameters only"):
        opt.add_param_group({"params": [torch.ones(2, dtype=torch.complex128, requires_grad=True)]})
    with pytest.raises(TypeError, match="real parameters only"):
        getattr(cs.optim, name)([torch.ones(2, dtype=torch.complex128, requires_grad=True)])


@pytest.mark.parametrize(
    ("name", "at_call"),
    [
        *[
            (name, at)
            for name in ("NewtonCG", "CubicNewton", "SaddleFreeNewton", "Newton", "HessianFree")
            for at in (1, 2)  # the step's own evaluation, and its trial point
        ],
        ("AdaHessian", 1),  # one evaluation a step
    ],
)
def test_a_closure_that_writes_the_parameters_is_said(name, at_call):
    """NewtonCG took its step from θ₀ + 0.1 and wrote θ₀ + s (the change dropped), or kept a
    trial point's change on top of the step while step_norm said 0.50 for a move of 1.04,
    without a word (an outside review). Said at whichever call; not refused (torch's own
    nn.Embedding(max_norm=...) writes so, and its optimizers take it)."""
    case = cases.mlp(n=10)
    model, loss_fn = case.model, case.loss_fn
    X, y = case.data
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] == at_call:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1)
        return loss_fn(model(X), y)

    opt = getattr(cs.optim, name)(model.parameters())
    with pytest.warns(cs.optim.ClosureWroteWarning, match="wrote into the parameters"):
        opt.step(closure)


def test_a_max_norm_embedding_trains_with_every_optimizer():
    """nn.Embedding(max_norm=...) renormalises its rows in the forward, in place: a refusal of
    closures that write (this stop's first answer to the review above) refused it (a review)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3, max_norm=0.5), nn.Flatten(), nn.Linear(6, 2))
    X, y = torch.randint(0, 6, (8, 2)), torch.randint(0, 2, (8,))
    for name in ("NewtonCG", "AdaHessian", "Sophia"):
        opt = getattr(cs.optim, name)(model.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", cs.optim.ClosureWroteWarning)
            opt.step(lambda: nn.functional.cross_entropy(model(X), y))


@pytest.mark.parametrize("method", ["ggn", "sophia-g"])
def test_gauss_newton_through_a_checkpointed_attention_layer(method):
    """A checkpointed forward is recomputed in each backward pass through it, and must run on
    the kernels its forward ran on: the Gauss-Newton products' and Sophia-G's backward passes ran
    outside the evaluation's (attention on the fused kernel, the forward on the math one) and
    raised torch's bare CheckpointError "Recomputed values ... have different metadata" on a
    gradient-checkpointed GPT-2 (an outside review). The step is now the unchecked one's."""
    from torch.utils.checkpoint import checkpoint

    X, y = torch.randn(4, 6, 8), torch.randint(0, 5, (4, 6))
    stepped = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        head = nn.Linear(8, 5)
        params = [*layer.parameters(), *head.parameters()]
        if method == "ggn":
            opt = cs.optim.HessianFree(params, curvature="ggn")
        else:
            estimator = cs.optim.GaussNewtonBartlett(nn.CrossEntropyLoss())
            opt = cs.optim.Sophia(params, estimator=estimator)

        def closure(layer=layer, head=head, checkpointed=checkpointed):
            hidden = checkpoint(layer, X, use_reentrant=False) if checkpointed else layer(X)
            out = head(hidden)
            return nn.functional.cross_entropy(out.reshape(-1, 5), y.reshape(-1)), out

        flags = [torch.backends.cuda.flash_sdp_enabled(), torch.backends.mkldnn.enabled]
        opt.step(closure)
        assert [torch.backends.cuda.flash_sdp_enabled(), torch.backends.mkldnn.enabled] == flags
        stepped.append(flatten([p.detach() for p in params]))
    torch.testing.assert_close(stepped[1], stepped[0])


def test_closures_a_second_order_step_cannot_take_are_named_with_the_fix():
    """Each gave torch's bare error or a wrong cause (an outside review): a reentrant
    checkpoint (torch's "incompatible with .grad()"), a step under inference mode ("the loss
    does not depend on the optimized parameters"), and a model's output object returned whole
    (1,600 characters of its tensors)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X, y = torch.randn(8, 3, requires_grad=True), torch.randint(0, 2, (8,))
    opt = cs.optim.NewtonCG(model.parameters())

    def reentrant():
        out = checkpoint(model, X, use_reentrant=True)
        return nn.functional.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match=r"use_reentrant=True.*use_reentrant=False"):
        opt.step(reentrant)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        opt.step(lambda: nn.functional.cross_entropy(model(X), y))

    class Output:  # what a Hugging Face model returns: an object holding loss and logits
        def __init__(self, loss, logits):
            self.loss, self.logits = loss, logits

    def whole():
        out = model(X)
        return Output(nn.functional.cross_entropy(out, y), out)

    with pytest.raises(TypeError, match=r"return out\.loss"):
        opt.step(whole)
    with pytest.raises(TypeError, match=r"got Output \(.*out\.logits\)\)$"):
        opt.step(lambda: (whole().loss, whole()))

    def detached():  # PyTorch Lightning's automatic optimization: backward, then loss.detach()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss.detach()

    with pytest.raises(ValueError, match=r"returned its loss detached.*manual optimization"):
        opt.step(detached)


@pytest.mark.parametrize("shape", [(), (1,)])
@pytest.mark.parametrize(
    "name", ["Newton", "NewtonCG", "HessianFree", "SaddleFreeNewton", "CubicNewton"]
)
def test_a_closure_returning_a_loss_computed_before_the_step_is_refused(name, shape):
    """``loss = f(x); opt.step(lambda: loss)``, the SGD habit: every trial point read the
    start's loss, every step was rejected and the size collapsed (NewtonCG's radius 9e-13
    after 20 steps), unsaid (an outside review). Refused at the first trial point, the step
    undone."""
    x = torch.tensor([-1.2, 1.0], dtype=DT, requires_grad=True)
    rosen = cs.problems.get("rosenbrock").f
    opt = getattr(cs.optim, name)([x])
    loss = rosen(x).reshape(shape)  # (a shape-(1,) loss was reshaped anew at each call)
    with pytest.raises(ValueError, match="same loss tensor at a trial point"):
        opt.step(lambda: loss)
    assert x.detach().tolist() == [-1.2, 1.0] and opt.counts.closure_calls == 0
    opt.step(lambda: rosen(x))  # a closure that recomputes it steps
    assert float(rosen(x.detach())) < float(loss.detach())
