"""The NP-layer weight-space field (train/np_field.py) and its hand-written ONNX graphs
(train/np_graphs.py): layout, size, full-rank Jacobian, export parity, standard ops."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from train import config, export, flow, graphs, mlp, np_field, np_graphs

TINY = [2, 8, 2]          # the tiny config's network (train/configs/tiny.toml), D = 42
DEEP = [3, 5, 4, 2]       # two hidden layers: every kind of neuron summary is used


def _perturbed(sizes, pred, scale=0.1, seed=0, channels=8, blocks=2):
    """An NPField with every parameter (decoders and FiLM included) moved off its init."""
    p = np_field.init(jax.random.PRNGKey(seed), sizes, channels, blocks, time_freqs=8, pred=pred)
    rng = np.random.default_rng(seed)
    w = {k: jnp.asarray(np.asarray(v) + scale * rng.standard_normal(np.shape(v)), jnp.float32) for k, v in p.w.items()}
    return np_field.NPField(w, sizes, pred, p.clip)


def _run(proto, feed):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def _rank(j):
    """Numerical rank of a float32 Jacobian: singular values above σ_max · D · eps(f32)."""
    sv = np.linalg.svd(np.asarray(j, np.float64), compute_uv=False)
    return int(np.sum(sv > sv[0] * len(sv) * np.finfo(np.float32).eps))


def _jac(fn, t, x):
    return np.asarray(jax.jacfwd(lambda z: fn(jnp.asarray([t], jnp.float32), z[None])[0])(jnp.asarray(x)))


def _rel(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_layout_follows_the_flat_weight_vector():
    """Output coordinate d belongs to the same weight as input coordinate d: a field whose decoder
    reads only the input embedding α·x returns x (scaled) in the flat layout of train/mlp.py."""
    p = np_field.init(jax.random.PRNGKey(0), DEEP, 4, 0, time_freqs=8, pred="v")  # K = 0 blocks
    w = dict(p.w)
    for l in range(len(DEEP) - 1):
        w[f"alpha.{l}"] = jnp.ones(4) * 0.5
        w[f"beta.{l}"] = jnp.ones(4) * 0.25
        w[f"emb.{l}"] = jnp.zeros_like(w[f"emb.{l}"])
        w[f"dec_w.{l}"] = jnp.ones(4) / 4
        w[f"dec_b.{l}"] = jnp.ones(4) / 4
    w[f"emb.{len(DEEP) - 1}"] = jnp.zeros_like(w[f"emb.{len(DEEP) - 1}"])
    w["tau2_w"], w["tau2_b"] = jnp.zeros_like(w["tau2_w"]), jnp.zeros_like(w["tau2_b"])  # τ = 0
    q = np_field.NPField(w, DEEP, "v")
    d = mlp.dim(DEEP)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, d)), jnp.float32)
    want = np.concatenate([np.r_[np.full(i * o, 0.5), np.full(o, 0.25)] for i, o in zip(DEEP[:-1], DEEP[1:])])
    np.testing.assert_allclose(jax.jit(np_field.velocity)(q, jnp.zeros(2), x), x * want, rtol=1e-6, atol=1e-6)


def test_parameter_count_grows_with_neurons_not_with_d_squared():
    c, k = 24, 3

    def count(sizes):  # shapes only: nothing is drawn
        return np_field.NPField(jax.eval_shape(lambda: np_field.init(jax.random.PRNGKey(0), sizes, c, k).w),
                                sizes).n_params()
    n = {tuple(s): count(s) for s in ([64, 32, 10], [64, 64, 10], [64, 256, 10])}
    # only the per-neuron embeddings depend on the widths: C parameters per neuron
    assert n[(64, 64, 10)] - n[(64, 32, 10)] == 32 * c
    assert n[(64, 256, 10)] - n[(64, 32, 10)] == 224 * c
    assert n[(64, 256, 10)] < 1e-3 * mlp.dim([64, 256, 10]) ** 2  # D = 19 210: far below D²
    assert n[(64, 32, 10)] < 80_000  # digits (D = 2 410): the MLP field there has ~1.2 M


def test_jacobian_at_init():
    """Zero-initialized decoders: v-pred starts as v = 0 (Jacobian 0); x1-pred as
    v = −x / max(1 − t, clip), Jacobian −I/max(1 − t, clip): rank D."""
    d = mlp.dim(TINY)
    x = np.random.default_rng(1).standard_normal(d).astype(np.float32)
    for pred in ("v", "x1"):
        p = np_field.init(jax.random.PRNGKey(2), TINY, 4, 1, time_freqs=8, pred=pred)
        jac = jax.jit(jax.vmap(lambda tt: jax.jacfwd(lambda z: np_field.velocity(p, tt[None], z[None])[0])(x)))
        t = np.r_[0.0, 0.5, 0.99].astype(np.float32)
        for tt, j in zip(t, np.asarray(jac(jnp.asarray(t)))):
            if pred == "v":
                assert np.all(j == 0)
            else:
                np.testing.assert_allclose(j, -np.eye(d) / max(1 - tt, p.clip), rtol=1e-6, atol=1e-6)
                assert _rank(j) == d


def test_jacobian_has_full_rank_after_training_on_the_tiny_config():
    """20 training steps with the tiny config's flow settings on correlated synthetic draws of
    its 2-8-2 net (x1-pred): the learnt output y = x̂₁ has a rank-D Jacobian, and so has
    v = (y − x)/max(1 − t, clip). (The MLP field's rank is at most its last hidden width.)"""
    cfg = config.load("train/configs/tiny.toml")
    d = mlp.dim(TINY)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    draws = (rng.standard_normal((256, d)) @ a.T + 0.3 * np.sin(3 * rng.standard_normal((256, d)))).astype(np.float32)
    x = rng.standard_normal(d).astype(np.float32)
    for pred in ("x1",):  # y is the learnt part; for pred = "v", v = y (same graph, same rank argument)
        fcfg = dict(cfg["flow"], field="np", pred=pred, np_channels=6, np_blocks=2, steps=20, batch=64, eval_every=20)
        params, report = flow.train(draws[:200], draws[200:], fcfg, 0, sizes=TINY)
        assert report["field"] == "np" and report["parameters"] == params.n_params()

        @jax.jit
        def jacs(t):
            jy = jax.jacfwd(lambda z: np_field.output(params, t[None], z[None])[0])(x)
            jv = jax.jacfwd(lambda z: flow.velocity(params, t[None], z[None])[0])(x)
            return jy, jv
        for t in (0.1, 0.9):
            jy, jv = jacs(jnp.float32(t))
            assert _rank(jy) == d and _rank(jv) == d, (pred, t)


@pytest.fixture(scope="module", params=[(DEEP, "x1"), (DEEP, "v")], ids=["x1", "v"])
def case(request):
    sizes, pred = request.param
    p = _perturbed(sizes, pred)
    d = mlp.dim(sizes)
    return p, d, graphs.flow_graph(p, d), graphs.flow_jvp_graph(p, d)


def test_onnx_flow_and_jvp_match_jax(case):
    """flow.onnx vs np_field.velocity and flow_jvp.onnx vs jax.jvp (one tangent at a time) and
    the export stage's linearize + vmap reference, all K tangents in one graph call; relative
    error (max-abs over max-abs) ≤ 1e-5 against float32 JAX, and against float64 JAX."""
    p, d, g_flow, g_jvp = case
    b, k = 4, 3
    rng = np.random.default_rng(3)
    t = np.r_[0.0, 0.3, 0.7, 0.97].astype(np.float32)
    x = rng.standard_normal((b, d)).astype(np.float32)
    eps = rng.choice([-1.0, 1.0], size=(b, k, d)).astype(np.float32)
    (v,) = _run(g_flow, {"t": t, "x": x})
    v2, quad = _run(g_jvp, {"t": t, "x": x, "eps": eps})

    @jax.jit
    def reference(t, x, eps):
        f = lambda z: flow.velocity(p, t, z)
        quads = [jnp.sum(eps[:, i] * jax.jvp(f, (x,), (eps[:, i],))[1], -1) for i in range(k)]
        return f(x), jnp.stack(quads, axis=1)
    want_v, want_q = (np.asarray(a) for a in reference(t, x, eps))
    assert _rel(v, want_v) <= 1e-5 and _rel(v2, want_v) <= 1e-5
    assert _rel(quad, want_q) <= 1e-5, _rel(quad, want_q)
    # the export stage's check (linearize + vmap reference) at 1e-5
    export.parity(g_jvp, jax.jit(export.flow_jvp_fn(p)), [t, x, eps], "flow_jvp", 1e-5)
    # against float64 JAX (same float32 parameters): the graph's own rounding error
    if p.pred == "x1":
        with jax.enable_x64(True):
            p64 = np_field.NPField({n: jnp.asarray(np.asarray(a), jnp.float64) for n, a in p.w.items()}, p.sizes,
                                   p.pred, p.clip)
            v64, q64 = jax.jit(export.flow_jvp_fn(p64))(*(jnp.asarray(a, jnp.float64) for a in (t, x, eps)))
            v64, q64 = np.asarray(v64), np.asarray(q64)
        assert _rel(v2, v64) <= 1e-5 and _rel(quad, q64) <= 1e-5, (_rel(v2, v64), _rel(quad, q64))
    # the same graph takes any K (symbolic) and any B
    _, q1 = _run(g_jvp, {"t": t[:1], "x": x[:1], "eps": eps[:1, :1]})
    np.testing.assert_allclose(q1, quad[:1, :1], rtol=1e-5, atol=1e-5 * np.abs(quad).max())


def test_graphs_use_only_standard_ops(case):
    p, d, g_flow, jvp = case
    for proto in (g_flow, jvp):
        onnx.checker.check_model(proto, full_check=True)
        assert [o.domain for o in proto.opset_import] == [""] and proto.opset_import[0].version == 17
        ops = {n.op_type for n in proto.graph.node}
        assert all(n.domain == "" for n in proto.graph.node)
        assert ops <= np_graphs.OPS, ops - np_graphs.OPS
        assert not {"Einsum", "Expand", "Shape", "Gather", "Loop", "If", "Scan"} & ops
        assert [i.name for i in proto.graph.input][:2] == ["t", "x"] and proto.graph.output[0].name == "v"
    dims = [dd.dim_param or dd.dim_value for dd in jvp.graph.input[2].type.tensor_type.shape.dim]
    assert dims == ["B", "K", d]


def test_params_round_trip_through_the_stage_cache(tmp_path):
    p = _perturbed(TINY, "x1")
    flat = flow.flatten_params(p)
    np.savez(tmp_path / "flow.npz", **flat)
    with np.load(tmp_path / "flow.npz", allow_pickle=False) as z:
        q = flow.unflatten_params({k: z[k] for k in z.files})
    assert isinstance(q, np_field.NPField) and (q.sizes, q.pred, q.clip) == (p.sizes, p.pred, p.clip)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, mlp.dim(TINY))), jnp.float32)
    np.testing.assert_array_equal(flow.velocity(q, jnp.full(3, 0.4), x), flow.velocity(p, jnp.full(3, 0.4), x))


def test_config_validation():
    fcfg = copy.deepcopy(config.DEFAULTS["flow"])
    assert fcfg["field"] == "mlp" and fcfg["pred"] == "v" and fcfg["time_pow"] == 1.0
    key, d = jax.random.PRNGKey(0), mlp.dim(TINY)
    with pytest.raises(ValueError, match="field"):
        flow.init_field(key, d, dict(fcfg, field="transformer"), TINY)
    with pytest.raises(ValueError, match="x1"):
        flow.init_field(key, d, dict(fcfg, pred="x1"))
    with pytest.raises(ValueError, match="sizes"):
        flow.init_field(key, d, dict(fcfg, field="np"))
    with pytest.raises(ValueError, match="D = "):
        flow.init_field(key, d + 1, dict(fcfg, field="np"), TINY)
    p = flow.init_field(key, d, dict(fcfg, field="np", pred="x1", np_channels=6, np_blocks=1), TINY)
    assert (p.channels, p.blocks, p.pred) == (6, 1, "x1")
