"""Writes the bundle directory exactly as docs/bundle-format.md specifies: postflow.json,
flow.onnx, flow_jvp.onnx, net.onnx, tensors.safetensors, plus the model card README.md and
its figures/.

With `bundle.anchors` (the default) the bundle also stores the flow's training draws as
`flow.anchors` (whitened, f16 by default, thinned evenly to fit the size budget), the OOD
inputs `eval.ood_x`, the start-time sweep and the default start time chosen from it; the
manifest then says `format_version` 2. With `bundle.refine` (the default; needs the anchors and
canonicalization) it also writes posterior.onnx, `refine.inverse_mass`,
`refine.anchor_unit_norms`, the manifest table `refine` and the refinement sweep
(train/refine.py), with refinement's own start time `refine.start_time` (`bundle.refine_start_time`,
1 by default: the stored draws themselves); the manifest then says `format_version` 4."""

import json
import shutil
import time

import jax
import numpy as np
from safetensors.numpy import save, save_file

from . import PIPELINE_VERSION, canon, card, evaluate, figures, metrics, mlp, whiten
from . import baselines, posterior_graph, refine, sampler, solver_choice as solver_choice_mod, sphere
from .export import NAMES

ANCHOR_DTYPES = {"f16": np.float16, "f32": np.float32}
ANCHORS_TENSOR = "flow.anchors"

GRAPH_FILES = {"flow": "flow.onnx", "flow_jvp": "flow_jvp.onnx", "net": "net.onnx"}
REFINE_GRAPH = "posterior.onnx"  # beside the other graphs
PILOT_CHAINS = 128  # stored draws the refinement step size is tuned on
REFINE_MASS, REFINE_NORMS = "refine.inverse_mass", "refine.anchor_unit_norms"


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
    if ctx["cfg"]["bundle"]["anchors"]:
        t["eval.ood_x"] = evaluate.ood_inputs(ctx["cfg"], data)
    for k, v in t.items():
        if k != "eval.y":
            t[k] = np.ascontiguousarray(v, dtype=np.float32)
    if ctx["cfg"]["flow"]["geometry"] == sphere.NAME:  # the runtime refuses weights off the slice
        g = sphere.Geometry(ctx["sizes"])
        for k in ("reference.theta", "posterior.theta"):
            err = float(np.max(g.slice_error(t[k])))
            if err > 1e-5:
                raise ValueError(f"{k} is off the slice by {err:.2e} (a unit's (w, b) norm is not 1); "
                                 "re-run the canon stage (--from-stage canon)")
    return t


