"""The same flow graph with its weights stored as f32 or as f16 + Cast (`flow.weight_dtype`), in
one run: file size, session load time and time per call, raw ONNX Runtime, one intra-op thread,
the two graphs alternating call by call (best of R after a warm-up, CPU and wall clocks).

    .venv/bin/python benches/weight_storage.py GRAPH.onnx [--batch 64] [--probes 1] [--repeats 200]

GRAPH.onnx is a flow or flow_jvp graph of a bundle with f16 weights; the f32 variant stores the
same values as f32 without the Casts, so both compute with the same numbers. Prints ratios f16 / f32; it asserts nothing about time."""

import argparse
import time

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train import graphs  # noqa: E402  (benches/ is not a package)


def variants(path):
    """(f32-stored, f16-stored) serialized models with identical weight values."""
    m = onnx.load(path)
    if not any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer):
        raise SystemExit(f"{path}: no f16 weights (a graph of a bundle built with flow.weight_dtype = \"f16\")")
    wide = graphs.stored_as_f32(m)
    return wide.SerializeToString(), m.SerializeToString()


def session(model):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graph")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--probes", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=200)
    a = ap.parse_args()
    models = dict(zip(("f32", "f16"), variants(a.graph)))
    load = {k: [] for k in models}
    for _ in range(5):
        for k, blob in models.items():
            t = time.process_time(); session(blob); load[k].append(time.process_time() - t)
    sessions = {k: session(blob) for k, blob in models.items()}
    d = sessions["f32"].get_inputs()[1].shape[1]
    rng = np.random.default_rng(0)
    feed = {"t": rng.uniform(size=a.batch).astype(np.float32), "x": rng.standard_normal((a.batch, d)).astype(np.float32)}
    if len(sessions["f32"].get_inputs()) == 3:
        feed["eps"] = rng.choice([-1.0, 1.0], size=(a.batch, a.probes, d)).astype(np.float32)
    out = {k: s.run(None, feed) for k, s in sessions.items()}
    same = all(np.array_equal(x, y) for x, y in zip(out["f32"], out["f16"]))
    cpu, wall = {k: [] for k in sessions}, {k: [] for k in sessions}
    for _ in range(a.repeats):
        for k, s in sessions.items():
            t, w = time.process_time(), time.perf_counter()
            s.run(None, feed)
            cpu[k].append(time.process_time() - t); wall[k].append(time.perf_counter() - w)
    print(f"{a.graph}: D = {d}, batch {a.batch}, outputs bitwise equal: {same}")
    print(f"  bytes          f32 {len(models['f32']):>10}  f16 {len(models['f16']):>10}  ratio {len(models['f16']) / len(models['f32']):.3f}")
    print(f"  load (cpu ms)  f32 {1e3 * min(load['f32']):10.1f}  f16 {1e3 * min(load['f16']):10.1f}  ratio {min(load['f16']) / min(load['f32']):.3f}")
    for name, clock in (("call cpu ms", cpu), ("call wall ms", wall)):
        f32, f16 = np.min(clock["f32"]), np.min(clock["f16"])
        med = np.median(clock["f16"]) / np.median(clock["f32"])
        print(f"  {name:13s}  f32 {1e3 * f32:10.3f}  f16 {1e3 * f16:10.3f}  ratio {f16 / f32:.3f} (median ratio {med:.3f})")


if __name__ == "__main__":
    main()
