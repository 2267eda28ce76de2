"""Diagnostic: can the flow's samples be corrected into faithful posterior samples?

`python -m train.diagnostics.diagnose_fidelity WORKDIR [--n 400] [--seed 0] [--json OUT]` reads a
pipeline work dir (its cached data/map/align/canon/whiten/flow stages) and measures the
BMA predictive on the eval split against the held-out HMC chain for
  1. the plain flow (same draws as the evaluate stage when --seed/--n match it),
  2. self-normalized importance sampling (SNIS), w ∝ p(θ | data) / q(θ),
  3. HMC refinement (blackjax, true posterior invariant) started from the flow samples, as
     drawn and rescaled to typical NUTS unit scales (`decanonicalize`), and, as controls,
     from Gaussian noise around the MAP and from held-out HMC draws.

Coordinates: the flow lives in whitened canonical coordinates x, θ = mean + scale ⊙ x and
log q(θ) = log q_x(x) − Σ log scale (train/sampler.py). The posterior log-density is the one
NUTS sampled (train/posterior.py): training split, likelihood / temperature + Gaussian prior,
in the original (non-canonical) weight space. Canonicalization (train/canon.py) is a
projection onto the set where every hidden unit has unit incoming norm, so the canonical
samples are not distributed as p(θ): SNIS with this p targets p restricted to that set (the
prior's density on the slice, without the scale-marginal and Jacobian), not the canonical
pushforward of p. The predictive is scale-invariant, so refinement results are unaffected."""

import argparse
import json
import time
from pathlib import Path

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import softmax

from .. import config, metrics, mlp, pipeline, sampler
from .. import flow as flow_mod
from ..data import standardized
from ..export import run_net

CACHED = pipeline.STAGES[:pipeline.STAGES.index("evaluate") + 1]  # everything but the bundle


def config_path_for(work: Path) -> Path:
    """work/exp/NAME -> work/exp/NAME.toml when present, else train/configs/NAME.toml."""
    sibling = work.with_suffix(".toml")
    return sibling if sibling.exists() else Path("train/configs") / f"{work.name}.toml"


def load_work(work: Path, cfg_path: Path):
    """Cached stage arrays and reports; checks the cache fingerprints against the config."""
    cfg = config.load(cfg_path)
    stages, reports, stale, upstream = {}, {}, [], ""
    for stage in CACHED:
        meta = json.loads((work / f"{stage}.json").read_text())
        fp = pipeline._fingerprint(cfg, stage, upstream, pipeline._geometry_extra(cfg) if stage == "whiten" else "")
        if meta["fingerprint"] != fp:
            stale.append(stage)
        upstream = fp
        with np.load(work / f"{stage}.npz", allow_pickle=False) as z:
            stages[stage] = {k: z[k] for k in z.files}
        reports[stage] = meta["report"]
    if stale:
        raise RuntimeError(f"{work}: cached stages {stale} do not match {cfg_path}")
    return cfg, stages, reports


def log_posterior_fn(cfg, data, map_out, sizes):
    """θ [D] -> log p(θ | data) up to a constant, exactly as posterior.run builds it for NUTS."""
    x, y = standardized(data, "train")
    x, y = jnp.asarray(x), jnp.asarray(y)
    task, sigma = cfg["data"]["task"], float(map_out["noise_sigma"])
    temperature, prior_scale = cfg["likelihood"]["temperature"], cfg["posterior"]["prior_scale"]

    def loglik(theta):
        return mlp.log_likelihood(theta, x, y, sizes, task, sigma) / temperature

    def logpost(theta):
        return loglik(theta) + mlp.log_prior(theta, prior_scale)

    return logpost, loglik


def snis(logp, logq):
    """Normalized weights, ESS = (Σw)²/Σw², max weight and sd of the log-weights."""
    logw = np.asarray(logp, np.float64) - np.asarray(logq, np.float64)
    w = softmax(logw)
    return w, {"ess": float(1.0 / np.sum(w**2)), "max_weight": float(w.max()),
               "logw_sd": float(logw.std()), "n": int(len(w))}


