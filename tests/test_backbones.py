"""Adapters equal the stock ASE calculators, batched or not, for molecules and periodic cells."""

import numpy as np
import pytest
import torch
from ase import Atoms
from conftest import ethanol, silicon

from flytune.backbones import backbone_family, load_backbone
from flytune.errors import FlytuneError


def stock_results(atoms, calc):
    atoms = atoms.copy()
    atoms.calc = calc
    stress = atoms.get_stress(voigt=False) if atoms.pbc.all() else None
    return atoms.get_potential_energy(), atoms.get_forces(), stress


def assert_matches(backbone, structures, calc, functional=False):
    out = backbone(backbone.batch(structures), functional=functional)
    offsets = np.cumsum([0] + [len(a) for a in structures])
    for s, atoms in enumerate(structures):
        energy, forces, stress = stock_results(atoms, calc)
        assert abs(float(out.energy[s].detach()) - energy) <= 1e-5
        np.testing.assert_allclose(out.forces[offsets[s] : offsets[s + 1]].detach().numpy(), forces, atol=1e-5)
        if stress is not None:
            np.testing.assert_allclose(out.stress[s].detach().numpy(), stress, atol=1e-6)
    assert out.features.shape == (offsets[-1], backbone.feature_dim)


@pytest.fixture(scope="module")
def sevennet_calc():
    from sevenn.calculator import SevenNetCalculator

    return SevenNetCalculator("7net-0", device="cpu")


def test_sevennet_equals_stock_calculator_on_ethanol(sevennet, sevennet_calc):
    assert_matches(sevennet, [ethanol(1)], sevennet_calc)


def test_sevennet_equals_stock_calculator_on_periodic_si(sevennet, sevennet_calc):
    assert_matches(sevennet, [silicon(2)], sevennet_calc)


def test_sevennet_batched_mixed_structures(sevennet, sevennet_calc):
    assert_matches(sevennet, [ethanol(3), silicon(4), ethanol(5)], sevennet_calc)


def test_sevennet_functional_path_equals_stock_calculator(sevennet, sevennet_calc):
    """The out-of-place torch.func path (used for one-pass ensembles) is pinned to the stock result."""
    assert sevennet.supports_vmap
    assert_matches(sevennet, [ethanol(3), silicon(4)], sevennet_calc, functional=True)


def test_sevennet_vmap_over_parameter_sets(sevennet):
    """vmap over stacked parameters equals evaluating each parameter set on its own."""
    from torch.func import functional_call, vmap

    sets = [sevennet.trainable_parameters(), sevennet.random_parameters(seed=1)]
    stacked = {k: torch.stack([p[k] for p in sets]) for k in sets[0]}
    batch = sevennet.batch([ethanol(2), silicon(3)])

    def outputs(params):
        out = functional_call(sevennet, params, (batch,), {"functional": True})
        return out.energy, out.forces, out.stress, out.features

    batched = vmap(outputs)(stacked)
    for i, params in enumerate(sets):
        out = sevennet(batch) if i == 0 else functional_call(sevennet, params, (batch,))
        for got, want in zip(batched, (out.energy, out.forces, out.stress, out.features)):
            torch.testing.assert_close(got[i], want.detach(), atol=1e-5, rtol=1e-5)


def test_sevennet_interface(sevennet):
    assert sevennet.family == "nequip"
    assert sevennet.cutoff == pytest.approx(5.0)
    assert sevennet.feature_dim == 128
    assert {1, 6, 8, 14}.issubset(sevennet.atomic_numbers)
    params = sevennet.trainable_parameters()
    module_params = dict(sevennet.named_parameters())
    assert len(params) > 10
    for name, value in params.items():
        assert module_params[name].requires_grad
        assert torch.equal(value, module_params[name])  # pretrained values
    assert "model.rescale_atomic_energy.shift" not in params  # fixed constants stay out


