"""NP-layer (neural-functional) velocity field over the flat weights of a ReLU MLP.

The field reads the whitened weight vector x [B, D] in the network's own layout (train/mlp.py:
per layer W_l [n_{l+1}, n_l] row-major, then b_l [n_{l+1}]; the manifest's `network.layers`)
and keeps one feature vector of C channels per weight and per bias, so every coordinate has
its own output and the parameter count grows with C², K, L² and the number of neurons, never
with D² (the dense MLP field's last layer confines v to an h-dimensional subspace; issue 11).

Notation: layers l = 0..L-1, neuron layers m = 0..L with n_m neurons (inputs, hidden, outputs);
i indexes the out-neurons of layer l (neuron layer l+1), j its in-neurons (neuron layer l);
silu(z) = z·σ(z); all products with a matrix act on the channel axis.

Time (sinusoidal features φ(t) ∈ R^F at geometric frequencies 1..200, as the MLP field):

    τ = silu(φ(t) T₁ + c₁) T₂ + c₂ ∈ R^C,    s = silu(τ)

Input features, with a learned embedding Q_m[n] ∈ R^C for every neuron (inputs, hidden,
outputs: the samples are aligned, so neurons are not exchangeable):

    E_l[i,j] = x(W_l)[i,j]·α_l + Q_{l+1}[i] + Q_l[j] + τ        (per weight)
    V_l[i]   = x(b_l)[i]·β_l   + Q_{l+1}[i] + τ                 (per bias = per neuron of layer l+1)

K residual blocks k = 1..K. Summaries of the current features:

    r_l[i] = mean_j E_l[i,j]    (incoming edges of neuron i of layer l+1)
    c_l[j] = mean_i E_l[i,j]    (outgoing edges of neuron j of layer l)
    g      = [mean_ij E_0, …, mean_ij E_{L-1}, mean_i V_0, …, mean_i V_{L-1}] ∈ R^{2LC}
    N_m    = concat(r_{m-1}, V_{m-1} if m ≥ 1;  c_m if m ≤ L-1)       (per neuron of layer m)

FiLM from time, per block, layer and kind: [γᴱ_l, βᴱ_l, γⱽ_l, βⱽ_l] = s F_k + f_k (F_k = 0 at init).
Per layer l:

    Hᴱ_l[i,j] = E_l[i,j] Θ_l + N_{l+1}[i] Mᵗ_l + N_l[j] Mˢ_l + g Γ_l + bᴱ_l
    Hⱽ_l[i]   = V_l[i] Θᵇ_l + N_{l+1}[i] Mᵇ_l + g Γᵇ_l + bⱽ_l
    E_l ← E_l + silu(Hᴱ_l ⊙ (1 + γᴱ_l) + βᴱ_l)
    V_l ← V_l + silu(Hⱽ_l ⊙ (1 + γⱽ_l) + βⱽ_l)

Decoder (u_l, uᵇ_l, o_l, oᵇ_l zero at init), one output per coordinate:

    y(W_l)[i,j] = E_l[i,j] u_l + o_l,    y(b_l)[i] = V_l[i] uᵇ_l + oᵇ_l

Prediction: `pred = "v"` takes v = y; `pred = "x1"` reads y as the predicted end point x̂₁ and
returns v = (y − x) / max(1 − t, clip) (the straight path's velocity toward x̂₁). At
initialization v = 0 (v-pred) or v = −x / max(1 − t, clip) (x1-pred, Jacobian −I/(1−t)).

Parameters: Σ_m n_m C (embeddings) + K·L·(2C² + 2·2LC·C + (ndim_l + 2 ndim_{l+1}) C + 2C)
+ K·C·4LC (FiLM) + F C + C² (time) + 2L(C + 1) (decoders), ndim_m ≤ 3C.
Cost per sample and evaluation ≈ K·(C² + O(C))·D multiply-adds (the per-weight channel mix
dominates); the hand-written ONNX graphs are in train/np_graphs.py."""

import jax
import jax.numpy as jnp
import numpy as np

from . import mlp

PREDS = ("v", "x1")


