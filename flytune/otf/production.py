r"""Production MD with the fine-tuned ensemble alone (``flytune md CONFIG``).

The MD is driven by the ensemble mean (one batched, one-pass evaluation of all members
per step, :meth:`~flytune.bayes.ensemble.Ensemble.predict`). At every step the run's own
calibration (the Gamma posterior a', b' saved in ``model.pt``) turns the members' σ
into the predictive error, and

    P(|e| > ε) = 2·(1 − T_{2a'}(ε / (σ·sqrt(b'/a'))))

is logged with σ. The σ here is the ensemble's (spread and σ_E): the label misfit of the
on-the-fly loop is a first-order expansion around the newest label and means nothing far
from it. A trajectory that has P above the call level 1 − confidence for
``untrusted_steps`` consecutive steps has left the region the model was taught: the run
warns, writes that frame to ``untrusted.extxyz`` (a start for on-the-fly learning from
there) and, with ``on_untrusted = "stop"``, ends.

With ``spot_check_every = N`` the config's ``[reference]`` labels every N-th step (in this
process): the true error e = E_ref + Δ − Ê goes to ``spot_checks.jsonl`` beside σ and P,
and the summary says how often |e| > ε there, a check of the calibration on the
production trajectory itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.io import write
from ase.stress import full_3x3_to_voigt_6_stress

from flytune.bayes.ensemble import Ensemble, saved_calibrator
from flytune.config import RunConfig
from flytune.errors import FlytuneError
from flytune.otf.calculator import check_stress_defined
from flytune.otf.decision import Decision
from flytune.otf.reference import make_reference
from flytune.otf.run import make_dynamics, read_start_structure, set_temperature
from flytune.otf.rundir import RunDirectory


class EnsembleCalculator(Calculator):
    """The fine-tuned ensemble as an ASE calculator: its mean energy, forces and stress,
    with ``energy_std`` (σ, eV) and ``prob_exceed`` (calibrated P(|e| > ε)) in ``results``."""

    def __init__(self, ensemble: Ensemble, decision: Decision, **kwargs):
        super().__init__(**kwargs)
        self.ensemble = ensemble
        self.decision = decision
        self.predict_s = 0.0  # of the last force call

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def get_property(self, name, atoms=None, allow_calculation=True):
        check_stress_defined(name, atoms if atoms is not None else self.atoms)
        return super().get_property(name, atoms, allow_calculation)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        start = time.perf_counter()
        pred = self.ensemble.predict(self.atoms)
        self.predict_s = time.perf_counter() - start
        sigma = float(pred.energy_std[0])
        self.results = {"energy": float(pred.energy[0]), "free_energy": float(pred.energy[0]), "forces": pred.forces,
                        "energy_std": sigma, "prob_exceed": self.decision.prob_exceed(sigma)}
        if pred.stress is not None and self.atoms.pbc.all():
            self.results["stress"] = full_3x3_to_voigt_6_stress(pred.stress[0])


def production_md(config: RunConfig, steps: int | None = None, stop=None, log: Callable[[str], None] = print,
                  on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run ``config``'s MD (its structure and ``[md]``, ``steps`` if given) on the
    fine-tuned ensemble of ``[production] model`` (default ``RUN_DIR/model.pt``); files in
    ``[production] out`` (default ``RUN_DIR/md``): ``steps.csv``, ``trajectory.traj``,
    ``summary.json`` and, if the trajectory left the trusted region, ``untrusted.extxyz``.
    Returns the summary."""
    p = config.production
    model = Path(p.model or Path(config.run_dir) / "model.pt")
    if not model.is_file():
        raise FlytuneError(f"no fine-tuned model at {str(model)!r}: run `flytune run` first, or set "
                           "[production] model to a model.pt")
    out = RunDirectory(p.out or Path(config.run_dir) / "md")
    if out.steps.exists():
        raise FlytuneError(f"{str(out.path)!r} holds an earlier MD; set [production] out to a new folder")
    state = Ensemble.read_state(model)
    md = config.md
    total = steps or md.total_steps
    atoms = read_start_structure(config.structure)
    with Ensemble.from_state_dict(state, workers=1, device=config.model.device) as ensemble:
        ensemble.model.backbone.check_atoms(atoms)
        u = config.uncertainty  # ε and the level of the config; the calibration of the run
        decision = Decision(saved_calibrator(state), u.threshold_eV, u.confidence)
        calc = EnsembleCalculator(ensemble, decision)
        if md.initial_velocities and not atoms.has("momenta"):
            from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

            MaxwellBoltzmannDistribution(atoms, temperature_K=md.temperature_at(0), rng=np.random.default_rng(config.seed))
            Stationary(atoms)
            if not atoms.pbc.any():
                ZeroRotation(atoms)
        atoms.calc = calc
        dyn = make_dynamics(md, atoms, config.seed)
        reference = None
        if config.production.spot_check_every is not None:
            reference = make_reference(config.reference.name, config.reference.options, config.reference.retries)
        out.lock()
        # what `flytune report` reads: the settings in force (one trajectory at the top)
        out.write_json(out.config, {"identity": config.identity(),
                                    "config": config.model_copy(update={"walkers": []}).model_dump(mode="json")})
        try:
            return _advance(config, dyn, atoms, calc, out, total, stop, log, on_step, reference)
        finally:
            out.unlock()


