"""Evaluation on the eval split of every posterior approximation, side by side:
flow BMA (fresh samples, t₀ = 0; JAX sampler, the evaluation solver), HMC BMA (held-out chain), the MAP net,
a deep ensemble (the chains' start nets), and Gaussian noise around the MAP with the
posterior's per-coordinate sd. All predictions go through the exported net.onnx, and the
HMC/MAP numbers are computed from exactly the float32 arrays written to the bundle."""

import jax
import numpy as np
from sklearn.metrics import roc_auc_score

from . import flow as flow_mod
from . import metrics, sampler, sphere
from .export import run_net


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
    vfield = vector_field(flow_params)
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

    nn_flow = metrics.nearest_distance(flow_theta, train_set)
    nn_held = metrics.nearest_distance(held, train_set)
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


# --- start times: anchors (stored training draws) and the family between noise and the draws ---

def vector_field(flow_params):
    """The flow's velocity v(t [B], x [B,D]) from the cached flow-stage parameters."""
    flat, geometry = sphere.split_params(flow_params)
    params = flow_mod.unflatten_params(flat)
    return sphere.Field(lambda t, x: flow_mod.velocity(params, t, x), geometry)


def ood_inputs(cfg, data):
    """Out-of-distribution inputs in raw feature space (what net.onnx takes), fixed seed:
    max(N_eval, 100) rows with each feature uniform in (mean ± 4 sd) of the training features;
    with `evaluate.ood` (digits) also the sets of `ood()`: uniform noise in the eval data's range
    and eval images with shuffled pixels."""
    x_tr, x_ev = data["x_train"].astype(np.float64), data["x_eval"]
    rng = np.random.default_rng(cfg["evaluate"]["seed"] + 4242)
    mu, sd = x_tr.mean(0), x_tr.std(0)
    parts = [rng.uniform(mu - 4 * sd, mu + 4 * sd, (max(len(x_ev), 100), x_tr.shape[1]))]
    if cfg["evaluate"]["ood"] and cfg["data"]["task"] == "classification":
        parts.append(rng.uniform(float(x_ev.min()), float(x_ev.max()), x_ev.shape))
        parts.append(np.stack([row[rng.permutation(len(row))] for row in x_ev]))
    return np.concatenate(parts).astype(np.float32)


def _predictive_row(classification, y, out, hmc_probs, sigma):
    if classification:
        m = metrics.classification(y, probs=metrics.bma_probs(out).astype(np.float32), ref_probs=hmc_probs)
        return {k: m[k] for k in ("tv", "nll", "ece", "agreement")}, m
    m = metrics.regression(y, *metrics.bma_gaussian(out, sigma))
    return {k: m[k] for k in ("nll", "rmse", "coverage90")}, m


def bma_metrics(ctx, thetas):
    """Predictive metrics of the BMA over `thetas` [S,D] on the eval split, against HMC."""
    classification = ctx["cfg"]["data"]["task"] == "classification"
    net_bytes = (ctx["work"] / "graphs" / "net.onnx").read_bytes()
    out = run_net(net_bytes, ctx["data"]["x_eval"], thetas)
    sigma = float(ctx["map"]["noise_sigma"]) * ctx["data"]["y_std"].astype(np.float64)
    return _predictive_row(classification, ctx["data"]["y_eval"], out, ctx["evaluate"].get("hmc_probs"), sigma)[1]


def start_time_sweep(ctx, anchors_x, ood_x, vfield=None, to_theta=None):
    """Flow samples at each start time t₀ (same seed, solver and
    sample count as the flow row; t₀ from `bundle.start_times`), scored on the eval split against the held-out chain:
    classification tv, nll, ece, agreement (regression nll, rmse, coverage90); memorization
    ratio (median whitened nearest-anchor distance, samples / held-out draws); epistemic ratio
    (mean mutual information, regression mean epistemic variance, samples / held-out chain) on
    eval.x and on the OOD inputs. Returns (rows, hmc reference, details).

    A flow in other coordinates than the stage's per-coordinate whitening (a research field,
    train/diagnostics/full_whitening.py) passes its `vfield` and `to_theta` (flow coordinates
    [n,D] -> θ); anchors are then in its coordinates, and the memorization ratio is still
    measured in the per-coordinate whitened coordinates, so rows stay comparable."""
    cfg = ctx["cfg"]
    ecfg = cfg["evaluate"]
    mean, scale = ctx["whiten"]["mean"], ctx["whiten"]["scale"]
    anchors_x = np.asarray(anchors_x, np.float32)
    flow_anchors = anchors_x
    if to_theta is None:
        flow_mean, flow_scale = mean, scale
    else:
        d = anchors_x.shape[1]
        flow_mean, flow_scale = np.zeros(d, np.float32), np.ones(d, np.float32)
        anchors_x = ((to_theta(flow_anchors) - mean) / scale).astype(np.float32)
    score, hmc_epi, nn_held = sweep_scorer(ctx, anchors_x, ood_x)
    vfield = vector_field(ctx["flow"]) if vfield is None else vfield
    key = jax.random.PRNGKey(ecfg["seed"])  # t₀ = 0 reproduces the flow row's samples exactly
    rows, details = [], []
    for t0 in cfg["bundle"]["start_times"]:
        t0 = float(t0)
        theta, _ = sampler.sample_batched(
            vfield, key, ecfg["flow_samples"], flow_mean, flow_scale, method=ecfg["solver"], steps=ecfg["steps"],
            trace=None, start_time=t0, anchors=flow_anchors if t0 > 0 else None)
        if to_theta is not None:
            theta = np.asarray(to_theta(theta), np.float32)
        row, detail = score(theta)
        rows.append({"start_time": t0, **row})
        details.append({"start_time": t0, **detail})
        print(f"  start time {t0}: {rows[-1]}", flush=True)
    details.append({"heldout_nearest_anchor_distance_median": nn_held})
    return rows, hmc_epi, details


