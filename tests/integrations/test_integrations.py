"""The framework integrations, each with the real library: a Lightning Callback, a Hugging Face
TrainerCallback on a tiny model built here (nothing downloaded), and TensorBoard scalars."""

import math
import statistics

import numpy as np
import pytest
import torch
from torch import nn

import curvscope as cs
from curvscope.diagnosis import STATES, read_log
from tests import cases

pytest.importorskip("lightning")
pytest.importorskip("transformers")
pytest.importorskip("tensorboard")


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    case = cases.mlp()
    mon = cs.Monitor(case.model, case.loss_fn, case.data, lr=0.1, every=2, tensorboard=tmp_path)
    for _ in range(4):
        mon.step(1.0)
    mon.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"curvscope/sharpness", "curvscope/stability_limit", "curvscope/state_code"} <= set(tags)
    assert [e.step for e in acc.Scalars("curvscope/sharpness")] == [2, 4]


def test_a_tensorboard_writer_the_monitor_made_is_closed_with_it(tmp_path):
    """close() only flushed the SummaryWriter a Monitor made from a directory: its thread lived
    on, one per Monitor — 301 threads after a sweep of 300 (a review). One given is the
    user's: flushed, left open."""
    import threading

    from torch.utils.tensorboard import SummaryWriter

    case = cases.mlp()
    before = threading.active_count()
    for i in range(3):
        with cs.Monitor(
            case.model, case.loss_fn, case.data, lr=0.1, every=2, tensorboard=tmp_path / str(i)
        ) as mon:
            mon.step(1.0)
            mon.step(1.0)
    assert threading.active_count() == before
    (tmp_path / "taken.jsonl").write_text("")  # a Monitor that fails once its writer is made
    for i in range(2):
        with pytest.raises(FileExistsError):
            cs.Monitor(
                case.model,
                case.loss_fn,
                case.data,
                lr=0.1,
                tensorboard=tmp_path / f"failed{i}",
                log=tmp_path / "taken.jsonl",
            )
    assert threading.active_count() == before
    mine = SummaryWriter(log_dir=str(tmp_path / "mine"))
    with cs.Monitor(case.model, case.loss_fn, case.data, lr=0.1, every=2, tensorboard=mine) as mon:
        mon.step(1.0)
        mon.step(1.0)
    mine.add_scalar("after", 1.0, 0)  # still open
    mine.close()


def _fit_lightning(
    tmp_path,
    max_steps,
    every,
    batch_size,
    accumulate=1,
    clip=None,
    norms=None,
    algorithm=None,
    ckpt_path=None,
    losses=None,
    callback=None,
    crash_at=None,
    precision=None,
    optimizer=None,
):
    """A LightningModule over the MLP of tests.cases (SGD with momentum) fitted with the
    callback (``clip``: the trainer's gradient_clip_val; ``norms``: a list the module appends
    each optimizer step's gradient norm to, before Lightning clips; ``ckpt_path``: a checkpoint
    to resume from; ``losses``: a list the module appends each training step's loss to);
    returns (trainer, callback)."""
    import lightning

    from curvscope.integrations.lightning import CurvscopeCallback

    case = cases.mlp(n=32)

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = case.model

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            if crash_at is not None and self.global_step >= crash_at:
                raise RuntimeError("out of memory (simulated)")
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            if losses is not None:
                losses.append(float(loss))
            return loss

        def configure_optimizers(self):
            if optimizer is not None:
                return optimizer(self.parameters())
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def on_before_optimizer_step(self, optimizer):
            if norms is not None:
                grads = [p.grad.reshape(-1) for p in self.parameters() if p.grad is not None]
                norms.append(float(torch.cat(grads).norm()))

    data = torch.utils.data.TensorDataset(*case.data)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
    log = tmp_path / "run.jsonl"
    cb = callback or CurvscopeCallback(nn.CrossEntropyLoss(), case.data, every=every, log=log)
    trainer = lightning.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        gradient_clip_algorithm=algorithm,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
        default_root_dir=tmp_path,
        **({} if precision is None else {"precision": precision}),
    )
    trainer.fit(Module(), loader, ckpt_path=ckpt_path)
    return trainer, cb


