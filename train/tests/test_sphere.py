"""train/sphere.py and the sampler on the product of spheres, against closed forms and
independent computations (finite differences, orthonormal tangent bases, numpy loops)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import sampler, sphere, sphere_flow

jax.config.update("jax_enable_x64", False)

SIZES = [2, 3, 2]  # 3 x S^2 x R^8: layer 1 rows (w1, w2, b) are spheres, the last layer Euclidean


def test_layout_and_areas():
    g = sphere.Geometry(SIZES)
    assert g.dim == 17 and g.n_spheres == 3 and len(g.euclid) == 8
    # unit 1 of the first layer: weights at 2, 3 (row 1 of W [3, 2]), bias at 6 + 1
    assert g.groups[0][1][1].tolist() == [2, 3, 7]
    g2 = sphere.Geometry([4, 5, 3, 2])
    assert [(k, len(idx)) for k, idx in g2.groups] == [(5, 5), (6, 3)]
    assert g2.on_sphere.sum() == 5 * 5 + 3 * 6 and g2.dim == 25 + 18 + 8
    pi = np.pi
    for k, area in [(1, 2.0), (2, 2 * pi), (3, 4 * pi), (4, 2 * pi**2), (5, 8 * pi**2 / 3)]:
        assert abs(sphere.log_sphere_area(k) - np.log(area)) < 1e-12


def test_canonical_draws_lie_on_the_slice():
    from train import canon
    rng = np.random.default_rng(0)
    sizes = [4, 5, 3, 2]
    theta = canon.canonicalize(rng.standard_normal((7, sphere.Geometry(sizes).dim)) * 2.0, sizes)
    assert sphere.Geometry(sizes).slice_error(theta).max() < 1e-12


def test_whitening_is_the_identity_on_spheres():
    g = sphere.Geometry(SIZES)
    rng = np.random.default_rng(1)
    x = g.sample_base(rng, 50).astype(np.float64)
    x[:, g.euclid] = 3.0 + 2.0 * rng.standard_normal((50, len(g.euclid)))
    mean, scale = sphere.whiten_fit(x, g, 1e-4)
    assert np.all(mean[g.on_sphere] == 0.0) and np.all(scale[g.on_sphere] == 1.0)
    np.testing.assert_allclose(mean[g.euclid], x[:, g.euclid].mean(0), rtol=1e-6)
    np.testing.assert_allclose(scale[g.euclid], x[:, g.euclid].std(0), rtol=1e-6)


def test_slerp_interpolant_and_velocity():
    g = sphere.Geometry([4, 6, 3])
    rng = np.random.default_rng(2)
    x0, x1 = jnp.asarray(g.sample_base(rng, 6)), jnp.asarray(g.sample_base(rng, 6))
    t = jnp.asarray([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    xt, vt = g.interpolate(x0, x1, t)
    np.testing.assert_allclose(xt[0], x0[0], atol=1e-6)
    np.testing.assert_allclose(xt[-1], x1[-1], atol=1e-6)
    assert g.slice_error(np.asarray(xt)).max() < 1e-6
    # the velocity is tangent and has constant speed Ω on each sphere
    np.testing.assert_allclose(g.tangent(xt, vt), vt, atol=1e-5)
    om = np.asarray(g.angles(x0, x1))
    speeds = np.concatenate([np.linalg.norm(np.asarray(vt)[:, idx], axis=-1) for _, idx in g.groups], axis=-1)
    np.testing.assert_allclose(speeds, om, atol=1e-5)
    # velocity = log_{x_t}(x1) / (1 - t) (independent formula), t < 1
    lm = g.log_map(xt[:-1], x1[:-1]) / (1 - t[:-1, None])
    np.testing.assert_allclose(vt[:-1], lm, atol=2e-5)
    # exp_{x_t}(log_{x_t}(x1)) = x1
    np.testing.assert_allclose(g.exp_map(xt[:-1], g.log_map(xt[:-1], x1[:-1])), x1[:-1], atol=2e-5)


def test_geodesic_cost_and_ot_coupling():
    g = sphere.Geometry(SIZES)
    rng = np.random.default_rng(3)
    x0, x1 = g.sample_base(rng, 6), g.sample_base(rng, 6)
    cost = g.cost_matrix(x0, x1)
    for i, j in [(0, 0), (2, 5), (4, 1)]:
        assert abs(cost[i, j] - float(g.distance2(x0[i], x1[j]))) < 1e-5
    paired = sphere_flow.couple(g, x0, x1, "ot")
    total = float(np.sum(g.distance2(paired, x1)))
    brute = min(sum(cost[p[i], i] for i in range(6)) for p in itertools.permutations(range(6)))
    assert abs(total - brute) < 1e-4


def _constant_plus_linear(g, rng):
    """u = a_s on sphere s (constant), A x_E + c on the Euclidean coordinates."""
    a = jnp.asarray(rng.standard_normal(g.dim).astype(np.float32)) * jnp.asarray(g.on_sphere, jnp.float32)
    ne = len(g.euclid)
    A = jnp.asarray(0.3 * rng.standard_normal((ne, ne)).astype(np.float32))
    c = jnp.asarray(rng.standard_normal(ne).astype(np.float32))
    e = jnp.asarray(g.euclid)

    def u(t, x):
        return jnp.broadcast_to(a, x.shape).at[:, e].set(x[:, e] @ A.T + c)
    return u, np.asarray(a), np.asarray(A, np.float64), np.asarray(c, np.float64)


def _closed_form(g, x0, a, A, c):
    """End point and log-density of the projected constant field on each sphere (the point moves
    along the great circle towards â with tan(φ/2) = tan(φ₀/2) e^{−|a| t}, and log p₁ = log p₀ +
    (k − 1) log(sin φ₀ / sin φ₁)) and of ẋ = A x + c on R^E (log p₁ = log p₀ − tr A)."""
    from scipy.linalg import expm
    x0 = np.asarray(x0, np.float64)
    x1, dlog = x0.copy(), np.zeros(len(x0))
    for k, idx in g.groups:
        for row in idx:
            ah = a[row] / np.linalg.norm(a[row])
            for n in range(len(x0)):
                xs = x0[n, row]
                cos0 = np.clip(xs @ ah, -1, 1)
                phi0 = np.arccos(cos0)
                phi1 = 2 * np.arctan(np.tan(phi0 / 2) * np.exp(-np.linalg.norm(a[row])))
                perp = xs - cos0 * ah
                perp /= np.linalg.norm(perp)
                x1[n, row] = np.cos(phi1) * ah + np.sin(phi1) * perp
                dlog[n] += (k - 1) * np.log(np.sin(phi0) / np.sin(phi1))
    e = g.euclid
    m = np.zeros((len(e) + 1, len(e) + 1))
    m[:-1, :-1], m[:-1, -1] = A, c
    big = expm(m)
    x1[:, e] = x0[:, e] @ big[:-1, :-1].T + big[:-1, -1]
    return x1, dlog - np.trace(A)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_closed_form_density_projected_constant_field(trace):
    g = sphere.Geometry(SIZES)
    rng = np.random.default_rng(4)
    u, a, A, c = _constant_plus_linear(g, rng)
    field = sphere.Field(u, g)
    mean, scale = np.zeros(g.dim, np.float32), np.ones(g.dim, np.float32)
    theta, logq = sampler.sample(field, jax.random.PRNGKey(0), 16, mean, scale, method="rk4", steps=64,
                                 trace=trace, probes=4096 if trace == "hutchinson" else 1)
    x0 = g.retract(jax.random.normal(jax.random.split(jax.random.PRNGKey(0))[0], (16, g.dim)))
    x1, dlog = _closed_form(g, x0, a, A, c)
    np.testing.assert_allclose(theta, x1, atol=2e-5)
    want = np.asarray(g.base_log_density(np.asarray(x0, np.float64))) + dlog
    # exact trace: the closed form to 1e-4 (float32 over 64 RK4 steps). Hutchinson: its only
    # randomness is the Euclidean mean of εᵀAε over 4096 fixed Rademacher probes (J_u = 0 on the
    # spheres), whose variance is ½ Σ_{i≠j} (A_ij + A_ji)² / 4096: five standard deviations
    sym = A + A.T
    sd = np.sqrt(0.5 * (np.sum(sym**2) - np.sum(np.diag(sym) ** 2)) / 4096)
    tol = 1e-4 if trace == "exact" else 5 * sd + 1e-4
    np.testing.assert_allclose(logq, want, atol=tol, rtol=0)


def test_zero_field_is_the_uniform_base():
    g = sphere.Geometry([3, 4, 2])
    field = sphere.Field(lambda t, x: jnp.zeros_like(x), g)
    theta, logq = sampler.sample(field, jax.random.PRNGKey(5), 2000, np.zeros(g.dim, np.float32),
                                 np.ones(g.dim, np.float32), method="euler", steps=3, trace="exact")
    assert g.slice_error(np.asarray(theta)).max() < 1e-5
    np.testing.assert_allclose(logq, g.base_log_density(np.asarray(theta, np.float64)), atol=1e-5)
    # uniform on S^3: every coordinate has mean 0 and variance 1/4
    blocks = np.asarray(theta)[:, g.groups[0][1]]
    assert np.abs(blocks.mean(axis=0)).max() < 4 * 0.5 / np.sqrt(2000)
    np.testing.assert_allclose(blocks.var(axis=0), 0.25, atol=0.03)


def _mlp_field(g, seed, width=32):
    rng = np.random.default_rng(seed)
    w1 = jnp.asarray(rng.standard_normal((g.dim + 1, width)).astype(np.float32) / np.sqrt(g.dim))
    w2 = jnp.asarray(rng.standard_normal((width, g.dim)).astype(np.float32) / np.sqrt(width))

    def u(t, x):
        return jnp.tanh(jnp.concatenate([x, t[:, None]], axis=1) @ w1) @ w2 * 2.0
    return u


def test_riemannian_divergence_against_a_tangent_basis():
    """div_M (P u) from tr(P J P) − (k−1)(x·u) equals Σ_i e_iᵀ D(P u) e_i over an orthonormal
    basis of the tangent space (QR per sphere), differentiating the projected field itself."""
    g = sphere.Geometry(SIZES)
    u = _mlp_field(g, 6)
    x = g.sample_base(jax.random.PRNGKey(7), 3)
    x = x.at[:, g.euclid].set(jax.random.normal(jax.random.PRNGKey(8), (3, len(g.euclid))))
    t = jnp.full((3,), 0.37)
    _, div = sphere.trace_fn(u, g, "exact", None)(t, x)

    def v_single(xi):
        return g.project(xi[None], u(t[:1], xi[None]))[0][0]

    for n in range(3):
        jac = np.asarray(jax.jacfwd(v_single)(x[n]), np.float64)
        xn = np.asarray(x[n], np.float64)
        basis = [np.eye(g.dim)[i] for i in g.euclid]
        for k, idx in g.groups:
            for row in idx:
                m = np.eye(k) - np.outer(xn[row], xn[row])
                q, _ = np.linalg.qr(np.c_[xn[row], m])
                for col in q[:, 1:k].T:  # orthonormal complement of x_s
                    e = np.zeros(g.dim)
                    e[row] = col
                    basis.append(e)
        assert len(basis) == g.dim - g.n_spheres
        want = sum(e @ jac @ e for e in basis)
        assert abs(float(div[n]) - want) < 1e-4 * (1 + abs(want))


def test_exact_and_hutchinson_traces_agree():
    g = sphere.Geometry([3, 5, 2])
    u = _mlp_field(g, 9)
    x = g.sample_base(jax.random.PRNGKey(10), 2)
    t = jnp.full((2,), 0.5)
    _, exact = sphere.trace_fn(u, g, "exact", None)(t, x)
    probes = 20000
    r = jax.random.rademacher(jax.random.PRNGKey(11), (2, probes, g.dim)).astype(jnp.float32)
    f = sphere.trace_fn(u, g, "hutchinson", r)
    _, hutch = f(t, x)
    # per-probe estimates for the standard error
    per = jax.vmap(lambda rr: sphere.trace_fn(u, g, "hutchinson", rr[:, None])(t, x)[1], in_axes=1)(r[:, :2000])
    se = np.asarray(per).std(axis=0) / np.sqrt(probes)
    assert np.all(np.abs(np.asarray(hutch) - np.asarray(exact)) < 5 * se + 1e-4)


@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
def test_samples_stay_on_the_slice(method):
    g = sphere.Geometry([2, 16, 16, 2])
    field = sphere.Field(_mlp_field(g, 12, 64), g)
    mean = np.zeros(g.dim, np.float32)
    scale = np.ones(g.dim, np.float32)
    scale[g.euclid] = 2.0
    mean[g.euclid] = 0.5
    theta, _ = sampler.sample(field, jax.random.PRNGKey(13), 64, mean, scale, method=method, steps=7)
    assert g.slice_error(np.asarray(theta)).max() <= 1e-5


def test_euler_retracts_each_step():
    """Euler on the spheres: x ← normalize(x + h P u(x)), written out in numpy."""
    g = sphere.Geometry(SIZES)
    u = _mlp_field(g, 14)
    field = sphere.Field(u, g)
    key = jax.random.PRNGKey(15)
    theta, _ = sampler.sample(field, key, 4, np.zeros(g.dim, np.float32), np.ones(g.dim, np.float32),
                              method="euler", steps=5)
    x = np.asarray(g.retract(jax.random.normal(jax.random.split(key)[0], (4, g.dim))), np.float64)
    for i in range(5):
        ux = np.asarray(u(jnp.full((4,), i / 5, jnp.float32), jnp.asarray(x, jnp.float32)), np.float64)
        for _, idx in g.groups:
            ux[:, idx] -= np.sum(x[:, idx] * ux[:, idx], -1, keepdims=True) * x[:, idx]
        x = x + 0.2 * ux
        for _, idx in g.groups:
            x[:, idx] /= np.linalg.norm(x[:, idx], axis=-1, keepdims=True)
    np.testing.assert_allclose(theta, x, atol=1e-5)


@pytest.mark.parametrize("sizes", [[1, 1, 1], [2, 2, 1]])
def test_geodesic_start_mixture_density_is_normalized(sizes):
    """∫ p_t₀ = 1 on the slice: E_{x ~ p₀}[p_t₀(x) / p₀(x)] = 1 with x from the uniform × normal
    base (Monte Carlo, 4 standard errors), for S¹ × R² and 2 x S² x R³, two anchors, t₀ = 0.4."""
    g = sphere.Geometry(sizes)
    rng = np.random.default_rng(19)
    anchors = g.sample_base(rng, 2)
    x = g.sample_base(rng, 40000)
    x[:, g.euclid] = 1.5 * rng.standard_normal((40000, len(g.euclid)))  # wider than the mixture's
    logp0 = g.base_log_density(x) - len(g.euclid) * np.log(1.5) - np.sum(x[:, g.euclid] ** 2, 1) * (
        0.5 / 1.5**2 - 0.5)
    ratio = np.exp(np.asarray(sphere.start_log_density(g, jnp.asarray(x), anchors, 0.4, batch=512)) - logp0)
    assert abs(ratio.mean() - 1.0) < 4 * ratio.std() / np.sqrt(len(ratio))


def test_geodesic_start_mixture_samples_and_density():
    """Zero field from t₀ = 0.6 around one anchor: every sphere block sits within (1 − t₀)π of the
    anchor's, cos of the rescaled angle θ = φ/(1 − t₀) is uniform on S² (KS), and the sampler's
    log-density is the start density at the sample (nothing moves)."""
    from scipy import stats
    g = sphere.Geometry([2, 3, 1])
    field = sphere.Field(lambda t, x: jnp.zeros_like(x), g)
    anchors = g.sample_base(np.random.default_rng(20), 1)
    theta, logq = sampler.sample(field, jax.random.PRNGKey(21), 3000, np.zeros(g.dim, np.float32),
                                 np.ones(g.dim, np.float32), method="euler", steps=2, trace="exact",
                                 start_time=0.6, anchors=anchors)
    theta = np.asarray(theta)
    phi = np.asarray(g.angles(theta, np.broadcast_to(anchors, theta.shape)))
    assert phi.max() <= 0.4 * np.pi + 1e-5
    assert stats.kstest(np.cos(phi[:, 0] / 0.4), stats.uniform(-1, 2).cdf).pvalue > 1e-3
    # away from the cap's rim (θ → π, where log sin(φ/(1 − t₀)) → −∞ and f32 rounding of φ is
    # amplified) the recorded density is the start density at the returned point (f32 arccos: 1e-3)
    regular = np.all(phi / 0.4 < np.pi - 0.05, axis=1)
    assert regular.mean() > 0.9
    np.testing.assert_allclose(np.asarray(logq)[regular],
                               np.asarray(sphere.start_log_density(g, theta, anchors, 0.6))[regular], atol=1e-3)
    np.testing.assert_allclose(theta[:, g.euclid], 0.6 * anchors[:, g.euclid] + 0.4 * np.asarray(
        jax.random.normal(jax.random.split(jax.random.PRNGKey(21))[0], (3000, g.dim)))[:, g.euclid], atol=1e-5)


def test_start_from_near_antipodal_points_on_the_circle():
    """S¹ blocks (one input: k = 2) from z almost opposite the anchor: the start lies on the slice
    (f32), at angle (1 − t₀)·∠(z, a) from a on z's side, and its density is the flat S¹ value
    −log(1 − t₀) − log 2π on each circle (finite: the cap's edge tolerates the rounding)."""
    g = sphere.Geometry([1, 3, 1])  # 3 x S¹ x R⁴
    rng = np.random.default_rng(23)
    a = g.sample_base(rng, 1)
    z = np.repeat(a, 6, axis=0)
    gap = np.array([1e-7, 1e-6, 1e-5, 1e-3, 0.3, 2.0])  # z = the point at angle π − gap from a
    for _, idx in g.groups:
        ang = np.arctan2(a[0, idx[:, 1]], a[0, idx[:, 0]])[None, :] + np.pi - gap[:, None]
        z[:, idx[:, 0]], z[:, idx[:, 1]] = np.cos(ang), np.sin(ang)
    t0 = 0.9
    x = np.asarray(sphere.start_point(g, jnp.asarray(z), jnp.asarray(np.repeat(a, 6, axis=0)), t0))
    assert g.slice_error(x).max() < 1e-6
    phi = np.asarray(g.angles(x.astype(np.float64), np.repeat(a, 6, axis=0).astype(np.float64)))
    np.testing.assert_allclose(phi, 0.1 * (np.pi - gap[:, None]) * np.ones_like(phi), atol=2e-6)
    logp = np.asarray(sphere.start_log_density(g, jnp.asarray(x), a, t0))
    e = g.euclid
    flat = 3 * (-np.log(0.1) - np.log(2 * np.pi))
    gauss = -0.5 * np.sum((x[:, e] - t0 * a[:, e]) ** 2, 1) / 0.01 - len(e) * np.log(0.1) - 0.5 * len(e) * np.log(2 * np.pi)
    np.testing.assert_allclose(logp, flat + gauss, atol=1e-3)


def test_bundle_stage_refuses_stored_weights_off_the_slice():
    """The bundle's tensors for a sphere_product flow: on-slice reference and draws pass; a
    reference with a unit off its sphere (a dead unit before the canon fix) is refused by name."""
    from train import bundle, canon
    g = sphere.Geometry(SIZES)
    rng = np.random.default_rng(29)
    draws = canon.canonicalize(rng.standard_normal((2, 4, g.dim)), SIZES)
    ctx = {"cfg": {"data": {"task": "regression"}, "bundle": {"anchors": False},
                   "flow": {"geometry": sphere.NAME}},
           "sizes": SIZES, "data": {"x_eval": rng.standard_normal((5, 2)), "y_eval": rng.standard_normal((5, 2))},
           "evaluate": {"hmc_mean": np.zeros((5, 2)), "hmc_var": np.ones((5, 2))},
           "whiten": {"mean": np.zeros(g.dim), "scale": np.ones(g.dim)},
           "canon": {"reference": draws[0, 0], "samples": draws}}
    assert g.slice_error(bundle.tensors(ctx)["reference.theta"]).max() < 1e-5
    off = draws[0, 0].copy()
    off[g.groups[0][1][1]] = 0.0  # unit 1's (w, b): norm 0
    ctx["canon"] = {"reference": off, "samples": draws}
    with pytest.raises(ValueError, match="reference.theta is off the slice"):
        bundle.tensors(ctx)


def test_flow_matching_loss_is_zero_for_the_true_velocity():
    """A field that returns the target velocity of the pair it came from has zero loss; the loss
    only sees the tangent part (adding a normal component changes nothing)."""
    g = sphere.Geometry(SIZES)
    rng = np.random.default_rng(17)
    x0, x1 = jnp.asarray(g.sample_base(rng, 8)), jnp.asarray(g.sample_base(rng, 8))
    t = jnp.asarray(rng.uniform(size=8).astype(np.float32))
    _, target = g.interpolate(x0, x1, t)
    import train.flow as flow_mod
    orig = flow_mod.velocity
    try:
        flow_mod.velocity = lambda p, tt, x: target + 3.0 * x * jnp.asarray(g.on_sphere, jnp.float32)
        assert float(sphere_flow.loss_fn(g, None, x0, x1, t, jnp.zeros_like(x0), 0.0)) < 1e-10
        flow_mod.velocity = lambda p, tt, x: jnp.zeros_like(x)
        want = float(jnp.mean(jnp.sum(target**2, -1)) / g.dim)
        assert abs(float(sphere_flow.loss_fn(g, None, x0, x1, t, jnp.zeros_like(x0), 0.0)) - want) < 1e-6
    finally:
        flow_mod.velocity = orig


def test_antipodal_pairs_are_left_out_of_the_loss():
    """A pair of exactly antipodal points on a sphere has no unique geodesic: the loss stays
    finite, with finite gradients, and that block contributes nothing."""
    import train.flow as flow_mod
    g = sphere.Geometry(SIZES)
    x0 = jnp.asarray(g.sample_base(np.random.default_rng(18), 4))
    row = g.groups[0][1][0]
    x1 = x0.at[:, row].set(-x0[:, row])
    params = flow_mod.init(jax.random.PRNGKey(0), g.dim, [8], 4)
    t = jnp.full((4,), 0.3)
    value, grad = jax.value_and_grad(sphere_flow.loss_fn, argnums=1)(g, params, x0, x1, t, jnp.zeros_like(x0), 0.0)
    assert np.isfinite(float(value)) and float(value) < 1.0
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(grad))
    # The loss is the squared error over every other column, by hand: the block adds nothing.
    xt, target = g.interpolate(x0, x1, t)
    v, _ = g.project(xt, flow_mod.velocity(params, t, xt))
    others = np.ones(g.dim, bool)
    others[np.asarray(row)] = False
    sq = (np.asarray(v, np.float64) - np.asarray(target, np.float64)) ** 2
    want = np.mean(np.sum(sq[:, others], axis=-1)) / g.dim
    np.testing.assert_allclose(float(value), want, rtol=1e-5)


def test_geometry_fingerprints():
    """flow.geometry at its default leaves every stage fingerprint as it was before the key existed
    (cached stages stay valid); "sphere_product" changes the whitening's and everything after it."""
    import copy
    from train import config, pipeline
    cfg = config.load(ROOT_CONFIG)
    old = copy.deepcopy(cfg)
    del old["flow"]["geometry"]
    sph = copy.deepcopy(cfg)
    sph["flow"]["geometry"] = "sphere_product"

    def fps(c):
        out, up = {}, ""
        for st in ("canon", "whiten", "flow"):
            up = pipeline._fingerprint(c, st, up, pipeline._geometry_extra(c) if st == "whiten" else "")
            out[st] = up
        return out
    assert fps(cfg) == fps(old)
    a, b = fps(cfg), fps(sph)
    assert a["canon"] == b["canon"] and a["whiten"] != b["whiten"] and a["flow"] != b["flow"]
    with pytest.raises(ValueError, match="geometry"):
        bad = copy.deepcopy(cfg)
        bad["flow"]["geometry"] = "torus"
        sphere.geometry_of(bad, [2, 3, 2])


ROOT_CONFIG = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "train/configs/tiny.toml")
