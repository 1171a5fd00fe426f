r"""The on-the-fly ASE calculator (method §6–§8).

At every force call it predicts with the ensemble and asks the :class:`Decision`
(calibrated P(|e| > ε) and the safety nets) whether to call the reference. Without a
call it returns the ensemble mean; with one it labels the structure, records (e, σ) for
the calibration using the prediction made before the update, queues the label for the
posterior update (:class:`UpdateSchedule`: at once, or deferred) and returns the
reference's energy (plus the energy offset Δ), forces and, for periodic structures,
stress. A step where the rule asked for a call that a limit or a failed reference kept
from being made is *uncontrolled*: it is counted and named.

Properties: ``energy``, ``free_energy``, ``forces``, and ``stress`` for structures
periodic in all three directions. Extra results readable from ``calc.results``:
``energy_std`` (eV: the σ the decision used, the ensemble's with the label misfit of
:func:`flytune.otf.decision.trusted_sigma`), ``prob_exceed``, ``reference_called``, ``uncontrolled`` (why the
step ran without the call the rule asked for; empty if it did not).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from flytune.bayes.calibration import Calibrator
from flytune.bayes.chain import Progress
from flytune.bayes.ensemble import Ensemble
from flytune.bayes.runners import worker_of
from flytune.config import SafetyConfig, UpdatesConfig
from flytune.data import labelled
from flytune.otf import faults
from flytune.otf.decision import Decision, LabelMisfit, trusted_sigma
from flytune.otf.reference import Reference, ReferenceFailure
from flytune.otf.rundir import label_record
from flytune.otf.updates import UpdateSchedule


class ModelFailure(RuntimeError):
    """The posterior update diverged (non-finite weights or predictions)."""


class UpdateInterrupted(Exception):
    """A stop request (Ctrl-C) arrived during a posterior update. The label is already on
    disk and the last checkpoint is from before it, so a resumed run replays the label and
    redoes the update in full instead of keeping a cut one."""


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
    #: called because r raised σ: with the ensemble's σ alone P(|e| > ε) was below the level
    by_misfit: bool = False
    #: why the posterior update ran right after this call (flytune.otf.updates), or "deferred"
    update: str = "every"
    labels_learned: int = 1  # labels that update learned (this one and those deferred before it)
    #: a background update was running during the call (the two shared the machine)
    update_running: bool = False


@dataclass
class CalculatorState:
    """Counters that a checkpoint must carry."""

    force_calls: int = 0
    reference_calls: int = 0
    last_call: int | None = None  # force-call index of the last reference call
    time_predict_s: float = 0.0
    time_reference_s: float = 0.0
    time_update_s: float = 0.0
    skipped_failures: int = 0
    updates: int = 0
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
            calibrator or Calibrator(u.calibration_shape, u.calibration_rate),
            u.threshold_eV if threshold is None else threshold,
            u.confidence if confidence is None else confidence,
            safety,
            u.calibration_checks,
        )
        self.schedule = UpdateSchedule(updates, self.decision.threshold_eV)
        self.on_failure = on_failure
        self.state = CalculatorState()
        self.pending: list[PendingLabel] = []
        self.on_step, self.on_intervention, self.on_label = on_step, on_intervention, on_label
        self.on_update = on_update
        #: (labels, reason, force call at its start, seconds its start took) of an update
        #: running in the background
        self._learning: tuple[list[Atoms], str, int, float] | None = None
        self._due: str | None = None  # why an update is due once the background one finishes
        self.misfit: LabelMisfit | None = None  # of the members that predict now, at the newest label
        self.on_update_progress = on_update_progress
        self.stop = None  # a StopFlag: a stop during an update raises UpdateInterrupted

    # -- ASE contract ----------------------------------------------------------------
    @property
    def implemented_properties(self) -> list[str]:
        """Stress only for periodic structures (the run's, once the calculator has seen one)."""
        known = self.atoms if self.atoms is not None else next(iter(self.ensemble.data.structures), None)
        periodic = known is None or bool(known.pbc.all())
        return ["energy", "free_energy", "forces"] + (["stress"] if periodic else [])

    def get_property(self, name, atoms=None, allow_calculation=True):
        structure = atoms if atoms is not None else self.atoms
        if name == "stress" and structure is not None and not structure.pbc.all():
            raise PropertyNotImplementedError(
                f"stress is defined for structures periodic in all three directions; "
                f"{structure.get_chemical_formula()} has pbc={structure.pbc.tolist()}"
            )
        return super().get_property(name, atoms, allow_calculation)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        self.ensemble.data.check_composition(atoms, fix="start a new run for the new composition")
        self.poll_update()
        self.state.force_calls += 1
        start = time.perf_counter()
        pred = self.ensemble.predict(atoms)
        predict_s = time.perf_counter() - start
        self.state.time_predict_s += predict_s
        energy, sigma = float(pred.energy[0]), float(pred.energy_std[0])
        st = self.state
        misfit = self.misfit.at(atoms) if self.misfit is not None and self.ensemble.uncertainty.label_misfit else 0.0
        ensemble_sigma, sigma = sigma, float(trusted_sigma(sigma, self.ensemble.model.energy_sigma, misfit))
        verdict = self.decision.decide(
            sigma, labels=len(self.ensemble.data) + len(self.schedule.pending), reference_calls=st.reference_calls,
            since_call=st.force_calls - st.last_call if st.last_call is not None else st.force_calls,
        )
        called = False
        uncontrolled = verdict.reason if verdict.uncontrolled else ""
        results = {"energy": energy, "forces": pred.forces}
        if pred.stress is not None and atoms.pbc.all():
            results["stress"] = pred.stress[0]
        if verdict.call:
            by_misfit = (verdict.reason == "probability" and sigma > ensemble_sigma
                         and not self.decision.wants_call(self.decision.prob_exceed(ensemble_sigma)))
            reference = self._label(atoms, energy, pred.forces, sigma, verdict.prob_exceed, verdict.reason, misfit,
                                    by_misfit)
            if reference is not None:
                results, called = reference, True
            else:
                uncontrolled = "reference failed"
        if uncontrolled:
            st.uncontrolled[uncontrolled] = st.uncontrolled.get(uncontrolled, 0) + 1
        results["free_energy"] = results["energy"]
        if "stress" in results:
            results["stress"] = full_3x3_to_voigt_6_stress(results["stress"])
        results.update(energy_std=sigma, prob_exceed=verdict.prob_exceed, reference_called=called,
                       uncontrolled=uncontrolled)
        self.results = results
        if self.on_step is not None:
            self.on_step({"force_call": st.force_calls, "energy_eV": results["energy"], "energy_std_eV": sigma,
                          "prob_exceed": verdict.prob_exceed, "reference_called": called,
                          "uncontrolled": uncontrolled, "predict_s": predict_s})

    def _reference_result(self, atoms: Atoms) -> tuple[Atoms, float, bool]:
        """(labelled structure, reference seconds, replayed): a pending label written before
        a kill when the resumed MD reaches the same structure, else a fresh reference call."""
        while self.pending and self.pending[0].force_call < self.state.force_calls:
            self._adopt(self.pending.pop(0))  # the resumed MD went elsewhere: keep the label
        if self.pending and self.pending[0].force_call == self.state.force_calls:
            candidate = self.pending.pop(0)
            if np.array_equal(candidate.atoms.positions, atoms.positions):
                return candidate.atoms, 0.0, True
            self._adopt(candidate)
        result = self.reference.compute(atoms)
        label = labelled(atoms, result.energy, result.forces, result.stress)
        label.info.update(force_call=self.state.force_calls)
        return label, result.wall_s, False

    def _update_progress(self, chain: int, step: int, mean_ll: float) -> None:
        if step == 3:
            faults.point("mid-update")
        if self.on_update_progress is not None:
            self.on_update_progress(chain, step, mean_ll)

    def _adopt(self, pending: PendingLabel) -> None:
        """Queue a label whose structure the resumed run did not revisit (no loss, no call)."""
        reason = self.schedule.add(pending.atoms, error_eV=0.0, reference_s=0.0)
        if reason is not None:
            self.learn_pending(reason)

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
        update_s = time.perf_counter() - start
        if any(chain.interrupted for chain in self.ensemble.chains):
            raise UpdateInterrupted
        self._updated(reason, labels, update_s, update_s)
        return update_s, len(labels)

    def poll_update(self, block: bool = False) -> None:
        """Swap in the chains of a background update that has finished (``block``: wait
        for it), then start the next one if labels became due meanwhile."""
        if not self.ensemble.learning:
            return
        start = time.perf_counter()
        wall = self.ensemble.finish_update(block, self._update_progress, self.stop)
        if wall is None:
            return
        if any(chain.interrupted for chain in self.ensemble.chains):
            raise UpdateInterrupted
        (labels, reason, started, submit_s), self._learning = self._learning, None
        self._updated("background: " + reason, labels, submit_s + wall, submit_s + time.perf_counter() - start,
                      started_force_call=started)
        due, self._due = self._due, None
        if due is not None and not block:
            self.learn_pending(due)

    def _updated(self, reason: str, labels: list[Atoms], update_s: float, waited_s: float, **extra) -> None:
        """Book an update of ``update_s`` seconds (wall, start to finish) that learned
        ``labels`` and during which the MD waited ``waited_s``; measure the updated
        ensemble's misfit at the run's newest label (one that arrived during a background
        update included); ``extra`` goes into its record."""
        if not all(bool(torch.isfinite(v).all()) for m in self.ensemble.members for v in m.values()):
            raise ModelFailure(
                "the posterior update diverged (non-finite weights); lower model.eta_max or use longer "
                "model.cycle_steps, then resume: the last checkpoint is from before this update"
            )
        start = time.perf_counter()
        newest = self.schedule.pending[-1] if self.schedule.pending else labels[-1]
        pred = self.ensemble.predict(newest)
        self.misfit = LabelMisfit.measure(newest, float(pred.energy[0]), pred.forces, self.ensemble.data.energy_offset)
        self.state.time_predict_s += time.perf_counter() - start
        self.schedule.updated(update_s)
        self.state.time_update_s += waited_s
        self.state.updates += 1
        if self.on_update is not None:
            residual = self.misfit.force_residual_eV_A
            chains = self.ensemble.chains
            chain_steps = sum(chain.state.step for chain in chains)
            workers = max(1, self.ensemble.config.workers)  # the longest worker's compute:
            worker_s = max(sum(c.run_s for c in chains if worker_of(c.index, workers) == w) for w in range(workers))
            self.on_update({"force_call": self.state.force_calls, "reason": reason, "labels_learned": len(labels),
                            "labels": len(self.ensemble.data), "update_s": update_s, "waited_s": waited_s,
                            "chain_steps": chain_steps, "s_per_chain_step": update_s / max(chain_steps, 1),
                            "worker_s": worker_s, "overhead_s": update_s - worker_s,
                            "label_misfit_eV": abs(self.misfit.energy_residual_eV),
                            "label_force_misfit_eV_A": float(np.sqrt(np.mean(residual**2))), **extra})

    def _label(self, atoms: Atoms, energy: float, forces: np.ndarray, sigma: float, prob: float, reason: str,
               misfit: float = 0.0, by_misfit: bool = False) -> dict | None:
        """Call the reference at ``atoms``, where the ensemble predicted ``energy`` (eV,
        with the offset) and ``forces`` (eV/Å); learn the label now or queue it."""
        first = reason == "first"
        update_running = bool(self.ensemble.learning)
        try:
            label, reference_s, replayed = self._reference_result(atoms)
        except ReferenceFailure:
            if self.on_failure == "skip" and not first:
                self.state.skipped_failures += 1
                return None
            raise
        self.state.time_reference_s += reference_s
        data = self.ensemble.data
        offset = data.set_energy_offset(label) if first else data.energy_offset
        raw = label.get_potential_energy()
        error = raw + offset - energy
        calibrated = self.decision.calibrated_sigma(sigma)
        label.info.update(energy_raw=raw, energy_offset=offset, energy_pred=energy,
                          energy_std=sigma, prob_exceed=prob)
        if self.on_label is not None and not replayed:
            self.on_label(label, {"first": first})
        if not first:
            self.decision.observe(error, sigma)  # σ predicted before the update
        faults.point("label-written")
        update = self.schedule.add(label, error_eV=error, reference_s=reference_s, first=first)
        update_s, learned = self.learn_pending(update) if update is not None else (0.0, 0)
        if update is not None and self.schedule.config.background:
            update = f"background: {update}" if learned else "deferred: an update is running"
        if update is None or self.schedule.config.background:  # the members that predicted here go on
            self.misfit = LabelMisfit.measure(label, energy, forces, offset)
        self.state.reference_calls += 1
        self.state.last_call = self.state.force_calls
        intervention = Intervention(
            force_call=self.state.force_calls, energy_pred=energy, energy_std=sigma, prob_exceed=prob,
            energy_ref_raw=raw, energy_ref=raw + offset, error=error, calibrated_std=calibrated,
            shape=self.decision.calibrator.posterior_shape, rate=self.decision.calibrator.posterior_rate,
            reference_s=reference_s, update_s=update_s, first=first, reason=reason,
            update=update or "deferred", labels_learned=learned, label_misfit=misfit,
            by_misfit=by_misfit, update_running=update_running,
        )
        if self.on_intervention is not None:
            self.on_intervention(label, intervention)
        results = {"energy": raw + offset, "forces": label.get_forces(apply_constraint=False)}  # the MD applies its own
        if "stress" in label.calc.results and atoms.pbc.all():
            results["stress"] = label.get_stress(voigt=False)
        return results

    # -- state for checkpoints ------------------------------------------------------
    def state_dict(self) -> dict:
        cache = None
        if self.atoms is not None and self.results:
            cache = {"positions": self.atoms.positions.tolist(), "cell": np.asarray(self.atoms.cell).tolist(),
                     "results": {k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v
                                 for k, v in self.results.items()}}
        schedule = self.schedule.state_dict()
        if self._learning is not None:  # not in the checkpoint's data: waiting again on resume
            schedule["pending"] = [label_record(a) for a in self._learning[0]] + schedule["pending"]
        misfit = self.misfit.state_dict() if self.misfit is not None else None
        return {"state": asdict(self.state), "cache": cache, "schedule": schedule, "misfit": misfit}

    def load_state_dict(self, state: dict, atoms: Atoms) -> None:
        """Restore counters, the labels waiting for an update and the result cache for
        ``atoms`` (so no extra call happens)."""
        self.state = CalculatorState(**state["state"])
        self.schedule.load_state_dict(state.get("schedule", {}))
        misfit = state.get("misfit")
        self.misfit = LabelMisfit.from_state_dict(misfit) if misfit is not None else None
        cache = state.get("cache")
        if cache is not None:
            self.atoms = atoms.copy()
            self.atoms.positions = np.asarray(cache["positions"])
            self.atoms.cell = np.asarray(cache["cell"])
            self.results = {k: np.asarray(v) if isinstance(v, list) else v for k, v in cache["results"].items()}

