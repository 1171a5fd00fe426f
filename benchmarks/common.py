"""Helpers shared by the benchmark scripts: data location, machine description, JSON output."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = Path(os.environ.get("FLYTUNE_DATA", ROOT.parent / "shared" / "data"))
ETHANOL_CCSD_T = DATA / "ethanol_ccsd_t_sgdml" / "ethanol_ccsd_t-train.npz"


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": _dt.date.today().isoformat(),
    }


def write_results(name: str, results: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **results}, indent=2))
    return path


def update_results(name: str, key: str, value) -> Path:
    """Store ``value`` under ``key`` in ``results/<name>.json``, keeping the file's other keys."""
    path = RESULTS / f"{name}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.pop("machine", None)
    results[key] = value
    return write_results(name, results)


def random_frames(run_dir: Path, reference_spec: dict, n_frames: int, trajectory: Path | None = None,
                  cache_path: Path | None = None) -> tuple[list[int], list, np.ndarray]:
    """``n_frames`` frames drawn at random (seed 0) from an on-the-fly run's trajectory (or
    ``trajectory``): their indices, structures and raw reference energies (eV, no offset),
    computed where ``random_frames.jsonl`` next to the run directory (or ``cache_path``) does
    not hold them yet, and added to it. An entry counts only while the trajectory still
    holds that structure at that frame (a restarted run writes a different trajectory)."""
    from ase.io import read

    from flytune.otf.reference import make_reference

    frames = read(trajectory or run_dir / "trajectory.traj", ":")
    picks = sorted(np.random.default_rng(0).choice(len(frames), size=min(n_frames, len(frames)), replace=False))
    cache_path = cache_path or run_dir.parent / "random_frames.jsonl"  # reference energies, resumable
    rows = map(json.loads, cache_path.read_text().splitlines()) if cache_path.exists() else []
    cache = {
        r["frame"]: r["energy_raw"]
        for r in rows
        if r["frame"] < len(frames)  # JSON keeps floats exactly, so compare for equality
        and r.get("positions") == frames[r["frame"]].positions.tolist()
        and r.get("cell") == frames[r["frame"]].cell.array.tolist()
    }
    reference = make_reference(reference_spec["name"], reference_spec.get("options", {}))
    for i in picks:
        if int(i) not in cache:
            cache[int(i)] = reference.compute(frames[i]).energy
            row = {"frame": int(i), "energy_raw": cache[int(i)],
                   "positions": frames[i].positions.tolist(), "cell": frames[i].cell.array.tolist()}
            with open(cache_path, "a") as f:
                f.write(json.dumps(row) + "\n")
    chosen = [frames[i] for i in picks]
    raw = np.array([cache[int(i)] for i in picks])
    return [int(i) for i in picks], chosen, raw


def random_frame_errors(run_dir: Path, backbone: str, reference_spec: dict, n_frames: int,
                        walker: int = 0, cache_path: Path | None = None,
                        threshold_kcal: float | None = None) -> dict:
    """Energy RMSE (kcal/mol) on random frames of an on-the-fly run's trajectory (walker
    ``walker``'s in a run of several): the fine-tuned ensemble (``model.pt``) vs. the
    foundation ``backbone`` without fine-tuning, both with the energy offset set at the
    run's first reference call, at the frames of :func:`random_frames`. With
    ``threshold_kcal`` ε, also the share of those frames whose fine-tuned energy error
    exceeds ε (an exceedance that does not depend on where the run chose to call).

    ``rmse_random_in_run_kcal`` and ``random_in_run_exceed_fraction`` (share above the
    run's ε) score, at the same frames, the energy the run's MD was given there
    (``steps.csv``: the ensemble's mean, or the reference's at a call), not the final
    model; ``random_uncalled_exceed_fraction`` is that share among the
    ``random_uncalled_frames`` where no call was made, the steps the rule vouched for with
    P(|e| > ε) ≤ 5 % (the trajectory is written every ``trajectory_every`` steps from
    step 0)."""
    from flytune.bayes.ensemble import Ensemble
    from flytune.otf.rundir import RunDirectory
    from flytune.config import RunConfig
    from flytune.units import KCAL_MOL

    run = RunDirectory(run_dir, walkers=None)
    picks, chosen, raw = random_frames(run_dir, reference_spec, n_frames, run.walker_trajectories[walker], cache_path)
    with Ensemble.load(run_dir / "model.pt", workers=1) as ensemble:
        offset = ensemble.data.energy_offset  # set at the first reference call from the foundation
        finetuned = ensemble.predict(chosen).energy
    with Ensemble.pretrained(backbone) as pretrained:
        foundation = pretrained.predict(chosen).energy
    rmse = lambda pred: float(np.sqrt(np.mean((pred - (raw + offset)) ** 2)) / KCAL_MOL)
    out = {"random_frames": len(chosen), "rmse_random_finetuned_kcal": rmse(finetuned),
           "rmse_random_pretrained_kcal": rmse(foundation)}
    if threshold_kcal is not None:
        out["random_exceed_fraction"] = float(np.mean(np.abs(finetuned - (raw + offset)) / KCAL_MOL > threshold_kcal))
    config = RunConfig.model_validate(json.loads(run.config.read_text())["config"])
    every, eps_kcal = config.md.trajectory_every, config.uncertainty.threshold_eV / KCAL_MOL
    steps, rows = run.read_steps(walker), np.asarray(picks) * every
    in_run = np.abs(raw + offset - steps["energy_eV"][rows]) / KCAL_MOL
    uncalled = ~steps["reference_called"][rows].astype(bool)
    out.update(rmse_random_in_run_kcal=float(np.sqrt(np.mean(in_run**2))),
               random_in_run_exceed_fraction=float(np.mean(in_run > eps_kcal)),
               random_uncalled_frames=int(uncalled.sum()),
               random_uncalled_exceed_fraction=float(np.mean(in_run[uncalled] > eps_kcal)) if uncalled.any() else None)
    return out


