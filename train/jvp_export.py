"""Prototype (issue 6): a flow_jvp.onnx whose cost is one primal plus K tangents per call.

`train/export.py` exports flow_jvp with `jax.linearize` + `vmap` over the K tangents; jax2onnx
turns that into 150 nodes with a 3-D `Einsum` per layer for the tangents, the primal's `Gemm`
separately, and the SiLU derivative rebuilt from `Exp`/`Div`/`Neg` (ONNX Runtime spends ~2.9x
the time of flow.onnx in it at K = 1). Here the JVP is written out by hand:

    per layer   Z = [h; dh_1 .. dh_K] @ W          one [B·(1+K), in] x [in, out] Gemm
                primal  p = Z[:, 0] + b,  s = sigmoid(p),  h' = p·s
                tangent dh'_k = Z[:, k] · s·(1 + p·(1 − s))   (SiLU')
    first layer the time features enter the primal only (their tangent is zero)
    output      v = Z[:, 0] + b,  quad[:, k] = Σ_d eps_k · Z[:, k]

It computes exactly what `export.flow_jvp_fn` does: (v [B,D], quad [B,K]) from
(t [B], x [B,D], eps [B,K,D]), with the bundle's input and output names.

    .venv/bin/python -m train.jvp_export work/moons/flow.npz OUT.onnx [--check] [--time BUNDLE [--bundle-out DIR]]

--check compares against export.flow_jvp_fn on random inputs (relative error ≤ 1e-4);
--time BUNDLE times the bare onnxruntime session (the floor) of BUNDLE's flow.onnx, its
flow_jvp.onnx and OUT.onnx (and its variants: OUT.hand.onnx, OUT.hand_stacked.onnx, and the
shipped graph with its Einsums as MatMuls) at batch 64, K = 1 and 4, intra-op threads 1.
The hand-written graph (`handwritten_flow_jvp`) is the fastest; --bundle-out writes a copy of
BUNDLE that uses it.
This module does not change train/export.py; it is for the lead to adopt or not.
"""

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx

from . import export as export_mod
from . import flow as flow_mod


def stacked_flow_jvp_fn(params):
    """(t [B], x [B,D], eps [B,K,D]) -> (v [B,D], quad [B,K]) with stacked matmuls.

    The stack is kept 3-D, [B,1+K,·], row 0 the primal, so no reshape needs the symbolic
    batch size; each layer's product is a 3-D x 2-D contraction that jax2onnx writes as an
    Einsum and `einsum_to_matmul` turns into a MatMul (one GEMM over B·(1+K) rows in ONNX
    Runtime). The stack is built with Pad and a row-0 selector, not Concat: jax2onnx 0.x
    gets the shape of a Concat along a symbolic axis wrong."""
    def f(t, x, eps):
        d = x.shape[1]
        n_freqs = params[0]["w"].shape[0] - d
        temb = flow_mod.time_embedding(t, n_freqs)                                    # [B,F]
        w0 = params[0]["w"]
        pad1 = ((0, 0), (1, 0), (0, 0))
        sel = jnp.pad(jnp.zeros_like(eps[:, :, :1]), pad1, constant_values=1.0)      # [B,1+K,1]: row 0
        stacked = jnp.pad(eps, pad1) + sel * x[:, None, :]                             # [B,1+K,D]
        z = stacked @ w0[:d]                                                           # [B,1+K,H]
        bias = (temb @ w0[d:] + params[0]["b"])[:, None, :]                           # primal only
        for layer in params[1:]:
            z = z + sel * bias                                                         # row 0: pre-activation p
            p = z[:, :1, :]
            s = jax.nn.sigmoid(p)
            g = s * (1.0 + p * (1.0 - s))                                              # SiLU'(p)
            h = z * (g + sel * (s - g))                                                # row 0: p·s; rows k: dz·SiLU'(p)
            z = h @ layer["w"]
            bias = layer["b"][None, None, :]
        v = z[:, 0, :] + params[-1]["b"]
        return v, jnp.sum(eps * z[:, 1:, :], axis=-1)
    return f


