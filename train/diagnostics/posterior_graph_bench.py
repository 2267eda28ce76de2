"""ONNX Runtime vs jitted JAX per call of posterior.onnx (train/posterior_graph.py).

`python -m train.diagnostics.posterior_graph_bench WORK --config CFG [--s 64] [--reps 20]
[--jax2onnx]`: builds the graph from the cached data/map/align stages, checks its parity on S
aligned draws, and times one call both ways; with --jax2onnx also the jax2onnx export of the
batched value-and-vjp (the first attempt) and the ONNX Runtime profile of its slowest ops."""

import argparse
import json
from pathlib import Path

import numpy as np

from .. import config, mlp, posterior_graph


def load(work, cfg_path):
    cfg = config.load(cfg_path)
    st = {}
    for stage in ("data", "map", "align"):
        with np.load(Path(work) / f"{stage}.npz", allow_pickle=False) as z:
            st[stage] = {k: z[k] for k in z.files}
    return cfg, st


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.diagnostics.posterior_graph_bench")
    p.add_argument("work")
    p.add_argument("--config", required=True)
    p.add_argument("--s", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args(argv)
    cfg, st = load(a.work, a.config)
    sizes = mlp.sizes_of(cfg, st["data"])
    model, logd = posterior_graph.of_pipeline(cfg, st["data"], st["map"]["noise_sigma"], sizes)
    draws = st["align"]["samples"].reshape(-1, mlp.dim(sizes))
    thetas = draws[np.linspace(0, len(draws) - 1, a.s).astype(int)]
    res = {"work": a.work, "D": mlp.dim(sizes), "N": int(len(st["data"]["x_train"])),
           "parity": posterior_graph.parity(model, logd, thetas, 1e-4),
           "bytes": len(model.SerializeToString()),
           "timing": posterior_graph.timing(model, logd, thetas, a.reps)}
    res["ratio_ort_over_jax"] = res["timing"]["ort_s"] / res["timing"]["jax_s"]
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