def thin(draws, max_count):
    """Every k-th row with k = ceil(n / max_count): at most max_count rows, spread evenly over
    the (chain-major) training draws. Returns (rows, k)."""
    if max_count < 1:
        raise ValueError(f"no room for a single anchor (max_count {max_count})")
    k = -(-len(draws) // max_count)
    return draws[::k], k


def other_bytes(ctx, tens):
    """Bytes of the bundle without the anchors: graphs, tensors, plus the reserve for the
    manifest, the model card and its figures (written later)."""
    graphs = sum((ctx["work"] / "graphs" / f"{name}.onnx").stat().st_size for name in GRAPH_FILES)
    return graphs + len(save(tens)) + ctx["cfg"]["bundle"]["reserve_bytes"]


def anchor_budget(ctx, tens, dim, itemsize, extra_bytes=0, per_anchor_bytes=0):
    """The largest anchor count that keeps the bundle within `bundle.max_bytes` (and
    `bundle.max_anchors` when set). `extra_bytes`: files not yet in `tens` or the work dir's
    graphs (posterior.onnx); `per_anchor_bytes`: what each anchor adds besides its row
    (its unit norms)."""
    bcfg = ctx["cfg"]["bundle"]
    header = 256 if per_anchor_bytes else 0
    fit = ((bcfg["max_bytes"] - other_bytes(ctx, tens) - extra_bytes - header - 256)
           // (dim * itemsize + per_anchor_bytes))  # 256: header entry
    return int(min(fit, bcfg["max_anchors"]) if bcfg["max_anchors"] > 0 else fit)


def _bma(ctx, thetas):
    m = evaluate.bma_metrics(ctx, thetas)
    keys = ("tv", "nll", "ece", "agreement") if "tv" in m else ("nll", "rmse", "coverage90")
    return {k: m[k] for k in keys}


def select_anchors(ctx, tens):
    """The anchors to store and what storing them costs: thinning, dtype error in whitened
    units and in θ, and the t₀ = 1 BMA with the stored vs f32 anchors vs all training draws."""
    bcfg = ctx["cfg"]["bundle"]
    dtype = ANCHOR_DTYPES[bcfg["anchor_dtype"]]
    samples, w = ctx["canon"]["samples"], ctx["whiten"]
    d = samples.shape[-1]
    draws = samples[:-1].reshape(-1, d)  # chain-major: chain 0's draws, then chain 1's, ...
    setup = ctx.get("refine_setup")
    extra, per_anchor = (len(setup["bytes"]), 4 * refine.hidden_width(ctx["sizes"])) if setup else (0, 0)
    budget = anchor_budget(ctx, tens, d, np.dtype(dtype).itemsize, extra, per_anchor)
    kept, k = thin(draws, budget)
    x32 = whiten.apply(kept, w["mean"], w["scale"])
    stored = np.ascontiguousarray(x32.astype(dtype))
    if not np.all(np.isfinite(stored)):
        raise ValueError(f"whitened anchors overflow {bcfg['anchor_dtype']}")
    back = stored.astype(np.float32)
    theta_stored, theta_f32 = whiten.invert(back, w["mean"], w["scale"]), whiten.invert(x32, w["mean"], w["scale"])
    info = {
        "tensor": ANCHORS_TENSOR, "count": int(len(stored)), "dtype": bcfg["anchor_dtype"], "dim": int(d),
        "training_draws": int(len(draws)), "thin_every": int(k), "budget_count": int(budget),
        "max_bytes": bcfg["max_bytes"], "bytes": int(stored.nbytes),
        "coordinates": "whitened: x = (theta - flow.whiten.mean) / flow.whiten.scale",
        "error": {
            "max_abs_whitened": float(np.max(np.abs(back - x32))),
            "max_abs_theta": float(np.max(np.abs(theta_stored - theta_f32))),
            "max_abs_theta_vs_draws": float(np.max(np.abs(theta_stored - kept))),
            "max_abs_whitened_value": float(np.max(np.abs(x32))),
        },
        "t1_bma": {"stored": _bma(ctx, theta_stored), "f32": _bma(ctx, theta_f32), "all_training_draws": _bma(ctx, draws)},
    }
    print(f"  anchors: {info['count']} of {len(draws)} draws (every {k}), {bcfg['anchor_dtype']}, "
          f"error {info['error']}", flush=True)
    return stored, info


def start_times(ctx, tens):
    """Anchors, sweep and default start time (None when `bundle.anchors` is off)."""
    if not ctx["cfg"]["bundle"]["anchors"]:
        return None
    classification = ctx["cfg"]["data"]["task"] == "classification"
    stored, info = select_anchors(ctx, tens)
    rows, hmc_epi, details = evaluate.start_time_sweep(ctx, stored.astype(np.float32), tens["eval.ood_x"])
    ece = ctx["cfg"]["bundle"]["start_time_rule_ece"]
    t0, reason = evaluate.choose_start_time(rows, ctx["reports"]["evaluate"]["methods"]["hmc"], classification, ece)
    print(f"  default start time {t0}: {reason}", flush=True)
    return {"stored": stored, "info": info, "sweep": rows, "hmc_epistemic": hmc_epi, "details": details,
            "default_start_time": t0, "reason": reason, "rule_ece": ece,
            "rule": evaluate.start_time_rule(classification, ece)}


def refine_enabled(cfg):
    """Refinement needs the anchors (their unit norms rescale the samples) and canonical draws."""
    return cfg["bundle"]["refine"] and cfg["bundle"]["anchors"] and cfg["canon"]["enabled"]


def refine_setup(ctx, tens):
    """posterior.onnx checked against JAX, and the inverse mass (None when off)."""
    cfg = ctx["cfg"]
    if not refine_enabled(cfg):
        if cfg["bundle"]["refine"]:
            print("  refinement off: it needs bundle.anchors and canon.enabled", flush=True)
        return None
    sizes, d = ctx["sizes"], mlp.dim(ctx["sizes"])
    model, logd = posterior_graph.of_pipeline(cfg, ctx["data"], ctx["map"]["noise_sigma"], sizes)
    aligned = ctx["align"]["samples"]
    train = aligned[:-1].reshape(-1, d).astype(np.float64)
    rng = np.random.default_rng(cfg["seed"] + 31)
    probe = np.concatenate([aligned[-1][rng.choice(len(aligned[-1]), 3)],
                            train[rng.choice(len(train), 2)] + 0.1 * rng.standard_normal((2, d))])
    parity = posterior_graph.parity(model, logd, probe, cfg["export"]["parity_tol"])
    print(f"  posterior graph: parity {parity}", flush=True)
    var = train.var(0)
    floor = max(float(np.max(var)) * 1e-12, 1e-30)
    inv_mass = np.maximum(var, floor).astype(np.float32)
    if not (np.all(np.isfinite(inv_mass)) and np.all(inv_mass > 0)):
        raise ValueError("refine.inverse_mass: the aligned draws' variance is not finite and positive")
    tens[REFINE_MASS] = inv_mass
    return {"model": model, "bytes": model.SerializeToString(), "logdensity": logd, "inverse_mass": inv_mass,
            "parity": parity, "floored": int(np.sum(var < floor))}


def refinement(ctx, tens):
    """The anchors' unit norms, the step size, the refinement sweep from the samples at
    refinement's start time (`bundle.refine_start_time`), and the default number of transitions
    (None when off)."""
    setup, st = ctx.get("refine_setup"), ctx.get("start_times")
    if not setup or not st:
        return None
    cfg, sizes = ctx["cfg"], ctx["sizes"]
    bcfg, ecfg = cfg["bundle"], cfg["evaluate"]
    d = mlp.dim(sizes)
    classification = cfg["data"]["task"] == "classification"
    t_start = time.time()
    # the aligned draws behind the stored anchors (same chain-major thinning)
    kept = ctx["align"]["samples"][:-1].reshape(-1, d)[::st["info"]["thin_every"]]
    norms = refine.unit_norms(kept, sizes).astype(np.float32)
    stored = st["stored"].astype(np.float32)
    if len(norms) != len(stored) or not (np.all(np.isfinite(norms)) and np.all(norms > 0)):
        raise ValueError("refine.anchor_unit_norms: not one finite positive row per anchor")
    mean, scale = ctx["whiten"]["mean"], ctx["whiten"]["scale"]
    back = refine.decanonicalize(whiten.invert(stored, mean, scale), norms, sizes)
    recon_err = float(np.max(np.abs(back - kept)) / max(float(np.max(np.abs(kept))), 1e-12))

    # refinement's own start time (config `bundle.refine_start_time`; "default": the flow's)
    t0_cfg = bcfg["refine_start_time"]
    t0 = float(st["default_start_time"]) if t0_cfg == "default" else float(t0_cfg)
    n = ecfg["flow_samples"]
    key = jax.random.PRNGKey(ecfg["seed"])  # the sweep's samples at t0, as start_time_sweep draws them
    theta_c, _ = sampler.sample_batched(evaluate.vector_field(ctx["flow"]), key, n, mean, scale,
                                        method=ecfg["solver"], steps=ecfg["steps"], trace=None, start_time=t0,
                                        anchors=stored if t0 > 0 else None)
    idx = sampler.start_anchor_indices(key, n, len(stored), t0)
    theta = refine.decanonicalize(theta_c, norms[idx], sizes)
    leapfrog = bcfg["refine_leapfrog"]
    kernel = refine.make_kernel(setup["logdensity"], setup["inverse_mass"], leapfrog)
    chains = ctx["reports"]["posterior"].get("chains", [])
    base = float(np.median([c["step_size"] for c in chains])) if chains else 1e-2
    # pilot from the stored draws themselves (aligned): where the refined chains should stay
    # (at most PILOT_CHAINS of them: the step is a property of the posterior, not of the sample count)
    order = sampler.anchor_order(key, n, len(stored))[:PILOT_CHAINS]
    pilot = refine.decanonicalize(whiten.invert(stored, mean, scale)[order], norms[order], sizes)
    step, trials = refine.tune_step(kernel, pilot, jax.random.fold_in(key, 101), base)
    print(f"  refinement: step {step:.4g} (NUTS {base:.4g}; pilot acceptance {trials})", flush=True)
    score, _, _ = evaluate.sweep_scorer(ctx, stored, tens["eval.ood_x"])
    rows, details, done, seconds = [], [], 0, 0.0
    hkey = jax.random.fold_in(key, 202)
    for k in sorted(set(int(k) for k in bcfg["refine_transitions"])):
        acc = None
        if k > done:
            t1 = time.time()
            theta, acc = refine.hmc(jax.random.fold_in(hkey, k), theta, None, None, step, leapfrog, k - done,
                                    kernel=kernel)
            seconds += time.time() - t1
        done = k
        row, detail = score(np.asarray(canon.canonicalize(theta, sizes), np.float32))
        rows.append({"transitions": k, **row, "at_stored_draws": detail["at_stored_draws"],
                     "memorization_ratio_mean": detail["memorization_ratio_mean"]})
        details.append({"transitions": k, "acceptance_since_previous": acc, "hmc_seconds_so_far": round(seconds, 2),
                        **detail})
        print(f"  refine K={k}: {rows[-1]}", flush=True)
    hmc = ctx["reports"]["evaluate"]["methods"]["hmc"]
    ece = bcfg["start_time_rule_ece"]
    default, reason = refine.choose_transitions(
        rows, lambda r: evaluate.start_time_failures(r, hmc, classification, ece), bcfg["refine_memorization"])
    print(f"  default transitions {default}: {reason}", flush=True)
    tens[REFINE_NORMS] = norms
    return {"sweep": rows, "details": details, "step_size": step, "leapfrog_steps": leapfrog,
            "pilot_acceptance": trials[f"{step:.4g}"], "pilot_trials": trials, "nuts_step_size": base,
            "default_transitions": default, "reason": reason, "start_time": t0,
            "memorization": bcfg["refine_memorization"],
            "rule": evaluate.start_time_rule(classification, ece)
            + f", memorization ratio >= {bcfg['refine_memorization']:g} (else the passing K with the largest ratio; none: 0)",
            "parity": setup["parity"], "inverse_mass_floored": setup["floored"],
            "norms_reconstruction_relative_error": recon_err, "seconds": round(time.time() - t_start, 1)}


def solver_choice(ctx):
    """Euler/RK4 sweep at t₀ = 0 and the default start time; the default solver by its rule
    (train/solver_choice.py), or the evaluate settings when `bundle.solver_rule` is off."""
    bcfg, ecfg = ctx["cfg"]["bundle"], ctx["cfg"]["evaluate"]
    if not bcfg["solver_rule"]:
        return None
    st = ctx.get("start_times")
    anchors = st["stored"].astype(np.float32) if st else None
    classification = ctx["cfg"]["data"]["task"] == "classification"
    net_bytes = (ctx["work"] / "graphs" / "net.onnx").read_bytes()

    def score(theta):
        out = evaluate.run_net(net_bytes, ctx["data"]["x_eval"], theta)
        return {**_bma(ctx, theta), "epistemic_eval": float(metrics.epistemic(out, classification))}

    rows = solver_choice_mod.sweep(ctx, anchors, solver_choice_mod.sweep_start_times(
        st["default_start_time"] if st else None), score)
    method, steps, reason, converged = solver_choice_mod.choose(rows, classification, bcfg["solver_tolerance"],
                                                                bcfg["solver_spread_tolerance"],
                                                                bcfg["solver_logq_tolerance"])
    print(f"  default solver {method} x {steps}: {reason}", flush=True)
    return {"sweep": rows, "method": method, "steps": steps, "reason": reason,
            "converged": {f"{t:g}": v for t, v in converged.items()}, "tolerance": bcfg["solver_tolerance"],
            "spread_tolerance": bcfg["solver_spread_tolerance"], "logq_tolerance": bcfg["solver_logq_tolerance"],
            "rule": solver_choice_mod.rule(classification, bcfg["solver_tolerance"], bcfg["solver_spread_tolerance"],
                                           bcfg["solver_logq_tolerance"]),
            "evaluate_solver": {"method": ecfg["solver"], "steps": ecfg["steps"]}}


def default_solver(ctx):
    sc = ctx.get("solver_choice")
    if sc:
        return {"method": sc["method"], "steps": sc["steps"]}
    return {"method": ctx["cfg"]["evaluate"]["solver"], "steps": ctx["cfg"]["evaluate"]["steps"]}


def reference_metrics(ctx):
    ecfg = ctx["cfg"]["evaluate"]
    out = {
        "split": "eval", "n": int(len(ctx["data"]["x_eval"])),
        "flow_samples": ecfg["flow_samples"], "seed": ecfg["seed"],
        "solver": {"method": ecfg["solver"], "steps": ecfg["steps"]},
        "methods": ctx["reports"]["evaluate"]["methods"],
    }
    st = ctx.get("start_times")
    if st:
        out["start_time_sweep"] = st["sweep"]
        key = "hmc_mutual_information" if ctx["cfg"]["data"]["task"] == "classification" else "hmc_epistemic_variance"
        out[key] = st["hmc_epistemic"]
    if ctx.get("solver_choice"):
        out["solver_sweep"] = ctx["solver_choice"]["sweep"]
    if ctx.get("baselines"):
        out["baselines"] = ctx["baselines"]
    rf = ctx.get("refine")
    if rf:
        out["refine_sweep"] = rf["sweep"]
        out["refine"] = {k: rf[k] for k in ("step_size", "leapfrog_steps", "pilot_acceptance")}
    return out


def manifest(ctx):
    cfg, data, sizes, reports = ctx["cfg"], ctx["data"], ctx["sizes"], ctx["reports"]
    d = mlp.dim(sizes)
    post_cfg = cfg["posterior"]
    posterior = dict(reports["posterior"])
    posterior.update({k: post_cfg[k] for k in ("warmup", "draws", "target_accept", "max_doublings")}
                     if post_cfg["method"] == "nuts" else {"ensemble_size": post_cfg["ensemble_size"]})
    posterior["heldout"] = "last chain -> posterior.theta, eval.hmc_*"
    flow_report = {k: v for k, v in reports["flow"].items() if k != "curve"}
    st = ctx.get("start_times")
    flow = {"dim": d, "base": "standard_normal", "time": [0.0, 1.0], "geometry": cfg["flow"].get("geometry", "euclidean"),
            "default_solver": default_solver(ctx),
            "hutchinson": {"probes": 1, "noise": "rademacher"}}
    provenance_extra = {}
    if ctx.get("solver_choice"):
        provenance_extra["solver_choice"] = {k: v for k, v in ctx["solver_choice"].items() if k != "sweep"}
    if st:
        flow["anchors"] = {"tensor": ANCHORS_TENSOR, "count": st["info"]["count"], "dtype": st["info"]["dtype"]}
        flow["default_start_time"] = st["default_start_time"]
        provenance_extra |= {
            "anchors": {k: v for k, v in st["info"].items() if k not in ("tensor", "count", "dtype")},
            "start_time": {"default": st["default_start_time"], "rule": st["rule"], "rule_ece": st["rule_ece"],
                           "reason": st["reason"],
                           "sweep_details": st["details"],
                           "ood_inputs": "eval.ood_x: each feature uniform in training mean +- 4 sd"
                                         + (", then uniform noise and shuffled-pixel eval images"
                                            if cfg["evaluate"]["ood"] and cfg["data"]["task"] == "classification" else "")},
        }
    rf = ctx.get("refine")
    top = {}
    if rf:
        top["refine"] = {"graph": REFINE_GRAPH, "leapfrog_steps": rf["leapfrog_steps"], "step_size": rf["step_size"],
                         "default_transitions": rf["default_transitions"], "start_time": rf["start_time"]}
        provenance_extra["refine"] = {
            "start_time": rf["start_time"], "rule": rf["rule"], "reason": rf["reason"],
            "memorization": rf["memorization"], "nuts_step_size": rf["nuts_step_size"],
            "pilot_trials": rf["pilot_trials"], "graph_parity": rf["parity"],
            "inverse_mass": f"{REFINE_MASS}: variance of the aligned, non-canonical training draws "
                            f"({rf['inverse_mass_floored']} floored)",
            "anchor_unit_norms": f"{REFINE_NORMS}: canon.canonicalize's unit norms of each stored anchor's aligned draw "
                                 f"(relative reconstruction error {rf['norms_reconstruction_relative_error']:.2e})",
            "sweep_details": rf["details"], "seconds": rf["seconds"]}
    return {
        "format": "postflow-bundle", "format_version": 4 if rf else 2 if st else 1,
        "name": cfg["name"], "description": cfg["description"],
        "task": _task(cfg, data, ctx),
        "input": {"dim": int(sizes[0]), "feature_names": [str(f) for f in data["feature_names"]]},
        "network": {"dim": d, "layers": mlp.manifest_layers(sizes)},
        "flow": flow,
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
            **provenance_extra,
            "timings_s": ctx["timings"],
            "pipeline_version": PIPELINE_VERSION,
            "config": cfg,
        },
        "reference_metrics": reference_metrics(ctx),
        **top,
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
    ctx["refine_setup"] = refine_setup(ctx, tens)
    ctx["start_times"] = start_times(ctx, tens)
    if ctx["start_times"]:
        tens[ANCHORS_TENSOR] = ctx["start_times"]["stored"]
    ctx["refine"] = refinement(ctx, tens)
    if ctx["refine"]:
        (out / REFINE_GRAPH).write_bytes(ctx["refine_setup"]["bytes"])
    ctx["solver_choice"] = solver_choice(ctx)
    if ctx["cfg"]["bundle"]["baselines"]:
        st = ctx["start_times"]
        ctx["baselines"] = baselines.table(ctx, st["stored"].astype(np.float32) if st else None,
                                           st["default_start_time"] if st else None,
                                           tens.get("eval.ood_x", evaluate.ood_inputs(ctx["cfg"], ctx["data"])))
    save_file(tens, str(out / "tensors.safetensors"))
    (out / "tensors.safetensors").chmod(0o644)  # safetensors creates it owner-only
    man = manifest(ctx)
    (out / "postflow.json").write_text(json.dumps(man, indent=1) + "\n")
    figs = figures.make(ctx, out / "figures")
    (out / "README.md").write_text(card.render(ctx, man, figs))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    limit = ctx["cfg"]["bundle"]["max_bytes"]
    if ctx["start_times"] and size > limit:
        raise RuntimeError(f"bundle is {size} bytes, over bundle.max_bytes = {limit}: raise bundle.reserve_bytes "
                           "(room for postflow.json, README.md, figures/) or lower bundle.max_anchors")
    # `out` is the temporary folder; the build renames it to --out once this stage returns
    print(f"  bundle written to {ctx['final_out']}: {size / 1e6:.2f} MB", flush=True)
    report = {"bytes": size, "figures": figs}
    if ctx["start_times"]:
        report["default_start_time"] = ctx["start_times"]["default_start_time"]
        report["anchors"] = ctx["start_times"]["info"]["count"]
    if ctx["refine"]:
        report["default_transitions"] = ctx["refine"]["default_transitions"]
    return report
