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
5. a calibration check (:meth:`Decision.check_due`): while the calibration has seen
   fewer than ``checks`` errors, a call once 2^n force calls have passed since the last
   one (n errors seen);
6. otherwise the calibrated probability decides.

After a call, the error e = E_ref + Δ − Ê and the σ predicted *before* the update
update the calibration (:meth:`Decision.observe`).

The σ the rule uses (:func:`trusted_sigma`) is the ensemble's, with its noise term
raised to what the members miss their newest label by (:class:`LabelMisfit`), when that
is more than the likelihood's σ_E.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase.geometry import find_mic

from flytune.bayes.calibration import Calibrator
from flytune.config import SafetyConfig


def trusted_sigma(sigma, sigma_energy: float, misfit: float):
    r"""The energy std (eV) that the decision trusts, from the ensemble's σ (eV), the
    likelihood's energy noise σ_E (eV) and the label misfit r (eV) at the structure
    (:class:`LabelMisfit`):

        σ_t² = σ² + max(0, r² − σ_E²) = Var_m(μ_m) + max(σ_E², r²).

    Members drawn from the posterior reproduce their labels, energies and forces, to
    about their noise, so r ≤ σ_E and σ_t = σ: the published rule. Members that are not
    posterior samples (chains too short to fit or to spread: every member drifts the same
    way, and the spread stays near zero) miss what they learned, r ≫ σ_E, and the rule
    then trusts their σ no further than that miss; with σ ≈ σ_E alone it would stay silent
    however large the errors grow.
    """
    sigma = np.asarray(sigma, dtype=float)
    excess = max(0.0, float(misfit) ** 2 - float(sigma_energy) ** 2)
    result = np.sqrt(sigma**2 + excess)
    return result[()] if result.ndim == 0 else result


@dataclass
class LabelMisfit:
    r"""How the ensemble that predicts now misses the run's newest label L (measured
    after the update that learned it, or, while that update waits, from the prediction
    made at L), carried to nearby structures to first order in the displacement
    Δx = x − x_L (minimum image in periodic cells):

        d(x) ≈ d_L − ΔF_L · Δx,    d = Ê − (E_ref + Δ) (eV),   ΔF = F̂ − F_ref (eV/Å),

    since F = −∂E/∂x for both the members' mean and the reference. ``r(x) = |d(x)|`` is
    the misfit that :func:`trusted_sigma` adds to σ: it grows with the distance from the
    label at the rate of the force residual that the update left, and is ≈ 0 when the
    update learned the label's energy and forces. It cannot foresee what a first-order
    expansion misses (a bond breaking far from every label): there the ensemble's spread
    has to speak.
    """

    positions: np.ndarray  # x_L, Å, (n, 3)
    cell: np.ndarray  # (3, 3), Å
    pbc: np.ndarray  # (3,) bool
    energy_residual_eV: float  # d_L
    force_residual_eV_A: np.ndarray  # ΔF_L, (n, 3)

    @classmethod
    def measure(cls, label, energy_eV: float, forces_eV_A: np.ndarray, energy_offset_eV: float) -> LabelMisfit:
        """From a labelled structure (raw reference energy and forces, as the data holds
        them: before any constraint such as the MD's FixCom) and the predicting ensemble's
        mean energy and forces there."""
        return cls(np.array(label.positions), np.array(label.cell), np.array(label.pbc),
                   float(energy_eV - (label.get_potential_energy() + energy_offset_eV)),
                   np.asarray(forces_eV_A, dtype=float) - label.get_forces(apply_constraint=False))

    def at(self, atoms) -> float:
        """r(x) (eV) at ``atoms`` (same atoms as the label)."""
        displacement = atoms.positions - self.positions
        if self.pbc.any():
            displacement, _ = find_mic(displacement, self.cell, self.pbc)
        return abs(self.energy_residual_eV - float(np.sum(self.force_residual_eV_A * displacement)))

    def state_dict(self) -> dict:
        return {"positions": self.positions.tolist(), "cell": self.cell.tolist(), "pbc": self.pbc.tolist(),
                "energy_residual_eV": self.energy_residual_eV,
                "force_residual_eV_A": self.force_residual_eV_A.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict) -> LabelMisfit:
        return cls(np.array(state["positions"]), np.array(state["cell"]), np.array(state["pbc"], dtype=bool),
                   float(state["energy_residual_eV"]), np.array(state["force_residual_eV_A"]))


