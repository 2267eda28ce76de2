"""ONNX export of the three bundle graphs, each checked against JAX with onnxruntime on
random inputs before it is written.

flow:     (t [B], x [B,D]) -> v [B,D]                          hand-written (train/graphs.py;
                                                               np field: train/np_graphs.py)
flow_jvp: (t [B], x [B,D], eps [B,K,D]) -> v [B,D],            hand-written (same)
          quad [B,K] = eps·J_v·eps; the JAX reference is jax.linearize once per call with the
          linear map vmapped over the K tangents
net:      (x [N,d_in] raw, theta [S,D] canonical) -> out [S,N,C]; jax2onnx, standardization inside.

The flow graphs are written node by node because jax2onnx's export of the JVP cost ~3x the
flow per call at K = 1 and the hand-written one ~2x (docs/performance.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
from jax2onnx import to_onnx

from . import flow as flow_mod
from . import graphs, mlp, sphere

NAMES = {
    "flow": (["t", "x"], ["v"]),
    "flow_jvp": (["t", "x", "eps"], ["v", "quad"]),
    "net": (["x", "theta"], ["out"]),
    "posterior": (["theta"], ["log_density", "grad"]),  # train/posterior_graph.py (format 3)
}


def flow_fn(params):
    return lambda t, x: flow_mod.velocity(params, t, x)


def flow_jvp_fn(params):
    def f(t, x, eps):
        v, lin = jax.linearize(lambda z: flow_mod.velocity(params, t, z), x)
        jeps = jax.vmap(lin, in_axes=1, out_axes=1)(eps)  # [B,K,D]
        return v, jnp.sum(eps * jeps, axis=-1)
    return f


def net_fn(sizes, x_mean, x_std, y_mean, y_std, regression):
    layers, _ = mlp.layout(sizes)
    x_mean, x_std = jnp.asarray(x_mean), jnp.asarray(x_std)
    y_mean, y_std = jnp.asarray(y_mean), jnp.asarray(y_std)

    def f(x, theta):
        s = theta.shape[0]
        h = ((x - x_mean) / x_std)[None]  # [1,N,d_in], broadcast over samples
        for i, (d_in, d_out, w_off, b_off) in enumerate(layers):
            w = theta[:, w_off:w_off + d_in * d_out].reshape(s, d_out, d_in)
            b = theta[:, b_off:b_off + d_out]
            h = jnp.einsum("sni,soi->sno", jnp.broadcast_to(h, (s, *h.shape[1:])), w) + b[:, None, :]
            if i < len(layers) - 1:
                h = jax.nn.relu(h)
        return h * y_std + y_mean if regression else h
    return f


def export(fn, specs, name):
    ins, outs = NAMES[name]
    proto = to_onnx(fn, specs, model_name=f"postflow_{name}", input_names=ins, output_names=outs)
    onnx.checker.check_model(proto)
    return proto


def session(model):
    """onnxruntime CPU session with its constant-folding chatter silenced."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def parity(proto, fn, inputs, name, tol):
    """Max-abs error relative to the largest JAX output magnitude, per output."""
    sess = session(proto.SerializeToString())
    ins = NAMES[name][0]
    got = sess.run(None, {k: np.asarray(v, np.float32) for k, v in zip(ins, inputs)})
    want = fn(*[jnp.asarray(v) for v in inputs])
    want = want if isinstance(want, tuple) else (want,)
    errs = {}
    for out_name, g, w in zip(NAMES[name][1], got, want):
        w = np.asarray(w)
        if g.shape != w.shape:
            raise AssertionError(f"{name}.{out_name}: ONNX shape {g.shape} != JAX {w.shape}")
        errs[out_name] = float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-6))
        if not errs[out_name] <= tol:
            raise AssertionError(f"{name}.{out_name}: relative error {errs[out_name]:.2e} > {tol}")
    return errs


def run(cfg, data, sizes, flow_params, whiten_out, canon_out, noise_sigma):
    """Returns {name: ModelProto} and the parity report (graphs are written by the bundle stage)."""
    tol = cfg["export"]["parity_tol"]
    d = int(whiten_out["mean"].shape[0])
    d_in = data["x_train"].shape[1]
    rng = np.random.default_rng(cfg["seed"] + 7)
    params = flow_mod.unflatten_params(sphere.split_params(flow_params)[0])  # the raw field u
    regression = cfg["data"]["task"] == "regression"
    # name -> (JAX reference, how to build the ONNX graph)
    net_ref = net_fn(sizes, data["x_mean"], data["x_std"], data["y_mean"], data["y_std"], regression)
    fns = {
        "flow": (flow_fn(params), lambda: graphs.flow_graph(params, d)),
        "flow_jvp": (flow_jvp_fn(params), lambda: graphs.flow_jvp_graph(params, d)),
        "net": (net_ref, lambda: export(net_ref, [("N", d_in), ("S", d)], "net")),
    }
    b, k, s, n = 5, 3, 4, 7
    samples = canon_out["samples"].reshape(-1, d)
    test_inputs = {
        "flow": [rng.uniform(size=b), rng.standard_normal((b, d))],
        "flow_jvp": [rng.uniform(size=b), rng.standard_normal((b, d)),
                     rng.choice([-1.0, 1.0], size=(b, k, d))],
        "net": [data["x_eval"][rng.choice(len(data["x_eval"]), n)],
                samples[rng.choice(len(samples), s)] + 0.1 * rng.standard_normal((s, d))],
    }
    protos, report = {}, {"tolerance": tol, "relative_error": {}, "inputs": {"B": b, "K": k, "S": s, "N": n}}
    for name, (fn, build) in fns.items():
        protos[name] = build()
        inputs = [np.asarray(v, np.float32) for v in test_inputs[name]]
        report["relative_error"][name] = parity(protos[name], fn, inputs, name, tol)
        print(f"  export {name}: parity {report['relative_error'][name]}", flush=True)
    return protos, report


def run_net(proto_bytes, x, thetas, batch=256):
    """net.onnx through onnxruntime: x [N,d_in], θ [S,D] -> out [S,N,C]."""
    sess = session(proto_bytes)
    outs = [sess.run(None, {"x": np.asarray(x, np.float32), "theta": np.asarray(thetas[i:i + batch], np.float32)})[0]
            for i in range(0, len(thetas), batch)]
    return np.concatenate(outs)
