//! Hostile bundles and faults beyond `bundle_refusals.rs`: graphs that produce NaN or
//! Inf at run time, graphs that break the I/O contract (dtypes, ranks, batch axes,
//! names), a graph that lies about its output shape, safetensors headers that declare
//! huge shapes or offsets (refused without allocating, measured with a per-thread
//! allocation tracker), limits, ONNX Runtime libraries that are garbage, too old or
//! broken (each in a `postflow` subprocess: a process loads one library), and bundle
//! folders that cannot be read. After every case a good bundle still loads and samples.
//!
//! Fixtures: `tests/fixtures/hostile/`, made by `tests/fixtures/make_hostile.py`.
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::{s, Array2};
use postflow::bundle::Bundle;
use postflow::{ErrorKind, Limits, Model, ModelOptions, PredictOptions, ProbeNoise, SampleOptions, TraceMode};
use serde_json::{json, Value};

// ------------------------------------------------------------------ allocation tracking

/// Records, per thread, the largest single allocation requested since the last reset.
struct Tracking;

thread_local! {
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = PEAK.try_with(|p| {
        if size > p.get() {
            p.set(size)
        }
    });
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Run `f` and return its result with the largest single allocation it made on this thread.
fn peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    PEAK.with(|p| p.set(0));
    let out = f();
    (out, PEAK.with(|p| p.get()))
}

// ------------------------------------------------------------------ helpers

fn hostile(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hostile").join(name)
}

/// A temporary copy of a bundle folder.
struct Copy {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn copy_of(src: &Path) -> Copy {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle");
    std::fs::create_dir(&path).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), path.join(entry.file_name())).unwrap();
    }
    Copy { _dir: dir, path }
}

/// The process is still healthy: a good bundle loads and samples.
fn good_still_works() {
    let good = common::open("affine_cls");
    let s = good.sample(3, &SampleOptions { trace: good.default_hutchinson(), ..SampleOptions::default() }).unwrap();
    assert!(s.theta.iter().all(|v| v.is_finite()));
}

fn check_error(e: &postflow::Error, kind: ErrorKind, fragments: &[&str]) {
    assert_eq!(e.kind(), kind, "kind of: {}", e.message());
    for f in fragments {
        assert!(e.message().contains(f), "message {:?} lacks {f:?}", e.message());
    }
}

fn assert_refused(dir: &Path, kind: ErrorKind, fragments: &[&str]) {
    match Model::open(dir, &ModelOptions::default()) {
        Ok(_) => panic!("{} opened but should have been refused", dir.display()),
        Err(e) => check_error(&e, kind, fragments),
    }
    good_still_works();
}

fn provenance(model: &Model, key: &str) -> f32 {
    model.manifest().provenance["hostile"][key].as_f64().unwrap_or_else(|| panic!("provenance.hostile.{key}")) as f32
}

/// The bracketed index list `bma` prints: `[1, 4]`, or the first ten then `… (N more)`.
fn listed(idx: &[usize]) -> String {
    let shown: Vec<String> = idx.iter().take(10).map(|i| i.to_string()).collect();
    if idx.len() > 10 {
        format!("[{}, … ({} more)]", shown.join(", "), idx.len() - 10)
    } else {
        format!("[{}]", shown.join(", "))
    }
}

/// The sampler's list: `3, 7, 12`, or the first ten then ` and N more`.
fn listed_plain(idx: &[usize]) -> String {
    let shown: Vec<String> = idx.iter().take(10).map(|i| i.to_string()).collect();
    let more = if idx.len() > 10 { format!(" and {} more", idx.len() - 10) } else { String::new() };
    format!("{}{more}", shown.join(", "))
}

// ------------------------------------------------------------------ NaN at run time

