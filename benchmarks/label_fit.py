"""What lets an update learn the labels an on-the-fly run is stuck on? Replayed offline.

SevenNet-0 as shipped, on the 2 ps ethanol run with deferred updates, reached stretches
where every update left its newest label 0.4–0.9 kcal/mol off at ε = 0.5 kcal/mol, so
the rule called at every step and the run went slower than the reference MD. This
script takes the ensemble of such a run as its checkpoint holds it (the labels learned
so far, the chains' states) and the labels that were waiting, and runs the next update
once per arm, each from the same start, with one ``[model]`` setting changed at a time
(more chain steps, larger minibatches, a larger step, a broader prior). After each it
measures the ensemble mean's energy error on the newest label, on the waiting labels,
on all labels, and the force RMSE: which setting, at what cost in chain-steps and
seconds, brings the labels within ε.

    .venv/bin/python benchmarks/label_fit.py [--run DIR] [--arm base cycle_steps=400 batch_size=20 ...]

``--run`` defaults to ``benchmarks/runs/otf_ethanol_sevennet0_deferred_critical1/run``
(``otf_ethanol.py sevennet0 --updates deferred --critical-factor 1``). Results in
``results/label_fit.json`` under each arm's name (resumable per arm).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from ase.io import read
from common import RESULTS, ROOT, update_results
from deferred_learning import errors

from flytune.bayes.ensemble import Ensemble
from flytune.bayes.prior import transfer_prior
from flytune.config import UncertaintyConfig
from flytune.units import KCAL_MOL

DEFAULT_RUN = ROOT / "benchmarks/runs/otf_ethanol_sevennet0_deferred_critical1/run"


def replay(state: dict, labels: list, arm: str, threshold_kcal: float) -> dict:
    """One update from the checkpoint's ensemble with the arm's settings, and its errors."""
    key, _, value = arm.partition("=")
    changes = {} if arm == "base" else {key: json.loads(value)}
    ens = Ensemble.from_state_dict(state)
    ens.config = ens.config.model_copy(update=changes)
    if "sigma_prior" in changes:
        ens.prior = transfer_prior(ens.model, changes["sigma_prior"])
    learned = len(ens.data)
    waiting = labels[learned:]
    with ens:
        before = {"newest": errors(ens, waiting[-1:], threshold_kcal), "waiting": errors(ens, waiting, threshold_kcal)}
        t0 = time.perf_counter()
        ens.update(waiting)
        update_s = time.perf_counter() - t0
        after = {"newest": errors(ens, waiting[-1:], threshold_kcal), "waiting": errors(ens, waiting, threshold_kcal),
                 "all": errors(ens, labels, threshold_kcal)}
    chain_steps = sum(chain.state.step for chain in ens.chains)
    return {"changes": changes, "labels_learned_before": learned, "labels_waiting": len(waiting),
            "update_s": update_s, "chain_steps": chain_steps, "s_per_chain_step": update_s / chain_steps,
            "before": before, "after": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN)
    parser.add_argument("--arm", nargs="+", default=["base", "cycle_steps=400", "batch_size=20", "eta_max=0.001"],
                        help="base (the run's settings) or KEY=VALUE of [model], one change per arm")
    args = parser.parse_args()
    import torch

    state = torch.load(args.run / "checkpoint" / "checkpoint.pt", weights_only=True, map_location="cpu")["ensemble"]
    labels = read(args.run / "labels.extxyz", ":")
    threshold = UncertaintyConfig.model_validate(state["uncertainty"]).threshold_eV / KCAL_MOL
    path = RESULTS / "label_fit.json"
    done = json.loads(path.read_text()).get("arms", {}) if path.exists() else {}
    for arm in args.arm:
        if arm in done:
            print(arm, "measured already")
            continue
        done[arm] = replay(state, labels, arm, threshold)
        print(arm, json.dumps(done[arm]), flush=True)
        update_results("label_fit", "arms", done)
    print("run:", args.run, "threshold", threshold, "kcal/mol;", np.round([done[a]["after"]["newest"]["max_abs_energy_error_kcal"]
                                                                           for a in done], 3))


if __name__ == "__main__":
    main()
