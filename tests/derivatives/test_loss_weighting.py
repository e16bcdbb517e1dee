"""How a loss's batches make the loss over all the data, and the losses whose meaning a
product must not get wrong (an outside review of losses and data; each test fails on the code
before it: the numbers in the docstrings are what that code gave)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvscope as cs
from tests import cases

DT = torch.float64


def _split(case: cases.Case, at: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    X, y = case.data
    return [(X[:at], y[:at]), (X[at:], y[at:])]


def _applied(C: cs.Curvature, H: torch.Tensor) -> float:
    """The relative difference of C and a dense H on three random vectors."""
    V = torch.randn(C.num_params, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    return float((C @ V - H @ V).norm() / (H @ V).norm())


class PlainCE(nn.CrossEntropyLoss):
    """A subclass that keeps torch's forward: torch's mean, over the counted labels."""


@pytest.mark.parametrize(
    "options", [{"weight": torch.tensor([0.2, 1.0, 3.0], dtype=DT)}, {"ignore_index": 2}]
)
def test_a_cross_entropy_subclass_weighs_batches_by_its_counted_labels(options):
    """Weighed by rows, it was 42% (weight=) and 41% (ignore_index) off over two batches."""
    case = cases.mlp(n=10)
    case.loss_fn = nn.CrossEntropyLoss(**options)
    H = cases.dense_hessian(case)
    C = cs.Curvature(case.model, PlainCE(**options), _split(case, 4))
    assert _applied(C, H) < 1e-12


def test_probability_targets_of_sequences_weigh_batches_by_their_positions():
    """(N, C, T) class probabilities average over N·T positions, as class indices do: batches of
    3 and 6 positions weighed by rows were 40% off."""
    torch.manual_seed(0)
    model = nn.Conv1d(2, 3, 1).to(DT)
    X1, X2 = torch.randn(2, 2, 3, dtype=DT), torch.randn(2, 2, 6, dtype=DT)
    y1, y2 = torch.randint(0, 3, (2, 3)), torch.randint(0, 3, (2, 6))
    soft = [
        (X1, F.one_hot(y1, 3).movedim(-1, 1).to(DT)),
        (X2, F.one_hot(y2, 3).movedim(-1, 1).to(DT)),
    ]
    hard = [(X1, y1), (X2, y2)]
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    by_index = cs.Curvature(model, nn.CrossEntropyLoss(), hard)
    by_probability = cs.Curvature(model, nn.CrossEntropyLoss(), soft)
    assert torch.allclose(by_probability @ v, by_index @ v, rtol=1e-12, atol=1e-14)
    assert by_probability.loss_and_gradient()[0] == pytest.approx(
        float(by_index.loss_and_gradient()[0]), rel=1e-12
    )


def test_uint8_class_labels_count_their_class_weights():
    """torch indexes with a uint8 tensor as a mask: the counted weights came out 21% off."""
    case = cases.mlp(n=6)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=DT)
    case.loss_fn = nn.CrossEntropyLoss(weight=w)
    H = cases.dense_hessian(case)
    X, y = case.data
    data = [(X[:3], y[:3].to(torch.uint8)), (X[3:], y[3:].to(torch.uint8))]
    assert _applied(cs.Curvature(case.model, nn.CrossEntropyLoss(weight=w), data), H) < 1e-12


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda w: functools.partial(F.cross_entropy, weight=w), id="weighted-function"
        ),
        pytest.param(lambda w: lambda out, y: F.cross_entropy(out, y, weight=w), id="lambda"),
    ],
)
@pytest.mark.parametrize("reduction", [None, "mean"])
def test_a_function_whose_mean_is_not_over_rows_is_refused(make, reduction):
    """A weighted mean as a function, over two batches: 47% off, or — with the advice's
    reduction='mean' — silently row-weighted. Refused, naming the fixes."""
    case = cases.mlp(n=10)
    w = torch.tensor([0.2, 1.0, 3.0], dtype=DT)
    C = cs.Curvature(case.model, make(w), _split(case, 4), reduction=reduction)
    said = "not over the rows of a batch" if reduction else "neither the mean nor the sum"
    with pytest.raises(ValueError, match=f"{said}.*nn.CrossEntropyLoss"):
        C @ torch.ones(C.num_params, dtype=DT)


def test_a_token_mean_function_is_refused_where_a_later_batch_shows_it():
    """Batch 0's sequences hold as many tokens each (its rows agree); batch 1's do not: every
    batch is checked once, the first product refuses (it was 5.7% off)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4).to(DT)

    def token_mean(out, t):
        ce = F.cross_entropy(out.reshape(-1, 4), t.reshape(-1), reduction="none")
        mask = (t.reshape(-1) != 0).to(out.dtype)
        return (ce * mask).sum() / mask.sum()

    X = torch.randn(6, 5, 4, dtype=DT)
    Y = torch.tensor([[1, 2, 3, 0, 0], [2, 2, 1, 0, 0], [1, 1, 1, 1, 1], [3, 2, 1, 0, 0]] * 2)[:6]
    C = cs.Curvature(model, token_mean, [(X[:2], Y[:2]), (X[2:], Y[2:])])
    with pytest.raises(ValueError, match="on 4 rows of batch 1"):
        C @ torch.ones(C.num_params, dtype=DT)


