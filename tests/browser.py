"""Headless Chromium for the report tests: load a page with a trusted probe script appended and
read back what the probe saw (it writes its answer into ``document.title``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

#: Skip where there is no Chromium, except in CI, which installs it (see .ci/run) and must
#: not skip the test silently.
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="no chromium here"
)


def probe_page(page: Path, script: str, tmp_path: Path) -> tuple[str, list[str]]:
    """Load a copy of ``page`` with ``script`` appended (run at the window's load event, after
    the page's own scripts and handlers had their chance) and return (the title the script
    set, the page's console messages: uncaught errors included, which Chromium logs at INFO)."""
    assert CHROMIUM is not None, "CI installs chromium (see .ci/run)"
    html = page.read_text(encoding="utf-8")
    assert html.count("</body>") == 1
    probe = tmp_path / f"probe-{page.stem}.html"
    probe.write_text(
        html.replace(
            "</body>", f"<script>addEventListener('load', () => {{ {script} }})</script></body>"
        ),
        encoding="utf-8",
    )
    dom = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            "--virtual-time-budget=3000",  # let timers and load/error events run first
            "--dump-dom",
            "--enable-logging=stderr",
            "--v=0",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    title = dom.stdout.split("<title>")[1].split("</title>")[0]
    console = [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln]
    return title, console
