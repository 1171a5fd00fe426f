"""Shared fixtures: SevenNet-0 (bundled), a small MACE built here, EMT-labelled structures."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two test processes share the 2 cores (`-n 2` in pyproject.toml): one thread each, in
    # this process and in the runs it starts; OpenMP threads that outnumber the cores
    # spin against each other and made a 20 s run take 6 minutes
    os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from flytune.data import labelled


@pytest.fixture(autouse=True)
def _single_thread():
    """Tests compare results bit for bit across runners: fix the thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def sevennet():
    from flytune.backbones import load_backbone

    return load_backbone("7net-0")


def build_small_mace(path, seed: int = 0, numbers=(1, 6, 8, 14)) -> str:
    """A 2-layer MACE with 8 channels (l ≤ 1), random weights, saved like a MACE .model file."""
    from e3nn import o3
    from mace import modules

    torch.manual_seed(seed)
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=4.0,
        num_bessel=4,
        num_polynomial_cutoff=5,
        max_ell=2,
        interaction_cls=block,
        interaction_cls_first=block,
        num_interactions=2,
        num_elements=len(numbers),
        hidden_irreps=o3.Irreps("8x0e+8x1o"),
        MLP_irreps=o3.Irreps("8x0e"),
        atomic_energies=np.linspace(-1.0, -5.0, len(numbers)),
        avg_num_neighbors=6.0,
        atomic_numbers=list(numbers),
        correlation=2,
        gate=torch.nn.functional.silu,
        atomic_inter_scale=1.0,
        atomic_inter_shift=0.0,
    )
    torch.save(model, path)
    return str(path)


@pytest.fixture(scope="session")
def small_mace_file(tmp_path_factory):
    return build_small_mace(tmp_path_factory.mktemp("mace") / "small.model")


def ethanol(seed: int, amplitude: float = 0.05) -> Atoms:
    atoms = molecule("CH3CH2OH")
    atoms.rattle(amplitude, seed=seed)
    return atoms


def silicon(seed: int, n: int = 2) -> Atoms:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(n)
    atoms.rattle(0.05, seed=seed)
    atoms.set_cell(atoms.cell * 1.01, scale_atoms=True)
    return atoms


def emt_labelled(atoms: Atoms, with_stress: bool = False) -> Atoms:
    """Label with ASE's EMT (cheap, knows H, C, O): a stand-in reference in tests."""
    atoms = atoms.copy()
    atoms.calc = EMT()
    stress = atoms.get_stress(voigt=False) if with_stress else None
    return labelled(atoms, atoms.get_potential_energy(), atoms.get_forces(), stress)


class ShiftedReference(Calculator):
    """A stand-in "higher level of theory": SevenNet-0 plus harmonic C–H bond terms
    ½·k·(r − r0)² with r0 = 1.04 Å, so that the reference differs from the pretrained
    model by a smooth, physical correction (≈ 0.1 eV/Å in the forces)."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, base, k: float = 4.0, r0: float = 1.04):
        super().__init__()
        self.base, self.k, self.r0 = base, k, r0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        base = self.atoms.copy()
        base.calc = self.base
        energy, forces = base.get_potential_energy(), base.get_forces().copy()
        for i in np.where(self.atoms.numbers == 1)[0]:
            carbons = np.where(self.atoms.numbers == 6)[0]
            d = self.atoms.positions[i] - self.atoms.positions[carbons]
            j = carbons[np.argmin(np.linalg.norm(d, axis=1))]
            vec = self.atoms.positions[i] - self.atoms.positions[j]
            r = np.linalg.norm(vec)
            if r > 1.3:  # the hydroxyl H: no C–H bond
                continue
            energy += 0.5 * self.k * (r - self.r0) ** 2
            f = -self.k * (r - self.r0) * vec / r
            forces[i] += f
            forces[j] -= f
        self.results = {"energy": energy, "forces": forces}


@pytest.fixture(scope="session")
def ethanol_frames():
    """20 rattled ethanol structures labelled by :class:`ShiftedReference`."""
    from sevenn.calculator import SevenNetCalculator

    reference = ShiftedReference(SevenNetCalculator("7net-0", device="cpu"))
    frames = []
    for seed in range(20):
        atoms = ethanol(seed, 0.08)
        atoms.calc = reference
        frames.append(labelled(atoms, atoms.get_potential_energy(), atoms.get_forces()))
    return frames


def copper(seed: int) -> Atoms:
    """A rattled, strained periodic 32-atom Cu cell (EMT can label it, with stress)."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=seed)
    atoms.set_cell(atoms.cell * 1.01, scale_atoms=True)
    return atoms


class FailingCalculator(Calculator):
    """EMT that fails after ``succeed_first`` calls: ``mode`` "raise", "nan" or "ok" (never
    fails). Calls are counted over all instances. (An SCF that does not converge is a real
    PySCF run in test_reference.py.)"""

    implemented_properties = ["energy", "forces", "stress"]
    calls = 0

    def __init__(self, mode: str = "raise", succeed_first: int = 2):
        super().__init__()
        self.mode, self.succeed_first = mode, succeed_first

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        FailingCalculator.calls += 1
        emt = EMT()
        wanted = ["energy", "forces"] + (["stress"] if self.atoms.pbc.all() else [])
        emt.calculate(self.atoms, wanted, system_changes)
        self.results = {k: np.array(v, copy=True) if k != "energy" else v for k, v in emt.results.items()}
        if self.mode == "ok" or FailingCalculator.calls <= self.succeed_first:
            return
        if self.mode == "raise":
            raise RuntimeError("segmentation fault in the reference program")
        if self.mode == "nan":
            self.results["forces"][0, 0] = np.nan


class SlowEMT(EMT):
    """EMT that takes ``delay`` seconds per call, like a (very fast) electronic-structure code."""

    def __init__(self, delay: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay

    def calculate(self, *args, **kwargs):
        import time

        time.sleep(self.delay)
        super().calculate(*args, **kwargs)


class NoisyEMT(EMT):
    """EMT that writes to file descriptor 2 (as a Fortran program would) and leaves a file
    in its working folder, as VASP or CP2K do."""

    def calculate(self, atoms=None, *args, **kwargs):
        import os

        super().calculate(atoms, *args, **kwargs)
        os.write(2, f"NoisyEMT on {self.atoms.get_chemical_formula()}\n".encode())
        with open("noisy_emt.txt", "a") as f:
            f.write("called\n")


class FailOnce(EMT):
    """EMT whose first call in each process raises (a node that drops one job)."""

    failed = False

    def calculate(self, *args, **kwargs):
        if not FailOnce.failed:
            FailOnce.failed = True
            raise RuntimeError("the node dropped the job")
        super().calculate(*args, **kwargs)
