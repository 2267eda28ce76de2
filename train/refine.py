"""Refinement: K exact HMC transitions on every sample (bundle format version 3).

The flow's samples at the bundles' default start times are near-copies of stored NUTS draws
(memorization ratio <= 0.15). A transition kernel that leaves the posterior invariant maps
posterior draws to posterior draws, so a few HMC transitions started at the stored draws give
fresh draws with HMC's fidelity (docs/fidelity.md, "Rejuvenating stored draws"). The runtime
and this module implement the same law:

1. Rescale. A drawn sample θ_c is canonical (train/canon.py: every hidden unit's
   [incoming weights, bias] has unit norm). It is taken back to the original weight scales with
   the unit norms n of its anchor (start time t₀ > 0: the anchor its start was drawn around;
   t₀ = 0: a uniformly chosen anchor), layer by layer (`decanonicalize`):

       W_l ← n_l ⊙ W_l (rows), b_l ← n_l ⊙ b_l, W_{l+1} ← W_{l+1} ⊘ n_l (columns),  l hidden

   which is the exact inverse of canonicalize when n are the norms canonicalize divided out
   (`unit_norms`: walking the layers from the input side, the norm of layer l's unit is
   ||(w_j, b_j)|| after layer l−1's norms were multiplied into layer l's incoming weights; an
   exactly zero unit gets norm 1). The result is θ_0 (function unchanged).

2. K HMC transitions with diagonal inverse mass m (`refine.inverse_mass`: the variance of the
   aligned, non-canonical training draws), L leapfrog steps of size ε:

       p ~ N(0, diag(1/m))
       L times: p ← p + (ε/2) ∇log π(θ);  θ ← θ + ε m ⊙ p;  p ← p + (ε/2) ∇log π(θ)
       H = −log π(θ) + ½ Σ m ⊙ p²
       accept (θ_L) with probability min(1, exp(H_0 − H_1)); reject when H_1 is NaN

   log π is the density NUTS sampled (train/posterior.py): the likelihood on the standardized
   training split divided by the temperature, plus the Gaussian prior N(0, prior_scale²).

3. Canonicalize the final θ (train/canon.py). Refined samples have no log-density.

`tune_step` picks ε: the largest step whose mean acceptance probability over 5 pilot
transitions started at the stored (aligned) draws is >= 0.65, on a ×2 grid around the NUTS
step size refined by three geometric bisections (to a factor 2^(1/8)). `choose_transitions` picks the
bundle's default K from the refinement sweep."""

import jax
import jax.numpy as jnp
import numpy as np

from . import canon, mlp
from .data import standardized

PILOT_TRANSITIONS = 5
TARGET_ACCEPTANCE = 0.65  # near the optimum for long trajectories (Beskos et al. 2013: 0.651)
BISECTION_LEVELS = 3  # the step to a factor 2^(1/8) of the largest passing one


def hidden_width(sizes):
    """H = the sum of the hidden layer widths (the columns of `refine.anchor_unit_norms`)."""
    return int(sum(sizes[1:-1]))


def unit_norms(theta, sizes):
    """θ [..., D] (original scales, e.g. aligned NUTS draws) -> [..., H]: the norms
    canon.canonicalize divides out of each hidden unit, layers in order, units in order."""
    params = [(w.copy(), b.copy()) for w, b in mlp.unflatten(np.asarray(theta, np.float64), sizes)]
    norms = []
    for l in range(len(params) - 1):
        w, b = params[l]
        n = np.sqrt(np.sum(w**2, axis=-1) + b**2)
        n = np.where(n == 0.0, 1.0, n)  # an exactly zero unit, as canonicalize treats it
        norms.append(n)
        params[l + 1] = (params[l + 1][0] * n[..., None, :], params[l + 1][1])
    if not norms:
        return np.zeros((*np.shape(theta)[:-1], 0))
    return np.concatenate(norms, axis=-1)


