"""Quality guard of the speed settings: the same short on-the-fly ethanol run per setting.

Ethanol at 300 K, Langevin 0.5 fs, SevenNet-0, PySCF B3LYP/6-31G* (density fitting),
ε = 0.5 kcal/mol, seed 1, ``--steps`` MD steps. Settings: ``fast`` (speed.py's FAST:
4 chains, K = 100, η_max 3e-4, early stop, 2 workers), ``fast_wide`` (the same at
η_max 1e-3), ``fast_forced`` (the same with a reference call forced after 40 steps
without one) and ``paper`` (8 chains,
K = 2000, 2 workers; on 2 CPU cores an update took 12 min with 1 label and 44 min with
5, 2026-12-01: run it in parts with ``--hours``). Reported per setting: wall times,
reference calls, fraction of interventions above ε, RMSE at interventions, and the
energy RMSE of the final ensemble on ``--frames`` frames drawn at random from the
trajectory and recomputed with the reference (cached beside the run directory,
``common.random_frames``), and per call (``calls``) the step, error,
calibrated σ, P(|e| > ε) and update time. Runs live in ``benchmarks/runs/`` and
resume where they stopped (``--hours H`` stops one after H hours and reports the steps
so far, marked ``"complete": false``; ``--state FILE`` packs the run into FILE instead of
reporting, and continues from it when the run directory is gone); figures go to
``results/quality_guard.json``, under the setting's name (``fast_120_steps`` for
``fast --steps 120``: a twin of a run that stopped at step 120).

    .venv/bin/python benchmarks/quality_guard.py {fast,fast_wide,fast_forced,paper} [--steps 200] [--frames 20] [--hours H] [--state FILE]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from ase.build import molecule
from ase.io import write
from common import ROOT, add_part_arguments, random_frames, run_for, update_results
from speed import FAST, PAPER

from flytune.bayes.ensemble import Ensemble
from flytune.config import RunConfig
from flytune.otf.rundir import RunDirectory
from flytune.units import KCAL_MOL

#: ``fast_wide``: the fast settings at the step size that step_size.py measured to spread
#: the chains (offline, η 1e-3 needed a calibration factor of 1.3 on σ², 3e-4 one of 8.6)
SETTINGS = {"fast": FAST, "fast_wide": {**FAST, "eta_max": 1e-3}, "fast_forced": FAST, "paper": {**PAPER, "workers": 2}}
#: ``fast_forced``: the fast settings with the safety net that the README advises for
#: them, as in the demo: a reference call forced after 40 steps without one
SAFETY = {"fast_forced": {"force_call_after": 40}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("setting", choices=sorted(SETTINGS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--frames", type=int, default=20)
    add_part_arguments(parser)
    args = parser.parse_args()
    name = args.setting if args.steps == parser.get_default("steps") else f"{args.setting}_{args.steps}_steps"  # a shorter twin run
    folder = ROOT / "benchmarks" / "runs" / f"quality_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    structure = folder / "ethanol.xyz"
    if not structure.exists():
        write(structure, molecule("CH3CH2OH"))
    reference = {"name": "pyscf", "options": {"xc": "b3lyp", "basis": "6-31g*", "density_fit": True}}
    config = RunConfig.model_validate({
        "structure": str(structure), "run_dir": str(folder / "run"), "seed": 1,
        "model": {"backbone": "7net-0", **SETTINGS[args.setting]}, "reference": reference,
        "uncertainty": {"threshold": 0.5, "threshold_unit": "kcal/mol"}, "safety": SAFETY.get(args.setting, {}),
        "md": {"driver": "langevin", "timestep_fs": 0.5, "temperature_K": 300, "steps": args.steps},
    })
    summary = run_for(config, args.hours, args.state)
    if args.state:
        return
    # energy RMSE of the final ensemble on random trajectory frames, against the reference
    _, chosen, raw = random_frames(folder / "run", reference, args.frames)
    with Ensemble.load(folder / "run" / "model.pt", workers=1) as ensemble:
        predicted = ensemble.predict(chosen).energy
        truth = raw + ensemble.data.energy_offset
    errors = (predicted - truth) / KCAL_MOL
    result = {"complete": summary["stopped"] is None, "md_steps_done": summary["steps"]}
    result.update({key: summary.get(key) for key in (
        "simulated_ps", "reference_calls", "exceed_fraction", "rmse_at_interventions_kcal", "wall_s",
        "time_md_s", "time_reference_s", "time_update_s", "time_predict_s")})
    result.update(settings=SETTINGS[args.setting], safety=SAFETY.get(args.setting, {}), md_steps=args.steps,
                  rmse_random_frames_kcal=float(np.sqrt(np.mean(errors**2))), random_frames=len(chosen))
    # each call's figures, kept here because the run directory does not outlive the session
    result["calls"] = [{"step": r["step"], "error_kcal": r["error"] / KCAL_MOL,
                        "calibrated_std_kcal": r["calibrated_std"] / KCAL_MOL, "prob_exceed": r["prob_exceed"],
                        "update_s": r["update_s"]} for r in RunDirectory(folder / "run").read_interventions()]
    print(json.dumps(result, indent=2))
    print("wrote", update_results("quality_guard", name, result))


if __name__ == "__main__":
    main()
