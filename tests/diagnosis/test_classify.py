"""The diagnosis vocabulary: the pure decision, each threshold exercised on both sides; the
states (append-only codes, headlines, advice); the evidence record; the history rules; and
adding a state from one module."""

import ast
import dataclasses
import json
import math
import pathlib

import pytest

import curvscope as cs
from curvscope.diagnosis import (
    RULES,
    STATES,
    Diagnosis,
    Evidence,
    Rule,
    State,
    classify,
    classify_history,
)
from curvscope.diagnosis.classify import (
    ABSORB_END,
    ABSORB_STEPS,
    ALWAYS,
    DEFAULT_THRESHOLDS,
    EOS_BAND,
    EOS_FLOOR,
    EOS_HOLD,
    EOS_LIMIT_DRIFT,
    EOS_LOSS_RISE,
    EOS_PROBES,
    EOS_SWING,
    EXPLOSION,
    RAN_AWAY,
    Facts,
    StateEnum,
    as_state,
    unique_codes,
)
from curvscope.diagnosis.monitor import scalars
from curvscope.diagnosis.runlog import RunLogWriter, read_log

BASE = {
    "loss": 1.0,
    "grad_norm": 1.0,
    "sharpness": 10.0,
    "lambda_min": -0.5,
    "stability_limit": 20.0,
    "lr": 0.1,
    "limit_constant": 2.0,
    "directional_curvature": 5.0,
    "newton_decrement": None,
}


def state(**changes):
    return classify({**BASE, **changes})[0]


def test_a_share_of_the_limit_under_one_percent_is_not_written_as_zero():
    """A new user's Hugging Face run read "the sharpness ... is 0% of the limit"."""
    _, reasons = classify({**BASE, "sharpness": 0.006})
    assert reasons[-1] == "the sharpness 0.006 is 0.03% of the limit 20"
    assert classify(BASE)[1][-1] == "the sharpness 10 is 50% of the limit 20"


def test_learning_and_unstable_around_the_margin():
    th = cs.Thresholds()
    assert state() == "learning"
    assert state(sharpness=20.0 * (1 + th.margin) * 0.99) == "learning"
    assert state(sharpness=20.0 * (1 + th.margin) * 1.01) == "unstable"
    assert state(directional_curvature=19.9) == "learning"  # η·c = 1.99 < 2
    assert state(directional_curvature=20.1) == "unstable"  # η·c = 2.01 > 2


def test_no_limit_means_no_stability_verdict():
    assert state(stability_limit=None, lr=None, sharpness=100.0) == "learning"


def test_diverged_first():
    assert state(loss=math.nan) == "diverged"
    assert state(grad_norm=math.inf, sharpness=1e9) == "diverged"
    # a finite loss and gradient, a curvature whose products overflowed
    d = classify({**BASE, "sharpness": math.nan, "lambda_min": math.nan})
    assert d[0] == "diverged" and "the curvature is not" in d[1][0]


def test_small_gradient_threshold_both_sides():
    th = cs.Thresholds()
    # ½‖g‖²/c against small_gradient × loss scale (loss 1, curvature along g: 5)
    g_edge = math.sqrt(2 * 5 * th.small_gradient * 1.0)
    assert state(grad_norm=g_edge * 1.01) == "learning"
    assert state(grad_norm=g_edge * 0.99, lambda_min=0.1) == "minimum"


def test_direction_floor_both_sides():
    """Along a direction of almost no curvature a step still buys much: not small."""
    th = cs.Thresholds()
    floor = th.direction_floor * 10.0  # of max(|λ|) = 10
    g = math.sqrt(2 * floor * th.small_gradient * 1.0) * 0.99  # small at the floor
    assert state(grad_norm=g, directional_curvature=floor / 2, lambda_min=0.1) == "minimum"
    g = math.sqrt(2 * floor * 2 * th.small_gradient) * 0.99  # small only along c = 2·floor
    assert state(grad_norm=g, directional_curvature=floor * 2, lambda_min=0.1) == "minimum"
    assert state(grad_norm=g, directional_curvature=floor, lambda_min=0.1) == "learning"


def test_gradient_floor_and_loss_floor():
    th = cs.Thresholds()
    # at loss 0 the loss scale is the floor, not 0
    assert state(loss=0.0, grad_norm=th.gradient_floor / 2, lambda_min=0.1) == "minimum"
    g = math.sqrt(2 * 5 * th.small_gradient * th.loss_floor)
    assert state(loss=0.0, grad_norm=g * 0.9, lambda_min=0.1) == "minimum"
    assert state(loss=0.0, grad_norm=g * 1.1, lambda_min=0.1) == "learning"


def test_flat_threshold_both_sides():
    th = cs.Thresholds()
    c = th.flat_curvature * 1.0
    small = {"grad_norm": 1e-9}
    assert state(sharpness=c * 0.9, lambda_min=-c * 0.9, **small) == "flat"
    assert state(sharpness=c * 1.1, lambda_min=-c * 0.5, **small) == "saddle"


