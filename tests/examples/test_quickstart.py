"""The README's main-job example runs and says what it should."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_runs_and_reports_direction_and_shape():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "direction: gradient norm" in out and "shape:" in out
    assert "convex: no negative curvature" in out
    assert "non-convex" in out
    assert "gradient descent at lr=0.5: learning" in out
    assert "gradient descent at lr=4.0: unstable" in out
