"""Validated settings (pydantic). Every default is the method's (``method.md``);
``None`` means "the default of the backbone's family" (see :data:`FAMILY_DEFAULTS`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator

from flytune.units import KCAL_MOL, EnergyUnit, energy_to_eV

#: per-architecture defaults of the method (σ_p, η_max, Gamma prior a and b)
FAMILY_DEFAULTS: dict[str, dict[str, float]] = {
    "nequip": {"sigma_prior": 0.2, "eta_max": 1e-4, "calibration_shape": 3.0, "calibration_rate": 10.0},
    "mace": {"sigma_prior": 0.5, "eta_max": 1e-3, "calibration_shape": 1.5, "calibration_rate": 10.0},
}


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
        defaults = FAMILY_DEFAULTS[family]
        updates = {k: defaults[k] for k in ("sigma_prior", "eta_max") if getattr(self, k) is None}
        return self.model_copy(update=updates)

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

    @property
    def threshold_eV(self) -> float:
        return energy_to_eV(self.threshold, self.threshold_unit)

    def resolved(self, family: str) -> UncertaintyConfig:
        defaults = FAMILY_DEFAULTS[family]
        updates = {
            k: defaults[k] for k in ("calibration_shape", "calibration_rate") if getattr(self, k) is None
        }
        return self.model_copy(update=updates)


class OfflineConfig(_Strict):
    """Offline fine-tuning on a fixed data set: initial phase, then cosine cycles."""

    initial_steps: PositiveInt = Field(2000, description="steps of the initial (exponential-decay) phase")
    eta_start: PositiveFloat | None = Field(None, description="initial step size (default η_max)")
    eta_end: PositiveFloat | None = Field(None, description="step size at the end of the initial phase (default η_start/10)")
    samples_per_chain: PositiveInt = Field(1, description="1 + number of cosine cycles per chain")
    cycle_steps: PositiveInt = 500
    seed: int = 0

    @field_validator("initial_steps")
    @classmethod
    def _enough_steps(cls, v: int) -> int:
        if v < 2:
            raise ValueError("initial_steps must be at least 2")
        return v
