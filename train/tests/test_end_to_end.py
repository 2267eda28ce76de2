"""The tiny config builds a complete bundle that follows docs/bundle-format.md, passes the
ONNX parity check, and that the Rust runtime opens and samples from."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file

from train import flow, metrics, mlp, solver_choice

ROOT = Path(__file__).resolve().parents[2]
BUNDLE_FILES = {"postflow.json", "flow.onnx", "flow_jvp.onnx", "net.onnx", "tensors.safetensors"}


# `built` (the tiny build: bundle, work dir) is conftest.py's session fixture, shared with test_refine.py


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_bundle_follows_the_format(built):
    out, _ = built
    assert BUNDLE_FILES <= {p.name for p in out.iterdir()}
    man = json.loads((out / "postflow.json").read_text())
    assert man["format"] == "postflow-bundle" and man["format_version"] == 4  # 2: flow.anchors (issue 12); 3: refine; 4: refine.start_time
    d, c, d_in = man["network"]["dim"], man["task"]["classes"], man["input"]["dim"]
    assert man["flow"]["dim"] == d
    # layers tile [0, D) in order
    off = 0
    for layer in man["network"]["layers"]:
        assert layer["weight"]["offset"] == off and layer["weight"]["shape"] == [layer["out"], layer["in"]]
        off += layer["in"] * layer["out"]
        assert layer["bias"]["offset"] == off and layer["bias"]["shape"] == [layer["out"]]
        off += layer["out"]
    assert off == d and man["network"]["layers"][-1]["out"] == c
    t = load_file(str(out / "tensors.safetensors"))
    n = t["eval.x"].shape[0]
    expect = {"flow.whiten.mean": (np.float32, (d,)), "flow.whiten.scale": (np.float32, (d,)),
              "reference.theta": (np.float32, (d,)), "eval.x": (np.float32, (n, d_in)),
              "eval.y": (np.int64, (n,)), "eval.hmc_probs": (np.float32, (n, c))}
    for name, (dtype, shape) in expect.items():
        assert t[name].dtype == dtype and t[name].shape == shape, name
    assert t["posterior.theta"].dtype == np.float32 and t["posterior.theta"].shape[1] == d
    assert np.all(t["flow.whiten.scale"] > 0) and np.all(np.isfinite(t["posterior.theta"]))
    np.testing.assert_allclose(t["eval.hmc_probs"].sum(1), 1.0, atol=1e-5)
    for name, spec in man["graphs"].items():
        g = onnx.load(str(out / spec["file"])).graph
        assert [i.name for i in g.input] == spec["inputs"] and [o.name for o in g.output] == spec["outputs"]
    g = onnx.load(str(out / "flow_jvp.onnx")).graph
    assert _dims(g.input[2]) == ["B", "K", d] and _dims(g.output[1]) == ["B", "K"]
    g = onnx.load(str(out / "net.onnx")).graph
    assert _dims(g.output[0]) == ["S", "N", c]


def test_anchors_and_start_time_sweep(built):
    """Issue 12: the training draws as whitened f16 anchors, the OOD inputs, the sweep and the
    default start time, as the manifest describes them."""
    from train import evaluate, whiten
    out, work = built
    man = json.loads((out / "postflow.json").read_text())
    t = load_file(str(out / "tensors.safetensors"))
    d, d_in = man["network"]["dim"], man["input"]["dim"]
    spec = man["flow"]["anchors"]
    a = t["flow.anchors"]
    assert spec == {"tensor": "flow.anchors", "count": len(a), "dtype": "f16"}
    assert a.dtype == np.float16 and a.shape == (spec["count"], d) and np.all(np.isfinite(a))
    prov = man["provenance"]["anchors"]
    with np.load(work / "canon.npz") as z:
        draws = z["samples"][:-1].reshape(-1, d)  # the flow's training draws, chain-major
    assert prov["training_draws"] == len(draws) and len(a) == len(draws[::prov["thin_every"]])
    x = whiten.apply(draws[::prov["thin_every"]], t["flow.whiten.mean"], t["flow.whiten.scale"])
    np.testing.assert_array_equal(a, x.astype(np.float16))
    err = np.max(np.abs(a.astype(np.float32) - x))
    assert err == pytest.approx(prov["error"]["max_abs_whitened"]) and err <= np.max(np.abs(x)) * 2.0**-11
    theta_err = np.max(np.abs(whiten.invert(a.astype(np.float32), t["flow.whiten.mean"], t["flow.whiten.scale"])
                              - whiten.invert(x, t["flow.whiten.mean"], t["flow.whiten.scale"])))
    assert theta_err == pytest.approx(prov["error"]["max_abs_theta"])
    assert set(prov["t1_bma"]) == {"stored", "f32", "all_training_draws"}
    ood = t["eval.ood_x"]
    assert ood.dtype == np.float32 and ood.shape == (max(len(t["eval.x"]), 100), d_in) and np.all(np.isfinite(ood))
    rm = man["reference_metrics"]
    sweep = rm["start_time_sweep"]
    assert [r["start_time"] for r in sweep] == [0.0, 0.5, 0.8, 0.85, 0.9, 0.95, 1.0]
    keys = {"start_time", "tv", "nll", "ece", "agreement", "memorization_ratio", "epistemic_ratio_eval",
            "epistemic_ratio_ood"}
    for r in sweep:
        assert set(r) == keys and all(np.isfinite(v) for v in r.values()), r
    assert sweep[0]["tv"] == pytest.approx(rm["methods"]["flow"]["tv"], abs=1e-12)  # t0 = 0 is the flow row
    assert sweep[-1]["memorization_ratio"] == pytest.approx(0.0, abs=1e-3)  # t0 = 1: the anchors themselves
    assert set(rm["hmc_mutual_information"]) == {"eval", "ood"}
    t0 = man["flow"]["default_start_time"]
    rule_ece = man["provenance"]["start_time"]["rule_ece"]
    assert 0.0 <= t0 <= 1.0 and t0 == evaluate.choose_start_time(sweep, rm["methods"]["hmc"], True, rule_ece)[0]
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) <= 15_000_000
    card = (out / "README.md").read_text()
    assert "memorization ratio" in card and (out / "figures" / "start_time_sweep.png").exists()
    assert "- geometry: `euclidean`" in card and "t₀·a + (1 − t₀)·z around" in card
    assert "- weights: rounded to float16 after training" in card  # flow.weight_dtype = "f16"
    # the rebuild command names the config the build read (inside the repository: relative to it)
    assert "-m train build train/configs/tiny.toml --out models/tiny\n" in card


def test_default_solver_is_the_sweeps_choice(built):
    out, _ = built
    man = json.loads((out / "postflow.json").read_text())
    sweep, choice = man["reference_metrics"]["solver_sweep"], man["provenance"]["solver_choice"]
    starts = sorted({r["start_time"] for r in sweep})
    t0 = man["flow"].get("default_start_time", 0.0)
    assert starts == ([0.0, t0] if 0.0 < t0 < 1.0 else [0.0])
    assert {(r["method"], r["steps"]) for r in sweep} == {(m, s) for m in ("euler", "rk4") for s in (1, 4)}
    method, steps, _, _ = solver_choice.choose(sweep, True, choice["tolerance"], choice["spread_tolerance"],
                                               choice["logq_tolerance"])
    assert man["flow"]["default_solver"] == {"method": method, "steps": steps} == \
        {"method": choice["method"], "steps": choice["steps"]}
    for r in sweep:  # the converged row has no density error against itself
        assert (r["log_density_mae"] == 0.0) == (r["method"] == "rk4" and r["steps"] == 4)
    assert "## Solver: cost against fidelity" in (out / "README.md").read_text()


def test_honest_comparison_rows(built):
    out, _ = built
    man = json.loads((out / "postflow.json").read_text())
    rows = {r["method"]: r for r in man["reference_metrics"]["baselines"]}
    names = list(rows)
    assert names[0] == "flow (mlp), t0 = 0"
    for name in ("full-covariance Gaussian", "KDE h = 0.1", "KDE h = 0.2", "KDE h = 0.3", "training draws",
                 "HMC (held-out chain)", "MAP", "ensemble (chain starts)"):
        assert name in rows, name
    assert any(n.startswith("training draw + noise") for n in names)
    hmc, copies, map_ = rows["HMC (held-out chain)"], rows["training draws"], rows["MAP"]
    assert hmc["tv"] == 0.0 and hmc["memorization_ratio"] == 1.0
    assert hmc["epistemic_ratio_eval"] == 1.0 and hmc["epistemic_ratio_ood"] == 1.0
    assert copies["memorization_ratio"] < 1e-6  # the draws are their own nearest neighbours
    assert map_["count"] == 1 and map_["epistemic_ratio_eval"] == 0.0
    # wider kernels move samples further from the draws
    assert rows["KDE h = 0.1"]["memorization_ratio"] < rows["KDE h = 0.3"]["memorization_ratio"]
    assert "## The honest comparison" in (out / "README.md").read_text()


def test_reference_metrics_are_recomputable_from_the_bundle(built):
    out, _ = built
    man = json.loads((out / "postflow.json").read_text())
    t = load_file(str(out / "tensors.safetensors"))
    rm = man["reference_metrics"]
    assert rm["n"] == len(t["eval.y"]) and set(rm["methods"]) >= {"hmc", "map", "flow", "ensemble", "gaussian"}
    hmc = metrics.classification(t["eval.y"], probs=t["eval.hmc_probs"])
    for k, v in hmc.items():
        assert rm["methods"]["hmc"][k] == pytest.approx(v, abs=1e-12)
    sess = ort.InferenceSession(str(out / "net.onnx"))
    logits = sess.run(None, {"x": t["eval.x"], "theta": t["reference.theta"][None]})[0][0]
    mp = metrics.classification(t["eval.y"], logits=logits, ref_probs=t["eval.hmc_probs"])
    for k, v in mp.items():
        assert rm["methods"]["map"][k] == pytest.approx(v, abs=1e-12)


def test_graphs_match_jax(built):
    """Independent of the export stage's own check: the written files against JAX."""
    out, work = built
    man = json.loads((out / "postflow.json").read_text())
    t = load_file(str(out / "tensors.safetensors"))
    sizes = [man["input"]["dim"]] + [l["out"] for l in man["network"]["layers"]]
    rng = np.random.default_rng(0)
    thetas = np.concatenate([t["posterior.theta"][:3], t["reference.theta"][None]])
    got = ort.InferenceSession(str(out / "net.onnx")).run(None, {"x": t["eval.x"], "theta": thetas})[0]
    with np.load(work / "data.npz") as z:
        xs = (t["eval.x"] - z["x_mean"]) / z["x_std"]
    want = np.stack([np.asarray(mlp.forward(jnp.asarray(th), jnp.asarray(xs), sizes)) for th in thetas])
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
    with np.load(work / "flow.npz") as z:
        params = flow.unflatten_params({k: z[k] for k in z.files})
    tt = rng.uniform(size=4).astype(np.float32)
    x = rng.standard_normal((4, man["flow"]["dim"])).astype(np.float32)
    v = ort.InferenceSession(str(out / "flow.onnx")).run(None, {"t": tt, "x": x})[0]
    want = np.asarray(flow.velocity(params, jnp.asarray(tt), jnp.asarray(x)))
    assert np.max(np.abs(v - want)) <= 1e-4 * np.max(np.abs(want))
    eps = rng.choice([-1.0, 1.0], size=(4, 2, x.shape[1])).astype(np.float32)
    v2, quad = ort.InferenceSession(str(out / "flow_jvp.onnx")).run(None, {"t": tt, "x": x, "eps": eps})
    import jax
    jac = np.stack([np.asarray(jax.jacfwd(lambda z: flow.velocity(params, jnp.asarray(tt[i:i + 1]), z[None])[0])(jnp.asarray(x[i])))
                    for i in range(4)])
    want_quad = np.einsum("bkd,bde,bke->bk", eps, jac, eps)
    np.testing.assert_allclose(v2, v, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(quad - want_quad)) <= 1e-4 * np.max(np.abs(want_quad))


