"""The bundle's default solver, chosen by measurement (issue 11, item 5).

For each start time that needs integration (t₀ = 0, the plain flow, and the bundle's default
start time when 0 < t₀ < 1), the flow is sampled with Euler and RK4 at each step count of
`bundle.solver_steps` (same seed, sample count and anchors as the start-time sweep, so rows differ
only by the solver's error) and its BMA scored against the held-out chain. Cost is counted in
field evaluations per sample: Euler `steps`, RK4 4·`steps`.

Rule: the converged row at a start time is RK4 at the largest step count; a solver is within
tolerance there when its TV (regression: NLL) is within `bundle.solver_tolerance` of the converged
row's (the issue's rule), its epistemic spread (mean mutual information, regression variance of
the means, on the eval inputs) within `bundle.solver_spread_tolerance` of the converged row's,
relatively (TV judges only the averaged prediction, and a solver that shrinks or inflates the
spread can keep it), and its samples' log-densities (Hutchinson, the same probes) within
`bundle.solver_logq_tolerance` nats of the converged ones on average (the default solver also
serves `log_prob` and density-weighted averages). The default solver is the cheapest that is within tolerance at every swept
start time (ties go to RK4, the more accurate scheme per step), so the default also serves a
caller who asks for fresh samples at t₀ = 0.
"""

import time

import jax
import numpy as np

from . import sampler

METHODS = {"euler": 1, "rk4": 4}  # field evaluations per step


def evaluations(method, steps):
    return METHODS[method] * int(steps)


def sweep_start_times(default_t0):
    """t₀ = 0 and the default start time when the flow integrates from there (t₀ = 1 does not)."""
    ts = [0.0]
    if default_t0 is not None and 0.0 < float(default_t0) < 1.0:
        ts.append(float(default_t0))
    return ts


def sweep(ctx, anchors_x, start_times, score):
    """Rows {start_time, method, steps, evaluations, seconds, <score's metrics>, log_density_mae} for
    every start time, method and `bundle.solver_steps`. `score(theta)` -> dict of predictive metrics.
    Densities are Hutchinson (one Rademacher probe, the same probes in every row);
    `log_density_mae` is the mean absolute difference from the converged row's, per sample."""
    cfg = ctx["cfg"]
    ecfg, steps_list = cfg["evaluate"], sorted(int(s) for s in cfg["bundle"]["solver_steps"])
    mean, scale = ctx["whiten"]["mean"], ctx["whiten"]["scale"]
    from .evaluate import vector_field  # evaluate imports this module's callers; keep the import local
    vfield = vector_field(ctx["flow"])
    key = jax.random.PRNGKey(ecfg["seed"])
    rows, logq = [], {}
    for t0 in start_times:
        for method in METHODS:
            for steps in steps_list:
                t = time.time()
                theta, lq = sampler.sample_batched(
                    vfield, key, ecfg["flow_samples"], mean, scale, method=method, steps=steps,
                    trace="hutchinson", probes=1, start_time=t0,
                    anchors=np.asarray(anchors_x, np.float32) if t0 > 0 else None)
                seconds = time.time() - t
                logq[(t0, method, steps)] = lq
                rows.append({"start_time": float(t0), "method": method, "steps": steps,
                             "evaluations": evaluations(method, steps), "seconds": round(seconds, 3),
                             **score(theta)})
        ref = logq[(t0, "rk4", steps_list[-1])]
        for r in rows:
            if r["start_time"] == float(t0):
                r["log_density_mae"] = float(np.mean(np.abs(logq[(t0, r["method"], r["steps"])] - ref)))
                print(f"  solver {r['method']} x {r['steps']} at t0 {t0:g}: "
                      + ", ".join(f"{k} {r[k]:.4f}" for k in ("tv", "nll", "epistemic_eval", "log_density_mae")
                                  if k in r), flush=True)
    return rows


def rule(classification, tolerance, spread_tolerance, logq_tolerance):
    key = "tv" if classification else "nll"
    return (f"cheapest of euler/rk4 (field evaluations per sample) with |{key} - converged {key}| <= {tolerance:g}, "
            f"|epistemic / converged epistemic - 1| <= {spread_tolerance:g} and mean |log q - converged log q| <= "
            f"{logq_tolerance:g} nats at every swept start time; converged = rk4 at the most steps")


def within(row, ref, key, tolerance, spread_tolerance, logq_tolerance):
    spread_ok = (abs(row["epistemic_eval"] / ref["epistemic_eval"] - 1.0) <= spread_tolerance
                 if ref["epistemic_eval"] > 0 else row["epistemic_eval"] == 0)
    return abs(row[key] - ref[key]) <= tolerance and spread_ok and row["log_density_mae"] <= logq_tolerance


def choose(rows, classification, tolerance, spread_tolerance, logq_tolerance):
    """(method, steps, reason, converged) from sweep rows by `rule`."""
    key = "tv" if classification else "nll"
    starts = sorted({r["start_time"] for r in rows})
    if not starts:
        raise ValueError("empty solver sweep")
    converged = {}
    for t0 in starts:
        rk4 = [r for r in rows if r["start_time"] == t0 and r["method"] == "rk4"]
        if not rk4:
            raise ValueError(f"solver sweep has no rk4 row at start time {t0}")
        converged[t0] = max(rk4, key=lambda r: r["steps"])
    candidates = {(r["method"], r["steps"]) for r in rows}
    ok = []
    for method, steps in candidates:
        at = {r["start_time"]: r for r in rows if r["method"] == method and r["steps"] == steps}
        if all(t0 in at and within(at[t0], converged[t0], key, tolerance, spread_tolerance,
                                                                logq_tolerance) for t0 in starts):
            ok.append((evaluations(method, steps), method != "rk4", method, steps))
    if not ok:  # the converged row itself always qualifies; only reachable with missing rows
        raise ValueError("no solver within tolerance at every start time")
    _, _, method, steps = min(ok)
    where = ", ".join(f"t0={t0:g}: {key} {converged[t0][key]:.4f}, epistemic {converged[t0]['epistemic_eval']:.4g}"
                      for t0 in starts)
    reason = (f"converged (rk4 x {max(r['steps'] for r in rows)}) {where}; cheapest within tolerance at every "
              f"swept start time: {method} x {steps} ({evaluations(method, steps)} field evaluations per sample)")
    return method, steps, reason, {t0: {k: converged[t0][k] for k in (key, "epistemic_eval")} for t0 in starts}
