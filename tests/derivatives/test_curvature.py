"""The Curvature operator against dense float64 references and finite differences, its
properties, its batching, and its promise to leave the user's model exactly as found."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvscope as cs
from tests import cases

CASES = dict(zip(cases.ALL_IDS, cases.ALL, strict=True))
TOL = {"rtol": 1e-9, "atol": 1e-11}


@pytest.fixture(params=cases.ALL_IDS)
def case(request):
    return CASES[request.param]()


def test_hessian_matches_jacfwd_grad(case):
    C = cs.Curvature(case.model, case.loss_fn, case.data)
    H = C.to_dense()
    torch.testing.assert_close(H, cases.dense_hessian(case), **TOL)
    assert C.matvecs == C.num_params


def test_hessian_matches_finite_differences_of_the_gradient(case):
    """A guard independent of all second-derivative code: central differences of gradients."""
    L, theta0 = cases.loss_fn_of_theta(case)
    v = torch.randn(theta0.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    eps = 1e-5
    fd = (torch.func.grad(L)(theta0 + eps * v) - torch.func.grad(L)(theta0 - eps * v)) / (2 * eps)
    hv = cs.Curvature(case.model, case.loss_fn, case.data) @ v
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-7)


def test_plain_function_hessian_is_right_through_layernorm_and_batchnorm():
    """Regression pin: cs.hessian on a flattened model loss equals jacfwd(grad) where
    torch.func.hessian (jacfwd(jacrev)) is wrong in torch 2.13."""
    for case in (cases.residual_layernorm(), cases.batchnorm(train=True)):
        L, theta0 = cases.loss_fn_of_theta(case)
        torch.testing.assert_close(cs.hessian(L, theta0), cases.dense_hessian(case), **TOL)


def test_ggn_matches_jacobian_reference(case):
    G = cs.Curvature(case.model, case.loss_fn, case.data, kind="ggn").to_dense()
    torch.testing.assert_close(G, cases.dense_ggn(case), **TOL)


def test_empirical_fisher_is_mean_of_per_sample_gradient_outer_products():
    # one likelihood term per sample here, so per-term = per-sample; several terms per sample
    # (MSE with C outputs, sequences) are tested in test_kinds.py
    for make in (
        cases.mlp,
        cases.logreg_bce,
        cases.cnn,
        cases.transformer,
        cases.tied,
    ):
        case = make()
        E = cs.Curvature(case.model, case.loss_fn, case.data, kind="empirical_fisher").to_dense()
        torch.testing.assert_close(E, cases.dense_empirical_fisher(case), **TOL)


@pytest.mark.parametrize("make", [cases.mlp, cases.mlp_mse, cases.logreg_bce])
def test_fisher_equals_ggn_in_expectation(make):
    case = make()
    G = cs.Curvature(case.model, case.loss_fn, case.data, kind="ggn").to_dense()
    errs = []
    for samples in (4, 64):
        F = cs.Curvature(
            case.model, case.loss_fn, case.data, kind="fisher", mc_samples=samples, seed=11
        ).to_dense()
        torch.testing.assert_close(F, F.T, rtol=1e-10, atol=1e-12)
        errs.append(((F - G).norm() / G.norm()).item())
    # Monte-Carlo error falls like 1/sqrt(samples): 16x the samples, about 4x smaller
    assert errs[1] < 0.1
    assert errs[1] < errs[0] / 2


def test_fisher_is_fixed_by_seed_and_varies_with_it():
    case = cases.mlp()
    F1 = cs.Curvature(case.model, case.loss_fn, case.data, kind="fisher", seed=1).to_dense()
    F1b = cs.Curvature(case.model, case.loss_fn, case.data, kind="fisher", seed=1).to_dense()
    F2 = cs.Curvature(case.model, case.loss_fn, case.data, kind="fisher", seed=2).to_dense()
    assert torch.equal(F1, F1b)
    assert not torch.allclose(F1, F2)


@pytest.mark.parametrize("kind", list(cs.KINDS))
def test_psd_kinds_are_psd_and_all_are_symmetric(kind):
    case = cases.cnn()
    M = cs.Curvature(case.model, case.loss_fn, case.data, kind=kind).to_dense()
    torch.testing.assert_close(M, M.T, rtol=1e-10, atol=1e-12)
    lam = torch.linalg.eigvalsh(M)
    if cs.KINDS[kind].psd:
        assert lam.min() > -1e-10 * lam.abs().max()
    else:  # the Hessian of a network at initialisation is indefinite
        assert lam.min() < 0 < lam.max()


@settings(max_examples=15, deadline=None)
@given(
    kind=st.sampled_from(list(cs.KINDS)),
    seed=st.integers(0, 2**16),
    a=st.floats(-2, 2),
    b=st.floats(-2, 2),
)
def test_symmetry_and_linearity(kind, seed, a, b):
    case = cases.residual_layernorm()
    C = cs.Curvature(case.model, case.loss_fn, case.data, kind=kind)
    gen = torch.Generator().manual_seed(seed)
    u, v = (torch.randn(C.num_params, generator=gen, dtype=torch.float64) for _ in range(2))
    cu, cv = C @ u, C @ v
    torch.testing.assert_close(u @ cv, v @ cu, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(C @ (a * u + b * v), a * cu + b * cv, rtol=1e-9, atol=1e-10)


def _vectors(n, k, seed=4):
    return torch.randn(n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", cs.derivatives.BACKENDS)
def test_block_product_equals_single_products(backend):
    case = cases.mlp()
    C = cs.Curvature(case.model, case.loss_fn, case.data, backend=backend)
    V = _vectors(C.num_params, 4)
    CV = C @ V
    for j in range(4):
        torch.testing.assert_close(CV[:, j], C @ V[:, j], **TOL)
    assert C.matvecs == 8  # a block of 4 is below MIN_TUNED_BLOCK: not measured


@pytest.mark.parametrize("cache", [True, False])
def test_forward_over_reverse_backend_matches_the_reference(case, cache):
    C = cs.Curvature(
        case.model, case.loss_fn, case.data, backend="forward_over_reverse", cache=cache
    )
    V = _vectors(C.num_params, 3)
    H = cases.dense_hessian(case)
    torch.testing.assert_close(C @ V, H @ V, **TOL)
    torch.testing.assert_close(C @ V[:, 0], H @ V[:, 0], **TOL)


def test_auto_backend_measures_once_and_says_what_it_chose():
    case = cases.cnn()
    C = cs.Curvature(case.model, case.loss_fn, case.data, cache=False)
    k = cs.derivatives.curvature.MIN_TUNED_BLOCK
    V = _vectors(C.num_params, k)
    first = C @ V  # both ways, each after a one-vector warm-up: 2k + 2 products
    assert C.matvecs == 2 * k + 2 and len(C.notes) == 1 and "block products" in C.notes[0]
    torch.testing.assert_close(C @ V, first, **TOL)
    assert C.matvecs == 3 * k + 2 and len(C.notes) == 1  # chosen once, then used
    C @ V[:, :3]  # small blocks and single products are not measured: double backward
    C @ V[:, 0]
    assert C.matvecs == 3 * k + 6 and len(C.notes) == 1


def test_dropout_auto_backend_keeps_the_fixed_linear_map():
    case = cases.dropout_batchnorm()
    C = cs.Curvature(case.model, case.loss_fn, case.data, cache=False)
    ref = cs.Curvature(case.model, case.loss_fn, case.data, backend="double_backward")
    V = _vectors(C.num_params, 2)
    torch.testing.assert_close(C @ V, ref @ V, **TOL)
    torch.testing.assert_close(C @ V, ref @ V, **TOL)  # whichever backend it kept


def test_backend_is_validated():
    model, lf, data = _mlp_parts()
    with pytest.raises(ValueError, match="backend must be one of"):
        cs.Curvature(model, lf, data, backend="jvp")
    with pytest.raises(ValueError, match="Jacobian products"):
        cs.Curvature(model, lf, data, kind="ggn", backend="forward_over_reverse")


@pytest.mark.parametrize("kind", list(cs.KINDS))
def test_uneven_batches_and_loader_give_the_full_batch_operator(kind):
    case = cases.batchnorm(train=False)  # eval mode: the loss is a mean over independent samples
    X, y = case.data
    full = cs.Curvature(case.model, case.loss_fn, (X, y), kind=kind).to_dense()
    pieces = [(X[:5], y[:5]), (X[5:7], y[5:7]), (X[7:], y[7:])]
    listed = cs.Curvature(case.model, case.loss_fn, pieces, kind=kind).to_dense()
    loader = DataLoader(TensorDataset(X, y), batch_size=5)  # 5, 5, 2: uneven last batch
    streamed = cs.Curvature(case.model, case.loss_fn, loader, kind=kind)
    assert not streamed.cache
    if kind != "fisher":  # the Fisher's sampled labels depend on the batching
        torch.testing.assert_close(listed, full, **TOL)
        torch.testing.assert_close(streamed.to_dense(), full, **TOL)


def test_params_subset_is_the_block_of_the_full_matrix():
    case = cases.mlp()
    full = cases.dense_hessian(case)
    names = [k for k, _ in case.model.named_parameters()]
    sizes = [p.numel() for p in case.model.parameters()]
    start = sum(sizes[:2])  # the second layer
    block = full[start:, start:]
    by_name = cs.Curvature(case.model, case.loss_fn, case.data, params=names[2:])
    by_param = cs.Curvature(
        case.model, case.loss_fn, case.data, params=list(case.model.parameters())[2:]
    )
    assert by_name.param_names == names[2:]
    torch.testing.assert_close(by_name.to_dense(), block, **TOL)
    torch.testing.assert_close(by_param.to_dense(), block, **TOL)
    # flat vectors follow params='s order (C.param_names), not named_parameters()' (the
    # docstring said the latter: an outside review)
    swapped = cs.Curvature(case.model, case.loss_fn, case.data, params=[names[3], names[2]])
    assert swapped.param_names == [names[3], names[2]]
    order = torch.cat([torch.arange(sizes[2], sum(sizes[2:4])), torch.arange(sizes[2])])
    torch.testing.assert_close(swapped.to_dense(), block[order][:, order], **TOL)


class _SharedTwice(nn.Module):
    """One layer applied twice, registered under two names (``self.b = self.a``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.o = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_a_module_registered_twice_is_measured_by_either_name(kind):
    """An outside review: a module registered under two names is walked under its first only,
    and its weight selected by the second name (``b.weight``, as
    ``named_parameters(remove_duplicate=False)`` lists it) was passed to the forward detached —
    a block of zeros, λ_max 0.36 for 0.50 and a zero gradient, unrefused; alone it was refused
    as a parameter the outputs do not depend on."""
    torch.manual_seed(0)
    case = cases.mlp()
    case.model = _SharedTwice().double()
    dense = cases.dense_hessian(case) if kind == "hessian" else cases.dense_ggn(case)
    full = cs.Curvature(case.model, case.loss_fn, case.data, kind=kind)
    assert full.param_names == ["a.weight", "a.bias", "o.weight", "o.bias"]
    block = torch.cat([torch.arange(16), torch.arange(20, 32)])  # a.weight and o.weight
    for names in (["a.weight", "o.weight"], ["b.weight", "o.weight"]):
        C = cs.Curvature(case.model, case.loss_fn, case.data, kind=kind, params=names)
        assert C.param_names == names
        torch.testing.assert_close(C.to_dense(), dense[block][:, block], **TOL)
        _, g = C.loss_and_gradient()
        torch.testing.assert_close(g, full.loss_and_gradient()[1][block], **TOL)


def test_frozen_parameters_are_left_out():
    case = cases.mlp()
    case.model[0].weight.requires_grad_(False)
    C = cs.Curvature(case.model, case.loss_fn, case.data)
    assert C.num_params == sum(p.numel() for p in case.model.parameters() if p.requires_grad)
    torch.testing.assert_close(C.to_dense(), cases.dense_hessian(case), **TOL)


def test_flatten_and_unflatten_round_trip():
    case = cases.cnn()
    C = cs.Curvature(case.model, case.loss_fn, case.data)
    v = torch.arange(C.num_params, dtype=torch.float64)
    named = C.unflatten(v)
    assert list(named) == C.param_names
    for (k, p), t in zip(case.model.named_parameters(), named.values(), strict=True):
        assert t.shape == p.shape, k
    assert torch.equal(C.flatten(named), v)
    assert torch.equal(C.flatten(list(named.values())), v)


def test_from_function_is_the_hessian_of_the_function():
    p = cs.problems.get("rosenbrock", n=4)
    C = cs.Curvature.from_function(p.f, p.x0)
    assert isinstance(C, cs.Curvature)
    torch.testing.assert_close(C.to_dense(), p.hess(p.x0), rtol=1e-12, atol=1e-10)
    assert C.num_params == 4 and C.kind == "hessian" and C.matvecs == 4


def test_to_scipy_eigsh_matches_eigvalsh():
    from scipy.sparse.linalg import eigsh

    case = cases.mlp()
    C = cs.Curvature(case.model, case.loss_fn, case.data)
    op = C.to_scipy()
    assert op.shape == (C.num_params, C.num_params) and op.dtype == np.float64
    top = eigsh(op, k=2, which="LA", return_eigenvectors=False, tol=1e-10)
    ref = torch.linalg.eigvalsh(cases.dense_hessian(case)).numpy()
    np.testing.assert_allclose(np.sort(top), ref[-2:], rtol=1e-8)
    np.testing.assert_allclose(op @ np.eye(C.num_params)[:, :2], C.to_dense()[:, :2].numpy())


def test_to_scipy_works_on_float32_models():
    case = cases.mlp()
    case.model.float()
    op = cs.Curvature(case.model, case.loss_fn, (case.inputs.float(), case.targets)).to_scipy()
    out = op.matvec(np.ones(op.shape[0]))
    assert out.dtype == np.float64 and np.isfinite(out).all()


def test_products_follow_the_current_parameters():
    """Cached graphs are rebuilt when an optimizer changes the parameters in place."""
    case = cases.mlp()
    C = cs.Curvature(case.model, case.loss_fn, case.data)
    H0 = C.to_dense()
    with torch.no_grad():
        for p in case.model.parameters():
            p.mul_(1.5)
    H1 = C.to_dense()
    assert not torch.allclose(H0, H1)
    torch.testing.assert_close(H1, cases.dense_hessian(case), **TOL)


def test_to_dense_refuses_large_models():
    model = nn.Linear(100, 60)
    C = cs.Curvature(model, nn.MSELoss(), (torch.randn(4, 100), torch.randn(4, 60)))
    with pytest.raises(ValueError, match="force=True"):
        C.to_dense()


def test_transformer_says_which_fallback_it_used():
    case = cases.transformer()
    C = cs.Curvature(case.model, case.loss_fn, case.data)
    assert any("math backend" in n for n in C.notes)
    plain = cases.mlp()
    assert cs.Curvature(plain.model, plain.loss_fn, plain.data).notes == []


def _kernel_flags() -> tuple:
    return (
        torch.backends.mkldnn.enabled,
        torch.backends.cudnn.enabled,
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )


def test_an_lstm_in_float32_runs_on_torchs_own_lstm_and_agrees_with_the_fused_one():
    """For an RNN, oneDNN's fused LSTM is off during products (cheaper to differentiate twice);
    the product equals plain torch's double backward through the fused kernel, and every
    kernel switch is back as it was after a product, and after one that fails."""
    case = cases.lstm(n=16)
    model = case.model.float()
    data = (case.inputs.float(), case.targets)
    C = cs.Curvature(model, case.loss_fn, data, cache=False)
    v = torch.randn(C.num_params, generator=torch.Generator().manual_seed(0))
    params = list(model.parameters())
    grads = torch.autograd.grad(case.loss_fn(model(data[0]), data[1]), params, create_graph=True)
    sizes = [p.numel() for p in params]
    blocks = [t.reshape(p.shape) for t, p in zip(v.split(sizes), params, strict=True)]
    expected = torch.cat([h.reshape(-1) for h in torch.autograd.grad(grads, params, blocks)])
    before = _kernel_flags()
    torch.testing.assert_close(C @ v, expected, rtol=1e-4, atol=1e-5)
    assert _kernel_flags() == before
    assert any("cuDNN is disabled" in n for n in C.notes)

    def failing(out, y):
        assert not torch.backends.mkldnn.enabled and not torch.backends.cuda.flash_sdp_enabled()
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        cs.Curvature(model, failing, data, reduction="mean") @ v
    assert _kernel_flags() == before


def _attention_flags() -> dict[str, bool]:
    """Every scaled-dot-product-attention backend switch this torch has, by name."""
    return {
        n: getattr(torch._C, n)()
        for n in dir(torch._C)
        if n.startswith("_get_") and n.endswith("_sdp_enabled")
    }


def test_products_run_attention_on_the_math_backend_only_and_put_the_users_switches_back():
    """Whatever backends the user enabled — here the math one off, flash and FlashAttention-3
    on — a product's forward sees only the math backend on (every other switch torch has off:
    ``sdpa_kernel`` left FlashAttention-3's, which has no double backward), and the user's
    switches are back after the product, also when it fails."""
    case = cases.mlp()
    seen = []

    def loss_fn(out, y):
        seen.append(_attention_flags())
        return case.loss_fn(out, y)

    # math off, flash on, and FlashAttention-3 on where this torch has its switch
    user = {
        n: n != "_get_math_sdp_enabled"
        for n in ("_get_math_sdp_enabled", "_get_flash_sdp_enabled", "_get_fa3_sdp_enabled")
        if hasattr(torch._C, n)
    }
    was = _attention_flags()
    for name, on in user.items():
        getattr(torch._C, name.replace("_get_", "_set_sdp_use_").removesuffix("_sdp_enabled"))(on)
    try:
        found = _attention_flags()
        assert found.items() >= user.items()
        C = cs.Curvature(case.model, loss_fn, case.data, reduction="mean", cache=False)
        C @ torch.ones(C.num_params, dtype=cases.DT)
        assert _attention_flags() == found
        assert seen and all(
            flags == {n: n == "_get_math_sdp_enabled" for n in flags} for flags in seen
        )
        failing = cs.Curvature(case.model, failing_loss, case.data, reduction="mean")
        with pytest.raises(RuntimeError, match="loss failed"):
            failing @ torch.ones(C.num_params, dtype=cases.DT)
        assert _attention_flags() == found
    finally:
        for name in user:
            setter = name.replace("_get_", "_set_sdp_use_").removesuffix("_sdp_enabled")
            getattr(torch._C, setter)(was[name])


def test_a_torch_without_the_attention_switches_falls_back_to_sdpa_kernel(monkeypatch):
    """Where torch's flag functions are not found, ``sdpa_kernel([MATH])`` switches the
    backends: the math one on and the fused ones off during the product, the user's back."""
    from curvscope.derivatives import objective

    monkeypatch.setattr(objective, "_ATTENTION_SWITCHES", [])
    case = cases.mlp()
    seen = []

    def loss_fn(out, y):
        seen.append(_attention_flags())
        return case.loss_fn(out, y)

    found = _attention_flags()
    C = cs.Curvature(case.model, loss_fn, case.data, reduction="mean", cache=False)
    C @ torch.ones(C.num_params, dtype=cases.DT)
    assert _attention_flags() == found
    assert seen[-1]["_get_math_sdp_enabled"] and not seen[-1]["_get_flash_sdp_enabled"]


def failing_loss(out, y):
    raise RuntimeError("loss failed")


def test_multi_input_and_keyword_models():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2)

        def forward(self, x, z):
            return self.a(x) * torch.tanh(self.b(z))

    model = TwoInputs().double()
    gen = torch.Generator().manual_seed(0)
    x, z = (
        torch.randn(8, 3, generator=gen, dtype=torch.float64),
        torch.randn(8, 2, generator=gen, dtype=torch.float64),
    )
    y = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    H_pos = cs.Curvature(model, nn.MSELoss(), ((x, z), y)).to_dense()
    H_kw = cs.Curvature(model, nn.MSELoss(), ({"x": x, "z": z}, y)).to_dense()
    torch.testing.assert_close(H_pos, H_kw)
    L = cs.Curvature(model, nn.MSELoss(), [((x[:3], z[:3]), y[:3]), ((x[3:], z[3:]), y[3:])])
    torch.testing.assert_close(L.to_dense(), H_pos, **TOL)


