"""More draws than stored draws: do refined draws that start at the same stored draw stay apart?

`POSTFLOW_LIB=target/release/libpostflow.so PYTHONPATH=bindings/python
python -m train.diagnostics.shared_anchors models/NAME [--n 400] [--seed 0] [--refine K]
[--kernel endpoint|multinomial] [--leapfrog L] [--json OUT]`

A bundle's refined draws start at its stored draws in a seeded order, so draw j and draw
j + A (A: the number of stored draws) start at the same one. The runtime draws A + n samples
from refinement's start time with K transitions (default: the bundle's) and compares, in the whitened coordinates the memorization ratio
uses (x = (θ − mean) / scale):

    same-anchor pair       |x_j − x_{A+j}|,                     j < n
    nearest other draw     min_{k ≠ j} |x_j − x_{A+k}|,          j, k < n (n − 1 others)
    to the stored draws    min_a |x_j − a|,  beside the same for the held-out HMC chain

Medians over j. When the same-anchor pair is no closer than the nearest draw from another
anchor, sharing a start costs nothing: the pairs are as far apart as unrelated draws.

Medians hide copies: a rejected endpoint transition returns its start. So it also reports, per
draw j < n, the ratio of its distance to the stored draws over the held-out chain's median
(the memorization ratio is the median of these; here also their mean and 10 % / 25 %
quantiles), the share of draws still at a stored draw (ratio < 0.01: unchanged) and the share
of same-anchor pairs that are bitwise the same network. The
pairing holds only where refinement starts at the stored draws themselves (start time 1: a
start time below 1 picks each sample's stored draw from its own stream), and n must not exceed
A (else the "other" draws share starts too): other bundles are refused."""

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def pairwise(x, y):
    """Euclidean distances [len(x), len(y)]."""
    d = (x**2).sum(1)[:, None] + (y**2).sum(1)[None] - 2.0 * x @ y.T
    return np.sqrt(np.maximum(d, 0.0))


def measure(bundle, n=400, seed=0, transitions=None, kernel="endpoint", leapfrog=None):
    import postflow  # the Python binding; needs POSTFLOW_LIB or an installed wheel

    t = load_file(str(Path(bundle) / "tensors.safetensors"))
    mean, scale = t["flow.whiten.mean"].astype(np.float64), t["flow.whiten.scale"].astype(np.float64)
    anchors = t["flow.anchors"].astype(np.float64)
    held_out = (t["posterior.theta"] - mean) / scale
    with postflow.Model(bundle) as model:
        count = model.anchor_count
        if count == 0 or model.default_refine_start_time != 1.0:
            raise SystemExit(f"{bundle}: refinement does not start at stored draws (start time "
                             f"{model.default_refine_start_time}, {count} stored draws)")
        if not 1 < n <= count:
            raise SystemExit(f"--n {n}: must be in [2, {count}] (the stored draws)")
        k = model.default_refine_transitions if transitions is None else transitions
        drawn = model.sample(count + n, seed=seed, start_time=model.default_refine_start_time,
                             refine_transitions=k, refine_kernel=kernel, refine_leapfrog=leapfrog or 0).theta
    identical = np.all(drawn[:n] == drawn[count:count + n], axis=1)
    theta = drawn.astype(np.float64)
    x = (theta - mean) / scale
    first, again = x[:n], x[count:count + n]
    same = np.linalg.norm(first - again, axis=1)  # exact 0 for identical rows
    cross = pairwise(first, again)
    np.fill_diagonal(cross, np.inf)
    held_out_median = float(np.median(pairwise(held_out, anchors).min(1)))
    ratio = pairwise(first, anchors).min(1) / held_out_median
    return {"bundle": str(bundle), "stored_draws": count, "n": n, "seed": seed,
            "transitions": k, "kernel": kernel, "leapfrog": leapfrog,
            "unchanged": float(np.mean(ratio < 0.01)), "identical_pairs": float(np.mean(identical)),
            "ratio": {"mean": float(ratio.mean()), "q10": float(np.quantile(ratio, 0.1)),
                      "q25": float(np.quantile(ratio, 0.25)), "median": float(np.median(ratio))},
            "same_anchor_pair": float(np.median(same)),
            "nearest_other_draw": float(np.median(cross.min(1))),
            "to_stored_draws": float(np.median(pairwise(first, anchors).min(1))),
            "held_out_to_stored_draws": held_out_median}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.diagnostics.shared_anchors")
    p.add_argument("bundle")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refine", type=int, default=None, help="transitions (default: the bundle's)")
    p.add_argument("--kernel", choices=("endpoint", "multinomial"), default="endpoint")
    p.add_argument("--leapfrog", type=int, default=None, help="steps per trajectory (default: the bundle's)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    r = measure(a.bundle, a.n, a.seed, a.refine, a.kernel, a.leapfrog)
    print(f"{r['bundle']}: {r['stored_draws']} stored draws, K = {r['transitions']}, n = {r['n']}; "
          f"median whitened distance: same-anchor pair {r['same_anchor_pair']:.2f}, nearest draw from another "
          f"anchor {r['nearest_other_draw']:.2f} (ratio {r['same_anchor_pair'] / r['nearest_other_draw']:.2f}); "
          f"to the stored draws {r['to_stored_draws']:.2f} (held-out chain {r['held_out_to_stored_draws']:.2f})")
    q = r["ratio"]
    print(f"  {r['kernel']} kernel: unchanged {r['unchanged']:.1%}, identical same-anchor pairs "
          f"{r['identical_pairs']:.1%}; distance to the stored draws over the held-out chain's median: "
          f"mean {q['mean']:.3f}, q10 {q['q10']:.3f}, q25 {q['q25']:.3f}, median {q['median']:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
