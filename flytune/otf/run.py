"""Driving an on-the-fly run from a :class:`RunConfig`: fresh start or resume.

Everything that can be wrong with the input is checked before expensive work. The MD
is advanced one step at a time; after a step with a reference call, and every
``checkpoint_every`` steps, a checkpoint is written atomically. A resumed run restores
the ensemble, calibrator, counters, MD state (positions, momenta, cell, thermostat
state and RNG) and the calculator's cached results, cuts the logs back to the
checkpoint and reuses the labels written after it when the MD reaches them again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable

import numpy as np
from ase import Atoms, units
from ase.md.md import MolecularDynamics
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

from flytune.bayes.calibration import Calibrator
from flytune.bayes.chain import Progress
from flytune.bayes.ensemble import Ensemble, saved_calibrator
from flytune.config import MDConfig, RunConfig
from flytune.data import read_structures
from flytune.errors import FlytuneError
from flytune.otf.calculator import Intervention, ModelFailure, OnTheFlyCalculator, PendingLabel, UpdateInterrupted
from flytune.otf.execution import ParslReference, build_reference
from flytune.otf.reference import ReferenceFailure
from flytune.otf.rundir import RunDirectory, cost_figures, intervention_figures
from flytune.units import KCAL_MOL

Log = Callable[[str], None]


# -- MD ------------------------------------------------------------------------------
def make_dynamics(md: MDConfig, atoms: Atoms, seed: int) -> MolecularDynamics:
    """The ASE integrator of ``md.driver`` at the schedule's first temperature."""
    dt, temperature = md.timestep_fs * units.fs, md.temperature_at(0)
    if md.driver == "langevin":
        from ase.md.langevin import Langevin

        from ase.constraints import FixCom

        atoms.set_constraint(FixCom())  # ASE's recommended way to keep the centre of mass fixed
        return Langevin(atoms, dt, temperature_K=temperature, friction=md.friction_per_fs / units.fs,
                        fixcm=False, rng=np.random.default_rng(seed + 1))
    if md.driver == "verlet":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, dt)
    if md.driver == "nose-hoover":
        from ase.md.nose_hoover_chain import NoseHooverChainNVT

        return NoseHooverChainNVT(atoms, dt, temperature_K=temperature, tdamp=md.tdamp_fs * units.fs)
    try:
        from ase.md.melchionna import MelchionnaNPT as NPT
    except ImportError:  # ASE < 3.26
        from ase.md.npt import NPT

    if not atoms.pbc.all():
        raise FlytuneError("driver 'npt' needs a periodic structure; use langevin or nose-hoover for molecules")
    pfactor = md.pfactor or (75 * units.fs) ** 2 * 100 * units.GPa
    return NPT(atoms, dt, temperature_K=temperature, externalstress=md.pressure_bar * units.bar,
               ttime=md.tdamp_fs * units.fs, pfactor=pfactor)


def set_temperature(dyn: MolecularDynamics, temperature_K: float) -> None:
    if hasattr(dyn, "set_temperature"):
        dyn.set_temperature(temperature_K=temperature_K)
    elif hasattr(dyn, "_thermostat"):  # Nosé–Hoover chain
        dyn._thermostat._kT = units.kB * temperature_K


_SKIP = {"atoms", "observers", "comm", "trajectory", "logfile", "masses", "max_steps"}


def dynamics_state(dyn: MolecularDynamics) -> dict:
    """Float arrays and numbers of the integrator (and its thermostat/barostat), step and RNG."""
    state: dict = {"nsteps": int(dyn.nsteps), "values": {}}
    for prefix, obj in (("", dyn), ("_thermostat.", getattr(dyn, "_thermostat", None)),
                        ("_barostat.", getattr(dyn, "_barostat", None))):
        if obj is None:
            continue
        for key, value in vars(obj).items():
            if key in _SKIP:
                continue
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                state["values"][prefix + key] = value.tolist()
            elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                state["values"][prefix + key] = value.item() if hasattr(value, "item") else value
    rng = getattr(dyn, "rng", None)
    if isinstance(rng, np.random.Generator):
        state["rng"] = rng.bit_generator.state
    return state


