"""The Fisher and the empirical Fisher term by term: against dense float64 references built from
per-term gradients, their summed-loss scale, the terms a loss skips (``ignore_index``), and the
Monte-Carlo identity E_{y~model}[empirical Fisher] = Fisher = GGN that fixes their convention."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacfwd, jacrev

import curvscope as cs
from tests import cases

DT = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-11}
N, C, S = 4, 3, 3  # samples, outputs (classes), positions per sample


class Seq(nn.Module):
    """Per-position logits (N, C, S) from inputs (N, 2, S): a sequence or dense-prediction head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(2, 3, 1)
        self.b = nn.Conv1d(3, C, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, C))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(build, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().to(DT)


def _labels(n_shape: tuple[int, ...], g: torch.Generator, ignore: int | None = None) -> Tensor:
    y = torch.randint(0, C, n_shape, generator=g)
    if ignore is not None:  # a fixed pattern of skipped positions, at least one per sample
        y[:, 0] = ignore
        y[0, -1] = ignore
    return y


def make(name: str, reduction: str = "mean"):
    """(model, loss_fn, inputs, targets) for one of the losses the likelihoods cover."""
    g = _gen(sum(map(ord, name)))
    seq = name.startswith("ce-seq")
    model = _model(Seq if seq else _mlp, seed=len(name))
    x = torch.randn((N, 2, S) if seq else (N, 2), generator=g, dtype=DT)
    w = torch.rand(C, generator=g, dtype=DT) + 0.5
    kw = {"reduction": reduction}
    if name == "mse":
        loss, y = nn.MSELoss(**kw), torch.randn(N, C, generator=g, dtype=DT)
    elif name.startswith("bce"):
        extra = {"bce-pos-weight": {"pos_weight": w}, "bce-weight": {"weight": w}}.get(name, {})
        loss = nn.BCEWithLogitsLoss(**kw, **extra)
        y = torch.bernoulli(torch.full((N, C), 0.4, dtype=DT), generator=g)
    elif name == "ce":
        loss, y = nn.CrossEntropyLoss(**kw), _labels((N,), g)
    elif name == "ce-seq-ignore":
        loss, y = nn.CrossEntropyLoss(ignore_index=-1, **kw), _labels((N, S), g, ignore=-1)
    elif name == "ce-seq-probs":
        loss = nn.CrossEntropyLoss(**kw)
        y = torch.softmax(torch.randn(N, C, S, generator=g, dtype=DT), dim=1)
    elif name == "ce-seq-weight-smoothing":
        loss = nn.CrossEntropyLoss(weight=w, label_smoothing=0.1, **kw)
        y = _labels((N, S), g, ignore=-100)
    else:
        raise AssertionError(name)
    return model, loss, x, y


NAMES = [
    "mse",
    "bce",
    "bce-pos-weight",
    "bce-weight",
    "ce",
    "ce-seq-ignore",
    "ce-seq-probs",
    "ce-seq-weight-smoothing",
]


# ------------------------------------------------------------------------- references
def _flat(model: nn.Module):
    ref = copy.deepcopy(model)
    names = [k for k, _ in ref.named_parameters()]
    shapes = [p.shape for _, p in ref.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])

    def outputs(theta: Tensor, x: Tensor) -> Tensor:
        parts = torch.split(theta, [math.prod(s) for s in shapes])
        params = {k: t.reshape(s) for k, t, s in zip(names, parts, shapes, strict=True)}
        return functional_call(ref, params, (x,))

    return outputs, theta0


def _with_reduction(loss_fn: nn.Module, reduction: str) -> nn.Module:
    other = copy.copy(loss_fn)
    other.reduction = reduction
    return other


def per_term_ef(model, loss_fn, x, y) -> Tensor:
    """(1/T) Jᵀ J, J the Jacobian (jacrev) of the terms ``reduction="none"`` returns and T what
    the loss divides their sum by (measured as sum/mean of the loss itself; 1 when summed)."""
    outputs, theta0 = _flat(model)
    none = _with_reduction(loss_fn, "none")
    J = jacrev(lambda t: none(outputs(t, x), y).reshape(-1))(theta0)
    if loss_fn.reduction == "sum":
        return J.T @ J
    out = outputs(theta0, x).detach()
    divisor = _with_reduction(loss_fn, "sum")(out, y) / _with_reduction(loss_fn, "mean")(out, y)
    return J.T @ J / divisor


