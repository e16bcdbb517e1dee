"""Ordinary model features an outside review found giving a wrong operator, or torch's bare error:
an embedding's frequency-scaled gradient, a padding row under forward-over-reverse, forwards that
move with each evaluation under finite differences, TorchScript, parametrize.cached()."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import curvscope as cs
from tests.cases import Case, dense_hessian

DT = torch.float64
G = torch.Generator().manual_seed(1)
TOKENS = torch.randint(0, 8, (10, 5), generator=G)
TOKENS[:, 0] = 1  # an index every row reads: its frequency differs from the others'
LABELS = torch.randint(0, 3, (10,), generator=G)
X = torch.randn(12, 5, dtype=DT, generator=G)
Y = torch.randint(0, 3, (12,), generator=G)


class Bag(nn.Module):
    """An embedding averaged over the sequence, then a linear head."""

    def __init__(self, **embedding: object) -> None:
        super().__init__()
        self.e = nn.Embedding(8, 3, **embedding)  # type: ignore[arg-type]
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.e(x)).mean(1))


def _bag(**embedding: object) -> nn.Module:
    torch.manual_seed(0)
    return Bag(**embedding).double()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _same_products(model, data, backend, exact=None) -> None:
    """Two products by ``backend`` equal the exact ones (of ``exact``, default ``model``)."""
    C = cs.Curvature(model, nn.CrossEntropyLoss(), data, backend=backend)
    E = cs.Curvature(model if exact is None else exact, nn.CrossEntropyLoss(), data)
    V = torch.randn(C.num_params, 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(C @ V, E @ V, rtol=1e-6, atol=1e-8)


def test_a_frequency_scaled_embedding_gradient_gives_the_loss_hessian():
    model = _bag(scale_grad_by_freq=True)
    plain = copy.deepcopy(model)
    plain.e.scale_grad_by_freq = False  # the same loss: the flag only scales torch's gradient
    H = dense_hessian(Case("bag", plain, nn.CrossEntropyLoss(), TOKENS, LABELS))
    C = cs.Curvature(model, nn.CrossEntropyLoss(), (TOKENS, LABELS))
    D = C.to_dense()
    torch.testing.assert_close(D, H, rtol=1e-10, atol=1e-12)  # was 39% off, not symmetric
    torch.testing.assert_close(
        cs.Curvature(model, nn.CrossEntropyLoss(), (TOKENS, LABELS), kind="ggn").to_dense().T,
        cs.Curvature(model, nn.CrossEntropyLoss(), (TOKENS, LABELS), kind="ggn").to_dense(),
    )
    assert any("scale_grad_by_freq" in n for n in C.notes)
    assert model.e.scale_grad_by_freq  # put back as found


def test_forward_over_reverse_keeps_the_padding_row_out_on_both_sides():
    model = _bag(padding_idx=0)
    data = (TOKENS, LABELS)
    exact = cs.Curvature(model, nn.CrossEntropyLoss(), data, backend="double_backward")
    forward = cs.Curvature(model, nn.CrossEntropyLoss(), data, backend="forward_over_reverse")
    D = forward.to_dense()
    torch.testing.assert_close(D, exact.to_dense(), rtol=1e-10, atol=1e-12)  # was P·H, 13% off
    torch.testing.assert_close(D, D.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("what", ["max_norm", "spectral_norm"])
def test_finite_differences_refuse_a_forward_that_moves_with_each_evaluation(what):
    if what == "max_norm":
        model, data = _bag(max_norm=0.5), (TOKENS, LABELS)
    else:
        model, data = _mlp(), (X, Y)
        parametrizations.spectral_norm(model[0])
    with pytest.raises(ValueError, match=r"moves with each evaluation.*double_backward"):
        cs.Curvature(model, nn.CrossEntropyLoss(), data, backend="finite_difference")
    if what == "spectral_norm":  # in eval mode u and v stay: the differences are of the loss
        model.eval()
        _same_products(model, data, backend="finite_difference")


def test_forward_over_reverse_that_torch_cannot_run_names_the_fix():
    class PackedGRU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.GRU(5, 4, batch_first=True), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
            return self.head(out.sum(1))

    model = PackedGRU().double()
    x, lengths = torch.randn(6, 4, 5, dtype=DT, generator=G), torch.tensor([4, 3, 2, 1, 4, 2])
    C = cs.Curvature(
        model, nn.CrossEntropyLoss(), ((x, lengths), Y[:6]), backend="forward_over_reverse"
    )
    with pytest.raises(RuntimeError, match=r"forward_over_reverse' failed.*double_backward"):
        C @ torch.randn(C.num_params, dtype=DT)


def test_a_torchscript_model_is_refused_with_the_backend_that_takes_it():
    scripted = torch.jit.script(_mlp())
    with pytest.raises(TypeError, match=r"TorchScript.*finite_difference"):
        cs.Curvature(scripted, nn.CrossEntropyLoss(), (X, Y))
    _same_products(scripted, (X, Y), backend="finite_difference", exact=_mlp())


def test_a_model_holding_a_scripted_submodule_is_measured_as_any():
    """Only a scripted top level is refused (functional_call's limit): a model that holds a
    scripted block is called at other parameters as any (a review: it was refused too)."""
    plain = _mlp()
    holder = nn.Sequential(torch.jit.script(copy.deepcopy(plain[:2])), plain[2])
    V = torch.randn(sum(p.numel() for p in plain.parameters()), 2, dtype=DT)
    expected = cs.Curvature(plain, nn.CrossEntropyLoss(), (X, Y)) @ V
    got = cs.Curvature(holder, nn.CrossEntropyLoss(), (X, Y)) @ V
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_a_max_norm_table_finite_differences_do_not_perturb_is_taken():
    """A frozen (or unselected) table is never stepped: finite differences take it (a review:
    it was refused with the selected ones)."""
    model = _bag(max_norm=0.5)
    model.e.weight.requires_grad_(False)
    _same_products(model, (TOKENS, LABELS), backend="finite_difference")
    model.e.weight.requires_grad_(True)
    C = cs.Curvature(
        model,
        nn.CrossEntropyLoss(),
        (TOKENS, LABELS),
        backend="finite_difference",
        params=["head.weight", "head.bias"],
    )
    E = cs.Curvature(
        model, nn.CrossEntropyLoss(), (TOKENS, LABELS), params=["head.weight", "head.bias"]
    )
    V = torch.randn(C.num_params, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(C @ V, E @ V, rtol=1e-6, atol=1e-8)


def test_the_ranks_signatures_are_exact_and_read_only_what_a_loss_computes():
    """The values' signature is integer sums of the bits — the same whatever the thread count
    (float sums differed in the last digit: identical parameters refused, a review); a loss's
    is its type, torch's settings and class weights — not a logged value of one's own."""
    from curvscope.derivatives.distributed import loss_signature, values_signature

    big = [torch.randn(4_000_000, generator=torch.Generator().manual_seed(0)), torch.ones(3)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = values_signature(big, "group")
        torch.set_num_threads(2)
        two = values_signature(big, "group")
    finally:
        torch.set_num_threads(threads)
    assert isinstance(one, torch.Tensor) and torch.equal(one, two)
    moved = [big[0].clone(), big[1]]
    moved[0][123] += 1e-3
    assert not torch.equal(values_signature(moved, "group"), one)
    assert values_signature(big, None) == "one process"

    class Logged(nn.CrossEntropyLoss):
        def forward(self, out, y):
            loss = super().forward(out, y)
            self.last = float(loss)
            return loss

    a, b = Logged(), Logged()
    a.last, b.last = 1.0, 2.0  # per-rank bookkeeping
    assert loss_signature(a, "group") == loss_signature(b, "group")
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0]))
    other = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0]))
    assert loss_signature(weighted, "group") != loss_signature(other, "group")
    assert loss_signature(nn.MSELoss(), "g") != loss_signature(nn.MSELoss(reduction="sum"), "g")


def test_inside_parametrize_cached_the_users_own_gradient_is_kept():
    class Squared(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * w.abs()

    model = _mlp()
    parametrize.register_parametrization(model[0], "weight", Squared())
    expected = cs.Curvature(model, nn.CrossEntropyLoss(), (X, Y)).to_dense()
    nn.functional.cross_entropy(model(X), Y).backward()
    own = model[0].parametrizations.weight.original
    grad, own.grad = own.grad.clone(), None
    with parametrize.cached():
        C = cs.Curvature(model, nn.CrossEntropyLoss(), (X, Y))
        torch.testing.assert_close(C.to_dense(), expected)
        nn.functional.cross_entropy(model(X), Y).backward()  # through curvscope's cached weight
    torch.testing.assert_close(own.grad, grad)  # was None: the user's gradient lost
    with parametrize.cached():
        out = model(X)  # the user's forward fills the cache first
        C = cs.Curvature(model, nn.CrossEntropyLoss(), (X, Y))
        torch.testing.assert_close(C.to_dense(), expected)  # was refused, as an L2 penalty
        del out
