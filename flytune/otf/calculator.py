r"""The on-the-fly ASE calculator (method §6–§8).

At every force call it predicts with the ensemble and asks the :class:`Decision`
(calibrated P(|e| > ε) and the safety nets) whether to call the reference. Without a
call it returns the ensemble mean; with one it labels the structure, records (e, σ) for
the calibration using the prediction made before the update, queues the label for the
posterior update (:class:`UpdateSchedule`: at once, or deferred) and returns the
reference's energy (plus the energy offset Δ), forces and, for periodic structures,
stress. A step where the rule asked for a call that a limit or a failed reference kept
from being made is *uncontrolled*: it is counted and named.

:meth:`OnTheFlyCalculator.evaluate` does the same for the structures of several walkers
at once (:mod:`flytune.otf.walkers`): one batched prediction, their reference calls
together, one update for the labels of the round.

Properties: ``energy``, ``free_energy``, ``forces``, and ``stress`` for structures
periodic in all three directions. Extra results readable from ``calc.results``:
``energy_std`` (eV: the σ the decision used, the ensemble's with the label misfit of
:func:`flytune.otf.decision.trusted_sigma`), ``prob_exceed``, ``reference_called``, ``uncontrolled`` (why the
step ran without the call the rule asked for; empty if it did not).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from flytune.bayes.calibration import FORCE_CALIBRATIONS, Calibrator, force_calibration_kind
from flytune.bayes.chain import Progress
from flytune.bayes.ensemble import Ensemble
from flytune.bayes.runners import worker_of
from flytune.config import SafetyConfig, UpdatesConfig
from flytune.data import labelled
from flytune.otf import faults
from flytune.otf.decision import CurvatureFit, Decision, LabelMisfit, Verdict, carried_error, trusted_sigma
from flytune.errors import FlytuneError
from flytune.otf.reference import Reference, ReferenceFailure, as_reference, compute_concurrently
from flytune.otf.rundir import label_from_record, label_record
from flytune.otf.updates import UpdateSchedule
from flytune.units import parse_energy


class ModelFailure(RuntimeError):
    """The posterior update diverged (non-finite weights or predictions)."""


class UpdateInterrupted(Exception):
    """A stop request (Ctrl-C) arrived during a posterior update. The label is already on
    disk and the last checkpoint is from before it, so a resumed run replays the label and
    redoes the update in full instead of keeping a cut one."""


def result_cache(atoms: Atoms | None, results: dict) -> dict | None:
    """A force call's structure and results as a checkpoint stores them (JSON), or None
    before the first; :func:`restore_results` takes them back, so a resume makes no
    extra force call there."""
    if atoms is None or not results:
        return None
    return {"positions": atoms.positions.tolist(), "cell": np.asarray(atoms.cell).tolist(),
            "numbers": atoms.numbers.tolist(), "pbc": atoms.pbc.tolist(),
            "results": {k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in results.items()}}


def restore_results(cache: dict | None, atoms: Atoms | None = None) -> tuple[Atoms, dict] | None:
    """(structure, results) of a :func:`result_cache`, the structure on a copy of ``atoms``
    (default: built from the cache's numbers and pbc); None without a cache, or without
    ``atoms`` for a cache from before those were stored."""
    if cache is None or (atoms is None and "numbers" not in cache):
        return None
    structure = atoms.copy() if atoms is not None else Atoms(numbers=cache["numbers"], pbc=cache["pbc"])
    structure.positions = np.asarray(cache["positions"])
    structure.cell = np.asarray(cache["cell"])
    return structure, {k: np.asarray(v) if isinstance(v, list) else v for k, v in cache["results"].items()}


def check_stress_defined(name: str, structure: Atoms | None) -> None:
    """Refuse ``stress`` for a structure that is not periodic in all three directions."""
    if name == "stress" and structure is not None and not structure.pbc.all():
        raise PropertyNotImplementedError(
            f"stress is defined for structures periodic in all three directions; "
            f"{structure.get_chemical_formula()} has pbc={structure.pbc.tolist()}"
        )


@dataclass
class Intervention:
    """One reference call: what the model predicted before, and what came back."""

    force_call: int
    energy_pred: float  # eV, ensemble mean before the update
    energy_std: float  # σ, eV, before the update
    prob_exceed: float
    energy_ref_raw: float  # eV, the reference's own zero
    energy_ref: float  # eV, + offset
    error: float  # E_ref + Δ − Ê
    calibrated_std: float  # σ·sqrt(b'/a') before observing this error
    shape: float  # a' after observing
    rate: float  # b' after observing
    reference_s: float
    update_s: float  # 0 when the update was deferred
    first: bool = False
    reason: str = "first"  # why the reference was called (see flytune.otf.decision.Verdict)
    label_misfit: float = 0.0  # r (eV) in σ here (flytune.otf.decision.LabelMisfit)
    #: μ (eV): the error expected here (the label misfit carried as a bias; 0 as spread)
    error_mean: float = 0.0
    #: −d(x) (eV): the carried residual added to the members' mean (``label_misfit_as =
    #: "correction"``; ``energy_pred`` and ``error`` are of the corrected prediction), with
    #: κ̄·q̂ under ``correction_order = 2``
    correction: float = 0.0
    #: q̂ (eV): the members' change beyond first order from the newest label, and κ̄ then
    #: (``correction_order = 2``, :class:`~flytune.otf.decision.CurvatureFit`)
    curvature: float = 0.0
    curvature_ratio: float = 0.0
    #: called because r raised σ: with the ensemble's σ alone P(|e| > ε) was below the level
    by_misfit: bool = False
    #: why the posterior update ran right after this call (flytune.otf.updates), or "deferred"
    update: str = "every"
    labels_learned: int = 1  # labels that update learned (this one and those deferred before it)
    #: a background update was running during the call (the two shared the machine)
    update_running: bool = False
    walker: int = 0  # whose structure was labelled
    #: reference calls made at once with this one (several walkers' calls on Parsl workers)
    calls_at_once: int = 1
    #: max over atoms of |F_ref − F̂| (eV/Å), the error the force criterion bounds by ε_F
    force_error_max: float = 0.0
    #: P(max_a |ΔF_a| > ε_F) before the call; None without ε_F
    prob_force_exceed: float | None = None


@dataclass(eq=False)
class ForceCall:
    """One structure of :meth:`OnTheFlyCalculator.evaluate`: the prediction there, the
    verdict, and (once labelled) the results handed to the MD."""

    atoms: Atoms
    walker: int
    force_call: int
    energy: float  # eV, the prediction the MD is given: the members' mean (corrected, label_misfit_as = correction)
    forces: np.ndarray  # eV/Å, likewise
    sigma: float  # eV, the σ the decision used
    verdict: Verdict
    misfit: float  # eV, the label misfit r in σ
    results: dict  # the ensemble's, or the reference's once labelled
    uncontrolled: str = ""
    by_misfit: bool = False
    called: bool = False
    calls_at_once: int = 1  # reference calls made at once with this one
    error: float = 0.0  # E_ref + Δ − Ê, once labelled
    calibrated: float = 0.0  # σ·sqrt(b'/a') before observing the error
    forces_var: np.ndarray | None = None  # eV²/Å², (n, 3): total variance of the predicted forces
    force_deviation: float = 0.0  # eV/Å: the largest per-atom force deviation among the members
    waits_because: str = ""  # why its label waits although its error was critical
    error_mean: float = 0.0  # eV, μ: the error expected here (the label misfit as a bias)
    correction: float = 0.0  # eV, −d(x) added to the members' mean energy (label_misfit_as = correction)
    member_energy: np.ndarray | None = None  # (M,) eV: each member's energy (their mean is the ensemble's)
    member_forces: np.ndarray | None = None  # (M, n, 3) eV/Å
    #: (q̂ (eV), κ̄, s (eV)) under correction_order = 2: the curvature term, the ratio that
    #: scaled it into the prediction and the std the decision had without its variance
    curvature: tuple[float, float, float] | None = None


@dataclass
class CalculatorState:
    """Counters that a checkpoint must carry."""

    force_calls: int = 0  # of all walkers
    reference_calls: int = 0
    #: per walker: its force calls, and their count at its last reference call
    walker_force_calls: dict[int, int] = field(default_factory=dict)
    walker_last_call: dict[int, int] = field(default_factory=dict)
    time_predict_s: float = 0.0
    time_reference_s: float = 0.0  # the calls' durations, summed
    time_reference_wall_s: float = 0.0  # the wall time the MD waited for them (calls at once overlap)
    time_update_s: float = 0.0
    skipped_failures: int = 0
    updates: int = 0
    final_cycles: int = 0  # cycles over all labels done since the last update learned a label
    #: force calls that ran without the call the rule asked for, by cause
    uncontrolled: dict[str, int] = field(default_factory=dict)

    @property
    def steps_uncontrolled(self) -> int:
        return sum(self.uncontrolled.values())


@dataclass
class PendingLabel:
    """A label written before a kill but not yet in the checkpointed model: the reference
    result is reused when the resumed MD reaches the same structure."""

    force_call: int
    atoms: Atoms  # with the raw reference labels


class OnTheFlyCalculator(Calculator):
    """An ASE calculator that fine-tunes its ensemble with reference calls as it goes."""

    def __init__(
        self,
        ensemble: Ensemble,
        reference: Reference,
        *,
        threshold: float | None = None,
        confidence: float | None = None,
        safety: SafetyConfig | None = None,
        updates: UpdatesConfig | None = None,
        calibrator: Calibrator | None = None,
        on_failure: Literal["stop", "skip"] = "stop",
        on_step: Callable[[dict], None] | None = None,
        on_intervention: Callable[[Atoms, Intervention], None] | None = None,
        on_label: Callable[[Atoms, dict], None] | None = None,
        on_update: Callable[[dict], None] | None = None,
        on_update_progress: Progress | None = None,
        **kwargs,
    ):
        """``threshold`` ε in eV, ``confidence`` and the ``calibrator`` (the Gamma prior
        (a, b)) default to the ensemble's uncertainty settings; ``safety`` holds the limits
        of the decision (:class:`flytune.otf.decision.Decision`), ``updates`` when labels
        are learned (:mod:`flytune.otf.updates`; default: after each). ``on_failure``: a failed
        reference call stops the run (``"stop"``, raises :class:`ReferenceFailure`) or the
        MD continues with the ensemble's prediction (``"skip"``). Callbacks: ``on_label``
        with the labelled structure as soon as the reference returns (before the update),
        ``on_intervention`` after the update (or its deferral), ``on_update`` with a record
        of each posterior update, ``on_step`` after every force call (the run directory
        writes its files there), ``on_update_progress`` during updates as ``(chain, step,
        mean log-likelihood)``."""
        super().__init__(**kwargs)
        u = ensemble.uncertainty
        self.ensemble = ensemble
        self.reference = reference
        self.decision = Decision(
            calibrator or u.calibrator(),
            u.threshold_eV if threshold is None else threshold,
            u.confidence if confidence is None else confidence,
            safety,
            u.calibration_checks,
            criterion=u.criterion,
            force_threshold_eV_A=u.force_threshold_eV_A,
            force_calibrator=u.force_calibrator(),
            trigger=u.trigger,
            spread_threshold_eV=u.spread_fraction * (u.threshold_eV if threshold is None else threshold),
            force_deviation_threshold_eV_A=u.force_deviation_threshold_eV_A,
        )
        d = self.decision  # under a force criterion, force errors above ε_F are critical misses too
        self.schedule = UpdateSchedule(updates, d.threshold_eV, None if d.criterion == "energy" else d.force_threshold_eV_A)
        self.on_failure = on_failure
        self.state = CalculatorState()
        self.pending: list[PendingLabel] = []
        #: the structure and results of the last step evaluated (a checkpoint written during
        #: a step, before ASE stores its results, must hold that step's)
        self._step_results: tuple[Atoms, dict] | None = None
        self.on_step, self.on_intervention, self.on_label = on_step, on_intervention, on_label
        self.on_update = on_update
        #: (labels, reason, force call at its start, seconds its start took) of an update
        #: running in the background
        self._learning: tuple[list[Atoms], str, int, float] | None = None
        self._due: str | None = None  # why an update is due once the background one finishes
        #: per walker, how the members that predict now miss its newest label, and that label
        self.misfits: dict[int, LabelMisfit] = {}
        self.newest: dict[int, Atoms] = {}
        #: κ, fitted at the calls (``correction_order = 2``); None otherwise
        self.curvature_fit = (CurvatureFit(discount=u.calibration_discount)
                              if self._corrects and u.correction_order == 2
                              else None)
        self.on_update_progress = on_update_progress
        self.stop = None  # a StopFlag: a stop during an update raises UpdateInterrupted
        self.script = None  # the run directory a script's calculator keeps (flytune.otf.scripted)
        self._busy = False  # inside a force call (an exception there leaves the state mid-way)
        self._previous_sigint = None

    @classmethod
    def from_pretrained(cls, backbone: str = "7net-0", *, reference, threshold: str | tuple[float, str] = "0.5 kcal/mol",
                        reference_options: dict | None = None, retries: int = 2,
                        on_failure: Literal["stop", "skip"] = "stop", seed: int = 0, run_dir: str | None = None,
                        checkpoint_every: int = 100, timestep_fs: float | None = None,
                        log: Callable[[str], None] | None = None, **settings) -> OnTheFlyCalculator:
        """The calculator for a script: a pretrained ``backbone`` (``"7net-0"``, a SevenNet
        checkpoint or a MACE model file), a ``reference`` (an ASE calculator instance, or a
        name or import path as in the TOML, with ``reference_options``), the error threshold
        ε (``(0.5, "kcal/mol")``, ``"0.5 kcal/mol"``, ``"20 meV"``) and any setting of the
        TOML's ``[model]``, ``[uncertainty]``, ``[safety]`` and ``[updates]`` as a keyword
        with its name there (``chains=4``, ``confidence=0.9``, ``policy="deferred"``),
        validated the same way.

        With ``run_dir`` the calculator keeps a run directory as ``flytune run`` does
        (:mod:`flytune.otf.scripted`; ``timestep_fs``: the script's MD time step, for the
        logs' time axis) and a script started again resumes from its checkpoint. Use it as a
        context manager (``with ... as calc``): the block's end writes the summary and
        ``model.pt`` and ends the worker processes; inside it, Ctrl-C stops at once, and
        during a force call (an update) leaves the last checkpoint in place, its labels
        reused by the next start."""
        from flytune.runconfig import keyword_settings

        try:
            value, unit = parse_energy(threshold)
        except ValueError as exc:
            raise FlytuneError(f"threshold: {exc}") from None
        tables = keyword_settings(settings, model={"backbone": backbone},
                                  uncertainty={"threshold": value, "threshold_unit": unit})
        reference = as_reference(reference, reference_options, retries)

        def build(ensemble: Ensemble | None, calibrator: Calibrator | None) -> OnTheFlyCalculator:
            if ensemble is None:
                ensemble = Ensemble.from_config(tables["model"], tables["uncertainty"], seed=seed)
            return cls(ensemble, reference, safety=tables["safety"], updates=tables["updates"], calibrator=calibrator,
                       on_failure=on_failure)

        if run_dir is None:
            return build(None, None)
        from flytune.otf.scripted import ScriptRun

        dump = {name: table.model_dump(mode="json") for name, table in tables.items()}
        identity = {key: dump["model"][key] for key in ("backbone", "chains", "prior", "sigma_prior", "posterior",
                                                        "head_widths")}
        identity.update(seed=seed, reference=getattr(reference, "name", type(reference).__name__))
        script = ScriptRun.open(run_dir, identity, dump, tables["uncertainty"], build, checkpoint_every, timestep_fs,
                                log or (lambda message: print(message, file=sys.stderr)))
        script.calc.script = script
        return script.calc

    def close(self) -> dict | None:
        """Write the run directory's summary and ``model.pt`` (with ``run_dir``), end the
        ensemble's worker processes (and a Parsl reference's executor); returns the summary."""
        summary = None
        try:
            if self.script is not None:
                summary, self.script = self.script.close(consistent=not self._busy), None
        finally:
            self.ensemble.close()
            if callable(getattr(self.reference, "close", None)):
                self.reference.close()
        return summary

    def __enter__(self) -> OnTheFlyCalculator:
        self._previous_sigint = None
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):  # inside a force call: cut the update (UpdateInterrupted); else stop now
                if self._busy and self.stop is not None and not self.stop.is_set():
                    self.stop.set()
                    return
                raise KeyboardInterrupt

            self.stop = self.stop or threading.Event()
            self._previous_sigint = signal.signal(signal.SIGINT, on_sigint)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
        self.close()
        if exc_type is UpdateInterrupted:
            raise KeyboardInterrupt("stopped during a posterior update; its labels are on disk and the next start "
                                    "on the same run_dir learns them") from None

    @property
    def misfit(self) -> LabelMisfit | None:
        """The label misfit of walker 0 (the only one of a calculator under one driver)."""
        return self.misfits.get(0)

    # -- ASE contract ----------------------------------------------------------------
    @property
    def implemented_properties(self) -> list[str]:
        """Stress only for periodic structures (the run's, once the calculator has seen one)."""
        known = self.atoms if self.atoms is not None else next(iter(self.ensemble.data.structures), None)
        periodic = known is None or bool(known.pbc.all())
        return ["energy", "free_energy", "forces"] + (["stress"] if periodic else [])

    def get_property(self, name, atoms=None, allow_calculation=True):
        check_stress_defined(name, atoms if atoms is not None else self.atoms)
        return super().get_property(name, atoms, allow_calculation)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = self.evaluate([self.atoms])[0]

    def evaluate(self, structures: list[Atoms], walkers: list[int] | None = None) -> list[dict]:
        """The results (as :attr:`results`) at each of ``structures``, the current structure of
        walker ``walkers[i]`` (default 0, 1, ...) of a run whose walkers share this ensemble.

        One batched ensemble prediction; the decisions in order; the reference calls that
        they ask for made at once (:func:`~flytune.otf.reference.compute_concurrently`), each
        label written as it returns; then, in order, the errors into the calibration and the
        labels into the update schedule, and at most one update for all of them."""
        walkers = list(range(len(structures))) if walkers is None else list(walkers)
        self._busy = True  # until the end: an exception leaves it set (see close)
        for atoms in structures:
            self.ensemble.data.check_composition(atoms, fix="start a new run for the new composition")
        self.poll_update()
        st = self.state
        first_call = st.force_calls + 1
        st.force_calls += len(structures)
        for walker in walkers:
            st.walker_force_calls[walker] = st.walker_force_calls.get(walker, 0) + 1
        start = time.perf_counter()
        pred = self.ensemble.predict(structures)
        predict_s = time.perf_counter() - start
        st.time_predict_s += predict_s
        first_round = len(self.ensemble.data) + len(self.schedule.pending) == 0
        steps, calls = [], []
        for i, (atoms, walker) in enumerate(zip(structures, walkers)):
            mine_atoms = pred.structure_index == i
            forces, forces_var = pred.forces[mine_atoms], pred.forces_var[mine_atoms]
            energy, sigma = float(pred.energy[i]), float(pred.energy_std[i])
            ensemble_sigma = sigma
            misfit = self.misfits.get(walker)
            member_energy = pred.member_energy[:, i]
            correction, curved, curvature = 0.0, None, None
            if misfit is not None and self._corrects:
                if self.curvature_fit is not None:
                    curved = misfit.curvature(atoms, energy, forces)
                corrected, forces = misfit.corrected(atoms, energy, forces)
                if curved is not None:  # the second-order term, κ̄·(q̂, F_q)
                    ratio = self.curvature_fit.ratio
                    corrected, forces = corrected + ratio * curved[0], forces + ratio * curved[1]
                energy, correction = corrected, corrected - energy
                anchored = misfit.anchored_sigma(atoms, member_energy, self.ensemble.model.energy_sigma)
                sigma = sigma if anchored is None else anchored
            mean, sigma, r = self._with_misfit(misfit, atoms, sigma)
            if curved is not None:
                curvature = (curved[0], ratio, sigma)
                sigma = float(np.sqrt(sigma**2 + self.curvature_fit.variance(curved[0])))
            last = st.walker_last_call.get(walker)
            mine = st.walker_force_calls[walker]
            verdict = self.decision.decide(sigma, mean=mean, labels=0 if first_round else 1,
                                           reference_calls=st.reference_calls + len(calls),
                                           since_call=mine - last if last is not None else mine,
                                           force_sigma=np.sqrt(forces_var.mean(axis=1)),
                                           ensemble_sigma=ensemble_sigma,
                                           force_deviation=pred.force_deviation[mine_atoms])
            results = {"energy": energy, "forces": forces}
            if pred.stress is not None and atoms.pbc.all():
                results["stress"] = pred.stress[i]
            step = ForceCall(atoms, walker, first_call + i, energy, forces, sigma, verdict, r, results,
                             uncontrolled=verdict.reason if verdict.uncontrolled else "",
                             by_misfit=verdict.call and verdict.reason == "probability"
                             and (sigma > ensemble_sigma or mean != 0.0)
                             and not self.decision.wants_call(self.decision.deciding_prob(
                                 self.decision.prob_exceed(ensemble_sigma), verdict.prob_force_exceed)),
                             forces_var=forces_var, force_deviation=float(pred.force_deviation[mine_atoms].max()),
                             error_mean=mean, correction=correction, member_energy=member_energy,
                             member_forces=pred.member_forces[:, mine_atoms], curvature=curvature)
            steps.append(step)
            if verdict.call:
                calls.append(step)
        if calls:
            self._label_all(calls, first_round)
        out = []
        for step in steps:
            results, verdict, uncontrolled = step.results, step.verdict, step.uncontrolled
            if uncontrolled:
                st.uncontrolled[uncontrolled] = st.uncontrolled.get(uncontrolled, 0) + 1
            results["free_energy"] = results["energy"]
            if "stress" in results:
                results["stress"] = full_3x3_to_voigt_6_stress(results["stress"])
            results.update(energy_std=step.sigma, prob_exceed=verdict.prob_exceed, reference_called=step.called,
                           uncontrolled=uncontrolled, prob_force_exceed=verdict.prob_force_exceed)
            out.append(results)
            self._step_results = (step.atoms, results)  # a checkpoint written in on_step holds this step
            if self.on_step is not None:
                self.on_step({"force_call": step.force_call, "walker": step.walker,
                              "energy_eV": results["energy"], "energy_std_eV": step.sigma,
                              "prob_exceed": verdict.prob_exceed, "prob_force_exceed": verdict.prob_force_exceed,
                              "reference_called": step.called,
                              "uncontrolled": uncontrolled, "force_deviation_eV_A": step.force_deviation,
                              "predict_s": predict_s / len(structures)})
        self._busy = False
        return out

    def _reference_results(self, calls: list[ForceCall]):
        """(step, labelled structure or :class:`ReferenceFailure`, reference seconds,
        replayed) for each of ``calls``, as each becomes known: a pending label written
        before a kill when the resumed MD reaches the same structure, else a reference call
        (all of them at once where the reference allows)."""
        fresh = []
        for step in calls:
            while self.pending and self.pending[0].force_call < step.force_call:
                self._adopt(self.pending.pop(0))  # the resumed MD went elsewhere: keep the label
            if self.pending and self.pending[0].force_call == step.force_call:
                candidate = self.pending.pop(0)
                if np.array_equal(candidate.atoms.positions, step.atoms.positions):
                    yield step, candidate.atoms, 0.0, True
                    continue
                self._adopt(candidate)
            fresh.append(step)
        for step in fresh:
            step.calls_at_once = len(fresh) if getattr(self.reference, "concurrent", False) else 1
        for i, result in compute_concurrently(self.reference, [step.atoms for step in fresh]):
            step = fresh[i]
            if isinstance(result, ReferenceFailure):
                yield step, result, 0.0, False
                continue
            label = labelled(step.atoms, result.energy, result.forces, result.stress)
            label.info.update(force_call=step.force_call)
            yield step, label, result.wall_s, False

    def _update_progress(self, chain: int, step: int, mean_ll: float) -> None:
        if step == 3:
            faults.point("mid-update")
        if self.on_update_progress is not None:
            self.on_update_progress(chain, step, mean_ll)

    def _adopt(self, pending: PendingLabel) -> None:
        """Queue a label whose structure the resumed run did not revisit (no loss, no call)."""
        self.newest[int(pending.atoms.info.get("walker", 0))] = pending.atoms
        reason = self.schedule.add(pending.atoms, error_eV=0.0, reference_s=0.0)
        if reason is not None:
            self.learn_pending(reason)

    def adopt_pending(self) -> None:
        """Queue every label still waiting for its replay (the MD did not come back to it)."""
        while self.pending:
            self._adopt(self.pending.pop(0))

    def learn_pending(self, reason: str = "end of run") -> tuple[float, int]:
        """Update the posterior on the labels waiting for it: (seconds the MD waited, labels
        the update learns). With ``[updates] background`` the update starts in the worker
        processes and the MD goes on (0 s; if one is running already, the labels wait for
        it to finish); at the end of a run it waits for every update.

        Raises :class:`UpdateInterrupted` when a stop arrives during a blocking update and
        :class:`ModelFailure` when one diverges."""
        if self.schedule.config.background and reason != "end of run":
            if self.ensemble.learning:
                self._due = reason
                return 0.0, 0
            labels = self.schedule.take()
            if labels:
                start = time.perf_counter()
                self.ensemble.start_update(labels)  # waits only for the workers to start, the first time
                self._learning = (labels, reason, self.state.force_calls, time.perf_counter() - start)
            return 0.0, len(labels)
        self.poll_update(block=True)
        labels = self.schedule.take()
        if not labels:
            return 0.0, 0
        start = time.perf_counter()
        self.ensemble.update(labels, progress=self._update_progress, stop=self.stop)
        if self._interrupted():
            raise UpdateInterrupted
        cycles, (chain_steps, worker_s) = 1, self._cycle_cost()
        learned = self._measure_newest(labels)
        while not learned and cycles < self.schedule.config.max_cycles:  # one more cycle on the same labels
            self.ensemble.continue_update(len(labels), progress=self._update_progress, stop=self.stop)
            if self._interrupted():
                raise UpdateInterrupted
            steps, seconds = self._cycle_cost()
            cycles, chain_steps, worker_s = cycles + 1, chain_steps + steps, worker_s + seconds
            learned = self._measure_newest(labels)
        update_s = time.perf_counter() - start
        self._updated(reason, labels, update_s, update_s, learned=learned, cycles=cycles,
                      cost=(chain_steps, worker_s))
        return update_s, len(labels)

    def learn_final(self, cycles: int) -> None:
        """At the end of the run: update cycles over all labels, drawn uniformly (no label
        favoured), until ``cycles`` are done since the last label was learned (those done
        before a kill count: the counter is checkpointed). The MD has no step left to
        serve, so these cycles only improve the model the run leaves (``model.pt``); each
        is booked as an update with reason ``final``.

        Raises :class:`UpdateInterrupted` when a stop arrives during a cycle."""
        while self.state.final_cycles < cycles and len(self.ensemble.data):
            start = time.perf_counter()
            self.ensemble.continue_update(0, progress=self._update_progress, stop=self.stop)
            if self._interrupted():
                raise UpdateInterrupted
            faults.point("final-cycle")  # a kill here: the cycle is redone on resume
            self.state.final_cycles += 1
            update_s = time.perf_counter() - start
            self._updated("final", [], update_s, update_s, learned=self._measure_newest([]))

    def _interrupted(self) -> bool:
        return any(chain.interrupted for chain in self.ensemble.chains)

    def _cycle_cost(self) -> tuple[int, float]:
        """The last cycle's SGHMC steps over all chains, and its longest worker's compute (s)."""
        chains = self.ensemble.chains
        workers = max(1, self.ensemble.config.workers)
        worker_s = max(sum(c.run_s for c in chains if worker_of(c.index, workers) == w) for w in range(workers))
        return sum(chain.state.step for chain in chains), worker_s

    def poll_update(self, block: bool = False) -> None:
        """Swap in the chains of a background update that has finished (``block``: wait
        for it), then start the next one if labels became due meanwhile."""
        if not self.ensemble.learning:
            return
        start = time.perf_counter()
        wall = self.ensemble.finish_update(block, self._update_progress, self.stop)
        if wall is None:
            return
        if self._interrupted():
            raise UpdateInterrupted
        (labels, reason, started, submit_s), self._learning = self._learning, None
        self._updated("background: " + reason, labels, submit_s + wall, submit_s + time.perf_counter() - start,
                      started_force_call=started)
        due, self._due = self._due, None
        if due is not None and not block:
            self.learn_pending(due)

    def _updated(self, reason: str, labels: list[Atoms], update_s: float, waited_s: float,
                 learned: bool | None = None, cycles: int = 1, cost: tuple[int, float] | None = None,
                 **extra) -> None:
        """Book an update of ``update_s`` seconds (wall, start to finish) that learned
        ``labels`` in ``cycles`` cycles and during which the MD waited ``waited_s``;
        ``learned``: the verdict of :meth:`_measure_newest` on the final members (None:
        measure it now); ``cost``: the cycles' SGHMC steps and worker compute in all (None:
        the last cycle's, :meth:`_cycle_cost`); ``extra`` goes into its record."""
        if learned is None:
            learned = self._measure_newest(labels)
        self.schedule.updated(update_s, learned=learned)
        self.state.time_update_s += waited_s
        self.state.updates += 1
        if labels:  # a run extended past its end gets its final cycles again at the new end
            self.state.final_cycles = 0
        if self.on_update is not None:
            misfit = self.misfits[max(self.newest, key=lambda w: self.newest[w].info.get("force_call", 0))]
            residual = misfit.force_residual_eV_A
            chain_steps, worker_s = self._cycle_cost() if cost is None else cost
            self.on_update({"force_call": self.state.force_calls, "reason": reason, "labels_learned": len(labels),
                            "labels": len(self.ensemble.data), "update_s": update_s, "waited_s": waited_s,
                            "cycles": cycles, "chain_steps": chain_steps, "s_per_chain_step": update_s / max(chain_steps, 1),
                            "worker_s": worker_s, "overhead_s": update_s - worker_s,
                            "label_misfit_eV": abs(misfit.energy_residual_eV),
                            "label_force_misfit_eV_A": float(np.sqrt(np.mean(residual**2))),
                            "learned": learned, **extra})

    def _measure_newest(self, labels: list[Atoms]) -> bool:
        """Measure the updated ensemble's misfit at each walker's newest label (one that
        arrived during a background update included; ``labels``: those the update learned,
        for a checkpoint from before per-walker labels): whether the update learned them,
        i.e. the misfit left there, as the decision takes it (``label_misfit_as``) with σ_E,
        keeps P(|e| > ε) within the call level; under a force criterion (``criterion =
        "forces"`` or ``"both"``) also no atom's force off by more than ε_F there and
        P(max_a |ΔF_a| > ε_F) from the per-atom force stds there within the level: an update
        after which the rule would call at its own label has not learned it."""
        if self.ensemble.diverged():
            raise ModelFailure(
                "the posterior update diverged (non-finite weights); lower model.eta_max or use longer "
                "model.cycle_steps, then resume: the last checkpoint is from before this update"
            )
        start = time.perf_counter()
        if not self.newest:  # a checkpoint from before per-walker labels
            self.newest[int(labels[-1].info.get("walker", 0))] = labels[-1]
        walkers = sorted(self.newest)  # each walker's newest label (one that came during a background update too)
        force_sigma = {}
        if walkers:
            newest = [self.newest[w] for w in walkers]
            pred = self.ensemble.predict(newest)
            for i, (walker, label) in enumerate(zip(walkers, newest)):
                mine = pred.structure_index == i
                self.misfits[walker] = LabelMisfit.measure(label, pred.member_energy[:, i], pred.member_forces[:, mine],
                                                           self.ensemble.data.energy_offset)
                force_sigma[walker] = np.sqrt(pred.forces_var[mine].mean(axis=1))
        self.state.time_predict_s += time.perf_counter() - start
        sigma_e, d = self.ensemble.model.energy_sigma, self.decision
        for walker in walkers:  # the members' own miss, whether or not the MD is given it corrected
            mean, sigma, _ = self._with_misfit(self.misfits[walker], self.newest[walker], sigma_e, enabled=True,
                                               uncorrected=True)
            if d.wants_call(d.prob_exceed(sigma, mean)):
                return False
            if d.criterion != "energy" and (
                    np.linalg.norm(self.misfits[walker].force_residual_eV_A, axis=1).max() > d.force_threshold_eV_A
                    or d.wants_call(d.prob_force_exceed(force_sigma[walker]))):
                return False
        return True

    @property
    def _corrects(self) -> bool:
        """Whether the MD is given the members' mean less the carried label residual
        (``label_misfit_as = "correction"``, :meth:`~flytune.otf.decision.LabelMisfit.corrected`)."""
        uncertainty = self.ensemble.uncertainty
        return uncertainty.label_misfit and uncertainty.label_misfit_as == "correction"

    def _with_misfit(self, misfit: LabelMisfit | None, atoms: Atoms, sigma: float,
                     enabled: bool | None = None, uncorrected: bool = False) -> tuple[float, float, float]:
        """(μ, σ_t, r) (eV) at ``atoms`` for an ensemble std ``sigma``: the expected error,
        the std and the label misfit |d(x)| the decision uses, with ``misfit`` (the walker's
        newest label) entering as ``[uncertainty] label_misfit_as`` says
        (:func:`~flytune.otf.decision.carried_error` or :func:`~flytune.otf.decision.trusted_sigma`;
        as a correction, the bias's σ_t with μ = 0: the prediction has the residual taken off,
        unless ``uncorrected``); (0, σ, 0) without one or with ``label_misfit = false``
        (``enabled`` overrides it)."""
        uncertainty = self.ensemble.uncertainty
        if misfit is None or not (uncertainty.label_misfit if enabled is None else enabled):
            return 0.0, sigma, 0.0
        if uncertainty.label_misfit_as in ("bias", "correction"):
            residual, change = misfit.carried(atoms)
            mean, sigma_t = carried_error(sigma, residual, change)
            corrected = uncertainty.label_misfit_as == "correction" and not uncorrected
            return 0.0 if corrected else mean, sigma_t, abs(residual)
        r = misfit.at(atoms)
        return 0.0, float(trusted_sigma(sigma, self.ensemble.model.energy_sigma, r)), r

    def _label_all(self, calls: list[ForceCall], first_round: bool) -> None:
        """Label the structures of ``calls`` (steps of :meth:`evaluate` whose verdict asked
        for a call): each label is written as it returns; then, in order, its error feeds
        the calibration (σ predicted before the update) and the label the update schedule;
        at most one update learns them all. Fills each step's results with the reference's
        energy (plus the offset Δ), forces and stress."""
        update_running = bool(self.ensemble.learning)
        data = self.ensemble.data
        done, failure = {}, None
        start = time.perf_counter()
        for step, label, reference_s, replayed in self._reference_results(calls):
            if isinstance(label, ReferenceFailure):
                if self.on_failure == "skip" and not first_round:
                    self.state.skipped_failures += 1
                    step.uncontrolled = "reference failed"
                else:
                    failure = failure or label
                continue
            label.info.update(walker=step.walker, energy_pred=step.energy, energy_std=step.sigma,
                              prob_exceed=step.verdict.prob_exceed, energy_raw=label.get_potential_energy())
            if first_round and step is calls[0]:  # Δ from the run's first structure
                data.set_energy_offset(label)
            if data.energy_offset is not None:
                label.info.update(energy_offset=data.energy_offset)
            if self.on_label is not None and not replayed:
                self.on_label(label, {"first": step.verdict.reason == "first"})
            faults.point("label-written")
            done[step] = (label, reference_s)
        self.state.time_reference_wall_s += time.perf_counter() - start
        if failure is not None:
            raise failure
        labelled_steps = [step for step in calls if step in done]
        reasons = []
        for step in labelled_steps:
            label, reference_s = done[step]
            first = step.verdict.reason == "first"
            offset, raw = data.energy_offset, label.get_potential_energy()
            label.info.update(energy_offset=offset)
            step.error = raw + offset - step.energy
            step.calibrated = self.decision.calibrated_sigma(step.sigma)
            force_error = label.get_forces(apply_constraint=False) - step.forces
            step.force_error_max = float(np.linalg.norm(force_error, axis=1).max())
            if not first:
                self.decision.observe(step.error, step.sigma, step.error_mean)  # σ, μ predicted before the update
                if step.curvature is not None:  # e₁, the first-order corrected prediction's error
                    q, ratio, s = step.curvature
                    self.curvature_fit.observe(step.error + ratio * q, q, s)
                self.decision.observe_forces(force_error, step.forces_var)
            self.state.time_reference_s += reference_s
            reason = self.schedule.add(label, error_eV=step.error, reference_s=reference_s, first=first,
                                       force_error_eV_A=step.force_error_max)
            reasons.append(reason)
            step.waits_because = self.schedule.waits_because
            self.newest[step.walker] = label
        due = next((r for r in reasons if r is not None), None)
        update_s, learned = self.learn_pending(due) if due is not None else (0.0, 0)
        if due is not None and self.schedule.config.background:
            due = f"background: {due}" if learned else "deferred: an update is running"
        if due is None or self.schedule.config.background:  # the members that predicted here go on
            for step in labelled_steps:
                self.misfits[step.walker] = LabelMisfit.measure(done[step][0], step.member_energy,
                                                                step.member_forces, data.energy_offset)
        for n, step in enumerate(labelled_steps):
            label, reference_s = done[step]
            last = n == len(labelled_steps) - 1  # the update, if any, is booked on the round's last call
            self.state.reference_calls += 1
            self.state.walker_last_call[step.walker] = self.state.walker_force_calls[step.walker]
            raw, offset = label.get_potential_energy(), data.energy_offset
            intervention = Intervention(
                force_call=step.force_call, energy_pred=step.energy, energy_std=step.sigma,
                prob_exceed=step.verdict.prob_exceed, energy_ref_raw=raw, energy_ref=raw + offset,
                error=step.error, calibrated_std=step.calibrated,
                shape=self.decision.calibrator.posterior_shape, rate=self.decision.calibrator.posterior_rate,
                reference_s=reference_s, update_s=update_s if last else 0.0, first=step.verdict.reason == "first",
                reason=step.verdict.reason, labels_learned=learned if last else 0,
                update=due or ("deferred: " + step.waits_because if step.waits_because else "deferred"),
                label_misfit=step.misfit, error_mean=step.error_mean, by_misfit=step.by_misfit, update_running=update_running,
                correction=step.correction,
                curvature=0.0 if step.curvature is None else step.curvature[0],
                curvature_ratio=0.0 if step.curvature is None else step.curvature[1],
                walker=step.walker, calls_at_once=step.calls_at_once, force_error_max=step.force_error_max,
                prob_force_exceed=step.verdict.prob_force_exceed,
            )
            if self.on_intervention is not None:
                self.on_intervention(label, intervention)
            results = {"energy": raw + offset, "forces": label.get_forces(apply_constraint=False)}  # the MD applies its own
            if "stress" in label.calc.results and step.atoms.pbc.all():
                results["stress"] = label.get_stress(voigt=False)
            step.results, step.called = results, True

    # -- state for checkpoints ------------------------------------------------------
    def state_dict(self) -> dict:
        cache = result_cache(*(self._step_results or (self.atoms, self.results)))
        schedule = self.schedule.state_dict()
        if self._learning is not None:  # not in the checkpoint's data: waiting again on resume
            schedule["pending"] = [label_record(a) for a in self._learning[0]] + schedule["pending"]
        force_calibrator = self.decision.force_calibrator
        return {"state": asdict(self.state), "cache": cache, "schedule": schedule,
                "force_calibration": None if force_calibrator is None else force_calibrator.state_dict(),
                "misfits": {w: m.state_dict() for w, m in self.misfits.items()},
                "curvature_fit": None if self.curvature_fit is None else self.curvature_fit.state_dict(),
                "newest": {w: label_record(a) for w, a in self.newest.items()}}

    def load_state_dict(self, state: dict, atoms: Atoms | None = None) -> None:
        """Restore counters, the labels waiting for an update, each walker's newest label and
        misfit, and the result cache for ``atoms`` (so no extra call happens; without
        ``atoms``, for the structure the cache names: a script that restarts its MD from
        the last frame it wrote gets that frame's results from the cache, not a new force
        call)."""
        counters = dict(state["state"])
        last_call = counters.pop("last_call", None)  # a checkpoint from before walkers
        counters.setdefault("time_reference_wall_s", counters.get("time_reference_s", 0.0))  # from before the field
        if "walker_force_calls" not in counters:
            counters["walker_force_calls"] = {0: counters["force_calls"]}
            counters["walker_last_call"] = {0: last_call} if last_call is not None else {}
        self.state = CalculatorState(**counters)
        self.schedule.load_state_dict(state.get("schedule", {}))
        misfits = state.get("misfits", {0: state["misfit"]} if state.get("misfit") else {})
        self.misfits = {int(w): LabelMisfit.from_state_dict(m) for w, m in misfits.items()}
        self.newest = {int(w): label_from_record(r) for w, r in state.get("newest", {}).items()}
        if self.curvature_fit is not None and state.get("curvature_fit") is not None:
            self.curvature_fit = CurvatureFit.from_state_dict({**state["curvature_fit"],
                                                               "discount": self.curvature_fit.discount})
        force_calibration = state.get("force_calibration")
        if force_calibration is not None and self.decision.force_calibrator is not None:
            prior = self.decision.force_calibrator  # the settings in force now: a resume may change them
            kind = force_calibration_kind(force_calibration)
            if not isinstance(prior, FORCE_CALIBRATIONS[kind]):
                raise FlytuneError(
                    f"the checkpoint's force calibration is {kind!r}, the config's is not: set [uncertainty] "
                    f"force_calibration = {kind!r} to resume this run, or start a new run")
            restored = type(prior).from_state_dict(force_calibration)
            restored.shape, restored.rate, restored.discount = prior.shape, prior.rate, prior.discount
            self.decision.force_calibrator = restored
        restored = restore_results(state.get("cache"), atoms)  # a script's calculator has no Atoms yet
        if restored is not None:
            self.atoms, self.results = restored

