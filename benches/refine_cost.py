"""Refinement's cost, in one run, on the same bundle, batch, transitions and one intra-op thread
(docs/performance.md, "Refinement").

    .venv/bin/python benches/refine_cost.py [BUNDLE ...] [--n 128] [--batch 64] [--transitions K]
        [--repeats 3] [--json OUT.json]

For each bundle of format 3 (default: models/moons and models/digits), K transitions of L
leapfrog steps (K: the bundle's refine.default_transitions unless --transitions) on n samples:

  floor    raw ONNX Runtime: the K·L + 1 runs of posterior.onnx per batch that refinement needs,
           nothing else (a bare onnxruntime session)
  rust     postflow's CLI: `postflow sample --refine K` minus `--refine 0` on the same samples
           (drawing, rescaling and canonicalizing included), child-process CPU time
  py_ort   a plain Python loop: numpy HMC (the same kernel) calling onnxruntime's session.run
  jax      the pipeline's JAX kernel (train/refine.py, jit), with the log-density of the stage
           cache work/NAME (skipped without it)

Times are process CPU seconds (all threads; one intra-op thread everywhere), best of --repeats.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benches.compare import thread_env  # noqa: E402  (the same single-thread settings)

POSTFLOW_BIN = ROOT / "target" / "release" / "postflow"


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child_cpu(cmd, env):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def session(path):
    import onnxruntime as ort
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = 1, 1, 3
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def starts(bundle, n):
    """n stored draws at original scale (the anchors, un-whitened and decanonicalized)."""
    from safetensors.numpy import load_file
    man = json.loads((bundle / "postflow.json").read_text())
    t = load_file(str(bundle / "tensors.safetensors"))
    theta = t["flow.whiten.mean"] + t["flow.whiten.scale"] * t["flow.anchors"].astype(np.float32)[:n]
    sizes = [man["input"]["dim"]] + [layer["out"] for layer in man["network"]["layers"]]
    from train import refine
    return refine.decanonicalize(theta, t["refine.anchor_unit_norms"][:n], sizes).astype(np.float32), t, man


def py_ort_hmc(sess, theta, m, step, leapfrog, transitions, batch, rng):
    """The runtime's kernel in numpy around session.run, batch by batch."""
    out = theta.copy()
    for b0 in range(0, len(theta), batch):
        x = out[b0:b0 + batch].copy()
        logp, g = sess.run(None, {"theta": x})
        for _ in range(transitions):
            p = rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(m)
            h0 = -logp.astype(np.float64) + 0.5 * np.sum(m * p.astype(np.float64) ** 2, axis=1)
            q, gq = x.copy(), g.copy()
            for _ in range(leapfrog):
                p += 0.5 * step * gq
                q += step * m * p
                lq, gq = sess.run(None, {"theta": q})
                p += 0.5 * step * gq
            h1 = -lq.astype(np.float64) + 0.5 * np.sum(m * p.astype(np.float64) ** 2, axis=1)
            accept = np.isfinite(h1) & (np.log(rng.random(len(x))) < h0 - h1)
            x[accept], g[accept], logp[accept] = q[accept], gq[accept], lq[accept]
        out[b0:b0 + batch] = x
    return out


def measure(bundle, a, env):
    bundle = Path(bundle)
    theta, t, man = starts(bundle, a.n)
    rf = man["refine"]
    k = a.transitions if a.transitions is not None else rf["default_transitions"]
    step, leapfrog, m = rf["step_size"], rf["leapfrog_steps"], t["refine.inverse_mass"]
    sess = session(bundle / rf["graph"])
    batches = [theta[i:i + a.batch] for i in range(0, len(theta), a.batch)]
    res = {"bundle": str(bundle), "n": a.n, "batch": a.batch, "transitions": k, "leapfrog": leapfrog,
           "gradients_per_sample": k * leapfrog, "D": int(theta.shape[1])}
    best = {}

    def keep(name, seconds):
        best[name] = min(best.get(name, float("inf")), seconds)

    for _ in range(a.repeats):
        c = cpu()
        for x in batches:
            for _ in range(k * leapfrog + 1):
                sess.run(None, {"theta": x})
        keep("floor", cpu() - c)
        c = cpu()
        py_ort_hmc(sess, theta, m, step, leapfrog, k, a.batch, np.random.default_rng(0))
        keep("py_ort", cpu() - c)
        # both runs from the same samples (refinement's start time), so the difference is refinement
        t_refine = str(man["refine"].get("start_time", man["flow"].get("default_start_time", 0.0)))
        base = [str(POSTFLOW_BIN), "sample", str(bundle), "-n", str(a.n), "--batch", str(a.batch), "--threads", "1",
                "-q", "-o", "/dev/null", "--start-time", t_refine]
        keep("rust", child_cpu(base + ["--refine", str(k)], env) - child_cpu(base + ["--refine", "0"], env))
    jax_s = jax_time(bundle, man, theta, m, step, leapfrog, k, a)
    if jax_s is not None:
        best["jax"] = jax_s
    res["cpu_seconds"] = best
    res["ratio_to_floor"] = {name: s / best["floor"] for name, s in best.items()}
    res["ms_per_sample_gradient"] = {name: 1e3 * s / (a.n * max(k * leapfrog, 1)) for name, s in best.items()}
    return res


def jax_time(bundle, man, theta, m, step, leapfrog, k, a):
    """The pipeline's kernel on the stage cache's log-density (None without work/NAME)."""
    work = ROOT / "work" / man["name"]
    if not (work / "data.npz").exists():
        return None
    import jax
    from train import config, mlp, refine
    cfg = config.load(ROOT / "train" / "configs" / f"{man['name']}.toml")
    data = dict(np.load(work / "data.npz"))
    noise = float(np.load(work / "map.npz")["noise_sigma"])
    sizes = mlp.sizes_of(cfg, data)
    kernel = refine.make_kernel(refine.log_posterior_of(cfg, data, noise, sizes), m, leapfrog)
    key = jax.random.PRNGKey(0)
    best = float("inf")
    for _ in range(a.repeats + 1):  # the first run compiles
        c = cpu()
        for i in range(0, len(theta), a.batch):
            th, _ = kernel(key, theta[i:i + a.batch], np.float32(step), np.int32(k))
            th.block_until_ready()
        best = min(best, cpu() - c) if _ > 0 else best
    return best


def main(argv=None):
    p = argparse.ArgumentParser(prog="benches/refine_cost.py")
    p.add_argument("bundles", nargs="*", default=[str(ROOT / "models" / "moons"), str(ROOT / "models" / "digits")])
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--transitions", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    env = thread_env(1)
    import os
    os.environ.update({k: v for k, v in env.items() if k in ("OMP_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS")})
    out = [measure(b, a, env) for b in a.bundles]
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
