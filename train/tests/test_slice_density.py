"""train/slice_density.py: the posterior's push-forward onto the canonical slice, checked against
numerical quadrature and against Monte Carlo (prior draws canonicalized by train/canon.py)."""

import numpy as np
import pytest
from scipy import integrate, stats

from train import canon, mlp, slice_density, sphere


@pytest.mark.parametrize("nu,a,b", [(1.0, 0.5, 0.3), (3.0, 2.0, 0.01), (-14.0, 0.5, 4.0), (0.0, 1.0, 1.0),
                                    (2.5, 0.2, 7.0)])
def test_orbit_integral_closed_form_against_quadrature(nu, a, b):
    f = lambda lam: lam ** (nu - 1) * np.exp(-a * lam * lam - b / (lam * lam))
    num, _ = integrate.quad(f, 0, np.inf, limit=400, epsabs=0, epsrel=1e-11)
    assert abs(slice_density.log_orbit_integral(nu, a, b) - np.log(num)) < 1e-8


def _canonical_prior_draws(sizes, s, n, seed):
    rng = np.random.default_rng(seed)
    return canon.canonicalize(s * rng.standard_normal((n, mlp.dim(sizes))), sizes)


def _log_q(theta_bar, g):
    """A normalized reference density on the slice: uniform on each sphere, N(0, 1) elsewhere."""
    return np.asarray(g.base_log_density(theta_bar))


def test_one_hidden_unit_is_laplace_and_matches_monte_carlo():
    """Net 1-1-1, prior N(0, s²): canonical outgoing weight c̄ = λ w₂ (λ Rayleigh, w₂ normal) is
    Laplace with scale s² — what the closed form r^{1/2} K_{1/2}(r/s²) ∝ e^{−r/s²} says; and the
    density integrates to one: E_{θ̄ ~ p̄}[q(θ̄)/p̄(θ̄)] = 1 for a normalized q on S¹ × R²."""
    sizes, s = [1, 1, 1], 0.8
    draws = _canonical_prior_draws(sizes, s, 40000, 0)
    cbar = draws[:, 2]  # layout: W1 [1,1] at 0, b1 at 1, W2 [1,1] at 2, b2 at 3
    assert stats.kstest(cbar, stats.laplace(scale=s * s).cdf).pvalue > 1e-3
    g = sphere.Geometry(sizes)
    logp = np.array([slice_density.log_slice_prior(th, sizes, s)[0] for th in draws[:4000]])
    ratio = np.exp(_log_q(draws[:4000], g) - logp)
    assert abs(ratio.mean() - 1.0) < 4 * ratio.std() / np.sqrt(len(ratio))
    # the closed form, pointwise: (2πs²)^{-2} e^{-b²/2s²} · s √(π/2) e^{-|c̄|/s²}
    th = draws[:50]
    want = (-2 * np.log(2 * np.pi * s * s) - th[:, 3] ** 2 / (2 * s * s) + np.log(s * np.sqrt(np.pi / 2))
            - np.abs(th[:, 2]) / (s * s))
    np.testing.assert_allclose(logp[:50], want, atol=1e-9)


def test_one_hidden_unit_higher_dimension_monte_carlo():
    """Net 3-1-2 (one unit on S³, outgoing weights in R², ν = 4 − 2): normalization by Monte Carlo,
    and the histogram of |c̄| against the closed form's radial density."""
    sizes, s = [3, 1, 2], 1.3
    draws = _canonical_prior_draws(sizes, s, 40000, 1)
    g = sphere.Geometry(sizes)
    logp = np.array([slice_density.log_slice_prior(th, sizes, s)[0] for th in draws[:4000]])
    ratio = np.exp(_log_q(draws[:4000], g) - logp)
    assert abs(ratio.mean() - 1.0) < 4 * ratio.std() / np.sqrt(len(ratio))
    # |c̄| radial density ∝ 2π r · r^{ν/2} K_{ν/2}(r/s²), ν = 2
    r = np.linalg.norm(draws[:, 4:6], axis=1)
    dens = lambda x: x * np.exp(slice_density.log_orbit_integral(2.0, 1 / (2 * s * s), x * x / (2 * s * s)))
    z, _ = integrate.quad(dens, 0, np.inf)
    cdf = lambda x: np.array([integrate.quad(dens, 0, xi)[0] / z for xi in np.atleast_1d(x)])
    qs = np.quantile(r, [0.1, 0.25, 0.5, 0.75, 0.9])
    np.testing.assert_allclose(cdf(qs), [0.1, 0.25, 0.5, 0.75, 0.9], atol=0.01)


def test_two_hidden_layers_importance_estimate_against_quadrature():
    """Net 1-1-1-1: the scale integral is 2-D (λ₁, λ₂); the estimate (λ₂ in closed form, λ₁ by
    importance sampling at the Laplace fit) against scipy's dblquad of the integrand."""
    sizes, s = [1, 1, 1, 1], 0.9
    draws = _canonical_prior_draws(sizes, s, 5, 2)
    for th in draws:
        (w1, b1), (w2, b2), (w3, b3) = mlp.unflatten(th, sizes)
        w2, b2, w3 = float(w2[0, 0]), float(b2[0]), float(w3[0, 0])

        def integrand(l2, l1):  # θ(θ̄, λ): |θ|² terms and |J| = λ1^{2-1-1} λ2^{2-1-1}
            sq = l1**2 + (w2 * l2 / l1) ** 2 + (b2 * l2) ** 2 + (w3 / l2) ** 2
            return np.exp(-0.5 * sq / (s * s))
        num, _ = integrate.dblquad(integrand, 0, 30, 0, 30, epsrel=1e-10, epsabs=0)
        want = np.log(num) + slice_density.log_gauss_const(sizes, s) - 0.5 * float(b3[0]) ** 2 / (s * s)
        got, se = slice_density.log_slice_prior(th, sizes, s, draws=4000, seed=3)
        assert abs(got - want) < max(4 * se, 2e-3), (got, want, se)


def test_two_hidden_layers_monte_carlo_normalization():
    """Net 2-2-2-1 (2 x S² x 2 x S² x R³): E_{θ̄ ~ p̄}[q/p̄] = 1 with prior draws canonicalized."""
    sizes, s = [2, 2, 2, 1], 1.0
    draws = _canonical_prior_draws(sizes, s, 1500, 4)
    g = sphere.Geometry(sizes)
    u, h, gmax = slice_density.laplace_modes(draws, sizes, s)
    assert np.max(gmax) < 1e-4
    logp = np.array([slice_density.log_slice_prior(th, sizes, s, draws=256, seed=i, mode=(u[i], h[i]))[0]
                     for i, th in enumerate(draws)])
    ratio = np.exp(_log_q(draws, g) - logp)
    assert abs(ratio.mean() - 1.0) < 4 * ratio.std() / np.sqrt(len(ratio))


def test_snis_weights():
    w, info = slice_density.snis(np.array([0.0, 0.0, 0.0, 0.0]), np.zeros(4))
    assert info["ess"] == pytest.approx(4.0) and info["ess_per_n"] == pytest.approx(1.0)
    w, info = slice_density.snis(np.array([0.0, -50.0, -50.0]), np.zeros(3))
    assert info["ess"] == pytest.approx(1.0, abs=1e-6)
