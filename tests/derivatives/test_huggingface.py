"""Hugging Face models as they come (``loss_fn=None``, dict batches), on tiny models built from
configs (nothing downloaded): every kind against float64 references built here term by term,
on uneven batches whose target-token counts differ, so that the token weighting is tested — the
operator is the curvature of the mean over *all* target tokens of the data, which is the
model's own loss on the batches concatenated into one.

The references never go through curvscope: the model is evaluated with ``functional_call`` at a
flat float64 θ; the likelihood terms the model's loss averages (shifted tokens for a causal LM,
labels ≠ −100, entries for multi-label and regression) are taken by hand; H by double backward
of their mean, G = (1/T) Σ_t J_tᵀ H_t J_t and E = (1/T) Σ_t J_tᵀ g_t g_tᵀ J_t from the
Jacobian of the term rows and the closed-form output Hessians and gradients; the Fisher's
expectation is checked against G by Monte Carlo.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import curvscope as cs
from tests import cases

transformers = pytest.importorskip("transformers")

DT = torch.float64
V = 11  # vocabulary
TIGHT = {"rtol": 1e-8, "atol": 1e-10}


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().to(DT)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- the models
def gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=V, n_positions=8, n_embd=4, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)


def llama(**config: Any) -> nn.Module:
    cfg = transformers.LlamaConfig(
        **{
            "vocab_size": V,
            "hidden_size": 4,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
            **config,
        }
    )
    return transformers.LlamaForCausalLM(cfg)


def _bert_config(**kw: Any) -> Any:
    return transformers.BertConfig(
        vocab_size=V,
        hidden_size=4,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=16,
        **kw,
    )


def bert_mlm() -> nn.Module:
    return transformers.BertForMaskedLM(_bert_config())


def bert_classifier(num_labels: int, problem_type: str | None = None) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        cfg = _bert_config(num_labels=num_labels, problem_type=problem_type)
        return transformers.BertForSequenceClassification(cfg)

    return build


def vit() -> nn.Module:
    cfg = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=4,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(cfg)


def resnet() -> nn.Module:
    cfg = transformers.ResNetConfig(
        num_channels=1, embedding_size=4, hidden_sizes=[4], depths=[1], num_labels=3
    )
    return transformers.ResNetForImageClassification(cfg)


# ------------------------------------------------------------------------------- the data
def token_batches(seed: int, masked: bool = False) -> list[dict[str, Tensor]]:
    """Two batches of different shapes, with right padding in the first: 12 and 6 target
    tokens after the causal shift in 3 and 2 sequences (so token and sequence weights differ).
    ``masked``: a masked LM's labels, −100 except at some positions."""
    g = _gen(seed)
    out = []
    for n, s, pads in ((3, 6, [2, 1, 0]), (2, 4, [0, 0])):
        ids = torch.randint(1, V, (n, s), generator=g)
        mask = torch.ones(n, s, dtype=torch.long)
        for row, p in enumerate(pads):
            if p:
                mask[row, s - p :] = 0
                ids[row, s - p :] = 0
        labels = ids.masked_fill(mask == 0, -100)
        if masked:
            hidden = (torch.rand(n, s, generator=g) < 0.5) & (mask == 1)
            hidden[0, 0] = hidden[-1, 1] = True
            labels = ids.masked_fill(~hidden, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def class_batches(seed: int, kind: str) -> list[dict[str, Tensor]]:
    """Token batches of 3 and 2 sequences with classification labels (single: one of the second
    batch's −100, which the model's loss skips, so 3 and 1 are counted; multi: 0/1 floats per
    label; regression: floats)."""
    g = _gen(seed)
    out = []
    for b in token_batches(seed):
        n = b["input_ids"].shape[0]
        if kind == "single":
            labels = torch.randint(0, 3, (n,), generator=g)
            if n == 2:
                labels[1] = -100
        elif kind == "multi":
            labels = torch.bernoulli(torch.full((n, 3), 0.5, dtype=DT), generator=g)
        else:
            labels = torch.randn(n, generator=g, dtype=DT)
        out.append({**b, "labels": labels})
    return out


def image_batches(seed: int) -> list[dict[str, Tensor]]:
    g = _gen(seed)
    return [
        {
            "pixel_values": torch.randn(n, 1, 8, 8, generator=g, dtype=DT),
            "labels": torch.randint(0, 3, (n,), generator=g),
        }
        for n in (3, 2)
    ]


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    data: Callable[[], list[dict[str, Tensor]]]
    params: tuple[str, ...]
    terms: str  # "causal" | "masked" | "single" | "multi" | "regression"
    train: bool = False  # BatchNorm on batch statistics (ResNet)


CASES = {
    "gpt2": Case(
        gpt2,
        lambda: token_batches(1),
        ("lm_head.weight", "transformer.h.0.attn.c_attn.weight"),  # lm_head: tied to wte
        "causal",
    ),
    "llama": Case(
        llama,
        lambda: token_batches(2),
        ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"),
        "causal",
    ),
    "bert-mlm": Case(
        bert_mlm,
        lambda: token_batches(3, masked=True),
        ("cls.predictions.decoder.weight", "bert.encoder.layer.0.attention.self.query.weight"),
        "masked",
    ),
    "bert-single": Case(
        bert_classifier(3),
        lambda: class_batches(4, "single"),
        ("classifier.weight", "bert.pooler.dense.weight", "bert.encoder.layer.0.output.dense.bias"),
        "single",
    ),
    "bert-multi": Case(
        bert_classifier(3),
        lambda: class_batches(5, "multi"),
        ("classifier.weight", "bert.pooler.dense.weight"),
        "multi",
    ),
    "bert-regression": Case(
        bert_classifier(1),
        lambda: class_batches(6, "regression"),
        ("classifier.weight", "classifier.bias", "bert.pooler.dense.weight"),
        "regression",
    ),
    "vit": Case(
        vit,
        lambda: image_batches(7),
        ("classifier.weight", "vit.layers.0.attention.q_proj.weight"),
        "single",
    ),
    "resnet": Case(
        resnet,
        lambda: image_batches(8),
        ("classifier.1.weight", "resnet.encoder.stages.0.layers.0.layer.1.normalization.weight"),
        "single",
        train=True,
    ),
}


def model_of(name: str) -> nn.Module:
    case = CASES[name]
    model = _seeded(case.build, seed=len(name))
    return model.train(case.train)


# ------------------------------------------------------------------------- the references
def _term_rows(terms: str, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, targets) of the likelihood terms the model's loss averages, skipped ones out."""
    if terms == "causal":
        rows, y = logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1)
    elif terms in ("masked", "single"):
        rows, y = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    else:  # one term per entry
        return logits.reshape(-1, 1), labels.reshape(-1, 1).to(logits.dtype)
    kept = y != -100
    return rows[kept], y[kept]