@dataclass(frozen=True)
class Verdict:
    """What the decision found at one structure."""

    call: bool
    prob_exceed: float  # P(|e| > ε) under the calibration (1 for the first structure)
    #: "first", "probability", "forced", "check", "confident", "call cap" or "waiting"
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
                 safety: SafetyConfig | None = None, checks: int = 0):
        if not threshold_eV > 0:
            raise ValueError(f"the threshold must be > 0 eV, got {threshold_eV}")
        if not 0 < confidence < 1:
            raise ValueError(f"the confidence must be in (0, 1), got {confidence}")
        self.calibrator = calibrator
        self.threshold_eV = float(threshold_eV)
        self.confidence = float(confidence)
        self.safety = safety or SafetyConfig()
        self.checks = int(checks)

    def prob_exceed(self, sigma: float) -> float:
        """P(|e| > ε) for a prediction with std ``sigma`` (eV)."""
        return float(self.calibrator.prob_exceed(self.threshold_eV, sigma))

    def wants_call(self, prob_exceed: float) -> bool:
        """Whether P(|e| > ε) is above the call level 1 − confidence."""
        return prob_exceed > 1.0 - self.confidence

    def decide(self, sigma: float, *, labels: int, since_call: int, reference_calls: int) -> Verdict:
        """The verdict at a structure with std ``sigma`` (eV), given the number of labels so
        far, the force calls since the last reference call (counting this one) and the
        reference calls made (see the module docstring for the order of the rules)."""
        if labels == 0:
            return Verdict(True, 1.0, "first")
        prob = self.prob_exceed(sigma)
        s = self.safety
        wanted = self.wants_call(prob)
        if s.max_reference_calls is not None and reference_calls >= s.max_reference_calls:
            return Verdict(False, prob, "call cap", uncontrolled=wanted)
        if since_call <= s.min_steps_between_calls:
            return Verdict(False, prob, "waiting", uncontrolled=wanted)
        if s.force_call_after is not None and since_call >= s.force_call_after:
            return Verdict(True, prob, "forced")
        if not wanted and self.check_due(since_call):
            return Verdict(True, prob, "check")
        if wanted:
            return Verdict(True, prob, "probability")
        return Verdict(False, prob, "confident")

    def check_due(self, since_call: int) -> bool:
        r"""Whether a calibration check is due: with n < ``checks`` errors seen,

            call when  since_call ≥ 2^n.

        The Gamma prior makes the scale of σ uncertain but not unbounded: with (a, b) =
        (3, 10) a σ twenty times too small (members that fit their labels and do not
        spread) gives P(|e| > ε) < 5 % at errors of several ε, and nothing then calls the
        reference that would show it. The checks test σ at doubling distances from the
        last label (1, 2, 4, 8, 16 force calls with 5 checks) until the calibration
        holds ``checks`` errors; each probability call counts as one of them. With
        ``checks = 0``, none: the published rule."""
        n = self.calibrator.n
        return n < self.checks and since_call >= 2**n

    def observe(self, error: float, sigma: float) -> None:
        """Record the error e (eV) of a labelled structure and the std σ (eV) predicted
        there before the update."""
        self.calibrator.observe(error, sigma)

    def calibrated_sigma(self, sigma: float) -> float:
        """The scale σ·sqrt(b'/a') of the predictive error (eV)."""
        return float(self.calibrator.calibrated_sigma(sigma))
