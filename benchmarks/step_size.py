"""Which peak step size η for SevenNet-0? Offline fine-tuning on CCSD(T) ethanol.

method.md §10 asks for η_max per backbone from a measurement. For each η, two chains
(two worker processes) run the offline schedule (initial phase from η to η/10) on
50 training frames; the ensemble is evaluated on 200 held-out frames. The split is
fixed by a seed. Results: ``benchmarks/results/step_size.json``.

    .venv/bin/python benchmarks/step_size.py [--steps 500] [--etas 1e-4 3e-4 1e-3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from common import ETHANOL_CCSD_T, RESULTS, write_results
from flytune.config import ModelConfig, OfflineConfig
from flytune.data import read_labelled
from flytune.evaluation import evaluate
from flytune.finetune import finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--train", type=int, default=50)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--etas", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    args = parser.parse_args()
    frames = read_labelled(ETHANOL_CCSD_T)
    order = np.random.default_rng(0).permutation(len(frames))
    train = [frames[i] for i in order[: args.train]]
    test = [frames[i] for i in order[args.train : args.train + args.test]]
    partial = RESULTS / "step_size.partial.json"
    runs = json.loads(partial.read_text()) if partial.exists() else {}  # resumable
    for eta in args.etas:
        key = f"{eta:g}"
        if key in runs:
            continue
        start = time.perf_counter()
        config = ModelConfig(chains=2, workers=2, threads_per_worker=1)
        offline = OfflineConfig(initial_steps=args.steps, eta_start=eta, eta_end=eta / 10, seed=0)
        with finetune(train, config, offline=offline) as ensemble:
            metrics = evaluate(ensemble, test)
        runs[key] = {k: metrics[k] for k in ("energy_rmse_kcal", "force_rmse_kcal", "force_mll_recalibrated_kcal",
                                             "force_auc_roc", "calibration_factor")}
        runs[key]["wall_s"] = time.perf_counter() - start
        print(key, runs[key], flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(runs, indent=2))
    write_results("step_size", {"setting": f"SevenNet-0, {args.train} CCSD(T) ethanol frames, 2 chains x "
                                f"{args.steps} steps (initial phase eta -> eta/10), {args.test} test frames",
                                "runs": runs})
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
