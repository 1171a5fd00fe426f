"""Ensemble updates, prediction, persistence and parallel chains."""

import os
import threading

import numpy as np
import pytest
import torch
from conftest import emt_labelled, ethanol, silicon

from flytune.bayes.chain import Chain, ChainJob
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
    expected = ens.data.pretrained_energy(first) - first.get_potential_energy()
    assert ens.data.energy_offset == pytest.approx(expected)
    assert len(ens.data) == 2
    np.testing.assert_allclose(ens.data.energies()[0], ens.data.pretrained_energy(first))
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
    assert len(resumed.data) == 4 and resumed.data.energy_offset == uninterrupted.data.energy_offset
    uninterrupted.update(ethanol_frames[4:5])
    resumed.update(ethanol_frames[4:5])
    assert_same_chains(uninterrupted, resumed)
    np.testing.assert_array_equal(
        uninterrupted.predict(ethanol_frames[9]).forces, resumed.predict(ethanol_frames[9]).forces
    )


def test_parallel_and_sequential_chains_agree(ethanol_frames):
    """Resident workers give the sequential result bit for bit; only new structures and
    chains changed outside the workers are sent to them."""
    sequential = Ensemble.from_config(ModelConfig(**SMALL, workers=1, threads_per_worker=1), seed=2)
    with Ensemble.from_config(ModelConfig(**SMALL, workers=2, threads_per_worker=1), seed=2) as parallel:
        for ens in (sequential, parallel):
            ens.update(ethanol_frames[:2])
        traffic = parallel.runner.traffic
        assert (traffic.priors, traffic.structures, traffic.chains) == (2, 4, 2)  # to each of 2 workers
        for ens in (sequential, parallel):
            ens.update(ethanol_frames[2:3])
        assert (traffic.priors, traffic.structures, traffic.chains) == (2, 6, 2)  # the new structure only
        assert_same_chains(sequential, parallel)
        # chains replaced from outside (an earlier checkpoint) are sent again and used
        earlier = [Chain.from_state_dict(c.state_dict()) for c in sequential.chains]
        for ens in (sequential, parallel):
            ens.update(ethanol_frames[3:4])
            ens.chains = [Chain.from_state_dict(c.state_dict()) for c in earlier]
            ens.update(ethanol_frames[4:5])
        assert traffic.chains == 4
        assert_same_chains(sequential, parallel)
        # each chain's compute time, measured where it ran, comes back with it and survives a checkpoint
        for ens in (sequential, parallel):
            assert all(c.run_s > 0 and Chain.from_state_dict(c.state_dict()).run_s == c.run_s for c in ens.chains)


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
    ens.run([ChainJob(c, schedule, new_labels=0, replace_samples=False) for c in ens.chains], progress, stop)
    assert seen[:3] == [(0, 1), (0, 2), (0, 3)]
    assert all(c.interrupted for c in ens.chains)
    assert ens.chains[0].state.step == 3 and ens.chains[1].state.step == 0
    assert len(ens.members) == 2  # each chain keeps its current state as its sample


def test_pretrained_is_one_member_with_initial_head():
    ens = Ensemble.pretrained("7net-0", UncertaintyConfig(threshold=1.0, threshold_unit="kcal/mol"))
    assert len(ens.members) == 1
    assert ens.data.energy_offset is None
    pred = ens.predict(ethanol(1))
    s0 = ens.config.force_sigma0
    np.testing.assert_allclose(pred.forces_var, s0**2, rtol=1e-6)
    np.testing.assert_allclose(pred.energy_var, (0.1 * ens.uncertainty.threshold_eV) ** 2)


