r"""The unbiased priority minibatch estimator of the mean log-likelihood (method §3).

With N labelled structures, the last n of them new (the labels this update learns:
n = 1 when every label is learned at once, more when updates are deferred), and
minibatch size B:

- N ≤ B: the batch is the whole data set, weights 1/N, and L̂ is exact;
- otherwise B indices are drawn independently, each new structure with probability
  q_new = w/n and each older one with q_old = (1 − w)/(N − n), where the new
  structures' share is

      w = min(n/B, 1 − 1/B),

  so that each new structure appears once per batch on average while n < B, and the
  older data keep one draw per batch on average however many labels are new (n = N:
  uniform). For n = 1 this is the method's q_N = 1/B, q_i = (1 − 1/B)/(N − 1). Then

      L̂ = (1/B)·Σ_b ℓ_{u_b} / (N·q_{u_b}),

  which is unbiased for any q: E[L̂] = Σ_i q_i·ℓ_i/(N q_i) = (1/N)·Σ_i ℓ_i.

Why n matters: an update that learns 16 waiting labels with only the newest favoured
draws each of the other 15 with q ≈ 0.8/N, about once per 100-step cycle at N = 300,
so it hardly sees them. (At N ≤ 59, where each is still drawn ≈ 8 times, replaying a
run's updates with both rules gave the same errors: ``benchmarks/deferred_learning.py``.)

``new_labels = 0`` draws uniformly (q_i = 1/N), for offline fine-tuning on a fixed set.
"""

from __future__ import annotations

import torch


def sampling_probabilities(num_data: int, batch_size: int, new_labels: int = 1) -> torch.Tensor:
    """(N,) draw probabilities q_i; the new structures are the last ``new_labels``."""
    if num_data < 1 or batch_size < 1 or new_labels < 0:
        raise ValueError(f"need num_data >= 1, batch_size >= 1 and new_labels >= 0, "
                         f"got {num_data}, {batch_size}, {new_labels}")
    # uniform: offline, all data new, or B = 1 (which would never draw old data)
    if new_labels == 0 or new_labels >= num_data or batch_size == 1:
        return torch.full((num_data,), 1.0 / num_data, dtype=torch.float64)
    share = min(new_labels / batch_size, 1.0 - 1.0 / batch_size)
    q = torch.full((num_data,), (1.0 - share) / (num_data - new_labels), dtype=torch.float64)
    q[num_data - new_labels :] = share / new_labels
    return q


def draw_minibatch(
    num_data: int, batch_size: int, generator: torch.Generator, new_labels: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices u_b and weights w_b such that L̂ = Σ_b w_b·ℓ_{u_b} is unbiased for (1/N)Σ_i ℓ_i.

    Returns the whole data set with w = 1/N when N ≤ B (no random numbers are drawn),
    else B independent draws with w_b = 1/(B·N·q_{u_b}).
    """
    if num_data <= batch_size:
        return torch.arange(num_data), torch.full((num_data,), 1.0 / num_data, dtype=torch.float64)
    q = sampling_probabilities(num_data, batch_size, new_labels)
    indices = torch.multinomial(q, batch_size, replacement=True, generator=generator)
    weights = 1.0 / (batch_size * num_data * q[indices])
    return indices, weights