/// Which of samples `0..n` fail on their own (one call per sample, `first_index = i`).
fn failing_one_by_one(model: &Model, n: usize, base: &SampleOptions) -> Vec<usize> {
    (0..n)
        .filter(|&i| match model.sample(1, &SampleOptions { first_index: i as u64, ..base.clone() }) {
            Ok(_) => false,
            Err(e) => {
                // The error names the caller's sample index (first_index + i), not the call's.
                check_error(&e, ErrorKind::Numeric, &[&format!("1 sample(s) are NaN or Inf: {i}")]);
                true
            }
        })
        .collect()
}

#[test]
fn a_flow_that_outputs_nan_fails_sampling_naming_the_samples() {
    let bad = Model::open(hostile("nan_flow"), &ModelOptions::default()).unwrap();
    let good = common::open("affine_cls");
    let n = 64;
    let hutch = TraceMode::Hutchinson { probes: 2, noise: ProbeNoise::Gaussian };
    for trace in [TraceMode::None, hutch, TraceMode::Exact] {
        let o = SampleOptions { seed: 5, trace, ..SampleOptions::default() };
        let e = bad.sample(n, &o).expect_err("sampling through a NaN flow must fail");
        // Exactly the samples that fail on their own are named, and not all of them.
        let expect = failing_one_by_one(&bad, n, &o);
        assert!(!expect.is_empty() && expect.len() < n, "{trace:?}: {expect:?}");
        let msg = format!("sampled weights: {} sample(s) are NaN or Inf: {}", expect.len(), listed_plain(&expect));
        check_error(&e, ErrorKind::Numeric, &[&msg]);

        // The other samples are those of the good flow (the poison term adds exactly 0 there).
        let ok: Vec<usize> = (0..n).filter(|i| !expect.contains(i)).collect();
        for &i in ok.iter().take(8) {
            let one = SampleOptions { first_index: i as u64, ..o.clone() };
            let a = bad.sample(1, &one).unwrap();
            let b = good.sample(1, &one).unwrap();
            let diff = a.theta.iter().zip(b.theta.iter()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(diff <= 1e-5, "sample {i}: {diff}");
        }
        // sample_predict refuses too, before averaging anything.
        let x = good.tensors().eval_x.slice(s![..4, ..]).to_owned();
        let e = bad.sample_predict(n, &o, x.view(), &PredictOptions::default()).err().unwrap();
        check_error(&e, ErrorKind::Numeric, &[&msg]);
    }
    // log_prob of the good flow's samples: the backward trajectories of the poisoned
    // samples cross the threshold again.
    let o = SampleOptions { seed: 5, trace: TraceMode::Exact, ..SampleOptions::default() };
    let theta = good.sample(n, &SampleOptions { trace: TraceMode::None, ..o.clone() }).unwrap().theta;
    let e = bad.log_prob(theta.view(), &o).expect_err("log_prob through a NaN flow must fail");
    check_error(&e, ErrorKind::Numeric, &["log-densities", "NaN or Inf"]);
    // The same model still serves the samples that are fine.
    let expect = failing_one_by_one(&bad, 16, &SampleOptions { seed: 5, ..SampleOptions::default() });
    let fine = (0..16).find(|i| !expect.contains(i)).unwrap();
    bad.sample(1, &SampleOptions { seed: 5, first_index: fine as u64, ..SampleOptions::default() }).unwrap();
    good_still_works();
}

#[test]
fn a_net_that_outputs_nan_or_inf_is_never_averaged() {
    let bad = Model::open(hostile("nan_net"), &ModelOptions::default()).unwrap();
    let good = common::open("affine_cls");
    let t = provenance(&bad, "nan_if_theta0_above");
    let x = good.tensors().eval_x.clone();

    // Posterior rows plus two planted markers: +Inf at row 2, -Inf at row 5.
    let mut theta: Array2<f32> = good.tensors().posterior_theta.clone();
    theta[[2, 1]] = 5000.0;
    theta[[5, 1]] = -5000.0;
    let expect: Vec<usize> =
        (0..theta.nrows()).filter(|&i| theta[[i, 0]] > t || theta[[i, 1]].abs() > 1000.0).collect();
    assert!(expect.len() >= 3 && expect.len() < theta.nrows(), "{expect:?}");
    for chunk in [64 << 20, 200] {
        // A tiny chunk budget splits the work into many net calls: still every bad sample is named.
        let options = PredictOptions { max_chunk_bytes: chunk };
        let e = bad.predict(x.view(), theta.view(), None, &options).expect_err("NaN/Inf outputs must fail");
        let msg = format!(
            "network output is NaN or Inf for {} of {} samples, at sample indices {}; they were not averaged",
            expect.len(),
            theta.nrows(),
            listed(&expect)
        );
        check_error(&e, ErrorKind::Numeric, &[&msg]);
        let lw = vec![0f32; theta.nrows()];
        let e = bad.predict(x.view(), theta.view(), Some(&lw), &options).err().unwrap();
        check_error(&e, ErrorKind::Numeric, &[&msg]);
    }
    // Without the bad rows the prediction is the good bundle's.
    let keep: Vec<usize> = (0..theta.nrows()).filter(|i| !expect.contains(i)).collect();
    let clean = theta.select(ndarray::Axis(0), &keep);
    let p = bad.predict(x.view(), clean.view(), None, &PredictOptions::default()).unwrap();
    let q = good.predict(x.view(), clean.view(), None, &PredictOptions::default()).unwrap();
    let diff = (&p.mean() - &q.mean()).iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(diff < 1e-6, "{diff}");

    // sample_predict: the flow is the good one, so the NaN samples are exactly the good
    // flow's draws with theta_0 > T.
    let o = SampleOptions { seed: 11, ..SampleOptions::default() };
    let n = 48;
    let drawn = good.sample(n, &o).unwrap().theta;
    let expect: Vec<usize> = (0..n).filter(|&i| drawn[[i, 0]] > t).collect();
    assert!(!expect.is_empty() && expect.len() < n, "{expect:?}");
    let e = bad.sample_predict(n, &o, x.view(), &PredictOptions::default()).err().unwrap();
    check_error(&e, ErrorKind::Numeric, &[&format!("for {} of {n} samples", expect.len()), &listed(&expect)]);
    good_still_works();
}

#[test]
fn a_net_that_lies_about_its_output_shape_is_a_runtime_error() {
    let bad = Model::open(hostile("lying_net"), &ModelOptions::default()).unwrap();
    let x = bad.tensors().eval_x.slice(s![..3, ..]).to_owned();
    let theta = bad.tensors().posterior_theta.slice(s![..5, ..]).to_owned();
    let e = bad.predict(x.view(), theta.view(), None, &PredictOptions::default()).err().unwrap();
    check_error(&e, ErrorKind::Runtime, &["graph net", "output \"out\" has shape [3, 5, 2], expected [5, 3, 2]"]);
    let e = bad.net_outputs(x.view(), theta.view()).err().unwrap();
    check_error(&e, ErrorKind::Runtime, &["graph net", "has shape"]);
    good_still_works();
}

/// ONNX Runtime writes flow outputs straight into the solver's buffers; a graph whose
/// run-time shape differs from the declared one (even with as many elements) must be an
/// error naming the graph, never a silent reinterpretation of the data.
#[test]
fn a_flow_that_lies_about_its_output_shapes_is_a_runtime_error() {
    let bad = Model::open(hostile("lying_flow"), &ModelOptions::default()).unwrap();
    let d = bad.weight_dim();
    for batch in [1, 5, 32] {
        let o = SampleOptions { batch_size: batch, ..SampleOptions::default() };
        let e = bad.sample(40, &o).err().unwrap();
        check_error(&e, ErrorKind::Runtime, &["graph flow:", &format!("\"v\" [{batch}, {d}]")]);
        let o = SampleOptions { trace: TraceMode::parse("hutchinson", 2).unwrap(), ..o };
        let e = bad.sample(40, &o).err().unwrap();
        check_error(&e, ErrorKind::Runtime, &["graph flow_jvp:", &format!("\"quad\" [{batch}, 2]")]);
    }
    good_still_works();
}

#[test]
fn an_absurd_number_of_samples_is_an_error_not_an_abort() {
    let model = common::open("affine_cls");
    let x = model.tensors().eval_x.clone();
    for n in [usize::MAX, usize::MAX / 17 + 1, 1 << 44] {
        let e = model.sample(n, &SampleOptions::default()).err().unwrap();
        check_error(&e, ErrorKind::InvalidArgument, &[&format!("{n} samples of D = 17 weights do not fit in memory")]);
        let e = model.sample_predict(n, &SampleOptions::default(), x.view(), &PredictOptions::default()).err().unwrap();
        check_error(&e, ErrorKind::InvalidArgument, &["do not fit in memory"]);
    }
    assert_eq!(model.sample(0, &SampleOptions::default()).unwrap().theta.dim(), (0, 17));
    good_still_works();
}

// ------------------------------------------------------------------ graph contract at load

#[test]
fn graphs_with_wrong_dtypes_ranks_names_or_batch_axes_are_refused_at_load() {
    let cases: [(&str, &str, &[&str]); 8] = [
        ("flow_x_f64.onnx", "flow.onnx", &["graph flow", "input \"x\"", "element type Float64, expected float32"]),
        ("flow_t_rank2.onnx", "flow.onnx", &["graph flow", "input \"t\" has rank 2, expected rank 1"]),
        ("flow_static_batch.onnx", "flow.onnx", &["graph flow", "axis 0 is fixed to 4; batch axes must be dynamic"]),
        ("flow_out_renamed.onnx", "flow.onnx", &["graph flow", "no output named \"v\"", "velocity"]),
        ("flow_jvp_no_quad.onnx", "flow_jvp.onnx", &["graph flow_jvp", "has 1 outputs", "the format needs 2"]),
        ("net_out_f64.onnx", "net.onnx", &["graph net", "output \"out\"", "element type Float64"]),
        ("net_out_rank4.onnx", "net.onnx", &["graph net", "output \"out\" has rank 4, expected rank 3"]),
        ("net_theta_int64.onnx", "net.onnx", &["graph net", "input \"theta\"", "element type Int64"]),
    ];
    for (graph, replaces, fragments) in cases {
        let c = copy_of(&common::fixture("affine_cls"));
        std::fs::copy(hostile("graphs").join(graph), c.path.join(replaces)).unwrap();
        assert_refused(&c.path, ErrorKind::Bundle, fragments);
    }
    // An empty file and random bytes where an ONNX graph belongs.
    let c = copy_of(&common::fixture("affine_cls"));
    std::fs::write(c.path.join("net.onnx"), b"").unwrap();
    assert_refused(&c.path, ErrorKind::Runtime, &["graph net", "could not load the ONNX graph"]);
    let c = copy_of(&common::fixture("affine_cls"));
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(c.path.join("flow_jvp.onnx"), noise).unwrap();
    assert_refused(&c.path, ErrorKind::Runtime, &["graph flow_jvp", "could not load the ONNX graph"]);
}

// ------------------------------------------------------------------ safetensors headers

/// A tensors file: 8-byte little-endian header length, the header, then `data` bytes.
fn safetensors_bytes(header: &Value, data: usize) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.resize(out.len() + data, 0);
    out
}

