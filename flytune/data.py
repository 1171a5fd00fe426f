"""Reading labelled structures: any ASE-readable file, or an sGDML ``.npz``.

Labelled structures are ASE ``Atoms`` carrying a ``SinglePointCalculator`` with the
reference energy (eV), forces (eV/Å) and, where known, stress (eV/Å³, ASE sign).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io.formats import string2index
from ase.stress import voigt_6_to_full_3x3_stress

from flytune.errors import FlytuneError
from flytune.units import KCAL_MOL


@dataclass(frozen=True)
class Labels:
    """Reference labels of one structure (ASE units)."""

    energy: float
    forces: np.ndarray  # (n, 3)
    stress: np.ndarray | None  # (3, 3) or None


def labelled(atoms: Atoms, energy: float, forces, stress=None) -> Atoms:
    """A copy of ``atoms`` carrying the given labels as a SinglePointCalculator."""
    out = atoms.copy()
    results = {"energy": float(energy), "forces": np.asarray(forces, dtype=float)}
    if stress is not None:
        results["stress"] = np.asarray(stress, dtype=float)
    out.calc = SinglePointCalculator(out, **results)
    return out


def read_sgdml(path: str) -> list[Atoms]:
    """Frames of an sGDML ``.npz`` (R in Å, E in kcal/mol, F in kcal/mol/Å) in eV units."""
    with np.load(path, allow_pickle=False) as npz:
        missing = {"R", "z", "E", "F"} - set(npz.files)
        if missing:
            raise FlytuneError(
                f"{path}: sGDML file lacks {sorted(missing)}; an sGDML .npz needs R, z, E and F"
            )
        positions, numbers = npz["R"], npz["z"]
        energies = np.asarray(npz["E"], dtype=float).reshape(-1) * KCAL_MOL
        forces = np.asarray(npz["F"], dtype=float) * KCAL_MOL
    return [
        labelled(Atoms(numbers=numbers, positions=r, pbc=False), e, f)
        for r, e, f in zip(positions, energies, forces)
    ]


def read_structures(path: str | os.PathLike, index: str = ":") -> list[Atoms]:
    """Read every frame of ``path`` (ASE-readable file or sGDML .npz) without validating."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FlytuneError(f"data file {path!r} not found; check the path")
    try:
        if path.endswith(".npz"):
            frames = read_sgdml(path)[string2index(index)]
            frames = frames if isinstance(frames, list) else [frames]
        else:
            from ase.io import read

            frames = read(path, index=index)
            frames = frames if isinstance(frames, list) else [frames]
    except FlytuneError:
        raise
    except Exception as exc:
        raise FlytuneError(
            f"cannot read {path!r} ({type(exc).__name__}: {exc}); give an ASE-readable file "
            "(e.g. extended XYZ with energy and forces) or an sGDML .npz"
        ) from exc
    if not frames:
        raise FlytuneError(f"{path!r} holds no structures")
    return frames


def labels_of(atoms: Atoms, where: str = "structure") -> Labels:
    """Validated labels of a structure; a :class:`FlytuneError` names what is missing."""
    results = getattr(atoms.calc, "results", None) or {}
    if "energy" not in results and "free_energy" not in results:
        raise FlytuneError(f"{where} has no energy; give structures labelled with energies and forces")
    if "forces" not in results:
        raise FlytuneError(
            f"{where} has no forces; flytune fits energies and forces, so give a file whose frames "
            "carry forces (extended XYZ with a forces column, or an sGDML .npz)"
        )
    energy = float(results.get("energy", results.get("free_energy")))
    forces = np.asarray(results["forces"], dtype=float)
    stress = results.get("stress")
    if stress is not None:
        stress = np.asarray(stress, dtype=float)
        stress = voigt_6_to_full_3x3_stress(stress) if stress.shape == (6,) else stress.reshape(3, 3)
        if not np.all(atoms.pbc):
            stress = None
    if forces.shape != (len(atoms), 3):
        raise FlytuneError(f"{where}: forces have shape {forces.shape}, expected ({len(atoms)}, 3)")
    bad = [name for name, v in (("energy", energy), ("forces", forces), ("stress", stress))
           if v is not None and not np.all(np.isfinite(v))]
    if bad:
        raise FlytuneError(f"{where}: {', '.join(bad)} contain NaN or infinity; remove or fix that frame")
    return Labels(energy, forces, stress)


def read_labelled(path: str | os.PathLike, index: str = ":") -> list[Atoms]:
    """Read and validate a labelled data set (every frame must carry energy and forces)."""
    frames = read_structures(path, index)
    for i, atoms in enumerate(frames):
        labels_of(atoms, where=f"{os.fspath(path)}: frame {i}")
    return frames


def same_composition(structures: Sequence[Atoms]) -> bool:
    """True when every structure has the same element counts (a single energy offset is valid)."""
    first = sorted(structures[0].numbers.tolist())
    return all(sorted(a.numbers.tolist()) == first for a in structures[1:])
