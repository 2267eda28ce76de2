"""Refinement (bundle format version 3, train/refine.py): the unit norms and decanonicalize
invert canonicalize, the HMC kernel leaves its target invariant, the posterior graph matches
JAX, and the bundle stage's chooser follows its rule."""

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest

from train import canon, mlp, refine

ROOT_CFG = __import__("pathlib").Path(__file__).resolve().parents[2] / "train/configs/tiny.toml"


@pytest.mark.parametrize("sizes", [[2, 8, 2], [3, 5, 4, 1], [4, 6, 3, 7, 3]])
def test_decanonicalize_inverts_canonicalize(sizes):
    rng = np.random.default_rng(len(sizes))
    theta = rng.standard_normal((11, mlp.dim(sizes))) * rng.uniform(0.1, 3.0, (11, 1))
    norms = refine.unit_norms(theta, sizes)
    assert norms.shape == (11, refine.hidden_width(sizes)) and np.all(norms > 0)
    c = canon.canonicalize(theta, sizes)
    np.testing.assert_allclose(refine.decanonicalize(c, norms, sizes), theta, rtol=1e-10, atol=1e-12)
    # the same function: the canonical and the rescaled nets agree on inputs
    x = jnp.asarray(rng.standard_normal((5, sizes[0])))
    for i in range(3):
        np.testing.assert_allclose(mlp.forward(jnp.asarray(c[i], jnp.float32), x, sizes),
                                   mlp.forward(jnp.asarray(theta[i], jnp.float32), x, sizes), rtol=1e-4, atol=1e-5)


def test_unit_norms_follow_canonicalize_layer_by_layer():
    """Layer l's norms are taken after layer l-1's were multiplied into its incoming weights;
    an exactly zero unit gets norm 1."""
    sizes = [2, 3, 2, 1]
    rng = np.random.default_rng(3)
    theta = rng.standard_normal(mlp.dim(sizes))
    (w0, b0), (w1, b1), _ = mlp.unflatten(theta, sizes)
    n0 = np.sqrt((w0**2).sum(1) + b0**2)
    n1 = np.sqrt(((w1 * n0[None]) ** 2).sum(1) + b1**2)
    np.testing.assert_allclose(refine.unit_norms(theta, sizes), np.r_[n0, n1])
    dead = theta.copy()
    layers, _ = mlp.layout(sizes)
    dead[layers[0][2]:layers[0][2] + 2] = 0.0  # unit 0 of layer 0: weights and bias zero
    dead[layers[0][3]] = 0.0
    assert refine.unit_norms(dead, sizes)[0] == 1.0


def _gaussian_kernel(mu, sd, leapfrog=10):
    logd = lambda th: -0.5 * jnp.sum(((th - mu) / sd) ** 2)
    return refine.make_kernel(logd, jnp.asarray(sd**2), leapfrog)


def test_hmc_leaves_a_gaussian_invariant():
    d, n = 6, 4000
    mu, sd = jnp.linspace(-1.0, 2.0, d), jnp.linspace(0.5, 3.0, d)
    run = _gaussian_kernel(mu, sd)
    x0 = mu + sd * jax.random.normal(jax.random.PRNGKey(0), (n, d))
    x, acc = refine.hmc(jax.random.PRNGKey(1), x0, None, None, 0.3, 10, 5, kernel=run)
    assert 0.5 < acc <= 1.0
    # exact draws stay exact draws: mean within 5 standard errors, variance within 10 %
    z = (x.mean(0) - np.asarray(mu)) / (np.asarray(sd) / np.sqrt(n))
    assert np.all(np.abs(z) < 5), z
    np.testing.assert_allclose(x.var(0) / np.asarray(sd) ** 2, 1.0, atol=0.1)
    # and a far-off start moves to the target (trajectory length 1.5 in units of the sd: about a
    # quarter period, where a Gaussian's HMC forgets its start fastest)
    far = jnp.full((n, d), 8.0)
    x, _ = refine.hmc(jax.random.PRNGKey(2), far, None, None, 0.15, 10, 40, kernel=run)
    assert np.all(np.abs(x.mean(0) - np.asarray(mu)) < 0.25 * np.asarray(sd) + 0.05), x.mean(0)
    np.testing.assert_allclose(x.var(0) / np.asarray(sd) ** 2, 1.0, atol=0.25)