#[test]
fn tensors_headers_declaring_huge_sizes_are_refused_without_allocating() {
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("header length u64::MAX", u64::MAX.to_le_bytes().iter().copied().chain([b'{'; 64]).collect()),
        ("header length 2^40", (1u64 << 40).to_le_bytes().iter().copied().chain([b'{'; 64]).collect()),
        ("header length past the file", 4096u64.to_le_bytes().iter().copied().chain(*b"{}").collect()),
        ("4 bytes", vec![1, 2, 3, 4]),
    ];
    let shaped = [
        (
            "shape product overflows",
            json!({"flow.whiten.mean": {"dtype": "F32", "shape": [u64::MAX / 2, 4], "data_offsets": [0, 68]}}),
        ),
        (
            "terabyte shape",
            json!({"flow.whiten.mean": {"dtype": "F32", "shape": [1u64 << 40, 17], "data_offsets": [0, 68u64 << 40]}}),
        ),
        (
            "offsets past the data",
            json!({"flow.whiten.mean": {"dtype": "F32", "shape": [17], "data_offsets": [0, 1u64 << 62]}}),
        ),
        (
            "offsets that overflow",
            json!({"flow.whiten.mean": {"dtype": "F32", "shape": [17], "data_offsets": [u64::MAX - 3, 64]}}),
        ),
        (
            "shape disagrees with offsets",
            json!({"flow.whiten.mean": {"dtype": "F32", "shape": [1_000_000], "data_offsets": [0, 68]}}),
        ),
        (
            "overlapping tensors",
            json!({
            "flow.whiten.mean": {"dtype": "F32", "shape": [17], "data_offsets": [0, 68]},
            "flow.whiten.scale": {"dtype": "F32", "shape": [17], "data_offsets": [4, 72]}}),
        ),
        ("unknown dtype", json!({"flow.whiten.mean": {"dtype": "F1024", "shape": [17], "data_offsets": [0, 68]}})),
    ];
    for (what, header) in &shaped {
        cases.push((what, safetensors_bytes(header, 68)));
    }
    for (what, bytes) in cases {
        let c = copy_of(&common::fixture("affine_cls"));
        std::fs::write(c.path.join("tensors.safetensors"), &bytes).unwrap();
        let (res, peak) = peak_alloc(|| Bundle::open(&c.path, &Limits::default()));
        let e = res.err().unwrap_or_else(|| panic!("{what}: opened"));
        check_error(&e, ErrorKind::Bundle, &["tensors file: not valid safetensors"]);
        assert!(peak < 1 << 20, "{what}: allocated {peak} bytes at once");
        assert_refused(&c.path, ErrorKind::Bundle, &["not valid safetensors"]);
    }
}

