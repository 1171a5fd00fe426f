"""The call decision: calibrated probability, confidence and safety nets, in their order."""

import numpy as np
import pytest

from flytune.bayes.calibration import Calibrator
from flytune.config import SafetyConfig
from flytune.otf.decision import CurvatureFit, Decision, LabelMisfit, carried_error, trusted_sigma


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
    assert d.wants_call(high.prob_exceed) and not d.wants_call(low.prob_exceed) and not d.wants_call(0.05)


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


def test_trusted_sigma_adds_only_the_misfit_beyond_the_energy_noise():
    """σ_t² = σ² + max(0, r² − σ_E²): a misfit within σ_E leaves σ as it is (the published
    rule), a larger one raises the noise term from σ_E² to r²."""
    sigma_energy, spread = 0.02, 0.005
    sigma = (spread**2 + sigma_energy**2) ** 0.5
    assert trusted_sigma(sigma, sigma_energy, 0.0) == sigma
    assert trusted_sigma(sigma, sigma_energy, 0.019) == sigma
    assert trusted_sigma(sigma, sigma_energy, 0.3) == pytest.approx((spread**2 + 0.3**2) ** 0.5, rel=1e-12)
    assert trusted_sigma([sigma, 1.0], sigma_energy, 0.3) == pytest.approx(
        [(spread**2 + 0.09) ** 0.5, (1.0 + 0.09 - sigma_energy**2) ** 0.5], rel=1e-12)


def test_a_misfit_above_the_switch_over_makes_the_rule_call():
    """The worked example's σ = 0.10 eV is confident; the same σ with a label misfit of
    0.2 eV (the members miss what they learned) is not."""
    d = worked_example()
    assert not d.decide(0.10, labels=5, since_call=7, reference_calls=5).call
    assert d.decide(float(trusted_sigma(0.10, 0.05, 0.2)), labels=5, since_call=7, reference_calls=5).call


def test_label_misfit_follows_the_residual_to_first_order():
    """With a Lennard-Jones "ensemble" and EMT as the reference on a Cu cell, r(x) from the
    label's residual matches the true |d(x)| = |Ê − E_ref − Δ| to second order in the
    displacement; wrapping an atom into the cell does not change it."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.lj import LennardJones

    from flytune.data import labelled

    def residual(atoms, offset):
        model, ref = atoms.copy(), atoms.copy()
        model.calc, ref.calc = LennardJones(sigma=2.3, epsilon=0.4, rc=5.0), EMT()
        return model.get_potential_energy() - ref.get_potential_energy() - offset, model.get_forces(), ref

    base = bulk("Cu", "fcc", a=3.6, cubic=True)
    base.rattle(0.05, seed=1)
    offset = 0.3
    d_label, forces, ref = residual(base, offset)
    label = labelled(base, ref.get_potential_energy(), ref.get_forces())
    misfit = LabelMisfit.measure(label, d_label + offset + ref.get_potential_energy(), forces, offset)
    assert misfit.at(base) == pytest.approx(abs(d_label), rel=1e-12)
    direction = np.random.default_rng(0).normal(size=(len(base), 3))
    gaps = []
    for step in (0.02, 0.01):
        moved = base.copy()
        moved.positions += step * direction
        gaps.append(abs(misfit.at(moved) - abs(residual(moved, offset)[0])))
    assert gaps[1] < 0.35 * gaps[0]  # the remainder is second order
    moved.positions[0] -= moved.cell[0]  # the same structure, an atom one cell away
    assert misfit.at(moved) == pytest.approx(abs(residual(moved, offset)[0]), abs=gaps[1] * 1.01)
    assert LabelMisfit.from_state_dict(misfit.state_dict()).at(moved) == misfit.at(moved)


def test_the_corrected_prediction_is_the_reference_at_the_label_and_a_potential_around_it():
    """``LabelMisfit.corrected``: with a Lennard-Jones "ensemble" and EMT as the reference on
    a Cu cell, the corrected energy and forces at the label are the reference's (+ Δ);
    away from it the corrected forces are minus the gradient of the corrected energy (a
    central difference), and the corrected energy is closer to the reference's than the
    members' is, to second order."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.lj import LennardJones

    from flytune.data import labelled

    def both(atoms):
        model, ref = atoms.copy(), atoms.copy()
        model.calc, ref.calc = LennardJones(sigma=2.3, epsilon=0.4, rc=5.0), EMT()
        return model.get_potential_energy(), model.get_forces(), ref.get_potential_energy(), ref.get_forces()

    offset = 0.3
    base = bulk("Cu", "fcc", a=3.6, cubic=True)
    base.rattle(0.05, seed=1)
    energy, forces, e_ref, f_ref = both(base)
    misfit = LabelMisfit.measure(labelled(base, e_ref, f_ref), energy, forces, offset)
    e_c, f_c = misfit.corrected(base, energy, forces)
    assert e_c == pytest.approx(e_ref + offset, abs=1e-12) and np.allclose(f_c, f_ref, atol=1e-12)
    moved = base.copy()
    moved.positions += 0.03 * np.random.default_rng(0).normal(size=(len(base), 3))
    energy, forces, e_ref, _ = both(moved)
    e_c, f_c = misfit.corrected(moved, energy, forces)
    assert abs(e_c - e_ref - offset) < 0.2 * abs(energy - e_ref - offset)
    h = 1e-4
    for atom, axis in [(0, 0), (2, 1), (3, 2)]:
        energies = []
        for sign in (1, -1):
            shifted = moved.copy()
            shifted.positions[atom, axis] += sign * h
            e, f, _, _ = both(shifted)
            energies.append(misfit.corrected(shifted, e, f)[0])
        assert -(energies[0] - energies[1]) / (2 * h) == pytest.approx(f_c[atom, axis], abs=1e-5)


