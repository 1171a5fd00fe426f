"""The adaptive end of an update cycle: the drift statistic and a chain that stops early."""

import math

import numpy as np
import pytest
from conftest import ethanol
from scipy import stats

from flytune.bayes.early_stop import EarlyStop, drift
from flytune.bayes.ensemble import Ensemble
from flytune.config import ModelConfig
from flytune.data import labelled


def test_drift_of_stationary_noise_trend_and_short_series():
    rng = np.random.default_rng(0)
    d = np.asarray([drift(rng.normal(scale=2.0, size=40), 20) for _ in range(4000)])
    # two independent windows of N(0, 2²): ȳ_B − ȳ_A ~ N(0, 2·4/W)
    assert abs(np.mean(d < 1.0) - (2 * stats.norm.cdf(1.0 / np.sqrt(8 / 20)) - 1)) < 0.015
    assert drift(np.linspace(0.0, 10.0, 40), 20) == pytest.approx(10.0 * 20 / 39)
    assert drift([1.0] * 40, 20) == 0.0
    assert drift([1.0] * 39, 20) == math.inf
    rule = EarlyStop(window=20, tolerance_nats=1.0)
    assert rule.settled(rng.normal(size=40), rng.normal(size=60))
    assert not rule.settled(rng.normal(size=40), np.arange(60.0))
    with pytest.raises(ValueError):
        EarlyStop(window=1)


def test_update_cycle_stops_once_settled(small_mace_file):
    """Labels that the pretrained model already fits (its own predictions): the chains
    settle, and each cycle ends at one of the rule's test points, long before K."""
    config = ModelConfig(backbone=small_mace_file, chains=2, cycle_steps=200, batch_size=2, eta_max=1e-3,
                         early_stop=True, early_stop_window=10)
    structures = [ethanol(seed, 0.08) for seed in range(3)]
    ens = Ensemble.from_config(config, seed=1)
    pred = ens.predict(structures)
    ens.update([labelled(a, float(pred.energy[i]), pred.forces[pred.structure_index == i])
                for i, a in enumerate(structures[:2])])
    steps = [c.state.step for c in ens.chains]
    # full noise from step 48 on; the test first runs with two windows of values at step 67
    assert all(67 <= s < 200 and (s - 67) % 10 == 0 for s in steps), steps
    assert all(len(c.samples) == 1 and not c.interrupted for c in ens.chains)
    assert all(np.isfinite(ens.predict(structures[2]).energy))
