"""Issue 26: four walkers sharing one posterior against four runs one after another.

Si8 (the cubic diamond cell of ``otf_silicon.py``, rattled 0.05 Å) under NPT at 1 bar,
1 fs, at 300, 600, 900 and 1200 K; reference GFN1-xTB (tblite, with stress); SevenNet-0
with 2 chains × 50 SGHMC steps per update (η_max 3e-4, 2 worker processes: 25 s per
update here); ε = ``--threshold`` kcal/mol (default 4, 0.5 kcal/mol per atom: at
``otf_silicon.py``'s 1.2 these chains miss their newest label by 1.5–3 kcal/mol after each
update, so the rule calls at every step of every walker, and 150 steps cost over an hour
per arm); ``force_call_after`` 100.

- ``walkers``: one run with four ``[[walkers]]`` (seeds 1–4), its reference calls
  through a local Parsl HighThroughputExecutor with 2 workers;
- ``sequential``: the same four trajectories (same structure, seed and temperature) as
  four runs of one walker each, one after another, the reference in-process.

Reported per arm (``results/walkers_si8.json``): wall time (summed over the four runs
for ``sequential``), calls, updates, exceedance and the energy RMSE of the final model on
``--frames`` random trajectory frames recomputed with GFN1-xTB, per temperature. Every run
directory lives in ``benchmarks/runs/walkers_si8/`` and resumes where it stopped.

    .venv/bin/python benchmarks/walkers_si8.py [--steps 100] [--threshold 4] [--frames 15]
"""

from __future__ import annotations

import argparse
import json

from ase.build import bulk
from ase.io import write
from common import ROOT, random_frame_errors, run_for, write_results

from flytune.config import RunConfig

TEMPERATURES_K = (300, 600, 900, 1200)
SEED = 1
REFERENCE = {"name": "tblite", "options": {"method": "GFN1-xTB"}}
POSTERIOR = {"chains": 2, "cycle_steps": 50, "eta_max": 3e-4, "workers": 2}
FOLDER = ROOT / "benchmarks" / "runs" / "walkers_si8"


def config(run_dir, steps: int, threshold_kcal: float, **extra) -> RunConfig:
    return RunConfig.model_validate({
        "structure": str(FOLDER / "si8.xyz"), "run_dir": str(run_dir), "seed": SEED,
        "model": {"backbone": "7net-0", **POSTERIOR}, "reference": REFERENCE,
        "uncertainty": {"threshold": threshold_kcal, "threshold_unit": "kcal/mol"},
        "md": {"driver": "npt", "timestep_fs": 1.0, "pressure_bar": 1.0, "steps": steps, "trajectory_every": 5},
        "safety": {"force_call_after": 100}, **extra,
    })