def _term_losses_sum(terms: str, rows: Tensor, y: Tensor) -> Tensor:
    if terms in ("multi",):
        return F.binary_cross_entropy_with_logits(rows, y, reduction="sum")
    if terms == "regression":
        return ((rows - y) ** 2).sum()
    return F.cross_entropy(rows, y, reduction="sum")


def _out_hessian_and_grad(terms: str, rows: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per term: ∂²ℓ/∂row² (T, C, C) and ∂ℓ/∂row (T, C), in closed form."""
    if terms == "multi":
        s = rows.sigmoid()
        return (s * (1 - s))[:, :, None], s - y
    if terms == "regression":
        return torch.full_like(rows, 2.0)[:, :, None], 2 * (rows - y)
    p = rows.softmax(-1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :], p - F.one_hot(y, p.shape[-1])


class Reference:
    """The model's loss at a flat θ of the selected parameters (tied names all given)."""

    def __init__(self, name: str) -> None:
        case = CASES[name]
        self.case, self.model = case, model_of(name)
        every = list(self.model.named_parameters(remove_duplicate=False))
        self.blocks = [dict(every)[k] for k in case.params]
        self.aliases = [[n for n, p in every if p is q] for q in self.blocks]
        self.theta0 = torch.cat([p.detach().reshape(-1) for p in self.blocks])
        self.batches = case.data()

    def state(self, theta: Tensor) -> dict[str, Tensor]:
        """Name → block of θ, under every name of a tied weight (one tensor: they are tied)."""
        state: dict[str, Tensor] = {}
        sizes = [p.numel() for p in self.blocks]
        for block, names, p in zip(
            torch.split(theta, sizes), self.aliases, self.blocks, strict=True
        ):
            shaped = block.reshape(p.shape)
            state.update(dict.fromkeys(names, shaped))
        return state

    def logits(self, theta: Tensor, batch: dict[str, Tensor]) -> Tensor:
        state = self.state(theta)
        state.update({k: b.clone() for k, b in self.model.named_buffers()})  # BN stats: copies
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return functional_call(self.model, state, (), inputs).logits

    def rows(self, theta: Tensor) -> list[tuple[Tensor, Tensor]]:
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            return [
                _term_rows(self.case.terms, self.logits(theta, b), b["labels"])
                for b in self.batches
            ]

    @functools.cached_property
    def counts(self) -> list[int]:
        return [len(y) for _, y in self.rows(self.theta0)]

    def loss(self, theta: Tensor) -> Tensor:
        """(1/T) Σ over every term of every batch."""
        total = sum(_term_losses_sum(self.case.terms, r, y) for r, y in self.rows(theta))
        return total / sum(self.counts)

    @functools.cached_property
    def hessian(self) -> Tensor:
        theta = self.theta0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self.loss(theta), theta, create_graph=True)
        return torch.stack(
            [torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(len(g))]
        )

    @functools.cached_property
    def per_batch(self) -> list[tuple[Tensor, Tensor]]:
        """Per batch, Σ_t J_tᵀ H_t J_t and Σ_t J_tᵀ g_t g_tᵀ J_t over its terms."""
        theta = self.theta0.clone().requires_grad_(True)
        out = []
        for rows, y in self.rows(theta):
            flat = rows.reshape(-1)
            J = torch.stack(
                [
                    torch.autograd.grad(flat[k], theta, retain_graph=True)[0]
                    for k in range(len(flat))
                ]
            ).reshape(*rows.shape, -1)  # (T, C, n)
            h, g = _out_hessian_and_grad(self.case.terms, rows.detach(), y)
            G = torch.einsum("tcn,tcd,tdm->nm", J, h, J)
            Jg = torch.einsum("tcn,tc->tn", J, g)
            out.append((G, Jg.T @ Jg))
        return out

    def ggn(self) -> Tensor:
        return sum(G for G, _ in self.per_batch) / sum(self.counts)

    def empirical_fisher(self) -> Tensor:
        return sum(E for _, E in self.per_batch) / sum(self.counts)

    def ggn_batches_alike(self) -> Tensor:
        """The mistake of weighting every batch alike (the mean of the batches' means)."""
        return sum(G / c for (G, _), c in zip(self.per_batch, self.counts, strict=True)) / len(
            self.counts
        )


