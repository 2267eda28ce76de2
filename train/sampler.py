"""Fixed-step ODE sampler for the flow in JAX, with exact or Hutchinson log-densities.

Same convention as the bundle format (docs/bundle-format.md): for θ = mean + scale ⊙ x₁ with
x₀ ~ N(0, I), log q(θ) = log N(x₀; 0, I) − ∫₀¹ tr ∂v/∂x (t, x_t) dt − Σ log scale.
The trace integral is part of the ODE state, integrated with the same scheme. Hutchinson
probes are drawn once per trajectory and held fixed. Used for evaluation and as the JAX
reference implementation in the runtime's benchmarks.

Start time t₀ (bundles with `flow.anchors`, whitened training draws a_1..a_n), exactly as the
runtime samples:
- t₀ = 0: the plain flow above.
- 0 < t₀ < 1: a uniformly chosen anchor a, z ~ N(0, I), x = t₀·a + (1 − t₀)·z, integrated from
  t₀ to 1 with the same number of solver steps spread over [t₀, 1]; the log-density starts from
  the Gaussian mixture log p_t₀(x) = logsumexp_i log N(x; t₀·a_i, (1 − t₀)² I) − log n.
- t₀ = 1: the anchors themselves, un-whitened, in a seeded random order (a permutation, cycled
  when more samples than anchors are asked for); no density (a trace mode is refused)."""

import jax
import jax.numpy as jnp
import numpy as np

from . import sphere

METHODS = ("euler", "heun", "rk4")


def _trace_fn(vfield, trace, eps):
    """(t [B], x [B,D]) -> (v [B,D], tr [B]) for the chosen trace mode."""
    if trace is None:
        return lambda t, x: (vfield(t, x), jnp.zeros(x.shape[0], x.dtype))
    if trace == "exact":
        def f(t, x):
            def single(ti, xi):
                jac = jax.jacfwd(lambda z: vfield(ti[None], z[None])[0])(xi)
                return jnp.trace(jac)
            return vfield(t, x), jax.vmap(single)(t, x)
        return f
    if trace == "hutchinson":
        def f(t, x):
            def one_probe(e):  # e [B,D]; samples are independent, so J·e is per-row
                v, jv = jax.jvp(lambda z: vfield(t, z), (x,), (e,))
                return v, jnp.sum(e * jv, axis=-1)
            v, quad = jax.vmap(one_probe, in_axes=1, out_axes=(0, 1))(eps)
            return v[0], quad.mean(axis=1)
        return f
    raise ValueError(f"unknown trace mode {trace!r}")


def integrate(vfield, x0, method="rk4", steps=20, trace=None, eps=None, start_time=0.0):
    """Integrate from t=start_time to t=1 in `steps` equal steps. Returns x₁ [B,D] and ∫ tr J dt [B].
    A field with a sphere geometry (`vfield.geometry`, train/sphere.py) is integrated on the
    manifold: tangent velocities P u, the Riemannian divergence, and every stage point and step
    result retracted onto the spheres (the runtime's rule)."""
    if method not in METHODS:
        raise ValueError(f"unknown solver {method!r}")
    geometry = getattr(vfield, "geometry", None)
    f = _trace_fn(vfield, trace, eps) if geometry is None else sphere.trace_fn(vfield, geometry, trace, eps)
    retract = (lambda x: x) if geometry is None else geometry.retract
    t_start = float(start_time)
    h = (1.0 - t_start) / steps
    b = x0.shape[0]

    def rhs(t, state):
        return f(jnp.full((b,), t, x0.dtype), state[0])

    def comb(state, *terms):
        """state + Σ c·k, the point retracted once at the end (a stage point or a step result)."""
        x, acc = state
        for k, c in terms:
            x, acc = x + c * k[0], acc + c * k[1]
        return retract(x), acc

    def step(state, i):
        t = t_start + i * h
        k1 = rhs(t, state)
        if method == "euler":
            return comb(state, (k1, h)), None
        if method == "heun":
            k2 = rhs(t + h, comb(state, (k1, h)))
            return comb(state, (k1, h / 2), (k2, h / 2)), None
        k2 = rhs(t + h / 2, comb(state, (k1, h / 2)))
        k3 = rhs(t + h / 2, comb(state, (k2, h / 2)))
        k4 = rhs(t + h, comb(state, (k3, h)))
        return comb(state, (k1, h / 6), (k2, h / 3), (k3, h / 3), (k4, h / 6)), None

    init = (x0, jnp.zeros(b, x0.dtype))
    (x1, int_tr), _ = jax.lax.scan(step, init, jnp.arange(steps, dtype=x0.dtype))
    return x1, int_tr


