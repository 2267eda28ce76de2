"""Baselines a flow's BMA must beat, from the same aligned, canonical training samples
(classification bundles), scored against the held-out HMC chain like `evaluate.py` does:

  fullcov_gaussian   N(mean, sample covariance)
  kde_h{h}           training sample + h · (Cholesky factor of the sample covariance) · z
  kde_diag_h{h}      training sample + h · (per-coordinate sd) ⊙ z
  lowrank_r{r}       Gaussian with the top-r principal components of the sample covariance plus
                     a diagonal for the variance they miss (what a rank-r whitening basis keeps)
  pca_flow           (with --pca-flow-steps N) the pipeline's flow trained for N steps on
                     samples whitened with the full Cholesky factor instead of per coordinate
  lowrank_flow_r{r}  (with --lowrank-flow-steps N --rank r) the flow trained on per-coordinate
                     whitened samples u further whitened along their top-r principal directions B
                     (variances λ) and by one scalar ρ on the rest (`lowrank_whitening`), the map
                     a `flow.whiten.basis` bundle tensor would carry (docs/fidelity.md)

    .venv/bin/python -m train.diagnostics.fidelity_baselines WORKDIR CONFIG [--n 400] [--pca-flow-steps N] [--json OUT]

WORKDIR is a pipeline work dir (`work/NAME`, made by `python -m train build`), CONFIG its toml.
docs/fidelity.md has the results for moons and digits."""

import argparse
import json
from pathlib import Path

import jax
import numpy as np
from scipy.linalg import solve_triangular

from .. import config, flow as flow_mod, metrics, sampler
from ..export import run_net


def score(net, x_eval, y_eval, hmc, theta):
    return metrics.classification(y_eval, probs=metrics.bma_probs(run_net(net, x_eval, theta)), ref_probs=hmc)


def lowrank_whitening(u_train, rank):
    """Whitening of (already per-coordinate standardized) samples along their top-`rank`
    principal directions B (orthonormal columns, sample variances λ) and, on the orthogonal
    complement, by one scalar ρ (the root-mean residual variance):
    x = B λ^-½ Bᵀu + (u − BBᵀu)/ρ,  u = B λ^½ Bᵀx + ρ(x − BBᵀx),
    log|det ∂u/∂x| = ½ Σ log λ + (D − r) log ρ. Returns (to_x, to_u, rank used)."""
    u_c = u_train - u_train.mean(0)
    _, sv, vt = np.linalg.svd(u_c, full_matrices=False)
    r = min(rank, int(np.sum(sv > 1e-8 * sv[0])))
    basis, lam = vt[:r].T, sv[:r] ** 2 / (len(u_train) - 1)
    d = u_train.shape[1]
    resid = u_c - (u_c @ basis) @ basis.T
    rho = float(np.sqrt(np.sum(resid**2) / (len(u_train) - 1) / max(d - r, 1))) if d > r else 1.0

    def to_x(u):
        p = u @ basis
        return (p * lam**-0.5) @ basis.T + (u - p @ basis.T) / rho

    def to_u(x):
        p = x @ basis
        return (p * lam**0.5) @ basis.T + rho * (x - p @ basis.T)

    return to_x, to_u, r


def cholesky_whitening(train):
    """(μ, L) of training draws [n,D] (float64): Σ + ridge = L Lᵀ, ridge 10⁻⁶ tr Σ / D (Σ has
    rank ≤ n − 1 when D ≥ n)."""
    train = np.asarray(train, np.float64)
    d = train.shape[1]
    cov = np.cov(train, rowvar=False)
    cov += 1e-6 * np.trace(cov) / d * np.eye(d)
    return train.mean(0), np.linalg.cholesky(cov)


