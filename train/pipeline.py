"""Stage orchestration with a cache: each stage writes `<work>/<stage>.npz` (arrays) and
`<work>/<stage>.json` (report, wall time, fingerprint). A stage is reused when its
fingerprint (its config sections plus its upstream fingerprint) matches, so editing e.g. the
`flow` table re-runs flow and what follows while keeping the NUTS samples."""

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from . import align, bundle, canon, config, data, evaluate, export, flow, map as map_stage, mlp, posterior, sphere, whiten

STAGES = ["data", "map", "posterior", "align", "canon", "whiten", "flow", "export", "evaluate", "bundle"]
SECTIONS = {
    "data": ["seed", "data"], "map": ["network", "map", "likelihood", "posterior"],
    "posterior": ["posterior"], "align": ["align"], "canon": ["canon"], "whiten": ["whiten"],
    "flow": ["flow"], "export": ["export"], "evaluate": ["evaluate"], "bundle": ["name", "description", "card_notes"],
}


# keys that change no result (where the chains run): left out of every fingerprint
NOT_FINGERPRINTED = {"posterior": ("executor", "workers", "ray_address")}
# keys added after the shipped bundles were cached: left out while they hold these defaults
NEW_KEY_DEFAULTS = {"data": {"target": None, "features": None},
                    "flow": {k: config.DEFAULTS["flow"][k] for k in ("rt_channels", "rt_blocks", "rt_heads", "geometry")
                             if k in config.DEFAULTS["flow"]}}


def _section(cfg, key):
    value = cfg[key]
    if not isinstance(value, dict):
        return value
    skip, new = NOT_FINGERPRINTED.get(key, ()), NEW_KEY_DEFAULTS.get(key, {})
    return {k: v for k, v in value.items() if k not in skip and not (k in new and v == new[k])}


def _fingerprint(cfg, stage, upstream, extra=""):
    blob = json.dumps({k: _section(cfg, k) for k in SECTIONS[stage]}, sort_keys=True) + upstream + extra
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _geometry_extra(cfg):
    """The whitening depends on flow.geometry; left out at "euclidean" (cached stages stay valid)."""
    g = cfg["flow"].get("geometry", "euclidean")
    return "" if g == "euclidean" else f"geometry={g}"


def _stage_data(ctx):
    return data.load(ctx["cfg"], ctx.get("config_dir")), {}


def _stage_map(ctx):
    out = map_stage.run(ctx["cfg"], ctx["data"])
    return out, {"noise_sigma_standardized": float(out["noise_sigma"])}


def _stage_posterior(ctx):
    return posterior.run(ctx["cfg"], ctx["data"], ctx["map"], ray_address=ctx.get("ray_address"))


def _stage_align(ctx):
    return align.run(ctx["cfg"], ctx["data"], ctx["map"], ctx["posterior"])


def _stage_canon(ctx):
    cfg, sizes = ctx["cfg"], ctx["sizes"]
    samples, ref = ctx["align"]["samples"], ctx["map"]["reference"]
    if cfg["canon"]["enabled"]:
        samples = canon.canonicalize(samples, sizes)
        ref = canon.canonicalize(ref, sizes)
    return ({"samples": samples.astype(np.float32), "reference": ref.astype(np.float32)},
            {"enabled": cfg["canon"]["enabled"], "kind": "relu_unit_incoming_norm",
             "detail": "hidden unit's [incoming weights, bias] scaled to unit L2 norm, outgoing weights "
                       "scaled back; last layer untouched"})


def _stage_whiten(ctx):
    train = ctx["canon"]["samples"][:-1].reshape(-1, ctx["canon"]["samples"].shape[-1])
    geometry = sphere.geometry_of(ctx["cfg"], ctx["sizes"])
    if geometry is not None:  # identity on the spheres, per coordinate on the Euclidean rest
        mean, scale = sphere.whiten_fit(train, geometry, ctx["cfg"]["whiten"]["min_scale"])
        return {"mean": mean, "scale": scale}, {"kind": "sphere_identity_euclidean_per_coordinate",
                                                "min_scale": ctx["cfg"]["whiten"]["min_scale"]}
    mean, scale = whiten.fit(train, ctx["cfg"]["whiten"]["min_scale"])
    return {"mean": mean, "scale": scale}, {"kind": "per_coordinate", "min_scale": ctx["cfg"]["whiten"]["min_scale"]}


