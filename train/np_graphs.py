"""Hand-written ONNX graphs `flow` and `flow_jvp` for the NP-layer field (train/np_field.py).

Same inputs and outputs as the MLP field's graphs (train/graphs.py), so the bundle format and
the runtime do not change: flow (t [B], x [B,D]) -> v [B,D]; flow_jvp adds eps [B,K,D] and
returns quad [B,K] = εₖᵀ (∂v/∂x) εₖ for all K tangents in one pass.

The per-weight features of layer l are a [B, n_{l+1}, n_l, C] tensor (the flat x is split by
layer and reshaped, no copy); tangents carry an extra K axis, [B, K, n_{l+1}, n_l, C], and every
product with a channel matrix is one MatMul over all of them. FiLM is folded into the small
per-neuron terms: Z = (E Θ)(1+γ) + [(N_{l+1} Mᵗ + g Γ + bᴱ)(1+γ) + β]_i + [(N_l Mˢ)(1+γ)]_j,
which is the module docstring's H ⊙ (1+γ) + β. Tangent of a block (γ, β depend on t only):

    dZ = (dE Θ)(1+γ) + [(dN_{l+1} Mᵗ + dg Γ)(1+γ)]_i + [(dN_l Mˢ)(1+γ)]_j
    dE ← dE + dZ · σ(Z)(1 + Z(1 − σ(Z)))          (silu′, from the primal's sigmoid)

and the decoder is linear. With pred = "x1", v = (y − x)/c(t), c(t) = max(1 − t, clip), so
quad = Σ ε·(dy − ε)/c(t). Ops: Split, Reshape, Unsqueeze, Concat, MatMul, Gemm, Add, Sub,
Mul, Div, Max, Sigmoid, Sin, Cos, ReduceMean, ReduceSum — all in the default ONNX domain."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import np_field

OPSET = 17
OPS = {"Split", "Reshape", "Unsqueeze", "Concat", "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Max",
       "Sigmoid", "Sin", "Cos", "ReduceMean", "ReduceSum"}


class _Builder:
    def __init__(self):
        self.nodes, self.inits, self._n, self._consts = [], [], 0, {}

    def const(self, name, a, dtype=np.float32):
        self.inits.append(numpy_helper.from_array(np.asarray(a, dtype), name))
        return name

    def ints(self, values):
        """A shared int64 constant (axes, shapes, split sizes)."""
        key = tuple(int(v) for v in values)
        if key not in self._consts:
            self._consts[key] = self.const(f"i64_{len(self._consts)}", list(key), np.int64)
        return self._consts[key]

    def op(self, op_type, inputs, out=None, **attrs):
        self._n += 1
        out = out or f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def ops(self, op_type, inputs, outs, **attrs):
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outs), **attrs))
        return outs

    def unsq(self, x, axes):
        return self.op("Unsqueeze", [x, self.ints(axes)])

    def mean(self, x, axes):
        return self.op("ReduceMean", [x], axes=list(axes), keepdims=0)

    def silu(self, x):
        sig = self.op("Sigmoid", [x])
        return self.op("Mul", [x, sig]), sig


def _np(a):
    return np.asarray(a, np.float32)


def build(params, jvp):
    """ModelProto of flow (jvp=False) or flow_jvp (jvp=True) for an NPField."""
    w = {k: _np(v) for k, v in params.w.items()}
    sizes = params.sizes
    n_layers = len(sizes) - 1
    c, n_freqs = params.channels, params.time_freqs
    d = sum(o * i + o for i, o in zip(sizes[:-1], sizes[1:]))
    g = _Builder()
    one = g.const("one", [1.0])

    # time: τ = silu(φ(t) T₁ + c₁) T₂ + c₂, s = silu(τ)
    freqs = np.exp(np.linspace(np.float32(0.0), np.log(np.float32(200.0)), n_freqs // 2, dtype=np.float32))
    targ = g.op("Mul", [g.unsq("t", [1]), g.const("freqs", freqs)])
    temb = g.op("Concat", [g.op("Sin", [targ]), g.op("Cos", [targ])], axis=1)
    a1 = g.op("Gemm", [temb, g.const("tau1_w", w["tau1_w"]), g.const("tau1_b", w["tau1_b"])])
    tau = g.op("Gemm", [g.silu(a1)[0], g.const("tau2_w", w["tau2_w"]), g.const("tau2_b", w["tau2_b"])], "tau")
    s = g.silu(tau)[0]
    tau4, tau3 = g.unsq(tau, [1, 2]), g.unsq(tau, [1])

    # split x (and eps) by layer: W_l [o*i], b_l [o]
    split = [n for i, o in zip(sizes[:-1], sizes[1:]) for n in (o * i, o)]
    xs = g.ops("Split", ["x", g.ints(split)], [f"x_part{p}" for p in range(len(split))], axis=1)
    es = (g.ops("Split", ["eps", g.ints(split)], [f"eps_part{p}" for p in range(len(split))], axis=2)
          if jvp else None)
    E, V, dE, dV = [], [], [], []
    for l, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        q_out, q_in = w[f"emb.{l + 1}"], w[f"emb.{l}"]
        alpha = g.const(f"alpha{l}", w[f"alpha.{l}"])
        beta = g.const(f"beta{l}", w[f"beta.{l}"])
        w4 = g.op("Reshape", [xs[2 * l], g.ints([-1, n_out, n_in, 1])])
        e = g.op("Add", [g.op("Mul", [w4, alpha]), g.const(f"qsum{l}", q_out[:, None, :] + q_in[None, :, :])])
        E.append(g.op("Add", [e, tau4], f"E0_{l}"))
        b3 = g.op("Reshape", [xs[2 * l + 1], g.ints([-1, n_out, 1])])
        v = g.op("Add", [g.op("Mul", [b3, beta]), g.const(f"qout{l}", q_out)])
        V.append(g.op("Add", [v, tau3], f"V0_{l}"))
        if jvp:
            dE.append(g.op("Mul", [g.op("Reshape", [es[2 * l], g.ints([0, 0, n_out, n_in, 1])]), alpha], f"dE0_{l}"))
            dV.append(g.op("Mul", [g.op("Reshape", [es[2 * l + 1], g.ints([0, 0, n_out, 1])]), beta], f"dV0_{l}"))

    for k in range(params.blocks):
        rows = [g.mean(e, [2]) for e in E]          # [B,o,C]
        cols = [g.mean(e, [1]) for e in E]          # [B,i,C]
        gl = g.op("Concat", [g.mean(e, [1, 2]) for e in E] + [g.mean(v, [1]) for v in V], axis=1)  # [B,2LC]
        N = []
        for m in range(n_layers + 1):
            parts = ([rows[m - 1], V[m - 1]] if m >= 1 else []) + ([cols[m]] if m <= n_layers - 1 else [])
            N.append(parts[0] if len(parts) == 1 else g.op("Concat", parts, axis=2))
        if jvp:
            d_rows = [g.mean(e, [3]) for e in dE]   # [B,K,o,C]
            d_cols = [g.mean(e, [2]) for e in dE]   # [B,K,i,C]
            dgl = g.op("Concat", [g.mean(e, [2, 3]) for e in dE] + [g.mean(v, [2]) for v in dV], axis=2)
            dN = []
            for m in range(n_layers + 1):
                parts = ([d_rows[m - 1], dV[m - 1]] if m >= 1 else []) + ([d_cols[m]] if m <= n_layers - 1 else [])
                dN.append(parts[0] if len(parts) == 1 else g.op("Concat", parts, axis=3))
        fw, fb = w[f"film_w.{k}"], w[f"film_b.{k}"]
        newE, newV, new_dE, new_dV = [], [], [], []
        for l in range(n_layers):
            p = f".{k}.{l}"
            # FiLM columns: layer l, kind q (γᴱ, βᴱ, γⱽ, βⱽ)
            film = [g.op("Gemm", [s, g.const(f"film_w{p}.{q}", fw[:, (4 * l + q) * c:(4 * l + q + 1) * c]),
                                  g.const(f"film_b{p}.{q}", fb[(4 * l + q) * c:(4 * l + q + 1) * c])])
                    for q in range(4)]
            ge1, be, gv1, bv = g.op("Add", [film[0], one]), film[1], g.op("Add", [film[2], one]), film[3]
            ge1_3 = g.unsq(ge1, [1])
            theta, mt, ms = (g.const(n + p, w[n + p]) for n in ("theta", "mt", "ms"))
            gam = g.const("gam" + p, w["gam" + p])
            # weights: Z = (E Θ)(1+γ) + row_i + col_j
            row = g.op("Add", [g.op("MatMul", [N[l + 1], mt]),
                               g.unsq(g.op("Gemm", [gl, gam, g.const("be" + p, w["be" + p])]), [1])])
            row = g.op("Add", [g.op("Mul", [row, ge1_3]), g.unsq(be, [1])])            # [B,o,C]
            col = g.op("Mul", [g.op("MatMul", [N[l], ms]), ge1_3])                     # [B,i,C]
            ge1_4 = g.unsq(ge1, [1, 2])
            z = g.op("Mul", [g.op("MatMul", [E[l], theta]), ge1_4])
            z = g.op("Add", [g.op("Add", [z, g.unsq(row, [2])]), g.unsq(col, [1])])
            act, sig = g.silu(z)
            newE.append(g.op("Add", [E[l], act], f"E{k + 1}_{l}"))
            # biases
            theta_b, mb = g.const("theta_b" + p, w["theta_b" + p]), g.const("mb" + p, w["mb" + p])
            gam_b = g.const("gam_b" + p, w["gam_b" + p])
            hv = g.op("Add", [g.op("MatMul", [V[l], theta_b]), g.op("MatMul", [N[l + 1], mb])])
            hv = g.op("Add", [hv, g.unsq(g.op("Gemm", [gl, gam_b, g.const("bv" + p, w["bv" + p])]), [1])])
            zv = g.op("Add", [g.op("Mul", [hv, g.unsq(gv1, [1])]), g.unsq(bv, [1])])
            act_v, sig_v = g.silu(zv)
            newV.append(g.op("Add", [V[l], act_v], f"V{k + 1}_{l}"))
            if not jvp:
                continue
            # silu'(z) = σ(z)(1 + z(1 − σ(z)))
            def dsilu(zz, ss):
                return g.op("Mul", [ss, g.op("Add", [g.op("Mul", [zz, g.op("Sub", [one, ss])]), one])])
            ge1_K = g.unsq(ge1, [1, 2])                                                   # [B,1,1,C]
            d_row = g.op("Add", [g.op("MatMul", [dN[l + 1], mt]), g.unsq(g.op("MatMul", [dgl, gam]), [2])])
            d_row = g.op("Mul", [d_row, ge1_K])                                          # [B,K,o,C]
            d_col = g.op("Mul", [g.op("MatMul", [dN[l], ms]), ge1_K])                    # [B,K,i,C]
            dz = g.op("Mul", [g.op("MatMul", [dE[l], theta]), g.unsq(ge1, [1, 2, 3])])   # [B,K,o,i,C]
            dz = g.op("Add", [g.op("Add", [dz, g.unsq(d_row, [3])]), g.unsq(d_col, [2])])
            new_dE.append(g.op("Add", [dE[l], g.op("Mul", [dz, g.unsq(dsilu(z, sig), [1])])], f"dE{k + 1}_{l}"))
            dhv = g.op("Add", [g.op("MatMul", [dV[l], theta_b]), g.op("MatMul", [dN[l + 1], mb])])
            dhv = g.op("Add", [dhv, g.unsq(g.op("MatMul", [dgl, gam_b]), [2])])
            dzv = g.op("Mul", [dhv, g.unsq(gv1, [1, 2])])
            new_dV.append(g.op("Add", [dV[l], g.op("Mul", [dzv, g.unsq(dsilu(zv, sig_v), [1])])], f"dV{k + 1}_{l}"))
        E, V, dE, dV = newE, newV, new_dE, new_dV

    # decoder: y(W_l) = E_l u_l + o_l, y(b_l) = V_l uᵇ_l + oᵇ_l, in the flat layout
    ys, dys = [], []
    for l, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        u, ub = g.const(f"dec_w{l}", w[f"dec_w.{l}"][:, None]), g.const(f"dec_b{l}", w[f"dec_b.{l}"][:, None])
        yw = g.op("Add", [g.op("MatMul", [E[l], u]), g.const(f"dec_o{l}", w[f"dec_o.{l}"].reshape(1))])
        yb = g.op("Add", [g.op("MatMul", [V[l], ub]), g.const(f"dec_ob{l}", w[f"dec_ob.{l}"].reshape(1))])
        ys += [g.op("Reshape", [yw, g.ints([-1, n_out * n_in])]), g.op("Reshape", [yb, g.ints([-1, n_out])])]
        if jvp:
            dys += [g.op("Reshape", [g.op("MatMul", [dE[l], u]), g.ints([0, 0, n_out * n_in])]),
                    g.op("Reshape", [g.op("MatMul", [dV[l], ub]), g.ints([0, 0, n_out])])]
    x1 = params.pred == "x1"
    y = g.op("Concat", ys, None if x1 else "v", axis=1)
    if x1:  # v = (y − x) / max(1 − t, clip)
        den = g.unsq(g.op("Max", [g.op("Sub", [one, "t"]), g.const("clip", [params.clip])]), [1])  # [B,1]
        g.op("Div", [g.op("Sub", [y, "x"]), den], "v")
    if jvp:
        dy = g.op("Concat", dys, axis=2)                                                # [B,K,D]
        last = g.ints([-1])
        if x1:  # dv = (dy − ε)/c(t), in the order JAX computes it
            dy = g.op("Div", [g.op("Sub", [dy, "eps"]), g.unsq(den, [2])])
        g.op("ReduceSum", [g.op("Mul", [dy, "eps"]), last], "quad", keepdims=0)

    inputs = [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["B"]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", d])]
    outputs = [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["B", d])]
    if jvp:
        inputs.append(helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["B", "K", d]))
        outputs.append(helper.make_tensor_value_info("quad", TensorProto.FLOAT, ["B", "K"]))
    name = "flow_jvp" if jvp else "flow"
    graph = helper.make_graph(g.nodes, f"postflow_{name}", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="train.np_graphs")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def flow_graph(params):
    """flow.onnx for an NPField: (t [B], x [B,D]) -> v [B,D]."""
    return build(params, jvp=False)


def flow_jvp_graph(params):
    """flow_jvp.onnx for an NPField: (t, x, eps [B,K,D]) -> v [B,D], quad [B,K] = εₖᵀ J εₖ."""
    return build(params, jvp=True)


assert np_field.PREDS == ("v", "x1")  # the graphs implement exactly these two heads
