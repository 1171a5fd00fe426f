r"""Adaptive end of an on-the-fly update cycle.

Once the noise of a cycle is fully on (τ_k = 1), the chain samples. It may stop before
step K when two series, recorded from that point on, have settled:

- ℓ_new, the mean log-likelihood of the structures the update learns (the newest, or
  the labels a deferred update learns at once; recorded at the steps whose minibatch
  holds one): the posterior has absorbed the new labels;
- L̂ = Σ_b w_b·ℓ_{u_b}, the minibatch estimate of the mean log-likelihood of all the
  data: the chain's fit as a whole has mixed.

The prior term of −Ũ is left out on purpose: in ~10⁶ dimensions the distance from the
prior centre keeps growing slowly for far longer than a cycle (on SevenNet-0 its drift
still drifted steadily after 150 full-noise steps while both likelihoods were stationary),
and a fixed-length cycle does not wait for it either.

A series has settled when the means of its last two windows of W values agree within
a tolerance δ in nats:

    d = |ȳ_B − ȳ_A|,     settled  ⇔  d < δ        (A: values −2W..−W, B: the last W)

On the likelihood-ratio scale a change below 1 nat (the default δ) is evidence "not
worth more than a bare mention" (Kass & Raftery), so further steps would not change
how well the posterior explains the new label. A significance test (Geweke's z) does
not work here: successive SGHMC states are strongly correlated (friction 0.1), the
series wander slowly, and s²/W would see "drift" in a stationary chain for hundreds
of steps. A chain that never settles runs the whole cycle. The sample is θ at the
step it stops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def drift(values: Sequence[float], window: int) -> float:
    """d = |ȳ_B − ȳ_A|, the change of the mean over the last two windows (inf if too short)."""
    if len(values) < 2 * window:
        return math.inf
    values = np.asarray(values, dtype=float)
    return abs(float(values[-window:].mean() - values[-2 * window : -window].mean()))


@dataclass(frozen=True)
class EarlyStop:
    """Stop a cycle once ℓ_new and L̂ have both settled (see the module docstring).

    ``window`` W: values per window; ``tolerance_nats`` δ: the largest change of the
    window means counted as settled. The test runs every W steps of the full-noise phase.
    """

    window: int = 25
    tolerance_nats: float = 1.0

    def __post_init__(self) -> None:
        if self.window < 2 or self.tolerance_nats <= 0:
            raise ValueError(f"need window >= 2 and tolerance_nats > 0, got {self.window}, {self.tolerance_nats}")

    def settled(self, newest_ll: Sequence[float], mean_ll: Sequence[float]) -> bool:
        """Both ℓ_new and L̂ (the series since full noise) have settled."""
        return drift(newest_ll, self.window) < self.tolerance_nats and drift(mean_ll, self.window) < self.tolerance_nats
