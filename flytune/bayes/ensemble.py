r"""The ensemble of M chains: updates, prediction, saving and loading (method §4–§5).

Prediction combines members m = 1..M with means μ_m and variances σ_m² as

    μ = mean_m μ_m,     σ² = Var_m(μ_m) + mean_m σ_m²      (Var with the M − 1 denominator)

for the energy, every force component and every stress component.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms
from torch.func import functional_call

from flytune.bayes.calibration import Calibrator
from flytune.bayes.chain import Chain, ChainJob, Progress, SamplerSettings, StopFlag
from flytune.bayes.dataset import TrainingSet
from flytune.bayes.early_stop import EarlyStop
from flytune.bayes.model import ModelSpec, ProbabilisticModel
from flytune.bayes.prior import GaussianPrior, random_start, transfer_prior, uninformative_prior
from flytune.bayes.runners import ProcessRunner, Runner, make_runner
from flytune.bayes.schedules import Schedule, cycle_schedule
from flytune.bayes.tree import resolve_device, tree_to
from flytune.config import ModelConfig, UncertaintyConfig
from flytune.errors import FlytuneError
from flytune.files import replacing

FORMAT = "flytune.ensemble/1"
Params = dict[str, torch.Tensor]


@dataclass
class EnsemblePrediction:
    """Ensemble mean and total variance (ASE units) of a batch of S structures."""

    energy: np.ndarray  # (S,)
    energy_var: np.ndarray  # (S,)
    forces: np.ndarray  # (A, 3)
    forces_var: np.ndarray  # (A, 3)
    stress: np.ndarray | None  # (S, 3, 3)
    stress_var: np.ndarray | None  # (S, 3, 3)
    structure_index: np.ndarray  # (A,)
    #: (A,) eV/Å: each atom's force deviation among the members, :func:`force_deviation`
    force_deviation: np.ndarray | None = None
    member_energy: np.ndarray | None = None  # (M, S) eV: each member's mean energy
    member_forces: np.ndarray | None = None  # (M, A, 3) eV/Å: each member's mean forces

    @property
    def energy_std(self) -> np.ndarray:
        return np.sqrt(self.energy_var)


def force_deviation(member_forces: np.ndarray) -> np.ndarray:
    r"""Each atom's force deviation among the M members (the "model deviation" of DP-GEN
    and aims-PAX), from member forces of shape (M, A, 3):

        d_a = sqrt( (1/M) Σ_m |F_a^m − F̄_a|² ),

    the members' disagreement alone: no likelihood noise σ_F and no calibration.
    """
    return np.sqrt(np.mean(np.sum((member_forces - member_forces.mean(axis=0)) ** 2, axis=-1), axis=0))


def combine(means: np.ndarray, variances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ, σ²) over the leading member axis: σ² = Var_m(μ_m) (ddof 1; 0 if M = 1) + mean σ_m²."""
    epistemic = means.var(axis=0, ddof=1) if means.shape[0] > 1 else np.zeros(means.shape[1:])
    return means.mean(axis=0), epistemic + variances.mean(axis=0)


def _member_outputs(
    model: ProbabilisticModel, params: Params, batch, functional: bool = False
) -> dict[str, torch.Tensor]:
    """One member's energy, forces, σ_F (and stress if periodic) as a dict of tensors."""
    pred = functional_call(model, params, (batch,), {"functional": functional})
    out = {"energy": pred.energy, "forces": pred.forces, "force_sigma": pred.force_sigma}
    if pred.stress is not None:
        out["stress"] = pred.stress
    return out


