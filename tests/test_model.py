"""The probabilistic model, its likelihood, the priors and the ensemble combination."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import copper, emt_labelled, ethanol
from flytune.bayes.dataset import TrainingSet
from flytune.bayes.ensemble import combine
from flytune.bayes.model import ForceSigmaHead, ProbabilisticModel
from flytune.bayes.prior import GaussianPrior, random_start, transfer_prior, uninformative_prior
from flytune.units import KCAL_MOL

S0 = 0.1 * KCAL_MOL


@pytest.fixture(scope="module")
def model(sevennet):
    return ProbabilisticModel(sevennet, energy_sigma=0.05 * KCAL_MOL, force_sigma0=S0, stress_sigma=0.01)


def test_head_starts_at_zero_and_sigma_at_s0(model):
    head = ForceSigmaHead(128)
    assert all(torch.count_nonzero(p) == 0 for p in head.parameters())
    assert [m.out_features for m in head.layers if isinstance(m, torch.nn.Linear)] == [64, 16, 1]
    pred = model(model.backbone.batch([ethanol(1)]))
    assert torch.allclose(pred.force_sigma, torch.full((9,), S0))


def test_prior_centre_equals_pretrained_weights(model, sevennet):
    prior = transfer_prior(model, 0.2)
    pretrained = sevennet.trainable_parameters()
    for name, value in pretrained.items():
        assert torch.equal(prior.centre[f"backbone.{name}"], value)
    head = [k for k in prior.centre if k.startswith("head.")]
    assert len(head) == 6
    assert all(torch.count_nonzero(prior.centre[k]) == 0 for k in head)
    assert prior.sigma == 0.2


def test_uninformative_prior_is_zero_mean_with_random_start(model):
    prior = uninformative_prior(model, 1.0)
    assert all(torch.count_nonzero(c) == 0 for c in prior.centre.values())
    start = random_start(model, seed=0)
    assert start.keys() == prior.centre.keys()
    pretrained = model.trainable_parameters()
    changed = [k for k in start if k.startswith("backbone.") and not torch.equal(start[k], pretrained[k])]
    assert len(changed) > 10


def test_gaussian_prior_log_prob():
    centre = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}
    params = {"a": torch.tensor([0.0, 2.5]), "b": torch.tensor([[0.0]])}
    prior = GaussianPrior(centre, sigma=0.7)
    expected = sum(stats.norm.logpdf(x, m, 0.7) for x, m in [(0.0, 1.0), (2.5, 2.0), (0.0, 0.5)])
    assert float(prior.log_prob(params)) == pytest.approx(expected)


def test_log_likelihood_equals_gaussian_sum(model):
    structures = [emt_labelled(ethanol(1)), emt_labelled(copper(2), with_stress=True)]
    data = TrainingSet(model.backbone, energy_offset=0.0, one_composition=False)
    data.extend(structures)
    graphs, labels = data.batch([0, 1])
    pred = model(graphs)
    ll = model.log_likelihood(pred, labels, graphs).detach().numpy()
    for s, atoms in enumerate(structures):
        res = atoms.calc.results
        sl = slice(0, 9) if s == 0 else slice(9, 41)
        expected = stats.norm.logpdf(res["energy"], float(pred.energy[s].detach()), 0.05 * KCAL_MOL)
        expected += stats.norm.logpdf(res["forces"], pred.forces[sl].detach().numpy(), S0).sum()
        if s == 1:
            stress = atoms.calc.results["stress"]
            expected += stats.norm.logpdf(stress, pred.stress[1].detach().numpy(), 0.01).sum()
        assert ll[s] == pytest.approx(expected, rel=1e-5)


def test_combine_total_variance():
    means = np.array([[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]])
    variances = np.array([[0.1, 0.2], [0.3, 0.2], [0.2, 0.2]])
    mu, var = combine(means, variances)
    np.testing.assert_allclose(mu, [2.0, 3.0])
    # unbiased variance of member means + mean of member variances
    np.testing.assert_allclose(var, [1.0 + 0.2, 3.0 + 0.2])
    mu1, var1 = combine(means[:1], variances[:1])
    np.testing.assert_allclose(var1, variances[0])  # one member: no epistemic part


def test_gaussian_log_density_constant():
    from flytune.bayes.model import gaussian_log_density

    value = gaussian_log_density(torch.tensor(0.0), torch.tensor(0.0), 1.0)
    assert float(value) == pytest.approx(-0.5 * math.log(2 * math.pi))
