"""Validated settings (pydantic). Every default is the method's (``method.md``);
``None`` means "the default of the backbone's family" (see :data:`FAMILY_DEFAULTS`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError,
                      field_validator, model_validator)

from flytune.bayes.calibration import FORCE_CALIBRATIONS, Calibrator, LargestAtomCalibrator
from flytune.errors import FlytuneError
from flytune.units import KCAL_MOL, EnergyUnit, energy_to_eV

#: per-architecture defaults of the method (σ_p, η_max, Gamma prior a and b)
FAMILY_DEFAULTS: dict[str, dict[str, float]] = {
    "nequip": {"sigma_prior": 0.2, "eta_max": 1e-4, "calibration_shape": 3.0, "calibration_rate": 10.0},
    "mace": {"sigma_prior": 0.5, "eta_max": 1e-3, "calibration_shape": 1.5, "calibration_rate": 10.0},
    # measured offline on W–Be and Si (benchmarks/chgnet_defaults.py, 2026-12-04/06): η 3e-3 is
    # the most accurate of 1e-4…1e-2 on both; σ_p 0.2 and 0.5 score alike, 0.2 keeps the
    # members nearer the pretrained weights; variance factors 2–20 ask for MACE's broad prior
    "chgnet": {"sigma_prior": 0.2, "eta_max": 3e-3, "calibration_shape": 1.5, "calibration_rate": 10.0},
}


def family_defaults(family: str, missing: list[str]) -> dict[str, float]:
    """The family's defaults of the settings in ``missing`` (those left unset); a family
    without measured defaults asks for them to be set."""
    if not missing:
        return {}
    if family not in FAMILY_DEFAULTS:
        raise FlytuneError(
            f"flytune has no measured defaults of {', '.join(missing)} for {family} backbones yet; "
            "set them in the run configuration ([model] sigma_prior, eta_max; [uncertainty] "
            "calibration_shape, calibration_rate)"
        )
    return {k: FAMILY_DEFAULTS[family][k] for k in missing}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The Bayesian model: backbone, prior, likelihood head and SGHMC sampler."""

    backbone: str = "7net-0"
    backbone_options: dict = Field(default_factory=dict)
    posterior: Literal["sghmc"] = "sghmc"
    chains: int = Field(8, ge=2, description="M, number of Markov chains (ensemble members)")
    prior: Literal["transfer", "uninformative"] = "transfer"
    sigma_prior: PositiveFloat | None = Field(None, description="σ_p; 0.2 NequIP-type, 0.5 MACE")
    uninformative_sigma_prior: PositiveFloat = Field(
        1.0, description="σ of the zero-mean prior of the from-scratch baseline"
    )
    batch_size: PositiveInt = 5
    cycle_steps: PositiveInt = Field(2000, description="K, SGHMC steps per update cycle")
    eta_max: PositiveFloat | None = Field(None, description="peak step size; 1e-4 NequIP-type, 1e-3 MACE")
    friction: float = Field(0.1, gt=0, le=1)
    beta: float = Field(0.999, ge=0, lt=1)
    mass_eps: PositiveFloat = 1e-4
    early_stop: bool = Field(
        False, description="end an update cycle once the newest structure's log-likelihood and the chain have settled"
    )
    early_stop_window: int = Field(25, ge=2, description="W, values per window of the early-stop test")
    early_stop_tolerance_nats: PositiveFloat = Field(
        1.0, description="δ, largest change of the window means of the log-likelihoods counted as settled"
    )
    noise_off_fraction: float = Field(0.2, ge=0, le=1)
    ramp_fraction: float = Field(0.05, ge=0, le=1)
    force_sigma0_kcal_mol_A: PositiveFloat = Field(0.1, description="s0, initial σ_F")
    stress_sigma_kcal_mol_A3: PositiveFloat = Field(0.00625, description="σ_S")
    energy_sigma_fraction: PositiveFloat = Field(0.1, description="σ_E as a fraction of ε")
    head_widths: tuple[PositiveInt, ...] = (64, 16)
    device: str = Field("cpu", pattern=r"^(cpu|auto|cuda(:\d+)?)$", description="cpu, cuda, cuda:N or auto")
    workers: int = Field(1, ge=1, description="processes running chains (1: in this process); with device 'cuda' one GPU per worker in turn")
    threads_per_worker: PositiveInt | None = None

    def resolved(self, family: str) -> ModelConfig:
        """A copy with every family default filled in."""
        missing = [k for k in ("sigma_prior", "eta_max") if getattr(self, k) is None]
        return self.model_copy(update=family_defaults(family, missing))

    @property
    def force_sigma0(self) -> float:
        """s0 in eV/Å."""
        return self.force_sigma0_kcal_mol_A * KCAL_MOL

    @property
    def stress_sigma(self) -> float:
        """σ_S in eV/Å³."""
        return self.stress_sigma_kcal_mol_A3 * KCAL_MOL


