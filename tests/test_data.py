import numpy as np
import pytest
from ase.build import molecule
from ase.io import write

from flytune.data import labelled, labels_of, read_labelled, read_structures
from flytune.errors import FlytuneError
from flytune.units import KCAL_MOL


def test_sgdml_units_are_converted(tmp_path):
    R = np.random.default_rng(0).normal(size=(3, 9, 3))
    np.savez(tmp_path / "x.npz", R=R, z=np.array([6, 6, 8, 1, 1, 1, 1, 1, 1]),
             E=np.array([[-97000.0], [-97001.0], [-97002.0]]), F=np.ones((3, 9, 3)))
    frames = read_labelled(tmp_path / "x.npz")
    assert len(frames) == 3
    assert frames[1].get_potential_energy() == pytest.approx(-97001.0 * KCAL_MOL)
    np.testing.assert_allclose(frames[0].get_forces(), KCAL_MOL)
    np.testing.assert_allclose(frames[2].positions, R[2])
    assert frames[0].get_chemical_formula() == "C2H6O"
    assert len(read_structures(tmp_path / "x.npz", "1:3")) == 2


def test_extxyz_roundtrip_with_stress(tmp_path):
    from ase.build import bulk

    atoms = labelled(bulk("Cu", cubic=True), -3.0, np.zeros((4, 3)), np.arange(6) * 1e-3)
    write(tmp_path / "a.extxyz", [atoms])
    (back,) = read_labelled(tmp_path / "a.extxyz")
    labels = labels_of(back)
    assert labels.energy == -3.0
    assert labels.stress.shape == (3, 3) and labels.stress[1, 2] == pytest.approx(3e-3)


def test_missing_file():
    with pytest.raises(FlytuneError, match="not found"):
        read_labelled("no/such/file.xyz")


def test_unreadable_file(tmp_path):
    (tmp_path / "bad.xyz").write_text("this is not xyz\n")
    with pytest.raises(FlytuneError, match="cannot read"):
        read_labelled(tmp_path / "bad.xyz")


def test_missing_forces(tmp_path):
    atoms = molecule("H2O")
    atoms.info["energy"] = -1.0
    write(tmp_path / "nf.extxyz", [atoms])
    with pytest.raises(FlytuneError, match="no (energy|forces)"):
        read_labelled(tmp_path / "nf.extxyz")


def test_nan_labels(tmp_path):
    forces = np.zeros((3, 3))
    forces[1, 2] = np.nan
    write(tmp_path / "nan.extxyz", [labelled(molecule("H2O"), -1.0, np.zeros((3, 3))),
                                    labelled(molecule("H2O"), -1.0, forces)])
    with pytest.raises(FlytuneError, match="frame 1: forces contain NaN"):
        read_labelled(tmp_path / "nan.extxyz")