# --------------------------------------------------------------- the model is left alone
@pytest.mark.parametrize("kind", list(cs.KINDS))
@pytest.mark.parametrize("cache", [True, False])
def test_model_state_is_left_exactly_as_found(kind, cache):
    case = cases.dropout_batchnorm()
    model = case.model
    # some .grad set, some None
    loss = case.loss_fn(model(case.inputs), case.targets)
    loss.backward()
    model[4].bias.grad = None
    model[1].eval()  # mixed modes across submodules
    before = cases.snapshot(model)
    C = cs.Curvature(model, case.loss_fn, case.data, kind=kind, cache=cache)
    cases.assert_unchanged(before, cases.snapshot(model))
    v = torch.randn(C.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    C @ v
    C @ torch.stack([v, 2 * v], dim=1)
    cases.assert_unchanged(before, cases.snapshot(model))


@pytest.mark.parametrize("kind", list(cs.KINDS))
def test_dropout_gives_one_fixed_linear_map(kind):
    """Train-mode dropout: the same mask on every product, symmetric, and not the eval map."""
    case = cases.dropout_batchnorm()
    # one backend throughout, so that products can be compared bit for bit
    C = cs.Curvature(
        case.model, case.loss_fn, case.data, kind=kind, cache=False, backend="double_backward"
    )
    gen = torch.Generator().manual_seed(1)
    u, v = (torch.randn(C.num_params, generator=gen, dtype=torch.float64) for _ in range(2))
    torch.manual_seed(123)
    first = C @ v
    torch.manual_seed(456)  # the user's RNG state must not matter
    assert torch.equal(C @ v, first)
    torch.testing.assert_close(u @ (C @ v), v @ (C @ u), rtol=1e-9, atol=1e-11)
    cached = cs.Curvature(case.model, case.loss_fn, case.data, kind=kind, cache=True)
    torch.testing.assert_close(cached @ v, first, **TOL)
    case.model.eval()
    assert not torch.allclose(
        cs.Curvature(case.model, case.loss_fn, case.data, kind=kind) @ v, first
    )


def test_dropout_hessian_matches_finite_differences_under_the_same_mask():
    case = cases.dropout_batchnorm()
    C = cs.Curvature(case.model, case.loss_fn, case.data, seed=5)
    obj = C.objective
    batch = next(obj.batches())

    def gradient(flat):
        theta = {
            k: t.detach().requires_grad_(True)
            for k, t in zip(obj.names, obj.unflatten(flat), strict=True)
        }
        with obj.context(batch.index):
            loss = obj.loss(obj.forward(theta, batch), batch)
        return obj.flatten(torch.autograd.grad(loss, list(theta.values())))

    theta0, _, _ = cases.flat_params(case.model)
    v = torch.randn(C.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    eps = 1e-5
    fd = (gradient(theta0 + eps * v) - gradient(theta0 - eps * v)) / (2 * eps)
    torch.testing.assert_close(C @ v, fd, rtol=1e-6, atol=1e-7)


class _LayerDrop(nn.Module):
    """Residual tanh layers each skipped with probability 0.3 in train mode, the draw from
    numpy's global RNG (Hugging Face's wav2vec2 LayerDrop) or Python's; each forward's
    draws are recorded, and ``replay`` makes the forward use given draws instead."""

    def __init__(self, draw) -> None:
        super().__init__()
        self.draw, self.drawn, self.replay = draw, [], None
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))

    def forward(self, x):
        keep = [self.draw() >= 0.3 for _ in self.layers] if self.replay is None else self.replay
        self.drawn.append(keep)
        h = torch.tanh(self.a(x))
        for layer, kept in zip(self.layers, keep, strict=True):
            h = h + torch.tanh(layer(h)) if kept else h
        return self.b(h)


