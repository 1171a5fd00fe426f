r"""The log posterior that every chain samples (method §3).

Target: p(θ | D) ∝ p(θ)·Π_i exp(ℓ_i(θ)) over the N labelled structures D. The sampler
works with the per-datum potential Ũ and its negative, the per-datum log posterior

    −Ũ(θ) = (1/N)·log p(θ) + L̂(θ),     L̂(θ) = Σ_b w_b·ℓ_{u_b}(θ),

where p(θ) is the Gaussian prior (:mod:`flytune.bayes.prior`), ℓ_i the per-structure
Gaussian log-likelihood of energy, forces and stress (:mod:`flytune.bayes.model`), and
(u_b, w_b) a minibatch with weights that make L̂ an unbiased estimate of (1/N)·Σ_i ℓ_i
(:mod:`flytune.bayes.minibatch`). At temperature 1, SGHMC on Ũ samples exp(−N·Ũ),
which is the posterior (:mod:`flytune.bayes.sghmc`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import functional_call

from flytune.backbones import GraphBatch
from flytune.bayes.model import LabelBatch, ProbabilisticModel
from flytune.bayes.prior import GaussianPrior

Params = dict[str, torch.Tensor]
#: a minibatch: collated graphs, their labels and the weights w_b
Minibatch = tuple[GraphBatch, LabelBatch, torch.Tensor]
LogPosterior = Callable[[Params, Minibatch], tuple[torch.Tensor, torch.Tensor]]


def log_posterior(model: ProbabilisticModel, prior: GaussianPrior, num_data: int) -> LogPosterior:
    """−Ũ(θ) of the data set of size ``num_data`` as a function ``(θ, minibatch)`` →
    (−Ũ as a scalar tensor, the (B,) log-likelihoods ℓ_{u_b} detached), on the model's
    device; differentiable in θ (``create_graph`` for the force terms)."""
    device = next(model.parameters()).device

    def value(params: Params, batch: Minibatch) -> tuple[torch.Tensor, torch.Tensor]:
        graphs, labels, weights = batch
        graphs, labels, weights = graphs.to(device), labels.to(device), weights.to(device)
        pred = functional_call(model, params, (graphs,), {"create_graph": True})
        ll = model.log_likelihood(pred, labels, graphs)
        return prior.log_prob(params) / num_data + (weights.to(ll.dtype) * ll).sum(), ll.detach()

    return value
