"""The posterior's density on the canonical slice, and importance weights of flow samples.

NUTS samples p(θ) ∝ L(θ) · N(θ; 0, s² I) (train/posterior.py; L includes the likelihood
temperature). Canonicalization (train/canon.py) maps θ to θ̄ on the slice
M = Π_units S^{k−1} × R^E. Inverting it: with per-unit scales λ_l ∈ R₊^{h_l} for hidden layers
l = 1..L (λ_0 = 1 for the inputs; the output layer is not rescaled),

    W_l[i, j] = W̄_l[i, j] λ_l[i] / λ_{l−1}[j],   b_l[i] = b̄_l[i] λ_l[i],
    W_{L+1}[m, i] = W̄_{L+1}[m, i] / λ_L[i],       b_{L+1} = b̄_{L+1}.

The map (θ̄, λ) ↦ θ is a bijection from M × R₊^S onto R^D (up to null sets). Ordered layer by
layer its Jacobian is block lower-bidiagonal (layer l depends on λ_l, θ̄_l and λ_{l−1} only), so
its determinant is the product of the diagonal blocks: spherical coordinates of each unit's
rescaled incoming vector (λ_l[i] ā_l[i]) give λ_l[i]^{k_l−1}, and dividing the next layer's
weights by λ_l[j] gives λ_l[j]^{−h_{l+1}}. Per unit: |J| = Π λ^{k_l − 1 − h_{l+1}}, h_{L+1} = C.
L(θ) = L(θ̄) (canonicalization preserves the function), so the push-forward density of p onto M,
relative to the spheres' surface measures times Lebesgue measure on R^E, is

    p̄(θ̄) ∝ L(θ̄) · ∫_{R₊^S} N(θ(θ̄, λ); 0, s² I) Π_units λ^{k−1−h_out} dλ.

One hidden layer (L = 1): |θ|² = Σ_i λ_i² + Σ_i r_i²/λ_i² + |b̄_2|², r_i = |W̄_2[:, i]| (the
unit's outgoing weights), so the integral factorizes into one 1-D integral per unit with a
closed form (∫₀^∞ λ^{ν−1} e^{−aλ² − b/λ²} dλ = (b/a)^{ν/4} K_{ν/2}(2√(ab)), K the modified
Bessel function of the second kind):

    ∫₀^∞ λ^{ν−1} exp(−λ²/(2s²) − r²/(2s²λ²)) dλ = r^{ν/2} K_{ν/2}(r/s²),   ν = k − C.

Deeper nets (L ≥ 2): the units of layer l are coupled to layer l−1 through W̄_l, but given
λ_{L−1} the last hidden layer still factorizes, unit i having a = A_i/(2s²),
A_i = Σ_j W̄_L[i, j]²/λ_{L−1}[j]² + b̄_L[i]², and b = r_i²/(2s²):
(r_i²/A_i)^{ν/4} K_{ν/2}(r_i √A_i / s²), ν = k_L − C. The scales of layers 1..L−1 are
integrated by importance sampling in u = log λ with a multivariate-t proposal (4 degrees of
freedom) at the Laplace approximation of the full integrand (mode and Hessian by autodiff);
the estimate's standard error is reported (`log_slice_prior` returns it).

Self-normalized importance weights of flow samples θ̄_n ~ q: log w_n = log p̄(θ̄_n) − log q(θ̄_n)
(q from the sampler on the sphere product, relative to the same measure), normalized; ESS =
(Σ w)² / Σ w². A Euclidean flow's q is a density on R^D, the slice has Lebesgue measure zero,
and these weights are not defined for it."""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import kve, logsumexp, softmax

from . import mlp, whiten


def log_bessel_k(v, z):
    """log K_v(z) for z > 0 (exponentially scaled, so large z does not underflow)."""
    return np.log(kve(np.abs(v), z)) - z


