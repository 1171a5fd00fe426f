r"""The unbiased priority minibatch estimator of the mean log-likelihood (method §3).

With N labelled structures (index N−1 is the newest) and minibatch size B:

- N ≤ B: the batch is the whole data set, weights 1/N, and L̂ is exact;
- otherwise B indices are drawn independently with probability
  q_new = 1/B for the newest structure and q_i = (1 − 1/B)/(N − 1) for each older one
  (so the newest appears once per batch on average), and

      L̂ = (1/B)·Σ_b ℓ_{u_b} / (N·q_{u_b}),

  which is unbiased: E[L̂] = Σ_i q_i·ℓ_i/(N q_i) = (1/N)·Σ_i ℓ_i.

``priority=False`` draws uniformly (q_i = 1/N), for offline fine-tuning on a fixed set.
"""

from __future__ import annotations

import torch


def sampling_probabilities(num_data: int, batch_size: int, priority: bool = True) -> torch.Tensor:
    """(N,) draw probabilities q_i; the newest structure is the last one."""
    if num_data < 1 or batch_size < 1:
        raise ValueError(f"need num_data >= 1 and batch_size >= 1, got {num_data}, {batch_size}")
    if not priority or num_data == 1 or batch_size == 1:  # B = 1 would never draw old data
        return torch.full((num_data,), 1.0 / num_data, dtype=torch.float64)
    q = torch.full((num_data,), (1.0 - 1.0 / batch_size) / (num_data - 1), dtype=torch.float64)
    q[-1] = 1.0 / batch_size
    return q


def draw_minibatch(
    num_data: int, batch_size: int, generator: torch.Generator, priority: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices u_b and weights w_b such that L̂ = Σ_b w_b·ℓ_{u_b} is unbiased for (1/N)Σ_i ℓ_i.

    Returns the whole data set with w = 1/N when N ≤ B (no random numbers are drawn),
    else B independent draws with w_b = 1/(B·N·q_{u_b}).
    """
    if num_data <= batch_size:
        return torch.arange(num_data), torch.full((num_data,), 1.0 / num_data, dtype=torch.float64)
    q = sampling_probabilities(num_data, batch_size, priority)
    indices = torch.multinomial(q, batch_size, replacement=True, generator=generator)
    weights = 1.0 / (batch_size * num_data * q[indices])
    return indices, weights
