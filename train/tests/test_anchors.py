"""Start times and anchors (issue 12), without a build: the Gaussian-mixture log-density against
a float64 brute force, the JAX sampler at t₀ = 1 (the un-whitened anchors, permuted) and at
0 < t₀ < 1 (starts at t₀·a + (1 − t₀)·z, integrates over [t₀, 1]), thinning, the OOD inputs,
the ratios and the default-start-time rule. The bundle itself: test_end_to_end.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from train import bundle, evaluate, metrics, sampler


def _anchors(n=7, d=5, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d)).astype(np.float16).astype(np.float32)
    mean = rng.standard_normal(d).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, d).astype(np.float32)
    return a, mean, scale


@pytest.mark.parametrize("t0", [0.0, 0.3, 0.9, 0.99])
def test_mixture_log_density_matches_brute_force(t0):
    a, _, _ = _anchors()
    rng = np.random.default_rng(1)
    x = (t0 * a[[0, 3, 3, 6]] + (1 - t0) * rng.standard_normal((4, a.shape[1]))).astype(np.float32)
    x = np.concatenate([x, 3 * rng.standard_normal((2, a.shape[1])).astype(np.float32)])  # far from all
    s = 1.0 - t0
    want = np.array([logsumexp([multivariate_normal.logpdf(xi.astype(np.float64), t0 * ai.astype(np.float64),
                                                           s**2 * np.eye(a.shape[1])) for ai in a]) - np.log(len(a))
                     for xi in x])
    got = np.asarray(sampler.mixture_log_density(jnp.asarray(x), a, t0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


def test_start_time_one_returns_the_unwhitened_anchors_permuted():
    a, mean, scale = _anchors(n=9)
    want = mean[None] + scale[None] * a  # float32, as whiten.invert and the runtime un-whiten
    theta, logq = sampler.sample_batched(None, jax.random.PRNGKey(3), len(a), mean, scale,
                                         start_time=1.0, anchors=a)
    assert theta.dtype == np.float32 and np.all(logq == 0)
    order = np.lexsort(theta.T[::-1])
    np.testing.assert_array_equal(theta[order], want[np.lexsort(want.T[::-1])])  # bitwise, a permutation
    assert not np.array_equal(theta, want)  # a seeded order, not the stored one (9! orders)
    more, _ = sampler.sample_batched(None, jax.random.PRNGKey(3), 2 * len(a) + 2, mean, scale,
                                     start_time=1.0, anchors=a)
    np.testing.assert_array_equal(more[:len(a)], theta)  # cycles through the same permutation
    np.testing.assert_array_equal(more[len(a):2 * len(a)], theta)
    again, _ = sampler.sample_batched(None, jax.random.PRNGKey(3), len(a), mean, scale, start_time=1.0, anchors=a)
    np.testing.assert_array_equal(again, theta)


def test_start_time_errors():
    a, mean, scale = _anchors()
    with pytest.raises(ValueError, match="no density"):
        sampler.sample_batched(None, jax.random.PRNGKey(0), 4, mean, scale, start_time=1.0, anchors=a, trace="exact")
    with pytest.raises(ValueError, match="needs anchors"):
        sampler.sample(None, jax.random.PRNGKey(0), 4, mean, scale, start_time=0.5)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="outside"):
            sampler.sample(None, jax.random.PRNGKey(0), 4, mean, scale, start_time=bad, anchors=a)


def test_start_point_and_density_with_a_linear_field():
    """v(t, x) = −c ⊙ x: x₁ = exp(−c (1 − t₀)) ⊙ x_t₀ (up to the solver), ∫ tr J = −Σc (1 − t₀),
    and the start is t₀·a + (1 − t₀)·z with a the anchor drawn from the sample's key."""
    a, mean, scale = _anchors(n=6, d=4)
    c = jnp.asarray([0.5, 1.0, -0.3, 0.0], jnp.float32)
    vfield = lambda t, x: -c[None] * x
    t0, n, key, steps = 0.8, 64, jax.random.PRNGKey(5), 20
    theta, logq = jax.jit(lambda k: sampler.sample(vfield, k, n, mean, scale, method="rk4", steps=steps,
                                                   trace="exact", start_time=t0, anchors=a))(key)
    # the same draws as the sampler: z from the first split key, the anchor from fold_in(key, 2)
    z = jax.random.normal(jax.random.split(key)[0], (n, 4))
    pick = np.asarray(jax.random.randint(jax.random.fold_in(key, 2), (n,), 0, len(a)))
    start = t0 * a[pick] + (1 - t0) * np.asarray(z)
    x1 = (np.asarray(theta) - mean) / scale
    np.testing.assert_allclose(x1, start * np.exp(-np.asarray(c) * (1 - t0)), rtol=1e-5, atol=1e-5)
    assert len(set(pick.tolist())) > 1
    want = (np.asarray(sampler.mixture_log_density(jnp.asarray(start, jnp.float32), a, t0))
            + float(np.sum(c)) * (1 - t0) - np.sum(np.log(scale)))
    np.testing.assert_allclose(np.asarray(logq), want, rtol=1e-5, atol=1e-4)


