"""Unit conversions. flytune works in ASE units (eV, Å, eV/Å, eV/Å³) at every boundary."""

from typing import Literal

from ase import units

#: one kcal/mol in eV (1 eV = 23.0605 kcal/mol)
KCAL_MOL: float = units.kcal / units.mol

EnergyUnit = Literal["eV", "meV", "kcal/mol", "kJ/mol"]

#: eV per unit
_EV_PER = {"eV": 1.0, "meV": 1e-3, "kcal/mol": KCAL_MOL, "kJ/mol": units.kJ / units.mol}


def energy_to_eV(value: float, unit: EnergyUnit) -> float:
    """Convert an energy given in ``unit`` to eV."""
    if unit not in _EV_PER:
        raise ValueError(f"unknown energy unit {unit!r}; use one of {', '.join(map(repr, _EV_PER))}")
    return float(value) * _EV_PER[unit]


def parse_energy(value: str | tuple[float, str]) -> tuple[float, EnergyUnit]:
    """``(0.5, "kcal/mol")``, ``"0.5 kcal/mol"`` or ``"20 meV"`` → (value, unit), checked."""
    if isinstance(value, str):
        number, _, unit = value.strip().partition(" ")
        value = (number, unit.strip())
    try:
        number, unit = value
        number = float(number)
    except (TypeError, ValueError):
        raise ValueError(f"give an energy as (value, unit) or a string such as '0.5 kcal/mol', not {value!r}") from None
    energy_to_eV(number, unit)  # the unit is known
    return number, unit
