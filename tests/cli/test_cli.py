"""The command line: each command, each bad input (clear message, exit status 2), the report
escaping hostile text, and one real-browser test of the lab's HTML report."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import curvscope as cs
from curvscope.cli import main
from curvscope.report.html import page, runs_table


@pytest.fixture(scope="module")
def quick_lab(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab")
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
    assert (quick_lab / "paths-rosenbrock.png").stat().st_size > 1000
    assert (quick_lab / "mlp-density.png").exists() and (quick_lab / "profile.png").exists()
    html = (quick_lab / "report.html").read_text()
    assert "data:image/png;base64," in html and "diverged at step" in html


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


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["lab", "--quick", "--out", str(blocker / "sub"), "--problems", "saddle"]) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


def test_corrupt_run_log(tmp_path, capsys):
    log = tmp_path / "run.jsonl"
    log.write_text('{"step": 1, "state": "learning"}\n{not json\n')
    assert main(["report", str(log), "--out", str(tmp_path / "r")]) == 2
    assert "is not a curvscope run log" in capsys.readouterr().err
    log.write_text('{"hello": 1}\n')
    assert main(["report", str(log), "--out", str(tmp_path / "r")]) == 2
    assert "no probe records" in capsys.readouterr().err


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


def test_probe_on_a_built_in_problem(tmp_path, capsys):
    assert main(["probe", "--problem", "breast-cancer-logreg", "--lr", "0.5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["num_params"] == 31 and res["dense_hessian_bytes"] == 8 * 31 * 31
    assert res["state"] in {"learning", "unstable", "minimum", "flat"}
    assert main(["probe", "--problem", "breast-cancer-logreg", "--report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "curvature products" in text and "MiB (8n² bytes)" in text
    assert (tmp_path / "slices.png").exists() and (tmp_path / "report.html").exists()


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
