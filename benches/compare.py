"""postflow against the alternatives, in one run, on the same bundle, solver (RK4), steps,
batch and intra-op thread count (issue 6).

    .venv/bin/python benches/compare.py [BUNDLE ...] [--n 256] [--batch 64] [--steps 20]
        [--intra 1] [--repeats 5] [--json OUT.json] [--extras] [--synthetic DIR] [--figures DIR]

For each bundle (default: every bundle in models/) and each trace mode (none, Hutchinson K=1):

  floor     raw ONNX Runtime: the summed time of the same Session::run calls, same shapes
            (examples/time_sample, a bare session)
  rust      postflow's Rust API, Model::sample (examples/time_sample)
  c_abi     postflow through the C ABI: the Python binding in bindings/python (ctypes on
            libpostflow.so)
  jax       the pipeline's JAX sampler (train/sampler.py) under jax.jit, with the flow params of
            work/NAME/flow.npz (for synthetic bundles: DIR/NAME.params.npz)
  py_ort    a plain Python loop: numpy RK4 calling onnxruntime InferenceSession.run

Each is timed as the best of R repeats after a warm-up, on two clocks: wall time and the
process's CPU time (all threads; --clock picks the one the ratios use, default cpu: on a shared,
loaded machine it does not count the time spent waiting for a core). Rust and the floor alternate inside
time_sample; the Python-side implementations alternate inside one worker process; the two
processes alternate `--rounds` times and each implementation keeps its best (JAX runs in a
process of its own, so its runtime threads do not count in the others' CPU time, pinned to
--intra cores: XLA's CPU runtime uses a second thread despite the single-thread flags). Thread counts:
intra-op threads = --intra everywhere (ONNX Runtime session options, OMP_NUM_THREADS, and
XLA's CPU flags for JAX), inter-op 1.

--extras adds: Hutchinson K=4; 2 threads sharing one model vs 1 thread; cost vs n (64, 256,
1024); cost vs D on synthetic bundles (--synthetic DIR, made by benches/synthetic.py); the
peak RSS of `postflow sample` for 1000 samples with log-densities; plots under --figures.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIME_SAMPLE = ROOT / "target" / "release" / "examples" / "time_sample"
POSTFLOW_BIN = ROOT / "target" / "release" / "postflow"
IMPLS = ["floor", "rust", "c_abi", "jax", "py_ort"]
LABELS = {"floor": "ONNX Runtime floor", "rust": "postflow (Rust API)", "c_abi": "postflow (C ABI)",
          "jax": "JAX reference (jit)", "py_ort": "Python loop + onnxruntime"}


def thread_env(intra):
    env = dict(os.environ)
    env.setdefault("POSTFLOW_ORT_LIB", str(ROOT / ".ort" / "libonnxruntime.so"))
    env["OMP_NUM_THREADS"] = str(intra)
    env["OPENBLAS_NUM_THREADS"] = str(intra)
    env["MKL_NUM_THREADS"] = str(intra)
    if intra == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                            " intra_op_parallelism_threads=1").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


# ---------------------------------------------------------------------------------------------
# Worker: the Python-side implementations, in one process (jax is imported only here).
# ---------------------------------------------------------------------------------------------

def _bundle_info(bundle):
    from safetensors.numpy import load_file
    manifest = json.loads((Path(bundle) / "postflow.json").read_text())
    tensors = load_file(str(Path(bundle) / manifest.get("tensors", "tensors.safetensors")))
    return manifest, tensors["flow.whiten.mean"], tensors["flow.whiten.scale"]


def jax_params_path(bundle, manifest):
    """The flow params for the JAX reference, or (None, reason)."""
    b = Path(bundle)
    if (manifest.get("provenance") or {}).get("synthetic"):
        p = b.parent / f"{b.name}.params.npz"
        return (p, None) if p.exists() else (None, f"n/a: {p} missing (rerun benches/synthetic.py)")
    p = ROOT / "work" / manifest["name"] / "flow.npz"
    if p.exists():
        return p, None
    return None, f"n/a: run the pipeline to create work/{manifest['name']}"


def make_jax(bundle, manifest, mean, scale, n, batch, steps, trace, probes):
    """A callable(seed) drawing n samples with train/sampler.py under jax.jit, batch by batch."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    sys.path.insert(0, str(ROOT))
    from train import sampler

    path, why = jax_params_path(bundle, manifest)
    if path is None:
        return None, why
    flat = dict(np.load(path))
    if "W1" in flat:  # benches/synthetic.py's one-hidden-layer ReLU MLP
        p = {k: jnp.asarray(v) for k, v in flat.items()}

        def vfield(t, x):
            h = jax.nn.relu(x @ p["W1"].T + t[:, None] * p["wt"] + p["b1"])
            return h @ p["W2"].T + p["b2"]
    else:
        from train import flow as flow_mod
        params = flow_mod.unflatten_params(flat)

        def vfield(t, x):
            return flow_mod.velocity(params, t, x)
    mean, scale = jnp.asarray(mean), jnp.asarray(scale)
    tr = None if trace == "none" else "hutchinson"
    fns = {}

    def fn_for(b):
        if b not in fns:
            fns[b] = jax.jit(lambda k: sampler.sample(vfield, k, b, mean, scale, method="rk4", steps=steps,
                                                      trace=tr, probes=probes))
        return fns[b]

    def run(seed):
        key = jax.random.PRNGKey(seed)
        out = []
        for i, start in enumerate(range(0, n, batch)):
            th, lq = fn_for(min(batch, n - start))(jax.random.fold_in(key, i))
            out.append((np.asarray(th), np.asarray(lq)))
        return out
    return run, None


