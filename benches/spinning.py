"""What postflow's thread-pool spinning costs a host application (docs/performance.md).

The host is a Python process that runs its own ONNX Runtime session (the onnxruntime wheel,
default settings) in a loop, and embeds postflow through the Python binding. postflow samples
a small batch now and then (a duty cycle, like an application that asks for uncertainty once
per request) with `intra_op_threads` > 1, spinning on or off. Reported: the host session's
throughput (runs/s) alone and beside postflow, and postflow's own sampling time, in one run
with the settings interleaved. A measurement, not a test: nothing is asserted.

    POSTFLOW_ORT_LIB=.ort/libonnxruntime.so .venv/bin/python benches/spinning.py models/digits
"""
import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bindings" / "python"))
import postflow  # noqa: E402


def host_loop(session, feeds, stop, counter):
    while not stop.is_set():
        session.run(None, feeds)
        counter[0] += 1


def measure(bundle, host, feeds, seconds, spinning, threads, period):
    """Host runs/s over `seconds`, with postflow (None: absent) sampling 16 nets every `period` s."""
    stop, counter = threading.Event(), [0]
    model = None if spinning is None else postflow.Model(bundle, intra_op_threads=threads,
                                                         allow_spinning=spinning)
    if model is not None:
        model.sample(16, seed=0, start_time=0.0)  # warm up the sessions
    t = threading.Thread(target=host_loop, args=(host, feeds, stop, counter))
    start = time.perf_counter()
    t.start()
    sample_times = []
    while time.perf_counter() - start < seconds:
        if model is not None:
            s0 = time.perf_counter()
            model.sample(16, seed=len(sample_times), start_time=0.0)
            sample_times.append(time.perf_counter() - s0)
        time.sleep(period)
    stop.set()
    t.join()
    elapsed = time.perf_counter() - start
    if model is not None:
        model.close()
    return counter[0] / elapsed, (float(np.median(sample_times)) if sample_times else float("nan"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="postflow intra-op threads")
    ap.add_argument("--period", type=float, default=0.05, help="seconds between postflow calls")
    args = ap.parse_args()
    bundle = Path(args.bundle)
    # The host's own model: the bundle's flow graph, batch 64, onnxruntime's default options.
    host = ort.InferenceSession(str(bundle / "flow.onnx"), providers=["CPUExecutionProvider"])
    d = host.get_inputs()[1].shape[1]
    feeds = {"t": np.full(64, 0.5, np.float32), "x": np.random.default_rng(0).standard_normal((64, d), np.float32)}
    rows = {"host alone": [], "postflow, spinning off": [], "postflow, spinning on": []}
    settings = {"host alone": None, "postflow, spinning off": False, "postflow, spinning on": True}
    for _ in range(args.rounds):
        for name, spin in settings.items():
            rows[name].append(measure(bundle, host, feeds, args.seconds, spin, args.threads, args.period))
    base = np.median([r[0] for r in rows["host alone"]])
    print(f"{bundle.name}: host session = flow.onnx batch 64, onnxruntime defaults; postflow samples 16 nets "
          f"every {args.period} s with {args.threads} intra-op threads; {args.rounds} rounds of {args.seconds} s, medians")
    print(f"{'setting':<26} {'host runs/s':>12} {'vs alone':>9} {'postflow ms/call':>17}")
    for name, vals in rows.items():
        runs = np.median([v[0] for v in vals])
        ms = np.median([v[1] for v in vals]) * 1e3
        print(f"{name:<26} {runs:>12.1f} {runs / base:>9.3f} {ms:>17.1f}")


if __name__ == "__main__":
    main()