def test_lightning_callback(tmp_path):
    _, cb = _fit_lightning(tmp_path, max_steps=12, every=4, batch_size=8)
    assert len(cb.monitor.history) == 3
    assert cb.monitor.last.evidence["stability_limit"] == pytest.approx(3.8 / 0.1)
    _, records = read_log(tmp_path / "run.jsonl")
    assert [r["step"] for r in records] == [4, 8, 12]


def test_lightning_callback_counts_optimizer_steps_under_gradient_accumulation(tmp_path):
    """Under accumulate_grad_batches a Monitor step is an optimizer step (a new user's run:
    one per micro-batch made every=, the forecast's growth per step and the cheap tier's "one
    step later" count micro-batches), with the mean loss of its micro-batches."""
    losses: list[float] = []
    trainer, cb = _fit_lightning(
        tmp_path, max_steps=4, every=2, batch_size=4, accumulate=2, losses=losses
    )
    assert trainer.global_step == cb.monitor.steps == 4  # before: 8, one per micro-batch
    assert cb.monitor.accumulation == 2  # train_batches are micro-batches, two a step
    _, records = read_log(tmp_path / "run.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    # the mean of the micro-batches' losses, not Lightning's backpropagated 1/2 of it (an
    # outside review: 1/4 at accumulate_grad_batches=4)
    means = [(a + b) / 2 for a, b in zip(losses[::2], losses[1::2], strict=True)]
    assert cb.monitor.losses == pytest.approx(means, rel=1e-6)


def test_lightning_callback_follows_a_resumed_run(tmp_path):
    """ckpt_path: the Monitor's steps go on from the trainer's global step."""
    trainer, _ = _fit_lightning(tmp_path, max_steps=4, every=2, batch_size=8)
    trainer.save_checkpoint(tmp_path / "four.ckpt")
    (tmp_path / "resumed").mkdir()
    ckpt = tmp_path / "four.ckpt"
    trainer, cb = _fit_lightning(tmp_path / "resumed", 8, 2, 8, ckpt_path=ckpt)
    assert trainer.global_step == cb.monitor.steps == 8
    assert cb.monitor.probe_steps == [6, 8]


def test_lightning_callback_measures_in_the_modules_true_precision(tmp_path):
    """An outside review: under precision="bf16-true" Lightning converts the module and
    every batch it feeds, not the callback's probe data, and the first probe ended fit() with
    torch's bare "mat1 and mat2 must have the same dtype". The probe data is converted as
    Lightning converts a batch."""
    trainer, cb = _fit_lightning(
        tmp_path, max_steps=4, every=2, batch_size=8, precision="bf16-true"
    )
    assert next(trainer.lightning_module.parameters()).dtype == torch.bfloat16
    assert cb.monitor.probe_steps == [2, 4]
    assert all(math.isfinite(d.evidence["sharpness"]) for d in cb.monitor.history)


def test_lightning_callback_tells_the_monitor_of_mixed_precision(tmp_path):
    """The diff review: a callback hands the Monitor floats, so the autocast the full-batch
    test must compare under was never read off a loss's graph: it comes from the precision."""
    _, cb = _fit_lightning(tmp_path, max_steps=2, every=2, batch_size=8, precision="bf16-mixed")
    assert cb.monitor._trained_in == torch.bfloat16
    (tmp_path / "plain").mkdir()
    _, plain = _fit_lightning(tmp_path / "plain", max_steps=2, every=2, batch_size=8)
    assert plain.monitor._trained_in is None


@pytest.mark.parametrize("own", [{"optimizer": None}, {"lr": 0.05}])
def test_a_callback_reads_an_optimizer_no_rule_covers_as_its_refusal_says(tmp_path, own):
    """An outside review: NAdam (or the Trainer's Adafactor) is refused, naming two fixes —
    lr= or no optimizer — and through a callback both failed, the callback passing the
    trainer's optimizer as well. Either is the callback's own keyword now."""
    from curvscope.integrations.lightning import CurvscopeCallback

    def nadam(params):
        return torch.optim.NAdam(params, lr=0.01)

    case = cases.mlp(n=32)
    with pytest.raises(TypeError, match="NAdam"):
        _fit_lightning(tmp_path, max_steps=2, every=2, batch_size=8, optimizer=nadam, clip=1.0)
    cb = CurvscopeCallback(nn.CrossEntropyLoss(), case.data, every=2, **own)
    _fit_lightning(tmp_path, 4, 2, 8, optimizer=nadam, clip=1.0, callback=cb)
    assert cb.monitor.optimizer is None and cb.monitor.lr == own.get("lr")
    assert cb.monitor.probe_steps == [2, 4]


def _medians_of_clip_factors(norms, max_norm, windows):
    """The clip factor min(1, max_norm/(‖g‖ + 1e-6)) of each step, its median per window."""
    factors = [min(1.0, max_norm / (n + 1e-6)) for n in norms]
    return [statistics.median(factors[a:b]) for a, b in windows]


def test_lightning_callback_tells_the_monitor_of_norm_clipping(tmp_path):
    """gradient_clip_val (norm): the Monitor gets max_grad_norm and each optimizer step's
    gradient norm before clipping; each probe judges the steps by the rate they took."""
    norms = []
    _, cb = _fit_lightning(tmp_path, max_steps=12, every=4, batch_size=8, clip=0.05, norms=norms)
    assert cb.monitor.max_grad_norm == 0.05 and len(norms) == 12
    expected = _medians_of_clip_factors(norms, 0.05, [(0, 4), (4, 8), (8, 12)])
    assert expected[0] < 1  # the clipping took part of the gradient
    for d, s in zip(cb.monitor.history, expected, strict=True):
        assert d.evidence["clip_factor"] == pytest.approx(s, rel=1e-5)
        assert d.evidence["stability_limit"] == pytest.approx(3.8 / (0.1 * s), rel=1e-5)


def test_lightning_callback_with_clipping_it_does_not_model(tmp_path):
    """Clipping by value is said, once, and the steps judged unclipped; an infinite norm (the
    idiom for measuring only) is no clipping — it stopped training at its start before."""
    with pytest.warns(UserWarning, match="by value.*unclipped"):
        _, cb = _fit_lightning(tmp_path, 4, 2, 8, clip=0.05, algorithm="value")
    assert cb.monitor.max_grad_norm is None and len(cb.monitor.history) == 2
    (tmp_path / "inf").mkdir()
    _, cb = _fit_lightning(tmp_path / "inf", 4, 2, 8, clip=float("inf"))
    assert cb.monitor.max_grad_norm is None and len(cb.monitor.history) == 2


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return BertForSequenceClassification(config)


def _hf_data(n):
    """(ids, labels, train): n token sequences of 8 for the tiny BERT, their labels, and the
    Trainer's dataset of them."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (n, 8), generator=gen)
    labels = torch.randint(0, 2, (n,), generator=gen)
    return ids, labels, [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def _hf_args(tmp_path, **kw):
    """TrainingArguments: four steps of 4 samples at a constant lr 1e-3, each logged, nothing
    saved (``kw`` overrides)."""
    from transformers import TrainingArguments

    settings = {
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "report_to": [],
        "use_cpu": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    return TrainingArguments(output_dir=str(tmp_path), **{**settings, **kw})


def test_transformers_trainer_callback(tmp_path):
    from transformers import Trainer

    from curvscope.integrations.transformers import CurvscopeTrainerCallback

    model = _tiny_bert()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (16, 8), generator=gen)
    labels = torch.randint(0, 2, (16,), generator=gen)
    train = [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": labels[i],
        }
        for i in range(16)
    ]
    probe = ({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels)

    def loss_fn(output, y):  # the model returns a ModelOutput: any output works for the Hessian
        return nn.functional.cross_entropy(output.logits, y)

    cb = CurvscopeTrainerCallback(loss_fn, probe, every=2)
    args = _hf_args(tmp_path)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[cb]).train()
    assert len(cb.monitor.history) == 2
    assert cb.monitor.last.evidence["preconditioned"]  # AdamW: the preconditioned sharpness
    assert cb.monitor.last.state in STATES


@pytest.mark.parametrize("kwargs", [{"use_reentrant": True}, {"preserve_rng_state": True}])
def test_transformers_callback_refuses_reentrant_checkpointing_before_training(tmp_path, kwargs):
    """Gradient checkpointing of torch's reentrant kind (asked for, or torch's default when
    ``use_reentrant`` is left out) is refused at ``on_train_begin``, before any step: it was
    refused only at the first probe, ``every`` steps into the run. The non-reentrant kind,
    Hugging Face's default, trains and probes."""
    from transformers import Trainer

    from curvscope.integrations.transformers import CurvscopeTrainerCallback

    ids, labels, train = _hf_data(8)
    probe = ({"input_ids": ids}, labels)
    loss_fn = lambda output, y: nn.functional.cross_entropy(output.logits, y)  # noqa: E731
    model = _tiny_bert()
    cb = CurvscopeTrainerCallback(loss_fn, probe, every=2)
    args = _hf_args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[cb])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        trainer.train()
    assert cb.monitor is None
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))

    model = _tiny_bert()
    cb = CurvscopeTrainerCallback(loss_fn, probe, every=2)
    args = _hf_args(tmp_path, gradient_checkpointing=True)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[cb]).train()
    assert len(cb.monitor.history) == 2


