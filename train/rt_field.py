"""Relational-transformer velocity field over the flat weights of a ReLU MLP (issue 11).

After the relational transformer of "Geometric Flow Models over Neural Network Weights" (the
seed's code): the network's neurons are the tokens, its weights are edge features that enter the
attention and are updated from their endpoint neurons, and every weight and bias is decoded from
its own edge or neuron feature. Differences from that code (written for this pipeline, not
ported): the edge state is sparse (only the D − Σ n_m real edges, stored per layer as
[n_{l+1}, n_l] blocks, never an N × N tensor), each edge modulates the attention in both
directions (an out-neuron attending to its in-neuron and back), normalization is pre-LN with
time FiLM in place of LayerNorm's affine, and every neuron has a learned embedding (the draws are
aligned, so neurons are not exchangeable; with the embedding table permuted along with the
neurons the field is permutation equivariant, which a test checks).

Layout of x [B, D] as train/mlp.py (per layer W_l [n_{l+1}, n_l] row-major, then b_l [n_{l+1}]).
Neuron layers m = 0..L with n_m neurons at token offsets o_m (N = Σ n_m tokens); for weight
layer l, i indexes its out-neurons (layer l+1, tokens I_l) and j its in-neurons (layer l,
tokens J_l). LN(z) = (z − mean(z)) / sqrt(var(z) + 1e-5) over the C channels (no affine);
silu(z) = z·σ(z); products with a matrix act on the channel axis; h heads of width d = C/h.

Time (sinusoidal φ(t) ∈ R^F as the MLP and NP fields):

    τ = silu(φ(t) T₁ + c₁) T₂ + c₂ ∈ R^C,    s = silu(τ)

Inputs, with a learned embedding Q_m[n] ∈ R^C per neuron:

    H[o_m + n] = Q_m[n] + τ                         (m = 0, input neurons: no bias)
    H[o_m + n] = x(b_{m−1})[n]·β_{m−1} + Q_m[n] + τ   (m ≥ 1)
    E_l[i,j]   = x(W_l)[i,j]·α_l + Q_{l+1}[i] + Q_l[j] + τ

K blocks k = 1..K, each with FiLM [γᵃ, βᵃ, γᵉ, βᵉ, γᵐ, βᵐ, γᵘ, βᵘ] = s F_k + f_k (F_k = 0 at
init) and F(z; γ, β) = LN(z) ⊙ (1 + γ) + β:

  1. Edge-modulated attention over all N neurons.
         [q, k, v] = F(H; γᵃ, βᵃ) Wqkv,   [eq, ek, ev]_l = F(E_l; γᵉ, βᵉ) Wₑ    (per head)
     A pair (p, r) of tokens joined by an edge (p = I_l[i], r = J_l[j] "incoming", or
     p = J_l[j], r = I_l[i] "outgoing") uses that edge's features, any other pair none:
         S_pr = (q_p + eq_pr) · (k_r + ek_pr) / √d      (eq, ek, ev = 0 off the edges)
         a_p· = softmax_r S_pr,    o_p = Σ_r a_pr (v_r + ev_pr)
         H ← H + o Wₒ
  2. Neuron MLP:  H ← H + silu(F(H; γᵐ, βᵐ) M₁ + m₁) M₂ + m₂
  3. Edge update from the endpoint neurons:
         E_l[i,j] ← E_l[i,j] + silu(F(E_l[i,j]; γᵘ, βᵘ) U₁ + H[I_l[i]] Uᵗ + H[J_l[j]] Uˢ + u₁) U₂ + u₂

Decoders (u_l, uᵇ_l, o_l, oᵇ_l zero at init), one output per coordinate:

    y(W_l)[i,j] = LN(E_l[i,j]) u_l + o_l,    y(b_l)[i] = LN(H[I_l[i]]) uᵇ_l + oᵇ_l

Prediction as the NP field: `pred = "x1"` reads y as x̂₁, v = (y − x) / max(1 − t, clip) (at
init v = −x / max(1 − t, clip), Jacobian −I/max(1 − t, clip): rank D); `pred = "v"` takes v = y.

Parameters: C·N (embeddings) + K·(3C² + 3C² + C² + 4C² + 4C² + 8C² + O(C)) + F·C + C² (time):
~23 K C² + C N, never D². Cost per sample and evaluation ≈ K·5C²·(D − Σ n_m) multiply-adds on
the edges (projections and edge MLP) + K·(N² C + 7 N C²) on the tokens. Scored in JAX only
(train/diagnostics/field_trial.py); no ONNX export."""

