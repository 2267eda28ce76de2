"""Riemannian conditional flow matching on the canonical slice (`flow.geometry = "sphere_product"`).

Whitened canonical draws x₁ lie on M = Π_s S^{k_s−1} × R^E (train/sphere.py; the whitening is the
identity on sphere coordinates). Per training pair:

- base x₀: uniform on every sphere (normalized Gaussian), N(0, I) on the Euclidean coordinates;
- coupling: exact minibatch OT (Hungarian per batch) under the geodesic cost
  d²(x₀, x₁) = Σ_s arccos(x₀,s·x₁,s)² + |x₀,E − x₁,E|² (`flow.coupling = "independent"`: random);
- path: slerp on every sphere, the straight line on R^E, x_t = γ(t), plus σ·ε on the Euclidean
  coordinates only (the spheres carry no noise); target velocity the path's derivative γ̇(t),
  which is tangent to the spheres;
- loss: mean over the batch of |P(x_t) u_θ(t, x_t) − γ̇(t)|² / D, u_θ the raw field. The
  projection P (I − x xᵀ per sphere block) is applied in the loss and, at sampling time, by the
  runtime and train/sampler.py; the exported flow.onnx is the raw field u_θ.

The field is `flow.field` (the same networks as the Euclidean flow, train/flow.py) with
`flow.pred = "v"`; train/flow.py's training loop runs it (schedule, EMA, report) through
`SpherePaths`."""

import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from . import flow as flow_mod


def couple(geometry, x0, x1, method):
    """Reorder x₀ to pair with x₁: `ot` = exact minibatch OT under the geodesic cost."""
    if method == "independent":
        return x0
    if method != "ot":
        raise ValueError(f"unknown coupling {method!r}")
    rows, cols = linear_sum_assignment(geometry.cost_matrix(x0, x1).T)  # x1[i] <- x0[cols[i]]
    return x0[cols]


ANTIPODAL = 1e-2  # pairs within this angle of antipodal have no unique geodesic: left out of the loss


def loss_fn(geometry, params, x0, x1, t, noise, sigma):
    xt, target = geometry.interpolate(x0, x1, t)
    xt = xt + sigma * noise * jnp.asarray(~geometry.on_sphere, xt.dtype)  # Euclidean coordinates only
    v, _ = geometry.project(xt, flow_mod.velocity(params, t, xt))
    # near-antipodal sphere pairs (Ω > π − 0.01; about 2.5e-5 of uniform pairs on S², fewer in
    # higher dimension) have a non-unique geodesic and a speed Ω/sin Ω that explodes: their
    # block gets weight 0 (one such pair in a batch otherwise spikes the loss by 1e7)
    keep = jnp.ones_like(x0)
    for _, idx in geometry.groups:
        ok = jnp.arccos(jnp.clip(jnp.sum(x0[:, idx] * x1[:, idx], axis=-1), -1.0, 1.0)) < jnp.pi - ANTIPODAL
        keep = keep.at[:, idx].set(jnp.broadcast_to(ok[..., None], ok.shape + (idx.shape[1],)).astype(x0.dtype))
    return jnp.mean(jnp.sum(keep * (v - target) ** 2, axis=-1)) / x0.shape[1]


class SpherePaths:
    """flow.train's view of the sphere product: uniform × normal base, geodesic OT, the loss above."""

    label = "flow training (sphere product)"

    def __init__(self, geometry):
        self.geometry = geometry

    def base(self, rng, n, dim):
        return self.geometry.sample_base(rng, n)

    def couple(self, x0, x1, method):
        return couple(self.geometry, x0, x1, method)

    def loss(self, params, x0, x1, t, noise, sigma):
        return loss_fn(self.geometry, params, x0, x1, t, noise, sigma)


def train(train_x, held_x, fcfg, seed, geometry):
    """train_x, held_x: whitened canonical samples [n, D] on the slice. Returns EMA params and a
    report (train/flow.py's loop and report, plus the geometry)."""
    dim = train_x.shape[1]
    if dim != geometry.dim:
        raise ValueError(f"geometry has D = {geometry.dim}, the samples {dim}")
    if fcfg.get("pred", "v") != "v":
        raise ValueError('flow.geometry = "sphere_product" trains velocities (flow.pred = "v")')
    err = float(np.max(geometry.slice_error(train_x)))
    if err > 1e-4:
        raise ValueError(f"training draws are off the slice by {err:.2e} (canonicalization and whitening "
                         "must leave every unit's (w, b) at unit norm)")
    params, report = flow_mod.train(train_x, held_x, fcfg, seed, sizes=geometry.sizes, paths=SpherePaths(geometry))
    return params, {
        "geometry": "sphere_product", "spheres": repr(geometry),
        "interpolant": "slerp on spheres, straight line on Euclidean coordinates",
        "coupling_cost": "geodesic: sum of squared great-circle angles + squared Euclidean distance",
        "projection": "raw field output u projected onto the tangent space in the loss; in the runtime at "
                      "sampling time (flow.onnx outputs u)",
        "sigma_on": "Euclidean coordinates", **report}
