r"""The on-the-fly ASE calculator (method §6–§8).

At every force call it predicts with the ensemble, computes P(|e| > ε) from the
calibrated Student-t error model, and either returns the ensemble mean or labels the
structure with the reference: it records (e, σ) for calibration using the prediction
made before the update, adds the structure to the data, updates every chain and returns
the reference's energy (plus the energy offset Δ), forces and stress for that call.

Extra results readable from ``calc.results``: ``energy_std`` (eV), ``prob_exceed``,
``reference_called``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from flytune.bayes.ensemble import Ensemble
from flytune.data import labelled, same_composition
from flytune.errors import FlytuneError
from flytune.otf import faults
from flytune.otf.reference import Reference, ReferenceFailure


class ModelFailure(RuntimeError):
    """The posterior update diverged (non-finite weights or predictions)."""


class UpdateInterrupted(Exception):
    """A stop request (Ctrl-C) arrived during a posterior update. The label is already on
    disk and the last checkpoint is from before it, so a resumed run replays the label and
    redoes the update in full instead of keeping a cut one."""


@dataclass
class SafetyNets:
    """Limits on the decision. ``None`` switches a limit off."""

    max_reference_calls: int | None = None  # stop calling once reached
    min_steps_between_calls: int = 0  # force calls to wait after a call
    force_call_after: int | None = None  # call anyway after this many force calls without one
    on_failure: str = "stop"  # "stop" the run, or "skip": continue with the model's prediction


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
    update_s: float
    first: bool = False


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


@dataclass
class PendingLabel:
    """A label written before a kill but not yet in the checkpointed model: the reference
    result is reused when the resumed MD reaches the same structure."""

    force_call: int
    atoms: Atoms  # with the raw reference labels


class OnTheFlyCalculator(Calculator):
    """An ASE calculator that fine-tunes its ensemble with reference calls as it goes."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(
        self,
        ensemble: Ensemble,
        reference: Reference,
        *,
        threshold: float | None = None,
        confidence: float | None = None,
        safety: SafetyNets | None = None,
        on_step: Callable[[dict], None] | None = None,
        on_intervention: Callable[[Atoms, Intervention], None] | None = None,
        on_label: Callable[[Atoms, dict], None] | None = None,
        **kwargs,
    ):
        """``threshold`` ε in eV and ``confidence`` default to the ensemble's uncertainty
        settings. ``on_label`` is called with the labelled structure as soon as the
        reference returns (before the update), ``on_intervention`` after the update and
        ``on_step`` after every force call (the run directory writes its files there)."""
        super().__init__(**kwargs)
        self.ensemble = ensemble
        self.reference = reference
        self.threshold = ensemble.uncertainty.threshold_eV if threshold is None else threshold
        self.confidence = ensemble.uncertainty.confidence if confidence is None else confidence
        self.safety = safety or SafetyNets()
        self.state = CalculatorState()
        self.pending: list[PendingLabel] = []
        self.on_step, self.on_intervention, self.on_label = on_step, on_intervention, on_label
        self.stop = None  # a StopFlag: a stop during an update raises UpdateInterrupted

    # -- decision -------------------------------------------------------------------
    def _must_call(self, prob_exceed: float) -> bool:
        s, st = self.safety, self.state
        if len(self.ensemble.data) == 0:
            return True  # the first structure is always labelled
        if s.max_reference_calls is not None and st.reference_calls >= s.max_reference_calls:
            return False
        since = st.force_calls - st.last_call if st.last_call is not None else st.force_calls
        if since <= s.min_steps_between_calls:
            return False
        if s.force_call_after is not None and since >= s.force_call_after:
            return True
        return prob_exceed > 1.0 - self.confidence

    # -- ASE contract ----------------------------------------------------------------
    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        known = self.ensemble.data.structures
        if known and not same_composition([known[0], atoms]):
            raise FlytuneError(
                f"the composition changed from {known[0].get_chemical_formula()} to "
                f"{atoms.get_chemical_formula()}: the energy offset holds for one composition only; "
                "start a new run for the new composition"
            )
        self.state.force_calls += 1
        start = time.perf_counter()
        pred = self.ensemble.predict(atoms)
        self.state.time_predict_s += time.perf_counter() - start
        energy, sigma = float(pred.energy[0]), float(pred.energy_std[0])
        first = len(self.ensemble.data) == 0
        prob = 1.0 if first else float(self.ensemble.calibrator.prob_exceed(self.threshold, sigma))
        called = False
        results = {"energy": energy, "forces": pred.forces}
        if pred.stress is not None:
            results["stress"] = pred.stress[0]
        if self._must_call(prob):
            reference = self._label(atoms, energy, sigma, prob, first)
            if reference is not None:
                results, called = reference, True
        results["free_energy"] = results["energy"]
        if "stress" in results:
            results["stress"] = _voigt(results["stress"])
        results.update(energy_std=sigma, prob_exceed=prob, reference_called=called)
        self.results = results
        if self.on_step is not None:
            self.on_step({"force_call": self.state.force_calls, "energy_eV": results["energy"],
                          "energy_std_eV": sigma, "prob_exceed": prob, "reference_called": called})

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

    @staticmethod
    def _update_progress(chain: int, step: int, mean_ll: float) -> None:
        if step == 3:
            faults.point("mid-update")

    def _adopt(self, pending: PendingLabel) -> None:
        """Add a label whose structure the resumed run did not revisit (no loss, no call)."""
        self.ensemble.update([pending.atoms])

    def _label(self, atoms: Atoms, energy: float, sigma: float, prob: float, first: bool) -> dict | None:
        try:
            label, reference_s, replayed = self._reference_result(atoms)
        except ReferenceFailure:
            if self.safety.on_failure == "skip" and not first:
                self.state.skipped_failures += 1
                return None
            raise
        self.state.time_reference_s += reference_s
        calibrator = self.ensemble.calibrator
        if first:
            self.ensemble.set_energy_offset(label)
        offset = self.ensemble.energy_offset
        raw = label.get_potential_energy()
        error = raw + offset - energy
        calibrated = float(calibrator.calibrated_sigma(sigma))
        label.info.update(energy_raw=raw, energy_offset=offset, energy_pred=energy,
                          energy_std=sigma, prob_exceed=prob)
        if self.on_label is not None and not replayed:
            self.on_label(label, {"first": first})
        if not first:
            calibrator.observe(error, sigma)  # σ predicted before the update
        faults.point("label-written")
        start = time.perf_counter()
        self.ensemble.update([label], progress=self._update_progress, stop=self.stop)
        update_s = time.perf_counter() - start
        if any(chain.interrupted for chain in self.ensemble.chains):
            raise UpdateInterrupted
        if not all(bool(torch.isfinite(v).all()) for m in self.ensemble.members for v in m.values()):
            raise ModelFailure(
                "the posterior update diverged (non-finite weights); lower model.eta_max or use longer "
                "model.cycle_steps, then resume: the last checkpoint is from before this update"
            )
        self.state.time_update_s += update_s
        self.state.reference_calls += 1
        self.state.last_call = self.state.force_calls
        intervention = Intervention(
            force_call=self.state.force_calls, energy_pred=energy, energy_std=sigma, prob_exceed=prob,
            energy_ref_raw=raw, energy_ref=raw + offset, error=error, calibrated_std=calibrated,
            shape=calibrator.posterior_shape, rate=calibrator.posterior_rate,
            reference_s=reference_s, update_s=update_s, first=first,
        )
        if self.on_intervention is not None:
            self.on_intervention(label, intervention)
        results = {"energy": raw + offset, "forces": label.get_forces()}
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
        return {"state": asdict(self.state), "cache": cache}

    def load_state_dict(self, state: dict, atoms: Atoms) -> None:
        """Restore counters and the result cache for ``atoms`` (so no extra call happens)."""
        self.state = CalculatorState(**state["state"])
        cache = state.get("cache")
        if cache is not None:
            self.atoms = atoms.copy()
            self.atoms.positions = np.asarray(cache["positions"])
            self.atoms.cell = np.asarray(cache["cell"])
            self.results = {k: np.asarray(v) if isinstance(v, list) else v for k, v in cache["results"].items()}


def _voigt(stress) -> np.ndarray:
    stress = np.asarray(stress)
    if stress.shape == (3, 3):
        return np.array([stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]])
    return stress

