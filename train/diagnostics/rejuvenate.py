"""Fresh posterior draws from the stored ones by a few exact MCMC transitions (docs/fidelity.md,
"Rejuvenating stored draws").

`python -m train.diagnostics.rejuvenate WORK --config CFG [--n 400] [--leapfrog 10]
[--checkpoints 0,1,2,5,10,20,50] [--seed 1] [--json OUT]`

The bundles' defaults reproduce stored HMC draws (memorization ratio <= 0.15). A transition
kernel that leaves the posterior invariant turns exact posterior draws into exact posterior
draws, so HMC started *at* the stored draws can only lose novelty's cost, never fidelity:

    θ_0 = a stored (aligned, not yet canonical) NUTS draw, chosen uniformly
    θ_k = HMC_k(θ_{k-1})  (blackjax, L leapfrog steps, diagonal mass = variance of the draws,
                           step size tuned to >= 0.75 acceptance on the starts)
    scored: canonicalize(θ_k), exactly like the bundle stage's honest comparison (TV, NLL, ECE
            against the held-out chain; memorization ratio; epistemic ratios)

Each row also gives the gradient evaluations per fresh draw (k·L) against NUTS's leapfrog
steps per draw (the posterior stage's report), the price of novelty on this posterior."""

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import diagnose_fidelity as dfid, start_sweep
from .. import baselines, canon, evaluate, mlp


def stage_cache(work: Path, cfg_path: Path):
    """What a refinement diagnostic needs from a stage cache: the config, stage arrays and
    reports, the scoring context, layer sizes, the training draws whitened (the memorization
    reference) and aligned (the starts, at NUTS's scale), and the OOD inputs."""
    cfg, st, reports = dfid.load_work(work, cfg_path)
    d = st["canon"]["samples"].shape[-1]
    mean, scale = st["whiten"]["mean"], st["whiten"]["scale"]
    train_canon = st["canon"]["samples"][:-1].reshape(-1, d).astype(np.float64)
    return {"cfg": cfg, "stages": st, "reports": reports, "ctx": {"cfg": cfg, "work": work, **st},
            "sizes": mlp.sizes_of(cfg, st["data"]), "train_x": ((train_canon - mean) / scale).astype(np.float32),
            "train_aligned": st["align"]["samples"][:-1].reshape(-1, d), "ood_x": evaluate.ood_inputs(cfg, st["data"])}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.diagnostics.rejuvenate")
    p.add_argument("work")
    p.add_argument("--config", required=True)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--leapfrog", type=int, default=10)
    p.add_argument("--checkpoints", default="0,1,2,5,10,20,50")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    work = Path(a.work)
    c = stage_cache(work, Path(a.config))
    cfg, st, reports, ctx, sizes = c["cfg"], c["stages"], c["reports"], c["ctx"], c["sizes"]
    train_x, train_aligned, ood_x = c["train_x"], c["train_aligned"], c["ood_x"]

    rng = np.random.default_rng(a.seed)
    starts = jnp.asarray(train_aligned[rng.integers(0, len(train_aligned), a.n)])
    logpost, _ = dfid.log_posterior_fn(cfg, st["data"], st["map"], sizes)
    init, run = dfid.make_runner(logpost, jnp.asarray(train_aligned.var(0)), a.leapfrog)
    key = jax.random.PRNGKey(a.seed)
    chains = reports["posterior"].get("chains", [])
    base = float(np.median([c["step_size"] for c in chains] or [1e-2]))
    step, trials = dfid.tune_step(init, run, starts, key, base)
    nuts_leapfrog = float(np.mean([c["mean_leapfrog_steps"] for c in chains])) if chains else float("nan")
    print(f"HMC step {step:.3g} (pilot acceptance {trials}); NUTS: {nuts_leapfrog:.0f} leapfrog steps per draw",
          flush=True)

    states = init(starts)
    jax.block_until_ready(run(states, key, 1, step))  # compile outside the timing
    rows, done, seconds = [], 0, 0.0
    for k in sorted(int(c) for c in a.checkpoints.split(",")):
        acc = float("nan")
        if k > done:
            t0 = time.time()
            states, acc = run(states, jax.random.fold_in(key, k), k - done, step)
            acc = float(jax.block_until_ready(acc))
            seconds += time.time() - t0
        done = k
        theta = np.asarray(canon.canonicalize(np.asarray(states.position), sizes), np.float32)
        row = baselines.score(ctx, {f"{k} transitions": theta}, train_x, ood_x)[0]
        rows.append({**row, "transitions": k, "gradients_per_draw": k * a.leapfrog,
                     "acceptance_since_previous": acc, "seconds_so_far": round(seconds, 2)})
    return start_sweep.report({"work": str(work), "n": a.n, "seed": a.seed, "leapfrog": a.leapfrog,
                               "step_size": step, "pilot_acceptance": trials,
                               "nuts_leapfrog_per_draw": nuts_leapfrog, "rows": rows}, a.json)


if __name__ == "__main__":
    main()
