import numpy as np
import pytest
from scipy import stats

from flytune.bayes.calibration import Calibrator, predictive_scale, prob_within

ERRORS = (0.30, -0.12, 0.45, 0.05)
STDS = (0.20, 0.15, 0.25, 0.10)


def worked_example() -> Calibrator:
    calibrator = Calibrator(shape=3.0, rate=10.0)
    for e, s in zip(ERRORS, STDS):
        calibrator.observe(e, s)
    return calibrator


def test_worked_example_of_the_method_spec():
    c = worked_example()
    assert c.n == 4
    assert c.posterior_shape == pytest.approx(5.0)
    assert c.posterior_rate == pytest.approx(13.19)
    assert c.prob_within(0.5, 0.10) == pytest.approx(0.988329, abs=5e-7)
    assert c.prob_within(0.5, 0.15) == pytest.approx(0.932751, abs=5e-7)
    assert c.switch_sigma(0.5) == pytest.approx(0.138163, abs=5e-7)
    # just below / above the switch-over, P(|e| > ε) crosses 5 %
    assert c.prob_exceed(0.5, 0.138163 - 1e-5) < 0.05 < c.prob_exceed(0.5, 0.138163 + 1e-5)


def test_t_and_hyp2f1_forms_agree_where_well_conditioned():
    eps = 0.5
    sigma = np.geomspace(0.05, 5.0, 40)
    for shape in (1.5, 3.0, 5.0, 20.0):
        for rate in (2.0, 10.0, 30.0):
            x = eps**2 / (2 * rate * sigma**2)
            ok = x < 2.0  # the series of 2F1 converges well for |x| of order one
            p_t = prob_within(eps, sigma[ok], shape, rate, form="t")
            p_f = prob_within(eps, sigma[ok], shape, rate, form="hyp2f1")
            np.testing.assert_allclose(p_t, p_f, rtol=0, atol=1e-9)


def test_prob_within_matches_monte_carlo():
    rng = np.random.default_rng(0)
    shape, rate, sigma, eps = 4.0, 9.0, 0.2, 0.5
    lam = rng.gamma(shape, 1.0 / rate, size=2_000_000)
    errors = rng.normal(0.0, sigma / np.sqrt(lam))
    mc = np.mean(np.abs(errors) < eps)
    assert prob_within(eps, sigma, shape, rate) == pytest.approx(mc, abs=2e-3)
    assert prob_within(eps, sigma, shape, rate, form="hyp2f1") == pytest.approx(mc, abs=2e-3)


def test_prob_within_with_an_expected_error_matches_monte_carlo():
    """e | λ ~ N(μ, σ²/λ): the Student-t with location μ, both tails, against sampling;
    μ = 0 is the symmetric rule, and the sign of μ does not matter."""
    rng = np.random.default_rng(1)
    shape, rate, sigma, eps = 4.0, 9.0, 0.1, 0.5
    lam = rng.gamma(shape, 1.0 / rate, size=2_000_000)
    noise = rng.normal(0.0, sigma / np.sqrt(lam))
    for mean in (0.0, 0.2, 0.45, 0.7):
        mc = np.mean(np.abs(mean + noise) < eps)
        assert prob_within(eps, sigma, shape, rate, mean=mean) == pytest.approx(mc, abs=2e-3)
        assert prob_within(eps, sigma, shape, rate, mean=-mean) == pytest.approx(
            prob_within(eps, sigma, shape, rate, mean=mean), abs=1e-12)
    assert prob_within(eps, sigma, shape, rate, mean=0.0) == prob_within(eps, sigma, shape, rate)
    with pytest.raises(ValueError, match="mean 0"):
        prob_within(eps, sigma, shape, rate, form="hyp2f1", mean=0.2)


def test_an_error_observed_against_its_expected_value_is_standardised_from_it():
    """z = (e − μ)/σ: an error that came as expected adds nothing to b'."""
    c = Calibrator(3.0, 10.0)
    c.observe(0.30, 0.1, mean=0.30)
    c.observe(0.25, 0.1, mean=0.05)
    assert c.n == 2 and c.posterior_rate == pytest.approx(10.0 + 0.5 * 2.0**2)