def test_start_time_zero_is_the_plain_flow():
    _, mean, scale = _anchors()
    vfield = lambda t, x: jnp.sin(3 * t)[:, None] - 0.2 * x
    key = jax.random.PRNGKey(0)
    plain = sampler.sample(vfield, key, 8, mean, scale, steps=4, trace="hutchinson")
    zero = sampler.sample(vfield, key, 8, mean, scale, steps=4, trace="hutchinson", start_time=0.0,
                          anchors=_anchors()[0])
    for p, q in zip(plain, zero):
        np.testing.assert_array_equal(np.asarray(p), np.asarray(q))


def test_thinning_keeps_every_kth_draw():
    draws = np.arange(1600)[:, None]
    kept, k = bundle.thin(draws, 230)
    assert k == 7 and len(kept) == 229 and len(kept) <= 230
    np.testing.assert_array_equal(kept[:, 0], np.arange(0, 1600, 7))
    kept, k = bundle.thin(draws, 5000)
    assert k == 1 and len(kept) == 1600
    with pytest.raises(ValueError):
        bundle.thin(draws, 0)


def test_f16_round_trip_error_bound():
    x = np.random.default_rng(0).standard_normal((200, 50)).astype(np.float32) * 3
    err = np.abs(x.astype(np.float16).astype(np.float32) - x)
    assert np.all(err <= np.abs(x) * 2.0**-11 + 2.0**-25)  # half a unit in the last place of 11 bits


def test_ood_inputs():
    rng = np.random.default_rng(0)
    data = {"x_train": rng.normal(5.0, 2.0, (300, 3)).astype(np.float32),
            "x_eval": rng.normal(5.0, 2.0, (40, 3)).astype(np.float32)}
    cfg = {"evaluate": {"seed": 0, "ood": False}, "data": {"task": "classification"}}
    x = evaluate.ood_inputs(cfg, data)
    assert x.shape == (100, 3) and x.dtype == np.float32  # at least 100 rows
    mu, sd = data["x_train"].mean(0), data["x_train"].std(0)
    assert np.all(np.abs(x - mu) <= 4 * sd + 1e-4)
    np.testing.assert_array_equal(x, evaluate.ood_inputs(cfg, data))
    cfg["evaluate"]["ood"] = True  # digits: plus noise images and shuffled-pixel eval images
    assert evaluate.ood_inputs(cfg, data).shape == (180, 3)


def test_ratios():
    rng = np.random.default_rng(0)
    anchors = rng.standard_normal((50, 3))
    held = rng.standard_normal((40, 3))
    assert metrics.memorization_ratio(anchors[:10], held, anchors) == pytest.approx(0.0, abs=1e-6)
    assert metrics.memorization_ratio(held, held, anchors) == pytest.approx(1.0)
    means = np.array([[[1.0], [0.0]], [[3.0], [0.0]]])  # 2 samples, 2 inputs, 1 output
    np.testing.assert_allclose(metrics.epistemic_variance(means), [1.0, 0.0])
    assert metrics.epistemic(means, classification=False) == 0.5
    same = np.zeros((3, 4, 2))  # identical nets: no mutual information
    assert metrics.epistemic(same, classification=True) == pytest.approx(0.0, abs=1e-12)


def _row(t0, tv=0.01, nll=0.10, ratio=1.0, ood=1.0):
    return {"start_time": t0, "tv": tv, "nll": nll, "ece": 0.0, "agreement": 1.0, "memorization_ratio": 1 - t0,
            "epistemic_ratio_eval": ratio, "epistemic_ratio_ood": ood}


