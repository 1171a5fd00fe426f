"""The CHGNet backbone (weights shipped inside the ``chgnet`` wheel): it equals the stock
CHGNet calculator, fine-tunes through the ensemble, and its exported members load in
CHGNet's own calculator."""

import numpy as np
import pytest
from ase.build import molecule

from conftest import copper, emt_labelled, silicon
from flytune.backbones import backbone_family, load_backbone
from flytune.bayes.calibration import Calibrator
from flytune.bayes.ensemble import Ensemble
from flytune.config import ModelConfig, UncertaintyConfig
from flytune.errors import FlytuneError
from flytune.export import export


@pytest.fixture(scope="module")
def chgnet():
    return load_backbone("chgnet")


@pytest.fixture(scope="module")
def stock():
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    return CHGNetCalculator(model=CHGNet.load(verbose=False), use_device="cpu")


def test_chgnet_equals_stock_calculator(chgnet, stock):
    assert chgnet.family == "chgnet" and backbone_family("chgnet") == "chgnet"
    assert backbone_family("member_0.pth.tar") == "chgnet"
    assert backbone_family("7net-0") == "nequip"  # SevenNet's .pth is not taken for CHGNet's .pth.tar
    si = silicon(3)
    eth = molecule("CH3CH2OH")
    eth.rattle(0.05, seed=2)
    boxed = eth.copy()  # the stock calculator needs a cell: a box with no image in range
    boxed.set_cell([16.0, 16.0, 16.0])
    boxed.center()
    boxed.pbc = True
    out = chgnet(chgnet.batch([si, eth]))  # one batch: a crystal and a molecule
    for k, (atoms, probe) in enumerate([(si, si.copy()), (eth, boxed)]):
        probe.calc = stock
        assert out.energy[k].item() == pytest.approx(probe.get_potential_energy(), abs=1e-5)
        rows = slice(0, 64) if k == 0 else slice(64, 73)
        np.testing.assert_allclose(out.forces[rows].numpy(), probe.get_forces(), atol=1e-4)
    si.calc = stock
    np.testing.assert_allclose(out.stress[0].numpy(), si.get_stress(voigt=False), atol=1e-6)
    assert out.features.shape == (73, chgnet.feature_dim) and chgnet.feature_dim == 64
    assert not out.energy.requires_grad  # the force graph is dropped unless asked for
    params = chgnet.trainable_parameters()
    assert not any(name.startswith(("model.composition_model.", "model.site_wise.")) for name in params)
    fresh = chgnet.random_parameters(seed=0)
    assert fresh.keys() == params.keys()
    assert any(not np.allclose(fresh[k].numpy(), params[k].numpy()) for k in params)


def test_chgnet_has_its_measured_defaults():
    """σ_p, η_max and the Gamma prior of benchmarks/chgnet_defaults.py; a family without
    measured defaults still asks for them."""
    model = ModelConfig(backbone="chgnet").resolved("chgnet")
    assert (model.sigma_prior, model.eta_max) == (0.2, 3e-3)
    uncertainty = UncertaintyConfig(threshold=0.5).resolved("chgnet")
    assert (uncertainty.calibration_shape, uncertainty.calibration_rate) == (1.5, 10.0)
    with pytest.raises(FlytuneError, match="no measured defaults of sigma_prior, eta_max for allegro"):
        ModelConfig(backbone="x").resolved("allegro")


def test_chgnet_finetunes_and_exports_to_its_calculator(tmp_path):
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    config = ModelConfig(backbone="chgnet", chains=2, cycle_steps=6, batch_size=2)
    uncertainty = UncertaintyConfig(threshold=0.5)
    frames = [emt_labelled(copper(s), with_stress=True) for s in range(3)]
    with Ensemble.from_config(config, uncertainty, seed=0) as ens:
        before = ens.predict([copper(7)])
        ens.update(frames)
        after = ens.predict([copper(7)])
        assert np.all(np.isfinite(after.forces)) and after.energy_std[0] > 0
        assert abs(after.energy[0] - before.energy[0]) > 1e-6  # the update moved the members
        ens.save(tmp_path / "model.pt", Calibrator(3.0, 10.0))
        manifest = export(tmp_path / "model.pt", tmp_path / "out")
        assert manifest["members"] == ["member_0.pth.tar", "member_1.pth.tar"] and manifest["package"] == "chgnet"
        _, out = ens.member_predictions([copper(11)])
        energies, forces = out["energy"][0][:, 0], out["forces"][0]
        for m, name in enumerate(manifest["members"]):
            probe = copper(11)
            probe.calc = CHGNetCalculator(model=CHGNet.from_file(str(tmp_path / "out" / name)), use_device="cpu")
            assert abs(probe.get_potential_energy() - energies[m]) <= 1e-5
            np.testing.assert_allclose(probe.get_forces(), forces[m], atol=1e-4)
        assert abs(energies[0] - energies[1]) > 1e-5