def _advance(config, dyn, atoms, calc, out: RunDirectory, total: int, stop, log, on_step, reference) -> dict:
    p, md = config.production, config.md
    level = 1 - calc.decision.confidence
    run_of, longest, untrusted, left_at, stopped = 0, 0, 0, None, None
    errors: list[float] = []
    start = time.perf_counter()

    def spot_check(step: int, r: dict) -> None:
        result = reference.compute(atoms)
        error = result.energy + calc.ensemble.data.energy_offset - r["energy"]
        errors.append(error)
        record = {"step": step, "energy_pred_eV": r["energy"], "energy_ref_eV": result.energy, "error_eV": error,
                  "energy_std_eV": r["energy_std"], "prob_exceed": r["prob_exceed"], "reference_s": result.wall_s}
        with open(out.path / "spot_checks.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def record(step: int) -> None:
        nonlocal run_of, longest, untrusted, left_at
        r = calc.results
        above = r["prob_exceed"] > level
        untrusted += above
        run_of = run_of + 1 if above else 0
        longest = max(longest, run_of)
        out.append_step({"step": step, "force_call": step + 1, "time_fs": step * md.timestep_fs, "energy_eV": r["energy"],
                         "energy_std_eV": r["energy_std"], "prob_exceed": r["prob_exceed"], "reference_called": False,
                         "temperature_K": atoms.get_temperature(), "uncontrolled": "", "predict_s": calc.predict_s})
        if reference is not None and step % p.spot_check_every == 0:
            spot_check(step, r)
        if step % md.trajectory_every == 0:
            frame = atoms.copy()
            frame.calc = None
            frame.info["step"] = step
            out.append_frame(frame)
        if run_of == p.untrusted_steps and left_at is None:
            left_at = step
            frame = atoms.copy()
            frame.calc = None
            frame.info.update(step=step, prob_exceed=r["prob_exceed"], energy_std=r["energy_std"])
            write(out.path / "untrusted.extxyz", frame)
            log(f"warning: P(|e| > ε) above {100 * level:g} % for {p.untrusted_steps} steps in a row at step {step}: "
                f"the trajectory has left the region the model was taught; the frame is in "
                f"{out.path / 'untrusted.extxyz'} (start on-the-fly learning from it)")
        if on_step is not None:
            on_step(step, r)

    atoms.get_forces()
    record(0)
    while dyn.nsteps < total:
        if stop is not None and stop.is_set():
            stopped = "interrupted"
            break
        set_temperature(dyn, md.temperature_at(dyn.nsteps))
        dyn.step()
        dyn.nsteps += 1
        record(dyn.nsteps)
        if left_at is not None and p.on_untrusted == "stop":
            stopped = f"left the trusted region at step {left_at}"
            break
    summary = {"model": str(Path(config.production.model or Path(config.run_dir) / "model.pt")), "steps": dyn.nsteps,
               "simulated_ps": dyn.nsteps * md.timestep_fs / 1000, "threshold_eV": calc.decision.threshold_eV,
               "confidence": calc.decision.confidence, "steps_above_level": int(untrusted),
               "longest_run_above_level": longest, "left_trusted_region_at_step": left_at,
               "wall_s": time.perf_counter() - start, "stopped": stopped}
    if reference is not None:
        e = np.abs(np.array(errors))
        summary.update(spot_checks=int(e.size), spot_check_exceed_fraction=float(np.mean(e > calc.decision.threshold_eV)),
                       spot_check_rmse_eV=float(np.sqrt(np.mean(e**2))))
    out.write_json(out.summary, summary)
    return summary