def test_prob_within_is_a_probability_and_monotone():
    sigma = np.geomspace(1e-3, 1e3, 50)
    p = prob_within(0.5, sigma, 3.0, 10.0)
    assert np.all((p >= 0) & (p <= 1))
    assert np.all(np.diff(p) < 0)


def test_calibrated_scale_and_state_roundtrip():
    c = worked_example()
    assert c.calibrated_sigma(0.1) == pytest.approx(0.1 * np.sqrt(13.19 / 5.0))
    assert predictive_scale(0.1, 5.0, 13.19) == pytest.approx(c.calibrated_sigma(0.1))
    assert Calibrator.from_state_dict(c.state_dict()) == c


def test_prior_underconfident_at_start():
    c = Calibrator(shape=3.0, rate=10.0)
    # prior mean of λ is 0.3 < 1: a raw σ of ε/2.5 = 0.2 (1.2 % beyond ε for a calibrated
    # Gaussian) has P(|e| > ε) = 22 % and triggers a call; σ = 0.1 gives 3.4 % and does not
    assert c.prob_exceed(0.5, 0.2) == pytest.approx(0.22, abs=0.01)
    assert c.prob_exceed(0.5, 0.1) == pytest.approx(0.034, abs=0.001)


@pytest.mark.parametrize("bad", [dict(shape=0.0), dict(rate=-1.0)])
def test_invalid_prior(bad):
    with pytest.raises(ValueError):
        Calibrator(**bad)


def test_observe_rejects_nonpositive_sigma():
    with pytest.raises(ValueError):
        Calibrator().observe(0.1, 0.0)


def test_unknown_form():
    with pytest.raises(ValueError):
        prob_within(0.5, 0.1, 3.0, 10.0, form="beta")


def test_discount_weighs_the_error_seen_k_calls_ago_by_gamma_to_the_k():
    gamma = 0.8
    c = Calibrator(shape=3.0, rate=10.0, discount=gamma)
    for e, s in zip(ERRORS, STDS):
        c.observe(e, s)
    z2 = (np.array(ERRORS) / np.array(STDS)) ** 2
    w = gamma ** np.arange(len(z2))[::-1]  # the newest error has weight 1
    assert c.n == 4
    assert c.posterior_shape == pytest.approx(3.0 + 0.5 * w.sum())
    assert c.posterior_rate == pytest.approx(10.0 + 0.5 * (w * z2).sum())
    assert Calibrator.from_state_dict(c.state_dict()) == c
    # no forgetting is the paper's rule
    assert worked_example() == Calibrator(3.0, 10.0, 4, worked_example().sum_z2, 1.0, 4.0)


def test_discount_forgets_errors_of_a_model_the_run_no_longer_has():
    """40 errors at 6σ (a model that has not learned yet), then 200 at 1σ: without
    forgetting the calibrated σ stays inflated; with γ = 0.95 (memory 20 calls) it comes
    back to within 20 % of the errors' true scale, and b'/a' tracks the recent mean z²."""
    rng = np.random.default_rng(1)
    early, late = rng.normal(0, 6.0, 40), rng.normal(0, 1.0, 200)
    keep, forget = Calibrator(3.0, 10.0), Calibrator(3.0, 10.0, discount=0.95)
    for z in np.concatenate([early, late]):
        keep.observe(z, 1.0)
        forget.observe(z, 1.0)
    assert keep.calibrated_sigma(1.0) > 2.0
    assert forget.calibrated_sigma(1.0) == pytest.approx(1.0, rel=0.2)
    assert forget.posterior_shape == pytest.approx(3.0 + 0.5 / (1 - 0.95), rel=1e-3)  # w → 1/(1 − γ)


def test_a_state_written_before_forgetting_loads_as_the_paper_rule():
    old = {"shape": 3.0, "rate": 10.0, "n": 4, "sum_z2": 6.38}
    c = Calibrator.from_state_dict(old)
    assert c.discount == 1.0 and c.weight == 4.0 and c.posterior_shape == pytest.approx(5.0)


@pytest.mark.parametrize("discount", [0.0, 1.5, -0.1])
def test_invalid_discount(discount):
    with pytest.raises(ValueError, match="discount"):
        Calibrator(discount=discount)


