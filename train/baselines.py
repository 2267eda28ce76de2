"""The honest comparison of issue 11 (item 4), computed at bundle time for every bundle.

Each row is a set of weight vectors scored exactly like the flow: its BMA on the eval split
against the held-out HMC chain (classification TV, NLL, ECE, agreement; regression NLL, RMSE,
90 % coverage) and its spread:

- memorization ratio: median whitened distance from each sample to its nearest flow-training
  draw, over the same for the held-out chain's draws (1: as new as HMC's draws; 0: copies);
- epistemic ratio: mean mutual information (regression: variance of the means) of the row's
  predictive over the held-out chain's, on the eval inputs and on `eval.ood_x`.

Rows, all from the flow's own training draws X (n × D, θ space, centred Xc, so that
Xcᵀw/√(n−1) with w ~ N(0, I_n) has exactly the sample covariance, singular or not):

- flow at t₀ = 0 (fresh samples) and at the bundle's default start time;
- full-covariance Gaussian: mean(X) + Xcᵀw/√(n−1);
- KDE at bandwidth h: a uniformly chosen draw + h·Xcᵀw/√(n−1), h in `bundle.kde_bandwidths`;
- the training draws themselves (a uniformly chosen subset, without replacement);
- training draw + isotropic noise (whitened σ·z, σ = the flow's median nearest-draw distance /
  √D, so its samples sit as far from the draws as the flow's do: the memorization baseline of
  Zeng et al. 2025);
- HMC (the held-out chain), the MAP net and the ensemble of the chains' start nets.
"""

import jax
import numpy as np

from . import metrics, sampler
from .evaluate import run_net, vector_field


def _thetas(ctx, anchors_x, default_t0):
    cfg = ctx["cfg"]
    ecfg, n = cfg["evaluate"], cfg["evaluate"]["flow_samples"]
    mean, scale = ctx["whiten"]["mean"], ctx["whiten"]["scale"]
    samples = ctx["canon"]["samples"]
    d = samples.shape[-1]
    train = samples[:-1].reshape(-1, d).astype(np.float64)
    rng = np.random.default_rng(ecfg["seed"] + 23)
    xc = (train - train.mean(0)) / np.sqrt(len(train) - 1)

    def correlated(k):  # k draws of Xcᵀw: zero mean, the sample covariance
        return rng.standard_normal((k, len(train))) @ xc

    field = cfg["flow"]["field"]
    out = {f"flow ({field}), t0 = 0": ctx["evaluate"]["flow_theta"]}
    if default_t0 is not None and default_t0 > 0:
        vf = vector_field(ctx["flow"])
        th, _ = sampler.sample_batched(vf, jax.random.PRNGKey(ecfg["seed"]), n, mean, scale, method=ecfg["solver"],
                                       steps=ecfg["steps"], trace=None, start_time=default_t0, anchors=anchors_x)
        out[f"flow ({field}), t0 = {default_t0:g} (default)"] = th
    out["full-covariance Gaussian"] = train.mean(0) + correlated(n)
    for h in cfg["bundle"]["kde_bandwidths"]:
        out[f"KDE h = {h:g}"] = train[rng.integers(0, len(train), n)] + h * correlated(n)
    out["training draws"] = train[rng.choice(len(train), min(n, len(train)), replace=False)]
    train_x = (train - mean) / scale
    nn_flow = metrics.nearest_distance((ctx["evaluate"]["flow_theta"] - mean) / scale, train_x)
    sigma = float(np.median(nn_flow)) / np.sqrt(d)
    noisy_x = train_x[rng.integers(0, len(train), n)] + sigma * rng.standard_normal((n, d))
    out[f"training draw + noise (σ = {sigma:.3g} whitened)"] = mean + scale * noisy_x
    out["HMC (held-out chain)"] = samples[-1]
    out["MAP"] = ctx["canon"]["reference"][None]
    out["ensemble (chain starts)"] = ctx["map"]["starts"]
    return {k: np.asarray(v, np.float32) for k, v in out.items()}, train_x


def table(ctx, anchors_x, default_t0, ood_x):
    """Rows {method, count, <predictive metrics>, memorization_ratio, epistemic_ratio_eval/_ood}."""
    thetas, train_x = _thetas(ctx, anchors_x, default_t0)
    return score(ctx, thetas, train_x, ood_x)


def score(ctx, thetas, train_x, ood_x):
    """One row per named set of weight vectors {name: θ [n, D]}, scored like the flow against the
    held-out chain; `train_x`: the flow's training draws, whitened (the memorization reference)."""
    classification = ctx["cfg"]["data"]["task"] == "classification"
    net = (ctx["work"] / "graphs" / "net.onnx").read_bytes()
    x_eval, y_eval = ctx["data"]["x_eval"], ctx["data"]["y_eval"]
    mean, scale = ctx["whiten"]["mean"], ctx["whiten"]["scale"]
    sigma = float(ctx["map"]["noise_sigma"]) * ctx["data"]["y_std"].astype(np.float64)
    hmc_probs = ctx["evaluate"].get("hmc_probs")
    held = np.asarray(ctx["canon"]["samples"][-1], np.float32)
    nn_held = float(np.median(metrics.nearest_distance((held - mean) / scale, train_x)))
    epi_held = {w: metrics.epistemic(run_net(net, x, held), classification)
                for w, x in (("eval", x_eval), ("ood", ood_x))}
    rows = []
    for name, th in thetas.items():
        out = run_net(net, x_eval, th)
        if classification:
            m = (metrics.classification(y_eval, logits=out[0], ref_probs=hmc_probs) if len(th) == 1 else
                 metrics.classification(y_eval, probs=metrics.bma_probs(out).astype(np.float32), ref_probs=hmc_probs))
            pred = {k: m[k] for k in ("tv", "nll", "ece", "agreement")}
        else:
            m = metrics.regression(y_eval, *metrics.bma_gaussian(out, sigma))
            pred = {k: m[k] for k in ("nll", "rmse", "coverage90")}
        nn = metrics.nearest_distance((th - mean) / scale, train_x)
        epi_ood = metrics.epistemic(run_net(net, ood_x, th), classification)
        rows.append({"method": name, "count": int(len(th)), **pred,
                     "memorization_ratio": float(np.median(nn)) / nn_held,
                     "epistemic_ratio_eval": metrics.epistemic(out, classification) / epi_held["eval"],
                     "epistemic_ratio_ood": epi_ood / epi_held["ood"]})
        print(f"  baseline {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[-1].items()
                                                 if isinstance(v, float)), flush=True)
    return rows
