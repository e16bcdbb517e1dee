"""A review of the verdict rules changed for the Monitor's forecast (issue 14), from outside:
what rule (a)'s reasons say when it read more probes than three."""

from __future__ import annotations

import pytest

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


def test_steps_of_the_wrong_length_or_order_are_refused_whatever_the_state():
    """``steps`` that do not match the probes are the caller's mistake in every state: they were
    refused only where rule (a) was reached (not for a *minimum*, a *diverged* loss, or an edge
    that rule (b) already held), and steps that go back in time were not checked at all."""
    past = [near(), near()]
    cases = [
        (State.MINIMUM, near(), (0.5, 0.4)),
        (State.LEARNING, near(), (0.5, float("nan"))),  # diverged by the loss
        (State.LEARNING, near(), (0.5, 0.4)),
    ]
    for state, evidence, losses in cases:
        for steps, match in (([99, 100], "expected 3 steps, got 2"), ([50, 70, 60], "decrease")):
            with pytest.raises(ValueError, match=match):
                classify_history(
                    state,
                    ["own"],
                    evidence,
                    past=past,
                    losses=losses,
                    first_loss=1.0,
                    previous=State.EDGE_OF_STABILITY,
                    steps=steps,
                )
    # equal steps are allowed (a probe by hand at a step the Monitor probed)
    ok = classify_history(
        State.LEARNING, ["own"], near(), past=past, losses=(0.5, 0.4), steps=[60, 80, 80]
    )
    assert ok[0] is State.EDGE_OF_STABILITY  # three probes near the limit over 20 steps


def test_full_batch_losses_that_fell_at_every_step_are_not_held_at_the_edge():
    """At the edge the loss falls non-monotonically (DESIGN). A quadratic at 0.95x its limit
    read the edge at 26 of 30 probes, its loss falling at every step; a run whose sharpness sank
    from 0.98x to 0.5x the limit stayed at the edge by rule (b) for 600 steps (an outside
    review). Mini-batch losses (a batch sharpness measured) are noise: the rules read as before."""
    falling, swinging = (0.5, 0.45, 0.41, 0.38), (0.5, 0.52, 0.41, 0.43)
    past = [near(1.9), near(1.9)]
    state, _ = classify_history(State.LEARNING, ["own"], near(1.9), past=past, losses=falling)
    assert state is State.LEARNING  # (a) not held
    state, _ = classify_history(State.LEARNING, ["own"], near(1.9), past=past, losses=swinging)
    assert state is State.EDGE_OF_STABILITY
    sank = near(1.2)  # 0.6x the limit, after an edge
    kw = {"past": past, "previous": State.EDGE_OF_STABILITY}
    assert classify_history(State.LEARNING, ["own"], sank, losses=falling, **kw)[0] is (
        State.LEARNING
    )
    assert classify_history(State.LEARNING, ["own"], sank, losses=swinging, **kw)[0] is (
        State.EDGE_OF_STABILITY
    )
    batch = {"batch_sharpness": 1.9, "batch_sharpness_stderr": 0.01}
    noisy = [near(1.9, **batch), near(1.9, **batch)]
    state, _ = classify_history(
        State.LEARNING, ["own"], near(1.9, **batch), past=noisy, losses=falling
    )
    assert state is State.EDGE_OF_STABILITY
    # too few losses to tell: a probe every step or two reads as before
    state, _ = classify_history(State.LEARNING, ["own"], near(1.9), past=past, losses=(0.5, 0.4))
    assert state is State.EDGE_OF_STABILITY
