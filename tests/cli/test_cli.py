"""The command line: each command, each bad input (clear message, exit status 2), the report
escaping hostile text, and one real-browser test of the lab's HTML report."""

import dataclasses
import errno
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

import curvscope as cs
from curvscope import lab
from curvscope.cli import main
from curvscope.cli.main import UsageError, parser
from curvscope.report.html import page, runs_table


@pytest.fixture(scope="module")
def quick_lab(tmp_path_factory):
    """The quick lab, its runs ended by their step budgets only: QUICK's 0.4 s a run ended
    rosenbrock's Newton-CG at step 15 of 40 on a busy machine, "stalled" where it otherwise
    finds the minimum (the outcomes asserted below are the methods', not the machine's)."""
    out = tmp_path_factory.mktemp("lab")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lab, "QUICK", dataclasses.replace(lab.QUICK, seconds=600.0))
        rc = main(
            [
                "lab",
                "--quick",
                "--out",
                str(out),
                "--problems",
                "rosenbrock,sqrt1px2,digits-mlp",
                "--optimizers",
                "gd,adam,pure-newton,newton-cg,cubic-newton",
            ]
        )
    assert rc == 0
    return out


def test_lab_writes_results_plots_and_report(quick_lab, capsys):
    res = json.loads((quick_lab / "results.json").read_text())
    assert {r["optimizer"] for r in res["runs"]} == {
        "gd",
        "adam",
        "pure-newton",
        "newton-cg",
        "cubic-newton",
    }
    by = {(r["problem"], r["optimizer"]): r for r in res["runs"]}
    assert by["sqrt1px2", "pure-newton"]["outcome"] == "diverged"
    assert by["rosenbrock", "newton-cg"]["outcome"] == "minimum"
    assert set(res["profile"]) == {"cost", "time"}
    # Adam's √v̂ against the Hessian diagonal over the parameters the data reach: the weights of
    # digits' always-blank pixels (both exactly 0) counted as perfect agreement (an outside
    # review); Spearman's ties ranked by their mean rank, as scipy does
    adam = res["mlp"]["adam_vs_hessian"]
    v, h = np.array(adam["sqrt_v"]), np.array(adam["hessian_diag"])
    reached = (v != 0) | (h != 0)
    assert adam["unreached"] == int((~reached).sum()) > 0
    a, b = np.log(np.maximum(v[reached], 1e-12)), np.log(np.maximum(np.abs(h[reached]), 1e-12))
    assert adam["spearman"] == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)
    assert adam["pearson_log"] == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-9)
    assert (quick_lab / "paths-rosenbrock.png").stat().st_size > 1000
    assert (quick_lab / "mlp-density.png").exists() and (quick_lab / "profile.png").exists()
    html = (quick_lab / "report.html").read_text()
    assert "data:image/png;base64," in html and "diverged at step" in html
    # the effective-step table says whose limit 2/λ_max is (momentum's own is 2(1+β)/λ_max:
    # its ratio above 1 read as a contradiction of its stable diagnosis, an outside review)
    assert "<th>effective step</th>" in html and "stable up to η = 2(1+β)/λ_max" in html


def test_a_lab_rerun_on_fewer_problems_leaves_none_of_the_old_plots(quick_lab, tmp_path):
    """The plots of problems not run this time stayed beside the new report (a review)."""
    out = tmp_path / "lab"
    shutil.copytree(quick_lab, out)
    (out / "mine.png").write_bytes(b"the user's")
    argv = ["lab", "--quick", "--out", str(out), "--problems", "sqrt1px2", "--optimizers", "gd"]
    assert main(argv) == 0
    assert (out / "mine.png").read_bytes() == b"the user's"
    assert {p.name for p in out.glob("*.png")} == {"curves-sqrt1px2.png", "profile.png", "mine.png"}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["lab", "--problems", "rosenbrok"], "unknown problem 'rosenbrok'; valid names"),
        (["lab", "--optimizers", "sgd"], "unknown optimizer 'sgd'; valid names: gd"),
        (["probe", "--model", "no_such_module_xyz:f", "--data", "x:y"], "cannot import"),
        (["probe", "--model", "nocolon", "--data", "x:y"], "pkg.module:name"),
        (["probe", "--problem", "rosenbrock"], "needs a model problem"),
        (["probe"], "give --problem"),
        (["report", "missing.jsonl"], "no run log"),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"curvscope {argv[0]}: error:")