def dense_ggn(model, loss_fn, x, y) -> Tensor:
    """Jᵀ H_out J: J by jacrev, H_out by jacfwd(grad) of the loss in the outputs."""
    outputs, theta0 = _flat(model)
    out = outputs(theta0, x).detach()
    J = jacrev(lambda t: outputs(t, x).reshape(-1))(theta0)
    if isinstance(loss_fn, nn.MSELoss):  # written out: torch's own fails under jacfwd(grad)
        red = loss_fn.reduction

        def loss_fn(o, t):
            return ((o - t) ** 2).sum() if red == "sum" else ((o - t) ** 2).mean()

    h = jacfwd(torch.func.grad(lambda o: loss_fn(o.reshape(out.shape), y)))(out.reshape(-1))
    return J.T @ h @ J


def dense(model, loss_fn, data, kind: str, **kw) -> Tensor:
    return cs.Curvature(model, loss_fn, data, kind=kind, **kw).to_dense()


def probe(model, loss_fn, data, kind: str, **kw) -> Tensor:
    """M V for five fixed random vectors V: the Monte-Carlo tests compare many estimates, each
    cheaper as a block of five products than as a dense matrix."""
    M = cs.Curvature(model, loss_fn, data, kind=kind, **kw)
    return M @ _probes(M.num_params)


def _probes(n: int) -> Tensor:
    return torch.randn(n, 5, generator=_gen(99), dtype=DT)


# ------------------------------------------------------------------- empirical Fisher
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", NAMES)
def test_empirical_fisher_is_the_mean_of_per_term_outer_products(name, reduction):
    model, loss_fn, x, y = make(name, reduction)
    E = dense(model, loss_fn, (x, y), "empirical_fisher")
    torch.testing.assert_close(E, per_term_ef(model, loss_fn, x, y), **TOL)


def test_empirical_fisher_of_mse_is_not_c_times_smaller_than_the_per_term_one():
    """Regression (issue 11.4): the per-sample decomposition gave (1/N) Σ_i ∇ℓ_i∇ℓ_iᵀ with
    ℓ_i the mean over C outputs; with one output per term the trace is Σ_t ‖∇ℓ_t‖²/T."""
    model, loss_fn, x, y = make("mse")
    outputs, theta0 = _flat(model)
    E = dense(model, loss_fn, (x, y), "empirical_fisher")
    per_entry = jacrev(lambda t: ((outputs(t, x) - y) ** 2).reshape(-1))(theta0)
    torch.testing.assert_close(E.trace(), per_entry.pow(2).sum() / (N * C), **TOL)


ELEMENTWISE = {
    "bce-after-sigmoid": (nn.BCELoss, nn.Sigmoid(), "probs"),
    "poisson": (nn.PoissonNLLLoss, nn.Identity(), "counts"),
    "l1": (nn.L1Loss, nn.Identity(), "real"),
    "huber": (lambda **kw: nn.HuberLoss(delta=0.3, **kw), nn.Identity(), "real"),
    "smooth-l1": (nn.SmoothL1Loss, nn.Identity(), "real"),
    "soft-margin": (nn.SoftMarginLoss, nn.Identity(), "signs"),
    "hinge-embedding": (nn.HingeEmbeddingLoss, nn.Identity(), "signs"),
    "kl": (nn.KLDivLoss, nn.LogSoftmax(-1), "dist"),
}


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss")  # (KLDivLoss's)
@pytest.mark.parametrize(
    ("name", "reduction"),
    [(n, r) for n in ELEMENTWISE for r in ("mean", "sum")] + [("kl", "batchmean")],
)
def test_empirical_fisher_of_an_elementwise_torch_loss_has_a_term_per_entry(name, reduction):
    """torch's elementwise losses other than MSE and BCE-with-logits went through the per-sample
    path, a sample's C entries one term: nn.BCELoss after a sigmoid had 0.33x the empirical
    Fisher of nn.BCEWithLogitsLoss on the same model (and nn.PoissonNLLLoss of 3 outputs 0.33x
    the GGN in expectation: an outside review). Each entry is a term, as ``reduction="none"``
    returns them, T their number (the rows for KLDivLoss's "batchmean"), 1 when summed."""
    make_loss, head, targets = ELEMENTWISE[name]
    g = _gen(7)
    model = _model(lambda: nn.Sequential(_mlp(), head), seed=3)
    x = torch.randn(N, 2, generator=g, dtype=DT)
    y = {
        "probs": torch.rand(N, C, generator=g, dtype=DT),
        "counts": torch.poisson(torch.full((N, C), 2.0, dtype=DT), generator=g),
        "real": torch.randn(N, C, generator=g, dtype=DT),
        "signs": torch.randint(0, 2, (N, C), generator=g).to(DT) * 2 - 1,
        "dist": torch.softmax(torch.randn(N, C, generator=g, dtype=DT), -1),
    }[targets]
    loss_fn = make_loss(reduction=reduction)
    outputs, theta0 = _flat(model)
    none = _with_reduction(loss_fn, "none")
    J = jacrev(lambda t: none(outputs(t, x), y).reshape(-1))(theta0)
    T = {"mean": N * C, "batchmean": N, "sum": 1}[reduction]
    E = dense(model, loss_fn, (x, y), "empirical_fisher")
    torch.testing.assert_close(E, J.T @ J / T, **TOL)
    two = [(x[:3], y[:3]), (x[3:], y[3:])]  # over batches, weighed as the loss averages
    if reduction != "batchmean":  # (KLDivLoss's batchmean is a mean over rows: alike)
        torch.testing.assert_close(dense(model, loss_fn, two, "empirical_fisher"), E, **TOL)


