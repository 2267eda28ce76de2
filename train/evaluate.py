"""Evaluation on the eval split of every posterior approximation, side by side:
flow BMA (JAX sampler, the runtime's default solver), HMC BMA (held-out chain), the MAP net,
a deep ensemble (the chains' start nets), and Gaussian noise around the MAP with the
posterior's per-coordinate sd. All predictions go through the exported net.onnx, and the
HMC/MAP numbers are computed from exactly the float32 arrays written to the bundle."""

import jax
import numpy as np
from sklearn.metrics import roc_auc_score

from . import flow as flow_mod
from . import metrics, sampler
from .export import run_net


def _nearest_distance(a, b, chunk=256):
    """For each row of a, the Euclidean distance to its nearest row of b."""
    b2 = np.sum(b.astype(np.float64) ** 2, axis=1)
    out = []
    for i in range(0, len(a), chunk):
        x = a[i:i + chunk].astype(np.float64)
        d2 = np.sum(x**2, axis=1)[:, None] + b2[None, :] - 2 * x @ b.T.astype(np.float64)
        out.append(np.sqrt(np.maximum(d2.min(axis=1), 0.0)))
    return np.concatenate(out)


def _grid(data):
    """Plotting grid in raw feature space (2-D: plane; 1-D: line through and past the data)."""
    x = np.concatenate([data["x_train"], data["x_eval"]])
    lo, hi = x.min(0), x.max(0)
    pad = 0.5 * (hi - lo)
    if x.shape[1] == 2:
        g0, g1 = np.meshgrid(np.linspace(lo[0] - pad[0] / 2, hi[0] + pad[0] / 2, 80),
                             np.linspace(lo[1] - pad[1] / 2, hi[1] + pad[1] / 2, 80))
        return np.stack([g0.ravel(), g1.ravel()], 1).astype(np.float32), g0.shape
    if x.shape[1] == 1:
        return np.linspace(lo[0] - pad[0], hi[0] + pad[0], 300)[:, None].astype(np.float32), (300,)
    return None, None