def check_start_time(start_time, anchors, trace=None):
    """The runtime's rules: t₀ in [0, 1]; t₀ > 0 needs anchors; t₀ = 1 has no density."""
    t0 = float(start_time)
    if not 0.0 <= t0 <= 1.0:
        raise ValueError(f"start time {t0} outside [0, 1]")
    if t0 > 0.0 and (anchors is None or len(anchors) == 0):
        raise ValueError(f"start time {t0} > 0 needs anchors (flow.anchors)")
    if t0 == 1.0 and trace is not None:
        raise ValueError("start time 1 returns the stored draws, which have no density: use trace=None")
    return t0


def mixture_log_density(x, anchors, start_time, batch=8):
    """log p_t₀(x) = log (1/n) Σ_i N(x; t₀·a_i, (1 − t₀)² I) for x [B,D], anchors [n,D], 0 ≤ t₀ < 1.

    Squared distances are summed from the differences themselves (not |x|² − 2x·a + |a|², which
    loses ~D·ε·|x|² / (1 − t₀)² nats in float32), then combined with log-sum-exp."""
    t0 = float(start_time)
    s = 1.0 - t0
    anchors = jnp.asarray(anchors, jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    n, d = anchors.shape
    centers = t0 * anchors

    def one(xi):
        r2 = jnp.sum((xi[None, :] - centers) ** 2, axis=-1)
        return jax.scipy.special.logsumexp(-0.5 * r2 / s**2)

    lse = jax.lax.map(one, x, batch_size=batch)
    return lse - jnp.log(n) - d * jnp.log(s) - 0.5 * d * jnp.log(2 * jnp.pi)


def anchor_order(key, n, count):
    """t₀ = 1's anchor indices [n]: a seeded permutation of range(count), cycled."""
    perm = np.asarray(jax.random.permutation(key, count))
    return perm[np.arange(n) % count]


def start_anchor_indices(key, n, count, start_time, batch=200):
    """The anchor each of `sample_batched`'s n samples started around (same key and batch):
    t₀ = 1 `anchor_order`; 0 < t₀ < 1 the uniform picks of `sample`, chunk by chunk; t₀ = 0 has
    none, so a uniformly chosen one (refinement rescales with it, train/refine.py)."""
    t0 = float(start_time)
    if t0 == 1.0:
        return anchor_order(key, n, count)
    if t0 == 0.0:
        return np.asarray(jax.random.randint(jax.random.fold_in(key, 3), (n,), 0, count))
    return np.concatenate([np.asarray(jax.random.randint(jax.random.fold_in(jax.random.fold_in(key, i), 2),
                                                         (min(batch, n - start),), 0, count))
                           for i, start in enumerate(range(0, n, batch))])


def sample_anchors(key, n, anchors, mean, scale):
    """t₀ = 1: the un-whitened anchors in a seeded random order (a permutation of all of them,
    cycled when n exceeds their count; `anchor_order`). numpy f32 [n,D], θ = mean + scale ⊙ a."""
    anchors = np.asarray(anchors, np.float32)
    idx = anchor_order(key, n, len(anchors))
    mean, scale = np.asarray(mean, np.float32), np.asarray(scale, np.float32)
    return (mean[None] + scale[None] * anchors[idx]).astype(np.float32)


def sample(vfield, key, n, mean, scale, method="rk4", steps=20, trace=None, probes=1,
           noise="rademacher", start_time=0.0, anchors=None):
    """Draw n weight vectors θ [n,D] and their log-densities [n] (zeros when trace=None).
    `start_time` t₀ in [0, 1) with whitened `anchors` [m,D] when t₀ > 0 (t₀ = 1: sample_anchors)."""
    t0 = check_start_time(start_time, anchors, trace)
    if t0 == 1.0:
        raise ValueError("start time 1: use sample_anchors (or sample_batched)")
    mean, scale = jnp.asarray(mean), jnp.asarray(scale)
    d = mean.shape[0]
    k0, ke = jax.random.split(key)
    x0 = jax.random.normal(k0, (n, d))
    eps = None
    if trace == "hutchinson":
        eps = (jax.random.rademacher(ke, (n, probes, d)).astype(x0.dtype) if noise == "rademacher"
               else jax.random.normal(ke, (n, probes, d)))
    geometry = getattr(vfield, "geometry", None)
    if t0 == 0.0 and geometry is not None:  # D normals, each sphere block normalized: uniform
        x_start = geometry.retract(x0)
        base = geometry.base_log_density(x_start)
    elif geometry is not None:  # the geodesic start mixture (train/sphere.py, start_point)
        anchors = geometry.retract(jnp.asarray(anchors, jnp.float32))  # f16 anchors back onto the slice
        pick = jax.random.randint(jax.random.fold_in(key, 2), (n,), 0, anchors.shape[0])
        x_start = sphere.start_point(geometry, geometry.retract(x0), anchors[pick], t0)
        base = (sphere.start_log_density(geometry, x_start, anchors, t0) if trace is not None
                else jnp.zeros(n, x0.dtype))
    elif t0 == 0.0:
        x_start = x0
        base = -0.5 * jnp.sum(x0**2, axis=-1) - 0.5 * d * jnp.log(2 * jnp.pi)
    else:
        anchors = jnp.asarray(anchors, jnp.float32)
        pick = jax.random.randint(jax.random.fold_in(key, 2), (n,), 0, anchors.shape[0])
        x_start = t0 * anchors[pick] + (1.0 - t0) * x0
        base = (mixture_log_density(x_start, anchors, t0) if trace is not None
                else jnp.zeros(n, x0.dtype))
    x1, int_tr = integrate(vfield, x_start, method, steps, trace, eps, start_time=t0)
    # Without a trace there is no density: zeros, as documented (not a base term missing its trace).
    logq = base - int_tr - jnp.sum(jnp.log(scale)) if trace is not None else jnp.zeros(n, x1.dtype)
    return mean + scale * x1, logq


def sample_batched(vfield, key, n, mean, scale, batch=200, **kw):
    """sample() in chunks (keeps memory flat for large n); numpy outputs. At start time 1 the
    anchors are returned whole (one permutation, no chunks) with zero log-densities."""
    if float(kw.get("start_time", 0.0)) == 1.0:
        check_start_time(1.0, kw.get("anchors"), kw.get("trace"))
        theta = sample_anchors(key, n, kw["anchors"], mean, scale)
        geometry = getattr(vfield, "geometry", None)  # stored draws renormalized, as the runtime does
        return (theta if geometry is None else geometry.retract(theta)), np.zeros(n, np.float32)
    thetas, logqs = [], []
    fn = jax.jit(lambda k, m: sample(vfield, k, m, mean, scale, **kw), static_argnums=1)
    for i, start in enumerate(range(0, n, batch)):
        th, lq = fn(jax.random.fold_in(key, i), min(batch, n - start))
        thetas.append(np.asarray(th))
        logqs.append(np.asarray(lq))
    return np.concatenate(thetas), np.concatenate(logqs)