def _postflow_bin():
    env = os.environ.get("POSTFLOW_BIN")
    path = Path(env) if env else ROOT / "target" / "release" / "postflow"
    if not env and not path.exists():
        pytest.skip("postflow binary not built and POSTFLOW_BIN unset")
    return path


def test_rust_runtime_opens_and_samples(built, tmp_path):
    binary = _postflow_bin()
    out, _ = built
    d = json.loads((out / "postflow.json").read_text())["network"]["dim"]
    dst = tmp_path / "samples.safetensors"
    # Start time 0 (the plain flow): the bundle's default may be 1, where stored draws have no density.
    subprocess.run([str(binary), "sample", str(out), "-n", "8", "--start-time", "0", "--trace", "hutchinson",
                    "-o", str(dst)],
                   check=True, timeout=120)
    s = load_file(str(dst))
    assert s["theta"].shape == (8, d) and np.all(np.isfinite(s["theta"]))
    assert s["log_density"].shape == (8,) and np.all(np.isfinite(s["log_density"]))


def test_rust_runtime_start_times_match_the_pipeline(built, tmp_path):
    """The runtime's start times against the pipeline's: at t0 = 1 the un-whitened anchors (a
    permutation), at t0 = 0.9 samples whose BMA and memorization ratio agree with the manifest's
    sweep row within sampling noise. Skipped until the CLI has --start-time."""
    binary = _postflow_bin()
    out, _ = built
    man = json.loads((out / "postflow.json").read_text())
    t = load_file(str(out / "tensors.safetensors"))
    mean, scale, a = t["flow.whiten.mean"], t["flow.whiten.scale"], t["flow.anchors"].astype(np.float32)

    def sample(t0, n):  # unrefined: the start-time sweep's rows are the flow's own samples
        dst = tmp_path / f"s{t0}.safetensors"
        subprocess.run([str(binary), "sample", str(out), "-n", str(n), "--start-time", str(t0), "--refine", "0",
                        "-o", str(dst)], check=True, timeout=300)
        return load_file(str(dst))["theta"]

    got = sample(1, len(a))
    want = mean + scale * a
    np.testing.assert_allclose(got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])], rtol=1e-6, atol=1e-6)
    row = next(r for r in man["reference_metrics"]["start_time_sweep"] if r["start_time"] == 0.9)
    theta = sample(0.9, man["reference_metrics"]["flow_samples"])
    logits = ort.InferenceSession(str(out / "net.onnx")).run(None, {"x": t["eval.x"], "theta": theta})[0]
    m = metrics.classification(t["eval.y"], probs=metrics.bma_probs(logits), ref_probs=t["eval.hmc_probs"])
    assert abs(m["tv"] - row["tv"]) <= 0.03 and abs(m["nll"] - row["nll"]) <= 0.05, (m, row)
    held_x = (t["posterior.theta"] - mean) / scale
    ratio = metrics.memorization_ratio((theta - mean) / scale, held_x, a)
    assert ratio == pytest.approx(row["memorization_ratio"], rel=0.25)