def _stage_flow(ctx):
    samples, w = ctx["canon"]["samples"], ctx["whiten"]
    d = samples.shape[-1]
    train_x = whiten.apply(samples[:-1].reshape(-1, d), w["mean"], w["scale"])
    held_x = whiten.apply(samples[-1], w["mean"], w["scale"])
    geometry = sphere.geometry_of(ctx["cfg"], ctx["sizes"])
    if geometry is not None:
        from . import sphere_flow
        params, report = sphere_flow.train(train_x, held_x, ctx["cfg"]["flow"], ctx["cfg"]["seed"], geometry)
    else:
        params, report = flow.train(train_x, held_x, ctx["cfg"]["flow"], ctx["cfg"]["seed"], sizes=ctx["sizes"])
    weight_dtype = ctx["cfg"]["flow"]["weight_dtype"]
    report["weight_dtype"] = weight_dtype
    return sphere.tag_params(flow.round_weights(flow.flatten_params(params), weight_dtype), geometry), report


def _stage_export(ctx):
    protos, report = export.run(ctx["cfg"], ctx["data"], ctx["sizes"], ctx["flow"], ctx["whiten"],
                                ctx["canon"], float(ctx["map"]["noise_sigma"]))
    graphs = ctx["work"] / "graphs"
    graphs.mkdir(exist_ok=True)
    for name, proto in protos.items():
        (graphs / f"{name}.onnx").write_bytes(proto.SerializeToString())
    return {}, report


def _stage_evaluate(ctx):
    net_bytes = (ctx["work"] / "graphs" / "net.onnx").read_bytes()
    return evaluate.run(ctx["cfg"], ctx["data"], ctx["map"], ctx["canon"], ctx["whiten"], ctx["flow"], net_bytes)


def _stage_bundle(ctx):
    return {}, bundle.write(ctx)


RUNNERS = {name: globals()[f"_stage_{name}"] for name in STAGES}


def build(config_path, out, work=None, from_stage=None, ray_address=None):
    """Runs (or reuses) every stage; the bundle is written to a temporary folder next to `out`
    and renamed to `out` only once complete, so a failed build leaves no partial bundle."""
    out = Path(out)
    cfg = config.load(config_path, default_name=out.name)
    work = Path(work or Path("work") / cfg["name"])
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    # stages write to "out" (the temporary folder) and name "final_out" (--out) in what they print
    ctx = {"cfg": cfg, "work": work, "out": partial, "final_out": out, "reports": {}, "timings": {},
           "config_path": Path(config_path).resolve(), "config_dir": Path(config_path).resolve().parent,
           "ray_address": ray_address}
    try:
        _run_stages(ctx, from_stage)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            partial.rename(out)
            shutil.rmtree(old)
        else:
            partial.rename(out)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    ctx["out"] = out
    print(f"build of {cfg['name']} finished in {time.time() - ctx['t_build']:.1f}s "
          f"(stage total {sum(ctx['timings'].values()):.1f}s) -> {out}", flush=True)
    return ctx


def _run_stages(ctx, from_stage):
    cfg, work = ctx["cfg"], ctx["work"]
    force_from = STAGES.index(from_stage) if from_stage else len(STAGES)
    upstream, recomputed = "", False
    ctx["t_build"] = time.time()
    for i, stage in enumerate(STAGES):
        fp = _fingerprint(cfg, stage, upstream,
                          data.source_digest(cfg["data"], ctx["config_dir"]) if stage == "data" else
                          _geometry_extra(cfg) if stage == "whiten" else "")
        meta_path, arr_path = work / f"{stage}.json", work / f"{stage}.npz"
        cached = None
        if i < force_from and not recomputed and meta_path.exists() and stage != "bundle":
            meta = json.loads(meta_path.read_text())
            if meta["fingerprint"] == fp and arr_path.exists():
                cached = meta
        if cached:
            with np.load(arr_path, allow_pickle=False) as z:
                ctx[stage] = {k: z[k] for k in z.files}
            ctx["reports"][stage], ctx["timings"][stage] = cached["report"], cached["seconds"]
            print(f"[{stage}] cached ({cached['seconds']:.1f}s when built)", flush=True)
        else:
            recomputed = True
            print(f"[{stage}] running", flush=True)
            t0 = time.time()
            arrays, report = RUNNERS[stage](ctx)
            seconds = round(time.time() - t0, 2)
            ctx[stage], ctx["reports"][stage], ctx["timings"][stage] = arrays, report, seconds
            np.savez(arr_path, **arrays)
            meta_path.write_text(json.dumps({"fingerprint": fp, "seconds": seconds, "report": report}, indent=1))
            print(f"[{stage}] done in {seconds:.1f}s", flush=True)
        if stage == "data":
            ctx["sizes"] = mlp.sizes_of(cfg, ctx["data"])
        upstream = fp
