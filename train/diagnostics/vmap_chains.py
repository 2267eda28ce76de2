"""Measurement for issue 14: NUTS chains vectorized with `jax.vmap` (one process, every chain in
each batched step) against the same chains one after another, alternated `--reps` times, both in
one process so that a loaded machine's scheduler treats them alike:

    nice -n 10 .venv/bin/python -m train.diagnostics.vmap_chains train/configs/digits.toml --chains 2 --warmup 100 --draws 50

NUTS trees have data-dependent depth, so a vmapped step runs until the deepest chain's tree is
done; digits' chains hit the maximum depth (511 leapfrog steps) on nearly every step, where the
waste is smallest. Prints wall times, the speed-up and how far the draws differ from the
sequential ones (vmap batches the matmuls, so they agree to rounding, not bitwise)."""

import json
import os
import time

import blackjax
import jax
import jax.numpy as jnp
import numpy as np

from .. import mlp
from . import bench_chains


def _chain_fn(spec):
    x, y = jnp.asarray(spec["x"]), jnp.asarray(spec["y"])
    sizes, task, sigma = spec["sizes"], spec["task"], spec["sigma"]
    pcfg = spec["nuts"]

    def logdensity(theta):
        return (mlp.log_likelihood(theta, x, y, sizes, task, sigma) / spec["temperature"]
                + mlp.log_prior(theta, spec["prior_scale"]))

    def one(key, start):
        warmup = blackjax.window_adaptation(blackjax.nuts, logdensity, target_acceptance_rate=pcfg["target_accept"],
                                            max_num_doublings=pcfg["max_doublings"])
        k_warm, k_draw = jax.random.split(key)
        (state, params), _ = warmup.run(k_warm, start, num_steps=pcfg["warmup"])
        kernel = blackjax.nuts(logdensity, **{**params, "max_num_doublings": pcfg["max_doublings"]}).step

        def step(state, k):
            state, info = kernel(k, state)
            return state, (state.position, info.num_integration_steps)
        return jax.lax.scan(step, state, jax.random.split(k_draw, pcfg["draws"]))[1]
    return one


def main(argv=None):
    args = bench_chains.chain_arguments("python -m train.diagnostics.vmap_chains", __doc__, reps=2).parse_args(argv)
    spec = bench_chains.chain_spec(args)
    one = _chain_fn(spec)
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(spec["seed"]), c) for c in range(args.chains)])
    starts = jnp.asarray(spec["starts"][:args.chains])
    seq_fn, vmap_fn = jax.jit(one), jax.jit(jax.vmap(one))
    res = {"config": args.config, "chains": args.chains, "warmup": args.warmup, "draws": args.draws,
           "sequential": [], "vmap": [], "load1": []}
    for _ in range(args.reps):
        res["load1"].append(round(os.getloadavg()[0], 1))
        t = time.time()
        seq = [jax.block_until_ready(seq_fn(keys[c], starts[c])) for c in range(args.chains)]
        res["sequential"].append(round(time.time() - t, 1))
        t = time.time()
        vm = jax.block_until_ready(vmap_fn(keys, starts))
        res["vmap"].append(round(time.time() - t, 1))
        print(f"sequential {res['sequential'][-1]} s, vmap {res['vmap'][-1]} s (load {res['load1'][-1]})", flush=True)
    res["speedup"] = [round(s / v, 2) for s, v in zip(res["sequential"], res["vmap"])]
    pos_seq = np.stack([np.asarray(p) for p, _ in seq])
    res["max_abs_draw_difference"] = float(np.max(np.abs(pos_seq - np.asarray(vm[0]))))
    res["mean_leapfrog_steps"] = {"sequential": float(np.mean([np.mean(n) for _, n in seq])),
                                  "vmap": float(np.mean(vm[1]))}
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
