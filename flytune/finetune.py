"""Offline Bayesian fine-tuning on a fixed labelled data set (the paper's transfer-learning
experiments): M chains from the prior's start, each running a long initial phase and
then cosine cycles, one posterior sample at the end of each."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms

from flytune.bayes.chain import ChainJob, Progress, StopFlag
from flytune.bayes.ensemble import Ensemble
from flytune.bayes.schedules import Schedule, offline_schedule
from flytune.config import ModelConfig, OfflineConfig, UncertaintyConfig
from flytune.data import read_labelled
from flytune.errors import FlytuneError
from flytune.files import replacing
from flytune.progress import StepCounter


def finetune_schedule(config: ModelConfig, offline: OfflineConfig) -> Schedule:
    """Initial phase from η_start (default η_max) to η_end (default η_start/10), then cycles;
    with ``offline.noise`` false every τ_k is 0 (noise-free fits)."""
    eta_start = offline.eta_start or config.eta_max
    schedule = offline_schedule(
        offline.initial_steps,
        eta_start=eta_start,
        eta_end=offline.eta_end or eta_start / 10,
        cycles=offline.samples_per_chain - 1,
        cycle_steps=offline.cycle_steps,
        eta_max=eta_start,
        noise_off=config.noise_off_fraction,
        ramp=config.ramp_fraction,
    )
    if not offline.noise:
        schedule = dataclasses.replace(schedule, temperature=np.zeros_like(schedule.temperature))
    return schedule


def finetune(
    structures: Sequence[Atoms],
    config: ModelConfig,
    uncertainty: UncertaintyConfig | None = None,
    offline: OfflineConfig | None = None,
    progress: Progress | None = None,
    stop: StopFlag | None = None,
) -> Ensemble:
    """Fit an ensemble to labelled ``structures``.

    The energy offset is taken from the first structure (its reference energy is made
    equal to the pretrained prediction) and stored with the ensemble. Minibatches are
    drawn uniformly. If ``stop`` is set, every chain stops at its next step and keeps
    the samples taken so far (its current state if it has none). The caller closes the
    returned ensemble (worker processes). A chain that ends with a non-finite weight
    (the step size too large for it) is a :class:`~flytune.errors.FlytuneError`.
    """
    offline = offline or OfflineConfig()
    ensemble = Ensemble.from_config(config, uncertainty, seed=offline.seed)
    try:
        ensemble.data.extend(structures)
        schedule = finetune_schedule(ensemble.config, offline)
        jobs = [ChainJob(c, schedule, new_labels=0, replace_samples=False) for c in ensemble.chains]
        ensemble.run(jobs, progress, stop)
        diverged = ensemble.diverged()
        if diverged:
            raise FlytuneError(
                f"chain(s) {diverged} of {len(ensemble.chains)} diverged (non-finite weights); lower the step size "
                f"(eta_start, now {schedule.step_size[0]:g}; from random weights, with the uninformative prior, the "
                "SGHMC noise needs a smaller one than a noise-free fit)"
            )
    except BaseException:
        ensemble.close()
        raise
    return ensemble


#: the model file in a fine-tuning output folder
MODEL_FILE = "model.pt"


def finetune_folder(
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: ModelConfig,
    uncertainty: UncertaintyConfig | None = None,
    offline: OfflineConfig | None = None,
    *,
    frames: str = ":",
    overwrite: bool = False,
    progress: Progress | None = None,
    stop: StopFlag | None = None,
) -> dict:
    """``flytune finetune``: read and validate ``data``, fine-tune, and write ``out``
    (``model.pt``, ``finetune.json``) atomically: nothing is left there on an error.

    Returns the summary written to ``finetune.json`` (``interrupted`` is true when
    ``stop`` ended the chains early; the samples taken so far are kept).
    """
    offline = offline or OfflineConfig()
    structures = read_labelled(data, frames)
    out = Path(out)
    occupied = any(out.iterdir()) if out.is_dir() else out.exists()
    if occupied and not overwrite:
        raise FlytuneError(f"output folder {str(out)!r} exists; choose another --out or pass --overwrite")
    with replacing(out) as tmp:
        tmp.mkdir(parents=True)
        start = time.perf_counter()
        steps = StepCounter(progress)
        with finetune(structures, config, uncertainty, offline, progress=steps, stop=stop) as ensemble:
            wall = time.perf_counter() - start
            ensemble.save(tmp / MODEL_FILE)
            summary = {
                "data": os.fspath(data),
                "frames": frames,
                "n_structures": len(structures),
                "n_members": len(ensemble.members),
                "energy_offset": ensemble.data.energy_offset,
                "interrupted": any(c.interrupted for c in ensemble.chains),
                "wall_time_s": wall,
                "chain_steps": steps.completed,
                "chain_steps_per_s": steps.completed / wall,
                "model": ensemble.config.model_dump(mode="json"),
                "uncertainty": ensemble.uncertainty.model_dump(mode="json"),
                "offline": offline.model_dump(mode="json"),
            }
        (tmp / "finetune.json").write_text(json.dumps(summary, indent=2))
    return summary