def test_the_anchored_spread_ignores_what_the_label_fixes_and_grows_away_from_it():
    """``LabelMisfit.anchored_sigma``: members that differ by a constant and a linear term
    (what the label's energy and forces fix) have no anchored spread beyond σ_E at any x;
    members that differ in curvature have none at L and a spread that grows with |Δx|²,
    the sample std of their quadratic terms; another number of members gives None."""
    from ase import Atoms

    positions = np.array([[0.0, 0, 0], [0.9, 0, 0]])
    members = np.array([0.0, 0.5, -0.3])  # per-member offset (eV), slope (eV/Å) and curvature (eV/Å²)
    slopes, curvatures = np.array([0.2, -0.1, 0.4]), np.array([1.0, 2.0, 4.0])

    def energies(x, curved):  # μ_m(x) along the first atom's x displacement u
        u = x[0, 0]
        return members + slopes * u + (0.5 * curvatures * u**2 if curved else 0.0)

    forces = np.zeros((3, 2, 3))
    forces[:, 0, 0] = -slopes  # F_m(x_L) = −∂μ_m/∂u at u = 0
    misfit = LabelMisfit(positions, np.zeros((3, 3)), np.zeros(3, bool), 0.1, np.zeros((2, 3)),
                         energies(positions, True), forces)
    sigma_e = 0.01
    for u in (0.0, 0.05, 0.2):
        moved = Atoms("H2", positions=positions + [[u, 0, 0], [0, 0, 0]])
        assert misfit.anchored_sigma(moved, energies(moved.positions, False), sigma_e) == pytest.approx(sigma_e)
        expected = np.hypot(np.std(0.5 * curvatures * u**2, ddof=1), sigma_e)
        assert misfit.anchored_sigma(moved, energies(moved.positions, True), sigma_e) == pytest.approx(expected)
    assert misfit.anchored_sigma(moved, np.zeros(4), sigma_e) is None
    restored = LabelMisfit.from_state_dict(misfit.state_dict())
    assert restored.anchored_sigma(moved, energies(moved.positions, True), sigma_e) == pytest.approx(expected)
    assert LabelMisfit(positions, np.zeros((3, 3)), np.zeros(3, bool), 0.1, np.zeros((2, 3))).anchored_sigma(
        moved, np.zeros(3), sigma_e) is None


