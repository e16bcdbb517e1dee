"""Which state training is in, in plain words, with the numbers behind it and what to do."""

from curvscope.diagnosis.classify import (
    DEFAULT_THRESHOLDS,
    RULES,
    STATES,
    Evidence,
    Rule,
    State,
    Thresholds,
    classify,
    classify_history,
)
from curvscope.diagnosis.diagnosis import (
    DEFAULT_BUDGET,
    Diagnosis,
    UpdateCheck,
    diagnose,
    update_curvature,
)
from curvscope.diagnosis.monitor import Monitor
from curvscope.diagnosis.runlog import (
    LogFormatError,
    LogInUseError,
    LogWriteWarning,
    TornLogWarning,
    read_log,
)
from curvscope.diagnosis.stability import StabilityLimit, stability_limit

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_THRESHOLDS",
    "RULES",
    "STATES",
    "Diagnosis",
    "Evidence",
    "LogFormatError",
    "LogInUseError",
    "LogWriteWarning",
    "Monitor",
    "Rule",
    "StabilityLimit",
    "State",
    "Thresholds",
    "TornLogWarning",
    "UpdateCheck",
    "classify",
    "classify_history",
    "diagnose",
    "read_log",
    "stability_limit",
    "update_curvature",
]