def test_paths_and_scripts_the_user_can_fix_are_one_line_too(tmp_path, capsys, monkeypatch):
    """Found by an outside review: a 300-character --out or log path gave a traceback and exit 1
    (ENAMETOOLONG from Path.exists); a --model module that runs its training on import and
    calls sys.exit(0) made probe print nothing and exit 0; a log piped in as /dev/stdin was
    "no run log at"; a full disk named the output folder, not the file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.jsonl").write_text('{"curvscope_log": 1}\n{"step": 5, "state": "flat"}\n')
    long = "x" * 300
    for argv in (["report", "run.jsonl", "--out", long], ["report", f"{long}.jsonl"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error: File name too long" in err, err
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n")
    (tmp_path / "exits_when_called.py").write_text(
        "import sys\ndef model():\n    sys.exit(3)\ndef data():\n    sys.exit(3)\n"
    )
    for mod, code in (("exits_on_import", "0"), ("exits_when_called", "3")):
        monkeypatch.delitem(sys.modules, mod, raising=False)
        assert main(["probe", "--model", f"{mod}:model", "--data", f"{mod}:data"]) == 2
        err = capsys.readouterr().err
        assert f"called sys.exit({code})" in err and "__main__" in err, err
    cli = sys.modules["curvscope.cli.main"]  # (the package's `main` is the function)

    def gone(args):  # the reader of the output went away (`| head`): no error line, 141
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(cli, "_report", gone)
    assert main(["report", "run.jsonl"]) == 141 and capsys.readouterr().err == ""

    def unsupported(args):  # no errno: not the system's word on a path, so not a user error
        raise io.UnsupportedOperation("not readable")

    monkeypatch.setattr(cli, "_report", unsupported)
    with pytest.raises(io.UnsupportedOperation):
        main(["report", "run.jsonl"])
    from curvscope.report import plots

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        plots.replace_atomically(tmp_path / "report.html", full)
    assert info.value.filename == str(tmp_path / "report.html")


def test_a_run_log_is_read_from_a_pipe(tmp_path):
    """`cat run.jsonl | curvscope report /dev/stdin` said "no run log at '/dev/stdin'" (it
    checked for a regular file), though read_log reads it (an outside review)."""
    log = tmp_path / "run.jsonl"
    header = {"curvscope_log": 1}
    probe = {"step": 5, "state": "learning", "loss": 0.5, "sharpness": 2.0}
    log.write_text(json.dumps(header) + "\n" + json.dumps(probe) + "\n")
    out = tmp_path / "r"
    argv = [sys.executable, "-m", "curvscope.cli.main", "report", "/dev/stdin", "--out", str(out)]
    piped = log.read_text()  # through a pipe (a file as stdin is a regular file)
    done = subprocess.run(argv, input=piped, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "report.html").exists()


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["lab", "--quick", "--out", str(blocker / "sub"), "--problems", "saddle"]) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err
    # probe's folder is --report's: the error said "choose another with --out" (a review)
    argv = ["probe", "--problem", "digits-mlp", "--report", str(blocker / "sub")]
    assert main(argv) == 2
    assert "choose another with --report" in capsys.readouterr().err
    # a file as the folder: mkdir's "File exists" said neither what nor why (a review)
    assert main(["lab", "--quick", "--out", str(blocker), "--problems", "saddle"]) == 2
    assert f"--out {str(blocker)!r} is a file, not a folder" in capsys.readouterr().err


def test_corrupt_run_log(tmp_path, capsys):
    log = tmp_path / "run.jsonl"
    log.write_text('{"step": 1, "state": "learning"}\n{not json\n')
    assert main(["report", str(log), "--out", str(tmp_path / "r")]) == 2
    assert "line 2, column 2: not valid JSON" in capsys.readouterr().err
    log.write_text('{"hello": 1}\n')
    assert main(["report", str(log), "--out", str(tmp_path / "r")]) == 2
    assert "not a run log a Monitor wrote" in capsys.readouterr().err
    log.write_text('{"step": 1, "loss": 0.5, "acc": 0.9}\n')  # another tool's metrics
    assert main(["report", str(log), "--out", str(tmp_path / "r")]) == 2
    assert "not a run log a Monitor wrote" in capsys.readouterr().err


def test_report_renders_a_monitor_log(tmp_path, capsys):
    p = cs.problems.get("digits-mlp", hidden=8, n=200)
    model = p.make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    log = tmp_path / "run.jsonl"
    mon = cs.Monitor(model, p.loss_fn, p.data, optimizer=opt, every=5, log=str(log))
    X, y = p.data
    for _ in range(15):
        opt.zero_grad()
        loss = p.loss_fn(model(X), y)
        loss.backward()
        opt.step()
        mon.step(loss)
    mon.close()
    assert main(["report", str(log), "--out", str(tmp_path / "r")]) == 0
    html = (tmp_path / "r" / "report.html").read_text()
    assert "State timeline" in html and "data:image/png;base64," in html
    assert (tmp_path / "r" / "layers.png").exists()  # per-layer attribution from the log
    # a process killed mid-write: the intact records are reported, the cut one said in a line
    capsys.readouterr()
    with log.open("a") as f:
        f.write('{"step": 20, "state": "lea')
    assert main(["report", str(log), "--out", str(tmp_path / "r2")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("curvscope report: warning: ")
    assert (tmp_path / "r2" / "report.html").exists()
    # a second report into the same folder, of a log without per-layer shares: the first's
    # layers.png went (it sat beside the new page as if it were its); a file of the user's stays
    (tmp_path / "r" / "notes.txt").write_text("mine")
    lines = [json.loads(line) for line in log.read_text().splitlines()[:-1]]
    bare = tmp_path / "bare.jsonl"
    kept = [{k: v for k, v in r.items() if k != "layer_shares"} for r in lines]
    bare.write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert main(["report", str(bare), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "log.png").exists() and (tmp_path / "r" / "notes.txt").exists()
    assert not (tmp_path / "r" / "layers.png").exists()


def test_report_of_a_log_holding_several_runs_says_which_and_picks_with_run(tmp_path, capsys):
    """Appended runs: the page showed the last without saying the file held others, and a last
    run killed before its first probe refused the whole file as "not a Monitor log" (a
    review). Now the report says which run it shows, --run picks one, and an empty last run
    names --run."""
    log = tmp_path / "runs.jsonl"
    header = '{"curvscope_log": 1}\n'
    probe = '{"step": %d, "state": "learning", "cause": "cadence"}\n'
    log.write_text(header + probe % 5 + probe % 10 + header + probe % 5)
    capsys.readouterr()
    assert main(["report", str(log), "--out", str(tmp_path / "a")]) == 0
    assert "holds 2 runs; reporting run 1 (--run 0 to 1" in capsys.readouterr().err
    assert main(["report", str(log), "--run", "0", "--out", str(tmp_path / "b")]) == 0
    assert "reporting run 0" in capsys.readouterr().err
    for folder, run in (("a", 1), ("b", 0)):  # the page says it too, not only stderr
        page = (tmp_path / folder / "report.html").read_text(encoding="utf-8")
        assert f"{run} of the 2 in this log" in page
    assert main(["report", str(log), "--run", "2", "--out", str(tmp_path / "c")]) == 2
    assert "--run 2:" in capsys.readouterr().err
    with log.open("a") as f:  # a third run, killed before its first probe
        f.write(header)
    assert main(["report", str(log), "--out", str(tmp_path / "d")]) == 2
    assert "run 2 of the 3" in capsys.readouterr().err
    log.write_text(header)  # one run, killed before its first probe: it is a Monitor log
    assert main(["report", str(log), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "the run in" in err and "no probe records yet" in err and "Monitor log?" not in err


def test_report_reads_a_log_once(tmp_path, monkeypatch):
    """A long log was read and parsed twice (once to count its runs, once to read one)."""
    import pathlib

    log = tmp_path / "runs.jsonl"
    header = '{"curvscope_log": 1}\n'
    probe = '{"step": %d, "state": "learning", "cause": "cadence"}\n'
    log.write_text(header + probe % 5 + header + probe % 5 + probe % 10)
    reads = []
    read_bytes = pathlib.Path.read_bytes

    def counted(self):
        reads.append(self)
        return read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", counted)
    assert main(["report", str(log), "--run", "0", "--out", str(tmp_path / "r")]) == 0
    assert reads.count(log) == 1


def test_probe_json_is_valid_json_when_a_number_is_not_finite(capsys):
    """A learning rate of 1e-320 has an infinite limit: --json printed Infinity, which JSON
    does not have (a review); non-finite numbers are their strings, as in the run log."""
    args = ["probe", "--problem", "breast-cancer-logreg", "--lr", "1e-320", "--json"]
    assert main(args) == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    res = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert res["evidence"]["stability_limit"] == "inf"


def test_an_output_file_that_cannot_be_overwritten_is_one_line(tmp_path, capsys, monkeypatch):
    """A report.html in the output folder that is not ours to overwrite (another user's, in a
    shared folder) was a traceback (a review): one line naming the file and --out."""
    from curvscope import report as reports

    log = tmp_path / "run.jsonl"
    log.write_text('{"curvscope_log": 1}\n{"step": 5, "state": "learning", "cause": "cadence"}\n')

    def refused(*args, **kwargs):  # what writing over a file mode 444 of another user raises
        raise PermissionError(13, "Permission denied", str(tmp_path / "r" / "report.html"))

    monkeypatch.setattr(reports, "write_log_report", refused)
    capsys.readouterr()
    assert main(["report", str(log), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err and "report.html" in err
    assert "Permission denied" in err and "--out" in err


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch, tmp_path):
    """Ctrl-C during the lab printed a KeyboardInterrupt traceback (a review)."""
    from curvscope import lab

    monkeypatch.chdir(tmp_path)  # the default --out, curvscope-lab/, is made here

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lab, "run_lab", interrupted)
    assert main(["lab", "--quick", "--problems", "quadratic", "--optimizers", "gd"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_ctrl_c_mid_lab_keeps_the_finished_runs(tmp_path, capsys, monkeypatch):
    """Ctrl-C twenty minutes into the lab lost every finished run (a review): now the report
    and results.json hold them, say that the lab was interrupted, and the status is 130."""
    from curvscope.lab import lab as lab_module

    calls, real = [], lab_module.run_one

    def run_one(*args, **kwargs):
        calls.append(args[:2])
        if len(calls) == 3:  # the first run of the second problem
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lab_module, "run_one", run_one)
    out = tmp_path / "lab"
    argv = ["lab", "--quick", "--out", str(out), "--problems", "quadratic,saddle"]
    assert main([*argv, "--optimizers", "gd,adam"]) == 130
    said = capsys.readouterr()
    assert "interrupted after 2 of 4 runs; wrote the finished ones" in said.err
    assert "results.json" in said.err and "quadratic" in said.out  # their table too (a review)
    res = json.loads((out / "results.json").read_text())
    assert res["interrupted"] == {"runs_done": 2, "runs_planned": 4}
    assert [(r["problem"], r["optimizer"]) for r in res["runs"]] == [
        ("quadratic", "gd"),
        ("quadratic", "adam"),
    ]
    assert [p["name"] for p in res["problems"]] == ["quadratic"]  # none of saddle's finished
    assert "Interrupted (Ctrl-C) after 2 of the 4 runs" in (out / "report.html").read_text()
    calls[:] = [None, None]  # the next run is interrupted: run_lab raises a KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt) as info:
        lab_module.run_lab(["saddle"], ["gd"], budget=cs.lab.QUICK)
    assert info.value.results["runs"] == [] and info.value.results["problems"] == []
    calls[:] = [None, None]  # no run finished: nothing is written
    assert main(["lab", "--quick", "--out", str(tmp_path / "none"), "--problems", "saddle"]) == 130
    assert "nothing more was written" in capsys.readouterr().err
    assert not (tmp_path / "none" / "results.json").exists()


def test_an_interrupted_labs_profile_is_over_the_problems_every_method_ran(
    tmp_path, capsys, monkeypatch
):
    """Stopped after gd's run of the second problem, the profile counted Newton-CG's run there,
    which never happened, as a failure: it solved every problem it ran and topped out at 0.5
    (an outside review). The profile is over the problems every method ran, and names them;
    results.json is strict JSON, its profile's non-finite ratios as strings (a bare Infinity,
    which JavaScript's JSON.parse refuses, was in almost every lab's: the same review)."""
    from curvscope.lab import lab as lab_module

    calls, real = [], lab_module.run_one

    def run_one(*args, **kwargs):
        calls.append(args[:2])
        if len(calls) == 4:  # Newton-CG's run of the second problem
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lab_module, "run_one", run_one)
    monkeypatch.setattr(lab, "QUICK", dataclasses.replace(lab.QUICK, seconds=600.0))
    out = tmp_path / "lab"
    argv = ["lab", "--quick", "--out", str(out), "--problems", "quadratic,least-squares"]
    assert main([*argv, "--optimizers", "gd,newton-cg"]) == 130

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    res = json.loads((out / "results.json").read_text(), parse_constant=refuse)
    assert [(r["problem"], r["optimizer"]) for r in res["runs"]] == calls[:3]
    for axis in ("cost", "time"):
        prof = res["profile"][axis]
        assert prof["problems"] == ["quadratic"]
        assert prof["ratios"]["newton-cg"] == [1.0] and prof["curves"]["newton-cg"][-1] == 1.0
        assert prof["ratios"]["gd"] == ["inf"]  # stalled: never solved it


def test_the_labs_progress_goes_to_stderr_naming_the_runs_done(tmp_path, monkeypatch):
    """The bar was on stdout, so `curvscope lab > table.txt` showed none, and its label named
    the run just finished as if it were running (an outside review)."""
    import rich.progress

    seen = []

    class Seen(rich.progress.Progress):
        def update(self, task, **kwargs):
            seen.append((self.console.stderr, kwargs.get("description")))
            return super().update(task, **kwargs)

    monkeypatch.setattr(rich.progress, "Progress", Seen)
    argv = ["lab", "--quick", "--out", str(tmp_path / "lab"), "--problems", "quadratic"]
    assert main([*argv, "--optimizers", "gd,adam"]) == 0
    assert seen == [(True, "done: quadratic: gd"), (True, "done: quadratic: adam")]


def test_probe_on_a_built_in_problem(tmp_path, capsys):
    assert main(["probe", "--problem", "breast-cancer-logreg", "--lr", "0.5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["num_params"] == 31 and res["dense_hessian_bytes"] == 8 * 31 * 31
    assert res["state"] in {"learning", "unstable", "minimum", "flat"}
    assert main(["probe", "--problem", "breast-cancer-logreg", "--report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "curvature products" in text and "7.5 KiB (8n² bytes)" in text  # 8·31² bytes
    assert (tmp_path / "slices.png").exists() and (tmp_path / "report.html").exists()
    page = (tmp_path / "report.html").read_text(encoding="utf-8")  # what the terminal says
    assert "extreme eigenvalues" in page and "curvature products in" in page
    said, listed = page.split("<p>")[1].split("</p>")[0], page.split("<li>")[1:]
    assert not any(item.split("</li>")[0] in said for item in listed)  # advice said once


def test_probe_momentum_takes_its_beta(capsys):
    """--optimizer momentum judged every run at β = 0.9, said nowhere (an outside review): the
    help says so, and --momentum sets it — the limit 2(1 + β)/lr."""
    for beta, limit in ((None, 38.0), ("0.5", 30.0)):
        more = [] if beta is None else ["--momentum", beta]
        argv = ["probe", "--problem", "breast-cancer-logreg", "--optimizer", "momentum"]
        assert main([*argv, "--lr", "0.1", *more, "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["evidence"]["stability_limit"] == pytest.approx(limit)


def test_probe_imports_the_users_model_and_checkpoint(tmp_path, capsys, monkeypatch):
    (tmp_path / "usermod.py").write_text(
        "import torch\n"
        "def model():\n    return torch.nn.Linear(3, 2).double()\n"
        "def data():\n    g = torch.Generator().manual_seed(0)\n"
        "    return torch.randn(20, 3, generator=g, dtype=torch.float64), "
        "torch.randint(0, 2, (20,), generator=g)\n"
    )
    torch.save(torch.nn.Linear(3, 2).double().state_dict(), tmp_path / "ck.pt")
    monkeypatch.chdir(tmp_path)
    argv = ["probe", "--model", "usermod:model", "--data", "usermod:data", "--checkpoint", "ck.pt"]
    assert main(argv) == 0
    assert "cost:" in capsys.readouterr().out


# ------------------------------------------------------------- user errors: one line, exit 2
USER_CODE = """
import math
import torch
from torch import nn