@pytest.mark.parametrize("source", ["numpy", "python"])
def test_randomness_from_numpy_or_python_is_fixed_per_batch_and_the_users_rngs_kept(source):
    """A forward drawing from numpy's or Python's global RNG: every product sees the same
    draws (before: two products of one vector 56% apart through a loader, λ_max 1.67 to 2.88
    with the seed, each "converged"), the operator is the Hessian under those draws (a dense
    reference replaying them), and the user's numpy and Python RNGs are as found."""
    import random

    torch.manual_seed(0)
    draw = np.random.random if source == "numpy" else random.random
    model = _LayerDrop(draw).double()
    X = torch.randn(48, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (48,))
    loader = DataLoader(TensorDataset(X, y), batch_size=16)
    np.random.seed(7)
    random.seed(7)
    users = np.random.get_state()[1].copy(), random.getstate()
    C = cs.Curvature(model, nn.CrossEntropyLoss(), loader)
    v = torch.randn(C.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model.drawn.clear()
    first = C @ v
    draws = list(model.drawn)
    assert torch.equal(C @ v, first) and model.drawn[len(draws) :] == draws
    assert np.array_equal(np.random.get_state()[1], users[0]) and random.getstate() == users[1]
    # the dense Hessian of the mean loss with each batch's draws replayed
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    batches = list(loader)

    def loss(flat):
        params = dict(zip(names, C.objective.unflatten(flat), strict=True))
        total = 0.0
        for (xb, yb), keep in zip(batches, draws, strict=True):
            model.replay = keep
            out = torch.func.functional_call(model, params, (xb,))
            total = total + nn.functional.cross_entropy(out, yb) * len(yb) / len(y)
        return total

    H = torch.func.jacfwd(torch.func.grad(loss))(theta)
    model.replay = None
    torch.testing.assert_close(first, H @ v, rtol=1e-10, atol=1e-12)


def test_batchnorm_train_uses_batch_statistics():
    """The train-mode curvature is that of the training loss (batch statistics), not eval's."""
    train = cases.batchnorm(train=True)
    H = cs.Curvature(train.model, train.loss_fn, train.data).to_dense()
    torch.testing.assert_close(H, cases.dense_hessian(train), **TOL)
    train.model.eval()
    assert not torch.allclose(H, cs.Curvature(train.model, train.loss_fn, train.data).to_dense())


def test_a_loss_that_reads_the_parameters_itself_is_refused_and_differences_measure_it():
    """An L2 penalty over model.parameters() inside loss_fn: the exact backends differentiate
    copies of the parameters passed through the forward, so the penalty counted in the loss but
    not in the gradient or the curvature (λ_max 0.72 for 0.82, no note) — refused with the fix;
    finite differences, which move the parameters themselves, measure it."""
    case = cases.mlp()
    model, (X, y), wd = case.model, case.data, 0.05

    def loss_fn(out, t):
        return case.loss_fn(out, t) + wd * sum((p**2).sum() for p in model.parameters())

    with pytest.raises(ValueError, match=r"reads the model's parameter .* L2 penalty"):
        cs.Curvature(model, loss_fn, (X, y)) @ torch.ones(
            sum(p.numel() for p in model.parameters()), dtype=cases.DT
        )
    with pytest.raises(ValueError, match="weight_decay"):
        cs.diagnose(model, loss_fn, (X, y), lr=0.1)
    H = cases.dense_hessian(case) + 2 * wd * torch.eye(cases.dense_hessian(case).shape[0])
    C = cs.Curvature(model, loss_fn, (X, y), backend="finite_difference")
    top = cs.eigenvalues(C)
    assert top.all_converged
    assert float(top.values[0]) == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)