#[test]
fn a_manifest_declaring_fifty_million_weights_is_checked_against_the_file_not_allocated() {
    // A valid layout 47 -> H -> 2 with D = 50H + 2 just under the default limit (H within
    // max_outputs); the tensors file still holds D = 17: refused by shape, with no
    // D-sized allocation.
    let h: usize = 999_999;
    let d = 50 * h + 2;
    let c = copy_of(&common::fixture("affine_cls"));
    let p = c.path.join("postflow.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    m["input"]["dim"] = 47.into();
    m["input"].as_object_mut().unwrap().remove("feature_names");
    m["network"]["dim"] = d.into();
    m["flow"]["dim"] = d.into();
    m["network"]["layers"] = json!([
        {"kind": "dense", "in": 47, "out": h, "activation": "relu",
         "weight": {"offset": 0, "shape": [h, 47]}, "bias": {"offset": 47 * h, "shape": [h]}},
        {"kind": "dense", "in": h, "out": 2, "activation": "identity",
         "weight": {"offset": 48 * h, "shape": [2, h]}, "bias": {"offset": 50 * h, "shape": [2]}},
    ]);
    std::fs::write(&p, serde_json::to_vec(&m).unwrap()).unwrap();
    let (res, peak) = peak_alloc(|| Bundle::open(&c.path, &Limits::default()));
    let e = res.err().unwrap();
    check_error(&e, ErrorKind::Bundle, &["tensor flow.whiten.mean", &format!("expected [{d}]")]);
    assert!(peak < 1 << 20, "allocated {peak} bytes at once");
    // The same on the spheres: one sphere per hidden unit is built only once the tensors
    // file has confirmed D.
    let mut sphere = m.clone();
    sphere["flow"]["geometry"] = "sphere_product".into();
    std::fs::write(&p, serde_json::to_vec(&sphere).unwrap()).unwrap();
    let (res, peak) = peak_alloc(|| Bundle::open(&c.path, &Limits::default()));
    check_error(&res.err().unwrap(), ErrorKind::Bundle, &["tensor flow.whiten.mean", &format!("expected [{d}]")]);
    assert!(peak < 1 << 20, "sphere_product: allocated {peak} bytes at once");

    // One more weight is over the limit, named as such.
    let mut m2 = m.clone();
    m2["network"]["dim"] = (50_000_001usize).into();
    m2["flow"]["dim"] = (50_000_001usize).into();
    std::fs::write(&p, serde_json::to_vec(&m2).unwrap()).unwrap();
    assert_refused(&c.path, ErrorKind::Bundle, &["network.dim", "Limits::max_weight_dim"]);
}

#[test]
fn limits_are_configurable() {
    let dir = common::fixture("affine_cls");
    let cases: [(Limits, &[&str]); 6] = [
        (Limits { max_weight_dim: 16, ..Limits::default() }, &["network.dim", "max_weight_dim"]),
        (Limits { max_input_dim: 1, ..Limits::default() }, &["input.dim", "max_input_dim"]),
        (Limits { max_outputs: 1, ..Limits::default() }, &["task.classes"]),
        (Limits { max_layers: 1, ..Limits::default() }, &["network.layers", "between 1 and 1 layers, has 2"]),
        (Limits { max_manifest_bytes: 100, ..Limits::default() }, &["manifest", "over the limit of 100 bytes"]),
        (Limits { max_graph_bytes: 100, ..Limits::default() }, &["graphs.flow.file", "over the limit of 100 bytes"]),
    ];
    for (limits, fragments) in cases {
        let e = Model::open(&dir, &ModelOptions { limits, ..ModelOptions::default() }).err().unwrap();
        check_error(&e, ErrorKind::Bundle, fragments);
    }
    good_still_works();
}

// ------------------------------------------------------------------ faults: unreadable folders

/// Root ignores permission bits, so the same two refusals are checked through the command line
/// run as `nobody` (`setpriv`), where the bits apply. Skipped, saying so, without setpriv.
fn unreadable_as_an_unprivileged_user(c: &Copy) {
    use std::os::unix::fs::PermissionsExt;
    let as_nobody = |path: &Path| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_postflow"), "info"])
            .arg(path)
            .output()
    };
    let bits = |p: &Path, mode: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    // Readable by everyone first (tempdir is 0700, copies keep the checkout's modes): nobody can open it.
    bits(c._dir.path(), 0o755);
    for entry in std::fs::read_dir(&c.path).unwrap() {
        bits(&entry.unwrap().path(), 0o644);
    }
    let Ok(probe) = as_nobody(&c.path) else {
        eprintln!("setpriv is not available: the permission-denied cases were not checked as root");
        return;
    };
    if !probe.status.success() {
        let err = String::from_utf8_lossy(&probe.stderr);
        eprintln!("postflow cannot run as nobody here ({err}): the permission-denied cases were not checked as root");
        return;
    }
    bits(&c.path, 0o000);
    let out = as_nobody(&c.path).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(c.path.to_str().unwrap()) && err.contains("ermission denied"),
        "{err}"
    );
    bits(&c.path, 0o755);
    let t = c.path.join("tensors.safetensors");
    bits(&t, 0o000);
    let out = as_nobody(&c.path).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("tensors.safetensors") && err.contains("ermission denied"), "{err}");
    bits(&t, 0o644);
    bits(c._dir.path(), 0o700);
}