def test_default_start_time_rule_classification():
    hmc = {"nll": 0.10}
    t0, why = evaluate.choose_start_time([_row(0.0), _row(0.5)], hmc, True)
    assert t0 == 0.0 and "t0=0 meets" in why  # the plain flow meets the rule
    rows = [_row(0.0, tv=0.3), _row(0.5, nll=0.13), _row(0.8, ratio=0.7), _row(0.9, ood=1.3),
            _row(0.95, tv=0.05, nll=0.12, ratio=0.8, ood=1.25), _row(1.0)]
    t0, why = evaluate.choose_start_time(rows[::-1], hmc, True)  # order of the rows does not matter
    assert t0 == 0.95  # the boundaries are inside
    assert "tv 0.3000 > 0.05" in why and "epistemic ratio (eval) 0.700" in why and "(ood) 1.300" in why
    t0, why = evaluate.choose_start_time([_row(0.0, tv=0.3), _row(1.0, ratio=0.5)], hmc, True)
    assert t0 == 1.0 and "no swept start time" in why


def test_default_start_time_rule_regression():
    hmc = {"nll": 1.0, "coverage90": 0.90}
    reg = lambda t0, nll, cov, r=1.0: {"start_time": t0, "nll": nll, "rmse": 1.0, "coverage90": cov,
                                       "memorization_ratio": 1.0, "epistemic_ratio_eval": r, "epistemic_ratio_ood": r}
    rows = [reg(0.0, 1.2, 0.9), reg(0.5, 1.04, 0.96), reg(0.8, 1.04, 0.94), reg(1.0, 1.0, 0.9)]
    assert evaluate.choose_start_time(rows, hmc, False)[0] == 0.8
    rows = [reg(0.0, 1.0, 0.9, r=2.0), reg(1.0, 1.0, 0.9, r=2.0)]
    assert evaluate.choose_start_time(rows, hmc, False)[0] == 1.0


def test_anchor_budget_fills_the_bundle_size_limit(tmp_path):
    (tmp_path / "graphs").mkdir()
    for name, size in (("flow", 300_000), ("flow_jvp", 310_000), ("net", 5_000)):
        (tmp_path / "graphs" / f"{name}.onnx").write_bytes(b"\0" * size)
    tens = {"eval.x": np.zeros((10, 3), np.float32)}
    bcfg = {"max_bytes": 1_000_000, "reserve_bytes": 50_000, "max_anchors": 0}
    ctx = {"work": tmp_path, "cfg": {"bundle": bcfg}}
    other = bundle.other_bytes(ctx, tens)
    assert other > 300_000 + 310_000 + 5_000 + 50_000 + 120  # graphs, reserve, the tensors file
    n = bundle.anchor_budget(ctx, tens, 100, 2)
    assert other + n * 200 + 256 <= 1_000_000 < other + (n + 1) * 200 + 256
    bcfg["max_anchors"] = 17
    assert bundle.anchor_budget(ctx, tens, 100, 2) == 17


def test_default_start_time_rule_with_the_ece_clause():
    hmc = {"nll": 0.10, "ece": 0.05}
    rows = [dict(_row(0.8), ece=0.07), dict(_row(0.9), ece=0.055)]
    assert evaluate.choose_start_time(rows, hmc, True)[0] == 0.8  # the agreed rule has no ECE clause
    t0, why = evaluate.choose_start_time(rows, hmc, True, ece=True)
    assert t0 == 0.9 and "ece 0.0700 > HMC 0.0500 + 0.01" in why
    assert "ece <= HMC ece + 0.01" in evaluate.start_time_rule(True, ece=True)


@pytest.mark.parametrize("t0", [0.0, 0.5])
def test_without_a_trace_the_log_densities_are_zeros(t0):
    """trace=None computes no density: the second output is zeros (as documented), not a base
    term without its trace integral."""
    d = 3
    anchors = np.ones((4, d), np.float32)
    vfield = lambda t, x: jnp.zeros_like(x)  # noqa: E731
    _, logq = sampler.sample(vfield, jax.random.PRNGKey(0), 5, np.zeros(d), 2.0 * np.ones(d), trace=None,
                             start_time=t0, anchors=anchors)
    np.testing.assert_array_equal(np.asarray(logq), 0.0)