def add_decision_arguments(parser) -> None:
    """The on-the-fly options the benchmarks vary: update scheduling (``[updates]``) and the
    label misfit and forgetting (``[uncertainty]``); each set one names the entry
    (:func:`decision_settings`)."""
    parser.add_argument("--updates", choices=("every", "deferred"), default="every",
                        help="[updates] policy; deferred names the entry _deferred")
    parser.add_argument("--critical-factor", type=float,
                        help="[updates] critical_factor (deferred: update at once when |error| > this × ε); "
                             "the entry's name gets _critical<X>")
    parser.add_argument("--max-cycles", type=int,
                        help="[updates] max_cycles (more cycles while the newest label is not learned); "
                             "the entry's name gets _cycles<N>")
    parser.add_argument("--misfit-as", choices=("spread", "bias", "correction"),
                        help="[uncertainty] label_misfit_as; the entry's name gets _misfit_<as>")
    parser.add_argument("--correction-order", type=int, choices=(1, 2),
                        help="[uncertainty] correction_order (with --misfit-as correction); 2 names the entry "
                             "_misfit_correction2")
    parser.add_argument("--discount", type=float,
                        help="[uncertainty] calibration_discount γ (forgetting; 1: none); the entry's name gets "
                             "_discount<γ>")


def decision_settings(args) -> tuple[str, dict, dict]:
    """(the entry name's suffix, ``[updates]``, ``[uncertainty]`` settings) from the options of
    :func:`add_decision_arguments`."""
    suffix, updates, uncertainty = "_deferred" if args.updates == "deferred" else "", {"policy": args.updates}, {}
    if args.critical_factor is not None:
        updates["critical_factor"] = args.critical_factor
        suffix += f"_critical{args.critical_factor:g}"
    if args.max_cycles is not None:
        updates["max_cycles"] = args.max_cycles
        suffix += f"_cycles{args.max_cycles}"
    if args.misfit_as is not None:
        uncertainty["label_misfit_as"] = args.misfit_as
        suffix += f"_misfit_{args.misfit_as}"
    if args.correction_order is not None:
        uncertainty["correction_order"] = args.correction_order
        suffix += "2" if args.correction_order == 2 else ""
    if args.discount is not None:
        uncertainty["calibration_discount"] = args.discount
        suffix += f"_discount{args.discount:g}"
    return suffix, updates, uncertainty


def add_part_arguments(parser) -> None:
    """``--hours`` and ``--state``: the command-line side of :func:`run_for`."""
    parser.add_argument("--hours", type=float, help="wall-time budget: stop then and report the run so far")
    parser.add_argument("--state", type=Path,
                        help="a run in parts: unpack this file if the run directory is missing; pack into it at the end, no report")


