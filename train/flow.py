"""Conditional flow matching on whitened weights.

Path: x_t = (1-t) x₀ + t x₁ + σ ε, target velocity u = x₁ − x₀, x₀ ~ N(0, I).
Coupling of (x₀, x₁) within a minibatch: exact optimal transport (a linear assignment on
squared distances, solved per batch with scipy) straightens the paths, so few ODE steps
suffice; `independent` pairs them at random. Training times t = 1 − (1 − u)^p, u uniform
(`flow.time_pow` p; 1 = uniform, > 1 puts more weight near the data end t = 1).

Velocity (`flow.field`): `mlp`, an MLP on [x, sinusoidal(t)] with SiLU, or `np`, the
NP-layer weight-space field of train/np_field.py (per-weight and per-neuron features of the
network's own layout; needs the MLP's `sizes`), or `rt`, the relational transformer of
train/rt_field.py (neurons as tokens, weights as edge features; JAX only, no ONNX export);
`np` and `rt` may predict the end point
(`flow.pred = "x1"`: v = (x̂₁ − x)/max(1 − t, `flow.pred_clip`)). Both train with AdamW on the
same loss; the exported field uses the EMA of the weights. `velocity`, `flatten_params` and
`unflatten_params` dispatch on the field, so callers need not know which one it is."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment

from . import np_field, progress, rt_field

FIELDS = ("mlp", "np", "rt")


def time_embedding(t, n_freqs):
    """t [B] -> [B, n_freqs]: sin and cos at geometric frequencies from 1 to 200."""
    freqs = jnp.exp(jnp.linspace(0.0, jnp.log(200.0), n_freqs // 2))
    arg = t[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


def init(key, dim, hidden, n_freqs):
    sizes = [dim + n_freqs, *hidden, dim]
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        w = jax.random.normal(sub, (a, b)) * jnp.sqrt(1.0 / a)
        if i == len(sizes) - 2:
            w = w * 0.1  # start near a zero field: the first loss is |x₁ − x₀|²
        params.append({"w": w, "b": jnp.zeros(b)})
    return params


def velocity(params, t, x):
    """v(t, x): t [B], x [B, D] -> [B, D], for either field's parameters."""
    if isinstance(params, np_field.NPField):
        return np_field.velocity(params, t, x)
    if isinstance(params, rt_field.RTField):
        return rt_field.velocity(params, t, x)
    n_freqs = params[0]["w"].shape[0] - x.shape[1]
    h = jnp.concatenate([x, time_embedding(t, n_freqs)], axis=-1)
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            h = h * jax.nn.sigmoid(h)  # SiLU, spelled out so every exporter knows it
    return h


def couple(x0, x1, method):
    """Reorder x₀ to pair with x₁: `ot` = exact minibatch OT (squared Euclidean cost)."""
    if method == "independent":
        return x0
    if method != "ot":
        raise ValueError(f"unknown coupling {method!r}")
    cost = (np.sum(x0**2, 1)[:, None] + np.sum(x1**2, 1)[None, :] - 2.0 * x0 @ x1.T)
    rows, cols = linear_sum_assignment(cost.T)  # x1[i] <- x0[cols[i]]
    return x0[cols]


def cfm_loss(params, x0, x1, t, noise, sigma):
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1 + sigma * noise
    return jnp.mean(jnp.sum((velocity(params, t, xt) - (x1 - x0)) ** 2, axis=-1)) / x0.shape[1]


class StraightPaths:
    """What `train` needs to know about the space: the Euclidean one (N(0, I) base, straight
    lines, squared-Euclidean minibatch OT). train/sphere_flow.py supplies the sphere product's."""

    label = "flow training"

    def base(self, rng, n, dim):
        return rng.standard_normal((n, dim)).astype(np.float32)

    def couple(self, x0, x1, method):
        return couple(x0, x1, method)

    def loss(self, params, x0, x1, t, noise, sigma):
        return cfm_loss(params, x0, x1, t, noise, sigma)


