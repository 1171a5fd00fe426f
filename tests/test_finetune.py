"""Offline fine-tuning improves a pretrained model on held-out structures."""

import numpy as np
import pytest

from flytune.bayes.ensemble import Ensemble
from flytune.config import ModelConfig, OfflineConfig
from flytune.evaluation import evaluate
from flytune.finetune import finetune, finetune_schedule


def test_a_few_steps_lower_the_held_out_force_rmse(ethanol_frames):
    train, test = ethanol_frames[:10], ethanol_frames[10:]
    before = evaluate(Ensemble.pretrained("7net-0"), test)
    with finetune(
        train,
        ModelConfig(chains=2, batch_size=5),
        offline=OfflineConfig(initial_steps=40, eta_start=1e-3, eta_end=3e-4, seed=1),
    ) as ensemble:
        after = evaluate(ensemble, test)
        assert len(ensemble.members) == 2
        assert ensemble.data.energy_offset == pytest.approx(
            ensemble.data.pretrained_energy(train[0]) - train[0].get_potential_energy()
        )
    assert after["force_rmse"] < 0.7 * before["force_rmse"], (before["force_rmse"], after["force_rmse"])
    assert after["n_structures"] == 10 and after["n_members"] == 2


def test_finetune_schedule_defaults():
    config = ModelConfig().resolved("nequip")
    schedule = finetune_schedule(config, OfflineConfig(initial_steps=100, samples_per_chain=3, cycle_steps=20))
    assert len(schedule) == 140
    assert schedule.step_size[0] == pytest.approx(config.eta_max)  # η_start defaults to η_max
    assert schedule.step_size[99] == pytest.approx(config.eta_max / 10)
    assert schedule.sample_after == (99, 119, 139)
    assert schedule.temperature[-1] == 1.0


def test_finetune_schedule_without_noise_is_a_plain_fit():
    """noise = false (deep ensembles): the same step sizes and samples, τ_k = 0 throughout."""
    config = ModelConfig().resolved("nequip")
    offline = OfflineConfig(initial_steps=100, samples_per_chain=3, cycle_steps=20)
    noisy = finetune_schedule(config, offline)
    plain = finetune_schedule(config, offline.model_copy(update={"noise": False}))
    np.testing.assert_array_equal(plain.step_size, noisy.step_size)
    assert plain.sample_after == noisy.sample_after
    assert not plain.temperature.any() and noisy.temperature.any()
