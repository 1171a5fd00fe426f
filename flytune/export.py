"""``flytune export``: the fine-tuned ensemble in the formats of the tools users run.

One file per member, in the backbone package's own format (:meth:`Backbone.export`):

- SevenNet: ``member_<i>.pth``, the pretrained checkpoint's dict with the member's
  ``model_state_dict``; ``sevenn.calculator.SevenNetCalculator(model=path)`` loads it and
  ``sevenn get_model member_<i>.pth`` deploys it to LAMMPS (``pair_style e3gnn``);
- MACE: ``member_<i>.model``, the whole model; ``MACECalculator(model_paths=[...])``
  loads them as a committee (its ``energy_var``) and ``mace_create_lammps_model``
  converts one for LAMMPS (``pair_style mace``);
- CHGNet: ``member_<i>.pth.tar``, CHGNet's own file (weights and model arguments);
  ``CHGNetCalculator(model=CHGNet.from_file(path))`` runs it in ASE (CHGNet has no
  LAMMPS pair style).

Beside them ``manifest.json``: the energy offset Δ (each member predicts on the
backbone's energy scale; the reference's energy is E − Δ), the run's ε and calibration
(the Gamma posterior a', b' that scales the members' spread), the likelihood's σ_E, the
elements, and the commands and LAMMPS lines to use the files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flytune.bayes.ensemble import Ensemble, saved_calibrator
from flytune.errors import FlytuneError
from flytune.files import write_text_atomic

MANIFEST_FORMAT = "flytune.export/1"
#: the package whose stock calculator loads the exported files, by backbone family
PACKAGES = {"nequip": "sevenn", "mace": "mace", "chgnet": "chgnet"}


def model_file(source: str | os.PathLike) -> Path:
    """The ``model.pt`` of a run directory or fine-tuning folder, or ``source`` itself."""
    source = Path(source)
    path = source / "model.pt" if source.is_dir() else source
    if not path.is_file():
        raise FlytuneError(f"{str(source)!r} holds no model.pt; give a run directory, a `flytune finetune` "
                           "folder or a model.pt file")
    return path


def export(source: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write every member of the ensemble in ``source`` (:func:`model_file`) into ``out``
    and the manifest; returns the manifest."""
    path = model_file(source)
    state = Ensemble.read_state(path)
    calibrator = saved_calibrator(state) if state.get("calibrator") else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with Ensemble.from_state_dict(state, workers=1, device="cpu") as ensemble:
        backbone = ensemble.model.backbone
        files = []
        for i, params in enumerate(ensemble.members):
            mine = {k.removeprefix("backbone."): v for k, v in params.items() if k.startswith("backbone.")}
            files.append(backbone.export(mine, out / f"member_{i}").name)
        elements = sorted({int(z) for a in ensemble.data.structures for z in a.numbers}) or sorted(backbone.atomic_numbers)
        family, spec = backbone.family, ensemble.config.backbone
        u = ensemble.uncertainty
        manifest = {
            "format": MANIFEST_FORMAT,
            "source": str(path.resolve()),
            "backbone": spec,
            "package": PACKAGES[family],
            "members": files,
            "energy_offset_eV": ensemble.data.energy_offset,
            "energy_offset_meaning": "each member predicts E on the backbone's scale; the reference's energy is E - energy_offset_eV",
            "threshold_eV": u.threshold_eV,
            "confidence": u.confidence,
            "energy_sigma_eV": float(ensemble.model.energy_sigma),
            "calibration": None if calibrator is None else {
                "shape": calibrator.posterior_shape, "rate": calibrator.posterior_rate, "n": calibrator.n,
                "meaning": "the predictive error is Student-t with 2*shape degrees of freedom and scale "
                           "sigma*sqrt(rate/shape), sigma^2 = variance over members + energy_sigma_eV^2"},
            "labels": len(ensemble.data),
            "elements": elements,
            "use": _usage(family, files, elements),
        }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


def _usage(family: str, files: list[str], elements: list[int]) -> dict:
    from ase.data import chemical_symbols

    symbols = " ".join(chemical_symbols[z] for z in elements)
    if family == "mace":
        return {
            "ase": f"MACECalculator(model_paths={files!r}, device='cpu', default_dtype='float32')",
            "lammps_convert": f"mace_create_lammps_model {files[0]}",
            "lammps": ["pair_style mace no_domain_decomposition", f"pair_coeff * * {files[0]}-lammps.pt {symbols}"],
        }
    if family == "chgnet":
        return {
            "ase": f"CHGNetCalculator(model=CHGNet.from_file('{files[0]}'), use_device='cpu')",
            "lammps_convert": None,
            "lammps": None,
            "note": "CHGNet has no LAMMPS pair style; run it through ASE (chgnet.model.dynamics)",
        }
    return {
        "ase": f"SevenNetCalculator(model='{files[0]}')",
        "lammps_convert": f"sevenn get_model {files[0]} -o {Path(files[0]).stem}",
        "lammps": ["pair_style e3gnn", f"pair_coeff * * {Path(files[0]).stem}.pt {symbols}"],
    }