class Ensemble:
    """M SGHMC chains sharing a prior and a data set (which holds the energy offset).

    Its model is built with torch's deterministic algorithms switched on
    (:func:`flytune.bayes.tree.reproducible`).
    """

    def __init__(
        self,
        spec: ModelSpec,
        config: ModelConfig,
        uncertainty: UncertaintyConfig,
        prior: GaussianPrior,
        chains: list[Chain],
        *,
        model: ProbabilisticModel | None = None,
        energy_offset: float | None = None,
        seed: int = 0,
        data_state: dict | None = None,
    ):
        self.spec = spec
        self.config = config
        self.uncertainty = uncertainty
        self.prior = prior
        self.chains = chains
        self.model = model if model is not None else spec.build()
        self.model.eval()
        self.data = (
            TrainingSet.from_state_dict(self.model.backbone, data_state, energy_offset)
            if data_state is not None
            else TrainingSet(self.model.backbone, energy_offset)
        )
        self.seed = seed
        self._runner: Runner | None = None
        self._learning = 0  # structures at the end of data that a background update is learning
        self._started = 0.0
        self._stacked: tuple[tuple[Chain, ...], Params] | None = None

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_config(
        cls, config: ModelConfig, uncertainty: UncertaintyConfig | None = None, seed: int = 0
    ) -> Ensemble:
        """M chains at the start of the posterior: θ0 (transfer) or random weights (uninformative)."""
        config, uncertainty = _resolved(config, uncertainty)
        spec = model_spec(config, uncertainty)
        model = spec.build()
        if config.prior == "transfer":
            prior = transfer_prior(model, config.sigma_prior)
            starts = [prior.centre] * config.chains
        else:
            prior = uninformative_prior(model, config.uninformative_sigma_prior)
            starts = [random_start(model, seed * 7919 + m) for m in range(config.chains)]
        chains = [Chain.start(m, starts[m], seed) for m in range(config.chains)]
        return cls(spec, config, uncertainty, prior, chains, model=model, seed=seed)

    @classmethod
    def pretrained(
        cls, backbone: str, uncertainty: UncertaintyConfig | None = None, device: str = "cpu"
    ) -> Ensemble:
        """The pretrained model as a one-member ensemble, σ head at its initial value."""
        config, uncertainty = _resolved(ModelConfig(backbone=backbone, device=device), uncertainty)
        spec = model_spec(config, uncertainty)
        model = spec.build()
        prior = transfer_prior(model, config.sigma_prior)
        chain = Chain.start(0, prior.centre, 0)
        return cls(spec, config, uncertainty, prior, [chain], model=model)

    # -- members and prediction -----------------------------------------------------
    @property
    def members(self) -> list[Params]:
        """Parameter sets that predict: every chain's samples (its current state if none)."""
        return [s for c in self.chains for s in self._chain_members(c)]

    @staticmethod
    def _chain_members(chain: Chain) -> list:
        """One chain's parameter sets that predict: its samples, or its current state if none."""
        return chain.samples or [chain.state.params]

    def diverged(self) -> list[int]:
        """Indices of the chains with a non-finite weight in a member: a sampler that diverged."""
        return [c.index for c in self.chains
                if not all(bool(torch.isfinite(v).all()) for p in self._chain_members(c) for v in p.values())]

    def predict(self, structures: Atoms | Sequence[Atoms], batch_size: int = 16) -> EnsemblePrediction:
        """Ensemble mean and total variance of energy, forces and stress (periodic only)."""
        structures = [structures] if isinstance(structures, Atoms) else list(structures)
        parts = [self._predict_batch(structures[i : i + batch_size]) for i in range(0, len(structures), batch_size)]
        if len(parts) == 1:
            return parts[0]
        offsets = np.cumsum([0] + [len(p.energy) for p in parts[:-1]])
        has_stress = all(p.stress is not None for p in parts)
        return EnsemblePrediction(
            energy=np.concatenate([p.energy for p in parts]),
            energy_var=np.concatenate([p.energy_var for p in parts]),
            forces=np.concatenate([p.forces for p in parts]),
            forces_var=np.concatenate([p.forces_var for p in parts]),
            stress=np.concatenate([p.stress for p in parts]) if has_stress else None,
            stress_var=np.concatenate([p.stress_var for p in parts]) if has_stress else None,
            structure_index=np.concatenate([p.structure_index + o for p, o in zip(parts, offsets)]),
            force_deviation=np.concatenate([p.force_deviation for p in parts]),
            member_energy=np.concatenate([p.member_energy for p in parts], axis=1),
            member_forces=np.concatenate([p.member_forces for p in parts], axis=1),
        )

    def member_predictions(self, structures: Sequence[Atoms]):
        """Per-member (means, variances) of energy, forces, stress for one batch.

        All members in one pass (``torch.func.vmap`` over the stacked parameters) where
        the backbone says it is faster (:meth:`Backbone.one_pass`), else one by one.
        """
        batch = self.model.backbone.batch(structures)
        members = self.members
        if len(members) > 1 and self.model.backbone.one_pass(batch):
            preds = torch.func.vmap(lambda p: _member_outputs(self.model, p, batch, functional=True))(
                self._stacked_members()
            )
        else:
            outputs = [_member_outputs(self.model, p, batch) for p in members]
            preds = {k: torch.stack([o[k] for o in outputs]) for k in outputs[0]}
        preds = {k: v.detach().double().cpu().numpy() for k, v in preds.items()}
        m, s = len(members), len(structures)
        out = {
            "energy": (preds["energy"], np.full((m, s), self.model.energy_sigma**2)),
            "forces": (preds["forces"], np.repeat(preds["force_sigma"][..., None] ** 2, 3, axis=-1)),
        }
        if "stress" in preds:
            out["stress"] = (preds["stress"], np.full((m, s, 3, 3), self.model.stress_sigma**2))
        return batch, out

    def _stacked_members(self) -> Params:
        """The members' parameters stacked along a leading axis, rebuilt only when the
        chains change (stacking costs 3–14 ms for 8 SevenNet-0 members, every MD step)."""
        if self._stacked is None or len(self._stacked[0]) != len(self.chains) or any(
            a is not b for a, b in zip(self._stacked[0], self.chains)
        ):
            members = self.members
            self._stacked = (tuple(self.chains), {k: torch.stack([m[k] for m in members]) for k in members[0]})
        return self._stacked[1]

    def _predict_batch(self, structures: Sequence[Atoms]) -> EnsemblePrediction:
        batch, parts = self.member_predictions(structures)
        energy, energy_var = combine(*parts["energy"])
        forces, forces_var = combine(*parts["forces"])
        stress = stress_var = None
        if "stress" in parts:
            stress, stress_var = combine(*parts["stress"])
            nonperiodic = ~batch.periodic.cpu().numpy()
            stress[nonperiodic] = np.nan
            stress_var[nonperiodic] = np.nan
        return EnsemblePrediction(
            energy, energy_var, forces, forces_var, stress, stress_var, batch.structure_index.cpu().numpy(),
            force_deviation(parts["forces"][0]), parts["energy"][0], parts["forces"][0],
        )

    # -- data -------------------------------------------------------------------------
    def add_data(self, structures: Sequence[Atoms]) -> None:
        """Add labelled structures (raw reference energies); the first one sets the
        energy offset (:class:`TrainingSet`)."""
        self.data.extend(structures)

    def set_uncertainty(self, uncertainty: UncertaintyConfig) -> None:
        """Take a new ε (and confidence, calibration prior): σ_E = fraction·ε follows it in
        prediction and in later updates (worker processes are restarted for that)."""
        from flytune.backbones import backbone_family

        uncertainty = uncertainty.resolved(backbone_family(self.config.backbone))
        energy_sigma = self.config.energy_sigma_fraction * uncertainty.threshold_eV
        self.uncertainty = uncertainty
        if energy_sigma != self.spec.energy_sigma:
            self.spec = dataclasses.replace(self.spec, energy_sigma=energy_sigma)
            self.model.energy_sigma = energy_sigma
            self.close()

    # -- sampling -------------------------------------------------------------------
    @property
    def sampler_settings(self) -> SamplerSettings:
        c = self.config
        return SamplerSettings(c.batch_size, c.friction, c.beta, c.mass_eps)

    def update_schedule(self) -> Schedule:
        c = self.config
        return cycle_schedule(c.cycle_steps, c.eta_max, c.noise_off_fraction, c.ramp_fraction)

    def update(
        self,
        new_structures: Sequence[Atoms],
        progress: Progress | None = None,
        stop: StopFlag | None = None,
    ) -> None:
        """Add labelled structures and run one update cycle on every chain (warm start)."""
        self.data.extend(new_structures)
        self.run(self._update_jobs(len(new_structures)), progress, stop)

    def continue_update(self, favoured: int, progress: Progress | None = None, stop: StopFlag | None = None) -> None:
        """One more update cycle on every chain over the same data, its minibatches still
        favouring the last ``favoured`` structures (those the update is learning)."""
        self.run(self._update_jobs(favoured), progress, stop)

    def _update_jobs(self, new_labels: int) -> list[ChainJob]:
        schedule = self.update_schedule()
        c = self.config
        early_stop = EarlyStop(c.early_stop_window, c.early_stop_tolerance_nats) if c.early_stop else None
        return [ChainJob(chain, schedule, new_labels=new_labels, replace_samples=True, early_stop=early_stop)
                for chain in self.chains]

    # -- updates in the background ------------------------------------------------------
    def start_update(self, new_structures: Sequence[Atoms]) -> None:
        """Add labelled structures and start the update cycle in worker processes (at least
        one, even with ``workers = 1``), returning at once: predictions use the current
        members until :meth:`finish_update` swaps the new ones in."""
        if self._learning:
            raise RuntimeError("an update is already running in the background; finish it first")
        if not isinstance(self.runner, ProcessRunner):
            self.close()
            self._runner = ProcessRunner(self.spec, self.config.workers, self.config.threads_per_worker)
        self.data.extend(new_structures)
        self.runner.submit(self.prior, self.data, self._update_jobs(len(new_structures)), self.sampler_settings)
        self._learning = len(new_structures)
        self._started = time.perf_counter()

    @property
    def learning(self) -> int:
        """How many structures (the last of :attr:`data`) a background update is learning."""
        return self._learning

    def finish_update(self, block: bool = False, progress: Progress | None = None,
                      stop: StopFlag | None = None) -> float | None:
        """Swap in the chains of the background update once it is done: its wall time (s)
        from the start, or None while it is still running (without ``block``)."""
        chains = self.runner.collect(progress, stop, block)
        if chains is None:
            return None
        by_index = {c.index: c for c in chains}
        self.chains = [by_index.get(c.index, c) for c in self.chains]
        self._learning = 0
        return time.perf_counter() - self._started

    def run(self, jobs: Sequence[ChainJob], progress: Progress | None = None, stop: StopFlag | None = None) -> None:
        """Run chain jobs (sequentially or in worker processes) and keep the new chains."""
        chains = self.runner.run(self.prior, self.data, jobs, self.sampler_settings, progress, stop)
        by_index = {c.index: c for c in chains}
        self.chains = [by_index.get(c.index, c) for c in self.chains]

    @property
    def runner(self) -> Runner:
        """Where the chains run (:func:`flytune.bayes.runners.make_runner`), started on first use."""
        if self._runner is None:
            self._runner = make_runner(self.spec, self.model, self.config.workers, self.config.threads_per_worker)
        return self._runner

    def close(self) -> None:
        """Stop worker processes (if any); an update running in the background is dropped
        (its structures stay in :attr:`data`, :attr:`learning` says how many)."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def __enter__(self) -> Ensemble:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- persistence ----------------------------------------------------------------
    def state_dict(self, calibrator: Calibrator | None = None) -> dict:
        """Everything needed to predict and to continue bit for bit. The file format
        (:data:`FORMAT`) also holds the calibration of an on-the-fly run: ``calibrator``,
        or the prior of the uncertainty settings when none is given. Structures that a
        background update is still learning are left out: no chain has learned them."""
        if calibrator is None:
            calibrator = self.uncertainty.calibrator()
        return {
            "format": FORMAT,
            "spec": self.spec.state_dict(),
            "config": self.config.model_dump(mode="json"),
            "uncertainty": self.uncertainty.model_dump(mode="json"),
            "prior": self.prior.state_dict(),
            "chains": [c.state_dict() for c in self.chains],
            "data": self.data.state_dict(stop=len(self.data) - self._learning),
            "energy_offset": self.data.energy_offset,
            "calibrator": calibrator.state_dict(),
            "seed": self.seed,
        }

    def save(self, path: str | os.PathLike, calibrator: Calibrator | None = None) -> None:
        """Write :meth:`state_dict` to ``path`` (atomic replace)."""
        self.save_state(self.state_dict(calibrator), path)

    @staticmethod
    def save_state(state: dict, path: str | os.PathLike) -> None:
        """Write a :meth:`state_dict` (e.g. one kept in a checkpoint) as :meth:`save` does."""
        with replacing(path) as tmp:
            torch.save(tree_to(state, "cpu"), tmp)

    @staticmethod
    def read_state(path: str | os.PathLike) -> dict:
        """The :meth:`state_dict` saved at ``path`` (``torch.load(weights_only=True)``: no
        code is unpickled)."""
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except FileNotFoundError:
            raise FlytuneError(f"model file {os.fspath(path)!r} not found; give a directory written by `flytune finetune`") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise FlytuneError(f"{os.fspath(path)!r} is not a flytune ensemble ({FORMAT})")
        return state

    @classmethod
    def load(cls, path: str | os.PathLike, workers: int | None = None, device: str | None = None) -> Ensemble:
        """Load a saved ensemble; ``workers`` and ``device`` override the saved settings
        (e.g. to continue on a GPU). The calibration in the file: :func:`saved_calibrator`."""
        return cls.from_state_dict(cls.read_state(path), workers, device)

    @classmethod
    def from_state_dict(cls, state: dict, workers: int | None = None, device: str | None = None) -> Ensemble:
        """Rebuild from :meth:`state_dict` (tensors on any device)."""
        config = ModelConfig.model_validate(state["config"])
        if workers is not None:
            config = config.model_copy(update={"workers": workers})
        if device is not None:
            config = config.model_copy(update={"device": device})
        spec = ModelSpec.from_state_dict(state["spec"])
        spec = dataclasses.replace(spec, device=resolve_device(config.device))
        return cls(
            spec,
            config,
            UncertaintyConfig.model_validate(state["uncertainty"]),
            GaussianPrior.from_state_dict(tree_to(state["prior"], spec.device)),
            [Chain.from_state_dict(c).to(spec.device) for c in state["chains"]],
            energy_offset=state["energy_offset"],
            seed=int(state["seed"]),
            data_state=state["data"],
        )


def saved_calibrator(state: dict) -> Calibrator:
    """The calibration kept in an ensemble's :meth:`Ensemble.state_dict` (a model file or
    a run's checkpoint)."""
    return Calibrator.from_state_dict(state["calibrator"])


def _resolved(
    config: ModelConfig, uncertainty: UncertaintyConfig | None
) -> tuple[ModelConfig, UncertaintyConfig]:
    """Both configurations with the backbone family's defaults filled in."""
    from flytune.backbones import backbone_family

    family = backbone_family(config.backbone)
    return config.resolved(family), (uncertainty or UncertaintyConfig()).resolved(family)


def model_spec(config: ModelConfig, uncertainty: UncertaintyConfig) -> ModelSpec:
    """The :class:`ModelSpec` of a (resolved) configuration."""
    return ModelSpec(
        backbone=config.backbone,
        energy_sigma=config.energy_sigma_fraction * uncertainty.threshold_eV,
        force_sigma0=config.force_sigma0,
        stress_sigma=config.stress_sigma,
        head_widths=tuple(config.head_widths),
        backbone_options=tuple(sorted(config.backbone_options.items())),
        device=resolve_device(config.device),
    )