def test_device_setting_and_worker_devices():
    from flytune.bayes.runners import worker_devices
    from flytune.bayes.tree import resolve_device

    assert worker_devices("cpu", 3) == ["cpu", "cpu", "cpu"]
    # a node with several GPUs: "cuda" spreads the resident workers over them in turn (and
    # chain m always runs in worker m mod workers, so on one GPU); "cuda:N" pins them all
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "device_count", lambda: 4)
        assert worker_devices("cuda", 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
        assert worker_devices("cuda", 6) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
        assert worker_devices("cuda:2", 3) == ["cuda:2"] * 3
        mp.setattr(torch.cuda, "device_count", lambda: 1)
        assert worker_devices("cuda", 2) == ["cuda", "cuda"]
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
        for field in ("energy", "energy_var", "forces", "forces_var", "force_deviation"):
            np.testing.assert_allclose(getattr(one_pass, field), getattr(loop, field), rtol=1e-5, atol=1e-6)
        assert one_pass.energy_var[0] > ens.model.energy_sigma**2  # the members differ
        # each atom's force deviation: sqrt of the mean squared distance of the members' force vectors
        member_forces = ens.member_predictions(structures)[1]["forces"][0]  # (M, A, 3)
        spread = np.linalg.norm(member_forces - member_forces.mean(axis=0), axis=-1)
        np.testing.assert_allclose(loop.force_deviation, np.sqrt(np.mean(spread**2, axis=0)), rtol=1e-10)
        assert loop.force_deviation.shape == (len(loop.forces),) and np.all(loop.force_deviation > 0)

    compare()
    ens.update(ethanol_frames[:2])  # new members: the stacked parameters are rebuilt
    compare()


def test_mace_backbone_in_the_ensemble(small_mace_file, ethanol_frames, tmp_path):
    config = ModelConfig(backbone=small_mace_file, chains=2, cycle_steps=5, batch_size=2)
    ens = Ensemble.from_config(config, seed=0)
    assert ens.config.sigma_prior == 0.5 and ens.config.eta_max == 1e-3  # MACE defaults
    assert (ens.uncertainty.calibration_shape, ens.uncertainty.calibration_rate) == (1.5, 10.0)
    ens.update(ethanol_frames[:3])
    pred = ens.predict(ethanol_frames[4:6])
    assert pred.energy.shape == (2,) and np.all(pred.forces_var > 0)
    ens.save(tmp_path / "mace.pt")
    loaded = Ensemble.load(tmp_path / "mace.pt")
    np.testing.assert_array_equal(loaded.predict(ethanol_frames[4]).forces, ens.predict(ethanol_frames[4]).forces)


def test_predicted_variance_is_the_method_formula(ethanol_frames):
    """σ² = Var_m(μ_m) (M − 1 denominator) + mean_m σ_m² (method §5), from each member's
    own prediction evaluated on its own."""
    from torch.func import functional_call

    ens = Ensemble.from_config(ModelConfig(**SMALL, prior="uninformative"), seed=1)
    ens.update(ethanol_frames[:2])
    structure = ethanol_frames[7]
    batch = ens.model.backbone.batch([structure])
    energies, forces, force_var = [], [], []
    for member in ens.members:
        pred = functional_call(ens.model, member, (batch,))
        energies.append(float(pred.energy.detach()[0]))
        forces.append(pred.forces.detach().double().numpy())
        force_var.append(np.repeat(pred.force_sigma.detach().double().numpy()[:, None] ** 2, 3, axis=1))
    energies, forces = np.array(energies), np.array(forces)
    sigma_e = 0.1 * ens.uncertainty.threshold_eV
    pred = ens.predict(structure)
    assert np.var(energies, ddof=1) > 10 * sigma_e**2  # the members' spread dominates: a real test
    np.testing.assert_allclose(pred.energy, energies.mean(), rtol=1e-6)
    np.testing.assert_allclose(pred.energy_var, np.var(energies, ddof=1) + sigma_e**2, rtol=1e-5)
    np.testing.assert_allclose(pred.forces, forces.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pred.forces_var, np.var(forces, axis=0, ddof=1) + np.mean(force_var, axis=0),
                               rtol=1e-4, atol=1e-12)


def test_a_cpu_update_is_pinned_bit_for_bit():
    """The same update as flytune 677b264 gave (tests/data/pinned_update.json): moving noise
    draws to the chain's device and reading values less often changed nothing on the CPU."""
    import hashlib
    import json
    from pathlib import Path

    pinned = json.loads((Path(__file__).parent / "data" / "pinned_update.json").read_text())
    frames = [emt_labelled(ethanol(s, 0.08)) for s in range(4)]
    ens = Ensemble.from_config(ModelConfig(chains=2, cycle_steps=8, batch_size=2, eta_max=1e-3), seed=5)
    ens.add_data(frames[:2])  # as one update learning frames[:3] with only the newest favoured,
    ens.update(frames[2:3])  # the rule of 677b264 (an update now favours all the labels it learns)
    ens.update(frames[3:])
    digest = hashlib.sha256()
    for c in ens.chains:
        for k in sorted(c.state.params):
            digest.update(c.state.params[k].detach().double().numpy().tobytes())
        digest.update(c.rng_state.numpy().tobytes())
    sums = [float(sum(v.double().sum() for v in c.state.params.values())).hex() for c in ens.chains]
    assert sums == pinned["param_sums"]
    assert [float(c.state.log_posterior) for c in ens.chains] == pinned["log_posterior"]
    assert digest.hexdigest() == pinned["sha256"]


def test_generator_state_stays_on_the_cpu_when_a_chain_moves():
    """Chain.to(device) moves parameters and statistics, never the generator state (a CUDA
    or meta tensor there made torch.Generator.set_state raise at the first update)."""
    chain = Chain.start(0, {"w": torch.ones(3)}, seed=1)
    moved = chain.to("meta")
    assert moved.state.params["w"].device.type == "meta"
    assert moved.rng_state.device.type == "cpu"
    torch.Generator().set_state(moved.rng_state)  # raised TypeError before
    back = Chain.from_state_dict(moved.state_dict())
    assert torch.equal(back.rng_state, chain.rng_state)


def test_model_files_written_before_the_refactor_still_load(monkeypatch):
    """tests/data/ensemble_v1.pt was written by flytune 677b264 (calibrator and energy offset
    inside the ensemble); it loads, predicts what it predicted then, and keeps its calibration."""
    import json
    from pathlib import Path

    from conftest import copper
    from flytune.bayes.ensemble import saved_calibrator

    data = Path(__file__).parent / "data"
    monkeypatch.chdir(data)  # the file names its backbone "small_mace.model", relative
    expected = json.loads((data / "ensemble_v1.json").read_text())
    ens = Ensemble.load("ensemble_v1.pt")
    assert ens.data.energy_offset == expected["energy_offset"] and len(ens.data) == 3
    pred = ens.predict(copper(7))
    np.testing.assert_allclose(pred.energy, expected["energy"], rtol=1e-10)
    np.testing.assert_allclose(pred.energy_var, expected["energy_var"], rtol=1e-8)
    np.testing.assert_allclose(pred.forces, expected["forces"], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(pred.stress[0], expected["stress"][0], rtol=1e-8, atol=1e-12)
    calibrator = saved_calibrator(Ensemble.read_state("ensemble_v1.pt"))
    # a state written before forgetting existed loads as the paper's rule: γ = 1, w = n
    assert calibrator.state_dict() == {**expected["calibrator"], "discount": 1.0, "weight": 2.0}
    assert calibrator.n == 2 and calibrator.posterior_shape == expected["calibrator"]["shape"] + 1.0
    # saved again with its calibration, the file has the same keys and the same calibration
    ens.save(data / "resaved.pt", calibrator)
    try:
        old, new = Ensemble.read_state("ensemble_v1.pt"), Ensemble.read_state(data / "resaved.pt")
        assert old.keys() == new.keys()
        assert new["calibrator"] == {**old["calibrator"], "discount": 1.0, "weight": 2.0}
        assert new["energy_offset"] == old["energy_offset"]
    finally:
        (data / "resaved.pt").unlink()


def test_a_new_threshold_moves_sigma_e(ethanol_frames):
    """σ_E = 0.1·ε follows a changed ε in prediction (it was frozen at the first ε)."""
    ens = Ensemble.from_config(ModelConfig(**SMALL), UncertaintyConfig(threshold=0.5), seed=0)
    ens.update(ethanol_frames[:1])
    before = ens.predict(ethanol_frames[3]).energy_var[0]
    ens.set_uncertainty(UncertaintyConfig(threshold=2.0))
    assert ens.model.energy_sigma == pytest.approx(0.1 * ens.uncertainty.threshold_eV)
    after = ens.predict(ethanol_frames[3]).energy_var[0]
    sigma_old, sigma_new = 0.05 * 0.0433641, 0.2 * 0.0433641
    assert after - before == pytest.approx(sigma_new**2 - sigma_old**2, rel=1e-3)


def test_building_a_model_makes_cuda_deterministic(monkeypatch):
    """Deterministic kernels need a fixed cuBLAS workspace on CUDA (without it torch warns
    and is not deterministic): building a model sets it, unless the user chose one."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    Ensemble.from_config(ModelConfig(**SMALL), seed=0)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    Ensemble.from_config(ModelConfig(**SMALL), seed=0)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_diverged_names_the_chains_with_a_non_finite_member():
    """What `finetune` and the on-the-fly calculator refuse: a chain whose member (its
    current state before any sample, else one of its samples) holds a NaN or an inf."""
    ens = Ensemble.from_config(ModelConfig(**SMALL), seed=0)
    assert ens.diverged() == []
    name = next(iter(ens.chains[1].state.params))
    ens.chains[1].state.params[name].view(-1)[0] = float("nan")
    assert ens.diverged() == [1]
    # once a chain has samples, those are its members: a finite sample clears it, an inf one does not
    ens.chains[1].samples = [{k: torch.zeros_like(v) for k, v in ens.chains[1].state.params.items()}]
    assert ens.diverged() == []
    ens.chains[0].samples = [{k: torch.full_like(v, float("inf")) for k, v in ens.chains[0].state.params.items()}]
    assert ens.diverged() == [0]
