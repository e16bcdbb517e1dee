"""What a new user met trying the Monitor (and its forecast) on real training loops: each test
reproduces one bug found there, with the real framework.

- ``Monitor(optimizer=..., lr=...)`` is accepted, and the contradiction is raised only at the
  first probe, inside the training loop (under a framework, after the run has started).
- Lightning with gradient accumulation: the callback counts every micro-batch as a Monitor step,
  so ``every=``, the forecast's growth per step, the cheap tier's "one step later" and the run
  log's ``"step"`` are in micro-batches, not in the trainer's optimizer steps.
- The cheap tier's check raises ``FloatingPointError`` out of ``mon.step`` once training has
  overflowed (an infinite loss on the probe data), ending the user's loop where a probe would say
  *diverged* (found under the default cadence on a warm-up past the limit; a fixed
  ``update_every`` makes it deterministic).
- The Hugging Face callback passes ``mon.step`` the last loss the Trainer *logged*, at every step
  until the next log: ``logging_steps`` copies of one window's mean, one step late (``on_log``
  runs after ``on_step_end``), and none at all before the first log — ``mon.losses``, which the
  history rules read as one training loss a step, holds values that no step had.
"""

import math

import pytest
import torch
from torch import nn

import curvscope as cs
from curvscope.diagnosis import read_log
from tests import cases

pytest.importorskip("lightning")
pytest.importorskip("transformers")


def test_a_monitor_given_both_an_optimizer_and_a_rate_is_refused_at_construction():
    case = cases.mlp()
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    # diagnose refuses the pair ("give either optimizer= or lr= ..., not both"); the Monitor
    # took it and raised that at its first probe, in the middle of training
    with pytest.raises(ValueError, match="not both"):
        cs.Monitor(case.model, case.loss_fn, case.data, optimizer=opt, lr=0.1, every=1)


def test_the_cheap_tier_does_not_raise_out_of_the_loop_when_training_overflows():
    torch.manual_seed(0)
    X = torch.randn(64, 8)
    Y = X @ torch.randn(8, 1)
    model = nn.Linear(8, 1)
    loss_fn = nn.functional.mse_loss
    sharpness = cs.diagnose(model, loss_fn, (X, Y), lr=0.01).evidence["sharpness"]
    opt = torch.optim.SGD(model.parameters(), lr=10 / sharpness)  # 5x past 2/λ: overflows
    mon = cs.Monitor(model, loss_fn, (X, Y), optimizer=opt, every=30, update_every=1)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model(X), Y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        mon.step(loss)  # before: FloatingPointError at step 22 ("... is inf: not finite ...")
    assert not math.isfinite(losses[-1])
    assert mon.last.state == "diverged"


def test_lightning_callback_counts_optimizer_steps_under_gradient_accumulation(tmp_path):
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
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*case.data), batch_size=4)
    cb = CurvscopeCallback(nn.CrossEntropyLoss(), case.data, every=2, log=tmp_path / "run.jsonl")
    trainer = lightning.Trainer(
        max_steps=4,
        accumulate_grad_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
        default_root_dir=tmp_path,
    )
    trainer.fit(Module(), loader)
    assert trainer.global_step == 4
    # before: 8 Monitor steps (one per micro-batch), probes at micro-batches 2, 4, 6, 8
    assert cb.monitor.steps == trainer.global_step
    _, records = read_log(tmp_path / "run.jsonl")
    assert [r["step"] for r in records] == [2, 4]


def test_transformers_callback_does_not_repeat_a_logged_loss_at_later_steps(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from curvscope.integrations.transformers import CurvscopeTrainerCallback

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
        model = BertForSequenceClassification(config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (32, 8), generator=gen)
    labels = torch.randint(0, 2, (32,), generator=gen)
    train = [{"input_ids": ids[i], "labels": labels[i]} for i in range(32)]
    cb = CurvscopeTrainerCallback(None, {"input_ids": ids[:8], "labels": labels[:8]}, every=5)
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
    Trainer(model=model, args=args, train_dataset=train, callbacks=[cb]).train()
    losses = cb.monitor.losses
    assert losses  # the Trainer logged a loss at step 5
    # before: [l5, l5, l5, l5, l5] — the mean logged at step 5, recorded again at steps 6-10
    assert len(set(losses)) == len(losses), losses
