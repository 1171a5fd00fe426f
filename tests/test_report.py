"""The statistics behind ``flytune report`` (the run-directory report itself is tested
on a real run in test_otf.py)."""

import numpy as np
import pytest

from flytune.errors import FlytuneError
from flytune.report import _calls_by_quarter, read_run, rmse_vs_sigma


def test_rmse_vs_sigma_follows_the_diagonal_when_calibrated():
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.1, 2.0, 4000)
    error = rng.normal(0.0, sigma)  # errors drawn with the predicted σ
    s, e = rmse_vs_sigma(sigma, error, width=200)
    assert np.all(np.diff(s) >= -1e-12)  # sorted by σ
    inner = slice(400, -400)  # away from the edges of the smoothing window
    np.testing.assert_allclose(e[inner], s[inner], rtol=0.15)


def test_rmse_vs_sigma_sees_overconfidence_and_ignores_input_order():
    rng = np.random.default_rng(1)
    sigma = rng.uniform(0.1, 1.0, 1000)
    error = rng.normal(0.0, 3 * sigma)  # three times the predicted σ
    s, e = rmse_vs_sigma(sigma, error, width=100)
    assert np.median(e / s) == pytest.approx(3.0, rel=0.15)
    perm = rng.permutation(sigma.size)
    s2, e2 = rmse_vs_sigma(sigma[perm], error[perm], width=100)
    np.testing.assert_allclose(s2, s)
    np.testing.assert_allclose(np.sort(e2), np.sort(e))


def test_rmse_vs_sigma_edge_cases():
    s, e = rmse_vs_sigma(np.array([]), np.array([]))
    assert s.size == e.size == 0
    s, e = rmse_vs_sigma(np.array([0.5]), np.array([-2.0]))
    assert s == pytest.approx([0.5]) and e == pytest.approx([2.0])
    with pytest.raises(ValueError, match="same length"):
        rmse_vs_sigma(np.ones(3), np.ones(2))


def test_calls_by_quarter():
    assert _calls_by_quarter(np.array([0.0, 10, 20, 260, 999, 1000]), 1000.0) == [3, 1, 0, 2]
    assert _calls_by_quarter(np.array([0.0]), 0.0) == [1, 0, 0, 0]


def test_read_run_names_what_is_missing(tmp_path):
    with pytest.raises(FlytuneError, match="run_config.json"):
        read_run(tmp_path)