class UncertaintyConfig(_Strict):
    """The user's accuracy target and the calibration of the decision."""

    threshold: PositiveFloat = Field(0.5, description="ε, the energy error threshold")
    threshold_unit: EnergyUnit = "kcal/mol"
    confidence: float = Field(0.95, gt=0, lt=1, description="call the reference when P(|e|>ε) > 1 − confidence")
    calibration_shape: PositiveFloat | None = Field(None, description="a of the Gamma prior; 3 NequIP, 1.5 MACE")
    calibration_rate: PositiveFloat | None = Field(None, description="b of the Gamma prior; 10")
    calibration_discount: float = Field(
        1.0, gt=0, le=1, description="γ: the error seen k calls ago counts with weight γ^k in the calibration "
        "(memory about 1/(1 − γ) calls); 1: no forgetting, the published rule",
    )
    calibration_checks: NonNegativeInt = Field(
        5, description="while the calibration holds fewer than this many errors, call the reference once "
        "2^n force calls (n errors seen) have passed since the last call; 0: none, the published rule",
    )
    label_misfit: bool = Field(
        True, description="raise the decision's σ by how far the updated ensemble misses its newest label "
        "(energy and forces, carried to first order to later structures) beyond σ_E; false: the published "
        "rule, the ensemble's σ alone",
    )
    label_misfit_as: Literal["spread", "bias", "correction"] = Field(
        "bias", description="how the label misfit enters the decision: spread, its size raises σ; bias, the "
        "residual carried to the structure (sign and size, to first order) is the error expected there and its "
        "first-order change adds to σ; correction, that residual is subtracted from the prediction the MD is "
        "given (energy and forces: the reference's at the newest label) and σ is the members' spread about their "
        "anchors there plus that first-order change (faster, but measured above the 5 % promise far from labels: "
        "docs/method.md §6)",
    )
    correction_order: Literal[1, 2] = Field(
        1, description="with label_misfit_as = correction: 1, the residual carried to first order; 2, also "
        "the members' own change beyond first order from the label scaled by κ, the ratio of the reference's "
        "curvature to theirs fitted at the calls (pretrained potentials are soft), whose uncertainty adds to σ",
    )
    criterion: Literal["energy", "forces", "both"] = Field(
        "energy", description="what the call decides on: P(|e| > ε) (energy), P(max_a |ΔF_a| > ε_F) (forces), "
        "or either above the level (both)",
    )
    force_threshold: PositiveFloat | None = Field(
        None, description="ε_F, the largest tolerated error of one atom's force vector; needed by criterion "
        "'forces' or 'both', and scores the force errors at calls whatever the criterion",
    )
    force_threshold_unit: Literal["eV/A", "kcal/mol/A"] = "eV/A"
    force_calibration: Literal["largest_atom", "components"] = Field(
        "largest_atom", description="what the force calibration fits at each call: largest_atom, the ratio of "
        "the largest atom force error to the one predicted, its location and spread (the statistic the force "
        "criterion thresholds); components, one factor on all predicted force variances from the mean "
        "standardised squared error (misses errors concentrated on a few atoms: docs/method.md §6)",
    )
    trigger: Literal["probability", "spread", "force_deviation"] = Field(
        "probability", description="probability: the calibrated rule (the method); baselines for comparison, "
        "with no calibration, label misfit or checks: spread calls when the ensemble's energy σ > "
        "spread_fraction·ε, force_deviation when the largest per-atom force deviation of the members exceeds "
        "force_deviation_threshold (DP-GEN, aims-PAX)",
    )
    spread_fraction: PositiveFloat = Field(0.5, description="trigger 'spread': call when σ > spread_fraction·ε")
    force_deviation_threshold: PositiveFloat | None = Field(
        None, description="trigger 'force_deviation': the largest per-atom force deviation that needs no call, "
        "in force_threshold_unit",
    )

    @model_validator(mode="after")
    def _force_threshold_given(self) -> UncertaintyConfig:
        if self.criterion != "energy" and self.force_threshold is None:
            raise ValueError(f"criterion = {self.criterion!r} needs force_threshold (ε_F, in force_threshold_unit)")
        if self.trigger == "force_deviation" and self.force_deviation_threshold is None:
            raise ValueError("trigger = 'force_deviation' needs force_deviation_threshold (in force_threshold_unit)")
        return self

    @property
    def threshold_eV(self) -> float:
        return energy_to_eV(self.threshold, self.threshold_unit)

    def _force_eV_A(self, value: float | None) -> float | None:
        if value is None:
            return None
        return value * (KCAL_MOL if self.force_threshold_unit == "kcal/mol/A" else 1.0)

    @property
    def force_threshold_eV_A(self) -> float | None:
        """ε_F in eV/Å, or None."""
        return self._force_eV_A(self.force_threshold)

    @property
    def force_deviation_threshold_eV_A(self) -> float | None:
        """The force-deviation trigger's threshold in eV/Å, or None."""
        return self._force_eV_A(self.force_deviation_threshold)

    def calibrator(self) -> Calibrator:
        """A calibration with no error seen yet, with this prior and discount (resolved settings)."""
        return Calibrator(self.calibration_shape, self.calibration_rate, discount=self.calibration_discount)

    def force_calibrator(self) -> Calibrator | LargestAtomCalibrator | None:
        """The force calibration with no error seen yet (the energy calibration's prior and
        discount), or None without ε_F (resolved settings)."""
        if self.force_threshold is None:
            return None
        return FORCE_CALIBRATIONS[self.force_calibration](
            self.calibration_shape, self.calibration_rate, discount=self.calibration_discount)

    def resolved(self, family: str) -> UncertaintyConfig:
        missing = [k for k in ("calibration_shape", "calibration_rate") if getattr(self, k) is None]
        return self.model_copy(update=family_defaults(family, missing))


