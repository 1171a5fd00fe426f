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
from flytune.data import read_structures, same_composition
from flytune.errors import FlytuneError
from flytune.otf.calculator import Intervention, ModelFailure, OnTheFlyCalculator, PendingLabel, UpdateInterrupted
from flytune.otf.execution import ParslReference, build_reference
from flytune.otf.reference import ReferenceFailure
from flytune.otf.rundir import (RunDirectory, cost_figures, force_exceed_fraction, intervention_figures,
                               walker_figures)
from flytune.otf.walkers import Walker, WalkerCalculator, run_together
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
    to_triangular_cell(atoms)
    pfactor = md.pfactor or (75 * units.fs) ** 2 * 100 * units.GPa
    return NPT(atoms, dt, temperature_K=temperature, externalstress=md.pressure_bar * units.bar,
               ttime=md.tdamp_fs * units.fs, pfactor=pfactor)


def to_triangular_cell(atoms: Atoms) -> None:
    """Rotate a cell that is not triangular (ASE's NPT needs one; a cell relaxed by a cell
    filter carries ~1e-7 Å off the diagonal) into its lower-triangular standard form, with
    the positions and momenta: r' = r·Qᵀ, p' = p·Qᵀ, cell' = cell·Qᵀ (Q orthogonal, so
    energies, forces' magnitudes and the dynamics are unchanged; the structure is only
    turned in space)."""
    cell = atoms.cell.array
    if cell[1, 0] == cell[2, 0] == cell[2, 1] == 0.0 or cell[0, 1] == cell[0, 2] == cell[1, 2] == 0.0:
        return
    rcell, q = atoms.cell.standard_form()
    momenta = atoms.get_momenta()
    atoms.set_cell(rcell, scale_atoms=True)
    atoms.set_momenta(momenta @ q.T)


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


def summarize(rd: RunDirectory, calc: OnTheFlyCalculator, md_steps: int, simulated_ps: float | None, wall_s: float,
              stopped: str | None) -> dict:
    """Figures of the run from its files (so a resumed run reports the whole run), scored
    against the threshold ε in force now; with several walkers, also per walker."""
    threshold = calc.decision.threshold_eV
    interventions = rd.read_interventions()
    exceed, rmse = intervention_figures(interventions, threshold)
    st = calc.state
    cal = calc.decision.calibrator
    summary = {
        "steps": md_steps,
        "simulated_ps": simulated_ps,
        "force_calls": st.force_calls,
        "reference_calls": st.reference_calls,
        "exceed_fraction": exceed,
        "rmse_at_interventions_eV": rmse,
        "rmse_at_interventions_kcal": rmse / KCAL_MOL if rmse is not None else None,
        "threshold_eV": threshold,
        "confidence": calc.decision.confidence,
        "calibration": {"shape": cal.posterior_shape, "rate": cal.posterior_rate, "n": cal.n},
        "criterion": calc.decision.criterion,
        "trigger": calc.decision.trigger,
        "force_threshold_eV_A": calc.decision.force_threshold_eV_A,
        "force_exceed_fraction": force_exceed_fraction(interventions, calc.decision.force_threshold_eV_A),
        "force_calibration": None if (fc := calc.decision.force_calibrator) is None else fc.summary(),
        "time_md_s": max(wall_s - st.time_reference_wall_s - st.time_update_s, 0.0),
        "time_reference_s": st.time_reference_s,
        "time_reference_wall_s": st.time_reference_wall_s,
        "time_update_s": st.time_update_s,
        "time_predict_s": st.time_predict_s,
        "wall_s": wall_s,
        "skipped_reference_failures": st.skipped_failures,
        "labels_pending": len(calc.schedule.pending),
        **cost_figures(rd.read_steps(None), interventions, rd.read_updates(), wall_s),
        "stopped": stopped,
    }
    if rd.walkers:
        summary["walkers"] = walker_figures(rd, interventions, threshold)
    return summary