def decanonicalize(theta_canon, norms, sizes):
    """Canonical θ [..., D] and unit norms [..., H] -> θ at those unit scales [..., D]
    (float64; the same function; decanonicalize(canonicalize(θ), unit_norms(θ)) = θ)."""
    th = [(w.copy(), b.copy()) for w, b in mlp.unflatten(np.asarray(theta_canon, np.float64), sizes)]
    norms = np.asarray(norms, np.float64)
    off = 0
    for l in range(len(th) - 1):
        k = sizes[l + 1]
        n = norms[..., off:off + k]
        off += k
        th[l] = (th[l][0] * n[..., :, None], th[l][1] * n)
        th[l + 1] = (th[l + 1][0] / n[..., None, :], th[l + 1][1])
    return mlp.flatten(th)


def log_posterior(task, x, y, sizes, noise_sigma, temperature, prior_scale):
    """θ [D] -> log π(θ) up to a constant, exactly as posterior.run builds it for NUTS."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)

    def logpost(theta):
        return (mlp.log_likelihood(theta, x, y, sizes, task, noise_sigma) / temperature
                + mlp.log_prior(theta, prior_scale))
    return logpost


def log_posterior_of(cfg, data, noise_sigma, sizes):
    """The pipeline's posterior (config, data stage, MAP stage's noise sigma)."""
    x, y = standardized(data, "train")
    return log_posterior(cfg["data"]["task"], x, y, sizes, float(noise_sigma),
                         cfg["likelihood"]["temperature"], cfg["posterior"]["prior_scale"])


def make_kernel(logdensity, inverse_mass, leapfrog_steps):
    """A jitted (key, θ [n,D], ε, K) -> (θ [n,D], mean acceptance probability) running K
    transitions on every row. K and ε are traced: one compile per shape."""
    m = jnp.asarray(inverse_mass, jnp.float32)
    value_grad = jax.vmap(jax.value_and_grad(logdensity))

    def transition(step, carry, key):
        theta, logp, grad, acc = carry
        k_mom, k_acc = jax.random.split(key)
        p0 = jax.random.normal(k_mom, theta.shape, theta.dtype) / jnp.sqrt(m)  # N(0, diag(1/m))

        def leap(_, s):
            q, p, _, g = s
            p = p + 0.5 * step * g
            q = q + step * m * p
            lp, g = value_grad(q)
            p = p + 0.5 * step * g
            return q, p, lp, g
        q, p, lp1, g1 = jax.lax.fori_loop(0, leapfrog_steps, leap, (theta, p0, logp, grad))
        h0 = -logp + 0.5 * jnp.sum(m * p0**2, axis=-1)
        h1 = -lp1 + 0.5 * jnp.sum(m * p**2, axis=-1)
        log_ratio = jnp.where(jnp.isnan(h1), -jnp.inf, h0 - h1)  # NaN: rejected
        prob = jnp.exp(jnp.minimum(log_ratio, 0.0))
        accept = jnp.log(jax.random.uniform(k_acc, logp.shape)) < log_ratio
        theta = jnp.where(accept[:, None], q, theta)
        logp = jnp.where(accept, lp1, logp)
        grad = jnp.where(accept[:, None], g1, grad)
        return theta, logp, grad, acc + prob

    @jax.jit
    def run(key, theta, step, transitions):
        theta = jnp.asarray(theta, jnp.float32)
        logp, grad = value_grad(theta)
        init = (theta, logp, grad, jnp.zeros(theta.shape[0], jnp.float32))
        theta, _, _, acc = jax.lax.fori_loop(
            0, transitions, lambda i, c: transition(step, c, jax.random.fold_in(key, i)), init)
        return theta, jnp.mean(acc) / jnp.maximum(transitions, 1)
    return run


def hmc(key, theta, logdensity, inverse_mass, step_size, leapfrog_steps, transitions, kernel=None):
    """K transitions of the kernel above on every row of θ [n,D] (original scales).
    Returns (θ [n,D] numpy f32, mean acceptance probability)."""
    run = kernel or make_kernel(logdensity, inverse_mass, leapfrog_steps)
    if transitions == 0:
        return np.asarray(theta, np.float32), float("nan")
    th, acc = run(key, jnp.asarray(theta, jnp.float32), jnp.float32(step_size), jnp.int32(transitions))
    return np.asarray(th, np.float32), float(acc)


def refine(theta_canon, anchor_index_or_norms, transitions, *, logdensity, inverse_mass, step_size,
           leapfrog_steps, sizes, key, anchor_norms=None, kernel=None):
    """The runtime's refinement of drawn canonical samples θ_c [n,D]: rescale each with its
    anchor's unit norms (an index [n] into `anchor_norms` [n_anchors,H], or norms [n,H]), run
    `transitions` HMC transitions, canonicalize. Returns (canonical θ [n,D] f32, acceptance)."""
    sel = np.asarray(anchor_index_or_norms)
    norms = np.asarray(anchor_norms)[sel] if sel.ndim == 1 and np.issubdtype(sel.dtype, np.integer) else sel
    theta0 = decanonicalize(theta_canon, norms, sizes)
    th, acc = hmc(key, theta0, logdensity, inverse_mass, step_size, leapfrog_steps, transitions, kernel)
    return np.asarray(canon.canonicalize(th, sizes), np.float32), acc


def tune_step(kernel, starts, key, base, target=TARGET_ACCEPTANCE, pilot=PILOT_TRANSITIONS,
              levels=BISECTION_LEVELS):
    """Largest step whose mean acceptance probability over `pilot` transitions from `starts`
    (stored aligned draws: where refined chains should stay) reaches `target`, to a factor
    2^(1/2^levels). First the grid base·2^k, k = 3, 2, …, −4, walked from the largest step down
    to the first that passes (acceptance falls with the step, so long trajectories cost a few
    trials, not eight); then `levels` geometric bisections between it and the failed step twice
    as large. base·2^−4 when no grid step passes; base·2^3 unbisected when the largest does.
    Bisection keeps a step whose acceptance sits just under the target from costing up to a
    factor 2 in trajectory length (diabetes: 0.647 at 0.0115). Returns (step, {step:
    acceptance})."""
    trials = {}
    starts = jnp.asarray(starts, jnp.float32)

    def passes(step):
        _, acc = kernel(key, starts, jnp.float32(step), jnp.int32(pilot))
        trials[f"{step:.4g}"] = float(acc)
        return float(acc) >= target
    for k in range(3, -5, -1):
        lo = float(base * 2.0**k)
        if passes(lo):
            if k == 3:
                return lo, trials
            hi = 2.0 * lo  # failed on the way down
            for _ in range(levels):
                mid = (lo * hi) ** 0.5
                lo, hi = (mid, hi) if passes(mid) else (lo, mid)
            return lo, trials
    return float(base * 2.0**-4), trials


def choose_transitions(rows, passes, memorization):
    """The bundle's default K from the refinement sweep: the smallest K whose row passes the
    start-time rule (`passes(row)` -> list of failed clauses, empty when it passes) and whose
    memorization ratio is >= `memorization`; else the passing K with the largest ratio; else 0.
    Returns (K, reason)."""
    rows = sorted(rows, key=lambda r: r["transitions"])
    fails = {r["transitions"]: passes(r) for r in rows}
    ok = [r for r in rows if not fails[r["transitions"]]]
    for r in ok:
        if r["memorization_ratio"] >= memorization:
            return int(r["transitions"]), (f"K={r['transitions']}: smallest passing K with memorization ratio "
                                           f"{r['memorization_ratio']:.3f} >= {memorization:g}")
    if ok:
        best = max(ok, key=lambda r: (r["memorization_ratio"], -r["transitions"]))
        return int(best["transitions"]), (f"no passing K reaches memorization ratio {memorization:g}; "
                                          f"K={best['transitions']} has the largest ({best['memorization_ratio']:.3f})")
    why = "; ".join(f"K={k}: " + ", ".join(f) for k, f in fails.items())
    return 0, f"no K passes the rule ({why}): no refinement"