def test_force_probability_matches_monte_carlo():
    from flytune.bayes.calibration import prob_force_within

    rng = np.random.default_rng(3)
    shape, rate, eps = 6.0, 4.0, 0.3
    sigma_atoms = rng.uniform(0.03, 0.12, size=24)  # eV/Å, per atom
    lam = rng.gamma(shape, 1.0 / rate, size=400_000)
    errors = rng.normal(size=(lam.size, sigma_atoms.size, 3)) * (sigma_atoms[None, :, None] / np.sqrt(lam)[:, None, None])
    mc = np.mean(np.linalg.norm(errors, axis=2).max(axis=1) < eps)
    assert 0.2 < mc < 0.95  # a probability that tests the integral, not its tails
    assert prob_force_within(eps, sigma_atoms, shape, rate) == pytest.approx(mc, abs=3e-3)
    c = Calibrator(shape, rate)
    assert c.prob_force_exceed(eps, sigma_atoms) == pytest.approx(1 - mc, abs=3e-3)
    # one atom: λ|ΔF|²/s² ~ χ²₃, so with λ fixed (a huge, a/b = 1) the chi distribution's CDF
    assert prob_force_within(eps, [0.1], 1e7, 1e7) == pytest.approx(stats.chi2.cdf((eps / 0.1) ** 2, 3), abs=1e-3)
    p = [prob_force_within(eps, np.full(n, 0.08), shape, rate) for n in (1, 8, 64)]
    assert p[0] > p[1] > p[2]  # more atoms, more chances of one above ε_F


def test_force_z2_is_one_observation_per_structure():
    from flytune.bayes.calibration import force_z2

    errors = np.array([[0.1, -0.2, 0.0], [0.3, 0.0, 0.1]])
    variances = np.full((2, 3), 0.01)
    assert force_z2(errors, variances) == pytest.approx(np.mean(errors**2) / 0.01)
    c = Calibrator(3.0, 10.0)
    c.observe_z2(force_z2(errors, variances))
    assert c.n == 1 and c.posterior_shape == 3.5 and c.posterior_rate == pytest.approx(10 + 0.5 * 2.5)
    with pytest.raises(ValueError):
        force_z2(errors, np.zeros((2, 3)))


def test_typical_largest_error_is_the_median_of_the_largest_atom_error():
    from flytune.bayes.calibration import typical_largest_error

    rng = np.random.default_rng(5)
    sigma_atoms = rng.uniform(0.03, 0.12, size=24)
    largest = np.linalg.norm(rng.normal(size=(100_000, 24, 3)) * sigma_atoms[None, :, None], axis=2).max(axis=1)
    assert typical_largest_error(sigma_atoms) == pytest.approx(np.median(largest), rel=5e-3)
    # one atom: the median of s·χ₃
    assert typical_largest_error([0.1]) == pytest.approx(0.1 * np.sqrt(stats.chi2.ppf(0.5, 3)), rel=1e-9)
    with pytest.raises(ValueError):
        typical_largest_error([0.1, 0.0])


def test_largest_atom_calibration_is_the_normal_gamma_update_of_the_log_ratio():
    """μ', κ', α', β' from the discounted sums equal the textbook Normal–Gamma update of
    the weighted data; without data the prior is μ₀ = ½ ln(b/a), α₀ = a."""
    from flytune.bayes.calibration import LARGEST_ATOM_PRIOR_SCALE, LargestAtomCalibrator

    c = LargestAtomCalibrator(3.0, 10.0, discount=0.8)
    assert c.posterior() == pytest.approx((0.5 * np.log(10 / 3), 1.0, 3.0, 3.0 * LARGEST_ATOM_PRIOR_SCALE**2))
    r = np.array([0.4, -0.1, 1.3, 0.2, 0.7])
    for x in r:
        c.observe_ratio(x)
    w = 0.8 ** np.arange(len(r))[::-1]
    mu0, beta0 = 0.5 * np.log(10 / 3), 3.0 * LARGEST_ATOM_PRIOR_SCALE**2
    mean = np.sum(w * r) / w.sum()
    kappa = 1.0 + w.sum()
    mu = (mu0 + w.sum() * mean) / kappa
    beta = beta0 + 0.5 * np.sum(w * (r - mean) ** 2) + 0.5 * w.sum() * (mean - mu0) ** 2 / kappa
    assert c.posterior() == pytest.approx((mu, kappa, 3.0 + 0.5 * w.sum(), beta))
    assert c.n == 5
    again = LargestAtomCalibrator.from_state_dict(c.state_dict())
    assert again == c and c.state_dict()["kind"] == "largest_atom"
    with pytest.raises(ValueError):
        c.observe_ratio(float("nan"))


