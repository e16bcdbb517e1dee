"""The lab: optimizers side by side on problems with known answers (``curvscope lab``)."""

from curvscope.lab.lab import LabInterrupted, performance_profile, run_lab, selection
from curvscope.lab.runner import DEFAULT_PROBLEMS, QUICK, Budget, Run, run_one

__all__ = [
    "DEFAULT_PROBLEMS",
    "QUICK",
    "Budget",
    "LabInterrupted",
    "Run",
    "performance_profile",
    "run_lab",
    "run_one",
    "selection",
]
