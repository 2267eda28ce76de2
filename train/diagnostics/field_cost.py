"""Cost per evaluation of the NP-layer field's graphs against a bundle's MLP-field graphs, with
onnxruntime on one intra-op thread (the runtime's default), at a fixed batch.

    .venv/bin/python -m train.diagnostics.field_cost models/digits --channels 24 --blocks 3 --batch 64

The NP field gets random (non-zero) parameters for the bundle's network sizes; the cost of a
graph does not depend on the parameter values. Reports the median and minimum over repeats of
one `run` call (ms, wall clock), the minimum process CPU time per call (`cpu_min_ms`: with one
intra-op thread, the least disturbed by other load on a shared machine; the ratios use it), the
parameter counts and the serialized graph sizes."""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort

from .. import np_field, np_graphs


def _session(proto_bytes, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(proto_bytes, opts, providers=["CPUExecutionProvider"])


def _time(sess, feed, repeats, inner):
    sess.run(None, feed)  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
            sess.run(None, feed)
        wall.append((time.perf_counter() - t0) / inner * 1e3)
        cpu.append((time.process_time() - c0) / inner * 1e3)
    return {"min_ms": float(np.min(wall)), "median_ms": float(np.median(wall)), "cpu_min_ms": float(np.min(cpu))}


def _params_of(proto):
    return int(sum(np.prod(i.dims) for i in proto.graph.initializer))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--channels", type=int, default=24)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--pred", default="x1")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--probes", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=5)
    a = ap.parse_args()
    bundle = Path(a.bundle)
    man = json.loads((bundle / "postflow.json").read_text())
    layers = man["network"]["layers"]
    sizes = [layers[0]["in"]] + [layer["out"] for layer in layers]
    d = int(man["flow"]["dim"])
    p = np_field.init(jax.random.PRNGKey(0), sizes, a.channels, a.blocks, pred=a.pred)
    rng = np.random.default_rng(0)
    p = np_field.NPField({k: jnp.asarray(np.asarray(v) + 0.05 * rng.standard_normal(np.shape(v)), jnp.float32)
                          for k, v in p.w.items()}, sizes, a.pred)
    graphs = {
        "mlp": {"flow": (bundle / "flow.onnx").read_bytes(), "flow_jvp": (bundle / "flow_jvp.onnx").read_bytes()},
        "np": {"flow": np_graphs.flow_graph(p).SerializeToString(),
               "flow_jvp": np_graphs.flow_jvp_graph(p).SerializeToString()},
    }
    b, k = a.batch, a.probes
    feeds = {"flow": {"t": rng.uniform(size=b).astype(np.float32), "x": rng.standard_normal((b, d)).astype(np.float32)}}
    feeds["flow_jvp"] = dict(feeds["flow"], eps=rng.choice([-1.0, 1.0], size=(b, k, d)).astype(np.float32))
    res = {"sizes": sizes, "D": d, "batch": b, "probes": k, "threads": a.threads,
           "np": {"channels": a.channels, "blocks": a.blocks, "pred": a.pred}}
    for field, gs in graphs.items():
        res[field] = res.get(field, {})
        res[field]["parameters"] = _params_of(onnx.load_from_string(gs["flow"]))
        for name, blob in gs.items():
            res[field][name] = dict(_time(_session(blob, a.threads), feeds[name], a.repeats, a.inner),
                                    bytes=len(blob))
    for name in ("flow", "flow_jvp"):
        res[f"ratio_{name}"] = res["np"][name]["cpu_min_ms"] / res["mlp"][name]["cpu_min_ms"]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
