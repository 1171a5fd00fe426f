"""SGHMC with the adaptive mass samples the exact posterior of a linear-Gaussian model."""

import pytest
import torch

from flytune.bayes import sghmc

N, D, NOISE, PRIOR_STD, CHAINS = 40, 3, 0.5, 2.0, 400


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, dtype=torch.float64, generator=gen)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + NOISE * torch.randn(
        N, dtype=torch.float64, generator=gen
    )
    precision = X.T @ X / NOISE**2 + torch.eye(D, dtype=torch.float64) / PRIOR_STD**2
    cov = torch.linalg.inv(precision)
    mean = cov @ X.T @ y / NOISE**2

    def log_posterior(params, batch):
        """Per-datum log posterior −Ũ of CHAINS independent copies of w (rows)."""
        w = params["w"]
        log_prior = -(w**2).sum() / (2 * PRIOR_STD**2)
        log_lik = -((y[None] - w @ X.T) ** 2).sum() / (2 * NOISE**2)
        return (log_prior + log_lik) / N

    return log_posterior, mean, cov, X, y


def run(log_posterior, steps, lr, temperature=1.0, seed=1):
    transform = sghmc.build(log_posterior)
    state = transform.init({"w": torch.zeros(CHAINS, D, dtype=torch.float64)})
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for k in range(steps):
        state = transform.update(state, None, lr=lr, temperature=temperature, num_data=N, generator=gen)
        if k >= steps // 2 and k % 10 == 0:
            samples.append(state.params["w"])
    return state, torch.cat(samples)


def test_samples_exact_posterior(problem):
    log_posterior, mean, cov, _, _ = problem
    _, samples = run(log_posterior, steps=3000, lr=1e-2)
    std = torch.sqrt(torch.diag(cov))
    # means within 5 % of a posterior standard deviation
    assert torch.all(((samples.mean(0) - mean) / std).abs() < 0.05)
    # variances within 4 %, correlations within 0.03
    emp_cov = torch.cov(samples.T)
    assert torch.all((torch.diag(emp_cov) / torch.diag(cov) - 1).abs() < 0.04)
    emp_corr = emp_cov / torch.outer(torch.sqrt(torch.diag(emp_cov)), torch.sqrt(torch.diag(emp_cov)))
    corr = cov / torch.outer(std, std)
    assert torch.all((emp_corr - corr).abs() < 0.03)


def test_zero_temperature_converges_to_the_mode(problem):
    log_posterior, mean, _, _, _ = problem
    state, _ = run(log_posterior, steps=3000, lr=1e-2, temperature=0.0)
    assert torch.allclose(state.params["w"], mean.expand(CHAINS, D), atol=1e-4)


def test_update_follows_the_equations():
    """One step by hand: v, m̂, m⁻¹, p and θ as in the method spec (τ = 0)."""
    theta0 = torch.tensor([0.3, -1.0], dtype=torch.float64)
    transform = sghmc.build(lambda p, b: -(p["x"] ** 2).sum() / 2, friction=0.1, beta=0.999, mass_eps=1e-4)
    state = transform.init({"x": theta0})
    state = transform.update(state, None, lr=0.01, temperature=0.0, num_data=1)
    g = theta0  # ∇Ũ for Ũ = x²/2
    v = 0.001 * g**2
    inv_mass = 1 / (torch.sqrt(v / (1 - 0.999)) + 1e-4)
    p = -0.1 * g
    assert torch.allclose(state.sq_grad_avg["x"], v)
    assert torch.allclose(state.sq_grad_max["x"], v)
    assert torch.allclose(state.momenta["x"], p)
    assert torch.allclose(state.params["x"], theta0 + 0.01 * inv_mass * p)
    assert state.step == 1


def test_init_resets_mass_and_momentum():
    transform = sghmc.build(lambda p, b: -(p["x"] ** 2).sum())
    state = transform.init({"x": torch.ones(3)})
    state = transform.update(state, None, lr=0.1, num_data=5, generator=torch.Generator().manual_seed(0))
    fresh = transform.init(state.params)
    assert fresh.step == 0
    assert torch.equal(fresh.params["x"], state.params["x"])
    for stats in (fresh.momenta, fresh.sq_grad_avg, fresh.sq_grad_max):
        assert torch.count_nonzero(stats["x"]) == 0


@pytest.mark.parametrize("bad", [dict(friction=0.0), dict(friction=1.5), dict(beta=1.0)])
def test_invalid_constants(bad):
    with pytest.raises(ValueError):
        sghmc.build(lambda p, b: p["x"].sum(), **bad)


@pytest.mark.slow
def test_priority_minibatches_sample_the_posterior(problem):
    """Stochastic gradients from the priority estimator: still the posterior, at small η."""
    from flytune.bayes.minibatch import draw_minibatch

    _, mean, cov, X, y = problem
    gen = torch.Generator().manual_seed(0)

    def log_posterior(params, batch):
        idx, weights = batch
        w = params["w"]
        log_prior = -(w**2).sum() / (2 * PRIOR_STD**2)
        ll = -((y[idx][None] - w @ X[idx].T) ** 2) / (2 * NOISE**2)  # (chains, B)
        return log_prior / N + (ll * weights[None]).sum()

    transform = sghmc.build(log_posterior)
    state = transform.init({"w": torch.zeros(CHAINS, D, dtype=torch.float64)})
    samples = []
    steps = 20000
    for k in range(steps):
        batch = draw_minibatch(N, 5, gen, priority=True)
        state = transform.update(state, batch, lr=2e-3, temperature=1.0, num_data=N, generator=gen)
        if k >= steps // 2 and k % 20 == 0:
            samples.append(state.params["w"])
    samples = torch.cat(samples)
    std = torch.sqrt(torch.diag(cov))
    assert torch.all(((samples.mean(0) - mean) / std).abs() < 0.1)
    assert torch.all((torch.diag(torch.cov(samples.T)) / torch.diag(cov) - 1).abs() < 0.1)
