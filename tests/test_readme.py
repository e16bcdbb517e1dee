"""Every ```python block of README.md runs, so the documentation and the API cannot drift apart.

The blocks run in order, in one shared namespace (a block may use what an earlier one defined),
in a temporary working directory (files such as ``run.jsonl`` land there), one test per block,
named by the README line where its code starts. A block whose first line is
``# NAME.py — run with: torchrun --nproc_per_node=N NAME.py`` is a complete script: it is written
to NAME.py and run under ``torch.distributed.run`` with N processes (gloo, CPU, loopback) instead.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
PYTHON = {"python", "py", "python3"}
TORCHRUN = re.compile(r"^#\s*(\w+\.py)\s+—\s+run with: torchrun --nproc_per_node=(\d+) \1\b")
# frameworks only the integrations need (the `dev` extra installs them): a block that imports one
# that is not installed at all is skipped, not failed
OPTIONAL = {"lightning", "transformers", "tensorboard", "accelerate"}


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every python code block in ``text``, in order; ``line`` is the
    1-based line of the block's first line of code."""
    blocks: list[tuple[int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            fence, lang = m.group(1), m.group(2).lower()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
            if end is None:
                raise ValueError(f"README.md:{i + 1}: code block never closed ({fence})")
            if lang in PYTHON:
                blocks.append((i + 2, "\n".join(lines[i + 1 : end]) + "\n"))
            i = end
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
    # guards the parametrization below against silently collecting nothing
    assert len(BLOCKS) >= 5, f"found {len(BLOCKS)} python blocks in {README}"


def test_python_blocks_parses_fences():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n````py\ny = 2\n```\nz\n````\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "y = 2\n```\nz\n")]
    with pytest.raises(ValueError, match=r"README\.md:2: code block never closed"):
        python_blocks("a\n```python\nx = 1\n")


def test_a_failing_block_fails_and_names_its_readme_line(tmp_path):
    run = _Run(tmp_path)
    run.run(3, "x = 1\n")
    with pytest.raises(ZeroDivisionError) as info:
        run.run(7, "y = x\ny / 0\n")
    assert (info.traceback[-1].path, info.traceback[-1].lineno + 1) == (README, 8)
    assert run.outcome == {3: "passed", 7: "failed"} and run.namespace["y"] == 1


def test_only_a_missing_optional_framework_skips(tmp_path):
    run = _Run(tmp_path)
    with pytest.raises(ModuleNotFoundError):  # installed, but no such module: a real failure
        run.run(1, "import lightning.no_such_module\n")
    assert run.outcome[1] == "failed"
    with pytest.raises(ModuleNotFoundError):  # not one of the optional frameworks
        run.run(2, "import no_such_package_xyz\n")


class _Run:
    """The shared namespace and the outcome of each block run so far."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.namespace: dict = {"__name__": "__readme__"}
        self.outcome: dict[int, str] = {}  # line -> "passed" | "skipped" | "failed"

    def run(self, line: int, code: str) -> None:
        self.outcome[line] = "failed"
        script = TORCHRUN.match(code)
        if script:
            self._torchrun(script.group(1), int(script.group(2)), code)
        else:
            # pad with newlines so that a traceback names the README's own line numbers
            compiled = compile("\n" * (line - 1) + code, str(README), "exec")
            # a block's seeding stays in the block (the Hugging Face Trainer seeds all three)
            rngs, threads = (random.getstate(), np.random.get_state()), torch.get_num_threads()
            # the blocks' models are tiny: a second thread buys little, and on a busy machine
            # its spin-waits made them 10-30x slower (measured on the shared 2-core machine)
            torch.set_num_threads(1)
            try:
                with torch.random.fork_rng():
                    exec(compiled, self.namespace)
            except ModuleNotFoundError as e:
                root = (e.name or "").split(".")[0]
                if root in OPTIONAL and importlib.util.find_spec(root) is None:
                    self.outcome[line] = "skipped"
                    pytest.skip(f"README.md:{line} needs {e.name}, which is not installed")
                raise
            finally:
                random.setstate(rngs[0])
                np.random.set_state(rngs[1])
                torch.set_num_threads(threads)
        self.outcome[line] = "passed"

    def _torchrun(self, name: str, nproc: int, code: str) -> None:
        (self.workdir / name).write_text(code, encoding="utf-8")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        argv += [f"--nproc_per_node={nproc}", name]
        # its own session, so that a timeout ends the workers too, not only the launcher
        with subprocess.Popen(
            argv,
            cwd=self.workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as proc:
            try:
                out, err = proc.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
                pytest.fail(f"{name} under torchrun took over 180 s:\n{err[-6000:]}")
        print(out)
        assert proc.returncode == 0, f"{name} under torchrun failed:\n{err[-6000:]}"


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    run = _Run(tmp_path_factory.mktemp("readme"))
    yield run
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


@pytest.fixture(autouse=True)
def _headless_plots(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if "matplotlib" in sys.modules:
        sys.modules["matplotlib"].use("Agg")


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_block(line, code, readme_run, monkeypatch):
    monkeypatch.chdir(readme_run.workdir)
    # the blocks before this one run first, when they have not (this block selected alone, -k)
    for before, earlier in BLOCKS:
        if before >= line:
            break
        if before not in readme_run.outcome:
            try:
                readme_run.run(before, earlier)
            except pytest.skip.Exception:
                pass
            except BaseException as e:
                pytest.fail(f"the block at README.md:{before}, which this one follows: {e!r}")
        if readme_run.outcome[before] == "failed":
            pytest.fail(f"the block at README.md:{before}, which this one follows, failed")
    readme_run.run(line, code)