class OfflineConfig(_Strict):
    """Offline fine-tuning on a fixed data set: initial phase, then cosine cycles."""

    initial_steps: PositiveInt = Field(2000, description="steps of the initial (exponential-decay) phase")
    eta_start: PositiveFloat | None = Field(None, description="initial step size (default η_max)")
    eta_end: PositiveFloat | None = Field(None, description="step size at the end of the initial phase (default η_start/10)")
    samples_per_chain: PositiveInt = Field(1, description="1 + number of cosine cycles per chain")
    cycle_steps: PositiveInt = 500
    noise: bool = Field(
        True,
        description="inject the SGHMC noise; false: every chain is a noise-free fit from its start "
        "(with the uninformative prior, M independent fits from random weights: a deep ensemble)",
    )
    seed: int = 0

    @field_validator("initial_steps")
    @classmethod
    def _enough_steps(cls, v: int) -> int:
        if v < 2:
            raise ValueError("initial_steps must be at least 2")
        return v


class ReferenceConfig(_Strict):
    """The reference calculator: a built-in name or an import path, with its options."""

    name: str = "pyscf"
    options: dict = Field(default_factory=dict, description="keyword arguments of the calculator")
    retries: int = Field(2, ge=0, description="extra attempts after a failed call")
    on_failure: Literal["stop", "skip"] = "stop"
    timeout_s: PositiveFloat = Field(
        86400.0, description="backend 'parsl': an attempt without a result after this many seconds fails "
        "(a lost worker, a hung interchange); in-process calls cannot be interrupted",
    )


class Segment(_Strict):
    """A piece of the temperature schedule: ``steps`` MD steps ending at ``temperature_K``
    (reached linearly from the previous segment's end when ``ramp``, else held)."""

    steps: PositiveInt
    temperature_K: PositiveFloat
    ramp: bool = False


