"""The low-rank whitening map that docs/fidelity.md proposes for bundles."""
import numpy as np

from train.diagnostics.fidelity_baselines import lowrank_whitening


def test_lowrank_whitening_is_invertible_and_whitens_the_top_directions():
    rng = np.random.default_rng(0)
    d, n, r = 30, 500, 4
    mix = np.eye(d) + 3.0 * rng.standard_normal((d, r)) @ rng.standard_normal((r, d)) / d
    u = rng.standard_normal((n, d)) @ mix
    u = (u - u.mean(0)) / u.std(0)
    to_x, to_u, used = lowrank_whitening(u, r)
    assert used == r
    np.testing.assert_allclose(to_u(to_x(u)), u, atol=1e-10)
    x = to_x(u)
    # along the top-r directions of u the whitened samples have unit variance
    _, _, vt = np.linalg.svd(u - u.mean(0), full_matrices=False)
    var_top = np.var((x - x.mean(0)) @ vt[:r].T, axis=0, ddof=1)
    np.testing.assert_allclose(var_top, 1.0, rtol=1e-8)
    # and one scale on the orthogonal complement, which it brings to unit mean variance
    w = rng.standard_normal(d)
    w -= vt[:r].T @ (vt[:r] @ w)
    ratio = to_x(w[None])[0] / w
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-8)
    resid = x - x.mean(0) - ((x - x.mean(0)) @ vt[:r].T) @ vt[:r]
    np.testing.assert_allclose(np.sum(resid**2) / (n - 1) / (d - r), 1.0, rtol=1e-8)


def test_draw_combinations_keep_or_shrink_the_draws_spread_as_documented():
    """Rotations of two draws about their mean keep the draws' mean and covariance (exact for a
    Gaussian); a midpoint halves the covariance; a difference step γ(b − c) adds 2γ² of it."""
    from train.diagnostics.draw_combinations import combinations

    rng = np.random.default_rng(0)
    d, m, n = 4, 4000, 200_000
    chol = np.tril(rng.standard_normal((d, d))) + 2 * np.eye(d)
    train = 3.0 + rng.standard_normal((m, d)) @ chol.T
    mu, cov = train.mean(0), np.cov(train, rowvar=False)
    rows = combinations(train, n, np.random.default_rng(1))

    def close(a, b, tol):
        assert np.max(np.abs(a - b)) <= tol * np.max(np.abs(b)), (a, b)

    for name in ("rotation, φ = 0.15", "rotation, φ = 0.785", "training draws"):
        close(rows[name].mean(0), mu, 0.01)
        close(np.cov(rows[name], rowvar=False), cov, 0.03)
    close(np.cov(rows["convex, w = 0.5"], rowvar=False), 0.5 * cov, 0.03)
    close(np.cov(rows["difference, γ = 0.5"], rowvar=False), 1.5 * cov, 0.03)
    assert all(r.shape == (n, d) and r.dtype == np.float32 for r in rows.values())


def test_unit_crossover_moves_whole_units_between_draws():
    """Each hidden unit's incoming row, bias and outgoing column come together from one draw."""
    from train import mlp
    from train.diagnostics.draw_combinations import unit_crossover

    sizes = [3, 4, 2]
    d = mlp.layout(sizes)[1]
    n = 50
    a, b = np.zeros((n, d)), np.ones((n, d))
    out = unit_crossover(a, b, sizes, 0.5, np.random.default_rng(0))
    (w1, b1), (w2, b2) = mlp.unflatten(out, sizes)
    assert np.all(b2 == 0)  # the output layer's bias belongs to no hidden unit
    for j in range(4):
        from_b = b1[:, j] == 1
        assert np.all(w1[:, j, :] == from_b[:, None]) and np.all(w2[:, :, j] == from_b[:, None])
    assert 0 < b1.mean() < 1  # some units moved, not all
    assert np.all(unit_crossover(a, b, sizes, 0.0, np.random.default_rng(0)) == 0)
