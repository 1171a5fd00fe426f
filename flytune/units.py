"""Unit conversions. flytune works in ASE units (eV, Å, eV/Å, eV/Å³) at every boundary."""

from typing import Literal

from ase import units

#: one kcal/mol in eV (1 eV = 23.0605 kcal/mol)
KCAL_MOL: float = units.kcal / units.mol

EnergyUnit = Literal["eV", "kcal/mol"]


def energy_to_eV(value: float, unit: EnergyUnit) -> float:
    """Convert an energy given in ``unit`` to eV."""
    if unit == "eV":
        return float(value)
    if unit == "kcal/mol":
        return float(value) * KCAL_MOL
    raise ValueError(f"unknown energy unit {unit!r}; use 'eV' or 'kcal/mol'")
