"""Refinement settings on a stage cache: trajectory length, preconditioner and step size, with the
shipped kernel (train/refine.py) and its step tuning (docs/fidelity.md, "Trajectory length").

`python -m train.diagnostics.refine_settings WORK --config CFG [--mass diag,dense0.1,lr64]
[--leapfrog 200] [--checkpoints 0,1,2,4] [--n 400] [--step EPS] [--seed 1] [--json OUT]`

Starts: `--n` aligned training draws (chains 1-4, the stored draws' source), chosen uniformly.
Every preconditioner is a linear map θ = μ + A u under which the kernel runs with unit mass
(identity inverse mass in u), which is HMC with mass matrix (A Aᵀ)⁻¹ in θ:

    diag      A = diag(sd)                        (the shipped refine.inverse_mass = sd²)
    denseλ    A = chol((1 − λ) Σ + λ diag Σ)       (Σ: the draws' covariance)
    lrR       A = diag(sd) (I + Q (diag √e − I) Qᵀ) (top-R eigenpairs (e, Q) of the draws'
                                                    correlation matrix; the rest at unit scale)

The step is `refine.tune_step`'s (0.65 pilot acceptance over 5 transitions from 128 starts) on
the grid NUTS step · 2^k (diag) or 16 · NUTS step · 2^k (the others, which may allow larger
steps), unless `--step` fixes it. Rows are scored like the bundle's refinement sweep against
the held-out chain (TV/NLL/ECE or NLL/RMSE/coverage, memorization ratio, epistemic ratios)."""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import rejuvenate
from .. import baselines, canon, refine


def preconditioner(mode, draws):
    """A [D, D] with θ = μ + A u for one `--mass` mode (see the module docs)."""
    d = draws.shape[1]
    sd = np.sqrt(draws.var(0))
    if mode == "diag":
        return np.diag(sd)
    if mode.startswith("dense"):
        lam = float(mode[5:] or 0.0)
        cov = np.cov(draws, rowvar=False)
        c = (1 - lam) * cov + lam * np.diag(np.diag(cov))
        return np.linalg.cholesky(c + 1e-10 * np.trace(c) / d * np.eye(d))
    if mode.startswith("lr"):
        r = int(mode[2:])
        z = (draws - draws.mean(0)) / sd
        _, s, vt = np.linalg.svd(z, full_matrices=False)
        e, q = s[:r] ** 2 / (len(z) - 1), vt[:r].T
        return np.diag(sd) @ (np.eye(d) + q @ np.diag(np.sqrt(e) - 1) @ q.T)
    raise SystemExit(f"unknown --mass {mode!r} (diag, denseLAMBDA, lrRANK)")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.diagnostics.refine_settings")
    p.add_argument("work")
    p.add_argument("--config", required=True)
    p.add_argument("--mass", default="diag")
    p.add_argument("--leapfrog", type=int, default=200)
    p.add_argument("--checkpoints", default="0,1,2,4")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--step", type=float, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    work = Path(a.work)
    c = rejuvenate.stage_cache(work, Path(a.config))
    cfg, st, reports, ctx, sizes = c["cfg"], c["stages"], c["reports"], c["ctx"], c["sizes"]
    train_x, ood_x = c["train_x"], c["ood_x"]
    draws = c["train_aligned"].astype(np.float64)
    d = draws.shape[1]
    starts = draws[np.random.default_rng(a.seed).integers(0, len(draws), a.n)]
    logd = refine.log_posterior_of(cfg, st["data"], st["map"]["noise_sigma"], sizes)
    nuts_step = float(np.median([c["step_size"] for c in reports["posterior"]["chains"]]))
    mu = jnp.asarray(draws.mean(0), jnp.float32)
    checkpoints = sorted(int(c) for c in a.checkpoints.split(","))
    out = {"work": str(work), "n": a.n, "seed": a.seed, "leapfrog": a.leapfrog, "nuts_step": nuts_step, "modes": {}}
    for mode in a.mass.split(","):
        A = preconditioner(mode, draws)
        a_f = jnp.asarray(A, jnp.float32)
        kernel = refine.make_kernel(lambda u, a_f=a_f: logd(mu + a_f @ u), np.ones(d, np.float32), a.leapfrog)
        u = jnp.asarray((starts - np.asarray(mu)) @ np.linalg.inv(A).T, jnp.float32)
        key = jax.random.PRNGKey(a.seed)
        base = nuts_step * (1 if mode == "diag" else 16)
        step, trials = refine.tune_step(kernel, u[:128], jax.random.fold_in(key, 101), base)
        step = a.step if a.step is not None else step
        print(f"{mode}: step {step:.4g} (pilot acceptance {trials})", flush=True)
        rows, done, seconds = [], 0, 0.0
        for k in checkpoints:
            acc = float("nan")
            if k > done:
                t0 = time.time()
                u, acc = refine.hmc(jax.random.fold_in(key, k), u, None, None, step, a.leapfrog, k - done, kernel=kernel)
                seconds += time.time() - t0
            done = k
            theta = np.asarray(canon.canonicalize(np.asarray(mu + jnp.asarray(u) @ a_f.T, np.float64), sizes),
                               np.float32)
            row = baselines.score(ctx, {f"{mode} K={k}": theta}, train_x, ood_x)[0]
            rows.append({**row, "transitions": k, "gradients_per_draw": k * a.leapfrog, "acceptance_since_previous": acc,
                         "seconds_so_far": round(seconds, 1)})
        out["modes"][mode] = {"step": step, "pilot_acceptance": trials, "rows": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
