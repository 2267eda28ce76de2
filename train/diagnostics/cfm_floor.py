"""What the CFM objective rewards on a work dir's draws: the held-out CFM loss of trained fields
beside two closed-form fields, on the exact held-out pairs `flow.train` scores (the last chain's
whitened draws, minibatch-OT-coupled noise, uniform t, σ = flow.sigma, numpy seed + 1).

  gaussian   E[x₁ − x₀ | x_t] for x₁ ~ N(μ, Σ) (mean and covariance of the whitened training
             draws) and independent x₀ ~ N(0, I): μ + (tΣ − (1 − t)I) S_t⁻¹ (x − tμ),
             S_t = (1 − t)² I + t² Σ + σ² I (the field whose flow is that Gaussian)
  empirical  the same conditional mean for x₁ uniform on the n training draws a_i (the field
             that reproduces them, i.e. memorizes): with s² = (1 − t)² + σ²,
             w_i ∝ exp(−|x − t a_i|² / 2s²),  v = Σ_i w_i (a_i − (1 − t)(x − t a_i)/s²)

Both are optimal for independent coupling, not for the OT-coupled pairs the fields train on, so
they are references, not floors. Rows per t-bin show where along the path each field loses.

    .venv/bin/python -m train.diagnostics.cfm_floor WORK CONFIG [NAME=params.npz ...] [--json OUT]"""

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from .. import flow as flow_mod
from .field_trial import load_work, whitened

BINS = [(0.0, 0.5), (0.5, 0.8), (0.8, 0.9), (0.9, 1.0)]


def heldout_pairs(train_x, held_x, fcfg, seed):
    """flow.train's held-out draws, verbatim: (x₀, x₁, t, noise)."""
    h_rng = np.random.default_rng(seed + 1)
    m = min(len(held_x), 512)
    hx1 = held_x[:m]
    hx0 = flow_mod.couple(h_rng.standard_normal(hx1.shape).astype(np.float32), hx1, fcfg["coupling"])
    ht = h_rng.uniform(size=m).astype(np.float32)
    hnoise = h_rng.standard_normal(hx1.shape).astype(np.float32)
    return hx0, hx1, ht, hnoise


def gaussian_field(train_x, sigma):
    mu = train_x.mean(0).astype(np.float64)
    lam, u = np.linalg.eigh(np.cov(train_x.astype(np.float64), rowvar=False))
    lam = np.maximum(lam, 0.0)

    def v(t, x):
        t = t[:, None]
        z = (x - t * mu) @ u
        gain = (t * lam - (1 - t)) / ((1 - t) ** 2 + t**2 * lam + sigma**2)
        return mu + (gain * z) @ u.T
    return v


def empirical_field(anchors, sigma):
    a = anchors.astype(np.float64)

    def v(t, x):
        out = np.empty_like(x)
        for k in range(len(x)):
            s2 = (1 - t[k]) ** 2 + sigma**2
            d = x[k] - t[k] * a  # [n, D]
            logw = -np.sum(d**2, 1) / (2 * s2)
            w = np.exp(logw - logsumexp(logw))
            out[k] = w @ (a - (1 - t[k]) * d / s2)
        return out
    return v


def losses(v, x0, x1, t, noise, sigma):
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1 + sigma * noise
    per = np.sum((np.asarray(v(t, xt), np.float64) - (x1 - x0)) ** 2, 1) / x0.shape[1]
    row = {"all": float(per.mean())}
    for lo, hi in BINS:
        m = (t >= lo) & (t < hi)
        row[f"t in [{lo:g}, {hi:g})"] = float(per[m].mean())
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work")
    ap.add_argument("config")
    ap.add_argument("fields", nargs="*", help="NAME=params.npz")
    ap.add_argument("--json")
    a = ap.parse_args()
    ctx = load_work(a.work, a.config)
    fcfg, seed = ctx["cfg"]["flow"], ctx["cfg"]["seed"]
    sigma = float(fcfg["sigma"])
    train_x, held_x = whitened(ctx)
    x0, x1, t, noise = (np.asarray(z, np.float64) for z in heldout_pairs(train_x, held_x, fcfg, seed))
    rows = {"gaussian (closed form)": losses(gaussian_field(train_x, sigma), x0, x1, t, noise, sigma),
            "empirical training draws (closed form)": losses(empirical_field(train_x, sigma), x0, x1, t, noise, sigma)}
    entries = [("flow (work dir)", str(Path(a.work) / "flow.npz"))] + [e.split("=", 1) for e in a.fields]
    for name, path in entries:
        params = flow_mod.unflatten_params(dict(np.load(path)))

        def v(tt, xx, params=params):
            return np.asarray(flow_mod.velocity(params, jnp.asarray(tt, jnp.float32), jnp.asarray(xx, jnp.float32)))
        rows[name] = losses(v, x0, x1, t, noise, sigma)
    for k, r in rows.items():
        print(f"{k:45s} " + "  ".join(f"{b} {x:.3f}" for b, x in r.items()), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
