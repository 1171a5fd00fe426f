"""Issue 25: how the energy error grows with the distance from the newest label, and
whether a σ that grows with it would have flagged the uncalled frames above ε.

Reads a finished ``otf_ethanol.py`` run directory (``runs/<name>/run`` and the reference
energies of its random frames, ``runs/<name>/random_frames.jsonl``); nothing is
recomputed. Distances are the rms change of all interatomic distances from the last
label (Å; blind to rotation and translation), gaps the MD steps since that label.

Reported per run (``results/misfit_drift.json``, one entry per run name):

- the errors at the calls and at the uncalled random frames by gap: rms |e| and the
  median scale s the rule used there (``calibrated_std`` at a call; at a frame the s
  that gives the recorded P(|e| > ε) under a Student-t with the calibration's ν and no
  bias, as in ``label_misfit_as = "correction"``);
- four σ models scored on the uncalled random frames, each fitted *online* on the calls
  made before the frame (as a run would have it), by how many of the frames above ε
  they flag (P > 5 %) and how many frames they flag in all (a proxy for the calls they
  would add):
  ``distance``: s² + β·d², β by maximum likelihood of the calls' errors;
  ``stratified``: one calibration per gap bin (Gamma(3, 10) on the precision multiplier),
  its scale relative to the global one;
  ``floor``: s² + ρ²(gap bin), ρ² the calls' mean excess e² − s² in that bin;
  ``gap_rms``: max(s², the calls' mean e² in that bin), which does not trust s at all
  where the calls at that gap erred more than it.

    .venv/bin/python benchmarks/misfit_drift.py pbe_deferred_critical1_misfit_correction2 [...]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from ase.io import read
from common import ROOT, update_results
from scipy import optimize, stats

from flytune.bayes.calibration import prob_within
from flytune.otf.rundir import RunDirectory
from flytune.units import KCAL_MOL

GAP_BINS = (1, 5, 20, 50, 10**9)
LEVEL = 0.05


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """rms change of the interatomic distances between two geometries (Å)."""
    iu = np.triu_indices(len(a), 1)
    da = np.linalg.norm(a[:, None] - a[None], axis=-1)[iu]
    db = np.linalg.norm(b[:, None] - b[None], axis=-1)[iu]
    return float(np.sqrt(np.mean((da - db) ** 2)))


def by_gap(gap, err, scale, above) -> list[dict]:
    """rms error, median scale and count above ε per bin of :data:`GAP_BINS`."""
    rows = []
    for lo, hi in zip(GAP_BINS[:-1], GAP_BINS[1:]):
        m = (gap >= lo) & (gap < hi)
        if m.any():
            rows.append({"gap_steps": [lo, hi], "n": int(m.sum()),
                         "rms_error_kcal": float(np.sqrt(np.mean(err[m] ** 2)) / KCAL_MOL),
                         "median_s_kcal": float(np.median(scale[m]) / KCAL_MOL),
                         "above_eps": int(np.sum(above[m]))})
    return rows


def analyse(name: str) -> dict:
    folder = ROOT / "benchmarks" / "runs" / f"otf_ethanol_{name}"
    run = RunDirectory(folder / "run")
    config = json.loads(run.config.read_text())["config"]
    every = config["md"]["trajectory_every"]
    eps = config["uncertainty"]["threshold"] * (KCAL_MOL if config["uncertainty"]["threshold_unit"] == "kcal/mol" else 1)
    calls = [json.loads(line) for line in run.interventions.read_text().splitlines()]
    labels = read(run.labels, ":")
    if len(labels) != len(calls):
        raise SystemExit(f"{name}: {len(labels)} labels for {len(calls)} calls (a run of one walker expected)")
    steps = run.read_steps()
    call_step = np.array([c["step"] for c in calls])
    # the calls after the first: error, the rule's scale, ν, gap and distance from the label before
    c_err = np.array([c["error"] for c in calls[1:]])
    c_s = np.array([c["calibrated_std"] for c in calls[1:]])
    c_nu = 2 * np.array([c["shape"] for c in calls[1:]])
    c_z2 = (c_err / c_s) ** 2
    c_gap = np.diff(call_step)
    c_d = np.array([distance(labels[k].positions, labels[k - 1].positions) for k in range(1, len(calls))])
    c_bin = np.digitize(c_gap, GAP_BINS) - 1

    offset = calls[0]["energy_ref"] - calls[0]["energy_ref_raw"]
    frames = read(run.trajectory, ":")
    cache = [json.loads(line) for line in (folder / "random_frames.jsonl").read_text().splitlines()]
    called = set(call_step.tolist())
    rows = []
    for r in cache:
        step = r["frame"] * every
        if step in called or step >= len(steps["energy_eV"]) or not np.allclose(frames[r["frame"]].positions, r["positions"]):
            continue
        k = int(np.searchsorted(call_step, step, side="right") - 1)
        nu = 2 * calls[k]["shape"]
        p = float(steps["prob_exceed"][step])
        s = eps / stats.t.ppf(1 - p / 2, nu) if p > 0 else 0.0
        rows.append((step, step - call_step[k], distance(frames[r["frame"]].positions, labels[k].positions),
                     r["energy_raw"] + offset - steps["energy_eV"][step], p, s, nu))
    f_step, f_gap, f_d, f_err, f_p, f_s, f_nu = map(np.array, zip(*rows))
    above = np.abs(f_err) > eps
    f_bin = np.digitize(f_gap, GAP_BINS) - 1

    def prob(scale, nu):  # P(|e| > ε) under a Student-t of scale s and ν degrees of freedom
        return 1 - prob_within(eps, np.maximum(scale, 1e-12), nu / 2, nu / 2)

    models: dict[str, np.ndarray] = {"as run": f_p}
    distance_p, stratified_p, floor_p, gap_rms_p = [], [], [], []
    for i in range(len(rows)):
        prior = call_step[1:] < f_step[i]
        e, s, d, nu = c_err[prior], c_s[prior], c_d[prior], c_nu[prior]
        fit = optimize.minimize_scalar(lambda lb: -np.sum(stats.t.logpdf(e, nu, scale=np.sqrt(s**2 + np.exp(lb) * d**2))),
                                       bounds=(-25, 5), method="bounded")
        distance_p.append(prob(np.sqrt(f_s[i] ** 2 + np.exp(fit.x) * f_d[i] ** 2), f_nu[i]))
        same = prior & (c_bin == f_bin[i])
        a_bin, b_bin = 3 + same.sum() / 2, 10 + 0.5 * c_z2[same].sum()
        a_all, b_all = 3 + prior.sum() / 2, 10 + 0.5 * c_z2[prior].sum()
        stratified_p.append(prob(f_s[i] * np.sqrt((b_bin / a_bin) / (b_all / a_all)), 2 * a_bin))
        excess = max(0.0, float(np.mean(c_err[same] ** 2 - c_s[same] ** 2))) if same.any() else 0.0
        floor_p.append(prob(np.sqrt(f_s[i] ** 2 + excess), f_nu[i]))
        mean_e2 = float(np.mean(c_err[same] ** 2)) if same.any() else 0.0
        gap_rms_p.append(prob(np.sqrt(max(f_s[i] ** 2, mean_e2)), f_nu[i]))
    models.update(distance=np.array(distance_p), stratified=np.array(stratified_p), floor=np.array(floor_p),
                  gap_rms=np.array(gap_rms_p))

    return {
        "threshold_kcal": eps / KCAL_MOL,
        "calls": len(calls), "uncalled_random_frames": len(rows), "uncalled_above_eps": int(above.sum()),
        "above_eps_frames": [{"step": int(f_step[i]), "gap_steps": int(f_gap[i]), "distance_A": round(float(f_d[i]), 4),
                              "error_kcal": round(float(f_err[i] / KCAL_MOL), 3), "s_kcal": round(float(f_s[i] / KCAL_MOL), 3)}
                             for i in np.flatnonzero(above)],
        "calls_by_gap": by_gap(c_gap, c_err, c_s, np.abs(c_err) > eps),
        "uncalled_frames_by_gap": by_gap(f_gap, f_err, f_s, above),
        "median_distance_A": {"calls": float(np.median(c_d)), "uncalled_frames": float(np.median(f_d))},
        "sigma_models": {k: {"flagged": int(np.sum(p > LEVEL)), "above_eps_flagged": int(np.sum(p[above] > LEVEL))}
                         for k, p in models.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run names of otf_ethanol.py, e.g. pbe_deferred_critical1_misfit_correction2")
    for name in parser.parse_args().runs:
        result = analyse(name)
        print(name, json.dumps({k: result[k] for k in ("uncalled_random_frames", "uncalled_above_eps", "sigma_models")}))
        for table in ("calls_by_gap", "uncalled_frames_by_gap"):
            for row in result[table]:
                print(f"  {table} {row['gap_steps']}: n {row['n']}, rms |e| {row['rms_error_kcal']:.3f}, "
                      f"median s {row['median_s_kcal']:.3f} kcal/mol, above eps {row['above_eps']}")
        print("wrote", update_results("misfit_drift", name, result))


if __name__ == "__main__":
    main()
