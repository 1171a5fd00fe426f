"""Does the decision stay honest when the ensemble cannot spread? (issue 29)

A new user's settings: SevenNet-0 as shipped, ``chains = 2``, ``cycle_steps = 50``,
ε = 0.5 kcal/mol, 60 Langevin steps at 300 K, every other setting the default. For
each molecule and reference below, the run's trajectory is saved at every step and
every frame is scored afterwards against the reference: the error of the energy the MD
used at that step (the ensemble mean, or the reference's where it was called) against
E_ref + Δ with the run's offset Δ. Reported per case (``results/short_chains.json``):
the fraction of frames with |error| > ε, the calls and why they were made, the largest
uncalled error, and what made σ: its median, the part from the members' spread
sqrt(σ² − σ_E²) and the energy noise σ_E of the likelihood.

``--published`` runs the published rule (the ensemble's σ alone: ``label_misfit =
false``, ``calibration_checks = 0``), as ``<case>_published``.

    .venv/bin/python benchmarks/short_chains.py [--published] [--cases acetic_acid ...]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np
from ase.build import molecule
from ase.io import read, write
from common import ROOT, run_for, update_results

from flytune.config import RunConfig
from flytune.otf.reference import make_reference
from flytune.otf.rundir import RunDirectory
from flytune.units import KCAL_MOL

GFN2 = {"name": "tblite", "options": {"method": "GFN2-xTB"}}
GFN1 = {"name": "tblite", "options": {"method": "GFN1-xTB"}}
B3LYP = {"name": "pyscf", "options": {"xc": "b3lyp", "basis": "6-31g*", "density_fit": True}}
#: case: (ASE g2 molecule, reference)
CASES = {
    "acetic_acid": ("CH3COOH", GFN2),
    "acetamide": ("CH3CONH2", GFN2),
    "furan": ("C4H4O", GFN1),
    "methylamine": ("H3CNH2", B3LYP),
}
THRESHOLD_KCAL = 0.5
STEPS = 60


def config(case: str, published: bool) -> RunConfig:
    name, reference = CASES[case]
    runs = ROOT / "benchmarks" / "runs" / "short_chains"
    runs.mkdir(parents=True, exist_ok=True)
    structure = runs / f"{case}.xyz"
    write(structure, molecule(name))
    suffix = "_published" if published else ""
    return RunConfig.model_validate({
        "structure": str(structure), "run_dir": str(runs / f"{case}{suffix}"), "seed": 0,
        "model": {"backbone": "7net-0", "chains": 2, "cycle_steps": 50},
        "reference": reference,
        "uncertainty": {"threshold": THRESHOLD_KCAL, "threshold_unit": "kcal/mol"}
        | ({"label_misfit": False, "calibration_checks": 0} if published else {}),
        "md": {"driver": "langevin", "temperature_K": 300.0, "timestep_fs": 0.5, "steps": STEPS,
               "trajectory_every": 1},
    })


def score(cfg: RunConfig) -> dict:
    """Every frame's error against the reference (cached next to the run)."""
    rd = RunDirectory(cfg.run_dir)
    frames = read(rd.path / "trajectory.traj", ":")
    steps = rd.read_steps()
    used = dict(zip(steps["step"].astype(int), steps["energy_eV"]))  # the last force call of a step
    called = dict(zip(steps["step"].astype(int), steps["reference_called"]))
    interventions = rd.read_interventions()
    offset = interventions[0]["energy_ref"] - interventions[0]["energy_ref_raw"]
    cache_path = rd.path.parent / f"{rd.path.name}_frames.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    reference = make_reference(cfg.reference.name, cfg.reference.options)
    for frame in frames:
        key = str(frame.info["step"])
        if key not in cache:
            cache[key] = reference.compute(frame).energy
    cache_path.write_text(json.dumps(cache))
    errors, uncalled = [], []
    for frame in frames:
        step = int(frame.info["step"])
        error = (used[step] - (cache[str(step)] + offset)) / KCAL_MOL
        errors.append(error)
        if not called[step]:
            uncalled.append(error)
    errors, uncalled = np.abs(errors), np.abs(uncalled)
    sigma = steps["energy_std_eV"] / KCAL_MOL
    sigma_energy = cfg.model.energy_sigma_fraction * THRESHOLD_KCAL
    spread = np.sqrt(np.clip(sigma**2 - sigma_energy**2, 0.0, None))
    last = interventions[-1]
    return {
        "molecule": CASES[rd.path.name.removesuffix("_published")][0], "reference": cfg.reference.model_dump(),
        "frames": len(frames), "frames_above_threshold": int((errors > THRESHOLD_KCAL).sum()),
        "frame_exceed_fraction": float((errors > THRESHOLD_KCAL).mean()),
        "max_uncalled_error_kcal": float(uncalled.max()) if len(uncalled) else 0.0,
        "errors_kcal_every_10th_frame": [round(float(e), 3) for e in errors[::10]],
        "reference_calls": len(interventions), "calls_by_reason": dict(Counter(r["reason"] for r in interventions)),
        "calls_by_label_misfit": sum(bool(r.get("by_misfit")) for r in interventions),
        "median_sigma_kcal": float(np.median(sigma)), "median_spread_kcal": float(np.median(spread)),
        "sigma_energy_kcal": sigma_energy, "max_prob_exceed_uncalled": float(
            np.max(steps["prob_exceed"][~steps["reference_called"].astype(bool)], initial=0.0)),
        "final_shape": last["shape"], "final_rate": last["rate"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--published", action="store_true", help="the published rule: the ensemble's σ alone")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = parser.parse_args()
    for case in args.cases:
        cfg = config(case, args.published)
        summary = run_for(cfg, hours=None)
        result = score(cfg) | {key: summary.get(key) for key in (
            "wall_s", "time_reference_s", "time_update_s", "steps_uncontrolled", "speedup_vs_reference_md")}
        key = f"{case}_published" if args.published else case
        update_results("short_chains", key, result)
        print(key, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
