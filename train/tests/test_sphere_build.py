"""The tiny config built with flow.geometry = "sphere_product": the bundle says so, whitening is the
identity on the spheres, stored draws lie on the slice, the flow's samples stay there, the
importance weights against the posterior on the slice are computed, and a runtime that knows the
geometry (POSTFLOW_BIN, default target/release/postflow) samples on the slice and reproduces the
log-densities in reverse time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from train import evaluate, sampler, slice_density, sphere

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny_sphere")
    cfg = (ROOT / "train/configs/tiny.toml").read_text().replace('name = "tiny"', 'name = "tiny_sphere"')
    cfg = cfg.replace("[flow]\n", '[flow]\ngeometry = "sphere_product"\n')
    (tmp / "tiny_sphere.toml").write_text(cfg)
    out, work = tmp / "bundle", tmp / "work"
    subprocess.run([sys.executable, "-m", "train", "build", str(tmp / "tiny_sphere.toml"), "--out", str(out),
                    "--work", str(work)], cwd=ROOT, check=True, timeout=900)
    return out, work, tmp / "tiny_sphere.toml"


def test_sphere_bundle(built):
    out, work, _ = built
    man = json.loads((out / "postflow.json").read_text())
    assert man["flow"]["geometry"] == "sphere_product" and man["flow"]["base"] == "standard_normal"
    sizes = man["provenance"]["network"]["sizes"]
    g = sphere.Geometry(sizes)
    t = load_file(str(out / "tensors.safetensors"))
    assert np.all(t["flow.whiten.mean"][g.on_sphere] == 0.0) and np.all(t["flow.whiten.scale"][g.on_sphere] == 1.0)
    assert np.all(t["flow.whiten.scale"][g.euclid] != 1.0)  # the Euclidean part is whitened
    assert g.slice_error(t["posterior.theta"]).max() < 1e-4 and g.slice_error(t["reference.theta"]).max() < 1e-4
    assert g.slice_error(t["flow.anchors"].astype(np.float32)).max() < 1e-3
    card = (out / "README.md").read_text()
    assert f"- geometry: `sphere_product`, the canonical slice {repr(g)[len('Geometry('):-1]}:" in card
    assert "slerp(z, a; t₀) on each sphere" in card and "the identity (mean 0, sd 1) on sphere coordinates" in card
    rep = man["provenance"]["flow_training"]
    assert rep["geometry"] == "sphere_product" and rep["coupling"] == "ot"
    with np.load(work / "flow.npz") as z:
        vf = evaluate.vector_field({k: z[k] for k in z.files})
    assert vf.geometry is not None and vf.geometry.dim == g.dim
    theta, logq = sampler.sample_batched(vf, jax.random.PRNGKey(3), 64, t["flow.whiten.mean"],
                                         t["flow.whiten.scale"], method="rk4", steps=8, trace="hutchinson")
    assert g.slice_error(theta).max() <= 1e-5 and np.all(np.isfinite(logq))


def assert_weights_follow_the_log_weights(res):
    """ESS, largest weight and log-weight spread are those of the reported log p − log q
    (1 <= ESS <= n holds for any weights; this ties them to the target's density)."""
    logw = np.asarray(res["log_weights"])
    assert len(logw) == res["n"] and np.all(np.isfinite(logw))
    w = np.exp(logw - logw.max())
    w /= w.sum()
    s = res["snis"]
    np.testing.assert_allclose(s["ess"], 1.0 / np.sum(w**2), rtol=1e-9)
    np.testing.assert_allclose(s["max_weight"], w.max(), rtol=1e-9)
    np.testing.assert_allclose(s["logw_sd"], logw.std(), rtol=1e-9)
    # and the log-weights are the target's density over the flow's, as reported
    # (the report's mean of log q is a float32 mean: 1e-6 relative)
    np.testing.assert_allclose(logw.mean(), res["log_target_flow"]["mean"] - res["logq"]["mean"], rtol=1e-6)


def test_importance_weights_on_the_slice(built):
    _, work, cfg = built
    res = slice_density.main([str(work), "--config", str(cfg), "--n", "64", "--probes", "2"])
    s = res["snis"]
    assert s["n"] == 64 and 1.0 <= s["ess"] <= 64.0 and 0 < s["ess_per_n"] <= 1
    assert_weights_follow_the_log_weights(res)
    assert np.isfinite(res["log_target_flow"]["mean"]) and res["slice_prior_relative_se"]["max"] == 0.0
    for k in ("tv", "nll", "ece"):
        assert np.isfinite(res["weighted"][k])


def test_importance_weights_of_anchored_samples(built):
    """--start-time t0: samples from the geodesic mixture around the training draws, weighted by
    the mixture's density pushed through the flow; t0 = 1 (no density) is refused."""
    _, work, cfg = built
    res = slice_density.main([str(work), "--config", str(cfg), "--n", "32", "--probes", "2", "--start-time", "0.9"])
    assert res["start_time"] == 0.9 and res["anchors"] > 0
    assert 1.0 <= res["snis"]["ess"] <= 32.0 and np.isfinite(res["logq"]["mean"])
    assert_weights_follow_the_log_weights(res)
    with pytest.raises(SystemExit, match="start-time 1"):
        slice_density.main([str(work), "--config", str(cfg), "--n", "8", "--start-time", "1"])


def _runtime():
    exe = Path(os.environ.get("POSTFLOW_BIN", ROOT / "target/release/postflow"))
    return exe if exe.exists() else None


def test_runtime_samples_on_the_slice_and_log_prob_round_trip(built, tmp_path):
    out, _, _ = built
    exe = _runtime()
    if exe is None:
        pytest.skip("no postflow binary (POSTFLOW_BIN)")
    info = subprocess.run([str(exe), "info", str(out)], capture_output=True, text=True)
    if info.returncode != 0 and "sphere_product" in info.stderr and "not supported" in info.stderr:
        pytest.skip(f"{exe} predates the sphere_product geometry")
    assert info.returncode == 0, info.stderr
    assert "sphere_product" in info.stdout
    s = tmp_path / "s.safetensors"
    fine = ["--solver", "rk4", "--steps", "40"]  # the bundle's default (few steps) is no exact inverse
    subprocess.run([str(exe), "sample", str(out), "-n", "16", "--start-time", "0", "--trace", "exact", "-q",
                    *fine, "-o", str(s)], check=True)
    got = load_file(str(s))
    man = json.loads((out / "postflow.json").read_text())
    g = sphere.Geometry(man["provenance"]["network"]["sizes"])
    assert g.slice_error(got["theta"]).max() <= 1e-5
    lp = tmp_path / "lp.safetensors"
    subprocess.run([str(exe), "log-prob", str(out), "--theta", str(s), "--start-time", "0",
                    "--trace", "exact", "-q", *fine, "-o", str(lp)], check=True)
    back = load_file(str(lp))
    np.testing.assert_allclose(back["log_density"], got["log_density"], atol=1e-3)
