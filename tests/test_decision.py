"""The call decision: calibrated probability, confidence and safety nets, in their order."""

import pytest

from flytune.bayes.calibration import Calibrator
from flytune.config import SafetyConfig
from flytune.otf.decision import Decision


def worked_example(safety=None) -> Decision:
    """method §6: a = 3, b = 10 and four interventions give a' = 5, b' = 13.19 (ε = 0.5)."""
    decision = Decision(Calibrator(3.0, 10.0), threshold_eV=0.5, confidence=0.95, safety=safety)
    for e, s in zip((0.30, -0.12, 0.45, 0.05), (0.20, 0.15, 0.25, 0.10)):
        decision.observe(e, s)
    return decision


def test_probability_decides_at_the_switch_over():
    d = worked_example()
    low = d.decide(0.10, labels=5, since_call=7, reference_calls=5)
    high = d.decide(0.15, labels=5, since_call=7, reference_calls=5)
    assert (low.call, low.reason) == (False, "confident")
    assert (high.call, high.reason) == (True, "probability")
    assert low.prob_exceed == pytest.approx(1 - 0.988329, abs=5e-7)
    assert high.prob_exceed == pytest.approx(1 - 0.932751, abs=5e-7)
    assert not d.decide(0.138163 - 1e-5, labels=5, since_call=7, reference_calls=5).call
    assert d.decide(0.138163 + 1e-5, labels=5, since_call=7, reference_calls=5).call


def test_confidence_level_moves_the_switch_over():
    d = worked_example()
    d.confidence = 0.99  # call when P(|e| > ε) > 1 %: σ = 0.1 (P = 1.17 %) now calls
    assert d.decide(0.10, labels=5, since_call=7, reference_calls=5).call


def test_safety_nets_in_order():
    d = worked_example(SafetyConfig(max_reference_calls=5, min_steps_between_calls=2, force_call_after=10))
    first = d.decide(1e-9, labels=0, since_call=1, reference_calls=0)
    assert (first.call, first.reason, first.prob_exceed) == (True, "first", 1.0)
    assert d.decide(0.15, labels=5, since_call=7, reference_calls=5).reason == "call cap"
    assert d.decide(0.15, labels=4, since_call=2, reference_calls=4).reason == "waiting"
    assert d.decide(0.15, labels=4, since_call=3, reference_calls=4).reason == "probability"
    forced = d.decide(0.01, labels=4, since_call=10, reference_calls=4)
    assert (forced.call, forced.reason) == (True, "forced")
    assert d.decide(0.01, labels=4, since_call=9, reference_calls=4).reason == "confident"


def test_a_limit_that_blocks_a_wanted_call_marks_the_step_uncontrolled():
    d = worked_example(SafetyConfig(max_reference_calls=5, min_steps_between_calls=2))
    capped = d.decide(0.15, labels=5, since_call=7, reference_calls=5)  # P = 6.7 % > 5 %
    waiting = d.decide(0.15, labels=4, since_call=2, reference_calls=4)
    assert not capped.call and capped.uncontrolled and not waiting.call and waiting.uncontrolled
    assert not d.decide(0.10, labels=5, since_call=7, reference_calls=5).uncontrolled  # P = 1.2 %: no call wanted
    assert not d.decide(0.15, labels=4, since_call=3, reference_calls=4).uncontrolled  # called


@pytest.mark.parametrize("bad", [dict(threshold_eV=0.0), dict(confidence=1.0)])
def test_invalid_settings(bad):
    settings = dict(threshold_eV=0.5, confidence=0.95) | bad
    with pytest.raises(ValueError):
        Decision(Calibrator(), **settings)