def run_for(config, hours: float | None, state: Path | None = None) -> dict:
    """Start or resume an on-the-fly run and advance it to the end of its schedule, or
    stop it after ``hours`` of wall time (between MD steps, so no update is cut short);
    the run resumes from there with the same command. Ctrl-C (SIGINT) stops it the same
    way.

    A run in parts (``state``, a ``flytune pack`` file kept outside the repository): when
    the run directory is missing, the run continues from ``state``; at the end it is
    packed into ``state`` for the next part."""
    from flytune.otf.run import run
    from flytune.otf.rundir import pack, unpack
    from flytune.progress import stop_on_sigint

    run_dir = Path(config.run_dir)
    if state is not None and state.exists() and not run_dir.exists():
        print(f"continuing the packed run {state}")
        unpack(state, run_dir)
    deadline = float("inf") if hours is None else time.monotonic() + hours * 3600
    with stop_on_sigint() as stop:

        def on_progress(_run) -> None:
            if time.monotonic() > deadline:
                stop.set()

        summary = run(config, stop=stop, on_progress=on_progress)
    if state is not None:
        print(f"{summary['simulated_ps']:.3f} ps, {summary['reference_calls']} calls; packed into {pack(run_dir, state)}")
    return summary


def otf_result(summary: dict, run_dir: Path, plots: Path, target_ps: float) -> dict:
    """The figures of an on-the-fly run for a results file; its report PNGs go to ``plots``."""
    from flytune.report import plot_all, read_run, summarize_run

    log = read_run(run_dir)
    plot_all(log, plots)
    result = {"target_ps": target_ps, "complete": summary["stopped"] is None}
    result.update({key: summary.get(key) for key in (
        "simulated_ps", "reference_calls", "exceed_fraction", "rmse_at_interventions_kcal", "wall_s",
        "time_md_s", "time_reference_s", "time_update_s", "time_predict_s", "speedup_vs_reference_md",
        "reference_over_prediction", "updates", "labels_per_update", "median_s_per_chain_step",
        "steps_uncontrolled", "uncontrolled_by_cause")})
    result.update(calls_by_quarter=summarize_run(log)["calls_by_quarter"],
                  calls_over_time_ps=[r["time_fs"] / 1000 for r in log.interventions])
    return result


def score_ensemble(ensemble, validation, test, force_error_threshold: float) -> dict:
    """Test-set metrics of ``ensemble`` in kcal/mol units: force RMSE, force MLL after
    recalibration (variance factor fitted on ``validation``), AUC-ROC of σ (and of its two
    parts) for |force error| > ``force_error_threshold`` (eV/Å), energy RMSE."""
    from flytune.evaluation import evaluate

    val = evaluate(ensemble, validation, force_error_threshold=force_error_threshold)
    metrics = evaluate(ensemble, test, force_error_threshold=force_error_threshold,
                       calibration_factor=val["calibration_factor"])
    return {
        "force_rmse": metrics["force_rmse_kcal"],
        "force_mll": metrics["force_mll_recalibrated_kcal"],
        "force_auc_roc": metrics["force_auc_roc"],
        "force_auc_roc_spread": metrics["force_auc_roc_spread"],
        "force_auc_roc_sigma_head": metrics["force_auc_roc_sigma_head"],
        "energy_rmse": metrics["energy_rmse_kcal"],
        "force_mll_uncalibrated": metrics["force_mll_kcal"],
        "calibration_factor_validation": val["calibration_factor"],
    }


def fit_and_score(train, validation, test, config, offline, force_error_threshold: float) -> dict:
    """Offline fine-tuning on ``train``, then :func:`score_ensemble` and the training wall time."""
    from flytune.finetune import finetune

    start = time.perf_counter()
    with finetune(train, config, offline=offline) as ensemble:
        wall = time.perf_counter() - start
        return {**score_ensemble(ensemble, validation, test, force_error_threshold), "train_s": wall}


def plot_scores_vs_n(runs: dict, ns, path: Path, title: str, rmse_line: float | None = None,
                     baseline_rmse: float | None = None) -> None:
    """Force RMSE, recalibrated MLL and AUC-ROC against the number of training frames,
    one line per method (``runs[method][str(N)]`` holds ``fit_and_score``'s figures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for method, by_n in runs.items():
        done = sorted(int(n) for n in by_n)
        for ax, key in zip(axes, ("force_rmse", "force_mll", "force_auc_roc")):
            ax.plot(done, [by_n[str(n)][key] for n in done], "o-", label=method)
    for ax, label in zip(axes, ("force RMSE (kcal/mol/Å)", "force MLL, recalibrated", "AUC-ROC, |ΔF| > 1 kcal/mol/Å")):
        ax.set_xscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("training frames N")
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    if rmse_line is not None:
        axes[0].axhline(rmse_line, color="grey", ls=":", lw=1)
    if baseline_rmse is not None:
        axes[0].axhline(baseline_rmse, color="k", ls="--", lw=1, label="without fine-tuning")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
