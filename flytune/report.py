"""``flytune report RUN_DIR``: figures and a self-contained HTML page for a run directory.

Reads only the run directory's logs (``steps.csv``, ``interventions.jsonl``,
``run_config.json``, ``summary.json`` when present), so it works on a finished run, a
killed one, or one still in progress. Energies are shown in the unit of the user's
threshold (``uncertainty.threshold_unit``).

Figures (PNG, also embedded in ``report.html``):

- ``calls.png``: reference calls and posterior updates against simulated time, over the
  whole run;
- ``probability.png``: P(|e| > ε) at every force call against the call level
  (1 − confidence), with the steps that ran above it without a call shaded;
- ``errors.png``: the error E_ref + Δ − Ê at every intervention against the ±ε band,
  with the calibrated predictive σ as bars and the exceedance rate in the title;
- ``sigma_error.png``: |error| against the calibrated σ, with the smoothed RMSE-vs-σ
  curve of :func:`rmse_vs_sigma`;
- ``calibration.png``: the Gamma posterior a', b' and the implied scale √(b'/a') on σ;
- ``traces.png``: predicted potential energy and temperature along the trajectory.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter1d

from flytune.config import UncertaintyConfig
from flytune.errors import FlytuneError
from flytune.otf.rundir import (RunDirectory, cost_figures, force_exceed_fraction, intervention_figures, md_steps_of,
                               walker_figures)
from flytune.units import energy_to_eV

FIGURES = ("calls", "probability", "errors", "sigma_error", "calibration", "traces")


@dataclass
class RunLog:
    """The logs of one run, as arrays (energies in eV, times in fs)."""

    path: Path
    steps: dict[str, np.ndarray]  # steps.csv columns
    interventions: list[dict]  # interventions.jsonl records, in order
    updates: list[dict]  # updates.jsonl records (empty for runs from before it)
    threshold_eV: float
    confidence: float
    unit: str  # the user's energy unit for display
    summary: dict | None  # summary.json of the last finished segment, if any
    walkers: list[dict] | None = None  # per walker of a run with [[walkers]] (:func:`walker_figures`)
    force_threshold_eV_A: float | None = None  # ε_F, if the run set one

    @property
    def per_unit(self) -> float:
        """eV per display unit."""
        return energy_to_eV(1.0, self.unit)

    def scored(self) -> list[dict]:
        """Interventions that test the prediction (all but the first, which has no model error)."""
        return [r for r in self.interventions if not r.get("first")]


def read_run(path: str | Path) -> RunLog:
    """Load a run directory's logs; a :class:`FlytuneError` says what is missing."""
    rd = RunDirectory(path, walkers=None)
    if not rd.config.exists():
        raise FlytuneError(f"{str(path)!r} has no run_config.json; give a directory written by `flytune run`")
    config = json.loads(rd.config.read_text())["config"]
    uncertainty = UncertaintyConfig(**config.get("uncertainty", {}))
    summary = json.loads(rd.summary.read_text()) if rd.summary.exists() else None
    interventions = rd.read_interventions()
    walkers = walker_figures(rd, interventions, uncertainty.threshold_eV) if rd.walkers else None
    return RunLog(Path(path), rd.read_steps(None), interventions, rd.read_updates(), uncertainty.threshold_eV,
                  uncertainty.confidence, uncertainty.threshold_unit, summary, walkers, uncertainty.force_threshold_eV_A)


