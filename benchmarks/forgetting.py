"""Calibration that forgets (issue 28.1): the on-the-fly demo (``flytune demo``: SevenNet-0,
ethanol at 300 K, PySCF B3LYP/6-31G* DF, ε = 1 kcal/mol, 2 chains × 40 steps, 400 steps,
seed 1) with ``[uncertainty] calibration_discount`` γ = 1 (no forgetting, the published
rule), 0.95 and 0.9 (memories of about 20 and 10 calls), every other setting the default.

The demo updates after every label (``policy = "every"``), so when it calls does not depend
on how fast the machine is: the arms differ only by γ. Per arm: reference calls, the
errors at the calls (share above ε, RMSE), the calibration at the end (a', b' and the
factor sqrt(b'/a') on σ), uncontrolled steps, the speed-up over reference MD, and on
``--frames`` random trajectory frames recomputed with PySCF the share above ε among the
frames the run did not call (what the rule vouched for). Run directories in
``benchmarks/runs/forgetting_demo/``; a finished arm is kept in
``results/forgetting.json`` and skipped on a re-run.

    .venv/bin/python benchmarks/forgetting.py [--discounts 1,0.95,0.9] [--frames 60]
"""

from __future__ import annotations

import argparse
import json
import math
import tomllib

from ase.build import molecule
from ase.io import write
from common import RESULTS, ROOT, random_frame_errors, run_for, update_results

from flytune.config import RunConfig
from flytune.demo import DEMO_THRESHOLD_KCAL_MOL, demo_config

FOLDER = ROOT / "benchmarks" / "runs" / "forgetting_demo"


def arm(discount: float, frames: int) -> dict:
    """Run (or resume) the demo with ``calibration_discount = discount``; its figures."""
    FOLDER.mkdir(parents=True, exist_ok=True)
    structure = FOLDER / "ethanol.xyz"
    if not structure.exists():
        write(structure, molecule("CH3CH2OH"))
    base = tomllib.loads(demo_config(steps=400))  # the 400-step demo its figures were measured on
    run_dir = FOLDER / f"discount{discount:g}" / "run"
    config = RunConfig.model_validate({
        **base, "structure": str(structure), "run_dir": str(run_dir),
        "uncertainty": {**base.get("uncertainty", {}), "calibration_discount": discount},
    })
    summary = run_for(config, None)
    calibration = summary["calibration"]
    keys = ("steps", "reference_calls", "calls_by_reason", "exceed_fraction", "rmse_at_interventions_kcal",
            "steps_uncontrolled", "speedup_vs_reference_md", "reference_over_prediction", "updates", "wall_s")
    return {
        **{k: summary[k] for k in keys},
        "calibration": calibration,
        "sigma_factor_at_end": math.sqrt(calibration["rate"] / calibration["shape"]),
        **random_frame_errors(run_dir, config.model.backbone, config.reference.model_dump(), frames,
                              threshold_kcal=DEMO_THRESHOLD_KCAL_MOL),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--discounts", default="1,0.95,0.9")
    parser.add_argument("--frames", type=int, default=60, help="random trajectory frames recomputed per arm")
    args = parser.parse_args()
    path = RESULTS / "forgetting.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    for discount in map(float, args.discounts.split(",")):
        key = f"discount{discount:g}"
        if key in done:
            print(f"{key}: stored, skipped")
            continue
        result = arm(discount, args.frames)
        print(key, json.dumps(result, indent=2))
        update_results("forgetting", key, {"calibration_discount": discount, **result})


if __name__ == "__main__":
    main()
