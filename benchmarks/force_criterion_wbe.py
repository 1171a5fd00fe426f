"""The force criterion on a periodic cell (issue 28.2): an on-the-fly run replayed along the
W–Be PBE DFT-MD trajectory (Be36W12, 48 atoms, 300 K, ``wbe_l12_dftmd_fitsnap``).

The trajectory is fixed: from frame ``--start`` (552: the 300 K equilibrium half) on,
every ``--every``-th of its 1104 frames is handed in turn to flytune's ASE calculator, and
the "reference" returns that frame's stored DFT energy and forces (a lookup, 0 s per
call). What the replay measures is therefore the decision, not the dynamics: where each
rule calls, and how large the errors are on the frames it did not call, which the stored
DFT labels give for every frame.

Two arms, the same foundation (CHGNet 0.3.0 as shipped, its family defaults: η_max 3e-3,
σ_p 0.2; or SevenNet-0 with ``--foundation 7net-0``: a chain-step on this 48-atom metal
took 13 s against CHGNet's 5 s in short trials on 2 shared cores), posterior (2 chains ×
100 SGHMC steps on batches of 2 labels, 2 workers; with 30 steps at η_max 3e-3 CHGNet
missed the labels it had just learned by 3–7 kcal/mol per cell and called at every frame) and updates
(deferred, as for updates that cost many calls; with a 0-s reference the cost rule never
fires, so updates come after critical errors or 16 waiting labels):

- ``energy``: ``criterion = "energy"``, ε = ``--energy-threshold`` kcal/mol per cell;
- ``forces``: ``criterion = "forces"``, ε_F = ``--force-threshold`` eV/Å on the largest
  error of one atom's force vector (ε still set, for the critical-update rule).
- ``both`` (``--arms both``): either rule calls.

``--chains`` sets the number of chains (default 2), ``--force-calibration`` the force
calibration (``components``, the default here so that the entries measured before
2026-12-08 keep their names, or ``largest_atom``, flytune's default since).

Both arms score the force errors at their calls (``force_exceed_fraction``) beside the
energy errors (``exceed_fraction``), and every frame without a call against the DFT label:
the fraction with |e| > ε, the fraction with max_a |ΔF_a| > ε_F, and the force RMSE. Each
arm keeps a run directory in ``benchmarks/runs/force_criterion_wbe_<entry>/``
and a record of its frames there; a stopped arm resumes from its checkpoint. Results:
``results/force_criterion_wbe.json`` under ``<foundation>_<arm>[_eta<η>][_chains<n>][_largest_atom]``.

    .venv/bin/python benchmarks/force_criterion_wbe.py --eta-max 3e-4 [--arms forces,energy,both] [--so-far]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from common import DATA, ROOT, update_results

import flytune
from flytune.data import read_labelled
from flytune.units import KCAL_MOL

WBE = DATA / "wbe_l12_dftmd_fitsnap" / "WBeL12_MD300K.extxyz"
POSTERIOR = {"chains": 2, "cycle_steps": 100, "batch_size": 2, "workers": 2}
UPDATES = {"policy": "deferred"}
ARMS = ("energy", "forces", "both")


class StoredFrames(Calculator):
    """The reference of the replay: the stored DFT energy (eV) and forces (eV/Å) of the
    frame at these positions; a structure that is not one of them is an error."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, frames):
        super().__init__()
        self.labels = {self.key(a): (a.get_potential_energy(), a.get_forces()) for a in frames}

    @staticmethod
    def key(atoms) -> bytes:
        return np.round(atoms.positions, 4).tobytes()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        energy, forces = self.labels[self.key(self.atoms)]
        self.results = {"energy": energy, "forces": forces.copy()}


def arm_settings(arm: str, force_eV_A: float, eta_max: float | None, chains: int,
                 force_calibration: str = "components") -> dict:
    """``[uncertainty]``, ``[model]`` and ``[updates]`` keywords of ``arm`` (one of
    ``ARMS``, the criterion); ``eta_max`` None: the foundation's family default."""
    eta = {} if eta_max is None else {"eta_max": eta_max}
    return {"criterion": arm, "force_threshold": force_eV_A, "force_threshold_unit": "eV/A",
            "force_calibration": force_calibration, **POSTERIOR, "chains": chains, **eta, **UPDATES}


