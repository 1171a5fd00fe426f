"""The run directory of a calculator that a user's script drives
(``OnTheFlyCalculator.from_pretrained(..., run_dir=...)``).

The calculator writes what ``flytune run`` writes: ``labels.extxyz`` and the exact label
records the moment the reference returns, ``steps.csv`` (one row per force call),
``interventions.jsonl``, ``updates.jsonl``, a checkpoint after every reference call and
every ``checkpoint_every`` force calls, and, when the ``with`` block ends,
``summary.json`` and ``model.pt``; ``flytune status`` and ``flytune report`` read it.

The driver is the script's own, so the "step" of these files is the calculator's force
call (0, 1, ...), and ``time_fs`` is step × ``timestep_fs`` when the script gives its
time step (else the step itself). A script started again on the same ``run_dir``
resumes the calculator from its checkpoint: ensemble, calibration, counters, waiting
labels. The MD state is the script's: ASE drivers start from the structure the script
gives them, so restart the MD from the last frame it wrote (``ase.io.Trajectory``) to
continue the trajectory; labels written after the checkpoint are reused if the MD
reaches the same structure at the same force call, and learned as they are otherwise,
so no reference calculation is lost or repeated.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from flytune.bayes.calibration import Calibrator
from flytune.bayes.ensemble import Ensemble, saved_calibrator
from flytune.config import UncertaintyConfig
from flytune.errors import FlytuneError
from flytune.otf.calculator import Intervention, OnTheFlyCalculator
from flytune.otf.rundir import RunDirectory

FORMAT = "flytune.script/1"


class ScriptRun:
    """Keeps ``calc``'s run directory (see the module docstring)."""

    def __init__(self, rd: RunDirectory, calc: OnTheFlyCalculator, checkpoint_every: int,
                 timestep_fs: float | None, wall_before: float = 0.0):
        self.rd, self.calc = rd, calc
        self.checkpoint_every = checkpoint_every
        self.timestep_fs = timestep_fs
        self.wall_before = wall_before
        self._start = time.perf_counter()
        calc.on_label, calc.on_step = self._on_label, self._on_step
        calc.on_intervention, calc.on_update = self._on_intervention, self._on_update

    @classmethod
    def open(cls, run_dir, identity: dict, settings: dict, uncertainty: UncertaintyConfig,
             build: Callable[[Ensemble | None, Calibrator | None], OnTheFlyCalculator], checkpoint_every: int = 100,
             timestep_fs: float | None = None, log: Callable[[str], None] = print) -> ScriptRun:
        """Lock ``run_dir`` and build the calculator (``build(ensemble, calibrator)``, both
        None for a new run): fresh, or resumed from its checkpoint, where ``uncertainty``
        (ε, confidence, calibration prior) takes effect. ``identity``: the settings that
        define the run (a directory made with others is refused); ``settings``: the
        tables as dumped (``run_config.json``)."""
        from flytune.otf.run import apply_changed_settings, replay_labels_after

        rd = RunDirectory(run_dir)
        saved = json.loads(rd.config.read_text()) if rd.config.exists() else None
        if saved is not None and saved.get("script") is None:
            raise FlytuneError(f"{str(rd.path)!r} is the run directory of `flytune run`; give a script its own run_dir")
        if saved is not None and (rd.resumable or rd.read_exact_labels()):
            changed = {k: (saved["identity"].get(k), v) for k, v in identity.items() if saved["identity"].get(k) != v}
            if changed:
                what = ", ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in changed.items())
                raise FlytuneError(f"run directory {str(rd.path)!r} was made with other settings ({what}) and cannot "
                                   "be resumed; use a new run_dir")
        rd.lock()
        try:
            if rd.resumable:
                ck = rd.read_checkpoint()
                model = settings["model"]
                ensemble = Ensemble.from_state_dict(ck["ensemble"], workers=model["workers"], device=model["device"])
                calibrator = saved_calibrator(ck["ensemble"])
                apply_changed_settings(ensemble, calibrator, uncertainty, log)
                calc = build(ensemble, calibrator)
                calc.load_state_dict(ck["calculator"])
                run = cls(rd, calc, checkpoint_every, timestep_fs, ck["wall_s"])
                pending = replay_labels_after(rd, calc, ck["counts"])
                log(f"resuming {rd.path} at force call {calc.state.force_calls} ({calc.state.reference_calls} "
                    f"reference calls, {pending} label(s) to reuse)")
            else:
                calc = build(None, None)
                run = cls(rd, calc, checkpoint_every, timestep_fs)
                if replay_labels_after(rd, calc, {"labels": 0, "steps": 0, "interventions": 0, "frames": 0}):
                    log(f"restarting {rd.path} from its start, reusing the labels it had")
            rd.write_json(rd.config, {"identity": identity, "script": True, "config": settings})
        except BaseException:
            rd.unlock()
            raise
        return run

    # -- records ----------------------------------------------------------------------
    def _stamp(self, record: dict, force_call: int) -> dict:
        step = force_call - 1
        record.update(step=step, time_fs=step * self.timestep_fs if self.timestep_fs else float(step))
        return record

    def _on_label(self, atoms, meta: dict) -> None:
        self._stamp(atoms.info, int(atoms.info["force_call"]))
        self.rd.append_label(atoms)

    def _on_intervention(self, atoms, iv: Intervention) -> None:
        record = self._stamp(dataclasses.asdict(iv), iv.force_call)
        record["wall_s"] = self.wall_s
        self.rd.append_intervention(record)

    def _on_update(self, record: dict) -> None:
        self.rd.append_update(self._stamp(record, record["force_call"]))

    def _on_step(self, row: dict) -> None:
        row.pop("walker", None)
        self.rd.append_step(self._stamp(row, row["force_call"]))
        if row["reference_called"] or row["force_call"] % self.checkpoint_every == 0:
            self.checkpoint()

    @property
    def wall_s(self) -> float:
        return self.wall_before + time.perf_counter() - self._start

    def checkpoint(self) -> None:
        calc, st = self.calc, self.calc.state
        self.rd.write_checkpoint({
            "format": FORMAT,
            "ensemble": calc.ensemble.state_dict(calc.decision.calibrator),
            "calculator": calc.state_dict(),
            "counts": {"labels": len(calc.ensemble.data) + len(calc.schedule.pending), "steps": st.force_calls,
                       "interventions": st.reference_calls, "updates": st.updates, "frames": 0},
            "wall_s": self.wall_s,
        })

    def close(self, consistent: bool = True) -> dict | None:
        """Write the last checkpoint, ``summary.json`` and ``model.pt`` (when the calculator
        is ``consistent``: not stopped inside a force call, whose labels the next start
        reuses), and release the directory; returns the summary."""
        from flytune.otf.run import summarize

        try:
            if not consistent:
                return None
            self.calc.adopt_pending()
            if self.calc.schedule.pending or self.calc.ensemble.learning:
                self.calc.learn_pending("end of run")  # model.pt learns every label
            self.checkpoint()
            steps = self.calc.state.force_calls
            simulated = steps * self.timestep_fs / 1000 if self.timestep_fs else None
            summary = summarize(self.rd, self.calc, steps, simulated, self.wall_s, None)
            self.rd.write_json(self.rd.summary, summary)
            self.calc.ensemble.save(Path(self.rd.path) / "model.pt", self.calc.decision.calibrator)
            return summary
        finally:
            self.rd.unlock()