def init_field(key, dim, fcfg, sizes=None):
    """The initial parameters of the configured field (`flow.field`)."""
    field, pred = fcfg.get("field", "mlp"), fcfg.get("pred", "v")
    if field not in FIELDS:
        raise ValueError(f"unknown flow.field {field!r} (expected one of {FIELDS})")
    if field == "mlp":
        if pred != "v":
            raise ValueError('flow.pred = "x1" needs flow.field = "np" or "rt"')
        return init(key, dim, fcfg["hidden"], fcfg["time_freqs"])
    if sizes is None:
        raise ValueError(f'flow.field = "{field}" needs the network sizes')
    from . import mlp
    if mlp.dim(sizes) != dim:
        raise ValueError(f"network sizes {list(sizes)} give D = {mlp.dim(sizes)}, the samples have {dim}")
    if field == "rt":
        return rt_field.init(key, sizes, fcfg.get("rt_channels", 32), fcfg.get("rt_blocks", 3), fcfg.get("rt_heads", 4),
                             fcfg["time_freqs"], pred, fcfg.get("pred_clip", 0.05))
    return np_field.init(key, sizes, fcfg.get("np_channels", 24), fcfg.get("np_blocks", 3), fcfg["time_freqs"],
                         pred, fcfg.get("pred_clip", 0.05))


def sample_times(key, n, time_pow=1.0):
    """t = 1 − (1 − u)^p with u uniform; p = 1 is plain uniform (the same draws)."""
    t = jax.random.uniform(key, (n,))
    return t if time_pow == 1.0 else 1.0 - (1.0 - t) ** time_pow


