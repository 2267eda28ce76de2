"""ReLU MLP as a pure function of a flat weight vector θ.

Layout (identical to the manifest's `network.layers`): for each layer, the weight
matrix [out, in] row-major, then the bias [out]."""

import jax
import jax.numpy as jnp
import numpy as np


def layout(sizes):
    """sizes = [d_in, h1, ..., C] -> list of (in, out, w_offset, b_offset), and D."""
    layers, off = [], 0
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        layers.append((d_in, d_out, off, off + d_in * d_out))
        off += d_in * d_out + d_out
    return layers, off


def dim(sizes) -> int:
    return layout(sizes)[1]


def unflatten(theta, sizes):
    """θ [..., D] -> list of (W [..., out, in], b [..., out])."""
    layers, _ = layout(sizes)
    lead = theta.shape[:-1]
    out = []
    for d_in, d_out, w_off, b_off in layers:
        w = theta[..., w_off:w_off + d_in * d_out].reshape(*lead, d_out, d_in)
        b = theta[..., b_off:b_off + d_out]
        out.append((w, b))
    return out


def flatten(params):
    """Inverse of unflatten (numpy or jax arrays, leading batch dims allowed)."""
    xp = jnp if isinstance(params[0][0], jax.Array) else np
    parts = []
    for w, b in params:
        lead = w.shape[:-2]
        parts += [w.reshape(*lead, -1), b]
    return xp.concatenate(parts, axis=-1)


def forward(theta, x, sizes):
    """θ [D], x [N, d_in] (standardized) -> output [N, C]."""
    params = unflatten(theta, sizes)
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w.T + b
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    return h


def init(key, sizes):
    """He-normal weights, zero biases."""
    parts = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        key, sub = jax.random.split(key)
        parts.append((jax.random.normal(sub, (d_out, d_in)) * jnp.sqrt(2.0 / d_in), jnp.zeros(d_out)))
    return flatten(parts)


def manifest_layers(sizes):
    layers, _ = layout(sizes)
    out = []
    for i, (d_in, d_out, w_off, b_off) in enumerate(layers):
        out.append({
            "kind": "dense", "in": d_in, "out": d_out,
            "activation": "identity" if i == len(layers) - 1 else "relu",
            "weight": {"offset": w_off, "shape": [d_out, d_in]},
            "bias": {"offset": b_off, "shape": [d_out]},
        })
    return out


def log_likelihood(theta, x, y, sizes, task, noise_sigma):
    """Full-batch log-likelihood (sum over points), standardized targets for regression."""
    out = forward(theta, x, sizes)
    if task == "classification":
        logp = jax.nn.log_softmax(out, axis=-1)
        return jnp.take_along_axis(logp, y[:, None], axis=-1).sum()
    r = (y - out) / noise_sigma
    return (-0.5 * r**2 - jnp.log(noise_sigma) - 0.5 * jnp.log(2 * jnp.pi)).sum()


def log_prior(theta, prior_scale):
    return -0.5 * jnp.sum((theta / prior_scale) ** 2)


def sizes_of(cfg, data):
    from .data import n_outputs
    return [data["x_train"].shape[1], *cfg["network"]["hidden"], n_outputs(cfg, data)]