def test_sevennet_forces_are_energy_gradients(sevennet):
    """Finite differences of the energy reproduce the autograd forces (energy-conserving)."""
    atoms = ethanol(7).copy()
    atoms.positions = atoms.positions.astype(np.float64)
    f = sevennet(sevennet.batch([atoms])).forces.detach().numpy()
    h = 1e-3
    for a, k in [(0, 0), (3, 2), (8, 1)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[a, k] += h
        minus.positions[a, k] -= h
        e_plus = float(sevennet(sevennet.batch([plus])).energy.detach().double())
        e_minus = float(sevennet(sevennet.batch([minus])).energy.detach().double())
        assert -(e_plus - e_minus) / (2 * h) == pytest.approx(f[a, k], abs=5e-3)


def test_sevennet_forces_differentiable_wrt_parameters(sevennet):
    out = sevennet(sevennet.batch([ethanol(1)]), create_graph=True)
    params = [p for p in sevennet.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out.forces**2).sum(), params, allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0


def test_sevennet_random_parameters(sevennet):
    random = sevennet.random_parameters(seed=0)
    pretrained = sevennet.trainable_parameters()
    assert random.keys() == pretrained.keys()
    assert all(random[k].shape == pretrained[k].shape for k in random)
    assert not torch.equal(random["model.0_self_interaction_1.linear.weight"], pretrained["model.0_self_interaction_1.linear.weight"])
    again = sevennet.random_parameters(seed=0)
    assert all(torch.equal(random[k], again[k]) for k in random)


def test_unknown_element_is_refused(sevennet):
    with pytest.raises(FlytuneError, match="Po"):
        sevennet.graph(Atoms("Po2", positions=[[0, 0, 0], [0, 0, 2.5]]))


def test_partial_pbc_is_refused(sevennet):
    atoms = silicon(1)
    atoms.pbc = [True, True, False]
    with pytest.raises(FlytuneError, match="periodic in some directions"):
        sevennet.graph(atoms)


def test_mace_equals_stock_calculator(small_mace_file):
    from mace.calculators import MACECalculator

    backbone = load_backbone(small_mace_file)
    calc = MACECalculator(model_paths=small_mace_file, device="cpu", default_dtype="float32")
    assert backbone.family == "mace"
    assert backbone.feature_dim == 16  # 8 invariant channels × 2 layers
    assert_matches(backbone, [ethanol(1)], calc)
    assert_matches(backbone, [silicon(2)], calc)
    assert_matches(backbone, [ethanol(2), silicon(3)], calc)


def test_mace_random_parameters(small_mace_file):
    backbone = load_backbone(small_mace_file)
    random = backbone.random_parameters(seed=1)
    pretrained = backbone.trainable_parameters()
    assert random.keys() == pretrained.keys()
    assert any(not torch.equal(random[k], pretrained[k]) for k in random)


def test_backbone_names():
    assert backbone_family("7net-0") == "nequip"
    assert backbone_family("SevenNet-0") == "nequip"
    assert backbone_family("my.pth") == "nequip"
    assert backbone_family("mace-mp-medium.model") == "mace"
    with pytest.raises(FlytuneError, match="unknown backbone"):
        backbone_family("no-such-model")
    with pytest.raises(FlytuneError, match="not found"):
        load_backbone("missing.model")


def test_sevennet_from_checkpoint_path(sevennet):
    import sevenn._const

    by_path = load_backbone(sevenn._const.SEVENNET_0_11Jul2024)
    assert by_path.spec.endswith(".pth")
    a, b = by_path.trainable_parameters(), sevennet.trainable_parameters()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sevennet_save_checkpoint_round_trip(tmp_path):
    """Changed weights written as a SevenNet checkpoint load back unchanged, in flytune
    and in sevenn's own calculator (no second upgrade of the old checkpoint layout)."""
    from sevenn.calculator import SevenNetCalculator

    backbone = load_backbone("7net-0")
    with torch.no_grad():
        for p in backbone.parameters():
            p.mul_(1.01)
    path = tmp_path / "changed.pth"
    backbone.save_checkpoint(path)
    again = load_backbone(str(path))
    a, b = backbone.trainable_parameters(), again.trainable_parameters()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_matches(backbone, [ethanol(0)], SevenNetCalculator(str(path), device="cpu"))
