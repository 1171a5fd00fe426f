r"""Gaussian priors over all trainable parameters (method §2).

    log p(θ) = Σ_j [ −(θ_j − θ0_j)² / (2σ_p²) − ½·log(2πσ_p²) ]

The transfer-learning prior centres θ0 on the pretrained weights (0 for the added σ
head) with one σ_p for every parameter (defaults 0.5 MACE, 0.2 NequIP-type). The
uninformative baseline of the paper is a zero-mean prior with randomly initialised
weights (training from scratch). Buffers (E0 references, scale/shift) are not
parameters and stay fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flytune.bayes.model import ProbabilisticModel

Params = dict[str, torch.Tensor]


@dataclass
class GaussianPrior:
    """Isotropic Gaussian N(θ0, σ_p²·I) over named parameters."""

    centre: Params
    sigma: float

    def log_prob(self, params: Params) -> torch.Tensor:
        """log p(θ), including the normalisation −½·D·log(2πσ_p²)."""
        sq = sum(((params[k] - c) ** 2).sum() for k, c in self.centre.items())
        n = sum(c.numel() for c in self.centre.values())
        return -sq / (2.0 * self.sigma**2) - 0.5 * n * math.log(2.0 * math.pi * self.sigma**2)

    def state_dict(self) -> dict:
        return {"centre": self.centre, "sigma": self.sigma}

    @classmethod
    def from_state_dict(cls, state: dict) -> GaussianPrior:
        return cls(centre=dict(state["centre"]), sigma=float(state["sigma"]))


def transfer_prior(model: ProbabilisticModel, sigma_prior: float) -> GaussianPrior:
    """N(θ0, σ_p²) with θ0 the pretrained weights and the zero-initialised head."""
    return GaussianPrior(model.trainable_parameters(), sigma_prior)


def uninformative_prior(model: ProbabilisticModel, sigma_prior: float) -> GaussianPrior:
    """The from-scratch baseline: N(0, σ_p²) over the same parameters."""
    return GaussianPrior(
        {k: torch.zeros_like(v) for k, v in model.trainable_parameters().items()}, sigma_prior
    )


def random_start(model: ProbabilisticModel, seed: int) -> Params:
    """Randomly initialised backbone weights (architecture's own init) and a zero head."""
    device = model.backbone.device
    backbone = {f"backbone.{k}": v.to(device) for k, v in model.backbone.random_parameters(seed).items()}
    params = model.trainable_parameters()
    params.update(backbone)
    return params