def test_a_weighted_mean_over_one_batch_is_its_own_mean():
    """One batch needs no weighing: a weighted function over all the data is measured."""
    case = cases.mlp(n=10)
    w = torch.tensor([0.2, 1.0, 3.0], dtype=DT)
    case.loss_fn = nn.CrossEntropyLoss(weight=w)
    H = cases.dense_hessian(case)
    fn = functools.partial(F.cross_entropy, weight=w)
    assert _applied(cs.Curvature(case.model, fn, case.data, reduction="mean"), H) < 1e-12


@pytest.mark.parametrize("loss", [nn.MSELoss(), nn.SmoothL1Loss(), nn.BCEWithLogitsLoss()])
def test_means_over_rows_pass_the_check_and_match_the_reference(loss):
    case = cases.mlp_mse(n=10)
    if isinstance(loss, nn.BCEWithLogitsLoss):
        case.targets = (case.targets > 0).to(DT)
    case.loss_fn = loss
    H = cases.dense_hessian(case)
    fn = lambda out, y: loss(out, y)  # noqa: E731 (a function: its reduction inferred)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _applied(cs.Curvature(case.model, fn, _split(case, 3)), H) < 1e-12


def test_kl_divergence_batchmean_declares_a_mean():
    """It was read as undeclared, and a batch of one could not tell mean from sum."""
    case = cases.mlp(n=4)
    target = torch.softmax(torch.randn(4, 3, dtype=DT, generator=torch.Generator()), -1)
    model = nn.Sequential(case.model, nn.LogSoftmax(-1))
    loss = nn.KLDivLoss(reduction="batchmean")
    X = case.inputs
    C = cs.Curvature(model, loss, [(X[i : i + 1], target[i : i + 1]) for i in range(4)])
    whole = cs.Curvature(model, loss, (X, target))
    v = torch.randn(C.num_params, dtype=DT)
    assert torch.allclose(C @ v, whole @ v, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "options", [{}, {"weight": torch.tensor([0.2, 1.0, 3.0], dtype=DT)}, {"ignore_index": 2}]
)
def test_the_empirical_fisher_of_nll_is_cross_entropys(options):
    """Through the per-sample path the class weights cancelled (0.23x) and ignored rows counted
    (0.6x); nn.NLLLoss after log_softmax is now the same terms as cross-entropy on the logits."""
    case = cases.mlp(n=10)
    with_log_softmax = nn.Sequential(case.model, nn.LogSoftmax(-1))
    ce = cs.Curvature(
        case.model, nn.CrossEntropyLoss(**options), case.data, kind="empirical_fisher"
    )
    nll = cs.Curvature(with_log_softmax, nn.NLLLoss(**options), case.data, kind="empirical_fisher")
    v = torch.randn(ce.num_params, dtype=DT)
    assert torch.allclose(nll @ v, ce @ v, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", [nn.NLLLoss(), nn.L1Loss()], ids=["nll-after-log-softmax", "l1"])
def test_the_gauss_newton_of_a_loss_linear_in_the_outputs_is_refused(loss):
    """Its GGN is the zero matrix: λ_max 0 "converged", trace 0, without a word before."""
    case = cases.mlp(n=6)
    if isinstance(loss, nn.NLLLoss):
        model, targets = nn.Sequential(case.model, nn.LogSoftmax(-1)), case.targets
    else:
        model, targets = case.model, torch.randn(6, 3, dtype=DT)
    C = cs.Curvature(model, loss, (case.inputs, targets), kind="ggn")
    with pytest.raises(ValueError, match=r"Gauss-Newton matrix is 0: .*every batch.*CrossEntropy"):
        cs.eigenvalues(C, k=1)


def test_the_fisher_of_a_loss_after_the_models_own_sigmoid_names_the_logits_loss():
    """kind="fisher" with nn.BCELoss after a sigmoid was refused without the fix that nn.NLLLoss
    after log_softmax is given (an outside review); a GGN refused for nn.KLDivLoss on
    log-probabilities names cross-entropy's probability targets too."""
    case = cases.mlp(n=6)
    model = nn.Sequential(case.model, nn.Sigmoid())
    y = torch.rand(6, 3, dtype=DT)
    with pytest.raises(ValueError, match=r"nn.BCELoss after a sigmoid: nn.BCEWithLogitsLoss"):
        cs.Curvature(model, nn.BCELoss(), (case.inputs, y), kind="fisher")
    model = nn.Sequential(case.model, nn.LogSoftmax(-1))
    C = cs.Curvature(model, nn.KLDivLoss(reduction="batchmean"), (case.inputs, y), kind="ggn")
    with pytest.raises(ValueError, match=r"nn.KLDivLoss with its target distributions as"):
        C @ torch.ones(C.num_params, dtype=DT)


def test_forward_over_reverse_keeps_a_summed_mse():
    """Its written-out MSE took the mean of a summed loss: products 1/N of the Hessian."""
    case = cases.mlp_mse(n=10)
    ref = 20.0 * cases.dense_hessian(case)  # the sum over 10 × 2 outputs: 20 × the mean
    C = cs.Curvature(
        case.model, nn.MSELoss(reduction="sum"), case.data, backend="forward_over_reverse"
    )
    assert _applied(C, ref) < 1e-12


def test_targets_in_a_tuple_name_the_fix():
    case = cases.mlp(n=4)
    X, y = case.data
    C_args = (case.model, nn.CrossEntropyLoss(), (X, (y, y)))
    with pytest.raises(TypeError, match="targets are a tuple: the targets must be one tensor"):
        cs.Curvature(*C_args)


def test_a_loss_that_is_not_finite_names_its_batch():
    """The error did not say which batch of a loader held the NaN (an outside review)."""
    case = cases.mlp_mse(n=8)
    X, y = case.data
    # outputs of 1e200 on batch 1's finite inputs: their squares overflow
    C = cs.Curvature(nn.Linear(3, 2).to(DT), nn.MSELoss(), [(X[:4], y[:4]), (1e200 * X[4:], y[4:])])
    with pytest.raises(FloatingPointError, match="on batch 1 is inf"):
        C @ torch.ones(C.num_params, dtype=DT)


def test_the_gauss_newton_of_cross_entropy_over_7x7_positions_is_not_refused():
    """The check's direction was arange % 7: constant along the classes wherever the positions
    after them multiply to a multiple of 7, in cross-entropy's null space — a zero-initialised
    head over 7x7 positions was refused as linear (a review of the check)."""
    torch.manual_seed(0)
    model = nn.Conv2d(2, 3, 1).to(DT)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)  # uniform logits
    X, y = torch.randn(2, 2, 7, 7, dtype=DT), torch.randint(0, 3, (2, 7, 7))
    C = cs.Curvature(model, nn.CrossEntropyLoss(), (X, y), kind="ggn")
    assert float(C @ torch.ones(C.num_params, dtype=DT) @ torch.ones(C.num_params, dtype=DT)) > 0


