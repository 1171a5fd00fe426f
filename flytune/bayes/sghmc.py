r"""SGHMC with an adaptive (AMSGrad-style) diagonal mass, in the style of ``posteriors``.

``build(log_posterior, ...)`` returns a :class:`Transform` with ``init(params)`` and
``update(state, batch, lr=..., temperature=..., num_data=..., generator=...)``.
``log_posterior(params, batch)`` must return −Ũ(θ) = (1/N)·log p(θ) + L̂(θ), the
per-datum log posterior, as a scalar tensor (and optionally an aux value).

Per scalar parameter, with g_t = ∇Ũ(θ_t) on a fresh minibatch (method §4):

    v_t   = β·v_{t−1} + (1 − β)·g_t²                         (v_0 = 0)
    m̂_t   = max(m̂_{t−1}, v_t)
    m⁻¹_t = 1 / ( sqrt(m̂_t / (1 − β^t)) + ε_m )
    p_{t+1} = (1 − α)·p_t − α·g_t + α·ξ_t,   ξ_t ~ N(0, τ_t²·2 / (η_t·m⁻¹_t·N))
    θ_{t+1} = θ_t + η_t·m⁻¹_t·p_{t+1}

With τ = 1 and small η this samples exp(−N·Ũ(θ)) = p(θ | D) (Chen et al. 2014, with
a diagonal preconditioner). ``init`` resets the mass statistics and momentum (t = 0),
as is done at the start of every update cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import torch

Params = dict[str, torch.Tensor]


@dataclass
class SGHMCState:
    """State of one chain: position θ, momentum p, mass statistics (v, m̂), step t."""

    params: Params
    momenta: Params
    sq_grad_avg: Params  # v
    sq_grad_max: Params  # m̂
    step: int = 0  # t, steps since the last init
    #: −Ũ at the last step's θ (before the move); a 0-d tensor on the parameters' device
    #: after an update (read it with ``float``, which waits for the device)
    log_posterior: torch.Tensor | float = float("nan")
    aux: Any = field(default=None, repr=False)

    def state_dict(self) -> dict:
        """Every field but ``aux``, with −Ũ as a float."""
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "aux"}
        return state | {"log_posterior": float(self.log_posterior)}

    @classmethod
    def from_state_dict(cls, state: dict) -> SGHMCState:
        return cls(**state)


def init_state(params: Params) -> SGHMCState:
    """Fresh state at ``params``: zero momentum and mass statistics, t = 0."""
    params = {k: v.detach().clone() for k, v in params.items()}
    zeros = lambda: {k: torch.zeros_like(v) for k, v in params.items()}  # noqa: E731
    return SGHMCState(params=params, momenta=zeros(), sq_grad_avg=zeros(), sq_grad_max=zeros())


class Transform(NamedTuple):
    init: Callable[[Params], SGHMCState]
    update: Callable[..., SGHMCState]


def build(
    log_posterior: Callable[[Params, Any], Any],
    *,
    friction: float = 0.1,
    beta: float = 0.999,
    mass_eps: float = 1e-4,
    has_aux: bool = False,
) -> Transform:
    """SGHMC with adaptive mass for ``log_posterior`` (−Ũ; see the module docstring).

    ``friction`` α, ``beta`` β and ``mass_eps`` ε_m are the method's constants
    (defaults 0.1, 0.999, 1e-4).
    """
    if not 0.0 < friction <= 1.0:
        raise ValueError(f"friction must be in (0, 1], got {friction}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")

    init = init_state

    def update(
        state: SGHMCState,
        batch: Any,
        *,
        lr: float,
        temperature: float = 1.0,
        num_data: int,
        generator: torch.Generator | None = None,
    ) -> SGHMCState:
        """One step at step size ``lr`` η and noise temperature τ; ``generator`` draws ξ
        (on its own device). Nothing here waits for the device."""
        names = list(state.params)
        leaves = {k: state.params[k].detach().requires_grad_(True) for k in names}
        result = log_posterior(leaves, batch)
        value, aux = result if has_aux else (result, None)
        grads = torch.autograd.grad(value, [leaves[k] for k in names], allow_unused=True)
        t = state.step + 1
        bias_correction = 1.0 - beta**t
        new_params, new_momenta, new_v, new_m = {}, {}, {}, {}
        for name, grad in zip(names, grads):
            theta = state.params[name]
            g = -grad.detach() if grad is not None else torch.zeros_like(theta)  # ∇Ũ = −∇(−Ũ)
            v = beta * state.sq_grad_avg[name] + (1.0 - beta) * g * g
            m_hat = torch.maximum(state.sq_grad_max[name], v)
            inv_mass = 1.0 / (torch.sqrt(m_hat / bias_correction) + mass_eps)
            p = (1.0 - friction) * state.momenta[name] - friction * g
            if temperature > 0.0:
                noise_std = temperature * torch.sqrt(2.0 / (lr * inv_mass * num_data))
                # drawn where the generator lives: on the chain's device from a device
                # generator (no copy per tensor), or on the CPU and then moved
                where = generator.device if generator is not None else theta.device
                noise = torch.randn(theta.shape, generator=generator, dtype=theta.dtype, device=where)
                p = p + friction * noise_std * noise.to(theta.device)
            new_params[name] = theta + lr * inv_mass * p
            new_momenta[name], new_v[name], new_m[name] = p, v, m_hat
        return SGHMCState(
            params=new_params,
            momenta=new_momenta,
            sq_grad_avg=new_v,
            sq_grad_max=new_m,
            step=t,
            log_posterior=value.detach(),
            aux=aux,
        )

    return Transform(init, update)