def time_embedding(t, n_freqs):
    """t [B] -> [B, n_freqs]: the MLP field's features (train/flow.py), sin then cos."""
    freqs = jnp.exp(jnp.linspace(0.0, jnp.log(200.0), n_freqs // 2))
    arg = t[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


def silu(z):
    return z * jax.nn.sigmoid(z)


def neuron_dims(sizes, c):
    """Channels of N_m for each neuron layer m = 0..L."""
    n_layers = len(sizes) - 1
    return [(2 * c if m >= 1 else 0) + (c if m <= n_layers - 1 else 0) for m in range(n_layers + 1)]


class WeightField:
    """What the weight-space fields (NP here, the relational transformer in rt_field.py) share:
    trainable arrays `w` (a flat dict name -> array) as the only pytree child, static layout in
    the aux data, and sizes read off `w`."""

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    @property
    def channels(self):
        return int(self.w["tau2_w"].shape[0])

    @property
    def blocks(self):
        return sum(1 for k in self.w if k.startswith("film_w."))

    @property
    def time_freqs(self):
        return int(self.w["tau1_w"].shape[0])

    def n_params(self):
        return int(sum(np.size(v) for v in self.w.values()))


def check_pred(pred):
    if pred not in PREDS:
        raise ValueError(f"unknown flow.pred {pred!r} (expected one of {PREDS})")


@jax.tree_util.register_pytree_node_class
class NPField(WeightField):
    """Trainable arrays (`w`, a flat dict name -> array) plus the static layout: the MLP's
    sizes, the prediction mode and its clip. A pytree, so optax/EMA/jit see only `w`."""

    def __init__(self, w, sizes, pred="x1", clip=0.05):
        check_pred(pred)
        self.w, self.sizes, self.pred, self.clip = w, tuple(int(s) for s in sizes), pred, float(clip)

    def tree_flatten(self):
        return (self.w,), (self.sizes, self.pred, self.clip)


def init_shared(keys, sizes, c, time_freqs):
    """What the NP and relational-transformer fields share: neuron embeddings, per-layer weight
    encoder (alpha, beta) and zero-initialized decoder, and the time MLP; draws from `keys`."""
    n_layers = len(sizes) - 1
    w = {f"emb.{m}": jax.random.normal(next(keys), (n, c)) * 0.5 for m, n in enumerate(sizes)}
    for l in range(n_layers):
        w[f"alpha.{l}"] = jax.random.normal(next(keys), (c,))
        w[f"beta.{l}"] = jax.random.normal(next(keys), (c,))
        w[f"dec_w.{l}"] = jnp.zeros((c,))
        w[f"dec_b.{l}"] = jnp.zeros((c,))
        w[f"dec_o.{l}"] = jnp.zeros(())
        w[f"dec_ob.{l}"] = jnp.zeros(())
    w["tau1_w"] = jax.random.normal(next(keys), (time_freqs, c)) / np.sqrt(time_freqs)
    w["tau1_b"] = jnp.zeros(c)
    w["tau2_w"] = jax.random.normal(next(keys), (c, c)) / np.sqrt(c)
    w["tau2_b"] = jnp.zeros(c)
    return w


def init(key, sizes, channels=24, blocks=3, time_freqs=16, pred="x1", clip=0.05):
    n_layers = len(sizes) - 1
    c = channels
    nd = neuron_dims(sizes, c)
    keys = iter(jax.random.split(key, 8 + len(sizes) + 8 * blocks * n_layers))

    def normal(shape, fan_in, gain=1.0):
        return jax.random.normal(next(keys), shape) * (gain / np.sqrt(fan_in))

    w = init_shared(keys, sizes, c, time_freqs)
    g = 2 * n_layers * c
    for k in range(blocks):
        w[f"film_w.{k}"] = jnp.zeros((c, 4 * n_layers * c))
        w[f"film_b.{k}"] = jnp.zeros(4 * n_layers * c)
        for l in range(n_layers):
            p = f".{k}.{l}"
            w["theta" + p] = normal((c, c), c)
            w["ms" + p] = normal((nd[l], c), nd[l])
            w["mt" + p] = normal((nd[l + 1], c), nd[l + 1])
            w["gam" + p] = normal((g, c), g)
            w["be" + p] = jnp.zeros(c)
            w["theta_b" + p] = normal((c, c), c)
            w["mb" + p] = normal((nd[l + 1], c), nd[l + 1])
            w["gam_b" + p] = normal((g, c), g)
            w["bv" + p] = jnp.zeros(c)
    return NPField(w, sizes, pred, clip)


def film(w, s, k, n_layers):
    """s [B,C] -> per layer (γᴱ, βᴱ, γⱽ, βⱽ), each [B,C]; column order of F_k: layer, kind, γ/β."""
    c = s.shape[-1]
    f = (s @ w[f"film_w.{k}"] + w[f"film_b.{k}"]).reshape(-1, n_layers, 4, c)
    return [tuple(f[:, l, q] for q in range(4)) for l in range(n_layers)]


def output(params, t, x):
    """The decoder's y [B, D] (v for pred = "v", x̂₁ for pred = "x1")."""
    w, sizes = params.w, params.sizes
    n_layers = len(sizes) - 1
    tau = silu(time_embedding(t, params.time_freqs) @ w["tau1_w"] + w["tau1_b"]) @ w["tau2_w"] + w["tau2_b"]
    s = silu(tau)
    E, V = [], []
    for l, (wl, bl) in enumerate(mlp.unflatten(x, sizes)):  # wl [B, out, in], bl [B, out]
        q_out, q_in = w[f"emb.{l + 1}"], w[f"emb.{l}"]
        E.append(wl[..., None] * w[f"alpha.{l}"] + (q_out[:, None, :] + q_in[None, :, :]) + tau[:, None, None, :])
        V.append(bl[..., None] * w[f"beta.{l}"] + q_out + tau[:, None, :])
    for k in range(params.blocks):
        rows = [e.mean(axis=2) for e in E]  # [B, n_{l+1}, C]
        cols = [e.mean(axis=1) for e in E]  # [B, n_l, C]
        g = jnp.concatenate([e.mean(axis=(1, 2)) for e in E] + [v.mean(axis=1) for v in V], axis=-1)
        N = []
        for m in range(n_layers + 1):
            parts = ([rows[m - 1], V[m - 1]] if m >= 1 else []) + ([cols[m]] if m <= n_layers - 1 else [])
            N.append(jnp.concatenate(parts, axis=-1))
        fl = film(w, s, k, n_layers)
        newE, newV = [], []
        for l in range(n_layers):
            p = f".{k}.{l}"
            ge, be, gv, bv = fl[l]
            h_row = N[l + 1] @ w["mt" + p] + (g @ w["gam" + p])[:, None, :] + w["be" + p]
            h_col = N[l] @ w["ms" + p]
            h = E[l] @ w["theta" + p] + h_row[:, :, None, :] + h_col[:, None, :, :]
            newE.append(E[l] + silu(h * (1.0 + ge)[:, None, None, :] + be[:, None, None, :]))
            hv = V[l] @ w["theta_b" + p] + N[l + 1] @ w["mb" + p] + (g @ w["gam_b" + p])[:, None, :] + w["bv" + p]
            newV.append(V[l] + silu(hv * (1.0 + gv)[:, None, :] + bv[:, None, :]))
        E, V = newE, newV
    outs = [(E[l] @ w[f"dec_w.{l}"] + w[f"dec_o.{l}"], V[l] @ w[f"dec_b.{l}"] + w[f"dec_ob.{l}"])
            for l in range(n_layers)]
    return mlp.flatten(outs)


def from_prediction(y, t, x, pred, clip):
    """The velocity from a field's raw output y: y itself (`pred` "v"), or the end-point
    prediction x̂₁ = y turned into v = (x̂₁ − x) / max(1 − t, clip) (`pred` "x1")."""
    if pred == "v":
        return y
    return (y - x) / jnp.maximum(1.0 - t, clip)[:, None]


def velocity(params, t, x):
    """v(t, x): t [B], x [B, D] (whitened) -> [B, D]."""
    return from_prediction(output(params, t, x), t, x, params.pred, params.clip)


def flatten_shared(params, prefix):
    """A weight-space field -> flat dict of numpy arrays for the stage cache: `{prefix}.w.*`, sizes,
    pred, clip (what the NP and relational-transformer fields both store)."""
    flat = {f"{prefix}.w.{k}": np.asarray(v) for k, v in params.w.items()}
    flat[f"{prefix}.sizes"] = np.asarray(params.sizes, np.int64)
    flat[f"{prefix}.pred"] = np.asarray(PREDS.index(params.pred), np.int64)
    flat[f"{prefix}.clip"] = np.asarray(params.clip, np.float64)
    return flat


def unflatten_shared(flat, prefix):
    """flatten_shared's inverse: (w, sizes, pred, clip)."""
    w = {k[len(prefix) + 3:]: jnp.asarray(v) for k, v in flat.items() if k.startswith(f"{prefix}.w.")}
    return (w, [int(s) for s in np.asarray(flat[f"{prefix}.sizes"])], PREDS[int(flat[f"{prefix}.pred"])],
            float(flat[f"{prefix}.clip"]))


def flatten_params(params):
    """NPField -> flat dict of numpy arrays for the stage cache (keys `np.*`)."""
    return flatten_shared(params, "np")


def is_flat(flat):
    return "np.sizes" in flat


def unflatten_params(flat):
    w, sizes, pred, clip = unflatten_shared(flat, "np")
    return NPField(w, sizes, pred, clip)
