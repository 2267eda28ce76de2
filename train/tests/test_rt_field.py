"""The relational-transformer field (train/rt_field.py): layout and shapes, size, permutation
behaviour (equivariant once the neuron embeddings move with the neurons, not without them),
full-rank Jacobian at init and after training on the tiny config, stage-cache round trip."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import config, flow, mlp, rt_field

TINY = [2, 8, 2]          # the tiny config's network (train/configs/tiny.toml), D = 42
DEEP = [3, 5, 4, 2]       # two hidden layers: every kind of token and edge block is used


def _perturbed(sizes, pred="x1", scale=0.1, seed=0, channels=8, blocks=2, heads=2):
    """An RTField with every parameter (decoders and FiLM included) moved off its init."""
    p = rt_field.init(jax.random.PRNGKey(seed), sizes, channels, blocks, heads, time_freqs=8, pred=pred)
    rng = np.random.default_rng(seed)
    w = {k: jnp.asarray(np.asarray(v) + scale * rng.standard_normal(np.shape(v)), jnp.float32) for k, v in p.w.items()}
    return rt_field.RTField(w, sizes, heads, pred, p.clip)


def _rank(j):
    """Numerical rank of a float32 Jacobian: singular values above σ_max · D · eps(f32)."""
    sv = np.linalg.svd(np.asarray(j, np.float64), compute_uv=False)
    return int(np.sum(sv > sv[0] * len(sv) * np.finfo(np.float32).eps))


def _permute_hidden(x, sizes, m, perm):
    """Relabel the neurons of hidden layer m of every flat weight vector in x [B, D]: rows of
    W_{m-1} and entries of b_{m-1}, columns of W_m. The network function is unchanged."""
    layers = [(np.array(w), np.array(b)) for w, b in mlp.unflatten(np.asarray(x), sizes)]
    w_in, b_in = layers[m - 1]
    layers[m - 1] = (w_in[:, perm, :], b_in[:, perm])
    w_out, b_out = layers[m]
    layers[m] = (w_out[:, :, perm], b_out)
    return mlp.flatten(layers)


def test_shapes_and_layout():
    for sizes in (TINY, DEEP):
        p = _perturbed(sizes)
        d = mlp.dim(sizes)
        x = jnp.asarray(np.random.default_rng(1).standard_normal((5, d)), jnp.float32)
        y = jax.jit(rt_field.output)(p, jnp.linspace(0.0, 1.0, 5), x)
        v = jax.jit(flow.velocity)(p, jnp.linspace(0.0, 1.0, 5), x)
        assert y.shape == (5, d) and v.shape == (5, d)
        assert np.all(np.isfinite(np.asarray(v)))
    # output coordinate d is decoded from the same weight as input coordinate d: a field with no
    # blocks whose inputs carry only α·x (embeddings, τ zero) and whose decoder is a unit vector
    # returns LN(α x)·u in the flat layout, a function of that coordinate alone
    p = rt_field.init(jax.random.PRNGKey(0), DEEP, 4, 0, 2, time_freqs=8, pred="v")
    w = dict(p.w)
    for m in range(len(DEEP)):
        w[f"emb.{m}"] = jnp.zeros_like(w[f"emb.{m}"])
    w["tau2_w"], w["tau2_b"] = jnp.zeros_like(w["tau2_w"]), jnp.zeros_like(w["tau2_b"])
    for l in range(len(DEEP) - 1):
        w[f"alpha.{l}"] = jnp.asarray([1.0, -1.0, 0.0, 0.0])
        w[f"beta.{l}"] = jnp.asarray([1.0, -1.0, 0.0, 0.0])
        w[f"dec_w.{l}"] = jnp.asarray([1.0, 0.0, 0.0, 0.0])
        w[f"dec_b.{l}"] = jnp.asarray([1.0, 0.0, 0.0, 0.0])
    q = rt_field.RTField(w, DEEP, 2, "v")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, mlp.dim(DEEP))), jnp.float32)
    z = np.stack([np.asarray(x), -np.asarray(x), 0 * x, 0 * x], -1)
    want = ((z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5))[..., 0]
    np.testing.assert_allclose(rt_field.velocity(q, jnp.zeros(2), x), want, rtol=1e-5, atol=1e-5)


def test_parameter_count_grows_with_neurons_not_with_d_squared():
    c, k = 32, 3

    def count(sizes):  # shapes only: nothing is drawn
        return rt_field.RTField(jax.eval_shape(lambda: rt_field.init(jax.random.PRNGKey(0), sizes, c, k).w),
                                sizes).n_params()
    n = {tuple(s): count(s) for s in ([64, 32, 10], [64, 64, 10], [64, 256, 10])}
    assert n[(64, 64, 10)] - n[(64, 32, 10)] == 32 * c  # only the embeddings see the widths
    assert n[(64, 256, 10)] - n[(64, 32, 10)] == 224 * c
    assert n[(64, 256, 10)] < 1e-3 * mlp.dim([64, 256, 10]) ** 2


@pytest.mark.parametrize("pred", ["x1", "v"])
def test_permutation_equivariant_with_the_embeddings(pred):
    """Relabelling a hidden layer's neurons in x and in the embedding table relabels the output
    the same way (attention, edge updates and decoders share weights across neurons); relabelling
    x alone does not (the embeddings tell aligned neurons apart)."""
    p = _perturbed(DEEP, pred, scale=0.3)
    d = mlp.dim(DEEP)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, d)).astype(np.float32)
    t = jnp.asarray([0.0, 0.3, 0.7, 0.95], jnp.float32)
    fn = jax.jit(flow.velocity)
    v = np.asarray(fn(p, t, jnp.asarray(x)))
    for m in (1, 2):
        perm = rng.permutation(DEEP[m])
        while np.all(perm == np.arange(DEEP[m])):
            perm = rng.permutation(DEEP[m])
        xp = jnp.asarray(_permute_hidden(x, DEEP, m, perm), jnp.float32)
        w = dict(p.w)
        w[f"emb.{m}"] = p.w[f"emb.{m}"][perm]
        q = rt_field.RTField(w, DEEP, p.heads, pred, p.clip)
        np.testing.assert_allclose(fn(q, t, xp), _permute_hidden(v, DEEP, m, perm), rtol=2e-4, atol=2e-5)
        assert np.max(np.abs(np.asarray(fn(p, t, xp)) - _permute_hidden(v, DEEP, m, perm))) > 1e-3


def test_jacobian_at_init():
    """Zero-initialized decoders: x1-pred starts as v = −x / max(1 − t, clip) (rank D); v-pred as v = 0."""
    d = mlp.dim(TINY)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(d), jnp.float32)
    for pred in ("x1", "v"):
        p = rt_field.init(jax.random.PRNGKey(2), TINY, 8, 2, 2, time_freqs=8, pred=pred)
        for t in (0.0, 0.5, 0.99):
            j = np.asarray(jax.jacfwd(lambda z: flow.velocity(p, jnp.asarray([t], jnp.float32), z[None])[0])(x))
            want = -np.eye(d) / max(1.0 - t, p.clip) if pred == "x1" else np.zeros((d, d))
            np.testing.assert_allclose(j, want, atol=1e-6)


def test_jacobian_has_full_rank_after_training_on_the_tiny_config():
    """20 training steps with the tiny config's flow settings on correlated synthetic draws of
    its 2-8-2 net (x1-pred): the learnt x̂₁ and v = (x̂₁ − x)/max(1 − t, clip) have rank D."""
    cfg = config.load("train/configs/tiny.toml")
    d = mlp.dim(TINY)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    draws = (rng.standard_normal((256, d)) @ a.T + 0.3 * np.sin(3 * rng.standard_normal((256, d)))).astype(np.float32)
    x = rng.standard_normal(d).astype(np.float32)
    fcfg = dict(cfg["flow"], field="rt", pred="x1", rt_channels=8, rt_blocks=2, rt_heads=2, steps=20, batch=64,
                eval_every=20)
    params, report = flow.train(draws[:200], draws[200:], fcfg, 0, sizes=TINY)
    assert isinstance(params, rt_field.RTField)
    assert report["field"] == "rt" and report["parameters"] == params.n_params()
    assert (report["rt_channels"], report["rt_blocks"], report["rt_heads"]) == (8, 2, 2)

    @jax.jit
    def jacs(t):
        jy = jax.jacfwd(lambda z: rt_field.output(params, t[None], z[None])[0])(x)
        jv = jax.jacfwd(lambda z: flow.velocity(params, t[None], z[None])[0])(x)
        return jy, jv
    for t in (0.1, 0.9):
        jy, jv = jacs(jnp.float32(t))
        assert _rank(jy) == d and _rank(jv) == d, t


def test_params_round_trip_through_the_stage_cache(tmp_path):
    p = _perturbed(TINY)
    np.savez(tmp_path / "flow.npz", **flow.flatten_params(p))
    with np.load(tmp_path / "flow.npz", allow_pickle=False) as z:
        q = flow.unflatten_params({k: z[k] for k in z.files})
    assert isinstance(q, rt_field.RTField)
    assert (q.sizes, q.heads, q.pred, q.clip) == (p.sizes, p.heads, p.pred, p.clip)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, mlp.dim(TINY))), jnp.float32)
    np.testing.assert_array_equal(flow.velocity(q, jnp.full(3, 0.4), x), flow.velocity(p, jnp.full(3, 0.4), x))


def test_config_selects_the_field():
    fcfg = copy.deepcopy(config.DEFAULTS["flow"])
    key, d = jax.random.PRNGKey(0), mlp.dim(TINY)
    p = flow.init_field(key, d, dict(fcfg, field="rt", pred="x1", rt_channels=6, rt_blocks=1, rt_heads=3), TINY)
    assert isinstance(p, rt_field.RTField) and (p.channels, p.blocks, p.heads, p.pred) == (6, 1, 3, "x1")
    with pytest.raises(ValueError, match="multiple"):
        flow.init_field(key, d, dict(fcfg, field="rt", rt_channels=6, rt_heads=4), TINY)
    with pytest.raises(ValueError, match="sizes"):
        flow.init_field(key, d, dict(fcfg, field="rt"))