def einsum_to_matmul(proto):
    """Rewrite Einsum 'abc,cd->abd' (a batched vector-matrix product) as the equivalent MatMul."""
    n = 0
    for i, node in enumerate(proto.graph.node):
        if node.op_type != "Einsum":
            continue
        eq = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
        if eq.replace(" ", "") == "abc,cd->abd":
            new = onnx.helper.make_node("MatMul", list(node.input), list(node.output), name=node.name or f"matmul_{i}")
            proto.graph.node[i].CopyFrom(new)
            n += 1
    return proto, n


def handwritten_flow_jvp(params, d, stacked=False):
    """The same function written directly as ONNX nodes (no exporter): ONNX ops broadcast
    natively, so nothing is Expand-ed, and there is no shape arithmetic at run time.

    stacked=False: per layer one Gemm for the primal (bias fused) and one MatMul for the K
    tangents ([B,K,H] x [H,H'], a single GEMM over B·K rows), SiLU' from the primal's sigmoid.
    stacked=True: per layer one MatMul over the stack [B,1+K,H] (Concat, then Slice apart)."""
    from onnx import TensorProto, helper, numpy_helper

    def f32(name, a):
        return numpy_helper.from_array(np.asarray(a, np.float32), name)

    def i64(name, a):
        return numpy_helper.from_array(np.asarray(a, np.int64), name)

    w = [np.asarray(layer["w"], np.float32) for layer in params]
    b = [np.asarray(layer["b"], np.float32) for layer in params]
    n_freqs = w[0].shape[0] - d
    freqs = np.exp(np.linspace(0.0, np.log(200.0), n_freqs // 2)).astype(np.float32)
    inits = [f32("freqs", freqs), f32("one", [1.0]), i64("ax1", [1]), i64("axlast", [-1]),
             i64("s0", [0]), i64("s1", [1]), i64("send", [2**62]),
             f32("W0x", w[0][:d]), f32("W0t", w[0][d:]), f32("b0", b[0])]
    nodes = [
        helper.make_node("Unsqueeze", ["t", "ax1"], ["tcol"]),
        helper.make_node("Mul", ["tcol", "freqs"], ["targ"]),
        helper.make_node("Sin", ["targ"], ["tsin"]),
        helper.make_node("Cos", ["targ"], ["tcos"]),
        helper.make_node("Concat", ["tsin", "tcos"], ["temb"], axis=1),
        helper.make_node("Gemm", ["temb", "W0t", "b0"], ["tbias"]),               # [B,H]
    ]
    if stacked:
        nodes += [
            helper.make_node("Unsqueeze", ["x", "ax1"], ["x3"]),
            helper.make_node("Concat", ["x3", "eps"], ["S0"], axis=1),              # [B,1+K,D]
            helper.make_node("MatMul", ["S0", "W0x"], ["Z0"]),
            helper.make_node("Slice", ["Z0", "s0", "s1", "ax1"], ["Pz0"]),
            helper.make_node("Unsqueeze", ["tbias", "ax1"], ["tbias3"]),
            helper.make_node("Add", ["Pz0", "tbias3"], ["P0"]),                      # [B,1,H]
            helper.make_node("Slice", ["Z0", "s1", "send", "ax1"], ["T0"]),         # [B,K,H]
        ]
    else:
        nodes += [
            helper.make_node("MatMul", ["x", "W0x"], ["Px0"]),
            helper.make_node("Add", ["Px0", "tbias"], ["P0"]),                      # [B,H]
            helper.make_node("MatMul", ["eps", "W0x"], ["T0"]),                     # [B,K,H]
        ]
    for i in range(1, len(w)):
        p, t = f"P{i - 1}", f"T{i - 1}"
        inits += [f32(f"W{i}", w[i]), f32(f"b{i}", b[i])]
        nodes += [
            helper.make_node("Sigmoid", [p], [f"sg{i}"]),
            helper.make_node("Mul", [p, f"sg{i}"], [f"A{i}"]),                       # SiLU(p)
            helper.make_node("Sub", ["one", f"sg{i}"], [f"om{i}"]),
            helper.make_node("Mul", [p, f"om{i}"], [f"pm{i}"]),
            helper.make_node("Add", [f"pm{i}", "one"], [f"pm1{i}"]),
            helper.make_node("Mul", [f"sg{i}", f"pm1{i}"], [f"g{i}"]),              # SiLU'(p)
        ]
        if stacked:
            nodes += [
                helper.make_node("Mul", [t, f"g{i}"], [f"Tg{i}"]),                  # [B,K,H] * [B,1,H]
                helper.make_node("Concat", [f"A{i}", f"Tg{i}"], [f"S{i}"], axis=1),
                helper.make_node("MatMul", [f"S{i}", f"W{i}"], [f"Z{i}"]),
                helper.make_node("Slice", [f"Z{i}", "s0", "s1", "ax1"], [f"Pz{i}"]),
                helper.make_node("Add", [f"Pz{i}", f"b{i}"], [f"P{i}"]),
                helper.make_node("Slice", [f"Z{i}", "s1", "send", "ax1"], [f"T{i}"]),
            ]
        else:
            nodes += [
                helper.make_node("Unsqueeze", [f"g{i}", "ax1"], [f"g3{i}"]),
                helper.make_node("Mul", [t, f"g3{i}"], [f"Tg{i}"]),
                helper.make_node("Gemm", [f"A{i}", f"W{i}", f"b{i}"], [f"P{i}"]),
                helper.make_node("MatMul", [f"Tg{i}", f"W{i}"], [f"T{i}"]),
            ]
    last = len(w) - 1
    if stacked:
        nodes.append(helper.make_node("Squeeze", [f"P{last}", "ax1"], ["v"]))
    else:
        nodes.append(helper.make_node("Identity", [f"P{last}"], ["v"]))
    nodes += [helper.make_node("Mul", [f"T{last}", "eps"], ["je"]),
              helper.make_node("ReduceSum", ["je", "axlast"], ["quad"], keepdims=0)]
    inputs = [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["B"]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", d]),
              helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["B", "K", d])]
    outputs = [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["B", d]),
               helper.make_tensor_value_info("quad", TensorProto.FLOAT, ["B", "K"])]
    graph = helper.make_graph(nodes, "postflow_flow_jvp", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="train.jvp_export")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def export_stacked(params, d):
    """The stacked flow_jvp as an ONNX ModelProto, exported like train/export.py does."""
    proto = export_mod.export(stacked_flow_jvp_fn(params), [("B",), ("B", d), ("B", "K", d)], "flow_jvp")
    proto, _ = einsum_to_matmul(proto)
    onnx.checker.check_model(proto)
    return proto


