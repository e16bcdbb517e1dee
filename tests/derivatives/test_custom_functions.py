"""Custom autograd Functions: products through one whose backward is written in differentiable
torch operations are exact; one whose backward leaves autograd's graph (computed under no_grad,
as a fused kernel's, or declared @once_differentiable) is refused wherever a second derivative
is taken — torch says nothing, and the curvature through it was silently missing (a GGN of 0,
a Hessian of 0, AdaHessian taking a loss from 1.10 to 88.8: an outside review)."""

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

import curvscope as cs

DT = torch.float64


class Linear(torch.autograd.Function):
    """x Wᵀ, its backward in differentiable torch operations: twice differentiable."""

    @staticmethod
    def forward(ctx, x, W):
        ctx.save_for_backward(x, W)
        return x @ W.T

    @staticmethod
    def backward(ctx, go):
        x, W = ctx.saved_tensors
        return go @ W, go.T @ x


class FusedLinear(Linear):
    """The same, its backward computed outside autograd's graph (the shape of a fused kernel)."""

    @staticmethod
    def backward(ctx, go):
        with torch.no_grad():
            return Linear.backward(ctx, go)


class OnceLinear(Linear):
    """The same, declared once differentiable."""

    @staticmethod
    @once_differentiable
    def backward(ctx, go):
        x, W = ctx.saved_tensors
        return go @ W, go.T @ x


class Model(nn.Module):
    def __init__(self, fn):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.first = nn.Linear(5, 6, dtype=DT)
        with torch.no_grad():  # the same model whatever the global RNG
            self.first.weight.copy_(torch.randn(6, 5, generator=g, dtype=DT))
            self.first.bias.copy_(torch.randn(6, generator=g, dtype=DT))
        self.W = nn.Parameter(0.5 * torch.randn(3, 6, generator=g, dtype=DT))
        self.fn = fn

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return h @ self.W.T if self.fn is None else self.fn.apply(h, self.W)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 5, generator=g, dtype=DT), torch.randint(0, 3, (32,), generator=g)


def dense(model, kind):
    C = cs.Curvature(model, nn.CrossEntropyLoss(), data(), kind=kind)
    return C.to_dense()


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_a_twice_differentiable_custom_function_gives_the_plain_operations_curvature(kind):
    plain, custom = dense(Model(None), kind), dense(Model(Linear), kind)
    torch.testing.assert_close(custom, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [FusedLinear, OnceLinear])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_a_custom_function_that_leaves_the_graph_is_refused_with_the_fixes(fn, kind):
    C = cs.Curvature(Model(fn), nn.CrossEntropyLoss(), data(), kind=kind)
    said = "once_differentiable" if fn is OnceLinear else "outside autograd's graph"
    with pytest.raises(RuntimeError, match=f"custom autograd.Function {fn.__name__}.*{said}"):
        cs.eigenvalues(C, progress_bar=False)
    with pytest.raises(RuntimeError, match="backend='finite_difference'"):
        C.matvec(torch.ones(C.num_params, dtype=DT))


def test_the_finite_difference_backend_goes_through_it():
    """The fix the message names: the model's own backward, differenced — the plain
    operations' Hessian within its stated error."""
    reference = dense(Model(None), "hessian")
    C = cs.Curvature(Model(FusedLinear), nn.CrossEntropyLoss(), data(), backend="finite_difference")
    v = torch.randn(C.num_params, generator=torch.Generator().manual_seed(2), dtype=DT)
    assert float((C.matvec(v) - reference @ v).norm()) <= 1e-5 * float((reference @ v).norm())


@pytest.mark.parametrize("fn", [FusedLinear, OnceLinear])
def test_plain_function_second_derivatives_refuse_it_even_at_a_zero_gradient(fn):
    """cs.hessian through the fused function returned zeros: at x = 0 its gradient is 0 too,
    which is no reason to let it through."""
    X = torch.randn(8, 5, generator=torch.Generator().manual_seed(3), dtype=DT)

    def f(w):
        return fn.apply(X, w.view(3, 5)).square().sum()

    for x in (torch.zeros(15, dtype=DT), torch.ones(15, dtype=DT)):
        with pytest.raises(RuntimeError, match="second derivatives cannot go through"):
            cs.hessian(f, x)
    assert cs.grad(f, torch.ones(15, dtype=DT)).abs().sum() > 0  # a gradient alone is fine