import jax
import jax.numpy as jnp
import numpy as np

from . import mlp
from .np_field import (WeightField, check_pred, flatten_shared, from_prediction, init_shared, silu, time_embedding,
                       unflatten_shared)

FILM = 8  # (γ, β) for the attention LN, the edge LN, the neuron-MLP LN and the edge-update LN


def layer_norm(z, eps=1e-5):
    mu = z.mean(axis=-1, keepdims=True)
    var = ((z - mu) ** 2).mean(axis=-1, keepdims=True)
    return (z - mu) / jnp.sqrt(var + eps)


def offsets(sizes):
    return np.concatenate([[0], np.cumsum(sizes)]).astype(int)


@jax.tree_util.register_pytree_node_class
class RTField(WeightField):
    """Trainable arrays `w` (flat dict) plus static layout: sizes, heads, prediction mode, clip."""

    def __init__(self, w, sizes, heads=4, pred="x1", clip=0.05):
        check_pred(pred)
        self.w, self.sizes, self.heads = w, tuple(int(s) for s in sizes), int(heads)
        self.pred, self.clip = pred, float(clip)

    def tree_flatten(self):
        return (self.w,), (self.sizes, self.heads, self.pred, self.clip)


def init(key, sizes, channels=32, blocks=3, heads=4, time_freqs=16, pred="x1", clip=0.05):
    c, n_layers = channels, len(sizes) - 1
    if c % heads:
        raise ValueError(f"flow.rt_channels = {c} is not a multiple of flow.rt_heads = {heads}")
    keys = iter(jax.random.split(key, 8 + len(sizes) + 2 * n_layers + 12 * blocks))

    def normal(shape, fan_in):
        return jax.random.normal(next(keys), shape) / np.sqrt(fan_in)

    w = init_shared(keys, sizes, c, time_freqs)
    for k in range(blocks):
        p = f".{k}"
        w["film_w" + p] = jnp.zeros((c, FILM * c))
        w["film_b" + p] = jnp.zeros(FILM * c)
        w["qkv" + p] = normal((c, 3 * c), c)
        w["edge_qkv" + p] = normal((c, 3 * c), c)
        w["attn_out" + p] = normal((c, c), c)
        w["mlp1" + p] = normal((c, 2 * c), c)
        w["mlp1_b" + p] = jnp.zeros(2 * c)
        w["mlp2" + p] = normal((2 * c, c), 2 * c)
        w["mlp2_b" + p] = jnp.zeros(c)
        w["eu1" + p] = normal((c, c), 3 * c)
        w["eu_t" + p] = normal((c, c), 3 * c)
        w["eu_s" + p] = normal((c, c), 3 * c)
        w["eu1_b" + p] = jnp.zeros(c)
        w["eu2" + p] = normal((c, c), c)
        w["eu2_b" + p] = jnp.zeros(c)
    return RTField(w, sizes, heads, pred, clip)


def _modulate(z, gamma, beta):
    """F(z; γ, β) with γ, β [B, C] broadcast over z's middle axes."""
    shape = (z.shape[0],) + (1,) * (z.ndim - 2) + (z.shape[-1],)
    return layer_norm(z) * (1.0 + gamma.reshape(shape)) + beta.reshape(shape)


