import numpy as np
import pytest
import torch

from flytune.bayes.minibatch import draw_minibatch, sampling_probabilities


@pytest.mark.parametrize("num_data,batch_size", [(7, 5), (30, 5), (200, 10)])
def test_priority_probabilities(num_data, batch_size):
    q = sampling_probabilities(num_data, batch_size)
    assert float(q.sum()) == pytest.approx(1.0)
    assert float(q[-1]) == pytest.approx(1.0 / batch_size)  # newest: once per batch on average
    assert torch.allclose(q[:-1], torch.full((num_data - 1,), (1 - 1 / batch_size) / (num_data - 1), dtype=q.dtype))


@pytest.mark.parametrize("num_data,batch_size,priority", [(7, 5, True), (30, 5, True), (30, 5, False)])
def test_estimator_is_unbiased(num_data, batch_size, priority):
    """E[Σ_b w_b ℓ_{u_b}] equals (1/N) Σ_i ℓ_i, exactly and over many draws."""
    ll = torch.as_tensor(np.random.default_rng(1).normal(-50.0, 20.0, num_data))
    full_mean = float(ll.mean())
    # exact expectation of one term times B
    q = sampling_probabilities(num_data, batch_size, priority)
    exact = float((q * ll / (batch_size * num_data * q)).sum() * batch_size)
    assert exact == pytest.approx(full_mean, rel=1e-12)
    # Monte Carlo over many draws
    gen = torch.Generator().manual_seed(0)
    draws = 40_000
    estimates = torch.empty(draws, dtype=torch.float64)
    for d in range(draws):
        idx, w = draw_minibatch(num_data, batch_size, gen, priority)
        estimates[d] = (w * ll[idx]).sum()
    standard_error = float(estimates.std()) / np.sqrt(draws)
    assert abs(float(estimates.mean()) - full_mean) < 4 * standard_error


def test_newest_drawn_once_per_batch_on_average():
    gen = torch.Generator().manual_seed(3)
    counts = [int((draw_minibatch(50, 5, gen)[0] == 49).sum()) for _ in range(5000)]
    assert np.mean(counts) == pytest.approx(1.0, abs=0.05)


def test_small_data_is_exact():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    idx, w = draw_minibatch(4, 5, gen)
    assert idx.tolist() == [0, 1, 2, 3]
    assert torch.allclose(w, torch.full((4,), 0.25, dtype=w.dtype))
    assert torch.equal(gen.get_state(), state)  # no random numbers consumed


def test_batch_size_one_falls_back_to_uniform():
    q = sampling_probabilities(10, 1)
    assert torch.allclose(q, torch.full((10,), 0.1, dtype=q.dtype))
