"""The framework integrations, each with the real library: a Lightning Callback, a Hugging Face
TrainerCallback on a tiny model built here (nothing downloaded), and TensorBoard scalars."""

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


def test_lightning_callback(tmp_path):
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
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*case.data), batch_size=8)
    cb = CurvscopeCallback(nn.CrossEntropyLoss(), case.data, every=4, log=tmp_path / "run.jsonl")
    trainer = lightning.Trainer(
        max_steps=12,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
        default_root_dir=tmp_path,
    )
    trainer.fit(Module(), loader)
    assert len(cb.monitor.history) == 3
    assert cb.monitor.last.evidence["stability_limit"] == pytest.approx(3.8 / 0.1)
    _, records = read_log(tmp_path / "run.jsonl")
    assert [r["step"] for r in records] == [4, 8, 12]


def test_transformers_trainer_callback(tmp_path):
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
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=train, callbacks=[cb]).train()
    assert len(cb.monitor.history) == 2
    assert cb.monitor.last.evidence["preconditioned"]  # AdamW: the preconditioned sharpness
    assert cb.monitor.last.state in STATES
