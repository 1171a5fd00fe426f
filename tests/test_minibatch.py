"""The priority minibatch estimator against the method's q, computed here independently."""

import numpy as np
import pytest
import torch

from flytune.bayes.minibatch import draw_minibatch, sampling_probabilities


def spec_q(num_data: int, batch_size: int, new: int = 1) -> np.ndarray:
    """method §3, written out: with n new labels, a share w = min(n/B, 1 − 1/B) split
    evenly among them and 1 − w among the N − n older ones (n = 1: q_N = 1/B and
    (1 − 1/B)/(N − 1) for each older one)."""
    share = min(new / batch_size, 1 - 1 / batch_size)
    q = np.full(num_data, (1 - share) / (num_data - new))
    q[num_data - new :] = share / new
    return q


def research_weights(indices: torch.Tensor, num_data: int, batch_size: int) -> torch.Tensor:
    """The weights of the original research code as the method spec characterises them
    (over-weighting the likelihood by up to 1.7× at small N): the newest structure's weight
    lacks the 1/B of the batch mean, w = 1/(N·q_N), the others are right. Its total weight
    (N + B − 1)/N is 1.67 at N = B + 1 and tends to 1 for large N."""
    q = torch.as_tensor(spec_q(num_data, batch_size))[indices]
    w = 1.0 / (batch_size * num_data * q)
    return torch.where(indices == num_data - 1, 1.0 / (num_data * q), w)


def code_weights(num_data: int, batch_size: int, draws: int = 400, new: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(the weight the code gives each index, how often each index was drawn)."""
    gen = torch.Generator().manual_seed(0)
    weight = np.full(num_data, np.nan)
    counts = np.zeros(num_data)
    for _ in range(draws):
        idx, w = draw_minibatch(num_data, batch_size, gen, new)
        for i, wi in zip(idx.tolist(), w.tolist()):
            assert np.isnan(weight[i]) or weight[i] == wi  # one weight per index
            weight[i] = wi
            counts[i] += 1
    return weight, counts


def exact_expectation(weight: np.ndarray, ll: np.ndarray, batch_size: int, new: int = 1) -> float:
    """E[Σ_b w_b ℓ_{u_b}] = B·Σ_i q_i·w_i·ℓ_i under the spec's q."""
    return float(batch_size * np.sum(spec_q(len(ll), batch_size, new) * weight * ll))


@pytest.mark.parametrize("num_data,batch_size,new", [(6, 5, 1), (7, 5, 1), (30, 5, 1), (200, 10, 1),
                                                      (30, 5, 3), (30, 5, 16), (200, 10, 4)])
def test_estimator_is_unbiased_under_the_spec_q(num_data, batch_size, new):
    ll = np.random.default_rng(1).normal(-50.0, 20.0, num_data)
    weight, counts = code_weights(num_data, batch_size, draws=4000 if num_data < 100 else 20000, new=new)
    assert not np.isnan(weight).any()
    assert exact_expectation(weight, ll, batch_size, new) == pytest.approx(ll.mean(), rel=1e-12)
    # the draws follow the spec's q: a chi-square test at the 0.1 % level
    from scipy import stats

    expected = spec_q(num_data, batch_size, new) * counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert stats.chi2.sf(chi2, num_data - 1) > 1e-3
    # and the code's own probabilities are the spec's
    np.testing.assert_allclose(sampling_probabilities(num_data, batch_size, new).numpy(),
                               spec_q(num_data, batch_size, new))


@pytest.mark.parametrize("num_data,batch_size,factor", [(6, 5, 10 / 6), (30, 5, 34 / 30)])
def test_research_weights_fail_the_same_check(num_data, batch_size, factor):
    """With every ℓ_i equal the estimate must equal ℓ; the research weights give factor·ℓ."""
    ll = np.full(num_data, -50.0)
    indices = torch.arange(num_data)
    weight = research_weights(indices, num_data, batch_size).numpy()
    biased = exact_expectation(weight, ll, batch_size)
    assert biased == pytest.approx(factor * ll.mean(), rel=1e-12)
    assert abs(biased - ll.mean()) > 0.1 * abs(ll.mean())


def test_uniform_draws_for_offline_fine_tuning_are_unbiased():
    """q_i = 1/N: every weight is 1/(B·N·q) = 1/B, so E[Σ_b w_b ℓ_{u_b}] = (1/N)·Σ_i ℓ_i."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        _, w = draw_minibatch(30, 5, gen, new_labels=0)
        np.testing.assert_allclose(w.numpy(), np.full(5, 1 / 5))


def test_newest_drawn_once_per_batch_on_average():
    gen = torch.Generator().manual_seed(3)
    counts = [int((draw_minibatch(50, 5, gen)[0] == 49).sum()) for _ in range(5000)]
    assert np.mean(counts) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("new,per_new,old_total", [(3, 1.0, 2.0), (16, 4 / 16, 1.0)])
def test_deferred_labels_are_all_favoured(new, per_new, old_total):
    """n new labels of a deferred update: each is drawn once per batch while n < B; with
    n ≥ B the older data keep one draw per batch (B = 5, N = 300)."""
    gen = torch.Generator().manual_seed(4)
    counts = np.zeros(300)
    for _ in range(4000):
        np.add.at(counts, draw_minibatch(300, 5, gen, new)[0].numpy(), 1)
    counts /= 4000
    assert counts[-new:].mean() == pytest.approx(per_new, rel=0.05)
    assert counts[-new:].min() > 0.5 * per_new  # every one of them, not only the newest
    assert counts[:-new].sum() == pytest.approx(old_total, rel=0.05)


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