@pytest.mark.parametrize(
    "loss",
    [
        lambda o, y: F.mse_loss(o.float(), y.float()),  # computed in float32 inside
        lambda o, y: F.cross_entropy(o @ o.T, torch.arange(len(o))),  # over the whole batch
    ],
    ids=["float32-inside", "contrastive"],
)
def test_means_the_rows_check_cannot_judge_are_not_refused(loss):
    """A loss computing in float32 was held to 1e-9 and refused (its two values printed alike);
    a contrastive loss is 0 on a row alone (a review of the check): not refused."""
    case = cases.mlp_mse(n=8)
    C = cs.Curvature(case.model, loss, _split(case, 4), reduction="mean")
    assert torch.isfinite(C @ torch.ones(C.num_params, dtype=DT)).all()


def test_a_function_ignoring_labels_with_reduction_mean_is_refused():
    """Rows whose labels the mean does not count are not finite alone (0/0): refused, where
    reduction='mean' was taken as a mean over rows."""
    case = cases.mlp(n=10)
    X, y = case.data
    y = y.clone()
    y[::3] = -100

    def fn(out, t):
        return F.cross_entropy(out, t, ignore_index=-100)

    C = cs.Curvature(case.model, fn, [(X[:5], y[:5]), (X[5:], y[5:])], reduction="mean")
    with pytest.raises(ValueError, match="on some of those rows alone a value that is not finite"):
        C @ torch.ones(C.num_params, dtype=DT)