def replay_labels_after(rd: RunDirectory, calc: OnTheFlyCalculator, counts: dict) -> int:
    """Cut the logs of ``rd`` back to ``counts`` and queue the labels written after them for
    replay by ``calc`` (no reference call when the MD reaches the same structure, else
    learned as they are); returns how many."""
    pending = rd.truncate(counts)
    calc.pending = sorted((PendingLabel(int(a.info["force_call"]), a) for a in pending),
                          key=lambda p: p.force_call)  # walkers' labels are written as they return
    return len(pending)


def apply_changed_settings(ensemble: Ensemble, calibrator: Calibrator, uncertainty, log: Log) -> None:
    """Threshold (with σ_E = fraction·ε), confidence and calibration prior of a resumed
    run's settings take effect, each change logged."""
    old = ensemble.uncertainty
    ensemble.set_uncertainty(uncertainty)
    new = ensemble.uncertainty
    for key in ("threshold", "threshold_unit", "confidence", "calibration_shape", "calibration_rate",
                "calibration_discount"):
        if getattr(old, key) != getattr(new, key):
            log(f"{key} changed from {getattr(old, key)} to {getattr(new, key)}: takes effect now")
    calibrator.shape, calibrator.rate = new.calibration_shape, new.calibration_rate
    calibrator.discount = new.calibration_discount


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
        self.rd = RunDirectory(config.run_dir, len(config.walkers))
        # cheap checks first: structures, reference, resumability
        self.structures = [read_start_structure(config.walker_structure(i)) for i in range(config.walker_count)]
        self.structure = self.structures[0]
        if not same_composition(self.structures):
            formulas = ", ".join(f"walker {i}: {a.get_chemical_formula()}" for i, a in enumerate(self.structures))
            raise FlytuneError(
                f"the walkers' structures differ in composition ({formulas}); one run fits one energy offset, "
                "which holds for one composition only: give every walker the same atoms, or run each "
                "composition in its own run directory")
        self.reference = build_reference(config.reference, config.execution, config.run_dir)
        saved = json.loads(self.rd.config.read_text()) if self.rd.config.exists() else None
        if saved is not None and (self.rd.resumable or self.rd.read_exact_labels()):
            changed = {k: (saved["identity"][k], v) for k, v in config.identity().items()
                       if k in saved["identity"] and saved["identity"][k] != v}  # a key added later: not checked
            if changed:
                what = ", ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in changed.items())
                raise FlytuneError(f"run directory {config.run_dir!r} was made by a different config ({what}) "
                                   "and cannot be resumed; use a new run_dir")
        self.walkers: list[Walker] = []

    @property
    def dyn(self) -> MolecularDynamics:
        """The integrator of walker 0 (the run's only one without ``[[walkers]]``)."""
        return self.walkers[0].dyn

    @property
    def atoms(self) -> Atoms:
        return self.walkers[0].atoms

    def describe(self) -> list[str]:
        """What the run would do, from the checks made so far (``flytune run --check``)."""
        c, atoms = self.config, self.structure
        m = c.model
        if isinstance(self.reference, ParslReference):
            reference = self.reference.describe()
        else:
            reference = f"reference {c.reference.name!r} in this process"
        state = "resumes from its checkpoint" if self.rd.resumable else "new"
        lines = [
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
        for i in range(len(c.walkers)):
            md = c.walker_md(i)
            temperatures = sorted({md.temperature_at(0), md.temperature_at(md.total_steps - 1)})
            lines.append(f"walker {i}: {c.walker_structure(i)}, {md.driver}, {md.total_steps} steps at "
                         f"{'–'.join(f'{t:g}' for t in temperatures)} K, seed {c.walker_seed(i)}")
        return lines

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

    def _walker(self, i: int) -> Walker:
        """Walker ``i`` at its start: structure, velocities, integrator (seeded)."""
        c = self.config
        md, seed = c.walker_md(i), c.walker_seed(i)
        atoms = self.structures[i].copy()
        return Walker(i, md, seed, atoms, make_dynamics(md, atoms, seed), WalkerCalculator(self.calc, i))

    def _build(self) -> None:
        c = self.config
        self.wall_before = 0.0
        if self.rd.resumable:
            ck = self.rd.read_checkpoint()
            saved_device = ck["ensemble"]["config"]["device"]
            if saved_device != c.model.device:
                self.log(f"model.device changed from {saved_device} to {c.model.device}: takes effect now")
            self.ensemble = Ensemble.from_state_dict(ck["ensemble"], workers=c.model.workers, device=c.model.device)
            calibrator = saved_calibrator(ck["ensemble"])
            self._apply_changed_settings(calibrator)
            self.calc = self._calculator(calibrator)
            self.calc.load_state_dict(ck["calculator"])
            saved = ck.get("walkers") or [dict(ck["md"], cache=ck["calculator"].get("cache"),
                                               frames=ck["counts"]["frames"])]  # a checkpoint of one walker
            for i, state in enumerate(saved):
                walker = self._walker(i)  # the integrator before the state: some drivers touch it
                atoms = walker.atoms
                atoms.positions, atoms.cell = np.asarray(state["positions"]), np.asarray(state["cell"])
                atoms.set_momenta(np.asarray(state["momenta"]), apply_constraint=False)
                restore_dynamics(walker.dyn, state["dynamics"])
                walker.calc.restore_cache(state["cache"], atoms)
                walker.frames = state["frames"]
                self.walkers.append(walker)
            self.wall_before = ck["wall_s"]
            pending = self._replay_labels_after(ck["counts"])
            steps = ", ".join(str(w.dyn.nsteps) for w in self.walkers)
            self.log(f"resuming {c.run_dir} at step {steps} ({self.calc.state.reference_calls} "
                     f"reference calls, {pending} label(s) to replay)")
        else:
            self.ensemble = Ensemble.from_config(c.model, c.uncertainty, seed=c.seed)
            for structure in self.structures:
                self.ensemble.model.backbone.check_atoms(structure)
            self.calc = self._calculator(None)
            for i in range(c.walker_count):
                md, seed = c.walker_md(i), c.walker_seed(i)
                atoms = self.structures[i]
                if md.initial_velocities and not atoms.has("momenta"):
                    MaxwellBoltzmannDistribution(atoms, temperature_K=md.temperature_at(0),
                                                 rng=np.random.default_rng(seed))
                    Stationary(atoms)
                    if not atoms.pbc.any():
                        ZeroRotation(atoms)
                self.walkers.append(self._walker(i))
            # labels of a start stopped before its first checkpoint (during the first update)
            pending = self._replay_labels_after({"labels": 0, "steps": [0] * len(self.walkers), "interventions": 0,
                                                 "frames": [0] * len(self.walkers)})
            if pending:
                self.log(f"restarting {c.run_dir} from its start, {pending} label(s) to replay")
        for walker in self.walkers:
            walker.atoms.calc = walker.calc
        off = [f"uncertainty.{k} = {v}" for k, v in (("label_misfit", "false"), ("calibration_checks", 0))
               if not getattr(c.uncertainty, k)]
        if off:
            self.log(f"{' and '.join(off)}: the decision trusts the members' spread further than the defaults "
                     "(the published rule has both off); chains too short to spread can then stop calling "
                     "while the errors exceed ε (docs/method.md §6)")
        # the settings in force (a resume may change thresholds): what `flytune report` reads
        self.rd.write_json(self.rd.config, {"identity": c.identity(), "config": c.model_dump(mode="json")})

    def _replay_labels_after(self, counts: dict) -> int:
        return replay_labels_after(self.rd, self.calc, counts)

    def _apply_changed_settings(self, calibrator: Calibrator) -> None:
        apply_changed_settings(self.ensemble, calibrator, self.config.uncertainty, self.log)

    def _calculator(self, calibrator: Calibrator | None) -> OnTheFlyCalculator:
        c = self.config
        return OnTheFlyCalculator(self.ensemble, self.reference, safety=c.safety, updates=c.updates,
                                  calibrator=calibrator, on_failure=c.reference.on_failure, on_step=self._on_step,
                                  on_intervention=self._on_intervention, on_label=self._on_label,
                                  on_update=self._on_update)

    # -- records ----------------------------------------------------------------------
    def _stamp(self, record: dict, walker: int) -> dict:
        w = self.walkers[walker]
        record.update(step=w.step, time_fs=w.step * w.md.timestep_fs)
        return record

    def _on_label(self, atoms: Atoms, meta: dict) -> None:
        self._stamp(atoms.info, int(atoms.info.get("walker", 0)))
        self.rd.append_label(atoms)

    def _on_intervention(self, atoms: Atoms, iv: Intervention) -> None:
        record = self._stamp(dataclasses.asdict(iv), iv.walker)
        record["wall_s"] = self.wall_before + time.perf_counter() - self._start  # since the run began
        self.rd.append_intervention(record)

    def _on_update(self, record: dict) -> None:  # stamped with the step of the walkers furthest on
        self.rd.append_update(self._stamp(record, max(range(len(self.walkers)), key=lambda i: self.walkers[i].step)))

    def _on_step(self, row: dict) -> None:
        walker = row.pop("walker")
        self._stamp(row, walker)
        row["temperature_K"] = self.walkers[walker].atoms.get_temperature()
        self.rd.append_step(row, walker)

    def checkpoint(self) -> None:
        st = self.calc.state
        self.rd.write_checkpoint({
            "format": "flytune.run/2",
            "ensemble": self.ensemble.state_dict(self.calc.decision.calibrator),
            "calculator": self.calc.state_dict(),
            "walkers": [{"positions": w.atoms.positions.tolist(), "momenta": w.atoms.get_momenta().tolist(),
                         "cell": np.asarray(w.atoms.cell).tolist(), "dynamics": dynamics_state(w.dyn),
                         "cache": w.calc.cache(), "frames": w.frames} for w in self.walkers],
            "counts": {"labels": len(self.ensemble.data) + len(self.calc.schedule.pending),
                       "steps": [st.walker_force_calls.get(w.index, 0) for w in self.walkers],
                       "interventions": st.reference_calls, "updates": st.updates,
                       "frames": [w.frames for w in self.walkers]},
            "wall_s": self.wall_before + time.perf_counter() - self._start,
        })

    # -- the loop ---------------------------------------------------------------------
    def _round(self, walkers: list[Walker], action: Callable[[Walker], None]) -> None:
        for w in walkers:
            w.in_step = True
        try:
            run_together(self.calc, walkers, action)
        finally:
            for w in walkers:
                w.in_step = False

    def advance(self, stop=None, on_progress: Callable[[OnTheFlyRun], None] | None = None,
                on_update_progress: Progress | None = None) -> dict:
        """Run every walker's MD to the end of its schedule (or a stop), one step of all of
        them per round; returns the summary.

        ``on_progress(run)`` after every round; ``on_update_progress(chain, step,
        mean_ll)`` during posterior updates; a set ``stop`` ends the run at the next round
        (during an update: at once, see :class:`UpdateInterrupted`)."""
        c = self.config
        self._start = time.perf_counter()
        self.calc.stop = stop
        self.calc.on_update_progress = on_update_progress
        stopped = None
        failed = cut = False
        try:
            fresh = [w for w in self.walkers if w.dyn.nsteps == 0 and w.frames == 0]
            if fresh:
                run_together(self.calc, fresh, _start_walker)  # the first structures: always labelled
                for w in fresh:
                    self._record_frame(w)
                self.checkpoint()
            while not all(w.done for w in self.walkers):
                if stop is not None and stop.is_set():
                    stopped = "interrupted"
                    break
                active = [w for w in self.walkers if not w.done]
                for w in active:
                    set_temperature(w.dyn, w.md.temperature_at(w.dyn.nsteps))
                calls = self.calc.state.reference_calls
                self._round(active, _step_walker)
                for w in active:
                    w.dyn.nsteps += 1
                    if w.dyn.nsteps % w.md.trajectory_every == 0:
                        self._record_frame(w)
                if self.calc.state.reference_calls != calls or any(w.dyn.nsteps % c.checkpoint_every == 0
                                                                  for w in active):
                    self.checkpoint()
                stopped = next(filter(None, (self._runaway(w) for w in active)), None)
                if on_progress is not None:
                    on_progress(self)
                if stopped:
                    break
            if all(w.done for w in self.walkers):
                self.calc.adopt_pending()  # labels from before a kill that the resumed MD did not revisit
                if self.calc.schedule.pending or self.ensemble.learning:
                    self.calc.learn_pending("end of run")  # model.pt learns every label
                self.calc.learn_final(c.updates.final_cycles)
        except (ReferenceFailure, ModelFailure) as exc:
            kind = "reference failure" if isinstance(exc, ReferenceFailure) else "model failure"
            stopped = f"{kind} at MD step {self._where()}: {exc}"
            failed = True
        except UpdateInterrupted:  # the checkpoint stays from before the cut update
            stopped = (f"interrupted during the update at MD step {self._where()}; its label is kept "
                       "and the same command redoes that update in full")
            cut = True
        else:
            self.checkpoint()
        wall = self.wall_before + time.perf_counter() - self._start
        summary = summarize(self.rd, self.calc, sum(w.dyn.nsteps for w in self.walkers),
                            sum(w.dyn.nsteps * w.md.timestep_fs for w in self.walkers) / 1000, wall, stopped)
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

    def _where(self) -> str:
        """The MD step now (of each walker, with several)."""
        steps = [w.step for w in self.walkers]
        return str(steps[0]) if len(steps) == 1 else "/".join(map(str, steps)) + " (walkers 0–" + f"{len(steps) - 1})"

    def _record_frame(self, walker: Walker) -> None:
        frame = walker.atoms.copy()
        frame.calc = None
        frame.info["step"] = walker.dyn.nsteps
        self.rd.append_frame(frame, walker.index)
        walker.frames += 1

    def _runaway(self, walker: Walker) -> str | None:
        s = self.config.safety
        who = f"walker {walker.index}: " if self.rd.walkers else ""
        temperature = walker.atoms.get_temperature()
        if s.max_temperature_K is not None and temperature > s.max_temperature_K:
            return f"{who}temperature {temperature:.0f} K above max_temperature_K = {s.max_temperature_K:.0f}"
        fmax = float(np.abs(walker.calc.results["forces"]).max())
        if s.max_force_eV_A is not None and fmax > s.max_force_eV_A:
            return f"{who}a force of {fmax:.1f} eV/Å above max_force_eV_A = {s.max_force_eV_A}"
        return None


def _start_walker(walker: Walker) -> None:
    walker.atoms.get_forces()
    if getattr(walker.dyn, "initialized", True) == 0:
        walker.dyn.initialize()  # Melchionna NPT is not self-starting


def _step_walker(walker: Walker) -> None:
    walker.dyn.step()


def run(config: RunConfig, log: Log = print, stop=None, on_progress=None, on_update_progress=None) -> dict:
    """Start or resume ``config``'s run and advance it to the end (see :meth:`OnTheFlyRun.advance`)."""
    otf = OnTheFlyRun(config, log)
    otf.open()
    try:
        return otf.advance(stop, on_progress, on_update_progress)
    finally:
        otf.close()
