"""Uncertainty quality on a periodic metal: W–Be (Be36W12, L12-type, 48 atoms), PBE
DFT-MD at 300 K (``wbe_l12_dftmd_fitsnap/WBeL12_MD300K.extxyz``, 1104 frames).

The frames are consecutive MD snapshots, so the split is by time: training frames are
drawn evenly from frames 0–699, the 10 validation frames (variance recalibration) from
700–799, and the test set is every 3rd frame of 800–1103 (102 frames). For
N = 5, 20, 100 training frames, SevenNet-0 with the transfer prior is fine-tuned
offline and scored on the test set: force RMSE, force MLL after recalibration, AUC-ROC
of σ for |force error| > 1 kcal/mol/Å (kcal/mol units), energy RMSE. SevenNet-0
without fine-tuning is scored on the same frames as the reference point.

Each finished N is stored at once in ``results/wbe_uncertainty.json``; a re-run skips
it.

    .venv/bin/python benchmarks/wbe_uncertainty.py [--n 5,20,100]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from common import DATA, RESULTS, fit_and_score, plot_scores_vs_n, write_results

from flytune.bayes.ensemble import Ensemble
from flytune.config import ModelConfig, OfflineConfig
from flytune.data import read_labelled
from flytune.evaluation import evaluate
from flytune.units import KCAL_MOL

WBE = DATA / "wbe_l12_dftmd_fitsnap" / "WBeL12_MD300K.extxyz"
SETTINGS = {
    "chains": 4,
    "initial_steps": 150,
    "batch_size": 2,
    "eta_start": 1e-3,
    "eta_end": 1e-4,
    "force_error_threshold_kcal_mol_A": 1.0,
    "split": "train: evenly from frames 0-699; validation: 10 evenly from 700-799; test: every 3rd of 800-1103",
}


def split(frames):
    validation = [frames[i] for i in np.linspace(700, 799, 10).astype(int)]
    test = frames[800::3]
    return validation, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="5,20,100")
    args = parser.parse_args()
    frames = read_labelled(WBE)
    validation, test = split(frames)
    threshold = SETTINGS["force_error_threshold_kcal_mol_A"] * KCAL_MOL
    path = RESULTS / "wbe_uncertainty.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    runs = stored.get("runs", {})
    pretrained = stored.get("pretrained")
    if pretrained is None:
        with Ensemble.pretrained("7net-0") as ensemble:
            m = evaluate(ensemble, test, force_error_threshold=threshold)
        pretrained = {"force_rmse": m["force_rmse_kcal"], "energy_rmse": m["energy_rmse_kcal"]}
    for n in (int(x) for x in args.n.split(",")):
        if str(n) in runs:
            continue
        train = [frames[i] for i in np.linspace(0, 699, n).astype(int)]
        config = ModelConfig(chains=SETTINGS["chains"], batch_size=SETTINGS["batch_size"], workers=2,
                             threads_per_worker=1)
        offline = OfflineConfig(initial_steps=SETTINGS["initial_steps"], eta_start=SETTINGS["eta_start"],
                                eta_end=SETTINGS["eta_end"], seed=n)
        runs[str(n)] = fit_and_score(train, validation, test, config, offline, threshold)
        print(f"N={n}:", runs[str(n)], flush=True)
        write_results("wbe_uncertainty", {"settings": SETTINGS, "pretrained": pretrained, "runs": runs,
                                          "units": "kcal/mol, kcal/mol/Å; MLL per force component"})
    plot_scores_vs_n({"transfer_sevennet0": runs}, sorted(int(n) for n in runs), RESULTS / "wbe_uncertainty.png",
                     "W–Be (Be36W12) PBE MD frames: SevenNet-0 fine-tuned, held-out frames",
                     baseline_rmse=pretrained["force_rmse"])


if __name__ == "__main__":
    main()
