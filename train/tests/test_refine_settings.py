"""train/diagnostics/refine_settings.py: its preconditioners are the linear maps its docs state,
and it runs end to end on the tiny build."""
import numpy as np

from train.diagnostics import refine_settings


def _draws(n=400, d=6, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * np.linspace(0.1, 3.0, d)
    return rng.standard_normal((n, d)) @ mix + rng.standard_normal(d)


def test_each_preconditioner_has_the_stated_covariance():
    x = _draws()
    cov, var = np.cov(x, rowvar=False), x.var(0)
    diag = refine_settings.preconditioner("diag", x)
    np.testing.assert_allclose(diag @ diag.T, np.diag(var), rtol=1e-12)
    dense = refine_settings.preconditioner("dense0", x)
    np.testing.assert_allclose(dense @ dense.T, cov, rtol=1e-6, atol=1e-9)
    half = refine_settings.preconditioner("dense0.5", x)
    np.testing.assert_allclose(half @ half.T, 0.5 * cov + 0.5 * np.diag(np.diag(cov)), rtol=1e-6, atol=1e-9)
    # all eigenpairs of the standardized draws: the covariance itself
    full = refine_settings.preconditioner("lr6", x)
    np.testing.assert_allclose(full @ full.T, cov, rtol=1e-6, atol=1e-9)
    # rank 1: the covariance's scale along the top direction of the standardized draws, unit scale
    # (in standardized units) across it
    one = refine_settings.preconditioner("lr1", x)
    inv_sd = np.diag(1 / np.sqrt(var))
    z = inv_sd @ one @ one.T @ inv_sd
    w, v = np.linalg.eigh(inv_sd @ cov @ inv_sd)
    np.testing.assert_allclose(v[:, -1] @ z @ v[:, -1], w[-1], rtol=1e-6)
    np.testing.assert_allclose(v[:, 0] @ z @ v[:, 0], 1.0, rtol=1e-6)
    assert not np.isclose(w[-1], 1.0)


def test_runs_on_the_tiny_build(built, tmp_path):
    _, work = built
    out = refine_settings.main([str(work), "--config", "train/configs/tiny.toml", "--mass", "diag,lr2",
                                "--leapfrog", "5", "--checkpoints", "0,1", "--n", "16",
                                "--json", str(tmp_path / "r.json")])
    assert set(out["modes"]) == {"diag", "lr2"}
    for mode in out["modes"].values():
        assert [r["transitions"] for r in mode["rows"]] == [0, 1] and mode["step"] > 0
        assert mode["rows"][0]["memorization_ratio"] < 1e-3 < mode["rows"][1]["memorization_ratio"]
    assert (tmp_path / "r.json").exists()