def make_py_ort(bundle, manifest, mean, scale, n, batch, steps, trace, probes, intra):
    """A callable(seed): numpy RK4 over onnxruntime sessions, the loop a user would script."""
    import numpy as np
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    g = manifest["graphs"]["flow" if trace == "none" else "flow_jvp"]
    sess = ort.InferenceSession(str(Path(bundle) / g["file"]), so, providers=["CPUExecutionProvider"])
    ins, outs = g["inputs"], g["outputs"]
    d = len(mean)
    h = 1.0 / steps
    log_scale = float(np.sum(np.log(scale.astype(np.float64))))

    def run(seed):
        rng = np.random.default_rng(seed)
        thetas, logqs = [], []
        for start in range(0, n, batch):
            b = min(batch, n - start)
            x = rng.standard_normal((b, d), dtype=np.float32)
            base = -0.5 * np.sum(x.astype(np.float64) ** 2, 1) - 0.5 * d * np.log(2 * np.pi)
            acc = np.zeros(b, np.float64)
            if trace == "none":
                def f(t, x):
                    return sess.run(outs, {ins[0]: np.full(b, t, np.float32), ins[1]: x})[0], 0.0
            else:
                eps = (rng.integers(0, 2, (b, probes, d)).astype(np.float32) * 2 - 1)

                def f(t, x):
                    v, q = sess.run(outs, {ins[0]: np.full(b, t, np.float32), ins[1]: x, ins[2]: eps})
                    return v, q.astype(np.float64).mean(1)
            for i in range(steps):
                t = i * h
                k1, a1 = f(t, x)
                k2, a2 = f(t + h / 2, x + (h / 2) * k1)
                k3, a3 = f(t + h / 2, x + (h / 2) * k2)
                k4, a4 = f(t + h, x + h * k3)
                x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
                acc = acc + (h / 6) * (a1 + 2 * a2 + 2 * a3 + a4)
            thetas.append(mean + scale * x)
            logqs.append(base - acc - log_scale)
        return np.concatenate(thetas), np.concatenate(logqs)
    return run


def make_c_abi(bundle, n, batch, steps, trace, probes, intra):
    """A callable(seed) through pf_sample (the Python binding in bindings/python, ctypes on
    libpostflow.so), and how it is reached."""
    sys.path.insert(0, str(ROOT / "bindings" / "python"))
    import postflow
    model = postflow.Model(bundle, intra_op_threads=intra, max_sessions=1)

    def run(seed):
        return model.sample(n, seed=seed, solver="rk4", steps=steps, trace=trace, probes=probes, batch_size=batch)
    return run, "python binding (bindings/python, ctypes)", model


