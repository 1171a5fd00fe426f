"""``flytune export``: every member, loaded by its package's stock ASE calculator, gives
the energy and forces that flytune's member gives."""

import json
import subprocess
import sys

import numpy as np
import pytest
from ase.io import write

from conftest import build_small_mace, emt_labelled, ethanol
from flytune.bayes.calibration import Calibrator
from flytune.bayes.ensemble import Ensemble
from flytune.config import ModelConfig, UncertaintyConfig
from flytune.errors import FlytuneError
from flytune.export import export


def members_at(ensemble: Ensemble, atoms):
    """(energies (M,), forces (M, n, 3)) of each member at ``atoms`` (eV, eV/Å)."""
    _, out = ensemble.member_predictions([atoms])
    return out["energy"][0][:, 0], out["forces"][0]


def assert_stock_equals_members(ensemble, calculators, atoms):
    energies, forces = members_at(ensemble, atoms)
    assert len(calculators) == len(energies)
    for m, calc in enumerate(calculators):
        probe = atoms.copy()
        probe.calc = calc
        assert abs(probe.get_potential_energy() - energies[m]) <= 1e-5
        np.testing.assert_allclose(probe.get_forces(), forces[m], atol=1e-4)
    assert abs(energies[0] - energies[1]) > 1e-4  # the members differ: each file is its own


def test_sevennet_members_load_in_sevennet_calculator(ethanol_frames, tmp_path):
    from sevenn.calculator import SevenNetCalculator

    ens = Ensemble.from_config(ModelConfig(backbone="7net-0", chains=2, cycle_steps=4, batch_size=2),
                               UncertaintyConfig(threshold=0.5), seed=0)
    with ens:
        ens.update(ethanol_frames[:3])
        ens.save(tmp_path / "model.pt", Calibrator(3.0, 10.0))
        manifest = export(tmp_path / "model.pt", tmp_path / "out")
        assert manifest["members"] == ["member_0.pth", "member_1.pth"] and manifest["package"] == "sevenn"
        assert manifest["energy_offset_eV"] == pytest.approx(ens.data.energy_offset)
        assert manifest["threshold_eV"] == pytest.approx(ens.uncertainty.threshold_eV)
        assert manifest["calibration"]["shape"] == 3.0 and manifest["elements"] == [1, 6, 8]
        assert manifest["use"]["lammps"][0] == "pair_style e3gnn"
        calcs = [SevenNetCalculator(model=str(tmp_path / "out" / f), device="cpu") for f in manifest["members"]]
        assert_stock_equals_members(ens, calcs, ethanol(11, 0.08))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_mace_members_load_as_a_mace_committee(tmp_path):
    from mace.calculators import MACECalculator

    build_small_mace(tmp_path / "small.model", numbers=(1, 6, 8))
    ens = Ensemble.from_config(ModelConfig(backbone=str(tmp_path / "small.model"), chains=2, cycle_steps=4,
                                           batch_size=2, eta_max=1e-2), UncertaintyConfig(threshold=0.5), seed=0)
    with ens:
        ens.update([emt_labelled(ethanol(s, 0.08)) for s in range(3)])
        ens.save(tmp_path / "model.pt", Calibrator(1.5, 10.0))
    write(tmp_path / "train.xyz", ethanol(0))
    # the CLI on a folder holding model.pt (as a run directory or a finetune folder does)
    result = subprocess.run([sys.executable, "-m", "flytune", "export", str(tmp_path), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["members"] == ["member_0.model", "member_1.model"] and manifest["package"] == "mace"
    paths = [str(tmp_path / "out" / f) for f in manifest["members"]]
    with Ensemble.load(tmp_path / "model.pt", workers=1) as ens:
        calcs = [MACECalculator(model_paths=[p], device="cpu", default_dtype="float32") for p in paths]
        assert_stock_equals_members(ens, calcs, ethanol(11, 0.08))
        committee = MACECalculator(model_paths=paths, device="cpu", default_dtype="float32")
        probe = ethanol(11, 0.08)
        probe.calc = committee
        energies, _ = members_at(ens, probe)
        assert probe.get_potential_energy() == pytest.approx(float(np.mean(energies)), abs=1e-5)
        assert committee.results["energy_var"] == pytest.approx(float(np.var(energies)), rel=1e-3, abs=1e-9)


def test_export_without_a_model_is_one_clear_error(tmp_path):
    with pytest.raises(FlytuneError, match="holds no model.pt"):
        export(tmp_path, tmp_path / "out")