def test_hmc_rejects_nan_and_huge_steps():
    run = _gaussian_kernel(jnp.zeros(3), jnp.ones(3))
    x0 = jnp.ones((50, 3))
    x, acc = refine.hmc(jax.random.PRNGKey(0), x0, None, None, 1e3, 5, 3, kernel=run)
    assert acc < 1e-3 and np.array_equal(x, np.ones((50, 3), np.float32))
    nan_run = refine.make_kernel(lambda th: jnp.where(th[0] > 1.0, jnp.nan, -0.5 * jnp.sum(th**2)), jnp.ones(3), 5)
    x, _ = refine.hmc(jax.random.PRNGKey(1), x0 * 0.5, None, None, 0.5, 5, 20, kernel=nan_run)
    assert np.all(np.isfinite(x)) and np.all(x[:, 0] <= 1.0 + 1e-6)


def test_tune_step_picks_the_largest_step_meeting_the_target():
    run = _gaussian_kernel(jnp.zeros(4), jnp.ones(4))
    starts = jax.random.normal(jax.random.PRNGKey(0), (200, 4))
    step, trials = refine.tune_step(run, starts, jax.random.PRNGKey(1), 0.25)
    passed = {float(s): a >= refine.TARGET_ACCEPTANCE for s, a in trials.items()}
    assert passed[float(f"{step:.4g}")]
    # walked from the largest grid step down: every larger step was tried and failed
    assert not any(ok for s, ok in passed.items() if s > step * (1 + 1e-3))
    on_grid = lambda s: abs(np.log2(s / 0.25) - round(np.log2(s / 0.25))) < 1e-3
    grid = sorted(s for s in passed if on_grid(s))
    first = grid[0]  # the first passing grid step; no smaller one tried
    assert passed[first] and len(grid) == 3 - round(np.log2(first / 0.25)) + 1
    # then BISECTION_LEVELS geometric bisections of [first, 2 first]: the step is within a factor
    # 2^(1/8) of the acceptance boundary, and the smallest failed step is that factor above it
    between = sorted(s for s in passed if not on_grid(s))
    assert len(between) == refine.BISECTION_LEVELS
    assert all(first < s < 2 * first for s in between)
    failed_above = min(s for s, ok in passed.items() if not ok and s > step)
    assert np.isclose(failed_above / step, 2 ** (1 / 2**refine.BISECTION_LEVELS), rtol=1e-3)


def test_tune_step_bisection_finds_a_known_boundary():
    """A kernel whose acceptance is a known decreasing function of the step: the tuned step
    is the largest on the bisection lattice below the boundary."""
    boundary = 0.37

    def kernel(key, starts, step, transitions):
        return starts, jnp.where(step <= boundary, 0.9, 0.1)
    step, trials = refine.tune_step(kernel, jnp.zeros((2, 3)), jax.random.PRNGKey(0), 0.1)
    # grid: 0.8, 0.4 fail, 0.2 passes; bisection of [0.2, 0.4] to a factor 2^(1/8)
    lattice = 0.2 * 2 ** (np.arange(9) / 8)
    assert np.isclose(step, lattice[lattice <= boundary].max(), rtol=1e-6)
    assert len(trials) == 3 + refine.BISECTION_LEVELS
    top, _ = refine.tune_step(lambda k, s, e, t: (s, jnp.float32(1.0)), jnp.zeros((2, 3)), jax.random.PRNGKey(0), 0.1)
    assert np.isclose(top, 0.8)  # the largest grid step passes: no bracket to bisect
    low, _ = refine.tune_step(lambda k, s, e, t: (s, jnp.float32(0.0)), jnp.zeros((2, 3)), jax.random.PRNGKey(0), 0.1)
    assert np.isclose(low, 0.1 / 16)


