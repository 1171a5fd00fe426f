"""Reference calculators (the "DFT" of the loop), chosen by name.

Every call computes afresh on a copy of the structure (never an ASE cache from an
earlier geometry), checks convergence and finite values, and retries on failure;
:class:`ReferenceFailure` carries the reason when all attempts fail.

- ``pyscf``: molecular HF/DFT (method, xc, basis, density fitting, charge, spin),
  warm-started from the previous density matrix;
- ``tblite``: GFN2-xTB / GFN1-xTB, molecules and periodic cells;
- ``cp2k``: ASE's CP2K calculator with the ``cp2k_shell`` of Debian's ``cp2k`` package;
- anything else: an ASE calculator by import path, ``"package.module:Class"`` (or
  ``"package.module.Class"``), built with the ``options`` as keyword arguments.
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import BaseCalculator, Calculator, all_changes

from flytune.errors import FlytuneError

BUILTIN = ("pyscf", "tblite", "cp2k")


class ReferenceFailure(RuntimeError):
    """A reference calculation failed (did not converge, raised, or returned NaN)."""


@dataclass(frozen=True)
class ReferenceResult:
    energy: float  # eV, the reference's own zero
    forces: np.ndarray  # eV/Å
    stress: np.ndarray | None  # (3, 3) eV/Å³ or None
    wall_s: float
    attempts: int


class PySCFCalculator(Calculator):
    """PySCF HF/DFT energies and forces for molecules (eV, eV/Å).

    The SCF starts from the previous call's density matrix when the basis is unchanged
    (same atoms), which saves a third of the cycles along an MD trajectory.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, method: str = "dft", xc: str = "b3lyp", basis: str = "6-31g*",
                 density_fit: bool = True, charge: int = 0, spin: int = 0,
                 conv_tol: float = 1e-9, max_cycle: int = 100, **kwargs):
        super().__init__(**kwargs)
        if method not in ("dft", "hf"):
            raise FlytuneError(f"pyscf method {method!r} is not supported; use 'dft' or 'hf'")
        self.settings = dict(method=method, xc=xc, basis=basis, density_fit=density_fit,
                             charge=charge, spin=spin, conv_tol=conv_tol, max_cycle=max_cycle)
        self._dm = None
        #: SCF iterations of the last calculation (fewer when it started from the previous density)
        self.scf_cycles: int | None = None

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        from pyscf import dft, gto, scf

        super().calculate(atoms, properties, system_changes)
        s = self.settings
        if self.atoms.pbc.any():
            raise FlytuneError("the pyscf reference handles molecules only; use tblite or cp2k for periodic cells")
        mol = gto.M(atom=list(zip(self.atoms.get_chemical_symbols(), self.atoms.positions.tolist())),
                    unit="Angstrom", basis=s["basis"], charge=s["charge"], spin=s["spin"], verbose=0)
        if s["method"] == "dft":
            mf = dft.RKS(mol) if s["spin"] == 0 else dft.UKS(mol)
            mf.xc = s["xc"]
        else:
            mf = scf.RHF(mol) if s["spin"] == 0 else scf.UHF(mol)
        if s["density_fit"]:
            mf = mf.density_fit()
        mf.conv_tol, mf.max_cycle = s["conv_tol"], s["max_cycle"]
        dm0 = self._dm if self._dm is not None and self._dm.shape[-1] == mol.nao else None
        energy = mf.kernel(dm0=dm0)
        self.scf_cycles = getattr(mf, "cycles", None)
        if not mf.converged:
            self._dm = None
            raise ReferenceFailure(f"PySCF SCF did not converge in {s['max_cycle']} cycles")
        gradient = mf.nuc_grad_method().kernel()
        self._dm = mf.make_rdm1()
        self.results = {"energy": energy * units.Hartree, "free_energy": energy * units.Hartree,
                        "forces": -np.asarray(gradient) * units.Hartree / units.Bohr}


def _tblite(options: dict) -> Callable[[], Calculator]:
    try:
        from tblite.ase import TBLite
    except ImportError:
        raise FlytuneError("reference 'tblite' is not installed; install it with `pip install tblite`") from None
    settings = {"method": "GFN2-xTB", "verbosity": 0, **options}
    return lambda: TBLite(**settings)


def _pyscf(options: dict) -> Callable[[], Calculator]:
    try:
        import pyscf  # noqa: F401
    except ImportError:
        raise FlytuneError("reference 'pyscf' is not installed; install it with `pip install pyscf`") from None
    calculator = PySCFCalculator(**options)  # one instance: keeps the density matrix
    return lambda: calculator


def _cp2k(options: dict) -> Callable[[], Calculator]:
    from ase.calculators.cp2k import CP2K

    command = options.pop("command", None) or next(
        (c for c in ("cp2k_shell", "cp2k_shell.psmp", "cp2k_shell.ssmp") if shutil.which(c)), None)
    if command is None:
        raise FlytuneError("reference 'cp2k' needs the cp2k_shell program; install it with "
                           "`sudo apt-get install cp2k` (Debian/Ubuntu) or give options.command")
    settings = {"xc": "PBE", **options}
    calculator = CP2K(command=command, **settings)
    return lambda: calculator


def _import_path(name: str, options: dict) -> Callable[[], Calculator]:
    module_name, sep, attr = name.partition(":")
    if not sep:
        module_name, _, attr = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise FlytuneError(
            f"reference {name!r} is neither one of {', '.join(BUILTIN)} nor an importable calculator "
            f"({type(exc).__name__}: {exc}); give e.g. 'ase.calculators.vasp:Vasp' and install its program"
        ) from None
    return lambda: cls(**options)


