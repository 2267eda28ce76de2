"""Posterior samples of the network weights.

`nuts`: blackjax NUTS with window adaptation (diagonal mass matrix), Gaussian prior,
full-batch likelihood, one chain per independently trained start net.
`ensemble`: many independently trained MAP nets (a deep-ensemble posterior), grouped into
chain-sized blocks so that one block can be held out exactly like a chain."""

import time

import blackjax
import jax
import jax.numpy as jnp
import numpy as np

from . import map as map_stage
from . import mlp
from .data import standardized


def split_rhat(q):
    """Split-R̂ over axis 0 (chains) and 1 (draws), elementwise over the remaining axes."""
    q = np.asarray(q, np.float64)
    c, n = q.shape[:2]
    half = n // 2
    q = np.concatenate([q[:, :half], q[:, half:2 * half]], axis=0)  # [2c, half, ...]
    means = q.mean(axis=1)
    w = q.var(axis=1, ddof=1).mean(axis=0)
    b = half * means.var(axis=0, ddof=1)
    var_plus = (half - 1) / half * w + b / half
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sqrt(var_plus / w)
    return np.where(w > 1e-12, r, 1.0)  # a constant quantity is trivially converged


def predictive(thetas, x, sizes, task):
    """Per-sample predictive on x: class probabilities [S,N,C] or means [S,N,k]."""
    f = jax.jit(jax.vmap(lambda th: mlp.forward(th, x, sizes)))
    out = np.concatenate([np.asarray(f(jnp.asarray(chunk))) for chunk in np.array_split(thetas, max(1, len(thetas) // 256))])
    if task == "classification":
        return np.asarray(jax.nn.softmax(out, axis=-1))
    return out


def run_nuts_chain(key, start, logdensity, pcfg):
    warmup = blackjax.window_adaptation(
        blackjax.nuts, logdensity, target_acceptance_rate=pcfg["target_accept"],
        max_num_doublings=pcfg["max_doublings"],
        adaptation_info_fn=blackjax.adaptation.base.get_filter_adapt_info_fn(),
    )
    k_warm, k_draw = jax.random.split(key)
    (state, params), _ = warmup.run(k_warm, jnp.asarray(start), num_steps=pcfg["warmup"])
    params = {**params, "max_num_doublings": pcfg["max_doublings"]}  # adaptation passes it through
    kernel = blackjax.nuts(logdensity, **params).step

    @jax.jit
    def sample(state, key):
        def one(state, k):
            state, info = kernel(k, state)
            return state, (state.position, info.acceptance_rate, info.is_divergent,
                           info.num_integration_steps)
        return jax.lax.scan(one, state, jax.random.split(key, pcfg["draws"]))[1]

    pos, acc, div, nsteps = sample(state, k_draw)
    return np.asarray(pos), {
        "acceptance": float(np.mean(acc)),
        "divergences": int(np.sum(div)),
        "step_size": float(params["step_size"]),
        "mean_leapfrog_steps": float(np.mean(nsteps)),
    }


def run(cfg, data, map_out):
    pcfg, task = cfg["posterior"], cfg["data"]["task"]
    sizes = mlp.sizes_of(cfg, data)
    x, y = standardized(data, "train")
    x, y = jnp.asarray(x), jnp.asarray(y)
    sigma = float(map_out["noise_sigma"])
    temperature = cfg["likelihood"]["temperature"]
    key = jax.random.fold_in(jax.random.PRNGKey(cfg["seed"]), 2)

    chains, diag = [], {"method": pcfg["method"], "chains": []}
    if pcfg["method"] == "nuts":
        def logdensity(theta):
            ll = mlp.log_likelihood(theta, x, y, sizes, task, sigma) / temperature
            return ll + mlp.log_prior(theta, pcfg["prior_scale"])

        for c, start in enumerate(map_out["starts"]):
            t0 = time.time()
            pos, info = run_nuts_chain(jax.random.fold_in(key, c), start, logdensity, pcfg)
            info["seconds"] = round(time.time() - t0, 1)
            print(f"  chain {c}: {info}", flush=True)
            chains.append(pos[:: pcfg["thin"]])
            diag["chains"].append(info)
    elif pcfg["method"] == "ensemble":
        per = pcfg["ensemble_size"] // pcfg["chains"]
        keys = list(jax.random.split(key, per * pcfg["chains"]))
        t0 = time.time()
        nets = map_stage.train_many(keys, x, y, sizes, task, sigma, pcfg["prior_scale"],
                                    temperature, cfg["map"]["steps"], cfg["map"]["lr"])
        diag["seconds"] = round(time.time() - t0, 1)
        chains = list(nets.reshape(pcfg["chains"], per, -1))
    else:
        raise ValueError(f"unknown posterior method {pcfg['method']!r}")

    samples = np.stack(chains).astype(np.float32)  # [chains, draws, D]
    xe, _ = standardized(data, "eval")
    pred = predictive(samples.reshape(-1, samples.shape[-1]), jnp.asarray(xe), sizes, task)
    rhat = split_rhat(pred.reshape(*samples.shape[:2], *pred.shape[1:]))
    diag["predictive_split_rhat"] = {"max": float(rhat.max()), "mean": float(rhat.mean()),
                                     "frac_above_1.1": float(np.mean(rhat > 1.1))}
    diag.update(draws_per_chain=int(samples.shape[1]), thin=pcfg["thin"],
                prior={"kind": "gaussian", "scale": pcfg["prior_scale"]},
                temperature=temperature)
    print(f"  predictive split-Rhat: {diag['predictive_split_rhat']}", flush=True)
    return {"samples": samples}, diag
