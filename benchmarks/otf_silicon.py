"""On-the-fly on a solid: crystalline Si under NPT through a temperature jump, with
GFN1-xTB (tblite) as the reference (energies, forces and stress).

Cell: the 8-atom cubic diamond cell, rattled 0.05 Å. The 64-atom cell of the issue's
example is out of reach of this 2-core machine (speed.json: 0.19 chain-steps/s on Si64,
so one 4 × 100 update costs ~35 min, and one 4-member MD step ~1.3 s). Schedule
(1 fs, NPT at 1 bar, ASE's Nosé–Hoover/Parrinello–Rahman): 300 K for 300 steps, ramp to
1200 K over 300, hold 400, ramp to 300 K over 300, hold 300 (1.6 ps). ε = 1.2 kcal/mol:
the paper's LaMnO3 threshold per atom (6 kcal/mol for 40 atoms) times 8 atoms, fixed
before the run. Posterior: the fast settings of ``speed.py``; ``force_call_after`` = 200.

Reported (``results/otf_silicon.json``, plots in ``results/otf_silicon/``): the report
figures of ``flytune report``, reference calls, fraction of interventions above ε, RMSE
at interventions, and on ``--frames`` random trajectory frames recomputed with GFN1-xTB
the energy RMSE of the fine-tuned ensemble vs. SevenNet-0 without fine-tuning. The run
lives in ``benchmarks/runs/otf_silicon/`` and resumes where it stopped.

    .venv/bin/python benchmarks/otf_silicon.py [--frames 50]
"""

from __future__ import annotations

import argparse
import json

from ase.build import bulk
from ase.io import write
from common import (
    RESULTS,
    ROOT,
    otf_result,
    random_frame_errors,
    run_for,
    write_results,
)
from speed import FAST

from flytune.config import RunConfig

REFERENCE = {"name": "tblite", "options": {"method": "GFN1-xTB"}}
THRESHOLD_KCAL = 6.0 / 40 * 8
SCHEDULE = [
    {"steps": 300, "temperature_K": 300},
    {"steps": 300, "temperature_K": 1200, "ramp": True},
    {"steps": 400, "temperature_K": 1200},
    {"steps": 300, "temperature_K": 300, "ramp": True},
    {"steps": 300, "temperature_K": 300},
]
FORCE_CALL_AFTER = 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--hours", type=float, help="wall-time budget: stop then and report the run so far")
    args = parser.parse_args()
    folder = ROOT / "benchmarks" / "runs" / "otf_silicon"
    folder.mkdir(parents=True, exist_ok=True)
    structure = folder / "si8.xyz"
    if not structure.exists():
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        atoms.rattle(0.05, seed=1)
        write(structure, atoms)
    config = RunConfig.model_validate({
        "structure": str(structure), "run_dir": str(folder / "run"), "seed": 1,
        "model": {"backbone": "7net-0", **FAST}, "reference": REFERENCE,
        "uncertainty": {"threshold": THRESHOLD_KCAL, "threshold_unit": "kcal/mol"},
        "md": {"driver": "npt", "timestep_fs": 1.0, "pressure_bar": 1.0, "schedule": SCHEDULE, "trajectory_every": 5},
        "safety": {"force_call_after": FORCE_CALL_AFTER},
    })
    summary = run_for(config, args.hours)
    run_dir = folder / "run"
    result = otf_result(summary, run_dir, RESULTS / "otf_silicon", sum(s["steps"] for s in SCHEDULE) / 1000)
    result.update(
        system="Si8 cubic diamond cell, NPT 1 bar", schedule=SCHEDULE, threshold_kcal_mol=THRESHOLD_KCAL,
        reference=REFERENCE, posterior="fast settings: " + json.dumps(FAST), force_call_after=FORCE_CALL_AFTER,
        **random_frame_errors(run_dir, "7net-0", REFERENCE, args.frames),
    )
    print(json.dumps(result, indent=2))
    print("wrote", write_results("otf_silicon", result))


if __name__ == "__main__":
    main()
