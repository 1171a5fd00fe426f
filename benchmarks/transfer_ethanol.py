"""Transfer learning on ethanol, DFT → CCSD(T) forces (the paper's appendix A).

Target data: the 1000 CCSD(T) frames of ``ethanol_ccsd_t_sgdml``, split once with seed 0
into a 10-frame validation set, a 150-frame test set and a training pool; the N
training frames are the first N of the pool (nested sets).

Methods, for N = 1, 2, 5, 10, 20, 50, 100:

- ``transfer_pbe``: the transfer prior centred on a SevenNet-0 fine-tuned here on the
  1000 PBE frames of ``ethanol_rmd17_pbe_botnet/train.xyz`` (plain Adam, energy and
  forces; the closer analogue of the paper's molecular foundation model). The
  checkpoint is written to ``benchmarks/runs/transfer/`` (a SevenNet ``.pth``) and
  rebuilt when missing.
- ``transfer_sevennet0``: the transfer prior centred on SevenNet-0 as it ships.
- ``uninformative``: zero-mean prior, chains from random weights (training from scratch).
- ``deep_ensemble``: M noise-free fits from random weights (uninformative prior as
  weight decay, ``OfflineConfig(noise=False)``).

Every method runs the same offline schedule (M chains, initial phase η → η/10), so all
get the same compute. Metrics on the test set, in kcal/mol units as in the paper:
``force_rmse`` (kcal/mol/Å), ``force_mll`` (mean Gaussian log-likelihood of the force
components after recalibration: the variance factor is fitted on the validation set),
``force_auc_roc`` (σ as a detector of |force error| > 1 kcal/mol/Å), plus the energy RMSE.

Each finished (method, N) is stored at once in ``results/transfer_ethanol.json``; a
re-run skips those, so the script resumes. ``--initial-steps S`` runs a longer (or
shorter) budget than the table's 300 steps per chain; its figures go under
``budgets[S]`` and leave the table's runs and plot alone.

    .venv/bin/python benchmarks/transfer_ethanol.py [--methods transfer_pbe,uninformative] [--n 1,2,5]
    .venv/bin/python benchmarks/transfer_ethanol.py --methods transfer_pbe --n 10 --initial-steps 2000
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from common import (
    DATA,
    ETHANOL_CCSD_T,
    RESULTS,
    ROOT,
    fit_and_score,
    plot_scores_vs_n,
    write_results,
)

from flytune.backbones import load_backbone
from flytune.config import ModelConfig, OfflineConfig
from flytune.data import labels_of, read_labelled
from flytune.units import KCAL_MOL

PBE_TRAIN = DATA / "ethanol_rmd17_pbe_botnet" / "train.xyz"
PBE_TEST = DATA / "ethanol_rmd17_pbe_botnet" / "test_MD.xyz"
WORK = ROOT / "benchmarks" / "runs" / "transfer"
PBE_CHECKPOINT = WORK / "sevennet0_ethanol_pbe.pth"
NS = (1, 2, 5, 10, 20, 50, 100)
METHODS = ("transfer_pbe", "transfer_sevennet0", "uninformative", "deep_ensemble")
SETTINGS = {
    "chains": 4,  # the documented fast setting (issue 4); the paper uses 8
    "initial_steps": 300,
    "eta_start": 1e-3,  # benchmarks/results/step_size.json
    "eta_end": 1e-4,
    "validation_frames": 10,
    "test_frames": 150,
    "split_seed": 0,
    "force_error_threshold_kcal_mol_A": 1.0,
    "pretrain": {"steps": 1500, "batch": 5, "lr": 1e-3, "lr_end": 1e-5, "energy_weight": 1.0, "seed": 0},
}


def split(frames):
    order = np.random.default_rng(SETTINGS["split_seed"]).permutation(len(frames))
    n_val, n_test = SETTINGS["validation_frames"], SETTINGS["test_frames"]
    pick = lambda idx: [frames[i] for i in idx]
    return pick(order[:n_val]), pick(order[n_val : n_val + n_test]), pick(order[n_val + n_test :])


# -- the ethanol-PBE foundation ---------------------------------------------------------
def _energy_force_errors(backbone, frames, offset: float, batch: int = 20):
    """Energy errors per atom (eV/atom) and force-component errors (eV/Å) of ``backbone``."""
    e_err, f_err = [], []
    for i in range(0, len(frames), batch):
        chunk = frames[i : i + batch]
        out = backbone(backbone.batch(chunk))
        labels = [labels_of(a) for a in chunk]
        e_err += [(float(e) - (lab.energy - offset)) / len(a) for e, lab, a in zip(out.energy.detach(), labels, chunk)]
        f_err.append((out.forces.detach().numpy() - np.concatenate([lab.forces for lab in labels])).ravel())
    return np.array(e_err), np.concatenate(f_err)


def energy_offset(backbone, frames, batch: int = 50) -> float:
    """Δ = mean(E_label − E_backbone) over ``frames`` (eV): the constant between the
    data's energy zero and the backbone's (one composition)."""
    pred = np.concatenate([backbone(backbone.batch(frames[i : i + batch])).energy.detach().numpy()
                           for i in range(0, len(frames), batch)])
    return float(np.mean([labels_of(a).energy for a in frames]) - np.mean(pred))


def rmse_kcal(errors: np.ndarray) -> float:
    """Root mean square of errors in eV (or eV/Å), in kcal/mol (or kcal/mol/Å)."""
    return float(np.sqrt(np.mean(errors**2)) / KCAL_MOL)


def pretrain(train, test, cfg: dict, path, curve_every: int = 0) -> dict:
    """Fine-tune SevenNet-0 on labelled ``train`` frames (Adam, cosine decay), save a
    SevenNet checkpoint at ``path``, and score it on ``test`` before and after.

    Loss: w_E·mean((ΔE/n_atoms)²) + mean(ΔF²) in eV units (w_E = ``cfg["energy_weight"]``;
    0 trains on forces alone). The data's total energies and SevenNet-0's differ by a
    constant (one composition), so E − Δ is the target, Δ = mean(E − E_SevenNet-0) over
    ``train``. With ``curve_every`` > 0 the test errors are also recorded every that many
    steps (``curve``), so one run shows whether more steps would still help.
    """
    torch.manual_seed(cfg["seed"])
    backbone = load_backbone("7net-0")
    offset = energy_offset(backbone, train)

    def score() -> dict:
        e, f = _energy_force_errors(backbone, test, offset)
        return {"energy_rmse_kcal_per_atom": rmse_kcal(e), "force_rmse_kcal": rmse_kcal(f)}

    before = score()
    params = [p for p in backbone.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=cfg["lr"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, cfg["steps"], eta_min=cfg["lr_end"])
    rng = np.random.default_rng(cfg["seed"])
    curve = []
    start = time.perf_counter()
    for step in range(cfg["steps"]):
        chunk = [train[i] for i in rng.choice(len(train), cfg["batch"], replace=False)]
        labels = [labels_of(a) for a in chunk]
        out = backbone(backbone.batch(chunk), create_graph=True)
        n_atoms = torch.tensor([len(a) for a in chunk], dtype=out.energy.dtype)
        target_e = torch.tensor([lab.energy - offset for lab in labels], dtype=out.energy.dtype)
        target_f = torch.as_tensor(np.concatenate([lab.forces for lab in labels]), dtype=out.forces.dtype)
        loss = cfg["energy_weight"] * (((out.energy - target_e) / n_atoms) ** 2).mean() + ((out.forces - target_f) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 100 == 0:
            print(f"pretrain step {step}: loss {loss.item():.4g}", flush=True)
        if curve_every and (step + 1) % curve_every == 0 and step + 1 < cfg["steps"]:
            curve.append({"step": step + 1, "s": time.perf_counter() - start, **score()})
            print(f"pretrain step {step + 1}: test {curve[-1]}", flush=True)
    wall = time.perf_counter() - start
    after = score()
    path.parent.mkdir(parents=True, exist_ok=True)
    backbone.save_checkpoint(path)
    return {"settings": cfg, "wall_s": wall, "test_before": before, "test_after": after,
            **({"curve": curve + [{"step": cfg["steps"], "s": wall, **after}]} if curve_every else {})}


def pretrain_on_pbe() -> dict:
    """The table's ethanol-PBE foundation: :func:`pretrain` on the 1000 PBE training
    frames with ``SETTINGS["pretrain"]``, scored on the first 200 PBE test frames."""
    result = pretrain(read_labelled(PBE_TRAIN), read_labelled(PBE_TEST, "0:200"), SETTINGS["pretrain"], PBE_CHECKPOINT)
    return {"data": "ethanol_rmd17_pbe_botnet/train.xyz (1000 PBE/def2-SVP frames); test: first 200 of test_MD.xyz",
            **result}


# -- one (method, N) --------------------------------------------------------------------
def run_one(method: str, train, validation, test, seed: int, initial_steps: int, foundation=None) -> dict:
    """Offline fit and test scores of one method; ``foundation`` (a checkpoint path)
    replaces the PBE foundation of ``transfer_pbe``."""
    backbone = str(foundation or PBE_CHECKPOINT) if method == "transfer_pbe" else "7net-0"
    prior = "transfer" if method.startswith("transfer") else "uninformative"
    config = ModelConfig(backbone=backbone, prior=prior, chains=SETTINGS["chains"], workers=2, threads_per_worker=1)
    offline = OfflineConfig(initial_steps=initial_steps, eta_start=SETTINGS["eta_start"],
                            eta_end=SETTINGS["eta_end"], noise=method != "deep_ensemble", seed=seed)
    return fit_and_score(train, validation, test, config, offline,
                         SETTINGS["force_error_threshold_kcal_mol_A"] * KCAL_MOL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--n", default=",".join(map(str, NS)))
    parser.add_argument("--initial-steps", type=int, default=SETTINGS["initial_steps"],
                        help="steps per chain; other than the table's 300, results go under budgets[S]")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}; choose from {METHODS}")
    ns = [int(n) for n in args.n.split(",")]
    path = RESULTS / "transfer_ethanol.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    table: dict = stored.get("runs", {})
    budgets: dict = stored.get("budgets", {})
    standard = args.initial_steps == SETTINGS["initial_steps"]
    runs = table if standard else budgets.setdefault(str(args.initial_steps), {})
    pretrain = stored.get("pbe_foundation")

    def save() -> None:
        write_results("transfer_ethanol", {
            "settings": SETTINGS,
            "units": "force_rmse kcal/mol/Å; force_mll nats per force component in kcal/mol/Å units; energy_rmse kcal/mol",
            "pbe_foundation": pretrain,
            "runs": table,
            "budgets": budgets,
        })
        if table and standard:
            plot_scores_vs_n(table, NS, RESULTS / "transfer_ethanol.png",
                             "Ethanol CCSD(T) forces: transfer prior vs. training from scratch", rmse_line=0.5)

    frames = read_labelled(ETHANOL_CCSD_T)
    validation, test, pool = split(frames)
    for n in ns:  # by N first, so a partial run still compares every method
        for method in methods:
            if str(n) in runs.get(method, {}):
                continue
            if method == "transfer_pbe" and not PBE_CHECKPOINT.exists():
                pretrain = pretrain_on_pbe()
                print("PBE foundation:", pretrain, flush=True)
                save()
            result = run_one(method, pool[:n], validation, test, seed=n, initial_steps=args.initial_steps)
            runs.setdefault(method, {})[str(n)] = result
            print(f"{method} N={n}: " + ", ".join(f"{k} {v:.3g}" for k, v in result.items() if isinstance(v, float)
                                                  and math.isfinite(v)), flush=True)
            save()


if __name__ == "__main__":
    main()
