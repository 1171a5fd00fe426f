"""On-the-fly ethanol as in the paper: 300 K, Langevin 0.5 fs, ε = 0.5 kcal/mol, PySCF
B3LYP/6-31G* (density fitting) as the reference.

Foundations: ``sevennet0`` (SevenNet-0 as shipped, a materials model) and ``pbe``
(SevenNet-0 fine-tuned on ethanol PBE frames by ``transfer_ethanol.py``, the closer
analogue of the paper's molecular foundation model). Posterior mode: the fast settings
of ``speed.py`` (4 chains, K = 100, η_max 3e-4, early stop, 2 workers), because the
paper's 8 × 2000 costs ~46 min per update on this machine; ``force_call_after`` = 200
steps (100 fs) as a safety net, because with the fast settings the ensemble's spread is
too small to trigger calls on its own before the calibration has seen an error
(``quality_guard.json``). Forced calls are counted as interventions.

Reported per foundation (``results/otf_ethanol.json``; plots in
``results/otf_ethanol_<foundation>/``): reference calls over time, fraction of
interventions with |error| > ε, RMSE at interventions, and on ``--frames`` frames drawn
at random from the trajectory and recomputed with the reference, the energy RMSE of the
fine-tuned ensemble and of the foundation without fine-tuning (the same energy offset,
taken at the first reference call). Conformers: the angle between the O–H and C–C bonds
and the H–O–C–C torsion over time with the reference calls marked; the share of calls
made during transitions against the share of time spent in them, with transitions taken
two ways: frames inside fixed torsion windows around the barriers, and transition paths
(stretches between leaving one conformer basin and entering another).

``--updates deferred`` runs the same with the posterior updates deferred by the cost
rule (``[updates] policy = "deferred"``), as ``<foundation>_deferred`` in the results; the
committed runs used ``every``.

The run lives in ``benchmarks/runs/otf_ethanol_<foundation>[_deferred]/`` and resumes where it
stopped; a length other than the 2 ps run so far (``--ps 10``: the paper's full length) is a
run and entry of its own, named ``..._10ps``; recomputed reference energies are cached.
A run longer than one sitting goes in parts: ``--hours H --state FILE`` advances it for H
hours and packs it into FILE (``flytune pack``, ~16 MB: keep it on storage that persists,
not in the repository) instead of reporting; on a machine without the run directory, the
next part unpacks FILE and continues it.

    .venv/bin/python benchmarks/otf_ethanol.py pbe --ps 2 [--frames 150]
    .venv/bin/python benchmarks/otf_ethanol.py sevennet0 --ps 2 --hours 2 --state $SCRATCH/otf_ethanol_sevennet0.tar.xz
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import molecule
from ase.io import read, write
from common import (
    RESULTS,
    ROOT,
    add_decision_arguments,
    add_part_arguments,
    decision_settings,
    otf_result,
    random_frame_errors,
    run_for,
    write_results,
)
from speed import FAST
from transfer_ethanol import PBE_CHECKPOINT, pretrain_on_pbe

from flytune.config import RunConfig

FOUNDATIONS = {"sevennet0": "7net-0", "pbe": str(PBE_CHECKPOINT)}
REFERENCE = {"name": "pyscf", "options": {"xc": "b3lyp", "basis": "6-31g*", "density_fit": True}}
TIMESTEP_FS = 0.5
STALE = ("labels carried the MD's FixCom projection of the reference's forces (a net force no potential "
         "can fit; fixed 2026-12-03), so the updates could not learn them")
FORCE_CALL_AFTER = 200
PS = 2.0  # the runs' length; another length names its own run and entry (_<ps>ps)
#: |H–O–C–C torsion| windows counted as transitions: the barriers at 0° (gauche ↔ gauche')
#: and at ±120° (trans ↔ gauche), ±20° around each
TRANSITION_WINDOWS_DEG = ((0.0, 20.0), (100.0, 140.0))
#: Conformer basins by signed H–O–C–C torsion, ±30° around each minimum: trans (180°),
#: gauche+ (+60°), gauche− (−60°). A transition path is a stretch outside every basin that
#: leaves one basin and enters another; an excursion that returns to its basin is not one.
BASINS_DEG = {"trans": (150.0, 210.0), "gauche+": (30.0, 90.0), "gauche-": (-90.0, -30.0)}


def ethanol_indices(atoms: Atoms) -> dict[str, int]:
    """Indices of the two carbons (C1 bonded to O), the O and the hydroxyl H."""
    pos, z = atoms.positions, atoms.numbers
    o = int(np.flatnonzero(z == 8)[0])
    carbons = np.flatnonzero(z == 6)
    c1 = int(carbons[np.argmin(np.linalg.norm(pos[carbons] - pos[o], axis=1))])
    c2 = int(carbons[carbons != c1][0])
    hydrogens = np.flatnonzero(z == 1)
    h = int(hydrogens[np.argmin(np.linalg.norm(pos[hydrogens] - pos[o], axis=1))])
    return {"c1": c1, "c2": c2, "o": o, "h": h}


def conformer_angles(atoms: Atoms, idx: dict[str, int]) -> tuple[float, float]:
    """(angle between the O→H and C1→C2 bond vectors, H–O–C1–C2 torsion), degrees."""
    p = atoms.positions
    oh, cc = p[idx["h"]] - p[idx["o"]], p[idx["c2"]] - p[idx["c1"]]
    angle = np.degrees(np.arccos(np.dot(oh, cc) / np.linalg.norm(oh) / np.linalg.norm(cc)))
    torsion = atoms.get_dihedral(idx["h"], idx["o"], idx["c1"], idx["c2"])
    return float(angle), float((torsion + 180.0) % 360.0 - 180.0)


def in_transition(torsion_deg: np.ndarray) -> np.ndarray:
    a = np.abs(torsion_deg)
    return np.any([(a >= lo) & (a <= hi) for lo, hi in TRANSITION_WINDOWS_DEG], axis=0)


def conformer_basin(torsion_deg: np.ndarray) -> np.ndarray:
    """Index into ``BASINS_DEG`` of each frame's basin, −1 for frames outside every basin."""
    tau = np.asarray(torsion_deg) % 360.0
    basin = np.full(tau.shape, -1)
    for i, (lo, hi) in enumerate(BASINS_DEG.values()):
        basin[((tau - lo) % 360.0) <= hi - lo] = i
    return basin


