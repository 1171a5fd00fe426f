r"""The decision of the on-the-fly loop: call the reference at this structure or not
(method §6 and §8), with the user's safety nets.

At a structure whose ensemble energy has total std σ, the calibrated error model
(:mod:`flytune.bayes.calibration`, a Gamma(a', b') posterior on the precision
multiplier) gives a Student-t predictive error with ν = 2a' and scale σ·sqrt(b'/a'), so

    P(|e| > ε) = 2·(1 − T_ν(ε / (σ·sqrt(b'/a')))),

or, where the error expected there is μ ≠ 0 (a label's residual carried as a bias),
1 − T_ν((ε − μ)/s) + T_ν((−ε − μ)/s) with s = σ·sqrt(b'/a'),

and the reference is called when P(|e| > ε) > 1 − confidence (default 5 %). With
``criterion = "forces"`` the probability is P(max_a |ΔF_a| > ε_F) from the per-atom force
stds, under a force calibration of its own (by default the largest atom error of each call,
:class:`~flytune.bayes.calibration.LargestAtomCalibrator`; ``force_calibration = "components"``:
one standardised squared force error per call, :func:`~flytune.bayes.calibration.force_z2`,
and :func:`flytune.bayes.calibration.prob_force_within`);
with ``"both"``, either probability above the level calls. In order:

1. the first structure of a run is always labelled (it sets the energy offset);
2. ``max_reference_calls`` reached: no more calls;
3. fewer than ``min_steps_between_calls`` force calls since the last call: wait;
4. ``force_call_after`` force calls without a call: call anyway;
5. a calibration check (:meth:`Decision.check_due`): while the calibration has seen
   fewer than ``checks`` errors, a call once 2^n force calls have passed since the last
   one (n errors seen);
6. otherwise the calibrated probability decides.

Two baseline triggers replace rules 5–6, for comparison with the method on the same run
(``trigger``): ``"spread"`` calls when the ensemble's energy std (the members' spread with
σ_E, no calibration, no label misfit) exceeds a fixed fraction of ε; ``"force_deviation"``
calls when the largest per-atom force deviation among the members
(:func:`flytune.bayes.ensemble.force_deviation`) exceeds a fixed threshold, the rule of
DP-GEN and aims-PAX. The probability is still computed and logged at every step.

After a call, the error e = E_ref + Δ − Ê and the σ and μ predicted *before* the
update update the calibration (:meth:`Decision.observe`).

What the members miss their newest label by (:class:`LabelMisfit`) enters in one of three
ways (``[uncertainty] label_misfit_as``): as spread, the σ the rule uses is the
ensemble's with its noise term raised to that misfit when it is more than the
likelihood's σ_E (:func:`trusted_sigma`); as a bias, the residual carried to the
structure is the expected error μ and its first-order change adds to σ
(:func:`carried_error`); as a correction, that residual is taken off the prediction the
MD is given (:meth:`LabelMisfit.corrected`), so μ = 0, and its first-order change adds to
σ as with the bias. With ``correction_order = 2`` the correction also scales the members'
own change beyond first order from the label by κ̄, the ratio of the reference's curvature
to theirs fitted at the calls (:class:`CurvatureFit`), whose uncertainty adds to σ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from ase.geometry import find_mic

from flytune.bayes.calibration import Calibrator, LargestAtomCalibrator
from flytune.bayes.ensemble import combine
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


def carried_error(sigma, residual_eV: float, change_eV: float) -> tuple[float, float]:
    r"""The error expected at a structure and its std (eV), (μ, σ_t), when the label
    misfit is carried as a known residual (``[uncertainty] label_misfit_as = "bias"``):

        μ = −d(x) = −(d_L − ΔF_L·Δx),    σ_t² = σ² + (ΔF_L·Δx)²,

    ``residual_eV`` d(x) and ``change_eV`` ΔF_L·Δx from :meth:`LabelMisfit.carried`,
    σ the ensemble's std. The reference has shown the members' mean off by d_L at L, in
    sign and size; to first order that is the error at x, e = E_ref − Ê ≈ −d(x), and the
    first-order term, of unknown remainder, counts as spread as large as itself. At L
    itself σ_t = σ and the error is known; far from L the spread grows with the force
    residual the ensemble has left there. With ``"spread"`` the same residual enters σ
    only, sign unused (:func:`trusted_sigma`), and a known error of 0.6 ε asks for a call
    as an unknown one of 0.3 ε would.
    """
    sigma = float(sigma)
    return -float(residual_eV), float(np.sqrt(sigma**2 + float(change_eV) ** 2))


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
    member_energy_eV: np.ndarray | None = None  # μ_m(x_L), (M,): each member's energy at L
    member_forces_eV_A: np.ndarray | None = None  # F_m(x_L), (M, n, 3)

    @classmethod
    def measure(cls, label, energy_eV, forces_eV_A: np.ndarray, energy_offset_eV: float) -> LabelMisfit:
        """From a labelled structure (raw reference energy and forces, as the data holds
        them: before any constraint such as the MD's FixCom) and the predicting ensemble's
        mean energy and forces there, or each member's, (M,) and (M, n, 3), whose mean is
        the ensemble's (kept for :meth:`anchored_sigma`)."""
        energy, forces = np.asarray(energy_eV, dtype=float), np.asarray(forces_eV_A, dtype=float)
        members = (energy, forces) if energy.ndim == 1 else (None, None)
        if energy.ndim == 1:
            energy, forces = energy.mean(axis=0), forces.mean(axis=0)
        return cls(np.array(label.positions), np.array(label.cell), np.array(label.pbc),
                   float(energy - (label.get_potential_energy() + energy_offset_eV)),
                   forces - label.get_forces(apply_constraint=False), *members)

    def displacement(self, atoms) -> np.ndarray:
        """Δx = x − x_L (Å, (n, 3); minimum image in periodic cells)."""
        displacement = atoms.positions - self.positions
        if self.pbc.any():
            displacement, _ = find_mic(displacement, self.cell, self.pbc)
        return displacement

    def carried(self, atoms) -> tuple[float, float]:
        """(d(x), ΔF_L·Δx) (eV) at ``atoms`` (same atoms as the label)."""
        change = float(np.sum(self.force_residual_eV_A * self.displacement(atoms)))
        return self.energy_residual_eV - change, change

    def anchored_sigma(self, atoms, member_energy_eV: np.ndarray, sigma_energy: float) -> float | None:
        r"""The members' spread at ``atoms`` about their own first-order expansion from L
        (eV), the σ of a prediction anchored at the label (``label_misfit_as = "correction"``):

            δ_m(x) = μ_m(x) − μ_m(x_L) + F_m(x_L)·Δx,    σ_a² = Var_m(δ_m) + σ_E²,

        ``member_energy_eV`` μ_m(x) (M,), σ_E the likelihood's energy noise. Member m,
        corrected at L by its own residual, predicts the reference's first-order expansion
        from L plus δ_m(x); the members' mean is the corrected prediction (:meth:`corrected`),
        and their spread is what they disagree on once the label has fixed the energy and
        forces at L: nothing at L, growing with the distance as far as they disagree about
        the surface in between. A constant or linear difference between members (what the
        label fixes) does not count. None without the members at L or with another number
        of members."""
        member_energy_eV = np.asarray(member_energy_eV, dtype=float)
        if self.member_energy_eV is None or self.member_energy_eV.shape != member_energy_eV.shape:
            return None
        delta = member_energy_eV - self.member_energy_eV + np.sum(
            self.member_forces_eV_A * self.displacement(atoms), axis=(1, 2))
        return float(np.sqrt(combine(delta, np.full(len(delta), float(sigma_energy) ** 2))[1]))

    def corrected(self, atoms, energy_eV: float, forces_eV_A: np.ndarray) -> tuple[float, np.ndarray]:
        r"""The members' mean energy and forces at ``atoms`` with the residual carried there
        taken off (``[uncertainty] label_misfit_as = "correction"``):

            E_c(x) = Ê(x) − d(x) = Ê(x) − d_L + ΔF_L·Δx,    F_c(x) = −∂E_c/∂x = F̂(x) − ΔF_L,

        the members' potential plus a term linear in the positions, so E_c is a potential
        energy surface with F_c its forces (the MD conserves energy on it), equal to the
        reference's, E_ref + Δ and F_ref, at the label itself. The stress is left as the
        members predict it."""
        return float(energy_eV) - self.carried(atoms)[0], np.asarray(forces_eV_A) - self.force_residual_eV_A

    def curvature(self, atoms, energy_eV: float, forces_eV_A: np.ndarray) -> tuple[float, np.ndarray] | None:
        r"""The members' mean change from L beyond first order at ``atoms``, and its forces:

            q̂(x) = Ê(x) − Ê(x_L) + F̂(x_L)·Δx ≈ ½ Δxᵀ Ĥ Δx (eV),    F_q(x) = −∂q̂/∂x = F̂(x) − F̂(x_L) (eV/Å),

        ``energy_eV`` Ê(x) and ``forces_eV_A`` F̂(x) the members' mean at ``atoms`` (before
        any correction), Ê(x_L), F̂(x_L) the same members' mean at L (:attr:`member_energy_eV`,
        :attr:`member_forces_eV_A`), Ĥ their Hessian. The first-order corrected prediction
        (:meth:`corrected`) is E_ref(x_L) − F_ref(x_L)·Δx + q̂(x): the reference's value
        and slope at L with the members' curvature. None without the members at L or with
        another number of atoms."""
        forces_eV_A = np.asarray(forces_eV_A, dtype=float)
        if self.member_energy_eV is None or self.member_forces_eV_A.shape[1:] != forces_eV_A.shape:
            return None
        at_label = self.member_forces_eV_A.mean(axis=0)
        q = float(energy_eV) - float(self.member_energy_eV.mean()) + float(np.sum(at_label * self.displacement(atoms)))
        return q, forces_eV_A - at_label

    def at(self, atoms) -> float:
        """r(x) = |d(x)| (eV) at ``atoms`` (same atoms as the label)."""
        return abs(self.carried(atoms)[0])

    def state_dict(self) -> dict:
        state = {"positions": self.positions.tolist(), "cell": self.cell.tolist(), "pbc": self.pbc.tolist(),
                 "energy_residual_eV": self.energy_residual_eV,
                 "force_residual_eV_A": self.force_residual_eV_A.tolist()}
        if self.member_energy_eV is not None:
            state.update(member_energy_eV=self.member_energy_eV.tolist(),
                         member_forces_eV_A=self.member_forces_eV_A.tolist())
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> LabelMisfit:
        members = [np.array(state[k]) if k in state else None for k in ("member_energy_eV", "member_forces_eV_A")]
        return cls(np.array(state["positions"]), np.array(state["cell"]), np.array(state["pbc"], dtype=bool),
                   float(state["energy_residual_eV"]), np.array(state["force_residual_eV_A"]), *members)


@dataclass
class CurvatureFit:
    r"""The ratio κ by which the reference's curvature about a label exceeds the members'
    own, fitted on the fly from the errors at the calls (``[uncertainty] correction_order
    = 2``), and the second-order correction it gives.

    About the newest label L, the first-order corrected prediction (:meth:`LabelMisfit.corrected`)
    has the reference's value and slope and the members' curvature, so its error is
    e₁ = q_ref(x) − q̂(x) + O(Δx³), q the change beyond first order (:meth:`LabelMisfit.curvature`).
    For members whose Hessian is the reference's uniformly softened, Ĥ = H_ref/(1 + κ)
    (pretrained universal potentials are systematically soft: their curvature, phonon
    frequencies and barriers come out low, Deng et al. 2024), e₁ = κ·q̂. Each call i with a
    label to anchor on gives (q̂ᵢ, e₁ᵢ, sᵢ), sᵢ the std the decision had there without this
    term. A Gaussian prior κ ~ N(0, τ²) (τ = ``prior_scale``) and errors e₁ᵢ ~ N(κ q̂ᵢ, sᵢ²) give

        κ̄ = (Σ wᵢ e₁ᵢ q̂ᵢ / sᵢ²) / P,    Var κ = 1/P,    P = 1/τ² + Σ wᵢ q̂ᵢ² / sᵢ²,

    and the scatter about κ q̂ that the sᵢ do not explain (members softened unevenly across
    modes), per unit q̂², by moments: ρ² = max(0, Σ wᵢ [(e₁ᵢ − κ̄ q̂ᵢ)² − sᵢ²]) / Σ wᵢ q̂ᵢ².
    At a structure the prediction then gains κ̄·q̂ (forces κ̄·F_q: the corrected surface stays
    a potential between calls, the members' own scaled by 1 + κ̄ about L) and its variance
    (Var κ + ρ²)·q̂². wᵢ = γ^{n−i} forgets calls made by a model the run no longer has, with the
    calibration's discount γ (γ = 1: every call counts alike). Before any call κ̄ = 0 and the
    correction is the first-order one."""

    prior_scale: float = 1.0  # τ, dimensionless
    discount: float = 1.0  # γ
    n: int = 0
    sum_qq: float = 0.0  # Σ w q̂²/s²
    sum_eq: float = 0.0  # Σ w e₁ q̂/s²
    sum_q2: float = 0.0  # Σ w q̂² (eV²)
    sum_excess: float = 0.0  # Σ w (e₁² − s²), (eV²): with the sums below, the scatter's moments
    sum_e_q: float = 0.0  # Σ w e₁ q̂ (eV²)

    def observe(self, error_eV: float, curvature_eV: float, sigma_eV: float) -> None:
        """Record one call: e₁ (the first-order corrected prediction's error), q̂ and s (eV)."""
        if not (np.isfinite(error_eV) and np.isfinite(curvature_eV) and np.isfinite(sigma_eV) and sigma_eV > 0):
            raise ValueError(f"need a finite error and curvature and sigma > 0, got {error_eV}, {curvature_eV}, {sigma_eV}")
        g, e, q, s2 = self.discount, float(error_eV), float(curvature_eV), float(sigma_eV) ** 2
        self.n += 1
        self.sum_qq = g * self.sum_qq + q * q / s2
        self.sum_eq = g * self.sum_eq + e * q / s2
        self.sum_q2 = g * self.sum_q2 + q * q
        self.sum_excess = g * self.sum_excess + e * e - s2
        self.sum_e_q = g * self.sum_e_q + e * q

    @property
    def precision(self) -> float:
        """P = 1/τ² + Σ w q̂²/s²."""
        return 1.0 / self.prior_scale**2 + self.sum_qq

    @property
    def ratio(self) -> float:
        """κ̄, the posterior mean (dimensionless)."""
        return self.sum_eq / self.precision

    @property
    def scatter(self) -> float:
        """ρ² (dimensionless): Σ w (e₁ − κ̄q̂)² − Σ w s² = Σ w (e₁² − s²) − 2κ̄ Σ w e₁q̂ + κ̄² Σ w q̂²."""
        if self.sum_q2 <= 0:
            return 0.0
        k = self.ratio
        return max(0.0, self.sum_excess - 2 * k * self.sum_e_q + k * k * self.sum_q2) / self.sum_q2

    def variance(self, curvature_eV: float) -> float:
        """(Var κ + ρ²)·q̂² (eV²): what the term κ̄·q̂ adds to σ² at a structure with q̂ (eV)."""
        return (1.0 / self.precision + self.scatter) * float(curvature_eV) ** 2

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> CurvatureFit:
        return cls(**state)


@dataclass(frozen=True)
class Verdict:
    """What the decision found at one structure."""

    call: bool
    prob_exceed: float  # P(|e| > ε) under the calibration (1 for the first structure)
    #: "first", "probability", "forced", "check", "confident", "call cap", "waiting", or a
    #: baseline trigger's "spread" or "force deviation"
    reason: str
    #: the rule asked for a call (P(|e| > ε) above the level) and a limit kept it from
    #: being made: a step outside the promise
    uncontrolled: bool = False
    #: P(max_a |ΔF_a| > ε_F) under the force calibration; None without ε_F
    prob_force_exceed: float | None = None


class Decision:
    """Calibrated probability of an error above ε, the confidence level and the safety
    nets: everything that decides whether the reference is called.

    ``threshold_eV`` ε and σ are in eV; ``confidence`` c calls when P(|e| > ε) > 1 − c.
    ``criterion`` (``"energy"``, ``"forces"``, ``"both"``) says which probability decides;
    ``force_threshold_eV_A`` ε_F and ``force_calibrator`` (its own state, default a
    :class:`~flytune.bayes.calibration.LargestAtomCalibrator` with the energy calibration's
    prior) serve the force probability, which is computed, and the force calibration fed,
    whenever ε_F is given. ``trigger`` selects the method's
    probability (default) or a baseline (see the module docstring), with its threshold
    ``spread_threshold_eV`` (σ, eV) or ``force_deviation_threshold_eV_A`` (eV/Å).
    """

    def __init__(self, calibrator: Calibrator, threshold_eV: float, confidence: float,
                 safety: SafetyConfig | None = None, checks: int = 0, *, criterion: str = "energy",
                 force_threshold_eV_A: float | None = None,
                 force_calibrator: Calibrator | LargestAtomCalibrator | None = None,
                 trigger: str = "probability", spread_threshold_eV: float | None = None,
                 force_deviation_threshold_eV_A: float | None = None):
        if not threshold_eV > 0:
            raise ValueError(f"the threshold must be > 0 eV, got {threshold_eV}")
        if not 0 < confidence < 1:
            raise ValueError(f"the confidence must be in (0, 1), got {confidence}")
        if criterion not in ("energy", "forces", "both"):
            raise ValueError(f"criterion must be 'energy', 'forces' or 'both', not {criterion!r}")
        if criterion != "energy" and not (force_threshold_eV_A or 0) > 0:
            raise ValueError(f"criterion {criterion!r} needs a force threshold > 0 eV/Å")
        self.calibrator = calibrator
        self.threshold_eV = float(threshold_eV)
        self.confidence = float(confidence)
        self.safety = safety or SafetyConfig()
        self.checks = int(checks)
        self.criterion = criterion
        self.force_threshold_eV_A = None if force_threshold_eV_A is None else float(force_threshold_eV_A)
        if force_calibrator is None and self.force_threshold_eV_A is not None:
            force_calibrator = LargestAtomCalibrator(calibrator.shape, calibrator.rate,
                                                     discount=calibrator.discount)
        self.force_calibrator = force_calibrator
        thresholds = {"probability": 1.0, "spread": spread_threshold_eV, "force_deviation": force_deviation_threshold_eV_A}
        if trigger not in thresholds:
            raise ValueError(f"trigger must be 'probability', 'spread' or 'force_deviation', not {trigger!r}")
        if not (thresholds[trigger] or 0) > 0:
            raise ValueError(f"trigger {trigger!r} needs its threshold > 0")
        self.trigger = trigger
        self.trigger_threshold = float(thresholds[trigger])

    def prob_exceed(self, sigma: float, mean: float = 0.0) -> float:
        """P(|e| > ε) for a prediction with std ``sigma`` and expected error ``mean`` (eV)."""
        return float(self.calibrator.prob_exceed(self.threshold_eV, sigma, mean))

    def prob_force_exceed(self, force_sigma) -> float | None:
        """P(max_a |ΔF_a| > ε_F) for per-atom force stds ``force_sigma`` (eV/Å); None without ε_F."""
        if self.force_threshold_eV_A is None or force_sigma is None:
            return None
        return self.force_calibrator.prob_force_exceed(self.force_threshold_eV_A, force_sigma)

    def deciding_prob(self, prob: float, prob_force: float | None) -> float:
        """The probability the criterion compares with the level: P(|e| > ε), P(max |ΔF| > ε_F)
        or the larger of the two."""
        if self.criterion == "energy" or prob_force is None:
            return prob
        return prob_force if self.criterion == "forces" else max(prob, prob_force)

    def wants_call(self, prob_exceed: float) -> bool:
        """Whether P(|e| > ε) is above the call level 1 − confidence."""
        return prob_exceed > 1.0 - self.confidence

    def decide(self, sigma: float, *, labels: int, since_call: int, reference_calls: int,
               force_sigma=None, ensemble_sigma: float | None = None, force_deviation=None,
               mean: float = 0.0) -> Verdict:
        """The verdict at a structure with std ``sigma`` and expected error ``mean`` (eV; 0
        unless a label's residual is carried there, :func:`carried_error`), per-atom force stds
        ``force_sigma`` (eV/Å; needed by the force criterion), given the number of labels
        so far, the force calls since the last reference call (counting this one) and the
        reference calls made (see the module docstring for the order of the rules). The
        baseline triggers need the ensemble's own std ``ensemble_sigma`` (eV; default
        ``sigma``) or the per-atom ``force_deviation`` (eV/Å)."""
        if labels == 0:
            return Verdict(True, 1.0, "first", prob_force_exceed=None if self.force_threshold_eV_A is None else 1.0)
        prob = self.prob_exceed(sigma, mean)
        prob_force = self.prob_force_exceed(force_sigma)
        if self.criterion != "energy" and prob_force is None:
            raise ValueError(f"criterion {self.criterion!r} needs the per-atom force stds")
        s = self.safety
        if self.trigger == "probability":
            wanted, reason = self.wants_call(self.deciding_prob(prob, prob_force)), "probability"
        elif self.trigger == "spread":
            spread = sigma if ensemble_sigma is None else ensemble_sigma
            wanted, reason = spread > self.trigger_threshold, "spread"
        else:
            if force_deviation is None:
                raise ValueError("trigger 'force_deviation' needs the members' per-atom force deviations")
            wanted, reason = float(np.max(force_deviation)) > self.trigger_threshold, "force deviation"

        def verdict(call: bool, reason: str, uncontrolled: bool = False) -> Verdict:
            return Verdict(call, prob, reason, uncontrolled, prob_force)

        if s.max_reference_calls is not None and reference_calls >= s.max_reference_calls:
            return verdict(False, "call cap", uncontrolled=wanted)
        if since_call <= s.min_steps_between_calls:
            return verdict(False, "waiting", uncontrolled=wanted)
        if s.force_call_after is not None and since_call >= s.force_call_after:
            return verdict(True, "forced")
        if not wanted and self.trigger == "probability" and self.check_due(since_call):
            return verdict(True, "check")
        if wanted:
            return verdict(True, reason)
        return verdict(False, "confident")

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

    def observe(self, error: float, sigma: float, mean: float = 0.0) -> None:
        """Record the error e (eV) of a labelled structure and the std σ and expected error μ
        (eV) predicted there before the update."""
        self.calibrator.observe(error, sigma, mean)

    def observe_forces(self, errors, variances) -> None:
        """Record the force errors ΔF (A, 3) of a labelled structure (eV/Å) and the force
        variances (eV²/Å²) predicted there before the update in the force calibration (one
        z², :func:`~flytune.bayes.calibration.force_z2`, or the largest atom error,
        :class:`~flytune.bayes.calibration.LargestAtomCalibrator`); nothing without one."""
        if self.force_calibrator is not None:
            self.force_calibrator.observe_forces(errors, variances)

    def calibrated_sigma(self, sigma: float) -> float:
        """The scale σ·sqrt(b'/a') of the predictive error (eV)."""
        return float(self.calibrator.calibrated_sigma(sigma))