def test_saddle_threshold_both_sides():
    th = cs.Thresholds()
    small = {"grad_norm": 1e-9}
    assert state(lambda_min=-10 * th.negative_curvature * 1.01, **small) == "saddle"
    assert state(lambda_min=-10 * th.negative_curvature * 0.99, **small) == "minimum"


def test_a_minimum_the_optimizer_cannot_hold_is_unstable():
    """A small gradient and no direction curving down, but the sharpness past the limit by the
    margin: gradient descent is repelled from such a point (momentum-warmup-past in
    benchmarks/verdicts.py was called a minimum at 1.11x the limit, 8 steps before its
    blow-up); within the margin it is a minimum. The same for the batch sharpness."""
    th = cs.Thresholds()
    small = {"grad_norm": 1e-9, "lambda_min": 0.1}
    edge = 20.0 * (1 + th.margin)
    assert state(sharpness=edge * 0.99, **small) == "minimum"
    d = classify({**BASE, "sharpness": edge * 1.01, **small})
    assert d[0] == "unstable"
    assert "exceeds the stability limit 20 by 11%" in d[1][1]
    assert d[1][0].startswith("the gradient is small")
    batch = {"batch_sharpness": 25.0, "batch_sharpness_stderr": 0.5, "batches": 8}
    assert state(sharpness=5.0, **batch, **small) == "unstable"
    noisy = {**batch, "batch_sharpness_stderr": 2.0}  # 25 - 2·2 = 21 < 22: not beyond the noise
    assert state(sharpness=5.0, **noisy, **small) == "minimum"


def test_newton_decrement_threshold_both_sides():
    th = cs.Thresholds()
    small = {"grad_norm": 1e-9, "lambda_min": 0.1}
    assert state(newton_decrement=2 * th.small_decrement * 0.9, **small) == "minimum"
    assert state(newton_decrement=2 * th.small_decrement * 1.1, **small) == "learning"


def test_thresholds_are_configurable():
    assert classify({**BASE, "sharpness": 21.0}, cs.Thresholds(margin=0.0))[0] == "unstable"
    assert classify({**BASE, "sharpness": 21.0})[0] == "learning"


def test_reasons_carry_the_numbers():
    s, reasons = classify({**BASE, "sharpness": 30.0})
    assert s == "unstable" and any("30" in r and "20" in r for r in reasons)


# ------------------------------------------------------------------------------ the states
#: The code each state has had since it was first logged. Codes are append-only: a new state
#: takes the next free code and adds a line here; changing or removing a line would change the
#: meaning of every run log and TensorBoard curve written before, and fails this test.
CODES = {
    "learning": 0,
    "unstable": 1,
    "edge_of_stability": 2,
    "flat": 3,
    "saddle": 4,
    "minimum": 5,
    "diverged": 6,
}


def test_state_codes_are_append_only():
    for name, code in CODES.items():
        assert State(name).code == code, f"the code of {name!r} changed: codes are append-only"
    codes = [s.code for s in State]
    assert len(set(codes)) == len(codes)
    new = [s for s in State if s.value not in CODES]
    assert all(s.code > max(CODES.values()) for s in new), "a new state takes a new code"


def test_the_logged_state_code_is_the_code_not_the_position():
    ev = {**BASE, "matvecs": 3}
    for state in State:
        d = Diagnosis(state, ev, ["r"], state.advice(ev))
        assert scalars(d)["state_code"] == CODES[state.value]


def test_a_state_is_a_string():
    assert State.UNSTABLE == "unstable" and isinstance(State.UNSTABLE, str)
    assert f"{State.SADDLE}" == str(State.SADDLE) == "saddle"
    assert json.dumps({"state": State.FLAT}) == '{"state": "flat"}'
    assert "minimum" in STATES and tuple(State) == STATES
    assert as_state("diverged") is State.DIVERGED and as_state(State.FLAT) is State.FLAT


def test_every_state_has_its_headline_and_advice():
    ev = {**BASE, "stable_lr": 0.15}
    for state in State:
        advice = state.advice(ev)
        assert isinstance(advice, list) and all(isinstance(a, str) for a in advice)
        d = Diagnosis(state, ev, ["the reason"], advice)
        assert str(d).startswith(f"{state.headline}. The reason.")
    assert State.LEARNING.advice(ev) == [
        "Steps are stable; the largest stable learning rate here is 0.15 (now 0.1)."
    ]
    assert "0.15 (now 0.1)" in State.UNSTABLE.advice(ev)[0]
    assert "λ_min = -0.5" in State.SADDLE.advice(ev)[0]
    assert State.EDGE_OF_STABILITY.advice(ev)[0].startswith("Training is at the edge")


