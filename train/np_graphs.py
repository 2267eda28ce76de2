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
from onnx import helper, numpy_helper

from . import graphs, np_field  # graphs imports this module too: graphs.* is used at call time only

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

    def cm(name, a):  # a channel matrix, transposed: it multiplies channels-first tensors from the left
        return g.const(name, np.ascontiguousarray(a.T))

    # time: τ = silu(φ(t) T₁ + c₁) T₂ + c₂, s = silu(τ)
    freqs = np.exp(np.linspace(np.float32(0.0), np.log(np.float32(200.0)), n_freqs // 2, dtype=np.float32))
    targ = g.op("Mul", [g.unsq("t", [1]), g.const("freqs", freqs)])
    temb = g.op("Concat", [g.op("Sin", [targ]), g.op("Cos", [targ])], axis=1)
    a1 = g.op("Gemm", [temb, g.const("tau1_w", w["tau1_w"]), g.const("tau1_b", w["tau1_b"])])
    tau = g.op("Gemm", [g.silu(a1)[0], g.const("tau2_w", w["tau2_w"]), g.const("tau2_b", w["tau2_b"])], "tau")
    s = g.silu(tau)[0]
    tau3 = g.unsq(tau, [2])                                                         # [B,C,1]

    # split x (and eps) by layer: W_l [o*i], b_l [o]; features channels-first
    split = [n for i, o in zip(sizes[:-1], sizes[1:]) for n in (o * i, o)]
    xs = g.ops("Split", ["x", g.ints(split)], [f"x_part{p}" for p in range(len(split))], axis=1)
    es = (g.ops("Split", ["eps", g.ints(split)], [f"eps_part{p}" for p in range(len(split))], axis=2)
          if jvp else None)
    shape = list(zip(sizes[1:], sizes[:-1]))                                        # (o, i) per layer
    E, V, dE, dV = [], [], [], []                                                   # E [B,C,o,i], V [B,C,o]
    for l, (n_out, n_in) in enumerate(shape):
        q_out, q_in = w[f"emb.{l + 1}"], w[f"emb.{l}"]
        alpha = g.const(f"alpha{l}", w[f"alpha.{l}"][:, None])                      # [C,1]
        beta = g.const(f"beta{l}", w[f"beta.{l}"][:, None])
        qsum = (q_out[:, None, :] + q_in[None, :, :]).reshape(n_out * n_in, c).T   # [C, o*i]
        e = g.op("Add", [g.op("Mul", [g.op("Reshape", [xs[2 * l], g.ints([-1, 1, n_out * n_in])]), alpha]),
                         g.const(f"qsum{l}", qsum)])
        E.append(g.op("Reshape", [g.op("Add", [e, tau3]), g.ints([0, c, n_out, n_in])], f"E0_{l}"))
        v = g.op("Add", [g.op("Mul", [g.op("Reshape", [xs[2 * l + 1], g.ints([-1, 1, n_out])]), beta]),
                         g.const(f"qout{l}", q_out.T)])
        V.append(g.op("Add", [v, tau3], f"V0_{l}"))
        if jvp:
            de = g.op("Mul", [g.op("Reshape", [es[2 * l], g.ints([0, 0, 1, n_out * n_in])]), alpha])
            dE.append(g.op("Reshape", [de, g.ints([0, 0, c, n_out, n_in])], f"dE0_{l}"))
            dV.append(g.op("Mul", [g.op("Reshape", [es[2 * l + 1], g.ints([0, 0, 1, n_out])]), beta], f"dV0_{l}"))

    def flat3(e, l):  # [B,C,o,i] -> [B,C,o*i]
        return g.op("Reshape", [e, g.ints([0, c, shape[l][0] * shape[l][1]])])

    def flat4(e, l):  # [B,K,C,o,i] -> [B,K,C,o*i]
        return g.op("Reshape", [e, g.ints([0, 0, c, shape[l][0] * shape[l][1]])])

    def dsilu(zz, ss):  # silu'(z) = σ(z)(1 + z(1 − σ(z)))
        return g.op("Mul", [ss, g.op("Add", [g.op("Mul", [zz, g.op("Sub", [one, ss])]), one])])

    for k in range(params.blocks):
        rows = [g.mean(e, [3]) for e in E]          # [B,C,o]
        cols = [g.mean(e, [2]) for e in E]          # [B,C,i]
        # each layer's global mean from its row means (mean over i, then over o): no third big pass
        gl = g.op("Concat", [g.mean(r, [2]) for r in rows] + [g.mean(v, [2]) for v in V], axis=1)  # [B,2LC]
        N = []
        for m in range(n_layers + 1):
            parts = ([rows[m - 1], V[m - 1]] if m >= 1 else []) + ([cols[m]] if m <= n_layers - 1 else [])
            N.append(parts[0] if len(parts) == 1 else g.op("Concat", parts, axis=1))   # [B,nd,n_m]
        if jvp:
            d_rows = [g.mean(e, [4]) for e in dE]   # [B,K,C,o]
            d_cols = [g.mean(e, [3]) for e in dE]   # [B,K,C,i]
            dgl = g.op("Concat", [g.mean(r, [3]) for r in d_rows] + [g.mean(v, [3]) for v in dV], axis=2)
            dN = []
            for m in range(n_layers + 1):
                parts = ([d_rows[m - 1], dV[m - 1]] if m >= 1 else []) + ([d_cols[m]] if m <= n_layers - 1 else [])
                dN.append(parts[0] if len(parts) == 1 else g.op("Concat", parts, axis=2))
        fw, fb = w[f"film_w.{k}"], w[f"film_b.{k}"]
        newE, newV, new_dE, new_dV = [], [], [], []
        for l in range(n_layers):
            p = f".{k}.{l}"
            # FiLM columns: layer l, kind q (γᴱ, βᴱ, γⱽ, βⱽ)
            film = [g.op("Gemm", [s, g.const(f"film_w{p}.{q}", fw[:, (4 * l + q) * c:(4 * l + q + 1) * c]),
                                  g.const(f"film_b{p}.{q}", fb[(4 * l + q) * c:(4 * l + q + 1) * c])])
                    for q in range(4)]
            ge1, be, gv1, bv = g.op("Add", [film[0], one]), film[1], g.op("Add", [film[2], one]), film[3]
            ge1_c = g.unsq(ge1, [2])                                                    # [B,C,1]
            mt, ms, gam = cm("mt" + p, w["mt" + p]), cm("ms" + p, w["ms" + p]), g.const("gam" + p, w["gam" + p])
            # weights: Z = (Θᵀ ⊙ (1+γ)) E + row_i + col_j, one batched product per layer
            theta_b = g.op("Mul", [cm("theta" + p, w["theta" + p]), ge1_c])           # [B,C,C]
            row = g.op("Add", [g.op("MatMul", [mt, N[l + 1]]),
                               g.unsq(g.op("Gemm", [gl, gam, g.const("be" + p, w["be" + p])]), [2])])
            row = g.op("Add", [g.op("Mul", [row, ge1_c]), g.unsq(be, [2])])            # [B,C,o]
            col = g.op("Mul", [g.op("MatMul", [ms, N[l]]), ge1_c])                     # [B,C,i]
            z = g.op("Reshape", [g.op("MatMul", [theta_b, flat3(E[l], l)]), g.ints([0, c, *shape[l]])])
            z = g.op("Add", [g.op("Add", [z, g.unsq(row, [3])]), g.unsq(col, [2])])
            act, sig = g.silu(z)
            newE.append(g.op("Add", [E[l], act], f"E{k + 1}_{l}"))
            # biases
            thb, mb = cm("theta_b" + p, w["theta_b" + p]), cm("mb" + p, w["mb" + p])
            gam_b = g.const("gam_b" + p, w["gam_b" + p])
            hv = g.op("Add", [g.op("MatMul", [thb, V[l]]), g.op("MatMul", [mb, N[l + 1]])])
            hv = g.op("Add", [hv, g.unsq(g.op("Gemm", [gl, gam_b, g.const("bv" + p, w["bv" + p])]), [2])])
            zv = g.op("Add", [g.op("Mul", [hv, g.unsq(gv1, [2])]), g.unsq(bv, [2])])
            act_v, sig_v = g.silu(zv)
            newV.append(g.op("Add", [V[l], act_v], f"V{k + 1}_{l}"))
            if not jvp:
                continue
            ge1_k = g.unsq(ge1, [1, 3])                                                 # [B,1,C,1]
            d_row = g.op("Add", [g.op("MatMul", [mt, dN[l + 1]]), g.unsq(g.op("MatMul", [dgl, gam]), [3])])
            d_row = g.op("Mul", [d_row, ge1_k])                                        # [B,K,C,o]
            d_col = g.op("Mul", [g.op("MatMul", [ms, dN[l]]), ge1_k])                  # [B,K,C,i]
            dz = g.op("MatMul", [g.unsq(theta_b, [1]), flat4(dE[l], l)])               # [B,K,C,o*i]
            dz = g.op("Reshape", [dz, g.ints([0, 0, c, *shape[l]])])
            dz = g.op("Add", [g.op("Add", [dz, g.unsq(d_row, [4])]), g.unsq(d_col, [3])])
            new_dE.append(g.op("Add", [dE[l], g.op("Mul", [dz, g.unsq(dsilu(z, sig), [1])])], f"dE{k + 1}_{l}"))
            dhv = g.op("Add", [g.op("MatMul", [thb, dV[l]]), g.op("MatMul", [mb, dN[l + 1]])])
            dhv = g.op("Add", [dhv, g.unsq(g.op("MatMul", [dgl, gam_b]), [3])])
            dzv = g.op("Mul", [dhv, g.unsq(gv1, [1, 3])])
            new_dV.append(g.op("Add", [dV[l], g.op("Mul", [dzv, g.unsq(dsilu(zv, sig_v), [1])])], f"dV{k + 1}_{l}"))
        E, V, dE, dV = newE, newV, new_dE, new_dV

    # decoder: y(W_l) = E_l u_l + o_l, y(b_l) = V_l uᵇ_l + oᵇ_l, in the flat layout
    ys, dys = [], []
    for l, (n_out, n_in) in enumerate(shape):
        u, ub = g.const(f"dec_w{l}", w[f"dec_w.{l}"][None, :]), g.const(f"dec_b{l}", w[f"dec_b.{l}"][None, :])
        yw = g.op("Add", [g.op("MatMul", [u, flat3(E[l], l)]), g.const(f"dec_o{l}", w[f"dec_o.{l}"].reshape(1))])
        yb = g.op("Add", [g.op("MatMul", [ub, V[l]]), g.const(f"dec_ob{l}", w[f"dec_ob.{l}"].reshape(1))])
        ys += [g.op("Reshape", [yw, g.ints([-1, n_out * n_in])]), g.op("Reshape", [yb, g.ints([-1, n_out])])]
        if jvp:
            dys += [g.op("Reshape", [g.op("MatMul", [u, flat4(dE[l], l)]), g.ints([0, 0, n_out * n_in])]),
                    g.op("Reshape", [g.op("MatMul", [ub, dV[l]]), g.ints([0, 0, n_out])])]
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

    name = "flow_jvp" if jvp else "flow"
    return graphs.flow_model(g.nodes, g.inits, name, d, jvp, producer="train.np_graphs")


def flow_graph(params):
    """flow.onnx for an NPField: (t [B], x [B,D]) -> v [B,D]."""
    return build(params, jvp=False)


def flow_jvp_graph(params):
    """flow_jvp.onnx for an NPField: (t, x, eps [B,K,D]) -> v [B,D], quad [B,K] = εₖᵀ J εₖ."""
    return build(params, jvp=True)


assert np_field.PREDS == ("v", "x1")  # the graphs implement exactly these two heads
