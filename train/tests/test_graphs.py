"""The hand-written flow graphs (train/graphs.py) against JAX, and their shape of work."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
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