@functools.cache
def reference(name: str) -> Reference:
    return Reference(name)


def operator(name: str, kind: str, **kw: Any) -> cs.Curvature:
    ref = reference(name)
    return cs.Curvature(ref.model, None, ref.batches, kind=kind, params=list(ref.case.params), **kw)


# ------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("name", CASES)
def test_premise_the_reference_is_the_models_own_loss(name):
    """The reference's loss at θ₀ is the token-weighted mean of the batches' own losses, and
    the batches' target counts differ from their numbers of sequences."""
    ref = reference(name)
    own = []
    with torch.no_grad():
        for b in ref.batches:
            own.append(float(ref.model(**b).loss))
    counts = ref.counts
    weighted = sum(c * v for c, v in zip(counts, own, strict=True)) / sum(counts)
    assert float(ref.loss(ref.theta0).detach()) == pytest.approx(weighted, rel=1e-6)
    if name in ("gpt2", "llama", "bert-mlm", "bert-single"):  # tokens, or a label skipped
        sizes = [len(b["labels"]) for b in ref.batches]
        assert counts[0] / counts[1] != sizes[0] / sizes[1]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher"])
def test_every_kind_matches_the_float64_reference(name, kind):
    ref = reference(name)
    before = cases.snapshot(ref.model)
    problem_type = ref.model.config.problem_type
    C = operator(name, kind)
    assert C.param_names == list(ref.case.params)
    dense = C.to_dense()
    expected = {
        "hessian": lambda: ref.hessian,
        "ggn": ref.ggn,
        "empirical_fisher": ref.empirical_fisher,
    }[kind]()
    scale = float(expected.abs().max())
    torch.testing.assert_close(dense, expected, rtol=1e-8, atol=1e-10 * scale)
    cases.assert_unchanged(before, cases.snapshot(ref.model))
    assert ref.model.config.problem_type == problem_type  # the model's loss writes it: undone
    if kind != "hessian":  # the batches weighted alike is another matrix
        assert not torch.allclose(dense, ref.ggn_batches_alike(), rtol=1e-3)


def _probes(n: int) -> Tensor:
    return torch.randn(n, 4, generator=_gen(11), dtype=DT)


