"""Tests of the ctypes binding, mirroring tests/c/test_postflow.c."""
import copy
import inspect
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import postflow
from postflow_where import INSTALLED, ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "bundles"
REFERENCE = ROOT / "target" / "c-tests" / "reference.txt"
CLS_X = np.array([[0.5, -1.0], [1.5, 0.25], [-0.75, 2.0], [0.0, 0.0]], dtype=np.float32)
REG_X = np.array([[-1.0], [0.2], [1.7]], dtype=np.float32)


@pytest.fixture(scope="module")
def cls():
    with postflow.Model(FIXTURES / "affine_cls") as m:
        yield m


@pytest.fixture(scope="module")
def reg():
    with postflow.Model(FIXTURES / "affine_reg") as m:
        yield m


def reference():
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} not written yet (make -C tests/c reference)")
    out = {}
    for line in REFERENCE.read_text().splitlines():
        name, n, *vals = line.split()
        assert int(n) == len(vals)
        out[name] = np.array([float(v) for v in vals])
    return out


def test_version_and_library():
    assert postflow.version() == "0.8.0"
    lib = Path(postflow.library_path())
    assert lib.name in ("libpostflow.so", "libpostflow.abi3.so")
    if INSTALLED:  # the wheel's own copy, not the checkout's
        assert lib.parent == Path(postflow.__file__).parent and lib.name == "libpostflow.abi3.so"


def test_info(cls, reg, tmp_path):
    assert (cls.task, cls.input_dim, cls.output_dim, cls.weight_dim, cls.uncertainty_dim) == ("classification", 2, 2, 17, 1)
    assert (reg.task, reg.input_dim, reg.output_dim, reg.weight_dim, reg.uncertainty_dim) == ("regression", 1, 1, 13, 1)
    # What sampling does by default: fresh samples without stored draws; the bundle's estimator.
    assert (cls.default_start_time, cls.anchor_count) == (0.0, 0)
    assert cls.hutchinson_trace in ("hutchinson-rademacher", "hutchinson-gaussian") and cls.hutchinson_probes >= 1
    with postflow.Model(FIXTURES / "affine_anchored") as anchored:  # 24 stored draws, default t0 0.5
        assert (anchored.default_start_time, anchored.anchor_count) == (0.5, 24)
    # A bundle whose estimator is Gaussian says so.
    gauss = tmp_path / "gauss"
    shutil.copytree(FIXTURES / "affine_cls", gauss)
    manifest = json.loads((gauss / "postflow.json").read_text())
    manifest["flow"]["hutchinson"] = {"probes": 3, "noise": "gaussian"}
    (gauss / "postflow.json").write_text(json.dumps(manifest))
    with postflow.Model(gauss) as g:
        assert (g.hutchinson_trace, g.hutchinson_probes) == ("hutchinson-gaussian", 3)
        # trace="hutchinson" is the bundle's estimator (as on the command line): Gaussian probes here,
        # so it reproduces "hutchinson-gaussian" and differs from explicit Rademacher probes.
        for method in (lambda **o: g.sample(4, seed=5, start_time=0.0, **o).log_density,
                       lambda **o: g.log_prob(theta, seed=5, **o)[0]):
            theta = g.sample(4, seed=5, start_time=0.0).theta
            own = method(trace="hutchinson", probes=2)
            np.testing.assert_array_equal(own, method(trace="hutchinson-gaussian", probes=2))
            assert not np.allclose(own, method(trace="hutchinson-rademacher", probes=2))
            np.testing.assert_array_equal(method(trace="hutchinson-rademacher", probes=2), method(trace=1, probes=2))


def test_load_errors(tmp_path):
    with pytest.raises(postflow.IoError) as e:
        postflow.Model(tmp_path / "missing")
    assert e.value.status == postflow.ERR_IO and "missing" in e.value.message
    bad = tmp_path / "corrupt"
    shutil.copytree(FIXTURES / "affine_cls", bad)
    (bad / "postflow.json").write_bytes((FIXTURES / "affine_cls" / "postflow.json").read_bytes()[:200])
    with pytest.raises(postflow.BundleError, match="manifest: not valid JSON"):
        postflow.Model(bad)
    with pytest.raises(postflow.InvalidArgumentError, match="options->device is 7"):
        postflow.Model(FIXTURES / "affine_cls", device=7)
    with pytest.raises(postflow.InvalidArgumentError, match="device_id is -1"):
        postflow.Model(FIXTURES / "affine_cls", device="cuda", device_id=-1)
    try:
        postflow.Model(FIXTURES / "affine_cls", device="cuda").close()  # only where CUDA is available
    except postflow.Error as e:
        assert e.status in (postflow.ERR_UNSUPPORTED, postflow.ERR_RUNTIME) and "CUDA" in e.message.upper()


