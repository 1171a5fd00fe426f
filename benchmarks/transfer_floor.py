"""What sets the transfer floor on ethanol CCSD(T)? (issue 28.4)

``transfer_ethanol.py``'s PBE-foundation prior reaches 1.24 kcal/mol/Å with 10 CCSD(T)
frames and 1.00 with 100, where the paper reports < 0.5 with 10. Its foundation is
SevenNet-0 fine-tuned for 1500 Adam steps (batch 5) on 1000 PBE frames, energy and
forces. Each variant below changes one of those choices and nothing else, then scores:

- the foundation on the first 200 PBE test frames (``pretrain``, with a learning curve
  where ``curve_every`` is set),
- the foundation on the 150 CCSD(T) test frames before any transfer (force RMSE; the
  energy zero is fitted on the 10 training frames),
- the transfer prior centred on it, N = 10 CCSD(T) frames, exactly as the table's
  ``transfer_pbe`` N = 10 (4 chains × 300 steps, seed 10).

Variants:

- ``baseline``: the table's foundation (``benchmarks/runs/transfer/sevennet0_ethanol_pbe.pth``).
- ``steps_4500``: 3× the Adam steps (4500), test errors every 750 steps.
- ``forces_only``: no energy term in the pretraining loss (the paper's NequIP transfer).
- ``frames_1800``: 1800 PBE frames (``train.xyz`` and ``test_MD.xyz`` frames 200–999;
  the 200 test frames stay held out).
- ``ccsd_t_pool``: not a foundation but the ceiling of this network and budget:
  SevenNet-0 trained the same way (1500 steps) on the 840 CCSD(T) pool frames, scored on
  the 150 CCSD(T) test frames. If plenty of target data cannot go below the floor, no
  foundation can.

Each finished part is stored at once in ``results/transfer_floor.json`` and skipped on
a re-run, so the script resumes; foundations go to ``benchmarks/runs/transfer/floor_*.pth``.

    .venv/bin/python benchmarks/transfer_floor.py [--variants baseline,ccsd_t_pool,steps_4500]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from common import ETHANOL_CCSD_T, RESULTS, write_results
from transfer_ethanol import (
    PBE_CHECKPOINT,
    PBE_TEST,
    PBE_TRAIN,
    SETTINGS,
    WORK,
    _energy_force_errors,
    pretrain,
    run_one,
    split,
)

from flytune.backbones import load_backbone
from flytune.data import labels_of, read_labelled
from flytune.units import KCAL_MOL

N = 10
VARIANTS = {
    "baseline": {},
    "ccsd_t_pool": {},
    "steps_4500": {"steps": 4500},
    "forces_only": {"energy_weight": 0.0},
    "frames_1800": {},
}
CURVE_EVERY = {"steps_4500": 750, "ccsd_t_pool": 500}


def foundation_on_target(path, train, test) -> dict:
    """Force and energy RMSE (kcal/mol units) of a foundation on the CCSD(T) test frames,
    its energy zero fitted on ``train`` (the N transfer frames)."""
    backbone = load_backbone(str(path))
    pred = backbone(backbone.batch(train)).energy.detach().numpy()
    offset = float(np.mean([labels_of(a).energy for a in train]) - np.mean(pred))
    e, f = _energy_force_errors(backbone, test, offset)
    rmse = lambda x: float(np.sqrt(np.mean(x**2)) / KCAL_MOL)
    return {"force_rmse_kcal": rmse(f), "energy_rmse_kcal": rmse(e * len(test[0]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")
    path = RESULTS / "transfer_floor.json"
    runs: dict = json.loads(path.read_text()).get("runs", {}) if path.exists() else {}

    def save() -> None:
        write_results("transfer_floor", {
            "settings": {"n": N, "chains": SETTINGS["chains"], "initial_steps": SETTINGS["initial_steps"],
                         "pretrain_baseline": SETTINGS["pretrain"], "changes": VARIANTS, "curve_every": CURVE_EVERY},
            "units": "force RMSE kcal/mol/Å; energy RMSE kcal/mol (per atom where named)",
            "runs": runs,
        })

    validation, test, pool = split(read_labelled(ETHANOL_CCSD_T))
    pbe_test = read_labelled(PBE_TEST, "0:200")
    for name in variants:
        run = runs.setdefault(name, {})
        checkpoint = PBE_CHECKPOINT if name == "baseline" else WORK / f"floor_{name}.pth"
        if "pretrain" not in run or not checkpoint.exists():
            if name == "baseline":
                if not checkpoint.exists():
                    parser.error(f"{checkpoint} is missing: build it with benchmarks/transfer_ethanol.py first")
                run["pretrain"] = json.loads((RESULTS / "transfer_ethanol.json").read_text())["pbe_foundation"]
            else:
                cfg = {**SETTINGS["pretrain"], **VARIANTS[name]}
                if name == "ccsd_t_pool":
                    train, scored = pool, test
                elif name == "frames_1800":
                    train, scored = read_labelled(PBE_TRAIN) + read_labelled(PBE_TEST, "200:"), pbe_test
                else:
                    train, scored = read_labelled(PBE_TRAIN), pbe_test
                run["pretrain"] = {"train_frames": len(train), "test": "CCSD(T) test" if name == "ccsd_t_pool"
                                   else "PBE test_MD 0:200",
                                   **pretrain(train, scored, cfg, checkpoint, CURVE_EVERY.get(name, 0))}
            print(name, "pretrain:", run["pretrain"]["test_after"], flush=True)
            save()
        if name == "ccsd_t_pool":
            continue  # trained on the target pool itself: its test_after is the figure
        if "foundation_on_ccsd_t" not in run:
            run["foundation_on_ccsd_t"] = foundation_on_target(checkpoint, pool[:N], test)
            save()
        if f"transfer_n{N}" not in run:
            run[f"transfer_n{N}"] = run_one("transfer_pbe", pool[:N], validation, test, seed=N,
                                            initial_steps=SETTINGS["initial_steps"], foundation=checkpoint)
            print(name, f"transfer N={N}:", run[f"transfer_n{N}"], flush=True)
            save()


if __name__ == "__main__":
    main()