def replay(name: str, foundation: str, arm: str, frames, energy_kcal: float, force_eV_A: float,
           eta_max: float | None, chains: int, force_calibration: str, deadline: float) -> dict:
    """Replay ``frames`` through the calculator of ``arm``; its figures, ``complete: false``
    when the deadline stopped it first (the run directory and frame record resume it)."""
    folder = ROOT / "benchmarks" / "runs" / f"force_criterion_wbe_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "frames.jsonl"
    with flytune.OnTheFlyCalculator.from_pretrained(
        foundation, reference=StoredFrames(frames), threshold=(energy_kcal, "kcal/mol"), seed=1,
        run_dir=str(folder / "run"), checkpoint_every=10,
        **arm_settings(arm, force_eV_A, eta_max, chains, force_calibration),
    ) as calc:
        done = calc.state.force_calls
        rows = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
        rows = rows[:done]  # frames after the checkpoint are replayed again (their labels are reused)
        record.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with record.open("a") as out:
            for i in range(done, len(frames)):
                if time.monotonic() > deadline:
                    break
                atoms = frames[i].copy()
                atoms.calc = calc
                forces = atoms.get_forces()
                r = calc.results
                row = {"frame": i, "energy_eV": float(r["energy"]), "called": bool(r["reference_called"]),
                       "prob_exceed": float(r["prob_exceed"]),
                       "force_error_max_eV_A": float(np.linalg.norm(forces - frames[i].get_forces(), axis=1).max()),
                       "force_rmse_eV_A": float(np.sqrt(np.mean((forces - frames[i].get_forces()) ** 2))),
                       "energy_dft_eV": float(frames[i].get_potential_energy())}
                out.write(json.dumps(row) + "\n")
                out.flush()
                rows.append(row)
    summary = json.loads((folder / "run" / "summary.json").read_text())
    return {"complete": len(rows) == len(frames), **figures(rows, summary, folder, energy_kcal, force_eV_A)}


def so_far(name: str, energy_kcal: float, force_eV_A: float) -> dict:
    """The figures of a stopped arm from its frame record and logs (no ``summary.json``
    needed: a killed arm has none): the frames replayed and the calls among them."""
    from collections import Counter

    from flytune.otf.rundir import force_exceed_fraction, intervention_figures

    folder = ROOT / "benchmarks" / "runs" / f"force_criterion_wbe_{name}"
    rows = [json.loads(line) for line in (folder / "frames.jsonl").read_text().splitlines()]
    read = lambda f: [json.loads(line) for line in (folder / "run" / f).read_text().splitlines()]  # noqa: E731
    calls = [r for r in read("interventions.jsonl") if r["step"] < len(rows)]
    exceed, rmse = intervention_figures(calls, energy_kcal * KCAL_MOL)
    summary = {"reference_calls": len(calls), "calls_by_reason": dict(Counter(r["reason"] for r in calls)),
               "updates": sum(u["step"] < len(rows) and u["reason"] != "final" for u in read("updates.jsonl")),
               "exceed_fraction": exceed, "rmse_at_interventions_kcal": rmse / KCAL_MOL,
               "force_exceed_fraction": force_exceed_fraction(calls, force_eV_A), "steps_uncontrolled": None,
               "wall_s": None, "time_update_s": None,
               "calibration": {"shape": calls[-1]["shape"], "rate": calls[-1]["rate"]}}
    return {"complete": False, **figures(rows, summary, folder, energy_kcal, force_eV_A)}