def test_a_compiled_model_is_measured_through_its_module():
    """torch.compile(model) (AOTAutograd graphs have no double backward: it failed with
    torch's bare error): the products are its module's, run eagerly, and the notes say so."""
    case = cases.mlp()
    compiled = torch.compile(case.model, backend="aot_eager")
    C = cs.Curvature(compiled, case.loss_fn, case.data)
    v = torch.randn(C.num_params, generator=torch.Generator().manual_seed(0), dtype=cases.DT)
    torch.testing.assert_close(C @ v, cases.dense_hessian(case) @ v, **TOL)
    assert any("torch.compile'd" in n for n in C.notes)
    assert cs.diagnose(compiled, case.loss_fn, case.data, lr=0.1).confident


class _Block(nn.Module):  # a custom module: dynamo compiles it (it skips nn.Sequential)
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class _WithBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.blk, self.b = nn.Linear(4, 5), _Block(), nn.Linear(5, 2)

    def forward(self, x):
        return self.b(self.blk(torch.tanh(self.a(x))))


@pytest.mark.parametrize("how", ["wrapped", "in_place"])
def test_a_compiled_submodule_runs_eagerly_in_products(how):
    """A submodule compiled by torch.compile (wrapped, or by ``module.compile()``): its
    AOTAutograd graphs have no double backward — torch's bare error before. Products run it
    under the compiler's force_eager stance: the dense Hessian's products, said in the notes,
    and the compiled module compiles nothing again afterwards."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = _WithBlock().double()
    plain = _WithBlock().double()
    plain.load_state_dict(model.state_dict())
    if how == "wrapped":
        model.blk = torch.compile(model.blk, backend="aot_eager")
    else:
        model.blk.compile(backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(16, 4, generator=g, dtype=cases.DT), torch.randint(0, 2, (16,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(X), y).backward()  # compiled once, as in training
    model.zero_grad(set_to_none=True)
    compiled = counters["frames"]["ok"]
    assert compiled >= 1
    C = cs.Curvature(model, loss_fn, (X, y))
    v = torch.randn(C.num_params, generator=g, dtype=cases.DT)
    torch.testing.assert_close(C @ v, cs.Curvature(plain, loss_fn, (X, y)).to_dense() @ v, **TOL)
    assert any("run eagerly" in n and "'blk'" in n for n in C.notes)
    loss_fn(model(X), y).backward()
    assert counters["frames"]["ok"] == compiled  # no recompilation


def test_params_by_the_names_a_compile_wrapper_gives_them():
    """``torch.compile(model).named_parameters()`` prefixes ``_orig_mod.``: those names select
    the same parameters, named as the module names them."""
    case = cases.mlp()
    compiled = torch.compile(case.model, backend="aot_eager")
    wrapped = [n for n, _ in compiled.named_parameters()][:2]
    assert wrapped[0].startswith("_orig_mod.")
    C = cs.Curvature(compiled, case.loss_fn, case.data, params=wrapped)
    assert C.param_names == [n for n, _ in case.model.named_parameters()][:2]
    # a name the module itself has is kept, though it starts with the prefix (DDP over a model
    # whose child is called "module": "module.0.weight" is the child's)
    from curvscope.derivatives.objective import inner_name

    assert inner_name("module.0.weight", "module.", {"module.0.weight"}) == "module.0.weight"
    assert inner_name("module.0.weight", "module.", {"0.weight"}) == "0.weight"


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.reentrant = reentrant  # None: no checkpointing
        self.a, self.blk, self.b = nn.Linear(4, 5), _Block(), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.reentrant is None:
            h = self.blk(h)
        else:
            h = torch.utils.checkpoint.checkpoint(self.blk, h, use_reentrant=self.reentrant)
        return self.b(h)


def _checkpointed(reentrant):
    torch.manual_seed(0)
    model = _Checkpointed(reentrant).double()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(16, 4, generator=g, dtype=cases.DT), torch.randint(0, 2, (16,), generator=g)
    return model, nn.CrossEntropyLoss(), (X, y)


@pytest.mark.parametrize("params", [None, ["blk.lin.weight", "b.weight"]])
def test_activation_checkpointing_is_measured_or_refused_with_the_fix(params):
    """torch.utils.checkpoint inside the model. Non-reentrant: the products are the
    uncheckpointed model's — with ``params=`` leaving the block's input layer out too, where
    the recomputation met constants the forward had not (torch's CheckpointError): those
    parameters are now passed requiring grad. Reentrant: refused naming use_reentrant=False
    and the finite-difference backend (which runs it) — with ``params=`` it gave the block's
    parameters a gradient and curvature of exactly 0, and a verdict on that."""
    model, loss_fn, data = _checkpointed(None)
    want = cs.Curvature(model, loss_fn, data, params=params).to_dense()
    model, loss_fn, data = _checkpointed(False)
    torch.testing.assert_close(
        cs.Curvature(model, loss_fn, data, params=params).to_dense(), want, **TOL
    )
    forward = cs.Curvature(model, loss_fn, data, params=params, backend="forward_over_reverse")
    with pytest.raises(RuntimeError, match=r"saved-tensor hooks.*'double_backward'"):
        forward @ torch.ones(forward.num_params, dtype=cases.DT)  # torch.func's bare error
    model, loss_fn, data = _checkpointed(True)
    with pytest.raises(RuntimeError, match=r"use_reentrant=False.*finite_difference"):
        cs.Curvature(model, loss_fn, data, params=params).loss_and_gradient()
    # Hugging Face makes the checkpointed blocks' inputs require grad (enable_input_require_
    # grads): torch then does not warn, and the block's parameters got a curvature of exactly
    # 0 — "flat", λ_max 0 converged (a review); the reentrant node on the graph is refused
    model.a.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    with pytest.raises(RuntimeError, match=r"use_reentrant=False"):
        cs.Curvature(model, loss_fn, data, params=params).loss_and_gradient()
    with pytest.raises(RuntimeError, match=r"use_reentrant=False"):
        cs.diagnose(model, loss_fn, data, lr=0.1, params=params)
    fd = cs.Curvature(model, loss_fn, data, params=params, backend="finite_difference")
    e = torch.eye(want.shape[0], dtype=cases.DT)
    torch.testing.assert_close(fd @ e, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["ggn", "fisher", "empirical_fisher"])
def test_every_kind_measures_a_checkpointed_model_with_parameters_left_out(kind):
    """``params=`` leaving out the checkpointed block's input layer: the recomputation met
    constants the forward had not (torch's CheckpointError), which the Hessian's pass ran again
    past; the other kinds failed with torch's error (the diff review). Every kind's pass runs
    again once, the parameters passed requiring grad."""
    _, data = _two_class_data()
    measured = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = _CheckpointedState(checkpointed, False).double().eval()
        C = cs.Curvature(model, nn.CrossEntropyLoss(), data, kind=kind, params=["bn.weight"])
        measured.append(C.to_dense())
    torch.testing.assert_close(measured[1], measured[0], rtol=1e-12, atol=1e-14)


def _two_class_data() -> tuple[torch.Generator, tuple[torch.Tensor, torch.Tensor]]:
    """16 float64 inputs of 4 with labels of 2 classes, and the generator that drew them (for
    the test's vectors)."""
    g = torch.Generator().manual_seed(1)
    return g, (
        torch.randn(16, 4, generator=g, dtype=cases.DT),
        torch.randint(0, 2, (16,), generator=g),
    )


class _CheckpointedState(nn.Module):
    """A checkpointed block that writes into the model: a BatchNorm's running statistics (in
    train mode), or a running scale held as a plain tensor attribute."""

    def __init__(self, checkpointed: bool, attribute: bool) -> None:
        super().__init__()
        self.checkpointed, self.attribute = checkpointed, attribute
        self.lin, self.bn, self.head = nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)
        self.scale = torch.ones(5, dtype=cases.DT)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(torch.tanh(self.lin(x)))
        if self.attribute:
            with torch.no_grad():
                self.scale.mul_(0.5).add_(0.5 * h.pow(2).mean(0))
            h = h / self.scale.sqrt()
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed:
            x = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
        else:
            x = self.block(x)
        return self.head(x)


@pytest.mark.filterwarnings("ignore::curvscope.derivatives.AttributeWriteWarning")
@pytest.mark.parametrize("attribute", [False, True])
def test_a_checkpointed_block_that_writes_into_the_model_leaves_it_as_found(attribute):
    """Activation checkpointing reruns a block's forward in the backward, with the model's
    own buffers and attributes, not the pass's copies: a BatchNorm in the block moved the
    user's running statistics at every product, and every product rebuilt the cached graph;
    a running scale held as a plain attribute did too, products 44–58% apart (an outside
    review). The recomputations write into copies now: the products are the uncheckpointed
    model's, one graph serves them all, and the statistics are as found."""
    g, data = _two_class_data()
    v = torch.randn(47, generator=g, dtype=cases.DT)

    def products(checkpointed: bool) -> tuple[nn.Module, list[torch.Tensor], int]:
        torch.manual_seed(0)
        model = _CheckpointedState(checkpointed, attribute).double().train()
        forwards = []
        model.head.register_forward_hook(lambda *_: forwards.append(1))
        C = cs.Curvature(model, nn.CrossEntropyLoss(), data, backend="double_backward")
        return model, [C @ v for _ in range(3)], len(forwards)

    _, want, _ = products(False)
    model, got, forwards = products(True)
    assert forwards == 1 and all(torch.equal(p, got[0]) for p in got)
    if not attribute:  # (a block that reads what it writes: the test below)
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(
            getattr(model.bn, name), getattr(nn.BatchNorm1d(5), name).to(getattr(model.bn, name))
        )
    assert torch.equal(model.scale, torch.ones(5, dtype=cases.DT))


class _StateAroundACheckpoint(nn.Module):
    """A running scale held as a plain attribute, set (in place, or assigned anew) and read by
    a checkpointed block (``inside``), or set by the forward before the block and read in it."""

    def __init__(self, checkpointed: bool, how: str, inside: bool = True) -> None:
        super().__init__()
        self.checkpointed, self.how, self.inside = checkpointed, how, inside
        self.lin, self.head = nn.Linear(4, 5), nn.Linear(5, 2)
        self.scale = torch.ones(5, dtype=cases.DT)

    def update(self, x: torch.Tensor) -> None:
        # (a constant step when inside: the loss then depends on θ through the block alone)
        step = 0.25 if self.inside else 0.5 * x.detach().pow(2).mean(0).sum()
        if self.how == "assigned":
            self.scale = 0.5 * self.scale + step
        else:
            with torch.no_grad():
                self.scale.mul_(0.5).add_(step)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x))
        if self.inside:
            self.update(x)
        return h / self.scale.sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.inside:
            self.update(x)
        if self.checkpointed:
            return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False))
        return self.head(self.block(x))


