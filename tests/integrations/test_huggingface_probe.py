"""``curvscope probe`` on a Hugging Face model as it comes: ``--model`` and ``--data`` factories
returning a tiny GPT-2 and dict batches, no ``--loss`` (the model's own), with the diagnosis,
the HTML report, and an AdamW state from a real ``transformers.Trainer`` checkpoint."""

import json
import sys

import pytest
import torch

import curvscope as cs
from curvscope.cli import main

transformers = pytest.importorskip("transformers")

MOD = "curvscope_hf_probe_code"  # a name no other test imports


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


USER_CODE = """
import os

import torch
import transformers


def model():
    saved = os.environ.get("CURVSCOPE_TEST_CHECKPOINT")
    if saved:  # the Trainer's checkpoint folder: from_pretrained reads it, nothing downloaded
        return transformers.GPT2LMHeadModel.from_pretrained(saved)
    config = transformers.GPT2Config(
        vocab_size=13, n_positions=16, n_embd=8, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(config)


def data():
    # two dict batches of 3 and 2 sequences, the first right-padded: 16 and 8 target tokens
    g = torch.Generator().manual_seed(0)
    out = []
    for n, s, pad in ((3, 7, 2), (2, 5, 0)):
        ids = torch.randint(1, 13, (n, s), generator=g)
        mask = torch.ones_like(ids)
        mask[0, s - pad :] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out
"""


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    (tmp_path / f"{MOD}.py").write_text(USER_CODE)
    monkeypatch.delitem(sys.modules, MOD, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CURVSCOPE_TEST_CHECKPOINT", raising=False)
    sys.path.insert(0, str(tmp_path))
    yield sys.modules.setdefault(MOD, __import__(MOD))
    sys.path.remove(str(tmp_path))
    sys.modules.pop(MOD, None)


ARGV = ["probe", "--model", f"{MOD}:model", "--data", f"{MOD}:data"]


@pytest.mark.slow
def test_probe_on_gpt2_with_its_own_loss_and_a_report(user_code, tmp_path, capsys):
    assert main([*ARGV, "--lr", "0.1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    model, batches = user_code.model(), user_code.data()
    with torch.no_grad():
        own = [(float(model(**b).loss), int((b["labels"][:, 1:] != -100).sum())) for b in batches]
    assert [n for _, n in own] == [16, 8]
    expected = sum(v * n for v, n in own) / 24  # the mean over the 24 target tokens
    assert res["evidence"]["loss"] == pytest.approx(expected, rel=1e-5)
    assert res["num_params"] == sum(p.numel() for p in model.parameters())  # wte once
    d = cs.diagnose(model, None, batches, lr=0.1)
    assert res["state"] == d.state
    assert res["evidence"]["sharpness"] == pytest.approx(d.evidence["sharpness"], rel=1e-6)
    assert main([*ARGV, "--lr", "0.1", "--report", str(tmp_path / "report")]) == 0
    assert "curvature products" in capsys.readouterr().out
    assert (tmp_path / "report" / "report.html").exists()
    assert (tmp_path / "report" / "slices.png").stat().st_size > 1000


def test_probe_judges_adamw_by_a_trainer_checkpoint(user_code, tmp_path, capsys, monkeypatch):
    """The Trainer's optimizer has two unnamed groups (weights decayed, then biases and
    norms): its optimizer.pt is mapped as the Trainer built it, and the verdict is that of
    cs.diagnose with the Trainer's own optimizer."""
    from transformers import Trainer, TrainingArguments

    model = user_code.model()
    train = [{k: v[i] for k, v in user_code.data()[1].items()} for i in range(2)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        save_strategy="steps",
        save_steps=2,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train)
    trainer.train()
    capsys.readouterr()  # the Trainer's own printout
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert len(torch.load(checkpoint / "optimizer.pt")["param_groups"]) == 2
    monkeypatch.setenv("CURVSCOPE_TEST_CHECKPOINT", str(checkpoint))
    state = ["--optimizer", "adamw", "--optimizer-state", str(checkpoint / "optimizer.pt")]
    assert main([*ARGV, *state, "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)["evidence"]
    d = cs.diagnose(trainer.model, None, user_code.data(), optimizer=trainer.optimizer)
    assert ev["preconditioned"] and ev["lr"] == pytest.approx(3e-3)
    assert ev["stability_limit"] == pytest.approx(d.evidence["stability_limit"])
    assert ev["sharpness"] == pytest.approx(d.evidence["sharpness"], rel=1e-6)