def output(params, t, x):
    """The decoder's y [B, D] (x̂₁ for pred = "x1", v for pred = "v")."""
    w, sizes, nh = params.w, params.sizes, params.heads
    n_layers, c = len(sizes) - 1, params.channels
    dh = c // nh
    off = offsets(sizes)
    b = x.shape[0]
    tau = silu(time_embedding(t, params.time_freqs) @ w["tau1_w"] + w["tau1_b"]) @ w["tau2_w"] + w["tau2_b"]
    s = silu(tau)
    layers = mlp.unflatten(x, sizes)  # [(W_l [B, out, in], b_l [B, out])]
    H = [jnp.broadcast_to(w["emb.0"][None] + tau[:, None, :], (b, sizes[0], c))]
    E = []
    for l, (wl, bl) in enumerate(layers):
        q_out, q_in = w[f"emb.{l + 1}"], w[f"emb.{l}"]
        H.append(bl[..., None] * w[f"beta.{l}"] + q_out + tau[:, None, :])
        E.append(wl[..., None] * w[f"alpha.{l}"] + (q_out[:, None, :] + q_in[None, :, :]) + tau[:, None, None, :])
    H = jnp.concatenate(H, axis=1)  # [B, N, C]
    n_tok = H.shape[1]
    scale = 1.0 / np.sqrt(dh)
    for k in range(params.blocks):
        p = f".{k}"
        f = (s @ w["film_w" + p] + w["film_b" + p]).reshape(b, FILM, c)
        ga, ba, ge, be, gm, bm, gu, bu = (f[:, i] for i in range(FILM))
        # 1. edge-modulated attention
        qkv = (_modulate(H, ga, ba) @ w["qkv" + p]).reshape(b, n_tok, 3, nh, dh)
        q, kk, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, h, d]
        logits = jnp.einsum("bphd,brhd->bhpr", q, kk)
        eqkv = []
        for l in range(n_layers):
            I, J = slice(off[l + 1], off[l + 2]), slice(off[l], off[l + 1])
            e = (_modulate(E[l], ge, be) @ w["edge_qkv" + p]).reshape(b, sizes[l + 1], sizes[l], 3, nh, dh)
            eq, ek, ev = e[..., 0, :, :], e[..., 1, :, :], e[..., 2, :, :]  # [B, out i, in j, h, d]
            eqkv.append(ev)
            both = jnp.einsum("bijhd,bijhd->bhij", eq, ek)
            incoming = (jnp.einsum("bihd,bijhd->bhij", q[:, I], ek)
                        + jnp.einsum("bijhd,bjhd->bhij", eq, kk[:, J]) + both)  # query i, key j
            outgoing = (jnp.einsum("bjhd,bijhd->bhji", q[:, J], ek)
                        + jnp.einsum("bijhd,bihd->bhji", eq, kk[:, I]) + both.swapaxes(-1, -2))  # query j, key i
            logits = logits.at[:, :, I, J].add(incoming).at[:, :, J, I].add(outgoing)
        a = jax.nn.softmax(logits * scale, axis=-1)  # [B, h, N, N]
        o = jnp.einsum("bhpr,brhd->bphd", a, v)
        for l in range(n_layers):
            I, J = slice(off[l + 1], off[l + 2]), slice(off[l], off[l + 1])
            o = o.at[:, I].add(jnp.einsum("bhij,bijhd->bihd", a[:, :, I, J], eqkv[l]))
            o = o.at[:, J].add(jnp.einsum("bhji,bijhd->bjhd", a[:, :, J, I], eqkv[l]))
        H = H + o.reshape(b, n_tok, c) @ w["attn_out" + p]
        # 2. neuron MLP
        H = H + silu(_modulate(H, gm, bm) @ w["mlp1" + p] + w["mlp1_b" + p]) @ w["mlp2" + p] + w["mlp2_b" + p]
        # 3. edge update from the endpoint neurons
        ht, hs = H @ w["eu_t" + p], H @ w["eu_s" + p]
        newE = []
        for l in range(n_layers):
            I, J = slice(off[l + 1], off[l + 2]), slice(off[l], off[l + 1])
            z = (_modulate(E[l], gu, bu) @ w["eu1" + p] + ht[:, I, None, :] + hs[:, None, J, :] + w["eu1_b" + p])
            newE.append(E[l] + silu(z) @ w["eu2" + p] + w["eu2_b" + p])
        E = newE
    Hn = layer_norm(H)
    outs = []
    for l in range(n_layers):
        I = slice(off[l + 1], off[l + 2])
        outs.append((layer_norm(E[l]) @ w[f"dec_w.{l}"] + w[f"dec_o.{l}"],
                     Hn[:, I] @ w[f"dec_b.{l}"] + w[f"dec_ob.{l}"]))
    return mlp.flatten(outs)


def velocity(params, t, x):
    """v(t, x): t [B], x [B, D] (whitened) -> [B, D]."""
    return from_prediction(output(params, t, x), t, x, params.pred, params.clip)


def flatten_params(params):
    """RTField -> flat dict of numpy arrays for the stage cache (keys `rt.*`)."""
    flat = flatten_shared(params, "rt")
    flat["rt.heads"] = np.asarray(params.heads, np.int64)
    return flat


def is_flat(flat):
    return "rt.sizes" in flat


def unflatten_params(flat):
    w, sizes, pred, clip = unflatten_shared(flat, "rt")
    return RTField(w, sizes, int(flat["rt.heads"]), pred, clip)
