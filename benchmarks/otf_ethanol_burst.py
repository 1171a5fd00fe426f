"""Where an on-the-fly ethanol run's exceedances cluster, and what the methyl group did there.

Reads a run directory of `otf_ethanol.py` up to the step its committed results cover and
writes `results/otf_ethanol_<foundation>_burst.json`: the steps with |error| > ε, the
burst (the largest cluster of them, consecutive ones at most ``--gap`` steps apart, or
``--burst FIRST LAST``), the errors after it, and the largest twist of the methyl
H–C–C–O torsion away from staggered (degrees; 60° is eclipsed) before the first forced
call, in the window, and elsewhere.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from ase.io import read
from otf_ethanol import FORCE_CALL_AFTER, TIMESTEP_FS, ethanol_indices

HERE = Path(__file__).parent
KCAL_PER_EV = 23.0605


def largest_cluster(steps: list[int], gap: int) -> tuple[int, int]:
    """(first, last) step of the largest run of ``steps`` whose neighbours are at most
    ``gap`` apart (the later one on a tie)."""
    clusters = [[steps[0]]]
    for step in steps[1:]:
        if step - clusters[-1][-1] <= gap:
            clusters[-1].append(step)
        else:
            clusters.append([step])
    best = max(reversed(clusters), key=len)
    return best[0], best[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("foundation", choices=["sevennet0", "pbe"])
    parser.add_argument("--burst", nargs=2, type=int, metavar=("FIRST", "LAST"), help="default: the largest cluster")
    parser.add_argument("--gap", type=int, default=50, help="most steps between exceedances of one cluster")
    args = parser.parse_args()
    run = HERE / "runs" / f"otf_ethanol_{args.foundation}" / "run"
    results = json.loads((HERE / "results" / "otf_ethanol.json").read_text())["runs"][args.foundation]
    last_step = round(results["simulated_ps"] * 1000 / TIMESTEP_FS)
    eps_ev = json.loads((run / "summary.json").read_text())["threshold_eV"]
    rows = [json.loads(line) for line in (run / "interventions.jsonl").open()]
    rows = [r for r in rows if r["step"] <= last_step and not r.get("first")]
    exceed = [r["step"] for r in rows if abs(r["error"]) > eps_ev]
    if not exceed and not args.burst:
        parser.error(f"no intervention up to step {last_step} exceeds ε: there is no burst to analyse")
    first, last = args.burst or largest_cluster(exceed, args.gap)
    after = np.abs([r["error"] for r in rows if r["step"] > last]) * KCAL_PER_EV

    frames = read(run / "trajectory.traj", ":")
    every = json.loads((run / "run_config.json").read_text())["config"]["md"]["trajectory_every"]
    steps = np.arange(len(frames)) * every
    idx = ethanol_indices(frames[0])
    z, pos = frames[0].numbers, frames[0].positions
    methyl_h = next(i for i in np.flatnonzero(z == 1) if np.linalg.norm(pos[i] - pos[idx["c2"]]) < 1.3)
    torsion = np.array([a.get_dihedral(methyl_h, idx["c2"], idx["c1"], idx["o"]) for a in frames])
    twist = np.abs((torsion - 180.0 + 60.0) % 120.0 - 60.0)
    keep = steps <= last_step
    before = keep & (steps < FORCE_CALL_AFTER)
    window = keep & (steps >= first - 20) & (steps <= last + 20)
    out = {
        "last_step": last_step,
        "exceed_steps": exceed,
        "burst_steps": [first, last],
        "after_burst_calls": int(after.size),
        "after_burst_median_abs_error_kcal": float(np.median(after)),
        "after_burst_max_abs_error_kcal": float(after.max()),
        "methyl_twist_max_deg": {
            "before_first_forced_call": float(twist[before].max()),
            "burst_window_pm20_steps": float(twist[window].max()),
            "elsewhere": float(twist[keep & ~before & ~window].max()),
        },
    }
    path = HERE / "results" / f"otf_ethanol_{args.foundation}_burst.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
