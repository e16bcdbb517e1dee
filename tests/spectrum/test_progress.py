"""Progress bars: on a terminal once a run is seen to be long, never off one, and at once or
never when asked (an outside trial: a 23-second trace on a 2M model showed none, and the
density wrote its bar into logs)."""

import io
import time

import torch

import curvscope as cs
from curvscope.spectrum import _operator


class Terminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class Slow:
    """A 60 x 60 diagonal operator whose product takes ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.A, self.delay = torch.diag(torch.linspace(1.0, 2.0, 60)), delay
        self.num_params, self.dtype = 60, torch.float32

    def matmat(self, V):
        time.sleep(self.delay)
        return self.A @ V


def shown(monkeypatch, tty: bool, delay: float, **kw) -> bool:
    stream = Terminal(tty)
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setattr(_operator, "AUTO_AFTER", 0.05)
    monkeypatch.setattr(_operator, "AUTO_LONGER", 0.2)
    cs.trace(Slow(delay), matvecs=40, method="hutchinson", **kw)
    return "product" in stream.getvalue()


def test_a_long_run_on_a_terminal_shows_a_bar(monkeypatch):
    assert shown(monkeypatch, tty=True, delay=0.1)  # 16 products a block, 0.1 s each


def test_a_short_run_or_no_terminal_shows_none(monkeypatch):
    assert not shown(monkeypatch, tty=True, delay=0.0)
    assert not shown(monkeypatch, tty=False, delay=0.1)


def test_asked_for_or_against(monkeypatch):
    assert shown(monkeypatch, tty=False, delay=0.0, progress_bar=True)
    assert not shown(monkeypatch, tty=True, delay=0.1, progress_bar=False)


def test_the_density_follows_the_same_rule(monkeypatch):
    stream = Terminal(False)
    monkeypatch.setattr("sys.stderr", stream)
    cs.density(Slow(0.0), steps=10, probes=2)  # default: not on a terminal, no bar
    assert stream.getvalue() == ""
