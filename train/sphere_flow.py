"""Riemannian conditional flow matching on the canonical slice (`flow.geometry = "sphere_product"`).

Whitened canonical draws x₁ lie on M = Π_s S^{k_s−1} × R^E (train/sphere.py; the whitening is the
identity on sphere coordinates). Per training pair:

- base x₀: uniform on every sphere (normalized Gaussian), N(0, I) on the Euclidean coordinates;
- coupling: exact minibatch OT (Hungarian per batch) under the geodesic cost
  d²(x₀, x₁) = Σ_s arccos(x₀,s·x₁,s)² + |x₀,E − x₁,E|² (`flow.coupling = "independent"`: random);
- path: slerp on every sphere, the straight line on R^E, x_t = γ(t), plus σ·ε on the Euclidean
  coordinates only (the spheres carry no noise); target velocity the path's derivative γ̇(t),
  which is tangent to the spheres;
- loss: mean over the batch of |P(x_t) u_θ(t, x_t) − γ̇(t)|² / D, u_θ the raw field. The
  projection P (I − x xᵀ per sphere block) is applied in the loss and, at sampling time, by the
  runtime and train/sampler.py; the exported flow.onnx is the raw field u_θ.

The field is `flow.field` (the same networks as the Euclidean flow, train/flow.py) with
`flow.pred = "v"`; training schedule, EMA and report as in train/flow.py."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment

from . import flow as flow_mod
from . import progress


def couple(geometry, x0, x1, method):
    """Reorder x₀ to pair with x₁: `ot` = exact minibatch OT under the geodesic cost."""
    if method == "independent":
        return x0
    if method != "ot":
        raise ValueError(f"unknown coupling {method!r}")
    rows, cols = linear_sum_assignment(geometry.cost_matrix(x0, x1).T)  # x1[i] <- x0[cols[i]]
    return x0[cols]


ANTIPODAL = 1e-2  # pairs within this angle of antipodal have no unique geodesic: left out of the loss


def loss_fn(geometry, params, x0, x1, t, noise, sigma):
    xt, target = geometry.interpolate(x0, x1, t)
    xt = xt + sigma * noise * jnp.asarray(~geometry.on_sphere, xt.dtype)  # Euclidean coordinates only
    v, _ = geometry.project(xt, flow_mod.velocity(params, t, xt))
    # near-antipodal sphere pairs (Ω > π − 0.01; about 2.5e-5 of uniform pairs on S², fewer in
    # higher dimension) have a non-unique geodesic and a speed Ω/sin Ω that explodes: their
    # block gets weight 0 (one such pair in a batch otherwise spikes the loss by 1e7)
    keep = jnp.ones_like(x0)
    for _, idx in geometry.groups:
        ok = jnp.arccos(jnp.clip(jnp.sum(x0[:, idx] * x1[:, idx], axis=-1), -1.0, 1.0)) < jnp.pi - ANTIPODAL
        keep = keep.at[:, idx].set(jnp.broadcast_to(ok[..., None], ok.shape + (idx.shape[1],)).astype(x0.dtype))
    return jnp.mean(jnp.sum(keep * (v - target) ** 2, axis=-1)) / x0.shape[1]


def train(train_x, held_x, fcfg, seed, geometry):
    """train_x, held_x: whitened canonical samples [n, D] on the slice. Returns EMA params and a report."""
    n, dim = train_x.shape
    if dim != geometry.dim:
        raise ValueError(f"geometry has D = {geometry.dim}, the samples {dim}")
    if fcfg.get("pred", "v") != "v":
        raise ValueError('flow.geometry = "sphere_product" trains velocities (flow.pred = "v")')
    err = float(np.max(geometry.slice_error(train_x)))
    if err > 1e-4:
        raise ValueError(f"training draws are off the slice by {err:.2e} (canonicalization and whitening "
                         "must leave every unit's (w, b) at unit norm)")
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    key, k_init = jax.random.split(key)
    params = flow_mod.init_field(k_init, dim, fcfg, geometry.sizes)
    time_pow = float(fcfg.get("time_pow", 1.0))
    steps, batch, sigma = fcfg["steps"], min(fcfg["batch"], n), fcfg["sigma"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, fcfg["lr"], min(500, steps // 10), steps, fcfg["lr"] * 0.01)
    opt = optax.adamw(schedule, weight_decay=fcfg["weight_decay"])
    opt_state = opt.init(params)
    ema, decay = params, fcfg["ema"]
    ema_warmup = bool(fcfg.get("ema_warmup", False))

    def loss(p, x0, x1, t, noise):
        return loss_fn(geometry, p, x0, x1, t, noise, sigma)

    @jax.jit
    def step(params, ema, opt_state, x0, x1, key, i):
        kt, kn = jax.random.split(key)
        t = flow_mod.sample_times(kt, x0.shape[0], time_pow)
        noise = jax.random.normal(kn, x0.shape)
        value, g = jax.value_and_grad(loss)(params, x0, x1, t, noise)
        upd, opt_state = opt.update(g, opt_state, params)
        params = optax.apply_updates(params, upd)
        dec = jnp.minimum(decay, (1.0 + i) / (10.0 + i)) if ema_warmup else decay
        ema = jax.tree.map(lambda e, p: dec * e + (1 - dec) * p, ema, params)
        return params, ema, opt_state, value

    h_rng = np.random.default_rng(seed + 1)
    m = min(len(held_x), 512)
    hx1 = held_x[:m]
    hx0 = couple(geometry, geometry.sample_base(h_rng, m), hx1, fcfg["coupling"])
    ht = jnp.asarray(h_rng.uniform(size=m).astype(np.float32))
    hnoise = jnp.asarray(h_rng.standard_normal(hx1.shape).astype(np.float32))
    held_loss = jax.jit(lambda p: loss(p, jnp.asarray(hx0), jnp.asarray(hx1), ht, hnoise))

    curve, losses, t0 = [], [], time.time()
    pbar = progress.bar(steps, "flow training (sphere product)")
    for i in range(steps):
        x1 = train_x[rng.choice(n, batch, replace=False)]
        x0 = couple(geometry, geometry.sample_base(rng, batch), x1, fcfg["coupling"])
        params, ema, opt_state, value = step(params, ema, opt_state, x0, x1, jax.random.fold_in(key, i),
                                             np.float32(i))
        losses.append(value)
        pbar.update(1)
        if (i + 1) % fcfg["eval_every"] == 0 or i + 1 == steps:
            tr = float(np.mean(jax.device_get(losses[-fcfg["eval_every"]:])))
            ho = float(held_loss(ema))
            curve.append({"step": i + 1, "train_loss": tr, "heldout_loss_ema": ho})
            pbar.set_postfix_str(f"held-out {ho:.4f}")
            print(f"  flow step {i + 1}: train {tr:.4f} held-out(EMA) {ho:.4f} [{time.time() - t0:.0f}s]", flush=True)
    pbar.close()
    report = {
        "geometry": "sphere_product", "spheres": repr(geometry),
        "interpolant": "slerp on spheres, straight line on Euclidean coordinates",
        "coupling": fcfg["coupling"], "coupling_cost": "geodesic: sum of squared great-circle angles + "
                                                       "squared Euclidean distance",
        "projection": "raw field output u projected onto the tangent space in the loss; in the runtime at "
                      "sampling time (flow.onnx outputs u)",
        "sigma": sigma, "sigma_on": "Euclidean coordinates", "steps": steps, "batch": batch,
        "hidden": fcfg["hidden"], "time_freqs": fcfg["time_freqs"], "activation": "silu",
        "field": fcfg.get("field", "mlp"), "parameters": flow_mod.n_parameters(params),
        "optimizer": {"kind": "adamw", "lr": fcfg["lr"], "weight_decay": fcfg["weight_decay"],
                      "schedule": "warmup_cosine"},
        "ema": decay, "train_samples": int(n), "heldout_samples": int(m),
        "final_train_loss": curve[-1]["train_loss"], "final_heldout_loss_ema": curve[-1]["heldout_loss_ema"],
        "curve": curve,
    }
    if time_pow != 1.0:
        report["time_pow"] = time_pow
    if ema_warmup:
        report["ema_warmup"] = True
    return jax.tree.map(np.asarray, ema), report
