"""Train a flow field on a pipeline work dir's cached draws, and score flows and baselines with
one protocol (issue 11's comparison rows), without exporting ONNX or writing a bundle.

    # train: the config's [flow] table, with overrides (TOML values), on the work dir's whitened
    # training draws (all chains but the last), held-out loss on the last chain, as the flow stage
    nice -n 10 .venv/bin/python -m train.diagnostics.field_trial train WORK CONFIG OUTDIR \
        --set field='"rt"' --set steps=3000 ...

    # score: each NAME=PARAMS.npz (a trained field), plus the work dir's own flow.npz (row "flow
    # (work dir)", the exported flow's parameters) and the full-covariance Gaussian of the training
    # draws, scored against the held-out chain
    nice -n 10 .venv/bin/python -m train.diagnostics.field_trial score WORK CONFIG \
        [NAME=OUTDIR/params.npz ...] [--heldout-t0 0.5 0.8] [--skip-work-flow] [--json OUT]

Protocol (the start-time sweep's t₀ = 0 row of train/evaluate.py, for every row): flow samples
from `sampler.sample_batched` with the config's evaluate settings (seed, solver, steps,
flow_samples: RK4 × 20, 400 samples, key PRNGKey(evaluate.seed)), pushed through the work dir's
net.onnx on the eval split; TV, NLL, ECE and agreement against the held-out chain's BMA;
memorization ratio = median whitened nearest-training-draw distance of the samples over that of
the held-out draws; epistemic ratio = mean mutual information over the held-out chain's, on the
eval inputs and on `evaluate.ood_inputs` (each feature uniform in mean ± 4 sd). The Gaussian
draws N(mean, sample covariance) of the training draws (400, numpy seed 0, as
train/diagnostics/fidelity_baselines.py)."""

import argparse
import json
import time
import tomllib
from pathlib import Path

import jax
import numpy as np

from .. import config, evaluate, flow as flow_mod, metrics, mlp, sampler, whiten
from ..export import run_net


def load_work(work, cfg_path):
    work = Path(work)
    cfg = config.load(cfg_path)
    ctx = {"cfg": cfg, "work": work}
    for stage in ("data", "map", "canon", "whiten"):
        ctx[stage] = dict(np.load(work / f"{stage}.npz"))
    ctx["sizes"] = mlp.sizes_of(cfg, ctx["data"])
    return ctx


def whitened(ctx):
    samples, w = ctx["canon"]["samples"], ctx["whiten"]
    d = samples.shape[-1]
    return (whiten.apply(samples[:-1].reshape(-1, d), w["mean"], w["scale"]),
            whiten.apply(samples[-1], w["mean"], w["scale"]))


def cmd_train(a):
    ctx = load_work(a.work, a.config)
    fcfg = dict(ctx["cfg"]["flow"])
    for item in a.set:
        k, v = item.split("=", 1)
        if k not in fcfg:
            raise SystemExit(f"unknown flow key {k}")
        fcfg[k] = tomllib.loads(f"v = {v}")["v"]
    train_x, held_x = whitened(ctx)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    params, report = flow_mod.train(train_x, held_x, fcfg, ctx["cfg"]["seed"], sizes=ctx["sizes"])
    report["seconds"] = time.time() - t0
    report["flow_config"] = fcfg
    np.savez(out / "params.npz", **flow_mod.flatten_params(params))
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"saved {out}/params.npz after {report['seconds']:.0f}s", flush=True)


