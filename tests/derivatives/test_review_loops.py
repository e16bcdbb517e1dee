"""Data and compiled code as an outside review of ordinary training loops passed them (each
test fails on the code before it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import curvscope as cs
from curvscope.derivatives import objective
from curvscope.derivatives.objective import DataChangedError
from tests import cases

DT = torch.float64


def _batches(case: cases.Case) -> list[tuple[torch.Tensor, torch.Tensor]]:
    X, y = case.data
    return [(X[i : i + 4], y[i : i + 4]) for i in range(0, len(y), 4)]


class _SameIterator:
    """An iterable whose ``__iter__`` returns the same generator each time."""

    def __init__(self, batches: list) -> None:
        self.g = iter(batches)

    def __iter__(self):
        return self.g


def test_an_iterable_that_can_be_read_once_is_named_at_its_second_pass():
    """Its second pass was empty: a bare StopIteration came out of Curvature and diagnose, which
    map() and list() took for the end of their own data — three diagnoses returned []. Told at
    the operator's second pass (asking iter() twice up front opened a wrapped loader's workers
    twice, outside the RNG protection: a review)."""
    case = cases.mlp(n=12)
    said = r"no batch on its second pass \(data that can be read only once"
    with pytest.raises(DataChangedError, match=said):
        cs.Curvature(case.model, case.loss_fn, _SameIterator(_batches(case)))
    with pytest.raises(DataChangedError, match=said):
        once = _SameIterator(_batches(case))
        list(map(lambda _: cs.diagnose(case.model, case.loss_fn, once, lr=0.1), [0]))


class _Wrapped:
    """A loader wrapped as users write it: each pass opens the inner loader."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self):
        return ((x.to(DT), y) for x, y in self.loader)


def test_a_wrapped_shuffling_loader_is_read_inside_the_passes_randomness():
    """The one-shot check asked iter() of a wrapper twice, outside the protection of the passes'
    randomness: the user's global RNG moved (a review of that check)."""
    case = cases.mlp(n=12)
    X, y = case.data
    shuffled = DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4, shuffle=True)
    before = torch.get_rng_state()
    C = cs.Curvature(case.model, case.loss_fn, _Wrapped(shuffled))
    C @ torch.ones(C.num_params, dtype=DT)
    assert torch.equal(torch.get_rng_state(), before)


def test_data_whose_second_pass_is_empty_says_so():
    """A new iterator each time over a source that is spent: the data changed, in words."""
    case = cases.mlp(n=12)
    spent = iter(_batches(case))

    class Spent:
        def __iter__(self):
            yield from spent

    with pytest.raises(DataChangedError, match="yielded no batch on its second pass"):
        cs.Curvature(case.model, case.loss_fn, Spent())


def test_one_shot_train_batches_are_refused_by_the_monitor_and_empty_ones_by_diagnose():
    """A generator as the Monitor's train_batches was spent by the first probe: the later
    verdicts lost the batch sharpness (None, over 0 batches) without a word."""
    case = cases.mlp(n=12)
    gen = (b for b in _batches(case))
    with pytest.raises(TypeError, match=r"train_batches is a one-shot iterator.*the Monitor"):
        cs.Monitor(case.model, case.loss_fn, case.data, lr=0.1, train_batches=gen)
    with pytest.raises(ValueError, match="train_batches yielded no batch"):
        cs.diagnose(case.model, case.loss_fn, case.data, lr=0.1, train_batches=[])
    once = cs.diagnose(
        case.model, case.loss_fn, case.data, lr=0.1, train_batches=iter(_batches(case))
    )
    assert once.evidence["batches"] == 3  # diagnose reads it once: a generator is fine there


class _Endless(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(4, generator=g, dtype=DT), torch.randint(0, 3, (), generator=g)


def test_endless_data_is_refused_not_looped_over(monkeypatch):
    """A DataLoader over an IterableDataset that repeats forever: Curvature, diagnose and the
    Monitor's probe looped without a word (the limit is lowered here to keep the test short)."""
    monkeypatch.setattr(objective, "MAX_UNSIZED_BATCHES", 20)
    model = cases.mlp().model
    loader = DataLoader(_Endless(), batch_size=4)
    with pytest.raises(ValueError, match=r"yielded 20 batches and not ended.*itertools.islice"):
        cs.Curvature(model, nn.CrossEntropyLoss(), loader)
    X, y = torch.randn(100, 4, dtype=DT), torch.randint(0, 3, (100,))
    sized = DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4)  # 25, with a len()
    assert cs.Curvature(model, nn.CrossEntropyLoss(), sized).objective.num_batches == 25


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class _WithHelper(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(4, 5), nn.Linear(5, 3), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))


def test_compiled_code_outside_the_model_runs_eagerly_in_products():
    """A torch.compile'd function called in the forward, and a compiled loss: every product
    failed with torch's bare "does not currently support double backward" (a compiled module
    inside the model already ran eagerly). Now the same Hessian as the eager code's."""
    torch.manual_seed(0)
    eager = _WithHelper(_swish).to(DT)
    compiled = _WithHelper(torch.compile(_swish)).to(DT)
    compiled.load_state_dict(eager.state_dict())
    X, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    ref = cs.Curvature(eager, nn.CrossEntropyLoss(), (X, y))
    v = torch.randn(ref.num_params, dtype=DT, generator=torch.Generator().manual_seed(1))
    want = ref @ v
    got = cs.Curvature(compiled, nn.CrossEntropyLoss(), (X, y)) @ v
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    loss = torch.compile(nn.CrossEntropyLoss())
    assert torch.allclose(cs.Curvature(eager, loss, (X, y)) @ v, want, rtol=1e-12, atol=1e-14)
    assert cs.diagnose(eager, loss, (X, y), lr=0.1).state is not None


def test_numpy_targets_name_the_fix():
    """(X, y.numpy()) was refused with "(got Tensor)", which did not say the targets were a
    numpy array (an outside review)."""
    model = nn.Linear(4, 3).to(DT)
    X, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    with pytest.raises(TypeError, match=r"numpy array: .* torch\.as_tensor"):
        cs.Curvature(model, nn.CrossEntropyLoss(), (X, y.numpy()))


def test_tuple_targets_beside_dict_inputs_name_the_fix():
    """({'x': X}, (labels, weights)) was read as two batches, and the error spoke of a dict
    whose 'labels' is missing, not of the tuple of targets."""
    model = nn.Linear(4, 3).to(DT)
    X, y, w = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,)), torch.rand(8, dtype=DT)
    with pytest.raises(TypeError, match="targets are a tuple: the targets must be one tensor"):
        cs.Curvature(model, lambda o, t: o.sum(), ({"x": X}, (y, w)))