@pytest.mark.parametrize(
    ("loss", "targets"),
    [
        (nn.MSELoss(), torch.randn),
        (nn.PoissonNLLLoss(), lambda *s, dtype: torch.randint(0, 4, s).to(dtype)),
        (nn.KLDivLoss(reduction="mean"), lambda *s, dtype: torch.rand(*s, dtype=dtype)),
        (nn.HingeEmbeddingLoss(), lambda *s, dtype: torch.randint(0, 2, s).to(dtype) * 2 - 1),
    ],
    ids=["mse", "poisson", "kl_mean", "hinge"],
)
def test_an_entrywise_mean_weighs_sequences_of_different_lengths_by_their_entries(loss, targets):
    """torch's entrywise means are over every entry: batches of 3 and 6 positions weighed by
    rows were off (nn.PoissonNLLLoss and nn.KLDivLoss(reduction="mean") still were, λ_max 7%
    and the curvature 19–23%: an outside review); now by their entries, as one batch of all
    the positions would be."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 1, 1), nn.Tanh()).to(DT)
    X1, X2 = torch.randn(2, 2, 3, dtype=DT), torch.randn(2, 2, 6, dtype=DT)
    y1, y2 = targets(2, 1, 3, dtype=DT), targets(2, 1, 6, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KLDivLoss's own warning about reduction="mean"
        C = cs.Curvature(model, loss, [(X1, y1), (X2, y2)])
        # the same positions as one batch: every position a sample of its own
        flat = nn.Sequential(nn.Linear(2, 1), nn.Tanh()).to(DT)
        with torch.no_grad():
            flat[0].weight.copy_(model[0].weight[:, :, 0])
            flat[0].bias.copy_(model[0].bias)
        Xs = torch.cat([X1.movedim(1, -1).reshape(-1, 2), X2.movedim(1, -1).reshape(-1, 2)])
        ys = torch.cat([y1.reshape(-1, 1), y2.reshape(-1, 1)])
        whole = cs.Curvature(flat, loss, (Xs, ys))
        v = torch.randn(C.num_params, dtype=DT, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(C @ v, whole @ v, rtol=1e-12, atol=1e-14)
        assert C.loss_and_gradient()[0] == pytest.approx(whole.loss_and_gradient()[0], rel=1e-12)


def _torch_losses() -> list[type]:
    import torch.nn.modules.loss as losses

    return [
        c
        for c in vars(losses).values()
        if isinstance(c, type)
        and issubclass(c, losses._Loss)
        and c.__module__ == losses.__name__
        and not c.__name__.startswith("_")
    ]


def test_every_torch_loss_is_known_to_average_over_entries_labels_or_rows():
    """A torch loss in none of the tuples was weighed by rows whatever its mean is over: the
    tuples hold every loss torch has, each in one (a new torch loss fails here, not silently)."""
    from curvscope.derivatives.objective import ENTRYWISE_MEANS, LABEL_MEANS, ROW_MEANS

    known = [ENTRYWISE_MEANS, LABEL_MEANS, ROW_MEANS]
    for cls in _torch_losses():
        held = [group for group in known if any(c is cls or issubclass(cls, c) for c in group)]
        assert len(held) == 1, f"{cls.__name__} is in {len(held)} of the three tuples"


def _means(cls: type, n: int = 4, t: int = 5, c: int = 3) -> tuple[nn.Module, tuple]:
    """A torch loss with a reduction of its own and arguments (N, T, C)-shaped where it takes
    them, (N, C) or (N,) where it takes only those."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, t, c, generator=g, dtype=DT)
    if cls in (nn.MultiMarginLoss,):
        return cls(), (x[:, 0], torch.randint(0, c, (n,), generator=g))
    if cls in (nn.MultiLabelMarginLoss,):
        return cls(), (x[:, 0], torch.tensor([[0, -1, 0]] * n))
    if cls in (nn.MultiLabelSoftMarginLoss,):
        return cls(), (x[:, 0], torch.randint(0, 2, (n, c), generator=g).to(DT))
    if cls in (nn.CosineEmbeddingLoss, nn.MarginRankingLoss):
        y = torch.randint(0, 2, (n,), generator=g).to(DT) * 2 - 1
        a = x[:, 0] if cls is nn.CosineEmbeddingLoss else x[:, 0, 0]
        return cls(), (a, a.flip(0), y)
    if cls in (nn.TripletMarginLoss, nn.TripletMarginWithDistanceLoss):
        return cls(), (x[:, 0], x[:, 1], x[:, 2])
    if cls is nn.CTCLoss:
        lp = torch.randn(t, n, c, generator=g, dtype=DT).log_softmax(-1)
        lengths = torch.tensor([5, 4, 3, 2])
        return cls(), (lp, torch.ones(n, 2, dtype=torch.long), lengths, lengths.clamp(max=2))
    if cls is nn.GaussianNLLLoss:
        return cls(), (x, x.flip(0), x.exp())
    if cls is nn.HingeEmbeddingLoss:
        return cls(), (x, torch.randint(0, 2, x.shape, generator=g).to(DT) * 2 - 1)
    if cls is nn.KLDivLoss:
        return cls(reduction="mean"), (x, torch.rand(x.shape, generator=g, dtype=DT))
    if cls in (nn.BCELoss,):
        return cls(), (x.sigmoid(), torch.rand(x.shape, generator=g, dtype=DT))
    if cls.__name__ == "LinearCrossEntropyLoss":
        loss = cls(c, c, weight=torch.tensor([0.5, 1.0, 2.0], dtype=DT)).to(DT)
        y = torch.randint(0, c, (n * t,), generator=g)
        y[::3] = -100
        return loss, (x.reshape(n * t, c), y)
    if issubclass(cls, nn.NLLLoss | nn.CrossEntropyLoss):
        loss = cls(weight=torch.tensor([0.5, 1.0, 2.0], dtype=DT), ignore_index=1)
        return loss, (x.movedim(-1, 1), torch.randint(0, c, (n, t), generator=g))
    return cls(), (x, torch.rand(x.shape, generator=g, dtype=DT))