def test_transformers_callback_refuses_the_models_own_loss_under_label_smoothing(tmp_path):
    """With label_smoothing_factor the Trainer trains a smoothed loss outside the model, and
    loss_fn=None measured the model's own, unsmoothed one: sharpness 3.99 where the trained
    loss had 2.79 against a limit of 4, without a word (an outside review). Refused before the
    first step."""
    from transformers import Trainer

    from curvscope.integrations.transformers import CurvscopeTrainerCallback

    ids, labels, train = _hf_data(8)
    cb = CurvscopeTrainerCallback(None, [{"input_ids": ids, "labels": labels}], every=2)
    args = _hf_args(tmp_path, label_smoothing_factor=0.1)
    trainer = Trainer(model=_tiny_bert(), args=args, train_dataset=train, callbacks=[cb])
    with pytest.raises(ValueError, match=r"label_smoothing_factor=0\.1.*unsmoothed"):
        trainer.train()
    assert cb.monitor is None


def test_transformers_callback_refuses_a_routers_loss_and_takes_it_explicitly(tmp_path):
    """A mixture of experts with ``output_router_logits=True`` trains its cross-entropy plus
    ``router_aux_loss_coef`` times the routers' load-balancing loss; ``loss_fn=None`` takes the
    loss from the logits alone, and was refused only at the first probe, steps into training.
    Refused before the first step now, and the loss the message gives works: the run is
    probed, on the loss the Trainer trains."""
    from transformers import Trainer

    from curvscope.integrations.transformers import CurvscopeTrainerCallback

    model = cases.tiny_mixtral(13, output_router_logits=True)
    ids = torch.randint(0, 13, (8, 6), generator=torch.Generator().manual_seed(0))
    train = [{"input_ids": ids[i], "labels": ids[i]} for i in range(8)]
    probe = [{"input_ids": ids, "labels": ids}]
    refused = CurvscopeTrainerCallback(None, probe, every=2)
    trainer = Trainer(model=model, args=_hf_args(tmp_path), train_dataset=train)
    trainer.add_callback(refused)
    with pytest.raises(ValueError, match=r"(?s)load-balancing loss.*out\.aux_loss"):
        trainer.train()
    assert refused.monitor is None

    def trained(out, labels):  # the message's loss
        logits, targets = out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        shifted = torch.nn.functional.cross_entropy(logits, targets)
        return shifted + model.config.router_aux_loss_coef * out.aux_loss

    with torch.no_grad():
        assert float(trained(model(input_ids=ids), ids)) == pytest.approx(
            float(model(input_ids=ids, labels=ids).loss), rel=1e-5
        )
    taken = CurvscopeTrainerCallback(trained, probe, every=2)
    trainer = Trainer(model=model, args=_hf_args(tmp_path), train_dataset=train, callbacks=[taken])
    trainer.train()
    assert taken.monitor is not None and len(taken.monitor.history) == 2


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=13,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return GPT2LMHeadModel(config)