def log_orbit_integral(nu, a, b):
    """log ∫₀^∞ λ^{ν−1} exp(−aλ² − b/λ²) dλ = log[(b/a)^{ν/4} K_{ν/2}(2√(ab))], a, b > 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return 0.25 * nu * (np.log(b) - np.log(a)) + log_bessel_k(0.5 * nu, 2.0 * np.sqrt(a * b))


def _layers(theta_bar, sizes):
    return [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in mlp.unflatten(theta_bar, sizes)]


def log_gauss_const(sizes, s):
    return -0.5 * mlp.dim(sizes) * np.log(2 * np.pi * s * s)


def _last_hidden_terms(w_l, b_l, w_out, lam_prev, s):
    """Σ_i log ∫ over the last hidden layer's λ_i given λ_{L−1} (lam_prev [..., h_{L−1}] or None
    for L = 1: then A_i = |ā_i|² = 1). w_l [h_L, h_{L−1}], b_l [h_L], w_out [C, h_L]."""
    k, c = w_l.shape[1] + 1, w_out.shape[0]
    nu = k - c
    r2 = np.sum(w_out**2, axis=0)  # [h_L]
    if lam_prev is None:
        big_a = np.sum(w_l**2, axis=1) + b_l**2
    else:
        big_a = np.sum(w_l[None] ** 2 / lam_prev[:, None, :] ** 2, axis=-1) + b_l**2  # [M, h_L]
    return np.sum(log_orbit_integral(nu, big_a / (2 * s * s), r2 / (2 * s * s)), axis=-1)


def log_slice_prior(theta_bar, sizes, prior_scale, draws=512, seed=0, mode=None):
    """log ∫ N(θ(θ̄, λ); 0, s² I) |J| dλ for one canonical θ̄ [D]: the prior's push-forward
    density onto the slice (surface measure × Lebesgue). Returns (value, standard error); the
    error is 0 for one hidden layer (closed form)."""
    s = float(prior_scale)
    layers = _layers(np.asarray(theta_bar, np.float64), sizes)
    hidden = len(layers) - 1
    w_out, b_out = layers[-1]
    const = log_gauss_const(sizes, s) - 0.5 * np.sum(b_out**2) / (s * s)
    if hidden == 1:
        w1, b1 = layers[0]
        return float(const + _last_hidden_terms(w1, b1, w_out, None, s)), 0.0
    return _importance(layers, sizes, s, const, draws, seed, mode)


def _log_integrand_u(sizes, s):
    """JAX: f(u, θ̄), the integrand over u = log λ of every hidden layer (including dλ = λ du),
    for the Laplace fit of the proposal; the estimate itself integrates the last hidden layer
    in closed form."""
    hidden = len(sizes) - 2
    hs = sizes[1:-1]

    def f(u, theta):
        layers = mlp.unflatten(theta, sizes)
        lams, off = [], 0
        for h in hs:
            lams.append(jnp.exp(u[off:off + h]))
            off += h
        sq = 0.0
        prev = jnp.ones(sizes[0])
        logj = 0.0
        for l in range(hidden):
            w, b = layers[l]
            lam = lams[l]
            sq = sq + jnp.sum((w * lam[:, None] / prev[None, :]) ** 2) + jnp.sum((b * lam) ** 2)
            logj = logj + (sizes[l] + 1 - 1 - sizes[l + 2]) * jnp.sum(u[sum(hs[:l]):sum(hs[:l + 1])])
            prev = lam
        sq = sq + jnp.sum((layers[-1][0] / prev[None, :]) ** 2)
        return -0.5 * sq / (s * s) + logj + jnp.sum(u)
    return f


_MODE_CACHE = {}


def laplace_modes(theta_bar, sizes, prior_scale, iters=60):
    """Mode and Hessian of f(·, θ̄) for rows θ̄ [n, D] (damped Newton, vmapped, jitted once per
    (sizes, s))."""
    key = (tuple(sizes), float(prior_scale), iters)
    if key not in _MODE_CACHE:
        f = _log_integrand_u(list(sizes), float(prior_scale))
        grad, hess = jax.grad(f), jax.hessian(f)
        n_u = sum(sizes[1:-1])

        def one(theta):
            def body(_, u):
                g, h = grad(u, theta), hess(u, theta)
                step = jnp.clip(jnp.linalg.solve(h - 1e-6 * jnp.eye(n_u), -g), -1.0, 1.0)
                cand = u + step
                return jnp.where(f(cand, theta) >= f(u, theta), cand, u + 0.05 * jnp.clip(g, -1.0, 1.0))
            u = jax.lax.fori_loop(0, iters, body, jnp.zeros(n_u, theta.dtype))
            return u, hess(u, theta), jnp.max(jnp.abs(grad(u, theta)))
        _MODE_CACHE[key] = jax.jit(jax.vmap(one))
    with jax.enable_x64(True):
        u, h, g = _MODE_CACHE[key](jnp.asarray(theta_bar, jnp.float64))
    return np.asarray(u), np.asarray(h), np.asarray(g)


def _importance(layers, sizes, s, const, draws, seed, mode=None):
    if mode is None:
        u, h, _ = laplace_modes(mlp.flatten(layers)[None], sizes, s)
        mode = (u[0], h[0])
    u, h = mode
    sizes_h = list(sizes[1:-1])
    n_outer = sum(sizes_h[:-1])
    cov = np.linalg.inv(-np.asarray(h, np.float64))
    cov = 0.5 * (cov + cov.T)
    mu = np.asarray(u, np.float64)[:n_outer]
    cov = cov[:n_outer, :n_outer]  # the outer layers' marginal of the Laplace Gaussian
    dof = 4.0
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(cov)
    z = rng.standard_normal((draws, n_outer))
    g2 = rng.chisquare(dof, draws) / dof
    uu = mu + (z @ chol.T) / np.sqrt(g2)[:, None]
    # log-density of the multivariate t proposal
    from scipy.stats import multivariate_t
    logprop = multivariate_t(loc=mu, shape=cov, df=dof).logpdf(uu)
    # exact integrand over the outer layers, last hidden layer in closed form
    hidden = len(layers) - 1
    lams, off = [], 0
    for h in sizes_h[:-1]:
        lams.append(np.exp(uu[:, off:off + h]))
        off += h
    sq = np.zeros(draws)
    prev = np.ones((draws, layers[0][0].shape[1]))
    logj = np.zeros(draws)
    for l in range(hidden - 1):
        w, b = layers[l]
        lam = lams[l]
        sq += np.sum((w[None] * lam[:, :, None] / prev[:, None, :]) ** 2, axis=(1, 2)) + np.sum((b * lam) ** 2, axis=1)
        k, out = w.shape[1] + 1, layers[l + 1][0].shape[0]
        logj += (k - 1 - out) * np.sum(np.log(lam), axis=1)
        prev = lam
    # the last hidden layer's incoming weights are divided by λ_{L−1}: Jacobian λ_{L−1}^{−h_L}
    # is inside logj above (out = h_L for l = L−2); its integral over λ_L in closed form
    w_l, b_l = layers[hidden - 1]
    last = _last_hidden_terms(w_l, b_l, layers[-1][0], prev, s)
    logint = -0.5 * sq / (s * s) + logj + np.sum(uu, axis=1) + last
    logw = logint - logprop
    est = logsumexp(logw) - np.log(draws)
    w = softmax(logw)
    rel_se = np.sqrt(max(np.sum(w**2) * draws - 1.0, 0.0) / draws)  # sd of the mean of exp(logw) / mean
    return float(const + est), float(rel_se)


def log_target(theta_bar, sizes, loglik_fn, prior_scale, draws=512, seed=0):
    """log p̄(θ̄) up to a constant for rows θ̄ [n, D]: tempered log-likelihood + log slice prior.
    Returns (log p̄ [n], standard errors [n])."""
    ll = np.asarray(jax.vmap(loglik_fn)(jnp.asarray(theta_bar)), np.float64)
    rows = np.asarray(theta_bar, np.float64)
    if len(sizes) > 3:
        u, h, _ = laplace_modes(rows, sizes, prior_scale)
        modes = list(zip(u, h))
    else:
        modes = [None] * len(rows)
    pri = [log_slice_prior(th, sizes, prior_scale, draws, seed + i, modes[i]) for i, th in enumerate(rows)]
    return ll + np.array([p[0] for p in pri]), np.array([p[1] for p in pri])


def snis(logp, logq):
    """Self-normalized importance weights, ESS/n and the log-weight spread."""
    logw = np.asarray(logp, np.float64) - np.asarray(logq, np.float64)
    w = softmax(logw)
    ess = float(1.0 / np.sum(w**2))
    return w, {"n": int(len(w)), "ess": ess, "ess_per_n": ess / len(w), "max_weight": float(w.max()),
               "logw_sd": float(logw.std())}


def training_anchors(st):
    """The whitened training draws (every chain but the held-out one), the anchors a bundle stores
    (there thinned to its size budget and kept in f16; here all of them, in f32)."""
    samples = st["canon"]["samples"]
    return whiten.apply(samples[:-1].reshape(-1, samples.shape[-1]).astype(np.float64), st["whiten"]["mean"],
                        st["whiten"]["scale"])


def main(argv=None):
    """`python -m train.slice_density WORK [--config CFG] [--n 400] [--json OUT]`: importance weights of
    the work dir's sphere flow against the posterior on the slice, ESS/n and the weighted BMA."""
    from .diagnostics import diagnose_fidelity as dfid
    from . import evaluate, sampler
    p = argparse.ArgumentParser(prog="python -m train.slice_density")
    p.add_argument("work")
    p.add_argument("--config", default=None)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--draws", type=int, default=512, help="importance draws per sample for the scale integral")
    p.add_argument("--solver", default=None, help="default: the config's evaluate.solver")
    p.add_argument("--steps", type=int, default=None, help="default: the config's evaluate.steps")
    p.add_argument("--start-time", type=float, default=0.0,
                   help="t0 in [0, 1): start from the geodesic mixture around the training draws (anchors)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    work = Path(a.work)
    cfg, st, reports = dfid.load_work(work, Path(a.config) if a.config else dfid.config_path_for(work))
    data, map_out = st["data"], st["map"]
    sizes = mlp.sizes_of(cfg, data)
    vfield = evaluate.vector_field(st["flow"])
    if getattr(vfield, "geometry", None) is None:
        raise SystemExit("a Euclidean flow's density is relative to Lebesgue measure on R^D; the posterior on "
                         "the slice has no density there: importance weights are not defined")
    _, loglik = dfid.log_posterior_fn(cfg, data, map_out, sizes)
    method, steps = a.solver or cfg["evaluate"]["solver"], a.steps or cfg["evaluate"]["steps"]
    if not 0.0 <= a.start_time < 1.0:
        raise SystemExit(f"--start-time {a.start_time}: must be in [0, 1) (at 1 the samples are the stored "
                         "draws, with no density)")
    anchors = training_anchors(st) if a.start_time > 0 else None
    t0 = time.time()
    theta, logq = sampler.sample_batched(vfield, jax.random.PRNGKey(a.seed), a.n, st["whiten"]["mean"],
                                         st["whiten"]["scale"], method=method, steps=steps, trace="hutchinson",
                                         probes=a.probes, start_time=a.start_time, anchors=anchors)
    t_sample = time.time() - t0
    t0 = time.time()
    logp, se = log_target(theta, sizes, loglik, cfg["posterior"]["prior_scale"], a.draws, a.seed)
    t_target = time.time() - t0
    w, info = snis(logp, logq)
    held = st["canon"]["samples"][-1]
    net_bytes = (work / "graphs" / "net.onnx").read_bytes()
    score = dfid.Scorer(cfg, data, map_out, held, net_bytes)
    ll = np.asarray(jax.vmap(loglik)(jnp.asarray(theta)))
    held_ll = np.asarray(jax.vmap(loglik)(jnp.asarray(held)))
    held_logp, _ = log_target(held[:: max(1, len(held) // 50)], sizes, loglik, cfg["posterior"]["prior_scale"],
                              a.draws, a.seed + 10_000)
    res = {"work": str(work), "n": a.n, "solver": {"method": method, "steps": steps},
           "start_time": a.start_time, "anchors": None if anchors is None else int(len(anchors)),
           "trace": f"hutchinson, {a.probes} Rademacher probes (tangent-projected)",
           "sampling_seconds": round(t_sample, 1), "target_seconds": round(t_target, 1),
           "snis": info, "unweighted": score(theta), "weighted": score(theta, w),
           "loglik_flow": {"mean": float(ll.mean()), "median": float(np.median(ll)), "max": float(ll.max())},
           "loglik_hmc_heldout": {"mean": float(held_ll.mean()), "min": float(held_ll.min())},
           "log_target_flow": {"mean": float(logp.mean()), "sd": float(logp.std())},
           "log_slice_prior_flow": {"mean": float((logp - ll).mean()), "sd": float((logp - ll).std())},
           "log_target_hmc_heldout": {"mean": float(held_logp.mean()), "sd": float(held_logp.std())},
           "logq": {"mean": float(np.mean(logq)), "sd": float(np.std(logq))},
           "slice_prior_relative_se": {"max": float(se.max()), "median": float(np.median(se))},
           "log_weights": (np.asarray(logp, np.float64) - np.asarray(logq, np.float64)).tolist()}
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
