"""How fast do more update cycles improve the model an on-the-fly run leaves? Offline.

The SevenNet-0 ethanol run (``otf_ethanol.py sevennet0 --updates deferred
--critical-factor 1 --misfit-as correction --correction-order 2``) leaves a final model
0.28–0.42 kcal/mol off on its 150 random frames, against 0.15 for the issue's target, and
each further cycle over all its labels (``[updates] final_cycles``) gains ~0.012 kcal/mol.
This script takes the ensemble the run left (``model.pt``, all labels learned), runs more
final cycles (all labels drawn uniformly, as ``final_cycles`` does) once per arm, each arm
from that same start with one ``[model]`` setting changed, and scores the ensemble on the
run's random frames after every cycle (reference energies from the cache that
``otf_ethanol.py`` filled, ``random_frames.jsonl``, computed only where it lacks them): RMSE of the mean, mean error, each member's
RMSE and the members' spread, with the wall time of each cycle. Arms: ``base`` (the run's
settings), ``KEY=VALUE`` of ``[model]`` (``eta_max=0.001``, ``noise_off_fraction=1``: no
noise, an optimiser; ``batch_size=10``), and ``chains=2``: the first two chains alone,
one per worker, given twice the cycles (about the same wall time).

    .venv/bin/python benchmarks/final_cycles.py [--run DIR] [--cycles 3] [--arm base eta_max=0.001 ...]

Results in ``results/final_cycles.json`` under each arm (resumable per arm; an arm is
remeasured only when the run's model has changed since).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, random_frames, update_results

from flytune.bayes.ensemble import Ensemble
from flytune.units import KCAL_MOL

DEFAULT_RUN = ROOT / "benchmarks/runs/otf_ethanol_sevennet0_deferred_critical1_misfit_correction2/run"
ARMS = ["base", "eta_max=0.001", "noise_off_fraction=1", "batch_size=10", "chains=2"]


def scores(ens: Ensemble, frames: list, reference_eV: np.ndarray) -> dict:
    """Energy errors (kcal/mol) of the ensemble mean and of each member on ``frames``."""
    pred = ens.predict(frames)
    target = reference_eV + ens.data.energy_offset
    error = (pred.energy - target) / KCAL_MOL
    members = (pred.member_energy - target) / KCAL_MOL
    return {"rmse_kcal": float(np.sqrt(np.mean(error**2))), "mean_error_kcal": float(np.mean(error)),
            "member_rmse_kcal": np.sqrt(np.mean(members**2, axis=1)).tolist(),
            "member_spread_kcal": float(np.mean(np.std(members, axis=0, ddof=1)))}


def run_arm(model: Path, arm: str, cycles: int, frames: list, reference_eV: np.ndarray) -> dict:
    """``cycles`` more final cycles from the saved ensemble with the arm's setting, scored
    after each (``chains=N`` keeps the first N chains and runs cycles × M/N of them)."""
    key, _, value = arm.partition("=")
    changes = {} if arm == "base" else {key: json.loads(value)}
    ens = Ensemble.load(model, workers=2)
    if "chains" in changes:
        cycles = cycles * len(ens.chains) // changes["chains"]
        ens.chains = ens.chains[: changes["chains"]]
    ens.config = ens.config.model_copy(update=changes)
    rows = [{"cycle": 0, "wall_s": 0.0, **scores(ens, frames, reference_eV)}]
    with ens:
        for c in range(1, cycles + 1):
            start = time.perf_counter()
            ens.continue_update(0)
            rows.append({"cycle": c, "wall_s": time.perf_counter() - start, **scores(ens, frames, reference_eV)})
            print(f"{arm}: cycle {c}, {rows[-1]['wall_s']:.0f} s, RMSE {rows[-1]['rmse_kcal']:.3f} kcal/mol", flush=True)
    gain = rows[0]["rmse_kcal"] - rows[-1]["rmse_kcal"]
    wall = sum(r["wall_s"] for r in rows)
    return {"changes": changes, "cycles": rows, "wall_s": wall, "rmse_gain_kcal": gain,
            "rmse_gain_kcal_per_1000_s": 1000 * gain / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN)
    parser.add_argument("--cycles", type=int, default=3, help="more final cycles per arm (chains=N: × M/N)")
    parser.add_argument("--arm", nargs="+", default=ARMS,
                        help="base (the run's settings), KEY=VALUE of [model], or chains=N")
    args = parser.parse_args()
    config = json.loads((args.run / "run_config.json").read_text())["config"]
    summary = json.loads((args.run / "summary.json").read_text())
    start = {"run": str(args.run.relative_to(ROOT)), "reference_calls": summary["reference_calls"],
             "final_cycles_done": summary["final_cycles"], "wall_s": summary["wall_s"],
             "median_reference_s": summary["median_reference_s"], "steps": summary["steps"]}
    _, frames, reference_eV = random_frames(args.run, config["reference"], 150)
    path = RESULTS / "final_cycles.json"
    done = json.loads(path.read_text()).get("arms", {}) if path.exists() else {}
    for arm in args.arm:
        if done.get(arm, {}).get("start") == start:
            print(arm, "measured already")
            continue
        result = {"start": start, **run_arm(args.run / "model.pt", arm, args.cycles, frames, reference_eV)}
        update_results("final_cycles", "arms", {**done, arm: result})
        done[arm] = result


if __name__ == "__main__":
    main()