def _training_gradient(model: nn.Module, theta: torch.Tensor, data) -> torch.Tensor:
    """The gradient a training step takes (torch's own backward), on a copy of ``model`` at
    parameters ``theta``."""
    twin = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(theta, twin.parameters())
    loss = nn.CrossEntropyLoss()(twin(data[0]), data[1])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(twin.parameters()))])


@pytest.mark.filterwarnings("ignore::curvscope.derivatives.AttributeWriteWarning")
@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher", "empirical_fisher"])
@pytest.mark.parametrize("how", ["in_place", "assigned"])
def test_a_checkpointed_block_that_reads_what_it_sets_is_differentiated_as_torch_runs_it(
    how, kind, cache
):
    """A checkpointed block that sets a plain attribute and then reads it is recomputed in
    each backward from what the forward left: in training as in curvscope (its gradient is
    torch's own, to rounding), each backward with fresh copies, so that the columns of a block
    of vectors, cached or not, agree (a recomputation wrote into one copy for all columns,
    drifting 12–63%: the diff review). Neither is the loss's: the block's output is the
    forward's and its derivatives the recomputation's, so not even the training gradient's
    central differences match the products (11% here); the note says so, and the model is left
    as found."""
    g, data = _two_class_data()
    torch.manual_seed(0)
    model = _StateAroundACheckpoint(True, how).double()
    backend = {"backend": "double_backward"} if kind == "hessian" else {}
    C = cs.Curvature(model, nn.CrossEntropyLoss(), data, kind=kind, cache=cache, **backend)
    V = torch.randn(C.num_params, 3, generator=g, dtype=cases.DT)
    block = C.matmat(V)
    single = torch.stack([C @ V[:, j] for j in range(3)], 1)
    torch.testing.assert_close(block, single, rtol=1e-12, atol=1e-14)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    torch.testing.assert_close(
        C.loss_and_gradient()[1], _training_gradient(model, theta, data), rtol=1e-12, atol=1e-14
    )
    assert any("sets ['scale'] to other values" in n for n in C.notes)
    assert torch.equal(model.scale, torch.ones(5, dtype=cases.DT))


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher", "empirical_fisher"])
@pytest.mark.parametrize("how", ["in_place", "assigned"])
def test_an_attribute_set_before_a_checkpointed_block_and_read_in_it_is_as_the_block_read_it(
    how, kind
):
    """The forward sets a plain attribute, then a checkpointed block reads it: recomputed, the
    block reads what the forward left, as it did in the forward — the products and gradient
    are the uncheckpointed model's, with no note (resetting the attributes as the forward
    began, as an intermediate version of this change did, put the gradient 134% off: the diff
    review)."""
    g, data = _two_class_data()
    v = torch.randn(37, generator=g, dtype=cases.DT)
    measured = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = _StateAroundACheckpoint(checkpointed, how, inside=False).double()
        backend = {"backend": "double_backward"} if kind == "hessian" else {}
        C = cs.Curvature(model, nn.CrossEntropyLoss(), data, kind=kind, **backend)
        measured.append((C @ v, C.loss_and_gradient()[1], C.notes))
        assert torch.equal(model.scale, torch.ones(5, dtype=cases.DT))
    (want, want_grad, _), (got, grad, notes) = measured
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-14)
    assert not any("activation checkpointing" in n for n in notes)