def transition_paths(basin: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) frame of each stretch outside every basin whose neighbours lie in two
    different basins; a stretch still open at either end of the trajectory is left out."""
    paths, start = [], None
    for i, b in enumerate(basin):
        if b < 0 and start is None:
            start = i
        elif b >= 0 and start is not None:
            if start > 0 and basin[start - 1] != b:
                paths.append((start, i - 1))
            start = None
    return paths


def conformer_analysis(run_dir, out_png) -> dict:
    """Torsion along the trajectory and at the reference calls; calls during transitions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = read(run_dir / "trajectory.traj", ":")
    labels = read(run_dir / "labels.extxyz", ":")
    idx = ethanol_indices(frames[0])
    traj = np.array([conformer_angles(a, idx) for a in frames])
    calls = np.array([conformer_angles(a, idx) for a in labels])
    every = json.loads((run_dir / "run_config.json").read_text())["config"]["md"]["trajectory_every"]
    t_traj = np.arange(len(frames)) * every * TIMESTEP_FS / 1000
    t_calls = np.array([a.info["time_fs"] for a in labels]) / 1000
    time_share = float(np.mean(in_transition(traj[:, 1])))
    call_share = float(np.mean(in_transition(calls[:, 1])))
    paths = transition_paths(conformer_basin(traj[:, 1]))
    on_path = np.zeros(len(frames), bool)
    for first, last in paths:
        on_path[first : last + 1] = True
    call_frames = np.minimum(np.rint(t_calls / (every * TIMESTEP_FS / 1000)).astype(int), len(frames) - 1)
    path_time_share = float(on_path.mean())
    path_call_share = float(on_path[call_frames].mean())
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for ax, col, label in ((ax1, 0, "angle O–H, C–C (°)"), (ax2, 1, "torsion H–O–C–C (°)")):
        ax.plot(t_traj, traj[:, col], lw=0.6)
        ax.plot(t_calls, calls[:, col], "r.", ms=5, label="reference call")
        ax.set_ylabel(label)
    for lo, hi in TRANSITION_WINDOWS_DEG:
        for sign in (1, -1):
            ax2.axhspan(sign * lo, sign * hi, color="grey", alpha=0.15, lw=0)
    for first, last in paths:
        for ax in (ax1, ax2):
            ax.axvspan(t_traj[first], t_traj[last], color="orange", alpha=0.3, lw=0)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("simulated time (ps)")
    ax1.set_title(
        f"torsion windows (grey): {100 * time_share:.1f} % of time, {100 * call_share:.1f} % of calls\n"
        f"transition paths (orange): {100 * path_time_share:.1f} % of time, {100 * path_call_share:.1f} % of calls",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out_png, dpi=130)
    plt.close(fig)
    return {
        "transition_windows_abs_torsion_deg": TRANSITION_WINDOWS_DEG,
        "transition_time_share": time_share,
        "transition_call_share": call_share,
        "call_rate_ratio": call_share / time_share if time_share > 0 else None,
        "basins_torsion_deg": BASINS_DEG,
        "transition_paths_ps": [(round(t_traj[a], 4), round(t_traj[b], 4)) for a, b in paths],
        "path_time_share": path_time_share,
        "path_call_share": path_call_share,
        "path_call_rate_ratio": path_call_share / path_time_share if path_time_share > 0 else None,
        "trajectory_frames": len(frames),
    }


