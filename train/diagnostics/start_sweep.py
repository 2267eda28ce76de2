"""The bundle stage's start-time sweep on a stage cache, without building the bundle.

`python -m train.diagnostics.start_sweep WORK --config CFG --start-times 0.8,0.9 [--thin K] [--json OUT]`

Anchors are the flow's training draws (every chain but the held-out one) thinned to every K-th
(K = `provenance.anchors.thin_every` of the matching bundle, so the rows are those the bundle
stage would compute, up to the f16 rounding of the stored anchors, applied here too), whitened
and rounded to f16 as the bundle stores them. Rows: evaluate.start_time_sweep's (TV, NLL, ECE,
agreement, memorization and epistemic ratios), the same sampler, seed and solver."""

import argparse
import json
from pathlib import Path

import numpy as np

from . import diagnose_fidelity as dfid
from .. import evaluate


def parser(prog, start_times="0.8,0.9"):
    """The arguments every start-time sweep diagnostic takes: WORK --config [--start-times] [--thin] [--json]."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("work")
    p.add_argument("--config", required=True)
    p.add_argument("--start-times", default=start_times)
    p.add_argument("--thin", type=int, default=1)
    p.add_argument("--json", default=None)
    return p


def load(a):
    """(work, cfg with `bundle.start_times` from --start-times, cached stage arrays)."""
    work = Path(a.work)
    cfg, st, _ = dfid.load_work(work, Path(a.config))
    cfg["bundle"]["start_times"] = [float(t) for t in a.start_times.split(",")]
    return work, cfg, st


def report(res, json_path):
    print(json.dumps(res, indent=1))
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=1) + "\n")
    return res


def main(argv=None):
    a = parser("python -m train.diagnostics.start_sweep").parse_args(argv)
    work, cfg, st = load(a)
    ctx = {"cfg": cfg, "work": work, **st}
    d = st["canon"]["samples"].shape[-1]
    draws = st["canon"]["samples"][:-1].reshape(-1, d)[::a.thin]
    anchors = ((draws - st["whiten"]["mean"]) / st["whiten"]["scale"]).astype(np.float16).astype(np.float32)
    rows, hmc_epi, _ = evaluate.start_time_sweep(ctx, anchors, evaluate.ood_inputs(cfg, st["data"]))
    return report({"work": str(work), "anchors": int(len(anchors)), "thin": a.thin, "rows": rows,
                   "hmc_epistemic": hmc_epi}, a.json)


if __name__ == "__main__":
    main()
