"""The chance loss (the best prediction that ignores the inputs) against that prediction fitted
by L-BFGS in float64, and a diagnosis that says when a minimum sits at it."""

import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvscope as cs
from curvscope.diagnosis.chance import chance_loss
from curvscope.diagnosis.classify import Thresholds, at_chance

DT = torch.float64


class Constant(nn.Module):
    """A prediction that ignores the inputs: one learnt value per output entry."""

    def __init__(self, shape: tuple[int, ...], out: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.zeros(shape, dtype=DT))
        self.out = shape if out is None else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], *self.out)


def fitted(model: nn.Module, loss_fn: nn.Module, data) -> float:
    """The loss of ``model`` fitted over every batch of ``data`` by L-BFGS (float64)."""
    batches = list(data) if not isinstance(data, tuple) else [data]
    opt = torch.optim.LBFGS(
        model.parameters(),
        max_iter=200,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def total() -> torch.Tensor:
        opt.zero_grad()
        if loss_fn.reduction == "sum":
            loss = sum(loss_fn(model(x), t) for x, t in batches)
        else:  # the mean over all of it: what each batch's mean is over, as curvscope weighs
            sizes = [float(_size(loss_fn, t)) for _, t in batches]
            loss = sum(
                s * loss_fn(model(x), t) for s, (x, t) in zip(sizes, batches, strict=True)
            ) / sum(sizes)
        loss.backward()
        return loss

    opt.step(total)
    return float(total().detach())


def _size(loss_fn: nn.Module, t: torch.Tensor) -> float:
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        kept = t != loss_fn.ignore_index
        w = loss_fn.weight
        return float(kept.sum()) if w is None else float(w[t[kept]].sum())
    return float(t.numel())


def chance(model: nn.Module, loss_fn: nn.Module, data) -> float | None:
    return chance_loss(cs.Curvature(model, loss_fn, data).objective)


def _labels(n: int, classes: int, seed: int, *extra: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05][:classes])
    return torch.multinomial(
        p / p.sum(), n * math.prod(extra), replacement=True, generator=g
    ).reshape(n, *extra)


class LogSoftmaxConstant(Constant):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(super().forward(x), dim=1)


CLASS_CASES = {
    "cross-entropy": (lambda: nn.CrossEntropyLoss(), (5,), ()),
    "summed": (lambda: nn.CrossEntropyLoss(reduction="sum"), (5,), ()),
    "class weights": (
        lambda: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3, 0.5, 2, 1], dtype=DT)),
        (5,),
        (),
    ),
    "ignore_index": (lambda: nn.CrossEntropyLoss(ignore_index=-1), (5,), ()),
    # a constant per position ignores the inputs too: (N, C, 7) logits, one set a position
    "sequences": (lambda: nn.CrossEntropyLoss(), (5, 7), (7,)),
}


@pytest.mark.parametrize("name", list(CLASS_CASES))
def test_class_labels_chance_is_the_fitted_constant_prediction(name):
    make, shape, extra = CLASS_CASES[name]
    loss_fn = make()
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(n, 2, generator=g, dtype=DT), _labels(n, 5, n, *extra)) for n in (40, 17, 9)
    ]
    for _, t in batches:  # padding: labels every loss here leaves out (-1 for ignore_index=-1)
        t.view(-1)[::4] = getattr(loss_fn, "ignore_index", -100)
    out = (5, *extra)
    model = Constant(shape, out)
    value = chance(model, loss_fn, batches)
    assert value is not None
    best = fitted(Constant(shape, out), loss_fn, batches)
    assert value == pytest.approx(best, rel=1e-10)
    assert not model.value.detach().any()  # the model is not touched


def _entropy(y: torch.Tensor) -> float:
    p = torch.bincount(y.reshape(-1)).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def test_frequencies_the_probe_cannot_pin_down_fall_back_to_pooled_then_none():
    """A table of label frequencies per position fitted to 4 sequences has at most ln 4 nats
    whatever the vocabulary: a trained token model 53% right (5% by chance) read "at chance"
    beside it, 1.44 against 1.27 (an outside review). Per position only where the labels pin
    the frequencies down; else pooled over the positions; else none."""
    g = torch.Generator().manual_seed(0)
    ce = nn.CrossEntropyLoss()

    def value(y: torch.Tensor, classes: int) -> float | None:
        n, t = y.shape
        return chance(Constant((classes, t), (classes, t)), ce, (torch.zeros(n, 1, dtype=DT), y))

    few = torch.randint(20, (4, 64), generator=g)
    assert value(few, 20) == pytest.approx(_entropy(few), rel=1e-12)  # not the ≤ ln 4
    many = torch.randint(4, (2000, 2), generator=g)
    many[:, 0] = 0  # 2000 rows a position pin them down: each position's own frequencies
    assert value(many, 4) == pytest.approx(_entropy(many[:, 1]) / 2, rel=1e-12)
    assert value(torch.randint(50, (2, 2), generator=g), 50) is None  # 4 labels, 50 classes