def so_far(args) -> None:
    """The walkers arm as far as it ran (a stopped run): calls, updates, exceedance, and
    what each update left: the misfit of the members at their newest label."""
    from flytune.report import read_run, summarize_run
    from flytune.units import KCAL_MOL

    run_dir = FOLDER / f"walkers_{args.steps}_eps{args.threshold:g}"
    log = read_run(run_dir)
    figures = summarize_run(log)
    kcal = 1 / KCAL_MOL
    result = {"system": "Si8 cubic diamond, NPT 1 bar, 1 fs", "complete": False, "steps_per_walker": args.steps,
              "temperatures_K": TEMPERATURES_K, "threshold_kcal_mol": args.threshold, "reference": REFERENCE,
              "posterior": POSTERIOR,
              "walkers_so_far": {
                  "rounds": figures["md_steps"] // len(TEMPERATURES_K), "reference_calls": figures["reference_calls"],
                  "updates": figures["updates"], "exceed_fraction": figures["exceed_fraction"],
                  "rmse_at_interventions_kcal": figures["rmse_at_interventions_eV"] * kcal,
                  "per_walker": figures["walkers"],
                  "update_s": [round(u["update_s"], 1) for u in log.updates],
                  "label_misfit_after_update_kcal": [round(u["label_misfit_eV"] * kcal, 2) for u in log.updates],
                  "label_force_misfit_after_update_eV_A": [round(u["label_force_misfit_eV_A"], 3) for u in log.updates]}}
    print(json.dumps(result, indent=2))
    print("wrote", write_results("walkers_si8", result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="MD steps per walker")
    parser.add_argument("--threshold", type=float, default=4.0, help="ε, kcal/mol")
    parser.add_argument("--frames", type=int, default=15, help="random frames per temperature")
    parser.add_argument("--so-far", action="store_true",
                        help="run nothing: write the walkers arm's figures so far, read from its run directory")
    args = parser.parse_args()
    if args.so_far:
        return so_far(args)
    FOLDER.mkdir(parents=True, exist_ok=True)
    if not (FOLDER / "si8.xyz").exists():
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        atoms.rattle(0.05, seed=1)
        write(FOLDER / "si8.xyz", atoms)
    arms = {}
    # one run, four walkers, calls through Parsl
    walkers = [{"temperature_K": t, "seed": SEED + i} for i, t in enumerate(TEMPERATURES_K)]
    tag = f"{args.steps}_eps{args.threshold:g}"
    run_dir = FOLDER / f"walkers_{tag}"
    summary = run_for(config(run_dir, args.steps, args.threshold, walkers=walkers,
                             execution={"backend": "parsl", "parsl": "htex_local", "max_workers": 2}), None)
    arms["walkers"] = {
        "wall_s": summary["wall_s"], "reference_calls": summary["reference_calls"], "updates": summary["updates"],
        "exceed_fraction": summary["exceed_fraction"], "time_update_s": summary["time_update_s"],
        "time_reference_s": summary["time_reference_s"], "steps_uncontrolled": summary["steps_uncontrolled"],
        "per_temperature": [
            {"temperature_K": t, **{k: w[k] for k in ("steps", "reference_calls", "exceed_fraction")},
             **random_frame_errors(run_dir, "7net-0", REFERENCE, args.frames,
                                   run_dir / "walkers" / str(i) / "trajectory.traj",
                                   FOLDER / f"frames_walkers_{tag}_{i}.jsonl")}
            for i, (t, w) in enumerate(zip(TEMPERATURES_K, summary["walkers"]))],
    }
    # the same trajectories one after another, one walker each
    runs = []
    for i, t in enumerate(TEMPERATURES_K):
        run_dir = FOLDER / f"sequential_{tag}_{t}K"
        s = run_for(config(run_dir, args.steps, args.threshold, seed=SEED + i,
                           md={"driver": "npt", "timestep_fs": 1.0, "pressure_bar": 1.0, "steps": args.steps,
                               "trajectory_every": 5, "temperature_K": t}), None)
        runs.append({"temperature_K": t, "steps": s["steps"], "reference_calls": s["reference_calls"],
                     "exceed_fraction": s["exceed_fraction"], "updates": s["updates"], "wall_s": s["wall_s"],
                     "steps_uncontrolled": s["steps_uncontrolled"],
                     **random_frame_errors(run_dir, "7net-0", REFERENCE, args.frames,
                                           cache_path=FOLDER / f"frames_sequential_{tag}_{t}K.jsonl")})
    arms["sequential"] = {
        "wall_s": sum(r["wall_s"] for r in runs), "reference_calls": sum(r["reference_calls"] for r in runs),
        "updates": sum(r["updates"] for r in runs), "steps_uncontrolled": sum(r["steps_uncontrolled"] for r in runs),
        "per_temperature": runs,
    }
    result = {"system": "Si8 cubic diamond, NPT 1 bar, 1 fs", "steps_per_walker": args.steps,
              "temperatures_K": TEMPERATURES_K, "threshold_kcal_mol": args.threshold, "reference": REFERENCE,
              "posterior": POSTERIOR, "random_frames_per_temperature": args.frames, **arms}
    print(json.dumps(result, indent=2))
    print("wrote", write_results("walkers_si8", result))


if __name__ == "__main__":
    main()