def test_rust_runtime_refinement_matches_the_pipeline(built, tmp_path):
    """The runtime's refinement (its own HMC on the bundle's posterior graph) against the
    pipeline's JAX refinement: at every K of the manifest's refinement sweep, BMA and
    memorization ratio and the share of samples still at a stored draw agree within sampling
    noise, and the default K is what sampling runs."""
    binary = _postflow_bin()
    out, _ = built
    man = json.loads((out / "postflow.json").read_text())
    assert man["format_version"] == 4
    t = load_file(str(out / "tensors.safetensors"))
    mean, scale, a = t["flow.whiten.mean"], t["flow.whiten.scale"], t["flow.anchors"].astype(np.float32)
    held_x = (t["posterior.theta"] - mean) / scale
    n = man["reference_metrics"]["flow_samples"]
    for row in man["reference_metrics"]["refine_sweep"]:
        k = row["transitions"]
        dst = tmp_path / f"r{k}.safetensors"
        subprocess.run([str(binary), "sample", str(out), "-n", str(n), "--refine", str(k), "-q", "-o", str(dst)],
                       check=True, timeout=600)
        theta = load_file(str(dst))["theta"]
        logits = ort.InferenceSession(str(out / "net.onnx")).run(None, {"x": t["eval.x"], "theta": theta})[0]
        m = metrics.classification(t["eval.y"], probs=metrics.bma_probs(logits), ref_probs=t["eval.hmc_probs"])
        assert abs(m["tv"] - row["tv"]) <= 0.03 and abs(m["nll"] - row["nll"]) <= 0.05, (k, m, row)
        ratio = metrics.memorization_ratio((theta - mean) / scale, held_x, a)
        if k == 0:
            assert ratio < 1e-3
        else:
            assert ratio == pytest.approx(row["memorization_ratio"], rel=0.3), (k, ratio, row)
        # the share still at a stored draw (rejected transitions keep their start), both sides
        nn = metrics.nearest_distance((theta - mean) / scale, a)
        at_stored = float(np.mean(nn < 0.01 * np.median(metrics.nearest_distance(held_x, a))))
        # 100 samples: the standard error of a difference of two shares is at most 0.071
        assert abs(at_stored - row["at_stored_draws"]) <= 0.2, (k, at_stored, row)
        assert (row["at_stored_draws"] == 1.0) == (k == 0) == (at_stored == 1.0), (k, at_stored, row)
        print(f"K={k}: at a stored draw {at_stored:.2f} (runtime) vs {row['at_stored_draws']:.2f} (pipeline)")
    default = man["refine"]["default_transitions"]
    dflt, explicit = tmp_path / "d.safetensors", tmp_path / "e.safetensors"
    subprocess.run([str(binary), "sample", str(out), "-n", "16", "-q", "-o", str(dflt)], check=True, timeout=300)
    subprocess.run([str(binary), "sample", str(out), "-n", "16", "-q", "--refine", str(default), "-o", str(explicit)],
                   check=True, timeout=300)
    np.testing.assert_array_equal(load_file(str(dflt))["theta"], load_file(str(explicit))["theta"])


