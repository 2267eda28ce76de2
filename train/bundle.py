"""Writes the bundle directory exactly as docs/bundle-format.md specifies: postflow.json,
flow.onnx, flow_jvp.onnx, net.onnx, tensors.safetensors, plus the model card README.md and
its figures/."""

import json
import shutil

import numpy as np
from safetensors.numpy import save_file

from . import PIPELINE_VERSION, card, figures, metrics, mlp
from .export import NAMES

GRAPH_FILES = {"flow": "flow.onnx", "flow_jvp": "flow_jvp.onnx", "net": "net.onnx"}


def _task(cfg, data, ctx):
    if cfg["data"]["task"] == "classification":
        names = [str(c) for c in data["class_names"]]
        return {"kind": "classification", "classes": len(names), "class_names": names}
    sigma = ctx["evaluate"]["noise_sigma_raw"]
    if not np.allclose(sigma, sigma[0]):
        raise ValueError("manifest noise sigma is a scalar; outputs have different scales")
    return {"kind": "regression", "outputs": int(data["y_train"].shape[1]),
            "noise": {"kind": "homoscedastic", "sigma": float(sigma[0])}}


def tensors(ctx):
    data, ev = ctx["data"], ctx["evaluate"]
    t = {
        "flow.whiten.mean": ctx["whiten"]["mean"], "flow.whiten.scale": ctx["whiten"]["scale"],
        "reference.theta": ctx["canon"]["reference"], "posterior.theta": ctx["canon"]["samples"][-1],
        "eval.x": data["x_eval"],
    }
    if ctx["cfg"]["data"]["task"] == "classification":
        t["eval.y"] = data["y_eval"].astype(np.int64)
        t["eval.hmc_probs"] = ev["hmc_probs"]
    else:
        t["eval.y"] = data["y_eval"].astype(np.float32)
        t["eval.hmc_mean"], t["eval.hmc_var"] = ev["hmc_mean"], ev["hmc_var"]
    for k, v in t.items():
        if k != "eval.y":
            t[k] = np.ascontiguousarray(v, dtype=np.float32)
    return t


def reference_metrics(ctx):
    ecfg = ctx["cfg"]["evaluate"]
    return {
        "split": "eval", "n": int(len(ctx["data"]["x_eval"])),
        "flow_samples": ecfg["flow_samples"], "seed": ecfg["seed"],
        "solver": {"method": ecfg["solver"], "steps": ecfg["steps"]},
        "methods": ctx["reports"]["evaluate"]["methods"],
    }


def manifest(ctx):
    cfg, data, sizes, reports = ctx["cfg"], ctx["data"], ctx["sizes"], ctx["reports"]
    d = mlp.dim(sizes)
    post_cfg = cfg["posterior"]
    posterior = dict(reports["posterior"])
    posterior.update({k: post_cfg[k] for k in ("warmup", "draws", "target_accept", "max_doublings")}
                     if post_cfg["method"] == "nuts" else {"ensemble_size": post_cfg["ensemble_size"]})
    posterior["heldout"] = "last chain -> posterior.theta, eval.hmc_*"
    flow_report = {k: v for k, v in reports["flow"].items() if k != "curve"}
    return {
        "format": "postflow-bundle", "format_version": 1,
        "name": cfg["name"], "description": cfg["description"],
        "task": _task(cfg, data, ctx),
        "input": {"dim": int(sizes[0]), "feature_names": [str(f) for f in data["feature_names"]]},
        "network": {"dim": d, "layers": mlp.manifest_layers(sizes)},
        "flow": {"dim": d, "base": "standard_normal", "time": [0.0, 1.0], "geometry": "euclidean",
                 "default_solver": {"method": cfg["evaluate"]["solver"], "steps": cfg["evaluate"]["steps"]},
                 "hutchinson": {"probes": 1, "noise": "rademacher"}},
        "graphs": {name: {"file": GRAPH_FILES[name], "inputs": NAMES[name][0], "outputs": NAMES[name][1]}
                   for name in ("flow", "flow_jvp", "net")},
        "tensors": "tensors.safetensors",
        "provenance": {
            "dataset": {"source": cfg["data"]["source"], "args": cfg["data"]["args"], "task": cfg["data"]["task"],
                        "n_train": int(len(data["x_train"])), "n_eval": int(len(data["x_eval"]))},
            "split": {"eval_fraction": cfg["data"]["eval_fraction"], "seed": cfg["seed"],
                      "stratified": cfg["data"]["task"] == "classification",
                      "standardization": "train-split mean/sd, folded into net.onnx"},
            "network": {"sizes": sizes, "hidden_activation": "relu", "likelihood":
                        "categorical" if cfg["data"]["task"] == "classification" else "gaussian_homoscedastic",
                        "noise_sigma_standardized": float(ctx["map"]["noise_sigma"])},
            "posterior": posterior,
            "alignment": reports["align"],
            "canonicalization": reports["canon"],
            "whitening": reports["whiten"],
            "flow_training": flow_report,
            "export_parity": reports["export"],
            "evaluation": {k: v for k, v in reports["evaluate"].items() if k != "methods"},
            "timings_s": ctx["timings"],
            "pipeline_version": PIPELINE_VERSION,
            "config": cfg,
        },
        "reference_metrics": reference_metrics(ctx),
    }


def check_reference_metrics(ctx, tens):
    """The HMC numbers must be reproducible from the bundle's own arrays: recompute and compare."""
    methods = ctx["reports"]["evaluate"]["methods"]
    if ctx["cfg"]["data"]["task"] == "classification":
        again = metrics.classification(tens["eval.y"], probs=tens["eval.hmc_probs"])
    else:
        again = metrics.regression(tens["eval.y"], tens["eval.hmc_mean"], tens["eval.hmc_var"])
    for k, v in again.items():
        if abs(methods["hmc"][k] - v) > 1e-9:
            raise AssertionError(f"reference_metrics.hmc.{k} not reproducible from tensors")


def write(ctx):
    out, work = ctx["out"], ctx["work"]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, fname in GRAPH_FILES.items():
        shutil.copyfile(work / "graphs" / f"{name}.onnx", out / fname)
    tens = tensors(ctx)
    check_reference_metrics(ctx, tens)
    save_file(tens, str(out / "tensors.safetensors"))
    (out / "tensors.safetensors").chmod(0o644)  # safetensors creates it owner-only
    man = manifest(ctx)
    (out / "postflow.json").write_text(json.dumps(man, indent=1) + "\n")
    figs = figures.make(ctx, out / "figures")
    (out / "README.md").write_text(card.render(ctx, man, figs))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"  bundle written to {out}: {size / 1e6:.2f} MB", flush=True)
    return {"bytes": size, "figures": figs}