class MDConfig(_Strict):
    driver: Literal["langevin", "verlet", "nose-hoover", "npt"] = "langevin"
    timestep_fs: PositiveFloat = 0.5
    temperature_K: PositiveFloat = 300.0
    steps: PositiveInt = 20000
    schedule: list[Segment] = Field(default_factory=list, description="overrides steps/temperature_K")
    friction_per_fs: PositiveFloat = Field(0.01, description="Langevin friction, 1/fs")
    tdamp_fs: PositiveFloat = Field(100.0, description="Nosé–Hoover / NPT thermostat time, fs")
    pressure_bar: float = 1.0
    pfactor: PositiveFloat | None = Field(None, description="NPT barostat parameter (ASE units); default from bulk modulus 100 GPa")
    initial_velocities: bool = True
    trajectory_every: PositiveInt = 10

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.schedule) if self.schedule else self.steps

    def temperature_at(self, step: int) -> float:
        """Target temperature (K) at MD step ``step`` (0-based) of the schedule."""
        if not self.schedule:
            return self.temperature_K
        start, previous = 0, self.schedule[0].temperature_K
        for seg in self.schedule:
            if step < start + seg.steps:
                if seg.ramp:
                    return previous + (seg.temperature_K - previous) * (step - start + 1) / seg.steps
                return seg.temperature_K
            start, previous = start + seg.steps, seg.temperature_K
        return self.schedule[-1].temperature_K


class SafetyConfig(_Strict):
    """Limits on the call decision (:mod:`flytune.otf.decision`) and on the run; ``None``
    switches a limit off."""

    max_reference_calls: PositiveInt | None = Field(None, description="stop calling the reference once reached")
    min_steps_between_calls: int = Field(0, ge=0, description="force calls to wait after a call")
    force_call_after: PositiveInt | None = Field(None, description="call anyway after this many force calls without one")
    max_temperature_K: PositiveFloat | None = Field(None, description="stop if the temperature exceeds this")
    max_force_eV_A: PositiveFloat | None = Field(50.0, description="stop if any force exceeds this (eV/Å)")


class UpdatesConfig(_Strict):
    """When a new label is learned by a posterior update (:mod:`flytune.otf.updates`)."""

    policy: Literal["every", "deferred"] = Field(
        "every", description="every: update after each label; deferred: when the reference time since the "
        "last update reaches the cost of an update, max_pending labels wait, or at a critical miss",
    )
    max_pending: PositiveInt = Field(16, description="deferred: update once this many labels wait")
    critical_factor: PositiveFloat = Field(
        1.0, description="deferred: update at once when |error| > this × ε (an error outside the promise), "
        "unless the last update did not learn its own newest label")
    max_cycles: PositiveInt = Field(
        1, description="a blocking update runs one more cycle on the same labels while it has not learned its "
        "newest one (the misfit left there, as sigma, keeps P(|e|>eps) above the call level), up to this many",
    )
    final_cycles: NonNegativeInt = Field(
        1, description="at the end of the run, this many more update cycles over all labels drawn uniformly, "
        "after the last MD step: they improve the model the run leaves (model.pt), not its MD",
    )
    background: bool = Field(
        False, description="run updates in worker processes while the MD continues on the current ensemble "
        "(still calling the reference where it is uncertain); the new samples are swapped in when ready",
    )