# -- the statistics ---------------------------------------------------------------------
def rmse_vs_sigma(sigma: np.ndarray, error: np.ndarray, width: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-smoothed RMSE against predicted σ.

    Sort the pairs (σ_i, e_i) by σ, smooth e_i² and σ_i² along that order with a
    Gaussian kernel of ``width`` points (default max(1, n/10)), and return
    (√⟨σ²⟩, √⟨e²⟩). For a calibrated model the curve follows the diagonal.
    """
    sigma, error = np.asarray(sigma, float), np.asarray(error, float)
    if sigma.shape != error.shape or sigma.ndim != 1:
        raise ValueError("sigma and error must be 1-d arrays of the same length")
    if sigma.size == 0:
        return np.array([]), np.array([])
    order = np.argsort(sigma, kind="stable")
    width = max(1.0, sigma.size / 10) if width is None else width
    smooth = lambda x: gaussian_filter1d(x[order] ** 2, width, mode="nearest")
    return np.sqrt(smooth(sigma)), np.sqrt(smooth(error))


def summarize_run(run: RunLog) -> dict:
    """Figures of a run from its logs (energies in eV and in the display unit)."""
    exceed, rmse = intervention_figures(run.interventions, run.threshold_eV)
    sigma = np.array([r["calibrated_std"] for r in run.scored()])
    times = np.array([r["time_fs"] for r in run.interventions])
    steps = run.steps.get("step", np.array([]))
    time_fs = run.steps.get("time_fs", np.array([]))
    simulated_fs = float(time_fs.max()) if time_fs.size else 0.0  # the walker furthest on
    out = {
        "run_dir": str(run.path),
        "md_steps": md_steps_of(run.steps),
        "simulated_ps": md_steps_of({"step": time_fs, "walker": run.steps["walker"]}) / 1000 if time_fs.size else 0.0,
        "force_calls": int(run.steps["force_call"].max()) if "force_call" in run.steps and steps.size else 0,
        "reference_calls": len(run.interventions),
        "threshold_eV": run.threshold_eV,
        "unit": run.unit,
        "exceed_fraction": exceed,
        "force_exceed_fraction": force_exceed_fraction(run.interventions, run.force_threshold_eV_A),
        "rmse_at_interventions_eV": rmse,
        "rmse_at_interventions_unit": rmse / run.per_unit if rmse is not None else None,
        "mean_calibrated_std_eV": float(np.sqrt(np.mean(sigma**2))) if sigma.size else None,
        "calls_by_quarter": _calls_by_quarter(times, simulated_fs),
        "calibration": (
            {"shape": run.interventions[-1]["shape"], "rate": run.interventions[-1]["rate"],
             "scale": math.sqrt(run.interventions[-1]["rate"] / run.interventions[-1]["shape"])}
            if run.interventions else None
        ),
        "time_reference_s": float(sum(r["reference_s"] for r in run.interventions)),
        # the time the MD waited for updates (a background update overlaps the MD)
        "time_update_s": float(sum(r.get("waited_s", r["update_s"]) for r in run.updates or run.interventions)),
    }
    wall_s = run.summary.get("wall_s") if run.summary else None
    out.update(cost_figures(run.steps, run.interventions, run.updates, wall_s))
    if run.walkers:
        out["walkers"] = run.walkers
    if run.summary:
        out["wall_s"] = wall_s
        out["stopped"] = run.summary.get("stopped")
    return out


def _calls_by_quarter(times_fs: np.ndarray, total_fs: float) -> list[int]:
    """Reference calls in each quarter of the simulated time."""
    if total_fs <= 0:
        return [int(times_fs.size), 0, 0, 0]
    quarter = np.minimum((times_fs / total_fs * 4).astype(int), 3)
    return np.bincount(quarter, minlength=4).tolist()


# -- the figures ------------------------------------------------------------------------
def _walker_rows(run: RunLog):
    """(", walker i" or "", mask of its rows in ``run.steps``) for each walker."""
    walker = run.steps.get("walker", np.zeros(run.steps["time_fs"].size, dtype=int))
    for i in np.unique(walker):
        yield (f", walker {i}" if run.walkers else ""), walker == i


def plot_all(run: RunLog, out: Path) -> dict[str, Path]:
    """Write every figure of :data:`FIGURES` under ``out``; returns name → path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    u = run.per_unit
    unit = run.unit
    scored = run.scored()
    t_iv = np.array([r["time_fs"] for r in run.interventions]) / 1000
    t_sc = np.array([r["time_fs"] for r in scored]) / 1000
    err = np.array([r["error"] for r in scored]) / u
    sig = np.array([r["calibrated_std"] for r in scored]) / u
    # the error expected at each call (a label misfit carried as a bias; 0 otherwise)
    mu = np.array([r.get("error_mean", 0.0) for r in scored]) / u
    eps = run.threshold_eV / u
    paths = {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=130)
        plt.close(fig)

    t_end = float(run.steps["time_fs"][-1]) / 1000 if run.steps.get("time_fs", np.array([])).size else 0.0
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.step(np.concatenate([[0.0], t_iv, [max(t_end, *t_iv, 0.0)]]),
            np.concatenate([np.arange(t_iv.size + 1), [t_iv.size]]), where="post", label="reference calls")
    if run.updates:
        t_up = np.array([r["time_fs"] for r in run.updates]) / 1000
        ax.step(np.concatenate([[0.0], t_up, [max(t_end, *t_up)]]),
                np.concatenate([np.arange(t_up.size + 1), [t_up.size]]), where="post", label="posterior updates")
        ax.legend(fontsize=8)
    ax.set_xlabel("simulated time (ps)")
    ax.set_ylabel("count")
    ax.set_title(f"{t_iv.size} reference calls, {len(run.updates) or t_iv.size} updates")
    save(fig, "calls")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    level = 1 - run.confidence
    if "prob_exceed" in run.steps:
        t = run.steps["time_fs"] / 1000
        prob = run.steps["prob_exceed"]
        for name, rows in _walker_rows(run):
            ax.plot(t[rows], prob[rows], lw=0.8, label=f"P(|e| > ε){name}")
        called = run.steps.get("reference_called", np.zeros(t.size, bool)).astype(bool)
        ax.plot(t[called], prob[called], "r|", ms=8, label="reference call")
        uncontrolled = run.steps.get("uncontrolled", np.array([""] * t.size)) != ""
        if uncontrolled.any():
            ax.fill_between(t, 0, 1, where=uncontrolled, color="tab:red", alpha=0.2, step="mid",
                            transform=ax.get_xaxis_transform(), label="above the level, no call")
    ax.axhline(level, color="k", ls="--", lw=1, label=f"call level {100 * level:g} %")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(0, 1.05)
    n_out = int(np.sum(run.steps.get("uncontrolled", np.array([])) != ""))
    ax.set_title(f"{n_out} steps ran above the level without a call" if n_out else "every step within the promise")
    ax.set_xlabel("simulated time (ps)")
    ax.set_ylabel("P(|e| > ε)")
    ax.legend(fontsize=8)
    save(fig, "probability")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.axhspan(-eps, eps, color="tab:green", alpha=0.15, label=f"±ε = ±{eps:g} {unit}")
    if err.size:
        if np.any(mu != 0):
            ax.errorbar(t_sc, mu, yerr=sig, fmt="none", lw=0.8, capsize=0, alpha=0.5,
                        label="expected error ± calibrated σ")
            ax.plot(t_sc, err, "o", ms=3, label="error")
        else:
            ax.errorbar(t_sc, err, yerr=sig, fmt="o", ms=3, lw=0.8, capsize=0, label="error ± calibrated σ")
    exceed = float(np.mean(np.abs(err) > eps)) if err.size else math.nan
    ax.set_title(f"error at interventions: {100 * exceed:.1f} % above ε ({err.size} scored)" if err.size
                 else "no scored intervention yet")
    ax.set_xlabel("simulated time (ps)")
    ax.set_ylabel(f"E_ref − E_pred ({unit})")
    ax.legend(fontsize=8)
    save(fig, "errors")

    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    if err.size:
        ax.scatter(sig, np.abs(err - mu), s=10, alpha=0.6, label="|error − expected|" if np.any(mu) else "|error|")
        s_curve, e_curve = rmse_vs_sigma(sig, err - mu)
        ax.plot(s_curve, e_curve, color="tab:red", label="smoothed RMSE")
        top = max(float(np.max(sig)), float(np.max(np.abs(err - mu)))) * 1.05
        ax.plot([0, top], [0, top], "k:", lw=1, label="calibrated")
    ax.set_xlabel(f"calibrated σ ({unit})")
    ax.set_ylabel(f"|error|, RMSE ({unit})")
    ax.legend(fontsize=8)
    save(fig, "sigma_error")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if run.interventions:
        shape = np.array([r["shape"] for r in run.interventions])
        rate = np.array([r["rate"] for r in run.interventions])
        ax.plot(t_iv, shape, "o-", ms=3, label="a'")
        ax.plot(t_iv, rate, "s-", ms=3, label="b'")
        ax.set_yscale("log")
        twin = ax.twinx()
        twin.plot(t_iv, np.sqrt(rate / shape), "k--", label="√(b'/a')")
        twin.set_ylabel("scale on σ, √(b'/a')")
        twin.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("simulated time (ps)")
    ax.set_ylabel("Gamma posterior a', b'")
    ax.legend(fontsize=8, loc="upper left")
    save(fig, "calibration")

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6, 4.5), sharex=True)
    if "time_fs" in run.steps:
        t = run.steps["time_fs"] / 1000
        for name, rows in _walker_rows(run):
            ax1.plot(t[rows], run.steps["energy_eV"][rows] / u, lw=0.8)
            ax2.plot(t[rows], run.steps["temperature_K"][rows], lw=0.8, label=name.strip(", ") or None)
        called = run.steps.get("reference_called", np.zeros(t.size, bool)).astype(bool)
        ax1.plot(t[called], run.steps["energy_eV"][called] / u, "r|", ms=8, label="reference call")
        ax1.legend(fontsize=8)
        if run.walkers:
            ax2.legend(fontsize=7, ncol=2)
    ax1.set_ylabel(f"predicted E ({unit})")
    ax2.set_ylabel("temperature (K)")
    ax2.set_xlabel("simulated time (ps)")
    save(fig, "traces")
    return paths


# -- the page ---------------------------------------------------------------------------
def write_report(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """Write the PNGs, ``report.html`` and ``report.json`` into ``out`` (default
    RUN_DIR/report); returns the summary."""
    run = read_run(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "report"
    summary = summarize_run(run)
    paths = plot_all(run, out)
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    (out / "report.html").write_text(_html(summary, paths))
    return summary


def _html(summary: dict, paths: dict[str, Path]) -> str:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{fmt(v)}</td></tr>" for k, v in summary.items())
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{name}</figcaption></figure>"
        for name, p in paths.items()
    )
    title = f"flytune report: {html.escape(summary['run_dir'])}"
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "figure{display:inline-block;margin:8px}img{max-width:520px}</style></head><body>"
        f"<h1>{title}</h1><table>{rows}</table>{images}</body></html>"
    )