@pytest.mark.parametrize("name", CASES)
def test_the_fisher_is_the_ggn_in_expectation(name):
    """Labels sampled from the model at every counted term: over seeds, the Fisher's mean is
    the GGN within 4 standard errors, and far from the batches-weighted-alike GGN."""
    ref = reference(name)
    P = _probes(len(ref.theta0))
    estimates = torch.stack(
        [operator(name, "fisher", seed=s, mc_samples=128) @ P for s in range(12)]
    )
    mean = estimates.mean(0)
    stderr = (estimates.var(0).sum() / len(estimates)).sqrt()
    target = ref.ggn() @ P
    assert (mean - target).norm() < 4 * stderr
    assert 8 * stderr < 0.3 * target.norm(), "the check cannot see a 30% error"


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert-mlm"])
def test_the_operator_is_the_hessian_of_the_models_own_loss_on_all_the_data_at_once(name):
    """The batches padded into one: H v by double backward through ``model(**batch).loss``
    itself (which upcasts the logits to float32 for the causal LMs: float32 agreement)."""
    ref = reference(name)
    width = max(b["input_ids"].shape[1] for b in ref.batches)
    one = {
        k: torch.cat(
            [
                F.pad(b[k], (0, width - b[k].shape[1]), value=-100 if k == "labels" else 0)
                for b in ref.batches
            ]
        )
        for k in ref.batches[0]
    }
    v = torch.randn(len(ref.theta0), generator=_gen(3), dtype=DT)
    theta = ref.theta0.clone().requires_grad_(True)
    state = ref.state(theta)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        loss = functional_call(ref.model, state, (), one).loss
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        (hv,) = torch.autograd.grad(g @ v, theta)
    ours = operator(name, "hessian") @ v
    torch.testing.assert_close(ours, hv, rtol=1e-4, atol=1e-5 * float(hv.abs().max()))


# -------------------------------------------------------------------- tied weights, notes
def test_a_tied_weight_by_either_name():
    model = model_of("gpt2")
    data = token_batches(1)
    C = cs.Curvature(model, None, data, kind="ggn", params=["transformer.wte.weight"])
    by_head = C.restrict(["lm_head.weight"])
    assert by_head.param_names == ["lm_head.weight"]
    torch.testing.assert_close(by_head.to_dense(), C.to_dense(), **TIGHT)
    both = C.restrict(["lm_head.weight", "transformer.wte.weight"])  # one block, once
    assert both.num_params == C.num_params == V * 4


def test_a_tied_embeddings_padding_row_note_says_what_the_operator_is():
    """BERT's word embeddings have a padding row; tied to the MLM decoder, that row's gradient
    is not zero, so the P·H·P note would be wrong there (and is right untied): the note says
    what the operator is instead (the test of it: tests/derivatives/test_trust.py)."""
    mlm = cs.Curvature(
        model_of("bert-mlm"),
        None,
        token_batches(3, True),
        params=["cls.predictions.decoder.weight"],
    )
    assert not any("the operator is P·H·P" in n for n in mlm.notes)
    assert any("tied to another module" in n and "neither H nor P·H·P" in n for n in mlm.notes)
    single = cs.Curvature(
        model_of("bert-single"),
        None,
        class_batches(4, "single"),
        params=["bert.embeddings.word_embeddings.weight"],
    )
    assert any("row 0 is the padding row" in n for n in single.notes)


def test_notes_say_attention_runs_on_its_math_backend():
    for name in ("gpt2", "llama", "bert-mlm", "vit"):
        ref = reference(name)
        notes = operator(name, "hessian").notes
        assert any("math backend" in n and "sdpa" in n for n in notes), (name, notes)
    assert not any("attention" in n for n in operator("resnet", "hessian").notes)
    eager = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=V,
            n_positions=8,
            n_embd=4,
            n_layer=1,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        )
    ).double()
    assert not any("attention" in n for n in cs.Curvature(eager, None, token_batches(1)).notes)
    del ref


def test_an_eager_and_an_sdpa_model_agree():
    """attn_implementation changes the kernel, not the curvature."""
    sdpa = model_of("gpt2").eval()
    eager = _seeded(gpt2, seed=4)
    eager.load_state_dict(sdpa.state_dict())
    eager.config._attn_implementation = "eager"
    eager.eval()
    v = torch.randn(V * 4, generator=_gen(0), dtype=DT)
    a = cs.Curvature(sdpa, None, token_batches(1), params=["lm_head.weight"]) @ v
    b = cs.Curvature(eager, None, token_batches(1), params=["lm_head.weight"]) @ v
    torch.testing.assert_close(a, b, **TIGHT)