def _lm_batches(sizes, seed):
    """Dict batches as a collator makes them: (sequences, length, padded tail of the first)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, s, pad in sizes:
        ids = torch.randint(1, 13, (n, s), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[0, s - pad :] = 0
        out.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    return out


def test_transformers_trainer_with_the_models_own_loss_and_a_schedule_to_zero(
    tmp_path, monkeypatch
):
    """loss_fn=None and dict batches through a real Trainer (AdamW, linear decay to 0): each
    probe says which sharpness it holds; at learning rate 0 there is no limit to judge against
    (said so, not "0% of the limit inf")."""
    from transformers import Trainer, TrainingArguments

    from curvscope.integrations.transformers import CurvscopeTrainerCallback

    model = _tiny_gpt2()
    train = [
        {k: v[0] for k, v in b.items()} for b in _lm_batches([(1, 8, 0)] * 16, seed=1)
    ]  # one example each, equal lengths: the Trainer's default collator stacks them
    probe = _lm_batches([(3, 8, 3), (2, 5, 0)], seed=2)  # 18 and 8 target tokens
    log = tmp_path / "run.jsonl"
    cb = CurvscopeTrainerCallback(None, probe, every=2, log=log)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[cb])
    trainer.train()
    first, last = cb.monitor.history
    assert first.evidence["preconditioned"] and first.evidence["lr"] > 0
    assert not last.evidence["preconditioned"] and last.evidence["lr"] == 0
    assert "learning rate 0: no stability limit" in last.reasons
    assert not any("of the limit inf" in r for r in last.reasons)
    logged = [r for r in trainer.state.log_history if "curvscope/preconditioned" in r]
    assert [(r["step"], r["curvscope/preconditioned"]) for r in logged] == [(2, 1.0), (4, 0.0)]
    _, records = read_log(log)
    assert [r["preconditioned"] for r in records] == [True, False]
    # the report plots the two sharpnesses apart: one series each, never one line through both
    from curvscope.report import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, right=0.97: figures.append(fig))
    plots.log_plots(records, tmp_path)
    lines = {ln.get_label(): ln.get_ydata() for ln in figures[0].axes[2].get_lines()}
    pre, raw = lines["sharpness of P^-½ H P^-½ (preconditioned)"], lines["sharpness"]
    assert list(np.isnan(pre)) == [False, True] and list(np.isnan(raw)) == [True, False]
    # the loss of the last probe is the mean over all 26 target tokens of the probe batches
    model.eval()
    with torch.no_grad():
        own = [(float(model(**b).loss), int((b["labels"][:, 1:] != -100).sum())) for b in probe]
    tokens = sum(n for _, n in own)
    assert tokens == 26
    expected = sum(v * n for v, n in own) / tokens
    assert last.evidence["loss"] == pytest.approx(expected, rel=1e-5)


def test_transformers_callback_tells_the_monitor_of_gradient_accumulation(tmp_path):
    """Under gradient_accumulation_steps a step's batch is that many micro-batches: the
    Monitor is told, so that ``train_batches`` of the loader's batches are judged as the steps
    take them (judged one by one before: a review); a value the user gives is kept."""
    from transformers import Trainer

    from curvscope.integrations.transformers import CurvscopeTrainerCallback

    ids, labels, train = _hf_data(16)
    probe = {"input_ids": ids[:8], "labels": labels[:8]}
    for given, want in (({}, 2), ({"accumulation": 1}, 1)):
        cb = CurvscopeTrainerCallback(None, probe, every=2, **given)
        args = _hf_args(tmp_path, max_steps=2, gradient_accumulation_steps=2)
        Trainer(model=_tiny_bert(), args=args, train_dataset=train, callbacks=[cb]).train()
        assert cb.monitor.accumulation == want and cb.monitor.steps == 2


def test_transformers_callback_tells_the_monitor_of_the_trainers_clipping(tmp_path):
    """The Trainer clips to args.max_grad_norm: the Monitor gets it, and each logged grad_norm
    (the norm before clipping) with the loss, at the step it was logged; without clipping
    (max_grad_norm=0, or inf: the Trainer then only measures the norm), no clip factor."""
    from transformers import Trainer

    from curvscope.integrations.transformers import CurvscopeTrainerCallback

    ids, labels, train = _hf_data(16)
    for max_norm in (0.01, 0.0, float("inf")):
        cb = CurvscopeTrainerCallback(None, {"input_ids": ids[:8], "labels": labels[:8]}, every=2)
        args = _hf_args(tmp_path, max_grad_norm=max_norm)
        trainer = Trainer(model=_tiny_bert(), args=args, train_dataset=train, callbacks=[cb])
        trainer.train()
        if max_norm in (0.0, float("inf")):  # no clipping (inf: the norm only measured)
            assert cb.monitor.max_grad_norm is None
            assert all("clip_factor" not in d.evidence for d in cb.monitor.history)
            continue
        norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
        assert cb.monitor.max_grad_norm == 0.01 and len(norms) == 4
        # each step's norm reaches the Monitor at that step: the probe at 2 has steps 1 and 2's
        expected = _medians_of_clip_factors(norms, 0.01, [(0, 2), (2, 4)])
        assert expected[0] < 1
        for d, s in zip(cb.monitor.history, expected, strict=True):
            assert d.evidence["clip_factor"] == pytest.approx(s, rel=1e-9)
            assert d.evidence["stability_limit"] == pytest.approx(38 / (1e-3 * s), rel=1e-9)


def test_transformers_callback_hands_each_logged_loss_over_once(tmp_path):
    """The Trainer's callbacks see the loss only as it is logged (the mean over logging_steps,
    after on_step_end): each logged loss reaches the Monitor once, at the step it was logged
    (a new user's run: logging_steps copies of one window's mean, one step late; then one
    step late, once — an outside review: the first probe of a clipped run had no norm yet)."""
    from transformers import Trainer, TrainingArguments

    from curvscope.integrations.transformers import CurvscopeTrainerCallback

    model = _tiny_bert()
    ids, labels, train = _hf_data(32)
    probe = {"input_ids": ids[:8], "labels": labels[:8]}
    cb = CurvscopeTrainerCallback(None, probe, every=5, log=tmp_path / "hf.jsonl")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=10,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        logging_steps=5,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[cb])
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert cb.monitor.steps == 10
    assert cb.monitor.losses == pytest.approx(logged)  # steps 5's and 10's, at steps 5 and 10
    _, records = read_log(tmp_path / "hf.jsonl")
    assert [r["step"] for r in records] == [5, 10]
    assert all(r["clip_norms"] == 1 and r["clip_factor"] is not None for r in records)


def test_transformers_callback_takes_the_first_loss_at_the_start_when_logs_are_means(tmp_path):
    """An outside review: logging every 5 steps, the Monitor's first loss was the first
    window's mean — 2,567 for a run that started at 3 and blew up inside that window — and
    the run never read *diverged*. The first loss is then the probe data's at the start."""
    import copy

    from transformers import Trainer

    from curvscope.integrations.transformers import CurvscopeTrainerCallback

    ids, labels, train = _hf_data(32)
    probe = {"input_ids": ids[:8], "labels": labels[:8]}
    model = _tiny_bert()
    start = cs.Curvature(copy.deepcopy(model), None, probe).loss_and_gradient()[0]
    for steps, expected in ((5, start), (1, None)):
        cb = CurvscopeTrainerCallback(None, probe, every=5)
        args = _hf_args(tmp_path, max_steps=5, logging_steps=steps)
        Trainer(model=copy.deepcopy(model), args=args, train_dataset=train, callbacks=[cb]).train()
        if expected is None:  # logged every step: the first step's own loss
            assert cb.monitor.first_loss == pytest.approx(cb.monitor.losses[0])
        else:
            assert cb.monitor.first_loss == pytest.approx(expected, rel=1e-6)


