"""Ensemble updates, prediction, persistence and parallel chains."""

import threading

import numpy as np
import pytest
import torch
from conftest import emt_labelled, ethanol, silicon

from flytune.bayes.chains import Chain, ChainJob
from flytune.bayes.ensemble import Ensemble
from flytune.bayes.schedules import offline_schedule
from flytune.config import ModelConfig, UncertaintyConfig
from flytune.errors import FlytuneError

SMALL = dict(chains=2, cycle_steps=6, batch_size=2, eta_max=1e-3)


def assert_same_chains(a: Ensemble, b: Ensemble):
    assert len(a.chains) == len(b.chains)
    for ca, cb in zip(a.chains, b.chains):
        for field in ("params", "momenta", "sq_grad_avg", "sq_grad_max"):
            da, db = getattr(ca.state, field), getattr(cb.state, field)
            assert all(torch.equal(da[k], db[k]) for k in da), field
        assert torch.equal(ca.rng_state, cb.rng_state)
    for ma, mb in zip(a.members, b.members):
        assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_update_sets_offset_and_adds_data(ethanol_frames):
    ens = Ensemble.from_config(ModelConfig(**SMALL), seed=0)
    first = ethanol_frames[0]
    ens.update(ethanol_frames[:2])
    expected = ens.pretrained_energy(first) - first.get_potential_energy()
    assert ens.energy_offset == pytest.approx(expected)
    assert len(ens.data) == 2
    np.testing.assert_allclose(ens.data.energies()[0], ens.pretrained_energy(first))
    assert len(ens.members) == 2
    # the chains moved away from θ0 and from each other
    moved = [any(not torch.equal(m[k], ens.prior.centre[k]) for k in m) for m in ens.members]
    assert all(moved)
    pred = ens.predict(ethanol_frames[5])
    assert pred.energy.shape == (1,) and pred.forces.shape == (9, 3)
    assert pred.stress is None
    assert np.all(pred.energy_var > 0) and np.all(pred.forces_var > 0)


def test_composition_change_is_refused(ethanol_frames):
    ens = Ensemble.from_config(ModelConfig(**SMALL), seed=0)
    ens.add_data(ethanol_frames[:1])
    methanol = emt_labelled(ethanol(0)[[0, 2, 3, 4, 5, 6, 8]])
    with pytest.raises(FlytuneError, match="composition"):
        ens.add_data([methanol])


def test_save_load_continue_is_bit_for_bit(ethanol_frames, tmp_path):
    uninterrupted = Ensemble.from_config(ModelConfig(**SMALL), seed=4)
    resumed = Ensemble.from_config(ModelConfig(**SMALL), seed=4)
    for ens in (uninterrupted, resumed):
        ens.update(ethanol_frames[:3])
        ens.update(ethanol_frames[3:4])
    resumed.save(tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)  # safe format
    assert state["format"] == "flytune.ensemble/1"
    resumed = Ensemble.load(tmp_path / "model.pt")
    assert len(resumed.data) == 4 and resumed.energy_offset == uninterrupted.energy_offset
    uninterrupted.update(ethanol_frames[4:5])
    resumed.update(ethanol_frames[4:5])
    assert_same_chains(uninterrupted, resumed)
    np.testing.assert_array_equal(
        uninterrupted.predict(ethanol_frames[9]).forces, resumed.predict(ethanol_frames[9]).forces
    )


class RecordingConnection:
    """Wraps a worker pipe and records what the parent sends through it."""

    def __init__(self, conn):
        self.conn, self.sent = conn, []

    def send(self, message):
        self.sent.append(message)
        self.conn.send(message)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_parallel_and_sequential_chains_agree(ethanol_frames):
    """Resident workers give the sequential result; only new structures and changed chains cross."""
    sequential = Ensemble.from_config(ModelConfig(**SMALL, workers=1, threads_per_worker=1), seed=2)
    with Ensemble.from_config(ModelConfig(**SMALL, workers=2, threads_per_worker=1), seed=2) as parallel:
        runner = parallel.runner
        runner._conns = [RecordingConnection(c) for c in runner._conns]
        for ens in (sequential, parallel):
            ens.update(ethanol_frames[:2])
        first = [list(c.sent) for c in runner._conns]
        assert [m[0] for m in first[0]] == ["prior", "data", "run"]
        assert len(first[0][1][1]["numbers"]) == 2 and first[0][2][1][0][1].chain is not None
        for c in runner._conns:
            c.sent.clear()
        for ens in (sequential, parallel):
            ens.update(ethanol_frames[2:3])
        second = runner._conns[1].sent
        assert [m[0] for m in second] == ["data", "run"]
        assert second[0][2] == 2 and len(second[0][1]["numbers"]) == 1  # only the new structure
        assert [job.chain for _, job in second[1][1]] == [None]  # the chain stayed in the worker
        assert_same_chains(sequential, parallel)
        # chains replaced from outside (a checkpoint) are sent again
        for ens in (sequential, parallel):
            ens.chains = [Chain.from_state_dict(c.state_dict()) for c in ens.chains]
            ens.update(ethanol_frames[3:4])
        assert runner._conns[0].sent[-1][1][0][1].chain is not None
        assert_same_chains(sequential, parallel)


