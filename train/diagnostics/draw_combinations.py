"""New networks from combinations of stored draws, without a flow (docs/fidelity.md, "Combinations
of stored draws").

`python -m train.diagnostics.draw_combinations WORK --config CFG [--n 400] [--seed 1] [--json OUT]`

The aligned, canonical training draws a, b, c (uniformly chosen, independently per sample) give
weight vectors off the draws themselves:

    convex, w fixed:        θ = w a + (1 − w) b                      (w = 0.5: the midpoint)
    convex, w ~ U(0, 1):    θ = w a + (1 − w) b
    rotation by φ:          θ = μ + cos φ (a − μ) + sin φ (b − μ)    (μ: the draws' mean)
    difference, step γ:     θ = a + γ (b − c)
    unit crossover, p:      θ = a with each hidden unit's incoming weights, bias and outgoing
                            weights taken from b with probability p

A rotation keeps the mean and covariance of the draws for every φ (a Gaussian posterior would be
reproduced exactly); a convex combination shrinks the spread (covariance (w² + (1 − w)²) Σ about
μ) but stays on the segment between two draws, which alignment makes low-loss when the posterior
is linearly mode-connected; a difference step moves a draw along the draws' own spread (the
proposal of differential-evolution MCMC, here without the accept step); a crossover keeps
units whole, which alignment has matched across draws. Each row is scored like
the bundle stage's honest comparison (train/baselines.py): TV, NLL, ECE against the held-out
chain, memorization ratio, epistemic ratios."""

import argparse
from pathlib import Path

import numpy as np

from . import diagnose_fidelity as dfid, start_sweep
from .. import baselines, evaluate, mlp

WEIGHTS = (0.5,)
ANGLES = (0.15, 0.3, 0.5, np.pi / 4)
STEPS = (0.1, 0.2, 0.3, 0.5)
CROSSOVER = (0.1, 0.25, 0.5)


def unit_crossover(a, b, sizes, p, rng):
    """a with each hidden unit (its row of W_l, b_l entry and column of W_{l+1}) from b w.p. p."""
    out = a.copy()
    layers, _ = mlp.layout(sizes)
    for (d_in, d_out, w_off, b_off), (n_in, n_out, w2_off, _) in zip(layers[:-1], layers[1:]):
        for j in range(d_out):
            idx = np.r_[w_off + j * d_in:w_off + (j + 1) * d_in, b_off + j, w2_off + j:w2_off + n_out * n_in:n_in]
            pick = np.flatnonzero(rng.random(len(a)) < p)
            out[np.ix_(pick, idx)] = b[np.ix_(pick, idx)]
    return out


def combinations(train, n, rng, sizes=None):
    """{row name: θ [n, D]} for the combinations above, from training draws `train` [m, D]
    (the crossovers only with the network's layer `sizes`)."""
    a, b, c = (train[rng.integers(0, len(train), n)] for _ in range(3))
    mu = train.mean(0)
    rows = {"training draws": a}
    for w in WEIGHTS:
        rows[f"convex, w = {w:g}"] = w * a + (1 - w) * b
    w = rng.uniform(size=(n, 1))
    rows["convex, w ~ U(0, 1)"] = w * a + (1 - w) * b
    for phi in ANGLES:
        rows[f"rotation, φ = {phi:.3g}"] = mu + np.cos(phi) * (a - mu) + np.sin(phi) * (b - mu)
    for g in STEPS:
        rows[f"difference, γ = {g:g}"] = a + g * (b - c)
    for p in CROSSOVER if sizes is not None else ():
        rows[f"unit crossover, p = {p:g}"] = unit_crossover(a, b, sizes, p, rng)
    return {k: np.asarray(v, np.float32) for k, v in rows.items()}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.diagnostics.draw_combinations")
    p.add_argument("work")
    p.add_argument("--config", required=True)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    work = Path(a.work)
    cfg, st, _ = dfid.load_work(work, Path(a.config))
    ctx = {"cfg": cfg, "work": work, **st}
    d = st["canon"]["samples"].shape[-1]
    train = st["canon"]["samples"][:-1].reshape(-1, d).astype(np.float64)
    mean, scale = st["whiten"]["mean"], st["whiten"]["scale"]
    train_x = ((train - mean) / scale).astype(np.float32)
    thetas = combinations(train, a.n, np.random.default_rng(a.seed), mlp.sizes_of(cfg, st["data"]))
    rows = baselines.score(ctx, thetas, train_x, evaluate.ood_inputs(cfg, st["data"]))
    return start_sweep.report({"work": str(work), "n": a.n, "seed": a.seed, "rows": rows}, a.json)


if __name__ == "__main__":
    main()
