"""The hand-written flow graphs (train/graphs.py) against JAX, and their shape of work."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from train import export, flow, graphs


@pytest.fixture(scope="module")
def params():
    p = flow.init(jax.random.PRNGKey(3), 7, [16, 12], 6)
    # non-trivial biases and a non-tiny output layer, so every term of the JVP matters
    rng = np.random.default_rng(1)
    return [{"w": jnp.asarray(l["w"]) * (3.0 if i == len(p) - 1 else 1.0),
             "b": jnp.asarray(rng.normal(size=l["b"].shape), jnp.float32)} for i, l in enumerate(p)]


def _run(proto, feed):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize("b", [1, 5])
def test_flow_graph_matches_velocity(params, b):
    rng = np.random.default_rng(b)
    t = rng.uniform(size=b).astype(np.float32)
    x = rng.standard_normal((b, 7)).astype(np.float32)
    (v,) = _run(graphs.flow_graph(params, 7), {"t": t, "x": x})
    want = np.asarray(flow.velocity(params, jnp.asarray(t), jnp.asarray(x)))
    np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b,k", [(1, 1), (4, 1), (3, 4)])
def test_flow_jvp_graph_matches_jacobian(params, b, k):
    rng = np.random.default_rng(10 * b + k)
    t = rng.uniform(size=b).astype(np.float32)
    x = rng.standard_normal((b, 7)).astype(np.float32)
    eps = rng.standard_normal((b, k, 7)).astype(np.float32)
    v, quad = _run(graphs.flow_jvp_graph(params, 7), {"t": t, "x": x, "eps": eps})
    jac = np.stack([np.asarray(jax.jacfwd(lambda z: flow.velocity(params, jnp.asarray(t[i:i + 1]), z[None])[0])(
        jnp.asarray(x[i]))) for i in range(b)])
    np.testing.assert_allclose(v, np.asarray(flow.velocity(params, jnp.asarray(t), jnp.asarray(x))), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(quad, np.einsum("bkd,bde,bke->bk", eps, jac, eps), rtol=1e-4, atol=1e-4)
    # and the same as the linearize + vmap reference the export stage checks against
    ref_v, ref_quad = export.flow_jvp_fn(params)(jnp.asarray(t), jnp.asarray(x), jnp.asarray(eps))
    np.testing.assert_allclose(quad, np.asarray(ref_quad), rtol=1e-4, atol=1e-4)


def test_graphs_do_one_product_per_layer_and_tangent_block(params):
    """What makes them cheap: per layer one Gemm (primal) and one MatMul (all K tangents), no
    run-time shape arithmetic and no Einsum/Expand."""
    layers = len(params)
    fl = collections.Counter(n.op_type for n in graphs.flow_graph(params, 7).graph.node)
    jv = collections.Counter(n.op_type for n in graphs.flow_jvp_graph(params, 7).graph.node)
    for ops in (fl, jv):
        assert not {"Einsum", "Expand", "Shape", "Reshape"} & set(ops)
    # layer 0: MatMul for x and a Gemm for the time features; each later layer one Gemm
    assert fl["Gemm"] == layers and fl["MatMul"] == 1
    assert jv["Gemm"] == layers and jv["MatMul"] == 1 + layers


def test_rounded_weights_are_stored_as_f16_and_compute_the_same(params):
    """flow.weight_dtype = "f16": the flow stage rounds the parameters to f16 values
    (flow.round_weights), and the graphs then store those weights as f16 with a Cast that ONNX
    Runtime folds at load: the outputs equal (bitwise) those of the same graph stored in f32,
    and the file is about half the size. Unrounded weights stay f32 (lossless storage)."""
    flat = flow.round_weights(flow.flatten_params(params), "f16")
    rounded = flow.unflatten_params(flat)
    for k, v in flat.items():
        assert v.dtype == np.float32 and np.array_equal(v.astype(np.float16).astype(np.float32), v), k
    rng = np.random.default_rng(5)
    t = rng.uniform(size=4).astype(np.float32)
    x = rng.standard_normal((4, 7)).astype(np.float32)
    eps = rng.choice([-1.0, 1.0], size=(4, 2, 7)).astype(np.float32)
    for build, feed in ((graphs.flow_graph, {"t": t, "x": x}), (graphs.flow_jvp_graph, {"t": t, "x": x, "eps": eps})):
        small = build(rounded, 7)
        dtypes = {i.name: i.data_type for i in small.graph.initializer}
        assert dtypes["W0x_f16"] == onnx.TensorProto.FLOAT16 and "W0x" not in dtypes
        casts = [n for n in small.graph.node if n.op_type == "Cast"]
        assert len(casts) == sum(1 for i in small.graph.initializer if i.name.endswith("_f16")) > 0
        wide = graphs.stored_as_f32(small)  # the same values stored as f32, no Cast
        assert onnx.TensorProto.FLOAT16 not in {i.data_type for i in wide.graph.initializer}
        for a, b in zip(_run(small, feed), _run(wide, feed)):
            np.testing.assert_array_equal(a, b)
        weight_bytes = lambda m: sum(i.ByteSize() for i in m.graph.initializer)
        assert weight_bytes(small) < 0.6 * weight_bytes(wide)
    unrounded = graphs.flow_graph(params, 7)
    assert onnx.TensorProto.FLOAT16 not in {i.data_type for i in unrounded.graph.initializer}


def test_round_weights_keeps_out_of_range_arrays_and_refuses_unknown_dtypes():
    flat = {"0.w": np.array([1.0 + 2**-13, 3.0], np.float32), "0.b": np.array([7e4, 1.0], np.float32),
            "sizes": np.array([2, 3], np.int64)}
    out = flow.round_weights(flat, "f16")
    np.testing.assert_array_equal(out["0.w"], [1.0, 3.0])
    np.testing.assert_array_equal(out["0.b"], flat["0.b"])  # 7e4 > f16 max: left as trained, not inf
    assert out["sizes"].dtype == np.int64
    np.testing.assert_array_equal(flow.round_weights(flat, "f32")["0.w"], flat["0.w"])
    with pytest.raises(ValueError, match="weight_dtype"):
        flow.round_weights(flat, "bf16")
