"""A review of the verdict rules changed for the Monitor's forecast (issue 14), from outside:
what rule (a)'s reasons say when it read more probes than three."""

from __future__ import annotations

from curvscope.diagnosis.classify import State, classify_history
from tests.diagnosis.test_classify import near


def test_rule_a_says_how_many_probes_and_steps_it_read():
    """With the probes' steps, rule (a) reads as many probes back as span EOS_HOLD (20) steps:
    its reason names the probes it read and the steps they span, not always "3 probes"."""
    state, reasons = classify_history(
        State.LEARNING,
        ["own"],
        near(),
        past=[near(), near(), near(1.9), near()],
        losses=(0.5, 0.4),
        first_loss=1.0,
        steps=[70, 95, 98, 99, 100],
    )
    assert state is State.EDGE_OF_STABILITY
    assert reasons[0] == (
        "the sharpness has stayed within ±15% of the stability limit for 5 probes over 30 "
        "steps (now 2.05 against 2)"
    )
    # without the steps: the last three probes, as before
    state, reasons = classify_history(
        State.LEARNING, ["own"], near(), past=[near(), near()], losses=(0.5, 0.4), first_loss=1.0
    )
    assert reasons[0] == (
        "the sharpness has stayed within ±15% of the stability limit for 3 probes "
        "(now 2.05 against 2)"
    )