def test_an_unknown_state_is_refused_with_the_states_named():
    with pytest.raises(ValueError, match=r"unknown state 'overfitting': expected one of learning"):
        Diagnosis("overfitting", BASE, [], [])
    with pytest.raises(TypeError, match=r"a state is a curvscope\.diagnosis\.State or its name"):
        as_state(3)
    d = Diagnosis("saddle", BASE, [], [])  # a name is made the State
    assert d.state is State.SADDLE


def test_a_vocabulary_refuses_shared_codes():
    with pytest.raises(ValueError, match=r"B and A share the code 0: codes are append-only"):

        @unique_codes
        class Twice(StateEnum):
            A = "a", 0, "A", lambda ev: []
            B = "b", 0, "B", lambda ev: []

    with pytest.raises(TypeError, match="a state's code must be a non-negative integer"):

        @unique_codes
        class Negative(StateEnum):
            A = "a", -1, "A", lambda ev: []


def test_no_other_module_names_a_state():
    """The vocabulary is one module: the diagnosis, its consumers and renderers read the
    states from classify.py, never spell them (docstrings aside)."""
    root = pathlib.Path(cs.__file__).parent
    names = set(CODES)
    for sub in ("diagnosis", "integrations", "report", "cli"):
        for path in (root / sub).rglob("*.py"):
            if path.name == "classify.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and node.value in names:
                    raise AssertionError(f"{path}:{node.lineno} names the state {node.value!r}")


# ---------------------------------------------------------------------------- the evidence
FULL = {
    "loss": 1.0,
    "grad_norm": 0.5,
    "sharpness": 3.0,
    "lambda_min": -0.1,
    "stability_limit": 20.0,
    "directional_curvature": 2.0,
    "newton_decrement": None,
    "matvecs": 12,
    "lr": 0.1,
    "limit_constant": 2.0,
    "optimizer": "SGD",
    "preconditioned": False,
    "thresholds": cs.Thresholds().as_dict(),
    "eigen_converged": True,
    "decrement_converged": None,
    "stable_lr": 0.6,
}


