"""On-the-fly on a solid: crystalline Si under NPT through a temperature jump, with a
reference that gives energies, forces and stress: ``--reference gfn1-xtb`` (tblite, the
default) or ``--reference cp2k`` (CP2K PBE, Debian's ``cp2k`` package).

Cell: the 8-atom cubic diamond cell, rattled 0.05 Å. The 64-atom cell of the issue's
example is out of reach of this 2-core machine (speed.json: 0.19 chain-steps/s on Si64,
so one 4 × 100 update costs ~35 min, and one 4-member MD step ~1.3 s). Schedule
(1 fs, NPT at 1 bar, ASE's Nosé–Hoover/Parrinello–Rahman): 300 K for 300 steps, ramp to
1200 K over 300, hold 400, ramp to 300 K over 300, hold 300 (1.6 ps). ε = 1.2 kcal/mol:
the paper's LaMnO3 threshold per atom (6 kcal/mol for 40 atoms) times 8 atoms, fixed
before the run. Posterior: the fast settings of ``speed.py``; ``force_call_after`` = 200.

CP2K settings, chosen by convergence on the rattled cell before the run: PBE, GTH-PBE
pseudopotentials, DZVP-MOLOPT-SR-GTH, 300 Ry plane-wave cutoff (400 Ry changes energy
differences by < 1e-5 eV), a 4 × 4 × 4 Monkhorst–Pack grid (3 × 3 × 3 is 0.1 eV/Å off
in the largest force), Broyden mixing, SCF to 1e-7; ~10 s per call on 2 cores.

Reported (``results/otf_silicon[_cp2k].json``, plots in ``results/otf_silicon[_cp2k]/``):
the report figures of ``flytune report``, reference calls, fraction of interventions
above ε, RMSE at interventions, and on ``--frames`` random trajectory frames recomputed
with the reference the energy RMSE of the fine-tuned ensemble vs. SevenNet-0 without
fine-tuning. The run lives in ``benchmarks/runs/otf_silicon[_cp2k]/`` and resumes where
it stopped. A run longer than one sitting goes in parts: ``--hours H --state FILE``
advances it for H hours and packs it into FILE (``flytune pack``; keep it on storage
that persists, not in the repository) instead of reporting; on a machine without the
run directory, the next part unpacks FILE and continues it.

    .venv/bin/python benchmarks/otf_silicon.py [--reference cp2k] [--frames 50] [--hours H [--state FILE]]
"""

from __future__ import annotations

import argparse
import json

from ase.build import bulk
from ase.io import write
from ase.units import Rydberg
from common import (
    RESULTS,
    ROOT,
    add_part_arguments,
    otf_result,
    random_frame_errors,
    run_for,
    write_results,
)
from speed import FAST

from flytune.config import RunConfig

CP2K_INPUT = """&FORCE_EVAL
  &DFT
    &KPOINTS
      SCHEME MONKHORST-PACK 4 4 4
    &END KPOINTS
    &SCF
      EPS_SCF 1.0E-7
      &MIXING
        METHOD BROYDEN_MIXING
        ALPHA 0.4
      &END MIXING
    &END SCF
  &END DFT
&END FORCE_EVAL
"""
#: per ``--reference``: the reference spec and the suffix of the run and results names
REFERENCES = {
    "gfn1-xtb": ({"name": "tblite", "options": {"method": "GFN1-xTB"}}, ""),
    "cp2k": ({"name": "cp2k", "options": {"xc": "PBE", "cutoff": 300 * Rydberg, "inp": CP2K_INPUT}}, "_cp2k"),
}
THRESHOLD_KCAL = 6.0 / 40 * 8
SCHEDULE = [
    {"steps": 300, "temperature_K": 300},
    {"steps": 300, "temperature_K": 1200, "ramp": True},
    {"steps": 400, "temperature_K": 1200},
    {"steps": 300, "temperature_K": 300, "ramp": True},
    {"steps": 300, "temperature_K": 300},
]
FORCE_CALL_AFTER = 200


def in_folder(reference: dict, folder, project: str) -> dict:
    """CP2K writes its input and output files under ``folder/cp2k/project``, not in the
    working directory (other references are returned as they are)."""
    if reference["name"] != "cp2k":
        return reference
    return {**reference, "options": {**reference["options"], "label": str(folder / "cp2k" / project)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", choices=sorted(REFERENCES), default="gfn1-xtb")
    parser.add_argument("--frames", type=int, default=50)
    add_part_arguments(parser)
    args = parser.parse_args()
    reference, suffix = REFERENCES[args.reference]
    name = "otf_silicon" + suffix
    folder = ROOT / "benchmarks" / "runs" / name
    folder.mkdir(parents=True, exist_ok=True)
    structure = folder / "si8.xyz"
    if not structure.exists():
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        atoms.rattle(0.05, seed=1)
        write(structure, atoms)
    run_dir = folder / "run"
    config = RunConfig.model_validate({
        "structure": str(structure), "run_dir": str(run_dir), "seed": 1,
        "model": {"backbone": "7net-0", **FAST}, "reference": in_folder(reference, folder, "run"),
        "uncertainty": {"threshold": THRESHOLD_KCAL, "threshold_unit": "kcal/mol"},
        "md": {"driver": "npt", "timestep_fs": 1.0, "pressure_bar": 1.0, "schedule": SCHEDULE, "trajectory_every": 5},
        "safety": {"force_call_after": FORCE_CALL_AFTER},
    })
    summary = run_for(config, args.hours, args.state)
    if args.state:
        return
    result = otf_result(summary, run_dir, RESULTS / name, sum(s["steps"] for s in SCHEDULE) / 1000)
    result.update(
        system="Si8 cubic diamond cell, NPT 1 bar", schedule=SCHEDULE, threshold_kcal_mol=THRESHOLD_KCAL,
        reference=reference, posterior="fast settings: " + json.dumps(FAST), force_call_after=FORCE_CALL_AFTER,
        **random_frame_errors(run_dir, "7net-0", in_folder(reference, folder, "frames"), args.frames),
    )
    print(json.dumps(result, indent=2))
    print("wrote", write_results(name, result))


if __name__ == "__main__":
    main()