@pytest.mark.parametrize("cls", _torch_losses(), ids=lambda c: c.__name__)
def test_each_torch_loss_averages_over_what_its_tuple_says(cls):
    """The tuples read against torch itself: an entrywise mean is its unreduced terms' sum over
    the targets' entries, a label mean over the counted labels, a row mean over the rows."""
    from curvscope.derivatives.objective import LABEL_MEANS, ROW_MEANS, mean_count

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLLLoss2d's deprecation, KLDivLoss's "mean"
        loss, args = _means(cls)
        mean = loss(*args).detach()
        loss.reduction = "none"
        terms = loss(*args).detach().sum()
        loss.reduction = "mean"
    if issubclass(cls, ROW_MEANS):
        rows = args[0].shape[1] if cls is nn.CTCLoss else args[0].shape[0]
        assert mean_count(loss, args[-1]) is None  # weighed by its rows
        if cls is nn.CTCLoss:  # each row's term divided by its target length first
            return
        assert float(mean) == pytest.approx(float(terms) / rows, rel=1e-12)
        return
    count = mean_count(loss, args[1])
    assert count is not None
    if issubclass(cls, LABEL_MEANS):
        assert count != args[1].numel()  # ignored labels and class weights counted
    assert float(mean) == pytest.approx(float(terms) / count, rel=1e-12)


@pytest.mark.parametrize(
    ("loss", "saturate"),
    [
        (nn.HuberLoss(delta=1.0), lambda y: y + 100.0),  # residuals past delta: H_out 0
        (nn.BCEWithLogitsLoss(), None),  # logits of 1e3: sigmoid saturated, H_out 0
    ],
    ids=["huber", "bce"],
)
def test_a_first_batch_whose_gauss_newton_is_zero_does_not_refuse_the_data(loss, saturate):
    """The check judged the data by its first batch: batch 0 of saturated outputs refused a
    GGN of norm 1.31 (Huber) or 0.33 (BCE), and a shuffled loader refused by its seed (a
    review). Refused only where no batch curves; the product is the one-batch GGN."""
    case = cases.mlp_mse(n=8)
    X, y = case.data
    if saturate is None:
        targets = (y > 0).to(DT)
        X0 = 1e3 * torch.ones_like(X[:4])  # every output of batch 0 huge
    else:
        targets, X0 = y.clone(), X[:4]
        targets[:4] = saturate(y[:4])
    data = [(X0, targets[:4]), (X[4:], targets[4:])]
    model = nn.Linear(3, 2).to(DT)
    C = cs.Curvature(model, loss, data, kind="ggn")
    v = torch.randn(C.num_params, dtype=DT, generator=torch.Generator().manual_seed(0))
    whole = cs.Curvature(model, loss, (torch.cat([X0, X[4:]]), targets), kind="ggn")
    assert float((C @ v).norm()) > 0
    assert torch.allclose(C @ v, whole @ v, rtol=1e-12, atol=1e-14)