class Scorer:
    """BMA metrics of (weighted) weight samples on the eval split against the HMC reference."""

    def __init__(self, cfg, data, map_out, held, net_bytes):
        self.task, self.net, self.data = cfg["data"]["task"], net_bytes, data
        self.sigma = float(map_out["noise_sigma"]) * data["y_std"].astype(np.float64)
        self.ref = self._predictive(run_net(net_bytes, data["x_eval"], held))

    def _predictive(self, out, w=None):
        w = np.full(len(out), 1.0 / len(out)) if w is None else w
        if self.task == "classification":  # Σ_s w_s softmax(logits_s), as metrics.bma_probs
            return np.einsum("s,snc->nc", w, softmax(np.asarray(out, np.float64), axis=-1))
        m = np.asarray(out, np.float64)
        mean = np.einsum("s,snk->nk", w, m)
        return mean, np.einsum("s,snk->nk", w, (m - mean) ** 2) + self.sigma**2

    def __call__(self, thetas, w=None):
        pred = self._predictive(run_net(self.net, self.data["x_eval"], thetas), w)
        y = self.data["y_eval"]
        if self.task == "classification":
            return metrics.classification(y, probs=pred, ref_probs=self.ref)
        out = metrics.regression(y, *pred)
        # not in the pipeline: distance of the predictive to HMC's, in raw target units
        out["mean_abs_diff_vs_hmc"] = float(np.mean(np.abs(pred[0] - self.ref[0])))
        out["mean_log_sd_ratio_vs_hmc"] = float(np.mean(0.5 * np.log(pred[1] / self.ref[1])))
        return out

    def reference(self):
        y = self.data["y_eval"]
        if self.task == "classification":
            return metrics.classification(y, probs=self.ref)
        return metrics.regression(y, *self.ref)


def decanonicalize(theta, donor, sizes):
    """Rescale the hidden units of canonical nets θ [S,D] to the incoming norms that
    canon.canonicalize divides out of donor nets [S,D] (function-preserving, the inverse of
    canonicalize when θ = canonicalize(donor)). Canonical nets sit on a slice where the
    prior is far lower than at typical NUTS scales; this puts them back at typical scales."""
    th = [(w.copy(), b.copy()) for w, b in mlp.unflatten(np.asarray(theta, np.float64), sizes)]
    dn = [(w.copy(), b.copy()) for w, b in mlp.unflatten(np.asarray(donor, np.float64), sizes)]
    norms = []
    for l in range(len(dn) - 1):  # the donor's norms, exactly as canonicalize computes them
        w, b = dn[l]
        n = np.sqrt(np.sum(w**2, axis=-1) + b**2)
        n = np.where(n > 1e-12, n, 1.0)
        norms.append(n)
        dn[l + 1] = (dn[l + 1][0] * n[..., None, :], dn[l + 1][1])
    for l in reversed(range(len(th) - 1)):  # undo canonicalize, last hidden layer first
        n = norms[l]
        th[l] = (th[l][0] * n[..., :, None], th[l][1] * n)
        th[l + 1] = (th[l + 1][0] / n[..., None, :], th[l + 1][1])
    return mlp.flatten(th).astype(np.float32)


def hmc_kernel(logpost, inv_mass, n_leapfrog):
    """One HMC transition per chain, vmapped; step size is an argument (no recompiles)."""
    kernel = blackjax.mcmc.hmc.build_kernel()

    def one(key, state, step):
        return kernel(key, state, logpost, step, inv_mass, n_leapfrog)

    return jax.vmap(one, in_axes=(0, 0, None))


def make_runner(logpost, inv_mass, n_leapfrog):
    """(states, key, n_steps, step) -> (states, mean acceptance); n_steps dynamic, one compile."""
    step_fn = hmc_kernel(logpost, inv_mass, n_leapfrog)

    @jax.jit
    def run(states, key, n_steps, step):
        def body(i, carry):
            states, acc = carry
            keys = jax.random.split(jax.random.fold_in(key, i), states.position.shape[0])
            states, info = step_fn(keys, states, step)
            return states, acc + info.acceptance_rate
        states, acc = jax.lax.fori_loop(0, n_steps, body, (states, jnp.zeros(states.position.shape[0])))
        return states, jnp.mean(acc) / jnp.maximum(n_steps, 1)

    init = jax.jit(jax.vmap(lambda th: blackjax.mcmc.hmc.init(th, logpost)))
    return init, run


def tune_step(init, run, start, key, base, target=0.75, pilot_steps=5):
    """Largest step on a ×2 grid around `base` whose pilot acceptance from exact posterior
    draws reaches `target` (acceptance is measured where the refined chains should end up)."""
    trials = {}
    for k in range(-4, 4):
        step = base * 2.0**k
        _, acc = run(init(start), key, pilot_steps, step)
        trials[f"{step:.3g}"] = float(acc)
    ok = [float(s) for s, a in trials.items() if a >= target]
    return (max(ok) if ok else base * 2.0**-4), trials


