"""The product of spheres that canonicalization defines (`flow.geometry = "sphere_product"`).

Canonicalization (train/canon.py) scales every hidden unit's [incoming weights, bias] a ∈ R^k
(k = fan-in + 1) to unit norm, so canonical weights lie on the *slice*
M = S^{k_1−1} × … × S^{k_S−1} × R^E, one sphere per hidden unit (located by the MLP layout,
`network.layers`), E the last layer's weights and bias. Whitening is the identity on sphere
coordinates, so the flow's state x has the same sphere blocks. On one block (x unit, u ∈ R^k):

- tangent projection: P = I − x xᵀ, v = P u;
- retraction: x ↦ x / |x| (applied to every solver stage point and step result);
- geodesics: angle Ω = arccos(x₀·x₁); slerp x_t = [sin((1−t)Ω) x₀ + sin(tΩ) x₁] / sin Ω,
  velocity ẋ_t = Ω [cos(tΩ) x₁ − cos((1−t)Ω) x₀] / sin Ω (|ẋ_t| = Ω);
  log map log_x(y) = Ω (y − (x·y) x) / |y − (x·y) x|, exp map exp_x(v) = cos|v| x + sin|v| v/|v|;
- geodesic cost d²(x₀, x₁) = Σ_s Ω_s² + |x₀,E − x₁,E|²;
- uniform base: z ~ N(0, I_k), x = z / |z|; log p₀ = −log |S^{k−1}|, |S^{k−1}| = 2π^{k/2}/Γ(k/2);
- Riemannian divergence of v = P u: div_M v = tr(P J_u P) − (k − 1)(x·u) per sphere (J_u the
  ambient Jacobian), plus tr J_EE on the Euclidean coordinates; log-densities are relative to
  the product of the spheres' surface measures times Lebesgue measure and obey
  d/dt log p_t(x_t) = −div_M v.

The flow graph (flow.onnx) outputs the raw field u; the projection P u happens in the runtime
(and in train/sampler.py, its JAX reference), exactly as the runtime contract
(docs/bundle-format.md) specifies."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import gammaln

from . import mlp

NAME = "sphere_product"
GEOMETRIES = ("euclidean", NAME)


def log_sphere_area(k):
    """log |S^{k−1}| = log(2 π^{k/2} / Γ(k/2)), the area of the unit sphere in R^k."""
    return float(np.log(2.0) + 0.5 * k * np.log(np.pi) - gammaln(0.5 * k))


class Geometry:
    """Which coordinates of θ (and of the whitened x) form unit spheres.

    `groups`: one (k, idx [S, k]) per hidden layer, idx[j] = unit j's weight row then its bias;
    `euclid`: the remaining coordinate indices."""

    def __init__(self, sizes):
        self.sizes = [int(s) for s in sizes]
        layers, self.dim = mlp.layout(self.sizes)
        if len(layers) < 2:
            raise ValueError(f"geometry {NAME} needs a hidden layer (sizes {self.sizes})")
        self.groups = []
        on = np.zeros(self.dim, bool)
        for d_in, d_out, w_off, b_off in layers[:-1]:
            idx = np.stack([np.r_[w_off + j * d_in + np.arange(d_in), b_off + j] for j in range(d_out)])
            self.groups.append((d_in + 1, idx))
            on[idx.ravel()] = True
        self.on_sphere = on
        self.euclid = np.flatnonzero(~on)
        self.n_spheres = sum(len(idx) for _, idx in self.groups)
        self.log_area = sum(len(idx) * log_sphere_area(k) for k, idx in self.groups)

    def __repr__(self):
        parts = [f"{len(idx)} x S^{k - 1}" for k, idx in self.groups]
        return f"Geometry({' x '.join(parts)} x R^{len(self.euclid)})"

    # --- pointwise operations (jnp or np arrays [..., D]) ---

    def retract(self, x):
        """Every sphere block renormalized (blocks of norm 0 are left as they are)."""
        xp = jnp if isinstance(x, jax.Array) else np
        for _, idx in self.groups:
            xs = x[..., idx]
            n = xp.sqrt(xp.sum(xs * xs, axis=-1, keepdims=True))
            n = xp.where(n > 0, n, 1.0)
            x = x.at[..., idx].set(xs / n) if xp is jnp else _np_set(x, idx, xs / n)
        return x

    def project(self, x, u):
        """(P u, Σ_s (k_s − 1)(x_s·u_s)): the tangent part of u at x and the divergence correction."""
        corr = jnp.zeros(x.shape[:-1], x.dtype)
        for k, idx in self.groups:
            xs, us = x[..., idx], u[..., idx]
            xu = jnp.sum(xs * us, axis=-1)
            u = u.at[..., idx].add(-xu[..., None] * xs)
            corr = corr + (k - 1) * jnp.sum(xu, axis=-1)
        return u, corr

    def tangent(self, x, r):
        """P(x) r (no correction)."""
        return self.project(x, r)[0]

    def trace_pjp(self, x, jac):
        """tr(P J P) = tr J − Σ_s x_sᵀ J_ss x_s for one state x [D] and an ambient Jacobian J [D, D]."""
        tr = jnp.trace(jac)
        for _, idx in self.groups:
            xs = x[idx]  # [S, k]
            jss = jac[idx[:, :, None], idx[:, None, :]]  # [S, k, k]
            tr = tr - jnp.einsum("si,sij,sj->", xs, jss, xs)
        return tr

    def base_log_density(self, x):
        """log p₀(x): uniform on each sphere, standard normal on the Euclidean coordinates."""
        xp = jnp if isinstance(x, jax.Array) else np
        xe = x[..., self.euclid]
        e = len(self.euclid)
        return -0.5 * xp.sum(xe * xe, axis=-1) - 0.5 * e * np.log(2 * np.pi) - self.log_area

    def sample_base(self, rng_or_key, n, dtype=np.float32):
        """n base points: D standard normals with every sphere block normalized (the runtime's draws)."""
        if isinstance(rng_or_key, np.random.Generator):
            return self.retract(rng_or_key.standard_normal((n, self.dim)).astype(dtype))
        return self.retract(jax.random.normal(rng_or_key, (n, self.dim), dtype))

    def slice_error(self, theta):
        """max over units of |‖(w, b)‖ − 1| per row (numpy, float64)."""
        theta = np.asarray(theta, np.float64)
        worst = np.zeros(theta.shape[:-1])
        for _, idx in self.groups:
            worst = np.maximum(worst, np.max(np.abs(np.linalg.norm(theta[..., idx], axis=-1) - 1.0), axis=-1))
        return worst

    def angles(self, x0, x1):
        """Great-circle angles Ω [..., S] between matching sphere blocks (numpy or jnp)."""
        xp = jnp if isinstance(x0, jax.Array) or isinstance(x1, jax.Array) else np
        out = [xp.arccos(xp.clip(xp.sum(x0[..., idx] * x1[..., idx], axis=-1), -1.0, 1.0)) for _, idx in self.groups]
        return xp.concatenate(out, axis=-1)

    def distance2(self, x0, x1):
        """Squared geodesic distance Σ_s Ω_s² + |Δx_E|² (pairs broadcast like x0 − x1)."""
        xp = jnp if isinstance(x0, jax.Array) or isinstance(x1, jax.Array) else np
        de = x0[..., self.euclid] - x1[..., self.euclid]
        return xp.sum(self.angles(x0, x1) ** 2, axis=-1) + xp.sum(de * de, axis=-1)

    def cost_matrix(self, x0, x1):
        """C[i, j] = d²(x0[i], x1[j]) for x0 [B, D], x1 [B', D] (numpy, float64)."""
        x0, x1 = np.asarray(x0, np.float64), np.asarray(x1, np.float64)
        e0, e1 = x0[:, self.euclid], x1[:, self.euclid]
        cost = np.sum(e0**2, 1)[:, None] + np.sum(e1**2, 1)[None, :] - 2.0 * e0 @ e1.T
        for _, idx in self.groups:  # one batched matmul per layer ([S, B, B']): 3-7x faster than einsum
            dots = np.matmul(x0[:, idx].transpose(1, 0, 2), x1[:, idx].transpose(1, 2, 0))
            cost = cost + np.sum(np.arccos(np.clip(dots, -1.0, 1.0)) ** 2, axis=0)
        return np.maximum(cost, 0.0)

    def interpolate(self, x0, x1, t):
        """Geodesic interpolant x_t and its time derivative ẋ_t for x0, x1 [B, D], t [B] (jnp):
        slerp on every sphere, straight line on the Euclidean coordinates."""
        tt = t[:, None]
        xt = (1 - tt) * x0 + tt * x1
        vt = x1 - x0
        for _, idx in self.groups:
            a, b = x0[:, idx], x1[:, idx]  # [B, S, k]
            cos = jnp.clip(jnp.sum(a * b, axis=-1), -1.0, 1.0)
            om = jnp.arccos(cos)[..., None]  # [B, S, 1]
            small = om < 1e-4
            sin = jnp.where(small, 1.0, jnp.maximum(jnp.sin(om), 1e-6))  # antipodal pairs stay finite
            ts = t[:, None, None]
            ca, cb = jnp.sin((1 - ts) * om) / sin, jnp.sin(ts * om) / sin
            da, db = -om * jnp.cos((1 - ts) * om) / sin, om * jnp.cos(ts * om) / sin
            # below 1e-4 rad the chord and the arc agree to ~1e-9: lerp, renormalized
            lerp = (1 - ts) * a + ts * b
            pos = jnp.where(small, lerp / jnp.linalg.norm(lerp, axis=-1, keepdims=True), ca * a + cb * b)
            vel = jnp.where(small, b - a, da * a + db * b)
            xt = xt.at[:, idx].set(pos)
            vt = vt.at[:, idx].set(vel)
        return xt, vt

    def log_map(self, x, y):
        """log_x(y): the tangent vector at x pointing to y with length the geodesic distance
        (sphere blocks), y − x on the Euclidean coordinates."""
        out = y - x
        for _, idx in self.groups:
            a, b = x[..., idx], y[..., idx]
            cos = jnp.clip(jnp.sum(a * b, axis=-1, keepdims=True), -1.0, 1.0)
            w = b - cos * a
            n = jnp.linalg.norm(w, axis=-1, keepdims=True)
            om = jnp.arccos(cos)
            out = out.at[..., idx].set(jnp.where(n > 1e-12, om * w / jnp.where(n > 1e-12, n, 1.0), 0.0))
        return out

    def exp_map(self, x, v):
        """exp_x(v) on every sphere block (v tangent), x + v on the Euclidean coordinates."""
        out = x + v
        for _, idx in self.groups:
            a, w = x[..., idx], v[..., idx]
            n = jnp.linalg.norm(w, axis=-1, keepdims=True)
            safe = jnp.where(n > 1e-12, n, 1.0)
            out = out.at[..., idx].set(jnp.cos(n) * a + jnp.where(n > 1e-12, jnp.sin(n) / safe, 1.0) * w)
        return out


def start_point(geometry, z, a, t0):
    """The start at 0 < t₀ < 1 around anchors a (the runtime's geodesic mixture): on each sphere
    slerp(z_s, a_s; t₀), z_s uniform (angle (1 − t₀)·∠(z_s, a_s) from a_s, in z_s's direction); on
    the Euclidean coordinates t₀·a + (1 − t₀)·z. z: D normals with sphere blocks normalized."""
    c = 1.0 - float(t0)
    x = float(t0) * a + c * z
    for _, idx in geometry.groups:
        zs, as_ = z[:, idx], a[:, idx]
        cos = jnp.sum(zs * as_, axis=-1, keepdims=True)
        w = zs - cos * as_  # z's direction away from a, in a's tangent space
        w = w - jnp.sum(w * as_, axis=-1, keepdims=True) * as_  # again: z ≈ −a cancels in f32
        sin = jnp.linalg.norm(w, axis=-1, keepdims=True)
        # Ω by atan2: exact near antipodal pairs (common on S¹), where arccos in f32 is off by ~3e-4
        phi = c * jnp.arctan2(sin, cos)
        unit = jnp.where(sin > 1e-12, w / jnp.where(sin > 1e-12, sin, 1.0), 0.0)
        x = x.at[:, idx].set(jnp.cos(phi) * as_ + jnp.sin(phi) * unit)
    return geometry.retract(x)


EDGE = 1e-5  # rad: f32 rounding of a start point's angle to its anchor is below this


def start_log_density(geometry, x, anchors, t0, batch=8):
    """log p_t₀(x) of the geodesic start mixture, relative to surface × Lebesgue measure:
    logsumexp_i [Σ_s log q_k(∠(x_s, a_i,s)) + log N(x_E; t₀ a_i,E, (1 − t₀)² I)] − log n, with
    q_k(φ) = sin^{k−2}(φ/(1 − t₀)) / ((1 − t₀) sin^{k−2}φ |S^{k−1}|) for φ < (1 − t₀)π, else 0
    (z uniform makes θ = ∠(z, a) ∝ sin^{k−2}θ; φ = (1 − t₀)θ; divide by the surface element
    sin^{k−2}φ in geodesic polar coordinates around a)."""
    c = 1.0 - float(t0)
    anchors = jnp.asarray(anchors, jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    n = anchors.shape[0]
    e = geometry.euclid
    centers_e = float(t0) * anchors[:, e]

    def one(xi):
        r2 = jnp.sum((xi[e][None, :] - centers_e) ** 2, axis=-1)
        logp = -0.5 * r2 / c**2 - len(e) * jnp.log(c) - 0.5 * len(e) * jnp.log(2 * jnp.pi)
        for k, idx in geometry.groups:
            cos = jnp.einsum("sk,nsk->ns", xi[idx], anchors[:, idx])
            sin = jnp.linalg.norm(xi[idx][None] - cos[..., None] * anchors[:, idx], axis=-1)
            phi = jnp.arctan2(sin, cos)
            # the cap's edge φ = (1 − t₀)π, widened by EDGE for f32 rounding: on S¹ (k = 2) the
            # density is flat up to the edge, and a start point from a near-antipodal z sits on it
            inside = phi < c * jnp.pi + EDGE
            logq = -jnp.log(c) - log_sphere_area(k)
            if k > 2:
                tiny = phi < 1e-6
                theta = jnp.minimum(jnp.where(tiny, 1.0, phi) / c, jnp.pi - 1e-6)
                ratio = jnp.where(tiny, -jnp.log(c), jnp.log(jnp.sin(theta)) - jnp.log(jnp.sin(jnp.where(tiny, 1.0, phi))))
                logq = logq + (k - 2) * ratio
            logp = logp + jnp.sum(jnp.where(inside, logq, -jnp.inf), axis=-1)
        return jax.scipy.special.logsumexp(logp)

    return jax.lax.map(one, x, batch_size=batch) - jnp.log(n)


def _np_set(x, idx, vals):
    x = np.array(x, copy=True)
    x[..., idx] = vals
    return x


def geometry_of(cfg, sizes):
    """The config's geometry: None for "euclidean", a Geometry for "sphere_product"."""
    name = cfg["flow"].get("geometry", "euclidean")
    if name not in GEOMETRIES:
        raise ValueError(f"flow.geometry = {name!r}: expected one of {GEOMETRIES}")
    if name == NAME and not cfg["canon"]["enabled"]:
        raise ValueError(f'flow.geometry = "{NAME}" needs canon.enabled (the spheres are the canonical slice)')
    return Geometry(sizes) if name == NAME else None


def whiten_fit(samples, geometry, min_scale):
    """Whitening for the sphere geometry: mean 0 and scale 1 on sphere coordinates (exactly, as
    the bundle format requires), per-coordinate mean and sd (floored like whiten.fit, at
    min_scale × the median Euclidean sd) on the Euclidean ones."""
    d = samples.shape[-1]
    mean, scale = np.zeros(d, np.float64), np.ones(d, np.float64)
    e = geometry.euclid
    if len(e):
        sub = samples[:, e]
        sd = sub.std(axis=0)
        mean[e] = sub.mean(axis=0)
        scale[e] = np.maximum(sd, min_scale * max(float(np.median(sd)), 1e-12))
    return mean.astype(np.float32), scale.astype(np.float32)


# --- the geometry travels with the flow-stage parameters (so every sampler caller sees it) ---

KEY = "geometry.sizes"


def tag_params(flat, geometry):
    """The flow stage's flat parameter dict, with the sphere layout when there is one."""
    return flat if geometry is None else {**flat, KEY: np.asarray(geometry.sizes, np.int64)}


def split_params(flat):
    """(field parameters without the geometry key, Geometry or None)."""
    if KEY not in flat:
        return flat, None
    return {k: v for k, v in flat.items() if k != KEY}, Geometry(np.asarray(flat[KEY]).tolist())


class Field:
    """The raw field u(t [B], x [B, D]) plus the geometry the sampler integrates it on."""

    def __init__(self, fn, geometry=None):
        self.fn, self.geometry = fn, geometry

    def __call__(self, t, x):
        return self.fn(t, x)


def trace_fn(vfield, geometry, trace, eps):
    """(t [B], x [B, D]) -> (v = P u [B, D], div_M v [B]) on the sphere product: the tangent
    velocity and its Riemannian divergence, exact or Hutchinson (the raw probes r held fixed
    and projected, ε = P(x_t) r, at every evaluation, as the runtime does)."""
    if trace is None:
        def f(t, x):
            v, _ = geometry.project(x, vfield(t, x))
            return v, jnp.zeros(x.shape[0], x.dtype)
        return f
    if trace == "exact":
        def f(t, x):
            u = vfield(t, x)
            v, corr = geometry.project(x, u)

            def single(ti, xi):
                jac = jax.jacfwd(lambda z: vfield(ti[None], z[None])[0])(xi)
                return geometry.trace_pjp(xi, jac)
            return v, jax.vmap(single)(t, x) - corr
        return f
    if trace == "hutchinson":
        def f(t, x):
            def one_probe(r):  # r [B, D]
                e = geometry.tangent(x, r)
                u, ju = jax.jvp(lambda z: vfield(t, z), (x,), (e,))
                return u, jnp.sum(e * ju, axis=-1)
            u, quad = jax.vmap(one_probe, in_axes=1, out_axes=(0, 1))(eps)
            v, corr = geometry.project(x, u[0])
            return v, quad.mean(axis=1) - corr
        return f
    raise ValueError(f"unknown trace mode {trace!r}")
