"""Pieces of train/diagnostics/diagnose_fidelity.py whose mistakes would silently bias its numbers."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import log_softmax

from train import canon, config, mlp
from train.diagnostics import diagnose_fidelity as fid

SIZES = [2, 5, 4, 3]


def toy(seed=0, n=30):
    rng = np.random.default_rng(seed)
    cfg = config._merge(config.DEFAULTS, {"name": "toy", "data": {"source": "toy"}})
    cfg["likelihood"]["temperature"], cfg["posterior"]["prior_scale"] = 2.0, 0.7
    x = rng.standard_normal((n, SIZES[0])).astype(np.float32) * 3 + 1
    data = {"x_train": x, "y_train": rng.integers(0, SIZES[-1], n), "x_mean": x.mean(0),
            "x_std": x.std(0), "y_mean": np.zeros(1, np.float32), "y_std": np.ones(1, np.float32)}
    return cfg, data, {"noise_sigma": np.float32(0.1)}


def test_log_posterior_is_the_nuts_target_and_scale_invariant_in_the_likelihood():
    cfg, data, map_out = toy()
    logpost, loglik = fid.log_posterior_fn(cfg, data, map_out, SIZES)
    rng = np.random.default_rng(1)
    xs = (data["x_train"] - data["x_mean"]) / data["x_std"]
    for _ in range(3):
        theta = rng.standard_normal(mlp.dim(SIZES))
        (w1, b1), (w2, b2), (w3, b3) = mlp.unflatten(theta, SIZES)
        h = np.maximum(np.maximum(xs @ w1.T + b1, 0) @ w2.T + b2, 0) @ w3.T + b3
        ll = log_softmax(h, axis=1)[np.arange(len(xs)), data["y_train"]].sum() / 2.0
        want = ll - 0.5 * np.sum((theta / 0.7) ** 2)
        got = float(logpost(jnp.asarray(theta, jnp.float32)))
        assert abs(got - want) <= 1e-4 * abs(want)
        # canonicalization keeps the likelihood (same function) but not the prior
        c = canon.canonicalize(theta, SIZES)
        assert abs(float(loglik(jnp.asarray(c, jnp.float32))) - ll) <= 1e-4 * abs(ll)


def test_decanonicalize_inverts_canonicalize_and_keeps_the_function():
    rng = np.random.default_rng(2)
    theta = rng.standard_normal((4, mlp.dim(SIZES))) * 2
    c = canon.canonicalize(theta, SIZES)
    np.testing.assert_allclose(fid.decanonicalize(c, theta, SIZES), theta, rtol=1e-5, atol=1e-5)
    donor = rng.standard_normal((4, mlp.dim(SIZES)))
    moved = fid.decanonicalize(c, donor, SIZES)
    x = jnp.asarray(rng.standard_normal((7, SIZES[0])), jnp.float32)
    for a, b in zip(moved, theta):
        np.testing.assert_allclose(mlp.forward(jnp.asarray(a), x, SIZES),
                                   mlp.forward(jnp.asarray(b, jnp.float32), x, SIZES), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(canon.canonicalize(moved, SIZES), c, rtol=1e-4, atol=1e-5)


def test_snis_ess_matches_theory():
    rng = np.random.default_rng(3)
    z = rng.standard_normal(20000)
    _, same = fid.snis(-0.5 * z**2, -0.5 * z**2)
    assert abs(same["ess"] - 20000) < 1e-6
    w, shifted = fid.snis(-0.5 * (z - 0.5) ** 2, -0.5 * z**2)  # q = N(0,1), p = N(0.5,1)
    assert abs(shifted["ess"] / 20000 - np.exp(-0.25)) < 0.03  # ESS/N -> 1/E_q[(p/q)²] = e^{-μ²}
    assert abs(np.sum(w * z) - 0.5) < 0.05


def test_hmc_runner_keeps_a_gaussian_invariant():
    sd = jnp.array([0.5, 2.0])
    logpost = lambda th: -0.5 * jnp.sum((th / sd) ** 2)
    init, run = fid.make_runner(logpost, sd**2, 5)
    start = np.random.default_rng(4).standard_normal((4000, 2)) * np.asarray(sd)
    states, acc = run(init(jnp.asarray(start, jnp.float32)), jax.random.PRNGKey(0), 20, 0.3)
    out = np.asarray(states.position)
    assert float(acc) > 0.9
    np.testing.assert_allclose(out.std(0), np.asarray(sd), rtol=0.06)
    assert np.all(np.abs(out.mean(0)) < 0.1 * np.asarray(sd))
    # The chains moved: exact draws kept in place would pass the checks above too.
    assert np.all(np.mean(np.abs(out - start), axis=0) > 0.3 * np.asarray(sd))
    lag = [np.corrcoef(out[:, i], start[:, i])[0, 1] for i in range(2)]
    assert max(lag) < 0.5, lag
    # From over-dispersed starts (3 sd) the spread comes back to sd.
    wide, _ = run(init(jnp.asarray(3 * start, jnp.float32)), jax.random.PRNGKey(1), 20, 0.3)
    np.testing.assert_allclose(np.asarray(wide.position).std(0), np.asarray(sd), rtol=0.1)