def curvature_ratio(run_dir: Path) -> dict:
    """κ̄ of ``correction_order = 2`` at the calls (the fit before each): first, median and
    last; {} for a run without it."""
    ratios = [r.get("curvature_ratio", 0.0) for r in map(json.loads, (run_dir / "interventions.jsonl").open())]
    ratios = [k for k in ratios if k != 0.0]
    if not ratios:
        return {}
    return {"curvature_ratio": {"first": ratios[0], "median": float(np.median(ratios)), "last": ratios[-1],
                                "calls": len(ratios)}}


def ethanol_config(backbone: str, folder: Path, ps: float, updates: dict, uncertainty: dict | None = None,
                   model: dict | None = None) -> RunConfig:
    """The on-the-fly ethanol run of this benchmark (run directory ``folder/run``): seed 1,
    the fast posterior (``model`` settings over it), ε = 0.5 kcal/mol, Langevin 300 K at
    0.5 fs for ``ps`` picoseconds, ``[updates]`` as given, ``uncertainty`` settings added to ε."""
    folder.mkdir(parents=True, exist_ok=True)
    structure = folder / "ethanol.xyz"
    if not structure.exists():
        write(structure, molecule("CH3CH2OH"))
    return RunConfig.model_validate({
        "structure": str(structure), "run_dir": str(folder / "run"), "seed": 1,
        "model": {"backbone": backbone, **FAST, **(model or {})}, "reference": REFERENCE,
        "uncertainty": {"threshold": 0.5, "threshold_unit": "kcal/mol", **(uncertainty or {})},
        "md": {"driver": "langevin", "timestep_fs": TIMESTEP_FS, "temperature_K": 300,
               "steps": round(ps * 1000 / TIMESTEP_FS), "trajectory_every": 2},
        "safety": {"force_call_after": FORCE_CALL_AFTER}, "updates": updates,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("foundation", choices=sorted(FOUNDATIONS) + ["restamp"],
                        help="restamp: run nothing, only mark the stale entries and pick the top-level figures again")
    parser.add_argument("--ps", type=float, default=PS, help="simulated time to reach (ps)")
    parser.add_argument("--frames", type=int, default=150)
    add_decision_arguments(parser)
    parser.add_argument("--final-cycles", type=int,
                        help="[updates] final_cycles (cycles over all labels after the last MD step; default 1); "
                             "they come after the MD, so a complete run in the same directory is continued with "
                             "the extra cycles, and the entry is named <name>_final<N>")
    parser.add_argument("--chains", type=int,
                        help="[model] chains (M; the fast settings' 4 otherwise); the entry's name gets _chains<M>")
    add_part_arguments(parser)
    args = parser.parse_args()
    if args.foundation == "restamp":
        return store()
    backbone = FOUNDATIONS[args.foundation]
    if args.foundation == "pbe" and not PBE_CHECKPOINT.exists():
        print(f"{PBE_CHECKPOINT} is missing: building it (transfer_ethanol.pretrain_on_pbe, ~11 min)", flush=True)
        print("PBE foundation:", json.dumps(pretrain_on_pbe()), flush=True)
    suffix, updates, uncertainty = decision_settings(args)
    name = args.foundation + suffix + ("" if args.ps == PS else f"_{args.ps:g}ps")
    model = {}
    if args.chains is not None:
        model["chains"] = args.chains
        name += f"_chains{args.chains}"
    folder = ROOT / "benchmarks" / "runs" / f"otf_ethanol_{name}"
    if args.final_cycles is not None:
        updates["final_cycles"] = args.final_cycles
        name += f"_final{args.final_cycles}"
    config = ethanol_config(backbone, folder, args.ps, updates, uncertainty, model)
    run_dir = Path(config.run_dir)
    summary = run_for(config, args.hours, args.state)
    if args.state:
        return
    plots = RESULTS / folder.name  # a _final<N> entry is the same run: its plots with it
    result = otf_result(summary, run_dir, plots, args.ps)
    result.update(
        foundation=backbone if args.foundation == "sevennet0" else "SevenNet-0 fine-tuned on ethanol PBE (transfer_ethanol.py)",
        labels="the reference's own forces (before 2026-12-03: the MD's FixCom projection of them)",
        posterior="fast settings: " + json.dumps({**FAST, **model}), force_call_after=FORCE_CALL_AFTER, updates_policy=args.updates, updates_settings=updates,
        uncertainty_settings=uncertainty,
        **curvature_ratio(run_dir),
        **random_frame_errors(run_dir, backbone, REFERENCE, args.frames),
        conformers=conformer_analysis(run_dir, plots / "conformers.png"),
    )
    print(json.dumps(result, indent=2))
    store(name, result)


def store(name: str | None = None, result: dict | None = None) -> None:
    """Put ``result`` under ``runs.<name>`` of ``results/otf_ethanol.json`` (none: only
    restamp the file). A run measured with the labels from before the fix of 2026-12-03
    (no ``labels`` key) is marked ``stale`` (and kept beside a rerun of the same name as
    ``<name>_fixcom_labels``); the top-level figures are those of the first run measured
    after the fix, of ``pbe``, ``pbe_deferred_critical1`` (its 2026-12-04 run, from before the premise check
    of critical updates, as ``pbe_deferred_critical1_2026-12-04``), ``pbe_deferred``, ``sevennet0``."""
    path = RESULTS / "otf_ethanol.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    runs = stored.get("runs", {})
    if name is not None:
        if name in runs and "labels" not in runs[name]:
            runs[f"{name}_fixcom_labels"] = {**runs.pop(name), "stale": STALE}
        runs[name] = result
    for key, run in runs.items():
        if "labels" not in run and "stale" not in run:
            run["stale"] = STALE
    order = ("pbe", "pbe_deferred_critical1", "pbe_deferred_critical1_2026-12-04", "pbe_deferred", "sevennet0")
    main_name = next((k for k in order if k in runs and "stale" not in runs[k]), None) or next(
        (k for k in order if k in runs), None)
    main_run = runs[main_name]
    keys = ("complete", "reference_calls", "exceed_fraction", "rmse_at_interventions_kcal", "rmse_random_finetuned_kcal",
            "rmse_random_pretrained_kcal", "simulated_ps")
    out = {**{k: main_run.get(k) for k in keys}, "top_level_keys_from": main_name,
           "settings": {"temperature_K": 300, "timestep_fs": TIMESTEP_FS, "threshold_kcal_mol": 0.5,
                        "reference": REFERENCE, "seed": 1}, "runs": runs}
    written = write_results("otf_ethanol", out)
    if name is None and "machine" in stored:  # a restamp measured nothing: keep the machine and date of the runs
        written.write_text(json.dumps({"machine": stored["machine"], **out}, indent=2))
    print("wrote", written)


if __name__ == "__main__":
    main()