def test_refine_rescales_with_the_anchor_norms_and_returns_canonical_draws():
    sizes = [2, 4, 2]
    rng = np.random.default_rng(0)
    theta = rng.standard_normal((7, mlp.dim(sizes))) * 2.0
    norms = refine.unit_norms(theta, sizes)
    c = canon.canonicalize(theta, sizes)
    logd = lambda th: -0.5 * jnp.sum(th**2)
    kw = dict(logdensity=logd, inverse_mass=np.ones(mlp.dim(sizes)), step_size=0.1, leapfrog_steps=3,
              sizes=sizes, key=jax.random.PRNGKey(0))
    out0, _ = refine.refine(c, np.arange(7), 0, anchor_norms=norms, **kw)
    np.testing.assert_allclose(out0, c, atol=1e-5)
    out, _ = refine.refine(c, norms, 4, **kw)
    np.testing.assert_allclose(refine.unit_norms(out, sizes), 1.0, atol=1e-5)  # canonical
    assert not np.allclose(out, c)


def _row(k, mem, tv=0.01, nll=0.1):
    return {"transitions": k, "tv": tv, "nll": nll, "ece": 0.01, "agreement": 1.0, "memorization_ratio": mem,
            "epistemic_ratio_eval": 1.0, "epistemic_ratio_ood": 1.0}


def test_choose_transitions_by_the_rule():
    from train import evaluate
    hmc = {"nll": 0.1, "ece": 0.01}
    passes = lambda r: evaluate.start_time_failures(r, hmc, True, True)
    rows = [_row(0, 0.0), _row(5, 0.3), _row(10, 0.55), _row(20, 0.7), _row(50, 0.9)]
    assert refine.choose_transitions(rows, passes, 0.5)[0] == 10
    rows[2]["tv"] = 0.2  # K = 10 fails: the next passing K that reaches the ratio
    assert refine.choose_transitions(rows, passes, 0.5)[0] == 20
    assert refine.choose_transitions(rows, passes, 0.95)[0] == 50  # none reaches it: the largest ratio
    fails = [_row(k, 0.9, tv=0.3) for k in (0, 5, 10)]
    k, why = refine.choose_transitions(fails, passes, 0.5)
    assert k == 0 and "no K passes" in why


@pytest.mark.parametrize("task,sizes,outputs", [("classification", [3, 7, 5, 4], 4), ("regression", [2, 6, 1], 1),
                                                ("regression", [4, 5, 3, 2], 2)])
def test_posterior_graph_matches_jax(task, sizes, outputs):
    """posterior.onnx: value and gradient of the NUTS density within 1e-4 of JAX's,
    symbolic S (two batch sizes), with a temperature and a prior scale that are not 1."""
    from train import posterior_graph
    rng = np.random.default_rng(7)
    n = 37
    x = rng.standard_normal((n, sizes[0])).astype(np.float32)
    y = rng.integers(0, outputs, n) if task == "classification" else rng.standard_normal((n, outputs))
    model = posterior_graph.build(task, x, y, sizes, 0.3, 0.7, 1.5)
    logd = refine.log_posterior(task, x, y, sizes, 0.3, 0.7, 1.5)
    g = model.graph
    assert [i.name for i in g.input] == ["theta"] and [o.name for o in g.output] == ["log_density", "grad"]
    for s in (1, 9):
        theta = rng.standard_normal((s, mlp.dim(sizes))) * 0.8
        errs = posterior_graph.parity(model, logd, theta, 1e-4)
        assert errs["log_density"] <= 1e-5 and errs["grad"] <= 1e-4, errs