def test_the_second_order_correction_recovers_a_uniformly_softer_model():
    """``LabelMisfit.curvature`` and ``CurvatureFit`` (``correction_order = 2``): for
    quadratic members along one coordinate u, q̂ = ½·mean(c_m)·u² and F_q = −mean(c_m)·u (a
    central difference of q̂); against a reference 1 + κ times stiffer, the calls' errors of
    the first-order corrected prediction give κ̄ → κ with its variance shrinking, the
    corrected prediction then matches the reference to within Var κ; members softened
    unevenly show as the scatter ρ²; no call: κ̄ = 0 and the prior's τ²·q̂²; the state
    survives a checkpoint."""
    from ase import Atoms

    positions = np.array([[0.0, 0, 0], [0.9, 0, 0]])
    offsets, slopes, curvatures = np.array([0.0, 0.5, -0.3]), np.array([0.2, -0.1, 0.4]), np.array([1.0, 2.0, 4.0])

    def members(u):  # (M,) energies and (M, 2, 3) forces at the first atom's x displacement u
        forces = np.zeros((3, 2, 3))
        forces[:, 0, 0] = -(slopes + curvatures * u)
        return offsets + slopes * u + 0.5 * curvatures * u**2, forces

    def moved(u):
        return Atoms("H2", positions=positions + [[u, 0, 0], [0, 0, 0]])

    misfit = LabelMisfit(positions, np.zeros((3, 3)), np.zeros(3, bool), 0.1, np.zeros((2, 3)), *members(0.0))
    u = 0.3
    energy, forces = members(u)
    q, force_q = misfit.curvature(moved(u), energy.mean(), forces.mean(axis=0))
    assert q == pytest.approx(0.5 * curvatures.mean() * u**2, rel=1e-12)
    assert force_q[0, 0] == pytest.approx(-curvatures.mean() * u, rel=1e-12) and np.allclose(force_q[1], 0)
    h = 1e-5
    central = [misfit.curvature(moved(u + d), members(u + d)[0].mean(), members(u + d)[1].mean(axis=0))[0]
               for d in (h, -h)]
    assert -(central[0] - central[1]) / (2 * h) == pytest.approx(force_q[0, 0], rel=1e-6)
    assert misfit.curvature(Atoms("H3", positions=np.zeros((3, 3))), 0.0, np.zeros((3, 3))) is None

    fit = CurvatureFit()
    assert (fit.ratio, fit.variance(q)) == (0.0, pytest.approx(q * q))  # no call: κ̄ = 0, Var κ = τ² = 1
    kappa, s, rng = 0.4, 0.005, np.random.default_rng(0)
    variances = []
    for u_i in rng.uniform(-0.4, 0.4, 40):
        q_i = 0.5 * curvatures.mean() * u_i**2
        fit.observe(kappa * q_i + s * rng.normal(), q_i, s)
        variances.append(1.0 / fit.precision)
    assert fit.n == 40 and fit.ratio == pytest.approx(kappa, abs=0.02)
    assert variances[-1] < variances[5] < variances[0] and fit.scatter < 0.01
    added, variance = fit.ratio * q, fit.variance(q)  # the reference's quadratic term (1 + κ)·q̂ from the members' q̂
    assert q + added == pytest.approx((1 + kappa) * q, abs=3 * np.sqrt(variance))
    restored = CurvatureFit.from_state_dict(fit.state_dict())
    assert (restored.ratio, restored.variance(q)) == (fit.ratio, fit.variance(q))

    uneven = CurvatureFit()
    for u_i in rng.uniform(-0.4, 0.4, 400):
        q_i = 0.5 * curvatures.mean() * u_i**2
        uneven.observe((kappa + 0.2 * rng.normal()) * q_i, q_i, s)
    assert uneven.ratio == pytest.approx(kappa, abs=0.05) and uneven.scatter == pytest.approx(0.04, rel=0.3)
    with pytest.raises(ValueError, match="sigma > 0"):
        fit.observe(0.1, 0.1, 0.0)


def test_a_misfit_carried_as_a_bias_calls_where_the_expected_error_nears_eps():
    """As a bias the residual d(x) is the error expected (μ = −d(x)) and only its
    first-order change ΔF_L·Δx adds to σ: a known error of 0.6 ε with σ = 0.1 ε does not
    call, where as spread (σ_t ≈ 0.6 ε) it does; a known error near ε calls, and so does a
    large first-order change; at the label itself σ is the ensemble's."""
    d = worked_example()
    eps, sigma = 0.5, 0.05
    assert carried_error(sigma, 0.3, 0.0) == (-0.3, pytest.approx(sigma))
    mean, sigma_t = carried_error(sigma, -0.3, 0.12)
    assert mean == 0.3 and sigma_t == pytest.approx(np.hypot(sigma, 0.12))
    decide = dict(labels=5, since_call=7, reference_calls=5)
    assert not d.decide(sigma, mean=-0.6 * eps, **decide).call
    assert d.decide(float(trusted_sigma(sigma, sigma, 0.6 * eps)), **decide).call
    assert d.decide(sigma, mean=0.95 * eps, **decide).call
    assert d.decide(carried_error(sigma, 0.3 * eps, 0.5 * eps)[1], mean=-0.3 * eps, **decide).call
    from ase import Atoms

    label = LabelMisfit(np.zeros((2, 3)), np.zeros((3, 3)), np.zeros(3, bool), 0.2, np.array([[0.1, 0, 0], [0, 0, 0]]))
    moved = Atoms("H2", positions=[[0.5, 0, 0], [0, 0, 0]])
    residual, change = label.carried(moved)
    assert change == pytest.approx(0.05) and residual == pytest.approx(0.15) and label.at(moved) == pytest.approx(0.15)