def test_worker_failure_is_reported(ethanol_frames):
    with Ensemble.from_config(ModelConfig(**SMALL, workers=2, threads_per_worker=1), seed=2) as ens:
        ens.add_data(ethanol_frames[:2])
        bad = ChainJob(ens.chains[0], ens.update_schedule())
        bad.chain.state.params.pop(next(iter(bad.chain.state.params)))
        with pytest.raises(RuntimeError, match="a chain worker failed"):
            ens.run([bad])


def test_stop_keeps_samples_taken_so_far(ethanol_frames):
    ens = Ensemble.from_config(ModelConfig(**SMALL), seed=0)
    ens.add_data(ethanol_frames[:4])
    stop = threading.Event()
    seen = []

    def progress(chain, step, mean_ll):
        seen.append((chain, step))
        if step == 3:
            stop.set()

    schedule = offline_schedule(10, 1e-3, 1e-4, cycles=1, cycle_steps=5)
    ens.run([ChainJob(c, schedule, priority=False, replace_samples=False) for c in ens.chains], progress, stop)
    assert seen[:3] == [(0, 1), (0, 2), (0, 3)]
    assert all(c.interrupted for c in ens.chains)
    assert ens.chains[0].state.step == 3 and ens.chains[1].state.step == 0
    assert len(ens.members) == 2  # each chain keeps its current state as its sample


def test_pretrained_is_one_member_with_initial_head():
    ens = Ensemble.pretrained("7net-0", UncertaintyConfig(threshold=1.0, threshold_unit="kcal/mol"))
    assert len(ens.members) == 1
    assert ens.energy_offset is None
    pred = ens.predict(ethanol(1))
    s0 = ens.config.force_sigma0
    np.testing.assert_allclose(pred.forces_var, s0**2, rtol=1e-6)
    np.testing.assert_allclose(pred.energy_var, (0.1 * ens.uncertainty.threshold_eV) ** 2)


def test_device_setting_and_worker_devices():
    from flytune.bayes.chains import worker_devices
    from flytune.bayes.tree import resolve_device

    assert worker_devices("cpu", 3) == ["cpu", "cpu", "cpu"]
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        ModelConfig(device="gpu0")
    ens = Ensemble.from_config(ModelConfig(**SMALL, device="auto"), seed=0)
    assert str(ens.model.backbone.device).startswith(resolve_device("auto"))


def test_uninformative_prior_starts_from_random_weights(ethanol_frames):
    ens = Ensemble.from_config(ModelConfig(**SMALL, prior="uninformative"), seed=0)
    assert ens.config.prior == "uninformative" and ens.prior.sigma == 1.0
    assert all(torch.count_nonzero(c) == 0 for c in ens.prior.centre.values())
    starts = [c.state.params for c in ens.chains]
    key = "backbone.model.0_self_interaction_1.linear.weight"
    assert not torch.equal(starts[0][key], starts[1][key])  # each chain its own random init
    ens.update(ethanol_frames[:2])
    assert np.isfinite(ens.predict(ethanol_frames[3]).energy).all()


def test_one_pass_prediction_equals_member_loop(ethanol_frames):
    ens = Ensemble.from_config(ModelConfig(**SMALL, prior="uninformative"), seed=0)
    backbone = ens.model.backbone
    structures = [ethanol_frames[0], silicon(2, n=1)]  # 8 Si atoms: small enough for one pass
    assert backbone.one_pass(backbone.batch(structures))

    def compare():
        backbone.supports_vmap = True
        one_pass = ens.predict(structures)
        backbone.supports_vmap = False  # one_pass() is now False: the member loop
        loop = ens.predict(structures)
        np.testing.assert_allclose(one_pass.stress[1], loop.stress[1], rtol=1e-5, atol=1e-7)
        for field in ("energy", "energy_var", "forces", "forces_var"):
            np.testing.assert_allclose(getattr(one_pass, field), getattr(loop, field), rtol=1e-5, atol=1e-6)
        assert one_pass.energy_var[0] > ens.model.energy_sigma**2  # the members differ

    compare()
    ens.update(ethanol_frames[:2])  # new members: the stacked parameters are rebuilt
    compare()


def test_mace_backbone_in_the_ensemble(small_mace_file, ethanol_frames, tmp_path):
    config = ModelConfig(backbone=small_mace_file, chains=2, cycle_steps=5, batch_size=2)
    ens = Ensemble.from_config(config, seed=0)
    assert ens.config.sigma_prior == 0.5 and ens.config.eta_max == 1e-3  # MACE defaults
    assert (ens.calibrator.shape, ens.calibrator.rate) == (1.5, 10.0)
    ens.update(ethanol_frames[:3])
    pred = ens.predict(ethanol_frames[4:6])
    assert pred.energy.shape == (2,) and np.all(pred.forces_var > 0)
    ens.save(tmp_path / "mace.pt")
    loaded = Ensemble.load(tmp_path / "mace.pt")
    np.testing.assert_array_equal(loaded.predict(ethanol_frames[4]).forces, ens.predict(ethanol_frames[4]).forces)