def worker(a):
    """Times c_abi, jax and py_ort for one (bundle, trace), interleaved; prints JSON."""
    wanted = a.impls.split(",")
    if wanted == ["jax"] and a.pin_jax and hasattr(os, "sched_setaffinity"):
        # XLA's CPU runtime still runs work on a second thread despite the single-thread flags;
        # pin the JAX process to as many cores as intra-op threads so all get the same cores.
        cores = sorted(os.sched_getaffinity(0))[:max(a.intra, 1)]
        os.sched_setaffinity(0, cores)
    manifest, mean, scale = _bundle_info(a.bundle)
    res, notes, runs = {}, {}, {}
    keep = []
    if "c_abi" in wanted:
        try:
            run, how, handle = make_c_abi(a.bundle, a.n, a.batch, a.steps, a.trace, a.probes, a.intra)
            runs["c_abi"], notes["c_abi"] = run, how
            keep.append(handle)
        except Exception as e:  # noqa: BLE001 - report, do not hide
            notes["c_abi"] = f"n/a: {type(e).__name__}: {e}"
    if "py_ort" in wanted:
        runs["py_ort"] = make_py_ort(a.bundle, manifest, mean, scale, a.n, a.batch, a.steps, a.trace, a.probes, a.intra)
    if "jax" in wanted:
        try:
            run, why = make_jax(a.bundle, manifest, mean, scale, a.n, a.batch, a.steps, a.trace, a.probes)
        except Exception as e:  # noqa: BLE001
            run, why = None, f"n/a: {type(e).__name__}: {e}"
        if run is None:
            notes["jax"] = why
        else:
            runs["jax"] = run
            import jax
            notes["jax"] = f"jax {jax.__version__}, jit per batch shape, train/sampler.sample"
    cpu = {}
    for name, run in runs.items():  # warm-up (and compile)
        t0 = time.perf_counter()
        run(10_000)
        notes[name + "_warmup_s"] = time.perf_counter() - t0
        res[name] = cpu[name] = float("inf")
    for r in range(a.repeats):
        for name, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run(r)
            cpu[name] = min(cpu[name], time.process_time() - c0)
            res[name] = min(res[name], time.perf_counter() - t0)
    print(json.dumps({"times": res, "cpu_times": cpu, "notes": notes}))


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def time_sample(bundle, n, batch, steps, trace, probes, intra, repeats, threads=0):
    cmd = [str(TIME_SAMPLE), str(bundle), "--n", str(n), "--batch", str(batch), "--steps", str(steps),
           "--trace", trace, "--probes", str(probes), "--repeats", str(repeats), "--intra", str(intra)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, env=thread_env(intra), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_worker(bundle, n, batch, steps, trace, probes, intra, repeats, impls):
    cmd = [sys.executable, __file__, "--worker", "--bundle", str(bundle), "--n", str(n), "--batch", str(batch),
           "--steps", str(steps), "--trace", trace, "--probes", str(probes), "--intra", str(intra),
           "--repeats", str(repeats), "--impls", impls] + ([] if PIN_JAX["on"] else ["--no-pin-jax"])
    out = subprocess.run(cmd, env=thread_env(intra), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


CLOCK = {"name": "cpu"}
PIN_JAX = {"on": True}  # set from --clock: which of the two clocks the ratios use


def measure(bundle, n, batch, steps, trace, probes, intra, repeats, rounds, impls="c_abi,jax,py_ort", log=print):
    """All implementations for one (bundle, trace): best seconds per implementation, both clocks."""
    wall = {k: float("inf") for k in IMPLS}
    cpu = {k: float("inf") for k in IMPLS}
    notes, ts = {}, None
    for _ in range(rounds):
        ts = time_sample(bundle, n, batch, steps, trace, probes, intra, repeats)
        wall["rust"] = min(wall["rust"], ts["postflow_s"])
        wall["floor"] = min(wall["floor"], ts["floor_s"])
        cpu["rust"] = min(cpu["rust"], ts["postflow_cpu_s"])
        cpu["floor"] = min(cpu["floor"], ts["floor_cpu_s"])
        # JAX in a process of its own: its runtime threads would otherwise count in the others' CPU time.
        groups = [g for g in (",".join(i for i in impls.split(",") if i != "jax"), "jax" if "jax" in impls else "") if g]
        for group in groups:
            w = run_worker(bundle, n, batch, steps, trace, probes, intra, repeats, group)
            for k, v in w["times"].items():
                wall[k] = min(wall[k], v)
            for k, v in w["cpu_times"].items():
                cpu[k] = min(cpu[k], v)
            notes.update(w["notes"])
    wall = {k: (None if v == float("inf") else v) for k, v in wall.items()}
    cpu = {k: (None if v == float("inf") else v) for k, v in cpu.items()}
    times = cpu if CLOCK["name"] == "cpu" else wall
    row = {"bundle": str(bundle), "name": Path(bundle).name, "D": ts["D"], "n": n, "batch": batch, "steps": steps,
           "solver": "rk4", "trace": trace, "probes": probes if trace != "none" else 0, "intra_op_threads": intra,
           "nfe": ts["nfe"], "clock": CLOCK["name"], "seconds": times, "wall_seconds": wall, "cpu_seconds": cpu,
           "wall_vs_floor": {k: (v / wall["floor"] if v else None) for k, v in wall.items()},
           "notes": notes,
           "vs_floor": {k: (v / times["floor"] if v else None) for k, v in times.items()},
           "vs_postflow": {k: (v / times["rust"] if v else None) for k, v in times.items()}}
    log(format_row(row))
    return row


def fmt(x, spec="{:.2f}"):
    return "n/a" if x is None else spec.format(x)


def format_row(row):
    s, vf, vp = row["seconds"], row["vs_floor"], row["vs_postflow"]
    trace = "none" if row["trace"] == "none" else f"hutchinson K={row['probes']}"
    lines = [f"{row['name']} (D={row['D']}, n={row['n']}, batch={row['batch']}, rk4 x {row['steps']}, "
             f"trace {trace}, intra-op {row['intra_op_threads']}, {row['nfe']} evaluations; {row['clock']} time)"]
    for k in IMPLS:
        if s.get(k) is not None:
            lines.append(f"  {LABELS[k]:<28} {fmt(s[k] and s[k] * 1e3, '{:9.1f}')} ms   x floor {fmt(vf[k]):>6}"
                         f"   x postflow {fmt(vp[k]):>6}")
    for k, v in row["notes"].items():
        if isinstance(v, str) and v.startswith("n/a"):
            lines.append(f"  note {k}: {v}")
    return "\n".join(lines)


def markdown_table(rows, key="seconds"):
    """The ratio table from rows[key] (x the floor; the last two columns: how many times slower
    than postflow the JAX reference and the Python loop are)."""
    rows = [dict(r, seconds=r[key],
                 vs_floor={k: (v / r[key]["floor"] if v else None) for k, v in r[key].items()},
                 vs_postflow={k: (v / r[key]["rust"] if v else None) for k, v in r[key].items()})
            for r in rows]
    out = ["| bundle | D | trace | floor ms | postflow Rust | postflow C ABI | JAX jit | Python+ORT loop | JAX / postflow | loop / postflow |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        s, vf, vp = r["seconds"], r["vs_floor"], r["vs_postflow"]
        tr = "none" if r["trace"] == "none" else f"Hutch. K={r['probes']}"
        out.append(f"| {r['name']} | {r['D']} | {tr} | {fmt(s['floor'] * 1e3, '{:.1f}')} | {fmt(vf['rust'])}× | "
                   f"{fmt(vf['c_abi'])}× | {fmt(vf['jax'])}× | {fmt(vf['py_ort'])}× | {fmt(vp['jax'])} | {fmt(vp['py_ort'])} |")
    return "\n".join(out)


def peak_rss(bundle, intra):
    """Peak RSS (MB) of `postflow sample BUNDLE -n 1000 --trace hutchinson` under /usr/bin/time -v."""
    out_file = "/tmp/postflow-compare-rss.safetensors"
    cmd = ["/usr/bin/time", "-v", str(POSTFLOW_BIN), "sample", str(bundle), "-n", "1000", "--trace", "hutchinson",
           "-o", out_file]
    p = subprocess.run(cmd, env=thread_env(intra), capture_output=True, text=True)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    try:
        os.unlink(out_file)
    except OSError:
        pass
    if p.returncode != 0 or not m:
        return {"bundle": str(bundle), "error": p.stderr[-1000:]}
    return {"bundle": str(bundle), "command": " ".join(cmd[2:]), "peak_rss_mb": int(m.group(1)) / 1024}


def ort_profile(graph, d, batch=64, probes=1, calls=200, intra=1, top=12):
    """ONNX Runtime's own profiler on one graph: time per run by op type and the top nodes."""
    import tempfile

    import numpy as np
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = intra, 1, 3
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    names = [i.name for i in sess.get_inputs()]
    feed = {names[0]: np.full(batch, 0.5, np.float32), names[1]: rng.standard_normal((batch, d)).astype(np.float32)}
    if len(names) > 2:
        feed[names[2]] = rng.choice([-1.0, 1.0], size=(batch, probes, d)).astype(np.float32)
    for _ in range(calls):
        sess.run(None, feed)
    prof = json.loads(Path(sess.end_profiling()).read_text())
    by_op, by_node, runs = {}, {}, 0
    for ev in prof:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            runs += 1
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        op = ev["args"].get("op_name", "?")
        by_op[op] = by_op.get(op, 0) + ev["dur"]
        node = ev["name"][: -len("_kernel_time")]
        shape = ev["args"].get("output_type_shape") or ev["args"].get("activation_size")
        key = (node, op)
        prev = by_node.get(key, (0, shape))
        by_node[key] = (prev[0] + ev["dur"], shape)
    runs = max(runs, 1)
    total = sum(by_op.values())
    ops = sorted(((op, us / runs) for op, us in by_op.items()), key=lambda x: -x[1])
    nodes = sorted(((n, op, us / runs, sh) for (n, op), (us, sh) in by_node.items()), key=lambda x: -x[2])[:top]
    return {"graph": str(graph), "batch": batch, "probes": probes, "runs": runs, "kernel_us_per_run": total / runs,
            "nodes": len(by_node),
            "by_op_us": [{"op": op, "us": us, "share": us * runs / total} for op, us in ops],
            "top_nodes": [{"node": n, "op": op, "us": us, "output": sh} for n, op, us, sh in nodes]}


def print_profile(p, log=print, top=10):
    log(f"{p['graph']} (batch {p['batch']}, K={p['probes']}): {p['kernel_us_per_run']:.0f} us of kernels per run, "
        f"{p['nodes']} nodes")
    for r in p["by_op_us"][:top]:
        log(f"    {r['op']:<14} {r['us']:8.1f} us  {100 * r['share']:5.1f}%")


def machine():
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = re.search(r"model name\s*:\s*(.*)", cpu).group(1)
    except Exception:  # noqa: BLE001
        pass
    info["loadavg_start"] = os.getloadavg()
    return info


def extras(a, main_bundle, log):
    ex = {}
    n, batch, steps, intra, R = a.n, a.batch, a.steps, a.intra, a.repeats
    log("\n== Hutchinson K=1 and K=4 cost vs trace none (interleaved in one process: time_sample --probe-sweep) ==")
    ex["probes"] = {}
    for b in a.probe_bundles:
        c = "_cpu_s" if CLOCK["name"] == "cpu" else "_s"
        best = None
        for _ in range(a.rounds):
            cmd = [str(TIME_SAMPLE), str(b), "--n", str(n), "--batch", str(batch), "--steps", str(steps),
                   "--repeats", str(R), "--intra", str(intra), "--probe-sweep", "1,4"]
            out = subprocess.run(cmd, env=thread_env(intra), capture_output=True, text=True, check=True)
            sw = json.loads(out.stdout.strip().splitlines()[-1])["sweep"]
            if best is None:
                best = sw
            else:
                for x, y in zip(best, sw):
                    for key in ("postflow_s", "postflow_cpu_s", "floor_s", "floor_cpu_s"):
                        x[key] = min(x[key], y[key])
        none = best[0]
        probe = {}
        for x in best:
            label = "none" if x["probes"] == 0 else f"K{x['probes']}"
            probe[label] = {"postflow_s": x["postflow" + c], "floor_s": x["floor" + c],
                            "postflow_vs_none": x["postflow" + c] / none["postflow" + c],
                            "floor_vs_none": x["floor" + c] / none["floor" + c],
                            "wall_postflow_vs_none": x["postflow_s"] / none["postflow_s"],
                            "wall_floor_vs_none": x["floor_s"] / none["floor_s"]}
        for who in ("postflow", "floor"):
            probe[f"extra_probe_cost_vs_pass_{who}"] = (probe["K4"][f"{who}_vs_none"] - probe["K1"][f"{who}_vs_none"]) / 3
        ex["probes"][Path(b).name] = probe
        log(f"  {Path(b).name}: K=1 {probe['K1']['postflow_vs_none']:.2f}x none (floor {probe['K1']['floor_vs_none']:.2f}x),"
            f" K=4 {probe['K4']['postflow_vs_none']:.2f}x (floor {probe['K4']['floor_vs_none']:.2f}x),"
            f" each extra probe {probe['extra_probe_cost_vs_pass_postflow']:.2f} of a pass")

    log("\n== 2 threads sharing one model vs 1 thread (intra-op 1) ==")
    thr = {}
    for trace in ("none", "hutchinson"):
        ts = time_sample(main_bundle, n, batch, steps, trace, 1, 1, R, threads=2)
        thr[trace] = {k: ts[k] for k in ("samples_per_s_1thread", "samples_per_s_threads", "thread_scaling")}
        log(f"  {trace}: 1 thread {ts['samples_per_s_1thread']:.0f}/s, 2 threads {ts['samples_per_s_threads']:.0f}/s,"
            f" scaling {ts['thread_scaling']:.2f}")
    ex["threads"] = thr

    log("\n== cost vs number of samples ==")
    vs_n = []
    for nn in (64, 256, 1024):
        for trace in ("none", "hutchinson"):
            ts = time_sample(main_bundle, nn, batch, steps, trace, 1, intra, R)
            c = "_cpu_s" if CLOCK["name"] == "cpu" else "_s"
            vs_n.append({"n": nn, "trace": trace, "postflow_s": ts["postflow" + c], "floor_s": ts["floor" + c],
                         "wall_postflow_s": ts["postflow_s"], "wall_floor_s": ts["floor_s"]})
            log(f"  n={nn:5d} {trace:10s} postflow {vs_n[-1]['postflow_s'] * 1e3:8.1f} ms  "
                f"floor {vs_n[-1]['floor_s'] * 1e3:8.1f} ms")
    ex["vs_n"] = vs_n

    if a.synthetic:
        log("\n== cost vs D (synthetic bundles) ==")
        vs_d = []
        syn = sorted((p for p in Path(a.synthetic).glob("synthetic_d*") if (p / "postflow.json").exists()),
                     key=lambda p: int(p.name.split("_d")[1]))
        for b in syn:
            for trace in ("none", "hutchinson"):
                row = measure(b, a.d_n, a.d_n, a.d_steps, trace, 1, intra, max(2, R // 2), 1,
                              impls="jax,py_ort", log=log)
                vs_d.append(row)
        ex["vs_d"] = vs_d

    log("\n== peak RSS: postflow sample -n 1000 --trace hutchinson ==")
    digits = ROOT / "models" / "digits"
    rss_bundle = digits if (digits / "postflow.json").exists() else main_bundle
    ex["rss"] = peak_rss(rss_bundle, intra)
    ex["rss"]["digits_present"] = rss_bundle == digits
    log(json.dumps(ex["rss"]))
    return ex


def plots(result, fig_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    ex = result["extras"]
    written = []
    if ex.get("vs_n"):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for trace, color in (("none", "tab:blue"), ("hutchinson", "tab:red")):
            pts = [r for r in ex["vs_n"] if r["trace"] == trace]
            ns = [r["n"] for r in pts]
            label = "trace none" if trace == "none" else "Hutchinson K=1"
            ax.plot(ns, [1e3 * r["postflow_s"] / r["n"] for r in pts], marker="o", color=color, label=f"postflow, {label}")
            ax.plot(ns, [1e3 * r["floor_s"] / r["n"] for r in pts], marker="s", ls="--", color=color,
                    label=f"ORT floor, {label}")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("samples n")
        ax.set_ylabel(f"ms per sample ({result['config'].get('clock', 'wall')} time)")
        ax.set_title(f"{Path(result['extras_bundle']).name}: cost per sample vs n\n(rk4, {result['config']['steps']} steps,"
                     f" batch {result['config']['batch']}; flat = linear in n)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = fig_dir / "perf_cost_vs_n.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(str(p))
    if ex.get("vs_d"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, trace in zip(axes, ("none", "hutchinson")):
            rows = sorted((r for r in ex["vs_d"] if r["trace"] == trace), key=lambda r: r["D"])
            ds = [r["D"] for r in rows]
            for k, mk in (("floor", "o"), ("rust", "s"), ("jax", "^"), ("py_ort", "v")):
                ys = [r["seconds"][k] / (r["n"] * r["nfe"] / (r["n"] // r["batch"])) if r["seconds"].get(k) else None
                      for r in rows]
                xs = [d for d, y in zip(ds, ys) if y]
                ax.plot(xs, [y for y in ys if y], marker=mk, label=LABELS[k])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("weight dimension D")
            ax.set_title(f"trace {trace if trace == 'none' else 'Hutchinson K=1'}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel(f"seconds per sample per evaluation ({result['config'].get('clock', 'wall')} time)")
        axes[0].legend(fontsize=8)
        fig.suptitle("cost vs D (synthetic width-256 MLP flows)")
        fig.tight_layout()
        p = fig_dir / "perf_cost_vs_d.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(str(p))
    return written


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--intra", type=int, default=1)
    ap.add_argument("--probes", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the Rust and Python processes")
    ap.add_argument("--json", default=None)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="time the ratios use: process CPU time (default; robust on a loaded machine) or wall")
    ap.add_argument("--extras", action="store_true")
    ap.add_argument("--extras-bundle", default=None, help="bundle for the extras (default: the first)")
    ap.add_argument("--synthetic", default=None, help="folder of benches/synthetic.py bundles for the D sweep")
    ap.add_argument("--d-n", type=int, default=32, help="samples (= batch) per run in the D sweep")
    ap.add_argument("--d-steps", type=int, default=5, help="RK4 steps in the D sweep")
    ap.add_argument("--figures", default=str(ROOT / "docs" / "figures"))
    ap.add_argument("--ort-profile", nargs="+", metavar="GRAPH",
                    help="only run ONNX Runtime's profiler on these graph files (flow/flow_jvp .onnx) and exit")
    # worker mode (internal)
    ap.add_argument("--replot", metavar="JSON", help="only redraw the figures from a result JSON and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    ap.add_argument("--trace", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--impls", default="c_abi,jax,py_ort", help=argparse.SUPPRESS)
    ap.add_argument("--no-pin-jax", dest="pin_jax", action="store_false",
                    help="do not pin the JAX process to --intra cores (it uses more threads than asked otherwise)")
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    if a.replot:
        print(plots(json.loads(Path(a.replot).read_text()), a.figures))
        return
    CLOCK["name"] = a.clock
    PIN_JAX["on"] = a.pin_jax

    if a.ort_profile:
        import onnx
        profs = []
        for g in a.ort_profile:
            inp = onnx.load(g, load_external_data=False).graph.input
            d = inp[1].type.tensor_type.shape.dim[1].dim_value
            for k in ([a.probes] if len(inp) > 2 else [0]):
                p = ort_profile(g, d, a.batch, max(k, 1), intra=a.intra)
                print_profile(p)
                profs.append(p)
        if a.json:
            Path(a.json).write_text(json.dumps(profs, indent=1))
        return

    if not TIME_SAMPLE.exists():
        sys.exit(f"{TIME_SAMPLE} missing: cargo build --release --example time_sample")
    bundles = [Path(b) for b in a.bundles] or sorted(p for p in (ROOT / "models").iterdir()
                                                     if (p / "postflow.json").exists())
    log = (lambda s: print(s, flush=True))
    result = {"machine": machine(), "config": {k: getattr(a, k) for k in ("n", "batch", "steps", "intra", "probes",
                                                                          "repeats", "rounds", "clock")},
              "command": " ".join([".venv/bin/python", "benches/compare.py", *sys.argv[1:]]),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rows": []}
    log(f"machine: {result['machine']}")
    for b in bundles:
        for trace in ("none", "hutchinson"):
            result["rows"].append(measure(b, a.n, a.batch, a.steps, trace, a.probes, a.intra, a.repeats, a.rounds,
                                          log=log))
            log("")
    log(f"ratios on {a.clock} time:")
    log(markdown_table(result["rows"], "seconds"))
    other = "wall" if a.clock == "cpu" else "cpu"
    log(f"\nthe same on {other} time:")
    log(markdown_table(result["rows"], f"{other}_seconds"))
    if a.extras:
        eb = Path(a.extras_bundle) if a.extras_bundle else bundles[0]
        result["extras_bundle"] = str(eb)
        a.probe_bundles = bundles
        result["extras"] = extras(a, eb, log)
        result["figures"] = plots(result, a.figures)
        log(f"figures: {result['figures']}")
    result["machine"]["loadavg_end"] = os.getloadavg()
    log(f"load average at start {result['machine']['loadavg_start']}, at end {result['machine']['loadavg_end']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1))
        log(f"wrote {a.json}")


if __name__ == "__main__":
    main()
