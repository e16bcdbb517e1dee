"""Small seeded models, data and dense float64 references shared by the tests.

References are built independently of curvscope's second-derivative code: the Hessian as
``jacfwd(grad(L))`` of a flat-parameter function (not ``torch.func.hessian``, which is wrong
through LayerNorm and train-mode BatchNorm in torch 2.13), Jacobians with ``jacfwd``, and
per-sample gradients one sample at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacfwd
from torch.nn.attention import SDPBackend, sdpa_kernel

DT = torch.float64

#: The evidence keys DESIGN.md promises in every diagnosis and every run-log record.
CONTRACT_KEYS = (
    "loss",
    "grad_norm",
    "sharpness",
    "lambda_min",
    "stability_limit",
    "directional_curvature",
    "newton_decrement",
    "matvecs",
)


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().to(DT)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Residual(nn.Module):
    """LayerNorm, GELU and a residual connection."""

    def __init__(self, d_in: int = 5, d: int = 6, d_out: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Linear(d, d)
        self.out = nn.Linear(d, d_out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = h + nn.functional.gelu(self.ff(self.norm(h)))
        return self.out(h)


class TinyTransformer(nn.Module):
    """A one-layer transformer encoder (scaled-dot-product attention inside) with a head."""

    def __init__(self, d: int = 8, seq_classes: int = 3) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(d, 2, 12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, seq_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(x).mean(dim=1))


class Tied(nn.Module):
    """An embedding whose weight is reused, transposed, as the output layer."""

    def __init__(self, vocab: int = 7, d: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)
        self.dec = nn.Linear(d, vocab, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.dec(torch.tanh(self.mid(self.emb(x))))


class KinkNorm(nn.Module):
    """A tanh layer and its rows' norm ‖h‖ beside it: no second derivative where a row of h is 0
    (a zero input through the bias-free layer), so products there are NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.out = nn.Linear(5, 6, bias=False), nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inner(x))
        return self.out(torch.cat([h, h.norm(dim=1, keepdim=True)], 1))


class RunningScale(nn.Module):
    """A running statistic the forward updates in place, held as a buffer or as a plain tensor
    attribute (which curvscope cannot pass a copy of)."""

    def __init__(self, as_buffer: bool = False) -> None:
        super().__init__()
        self.inner, self.out = nn.Linear(5, 6), nn.Linear(6, 3)
        scale = torch.ones(6, dtype=DT)
        if as_buffer:
            self.register_buffer("scale", scale)
        else:
            self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        h = self.inner(x)
        with torch.no_grad():
            self.scale.mul_(0.5).add_(0.5 * h.pow(2).mean(0))
        return self.out(torch.tanh(h / self.scale.sqrt()))


class LSTMHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class OneUnused(nn.Module):
    """Two linear layers of the same shape, the second unused by the forward (an auxiliary head
    out of this phase): parameters no loss reaches beside ones it does."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(n_in, n_out), nn.Linear(n_in, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.used(x)


@dataclass
class Case:
    """A model, a batch-mean loss and a full batch of data; ``train`` sets the mode."""

    name: str
    model: nn.Module
    loss_fn: nn.Module
    inputs: Tensor
    targets: Tensor

    @property
    def data(self) -> tuple[Tensor, Tensor]:
        return self.inputs, self.targets


def mlp(n: int = 24, seed: int = 0) -> Case:
    g = _gen(seed)
    m = _seeded(seed, lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    return Case(
        "mlp",
        m,
        nn.CrossEntropyLoss(),
        torch.randn(n, 4, generator=g, dtype=DT),
        torch.randint(0, 3, (n,), generator=g),
    )


def mlp_mse(n: int = 24, seed: int = 1) -> Case:
    g = _gen(seed)
    m = _seeded(seed, lambda: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)))
    return Case(
        "mlp-mse",
        m,
        nn.MSELoss(),
        torch.randn(n, 3, generator=g, dtype=DT),
        torch.randn(n, 2, generator=g, dtype=DT),
    )


def logreg_bce(n: int = 30, seed: int = 2) -> Case:
    g = _gen(seed)
    m = _seeded(seed, lambda: nn.Sequential(nn.Linear(4, 3), nn.Softplus(), nn.Linear(3, 1)))
    return Case(
        "bce",
        m,
        nn.BCEWithLogitsLoss(),
        torch.randn(n, 4, generator=g, dtype=DT),
        torch.randint(0, 2, (n, 1), generator=g).to(DT),
    )


def cnn(n: int = 6, seed: int = 3) -> Case:
    g = _gen(seed)
    m = _seeded(
        seed,
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)
        ),
    )
    return Case(
        "cnn",
        m,
        nn.CrossEntropyLoss(),
        torch.randn(n, 1, 6, 6, generator=g, dtype=DT),
        torch.randint(0, 3, (n,), generator=g),
    )


def residual_layernorm(n: int = 10, seed: int = 4) -> Case:
    g = _gen(seed)
    return Case(
        "layernorm",
        _seeded(seed, Residual),
        nn.CrossEntropyLoss(),
        torch.randn(n, 5, generator=g, dtype=DT),
        torch.randint(0, 3, (n,), generator=g),
    )


def transformer(n: int = 4, seed: int = 5) -> Case:
    g = _gen(seed)
    return Case(
        "transformer",
        _seeded(seed, TinyTransformer),
        nn.CrossEntropyLoss(),
        torch.randn(n, 5, 8, generator=g, dtype=DT),
        torch.randint(0, 3, (n,), generator=g),
    )


def batchnorm(n: int = 12, seed: int = 6, train: bool = True) -> Case:
    g = _gen(seed)
    m = _seeded(
        seed, lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    )
    with torch.no_grad():  # non-trivial running statistics, so eval mode differs from train
        m[1].running_mean.uniform_(-0.5, 0.5, generator=g)
        m[1].running_var.uniform_(0.5, 2.0, generator=g)
    m.train(train)
    return Case(
        f"batchnorm-{'train' if train else 'eval'}",
        m,
        nn.MSELoss(),
        torch.randn(n, 3, generator=g, dtype=DT),
        torch.randn(n, 2, generator=g, dtype=DT),
    )


def tied(n: int = 9, seed: int = 7) -> Case:
    g = _gen(seed)
    return Case(
        "tied",
        _seeded(seed, Tied),
        nn.CrossEntropyLoss(),
        torch.randint(0, 7, (n,), generator=g),
        torch.randint(0, 7, (n,), generator=g),
    )


def lstm(n: int = 5, seed: int = 8) -> Case:
    g = _gen(seed)
    return Case(
        "lstm",
        _seeded(seed, LSTMHead),
        nn.CrossEntropyLoss(),
        torch.randn(n, 4, 3, generator=g, dtype=DT),
        torch.randint(0, 2, (n,), generator=g),
    )


def dropout_batchnorm(n: int = 16, seed: int = 9) -> Case:
    """Train mode with both randomness (dropout) and batch statistics (BatchNorm)."""
    g = _gen(seed)
    m = _seeded(
        seed,
        lambda: nn.Sequential(
            nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3)
        ),
    )
    m.train()
    return Case(
        "dropout-bn",
        m,
        nn.CrossEntropyLoss(),
        torch.randn(n, 4, generator=g, dtype=DT),
        torch.randint(0, 3, (n,), generator=g),
    )


#: Deterministic models the dense references cover (dropout is tested on its own).
ALL = [
    mlp,
    mlp_mse,
    logreg_bce,
    cnn,
    residual_layernorm,
    transformer,
    lambda: batchnorm(train=True),
    lambda: batchnorm(train=False),
    tied,
    lstm,
]
ALL_IDS = [
    "mlp",
    "mlp-mse",
    "bce",
    "cnn",
    "layernorm",
    "transformer",
    "bn-train",
    "bn-eval",
    "tied",
    "lstm",
]


# ------------------------------------------------------------------------- references
def reference_model(model: nn.Module) -> nn.Module:
    """A copy in which train-mode BatchNorm does not track statistics: the same function of the
    parameters (batch statistics), with no in-place buffer update for torch.func to trip on."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training:
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return ref


def flat_params(model: nn.Module) -> tuple[Tensor, list[str], list[torch.Size]]:
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    return flat, [k for k, _ in named], [p.shape for _, p in named]


