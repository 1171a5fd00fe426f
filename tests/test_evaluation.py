import itertools

import numpy as np
import pytest

from flytune.evaluation import LOG_KCAL, error_metrics, gaussian_mll, roc_auc
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