def test_a_loss_that_takes_a_third_argument_is_refused_naming_the_wrapper():
    """nn.GaussianNLLLoss passed as loss_fn failed at the first product with torch's bare
    "forward() missing 1 required positional argument: 'var'" (an outside review)."""
    model, _, x, y = make("mse")
    with pytest.raises(TypeError, match=r"third argument.*wrap it in a function"):
        cs.Curvature(model, nn.GaussianNLLLoss(), (x, y))


def test_empirical_fisher_of_a_custom_loss_is_per_sample():
    """A loss whose likelihood is unknown keeps (1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ, ℓ_i the loss of sample i
    alone; Σ_i when the loss sums."""
    model, _, x, y = make("mse")
    outputs, theta0 = _flat(model)
    J = jacrev(lambda t: (outputs(t, x) - y).abs().pow(3).mean(dim=1))(theta0)

    def mean_loss(o, t):
        return (o - t).abs().pow(3).mean()

    def sum_loss(o, t):
        return (o - t).abs().pow(3).mean(dim=1).sum()

    E = dense(model, mean_loss, (x, y), "empirical_fisher", reduction="mean")
    torch.testing.assert_close(E, J.T @ J / N, **TOL)
    E = dense(model, sum_loss, (x, y), "empirical_fisher", reduction="sum")
    torch.testing.assert_close(E, J.T @ J, **TOL)


# ----------------------------------------------------------------------- summed losses
@pytest.mark.parametrize("name", ["mse", "bce", "ce-seq-ignore"])
@pytest.mark.parametrize("kind", ["fisher", "empirical_fisher"])
def test_a_summed_loss_gives_T_times_the_mean_for_one_batch(name, kind):
    """T: the number of likelihood terms the mean divides by (N·C entries for MSE and BCE, the
    positions not ignored for cross-entropy)."""
    model, loss_mean, x, y = make(name, "mean")
    loss_sum = _with_reduction(loss_mean, "sum")
    T = int((y != -1).sum()) if name.startswith("ce") else y.numel()
    M = dense(model, loss_mean, (x, y), kind, seed=5, mc_samples=3)
    Sm = dense(model, loss_sum, (x, y), kind, seed=5, mc_samples=3)
    torch.testing.assert_close(Sm, T * M, rtol=1e-10, atol=1e-12)
    out = model(x)
    torch.testing.assert_close(loss_sum(out, y), T * loss_mean(out, y))  # the premise


# ---------------------------------------------------------- the Monte-Carlo identities
def _model_labels(name: str, out: Tensor, g: torch.Generator) -> Tensor:
    """Labels drawn from the model's predictive distribution at ``out``."""
    if name == "mse":  # (out − y)² = −log N(y; out, ½) + const
        return out + torch.randn(out.shape, generator=g, dtype=DT) / math.sqrt(2.0)
    if name == "bce":
        return torch.bernoulli(out.sigmoid(), generator=g)
    p = out.softmax(1).movedim(1, -1).reshape(-1, C)
    return torch.multinomial(p, 1, generator=g).reshape(out.shape[0], *out.shape[2:])