def restore_dynamics(dyn: MolecularDynamics, state: dict) -> None:
    dyn.nsteps = state["nsteps"]
    for key, value in state["values"].items():
        obj, name = dyn, key
        if "." in key:
            holder, name = key.split(".", 1)
            obj = getattr(dyn, holder)
        setattr(obj, name, np.asarray(value) if isinstance(value, list) else value)
    if "rng" in state:
        dyn.rng.bit_generator.state = state["rng"]


# -- checks --------------------------------------------------------------------------
def read_start_structure(path: str) -> Atoms:
    """The last frame of ``path`` (any ASE-readable file)."""
    frames = read_structures(path, index=":")
    atoms = frames[-1]
    if len(atoms) == 0:
        raise FlytuneError(f"structure file {path!r} holds no atoms")
    atoms = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc,
                  momenta=atoms.get_momenta() if atoms.has("momenta") else None)
    return atoms


def summarize(rd: RunDirectory, calc: OnTheFlyCalculator, md_steps: int, md: MDConfig, wall_s: float,
              stopped: str | None) -> dict:
    """Figures of the run from its files (so a resumed run reports the whole run), scored
    against the threshold ε in force now."""
    threshold = calc.decision.threshold_eV
    interventions = rd.read_interventions()
    exceed, rmse = intervention_figures(interventions, threshold)
    st = calc.state
    cal = calc.decision.calibrator
    return {
        "steps": md_steps,
        "simulated_ps": md_steps * md.timestep_fs / 1000,
        "force_calls": st.force_calls,
        "reference_calls": st.reference_calls,
        "exceed_fraction": exceed,
        "rmse_at_interventions_eV": rmse,
        "rmse_at_interventions_kcal": rmse / KCAL_MOL if rmse is not None else None,
        "threshold_eV": threshold,
        "confidence": calc.decision.confidence,
        "calibration": {"shape": cal.posterior_shape, "rate": cal.posterior_rate, "n": cal.n},
        "time_md_s": max(wall_s - st.time_reference_s - st.time_update_s, 0.0),
        "time_reference_s": st.time_reference_s,
        "time_update_s": st.time_update_s,
        "time_predict_s": st.time_predict_s,
        "wall_s": wall_s,
        "skipped_reference_failures": st.skipped_failures,
        "labels_pending": len(calc.schedule.pending),
        **cost_figures(rd.read_steps(), interventions, rd.read_updates(), wall_s),
        "stopped": stopped,
    }


def uncontrolled_line(summary: dict) -> str | None:
    """"337 of 400 steps ran with P(|e|>ε) > 5 % and no call: call cap (337)", or None."""
    n = summary.get("steps_uncontrolled") or 0
    if not n:
        return None
    causes = ", ".join(f"{cause} ({count})" for cause, count in summary["uncontrolled_by_cause"].items())
    return (f"{n} of {summary['force_calls']} steps ran with P(|e|>ε) > {100 * (1 - summary['confidence']):.0f} % "
            f"and no call: {causes}")


