"""MAP training with optax: the reference network, the chain starts and ensembles.
Many independent nets train at once under jax.vmap (small MLPs leave the CPU idle otherwise)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import mlp


def neg_log_posterior(theta, x, y, sizes, task, noise_sigma, prior_scale, temperature):
    """Per-datapoint negative log posterior (the scale keeps the learning rate dataset-free)."""
    ll = mlp.log_likelihood(theta, x, y, sizes, task, noise_sigma) / temperature
    return -(ll + mlp.log_prior(theta, prior_scale)) / x.shape[0]


def train_many(keys, x, y, sizes, task, noise_sigma, prior_scale, temperature, steps, lr):
    """One MAP net per key (independent He inits); returns θ [len(keys), D] as numpy."""
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.01))
    x, y = jnp.asarray(x), jnp.asarray(y)
    loss = lambda th: neg_log_posterior(th, x, y, sizes, task, noise_sigma, prior_scale, temperature)

    def train_one(key):
        theta = mlp.init(key, sizes)

        def step(carry, _):
            theta, state = carry
            g = jax.grad(loss)(theta)
            upd, state = opt.update(g, state, theta)
            return (optax.apply_updates(theta, upd), state), None

        (theta, _), _ = jax.lax.scan(step, (theta, opt.init(theta)), None, length=steps)
        return theta

    return np.asarray(jax.jit(jax.vmap(train_one))(jnp.stack(keys)))


def resolve_noise_sigma(cfg, data, sizes, key):
    """Regression noise sd (standardized units): from the config, or the training RMSE of a
    MAP net fitted with unit noise when the config says "map"."""
    from .data import standardized
    sigma = cfg["likelihood"]["noise_sigma"]
    if cfg["data"]["task"] == "classification":
        return 1.0
    if sigma != "map":
        return float(sigma)
    x, y = standardized(data, "train")
    theta = train_many([key], x, y, sizes, "regression", 1.0, cfg["posterior"]["prior_scale"],
                       1.0, cfg["map"]["steps"], cfg["map"]["lr"])[0]
    resid = y - np.asarray(mlp.forward(jnp.asarray(theta), jnp.asarray(x), sizes))
    return float(np.sqrt(np.mean(resid**2)))


def run(cfg, data):
    """Stage output: reference net, one start net per chain, and the noise sd."""
    from .data import standardized
    sizes = mlp.sizes_of(cfg, data)
    task = cfg["data"]["task"]
    root = jax.random.PRNGKey(cfg["seed"])
    k_sigma, k_ref, k_chains = jax.random.split(jax.random.fold_in(root, 1), 3)
    sigma = resolve_noise_sigma(cfg, data, sizes, k_sigma)
    x, y = standardized(data, "train")
    pcfg = cfg["posterior"]
    keys = [k_ref] + list(jax.random.split(k_chains, pcfg["chains"]))
    thetas = train_many(keys, x, y, sizes, task, sigma, pcfg["prior_scale"],
                        cfg["likelihood"]["temperature"], cfg["map"]["steps"], cfg["map"]["lr"])
    return {"reference": thetas[0], "starts": thetas[1:], "noise_sigma": np.float32(sigma)}
