"""Fixed-step ODE sampler for the flow in JAX, with exact or Hutchinson log-densities.

Same convention as the bundle format (docs/bundle-format.md): for θ = mean + scale ⊙ x₁ with
x₀ ~ N(0, I), log q(θ) = log N(x₀; 0, I) − ∫₀¹ tr ∂v/∂x (t, x_t) dt − Σ log scale.
The trace integral is part of the ODE state, integrated with the same scheme. Hutchinson
probes are drawn once per trajectory and held fixed. Used for evaluation and as the JAX
reference implementation in the runtime's benchmarks."""

import jax
import jax.numpy as jnp
import numpy as np

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


def integrate(vfield, x0, method="rk4", steps=20, trace=None, eps=None):
    """Integrate from t=0 to t=1. Returns x₁ [B,D] and ∫ tr J dt [B]."""
    if method not in METHODS:
        raise ValueError(f"unknown solver {method!r}")
    f = _trace_fn(vfield, trace, eps)
    h = 1.0 / steps
    b = x0.shape[0]

    def rhs(t, state):
        return f(jnp.full((b,), t, x0.dtype), state[0])

    def add(state, k, c):
        return (state[0] + c * k[0], state[1] + c * k[1])

    def step(state, i):
        t = i * h
        k1 = rhs(t, state)
        if method == "euler":
            return add(state, k1, h), None
        if method == "heun":
            k2 = rhs(t + h, add(state, k1, h))
            return add(add(state, k1, h / 2), k2, h / 2), None
        k2 = rhs(t + h / 2, add(state, k1, h / 2))
        k3 = rhs(t + h / 2, add(state, k2, h / 2))
        k4 = rhs(t + h, add(state, k3, h))
        state = add(state, k1, h / 6)
        state = add(state, k2, h / 3)
        state = add(state, k3, h / 3)
        return add(state, k4, h / 6), None

    init = (x0, jnp.zeros(b, x0.dtype))
    (x1, int_tr), _ = jax.lax.scan(step, init, jnp.arange(steps, dtype=x0.dtype))
    return x1, int_tr


def sample(vfield, key, n, mean, scale, method="rk4", steps=20, trace=None, probes=1,
           noise="rademacher"):
    """Draw n weight vectors θ [n,D] and their log-densities [n] (zeros when trace=None)."""
    mean, scale = jnp.asarray(mean), jnp.asarray(scale)
    d = mean.shape[0]
    k0, ke = jax.random.split(key)
    x0 = jax.random.normal(k0, (n, d))
    eps = None
    if trace == "hutchinson":
        eps = (jax.random.rademacher(ke, (n, probes, d)).astype(x0.dtype) if noise == "rademacher"
               else jax.random.normal(ke, (n, probes, d)))
    x1, int_tr = integrate(vfield, x0, method, steps, trace, eps)
    base = -0.5 * jnp.sum(x0**2, axis=-1) - 0.5 * d * jnp.log(2 * jnp.pi)
    logq = base - int_tr - jnp.sum(jnp.log(scale))
    return mean + scale * x1, logq


def sample_batched(vfield, key, n, mean, scale, batch=200, **kw):
    """sample() in chunks (keeps memory flat for large n); numpy outputs."""
    thetas, logqs = [], []
    fn = jax.jit(lambda k, m: sample(vfield, k, m, mean, scale, **kw), static_argnums=1)
    for i, start in enumerate(range(0, n, batch)):
        th, lq = fn(jax.random.fold_in(key, i), min(batch, n - start))
        thetas.append(np.asarray(th))
        logqs.append(np.asarray(lq))
    return np.concatenate(thetas), np.concatenate(logqs)
