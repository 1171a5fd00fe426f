"""Issue 28.3: the calibrated rule against two baseline triggers on the same on-the-fly
ethanol run (the PBE foundation, PySCF B3LYP/6-31G* DF, ε = 0.5 kcal/mol, seed 1, the fast
posterior, deferred updates with critical_factor 1: the settings of ``otf_ethanol.py pbe
--updates deferred --critical-factor 1``), one run per trigger:

- ``probability``: flytune's calibrated rule, P(|e| > ε) > 5 % (label misfit and
  calibration checks on, the defaults); its run is that of ``otf_ethanol.py pbe --updates
  deferred --critical-factor 1``, whose configuration is the same;
- ``spread``: the same ensemble, a call when its raw energy σ > ε/2 (no calibration);
- ``force_deviation``: a call when the members' largest per-atom force deviation exceeds a
  threshold (DP-GEN, aims-PAX). Unless ``--deviation-eV-A`` is given, the threshold is
  matched to the ``probability`` run: the quantile of that run's per-step deviations
  (``steps.csv``) above which lie as many steps as it made calls, so both spend about the
  same number of reference calls.

Each finished run is stored under its trigger in ``results/trigger_baselines.json``:
``reference_calls``, ``exceed_fraction`` (at the interventions), ``rmse_at_interventions_kcal``,
``rmse_random_finetuned_kcal`` and ``random_exceed_fraction`` on ``--frames`` random
trajectory frames recomputed with PySCF (the fair comparison: where a trigger calls decides
which errors it sees), plus wall time and speed-up. Runs resume from
``benchmarks/runs/trigger_baselines_<trigger>/`` (``probability``: see above) and go in parts with ``--hours``.

    .venv/bin/python benchmarks/trigger_baselines.py probability [--ps 2] [--hours H]
    .venv/bin/python benchmarks/trigger_baselines.py spread
    .venv/bin/python benchmarks/trigger_baselines.py force_deviation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, add_part_arguments, otf_result, random_frame_errors, run_for, write_results
from otf_ethanol import FOUNDATIONS, REFERENCE, ethanol_config
from transfer_ethanol import PBE_CHECKPOINT, pretrain_on_pbe

from flytune.otf.rundir import RunDirectory

UPDATES = {"policy": "deferred", "critical_factor": 1.0}
THRESHOLD_KCAL = 0.5


def folder(trigger: str) -> Path:
    """The run's folder. The ``probability`` arm is the run of ``otf_ethanol.py pbe --updates
    deferred --critical-factor 1`` (the same configuration, so one run serves both)."""
    if trigger == "probability":
        return ROOT / "benchmarks" / "runs" / "otf_ethanol_pbe_deferred_critical1"
    return ROOT / "benchmarks" / "runs" / f"trigger_baselines_{trigger}"


def matched_deviation_threshold(run_dir: Path) -> tuple[float, int, int]:
    """(threshold eV/Å, calls, steps): the per-step largest force deviation of the run in
    ``run_dir`` above which lie as many of its steps (after the first) as it made calls."""
    steps = RunDirectory(run_dir).read_steps()
    deviation = steps["force_deviation_eV_A"][1:]
    calls = int(np.sum(steps["reference_called"][1:]))
    ranked = np.sort(deviation)[::-1]
    threshold = ranked[calls] if calls < len(ranked) else 0.5 * ranked[-1]  # every step called: below all
    return float(threshold), calls, len(deviation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trigger", choices=("probability", "spread", "force_deviation"))
    parser.add_argument("--ps", type=float, default=2.0)
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--deviation-eV-A", type=float, help="force_deviation: the threshold (default: matched)")
    add_part_arguments(parser)
    args = parser.parse_args()
    if not PBE_CHECKPOINT.exists():
        print(f"{PBE_CHECKPOINT} is missing: building it (transfer_ethanol.pretrain_on_pbe, ~11 min)", flush=True)
        print("PBE foundation:", json.dumps(pretrain_on_pbe()), flush=True)
    uncertainty: dict = {"trigger": args.trigger}
    matched = None
    if args.trigger == "force_deviation":
        if args.deviation_eV_A is None:
            threshold, calls, steps = matched_deviation_threshold(folder("probability") / "run")
            matched = {"from": "probability", "calls": calls, "steps": steps, "threshold_eV_A": threshold}
            print(f"force deviation threshold {threshold:.4f} eV/Å: {calls} of {steps} steps of the probability run above")
        uncertainty.update(force_deviation_threshold=args.deviation_eV_A or matched["threshold_eV_A"],
                           force_threshold_unit="eV/A")
    config = ethanol_config(FOUNDATIONS["pbe"], folder(args.trigger), args.ps, UPDATES, uncertainty)
    run_dir = Path(config.run_dir)
    summary = run_for(config, args.hours, args.state)
    if args.state:
        return
    result = otf_result(summary, run_dir, RESULTS / f"trigger_baselines_{args.trigger}", args.ps)
    result.update(trigger=args.trigger, uncertainty=uncertainty, matched_threshold=matched,
                  **random_frame_errors(run_dir, FOUNDATIONS["pbe"], REFERENCE, args.frames,
                                        threshold_kcal=THRESHOLD_KCAL))
    print(json.dumps(result, indent=2))
    path = RESULTS / "trigger_baselines.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    triggers = {**stored.get("triggers", {}), args.trigger: result}
    write_results("trigger_baselines", {
        "settings": {"foundation": "SevenNet-0 fine-tuned on ethanol PBE (transfer_ethanol.py)",
                     "reference": REFERENCE, "threshold_kcal_mol": THRESHOLD_KCAL, "seed": 1, "updates": UPDATES},
        "triggers": triggers})


if __name__ == "__main__":
    main()
