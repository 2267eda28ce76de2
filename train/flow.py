"""Conditional flow matching on whitened weights.

Path: x_t = (1-t) x₀ + t x₁ + σ ε, target velocity u = x₁ − x₀, x₀ ~ N(0, I).
Coupling of (x₀, x₁) within a minibatch: exact optimal transport (a linear assignment on
squared distances, solved per batch with scipy) straightens the paths, so few ODE steps
suffice; `independent` pairs them at random. Velocity: an MLP on [x, sinusoidal(t)]
with SiLU, trained with AdamW; the exported field uses the EMA of the weights."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment

from . import progress


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
    """v(t, x): t [B], x [B, D] -> [B, D]."""
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


def train(train_x, held_x, fcfg, seed):
    """train_x, held_x: whitened samples [n, D]. Returns EMA params and a training report."""
    n, dim = train_x.shape
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    key, k_init = jax.random.split(key)
    params = init(k_init, dim, fcfg["hidden"], fcfg["time_freqs"])
    steps, batch, sigma = fcfg["steps"], min(fcfg["batch"], n), fcfg["sigma"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, fcfg["lr"], min(500, steps // 10), steps, fcfg["lr"] * 0.01)
    opt = optax.adamw(schedule, weight_decay=fcfg["weight_decay"])
    opt_state = opt.init(params)
    ema = params
    decay = fcfg["ema"]

    @jax.jit
    def step(params, ema, opt_state, x0, x1, key):
        kt, kn = jax.random.split(key)
        t = jax.random.uniform(kt, (x0.shape[0],))
        noise = jax.random.normal(kn, x0.shape)
        loss, g = jax.value_and_grad(cfm_loss)(params, x0, x1, t, noise, sigma)
        upd, opt_state = opt.update(g, opt_state, params)
        params = optax.apply_updates(params, upd)
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        return params, ema, opt_state, loss

    # held-out CFM loss with fixed draws, same coupling as training
    h_rng = np.random.default_rng(seed + 1)
    m = min(len(held_x), 512)
    hx1 = held_x[:m]
    hx0 = couple(h_rng.standard_normal(hx1.shape).astype(np.float32), hx1, fcfg["coupling"])
    ht = jnp.asarray(h_rng.uniform(size=m).astype(np.float32))
    hnoise = jnp.asarray(h_rng.standard_normal(hx1.shape).astype(np.float32))
    held_loss = jax.jit(lambda p: cfm_loss(p, jnp.asarray(hx0), jnp.asarray(hx1), ht, hnoise, sigma))

    curve, losses, t0 = [], [], time.time()
    pbar = progress.bar(steps, "flow training")  # quiet unless stderr is a terminal
    for i in range(steps):
        idx = rng.choice(n, batch, replace=False)
        x1 = train_x[idx]
        x0 = couple(rng.standard_normal(x1.shape).astype(np.float32), x1, fcfg["coupling"])
        params, ema, opt_state, loss = step(params, ema, opt_state, x0, x1, jax.random.fold_in(key, i))
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
        "optimizer": {"kind": "adamw", "lr": fcfg["lr"], "weight_decay": fcfg["weight_decay"],
                      "schedule": "warmup_cosine"},
        "ema": decay, "train_samples": int(n), "heldout_samples": int(m),
        "final_train_loss": curve[-1]["train_loss"], "final_heldout_loss_ema": curve[-1]["heldout_loss_ema"],
        "curve": curve,
    }
    return jax.tree.map(np.asarray, ema), report


def flatten_params(params):
    """List of {w, b} -> flat dict for npz caching."""
    return {f"{i}.{k}": v for i, layer in enumerate(params) for k, v in layer.items()}


def unflatten_params(flat):
    n = len({k.split(".")[0] for k in flat})
    return [{"w": jnp.asarray(flat[f"{i}.w"]), "b": jnp.asarray(flat[f"{i}.b"])} for i in range(n)]
