r"""The decision of the on-the-fly loop: call the reference at this structure or not
(method §6 and §8), with the user's safety nets.

At a structure whose ensemble energy has total std σ, the calibrated error model
(:mod:`flytune.bayes.calibration`, a Gamma(a', b') posterior on the precision
multiplier) gives a Student-t predictive error with ν = 2a' and scale σ·sqrt(b'/a'), so

    P(|e| > ε) = 2·(1 − T_ν(ε / (σ·sqrt(b'/a')))),

and the reference is called when P(|e| > ε) > 1 − confidence (default 5 %). In order:

1. the first structure of a run is always labelled (it sets the energy offset);
2. ``max_reference_calls`` reached: no more calls;
3. fewer than ``min_steps_between_calls`` force calls since the last call: wait;
4. ``force_call_after`` force calls without a call: call anyway;
5. otherwise the calibrated probability decides.

After a call, the error e = E_ref + Δ − Ê and the σ predicted *before* the update
update the calibration (:meth:`Decision.observe`).
"""

from __future__ import annotations

from dataclasses import dataclass

from flytune.bayes.calibration import Calibrator
from flytune.config import SafetyConfig


@dataclass(frozen=True)
class Verdict:
    """What the decision found at one structure."""

    call: bool
    prob_exceed: float  # P(|e| > ε) under the calibration (1 for the first structure)
    #: "first", "probability", "forced", "confident", "call cap" or "waiting"
    reason: str
    #: the rule asked for a call (P(|e| > ε) above the level) and a limit kept it from
    #: being made: a step outside the promise
    uncontrolled: bool = False


class Decision:
    """Calibrated probability of an error above ε, the confidence level and the safety
    nets: everything that decides whether the reference is called.

    ``threshold_eV`` ε and σ are in eV; ``confidence`` c calls when P(|e| > ε) > 1 − c.
    """

    def __init__(self, calibrator: Calibrator, threshold_eV: float, confidence: float,
                 safety: SafetyConfig | None = None):
        if not threshold_eV > 0:
            raise ValueError(f"the threshold must be > 0 eV, got {threshold_eV}")
        if not 0 < confidence < 1:
            raise ValueError(f"the confidence must be in (0, 1), got {confidence}")
        self.calibrator = calibrator
        self.threshold_eV = float(threshold_eV)
        self.confidence = float(confidence)
        self.safety = safety or SafetyConfig()

    def prob_exceed(self, sigma: float) -> float:
        """P(|e| > ε) for a prediction with std ``sigma`` (eV)."""
        return float(self.calibrator.prob_exceed(self.threshold_eV, sigma))

    def decide(self, sigma: float, *, labels: int, since_call: int, reference_calls: int) -> Verdict:
        """The verdict at a structure with std ``sigma`` (eV), given the number of labels so
        far, the force calls since the last reference call (counting this one) and the
        reference calls made (see the module docstring for the order of the rules)."""
        if labels == 0:
            return Verdict(True, 1.0, "first")
        prob = self.prob_exceed(sigma)
        s = self.safety
        wanted = prob > 1.0 - self.confidence
        if s.max_reference_calls is not None and reference_calls >= s.max_reference_calls:
            return Verdict(False, prob, "call cap", uncontrolled=wanted)
        if since_call <= s.min_steps_between_calls:
            return Verdict(False, prob, "waiting", uncontrolled=wanted)
        if s.force_call_after is not None and since_call >= s.force_call_after:
            return Verdict(True, prob, "forced")
        if wanted:
            return Verdict(True, prob, "probability")
        return Verdict(False, prob, "confident")

    def observe(self, error: float, sigma: float) -> None:
        """Record the error e (eV) of a labelled structure and the std σ (eV) predicted
        there before the update."""
        self.calibrator.observe(error, sigma)

    def calibrated_sigma(self, sigma: float) -> float:
        """The scale σ·sqrt(b'/a') of the predictive error (eV)."""
        return float(self.calibrator.calibrated_sigma(sigma))