def figures(rows: list[dict], summary: dict, folder, energy_kcal: float, force_eV_A: float) -> dict:
    """Calls and errors of one arm: at its calls (from the run's summary) and on every frame
    without a call (against the stored DFT labels; the energy offset Δ of the run's first call)."""
    first = json.loads((folder / "run" / "interventions.jsonl").read_text().splitlines()[0])
    offset = first["energy_ref"] - first["energy_ref_raw"]
    free = [r for r in rows if not r["called"]]
    e_err = np.array([r["energy_eV"] - (r["energy_dft_eV"] + offset) for r in free])
    f_max = np.array([r["force_error_max_eV_A"] for r in free])
    f_rmse = np.array([r["force_rmse_eV_A"] for r in free])
    eps = energy_kcal * KCAL_MOL
    return {
        "frames": len(rows), "reference_calls": summary["reference_calls"], "updates": summary["updates"],
        "calls_by_reason": summary["calls_by_reason"],
        "exceed_fraction": summary["exceed_fraction"], "force_exceed_fraction": summary["force_exceed_fraction"],
        "rmse_at_interventions_kcal": summary["rmse_at_interventions_kcal"],
        "uncalled_frames": len(free),
        "uncalled_energy_exceed_fraction": float(np.mean(np.abs(e_err) > eps)) if free else None,
        "uncalled_force_exceed_fraction": float(np.mean(f_max > force_eV_A)) if free else None,
        "uncalled_energy_rmse_kcal": float(np.sqrt(np.mean(e_err**2)) / KCAL_MOL) if free else None,
        "uncalled_force_rmse_eV_A": float(np.sqrt(np.mean(f_rmse**2))) if free else None,
        "uncalled_force_error_max_eV_A": float(f_max.max()) if free else None,
        "steps_uncontrolled": summary["steps_uncontrolled"], "wall_s": summary["wall_s"],
        "time_update_s": summary["time_update_s"], "calibration": summary["calibration"],
        "force_calibration": summary.get("force_calibration"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--foundation", default="chgnet", help="chgnet or 7net-0")
    parser.add_argument("--arms", default="forces,energy")
    parser.add_argument("--start", type=int, default=552,
                        help="first frame replayed: frames 0-400 thermalise from the ideal lattice (the DFT energy "
                             "rises by 70 kcal/mol per cell, and both foundations miss much of that rise); "
                             "the second half is the 300 K equilibrium")
    parser.add_argument("--every", type=int, default=4, help="replay every n-th frame from --start")
    parser.add_argument("--energy-threshold", type=float, default=2.0, help="ε, kcal/mol per 48-atom cell")
    parser.add_argument("--force-threshold", type=float, default=0.3, help="ε_F, eV/Å")
    parser.add_argument("--eta-max", type=float, help="[model] eta_max (default: the foundation's); the "
                        "entry's name gets _eta<η>")
    parser.add_argument("--chains", type=int, default=POSTERIOR["chains"],
                        help="[model] chains (the entry's name gets _chains<n> when not the default)")
    parser.add_argument("--force-calibration", default="components", choices=("components", "largest_atom"),
                        help="[uncertainty] force_calibration (the entry's name gets _largest_atom when not the "
                             "default)")
    parser.add_argument("--so-far", action="store_true",
                        help="store the figures of the arms' frames replayed so far, from their run directories, "
                             "without running")
    parser.add_argument("--hours", type=float, default=24.0, help="stop (resumably) after this long")
    args = parser.parse_args()
    deadline = time.monotonic() + 3600 * args.hours
    arms = args.arms.split(",")
    if not set(arms) <= set(ARMS):
        parser.error(f"--arms takes {', '.join(ARMS)} (got {args.arms!r})")
    frames = read_labelled(WBE)[args.start :: args.every]
    for arm in arms:
        name = (f"{args.foundation}_{arm}" + (f"_eta{args.eta_max:g}" if args.eta_max is not None else "")
                + (f"_chains{args.chains}" if args.chains != POSTERIOR["chains"] else "")
                + ("_largest_atom" if args.force_calibration == "largest_atom" else ""))
        if args.so_far:
            result = so_far(name, args.energy_threshold, args.force_threshold)
        else:
            result = replay(name, args.foundation, arm, frames, args.energy_threshold, args.force_threshold,
                            args.eta_max, args.chains, args.force_calibration, deadline)
        result.update(settings={
            "start": args.start, "every": args.every, "energy_threshold_kcal_mol": args.energy_threshold,
            "force_threshold_eV_A": args.force_threshold, "posterior": {**POSTERIOR, "chains": args.chains},
            "updates": UPDATES, "force_calibration": args.force_calibration,
            "foundation": args.foundation, "eta_max": args.eta_max})
        print(arm, json.dumps(result, indent=2))
        update_results("force_criterion_wbe", name, result)
        if not result["complete"]:
            print(f"{arm}: {result['frames']} frames so far; run again (without --so-far) to resume")
            return


if __name__ == "__main__":
    main()
