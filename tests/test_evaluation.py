import itertools

import numpy as np
import pytest

from flytune.bayes.ensemble import combine, force_deviation
from flytune.evaluation import LOG_KCAL, error_metrics, force_variance_parts, gaussian_mll, roc_auc
from flytune.units import KCAL_MOL


def test_roc_auc_equals_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(float)  # with ties
    positive = rng.random(40) < 0.4
    pairs = list(itertools.product(scores[positive], scores[~positive]))
    brute = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert roc_auc(scores, positive) == pytest.approx(brute)
    assert roc_auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert np.isnan(roc_auc([1, 2], [True, True]))


def test_gaussian_mll():
    assert gaussian_mll([0.0], [1.0]) == pytest.approx(-0.5 * np.log(2 * np.pi))
    assert gaussian_mll([2.0, 0.0], [4.0, 4.0]) == pytest.approx(-0.25 - 0.5 * np.log(8 * np.pi))


def test_error_metrics_units_and_calibration_factor():
    rng = np.random.default_rng(1)
    force_var = np.full((50, 3), 0.01**2)
    force_error = rng.normal(0, 0.03, (50, 3))  # 3x larger than predicted
    energy_error = np.array([0.01, -0.03])
    m = error_metrics(energy_error, force_error, force_var)
    assert m["energy_rmse"] == pytest.approx(np.sqrt(0.0005))
    assert m["energy_rmse_kcal"] == pytest.approx(m["energy_rmse"] / KCAL_MOL)
    assert m["force_mae_kcal"] == pytest.approx(m["force_mae"] / KCAL_MOL)
    assert m["calibration_factor"] == pytest.approx(np.mean(force_error**2) / 0.01**2)
    assert m["force_mll_recalibrated"] > m["force_mll"]
    # the same errors and σ expressed in kcal/mol/Å give the kcal-unit log-likelihood
    assert m["force_mll_kcal"] == pytest.approx(gaussian_mll(force_error / KCAL_MOL, force_var / KCAL_MOL**2))
    assert m["force_mll_kcal"] == pytest.approx(m["force_mll"] + LOG_KCAL)
    # a factor fitted elsewhere (a validation set) is used as given
    fixed = error_metrics(energy_error, force_error, force_var, calibration_factor=4.0)
    assert fixed["calibration_factor"] == 4.0
    assert fixed["force_mll_recalibrated"] == pytest.approx(gaussian_mll(force_error, 4.0 * force_var))
    # constant σ cannot rank errors
    assert m["force_auc_roc"] == pytest.approx(0.5)


def test_force_variance_parts_split_the_total_and_rank_separately():
    rng = np.random.default_rng(2)
    member_forces = rng.normal(0, 0.1, (4, 30, 3)) * rng.uniform(0.1, 2, (1, 30, 1))  # spread varies by atom
    head = np.repeat(rng.uniform(0.01, 0.2, (4, 30, 1)) ** 2, 3, axis=2)  # each member's σ_F², per atom
    mean, total = combine(member_forces, head)
    parts = force_variance_parts(total, force_deviation(member_forces), 4)
    # the parts add up to the total, averaged over an atom's components
    assert np.allclose((parts["spread"] + parts["sigma_head"]).mean(axis=1), total.mean(axis=1))
    assert np.allclose(parts["sigma_head"][:, 0], head.mean(axis=0)[:, 0])
    assert np.allclose(parts["spread"].mean(axis=1), member_forces.var(axis=0, ddof=1).mean(axis=1))
    # errors as large as the spread: the spread ranks them, the head (independent of them) cannot
    error = rng.normal(0, 1, (30, 3)) * np.sqrt(parts["spread"])
    m = error_metrics(np.zeros(1), error, total, force_error_threshold=0.05, force_var_parts=parts)
    assert m["force_auc_roc_spread"] > 0.75
    assert abs(m["force_auc_roc_sigma_head"] - 0.5) < 0.2
    assert m["force_auc_roc_spread_kcal"] == m["force_auc_roc_spread"]
    # one member: no spread
    assert np.all(force_variance_parts(total, np.zeros(30), 1)["spread"] == 0)