def check(params, proto, d, seed=0, tol=1e-4):
    """Relative error of the stacked graph against export.flow_jvp_fn (JAX) on random inputs."""
    rng = np.random.default_rng(seed)
    ref = export_mod.flow_jvp_fn(params)
    sess = export_mod.session(proto.SerializeToString())
    errs = {}
    for b, k in [(5, 1), (5, 3), (64, 4), (1, 1)]:
        t = rng.uniform(size=b).astype(np.float32)
        x = rng.standard_normal((b, d)).astype(np.float32)
        eps = rng.choice([-1.0, 1.0], size=(b, k, d)).astype(np.float32)
        got = sess.run(None, {"t": t, "x": x, "eps": eps})
        want = [np.asarray(w) for w in ref(jnp.asarray(t), jnp.asarray(x), jnp.asarray(eps))]
        for name, g, w in zip(("v", "quad"), got, want):
            assert g.shape == w.shape, (name, g.shape, w.shape)
            e = float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-6))
            errs[f"{name}@B{b}K{k}"] = e
            if not e <= tol:
                raise AssertionError(f"{name} (B={b}, K={k}): relative error {e:.2e} > {tol}")
    return errs


def time_floor(paths, d, batch=64, probes=(1, 4), calls=200, repeats=5, intra=1):
    """Best-of-repeats seconds per Session.run for each graph file, interleaved."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = intra, 1, 3
    sessions = {name: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for name, p in paths.items()}
    rng = np.random.default_rng(0)
    t = np.full(batch, 0.5, np.float32)
    x = rng.standard_normal((batch, d)).astype(np.float32)
    cases = []
    for name in sessions:
        ks = [0] if name == "flow" else list(probes)
        cases += [(name, k) for k in ks]
    feeds = {}
    for name, k in cases:
        feed = {"t": t, "x": x}
        if k:
            feed["eps"] = rng.choice([-1.0, 1.0], size=(batch, k, d)).astype(np.float32)
        feeds[(name, k)] = feed
        for _ in range(10):
            sessions[name].run(None, feed)
    best = {c: float("inf") for c in cases}
    for _ in range(repeats):
        for c in cases:
            s = sessions[c[0]]
            t0 = time.perf_counter()
            for _ in range(calls):
                s.run(None, feeds[c])
            best[c] = min(best[c], (time.perf_counter() - t0) / calls)
    return {f"{name}" + (f"_K{k}" if k else ""): v for (name, k), v in best.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("flow_npz")
    ap.add_argument("out")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--time", metavar="BUNDLE")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--bundle-out", metavar="DIR", help="with --time BUNDLE: copy BUNDLE to DIR with the "
                    "hand-written graph as its flow_jvp.onnx (for benches/compare.py)")
    a = ap.parse_args()
    params = flow_mod.unflatten_params(dict(np.load(a.flow_npz)))
    d = int(params[-1]["w"].shape[1])
    proto = export_stacked(params, d)
    onnx.save(proto, a.out)
    ops = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    print(f"wrote {a.out}: {len(proto.graph.node)} nodes {ops}")
    hand = {}
    for stacked in (False, True):
        hp = handwritten_flow_jvp(params, d, stacked=stacked)
        path = Path(a.out).with_suffix(".hand_stacked.onnx" if stacked else ".hand.onnx")
        onnx.save(hp, str(path))
        hand["hand_stacked" if stacked else "hand"] = (hp, path)
        print(f"wrote {path}: {len(hp.graph.node)} nodes (hand-written ONNX, stacked={stacked})")
    if a.check:
        print("parity vs export.flow_jvp_fn (relative):", {k: f"{v:.1e}" for k, v in check(params, proto, d).items()})
        for name, (hp, _) in hand.items():
            print(f"{name} parity (relative):", {k: f"{v:.1e}" for k, v in check(params, hp, d).items()})
    if a.time:
        cur = onnx.load(str(Path(a.time) / "flow_jvp.onnx"))
        cur, n_rewritten = einsum_to_matmul(cur)
        cur_path = Path(a.out).with_suffix(".einsum_as_matmul.onnx")
        onnx.save(cur, str(cur_path))
        print(f"current flow_jvp with {n_rewritten} Einsum -> MatMul: {cur_path}")
        paths = {"flow": Path(a.time) / "flow.onnx", "flow_jvp": Path(a.time) / "flow_jvp.onnx",
                 "jvp_matmul": cur_path, "stacked": Path(a.out),
                 **{name: path for name, (_, path) in hand.items()}}
        if a.bundle_out:
            import shutil
            shutil.copytree(a.time, a.bundle_out, dirs_exist_ok=True)
            shutil.copyfile(hand["hand"][1], Path(a.bundle_out) / "flow_jvp.onnx")
            print(f"wrote {a.bundle_out}: {a.time} with the hand-written flow_jvp.onnx")
        res = time_floor(paths, d, batch=a.batch)
        base = res["flow"]
        for k, v in res.items():
            print(f"  {k:14s} {v * 1e3:8.3f} ms/run   x flow.onnx {v / base:5.2f}")


if __name__ == "__main__":
    main()