def test_matches_the_rust_api(cls, reg):
    ref = reference()
    s = cls.sample(6, seed=42, trace="hutchinson", probes=4)
    np.testing.assert_allclose(s.theta.ravel(), ref["cls_theta"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s.log_density, ref["cls_logd"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s.stderr, ref["cls_stderr"], rtol=1e-6, atol=1e-6)
    logd, se = cls.log_prob(s.theta, trace="exact")
    np.testing.assert_allclose(logd, ref["cls_logprob_exact"], rtol=1e-6, atol=1e-6)
    assert np.all(se == 0)
    p = cls.predict(CLS_X, s.theta, log_weights=s.log_density)
    for name in ("mean", "total", "aleatoric", "epistemic"):
        np.testing.assert_allclose(getattr(p, name).ravel(), ref[f"cls_predict_{name}"], rtol=1e-6, atol=1e-6)
    assert p.ess == pytest.approx(ref["cls_predict_ess"][0], rel=1e-6)
    p = reg.sample_predict(8, REG_X, seed=5)
    for name in ("mean", "total", "aleatoric", "epistemic"):
        np.testing.assert_allclose(getattr(p, name).ravel(), ref[f"reg_sample_predict_{name}"], rtol=1e-6, atol=1e-6)
    s = reg.sample(4, seed=11, solver="euler", steps=10, trace="hutchinson-gaussian", probes=2)
    np.testing.assert_allclose(s.theta.ravel(), ref["reg_euler_theta"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s.stderr, ref["reg_euler_stderr"], rtol=1e-6, atol=1e-6)


def test_spinning_is_an_option():
    with postflow.Model(FIXTURES / "affine_cls", allow_spinning=True, intra_op_threads=2) as m:
        a = m.sample(3, seed=1)
    with postflow.Model(FIXTURES / "affine_cls", intra_op_threads=2) as m:
        np.testing.assert_array_equal(m.sample(3, seed=1).theta, a.theta)


def test_start_time_matches_the_rust_api():
    ref = reference()
    with postflow.Model(FIXTURES / "affine_anchored") as m:
        s = m.sample(3, seed=21, trace="hutchinson")  # start_time None: the bundle's default, 0.5
        np.testing.assert_allclose(s.theta.ravel(), ref["anchored_default_theta"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(s.log_density, ref["anchored_default_logd"], rtol=1e-6, atol=1e-6)
        stored = m.sample(5, seed=4, start_time=1.0)
        np.testing.assert_allclose(stored.theta.ravel(), ref["anchored_stored_theta"], rtol=1e-6, atol=1e-6)
        explicit = m.sample(3, seed=21, start_time=0.5, trace="hutchinson")
        np.testing.assert_array_equal(explicit.theta, s.theta)
        logd, _ = m.log_prob(s.theta, seed=21, trace="hutchinson", start_time=0.5)  # the same probes
        np.testing.assert_allclose(logd, s.log_density, atol=1e-3)
        with pytest.raises(postflow.InvalidArgumentError, match="no density"):
            m.sample(2, start_time=1.0, trace="exact")
        with pytest.raises(postflow.InvalidArgumentError, match="options->start_time is 1.5"):
            m.sample(2, start_time=1.5)


def test_refinement_matches_the_rust_api(cls):
    ref = reference()
    assert cls.default_refine_transitions == 0 and cls.default_refine_start_time == 0.0
    with postflow.Model(FIXTURES / "affine_refine") as m:  # HMC on a Gaussian posterior graph, 3 by default
        assert m.default_refine_transitions == 3
        assert m.default_refine_start_time == m.default_start_time == 0.5  # no refine.start_time
        s = m.sample(4, seed=8)  # refine_transitions None: the bundle's default
        np.testing.assert_allclose(s.theta.ravel(), ref["refine_default_theta"], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(m.sample(4, seed=8, refine_transitions=3).theta, s.theta)
        unrefined = m.sample(4, seed=8, refine_transitions=0)
        assert not np.array_equal(unrefined.theta, s.theta)
        # Asking for log-densities takes the flow's own draws.
        np.testing.assert_array_equal(m.sample(4, seed=8, trace="exact").theta, unrefined.theta)
        with pytest.raises(postflow.InvalidArgumentError, match="no density"):
            m.sample(2, refine_transitions=2, trace="exact")
        with pytest.raises(postflow.InvalidArgumentError, match="options->refine_transitions is 10001"):
            m.sample(2, refine_transitions=10_001)
        with pytest.raises(postflow.InvalidArgumentError, match="refine_transitions"):
            m.sample(2, refine_transitions=-1)
    with pytest.raises(postflow.InvalidArgumentError, match="needs a bundle with refinement"):
        cls.sample(2, refine_transitions=1)


def test_refine_kernel_and_leapfrog():
    """refine_kernel="multinomial" moves every stored draw in one transition (the endpoint
    kernel keeps a rejected one's start); refine_leapfrog changes the draws (None, 0 and the
    bundle's 5 agree); a 0.7 caller's layout gets the defaults; bad values are refused."""
    with postflow.Model(FIXTURES / "affine_refine") as m:
        kw = dict(seed=8, start_time=1.0, refine_transitions=1)
        n = 16  # of the fixture's 24 stored draws
        stored = m.sample(n, seed=8, start_time=1.0, refine_transitions=0).theta
        endpoint = m.sample(n, **kw).theta
        np.testing.assert_array_equal(m.sample(n, refine_kernel="endpoint", **kw).theta, endpoint)
        np.testing.assert_array_equal(m.sample(n, refine_kernel="bundle", **kw).theta, endpoint)
        multinomial = m.sample(n, refine_kernel="multinomial", **kw).theta
        np.testing.assert_array_equal(m.sample(n, refine_kernel=postflow.REFINE_KERNELS["multinomial"], **kw).theta,
                                      multinomial)
        assert not np.array_equal(multinomial, endpoint)
        assert not np.any(np.all(multinomial == stored, axis=1)), "a multinomial row kept its stored draw"
        # With 9 leapfrog steps Metropolis rejects one of these endpoints; multinomial still moves all.
        kept = [int(np.all(m.sample(n, refine_kernel=k, refine_leapfrog=9, **kw).theta == stored, axis=1).sum())
                for k in ("endpoint", "multinomial")]
        assert kept[0] > 0 and kept[1] == 0, kept
        for kernel in postflow.REFINE_KERNELS:
            default = m.sample(n, refine_kernel=kernel, **kw).theta
            for same in (None, 0, 5):  # 5: the bundle's refine.leapfrog_steps
                np.testing.assert_array_equal(m.sample(n, refine_kernel=kernel, refine_leapfrog=same, **kw).theta,
                                              default)
            assert not np.array_equal(m.sample(n, refine_kernel=kernel, refine_leapfrog=9, **kw).theta, default)
        # 0.7's struct (88 bytes) ends before both fields: the endpoint kernel, the bundle's steps.
        old = m.sample(n, refine_kernel="multinomial", refine_leapfrog=9, struct_size=88, **kw).theta
        np.testing.assert_array_equal(old, endpoint)
        x = np.array([[0.5, -1.0], [1.5, 0.25]], dtype=np.float32)
        p = m.sample_predict(n, x, refine_kernel="multinomial", refine_leapfrog=9, **kw)
        want = m.predict(x, m.sample(n, refine_kernel="multinomial", refine_leapfrog=9, **kw))
        np.testing.assert_allclose(p.mean, want.mean, rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="unknown refine_kernel 'nuts'"):
            m.sample(2, refine_kernel="nuts", **kw)
        with pytest.raises(postflow.InvalidArgumentError, match="options->refine_kernel is 3"):
            m.sample(2, refine_kernel=3, **kw)
        with pytest.raises(postflow.InvalidArgumentError, match="refine_leapfrog 1001"):
            m.sample(2, refine_leapfrog=1001, **kw)
        with pytest.raises(postflow.InvalidArgumentError, match="refine_leapfrog"):
            m.sample(2, refine_leapfrog=-1, **kw)


def test_refined_draws_start_at_the_bundles_refinement_start_time(tmp_path):
    """A format-4 copy with refine.start_time 1: refined draws start at the stored draws,
    unrefined ones and draws with a density at the flow's default start time (0.5)."""
    v4 = tmp_path / "affine_refine_v4"
    shutil.copytree(FIXTURES / "affine_refine", v4)
    manifest = json.loads((v4 / "postflow.json").read_text())
    manifest["format_version"] = 4
    manifest["refine"]["start_time"] = 1.0
    (v4 / "postflow.json").write_text(json.dumps(manifest))
    with postflow.Model(v4) as m:
        assert (m.default_start_time, m.default_refine_start_time) == (0.5, 1.0)
        refined = m.sample(4, seed=8).theta
        np.testing.assert_array_equal(refined, m.sample(4, seed=8, start_time=1.0).theta)
        assert not np.array_equal(refined, m.sample(4, seed=8, start_time=0.5).theta)
        unrefined = m.sample(4, seed=8, refine_transitions=0).theta
        np.testing.assert_array_equal(unrefined, m.sample(4, seed=8, refine_transitions=0, start_time=0.5).theta)
        np.testing.assert_array_equal(m.sample(4, seed=8, trace="exact").theta, unrefined)


def test_sample_properties(cls):
    a = cls.sample(5, seed=3)
    assert a.log_density is None and a.theta.shape == (5, 17) and a.theta.dtype == np.float32
    b = cls.sample(5, seed=3, batch_size=1, struct_size=48)  # an older caller's layout; batch_size ignored
    np.testing.assert_array_equal(a.theta, b.theta)
    c = cls.sample(2, seed=3, trace="hutchinson", probes=1)
    assert np.all(c.stderr == 0)
    d = cls.sample(2, seed=3, solver="dopri5", rtol=1e-6, atol=1e-6, trace="exact")
    assert np.all(np.isfinite(d.log_density))


def test_first_index_continues_one_run(cls):
    """Sample i of a call with first_index k is sample k + i of the seed: chunks split on a
    batch boundary reproduce one call bitwise, log_prob uses the matching probes, a 0.6
    caller's layout gets 0, and a range past uint64 is refused."""
    kw = dict(seed=4, trace="hutchinson", probes=2, batch_size=4)
    whole = cls.sample(12, **kw)
    head, tail = cls.sample(8, **kw), cls.sample(4, first_index=8, **kw)
    np.testing.assert_array_equal(np.concatenate([head.theta, tail.theta]), whole.theta)
    np.testing.assert_array_equal(np.concatenate([head.log_density, tail.log_density]), whole.log_density)
    logd, _ = cls.log_prob(tail.theta, first_index=8, **kw)
    np.testing.assert_allclose(logd, tail.log_density, atol=1e-3)
    old = cls.sample(12, first_index=8, struct_size=80, **kw)  # 0.6's struct ends before first_index
    np.testing.assert_array_equal(old.theta, whole.theta)
    with pytest.raises(postflow.InvalidArgumentError, match="first_index"):
        cls.sample(4, first_index=2**64 - 2, **kw)
    with pytest.raises(postflow.InvalidArgumentError, match="first_index"):
        cls.sample(4, first_index=-1, **kw)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0), "n_samples is 0"),
        (dict(solver=99), "options->solver is 99, not a pf_solver"),
        (dict(trace=99), "options->trace is 99, not a pf_trace"),
        (dict(steps=2_000_000), "steps 2000000 exceeds the limit"),
        (dict(trace="hutchinson", probes=100_000), "probes must be in [1, 4096], got 100000"),
        (dict(rtol=float("nan")), "options->rtol is NaN"),
        (dict(struct_size=0), "options->struct_size is 0"),
        (dict(struct_size=4096), "larger than this library's pf_sample_options"),
        (dict(struct_size=40), "smaller than the oldest pf_sample_options layout (48 bytes)"),
    ],
)
def test_sample_errors(cls, kwargs, message):
    n = kwargs.pop("n", 2)
    with pytest.raises(postflow.InvalidArgumentError) as e:
        cls.sample(n, **kwargs)
    assert e.value.status == postflow.ERR_INVALID_ARGUMENT
    assert message in e.value.message, e.value.message
    assert e.value.message.startswith("pf_sample: ")


def test_log_prob_and_predict_errors(cls):
    theta = cls.sample(3, seed=1).theta
    with pytest.raises(postflow.InvalidArgumentError, match="PF_TRACE_NONE"):
        cls.log_prob(theta, trace="none")
    with pytest.raises(postflow.InvalidArgumentError, match="theta_len is 16, but n_samples x weight_dim = 1 x 17"):
        cls.log_prob(theta.ravel()[:16].reshape(1, 16))
    bad = theta.copy()
    bad[0, 0] = np.nan
    with pytest.raises(postflow.NumericError, match="NaN or Inf"):
        cls.log_prob(bad)
    with pytest.raises(postflow.InvalidArgumentError, match="x_len is 12, but n_inputs x input_dim = 4 x 2 needs exactly 8"):
        cls.predict(np.zeros((4, 3), np.float32), theta)
    with pytest.raises(postflow.InvalidArgumentError, match="n_inputs is 0"):
        cls.predict(np.zeros((0, 2), np.float32), theta)
    with pytest.raises(postflow.InvalidArgumentError, match="log-weights are NaN"):
        cls.predict(CLS_X, theta, log_weights=np.array([0, np.nan, 0], np.float32))
    with pytest.raises(postflow.InvalidArgumentError, match="log_weights has 2 entries"):
        cls.predict(CLS_X, theta, log_weights=np.zeros(2, np.float32))


def test_prediction_shapes_and_uniform_ess(cls, reg):
    theta = cls.sample(6, seed=2).theta
    p = cls.predict(CLS_X, theta)
    assert p.mean.shape == (4, 2) and p.total.shape == (4, 1) and p.ess == pytest.approx(6.0)
    np.testing.assert_allclose(p.mean.sum(axis=1), 1.0, rtol=1e-5)
    q = reg.sample_predict(8, REG_X, seed=5)
    np.testing.assert_allclose(q.total, q.aleatoric + q.epistemic, rtol=1e-5)
    r = reg.predict(REG_X, reg.sample(8, seed=5).theta)
    np.testing.assert_array_equal(q.mean, r.mean)


def test_context_manager_closes():
    with postflow.Model(FIXTURES / "affine_reg") as m:
        m.sample(1)
    with pytest.raises(postflow.InvalidArgumentError, match="closed"):
        m.sample(1)
    m.close()  # idempotent


def test_threads_share_one_model(cls):
    expected = {i: cls.sample(16, seed=100 + i, trace="hutchinson", probes=2) for i in range(8)}
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                s = cls.sample(16, seed=100 + i, trace="hutchinson", probes=2)
                p = cls.predict(CLS_X, s.theta, log_weights=s.log_density)
                results.setdefault(i, []).append((s, p))
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    for i in range(8):
        want = cls.predict(CLS_X, expected[i].theta, log_weights=expected[i].log_density)
        for s, p in results[i]:
            np.testing.assert_array_equal(s.theta, expected[i].theta)
            np.testing.assert_array_equal(s.log_density, expected[i].log_density)
            np.testing.assert_array_equal(p.mean, want.mean)


def test_repr_and_name(cls, reg):
    assert repr(cls) == "postflow.Model('affine_cls', task='classification', D=17, input_dim=2, output_dim=2)"
    assert cls.name == "affine_cls" and reg.name == "affine_reg"
    m = postflow.Model(FIXTURES / "affine_reg")
    m.close()
    assert repr(m).endswith("output_dim=1, closed)")


def test_results_are_numpy_friendly(cls):
    s = cls.sample(4, seed=9, trace="hutchinson")
    assert len(s) == 4 and np.asarray(s) is s.theta
    assert np.asarray(s, dtype=np.float64).dtype == np.float64
    assert np.array(s, copy=True) is not s.theta
    with pytest.raises(ValueError, match="needs a copy"):
        np.asarray(s, dtype=np.float64, copy=False)
    assert s.log_density.dtype == np.float32 and s.log_density.shape == (4,)
    p = cls.predict(CLS_X.astype(np.float64).tolist(), s)  # lists and Samples are accepted
    np.testing.assert_array_equal(np.asarray(p), cls.predict(CLS_X, s.theta).mean)
    assert len(p) == 4 and isinstance(p.ess, float)
    with pytest.raises(AttributeError):
        s.theta = s.theta  # results are frozen


def test_errors_share_one_base():
    for name in postflow.__all__:
        obj = getattr(postflow, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, postflow.Error), name
    e = postflow.Error(postflow.ERR_BUNDLE, "x")
    assert e.status is postflow.Status.ERR_BUNDLE and e.status == 3 and str(e) == "PF_ERR_BUNDLE: x"
    assert postflow.Error(99, "y").status_name == "PF_UNKNOWN_STATUS"
    assert postflow.LibraryError("z").status == postflow.ERR_IO and isinstance(postflow.LibraryError("z"), OSError)
    with pytest.raises(postflow.InvalidArgumentError, match="unknown solver 'rk5'"):
        postflow.Model._options(solver="rk5")


def test_a_missing_library_is_a_postflow_error(tmp_path):
    code = "import postflow\ntry:\n    postflow.version()\nexcept postflow.LibraryError as e:\n    print(e.status, e.message)\n"
    env = dict(os.environ, POSTFLOW_LIB=str(tmp_path / "nowhere.so"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("2 cannot load libpostflow") and "nowhere.so: not found" in out, out


def test_public_names_have_docstrings():
    missing = []
    for name in postflow.__all__:
        obj = getattr(postflow, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            if not (obj.__doc__ or "").strip():
                missing.append(name)
            if inspect.isclass(obj) and not issubclass(obj, BaseException):
                for attr, member in vars(obj).items():
                    if attr.startswith("_") or not (inspect.isfunction(member) or isinstance(member, property)):
                        continue
                    if not (member.__doc__ or "").strip():
                        missing.append(f"{name}.{attr}")
    assert not missing, missing
    assert (Path(postflow.__file__).parent / "py.typed").is_file()


def test_onnxruntime_comes_from_the_wheel_unless_set(monkeypatch):
    wheel = postflow._find_onnxruntime_wheel()
    try:
        import onnxruntime  # noqa: F401  (only to compare locations)
    except ImportError:
        assert wheel is None
        return
    assert wheel is not None and Path(wheel).parent == Path(onnxruntime.__file__).parent / "capi"
    assert Path(wheel).name.startswith("libonnxruntime.so.1.31")
    monkeypatch.delenv("POSTFLOW_ORT_LIB", raising=False)
    monkeypatch.delenv("ORT_DYLIB_PATH", raising=False)
    assert postflow.onnxruntime_library() == wheel
    for var in ("POSTFLOW_ORT_LIB", "ORT_DYLIB_PATH"):
        monkeypatch.setenv(var, "/elsewhere/libonnxruntime.so")
        assert postflow.onnxruntime_library() is None  # the runtime's own search order applies
        monkeypatch.delenv(var)


def test_sphere_product_log_prob_projects_on_request():
    # sphere_tanh: the first 18 weights are layer 0's three units (5 weights + bias each), one sphere per unit.
    with postflow.Model(FIXTURES / "sphere_tanh") as m:
        s = m.sample(3, seed=4, trace="exact")
        units = [list(range(5 * u, 5 * u + 5)) + [15 + u] for u in range(3)]
        for u in units:
            assert np.allclose(np.linalg.norm(s.theta[:, u].astype(np.float64), axis=1), 1.0, atol=1e-5)
        off = s.theta.copy()
        off[1, :18] *= 1.25
        with pytest.raises(postflow.InvalidArgumentError, match="theta row 1 is off the slice"):
            m.log_prob(off)
        logd, _ = m.log_prob(off, project_to_slice=True)
        assert np.allclose(logd, s.log_density, atol=1e-3)


class _BlockingLib:
    """The real library, with pf_sample held until released and pf_model_free counted
    (and passed on once only, so that a double free is counted instead of crashing)."""

    def __init__(self, real, hold_free=0.0):
        self.real, self.hold_free = real, hold_free
        self.entered, self.release = threading.Event(), threading.Event()
        self.events = []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def pf_sample(self, *args):
        self.entered.set()
        self.release.wait(10)
        self.events.append("sample returned")
        return postflow.OK

    def pf_model_free(self, handle):
        self.events.append("free")
        if self.hold_free:
            threading.Event().wait(self.hold_free)  # widens the window a second close() would race into
        if self.events.count("free") == 1:
            self.real.pf_model_free(handle)


def test_close_waits_for_a_call_in_progress(monkeypatch):
    m = postflow.Model(FIXTURES / "affine_cls")
    lib = _BlockingLib(postflow._lib())
    monkeypatch.setattr(postflow, "_LIB", lib)
    worker = threading.Thread(target=m.sample, args=(2,))
    worker.start()
    assert lib.entered.wait(10)
    closer = threading.Thread(target=m.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive(), "close() returned while a call was still running in C"
    with pytest.raises(postflow.InvalidArgumentError, match="closed"):
        m.sample(2)  # refused once closing has begun
    with pytest.raises(postflow.InvalidArgumentError, match="closed"):
        m.handle
    lib.release.set()
    worker.join(10)
    closer.join(10)
    assert lib.events == ["sample returned", "free"]
    assert repr(m).endswith("closed)")


def test_concurrent_closes_free_once(monkeypatch):
    m = postflow.Model(FIXTURES / "affine_cls")
    lib = _BlockingLib(postflow._lib(), hold_free=0.2)
    monkeypatch.setattr(postflow, "_LIB", lib)
    barrier = threading.Barrier(3)

    def close():
        barrier.wait()
        m.close()

    threads = [threading.Thread(target=close) for _ in range(3)]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    assert lib.events == ["free"]
    m.close()
    assert lib.events == ["free"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seed=2**64), "seed is 18446744073709551616, outside the uint64_t range"),
        (dict(seed=-1), "seed is -1, outside the uint64_t range"),
        (dict(steps=2**32 + 5), "steps is 4294967301, outside the uint32_t range"),
        (dict(steps=-1), "steps is -1"),
        (dict(trace="hutchinson", probes=2**32 + 1), "probes is 4294967297"),
        (dict(max_steps=2**32), "max_steps is 4294967296"),
        (dict(batch_size=-1), "batch_size is -1"),
        (dict(trace=-1), "trace is -1"),
        (dict(solver=2**32), "solver is 4294967296"),
        (dict(struct_size=-8), "struct_size is -8"),
        (dict(seed=5.0), "seed must be an integer, got float 5.0"),
        (dict(steps=True), "steps must be an integer, got True"),
        (dict(seed="1"), "seed must be an integer"),
        (dict(rtol="1e-3"), "rtol must be a real number"),
        (dict(start_time=True), "start_time must be a real number"),
        (dict(project_to_slice=-1), "project_to_slice is -1"),
    ],
)
def test_sample_options_out_of_range_are_refused_not_wrapped(cls, kwargs, message):
    with pytest.raises(postflow.InvalidArgumentError, match="^PF_ERR_INVALID_ARGUMENT: ") as e:
        cls.sample(2, **kwargs)
    assert message in e.value.message, e.value.message


def test_sample_counts_are_checked(cls):
    for n, message in [(-1, "n is -1, outside the uint64_t range"), (2**64, "n is 18446744073709551616"),
                       (3.0, "n must be an integer, got float 3.0"), (True, "n must be an integer, got True"),
                       (np.float64(2), "n must be an integer"), (2**62, "n x weight_dim = 4611686018427387904 x 17 is too large")]:
        with pytest.raises(postflow.InvalidArgumentError) as e:
            cls.sample(n)
        assert message in e.value.message, (n, e.value.message)
        if n != 2**62:  # sample_predict allocates nothing per sample: the library would start drawing
            with pytest.raises(postflow.InvalidArgumentError) as e:
                cls.sample_predict(n, CLS_X)
            assert message in e.value.message, (n, e.value.message)
    assert cls.sample(np.int64(3), seed=np.uint64(7)).theta.shape == (3, 17)  # numpy integers are integers
    np.testing.assert_array_equal(cls.sample(2, seed=2**64 - 1).theta, cls.sample(2, seed=np.uint64(2**64 - 1)).theta)
    # bools stay bools where the option is one
    np.testing.assert_array_equal(cls.log_prob(cls.sample(2, seed=1).theta, project_to_slice=True)[0],
                                  cls.log_prob(cls.sample(2, seed=1).theta, project_to_slice=np.True_)[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(device_id=2**31), "device_id is 2147483648, outside the int32_t range [-2147483648, 2147483647]"),
        (dict(device_id=1.0), "device_id must be an integer"),
        (dict(intra_op_threads=-1), "intra_op_threads is -1, outside the uint32_t range"),
        (dict(max_sessions=2**32 + 1), "max_sessions is 4294967297"),
        (dict(device=-1), "device is -1"),
    ],
)
def test_model_options_out_of_range_are_refused_not_wrapped(kwargs, message):
    with pytest.raises(postflow.InvalidArgumentError) as e:
        postflow.Model(FIXTURES / "affine_cls", **kwargs)
    assert message in e.value.message, e.value.message


def test_nul_bytes_in_paths_are_refused(cls):
    # ctypes would pass the path cut at the NUL: "affine_cls\0junk" would load affine_cls.
    with pytest.raises(postflow.InvalidArgumentError, match="bundle_dir contains a NUL byte"):
        postflow.Model(str(FIXTURES / "affine_cls") + "\0junk")
    with pytest.raises(postflow.InvalidArgumentError, match="onnxruntime_path contains a NUL byte"):
        postflow.Model(FIXTURES / "affine_cls", onnxruntime_path=os.environ.get("POSTFLOW_ORT_LIB", "/x") + "\0junk")
    with pytest.raises(postflow.InvalidArgumentError, match="bundle_dir must be a path"):
        postflow.Model(42)


def _unaligned(a):
    buf = np.zeros(a.nbytes + 1, np.uint8)
    out = np.frombuffer(buf.data, dtype=a.dtype, offset=1, count=a.size).reshape(a.shape)
    out[...] = a
    return out


def test_inputs_of_any_layout_are_converted(cls):
    theta = cls.sample(5, seed=8, trace="exact").theta
    want = cls.predict(CLS_X, theta)
    want_lp = cls.log_prob(theta)[0]
    ux, ut = _unaligned(CLS_X), _unaligned(theta)
    assert not ux.flags.aligned and ux.flags.c_contiguous and not ut.flags.aligned
    wide = np.zeros((4, 4), np.float32)
    wide[:, ::2] = CLS_X
    readonly = CLS_X.copy()
    readonly.flags.writeable = False
    for x in [ux, np.asfortranarray(CLS_X), wide[:, ::2], CLS_X[::-1][::-1], CLS_X[::-1].copy()[::-1],
              CLS_X.astype(np.float64), CLS_X.astype(">f4"), readonly, CLS_X.tolist()]:
        np.testing.assert_array_equal(cls.predict(x, theta).mean, want.mean)
    np.testing.assert_array_equal(cls.predict(np.rint(CLS_X).astype(np.int64), theta).mean,
                                  cls.predict(np.rint(CLS_X), theta).mean)
    np.testing.assert_array_equal(cls.log_prob(ut)[0], want_lp)
    np.testing.assert_array_equal(cls.predict(CLS_X, ut, log_weights=_unaligned(np.zeros(5, np.float32))).mean,
                                  want.mean)
    for bad, shape in [(np.float32(1.0), "()"), (CLS_X[0], "(2,)"), (CLS_X[None], "(1, 4, 2)")]:
        with pytest.raises(postflow.InvalidArgumentError, match=f"x must have 2 dimensions, got shape {re.escape(shape)}"):
            cls.predict(bad, theta)
    with pytest.raises(postflow.InvalidArgumentError, match="x is not convertible to a float32 array"):
        cls.predict([[1.0, 2.0], [3.0]], theta)


def test_errors_pickle_and_copy():
    errors = [postflow.Error(postflow.ERR_BUNDLE, "b"), postflow.InvalidArgumentError(postflow.ERR_INVALID_ARGUMENT, "x"),
              postflow.NumericError(postflow.ERR_NUMERIC, "nan"), postflow.Error(99, "newer"),
              postflow.LibraryError("cannot load")]
    errors[0].add_note("a note")
    for e in errors:
        for clone in (pickle.loads(pickle.dumps(e)), copy.deepcopy(e), copy.copy(e)):
            assert type(clone) is type(e)
            assert (clone.status, clone.status_name, clone.message, str(clone)) == (e.status, e.status_name, e.message, str(e))
            assert getattr(clone, "__notes__", None) == getattr(e, "__notes__", None)
    assert pickle.loads(pickle.dumps(errors[0])).status is postflow.Status.ERR_BUNDLE


def test_batch_size_and_project_to_slice_are_documented():
    readme = (Path(postflow.__file__).parent.parent / "README.md")
    for doc in [postflow.Model.sample.__doc__, postflow.Model.log_prob.__doc__]:
        assert "batch_size" in doc and "project_to_slice" in doc, doc
    if readme.is_file():  # a checkout; an installed wheel has no README next to the package
        text = readme.read_text()
        assert "batch_size=" in text and "project_to_slice=" in text


def test_a_model_cannot_be_copied(cls):
    # A copy would share the C handle: closing one would free it under the other (a segfault).
    for clone in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(postflow.UnsupportedError, match="cannot be copied or pickled"):
            clone(cls)
    assert cls.sample(1).theta.shape == (1, 17)