class Reference:
    """Labels structures with a reference calculator: fresh, checked, retried.

    ``retries``: extra attempts after a failure. A failure after all attempts raises
    :class:`ReferenceFailure` naming the structure and the reason.
    """

    #: calls run one after another in this process (a Parsl reference runs them at once)
    concurrent = False

    def __init__(self, name: str, factory: Callable[[], Calculator], retries: int = 2):
        self.name = name
        self.factory = factory
        self.retries = retries

    def compute(self, atoms: Atoms, want_stress: bool | None = None) -> ReferenceResult:
        want_stress = bool(atoms.pbc.all()) if want_stress is None else want_stress
        return retrying(lambda: self.attempt(atoms, want_stress), self.name, atoms, self.retries)

    def attempt(self, atoms: Atoms, want_stress: bool) -> ReferenceResult:
        """One calculation on a fresh calculator; raises what the program raised."""
        start = time.perf_counter()
        work = atoms.copy()
        calc = self.factory()
        calc.reset()  # never reuse a result of an earlier geometry
        work.calc = calc
        energy = float(work.get_potential_energy())
        # the reference's own forces: an MD constraint (FixCom) projects them, and the
        # projection is not a force any potential can fit (it gives ethanol a net force)
        forces = np.array(work.get_forces(apply_constraint=False), dtype=float)
        # a calculator that does not compute stress (``implemented_properties``) labels a
        # periodic cell with energy and forces only
        want_stress = want_stress and "stress" in getattr(calc, "implemented_properties", ("stress",))
        stress = np.array(work.get_stress(voigt=False), dtype=float) if want_stress else None
        if not (np.isfinite(energy) and np.all(np.isfinite(forces))
                and (stress is None or np.all(np.isfinite(stress)))):
            raise ReferenceFailure("non-finite energy, forces or stress")
        if forces.shape != (len(atoms), 3):
            raise ReferenceFailure(f"forces of shape {forces.shape} for {len(atoms)} atoms")
        return ReferenceResult(energy, forces, stress, time.perf_counter() - start, 1)


def retrying(attempt: Callable[[], ReferenceResult], name: str, atoms: Atoms, retries: int,
             where: str = "") -> ReferenceResult:
    """Run ``attempt`` up to ``retries + 1`` times until it returns; the result's ``wall_s``
    covers every attempt and ``attempts`` counts them. A :class:`FlytuneError` (a setting
    that is wrong) is raised at once; after the last failure, :class:`ReferenceFailure`
    names the structure and every attempt's reason."""
    reasons = []
    start = time.perf_counter()
    for number in range(1, retries + 2):
        try:
            result = attempt()
        except FlytuneError:
            raise
        except Exception as exc:  # the reference program's own failure
            reasons.append(f"attempt {number}: {type(exc).__name__}: {exc}")
            continue
        return dataclasses.replace(result, wall_s=time.perf_counter() - start, attempts=number)
    raise ReferenceFailure(
        f"reference {name!r} failed on {atoms.get_chemical_formula()} after {retries + 1} attempts{where} "
        f"({'; '.join(reasons)})"
    )


def compute_concurrently(reference, structures: Sequence[Atoms]) -> Iterator[tuple[int, ReferenceResult | ReferenceFailure]]:
    """``(i, result)`` for each of ``structures`` as its call finishes, the result a
    :class:`ReferenceFailure` when every attempt failed. A reference whose ``concurrent``
    is true (calls on Parsl workers) gets every call at once, each with its own retries
    and timeout; an in-process one makes them one after another, in order."""
    if len(structures) <= 1 or not getattr(reference, "concurrent", False):
        for i, atoms in enumerate(structures):
            try:
                yield i, reference.compute(atoms)
            except ReferenceFailure as exc:
                yield i, exc
        return
    pool = ThreadPoolExecutor(len(structures), thread_name_prefix="reference")
    try:
        futures = {pool.submit(reference.compute, atoms): i for i, atoms in enumerate(structures)}
        for future in as_completed(futures):
            exc = future.exception()
            yield futures[future], exc if isinstance(exc, ReferenceFailure) else future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def as_reference(reference, options: dict | None = None, retries: int = 2):
    """The reference of a run from what a script has: an ASE calculator it configured
    (``Vasp(...)``, ``TBLite(method="GFN2-xTB")``; every call resets it and computes
    afresh), a name or import path as in the TOML (with ``options``), or a reference
    (anything with ``compute(atoms)``) as it is."""
    if hasattr(reference, "compute"):
        return reference
    if isinstance(reference, str):
        return make_reference(reference, options, retries)
    if isinstance(reference, BaseCalculator) or callable(getattr(reference, "get_potential_energy", None)):
        if options:
            raise FlytuneError("reference options apply to a reference given by name; configure the calculator "
                               "instance itself instead")
        return Reference(type(reference).__name__, lambda: reference, retries)
    raise FlytuneError(f"reference {reference!r} is neither an ASE calculator nor a name such as 'pyscf' or "
                       "'ase.calculators.emt:EMT'")


def make_reference(name: str, options: dict | None = None, retries: int = 2) -> Reference:
    """The :class:`Reference` for a name and calculator options (checked before any work)."""
    options = dict(options or {})
    if name == "pyscf":
        factory = _pyscf(options)
    elif name == "tblite":
        factory = _tblite(options)
    elif name == "cp2k":
        factory = _cp2k(options)
    else:
        factory = _import_path(name, options)
    return Reference(name, factory, retries)