def test_fidelity_baselines_run_on_a_work_dir(built, tmp_path):
    """The baselines of docs/fidelity.md on the tiny build: every method scored, TV in [0, 1],
    and resampling the training draws themselves (kde_h0.0) is scored like any other BMA."""
    _, work = built
    out = tmp_path / "baselines.json"
    subprocess.run([sys.executable, "-m", "train.diagnostics.fidelity_baselines", str(work), "train/configs/tiny.toml",
                    "--n", "40", "--pca-flow-steps", "20", "--lowrank-flow-steps", "20", "--rank", "8",
                    "--json", str(out)], cwd=ROOT, check=True, timeout=600)
    res = json.loads(out.read_text())
    assert {"fullcov_gaussian", "kde_h0.0", "kde_h0.3", "kde_diag_h1.0", "pca_flow", "lowrank_flow_r8"} <= set(res)
    for method, m in res.items():
        assert 0.0 <= m["tv"] <= 1.0 and np.isfinite(m["nll"]), method


def test_flow_graphs_store_the_flow_stage_weights_as_f16(built):
    """flow.weight_dtype = "f16" (the default): the flow stage's cached parameters are f16 values,
    and the bundle's flow graphs hold them as f16 initializers (each cast back to f32 once)."""
    out, work = built
    with np.load(work / "flow.npz") as z:
        for k in z.files:
            if z[k].dtype == np.float32:
                assert np.array_equal(z[k].astype(np.float16).astype(np.float32), z[k]), k
    for name in ("flow", "flow_jvp"):
        model = onnx.load(str(out / f"{name}.onnx"))
        halves = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
        assert "W0x_f16" in halves, name
        casts = {n.input[0] for n in model.graph.node if n.op_type == "Cast"}
        assert set(halves) <= casts, name