#[test]
fn an_unreadable_bundle_folder_is_a_clear_io_error() {
    use std::os::unix::fs::PermissionsExt;
    let c = copy_of(&common::fixture("affine_cls"));
    std::fs::set_permissions(&c.path, std::fs::Permissions::from_mode(0o000)).unwrap();
    // Root (or CAP_DAC_OVERRIDE) ignores permission bits: detect that by trying.
    let privileged = std::fs::read_dir(&c.path).is_ok();
    if !privileged {
        let e = Model::open(&c.path, &ModelOptions::default()).err().unwrap();
        check_error(&e, ErrorKind::Io, &[c.path.to_str().unwrap(), "ermission denied"]);
    }
    std::fs::set_permissions(&c.path, std::fs::Permissions::from_mode(0o755)).unwrap();
    if !privileged {
        // A readable folder whose tensors file is not readable.
        let t = c.path.join("tensors.safetensors");
        std::fs::set_permissions(&t, std::fs::Permissions::from_mode(0o000)).unwrap();
        let e = Model::open(&c.path, &ModelOptions::default()).err().unwrap();
        check_error(&e, ErrorKind::Io, &["tensors.safetensors", "ermission denied"]);
        std::fs::set_permissions(&t, std::fs::Permissions::from_mode(0o644)).unwrap();
    } else {
        unreadable_as_an_unprivileged_user(&c);
    }
    // Paths that cannot be read whoever runs the test (the privileged case relies on
    // these): a dangling symlink, a path below a regular file, and a symlink loop.
    let tmp = tempfile::tempdir().unwrap();
    let dangling = tmp.path().join("dangling");
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).unwrap();
    let e = Model::open(&dangling, &ModelOptions::default()).err().unwrap();
    check_error(&e, ErrorKind::Io, &[dangling.to_str().unwrap(), "No such file or directory"]);
    let below_file = c.path.join("postflow.json").join("bundle");
    let e = Model::open(&below_file, &ModelOptions::default()).err().unwrap();
    check_error(&e, ErrorKind::Io, &[below_file.to_str().unwrap(), "Not a directory"]);
    let (a, b) = (tmp.path().join("loop_a"), tmp.path().join("loop_b"));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    let e = Model::open(&a, &ModelOptions::default()).err().unwrap();
    check_error(&e, ErrorKind::Io, &[a.to_str().unwrap()]);
    // A manifest that is a dangling symlink inside the bundle.
    let c2 = copy_of(&common::fixture("affine_cls"));
    std::fs::remove_file(c2.path.join("postflow.json")).unwrap();
    std::os::unix::fs::symlink(c2.path.join("gone.json"), c2.path.join("postflow.json")).unwrap();
    assert_refused(&c2.path, ErrorKind::Bundle, &["manifest", "does not exist"]);
    // A manifest that is a folder.
    std::fs::remove_file(c2.path.join("postflow.json")).unwrap();
    std::fs::create_dir(c2.path.join("postflow.json")).unwrap();
    assert_refused(&c2.path, ErrorKind::Bundle, &["manifest", "not a regular file"]);
    good_still_works();
}