def train(train_x, held_x, fcfg, seed, sizes=None, paths=None):
    """train_x, held_x: whitened samples [n, D]; sizes: the MLP's layer sizes (needed by the
    `np` and `rt` fields); paths: base, coupling and loss (default StraightPaths()). Returns EMA
    params and a training report."""
    paths = paths or StraightPaths()
    n, dim = train_x.shape
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    key, k_init = jax.random.split(key)
    params = init_field(k_init, dim, fcfg, sizes)
    time_pow = float(fcfg.get("time_pow", 1.0))
    steps, batch, sigma = fcfg["steps"], min(fcfg["batch"], n), fcfg["sigma"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, fcfg["lr"], min(500, steps // 10), steps, fcfg["lr"] * 0.01)
    opt = optax.adamw(schedule, weight_decay=fcfg["weight_decay"])
    opt_state = opt.init(params)
    ema = params
    decay = fcfg["ema"]
    ema_warmup = bool(fcfg.get("ema_warmup", False))

    def ema_decay(i):
        """`flow.ema_warmup`: min(ema, (1 + i)/(10 + i)), so a short run's EMA forgets its start."""
        return jnp.minimum(decay, (1.0 + i) / (10.0 + i)) if ema_warmup else decay

    @jax.jit
    def step(params, ema, opt_state, x0, x1, key, i):
        kt, kn = jax.random.split(key)
        t = sample_times(kt, x0.shape[0], time_pow)
        noise = jax.random.normal(kn, x0.shape)
        loss, g = jax.value_and_grad(paths.loss)(params, x0, x1, t, noise, sigma)
        upd, opt_state = opt.update(g, opt_state, params)
        params = optax.apply_updates(params, upd)
        dec = ema_decay(i)
        ema = jax.tree.map(lambda e, p: dec * e + (1 - dec) * p, ema, params)
        return params, ema, opt_state, loss

    # held-out CFM loss with fixed draws, same coupling as training
    h_rng = np.random.default_rng(seed + 1)
    m = min(len(held_x), 512)
    hx1 = held_x[:m]
    hx0 = paths.couple(paths.base(h_rng, m, dim), hx1, fcfg["coupling"])
    ht = jnp.asarray(h_rng.uniform(size=m).astype(np.float32))
    hnoise = jnp.asarray(h_rng.standard_normal(hx1.shape).astype(np.float32))
    held_loss = jax.jit(lambda p: paths.loss(p, jnp.asarray(hx0), jnp.asarray(hx1), ht, hnoise, sigma))

    curve, losses, t0 = [], [], time.time()
    pbar = progress.bar(steps, paths.label)  # quiet unless stderr is a terminal
    for i in range(steps):
        idx = rng.choice(n, batch, replace=False)
        x1 = train_x[idx]
        x0 = paths.couple(paths.base(rng, batch, dim), x1, fcfg["coupling"])
        params, ema, opt_state, loss = step(params, ema, opt_state, x0, x1, jax.random.fold_in(key, i),
                                                 np.float32(i))
        losses.append(loss)
        pbar.update(1)
        if (i + 1) % fcfg["eval_every"] == 0 or i + 1 == steps:
            tr = float(np.mean(jax.device_get(losses[-fcfg["eval_every"]:])))
            ho = float(held_loss(ema))
            curve.append({"step": i + 1, "train_loss": tr, "heldout_loss_ema": ho})
            pbar.set_postfix_str(f"held-out {ho:.4f}")
            print(f"  flow step {i + 1}: train {tr:.4f} held-out(EMA) {ho:.4f} [{time.time() - t0:.0f}s]", flush=True)
    pbar.close()
    report = {
        "coupling": fcfg["coupling"], "sigma": sigma, "steps": steps, "batch": batch,
        "hidden": fcfg["hidden"], "time_freqs": fcfg["time_freqs"], "activation": "silu",
        "field": field_name(params), "parameters": n_parameters(params),
        "optimizer": {"kind": "adamw", "lr": fcfg["lr"], "weight_decay": fcfg["weight_decay"],
                      "schedule": "warmup_cosine"},
        "ema": decay, "train_samples": int(n), "heldout_samples": int(m),
        "final_train_loss": curve[-1]["train_loss"], "final_heldout_loss_ema": curve[-1]["heldout_loss_ema"],
        "curve": curve,
    }
    if isinstance(params, np_field.NPField):
        report.update({"hidden": f"NP-layer field, C = {params.channels}, K = {params.blocks}",
                       "np_channels": params.channels, "np_blocks": params.blocks, "pred": params.pred,
                       "pred_clip": params.clip, "time_pow": time_pow})
    elif isinstance(params, rt_field.RTField):
        report.update({"hidden": f"relational transformer, C = {params.channels}, K = {params.blocks}, "
                                 f"heads = {params.heads}", "rt_channels": params.channels,
                       "rt_blocks": params.blocks, "rt_heads": params.heads, "pred": params.pred,
                       "pred_clip": params.clip, "time_pow": time_pow})
    elif time_pow != 1.0:
        report["time_pow"] = time_pow
    if ema_warmup:
        report["ema_warmup"] = True
    return jax.tree.map(np.asarray, ema), report


def field_name(params):
    if isinstance(params, np_field.NPField):
        return "np"
    return "rt" if isinstance(params, rt_field.RTField) else "mlp"


def n_parameters(params):
    return int(sum(np.size(a) for a in jax.tree.leaves(params)))


def flatten_params(params):
    """List of {w, b} (or an NPField) -> flat dict for npz caching."""
    if isinstance(params, np_field.NPField):
        return np_field.flatten_params(params)
    if isinstance(params, rt_field.RTField):
        return rt_field.flatten_params(params)
    return {f"{i}.{k}": v for i, layer in enumerate(params) for k, v in layer.items()}


WEIGHT_DTYPES = ("f16", "f32")


def round_weights(flat, weight_dtype):
    """The flow stage's flat parameters with every float32 array rounded to the nearest float16
    value (weight_dtype "f16"; "f32" returns them as they are). Arrays with a value outside the
    f16 range stay as trained, so rounding never turns a weight into inf."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"flow.weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    if weight_dtype == "f32":
        return dict(flat)
    out = {}
    for k, v in flat.items():
        v = np.asarray(v)
        fits = v.dtype == np.float32 and np.all(np.abs(v) <= np.finfo(np.float16).max)
        out[k] = v.astype(np.float16).astype(np.float32) if fits else v
    return out


def unflatten_params(flat):
    if np_field.is_flat(flat):
        return np_field.unflatten_params(flat)
    if rt_field.is_flat(flat):
        return rt_field.unflatten_params(flat)
    n = len({k.split(".")[0] for k in flat})
    return [{"w": jnp.asarray(flat[f"{i}.w"]), "b": jnp.asarray(flat[f"{i}.b"])} for i in range(n)]