def test_start_time_sweep_in_the_coordinates_of_a_research_flow(built):
    """evaluate.start_time_sweep with a flow's own coordinates (vfield, to_theta): given the stage's
    field and per-coordinate un-whitening it gives the stage's own rows; the full-whitening
    diagnostic's Cholesky map round-trips and its sweep scores every start time."""
    from train import evaluate
    from train.diagnostics import diagnose_fidelity as dfid, full_whitening

    _, work = built
    cfg, st, _ = dfid.load_work(work, ROOT / "train/configs/tiny.toml")
    cfg["bundle"]["start_times"] = [0.0, 0.9]
    ctx = {"cfg": cfg, "work": work, **st}
    mean, scale = st["whiten"]["mean"], st["whiten"]["scale"]
    d = mean.shape[0]
    anchors = (st["canon"]["samples"][:-1].reshape(-1, d) - mean) / scale
    ood = evaluate.ood_inputs(cfg, st["data"])
    want, _, _ = evaluate.start_time_sweep(ctx, anchors, ood)
    got, _, _ = evaluate.start_time_sweep(ctx, anchors, ood, vfield=evaluate.vector_field(st["flow"]),
                                          to_theta=lambda x: mean + scale * np.asarray(x))
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), k

    train = st["canon"]["samples"][:-1].reshape(-1, d).astype(np.float64)
    mu, chol = full_whitening.cholesky_whitening(train)
    x = np.linalg.solve(chol, (train - mu).T).T
    np.testing.assert_allclose(mu + x @ chol.T, train, atol=1e-8)
    cov = np.cov(train, rowvar=False)
    np.testing.assert_allclose(chol @ chol.T, cov + 1e-6 * np.trace(cov) / d * np.eye(d), rtol=1e-10, atol=1e-12)
    res = full_whitening.main([str(work), "--config", str(ROOT / "train/configs/tiny.toml"), "--steps", "20",
                               "--start-times", "0,0.9"])
    assert [r["start_time"] for r in res["rows"]] == [0.0, 0.9]
    for r in res["rows"]:
        assert 0.0 <= r["tv"] <= 1.0 and np.isfinite(r["nll"]) and r["memorization_ratio"] >= 0.0


def test_draw_combinations_are_scored_like_the_honest_comparison(built):
    """The draw-combination diagnostic on the tiny build: every row scored; the training draws
    themselves are their own nearest neighbours, midpoints are not."""
    from train.diagnostics import draw_combinations

    _, work = built
    res = draw_combinations.main([str(work), "--config", str(ROOT / "train/configs/tiny.toml"), "--n", "40"])
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["training draws"]["memorization_ratio"] < 1e-6
    assert rows["convex, w = 0.5"]["memorization_ratio"] > 0.1
    for r in res["rows"]:
        assert r["count"] == 40 and 0.0 <= r["tv"] <= 1.0 and np.isfinite(r["nll"]), r