#[test]
fn a_loaded_model_keeps_predicting_after_its_files_are_replaced_by_garbage() {
    let c = copy_of(&common::fixture("affine_reg"));
    let model = Model::open(&c.path, &ModelOptions::default()).unwrap();
    let x = model.tensors().eval_x.clone();
    let o = SampleOptions { trace: TraceMode::Exact, ..SampleOptions::default() };
    let before = model.sample_predict(32, &o, x.view(), &PredictOptions::default()).unwrap();
    let s = model.sample(8, &o).unwrap();
    for entry in std::fs::read_dir(&c.path).unwrap() {
        std::fs::write(entry.unwrap().path(), b"garbage").unwrap();
    }
    let after = model.sample_predict(32, &o, x.view(), &PredictOptions::default()).unwrap();
    assert_eq!(before, after);
    let lp = model.log_prob(s.theta.view(), &o).unwrap();
    assert_eq!(lp.log_density.len(), 8);
    assert_refused(&c.path, ErrorKind::Bundle, &["manifest: not valid JSON"]);
}

// ------------------------------------------------------------------ faults: ONNX Runtime library

/// `postflow sample` on a good bundle with `--onnxruntime lib`, in a fresh process.
fn sample_with_library(lib: &Path) -> std::process::Output {
    let out = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_postflow"))
        .args(["sample", common::fixture("affine_cls").to_str().unwrap(), "-n", "2", "-q", "--onnxruntime"])
        .arg(lib)
        .arg("-o")
        .arg(out.path().join("s.safetensors"))
        .output()
        .expect("run postflow")
}

