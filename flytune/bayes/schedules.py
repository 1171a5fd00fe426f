r"""Step-size and noise-temperature schedules of the sampler (method §4 and §8).

A :class:`Schedule` lists, for every step k = 1..K, the step size η_k and the noise
temperature τ_k, plus the steps after which a sample is taken and the steps before
which the sampler state is reset (mass statistics and momentum).

- :func:`cycle_schedule` — one update after a new structure (on-the-fly):
  η_k = ½·η_max·(1 + cos(π(k−1)/K)) + 1e-8; τ_k = 0 for the noise-free start (k ≤ k₀,
  k₀ = ⌊0.2·K⌋ − 2, i.e. k ≤ 398 of 2000), then a linear ramp to 1 over 5 % of K
  (at least 10 steps), then 1. The sampler is reset before step 1; the sample is θ after step K.
- :func:`offline_schedule` — fine-tuning on a fixed data set: a long initial phase whose
  step size decays exponentially from η_start to η_end (with the same noise-free start
  and ramp), giving the first sample, then ``cycles`` half-cosine cycles of length C
  with peak η_max, each ending with a sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ETA_FLOOR = 1e-8
#: the noise ramp lasts at least this many steps, so the mass statistics of parameters
#: without data gradient (e.g. the zero-initialised σ head) adapt before full noise;
#: a one-step ramp in a short cycle lets such parameters jump by α·sqrt(2η/(ε_m·N))
#: and blows the σ head up. K = 2000 (ramp of 100 steps) is unaffected.
MIN_RAMP_STEPS = 10


@dataclass(frozen=True)
class Schedule:
    step_size: np.ndarray  # (K,) η_k
    temperature: np.ndarray  # (K,) τ_k
    sample_after: tuple[int, ...]  # 0-based step indices after which θ is a sample
    reset_before: tuple[int, ...] = (0,)  # 0-based step indices before which the sampler re-inits

    def __len__(self) -> int:
        return int(self.step_size.shape[0])


def noise_ramp(num_steps: int, noise_off: float = 0.2, ramp: float = 0.05) -> np.ndarray:
    """τ_k for k = 1..K: 0 for k ≤ k₀ = ⌊noise_off·K⌋ − 2, linear to 1 over
    max(ramp·K, MIN_RAMP_STEPS) steps, then 1."""
    k = np.arange(1, num_steps + 1, dtype=float)
    k0 = max(math.floor(noise_off * num_steps) - 2, 0)
    width = max(ramp * num_steps, MIN_RAMP_STEPS)
    return np.clip((k - k0) / width, 0.0, 1.0)


def half_cosine(num_steps: int, eta_max: float) -> np.ndarray:
    """η_k = ½·η_max·(1 + cos(π(k−1)/K)) + 1e-8 for k = 1..K."""
    k = np.arange(1, num_steps + 1, dtype=float)
    return 0.5 * eta_max * (1.0 + np.cos(np.pi * (k - 1) / num_steps)) + ETA_FLOOR


def cycle_schedule(
    num_steps: int = 2000, eta_max: float = 1e-4, noise_off: float = 0.2, ramp: float = 0.05
) -> Schedule:
    """One on-the-fly update cycle (defaults: K = 2000, the NequIP-type η_max)."""
    if num_steps < 1:
        raise ValueError(f"a cycle needs at least one step, got {num_steps}")
    return Schedule(
        step_size=half_cosine(num_steps, eta_max),
        temperature=noise_ramp(num_steps, noise_off, ramp),
        sample_after=(num_steps - 1,),
    )


def offline_schedule(
    initial_steps: int,
    eta_start: float,
    eta_end: float,
    cycles: int = 0,
    cycle_steps: int = 500,
    eta_max: float | None = None,
    noise_off: float = 0.2,
    ramp: float = 0.05,
) -> Schedule:
    """Initial exponential-decay phase (first sample), then ``cycles`` cosine cycles.

    Initial phase: η_k = η_start·(η_end/η_start)^((k−1)/(K₀−1)), τ from :func:`noise_ramp`.
    Each later cycle: :func:`half_cosine` with peak ``eta_max`` (default η_start) at full
    temperature, keeping the mass statistics and momentum of the chain.
    """
    if initial_steps < 1:
        raise ValueError(f"the initial phase needs at least one step, got {initial_steps}")
    frac = np.arange(initial_steps) / max(initial_steps - 1, 1)
    etas = [eta_start * (eta_end / eta_start) ** frac]
    temps = [noise_ramp(initial_steps, noise_off, ramp)]
    samples = [initial_steps - 1]
    for _ in range(cycles):
        etas.append(half_cosine(cycle_steps, eta_start if eta_max is None else eta_max))
        temps.append(np.ones(cycle_steps))
        samples.append(samples[-1] + cycle_steps)
    return Schedule(np.concatenate(etas), np.concatenate(temps), tuple(samples))
