"""The command line under an interrupt while the lab writes its report, and the threads of
`curvscope probe` (an outside review of the command line)."""

import json
import os
import signal
import sys

import pytest
import torch

from curvscope.cli import main
from curvscope.report import plots

LAB = ["lab", "--quick", "--problems", "quadratic", "--optimizers", "gd,adam"]


def _stop_at(monkeypatch, name, how):
    """The plot function ``name`` interrupted as it starts: Ctrl-C, or a real SIGTERM."""

    def stop(*args, **kwargs):
        if how == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler raises KeyboardInterrupt
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, name, stop)


@pytest.mark.slow  # three quick labs: about 5 s
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_an_interrupt_while_the_report_is_drawn_keeps_the_finished_runs(
    tmp_path, capsys, monkeypatch
):
    """Ctrl-C or SIGTERM once the runs were done, while the plots were drawn, lost every run:
    "nothing more was written", no results.json (an outside review). Now results.json holds
    them and records the interruption as one during the runs is, with "report_cut"; the page
    has the table without plots, and no plot of an earlier report is left beside it."""
    out = tmp_path / "lab"
    assert main([*LAB, "--out", str(out)]) == 0  # an earlier, whole report in the folder
    assert (out / "profile.png").exists() and (out / "curves-quadratic.png").exists()
    capsys.readouterr()
    for how, status in (("SIGTERM", 143), ("Ctrl-C", 130)):
        with monkeypatch.context() as m:
            _stop_at(m, "performance_profiles", how)  # after the curves were drawn
            assert main([*LAB, "--out", str(out)]) == status
        said = capsys.readouterr()
        word = "terminated (SIGTERM)" if how == "SIGTERM" else "interrupted"
        assert f"{word} while writing the report (its plots left out) after 2 of 2 runs" in (
            said.err
        )
        assert "quadratic" in said.out  # the terminal's table of the runs
        res = json.loads((out / "results.json").read_text())
        expected = {"runs_done": 2, "runs_planned": 2, "report_cut": True}
        assert res["interrupted"] == (
            {**expected, "signal": "SIGTERM"} if how == "SIGTERM" else expected
        )
        assert [r["optimizer"] for r in res["runs"]] == ["gd", "adam"]
        page = (out / "report.html").read_text()
        assert f"Interrupted ({how}) while this report's plots were drawn" in page
        assert "data:image/png" not in page and "adam" in page
        assert sorted(p.name for p in out.iterdir()) == [
            ".curvscope-report-files",
            "report.html",
            "results.json",
        ]
    assert main([*LAB, "--out", str(out)]) == 0  # its own folder: a rerun is not refused
    assert json.loads((out / "results.json").read_text())["interrupted"] is None


def test_a_second_interrupt_after_the_runs_were_cut_adds_to_their_record(tmp_path, capsys):
    """Ctrl-C during the runs, then again while the report of those kept is drawn: the record
    keeps the runs' count and says the report was cut too."""
    from curvscope.lab import lab as lab_module

    real = lab_module.run_one
    calls = []

    def run_one(*args, **kwargs):
        calls.append(args[:2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "lab"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(lab_module, "run_one", run_one)
        _stop_at(m, "problem_curves", "Ctrl-C")
        assert main([*LAB, "--out", str(out)]) == 130
    res = json.loads((out / "results.json").read_text())
    assert res["interrupted"] == {"runs_done": 1, "runs_planned": 2, "report_cut": True}
    assert "interrupted while writing the report" in capsys.readouterr().err


USER = """
import torch
from torch import nn


def model():
    return nn.Linear(3, 2).double()


def data():
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(20, 3, generator=g, dtype=torch.float64)
    return inputs, torch.randint(0, 2, (20,), generator=g)
"""


def test_probe_runs_a_built_in_problem_on_one_thread_as_the_lab_does(tmp_path, monkeypatch):
    """`curvscope probe --problem digits-mlp` kept torch's two threads: on a busy 2-core
    machine its 166 products took 18-30 s against 2 s on one (an outside review). A built-in
    problem is small, as the lab's are: one thread, torch's setting put back after. A user's
    model keeps torch's setting, where threads can pay (1.4x at 2 threads on 269k parameters)."""
    from curvscope.lab import probe as probe_module

    seen = []

    def probe(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return {"state": "learning"}

    monkeypatch.setattr(probe_module, "probe", probe)
    (tmp_path / "threadsmod.py").write_text(USER)
    monkeypatch.delitem(sys.modules, "threadsmod", raising=False)
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["probe", "--problem", "breast-cancer-logreg", "--lr", "0.5", "--json"]) == 0
        assert torch.get_num_threads() == 2  # put back
        users = ["probe", "--model", "threadsmod:model", "--data", "threadsmod:data"]
        assert main([*users, "--lr", "0.5", "--json"]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2]