def test_evidence_is_a_read_only_mapping_with_typed_fields():
    ev = Evidence(**FULL)
    assert dict(ev) == FULL and list(ev) == list(FULL) and ev == FULL  # keys, order, equality
    assert ev["sharpness"] == ev.sharpness == 3.0 and ev.get("batch_sharpness") is None
    assert {**ev, "step": 1}["matvecs"] == 12  # how the run log writes a record
    assert "batch_sharpness" not in ev and len(ev) == len(FULL)
    with pytest.raises(KeyError):
        ev["batch_sharpness"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.loss = 2.0  # type: ignore[misc]
    assert json.loads(json.dumps(dict(ev))) == FULL


def test_which_keys_are_present_says_what_was_measured():
    diverged = Evidence(loss=math.nan, grad_norm=math.nan, optimizer="none")
    assert list(diverged) == [*ALWAYS, "optimizer"]  # the contract keys, None where undefined
    assert diverged["sharpness"] is None
    # decrement_converged belongs to the curvature measurement: present (None) once it ran
    assert "decrement_converged" in Evidence(**FULL)
    assert "decrement_converged" not in Evidence(loss=1.0, grad_norm=1.0)
    # the batch sharpness belongs to the batches: present (None) when none gave a value
    none = Evidence(loss=1.0, grad_norm=1.0, batches=0)
    assert none["batch_sharpness"] is None and none["batch_sharpness_stderr"] is None


def test_evidence_from_a_mapping_keeps_unknown_keys_and_needs_the_loss():
    ev = Evidence.from_mapping({**FULL, "val_gap": 0.3})
    assert ev["val_gap"] == 0.3 and list(ev)[-1] == "val_gap" and ev.extra == {"val_gap": 0.3}
    assert Evidence.from_mapping(ev) is ev
    with pytest.raises(ValueError, match=r"evidence needs loss and grad_norm; got the keys"):
        Evidence.from_mapping({"sharpness": 1.0})
    d = Diagnosis("learning", FULL, [], [])
    assert isinstance(d.evidence, Evidence) and d.evidence == FULL


def test_classify_reads_an_evidence_as_it_reads_a_dict():
    for changes in ({}, {"sharpness": 30.0}, {"grad_norm": 1e-9, "lambda_min": 0.1}):
        ev = {**FULL, **changes}
        assert classify(Evidence(**ev)) == classify(ev)


def test_classify_needs_a_rule_that_always_holds():
    with pytest.raises(ValueError, match="no rule decided the state"):
        classify(BASE, rules=RULES[:-1])


# ------------------------------------------------------------------------------ history
def near(s=2.05, limit=2.0, **extra):
    return {**BASE, "sharpness": s, "stability_limit": limit, **extra}


def history(evidence, past=(), losses=(0.5, 0.4), first_loss=1.0, state=None):
    state = classify(evidence)[0] if state is None else state
    return classify_history(
        state, ["own"], evidence, past=past, losses=losses, first_loss=first_loss
    )


def test_edge_of_stability_needs_the_sharpness_at_the_limit_for_eos_probes():
    assert EOS_PROBES == 3 and EOS_BAND == 0.15
    state, reasons = history(near(), past=[near(), near(1.75)])
    assert state is State.EDGE_OF_STABILITY
    assert reasons == [
        "the sharpness has stayed within ±15% of the stability limit for 3 probes "
        "(now 2.05 against 2)",
        "the loss still falls",
    ]
    assert history(near(), past=[near()]) == (State.LEARNING, ["own"])  # two probes only
    assert history(near(), past=[near(1.65), near()])[0] is State.LEARNING  # one outside
    assert history(near(), past=[near(1.65), near(), near()])[0] is State.EDGE_OF_STABILITY
    # 2.35 is outside the band: unstable (with a loss that did not fall: rule (d) aside)
    assert history(near(2.35), past=[near(), near()], losses=(0.4, 0.41))[0] is State.UNSTABLE
    losses = [0.5, 0.6, 0.4]
    assert history(near(), [near(), near()], losses)[1][1] == "the loss falls, not monotonically"


def test_with_the_probes_steps_the_edge_must_be_held_for_eos_hold_steps():
    """Probes a step apart (the Monitor's forecast) do not show a sharpness *held* at the
    limit: with ``steps`` rule (a) reads as many probes back as span EOS_HOLD steps."""
    assert EOS_HOLD == 20

    def at(steps, past):
        return classify_history(
            State.LEARNING,
            ["own"],
            near(),
            past=past,
            losses=(0.5, 0.4),
            first_loss=1.0,
            steps=steps,
        )[0]

    assert at([60, 80, 100], [near(), near()]) is State.EDGE_OF_STABILITY
    assert at([98, 99, 100], [near(), near()]) is State.LEARNING  # near, not held
    # extended back: the probe at step 70 is near too, the one at 50 is not
    assert at([70, 98, 99, 100], [near(), near(), near()]) is State.EDGE_OF_STABILITY
    assert at([50, 98, 99, 100], [near(1.5), near(), near()]) is State.LEARNING
    with pytest.raises(ValueError, match="expected 3 steps, got 2"):
        at([99, 100], [near(), near()])


def test_edge_of_stability_reads_the_batch_sharpness_where_measured():
    mb = {"sharpness": 1.0, "batch_sharpness": 2.0}
    assert history(near(**mb), past=[near(**mb), near(**mb)])[0] is State.EDGE_OF_STABILITY
    assert history(near(1.0), past=[near(1.0), near(1.0)])[0] is State.LEARNING


def test_only_learning_or_unstable_probes_can_be_at_the_edge():
    saddle = near(grad_norm=1e-9, lambda_min=-1.0)
    assert history(saddle, past=[near(), near()])[0] is State.SADDLE
    assert history(near(limit=None), past=[near(), near()])[0] is State.LEARNING


def test_a_loss_stuck_far_above_its_best_is_diverged():
    """A run blown up into saturation (a new user's CyclicLR run: the loss at 15-298 against
    a first loss of 2.28, the sharpness ~1e-7) read *learning*, "steps are stable": the mean
    loss since the previous probe above RAN_AWAY (10) times its running minimum and above the
    first loss is diverged, whatever the curvature says."""
    assert RAN_AWAY == 10

    def judged(losses, best, first=2.28):
        return classify_history(
            State.LEARNING, ["own"], near(0.0), losses=losses, first_loss=first, best_loss=best
        )

    state, reasons = judged([15.0, 298.0], best=0.5)
    assert state is State.DIVERGED
    assert reasons[0] == (
        "the training loss ran away: its mean since the previous probe, 156.5, is above 10 "
        "times its lowest such mean 0.5 and above its first value 2.28"
    )
    assert judged([4.0, 4.5], best=0.5)[0] is State.LEARNING  # 8.5x: under 10x
    assert judged([1.9, 2.0], best=0.1, first=2.28)[0] is State.LEARNING  # 19.5x, under the start
    assert judged([2.3, 2.5], best=0.1)[0] is State.DIVERGED
    # before the first probe there is no running minimum: the first loss is the baseline (a
    # run blown up 100x before its first probe read *learning* at every probe: a review)
    state, reasons = judged([15.0, 298.0], best=None)
    assert state is State.DIVERGED and reasons[0] == (
        "the training loss ran away: its mean since the previous probe, 156.5, is above 10 "
        "times its first value 2.28"
    )
    assert judged([15.0, 298.0], best=40.0)[0] is State.DIVERGED  # the first is lower
    assert judged([2.3, 5.0], best=None)[0] is State.LEARNING  # 1.6x its first: no blow-up


def test_a_mean_lifted_by_a_few_batch_losses_is_not_stuck_high():
    """An outside review: a fine-tuning run's first batch loss was a lucky 0.0095 where its
    batches of 8 average 0.05, a few holding a noisy label at a loss near 1: windows whose mean
    passed 10x that first value read *diverged* at 6 of 45 probes. Stuck high means most of
    the window is high."""
    window = [0.004] * 18 + [1.5, 0.9]  # mean 0.12: 13x the first value
    judged = classify_history(
        State.LEARNING, ["own"], near(0.0), losses=window, first_loss=0.0095, best_loss=0.03
    )
    assert judged[0] is State.LEARNING
    blown = [0.004] * 5 + [0.5] * 15  # its recent half at 53x: blown up and stuck
    judged = classify_history(
        State.LEARNING, ["own"], near(0.0), losses=blown, first_loss=0.0095, best_loss=0.03
    )
    assert judged[0] is State.DIVERGED
    # a review: climbing from 2.2 to 1500 over the last 7 of 10 losses (70% of the window
    # high, under three quarters of it) read *learning*; its recent half is what is judged
    climbing = [2.2, 2.3, 2.2, 30.0, 80.0, 150.0, 300.0, 600.0, 1000.0, 1500.0]
    judged = classify_history(
        State.LEARNING, ["own"], near(0.0), losses=climbing, first_loss=2.2, best_loss=2.2
    )
    assert judged[0] is State.DIVERGED


def test_a_loss_that_ran_away_is_diverged():
    state, reasons = history(near(), losses=[2.0, EXPLOSION * 1.01])
    assert state is State.DIVERGED
    assert reasons == [
        "the training loss ran away: above 1000 times its first value 1, or not finite"
    ]
    assert history(near(), losses=[math.nan])[0] is State.DIVERGED
    # under the explosion bound the window's mean decides: 990x its first is stuck high
    state, reasons = history(near(), losses=[EXPLOSION * 0.99])
    assert state is State.DIVERGED and "is above 10 times its first value 1" in reasons[0]
    assert history(near(), losses=[9.0])[0] is State.LEARNING
    # a non-finite loss is diverged even before a first finite one is known
    assert history(near(), losses=[math.inf], first_loss=None) == (
        State.DIVERGED,
        ["the training loss is not finite"],
    )


# ------------------------------------------------------------------------- adding a state
def _overfitting_advice(ev):
    return [f"Validation loss is {ev['val_gap']:.2f} above training: stop, or regularise."]


class MoreStates(StateEnum):
    """A state defined here, outside curvscope: what adding one to State takes."""

    OVERFITTING = "overfitting", 7, "Overfitting: the validation loss rises", _overfitting_advice


def _overfits(f: Facts):
    gap = f.evidence.get("val_gap")
    if gap is None or gap <= 0.1:
        return None
    return [f.gradient, f"the validation loss is {gap:.2f} above the training loss"]


def test_a_state_defined_in_one_module_flows_through_classify_advice_and_str(tmp_path):
    """A state and its rule, defined in this module, go through the decision, the advice,
    ``Diagnosis.__str__``, the TensorBoard code and the run log's writer with no other file
    touched: nothing else lists the states. (Added to State itself — classify.py and its test —
    it is also one read_log accepts: the reader checks states against State, below.)"""
    rules = (*RULES[:-1], Rule(MoreStates.OVERFITTING, _overfits), RULES[-1])
    ev = {**BASE, "val_gap": 0.4}
    state, reasons = classify(ev, rules=rules)
    assert state is MoreStates.OVERFITTING and state == "overfitting"
    assert classify({**ev, "val_gap": 0.0}, rules=rules)[0] is State.LEARNING
    assert classify({**ev, "sharpness": 30.0}, rules=rules)[0] is State.UNSTABLE  # order kept
    d = Diagnosis(state, ev, reasons, state.advice(ev))
    assert d.state is MoreStates.OVERFITTING and d.evidence["val_gap"] == 0.4
    assert str(d) == (
        "Overfitting: the validation loss rises. The gradient is not small: ‖g‖ = 1. The "
        "validation loss is 0.40 above the training loss. Validation loss is 0.40 above "
        "training: stop, or regularise."
    )
    assert scalars(d)["state_code"] == 7.0
    # the Monitor's record, as it writes it
    path = tmp_path / "run.jsonl"
    with RunLogWriter(path, "x", {"curvscope_log": 1}) as log:
        log.write({"step": 1, "state": d.state, "advice": d.advice, **d.evidence})
    record = json.loads(path.read_text().splitlines()[1])
    assert record["state"] == "overfitting" and record["val_gap"] == 0.4
    with pytest.raises(cs.diagnosis.LogFormatError, match="'state' must be one of learning"):
        read_log(path)


# --------------------------------------------------------- the batch sharpness and its noise
def mini_batch(bs, se, **extra):
    return {**BASE, "batch_sharpness": bs, "batch_sharpness_stderr": se, **extra}


def test_the_batch_sharpness_is_unstable_only_beyond_the_margin_by_more_than_the_noise():
    assert DEFAULT_THRESHOLDS.margin == 0.1 and DEFAULT_THRESHOLDS.confidence == 2.0
    # limit 20: unstable needs bs − 2·se > 22
    assert classify(mini_batch(23.0, 1.0))[0] is State.LEARNING  # 21 < 22: within the noise
    state, reasons = classify(mini_batch(23.0, 0.2))  # 22.6 > 22
    assert state is State.UNSTABLE
    assert reasons[-1] == (
        "the batch sharpness 23 ± 0.2 (the curvature each mini-batch step meets along its own "
        "direction) exceeds the stability limit 20 by 15%, more than the 10% margin by over 2 "
        "standard errors: mini-batch steps overshoot"
    )
    # a stderr not given: the estimate as it is; one batch (stderr inf): nothing to judge by
    assert classify({**BASE, "batch_sharpness": 23.0})[0] is State.UNSTABLE
    state, reasons = classify(mini_batch(23.0, math.inf))
    assert state is State.LEARNING
    assert reasons[-1] == (
        "the batch sharpness 23 (one batch: no standard error) is 115% of the limit 20 (the "
        "full-batch sharpness 10 is 50%)"
    )
    one = near(3.0, 20.0, batch_sharpness=20.0, batch_sharpness_stderr=math.inf)
    assert history(one, past=[one, one])[0] is State.LEARNING  # nor placed in the band


def test_mini_batch_verdicts_speak_of_the_batch_sharpness_with_the_full_batch_one_beside_it():
    state, reasons = classify(mini_batch(18.2, 0.7, sharpness=3.3, directional_curvature=2.0))
    assert state is State.LEARNING
    assert reasons[-1] == (
        "the batch sharpness 18.2 ± 0.7 is 91% of the limit 20 (the full-batch sharpness 3.3 "
        "is 16%)"
    )
    # a full-batch sharpness above the limit is unstable whatever the batches say (Adam at a
    # high rate can meet negative curvature along its batch steps and still overshoot)
    sharp = mini_batch(-16.0, 0.5, sharpness=30.0, directional_curvature=2.0)
    assert classify(sharp)[0] is State.UNSTABLE


def test_the_edge_band_takes_the_batch_sharpness_noise_into_account():
    # limit 20, band 17-23: 15.6 ± 0.8 is within 2 standard errors of it, ± 0.1 is not
    noisy = near(3.0, 20.0, batch_sharpness=15.6, batch_sharpness_stderr=0.8)
    sure = {**noisy, "batch_sharpness_stderr": 0.1}
    assert history(noisy, past=[noisy, noisy])[0] is State.EDGE_OF_STABILITY
    assert history(sure, past=[sure, sure])[0] is State.LEARNING
    vague = {**noisy, "batch_sharpness_stderr": 2.0}  # ± 4 is wider than the band (± 3)
    assert history(vague, past=[vague, vague])[0] is State.LEARNING


def test_at_the_edge_a_swing_past_the_band_stays_at_the_edge_while_the_loss_holds():
    """Full-batch gradient descent at the edge swings past the limit and back while its loss
    keeps falling (1.2-1.8x on MLPs, CNNs and deep linear networks, 2.8x on logistic
    regression in benchmarks/verdicts.py): that is the edge, not instability."""
    assert (EOS_FLOOR, EOS_SWING, EOS_LOSS_RISE) == (0.5, 3.0, 2.0)

    def after_edge(s, losses=(0.5, 0.45), best=0.4):
        ev = near(s)  # limit 2
        state = classify(ev)[0]
        return classify_history(
            state,
            ["own"],
            ev,
            past=[near(), near()],
            losses=losses,
            first_loss=1.0,
            previous=State.EDGE_OF_STABILITY,
            best_loss=best,
        )

    state, reasons = after_edge(2.9)  # 1.45x the limit: unstable on its own
    assert classify(near(2.9))[0] is State.UNSTABLE and state is State.EDGE_OF_STABILITY
    assert reasons == [
        "training is at the edge of stability and stays there: the sharpness 2.9 swings around "
        "the stability limit 2 (now 1.45x, within 0.5-3x)",
        "the loss (0.475 on average since the previous probe) stays within 2x its running "
        "minimum 0.4",
    ]
    assert after_edge(2.9, losses=(0.9, 0.85))[0] is State.UNSTABLE  # the loss rose: 0.875 > 0.8
    assert after_edge(5.9)[0] is State.EDGE_OF_STABILITY  # 2.95x
    assert after_edge(6.1)[0] is State.UNSTABLE  # beyond 3x
    assert after_edge(1.2)[0] is State.EDGE_OF_STABILITY  # a dip to 0.6x
    assert after_edge(0.9)[0] is State.LEARNING  # below half the limit: it has left the edge
    assert after_edge(2.9, losses=(), best=None)[0] is State.EDGE_OF_STABILITY  # no loss known
    # without the edge before, a swing is judged on its own
    ev = near(2.9)
    assert classify_history(State.UNSTABLE, ["own"], ev, past=[near(), near(1.0)])[0] is (
        State.UNSTABLE
    )


def _above(losses, past=(), previous_low=None, s=3.0, limit=2.0, best_loss=None, **extra):
    ev = near(s, limit, **extra)
    assert classify(ev)[0] is State.UNSTABLE
    return classify_history(
        State.UNSTABLE,
        ["own"],
        ev,
        past=list(past),
        losses=losses,
        first_loss=1.0,
        previous_low=previous_low,
        best_loss=best_loss,
    )


def test_an_overshoot_the_loss_absorbs_is_the_edge_not_instability():
    """Above the limit, losses that oscillate and reach a new low in their last 2 steps (a
    catapult, a period-2 orbit whose low points fall) are the edge; a loss that falls
    monotonically (the growing direction not yet visible) or whose newest losses are not its
    lowest is not."""
    assert (ABSORB_STEPS, ABSORB_END) == (4, 2)
    orbit = [0.31, 0.354, 0.309, 0.354, 0.308]  # period 2, the low points falling
    state, reasons = _above(orbit, previous_low=0.3095)
    assert state is State.EDGE_OF_STABILITY
    assert reasons == [
        "the sharpness 3 is 1.50x the stability limit 2, yet the loss absorbs the overshoot: it "
        "oscillates and its last steps reached a new low (0.308) — the edge of stability (a "
        "catapult), not instability",
        "a loss that stops reaching new lows would be instability",
    ]
    assert _above(orbit, previous_low=0.30)[0] is State.UNSTABLE  # no new low
    # a warm-up still lowering the limit (adam-past: the limit 26% lower than at the previous
    # probe, then a blow-up 16 steps later): a crossing, not an absorbed overshoot
    assert _above(orbit, past=[near(1.0, 2.7)], previous_low=0.3095)[0] is State.UNSTABLE
    assert _above(orbit, past=[near(1.0, 2.05)], previous_low=0.3095)[0] is (
        State.EDGE_OF_STABILITY
    )
    rising = [0.4827, 0.4826, 0.4825, 0.4824, 0.4826, 0.4831]  # the growing direction shows
    assert _above(rising)[0] is State.UNSTABLE
    assert _above(orbit[:3])[0] is State.UNSTABLE  # too few losses to tell
    # mini-batch losses oscillate by themselves: not read so
    mini = {"batch_sharpness": 3.0, "batch_sharpness_stderr": 0.01}
    assert _above(orbit, previous_low=0.3095, **mini)[0] is State.UNSTABLE


def test_a_sharpness_that_rose_past_a_constant_limit_while_the_loss_fell_is_the_edge():
    """Progressive sharpening meets the limit (cnn-gd in benchmarks/verdicts.py: 0.91x, then
    1.20x with the loss falling from 1.11 to 0.83, then a catapult and the edge); a learning
    rate that rose (a warm-up moves the limit) or a loss that rose is instability."""
    falling = [1.113, 1.045, 0.948, 0.888, 0.832]
    state, reasons = _above(falling, past=[near(1.82, 2.0)], s=2.4)
    assert state is State.EDGE_OF_STABILITY
    assert reasons == [
        "the sharpness rose past the stability limit 2 at a steady learning rate (from 0.91x "
        "at the previous probe to 1.20x) while the loss fell (1.113 to 0.832): training's own "
        "sharpening meets the edge of stability, where it holds the sharpness rather than "
        "diverging",
        "a loss that rises would be instability",
    ]
    assert _above(falling, past=[near(1.82, 2.5)], s=2.4)[0] is State.UNSTABLE  # lr rose
    assert _above(falling, past=[near(2.3, 2.0)], s=2.4)[0] is State.UNSTABLE  # already past
    # just over the limit but within the margin (a forecast probe a few steps before; cnn-gd)
    assert _above(falling, past=[near(2.1, 2.0)], s=2.4)[0] is State.EDGE_OF_STABILITY
    assert _above(falling[::-1], past=[near(1.82, 2.0)], s=2.4)[0] is State.UNSTABLE  # rising
    assert _above(falling, past=[near(1.82, 2.0)], s=6.2)[0] is State.UNSTABLE  # beyond 3x
    assert _above(falling, s=2.4)[0] is State.UNSTABLE  # no probe before
    # a loss that rose to twice its running minimum: no edge by any rule
    assert _above(falling, past=[near(1.82, 2.0)], s=2.4, best_loss=0.4)[0] is State.UNSTABLE


def test_a_warm_up_moving_the_limit_through_the_sharpness_is_not_the_edge():
    """Three probes near their limits, but the limits falling 7% a probe (a warm-up raising the
    learning rate): a crossing on its way to instability (momentum-warmup-past in
    benchmarks/verdicts.py), not the sharpness held at the limit."""
    assert EOS_LIMIT_DRIFT == 0.05
    ramp = [near(1.8, 2.0), near(1.8, 1.86), near(1.8, 1.73)]
    assert history(ramp[-1], past=ramp[:-1])[0] is State.LEARNING
    steady = [near(1.8, 2.0), near(1.8, 1.97), near(1.8, 1.93)]  # within 5%
    assert history(steady[-1], past=steady[:-1])[0] is State.EDGE_OF_STABILITY


def test_the_edge_rules_keep_their_bounds():
    """Review findings: an absorbed overshoot is bounded like the other edge rules (50x the
    limit is not the edge); a negative loss (a Gaussian NLL) is measured on its own scale, not
    as twice its minimum."""
    orbit = [0.31, 0.354, 0.309, 0.354, 0.308]
    assert _above(orbit, previous_low=0.3095, s=100.0)[0] is State.UNSTABLE  # 50x
    assert _above(orbit, previous_low=0.3095, s=5.9)[0] is State.EDGE_OF_STABILITY  # 2.95x
    # at the edge the loss climbs for a while and falls back (gd-mse-edge: 0.0264 to 0.0384
    # over 10 steps at 1.06x the limit): still the edge while it stays within 2x its minimum
    climbing = [0.0264, 0.0270, 0.0286, 0.0323, 0.0384]
    state = classify_history(
        State.UNSTABLE,
        ["own"],
        near(2.12),
        past=[near(), near()],
        losses=climbing,
        first_loss=1.0,
        previous=State.EDGE_OF_STABILITY,
        best_loss=0.0262,
    )[0]
    assert state is State.EDGE_OF_STABILITY
    negative = classify_history(
        State.UNSTABLE,
        ["own"],
        near(2.9),
        past=[near(), near()],
        losses=[-10.5, -10.8],
        first_loss=-2.0,
        previous=State.EDGE_OF_STABILITY,
        best_loss=-10.0,
    )[0]
    assert negative is State.EDGE_OF_STABILITY  # falling below its minimum is no rise


def test_one_batch_far_above_a_lucky_first_loss_is_not_an_explosion():
    """Fine-tuning an accurate classifier one sample a step, a first loss of 1e-4 put the
    explosion's limit at 0.1, under one mislabelled sample's loss: once the first window's mean
    is known, a single loss is held against the larger of the two."""

    def judged(losses, first_mean):
        return classify_history(
            State.LEARNING,
            ["own"],
            near(0.0),
            losses=losses,
            first_loss=1e-4,
            best_loss=0.04,
            first_mean=first_mean,
        )

    assert judged([0.001, 5.0, 0.002, 0.001], first_mean=0.05)[0] is State.LEARNING
    state, reasons = judged([0.001, 5.0, 0.002, 0.001], first_mean=None)  # not known yet
    assert state is State.DIVERGED and "1000 times its first value 0.0001" in reasons[0]
    state, reasons = judged([0.001, 60.0, 0.002, 0.001], first_mean=0.05)
    assert state is State.DIVERGED
    assert "above 1000 times its mean before the first probe 0.05" in reasons[0]
    # by magnitude (a review: a negative log-likelihood starting at -3 whose first window
    # averaged 0.002 had its limit at 2, and a loss of 2.5 "ran away")
    from curvscope.diagnosis.classify import explosion_base

    assert explosion_base(-3.0, 0.002) == -3.0 and explosion_base(1e-4, -0.05) == -0.05
    negative = classify_history(
        State.LEARNING, ["own"], near(0.0), losses=[2.5], first_loss=-3.0, first_mean=0.002
    )
    assert negative[0] is State.LEARNING


def test_unstable_advice_names_the_rate_of_the_curvature_that_decided():
    """Heavy-ball momentum's step direction can meet more curvature than λ_max; where it
    decided *unstable*, the advice named the sharpness's stable rate, 0.2, above the present
    0.1, and said "lower it below that" (a review). It names the rate the step allows."""
    ev = {
        "loss": 1.0,
        "grad_norm": 1.0,
        "sharpness": 10.0,
        "lambda_min": 0.0,
        "stability_limit": 20.0,
        "directional_curvature": 30.0,
        "lr": 0.1,
        "limit_constant": 2.0,
        "stable_lr": 0.2,
    }
    state, reasons = classify(ev)
    assert state == State.UNSTABLE and "along the step direction" in reasons[1]
    said = state.advice(ev)[0]
    assert said.startswith("The largest stable learning rate along the steps taken here is 0.0667")
    assert "(now 0.1; the sharpness alone allows 0.2)" in said
    ev.update(directional_curvature=5.0, sharpness=30.0, stable_lr=2 / 30)  # the sharpness's
    assert (
        classify(ev)[0]
        .advice(ev)[0]
        .startswith("The largest stable learning rate here is 0.0667 (now 0.1)")
    )