def refine(init, run, start, key, step, checkpoints, score, loglik_summary):
    """HMC from `start`; metrics, acceptance and mean log-likelihood at each checkpoint."""
    states = init(jnp.asarray(start))
    jax.block_until_ready(run(states, key, 1, step))  # compile outside the timing
    rows, done, t_total = [], 0, 0.0
    for c in checkpoints:
        acc = float("nan")
        if c > done:
            t0 = time.time()
            states, acc = run(states, jax.random.fold_in(key, c), c - done, step)
            acc = float(jax.block_until_ready(acc))
            t_total += time.time() - t0
        done = c
        theta = np.asarray(states.position)
        row = {"steps": c, "acceptance_since_previous": acc, **loglik_summary(theta), **score(theta)}
        # diagnostic, not an estimator: the BMA without the chains still stuck at poor fits
        keep = loglik_summary.good(theta)
        if keep.any():
            row["kept_good_fit"] = {"n": int(keep.sum()), **score(theta[keep])}
        rows.append(row)
    return rows, t_total / max(checkpoints[-1], 1)


def evenly(samples, n):
    """At most n evenly spaced rows (a chain thinned to the flow's sample count)."""
    return samples[np.linspace(0, len(samples) - 1, min(n, len(samples))).astype(int)]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.diagnostics.diagnose_fidelity", description=__doc__.split("\n")[0])
    p.add_argument("work")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--config", default=None, help="default: WORK.toml beside the dir, else train/configs/NAME.toml")
    p.add_argument("--trace", default="exact", choices=["exact", "hutchinson"])
    p.add_argument("--probes", type=int, default=16, help="Hutchinson probes (only with --trace hutchinson)")
    p.add_argument("--leapfrog", type=int, default=10, help="leapfrog steps per HMC transition")
    p.add_argument("--checkpoints", default="0,1,2,5,10,20,50")
    p.add_argument("--long-checkpoints", default="200,500", help="further checkpoints for the rescaled starts")
    a = p.parse_args(argv)

    t_start = time.time()
    work = Path(a.work)
    cfg_path = Path(a.config) if a.config else config_path_for(work)
    cfg, st, reports = load_work(work, cfg_path)
    data, map_out, ecfg = st["data"], st["map"], cfg["evaluate"]
    sizes = mlp.sizes_of(cfg, data)
    held_canon = st["canon"]["samples"][-1]
    held_aligned = st["align"]["samples"][-1]  # permuted NUTS draws: exact posterior draws
    train_aligned = st["align"]["samples"][:-1].reshape(-1, held_aligned.shape[-1])
    net_bytes = (work / "graphs" / "net.onnx").read_bytes()
    score = Scorer(cfg, data, map_out, held_canon, net_bytes)
    logpost, loglik = log_posterior_fn(cfg, data, map_out, sizes)
    logpost_b, loglik_b = jax.jit(jax.vmap(logpost)), jax.jit(jax.vmap(loglik))
    held_ll = np.asarray(loglik_b(jnp.asarray(held_aligned)))
    floor_ll = float(np.quantile(held_ll, 0.01))

    def loglik_summary(th):
        """Per-net training log-likelihood: is each sample a net as good as an HMC draw?"""
        ll = np.asarray(loglik_b(jnp.asarray(th)))
        return {"train_loglik_mean": float(ll.mean()), "train_loglik_median": float(np.median(ll)),
                "frac_loglik_above_hmc_q01": float(np.mean(ll >= floor_ll))}
    loglik_summary.good = lambda th: np.asarray(loglik_b(jnp.asarray(th))) >= floor_ll
    res = {"work": str(work), "config": str(cfg_path), "n": a.n, "seed": a.seed, "task": cfg["data"]["task"],
           "dim": int(held_canon.shape[-1]), "hmc_reference": {"draws": int(len(held_canon)), **score.reference()},
           "evaluate_json_flow": reports["evaluate"]["methods"]["flow"]}

    # noise floor: a BMA over n evenly spaced draws of each training chain against the held-out chain
    floor = [score(evenly(ch, a.n)) for ch in st["canon"]["samples"][:-1]]
    res["noise_floor_hmc_chains"] = {k: float(np.mean([f[k] for f in floor])) for k in floor[0]}

    # 1. plain flow, same key as evaluate.run when seed = evaluate.seed; θ does not depend on the trace mode
    params = flow_mod.unflatten_params(st["flow"])
    vfield = lambda t, x: flow_mod.velocity(params, t, x)
    t0 = time.time()
    kw = {"trace": a.trace, "probes": a.probes} if a.trace == "hutchinson" else {"trace": "exact"}
    theta, logq = sampler.sample_batched(vfield, jax.random.PRNGKey(a.seed), a.n, st["whiten"]["mean"],
                                         st["whiten"]["scale"], method=ecfg["solver"], steps=ecfg["steps"], **kw)
    res["flow_sampling_seconds"] = round(time.time() - t0, 1)
    res["plain_flow"] = {**loglik_summary(theta), **score(theta)}
    print(f"plain flow ({res['flow_sampling_seconds']}s, trace={a.trace}): {res['plain_flow']}", flush=True)

    # 2. SNIS; the log-density parts show where the spread of the log-weights comes from
    lp, ll = np.asarray(logpost_b(jnp.asarray(theta))), np.asarray(loglik_b(jnp.asarray(theta)))
    w, info = snis(lp, logq)
    parts = {"loglik": ll, "logprior": lp - ll, "logq": logq, "logp": lp}
    info["parts"] = {k: {"mean": float(v.mean()), "sd": float(v.std())} for k, v in parts.items()}
    info["hmc_heldout_loglik"] = {"mean": float(held_ll.mean()), "sd": float(held_ll.std()), "q01": floor_ll}
    res["snis"] = {**info, **score(theta, w)}
    print(f"SNIS: {res['snis']}", flush=True)

    # 3. HMC refinement; diagonal mass from the (non-canonical) aligned training draws, the
    # space NUTS moved in; step tuned on held-out draws
    inv_mass = jnp.asarray(train_aligned.var(0))
    init, run = make_runner(logpost, inv_mass, a.leapfrog)
    key = jax.random.PRNGKey(a.seed + 1000)
    pilot = evenly(held_aligned, a.n)
    base = float(np.median([c["step_size"] for c in reports["posterior"].get("chains", [])] or [1e-2]))
    step, trials = tune_step(init, run, jnp.asarray(pilot), key, base)
    res["hmc_refinement"] = {"leapfrog": a.leapfrog, "step_size": step, "nuts_step_size": base,
                             "pilot_acceptance": trials, "mass": "diag, var of aligned training draws"}
    print(f"HMC step {step:.3g} (pilot acceptance {trials})", flush=True)
    checkpoints = [int(c) for c in a.checkpoints.split(",")]
    long = checkpoints + [int(c) for c in a.long_checkpoints.split(",") if c]
    rng = np.random.default_rng(a.seed + 11)
    post_sd = st["canon"]["samples"][:-1].reshape(-1, held_canon.shape[-1]).std(0)
    donors = train_aligned[rng.choice(len(train_aligned), a.n)]
    starts = {
        "flow": theta,
        "flow_rescaled": decanonicalize(theta, donors, sizes),  # same functions, typical unit scales
        # the evaluate stage's Gaussian (MAP + per-coordinate posterior sd), equally rescaled:
        # does the flow start help beyond a crude one?
        "gaussian_rescaled": decanonicalize(
            st["canon"]["reference"][None] + post_sd * rng.standard_normal((a.n, len(post_sd))), donors, sizes),
        "hmc_heldout": pilot,  # should stay at the noise floor if the kernel is right
        "hmc_heldout_canonical": evenly(held_canon, a.n),  # the same draws on the canonical slice
    }
    for i, (name, start) in enumerate(starts.items()):
        t0 = time.time()
        rows, per_step = refine(init, run, start, jax.random.fold_in(key, i + 1), step,
                                 long if name.endswith("_rescaled") else checkpoints, score, loglik_summary)
        res["hmc_refinement"][name] = {"rows": rows, "seconds_per_step_all_chains": per_step,
                                       "seconds": round(time.time() - t0, 1)}
        for r in rows:
            print(f"  {name} steps={r['steps']}: " + ", ".join(f"{k}={v:.4g}" for k, v in r.items()
                                                           if k != "steps" and not isinstance(v, dict)), flush=True)
        print(f"  {name}: {per_step * 1e3:.1f} ms per step for {len(start)} chains", flush=True)
    res["total_seconds"] = round(time.time() - t_start, 1)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(f"done in {res['total_seconds']}s", flush=True)
    return res


if __name__ == "__main__":
    main()
