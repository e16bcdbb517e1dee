"""``curvscope probe --optimizer adam --optimizer-state FILE``: the command line judges an Adam
run by the state ``torch.save(optimizer.state_dict(), FILE)`` wrote — the same verdict, limit
and preconditioned sharpness as ``cs.diagnose`` with that optimizer — and every state that does
not fit is one line, exit status 2."""

import json
import sys

import pytest
import torch
from torch import nn

import curvscope as cs
from curvscope.cli import main

MOD = "curvscope_cli_optimizer_state_code"  # a name no other test imports


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


USER_CODE = """
import torch
from torch import nn


def model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 3, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 2, (24,), generator=g)
"""


def _run(make_optimizer, steps=3):
    """A few steps of the user's training: the model and optimizer as they are saved."""
    ns: dict = {}
    exec(USER_CODE, ns)
    model, (X, y) = ns["model"](), ns["data"]()
    optimizer = make_optimizer(model)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
    return model, optimizer, (X, y)


@pytest.fixture
def saved(tmp_path, monkeypatch):
    """The user's module, and the model and Adam state after three steps, saved."""
    (tmp_path / f"{MOD}.py").write_text(USER_CODE)
    monkeypatch.delitem(sys.modules, MOD, raising=False)
    monkeypatch.chdir(tmp_path)
    model, opt, data = _run(lambda m: torch.optim.Adam(m.parameters(), lr=0.05, betas=(0.8, 0.99)))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save(opt.state_dict(), tmp_path / "adam.pt")
    return model, opt, data


def probe(*extra):
    return ["probe", "--model", f"{MOD}:model", "--data", f"{MOD}:data", *extra]


def test_adam_is_judged_by_its_saved_state(saved, capsys):
    model, opt, data = saved
    argv = probe("--checkpoint", "model.pt", "--optimizer", "adam", "--optimizer-state", "adam.pt")
    assert main([*argv, "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)["evidence"]
    d = cs.diagnose(model, nn.CrossEntropyLoss(), data, optimizer=opt)
    assert ev["preconditioned"] and d.evidence["preconditioned"]
    assert ev["lr"] == 0.05  # the state's own learning rate
    assert ev["stability_limit"] == pytest.approx((2 + 2 * 0.8) / (1 - 0.8) / 0.05)
    assert ev["sharpness"] == pytest.approx(d.evidence["sharpness"], rel=1e-9)
    raw = cs.diagnose(model, nn.CrossEntropyLoss(), data, lr=0.05).evidence["sharpness"]
    assert ev["sharpness"] != pytest.approx(raw, rel=1e-2)  # the premise: P⁻¹ matters here


def test_lr_replaces_the_saved_learning_rate(saved, capsys):
    argv = probe("--checkpoint", "model.pt", "--optimizer", "adam", "--optimizer-state", "adam.pt")
    assert main([*argv, "--lr", "0.01", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)["evidence"]
    assert ev["lr"] == 0.01
    assert ev["stability_limit"] == pytest.approx((2 + 2 * 0.8) / (1 - 0.8) / 0.01)


def test_a_state_of_named_groups_maps_by_name(tmp_path, monkeypatch, capsys):
    """torch saves the names of an optimizer built on named_parameters: groups in any order."""
    (tmp_path / f"{MOD}.py").write_text(USER_CODE)
    monkeypatch.delitem(sys.modules, MOD, raising=False)
    monkeypatch.chdir(tmp_path)

    def grouped(m):
        named = list(m.named_parameters())
        return torch.optim.AdamW(
            [{"params": named[2:], "lr": 0.02}, {"params": named[:2], "weight_decay": 0.0}],
            lr=0.04,
        )

    model, opt, data = _run(grouped)
    torch.save(model.state_dict(), "model.pt")
    torch.save(opt.state_dict(), "adamw.pt")
    argv = probe(
        "--checkpoint", "model.pt", "--optimizer", "adamw", "--optimizer-state", "adamw.pt"
    )
    assert main([*argv, "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)["evidence"]
    d = cs.diagnose(model, nn.CrossEntropyLoss(), data, optimizer=opt)
    assert ev["lr"] == d.evidence["lr"] == 0.04
    assert ev["sharpness"] == pytest.approx(d.evidence["sharpness"], rel=1e-9)


@pytest.mark.parametrize(
    "make,flags,message",
    [
        (None, ["--optimizer", "adam", "--lr", "0.1"], "--optimizer adam needs --optimizer-state"),
        (
            lambda opt, model: opt.state_dict(),
            ["--optimizer-state", "{f}"],
            "--optimizer-state needs --optimizer",
        ),
        (
            lambda opt, model: model.state_dict(),
            ["--optimizer", "adam", "--optimizer-state", "{f}"],
            "holds a model's state_dict, not an optimizer's state_dict",
        ),
        (
            lambda opt, model: {**opt.state_dict(), "param_groups": [{"params": [0, 1]}]},
            ["--optimizer", "adam", "--optimizer-state", "{f}"],
            "is for 2 parameters, the model has 4 that require grad",
        ),
        (
            lambda opt, model: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            ["--optimizer", "adam", "--optimizer-state", "{f}"],
            "holds momentum_buffer for '0.weight', not 'exp_avg_sq'",
        ),
        (
            lambda opt, model: {
                **opt.state_dict(),
                "state": {
                    **opt.state_dict()["state"],
                    0: {**opt.state_dict()["state"][0], "exp_avg_sq": torch.ones(2, 2)},
                },
            },
            ["--optimizer", "adam", "--optimizer-state", "{f}"],
            "its 'exp_avg_sq' for '0.weight' has shape (2, 2), the parameter (4, 3)",
        ),
        (
            lambda opt, model: torch.optim.Adam(
                [{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}]
            ),
            ["--optimizer", "adam", "--optimizer-state", "{f}"],
            "2 parameter groups of 2, 2 parameters without their names",
        ),
        (  # an Adam state for plain gd: a KeyError traceback from the stability rule
            lambda opt, model: opt.state_dict(),
            ["--optimizer", "gd", "--optimizer-state", "{f}"],
            "has parameter groups without 'momentum': it is not the state of --optimizer gd",
        ),
        (None, ["--optimizer", "adam", "--optimizer-state", "missing.pt"], "no checkpoint file"),
    ],
)
def test_a_state_that_does_not_fit_is_one_line(saved, capsys, tmp_path, make, flags, message):
    model, opt, _ = saved
    f = tmp_path / "state.pt"
    if make is not None:
        state = make(opt, model)
        if isinstance(state, torch.optim.Optimizer):  # a fresh one: step it once on the model
            model.zero_grad()
            model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
            state.step()
            state = state.state_dict()
        torch.save(state, f)
    argv = probe("--checkpoint", "model.pt", *[x.format(f=f) for x in flags])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("curvscope probe: error:") and err.count("\n") == 1
    assert message in err, err