/// Failed cleanly: exit status 1 (not a signal, not an abort) and an `error:` line
/// naming the library and `fragment`.
fn assert_library_refused(lib: &Path, fragment: &str) {
    let o = sample_with_library(lib);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "status {:?}, stderr: {err}", o.status);
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(line.contains("could not load the ONNX Runtime library"), "{line}");
    assert!(line.contains(lib.to_str().unwrap()), "{line} lacks the path");
    assert!(line.contains(fragment), "{line} lacks {fragment:?}");
}

/// Build a shared library from C source with the system compiler (`None` without one).
fn build_c_library(dir: &Path, name: &str, source: &str) -> Option<PathBuf> {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let lib = dir.join(format!("lib{name}.so"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    match Command::new(&cc).args(["-shared", "-fPIC", "-o"]).arg(&lib).arg(&src).status() {
        Ok(s) if s.success() => Some(lib),
        other => {
            eprintln!("skipping: could not build a C library with {cc}: {other:?}");
            None
        }
    }
}

const FAKE_ORT: &str = r#"
#include <stddef.h>
typedef struct {
    const void *(*GetApi)(unsigned version);
    const char *(*GetVersionString)(void);
} OrtApiBase;
static const void *get_api(unsigned version) { (void)version; return NULL; }
static const char *version_string(void) { return VERSION; }
static const OrtApiBase base = { get_api, version_string };
const OrtApiBase *OrtGetApiBase(void) { return RETURN; }
"#;

#[test]
fn an_onnxruntime_that_is_garbage_too_old_or_broken_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // Not a shared library at all.
    let garbage = dir.path().join("libonnxruntime.so");
    std::fs::write(&garbage, b"\x7fELF but not really, just garbage bytes").unwrap();
    assert_library_refused(&garbage, "failed to load");
    // A folder where the library should be.
    assert_library_refused(dir.path(), "failed to load");
    // A real shared library that is not ONNX Runtime.
    if let Some(lib) = build_c_library(dir.path(), "notort", "int not_onnxruntime(void) { return 1; }\n") {
        assert_library_refused(&lib, "does not export `OrtGetApiBase`");
    }
    // ONNX Runtime 1.10.0: refused with both versions in the message.
    let old = FAKE_ORT.replace("VERSION", "\"1.10.0\"").replace("RETURN", "&base");
    if let Some(lib) = build_c_library(dir.path(), "old", &old) {
        assert_library_refused(&lib, "1.10.0");
        assert_library_refused(&lib, &format!("need version >= 1.{}", ort::MINOR_VERSION));
    }
    // A library whose OrtGetApiBase returns NULL: still an error, never an abort.
    let null = FAKE_ORT.replace("VERSION", "\"1.99.0\"").replace("RETURN", "NULL");
    if let Some(lib) = build_c_library(dir.path(), "nullbase", &null) {
        assert_library_refused(&lib, "panicked");
    }
    // And the real library still works in a fresh process.
    let real = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".ort/libonnxruntime.so");
    if real.exists() {
        let o = sample_with_library(&real);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}