def test_a_loss_computed_in_float32_from_float64_outputs_is_judged_at_float32():
    """F.cross_entropy(logits.float(), y) on a float64 model: its reduction was inferred at
    1e-9 and refused as "neither the mean nor the sum" (an outside review); the rows check
    holds it to float32's rounding too."""
    torch.manual_seed(0)  # the review's case
    X, y = torch.randn(64, 5), torch.randint(0, 4, (64,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))

    def fn(out, t):
        return F.cross_entropy(out.float(), t)

    for data in ((X, y), [(X[:16], y[:16]), (X[16:], y[16:])]):
        C = cs.Curvature(model, fn, data)
        loss = C.loss_and_gradient()[0]
        assert loss == pytest.approx(F.cross_entropy(model(X), y).item(), rel=1e-5)


def test_a_zero_initialised_segmentation_head_as_a_function_is_not_called_ignoring_its_rows():
    """The halves test's shift was arange % 7 / 8: over 7x7 positions constant along the
    classes, which a softmax ignores — `lambda o, y: F.cross_entropy(o, y)` on a zero head was
    refused as not reading its rows (an outside review); a seeded random shift now."""
    model = nn.Conv2d(2, 3, 1).to(DT)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    g = torch.Generator().manual_seed(0)
    X, y = (
        torch.randn(4, 2, 7, 7, dtype=DT, generator=g),
        torch.randint(0, 3, (4, 7, 7), generator=g),
    )
    C = cs.Curvature(model, lambda o, t: F.cross_entropy(o, t), (X, y))
    assert torch.isfinite(C @ torch.ones(C.num_params, dtype=DT)).all()


def test_labels_of_minus_one_in_one_batch_are_not_refused_as_ignored():
    """Labels {-1, 0, 1} shifted inside the loss were refused as an ignore_index even in one
    batch, where no weighing of batches is needed (an outside review)."""
    case = cases.mlp(n=9)
    y = torch.tensor([-1, 0, 1] * 3)

    def shifted(out, t):
        return F.cross_entropy(out, t + 1)

    C = cs.Curvature(case.model, shifted, (case.inputs, y))
    assert torch.isfinite(C @ torch.ones(C.num_params, dtype=DT)).all()


def test_a_loss_that_takes_only_tensors_on_a_model_output_names_the_fix():
    """An outside review: nn.CrossEntropyLoss on a Hugging Face TokenClassifierOutput raised
    torch's bare "must be Tensor, not TokenClassifierOutput" at the first product."""

    class Output(dict):
        @property
        def logits(self):
            return self["logits"]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2).to(DT)

        def forward(self, x):
            return Output(logits=self.lin(x))

    X, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 0, 1])
    with pytest.raises(TypeError, match=r"failed on the model's Output: .* \(its \.logits, say\)"):
        cs.Curvature(Model(), nn.CrossEntropyLoss(), (X, y)) @ torch.ones(8, dtype=DT)
    wrapped = lambda out, t: F.cross_entropy(out.logits, t)  # noqa: E731 - the fix it names
    C = cs.Curvature(Model(), wrapped, (X, y))
    assert torch.isfinite(C @ torch.ones(8, dtype=DT)).all()


def test_a_loaders_batch_with_no_counted_label_names_how_to_leave_it_out():
    """A review: from a loader the advice was "drop the batch", which a user cannot do to a
    batch a loader draws; the fixes a loader has are named (and "drop the batch" for a list)."""
    X = torch.randn(5, 3, dtype=DT)
    y = torch.tensor([0, 1, 0, 1, -100])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=2)
    model = nn.Linear(3, 2).to(DT)
    with pytest.raises(ValueError, match=r"batch 2 has no label .* drop_last=True .* seed="):
        cs.Curvature(model, nn.CrossEntropyLoss(), loader)
    with pytest.raises(ValueError, match=r"0/0; drop the batch$"):
        cs.Curvature(model, nn.CrossEntropyLoss(), list(loader))