def run(cfg, data, map_out, canon_out, whiten_out, flow_params, net_bytes):
    ecfg, task = cfg["evaluate"], cfg["data"]["task"]
    samples = canon_out["samples"]
    d = samples.shape[-1]
    train_set = samples[:-1].reshape(-1, d)
    held = samples[-1]
    ref = canon_out["reference"]
    params = flow_mod.unflatten_params(flow_params)
    vfield = lambda t, x: flow_mod.velocity(params, t, x)
    key = jax.random.PRNGKey(ecfg["seed"])
    flow_theta, _ = sampler.sample_batched(
        vfield, key, ecfg["flow_samples"], whiten_out["mean"], whiten_out["scale"],
        method=ecfg["solver"], steps=ecfg["steps"], trace=None)
    _, logq = sampler.sample_batched(
        vfield, jax.random.fold_in(key, 1), 32, whiten_out["mean"], whiten_out["scale"],
        method=ecfg["solver"], steps=ecfg["steps"], trace="hutchinson", probes=1)
    rng = np.random.default_rng(ecfg["seed"] + 11)
    post_sd = train_set.std(axis=0)
    gauss_theta = (ref[None] + post_sd[None] * rng.standard_normal((ecfg["gaussian_samples"], d))).astype(np.float32)
    thetas = {"flow": flow_theta, "hmc": held, "map": ref[None], "ensemble": map_out["starts"],
              "gaussian": gauss_theta}
    x_eval, y_eval = data["x_eval"], data["y_eval"]
    outs = {m: run_net(net_bytes, x_eval, th) for m, th in thetas.items()}

    arrays, table = {"flow_theta": flow_theta}, {}
    if task == "classification":
        hmc_probs = metrics.bma_probs(outs["hmc"]).astype(np.float32)
        arrays["hmc_probs"] = hmc_probs
        for m, out in outs.items():
            if m == "map":
                table[m] = metrics.classification(y_eval, logits=out[0], ref_probs=hmc_probs)
                arrays["probs_map"] = np.exp(metrics.log_softmax(out[0].astype(np.float64), axis=1))
            else:
                probs = hmc_probs if m == "hmc" else metrics.bma_probs(out).astype(np.float32)
                table[m] = metrics.classification(y_eval, probs=probs, ref_probs=None if m == "hmc" else hmc_probs)
                arrays[f"probs_{m}"] = probs
    else:
        sigma = float(map_out["noise_sigma"]) * data["y_std"].astype(np.float64)
        for m, out in outs.items():
            mean, var = metrics.bma_gaussian(out, sigma)
            if m == "hmc":  # the bundle stores these as float32: score exactly what is stored
                mean, var = mean.astype(np.float32), var.astype(np.float32)
                arrays["hmc_mean"], arrays["hmc_var"] = mean, var
            table[m] = metrics.regression(y_eval, mean, var)
        arrays["noise_sigma_raw"] = sigma.astype(np.float32)

    # diagnostic, not a method: how convex is the aligned posterior in weight space? BMA over
    # mid-points of random pairs of training samples (a flow that interpolates between
    # samples cannot do better than the weight-space geometry allows)
    pairs = rng.choice(len(train_set), (ecfg["flow_samples"], 2))
    mid_out = run_net(net_bytes, x_eval, 0.5 * (train_set[pairs[:, 0]] + train_set[pairs[:, 1]]))
    if task == "classification":
        diagnostics = {"pair_midpoints": metrics.classification(
            y_eval, probs=metrics.bma_probs(mid_out).astype(np.float32), ref_probs=arrays["hmc_probs"])}
    else:
        diagnostics = {"pair_midpoints": metrics.regression(y_eval, *metrics.bma_gaussian(mid_out, sigma))}

    nn_flow = _nearest_distance(flow_theta, train_set)
    nn_held = _nearest_distance(held, train_set)
    report = {
        "methods": table,
        "memorization": {
            "nearest_train_distance_flow": {"mean": float(nn_flow.mean()), "median": float(np.median(nn_flow))},
            "nearest_train_distance_heldout_hmc": {"mean": float(nn_held.mean()), "median": float(np.median(nn_held))},
            "note": "Euclidean, canonical weight space; flow samples much closer to training samples "
                    "than held-out HMC samples are would mean memorization",
        },
        "flow_log_density_hutchinson": {"n": 32, "mean": float(np.mean(logq)), "sd": float(np.std(logq))},
        "counts": {m: int(len(th)) for m, th in thetas.items()},
        "diagnostics": diagnostics,
    }

    grid, shape = _grid(data)
    if grid is not None:
        arrays["grid_x"] = grid
        for m in ("flow", "hmc"):
            out = run_net(net_bytes, grid, thetas[m])
            if task == "classification":
                arrays[f"grid_entropy_{m}"] = metrics.entropy(metrics.bma_probs(out)).reshape(shape)
                arrays[f"grid_mi_{m}"] = metrics.mutual_information(out).reshape(shape)
            else:
                arrays[f"grid_mean_{m}"] = out.mean(0)[:, 0]
                arrays[f"grid_epi_var_{m}"] = out.var(0)[:, 0]

    if ecfg["ood"] and task == "classification":
        report["ood"] = ood(net_bytes, thetas, x_eval, rng)
    print(f"  evaluation: {table}", flush=True)
    return arrays, report


def ood(net_bytes, thetas, x_eval, rng):
    """AUROC of telling eval inputs from out-of-distribution ones: uniform-noise images in the
    data's range, and eval images with shuffled pixels. Scores: mutual information (epistemic)
    and predictive entropy."""
    lo, hi = float(x_eval.min()), float(x_eval.max())
    sets = {
        "uniform_noise": rng.uniform(lo, hi, x_eval.shape).astype(np.float32),
        "shuffled_pixels": np.stack([row[rng.permutation(len(row))] for row in x_eval]).astype(np.float32),
    }
    res = {}
    for m, th in thetas.items():
        out_in = run_net(net_bytes, x_eval, th)
        res[m] = {}
        for name, x_ood in sets.items():
            out_ood = run_net(net_bytes, x_ood, th)
            labels = np.r_[np.zeros(len(x_eval)), np.ones(len(x_ood))]
            ent = np.r_[metrics.entropy(metrics.bma_probs(out_in)), metrics.entropy(metrics.bma_probs(out_ood))]
            res[m][name] = {"auroc_entropy": float(roc_auc_score(labels, ent))}
            if len(th) > 1:
                mi = np.r_[metrics.mutual_information(out_in), metrics.mutual_information(out_ood)]
                res[m][name]["auroc_mutual_information"] = float(roc_auc_score(labels, mi))
    return res
