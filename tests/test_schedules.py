import numpy as np
import pytest

from flytune.bayes.schedules import cycle_schedule, noise_ramp, offline_schedule


def test_cycle_schedule_of_the_method():
    s = cycle_schedule(2000, eta_max=1e-4)
    assert len(s) == 2000
    k = np.arange(1, 2001)
    np.testing.assert_allclose(s.step_size, 0.5e-4 * (1 + np.cos(np.pi * (k - 1) / 2000)) + 1e-8)
    assert s.step_size[0] == pytest.approx(1e-4 + 1e-8)
    assert s.step_size[-1] == pytest.approx(1e-8, rel=0.01)  # ≈ the floor at the end
    # noise-free for k <= 398, linear ramp over 100 steps, then 1
    assert np.all(s.temperature[:398] == 0.0)
    assert s.temperature[398] > 0.0  # k = 399
    np.testing.assert_allclose(s.temperature[398:498], (np.arange(399, 499) - 398) / 100)
    assert np.all(s.temperature[497:] == 1.0)
    assert s.sample_after == (1999,)
    assert s.reset_before == (0,)


def test_noise_ramp_short_cycle():
    t = noise_ramp(100)  # the ramp lasts at least 10 steps
    assert np.all(t[:18] == 0.0) and t[18] == pytest.approx(0.1) and np.all(t[27:] == 1.0) and t[26] < 1
    assert np.all(np.diff(t) >= 0)


def test_offline_schedule():
    s = offline_schedule(100, eta_start=1e-3, eta_end=1e-5, cycles=2, cycle_steps=50)
    assert len(s) == 200
    assert s.step_size[0] == pytest.approx(1e-3)
    assert s.step_size[99] == pytest.approx(1e-5)
    ratios = s.step_size[1:100] / s.step_size[:99]
    np.testing.assert_allclose(ratios, ratios[0])  # exponential decay
    assert s.sample_after == (99, 149, 199)
    assert s.step_size[100] == pytest.approx(1e-3 + 1e-8)  # each cycle restarts at the peak
    assert np.all(s.temperature[100:] == 1.0)
    assert s.reset_before == (0,)


def test_invalid_lengths():
    with pytest.raises(ValueError):
        cycle_schedule(0)
    with pytest.raises(ValueError):
        offline_schedule(0, 1e-3, 1e-4)