def _gen():
    return torch.Generator().manual_seed(0)


def model():
    return nn.Linear(3, 2).double()


def frozen():
    return model().requires_grad_(False)


def data():
    g = _gen()
    X = torch.randn(20, 3, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 2, (20,), generator=g)


def nan_data():
    X, y = data()
    X[3, 1] = float("nan")
    return X, y


def two_columns():
    X, y = data()
    return X[:, :2], y


def not_data():
    return "data.csv"


def three_tensors():
    X, y = data()
    return X, y, torch.ones(20, dtype=torch.float64)


def labels_out_of_range():
    X, y = data()
    return X, y + 5


def boom():
    raise RuntimeError("the user's factory broke")


def not_a_model():
    return 42


def not_a_loss():
    return "cross-entropy"


class RootSumLoss(nn.Module):
    # neither a mean nor a sum over samples, under a name the library does not know
    reduction = "rootsum"

    def forward(self, out, y):
        return nn.functional.cross_entropy(out, y, reduction="sum") / math.sqrt(len(y))


def root_sum_loss():
    return RootSumLoss()


class TokenModel(nn.Module):
    # a Hugging Face-like model: keyword inputs
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask[..., None]
        return self.head(torch.tanh(h.sum(1) / attention_mask.sum(1, keepdim=True)))