def sweep_scorer(ctx, anchors_x, ood_x):
    """The sweep rows' scoring (start times, refinement): returns (score, HMC's epistemic
    values, the held-out chain's median nearest-anchor distance), where score(θ [n,D]) ->
    (row, details): classification tv, nll, ece, agreement (regression nll, rmse, coverage90),
    memorization ratio against the whitened `anchors_x`, epistemic ratios on eval.x and `ood_x`."""
    cfg, data = ctx["cfg"], ctx["data"]
    classification = cfg["data"]["task"] == "classification"
    net_bytes = (ctx["work"] / "graphs" / "net.onnx").read_bytes()
    mean, scale = ctx["whiten"]["mean"], ctx["whiten"]["scale"]
    held = ctx["canon"]["samples"][-1]
    anchors_x = np.asarray(anchors_x, np.float32)
    sigma = float(ctx["map"]["noise_sigma"]) * data["y_std"].astype(np.float64)
    hmc_probs = ctx["evaluate"].get("hmc_probs")
    x_eval, y_eval = data["x_eval"], data["y_eval"]

    def epistemic(thetas):
        return {"eval": metrics.epistemic(run_net(net_bytes, x_eval, thetas), classification),
                "ood": metrics.epistemic(run_net(net_bytes, ood_x, thetas), classification)}

    hmc_epi = epistemic(held)
    nn_held = float(np.median(metrics.nearest_distance((held - mean) / scale, anchors_x)))

    def score(theta):
        row, full = _predictive_row(classification, y_eval, run_net(net_bytes, x_eval, theta), hmc_probs, sigma)
        nn = metrics.nearest_distance((theta - mean) / scale, anchors_x)
        epi = epistemic(theta)
        row = {**row, "memorization_ratio": float(np.median(nn) / nn_held),
               "epistemic_ratio_eval": epi["eval"] / hmc_epi["eval"],
               "epistemic_ratio_ood": epi["ood"] / hmc_epi["ood"]}
        # Medians hide copies: the share of samples still at a stored draw (a rejected HMC
        # transition keeps its start), and the mean ratio, which counts them.
        return row, {"metrics": full, "epistemic": epi, "nearest_anchor_distance_median": float(np.median(nn)),
                     "at_stored_draws": float(np.mean(nn < 0.01 * nn_held)),
                     "memorization_ratio_mean": float(np.mean(nn) / nn_held)}
    return score, hmc_epi, nn_held


START_TIME_RULES = {
    "classification": "tv <= 0.05, nll <= HMC nll + 0.02, epistemic ratio in [0.8, 1.25] on eval and OOD inputs",
    "regression": "nll <= HMC nll + 0.05, |coverage90 - HMC's| <= 0.05, epistemic ratio in [0.8, 1.25] on eval and OOD inputs",
}


def start_time_rule(classification, ece=False):
    """The rule in words; `ece` (config `bundle.start_time_rule_ece`) adds the issue's ECE target."""
    rule = START_TIME_RULES["classification" if classification else "regression"]
    return rule.replace("nll <= HMC nll + 0.02,", "nll <= HMC nll + 0.02, ece <= HMC ece + 0.01,") \
        if ece and classification else rule


def start_time_failures(row, hmc, classification, ece=False):
    """The rule's clauses this sweep row fails (empty: it meets them). `hmc`: HMC's metrics;
    `ece`: also require ECE <= HMC's + 0.01 (classification)."""
    fails = []
    if classification:
        if not row["tv"] <= 0.05:
            fails.append(f"tv {row['tv']:.4f} > 0.05")
        if not row["nll"] <= hmc["nll"] + 0.02:
            fails.append(f"nll {row['nll']:.4f} > HMC {hmc['nll']:.4f} + 0.02")
        if ece and not row["ece"] <= hmc["ece"] + 0.01:
            fails.append(f"ece {row['ece']:.4f} > HMC {hmc['ece']:.4f} + 0.01")
    else:
        if not row["nll"] <= hmc["nll"] + 0.05:
            fails.append(f"nll {row['nll']:.4f} > HMC {hmc['nll']:.4f} + 0.05")
        if not abs(row["coverage90"] - hmc["coverage90"]) <= 0.05:
            fails.append(f"coverage90 {row['coverage90']:.4f} vs HMC {hmc['coverage90']:.4f}")
    for where in ("eval", "ood"):
        r = row[f"epistemic_ratio_{where}"]
        if not 0.8 <= r <= 1.25:
            fails.append(f"epistemic ratio ({where}) {r:.3f} outside [0.8, 1.25]")
    return fails


def choose_start_time(rows, hmc, classification, ece=False):
    """The default start time: the smallest swept t₀ whose row meets START_TIME_RULES (0 when the
    plain flow does); 1 (the stored draws) when no row does. Returns (t₀, reason)."""
    why = []
    for row in sorted(rows, key=lambda r: r["start_time"]):
        fails = start_time_failures(row, hmc, classification, ece)
        if not fails:
            return row["start_time"], "; ".join(why + [f"t0={row['start_time']:g} meets every clause"])
        why.append(f"t0={row['start_time']:g}: " + ", ".join(fails))
    return 1.0, "; ".join(why + ["no swept start time meets the rule: the stored draws (t0=1)"])