# --------------------------------------------------------------------------- data forms
def _pad_collate(examples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    width = max(len(e["input_ids"]) for e in examples)

    def pad(t: Tensor, value: int) -> Tensor:
        return F.pad(t, (0, width - len(t)), value=value)

    return {
        "input_ids": torch.stack([pad(e["input_ids"], 0) for e in examples]),
        "attention_mask": torch.stack([pad(torch.ones_like(e["input_ids"]), 0) for e in examples]),
        "labels": torch.stack([pad(e["input_ids"], -100) for e in examples]),
    }


def test_a_dataloader_of_dict_batches_is_a_list_of_them():
    g = _gen(9)
    examples = [{"input_ids": torch.randint(1, V, (n,), generator=g)} for n in (6, 3, 5, 2, 4)]
    loader = torch.utils.data.DataLoader(examples, batch_size=2, collate_fn=_pad_collate)
    listed = list(loader)
    model = model_of("gpt2").eval()
    a = cs.Curvature(model, None, loader, kind="ggn", params=["lm_head.weight"])
    b = cs.Curvature(model, None, listed, kind="ggn", params=["lm_head.weight"])
    assert a.objective.num_samples == sum(n - 1 for n in (6, 3, 5, 2, 4))  # target tokens
    torch.testing.assert_close(a.to_dense(), b.to_dense(), **TIGHT)


def test_an_explicit_loss_with_dict_batches_takes_labels_as_targets():
    model = model_of("bert-single").eval()
    data = class_batches(4, "single")
    # the same loss written out; batches weighted by their rows (labels), like any loss_fn
    data = [{**b, "labels": b["labels"].clamp(min=0)} for b in data]

    def loss_fn(out, y):
        return F.cross_entropy(out.logits, y)

    params = ["classifier.weight"]
    explicit = cs.Curvature(model, loss_fn, data, params=params).to_dense()
    own = cs.Curvature(model, None, data, params=params).to_dense()
    torch.testing.assert_close(explicit, own, **TIGHT)


class _RunningScale(nn.Module):
    """A layer norm followed by a running scale its forward updates in place, held as a plain
    tensor attribute (no buffer)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm, self.scale = norm, torch.ones(norm.weight.shape, dtype=DT)

    def forward(self, h: Tensor) -> Tensor:
        out = self.norm(h)
        with torch.no_grad():
            self.scale.mul_(0.5).add_(0.5 * out.pow(2).mean((0, 1)))
        return out / self.scale.sqrt()


@pytest.mark.filterwarnings("ignore::curvscope.derivatives.AttributeWriteWarning")
def test_a_layer_writing_a_plain_attribute_is_not_taken_for_a_loss_of_its_own():
    """loss_fn=None checked the products' loss against a second forward, which started from
    the attribute as the operator's first forward had left it: such a model was refused as
    "the model computes a loss of its own" (an outside review). The check.s two losses come
    from one forward now; the operator is the one of the same loss written out."""

    def scaled() -> nn.Module:
        model = _seeded(gpt2, 0)
        model.transformer.ln_f = _RunningScale(model.transformer.ln_f)
        return model

    def loss_fn(out: Any, labels: Tensor) -> Tensor:  # GPT-2's own: shifted, -100 ignored
        return F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))

    data = token_batches(0)[:1]  # one batch: the written-out loss weighs batches by rows
    params = ["transformer.ln_f.norm.weight", "transformer.ln_f.norm.bias"]
    own = cs.Curvature(scaled(), None, data, params=params).to_dense()
    explicit = cs.Curvature(scaled(), loss_fn, data, params=params, reduction="mean")
    torch.testing.assert_close(own, explicit.to_dense(), **TIGHT)


@pytest.mark.filterwarnings("ignore:the model is in eval mode at this probe")  # as built
def test_diagnose_and_a_monitor_take_loss_fn_none(tmp_path):
    model = model_of("gpt2").eval()
    data = token_batches(1)
    d = cs.diagnose(model, None, data, lr=0.5, params=["lm_head.weight"], budget=24)
    ref_loss = float(reference("gpt2").loss(reference("gpt2").theta0).detach())
    assert d.evidence["loss"] == pytest.approx(ref_loss, rel=1e-10)
    mon = cs.Monitor(model, None, data, lr=0.5, every=1, budget=16, log=tmp_path / "run.jsonl")
    assert mon.step(1.0).state in cs.diagnosis.STATES
    mon.close()


# ------------------------------------------------------------------------------ refusals
def test_a_head_whose_loss_is_unknown_is_refused():
    cfg = _bert_config(num_labels=3)
    model = transformers.BertForTokenClassification(cfg)
    with pytest.raises(TypeError, match=r"BertForTokenClassification.*pass the loss explicitly"):
        cs.Curvature(model, None, class_batches(4, "single"))
    with pytest.raises(TypeError, match=r"Sequential.*pass the loss explicitly"):
        cs.Curvature(nn.Sequential(nn.Linear(2, 1)), None, (torch.ones(3, 2), torch.ones(3, 1)))


def test_a_model_with_a_loss_of_its_own_is_refused_at_the_first_product():
    model = model_of("gpt2").eval()

    def smoothed(logits, labels, vocab_size, **kw):
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, vocab_size), labels[:, 1:].reshape(-1), label_smoothing=0.2
        )

    model.loss_function = smoothed
    C = cs.Curvature(model, None, token_batches(1), params=["lm_head.weight"])
    with pytest.raises(ValueError, match=r"computes a loss of its own.*pass the loss explicitly"):
        C @ torch.ones(C.num_params, dtype=DT)


def test_a_loss_of_its_own_that_agrees_on_the_first_batch_only_is_refused_at_the_next():
    """The model's own loss was checked on the first batch only: a loss_function averaging
    per sequence agrees with the token mean where the sequences are as long (here batch 0,
    unpadded) and not elsewhere — λ_max 4.48 for the model's 10.27, converged (a review)."""
    model = model_of("gpt2").eval()

    def per_sequence(logits, labels, vocab_size, **kw):
        losses = F.cross_entropy(
            logits[:, :-1].reshape(-1, vocab_size), labels[:, 1:].reshape(-1), reduction="none"
        ).reshape(labels.shape[0], -1)
        counted = (labels[:, 1:] != -100).sum(1)
        return (losses.sum(1) / counted).mean()

    model.loss_function = per_sequence
    padded, unpadded = token_batches(1)  # the second: no padding, the two agree there
    C = cs.Curvature(model, None, [unpadded, padded], params=["lm_head.weight"])
    with pytest.raises(ValueError, match=r"on batch 1,.*computes a loss of its own"):
        C @ torch.ones(C.num_params, dtype=DT)


def _without_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


@pytest.mark.parametrize("params", [None, ["transformer.h.0.mlp.c_proj.weight"]])
def test_gradient_checkpointing_in_train_mode(params):
    """Hugging Face's gradient checkpointing recomputes the forward in the backward: the
    product's backward ran outside the forward's kernels (sdpa took a fused kernel there), and
    parameters not selected were constants in the forward but the model's own, requiring grad,
    in the recomputation — torch's CheckpointError either way (a review). The products equal
    the same model's without checkpointing."""
    plain = _without_dropout(model_of("gpt2").train())
    checkpointed = _without_dropout(model_of("gpt2").train())
    enable = getattr(checkpointed, "activation_checkpointing_enable", None)
    (enable or checkpointed.gradient_checkpointing_enable)()  # the name transformers 5 keeps
    batches = token_batches(2)
    C, D = (cs.Curvature(m, None, batches, params=params) for m in (plain, checkpointed))
    V = _probes(C.num_params)
    torch.testing.assert_close(D @ V, C @ V, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in checkpointed.parameters())


@pytest.mark.parametrize(
    "batch,message",
    [
        ({"input_ids": torch.ones(2, 3, dtype=torch.long)}, "dict whose 'labels' is missing"),
        (
            {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": [[1, 2, 3]]},
            "dict whose 'labels' is list",
        ),
        (
            {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.full((2, 3), -100)},
            "batch 0 has no target token",
        ),
        (
            {"input_ids": torch.ones(2, 1, dtype=torch.long), "labels": torch.ones(2, 1).long()},
            "every sequence has one token",
        ),
    ],
)
def test_bad_batches_are_refused_at_construction(batch, message):
    with pytest.raises((TypeError, ValueError), match=message):
        cs.Curvature(model_of("gpt2"), None, [batch])


def test_a_summed_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction='sum' does not apply with loss_fn=None"):
        cs.Curvature(model_of("gpt2"), None, token_batches(1), reduction="sum")


def test_an_explicit_loss_needs_tensor_labels_in_a_dict_batch():
    with pytest.raises(TypeError, match="dict whose 'labels' is missing"):
        cs.Curvature(model_of("gpt2"), nn.CrossEntropyLoss(), [{"input_ids": torch.ones(2, 3)}])


def test_premise_the_models_first_loss_writes_its_problem_type():
    """Why curvscope puts ``config.problem_type`` back (tested above: it is left as found)."""
    model = model_of("bert-multi")
    assert model.config.problem_type is None
    with torch.no_grad():
        model(**class_batches(5, "multi")[0])
    assert model.config.problem_type == "multi_label_classification"


def test_half_precision_logits_are_upcast_as_the_models_loss_does():
    model = model_of("gpt2").to(torch.bfloat16).eval()
    C = cs.Curvature(model, None, token_batches(1), kind="ggn", params=["lm_head.weight"])
    out = C @ torch.ones(C.num_params, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert math.isfinite(C.loss_and_gradient()[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_masked_lm_is_not_refused_as_a_loss_of_its_own(dtype):
    """BERT's masked-LM loss is taken in the logits' precision, where curvscope upcasts: the
    two differed by 0.2% in bfloat16 and every half-precision masked LM was refused as "a loss
    of its own" (an outside review). The check allows the lower precision's rounding."""
    model = model_of("bert-mlm").to(dtype).eval()
    C = cs.Curvature(model, None, token_batches(1, masked=True), params=["cls.predictions.bias"])
    assert torch.isfinite(C @ torch.ones(C.num_params, dtype=dtype)).all()


def test_a_deferred_non_finite_loss_is_not_taken_for_a_loss_of_its_own():
    """Under a process group a loss that is not finite is left for the product's sum to refuse
    on every rank; with loss_fn=None it reached the check against the model's own loss first,
    where NaN matches nothing, and that rank alone raised "a loss of its own" (a review). The
    flag is what a Curvature sets under a group; here it is set by hand, in one process."""
    model = model_of("gpt2").eval()
    C = cs.Curvature(model, None, token_batches(1), params=["lm_head.weight"])
    C.objective.defer_nonfinite = True
    with torch.no_grad():
        model.lm_head.weight[0, 0] = math.nan  # the logits, the loss: NaN
    with pytest.raises(FloatingPointError, match="non-finite entries"):
        C @ torch.ones(C.num_params, dtype=DT)


def test_a_loss_that_does_not_read_its_rows_is_refused():
    """``lambda out, y: out.loss`` on dict batches with labels: the model's own loss, whatever
    rows the mean-or-sum test gave it, so both halves equalled the whole, the test said "mean"
    and batches were weighed by rows — 85% off, λ_max 29.1 for 16.7 (an outside review)."""
    model = model_of("gpt2").eval()
    ids = [b["input_ids"] for b in token_batches(1)]  # labels in the inputs: the model's loss
    unpadded = [({"input_ids": x, "labels": x}, x) for x in ids]
    C = cs.Curvature(model, lambda out, y: out.loss, unpadded, params=["lm_head.weight"])
    with pytest.raises(ValueError, match=r"does not read the rows.*loss_fn=None"):
        C @ torch.ones(C.num_params, dtype=DT)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert-regression", "vit"])
def test_forward_over_reverse_agrees_with_double_backward(name):
    """The vmapped jvp-of-grad backend goes through the same adapted outputs and loss. Llama's
    RMSNorm computes in float32 even in a float64 model (transformers casts), so there the two
    AD paths agree to float32 rounding only."""
    ref = reference(name)
    V = torch.randn(len(ref.theta0), 3, generator=_gen(5), dtype=DT)
    a = operator(name, "hessian", backend="forward_over_reverse") @ V
    b = operator(name, "hessian", backend="double_backward") @ V
    rtol = 1e-6 if name == "llama" else 1e-10
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


def test_dropout_in_train_mode_is_one_fixed_mask_per_batch():
    """GPT-2 trains with dropout 0.1: the check against model(**batch).loss runs under the
    batch's own mask (else it would refuse the model), and every product sees the same one."""
    model = model_of("gpt2").train()
    assert model.config.resid_pdrop > 0
    before = cases.snapshot(model)
    C = cs.Curvature(model, None, token_batches(1), kind="ggn", params=["lm_head.weight"])
    v = torch.randn(C.num_params, generator=_gen(2), dtype=DT)
    torch.testing.assert_close(C @ v, C @ v, rtol=0, atol=0)
    cases.assert_unchanged(before, cases.snapshot(model))


def test_hooks_a_forward_installs_are_removed_and_the_model_left_as_found():
    """A Hugging Face model asked for its hidden states installs output-capturing hooks at a
    forward, beside a flag saying so. curvscope put the flag back (every attribute a forward
    sets is) but not the hooks, so each of its forwards installed them again: 8 more a product,
    and the user's next forward returned 23 hidden states for 3 (the diff review). The hooks a
    forward registers are removed after it: none are left, the user's forward returns its
    own, and the products agree."""
    torch.manual_seed(0)
    model = llama().double().eval()
    model.config.output_hidden_states = True
    batches = token_batches(0)

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    found = hooks()
    C = cs.Curvature(model, None, batches, cache=False)
    v = torch.randn(C.num_params, dtype=torch.float64, generator=_gen(1))
    first = C @ v
    assert all(torch.equal(C @ v, first) for _ in range(2))
    cs.diagnose(model, None, batches, lr=1e-2)
    assert hooks() == found and "_output_capturing_hooks_installed" not in vars(model)
    # the finite-difference backend runs the model's own forward: its hooks and flag stood
    fd = cs.Curvature(model, None, batches, backend="finite_difference")
    near = fd @ v  # (within its own error estimate, 1.6e-3 here)
    assert float((near - first).norm() / first.norm()) < 2 * fd.product_errors[-1]
    assert hooks() == found and "_output_capturing_hooks_installed" not in vars(model)
    with torch.no_grad():
        out = model(**batches[0])
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


def test_a_dynamic_rotary_embedding_grown_by_a_later_batch_is_put_back():
    """A Llama with dynamic RoPE grows its rotary cache (``max_seq_len_cached``, its inverse
    frequencies) for a sequence longer than any before. With a short first batch, the operator
    learned what a forward sets from that batch alone: the long batch's growth was left on the
    model after every product, and a new operator was 1.3e-4 off (stop 40's diff review). Each
    batch's first forward learns now: the model is left as found, and the operator is the
    same whichever batch comes first."""
    # (head size 4: dynamic RoPE divides by head size − 2)
    config = {"hidden_size": 8, "max_position_embeddings": 8}
    dynamic = {"rope_type": "dynamic", "factor": 2.0}
    model = _seeded(lambda: llama(**config, rope_scaling=dynamic), 0)
    g = _gen(0)
    short, long = (torch.randint(0, V, (3, n), generator=g) for n in (6, 12))
    batches = [{"input_ids": b, "labels": b} for b in (short, long)]
    rotary = model.model.rotary_emb
    found = dict(vars(rotary))
    C = cs.Curvature(model, None, batches)
    v = torch.randn(C.num_params, dtype=DT, generator=_gen(1))
    first = C @ v
    assert dict(vars(rotary)).keys() == found.keys()
    assert all(vars(rotary)[k] is found[k] for k in found)  # max_seq_len_cached: 8, an int
    assert torch.equal(C @ v, first)
    reordered = cs.Curvature(model, None, batches[::-1])
    torch.testing.assert_close(reordered @ v, first, **TIGHT)
    torch.testing.assert_close(cs.Curvature(model, None, batches) @ v, first, rtol=0, atol=0)


def test_a_mixture_of_experts_router_loss_is_named_and_output_router_logits_off_measures():
    """A Mixtral with ``output_router_logits=True`` failed every product with transformers'
    bare IndexError: the own loss's check runs a forward inside the product's pass, which found
    the flag that the output-capturing hooks were installed, set by the pass's forward, with
    the hooks removed — no router logits captured (stop 40's review). It now runs as found, and
    the model's own loss, which adds the routers' load-balancing term, is refused naming that
    term and the switch; with ``output_router_logits=False`` in the batches the operator is
    the language model's loss, the same as with the switch off in the config."""

    def mixtral(router_logits: bool) -> nn.Module:
        return cases.tiny_mixtral(V, output_router_logits=router_logits)

    ids = torch.randint(0, V, (3, 6), generator=_gen(0))
    model = mixtral(True)
    before = cases.snapshot(model)
    with pytest.raises(ValueError, match=r"(?s)load-balancing loss.*output_router_logits=False"):
        cs.Curvature(model, None, {"input_ids": ids, "labels": ids}).loss_and_gradient()
    batch = {"input_ids": ids, "labels": ids, "output_router_logits": False}
    C = cs.Curvature(model, None, batch)
    v = torch.randn(C.num_params, dtype=DT, generator=_gen(1))
    switched_off = cs.Curvature(mixtral(False), None, {"input_ids": ids, "labels": ids})
    torch.testing.assert_close(C @ v, switched_off @ v, rtol=0, atol=0)
    cases.assert_unchanged(before, cases.snapshot(model))
    assert not any(len(m._forward_hooks) for m in model.modules())