class OnTheFlyRun:
    """One run directory being advanced: build or resume, then :meth:`advance`."""

    def __init__(self, config: RunConfig, log: Log = print):
        self.config = config
        self.log = log
        self.rd = RunDirectory(config.run_dir)
        # cheap checks first: structure, reference, resumability
        self.structure = read_start_structure(config.structure)
        self.reference = build_reference(config.reference, config.execution, config.run_dir)
        saved = json.loads(self.rd.config.read_text()) if self.rd.config.exists() else None
        if saved is not None and (self.rd.resumable or self.rd.read_exact_labels()):
            changed = {k: (saved["identity"][k], v) for k, v in config.identity().items() if saved["identity"].get(k) != v}
            if changed:
                what = ", ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in changed.items())
                raise FlytuneError(f"run directory {config.run_dir!r} was made by a different config ({what}) "
                                   "and cannot be resumed; use a new run_dir")
        self._in_step = False

    def describe(self) -> list[str]:
        """What the run would do, from the checks made so far (``flytune run --check``)."""
        c, atoms = self.config, self.structure
        m = c.model
        if isinstance(self.reference, ParslReference):
            reference = self.reference.describe()
        else:
            reference = f"reference {c.reference.name!r} in this process"
        state = "resumes from its checkpoint" if self.rd.resumable else "new"
        return [
            f"structure: {atoms.get_chemical_formula()}, {len(atoms)} atoms{', periodic' if atoms.pbc.any() else ''} "
            f"({c.structure})",
            f"model: {m.backbone} (loaded only by the run), {m.chains} chains × {m.cycle_steps} SGHMC steps per update, "
            f"{m.workers} worker(s), device {m.device}",
            reference,
            f"decision: ε = {c.uncertainty.threshold:g} {c.uncertainty.threshold_unit}, call when P(|e| > ε) > "
            f"{100 * (1 - c.uncertainty.confidence):g} %; updates: {c.updates.policy}",
            f"MD: {c.md.driver}, {c.md.total_steps} steps of {c.md.timestep_fs:g} fs",
            f"run directory: {c.run_dir} ({state})",
        ]

    # -- building -------------------------------------------------------------------
    def open(self) -> None:
        self.rd.lock()
        try:
            self._build()
            if isinstance(self.reference, ParslReference):
                self.log(f"starting the {self.reference.describe()}")
                self.reference.start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        ensemble = getattr(self, "ensemble", None)
        if ensemble is not None:
            ensemble.close()
        if isinstance(self.reference, ParslReference):
            self.reference.close()
        self.rd.unlock()

    def _build(self) -> None:
        c = self.config
        self.frames = 0
        self.wall_before = 0.0
        if self.rd.resumable:
            ck = self.rd.read_checkpoint()
            saved_device = ck["ensemble"]["config"]["device"]
            if saved_device != c.model.device:
                self.log(f"model.device changed from {saved_device} to {c.model.device}: takes effect now")
            self.ensemble = Ensemble.from_state_dict(ck["ensemble"], workers=c.model.workers, device=c.model.device)
            calibrator = saved_calibrator(ck["ensemble"])
            self._apply_changed_settings(calibrator)
            atoms = self.structure.copy()
            md = ck["md"]
            self.dyn = make_dynamics(c.md, atoms, c.seed)  # before the state: some drivers touch it
            atoms.positions, atoms.cell = np.asarray(md["positions"]), np.asarray(md["cell"])
            atoms.set_momenta(np.asarray(md["momenta"]), apply_constraint=False)
            restore_dynamics(self.dyn, md["dynamics"])
            self.atoms = atoms
            self.calc = self._calculator(calibrator)
            self.calc.load_state_dict(ck["calculator"], atoms)
            self.frames = ck["counts"]["frames"]
            self.wall_before = ck["wall_s"]
            pending = self._replay_labels_after(ck["counts"])
            self.log(f"resuming {c.run_dir} at step {self.dyn.nsteps} ({self.calc.state.reference_calls} "
                     f"reference calls, {pending} label(s) to replay)")
        else:
            self.ensemble = Ensemble.from_config(c.model, c.uncertainty, seed=c.seed)
            self.ensemble.model.backbone.check_atoms(self.structure)
            atoms = self.structure.copy()
            if c.md.initial_velocities and not atoms.has("momenta"):
                MaxwellBoltzmannDistribution(atoms, temperature_K=c.md.temperature_at(0),
                                             rng=np.random.default_rng(c.seed))
                Stationary(atoms)
                if not atoms.pbc.any():
                    ZeroRotation(atoms)
            self.atoms = atoms
            self.calc = self._calculator(None)
            self.dyn = make_dynamics(c.md, atoms, c.seed)
            # labels of a start stopped before its first checkpoint (during the first update)
            pending = self._replay_labels_after({"labels": 0, "steps": 0, "interventions": 0, "frames": 0})
            if pending:
                self.log(f"restarting {c.run_dir} from its start, {pending} label(s) to replay")
        off = [f"uncertainty.{k} = {v}" for k, v in (("label_misfit", "false"), ("calibration_checks", 0))
               if not getattr(c.uncertainty, k)]
        if off:
            self.log(f"{' and '.join(off)}: the decision trusts the members' spread further than the defaults "
                     "(the published rule has both off); chains too short to spread can then stop calling "
                     "while the errors exceed ε (docs/method.md §6)")
        # the settings in force (a resume may change thresholds): what `flytune report` reads
        self.rd.write_json(self.rd.config, {"identity": c.identity(), "config": c.model_dump(mode="json")})
        self.atoms.calc = self.calc

    def _replay_labels_after(self, counts: dict) -> int:
        """Cut the logs back to ``counts`` and queue the labels written after them for replay
        (no reference call when the MD reaches the same structure); returns how many."""
        pending = self.rd.truncate(counts)
        self.calc.pending = [PendingLabel(int(a.info["force_call"]), a) for a in pending]
        return len(pending)

    def _apply_changed_settings(self, calibrator: Calibrator) -> None:
        """Threshold (with σ_E = fraction·ε), confidence and calibration prior of the config
        take effect on resume."""
        ens = self.ensemble
        old = ens.uncertainty
        ens.set_uncertainty(self.config.uncertainty)
        new = ens.uncertainty
        for key in ("threshold", "threshold_unit", "confidence", "calibration_shape", "calibration_rate"):
            if getattr(old, key) != getattr(new, key):
                self.log(f"{key} changed from {getattr(old, key)} to {getattr(new, key)}: takes effect now")
        calibrator.shape, calibrator.rate = new.calibration_shape, new.calibration_rate

    def _calculator(self, calibrator: Calibrator | None) -> OnTheFlyCalculator:
        c = self.config
        return OnTheFlyCalculator(self.ensemble, self.reference, safety=c.safety, updates=c.updates,
                                  calibrator=calibrator, on_failure=c.reference.on_failure, on_step=self._on_step,
                                  on_intervention=self._on_intervention, on_label=self._on_label,
                                  on_update=self._on_update)

    # -- records ----------------------------------------------------------------------
    def _md_step(self) -> int:
        # a force call during dyn.step() belongs to the step being made
        return self.dyn.nsteps + (1 if self._in_step else 0)

    def _on_label(self, atoms: Atoms, meta: dict) -> None:
        atoms.info.update(step=self._md_step(), time_fs=self._md_step() * self.config.md.timestep_fs)
        self.rd.append_label(atoms)

    def _on_intervention(self, atoms: Atoms, iv: Intervention) -> None:
        record = dataclasses.asdict(iv)
        record.update(step=self._md_step(), time_fs=self._md_step() * self.config.md.timestep_fs)
        self.rd.append_intervention(record)

    def _on_update(self, record: dict) -> None:
        record.update(step=self._md_step(), time_fs=self._md_step() * self.config.md.timestep_fs)
        self.rd.append_update(record)

    def _on_step(self, row: dict) -> None:
        row.update(step=self._md_step(), time_fs=self._md_step() * self.config.md.timestep_fs,
                   temperature_K=self.atoms.get_temperature())
        self.rd.append_step(row)

    def checkpoint(self) -> None:
        st = self.calc.state
        self.rd.write_checkpoint({
            "format": "flytune.run/1",
            "ensemble": self.ensemble.state_dict(self.calc.decision.calibrator),
            "calculator": self.calc.state_dict(),
            "md": {"positions": self.atoms.positions.tolist(), "momenta": self.atoms.get_momenta().tolist(),
                   "cell": np.asarray(self.atoms.cell).tolist(), "dynamics": dynamics_state(self.dyn)},
            "counts": {"labels": len(self.ensemble.data) + len(self.calc.schedule.pending), "steps": st.force_calls,
                       "interventions": st.reference_calls, "updates": st.updates, "frames": self.frames},
            "wall_s": self.wall_before + time.perf_counter() - self._start,
        })

    # -- the loop ---------------------------------------------------------------------
    def advance(self, stop=None, on_progress: Callable[[OnTheFlyRun], None] | None = None,
                on_update_progress: Progress | None = None) -> dict:
        """Run the MD to the end of the schedule (or a stop); returns the summary.

        ``on_progress(run)`` after every MD step; ``on_update_progress(chain, step,
        mean_ll)`` during posterior updates; a set ``stop`` ends the run at the next step
        (during an update: at once, see :class:`UpdateInterrupted`)."""
        c = self.config
        self._start = time.perf_counter()
        self.calc.stop = stop
        self.calc.on_update_progress = on_update_progress
        total = c.md.total_steps
        stopped = None
        failed = cut = False
        try:
            if self.dyn.nsteps == 0 and self.frames == 0:
                self.atoms.get_forces()  # the first structure: always labelled
                if getattr(self.dyn, "initialized", True) == 0:
                    self.dyn.initialize()  # Melchionna NPT is not self-starting
                self._record_frame()
                self.checkpoint()
            while self.dyn.nsteps < total:
                if stop is not None and stop.is_set():
                    stopped = "interrupted"
                    break
                set_temperature(self.dyn, c.md.temperature_at(self.dyn.nsteps))
                calls = self.calc.state.reference_calls
                self._in_step = True
                self.dyn.step()
                self._in_step = False
                self.dyn.nsteps += 1
                if self.dyn.nsteps % c.md.trajectory_every == 0:
                    self._record_frame()
                if self.calc.state.reference_calls != calls or self.dyn.nsteps % c.checkpoint_every == 0:
                    self.checkpoint()
                stopped = self._runaway()
                if on_progress is not None:
                    on_progress(self)
                if stopped:
                    break
            if self.dyn.nsteps >= total and (self.calc.schedule.pending or self.ensemble.learning):
                self.calc.learn_pending("end of run")  # model.pt learns every label
        except (ReferenceFailure, ModelFailure) as exc:
            kind = "reference failure" if isinstance(exc, ReferenceFailure) else "model failure"
            stopped = f"{kind} at MD step {self._md_step()}: {exc}"
            self._in_step = False
            failed = True
        except UpdateInterrupted:  # the checkpoint stays from before the cut update
            stopped = (f"interrupted during the update at MD step {self._md_step()}; its label is kept "
                       "and the same command redoes that update in full")
            self._in_step = False
            cut = True
        else:
            self.checkpoint()
        wall = self.wall_before + time.perf_counter() - self._start
        summary = summarize(self.rd, self.calc, self.dyn.nsteps, c.md, wall, stopped)
        self.rd.write_json(self.rd.summary, summary)
        if failed:  # the last checkpoint (before the failed step) stays as it is
            raise FlytuneError(f"{stopped}; the checkpoint is intact: fix the cause and run the same command to resume")
        model = self.rd.path / "model.pt"
        if not cut:
            self.ensemble.save(model, self.calc.decision.calibrator)
        elif self.rd.resumable:  # model.pt: the ensemble of the last checkpoint, never a cut update
            Ensemble.save_state(self.rd.read_checkpoint()["ensemble"], model)
        else:
            model.unlink(missing_ok=True)
        return summary

    def _record_frame(self) -> None:
        frame = self.atoms.copy()
        frame.calc = None
        frame.info["step"] = self.dyn.nsteps
        self.rd.append_frame(frame)
        self.frames += 1

    def _runaway(self) -> str | None:
        s = self.config.safety
        temperature = self.atoms.get_temperature()
        if s.max_temperature_K is not None and temperature > s.max_temperature_K:
            return f"temperature {temperature:.0f} K above max_temperature_K = {s.max_temperature_K:.0f}"
        fmax = float(np.abs(self.calc.results["forces"]).max())
        if s.max_force_eV_A is not None and fmax > s.max_force_eV_A:
            return f"a force of {fmax:.1f} eV/Å above max_force_eV_A = {s.max_force_eV_A}"
        return None


def run(config: RunConfig, log: Log = print, stop=None, on_progress=None, on_update_progress=None) -> dict:
    """Start or resume ``config``'s run and advance it to the end (see :meth:`OnTheFlyRun.advance`)."""
    otf = OnTheFlyRun(config, log)
    otf.open()
    try:
        return otf.advance(stop, on_progress, on_update_progress)
    finally:
        otf.close()