def hot_atom_errors(rng, atoms: int, sigma: float, hot: float, hot_noise: float) -> np.ndarray:
    """Force errors (atoms, 3): N(0, σ²) on every atom but one, chosen at random, whose
    error is a fixed `hot` along x plus N(0, hot_noise²): an error the members do not see."""
    errors = rng.normal(0.0, sigma, size=(atoms, 3))
    errors[rng.integers(atoms)] = np.array([hot, 0.0, 0.0]) + rng.normal(0.0, hot_noise, size=3)
    return errors


@pytest.mark.parametrize("hot, hot_noise", [(0.3, 0.05), (0.0, 0.25), (0.0, 0.05)])
def test_largest_atom_calibration_predicts_the_largest_error_where_the_components_cannot(hot, hot_noise):
    """48 atoms, each predicted with s_a = 0.05 eV/Å. One atom's error is far above its
    s_a (0.3 ± 0.05 eV/Å, or 0.25·χ₃), or, the third case, the model holds. After 200
    calls, at the ε_F that the true largest error exceeds 5 % of the time, the largest-atom
    calibration predicts 3–15 % (a little above the truth where the model holds: its
    prior on the spread of ln(M/m̂) fades as 1/n), while the component calibration of the
    hot-atom cases predicts under 0.1 %: its fitted factor on all variances cannot give
    the largest error its spread."""
    from flytune.bayes.calibration import LargestAtomCalibrator

    rng = np.random.default_rng(11)
    atoms, sigma = 48, 0.05
    variances = np.full((atoms, 3), sigma**2)
    largest, components = LargestAtomCalibrator(3.0, 10.0), Calibrator(3.0, 10.0)
    for _ in range(200):
        errors = hot_atom_errors(rng, atoms, sigma, hot, hot_noise)
        largest.observe_forces(errors, variances)
        components.observe_forces(errors, variances)
    truth = [np.linalg.norm(hot_atom_errors(rng, atoms, sigma, hot, hot_noise), axis=1).max() for _ in range(20_000)]
    eps = np.quantile(truth, 0.95)
    sigma_atoms = np.full(atoms, sigma)
    assert 0.03 < largest.prob_force_exceed(eps, sigma_atoms) < 0.15
    if hot > 0 or hot_noise > sigma:  # an error the variances do not see
        assert components.prob_force_exceed(eps, sigma_atoms) < 1e-3


def test_largest_atom_probability_matches_monte_carlo_over_its_posterior():
    """P(max_a |ΔF_a| > ε_F) is the Normal–Gamma posterior predictive of r = ln(M/m̂):
    draw τ⁻² ~ Gamma(α', β'), μ ~ N(μ', τ²/κ'), r ~ N(μ, τ²), and count r > ln(ε_F/m̂)."""
    from flytune.bayes.calibration import LargestAtomCalibrator, typical_largest_error

    rng = np.random.default_rng(7)
    c = LargestAtomCalibrator(1.5, 10.0, discount=0.9)
    for r in rng.normal(0.8, 0.4, size=12):
        c.observe_ratio(r)
    mu, kappa, alpha, beta = c.posterior()
    tau = 1.0 / np.sqrt(rng.gamma(alpha, 1.0 / beta, size=1_000_000))
    r = rng.normal(rng.normal(mu, tau / np.sqrt(kappa)), tau)
    sigma_atoms = rng.uniform(0.03, 0.12, size=24)
    for eps in (0.5, 0.8, 1.2):
        mc = np.mean(r > np.log(eps / typical_largest_error(sigma_atoms)))
        assert c.prob_force_exceed(eps, sigma_atoms) == pytest.approx(mc, abs=2e-3)
