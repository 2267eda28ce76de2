"""Flow matching coupling and the JAX ODE sampler's log-density."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import expm
from scipy.stats import multivariate_normal

from train import flow, sampler


@pytest.mark.parametrize("seed", range(3))
def test_ot_coupling_lowers_pairing_distance(seed):
    rng = np.random.default_rng(seed)
    x1 = rng.standard_normal((128, 8)) * 0.5 + rng.standard_normal(8)
    x0 = rng.standard_normal((128, 8))
    ind = flow.couple(x0, x1, "independent")
    ot = flow.couple(x0, x1, "ot")
    assert sorted(map(tuple, ot)) == sorted(map(tuple, x0))  # a re-pairing, not new points
    d_ind = np.mean(np.sum((ind - x1) ** 2, 1))
    d_ot = np.mean(np.sum((ot - x1) ** 2, 1))
    assert d_ot < 0.8 * d_ind, (d_ot, d_ind)


def affine_field(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return lambda t, x: x @ a.T + b


def closed_form(a, b, mean, scale, x0):
    """v = A x + b for t in [0,1]: x₁ = e^A x₀ + A⁻¹(e^A − I) b; θ = mean + scale ⊙ x₁ is
    Gaussian with mean mean + scale ⊙ A⁻¹(e^A − I) b and covariance S e^A e^Aᵀ S."""
    ea = expm(a)
    c = np.linalg.solve(a, (ea - np.eye(len(a))) @ b)
    s = np.diag(scale)
    theta = mean + scale * (x0 @ ea.T + c)
    return theta, multivariate_normal(mean + scale * c, s @ ea @ ea.T @ s).logpdf(theta)


@pytest.mark.parametrize("method,steps,tol", [("rk4", 20, 1e-3), ("heun", 200, 1e-2), ("euler", 2000, 5e-2)])
def test_sampler_matches_gaussian_log_density_exact_trace(method, steps, tol):
    rng = np.random.default_rng(0)
    d = 4
    a = 0.5 * rng.standard_normal((d, d))
    b = rng.standard_normal(d)
    mean, scale = rng.standard_normal(d), rng.uniform(0.5, 2.0, d)
    key = jax.random.PRNGKey(1)
    theta, logq = sampler.sample(affine_field(a, b), key, 64, mean, scale, method=method, steps=steps, trace="exact")
    x0 = np.asarray(jax.random.normal(jax.random.split(key)[0], (64, d)))  # the same base draws
    theta_ref, logq_ref = closed_form(a, b, mean, scale, x0.astype(np.float64))
    np.testing.assert_allclose(np.asarray(theta), theta_ref, atol=tol * 10, rtol=tol)
    np.testing.assert_allclose(np.asarray(logq), logq_ref, atol=tol * 10, rtol=tol)


def test_hutchinson_is_unbiased_for_the_trace():
    rng = np.random.default_rng(2)
    d = 6
    a = 0.5 * rng.standard_normal((d, d))
    b = rng.standard_normal(d)
    f = affine_field(a, b)
    key = jax.random.PRNGKey(3)
    _, exact = sampler.sample(f, key, 16, np.zeros(d), np.ones(d), trace="exact")
    _, hutch = sampler.sample(f, key, 16, np.zeros(d), np.ones(d), trace="hutchinson", probes=4000)
    np.testing.assert_allclose(np.asarray(hutch), np.asarray(exact), atol=0.1)
    _, one = sampler.sample(f, key, 16, np.zeros(d), np.ones(d), trace="hutchinson", probes=1)
    assert not np.allclose(np.asarray(one), np.asarray(exact), atol=1e-3)  # one probe is noisy


def test_velocity_field_shapes_and_time_dependence():
    params = flow.init(jax.random.PRNGKey(0), 10, [16, 16], 8)
    x = jnp.ones((3, 10))
    v0 = flow.velocity(params, jnp.zeros(3), x)
    v1 = flow.velocity(params, jnp.ones(3), x)
    assert v0.shape == (3, 10) and not np.allclose(v0, v1)


def test_time_sampling():
    """flow.time_pow: p = 1 is exactly the uniform draws; p > 1 moves mass toward t = 1."""
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(flow.sample_times(key, 1000), jax.random.uniform(key, (1000,)))
    t = np.asarray(flow.sample_times(key, 20000, 3.0))
    assert t.min() >= 0 and t.max() <= 1 and abs(t.mean() - 0.75) < 0.01  # E[1 − (1 − u)³] = 3/4


def test_ema_warmup_tracks_a_short_run():
    """flow.ema_warmup: the EMA of a few steps follows the weights instead of staying at init."""
    from train import config
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((48, 5)) + 3.0).astype(np.float32)
    fcfg = dict(config.DEFAULTS["flow"], hidden=[8], time_freqs=4, steps=20, batch=16, eval_every=20, lr=1e-2)
    _, plain = flow.train(x[:32], x[32:], fcfg, 0)
    _, warm = flow.train(x[:32], x[32:], dict(fcfg, ema_warmup=True), 0)
    assert warm["ema_warmup"] and "ema_warmup" not in plain
    assert warm["final_heldout_loss_ema"] < plain["final_heldout_loss_ema"]
    assert warm["final_train_loss"] == plain["final_train_loss"]  # the raw weights are the same