class SlurmConfig(_Strict):
    """``[execution.slurm]``: the SLURM jobs (Parsl blocks) that run the reference calls."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes_per_block: PositiveInt = Field(1, description="nodes of one SLURM job")
    cores_per_node: PositiveInt | None = None
    walltime: str = Field("01:00:00", pattern=r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$", description="per job, [D-]HH:MM:SS")
    max_blocks: PositiveInt = Field(1, description="SLURM jobs at once")
    worker_init: str = Field("", description="shell lines run before the workers start (module load, venv)")
    scheduler_options: str = Field("", description="extra '#SBATCH' lines")
    exclusive: bool = True


class ExecutionConfig(_Strict):
    """``[execution]``: where reference calls run (:mod:`flytune.otf.execution`)."""

    backend: Literal["local", "parsl"] = Field("local", description="local: in this process; parsl: Parsl apps")
    parsl: str = Field(
        "htex_local", description="htex_local (workers on this machine), slurm ([execution.slurm]) or the path "
        "of a Python file that defines a Parsl `config`",
    )
    max_workers: PositiveInt = Field(1, description="reference calls at once: on this machine, or per SLURM job")
    mpi_launcher: str | None = Field(
        None, description="put before reference.options.command in the workers, e.g. 'srun -n 64' or 'mpirun -np 8'",
    )
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @field_validator("parsl")
    @classmethod
    def _known_parsl(cls, value: str) -> str:
        if value not in ("htex_local", "slurm") and not value.endswith(".py"):
            raise ValueError("use 'htex_local', 'slurm' or the path of a .py file that defines a Parsl `config`")
        return value


class ProductionConfig(_Strict):
    """``[production]``: MD with the fine-tuned ensemble alone (``flytune md``)."""

    untrusted_steps: PositiveInt = Field(
        20, description="consecutive steps with P(|e| > ε) above the call level that leave the trusted region")
    on_untrusted: Literal["stop", "warn"] = Field(
        "stop", description="stop: end the MD there (the frame is kept to restart on-the-fly learning); warn: go on")
    spot_check_every: PositiveInt | None = Field(
        None, description="call [reference] every this many steps to measure the true error (none: never)")
    model: str | None = Field(None, description="the fine-tuned ensemble; default RUN_DIR/model.pt")
    out: str | None = Field(None, description="where the MD writes its files; default RUN_DIR/md")


class WalkerConfig(_Strict):
    """One ``[[walkers]]`` table: a trajectory of its own that teaches the run's one
    ensemble. What it leaves out is the run's (``structure``, ``[md]``); ``seed``
    defaults to the run's seed + the walker's index."""

    structure: str | None = Field(None, description="start structure; default: the run's")
    temperature_K: PositiveFloat | None = Field(None, description="held temperature (replaces the run's schedule)")
    schedule: list[Segment] | None = Field(None, description="temperature schedule of this walker")
    seed: int | None = Field(None, description="velocities and thermostat noise; default: run seed + index")
    md: dict = Field(default_factory=dict, description="other [md] settings of this walker (driver, friction_per_fs, ...)")

    @model_validator(mode="after")
    def _one_temperature(self) -> WalkerConfig:
        if self.temperature_K is not None and self.schedule is not None:
            raise ValueError("give a walker temperature_K or a schedule, not both")
        return self


class RunConfig(_Strict):
    """The whole on-the-fly run (``flytune run CONFIG.toml``)."""

    structure: str
    run_dir: str = "runs/flytune"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    uncertainty: UncertaintyConfig = Field(default_factory=UncertaintyConfig)
    md: MDConfig = Field(default_factory=MDConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    updates: UpdatesConfig = Field(default_factory=UpdatesConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    checkpoint_every: PositiveInt = Field(100, description="MD steps between periodic checkpoints")
    walkers: list[WalkerConfig] = Field(
        default_factory=list, description="trajectories sharing the ensemble; none: one walker, the run's own")
    production: ProductionConfig = Field(default_factory=ProductionConfig)

    #: settings that define a run: a run directory made with others cannot be resumed
    IDENTITY: ClassVar[tuple[str, ...]] = (
        "structure", "seed", "model.backbone", "model.chains", "model.prior", "model.sigma_prior",
        "model.posterior", "model.head_widths", "reference.name", "md.driver", "md.timestep_fs", "walkers",
    )

    @model_validator(mode="after")
    def _walker_md(self) -> RunConfig:
        for i in range(len(self.walkers)):
            self.walker_md(i)
        return self

    @property
    def walker_count(self) -> int:
        return max(1, len(self.walkers))

    def walker_structure(self, i: int) -> str:
        return (self.walkers[i].structure if self.walkers else None) or self.structure

    def walker_seed(self, i: int) -> int:
        seed = self.walkers[i].seed if self.walkers else None
        return self.seed + i if seed is None else seed

    def walker_md(self, i: int) -> MDConfig:
        """The ``[md]`` of walker ``i``: the run's, with the walker's settings on top."""
        if not self.walkers:
            return self.md
        w = self.walkers[i]
        settings = self.md.model_dump() | w.md
        if w.temperature_K is not None:
            settings.update(temperature_K=w.temperature_K, schedule=[])
        elif w.schedule is not None:
            settings["schedule"] = [s.model_dump() for s in w.schedule]
        try:
            return MDConfig.model_validate(settings)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ValueError(f"walkers[{i}].md.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None

    def identity(self) -> dict:
        dump = self.model_dump(mode="json")
        out = {}
        for key in self.IDENTITY:
            value = dump
            for part in key.split("."):
                value = value[part]
            out[key] = value
        return out