class _CheckpointedLargeBatches(nn.Module):
    """A block that updates a plain tensor attribute in place and reads it, beside a
    BatchNorm in train mode, checkpointed only in batches of more than 4 rows."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn, self.out = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)
        self.stat = torch.ones(6, dtype=cases.DT)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.stat.mul_(0.5).add_(0.1)
        return torch.tanh(self.bn(self.lin(x)) + 3 * self.stat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 4:
            return self.out(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False))
        return self.out(self.block(x))


@pytest.mark.filterwarnings("ignore::curvscope.derivatives.AttributeWriteWarning")
@pytest.mark.parametrize("cache", [True, False])
def test_a_model_that_checkpoints_some_batches_only_gives_one_operator(cache):
    """Whether a backward recomputes a block is learned per graph: learned once for all, at a
    batch that does not checkpoint, a later batch's recomputations wrote into the forward's
    own tensor — products drifting 8–15% apart, or torch's bare "modified by an inplace
    operation" (the diff review) — and into the user's running statistics, at every product
    (the reread)."""
    g = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(n, 4, generator=g, dtype=cases.DT),
            torch.randn(n, 2, generator=g, dtype=cases.DT),
        )
        for n in (4, 8)
    ]
    torch.manual_seed(0)
    model = _CheckpointedLargeBatches().double()
    C = cs.Curvature(model, nn.MSELoss(), data, backend="double_backward", cache=cache)
    V = torch.randn(C.num_params, 3, generator=g, dtype=cases.DT)
    first = C @ V[:, 0]
    assert all(torch.equal(C @ V[:, 0], first) for _ in range(3))
    columns = torch.stack([C @ V[:, j] for j in range(3)], 1)
    torch.testing.assert_close(C.matmat(V), columns, rtol=1e-12, atol=1e-14)
    assert torch.equal(model.stat, torch.ones(6, dtype=cases.DT))
    fresh = nn.BatchNorm1d(6).double()
    for name, b in model.bn.named_buffers():
        assert torch.equal(b, getattr(fresh, name)), name


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher", "empirical_fisher"])
def test_a_backward_hook_reads_what_a_forward_hook_stored(kind, cache):
    """A forward hook that stores a layer's input as an attribute and a full backward hook that
    reads it (K-FAC's statistics): every backward a product takes, through a cached graph
    too, runs with the attributes as that batch's forward left them — the products were
    torch's bare ``AttributeError`` once the pass had put the attribute back (the diff
    review). The products are the hook-free model's, and the attribute is as found."""
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(8, 4, generator=g, dtype=cases.DT), torch.randint(0, 3, (8,), generator=g))
        for _ in range(2)
    ]

    def model(hooked: bool) -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        if hooked:
            for layer in (net[0], net[2]):
                layer.register_forward_hook(lambda m, i, o: setattr(m, "a", i[0].detach()))
                layer.register_full_backward_hook(lambda m, gi, go: stats.append(m.a.T @ go[0]))
        return net

    stats: list[torch.Tensor] = []
    backend = {"backend": "double_backward"} if kind == "hessian" else {}
    hooked = model(True)
    C, plain = (
        cs.Curvature(net, nn.CrossEntropyLoss(), data, kind=kind, cache=cache, **backend)
        for net in (hooked, model(False))
    )
    V = torch.randn(C.num_params, 2, generator=g, dtype=cases.DT)
    torch.testing.assert_close(C.matmat(V), plain.matmat(V), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(C @ V[:, 0], plain @ V[:, 0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(C.loss_and_gradient()[1], plain.loss_and_gradient()[1])
    assert stats and not any(hasattr(m, "a") for m in hooked.modules())


@pytest.mark.parametrize("cache", [True, False])
def test_an_operator_kept_while_the_model_turns_to_train_mode_leaves_its_statistics(cache):
    """Whether a product's backward writes into the model was learned once, at an operator's
    first product: one made in eval mode (no write), then model.train(), moved the user's
    running statistics at every later product (the diff review). It is learned anew for each
    new graph."""
    g, data = _two_class_data()
    torch.manual_seed(0)
    model = _CheckpointedState(True, False).double().eval()
    C = cs.Curvature(model, nn.CrossEntropyLoss(), data, backend="double_backward", cache=cache)
    v = torch.randn(C.num_params, generator=g, dtype=cases.DT)
    C @ v
    model.train()
    before = {k: b.clone() for k, b in model.named_buffers()}
    products = [C @ v for _ in range(2)]
    assert all(torch.equal(b, before[k]) for k, b in model.named_buffers())
    assert torch.equal(products[0], products[1])


@pytest.mark.parametrize("backend", ["auto", "finite_difference"])
def test_a_sparse_embedding_is_measured_with_dense_gradients(backend):
    """``nn.Embedding(sparse=True)``: torch's bare "reshape is not implemented for sparse
    tensors" before; its gradient is the same dense, which the passes use (the module's flag
    put back after)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2))
    model = model.double()
    dense = copy.deepcopy(model)
    dense[0].sparse = False
    x, y = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 4]]), torch.tensor([0, 1, 1, 0])
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=cases.DT)
    got = cs.Curvature(model, nn.CrossEntropyLoss(), (x, y), backend=backend) @ v
    want = cs.Curvature(dense, nn.CrossEntropyLoss(), (x, y)) @ v
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    assert model[0].sparse
    C = cs.Curvature(model, nn.CrossEntropyLoss(), (x, y), backend=backend)
    model[0].sparse = False  # the user's later choice is what is put back
    C @ v
    assert not model[0].sparse


def test_module_backward_hooks_are_said_in_the_notes():
    """A module's full backward hook runs in every backward a product takes (a hook halving
    grad_input gave an operator equal to none of H, DH, DHD, without a word)."""
    case = cases.mlp()
    case.model[0].register_full_backward_hook(lambda m, gi, go: tuple(0.5 * g for g in gi))
    C = cs.Curvature(case.model, case.loss_fn, case.data)
    assert any("backward hooks" in n and "'0'" in n for n in C.notes)
    plain = cases.mlp()
    assert not any(
        "backward hooks" in n for n in cs.Curvature(plain.model, plain.loss_fn, plain.data).notes
    )


def test_inside_inference_mode_the_error_says_so():
    """Under torch.inference_mode() nothing records a graph: the error said the loss did not
    depend on the parameters; it names inference mode and the fix."""
    case = cases.mlp()
    C = cs.Curvature(case.model, case.loss_fn, case.data)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inside torch\.inference_mode"):
        C @ torch.ones(C.num_params, dtype=cases.DT)
    with torch.no_grad():  # fine: curvscope turns gradients on itself
        C @ torch.ones(C.num_params, dtype=cases.DT)


# ------------------------------------------------------------------------ bad input
def _mlp_parts():
    c = cases.mlp()
    return c.model, c.loss_fn, c.data


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda m, lf, d: cs.Curvature(m, lf, d, kind="hessain"), ValueError, "unknown kind"),
        (lambda m, lf, d: cs.Curvature(m, lf, []), ValueError, "data is empty"),
        (lambda m, lf, d: cs.Curvature(m, lf, (d[0][:0], d[1][:0])), ValueError, "no samples"),
        (lambda m, lf, d: cs.Curvature(m, lf, (d[0] * float("nan"), d[1])), ValueError, "NaN"),
        (lambda m, lf, d: cs.Curvature(m, lf, iter([d])), TypeError, "one-shot iterator"),
        (lambda m, lf, d: cs.Curvature(m, lf, 3), TypeError, "pair"),
        (lambda m, lf, d: cs.Curvature(m, lf, [d, (d[0],)]), TypeError, "batch 1"),
        (
            lambda m, lf, d: cs.Curvature(m.requires_grad_(False), lf, d),
            ValueError,
            "no parameter that requires grad",
        ),
        (lambda m, lf, d: cs.Curvature(m, lf, d, params=["x"]), ValueError, "no parameter named"),
        (
            lambda m, lf, d: cs.Curvature(m, lf, d, params=[torch.zeros(2)]),
            ValueError,
            "not a parameter",
        ),
        (
            lambda m, lf, d: cs.Curvature(m, lf, d, params=[m[0].weight.requires_grad_(False)]),
            ValueError,
            "does not require grad",
        ),
        (lambda m, lf, d: cs.Curvature("model", lf, d), TypeError, "nn.Module"),
        (lambda m, lf, d: cs.Curvature(m, "mse", d), TypeError, "callable"),
        (lambda m, lf, d: cs.Curvature(m, nn.HuberLoss(), d, kind="fisher"), ValueError, "ggn"),
        (
            lambda m, lf, d: cs.Curvature(
                m, nn.CrossEntropyLoss(label_smoothing=0.1), d, kind="fisher"
            ),
            ValueError,
            "label_smoothing",
        ),
        (
            lambda m, lf, d: cs.Curvature(m, lf, d, kind="fisher", mc_samples=0),
            ValueError,
            "mc_samples",
        ),
    ],
)
def test_construction_errors(build, error, match):
    with pytest.raises(error, match=match):
        build(*_mlp_parts())


@pytest.mark.parametrize(
    ("loss_fn", "error", "match"),
    [
        (nn.CrossEntropyLoss(reduction="none"), ValueError, "scalar.*reduction='mean'"),
        (
            lambda out, y: torch.tensor(1.0, dtype=torch.float64),
            ValueError,
            "does not depend on the selected parameters",
        ),
        (lambda out, y: (out * float("inf")).sum(), FloatingPointError, "not finite"),
    ],
)
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_forward_errors_raise_at_the_first_product(loss_fn, error, match, kind):
    model, _, data = _mlp_parts()
    C = cs.Curvature(model, loss_fn, data, kind=kind)  # needs a forward pass: not raised yet
    with pytest.raises(error, match=match):
        C @ torch.ones(C.num_params, dtype=torch.float64)


def test_non_finite_parameters_raise_at_the_first_product():
    model, loss_fn, data = _mlp_parts()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    C = cs.Curvature(model, loss_fn, data)
    with pytest.raises(FloatingPointError, match="NaN"):
        C @ torch.ones(C.num_params, dtype=torch.float64)


def test_outputs_that_ignore_the_selected_parameters():
    model = cases.OneUnused(2, 1).double()
    data = (torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
    C = cs.Curvature(model, nn.MSELoss(), data, params=["unused.weight"])
    with pytest.raises(ValueError, match="do not depend on the selected parameters"):
        C @ torch.ones(2, dtype=torch.float64)
    # a block the loss uses only in part still works: the unused rows are zero
    H = cs.Curvature(model, nn.MSELoss(), data).to_dense()
    assert torch.equal(H[3:, :], torch.zeros(3, 6, dtype=torch.float64))


@pytest.mark.parametrize(
    ("v", "error", "match"),
    [
        (torch.ones(5, dtype=torch.float64), ValueError, r"shape \(43,\) or \(43, k\)"),
        (torch.ones(43, dtype=torch.float32), TypeError, "dtype torch.float64"),
        (torch.ones(43, 2, 2, dtype=torch.float64), ValueError, "shape"),
        (np.ones(43), TypeError, "torch.Tensor"),
        (torch.ones(43, dtype=torch.float64, device="meta"), ValueError, "device"),
    ],
)
def test_vector_errors(v, error, match):
    C = cs.Curvature(*_mlp_parts())
    assert C.num_params == 43
    with pytest.raises(error, match=match):
        C @ v


def test_data_that_changes_between_passes_is_caught():
    case = cases.mlp()
    X, y = case.data

    class Shrinking:  # a re-iterable source whose content changes, like a growing dataset
        def __init__(self):
            self.batches = [(X[:10], y[:10]), (X[10:], y[10:])]

        def __iter__(self):
            return iter(self.batches)

    source = Shrinking()
    C = cs.Curvature(case.model, case.loss_fn, source)
    source.batches.pop()
    with pytest.raises(ValueError, match="same data on every pass"):
        C @ torch.ones(C.num_params, dtype=torch.float64)


def test_restrict_gives_the_block_with_the_same_settings():
    case = cases.mlp()
    C = cs.Curvature(case.model, case.loss_fn, case.data, kind="ggn", seed=3)
    names = C.param_names[:2]
    sub = C.restrict(names)
    assert sub.kind == "ggn" and sub.param_names == names
    n = sub.num_params
    torch.testing.assert_close(sub.to_dense(), C.to_dense()[:n, :n], **TOL)
    with pytest.raises(TypeError, match="from a model"):
        cs.Curvature.from_function(lambda x: (x**2).sum(), torch.ones(2)).restrict(["x"])


def test_any_model_output_for_the_hessian_a_tensor_for_gauss_newton():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return {"logits": self.lin(x)}

    model = DictOut().double()
    X = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 0, 1, 1, 0])

    def loss_fn(out, t):
        return nn.functional.cross_entropy(out["logits"], t)

    H = cs.Curvature(model, loss_fn, (X, y)).to_dense()
    plain = cs.Curvature(nn.Sequential(model.lin), nn.CrossEntropyLoss(), (X, y)).to_dense()
    torch.testing.assert_close(H, plain, **TOL)
    G = cs.Curvature(model, loss_fn, (X, y), kind="ggn")
    with pytest.raises(TypeError, match="need a tensor of outputs"):
        G @ torch.ones(G.num_params, dtype=torch.float64)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_loss_and_gradient_match_a_plain_computation(cache, kind):
    case = cases.dropout_batchnorm()
    case.model.eval()  # deterministic, so a plain forward is the reference
    X, y = case.data
    C = cs.Curvature(
        case.model, case.loss_fn, [(X[:10], y[:10]), (X[10:], y[10:])], kind=kind, cache=cache
    )
    loss, g = C.loss_and_gradient()
    L, theta0 = cases.loss_fn_of_theta(case)
    assert loss == pytest.approx(float(L(theta0)), rel=1e-12)
    torch.testing.assert_close(g, torch.func.grad(L)(theta0), **TOL)
    f = cs.Curvature.from_function(lambda x: (x**3).sum(), torch.ones(2, dtype=torch.float64))
    assert f.loss_and_gradient()[0] == 2.0