def test_posterior_graph_makes_no_subnormals_for_confident_nets():
    """A confident classifier (logit gaps of hundreds) gives softmax probabilities far below
    float32's normal range; the graph floors the centred logits at −80 before its one exp, so no
    subnormal reaches the backward MatMuls (they run 2-3x slower on them) and the gradient still matches JAX."""
    from train import posterior_graph
    rng = np.random.default_rng(3)
    sizes, n = [2, 6, 3], 50
    x = rng.standard_normal((n, 2)).astype(np.float32)
    y = rng.integers(0, 3, n)
    model = posterior_graph.build("classification", x, y, sizes, 1.0, 1.0, 1.0)
    # logit gaps from a few to hundreds: some log-probabilities land in exp's subnormal band (−103, −87)
    scales = np.geomspace(1.0, 60.0, 64)[:, None]
    theta = (rng.standard_normal((64, mlp.dim(sizes))) * scales).astype(np.float32)
    from train.export import session
    exp = [nd for nd in model.graph.node if nd.op_type == "Exp"]
    assert len(exp) == 1 and list(exp[0].input) == ["zc_floored"]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)  # the softmax the backward pass starts from, as an extra output
    probe.graph.output.append(onnx.helper.make_tensor_value_info("softmax", onnx.TensorProto.FLOAT, None))
    _, grad, softmax = session(probe.SerializeToString()).run(None, {"theta": theta})
    assert softmax.min() < 1e-30  # the nets are that confident
    for a in (softmax, grad):
        tiny = (a != 0) & (np.abs(a) < np.finfo(np.float32).tiny)
        assert not tiny.any(), a[tiny]
    errs = posterior_graph.parity(model, refine.log_posterior("classification", x, y, sizes, 1.0, 1.0, 1.0), theta, 1e-4)
    assert errs["grad"] <= 1e-4, errs