def train_and_sample(cfg, steps, train_x, held_x, n):
    """The pipeline's flow trained for `steps` on whitened samples; n draws (x space, float64)."""
    d = train_x.shape[1]
    params, _ = flow_mod.train(train_x.astype(np.float32), held_x.astype(np.float32),
                               dict(cfg["flow"], steps=steps), cfg["seed"])
    x, _ = sampler.sample_batched(lambda t, z: flow_mod.velocity(params, t, z), jax.random.PRNGKey(0), n,
                                  np.zeros(d, np.float32), np.ones(d, np.float32), method="rk4", steps=20)
    return np.asarray(x, np.float64)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work")
    ap.add_argument("config")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--pca-flow-steps", type=int, default=0)
    ap.add_argument("--lowrank-flow-steps", type=int, default=0)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--json")
    a = ap.parse_args()
    work, cfg = Path(a.work), config.load(a.config)
    if cfg["data"]["task"] != "classification":
        raise SystemExit("classification bundles only")
    canon, data = np.load(work / "canon.npz"), np.load(work / "data.npz")
    samples = canon["samples"]
    d = samples.shape[-1]
    train = samples[:-1].reshape(-1, d).astype(np.float64)  # the flow's training set (last chain held out)
    held = samples[-1]
    mu, chol = cholesky_whitening(train)
    sd = train.std(0)
    net = (work / "graphs" / "net.onnx").read_bytes()
    x_eval, y_eval = data["x_eval"], data["y_eval"]
    hmc = metrics.bma_probs(run_net(net, x_eval, held)).astype(np.float32)
    rng = np.random.default_rng(0)
    n = a.n
    res = {"fullcov_gaussian": score(net, x_eval, y_eval, hmc,
                                     (mu + rng.standard_normal((n, d)) @ chol.T).astype(np.float32))}
    for h in (0.0, 0.1, 0.2, 0.3, 0.5, 1.0):
        centers = train[rng.choice(len(train), n)]
        res[f"kde_h{h}"] = score(net, x_eval, y_eval, hmc,
                                 (centers + h * rng.standard_normal((n, d)) @ chol.T).astype(np.float32))
        res[f"kde_diag_h{h}"] = score(net, x_eval, y_eval, hmc,
                                      (centers + h * sd * rng.standard_normal((n, d))).astype(np.float32))
    x_c = train - mu
    _, sv, vt = np.linalg.svd(x_c, full_matrices=False)
    lam = sv**2 / (len(train) - 1)
    for r in (16, 64, 256, 512):
        if r >= min(len(train) - 1, d):
            continue
        basis = vt[:r].T
        resid = np.maximum(x_c.var(0, ddof=1) - (basis**2 * lam[:r]).sum(1), 1e-12)
        z_r, z_d = rng.standard_normal((n, r)), rng.standard_normal((n, d))
        theta = mu + (z_r * np.sqrt(lam[:r])) @ basis.T + z_d * np.sqrt(resid)
        res[f"lowrank_r{r}"] = score(net, x_eval, y_eval, hmc, theta.astype(np.float32))
    if a.pca_flow_steps:
        white = lambda th: solve_triangular(chol, (np.asarray(th, np.float64) - mu).T, lower=True).T
        x = train_and_sample(cfg, a.pca_flow_steps, white(train), white(held), n)
        res["pca_flow"] = score(net, x_eval, y_eval, hmc, (mu + x @ chol.T).astype(np.float32))
    if a.lowrank_flow_steps:
        u_train, u_held = (train - mu) / sd, (held - mu) / sd
        to_x, to_u, r = lowrank_whitening(u_train, a.rank)
        x = train_and_sample(cfg, a.lowrank_flow_steps, to_x(u_train), to_x(u_held), n)
        res[f"lowrank_flow_r{r}"] = score(net, x_eval, y_eval, hmc, (mu + sd * to_u(x)).astype(np.float32))
    for k, v in res.items():
        print(f"{k:18s} tv {v['tv']:.3f} nll {v['nll']:.3f} accuracy {v['accuracy']:.3f} agreement {v['agreement']:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
