"""Synthetic bundles of a chosen weight dimension D, for measuring how cost grows with D.

The flow is a one-hidden-layer MLP velocity v(t, x) = W2 relu(W1 x + t w_t + b1) + b2
(width H), random and untrained; flow_jvp adds quad = eps^T J eps with
J = W2 diag(relu'(.)) W1, written out by hand so the graph is exactly one primal and
K tangents. The target network is a ReLU classifier whose layout gives exactly D weights.

    .venv/bin/python benches/synthetic.py OUT_DIR D [D ...]   (e.g. 1000 10000 100000)

Next to each bundle OUT_DIR/synthetic_dD it writes OUT_DIR/synthetic_dD.params.npz
(W1 [H,D], b1 [H], wt [H], W2 [D,H], b2 [D], float32 as in the graphs) so that
benches/compare.py can run the same field under JAX (`velocity_np` is the reference).
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
from make_fixtures import _f32, _i64, _model, build_net, make_layout  # noqa: E402

WIDTH = 256


def net_shape(target_d):
    """A d_in-h-10 classifier with exactly D = h(d_in + 1) + 10(h + 1) weights, D close to target."""
    classes = 10
    for d_in in range(4, 10_000):
        h = (target_d - classes) // (d_in + 1 + classes)
        if h >= 4 and h * (d_in + 1) + classes * (h + 1) == target_d:
            return d_in, h, classes
    # Fall back to the nearest exact size.
    d_in = 16
    h = max(4, (target_d - classes) // (d_in + 1 + classes))
    return d_in, h, classes


def build_flow(W1, b1, wt, W2, b2, with_jvp):
    D = W1.shape[1]
    inits = [_f32("W1T", W1.T), _f32("b1", b1), _f32("wt", wt), _f32("W2T", W2.T), _f32("b2", b2), _i64("ax1", [1])]
    nodes = [
        helper.make_node("MatMul", ["x", "W1T"], ["xw"]),
        helper.make_node("Unsqueeze", ["t", "ax1"], ["tc"]),
        helper.make_node("Mul", ["tc", "wt"], ["tw"]),
        helper.make_node("Add", ["xw", "tw"], ["pre0"]),
        helper.make_node("Add", ["pre0", "b1"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["h"]),
        helper.make_node("MatMul", ["h", "W2T"], ["hw"]),
        helper.make_node("Add", ["hw", "b2"], ["v"]),
    ]
    inputs = [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["B"]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", D])]
    outputs = [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["B", D])]
    if with_jvp:
        inits += [_f32("zero", np.zeros(1)), _i64("last", [-1])]
        nodes += [
            helper.make_node("Greater", ["pre", "zero"], ["on"]),
            helper.make_node("Cast", ["on"], ["mask0"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["mask0", "ax1"], ["mask"]),          # [B,1,H]
            helper.make_node("MatMul", ["eps", "W1T"], ["u"]),                  # [B,K,H]
            helper.make_node("Mul", ["u", "mask"], ["g"]),
            helper.make_node("MatMul", ["g", "W2T"], ["je"]),                   # [B,K,D]
            helper.make_node("Mul", ["je", "eps"], ["prod"]),
            helper.make_node("ReduceSum", ["prod", "last"], ["quad"], keepdims=0),
        ]
        inputs.append(helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["B", "K", D]))
        outputs.append(helper.make_tensor_value_info("quad", TensorProto.FLOAT, ["B", "K"]))
    return _model(nodes, "flow_jvp" if with_jvp else "flow", inputs, outputs, inits)


def velocity_np(p, t, x):
    """The flow.onnx field in numpy: t [B], x [B,D] -> v [B,D]."""
    h = np.maximum(x @ p["W1"].T + t[:, None] * p["wt"] + p["b1"], 0.0)
    return h @ p["W2"].T + p["b2"]


def make(out_dir, target_d, seed=0):
    rng = np.random.default_rng(seed)
    d_in, h, classes = net_shape(target_d)
    layers, D = make_layout(d_in, [h], classes)
    s1, s2 = 1 / np.sqrt(D), 1 / np.sqrt(WIDTH)
    W1 = rng.normal(0, s1, (WIDTH, D))
    W2 = rng.normal(0, s2 * 0.5, (D, WIDTH))
    b1, wt, b2 = rng.normal(0, 0.1, WIDTH), rng.normal(0, 1, WIDTH), rng.normal(0, 0.1, D)
    bdir = Path(out_dir) / f"synthetic_d{D}"
    bdir.mkdir(parents=True, exist_ok=True)
    onnx.save(build_flow(W1, b1, wt, W2, b2, False), bdir / "flow.onnx")
    np.savez(Path(out_dir) / f"{bdir.name}.params.npz",
             **{k: np.asarray(v, np.float32) for k, v in dict(W1=W1, b1=b1, wt=wt, W2=W2, b2=b2).items()})
    onnx.save(build_flow(W1, b1, wt, W2, b2, True), bdir / "flow_jvp.onnx")
    onnx.save(build_net(layers, D, d_in, np.zeros(d_in), np.ones(d_in)), bdir / "net.onnx")
    n = 64
    probs = rng.dirichlet(np.ones(classes), n).astype(np.float32)
    save_file({
        "flow.whiten.mean": np.zeros(D, np.float32),
        "flow.whiten.scale": np.full(D, 0.1, np.float32),
        "reference.theta": rng.normal(0, 0.1, D).astype(np.float32),
        "posterior.theta": rng.normal(0, 0.1, (4, D)).astype(np.float32),
        "eval.x": rng.normal(0, 1, (n, d_in)).astype(np.float32),
        "eval.y": rng.integers(0, classes, n).astype(np.int64),
        "eval.hmc_probs": probs,
    }, str(bdir / "tensors.safetensors"))
    manifest = {
        "format": "postflow-bundle", "format_version": 1, "name": bdir.name,
        "description": f"Synthetic untrained MLP flow (width {WIDTH}) over D = {D} weights, for benchmarks only.",
        "task": {"kind": "classification", "classes": classes},
        "input": {"dim": d_in},
        "network": {"dim": D, "layers": layers},
        "flow": {"dim": D, "base": "standard_normal", "time": [0.0, 1.0], "geometry": "euclidean",
                 "default_solver": {"method": "rk4", "steps": 20}, "hutchinson": {"probes": 1, "noise": "rademacher"}},
        "graphs": {"flow": {"file": "flow.onnx", "inputs": ["t", "x"], "outputs": ["v"]},
                   "flow_jvp": {"file": "flow_jvp.onnx", "inputs": ["t", "x", "eps"], "outputs": ["v", "quad"]},
                   "net": {"file": "net.onnx", "inputs": ["x", "theta"], "outputs": ["out"]}},
        "provenance": {"synthetic": True, "generator": "benches/synthetic.py", "seed": seed},
    }
    (bdir / "postflow.json").write_text(json.dumps(manifest, indent=1))
    return bdir


if __name__ == "__main__":
    out = sys.argv[1]
    for d in sys.argv[2:]:
        print(make(out, int(d)))
