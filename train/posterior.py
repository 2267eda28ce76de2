"""Posterior samples of the network weights.

`nuts`: blackjax NUTS with window adaptation (diagonal mass matrix), Gaussian prior,
full-batch likelihood, one chain per independently trained start net.
`ensemble`: many independently trained MAP nets (a deep-ensemble posterior), grouped into
chain-sized blocks so that one block can be held out exactly like a chain.

NUTS chains run through `posterior.executor`: "local" (one after another in this process),
"processes" (one process per chain, `posterior.workers` at a time, 0 = one per core) or "ray"
(one Ray task per chain on the cluster at `posterior.ray_address` / `--ray-address`). Every
executor calls the same `run_chain(spec, c)` on the same picklable `chain_spec`, and chain c's
key depends only on (seed, c), so each chain's draws are the same whichever executor ran it."""

import os
import time

import blackjax
import jax
import jax.numpy as jnp
import numpy as np

from . import map as map_stage
from . import mlp, progress
from .data import standardized

EXECUTORS = ("local", "processes", "ray")


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


def run_nuts_chain(key, start, logdensity, pcfg, label="chain", position=None):
    warmup = blackjax.window_adaptation(
        blackjax.nuts, logdensity, target_acceptance_rate=pcfg["target_accept"],
        max_num_doublings=pcfg["max_doublings"],
        adaptation_info_fn=blackjax.adaptation.base.get_filter_adapt_info_fn(),
    )
    k_warm, k_draw = jax.random.split(key)
    with progress.bar(pcfg["warmup"], f"{label} warm-up", position) as pbar, progress.scan_steps(pbar):
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

    with progress.bar(pcfg["draws"], f"{label} sampling", position) as pbar, progress.scan_steps(pbar):
        pos, acc, div, nsteps = sample(state, k_draw)
        pos = np.asarray(pos)
    return pos, {
        "acceptance": float(np.mean(acc)),
        "divergences": int(np.sum(div)),
        "step_size": float(params["step_size"]),
        "mean_leapfrog_steps": float(np.mean(nsteps)),
    }


def chain_spec(cfg, data, map_out) -> dict:
    """Everything one NUTS chain needs, as plain numpy/Python values (picklable: it travels to
    worker processes and Ray tasks)."""
    pcfg = cfg["posterior"]
    x, y = standardized(data, "train")
    return {
        "x": x, "y": y, "sizes": mlp.sizes_of(cfg, data), "task": cfg["data"]["task"],
        "sigma": float(map_out["noise_sigma"]), "temperature": cfg["likelihood"]["temperature"],
        "prior_scale": pcfg["prior_scale"], "seed": cfg["seed"], "starts": np.asarray(map_out["starts"]),
        "nuts": {k: pcfg[k] for k in ("warmup", "draws", "target_accept", "max_doublings")},
    }


def run_chain(spec, c, position=None):
    """NUTS chain c of `spec`: draws [draws, D] (numpy) and its diagnostics. Depends only on the
    spec and c, never on which process or machine runs it."""
    x, y = jnp.asarray(spec["x"]), jnp.asarray(spec["y"])
    sizes, task, sigma = spec["sizes"], spec["task"], spec["sigma"]
    temperature, prior_scale = spec["temperature"], spec["prior_scale"]

    def logdensity(theta):
        ll = mlp.log_likelihood(theta, x, y, sizes, task, sigma) / temperature
        return ll + mlp.log_prior(theta, prior_scale)

    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(spec["seed"]), 2), c)
    t0 = time.time()
    pos, info = run_nuts_chain(key, spec["starts"][c], logdensity, spec["nuts"], f"chain {c}", position)
    info["seconds"] = round(time.time() - t0, 1)
    return pos, info


def _local(spec, n):
    for c in range(n):
        yield c, run_chain(spec, c)


def _processes(spec, n, workers):
    """One spawned process per chain (JAX is not fork-safe), `workers` at a time."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    workers = workers or min(n, os.cpu_count() or 1)
    with ProcessPoolExecutor(max_workers=min(workers, n), mp_context=multiprocessing.get_context("spawn")) as ex:
        futures = {ex.submit(run_chain, spec, c, c % workers): c for c in range(n)}
        for f in as_completed(futures):
            yield futures[f], f.result()


def _ray(spec, n, address):
    """One Ray task (1 CPU) per chain on the cluster at `address` ("auto", "HOST:PORT", or None to
    start a local one); the `train` package travels with the tasks (runtime_env py_modules)."""
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("posterior.executor = \"ray\" needs Ray: pip install -r train/requirements-ray.txt") from e
    started = not ray.is_initialized()
    if started:
        here = os.path.dirname(os.path.abspath(__file__))
        ray.init(address=address, runtime_env={"py_modules": [here]}, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1)(run_chain)
        spec_ref = ray.put(spec)
        pending = {task.remote(spec_ref, c): c for c in range(n)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield pending.pop(ref), ray.get(ref)
    finally:
        if started:
            ray.shutdown()


def run_chains(spec, n, executor="local", workers=0, ray_address=None):
    """All n chains through the executor: (draws [n, draws, D], diagnostics in chain order)."""
    if executor == "local":
        it = _local(spec, n)
    elif executor == "processes":
        it = _processes(spec, n, workers)
    elif executor == "ray":
        it = _ray(spec, n, ray_address)
    else:
        raise ValueError(f"unknown posterior.executor {executor!r} (one of {', '.join(EXECUTORS)})")
    results = {}
    for c, (pos, info) in it:
        print(f"  chain {c}: {info}", flush=True)
        results[c] = (pos, info)
    return [results[c][0] for c in range(n)], [results[c][1] for c in range(n)]


def run(cfg, data, map_out, ray_address=None):
    pcfg, task = cfg["posterior"], cfg["data"]["task"]
    sizes = mlp.sizes_of(cfg, data)
    x, y = standardized(data, "train")
    x, y = jnp.asarray(x), jnp.asarray(y)
    sigma = float(map_out["noise_sigma"])
    temperature = cfg["likelihood"]["temperature"]
    key = jax.random.fold_in(jax.random.PRNGKey(cfg["seed"]), 2)

    chains, diag = [], {"method": pcfg["method"], "chains": []}
    if pcfg["method"] == "nuts":
        executor = pcfg.get("executor", "local")
        t0 = time.time()
        draws, infos = run_chains(chain_spec(cfg, data, map_out), len(map_out["starts"]), executor,
                                  pcfg.get("workers", 0), ray_address or pcfg.get("ray_address") or None)
        chains = [pos[:: pcfg["thin"]] for pos in draws]
        diag["chains"] = infos
        diag["executor"] = executor
        diag["seconds"] = round(time.time() - t0, 1)
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
