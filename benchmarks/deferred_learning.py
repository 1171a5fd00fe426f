"""Do deferred updates learn all their waiting labels? Replayed offline from a run.

An update under ``[updates] policy = "deferred"`` learns every label that waited since
the last one. The priority minibatches used to favour only the newest structure
(q_N = 1/B), so of 16 waiting labels 15 were drawn with q ≈ 0.8/N, about once in a
100-step cycle at N = 300. They now favour all the waiting labels (method §3). This
script replays the first updates of an on-the-fly run's labels (same foundation,
settings, seed and update points as the run) with both rules and measures, after
each update, the ensemble's energy and force errors on the labels it has just learned
and on the labels of the next batch (the structures the MD called at next: how the
update generalises along the trajectory).

    .venv/bin/python benchmarks/deferred_learning.py --arm all|newest [--updates 5] [--set eta_max=1e-3]

``--run`` (default ``benchmarks/runs/otf_ethanol_pbe_deferred/run``, which
``otf_ethanol.py pbe --updates deferred`` writes) may name any on-the-fly run directory
with an ``updates.jsonl``.

Results in ``results/deferred_learning.json`` under the arm's name (``newest`` | ``all``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from ase.io import read
from common import ROOT, update_results

from flytune.bayes.ensemble import Ensemble
from flytune.config import ModelConfig, UncertaintyConfig
from flytune.data import labelled
from flytune.units import KCAL_MOL


def errors(ens: Ensemble, frames, threshold_kcal: float) -> dict:
    """Energy errors (kcal/mol) of the ensemble mean and force RMSE (eV/Å) on ``frames``."""
    pred = ens.predict(frames)
    offset = ens.data.energy_offset
    e = np.array([(a.get_potential_energy() + offset - p) / KCAL_MOL for a, p in zip(frames, pred.energy)])
    f_ref = np.concatenate([a.get_forces() for a in frames])
    return {
        "mean_abs_energy_error_kcal": float(np.mean(np.abs(e))),
        "max_abs_energy_error_kcal": float(np.max(np.abs(e))),
        "fraction_above_eps": float(np.mean(np.abs(e) > threshold_kcal)),
        "force_rmse_eV_A": float(np.sqrt(np.mean((pred.forces - f_ref) ** 2))),
        "mean_sigma_kcal": float(np.mean(pred.energy_std) / KCAL_MOL),
    }


def freeze_force_sigma() -> None:
    """Make every member's σ_{F,a} = s₀: the head's output is ignored (an experiment, not an option)."""
    from flytune.bayes.model import ProbabilisticModel

    learned = ProbabilisticModel.forward

    def forward(self, batch, create_graph=False, functional=False):
        pred = learned(self, batch, create_graph=create_graph, functional=functional)
        pred.force_sigma = torch.full_like(pred.force_sigma, self.force_sigma0)
        return pred

    ProbabilisticModel.forward = forward


def unprojected(atoms):
    """The label with FixCom's projection F' = F − m·(m·F)/(m·m) undone, using ΣF = 0."""
    forces, masses = atoms.get_forces(apply_constraint=False), atoms.get_masses()[:, None]
    out = labelled(atoms, atoms.get_potential_energy(), forces - masses * forces.sum(0) / masses.sum())
    out.info.update(atoms.info)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, default=ROOT / "benchmarks/runs/otf_ethanol_pbe_deferred/run")
    parser.add_argument("--updates", type=int, default=5, help="how many of the run's updates to replay")
    parser.add_argument("--arm", choices=["newest", "all"], required=True,
                        help="newest: favour only the newest label (the rule before); all: every waiting label")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="[model] settings changed from the run's, e.g. eta_max=1e-3 (the arm is named after them)")
    parser.add_argument("--frozen-head", action="store_true",
                        help="σ_F fixed at s₀ (force_sigma0_kcal_mol_A) instead of learned per atom; runs the chains in "
                             "this process (workers = 1), where the change applies")
    parser.add_argument("--unproject", action="store_true",
                        help="undo the FixCom projection that labels written before 2026-12-03 carry "
                             "(F = F' − m·ΣF'/Σm: the reference's own forces, whose sum is ≈ 0)")
    args = parser.parse_args()
    saved = json.loads((args.run / "run_config.json").read_text())["config"]
    changes = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.frozen_head:
        freeze_force_sigma()
        changes.update(workers=1, frozen_head=True)
    saved["model"].update({k: v for k, v in changes.items() if k not in ("frozen_head", "unprojected")})
    model, uncertainty = ModelConfig(**saved["model"]), UncertaintyConfig(**saved["uncertainty"])
    labels = read(args.run / "labels.extxyz", ":")
    if args.unproject:
        labels = [unprojected(a) for a in labels]
        changes["unprojected"] = True
    ends = [json.loads(line)["labels"] for line in (args.run / "updates.jsonl").read_text().splitlines()]
    ends = ends[: args.updates + 1]  # the last end only bounds the final look-ahead batch
    threshold = uncertainty.threshold if uncertainty.threshold_unit == "kcal/mol" else uncertainty.threshold / KCAL_MOL
    records, start = [], 0
    with Ensemble.from_config(model, uncertainty, seed=saved["seed"]) as ens:
        for k, end in enumerate(ends[:-1]):
            batch = labels[start:end]
            t0 = time.perf_counter()
            if args.arm == "newest":
                ens.add_data(batch[:-1])
                ens.update(batch[-1:])
            else:
                ens.update(batch)
            record = {"labels": end, "learned": len(batch), "update_s": time.perf_counter() - t0,
                      "learned_errors": errors(ens, batch, threshold),
                      "next_errors": errors(ens, labels[end : ends[k + 1]], threshold)}
            print(json.dumps(record), flush=True)
            records.append(record)
            start = end
    name = args.arm + "".join(f",{k}={v}" for k, v in changes.items())
    update_results("deferred_learning", name, {
        "run": str(args.run.relative_to(ROOT)) if args.run.is_relative_to(ROOT) else str(args.run),
        "posterior": {**{k: saved["model"][k] for k in ("chains", "cycle_steps", "eta_max", "batch_size", "early_stop")},
                      **changes},
        "threshold_kcal": threshold, "updates": records,
    })


if __name__ == "__main__":
    main()
