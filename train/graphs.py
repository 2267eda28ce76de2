"""The flow's two bundle graphs written directly as ONNX nodes from the trained parameters.

jax2onnx turns `flow.velocity` into a graph that concatenates [x, sin/cos(t)] before the
first product, and `jax.linearize` + `vmap` into 150 nodes whose tangent products are 3-D
`Einsum`s and whose broadcasts are materialised with `Expand` (ONNX Runtime spent ~3x the
time of flow.onnx on it at K = 1; docs/performance.md). Written by hand, with ONNX's native
broadcasting, each layer is one `Gemm` for the primal (bias fused) and, in flow_jvp, one
`MatMul` for all K tangents; the SiLU derivative reuses the primal's sigmoid:

    first layer   p₀ = x W₀ₓ + (temb(t) W₀ₜ + b₀)       tangent  dz₀ = ε W₀ₓ (time has none)
    hidden        s = σ(p), h = p·s                     tangent  dh = dz · s·(1 + p·(1 − s))
    output        v = p_L                               quad_k = Σ_d ε_k · dz_L,k

Both compute exactly what `export.flow_fn` / `export.flow_jvp_fn` do, with the bundle's
input and output names; `train/export.py` checks each against JAX before writing it. For the
NP-layer field (`flow.field = "np"`) both functions hand over to train/np_graphs.py."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import np_field, np_graphs

OPSET = 17


def _f32(name, a):
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _i64(name, a):
    return numpy_helper.from_array(np.asarray(a, np.int64), name)


def _layers(params):
    return ([np.asarray(layer["w"], np.float32) for layer in params],
            [np.asarray(layer["b"], np.float32) for layer in params])


def _first_layer(w, b, d):
    """Nodes and initializers from (t, x) to the first pre-activation P0 [B,H]."""
    n_freqs = w[0].shape[0] - d
    # the same frequencies as flow.time_embedding, computed in f32 like JAX does
    freqs = np.exp(np.linspace(np.float32(0.0), np.log(np.float32(200.0)), n_freqs // 2, dtype=np.float32))
    inits = [_f32("freqs", freqs), _i64("ax1", [1]), _f32("W0x", w[0][:d]), _f32("W0t", w[0][d:]), _f32("b0", b[0])]
    nodes = [
        helper.make_node("Unsqueeze", ["t", "ax1"], ["tcol"]),
        helper.make_node("Mul", ["tcol", "freqs"], ["targ"]),
        helper.make_node("Sin", ["targ"], ["tsin"]),
        helper.make_node("Cos", ["targ"], ["tcos"]),
        helper.make_node("Concat", ["tsin", "tcos"], ["temb"], axis=1),
        helper.make_node("Gemm", ["temb", "W0t", "b0"], ["tbias"]),      # [B,H]: small
        helper.make_node("MatMul", ["x", "W0x"], ["Px0"]),
        helper.make_node("Add", ["Px0", "tbias"], ["P0"]),
    ]
    return nodes, inits


def store_f16(nodes, inits, min_size=64):
    """Initializers (of at least `min_size` values) whose f32 values are all exactly float16
    values, as the flow stage leaves the field's parameters (flow.round_weights), are stored as
    f16 and cast back by a Cast node; ONNX Runtime folds the Cast at load, so the graph computes
    with the same f32 values at the same speed from half the bytes. Lossless by construction."""
    kept, casts = [], []
    for init in inits:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32 and a.size >= min_size and np.array_equal(a.astype(np.float16).astype(np.float32), a):
            kept.append(numpy_helper.from_array(a.astype(np.float16), f"{init.name}_f16"))
            casts.append(helper.make_node("Cast", [f"{init.name}_f16"], [init.name], to=TensorProto.FLOAT))
        else:
            kept.append(init)
    return casts + list(nodes), kept


def stored_as_f32(model):
    """The inverse of `store_f16`: a copy of `model` with its f16 weights stored as f32 under
    their own names and their Casts removed (the same values; what the f16 storage saves against)."""
    halves = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16}
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    del wide.graph.initializer[:], wide.graph.node[:]
    wide.graph.initializer.extend(
        numpy_helper.from_array(numpy_helper.to_array(i).astype(np.float32), i.name[:-len("_f16")])
        if i.name in halves else i for i in model.graph.initializer)
    wide.graph.node.extend(n for n in model.graph.node if not (n.op_type == "Cast" and n.input[0] in halves))
    return wide


def flow_model(nodes, inits, name, d, jvp, producer="train.graphs"):
    """A flow graph's model: the bundle format's inputs/outputs (t, x[, eps]) -> v[, quad], checked.
    Weights that are exact f16 values are stored as f16 (`store_f16`)."""
    nodes, inits = store_f16(nodes, inits)
    inputs = [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["B"]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", d])]
    outputs = [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["B", d])]
    if jvp:
        inputs.append(helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["B", "K", d]))
        outputs.append(helper.make_tensor_value_info("quad", TensorProto.FLOAT, ["B", "K"]))
    graph = helper.make_graph(nodes, f"postflow_{name}", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=producer)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def flow_graph(params, d):
    """flow.onnx: (t [B], x [B,D]) -> v [B,D]."""
    if isinstance(params, np_field.NPField):
        return np_graphs.flow_graph(params)
    w, b = _layers(params)
    nodes, inits = _first_layer(w, b, d)
    last = len(w) - 1
    for i in range(1, len(w)):
        inits += [_f32(f"W{i}", w[i]), _f32(f"b{i}", b[i])]
        nodes += [
            helper.make_node("Sigmoid", [f"P{i - 1}"], [f"sg{i}"]),
            helper.make_node("Mul", [f"P{i - 1}", f"sg{i}"], [f"A{i}"]),           # SiLU (ORT fuses it)
            # the last product writes the output itself: an Identity would cost a [B,D] copy
            helper.make_node("Gemm", [f"A{i}", f"W{i}", f"b{i}"], ["v" if i == last else f"P{i}"]),
        ]
    return flow_model(nodes, inits, "flow", d, jvp=False)


def flow_jvp_graph(params, d):
    """flow_jvp.onnx: (t [B], x [B,D], eps [B,K,D]) -> v [B,D], quad [B,K] = εₖᵀ J ε_k."""
    if isinstance(params, np_field.NPField):
        return np_graphs.flow_jvp_graph(params)
    w, b = _layers(params)
    last = len(w) - 1
    nodes, inits = _first_layer(w, b, d)
    inits += [_f32("one", [1.0]), _i64("axlast", [-1])]
    nodes.append(helper.make_node("MatMul", ["eps", "W0x"], ["T0"]))            # [B,K,H]
    for i in range(1, len(w)):
        p, t = f"P{i - 1}", f"T{i - 1}"
        inits += [_f32(f"W{i}", w[i]), _f32(f"b{i}", b[i])]
        nodes += [
            helper.make_node("Sigmoid", [p], [f"sg{i}"]),
            helper.make_node("Mul", [p, f"sg{i}"], [f"A{i}"]),                    # SiLU(p)
            helper.make_node("Sub", ["one", f"sg{i}"], [f"om{i}"]),
            helper.make_node("Mul", [p, f"om{i}"], [f"pm{i}"]),
            helper.make_node("Add", [f"pm{i}", "one"], [f"pm1{i}"]),
            helper.make_node("Mul", [f"sg{i}", f"pm1{i}"], [f"g{i}"]),           # SiLU'(p)
            helper.make_node("Unsqueeze", [f"g{i}", "ax1"], [f"g3{i}"]),
            helper.make_node("Mul", [t, f"g3{i}"], [f"Tg{i}"]),                   # [B,K,H] * [B,1,H]
            helper.make_node("Gemm", [f"A{i}", f"W{i}", f"b{i}"], ["v" if i == last else f"P{i}"]),
            helper.make_node("MatMul", [f"Tg{i}", f"W{i}"], [f"T{i}"]),
        ]
    nodes += [helper.make_node("Mul", [f"T{last}", "eps"], ["je"]),
              helper.make_node("ReduceSum", ["je", "axlast"], ["quad"], keepdims=0)]
    return flow_model(nodes, inits, "flow_jvp", d, jvp=True)