def _mc_check(estimates: Tensor, target: Tensor, wrong: Tensor) -> None:
    """The mean of independent estimates equals ``target`` within 4 standard errors (in the
    Frobenius norm: E‖mean − target‖² = Σ var/G), and is far from ``wrong`` (power)."""
    mean = estimates.mean(0)
    stderr = (estimates.var(0).sum() / len(estimates)).sqrt()
    err = (mean - target).norm()
    assert err < 4 * stderr, f"|mean - target| = {err:.3g}, 4 standard errors = {4 * stderr:.3g}"
    assert (mean - wrong).norm() > 8 * stderr, "the check cannot tell target from wrong"


@pytest.mark.parametrize("name", ["mse", "bce", "ce-seq-ignore"])
def test_empirical_fisher_with_model_labels_equals_the_ggn_in_expectation(name):
    """E_{y~p(·|f)}[EF] = Fisher = GGN, the identity that fixes the per-term convention. The
    per-sample decomposition of a mean over k terms per sample (k = C outputs for MSE and BCE,
    S positions for sequences) gave GGN/k in expectation; the test tells the two apart."""
    model, loss_fn, x, y = make(name)
    G = dense_ggn(model, loss_fn, x, y)
    groups, copies = 16, 48
    g = _gen(7)
    with torch.no_grad():
        out = model(x)
    xs = x.repeat(copies, *([1] * (x.ndim - 1)))
    ignored = (y == -1).repeat(copies, *([1] * (y.ndim - 1))) if name.startswith("ce") else None
    estimates = []
    for _ in range(groups):  # each estimate averages `copies` draws: one batch of copies
        ys = torch.cat([_model_labels(name, out, g) for _ in range(copies)])
        if ignored is not None:
            ys[ignored] = -1
        estimates.append(probe(model, loss_fn, (xs, ys), "empirical_fisher"))
    k = S if name.startswith("ce") else C
    V = _probes(len(G))
    _mc_check(torch.stack(estimates), G @ V, wrong=G @ V / k)


def test_fisher_skips_ignored_positions():
    """The Fisher samples labels only where the loss counts a term and divides by their number:
    its expectation is the GGN of the loss with ``ignore_index`` (sampling every position gave
    the GGN of the loss without it)."""
    model, loss_fn, x, y = make("ce-seq-ignore")
    G = dense_ggn(model, loss_fn, x, y)
    G_all = dense_ggn(model, nn.CrossEntropyLoss(), x, y.clamp(min=0))
    estimates = [probe(model, loss_fn, (x, y), "fisher", mc_samples=64, seed=s) for s in range(16)]
    V = _probes(len(G))
    _mc_check(torch.stack(estimates), G @ V, wrong=G_all @ V)


def test_fisher_matches_the_ggn_where_no_position_is_ignored():
    """A control for the test above: with nothing ignored both references agree."""
    model, _, x, y = make("ce-seq-ignore")
    loss_fn = nn.CrossEntropyLoss(ignore_index=-1)
    y = y.clamp(min=0)
    G = dense_ggn(model, loss_fn, x, y)
    estimates = [probe(model, loss_fn, (x, y), "fisher", mc_samples=64, seed=s) for s in range(16)]
    V = _probes(len(G))
    _mc_check(torch.stack(estimates), G @ V, wrong=G @ V / S)


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize("kind", ["fisher", "empirical_fisher"])
def test_the_model_is_left_as_found(kind):
    model, loss_fn, x, y = make("ce-seq-ignore")
    model.a.weight.grad = torch.ones_like(model.a.weight)
    before = cases.snapshot(model)
    C_ = cs.Curvature(model, loss_fn, (x, y), kind=kind)
    C_ @ torch.ones(C_.num_params, dtype=DT)
    cases.assert_unchanged(before, cases.snapshot(model))


def test_premise_cross_entropy_divides_by_the_class_weights_of_the_counted_positions():
    """What the reference's measured divisor stands for (torch 2.13): the mean of weighted
    cross-entropy divides by Σ weight[y_t] over positions not ignored, of smoothed or
    probability targets by the positions' number."""
    _, loss_fn, _, y = make("ce-seq-weight-smoothing")
    out = torch.randn(N, C, S, dtype=DT, generator=_gen(1))
    kept = y != -100
    total = F.cross_entropy(out, y, weight=loss_fn.weight, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(total / loss_fn(out, y), loss_fn.weight[y[kept]].sum())
    q = torch.softmax(out.flip(0), 1)
    torch.testing.assert_close(
        F.cross_entropy(out, q, reduction="sum") / F.cross_entropy(out, q),
        torch.tensor(float(N * S), dtype=DT),
    )
