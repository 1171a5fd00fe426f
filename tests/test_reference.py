"""Reference calculators: units, fresh calls, warm starts, periodic cells, failures."""

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk, molecule

from conftest import FailingCalculator
from flytune.errors import FlytuneError
from flytune.otf.reference import Reference, ReferenceFailure, make_reference


def test_pyscf_energy_forces_in_ev_and_warm_start():
    from pyscf import gto, scf

    water = molecule("H2O")
    ref = make_reference("pyscf", {"method": "hf", "basis": "sto-3g", "density_fit": False})
    result = ref.compute(water)
    mol = gto.M(atom=list(zip(water.get_chemical_symbols(), water.positions.tolist())), unit="Angstrom",
                basis="sto-3g", verbose=0)
    mf = scf.RHF(mol)
    energy = mf.kernel()
    gradient = mf.nuc_grad_method().kernel()
    assert result.energy == pytest.approx(energy * units.Hartree, abs=1e-6)
    np.testing.assert_allclose(result.forces, -gradient * units.Hartree / units.Bohr, atol=1e-5)
    moved = water.copy()
    moved.positions[0, 2] += 0.05
    again = ref.compute(moved)
    assert again.energy != result.energy  # computed afresh, not a cached result
    warm = ref.factory().scf_cycles
    cold = make_reference("pyscf", {"method": "hf", "basis": "sto-3g", "density_fit": False})
    fresh = cold.compute(moved)
    assert fresh.energy == pytest.approx(again.energy, abs=1e-6)
    assert warm < cold.factory().scf_cycles  # the next SCF starts from the previous density matrix


def test_pyscf_refuses_periodic_cells():
    with pytest.raises(FlytuneError, match="molecules only"):
        make_reference("pyscf", {"method": "hf", "basis": "sto-3g"}).compute(bulk("Si"))


def test_tblite_molecule_and_periodic_cell_with_stress():
    ethanol = molecule("CH3CH2OH")
    result = make_reference("tblite", {"method": "GFN2-xTB"}).compute(ethanol)
    assert result.stress is None and result.forces.shape == (9, 3)
    # forces are the negative energy gradient
    ref = make_reference("tblite", {"method": "GFN2-xTB"})
    h = 1e-4
    plus, minus = ethanol.copy(), ethanol.copy()
    plus.positions[2, 0] += h
    minus.positions[2, 0] -= h
    fd = -(ref.compute(plus).energy - ref.compute(minus).energy) / (2 * h)
    assert fd == pytest.approx(result.forces[2, 0], abs=1e-3)
    si = bulk("Si", "diamond", a=5.43)
    periodic = make_reference("tblite", {"method": "GFN1-xTB"}).compute(si)
    assert periodic.stress.shape == (3, 3) and np.all(np.isfinite(periodic.stress))


def test_a_periodic_cell_is_labelled_without_stress_by_a_calculator_that_has_none():
    from ase.calculators.emt import EMT

    class NoStress(EMT):  # as a stored-data lookup or a code run without stress
        implemented_properties = ["energy", "forces"]

    cu = bulk("Cu", "fcc", a=3.7, cubic=True)
    cu.rattle(0.05, seed=1)
    result = Reference("no-stress", NoStress).compute(cu)
    full = Reference("emt", EMT).compute(cu)
    assert result.stress is None and full.stress.shape == (3, 3)
    assert result.energy == pytest.approx(full.energy) and np.allclose(result.forces, full.forces)


def test_retries_count_and_message():
    FailingCalculator.calls = 0
    ref = make_reference("conftest:FailingCalculator", {"mode": "raise", "succeed_first": 1}, retries=1)
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]])
    assert np.isfinite(ref.compute(atoms).energy)
    with pytest.raises(ReferenceFailure, match="Cu2 after 2 attempts.*segmentation fault"):
        ref.compute(atoms)
    assert FailingCalculator.calls == 3
    FailingCalculator.calls = 0
    flaky = make_reference("conftest:FailingCalculator", {"mode": "nan", "succeed_first": 0}, retries=0)
    with pytest.raises(ReferenceFailure, match="non-finite"):
        flaky.compute(atoms)


def test_an_scf_that_does_not_converge_is_a_failure():
    """A real PySCF SCF cut at one cycle: flytune's own ``mf.converged`` check refuses it
    (PySCF itself returns an energy and only logs a warning), on every attempt."""
    water = molecule("H2O")
    ref = make_reference("pyscf", {"method": "hf", "basis": "sto-3g", "density_fit": False, "max_cycle": 1},
                         retries=1)
    with pytest.raises(ReferenceFailure, match="H2O after 2 attempts.*did not converge in 1 cycles"):
        ref.compute(water)
    converged = make_reference("pyscf", {"method": "hf", "basis": "sto-3g", "density_fit": False})
    assert np.isfinite(converged.compute(water).energy)


def test_unknown_and_missing_references():
    with pytest.raises(FlytuneError, match="neither one of"):
        make_reference("no.such.module:Calc")


def test_labels_carry_the_reference_forces_not_an_md_constraint_projection():
    """The MD fixes the centre of mass with FixCom; its projection F − m·(m·F)/(m·m) gives
    a molecule of unequal masses a net force that no potential can fit (on-the-fly
    ethanol labels carried up to 2.6 eV/Å of it). A label holds the reference's own forces."""
    from ase.calculators.emt import EMT
    from ase.constraints import FixCom

    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.1, seed=3)
    raw = atoms.copy()
    raw.calc = EMT()
    expected = raw.get_forces()
    atoms.set_constraint(FixCom())
    projected = atoms.copy()
    projected.calc = EMT()
    assert np.linalg.norm(projected.get_forces().sum(0)) > 0.1  # the projection adds a net force
    result = make_reference("ase.calculators.emt:EMT").compute(atoms)
    np.testing.assert_allclose(result.forces, expected, atol=1e-10)
    assert np.linalg.norm(result.forces.sum(0)) < 1e-6