def scorer(ctx):
    """(theta [S, D] raw weights) -> the comparison row, as evaluate.start_time_sweep's."""
    cfg, data = ctx["cfg"], ctx["data"]
    classification = cfg["data"]["task"] == "classification"
    net = (ctx["work"] / "graphs" / "net.onnx").read_bytes()
    mean, scale = ctx["whiten"]["mean"], ctx["whiten"]["scale"]
    train_x, held_x = whitened(ctx)
    held = ctx["canon"]["samples"][-1]
    x_eval, y_eval = data["x_eval"], data["y_eval"]
    ood_x = evaluate.ood_inputs(cfg, data)
    sigma = float(ctx["map"]["noise_sigma"]) * data["y_std"].astype(np.float64)
    hmc_out = run_net(net, x_eval, held)
    hmc_probs = metrics.bma_probs(hmc_out).astype(np.float32) if classification else None
    hmc_epi = {"eval": metrics.epistemic(hmc_out, classification),
               "ood": metrics.epistemic(run_net(net, ood_x, held), classification)}
    nn_held = np.median(metrics.nearest_distance(held_x, train_x))
    hmc_row, _ = evaluate._predictive_row(classification, y_eval, hmc_out, hmc_probs, sigma)

    def score(theta):
        theta = np.asarray(theta, np.float32)
        row, _ = evaluate._predictive_row(classification, y_eval, run_net(net, x_eval, theta), hmc_probs, sigma)
        nn = metrics.nearest_distance((theta - mean) / scale, train_x)
        row["memorization_ratio"] = float(np.median(nn) / nn_held)
        row["epistemic_ratio_eval"] = metrics.epistemic(run_net(net, x_eval, theta), classification) / hmc_epi["eval"]
        row["epistemic_ratio_ood"] = metrics.epistemic(run_net(net, ood_x, theta), classification) / hmc_epi["ood"]
        return row

    return score, {"hmc": hmc_row, "hmc_epistemic": hmc_epi, "heldout_nn_median": float(nn_held)}


def flow_samples(ctx, flat, start_time=0.0):
    """The flow's samples; with start_time t₀ > 0, from the *held-out* chain's whitened draws
    noised to t₀ (x = t₀·a + (1 − t₀)·z, the sampler's anchored start) and integrated to 1: how
    far back along the path the field is right (issue 11's diagnostic)."""
    ecfg = ctx["cfg"]["evaluate"]
    anchors = whitened(ctx)[1] if start_time > 0 else None
    theta, _ = sampler.sample_batched(evaluate.vector_field(flat), jax.random.PRNGKey(ecfg["seed"]),
                                      ecfg["flow_samples"], ctx["whiten"]["mean"], ctx["whiten"]["scale"],
                                      method=ecfg["solver"], steps=ecfg["steps"], trace=None,
                                      start_time=start_time, anchors=anchors)
    return np.asarray(theta)


def gaussian_samples(ctx, n):
    samples = ctx["canon"]["samples"]
    d = samples.shape[-1]
    train = samples[:-1].reshape(-1, d).astype(np.float64)
    cov = np.cov(train, rowvar=False)
    cov += 1e-6 * np.trace(cov) / d * np.eye(d)
    z = np.random.default_rng(0).standard_normal((n, d))
    return (train.mean(0) + z @ np.linalg.cholesky(cov).T).astype(np.float32)


def cmd_score(a):
    ctx = load_work(a.work, a.config)
    score, ref = scorer(ctx)
    rows = {}
    entries = ([] if a.skip_work_flow else [("flow (work dir)", str(Path(a.work) / "flow.npz"))]) + \
        [e.split("=", 1) for e in a.flows]
    for name, path in entries:
        t0 = time.time()
        rows[name] = score(flow_samples(ctx, dict(np.load(path))))
        rows[name]["sample_seconds"] = time.time() - t0
        print(name, rows[name], flush=True)
        for t0 in a.heldout_t0:
            rows[f"{name}, from held-out draws at t0 = {t0:g}"] = score(flow_samples(ctx, dict(np.load(path)), t0))
            print(f"{name}, t0 = {t0:g}", rows[f"{name}, from held-out draws at t0 = {t0:g}"], flush=True)
    rows["full-covariance Gaussian"] = score(gaussian_samples(ctx, ctx["cfg"]["evaluate"]["flow_samples"]))
    print("full-covariance Gaussian", rows["full-covariance Gaussian"], flush=True)
    print("hmc", ref, flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "reference": ref}, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("work")
    t.add_argument("config")
    t.add_argument("out")
    t.add_argument("--set", action="append", default=[], help="flow key=TOML value")
    s = sub.add_parser("score")
    s.add_argument("work")
    s.add_argument("config")
    s.add_argument("flows", nargs="*", help="NAME=params.npz")
    s.add_argument("--heldout-t0", type=float, nargs="*", default=[],
                   help="also integrate from held-out draws noised to these start times")
    s.add_argument("--skip-work-flow", action="store_true", help="leave out the work dir's flow.npz row")
    s.add_argument("--json")
    a = ap.parse_args()
    (cmd_train if a.cmd == "train" else cmd_score)(a)


if __name__ == "__main__":
    main()