def test_tensor_parallel_ranks_count_a_summed_loss_once():
    """Ranks that pass the same batches (tensor parallelism) sum each count ``replicas`` times,
    as the operator's own sample count does: a summed chance loss divides by it (it was 2x)."""
    y = _labels(30, 4, 2)
    C = cs.Curvature(
        Constant((4,)), nn.CrossEntropyLoss(reduction="sum"), (torch.zeros(30, 1, dtype=DT), y)
    )
    once = chance_loss(C.objective)
    assert once is not None and chance_loss(C.objective, replicas=2) == pytest.approx(once / 2)


def test_nll_of_log_probabilities_is_the_entropy_of_the_label_frequencies():
    y = _labels(60, 4, 0)
    x = torch.zeros(60, 1, dtype=DT)
    value = chance(LogSoftmaxConstant((4,)), nn.NLLLoss(), (x, y))
    p = torch.bincount(y).to(DT) / 60
    assert value == pytest.approx(float(-(p * p.log()).sum()), rel=1e-12)
    assert value == pytest.approx(fitted(LogSoftmaxConstant((4,)), nn.NLLLoss(), (x, y)), rel=1e-9)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_squared_error_chance_is_the_targets_variance_over_a_shuffled_loader(reduction):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 3, dtype=DT, generator=g)
    # far from zero: a one-pass sum of squares would lose digits here
    y = 1e6 + torch.randn(50, 2, 3, dtype=DT, generator=g) * torch.tensor([1.0, 5.0, 0.1], dtype=DT)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    loss_fn = nn.MSELoss(reduction=reduction)
    value = chance(Constant((2, 3)), loss_fn, loader)
    expected = float(y.var(0, unbiased=False).mean()) * (y.numel() if reduction == "sum" else 1)
    assert value == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(
    "loss_fn", [nn.BCEWithLogitsLoss(), nn.BCELoss()], ids=["logits", "probabilities"]
)
def test_binary_chance_is_the_fitted_constant_prediction(loss_fn):
    g = torch.Generator().manual_seed(5)
    y = (torch.rand(80, 3, generator=g, dtype=DT) < torch.tensor([0.1, 0.5, 0.8], dtype=DT)).to(DT)
    y[:, 0] = 0.0  # a coordinate that is always 0: nothing to learn there, a chance loss of 0
    x = torch.zeros(80, 1, dtype=DT)

    class Sigmoid(Constant):
        def forward(self, x):
            return torch.sigmoid(super().forward(x))

    make = Constant if isinstance(loss_fn, nn.BCEWithLogitsLoss) else Sigmoid
    value = chance(make((3,)), loss_fn, (x, y))
    assert value == pytest.approx(fitted(make((3,)), loss_fn, (x, y)), rel=1e-6, abs=1e-9)


