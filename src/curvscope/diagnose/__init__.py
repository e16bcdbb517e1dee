"""Which state training is in, in plain words, with the numbers behind it and what to do."""

from curvscope.diagnose.classify import DEFAULT_THRESHOLDS, STATES, Thresholds, classify
from curvscope.diagnose.diagnosis import DEFAULT_BUDGET, Diagnosis, diagnose
from curvscope.diagnose.monitor import Monitor, read_log
from curvscope.diagnose.stability import StabilityLimit, stability_limit

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_THRESHOLDS",
    "STATES",
    "Diagnosis",
    "Monitor",
    "StabilityLimit",
    "Thresholds",
    "classify",
    "diagnose",
    "read_log",
    "stability_limit",
]
