"""The from-scratch baselines of the transfer table, trained until they stop improving.

``transfer_ethanol.py`` gives every method the same 300 steps per chain at the step size
measured for fine-tuning (η 1e-3 → 1e-4); from random weights that leaves SevenNet at
25–28 kcal/mol/Å on the CCSD(T) test forces, so its uncertainty figures are those of
untrained networks. The paper trains its baselines to
convergence. This script runs one method from scratch (``uninformative``: SGHMC from
random weights under the zero-mean prior; ``deep_ensemble``: the same with the noise
off, M independent fits) on the first N frames of the table's training pool, through
one long initial phase (η_start → η_end, exponential decay over ``--steps``), and
scores the ensemble at checkpoints along it exactly as the table does (test force RMSE,
recalibrated MLL, AUC-ROC of σ, its spread and its σ_F head, energy RMSE), with the
force RMSE on the N training frames (the fit) and the compute spent so far: chain-steps,
the chains' own seconds in the workers, and the wall time.

The chains run the schedule in pieces between checkpoints, keeping their state (no
sampler re-init), so the run is the same as one uninterrupted phase of ``--steps``; at a
checkpoint the members are the chains' current weights. Note that η at a checkpoint
before the end is above η_end: a shorter budget would have decayed further.

After each checkpoint the ensemble and the curve are saved under
``benchmarks/runs/scratch_convergence/<arm>/``, so a stopped run resumes from its last
checkpoint (same results: the chains' generators are saved with them). Results in
``results/scratch_convergence.json`` under ``<method>_n<N>_steps<S>`` (``_eta<start>-<end>``
when the step sizes are not the table's), the curves in ``results/scratch_convergence.png``.

    .venv/bin/python benchmarks/scratch_convergence.py --method deep_ensemble --n 10 [--steps 6000] [--eta-start 1e-3 --eta-end 1e-4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from common import ETHANOL_CCSD_T, RESULTS, ROOT, score_ensemble, update_results
from transfer_ethanol import SETTINGS, split

from flytune.bayes.chain import ChainJob
from flytune.bayes.ensemble import Ensemble
from flytune.config import ModelConfig, OfflineConfig
from flytune.data import read_labelled
from flytune.evaluation import evaluate
from flytune.finetune import finetune_schedule
from flytune.units import KCAL_MOL

METHODS = ("uninformative", "deep_ensemble")
WORK = ROOT / "benchmarks" / "runs" / "scratch_convergence"
RESULT = RESULTS / "scratch_convergence.json"
CHECKPOINTS = (150, 300, 600, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 8000, 10000, 12000, 16000, 20000)


def piece(schedule, start: int, stop: int):
    """Steps ``start``..``stop``−1 of ``schedule`` as a schedule of their own, sampled at its
    end, re-initialising the sampler only where the whole schedule does (its step 0)."""
    return dataclasses.replace(
        schedule,
        step_size=schedule.step_size[start:stop],
        temperature=schedule.temperature[start:stop],
        sample_after=(stop - start - 1,),
        reset_before=tuple(k - start for k in schedule.reset_before if start <= k < stop),
    )


def plot(arms: dict, path) -> None:
    """Test (solid) and training-frame (dashed) force RMSE against the chains' compute, one
    colour per arm with three checkpoints or more, and the table's points (300 steps per
    chain) of transfer_pbe and of the two from-scratch methods at the same N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    table = json.loads((RESULTS / "transfer_ethanol.json").read_text())["runs"]
    budget = SETTINGS["chains"] * SETTINGS["initial_steps"]
    fig, ax = plt.subplots(figsize=(10, 4.6))
    marked = set()
    shades = {}  # one grey per N for the table's points
    for arm, result in arms.items():
        curve = result["curve"]
        if len(curve) < 3:
            continue
        steps = [r["chain_steps"] for r in curve]
        name = arm + (" (diverged next)" if "diverged" in result else "")
        line, = ax.plot(steps, [r["force_rmse"] for r in curve], "o-", ms=3, label=f"{name}: test")
        ax.plot(steps, [r["train_force_rmse"] for r in curve], "--", color=line.get_color(), label=f"{arm}: training frames")
        n = str(result["settings"]["n_train"])
        shade = shades.setdefault(n, ("k", "0.55", "0.3")[len(shades) % 3])
        for method, marker in (("transfer_pbe", "*"), ("deep_ensemble", "x"), ("uninformative", "+")):
            if n in table.get(method, {}) and (method, n) not in marked:
                marked.add((method, n))
                ax.plot([budget], [table[method][n]["force_rmse"]], marker, color=shade, ms=9,
                        label=f"the table, {method}, N = {n}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("chain-steps (4 chains, batch of 5)")
    ax.set_ylabel("force RMSE (kcal/mol/Å)")
    ax.set_title("Ethanol CCSD(T): SevenNet from random weights, trained longer")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--n", type=int, default=10, help="training frames (the first N of the table's pool)")
    parser.add_argument("--steps", type=int, default=6000, help="steps per chain of the initial phase")
    parser.add_argument("--eta-start", type=float, default=SETTINGS["eta_start"])
    parser.add_argument("--eta-end", type=float, default=SETTINGS["eta_end"])
    args = parser.parse_args()
    arm = f"{args.method}_n{args.n}_steps{args.steps}"
    if (args.eta_start, args.eta_end) != (SETTINGS["eta_start"], SETTINGS["eta_end"]):
        arm += f"_eta{args.eta_start:g}-{args.eta_end:g}"
    work = WORK / arm
    work.mkdir(parents=True, exist_ok=True)
    threshold = SETTINGS["force_error_threshold_kcal_mol_A"] * KCAL_MOL

    validation, test, pool = split(read_labelled(ETHANOL_CCSD_T))
    train = pool[: args.n]
    config = ModelConfig(backbone="7net-0", prior="uninformative", chains=SETTINGS["chains"], workers=2,
                         threads_per_worker=1)
    offline = OfflineConfig(initial_steps=args.steps, eta_start=args.eta_start, eta_end=args.eta_end,
                            noise=args.method != "deep_ensemble", seed=args.n)
    settings = {"method": args.method, "n_train": args.n, "steps": args.steps, "chains": config.chains,
                "workers": config.workers, "eta_start": offline.eta_start, "eta_end": offline.eta_end,
                "noise": offline.noise, "seed": offline.seed, "batch_size": config.batch_size,
                "uninformative_sigma_prior": config.uninformative_sigma_prior}

    curve_path, model_path = work / "curve.json", work / "model.pt"
    resume = model_path.exists() and curve_path.exists()
    curve = json.loads(curve_path.read_text()) if resume else []
    done = curve[-1]["step"] if curve else 0
    if done >= args.steps:
        print(f"{arm}: complete ({done} steps)")
        return
    if resume:
        ensemble = Ensemble.load(model_path)
        print(f"{arm}: resuming after step {done}", flush=True)
    else:
        ensemble = Ensemble.from_config(config, seed=offline.seed)
        ensemble.data.extend(train)
    schedule = finetune_schedule(ensemble.config, offline)
    with ensemble:
        for stop in [c for c in CHECKPOINTS if done < c < args.steps] + [args.steps]:
            start = time.perf_counter()
            jobs = [ChainJob(c, piece(schedule, done, stop), new_labels=0) for c in ensemble.chains]
            ensemble.run(jobs)
            wall = time.perf_counter() - start
            stored = json.loads(RESULT.read_text()).get("arms", {}) if RESULT.exists() else {}
            diverged = ensemble.diverged()
            if diverged:  # the last checkpoint stays on disk; nothing after it is kept
                stored[arm] = {"settings": settings, "complete": False, "curve": curve,
                               "diverged": {"after_step": stop, "chains": diverged}}
                update_results(RESULT.stem, "arms", stored)
                print(f"{arm}: chains {diverged} diverged (non-finite weights) between steps {done} and {stop}")
                return
            fit = evaluate(ensemble, train, force_error_threshold=threshold)
            previous = curve[-1] if curve else {"chain_steps": 0, "chain_s": 0.0, "wall_s": 0.0}
            row = {
                "step": stop,
                "eta": float(schedule.step_size[stop - 1]),
                "chain_steps": previous["chain_steps"] + (stop - done) * len(ensemble.chains),
                "chain_s": previous["chain_s"] + sum(c.run_s for c in ensemble.chains),
                "wall_s": previous["wall_s"] + wall,
                "train_force_rmse": fit["force_rmse_kcal"],
                "train_energy_rmse": fit["energy_rmse_kcal"],
                **score_ensemble(ensemble, validation, test, threshold),
            }
            curve.append(row)
            done = stop
            ensemble.save(model_path)
            curve_path.write_text(json.dumps(curve, indent=1))
            print(f"{arm} step {stop}: train {row['train_force_rmse']:.2f}, test {row['force_rmse']:.2f} kcal/mol/Å, "
                  f"AUC {row['force_auc_roc']:.2f}, energy {row['energy_rmse']:.2f} kcal/mol, "
                  f"wall {row['wall_s']:.0f} s", flush=True)
            stored[arm] = {"settings": settings, "complete": stop == args.steps, "curve": curve}
            update_results(RESULT.stem, "arms", stored)
            plot(stored, RESULT.with_suffix(".png"))


if __name__ == "__main__":
    main()