class Scaled(nn.Module):
    """A model whose output has the inputs' shape."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones((), dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x


def _squared(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((out - t) ** 2).mean()


G = torch.Generator().manual_seed(6)
BITS = (torch.rand(6, 3, dtype=DT, generator=G).round(),) * 2
NO_CLOSED_FORM = {
    "label smoothing": (
        nn.CrossEntropyLoss(label_smoothing=0.1),
        (torch.zeros(6, 3, dtype=DT), torch.arange(6) % 3),
    ),
    "pos_weight": (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3, dtype=DT)), BITS),
    "l1": (nn.L1Loss(), BITS),
    "a function": (_squared, BITS),
    "soft labels": (
        nn.CrossEntropyLoss(),
        (torch.zeros(6, 3, dtype=DT), torch.softmax(torch.randn(6, 3, dtype=DT, generator=G), 1)),
    ),
    "soft binary targets": (
        nn.BCEWithLogitsLoss(),
        (torch.zeros(6, 3, dtype=DT), 0.46 + 0.08 * torch.rand(6, 3, dtype=DT, generator=G)),
    ),
    "lengths": (
        nn.MSELoss(),
        [
            (torch.zeros(6, 4, dtype=DT), torch.randn(6, 4, dtype=DT, generator=G)),
            (torch.zeros(3, 5, dtype=DT), torch.randn(3, 5, dtype=DT, generator=G)),
        ],
    ),
}


@pytest.mark.parametrize("name", list(NO_CLOSED_FORM))
def test_no_closed_form_is_none(name):
    loss_fn, data = NO_CLOSED_FORM[name]
    assert chance(Scaled(), loss_fn, data) is None


def test_at_chance_is_relative_and_reads_the_thresholds_share():
    share = Thresholds.chance
    assert at_chance({"loss": 2.30, "chance_loss": 2.30})
    assert at_chance({"loss": 2.30 * (1 - share) + 1e-9, "chance_loss": 2.30})
    assert at_chance({"loss": 5.0, "chance_loss": 2.30})  # worse than the prior
    assert not at_chance({"loss": 2.20, "chance_loss": 2.30})
    assert at_chance({"loss": 1e-4, "chance_loss": 1e-4})  # daily returns: any units
    assert not at_chance({"loss": 0.0, "chance_loss": 0.0})  # targets that never vary
    assert not at_chance({"loss": 2.30}) and not at_chance({"loss": math.nan, "chance_loss": 2.3})
    wider = {"loss": 2.20, "chance_loss": 2.30, "thresholds": {"chance": 0.05}}
    assert at_chance(wider)
    with pytest.raises(ValueError, match=r"Thresholds\.chance is a share"):
        Thresholds(chance=1.5)


def _digits(n: int = 400):
    X, y = load_digits(return_X_y=True)
    return torch.tensor(X[:n] / 16.0, dtype=torch.float32), torch.tensor(y[:n])


def test_a_deep_sigmoid_network_stuck_at_chance_is_no_fit():
    """A 10-layer sigmoid MLP on digits, trained 150 steps: its gradients vanish, the loss stays
    at the label frequencies' entropy, and by the curvature alone it is a minimum ("stop")."""
    X, y = _digits()
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(10):
        layers += [nn.Linear(64 if i == 0 else 32, 32), nn.Sigmoid()]
    net = nn.Sequential(*layers, nn.Linear(32, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(X), y).backward()
        opt.step()
    d = cs.diagnose(net, nn.CrossEntropyLoss(), (X, y), optimizer=opt)
    p = torch.bincount(y).double() / len(y)
    assert d.evidence.chance_loss == pytest.approx(float(-(p * p.log()).sum()), rel=1e-9)
    assert d.state in ("minimum", "flat")
    assert "predicts next to nothing from its inputs" in str(d)
    assert "vanishing gradients" in d.advice[0] and "stop" not in " ".join(d.advice)
    # on 64 samples the output bias can still fit their label frequencies: a gradient that is
    # not small, *learning* — and at chance all the same, said (it was not: a review)
    small = cs.diagnose(net, nn.CrossEntropyLoss(), (X[-64:], y[-64:]), optimizer=opt)
    assert small.state == "learning" and "nothing learnt from the inputs yet" in str(small)


def test_a_trained_network_at_its_minimum_is_not_at_chance():
    X, y = _digits(100)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    X = X.double()
    opt = torch.optim.LBFGS(net.parameters(), max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(X), y) + 1e-2 * sum(
            (p**2).sum() for p in net.parameters()
        )
        loss.backward()
        return loss

    opt.step(closure)
    d = cs.diagnose(net, nn.CrossEntropyLoss(), (X, y), lr=0.1)
    assert d.evidence.chance_loss > 2.0 > d.evidence.loss
    assert "from its inputs" not in str(d)


def test_a_constant_prediction_at_its_minimum_says_so_and_the_model_is_left_as_found():
    y = _labels(90, 5, 1)
    x = torch.zeros(90, 2, dtype=DT)
    model = Constant((5,))
    fitted(model, nn.CrossEntropyLoss(), (x, y))
    model.value.grad = None
    before = model.value.detach().clone()
    d = cs.diagnose(model, nn.CrossEntropyLoss(), (x, y), lr=1.0)
    assert d.state == "minimum" and "predicts next to nothing" in str(d)
    assert torch.equal(model.value.detach(), before) and model.value.grad is None