@pytest.mark.parametrize("name", ["newton", "adahessian", "hessian-free"])
def test_second_order_optimizers_refuse_it_and_first_order_ones_train_through_it(name):
    model = Model(FusedLinear)
    X, y = data()
    before = [p.detach().clone() for p in model.parameters()]
    opt = cs.optim.build(name, model.parameters(), **({"lr": 0.1} if name == "adahessian" else {}))

    def closure():
        opt.zero_grad()
        out = model(X)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        return (loss, out) if name == "hessian-free" else loss

    with pytest.raises(RuntimeError, match="first-order method"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    first = cs.optim.NormalizedGD(model.parameters(), lr=0.01)
    losses = []
    for _ in range(3):
        first.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        first.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


class FusedSquareSum(torch.autograd.Function):
    """Σw², its backward a kernel's (outside autograd's graph)."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return (w * w).sum()

    @staticmethod
    def backward(ctx, go):
        (w,) = ctx.saved_tensors
        with torch.no_grad():
            return 2 * w * go


@pytest.mark.parametrize("weight", [1.0, 10.0])
def test_a_cut_where_the_incoming_gradient_is_constant_is_refused(weight):
    """At the top of the loss (or in a term c·f(w)) the gradient flowing into the Function is a
    constant without a graph, and the cut showed nothing: cs.hessian returned zeros, λ_max read
    3.03 for 22.98 (the diff review). The watched backward starts from ones that require grad."""
    X = torch.randn(8, 4, generator=torch.Generator().manual_seed(4), dtype=DT)

    def f(w):
        return weight * FusedSquareSum.apply(w) + (X @ w).tanh().sum()

    with pytest.raises(RuntimeError, match="FusedSquareSum"):
        cs.hessian(f, torch.ones(4, dtype=DT))

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4, dtype=DT))

        def forward(self, x):
            return x @ self.w

    def loss_fn(out, t):
        return ((out - t) ** 2).mean() + weight * FusedSquareSum.apply(out) / len(out)

    C = cs.Curvature(Head(), loss_fn, (X, torch.zeros(8, dtype=DT)), reduction="mean")
    with pytest.raises(RuntimeError, match="FusedSquareSum"):
        C.matvec(torch.ones(4, dtype=DT))


class FusedCrossEntropy(torch.autograd.Function):
    """A fused cross-entropy loss: its backward a kernel's (outside autograd's graph)."""

    @staticmethod
    def forward(ctx, logits, y):
        ctx.save_for_backward(logits, y)
        return nn.functional.cross_entropy(logits, y)

    @staticmethod
    def backward(ctx, go):
        logits, y = ctx.saved_tensors
        with torch.no_grad():
            p = logits.softmax(1)
            p[torch.arange(len(y)), y] -= 1
            return go * p / len(y), None


@pytest.mark.parametrize("name", ["newton", "newton-cg", "adahessian", "hessian-free"])
def test_second_order_optimizers_refuse_a_cut_at_the_top_of_the_loss(name):
    """An outside review: the cut check ran under the step's no_grad, so the watched
    backward's seed lost its graph and a fused loss at the top of the graph (the gradient
    flowing into it a constant) passed unrefused — AdaHessian took the loss from 1.16 to 89,
    Newton read a Hessian of 0. Sophia-G, whose estimate takes first derivatives only, is
    right through it and is not refused."""
    model = Model(None)
    X, y = data()
    before = [p.detach().clone() for p in model.parameters()]
    opt = cs.optim.build(name, model.parameters(), **({"lr": 0.1} if name == "adahessian" else {}))

    def closure():
        out = model(X)
        loss = FusedCrossEntropy.apply(out, y)
        return (loss, out) if name == "hessian-free" else loss

    with pytest.raises(RuntimeError, match="FusedCrossEntropy"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_sophia_g_goes_through_a_fused_loss_as_through_torchs():
    X, y = data()
    ends = []
    for loss_fn in (nn.functional.cross_entropy, FusedCrossEntropy.apply):
        model = Model(None)
        estimator = cs.optim.GaussNewtonBartlett(nn.CrossEntropyLoss())
        opt = cs.optim.Sophia(model.parameters(), lr=0.05, estimator=estimator)

        def closure(model=model, loss_fn=loss_fn):
            out = model(X)
            return loss_fn(out, y), out

        for _ in range(3):
            opt.step(closure)
        ends.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(ends[0], ends[1], rtol=1e-12, atol=1e-12)