def test_transformers_callback_takes_epoch_logs_at_the_next_step(tmp_path):
    """logging_strategy="epoch" logs at on_epoch_end, after the step was recorded: its loss and
    norm reach the Monitor at the next step (a second review: they were dropped, every probe
    judged unclipped steps and no loss was read)."""
    from transformers import Trainer

    from curvscope.integrations.transformers import CurvscopeTrainerCallback

    ids, labels, train = _hf_data(16)
    cb = CurvscopeTrainerCallback(None, {"input_ids": ids[:8], "labels": labels[:8]}, every=4)
    # three epochs of four steps
    args = _hf_args(tmp_path, max_steps=12, max_grad_norm=0.01, logging_strategy="epoch")
    trainer = Trainer(model=_tiny_bert(), args=args, train_dataset=train, callbacks=[cb])
    with pytest.warns(UserWarning, match="no finite gradient norm"):  # the probe at step 4
        trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    assert [h["step"] for h in logged] == [4, 8, 12]
    assert cb.monitor.steps == 12 and cb.monitor.losses == pytest.approx(
        [logged[0]["loss"], logged[1]["loss"]]
    )
    clips = [d.evidence.get("clip_factor") for d in cb.monitor.history]
    assert clips[0] is None and clips[1] == pytest.approx(
        min(1, 0.01 / (logged[0]["grad_norm"] + 1e-6))
    )