def token_model():
    torch.manual_seed(0)
    return TokenModel().double()


def token_data():
    g = _gen()
    ids = torch.randint(0, 7, (12, 5), generator=g)
    mask = torch.ones(12, 5, dtype=torch.float64)
    mask[::3, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 2, (12,), generator=g)


def two_batches():
    X, y = data()
    return [(X[:12], y[:12]), (X[12:], y[12:])]
"""

MOD = "curvscope_cli_user_code"  # a name no other test imports (modules are cached by name)


class Evil:
    """A pickle that would create a file if loaded unsafely."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """The user's module and checkpoints in a fresh working directory."""
    (tmp_path / f"{MOD}.py").write_text(USER_CODE)
    monkeypatch.delitem(sys.modules, MOD, raising=False)
    monkeypatch.chdir(tmp_path)
    right = torch.nn.Linear(3, 2).double().state_dict()
    torch.save(right, "right.pt")
    torch.save({"weight": right["weight"]}, "missing-bias.pt")
    torch.save({"weight": torch.zeros(4, 3), "bias": torch.zeros(4)}, "wide.pt")
    torch.save(torch.zeros(2, 3), "bare-tensor.pt")
    torch.save({"model": right, "epoch": 3}, "wrapped.pt")
    torch.save(Evil(tmp_path / "pwned"), "evil.pt")
    return tmp_path