def as_dict(flat: Tensor, names: list[str], shapes: list[torch.Size]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, s in zip(names, shapes, strict=True):
        out[k] = flat[i : i + s.numel()].reshape(s)
        i += s.numel()
    return out


def outputs_fn(case: Case, inputs: Tensor | None = None) -> tuple[Callable, Tensor]:
    """θ (flat) -> model outputs on the inputs, and θ0."""
    model = reference_model(case.model)
    theta0, names, shapes = flat_params(case.model)
    x = case.inputs if inputs is None else inputs

    def f(t: Tensor) -> Tensor:
        with sdpa_kernel([SDPBackend.MATH]):  # the fused kernel has no forward-mode AD
            return functional_call(model, as_dict(t, names, shapes), (x,))

    return f, theta0


def reference_loss(loss_fn: Callable) -> Callable:
    """The loss written out where torch's own fails under jacfwd(grad) (MSELoss in torch 2.13
    raises 'ZeroTensors are immutable' in forward-over-reverse)."""
    if isinstance(loss_fn, nn.MSELoss):
        return lambda out, y: ((out - y) ** 2).mean()
    return loss_fn


def loss_fn_of_theta(case: Case) -> tuple[Callable, Tensor]:
    f, theta0 = outputs_fn(case)
    loss = reference_loss(case.loss_fn)
    return (lambda t: loss(f(t), case.targets)), theta0


def dense_hessian(case: Case) -> Tensor:
    L, theta0 = loss_fn_of_theta(case)
    return jacfwd(torch.func.grad(L))(theta0)


def dense_ggn(case: Case) -> Tensor:
    f, theta0 = outputs_fn(case)
    out = f(theta0).detach()
    jac = jacfwd(f)(theta0).reshape(out.numel(), -1)
    loss = reference_loss(case.loss_fn)
    h_out = jacfwd(torch.func.grad(lambda o: loss(o.reshape(out.shape), case.targets)))(
        out.reshape(-1)
    )
    return jac.T @ h_out @ jac


def dense_empirical_fisher(case: Case) -> Tensor:
    """Mean of per-sample gradient outer products, one sample at a time."""
    model = reference_model(case.model)
    theta0, names, shapes = flat_params(case.model)
    grads, loss = [], reference_loss(case.loss_fn)
    for i in range(len(case.targets)):

        def li(t: Tensor, i: int = i) -> Tensor:
            return loss(
                functional_call(model, as_dict(t, names, shapes), (case.inputs[i : i + 1],)),
                case.targets[i : i + 1],
            )

        grads.append(torch.func.grad(li)(theta0))
    gs = torch.stack(grads)
    return gs.T @ gs / len(gs)


def snapshot(model: nn.Module) -> dict:
    """Everything curvscope promises to leave as found."""
    return {
        "params": {k: p.detach().clone() for k, p in model.named_parameters()},
        "grads": {
            k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()
        },
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "buffers": {k: b.clone() for k, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
        "rng": torch.get_rng_state().clone(),
    }


def assert_unchanged(before: dict, after: dict) -> None:
    for key in ("params", "buffers"):
        assert before[key].keys() == after[key].keys()
        for k in before[key]:
            assert torch.equal(before[key][k], after[key][k]), f"{key} {k} changed"
    for k, g in before["grads"].items():
        h = after["grads"][k]
        assert (g is None) == (h is None), f".grad of {k} changed None-ness"
        assert g is None or torch.equal(g, h), f".grad of {k} changed"
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert torch.equal(before["rng"], after["rng"]), "the global RNG state changed"


def below_a_null_cluster(n: int = 1200, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(H, Q): a symmetric matrix H = Q diag(λ) Qᵀ with 30 eigenvalues evenly in [0.05, 1]
    (columns 0-29 of Q), n − 31 within 1e-5 of 0 (a network's near-null Hessian directions)
    and one at −0.02 beyond them (column n − 1) — the outside reviews' spectrum on which a
    Ritz value in the cluster passed the residual test before −0.02 showed."""
    gen = _gen(seed)
    lam = torch.cat(
        [
            torch.linspace(0.05, 1.0, 30, dtype=DT),
            1e-5 * torch.randn(n - 31, generator=gen, dtype=DT),
            torch.tensor([-0.02], dtype=DT),
        ]
    )
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    H = (q * lam) @ q.T
    return (H + H.T) / 2, q


def tiny_mixtral(vocab_size: int, seed: int = 0, **config: object) -> nn.Module:
    """A one-layer float64 Mixtral of three experts, two a token, built from a config (nothing
    downloaded), its experts eager (the grouped kernel takes no float64); ``config`` overrides
    (``output_router_logits``)."""
    import transformers

    settings = {
        "vocab_size": vocab_size,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_local_experts": 3,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 16,
        "experts_implementation": "eager",
    }
    return _seeded(
        seed,
        lambda: transformers.MixtralForCausalLM(
            transformers.MixtralConfig(**{**settings, **config})
        ),
    )