def test_start_anchor_indices_are_the_samplers_picks():
    """0 < t0 < 1: the anchor each sample of sample_batched started around (a zero field keeps
    the start, t0 near 1 keeps it nearest its anchor); t0 = 1: the seeded order."""
    from train import sampler
    rng = np.random.default_rng(0)
    anchors = rng.standard_normal((13, 5)).astype(np.float32) * 3
    key = jax.random.PRNGKey(4)
    zero = lambda t, x: jnp.zeros_like(x)
    theta, _ = sampler.sample_batched(zero, key, 30, np.zeros(5), np.ones(5), batch=7, method="euler", steps=1,
                                      start_time=0.999, anchors=anchors)
    idx = sampler.start_anchor_indices(key, 30, 13, 0.999, batch=7)
    nearest = np.argmin(((theta[:, None] - anchors[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(idx, nearest)
    t1, _ = sampler.sample_batched(zero, key, 30, np.zeros(5), np.ones(5), start_time=1.0, anchors=anchors)
    np.testing.assert_array_equal(t1, anchors[sampler.start_anchor_indices(key, 30, 13, 1.0)])


def test_bundle_stage_writes_a_valid_version_4_bundle(built):
    """The tiny build: the manifest's refine table, the two tensors, posterior.onnx (I/O,
    parity with the pipeline's posterior), the sweep and the default by the rule, the card."""
    import json
    import onnx
    from safetensors.numpy import load_file
    from train import bundle, config, evaluate, posterior_graph, whiten
    out, work = built
    man = json.loads((out / "postflow.json").read_text())
    assert man["format_version"] == 4
    rf = man["refine"]
    assert set(rf) == {"graph", "leapfrog_steps", "step_size", "default_transitions", "start_time"}
    assert rf["start_time"] == 1.0  # bundle.refine_start_time's default: the stored draws themselves
    assert rf["graph"] == "posterior.onnx" and 1 <= rf["leapfrog_steps"] <= 1000
    assert np.isfinite(rf["step_size"]) and rf["step_size"] > 0 and 0 <= rf["default_transitions"] <= 10000
    sizes, d = man["provenance"]["network"]["sizes"], man["network"]["dim"]
    t = load_file(str(out / "tensors.safetensors"))
    m, norms, a = t["refine.inverse_mass"], t["refine.anchor_unit_norms"], t["flow.anchors"]
    assert m.dtype == np.float32 and m.shape == (d,) and np.all(np.isfinite(m)) and np.all(m > 0)
    assert norms.dtype == np.float32 and norms.shape == (len(a), sum(sizes[1:-1]))
    assert np.all(np.isfinite(norms)) and np.all(norms > 0)
    with np.load(work / "align.npz") as z:
        aligned = z["samples"]
    train = aligned[:-1].reshape(-1, d)
    np.testing.assert_allclose(m, train.astype(np.float64).var(0), rtol=1e-5)
    kept = train[::man["provenance"]["anchors"]["thin_every"]]
    np.testing.assert_allclose(norms, refine.unit_norms(kept, sizes), rtol=1e-6)
    anchors_theta = whiten.invert(a.astype(np.float32), t["flow.whiten.mean"], t["flow.whiten.scale"])
    back = refine.decanonicalize(anchors_theta, norms, sizes)  # f16 anchors: close, not exact
    assert np.max(np.abs(back - kept)) <= 0.01 * np.max(np.abs(kept))

    g = onnx.load(str(out / rf["graph"])).graph
    assert [i.name for i in g.input] == ["theta"] and [o.name for o in g.output] == ["log_density", "grad"]
    dims = lambda v: [x.dim_param or x.dim_value for x in v.type.tensor_type.shape.dim]
    assert dims(g.input[0]) == ["S", d] and dims(g.output[0]) == ["S"] and dims(g.output[1]) == ["S", d]
    cfg = config.load(ROOT_CFG)
    with np.load(work / "data.npz") as z:
        data = {k: z[k] for k in z.files}
    with np.load(work / "map.npz") as z:
        sigma = float(z["noise_sigma"])
    logd = refine.log_posterior_of(cfg, data, sigma, sizes)
    model = onnx.load(str(out / rf["graph"]))
    assert max(posterior_graph.parity(model, logd, kept[:6], 1e-4).values()) <= 1e-4

    rm = man["reference_metrics"]
    assert set(rm["refine"]) == {"step_size", "leapfrog_steps", "pilot_acceptance"}
    assert rm["refine"]["step_size"] == rf["step_size"] and rm["refine"]["pilot_acceptance"] >= refine.TARGET_ACCEPTANCE
    sweep = rm["refine_sweep"]
    assert [r["transitions"] for r in sweep] == cfg["bundle"]["refine_transitions"]
    keys = {"transitions", "tv", "nll", "ece", "agreement", "memorization_ratio", "epistemic_ratio_eval",
            "epistemic_ratio_ood", "at_stored_draws", "memorization_ratio_mean"}
    for r in sweep:
        assert set(r) == keys and all(np.isfinite(v) for v in r.values()), r
    # K = 0 is the start-time sweep's row at refinement's start time (1: the stored draws)
    t1 = next(r for r in rm["start_time_sweep"] if r["start_time"] == rf["start_time"])
    assert sweep[0]["tv"] == pytest.approx(t1["tv"], abs=1e-4)
    assert sweep[0]["memorization_ratio"] == pytest.approx(0.0, abs=1e-3)
    assert sweep[0]["at_stored_draws"] == 1.0 and all(0 <= r["at_stored_draws"] <= 1 for r in sweep)
    assert sweep[-1]["memorization_ratio"] > sweep[0]["memorization_ratio"]
    hmc, ece = rm["methods"]["hmc"], man["provenance"]["start_time"]["rule_ece"]
    want = refine.choose_transitions(sweep, lambda r: evaluate.start_time_failures(r, hmc, True, ece),
                                     cfg["bundle"]["refine_memorization"])[0]
    assert rf["default_transitions"] == want
    assert "## Refinement" in (out / "README.md").read_text()
    assert bundle.REFINE_GRAPH == rf["graph"]