def test_calibration_checks_come_at_doubling_distances_until_enough_errors():
    """With 3 checks: due once 1, 2, 4 force calls have passed since the last call (0, 1,
    2 errors seen), never after 3 errors; a confident σ is then left to the probability."""
    decision = Decision(Calibrator(3.0, 10.0), 0.05, 0.95, checks=3)
    tiny = 1e-4  # P(|e| > ε) ≈ 0
    seen = []
    for n in range(4):
        seen.append([decision.decide(tiny, labels=1, since_call=k, reference_calls=1).reason for k in (1, 2, 4)])
        decision.observe(1e-4, tiny)
    assert seen == [["check"] * 3, ["confident", "check", "check"], ["confident", "confident", "check"],
                    ["confident"] * 3]
    assert not Decision(Calibrator(3.0, 10.0), 0.05, 0.95).check_due(10**6)  # checks = 0: published rule
    capped = Decision(Calibrator(3.0, 10.0), 0.05, 0.95, SafetyConfig(max_reference_calls=1), checks=3)
    verdict = capped.decide(tiny, labels=1, since_call=5, reference_calls=1)
    assert verdict.reason == "call cap" and not verdict.uncontrolled  # a check is not the rule's call


def test_baseline_triggers_ignore_the_calibration_and_the_checks():
    """trigger 'spread' calls at σ > fraction·ε, 'force_deviation' at max_a d_a above its
    threshold, whatever the calibration says, with no calibration checks; the safety nets
    keep their order; the probability is still reported."""
    spread = Decision(Calibrator(3.0, 10.0), 0.5, 0.95, SafetyConfig(force_call_after=10), checks=5,
                      trigger="spread", spread_threshold_eV=0.25)
    quiet = spread.decide(0.24, labels=1, since_call=1, reference_calls=1)  # a check would be due here
    assert (quiet.call, quiet.reason) == (False, "confident") and quiet.prob_exceed > 0.05
    loud = spread.decide(0.01, labels=1, since_call=2, reference_calls=1, ensemble_sigma=0.26)
    assert (loud.call, loud.reason) == (True, "spread") and loud.prob_exceed < 1e-6
    assert spread.decide(0.01, labels=1, since_call=10, reference_calls=1).reason == "forced"

    deviation = Decision(Calibrator(3.0, 10.0), 0.5, 0.95, trigger="force_deviation",
                         force_deviation_threshold_eV_A=0.1)
    assert not deviation.decide(1.0, labels=1, since_call=3, reference_calls=1,
                                force_deviation=np.array([0.02, 0.1, 0.05])).call
    called = deviation.decide(1e-3, labels=1, since_call=3, reference_calls=1,
                              force_deviation=np.array([0.02, 0.11, 0.05]))
    assert (called.call, called.reason) == (True, "force deviation")
    with pytest.raises(ValueError, match="needs its threshold"):
        Decision(Calibrator(), 0.5, 0.95, trigger="force_deviation")


def test_baseline_trigger_settings_are_checked():
    from flytune.config import UncertaintyConfig
    from flytune.units import KCAL_MOL

    u = UncertaintyConfig(trigger="force_deviation", force_deviation_threshold=2.0, force_threshold_unit="kcal/mol/A")
    assert u.force_deviation_threshold_eV_A == pytest.approx(2.0 * KCAL_MOL)
    with pytest.raises(ValueError, match="needs force_deviation_threshold"):
        UncertaintyConfig(trigger="force_deviation")
    with pytest.raises(ValueError):
        UncertaintyConfig(trigger="sigma")