def _user(model="model", data="data", *more):
    return ["probe", "--model", f"{MOD}:{model}", "--data", f"{MOD}:{data}", *more]


@pytest.mark.parametrize(
    "argv,message",
    [
        # the fifteen of issue 12.4
        (["probe", "--problem", "digits-mlp", "--lr", "0"], "--lr: must be a finite number > 0"),
        (["probe", "--problem", "digits-mlp", "--lr=-1"], "got '-1'"),
        (["probe", "--problem", "digits-mlp", "--lr", "nan"], "got 'nan'"),
        (["probe", "--problem", "digits-mlp", "--lr", "inf"], "got 'inf'"),
        (["probe", "--problem", "digits-mlp", "--optimizer", "momentum", "--lr=-1"], "--lr"),
        (_user("model", "data", "--checkpoint", "missing-bias.pt"), "keys missing 'bias'"),
        (_user("model", "data", "--checkpoint", "wide.pt"), "'weight' has shape (4, 3) there"),
        (_user("model", "data", "--checkpoint", "bare-tensor.pt"), "holds a Tensor, not a"),
        (_user("frozen"), "no parameter that requires grad"),
        (_user("model", "nan_data"), "contains NaN or Inf"),
        (_user("model", "data", "--loss", f"{MOD}:root_sum_loss"), "reduction"),
        (_user("boom"), "raised RuntimeError: the user's factory broke"),
        (_user("not_a_model"), "returned an int, not a torch.nn.Module"),
        (_user("model", "not_data"), "not an (inputs, targets) pair"),
        (_user("model", "three_tensors"), "data holds 3 tensors: one batch is a pair"),
        (_user("model", "labels_out_of_range"), "check that the targets fit the outputs"),
        # the rest
        (["probe", "--problem", "digits-mlp", "--checkpoint", "right.pt"], "--checkpoint would"),
        (["lab", "--problems", ","], "--problems: expected comma-separated names"),
        (["lab", "--optimizers", "gd,,adam"], "an empty name in 'gd,,adam'"),
        (["lab", "--problems", "saddle,rosenbrock,saddle"], "saddle named twice in"),
        (["lab", "--out", ""], "--out: an empty path ''"),  # it wrote into the working folder
        (["report", "."], "'.' is a folder; give the run log file in it"),
        (["probe", "--problem", "saddle", "--lr", "1", "--momentum", "1"], "must be in [0, 1)"),
        (
            [
                "probe",
                "--problem",
                "digits-mlp",
                "--optimizer",
                "gd",
                "--lr",
                "1",
                "--momentum",
                "0.5",
            ],
            "--momentum sets the β of --optimizer momentum",
        ),
        (["report", "run.jsonl", "--out", " "], "--out: an empty path"),
        (_user("model", "data", "--checkpoint", "wrapped.pt"), "look to be under 'model'"),
        (_user("model", "data", "--checkpoint", "nothing.pt"), "no checkpoint file at"),
        (_user("model", "two_columns"), "the model fails on the first batch"),
        (_user("model", "data", "--loss", f"{MOD}:not_a_loss"), "returned a str, which cannot"),
        (_user("model", "data", "--loss", f"{MOD}:not_a_model"), "returned an int, which"),
        (_user("model", "data", "--optimizer", "gd"), "--optimizer gd needs --lr"),
        (["probe", "--problem", "digits-mlp", "--optimizer", "lbfgs", "--lr", "1"], "choose from"),
        (
            ["probe", "--problem", "digits-mlp", "--optimizer", "adam", "--lr", "1"],
            "--optimizer adam needs --optimizer-state FILE",
        ),
        (["probe", "--problem", "digits-mlp", "--lr", "fast"], "expected a number, got 'fast'"),
        (["probe", "--model", f"{MOD}:data_", "--data", f"{MOD}:data"], "has no attribute"),
        (["probe", "--model", f"{MOD}:", "--data", f"{MOD}:data"], "pkg.module:name"),
    ],
)
def test_every_user_error_is_one_line_and_exit_2(argv, message, user_code, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.endswith("\n"), err  # one line
    assert err.startswith(f"curvscope {argv[0]}: error: "), err
    assert message in err, err
    assert "Traceback" not in err and captured.out == ""


def test_reduction_declares_what_a_users_loss_does(user_code, capsys):
    """The error for a loss whose reduction cannot be told said "pass reduction= to Curvature,
    diagnose or Monitor", which the command line had no way to (an outside review)."""
    argv = _user("model", "data", "--loss", f"{MOD}:root_sum_loss")
    assert main(argv) == 2 and "--reduction on the command line" in capsys.readouterr().err
    assert main([*argv, "--reduction", "mean", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] in cs.diagnosis.STATES


def test_a_malicious_checkpoint_is_refused_in_one_line(user_code, capsys):
    assert main(_user("model", "data", "--checkpoint", "evil.pt")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was refused" in err and "system" in err
    assert "weights_only" not in err  # no advice to load it unsafely
    assert not (user_code / "pwned").exists()  # nothing in it ran


def test_report_on_a_log_with_wrong_field_types(tmp_path, capsys):
    log = tmp_path / "run.jsonl"
    log.write_text(
        '{"step": 1, "state": "learning", "loss": 1.0, "advice": 3}\n'
        '{"step": 2, "state": "learning", "loss": 0.5, "advice": 3}\n'
    )
    assert main(["report", str(log), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("curvscope report: error: ")
    assert "run.jsonl" in err and "advice" in err


def test_debug_shows_the_traceback(user_code):
    with pytest.raises(UsageError) as info:
        main([*_user("model", "nan_data"), "--debug"])
    assert isinstance(info.value.__cause__, ValueError)  # the library's refusal, chained
    with pytest.raises(SystemExit):  # argparse's errors stay argparse's
        parser().parse_args(["probe", "--lr", "0", "--debug"])


def test_debug_before_the_command_counts_too(tmp_path):
    # `curvscope --debug report ...` as well as `curvscope report ... --debug`
    missing = str(tmp_path / "none.jsonl")
    for argv in (["--debug", "report", missing], ["report", missing, "--debug"]):
        with pytest.raises(UsageError, match="no run log"):
            main(argv)
    assert main(["report", missing]) == 2  # and without it, one line


def test_version_names_curvscope_and_torch(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"curvscope {cs.__version__} (torch {torch.__version__})"


def test_a_bug_with_a_built_in_problem_keeps_its_traceback(monkeypatch):
    # with a built-in model and validated flags, a ValueError is curvscope's own bug: it
    # propagates (a traceback, exit 1) instead of passing for the user's mistake
    import curvscope.lab.probe

    def buggy(*args, **kwargs):
        raise ValueError("a bug in curvscope")

    monkeypatch.setattr(curvscope.lab.probe, "probe", buggy)
    with pytest.raises(ValueError, match="a bug in curvscope"):
        main(["probe", "--problem", "breast-cancer-logreg", "--lr", "0.5"])


def test_user_errors_end_to_end(user_code):
    """The real entry point: one line on stderr (torch's warning about the pickle protocol of a
    plain pickle silenced too), exit status 2, nothing on stdout, nothing run."""
    with open(user_code / "evil.pkl", "wb") as f:
        pickle.dump(Evil(user_code / "pwned"), f, protocol=4)
    run = subprocess.run(
        [sys.executable, "-m", "curvscope.cli", *_user("model", "data", "--checkpoint=evil.pkl")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=user_code,
    )
    assert run.returncode == 2 and run.stdout == ""
    assert len(run.stderr.splitlines()) == 1, run.stderr
    assert run.stderr.startswith("curvscope probe: error: the checkpoint 'evil.pkl' was refused")
    assert not (user_code / "pwned").exists()


def test_python_dash_m_curvscope_is_the_command_line():
    """``python -m curvscope`` is the ``curvscope`` script (it was "No module named
    curvscope.__main__"; only ``python -m curvscope.cli`` ran)."""
    run = subprocess.run(
        [sys.executable, "-m", "curvscope", "probe", "--problem", "no-such-problem", "--lr", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and run.stdout == "", run.stderr
    assert run.stderr.startswith("curvscope probe: error:"), run.stderr


# ---------------------------------------------------------------------- probe --report data
def test_probe_report_with_dict_inputs(user_code, capsys):
    """Hugging Face-style models take their inputs as keywords: the slices run them so."""
    argv = _user("token_model", "token_data", "--report", "rep", "--json")
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["slices"]) == {"gradient", "top eigenvector", "bottom eigenvector"}
    assert (user_code / "rep" / "slices.png").exists()


def _flat_loss(model, loss_fn, batches):
    """Σ_b (N_b/N) loss_b as a function of the flat parameter vector (the dense reference)."""
    from torch.func import functional_call

    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    total = sum(len(y) for _, y in batches)

    def f(theta):
        params, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            params[k] = theta[i : i + s.numel()].reshape(s)
            i += s.numel()
        return sum(
            len(y) / total * loss_fn(functional_call(model, params, (X,)), y) for X, y in batches
        )

    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return f, theta0


def test_probe_slices_of_a_list_of_two_batches_against_dense_references():
    """A list of two (X, y) batches is two batches, not an (X, y) pair: the slices are the
    loss over both (weighted by their sizes), the slope and curvature the dense ones."""
    from torch.func import grad, jacfwd

    from curvscope.lab.probe import SLICE_POINTS, probe, slice_losses

    g = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)
    ).double()
    X = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (20,), generator=g)
    batches = [(X[:12], y[:12]), (X[12:], y[12:])]
    loss_fn = torch.nn.CrossEntropyLoss()
    res = probe(model, loss_fn, batches, lr=0.1, slices=True)

    f, theta0 = _flat_loss(model, loss_fn, batches)
    gradient = grad(f)(theta0)
    H = jacfwd(grad(f))(theta0)
    evals = torch.linalg.eigvalsh(H)
    v = -gradient / gradient.norm()
    along = res["slices"]["gradient"]
    assert len(along["t"]) == len(along["loss"]) == SLICE_POINTS
    assert abs(along["slope"] + float(gradient.norm())) < 1e-10
    assert abs(along["curvature"] - float(v @ H @ v)) < 1e-10
    for t, loss in zip(along["t"], along["loss"], strict=True):
        assert abs(loss - float(f(theta0 + t * v))) < 1e-12
    top, bottom = res["slices"]["top eigenvector"], res["slices"]["bottom eigenvector"]
    assert abs(top["curvature"] - float(evals[-1])) < 1e-6 * float(evals.abs().max())
    assert abs(bottom["curvature"] - float(evals[0])) < 1e-6 * float(evals.abs().max())
    for s in (top, bottom):
        assert abs(s["loss"][SLICE_POINTS // 2] - float(f(theta0))) < 1e-12  # t = 0

    # and along any direction, over both batches
    C = cs.Curvature(model, loss_fn, batches)
    u = torch.randn(theta0.shape, generator=g, dtype=torch.float64)
    ts = [-0.3, 0.0, 0.7]
    expected = [float(f(theta0 + t * u)) for t in ts]
    torch.testing.assert_close(slice_losses(C, theta0, u, ts), expected, rtol=0, atol=1e-12)


def test_probe_slices_leave_the_model_as_found():
    """BatchNorm in train mode and dropout: the slices' forward passes leave running
    statistics, parameters, .grad, the training flag and the global RNG as they were."""
    from curvscope.lab.probe import probe

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 6),
        torch.nn.BatchNorm1d(6),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(6, 2),
    ).double()
    g = torch.Generator().manual_seed(2)
    X = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (16,), generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    res = probe(model, torch.nn.CrossEntropyLoss(), [(X[:8], y[:8]), (X[8:], y[8:])], slices=True)
    assert "slices" in res
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert torch.equal(torch.random.get_rng_state(), rng)


@pytest.mark.parametrize("width", [1, 3])
def test_probe_of_a_tiny_model_reports_what_its_spectrum_has(width):
    """The probe asked for three eigenvalues from each end: a model of fewer than six
    parameters raised (an outside review). It reports what the spectrum has: a 1 x 1
    operator's one value, a 3 x 3's largest and smallest (of its dense spectrum)."""
    from curvscope.lab.probe import probe

    model = torch.nn.Linear(width, 1, bias=False).double()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, width, generator=g, dtype=torch.float64)
    y = torch.randn(32, 1, generator=g, dtype=torch.float64)
    res = probe(model, torch.nn.MSELoss(), (X, y), lr=0.01)
    H = 2 * X.T @ X / 32  # the Hessian of the mean squared error of a linear model
    lam = torch.linalg.eigvalsh(H).flip(0)
    want = [lam[0], lam[-1]] if width > 1 else [lam[0]]
    got = torch.tensor(res["eigenvalues"], dtype=torch.float64)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-8, atol=0)


def test_report_escapes_hostile_text():
    run = {
        "problem": "<script>alert(1)</script>",
        "optimizer": 'x"><img src=y>',
        "outcome": "stalled",
        "steps": 1,
        "final_loss": 1.0,
        "final_grad_norm": 1.0,
        "gradients": 1,
        "products": 0,
        "wall": 0.1,
        "diverged_at": None,
        "peak_loss": None,
    }
    html = page("<b>title</b>", runs_table([run]))
    assert "<script>" not in html and "<img src=y>" not in html and "<b>title" not in html
    assert "&lt;script&gt;" in html


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no chromium here")
def test_report_in_a_real_browser(quick_lab, tmp_path):
    assert CHROMIUM is not None, "CI installs chromium (see .ci/run)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    url = (quick_lab / "report.html").as_uri()
    # every image decoded (naturalWidth > 0), and the table's text is on the page
    script = (
        "document.title = [...document.images].every(i => i.complete && i.naturalWidth > 0)"
        " + '|' + document.images.length + '|' + document.body.innerText.includes('newton-cg')"
    )
    html = (quick_lab / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", f"<script>{script}</script></body>"))
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", "--enable-logging=stderr", "--v=0", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    title = dom.stdout.split("<title>")[1].split("</title>")[0]
    ok, count, has_table = title.split("|")
    assert ok == "true" and int(count) >= 4 and has_table == "true"
    console_errors = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln and "ERROR" in ln]
    assert not console_errors
    shot = Path(os.environ.get("CURVSCOPE_ARTIFACTS", tmp_path)) / "lab-report.png"
    subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,3000", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 10_000


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_mid_lab_keeps_the_finished_runs_as_ctrl_c_does(tmp_path, capsys, monkeypatch):
    """SIGTERM — what timeout, SLURM, docker stop and Kubernetes send — ended the lab at once
    and lost every finished run (status 143, no message: an outside review). Now it stops as
    Ctrl-C does, says so, and the status is still the shell's 143; the handler is put back."""
    from curvscope.lab import lab as lab_module

    calls, real = [], lab_module.run_one

    def run_one(*args, **kwargs):
        calls.append(args[:2])
        if len(calls) == 2:  # the second run: SIGTERM to this process, delivered here
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(lab_module, "run_one", run_one)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "lab"
    argv = ["lab", "--quick", "--out", str(out), "--problems", "quadratic"]
    assert main([*argv, "--optimizers", "gd,adam"]) == 143
    assert (
        "terminated (SIGTERM) after 1 of 2 runs; wrote the finished ones" in capsys.readouterr().err
    )
    res = json.loads((out / "results.json").read_text())
    assert res["interrupted"] == {"runs_done": 1, "runs_planned": 2, "signal": "SIGTERM"}
    assert "Interrupted (SIGTERM) after 1 of the 2 runs" in (out / "report.html").read_text()
    assert signal.getsignal(signal.SIGTERM) is before
    calls.clear()  # a SIGTERM the parent set to be ignored stays ignored, as SIGINT would
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert main([*argv, "--optimizers", "gd,adam", "--out", str(tmp_path / "on")]) == 0
    finally:
        signal.signal(signal.SIGTERM, before)
