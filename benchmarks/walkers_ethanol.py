"""Issue 26: ethanol from four conformers at once against one trajectory of the same
total length.

The demo's settings (``flytune demo``: SevenNet-0, PySCF B3LYP/6-31G* with density
fitting, ε = 1 kcal/mol, 2 chains × 40 SGHMC steps, Langevin 300 K, 0.5 fs, no call cap,
no forced calls), in two arms:

- ``walkers``: four ``[[walkers]]`` of ``--steps`` MD steps each, started from the
  hydroxyl torsion C–C–O–H at 180° (trans), +60° and −60° (gauche±) and 120° (near the
  trans–gauche barrier), their reference calls through a local Parsl
  HighThroughputExecutor with 2 workers;
- ``single``: one trajectory (trans) of 4 × ``--steps`` steps, the reference in-process.

Reported (``results/walkers_ethanol.json``): wall time, calls (per walker), updates,
exceedance, steps outside the promise, the learning phase in wall time (the run's wall
time when 90 % of its calls had returned, and at its last call: ``wall_s`` of the
interventions), and the speed-up of both arms over reference MD priced at the single
run's median call (``speedup_at_single_run_t_ref``: the walkers' calls ran two at once
on 2 cores, each slower than alone). Run directories in
``benchmarks/runs/walkers_ethanol/`` resume.

    .venv/bin/python benchmarks/walkers_ethanol.py [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import tomllib

import numpy as np
from ase.build import molecule
from ase.io import write
from common import ROOT, run_for, write_results

from flytune.config import RunConfig
from flytune.demo import demo_config
from flytune.otf.rundir import RunDirectory

FOLDER = ROOT / "benchmarks" / "runs" / "walkers_ethanol"
TORSIONS_DEG = {"trans": 180.0, "gauche+": 60.0, "gauche-": -60.0, "barrier": 120.0}


def conformer(torsion_deg: float):
    """Ethanol (ASE's geometry: C0–C1–O2–H3 trans) with the hydroxyl H turned to ``torsion_deg``."""
    atoms = molecule("CH3CH2OH")
    atoms.set_dihedral(0, 1, 2, 3, torsion_deg, indices=[3])
    return atoms


def learning_phase(run_dir) -> dict:
    interventions = RunDirectory(run_dir, walkers=None).read_interventions()
    wall = np.sort([r["wall_s"] for r in interventions])
    return {"wall_at_90pct_calls_s": float(wall[int(np.ceil(0.9 * wall.size)) - 1]),
            "wall_at_last_call_s": float(wall[-1])}


def figures(summary: dict, run_dir) -> dict:
    keys = ("steps", "wall_s", "reference_calls", "updates", "exceed_fraction", "rmse_at_interventions_kcal",
            "time_reference_s", "time_update_s", "time_md_s", "steps_uncontrolled", "speedup_vs_reference_md",
            "median_reference_s")
    out = {k: summary.get(k) for k in keys}
    if "walkers" in summary:
        out["walkers"] = summary["walkers"]
    return {**out, **learning_phase(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="MD steps per walker (the single run: 4×)")
    args = parser.parse_args()
    FOLDER.mkdir(parents=True, exist_ok=True)
    for name, torsion in TORSIONS_DEG.items():
        if not (FOLDER / f"{name}.xyz").exists():
            write(FOLDER / f"{name}.xyz", conformer(torsion))
    base = tomllib.loads(demo_config(steps=args.steps))
    base.update(structure=str(FOLDER / "trans.xyz"))
    results = {}
    walkers = [{"structure": str(FOLDER / f"{name}.xyz")} for name in TORSIONS_DEG]
    run_dir = FOLDER / f"walkers_{args.steps}"
    config = RunConfig.model_validate({**base, "run_dir": str(run_dir), "walkers": walkers,
                                       "execution": {"backend": "parsl", "max_workers": 2}})
    results["walkers"] = figures(run_for(config, None), run_dir)
    run_dir = FOLDER / f"single_{4 * args.steps}"
    config = RunConfig.model_validate({**base, "run_dir": str(run_dir), "md": {**base["md"], "steps": 4 * args.steps}})
    results["single"] = figures(run_for(config, None), run_dir)
    # both arms priced at one reference MD: the single run's calls, made one at a time (the
    # walkers' ran two at once on the 2 cores, each slower than alone)
    t_ref = results["single"]["median_reference_s"]
    for arm in results.values():
        arm["speedup_at_single_run_t_ref"] = arm["steps"] * t_ref / arm["wall_s"]
    result = {"system": "ethanol, Langevin 300 K, 0.5 fs", "conformers_torsion_deg": TORSIONS_DEG,
              "steps_per_walker": args.steps, "single_steps": 4 * args.steps,
              "settings": "flytune demo (demo_config): 2 chains x 40 steps, eps 1 kcal/mol", **results}
    print(json.dumps(result, indent=2))
    print("wrote", write_results("walkers_ethanol", result))


if __name__ == "__main__":
    main()