def test_transformers_callback_follows_a_resumed_run(tmp_path):
    """resume_from_checkpoint: the Monitor's steps go on from the Trainer's (its log records
    were at steps 2 and 4 of a run resumed at 6 before: a second review)."""
    from transformers import Trainer

    from curvscope.integrations.transformers import CurvscopeTrainerCallback

    ids, labels, train = _hf_data(48)
    saving = {"save_strategy": "steps", "save_steps": 6, "logging_steps": 2}
    args = _hf_args(tmp_path, max_steps=6, **saving)
    Trainer(model=_tiny_bert(), args=args, train_dataset=train).train()
    cb = CurvscopeTrainerCallback(None, {"input_ids": ids[:8], "labels": labels[:8]}, every=2)
    args = _hf_args(tmp_path, max_steps=10, **saving)
    trainer = Trainer(model=_tiny_bert(), args=args, train_dataset=train, callbacks=[cb])
    trainer.train(resume_from_checkpoint=True)
    assert cb.monitor.steps == trainer.state.global_step == 10
    assert cb.monitor.probe_steps == [8, 10]


@pytest.mark.parametrize("mode", [{"log_mode": "a"}, {}])
def test_a_crashed_run_retried_with_the_same_callback_writes_to_the_same_log(tmp_path, mode):
    """A training step that raised left each callback's Monitor open — Lightning and the
    Trainer call no end-of-training hook then — so its log stayed locked and the user's retry
    with the same callback raised LogInUseError (a review). Lightning's on_exception closes
    it; both callbacks close a Monitor still open when training starts again. With the
    default log_mode="x" the retry was refused the file its first attempt made (an outside
    review): a retry appends to its own log."""
    from transformers import Trainer, TrainerCallback

    from curvscope.integrations.lightning import CurvscopeCallback
    from curvscope.integrations.transformers import CurvscopeTrainerCallback

    case = cases.mlp(n=32)
    log = tmp_path / "lightning.jsonl"
    cb = CurvscopeCallback(nn.CrossEntropyLoss(), case.data, every=1, log=log, **mode)
    with pytest.raises(RuntimeError, match="simulated"):
        _fit_lightning(tmp_path, max_steps=4, every=1, batch_size=8, callback=cb, crash_at=2)
    _fit_lightning(tmp_path, max_steps=4, every=1, batch_size=8, callback=cb)
    assert cs.diagnosis.runlog.count_runs(log) == 2

    ids, labels, train = _hf_data(16)
    crash = [True]

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if crash[0] and state.global_step >= 2:
                raise RuntimeError("out of memory (simulated)")

    log = tmp_path / "hf.jsonl"
    hf = CurvscopeTrainerCallback(
        lambda out, y: nn.functional.cross_entropy(out.logits, y),
        ({"input_ids": ids}, labels),
        every=1,
        log=log,
        **mode,
    )
    trainer = Trainer(
        model=_tiny_bert(), args=_hf_args(tmp_path), train_dataset=train, callbacks=[hf, Crash()]
    )
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.train()
    crash[0] = False
    trainer.train()
    assert cs.diagnosis.runlog.count_runs(log) == 2
