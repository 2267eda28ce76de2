"""The start-time sweep of a flow trained on fully whitened draws (docs/fidelity.md, Directions 1).

`python -m train.diagnostics.full_whitening WORK --config CFG [--steps N] [--start-times 0,0.8,0.9]
[--thin K] [--json OUT]`

The stage's flow sees per-coordinate whitened draws x = (θ − mean) / scale. Here the same field
and schedule (the config's [flow] table, `--steps` to override) is trained on draws whitened with
the Cholesky factor L of their covariance, Σ + ridge = L Lᵀ (ridge 1e-6 · tr Σ / D: Σ has rank
≤ n − 1 when D ≥ n):

    x = L⁻¹ (θ − μ),   θ = μ + L x,   log|det ∂θ/∂x| = Σ_i log L_ii,

and sampled at each start time with the anchors whitened the same way (f16-rounded, every K-th
training draw). The rows are evaluate.start_time_sweep's, with the memorization ratio still
measured in the per-coordinate whitened coordinates, so they compare with the bundle's own sweep
(`train.diagnostics.start_sweep`)."""

import time

import numpy as np
from scipy.linalg import solve_triangular

from . import start_sweep
from .fidelity_baselines import cholesky_whitening  # the baselines' Σ + ridge = L Lᵀ
from .. import evaluate, flow as flow_mod


def main(argv=None):
    p = start_sweep.parser("python -m train.diagnostics.full_whitening", "0,0.5,0.8,0.9,0.95")
    p.add_argument("--steps", type=int, default=None)
    a = p.parse_args(argv)
    work, cfg, st = start_sweep.load(a)
    samples = st["canon"]["samples"]
    d = samples.shape[-1]
    train, held = samples[:-1].reshape(-1, d), samples[-1]
    mu, chol = cholesky_whitening(train)

    def to_x(theta):
        return solve_triangular(chol, (np.asarray(theta, np.float64) - mu).T, lower=True).T.astype(np.float32)

    def to_theta(x):
        return (mu + np.asarray(x, np.float64) @ chol.T).astype(np.float32)

    fcfg = dict(cfg["flow"], **({"steps": a.steps} if a.steps else {}))
    started = time.time()
    params, report = flow_mod.train(to_x(train), to_x(held), fcfg, cfg["seed"])
    print(f"flow on fully whitened draws: {time.time() - started:.0f} s, held-out loss "
          f"{report.get('final_heldout_loss_ema')}", flush=True)
    anchors = to_x(train[::a.thin]).astype(np.float16).astype(np.float32)
    ctx = {"cfg": cfg, "work": work, **st}
    rows, hmc_epi, _ = evaluate.start_time_sweep(
        ctx, anchors, evaluate.ood_inputs(cfg, st["data"]),
        vfield=lambda t, x: flow_mod.velocity(params, t, x), to_theta=to_theta)
    return start_sweep.report({"work": str(work), "steps": fcfg["steps"], "anchors": int(len(anchors)), "thin": a.thin,
                               "log_det": float(np.sum(np.log(np.diag(chol)))), "rows": rows,
                               "hmc_epistemic": hmc_epi}, a.json)


if __name__ == "__main__":
    main()
