"""What sets the transfer floor on ethanol CCSD(T)? (issue 28.4)

``transfer_ethanol.py``'s PBE-foundation prior reaches 1.24 kcal/mol/Å with 10 CCSD(T)
frames and 1.00 with 100, where the paper reports < 0.5 with 10. Its foundation is
SevenNet-0 fine-tuned for 1500 Adam steps (batch 5) on 1000 PBE frames, energy and
forces. Each variant below changes one of those choices and nothing else, then scores:

- the foundation on the first 200 PBE test frames (``pretrain``, with a learning curve
  where ``curve_every`` is set),
- the foundation on the 150 CCSD(T) test frames before any transfer (force RMSE; the
  energy zero is fitted on the 10 training frames),
- the transfer prior centred on it with N = 10 CCSD(T) frames (``--n`` for more N),
  exactly as the table's ``transfer_pbe`` (4 chains × 300 steps, seed N).

Variants:

- ``sevennet0``: SevenNet-0 as shipped, scored on the CCSD(T) test frames only (its
  transfer is the table's ``transfer_sevennet0``).
- ``baseline``: the table's foundation (``benchmarks/runs/transfer/sevennet0_ethanol_pbe.pth``).
- ``steps_4500``: 3× the Adam steps (4500), test errors every 750 steps; ``steps_9000``: 6×.
- ``forces_only``: no energy term in the pretraining loss (the paper's NequIP transfer).
- ``frames_1800``: 1800 PBE frames (``train.xyz`` and ``test_MD.xyz`` frames 200–999;
  the 200 test frames stay held out).
- ``ccsd_t_pool``: not a foundation but the ceiling of this network and budget:
  SevenNet-0 trained the same way (1500 steps) on the 840 CCSD(T) pool frames, scored on
  the 150 CCSD(T) test frames. If plenty of target data cannot go below the floor, no
  foundation can. ``ccsd_t_pool_4500``: the same with 4500 steps.

Each finished part is stored at once in ``results/transfer_floor.json`` and skipped on
a re-run, so the script resumes; foundations go to ``benchmarks/runs/transfer/floor_*.pth``.

    .venv/bin/python benchmarks/transfer_floor.py [--variants baseline,ccsd_t_pool,steps_4500] [--n 1,2,5,10]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from common import ETHANOL_CCSD_T, RESULTS, plot_scores_vs_n, write_results
from transfer_ethanol import (
    NS,
    PBE_CHECKPOINT,
    PBE_TEST,
    PBE_TRAIN,
    SETTINGS,
    WORK,
    _energy_force_errors,
    energy_offset,
    pretrain,
    rmse_kcal,
    run_one,
    split,
)

from flytune.backbones import load_backbone
from flytune.data import read_labelled

N = 10  # the frames of the energy zero in foundation_on_target, and the default --n
VARIANTS = {
    "sevennet0": {},
    "baseline": {},
    "ccsd_t_pool": {},
    "steps_4500": {"steps": 4500},
    "forces_only": {"energy_weight": 0.0},
    "frames_1800": {},
    "ccsd_t_pool_4500": {"steps": 4500},
    "steps_9000": {"steps": 9000},
}
CURVE_EVERY = {"steps_4500": 750, "ccsd_t_pool": 500, "ccsd_t_pool_4500": 750, "steps_9000": 1500}


def foundation_on_target(path, train, test) -> dict:
    """Force and energy RMSE (kcal/mol units) of a foundation on the CCSD(T) test frames,
    its energy zero fitted on ``train`` (the N transfer frames)."""
    backbone = load_backbone(str(path))
    e, f = _energy_force_errors(backbone, test, energy_offset(backbone, train))
    return {"force_rmse_kcal": rmse_kcal(f), "energy_rmse_kcal": rmse_kcal(e * len(test[0]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--n", default=str(N), help="CCSD(T) training frames of the transfer runs, e.g. 1,2,5,10,20,50,100")
    args = parser.parse_args()
    ns = [int(n) for n in args.n.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")
    path = RESULTS / "transfer_floor.json"
    runs: dict = json.loads(path.read_text()).get("runs", {}) if path.exists() else {}

    def save() -> None:
        write_results("transfer_floor", {
            "settings": {"chains": SETTINGS["chains"], "initial_steps": SETTINGS["initial_steps"],
                         "pretrain_baseline": SETTINGS["pretrain"], "changes": VARIANTS, "curve_every": CURVE_EVERY},
            "units": "force RMSE kcal/mol/Å; energy RMSE kcal/mol (per atom where named)",
            "runs": runs,
        })
        curves = {f"transfer_pbe, foundation {k}": r["transfer"] for k, r in runs.items() if len(r.get("transfer", {})) > 1}
        if curves:
            table = json.loads((RESULTS / "transfer_ethanol.json").read_text())["runs"]
            curves = {"transfer_pbe (table)": table["transfer_pbe"],
                      "transfer_sevennet0 (table)": table["transfer_sevennet0"], **curves}
            plot_scores_vs_n(curves, NS, RESULTS / "transfer_floor.png",
                             "Ethanol CCSD(T) forces: the transfer prior on longer-trained foundations", rmse_line=0.5)

    validation, test, pool = split(read_labelled(ETHANOL_CCSD_T))
    pbe_test = read_labelled(PBE_TEST, "0:200")
    for name in variants:
        run = runs.setdefault(name, {})
        if name == "sevennet0":
            if "foundation_on_ccsd_t" not in run:
                run["foundation_on_ccsd_t"] = foundation_on_target("7net-0", pool[:N], test)
                save()
            continue
        checkpoint = PBE_CHECKPOINT if name == "baseline" else WORK / f"floor_{name}.pth"
        if "pretrain" not in run or not checkpoint.exists():
            if name == "baseline":
                if not checkpoint.exists():
                    parser.error(f"{checkpoint} is missing: build it with benchmarks/transfer_ethanol.py first")
                run["pretrain"] = json.loads((RESULTS / "transfer_ethanol.json").read_text())["pbe_foundation"]
            else:
                cfg = {**SETTINGS["pretrain"], **VARIANTS[name]}
                if name.startswith("ccsd_t_pool"):
                    train, scored = pool, test
                elif name == "frames_1800":
                    train, scored = read_labelled(PBE_TRAIN) + read_labelled(PBE_TEST, "200:"), pbe_test
                else:
                    train, scored = read_labelled(PBE_TRAIN), pbe_test
                run["pretrain"] = {"train_frames": len(train), "test": "CCSD(T) test" if name.startswith("ccsd_t_pool")
                                   else "PBE test_MD 0:200",
                                   **pretrain(train, scored, cfg, checkpoint, CURVE_EVERY.get(name, 0))}
            print(name, "pretrain:", run["pretrain"]["test_after"], flush=True)
            save()
        if name.startswith("ccsd_t_pool"):
            continue  # trained on the target pool itself: its test_after is the figure
        if "foundation_on_ccsd_t" not in run:
            run["foundation_on_ccsd_t"] = foundation_on_target(checkpoint, pool[:N], test)
            save()
        for n in ns:
            if str(n) not in run.setdefault("transfer", {}):
                run["transfer"][str(n)] = run_one("transfer_pbe", pool[:n], validation, test, seed=n,
                                                  initial_steps=SETTINGS["initial_steps"], foundation=checkpoint)
                print(name, f"transfer N={n}:", run["transfer"][str(n)], flush=True)
                save()


if __name__ == "__main__":
    main()
