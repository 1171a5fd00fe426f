r"""The probabilistic model of one ensemble member (method §1).

Each member predicts a diagonal Gaussian around the backbone's outputs:

    E ~ N(Ê, σ_E²)                       σ_E fixed (default 0.1·ε)
    F_{a,k} ~ N(F̂_{a,k}, σ_{F,a}²)       σ_{F,a} = s0·exp(h(z_a)), k = x, y, z
    S_{kl} ~ N(Ŝ_{kl}, σ_S²)             σ_S fixed, only where label and backbone have stress

where z_a are the backbone's per-atom invariant features and h is an MLP
dim(z) → 64 → 16 → 1 with SiLU, all weights initialised to zero (so σ_F starts at s0).
The per-structure log-likelihood ℓ_i(θ) sums the Gaussian log-densities of the energy,
the 3·n_i force components and the 9 stress components, −½·log(2πσ²) terms included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass

import torch

from flytune.backbones import Backbone, GraphBatch
from flytune.bayes.tree import reproducible

LOG_2PI = math.log(2.0 * math.pi)


class ForceSigmaHead(torch.nn.Module):
    """h(z): per-atom log-scale of σ_F; every weight and bias starts at zero."""

    def __init__(self, n_features: int, widths: Sequence[int] = (64, 16)):
        super().__init__()
        sizes = [n_features, *widths, 1]
        layers: list[torch.nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(torch.nn.SiLU())
            layers.append(torch.nn.Linear(n_in, n_out))
        self.layers = torch.nn.Sequential(*layers)
        for p in self.parameters():
            torch.nn.init.zeros_(p)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)


@dataclass
class LabelBatch:
    """Reference labels of a batch (ASE units), aligned with a :class:`GraphBatch`."""

    energy: torch.Tensor  # (S,)
    forces: torch.Tensor  # (A, 3)
    stress: torch.Tensor  # (S, 3, 3), zeros where absent
    has_stress: torch.Tensor  # (S,) bool

    def to(self, device: torch.device | str) -> LabelBatch:
        return LabelBatch(*(t.to(device) for t in (self.energy, self.forces, self.stress, self.has_stress)))


@dataclass
class MemberPrediction:
    """Means and standard deviations predicted by one member."""

    energy: torch.Tensor  # (S,) eV
    energy_sigma: float  # σ_E, eV
    forces: torch.Tensor  # (A, 3) eV/Å
    force_sigma: torch.Tensor  # (A,) σ_{F,a}, eV/Å
    stress: torch.Tensor | None  # (S, 3, 3) eV/Å³
    stress_sigma: float  # σ_S, eV/Å³


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, sigma) -> torch.Tensor:
    """log N(x; mean, σ²) = −½((x − mean)/σ)² − log σ − ½·log 2π, elementwise."""
    sigma = torch.as_tensor(sigma, dtype=mean.dtype)
    return -0.5 * ((x - mean) / sigma) ** 2 - torch.log(sigma) - 0.5 * LOG_2PI


class ProbabilisticModel(torch.nn.Module):
    """Backbone + force-σ head with fixed σ_E and σ_S (all in ASE units)."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        energy_sigma: float,
        force_sigma0: float,
        stress_sigma: float,
        head_widths: Sequence[int] = (64, 16),
    ):
        super().__init__()
        self.backbone = backbone
        self.head = ForceSigmaHead(backbone.feature_dim, head_widths)
        self.energy_sigma = float(energy_sigma)
        self.force_sigma0 = float(force_sigma0)
        self.stress_sigma = float(stress_sigma)

    def forward(self, batch: GraphBatch, create_graph: bool = False, functional: bool = False) -> MemberPrediction:
        out = self.backbone(batch, create_graph=create_graph, functional=functional)
        log_scale = self.head(out.features.to(self.head.layers[0].weight.dtype))
        return MemberPrediction(
            energy=out.energy,
            energy_sigma=self.energy_sigma,
            forces=out.forces,
            force_sigma=self.force_sigma0 * torch.exp(log_scale),
            stress=out.stress,
            stress_sigma=self.stress_sigma,
        )

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """θ0: detached copies of the pretrained backbone weights and the (zero) head."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def log_likelihood(
        self, pred: MemberPrediction, labels: LabelBatch, batch: GraphBatch
    ) -> torch.Tensor:
        """(S,) per-structure log-likelihood ℓ_i (energy + forces + stress where available)."""
        dtype = pred.forces.dtype
        # energies in float64: total energies are large numbers, σ_E is small
        ll = gaussian_log_density(labels.energy, pred.energy.double(), pred.energy_sigma)
        force_terms = gaussian_log_density(
            labels.forces.to(dtype), pred.forces, pred.force_sigma.unsqueeze(-1)
        ).sum(-1)
        ll = ll + torch.zeros_like(ll).index_add(0, batch.structure_index, force_terms.double())
        if pred.stress is not None:
            mask = labels.has_stress & batch.periodic
            if bool(mask.any()):
                stress_terms = gaussian_log_density(
                    labels.stress.to(dtype), pred.stress, pred.stress_sigma
                ).sum((-1, -2)).double()
                ll = ll + torch.where(mask, stress_terms, torch.zeros_like(stress_terms))
        return ll


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a :class:`ProbabilisticModel` (e.g. in a worker process)."""

    backbone: str
    energy_sigma: float
    force_sigma0: float
    stress_sigma: float
    head_widths: tuple[int, ...] = (64, 16)
    backbone_options: tuple[tuple[str, object], ...] = ()
    device: str = "cpu"

    def build(self, device: str | None = None) -> ProbabilisticModel:
        """The model on ``device`` (default: the spec's), with deterministic kernels
        switched on first (:func:`flytune.bayes.tree.reproducible`)."""
        from flytune.backbones import load_backbone

        reproducible()
        backbone = load_backbone(self.backbone, **dict(self.backbone_options))
        model = ProbabilisticModel(
            backbone,
            energy_sigma=self.energy_sigma,
            force_sigma0=self.force_sigma0,
            stress_sigma=self.stress_sigma,
            head_widths=self.head_widths,
        )
        return model.to(device or self.device)

    def state_dict(self) -> dict:
        """The fields, tuples as lists."""
        return dataclasses.asdict(self) | {
            "head_widths": list(self.head_widths),
            "backbone_options": [list(kv) for kv in self.backbone_options],
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> ModelSpec:
        return cls(
            backbone=state["backbone"],
            energy_sigma=float(state["energy_sigma"]),
            force_sigma0=float(state["force_sigma0"]),
            stress_sigma=float(state["stress_sigma"]),
            head_widths=tuple(state["head_widths"]),
            backbone_options=tuple(tuple(kv) for kv in state["backbone_options"]),
            device=state.get("device", "cpu"),
        )
