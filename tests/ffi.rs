//! The C ABI (src/ffi) called from Rust: results equal the Rust API's for the
//! same seed. The ignored test `write_c_reference` writes the Rust API's numbers
//! for tests/c (run by tests/c/Makefile with `POSTFLOW_C_REFERENCE=FILE`).
mod common;

use std::ffi::{CStr, CString};
use std::fmt::Write as _;
use std::ptr::{null, null_mut};

use ndarray::{Array2, ArrayView2};
use postflow::ffi::*;
use postflow::{PredictOptions, ProbeNoise, SampleOptions, SolverKind, TraceMode};

/// Inputs shared with tests/c/test_postflow.c (`CLS_X`, `REG_X`).
const CLS_X: [f32; 8] = [0.5, -1.0, 1.5, 0.25, -0.75, 2.0, 0.0, 0.0];
const REG_X: [f32; 3] = [-1.0, 0.2, 1.7];

fn rust_opts(seed: u64, solver: Option<SolverKind>, steps: Option<u32>, trace: TraceMode) -> SampleOptions {
    SampleOptions { seed, solver, steps, trace, ..SampleOptions::default() }
}

fn push(out: &mut String, name: &str, values: impl IntoIterator<Item = f64>) {
    let v: Vec<f64> = values.into_iter().collect();
    write!(out, "{name} {}", v.len()).unwrap();
    for x in v {
        write!(out, " {x:.9e}").unwrap();
    }
    out.push('\n');
}

fn push_prediction(out: &mut String, prefix: &str, p: &postflow::Prediction) {
    let (t, a, e) = p.decomposition();
    push(out, &format!("{prefix}_mean"), p.mean().iter().copied());
    push(out, &format!("{prefix}_total"), t.iter().copied());
    push(out, &format!("{prefix}_aleatoric"), a.iter().copied());
    push(out, &format!("{prefix}_epistemic"), e.iter().copied());
    push(out, &format!("{prefix}_ess"), [p.ess()]);
}

/// The reference numbers, from the Rust API, in the cases tests/c/test_postflow.c runs.
fn reference() -> String {
    let mut out = String::new();
    let f32s = |v: &[f32]| v.iter().map(|x| f64::from(*x)).collect::<Vec<_>>();
    // Case 1: affine_cls, seed 42, 6 samples, Hutchinson (Rademacher) with 4 probes.
    let cls = common::open("affine_cls");
    let hutch4 = TraceMode::Hutchinson { probes: 4, noise: ProbeNoise::Rademacher };
    let s = cls.sample(6, &rust_opts(42, None, None, hutch4)).unwrap();
    push(&mut out, "cls_theta", f32s(s.theta.as_slice().unwrap()));
    push(&mut out, "cls_logd", f32s(s.log_density.as_ref().unwrap()));
    push(&mut out, "cls_stderr", f32s(s.log_density_stderr.as_ref().unwrap()));
    // Case 2: exact log_prob of those weights.
    let lp = cls.log_prob(s.theta.view(), &rust_opts(0, None, None, TraceMode::Exact)).unwrap();
    push(&mut out, "cls_logprob_exact", f32s(&lp.log_density));
    // Case 3: predict at CLS_X with the case-1 log-densities as log-weights.
    let x = ArrayView2::from_shape((4, 2), &CLS_X[..]).unwrap();
    let p = cls.predict(x, s.theta.view(), Some(s.log_density.as_ref().unwrap()), &PredictOptions::default()).unwrap();
    push_prediction(&mut out, "cls_predict", &p);
    // Case 4: affine_reg, sample_predict, seed 5, 8 samples.
    let reg = common::open("affine_reg");
    let xr = ArrayView2::from_shape((3, 1), &REG_X[..]).unwrap();
    let p = reg.sample_predict(8, &rust_opts(5, None, None, TraceMode::None), xr, &PredictOptions::default()).unwrap();
    push_prediction(&mut out, "reg_sample_predict", &p);
    // Case 5: affine_reg, Euler 10 steps, Gaussian Hutchinson with 2 probes, seed 11, 4 samples.
    let hg2 = TraceMode::Hutchinson { probes: 2, noise: ProbeNoise::Gaussian };
    let s = reg.sample(4, &rust_opts(11, Some(SolverKind::Euler), Some(10), hg2)).unwrap();
    push(&mut out, "reg_euler_theta", f32s(s.theta.as_slice().unwrap()));
    push(&mut out, "reg_euler_logd", f32s(s.log_density.as_ref().unwrap()));
    push(&mut out, "reg_euler_stderr", f32s(s.log_density_stderr.as_ref().unwrap()));
    // Case 6: affine_hetero, dopri5 (rtol = atol = 1e-6), exact trace, seed 9, 3 samples.
    let het = common::open("affine_hetero");
    let o = SampleOptions {
        rtol: Some(1e-6),
        atol: Some(1e-6),
        ..rust_opts(9, Some(SolverKind::Dopri5), None, TraceMode::Exact)
    };
    let s = het.sample(3, &o).unwrap();
    push(&mut out, "het_dopri5_theta", f32s(s.theta.as_slice().unwrap()));
    push(&mut out, "het_dopri5_logd", f32s(s.log_density.as_ref().unwrap()));
    // Case 7: affine_anchored at the bundle's default start time (0.5), seed 21, 3 samples,
    // Hutchinson with the bundle's probe count; and its stored draws (start time 1), seed 4, 5 samples.
    let anc = common::open("affine_anchored");
    let s = anc.sample(3, &rust_opts(21, None, None, anc.default_hutchinson())).unwrap();
    push(&mut out, "anchored_default_theta", f32s(s.theta.as_slice().unwrap()));
    push(&mut out, "anchored_default_logd", f32s(s.log_density.as_ref().unwrap()));
    let s =
        anc.sample(5, &SampleOptions { start_time: Some(1.0), ..rust_opts(4, None, None, TraceMode::None) }).unwrap();
    push(&mut out, "anchored_stored_theta", f32s(s.theta.as_slice().unwrap()));
    // Case 8: affine_refine refined by its default transitions (3), seed 8, 4 samples.
    let refine = common::open("affine_refine");
    let s = refine.sample(4, &rust_opts(8, None, None, TraceMode::None)).unwrap();
    push(&mut out, "refine_default_theta", f32s(s.theta.as_slice().unwrap()));
    out
}

#[test]
#[ignore = "writes the reference file for tests/c; run by tests/c/Makefile"]
fn write_c_reference() {
    let path = std::env::var("POSTFLOW_C_REFERENCE").expect("set POSTFLOW_C_REFERENCE to the output file");
    std::fs::write(&path, reference()).unwrap();
}

fn load(name: &str) -> *mut pf_model {
    load_path(&common::fixture(name))
}

fn load_path(path: &std::path::Path) -> *mut pf_model {
    let dir = CString::new(path.to_str().unwrap()).unwrap();
    let mut m = null_mut();
    // SAFETY: valid C string, NULL options, valid out pointer.
    let st = unsafe { pf_model_load(dir.as_ptr(), null(), &mut m) };
    assert_eq!(st, pf_status::PF_OK, "{}", last_error());
    m
}

fn last_error() -> String {
    // SAFETY: pf_last_error_message never returns NULL and the string lives until the next failure.
    unsafe { CStr::from_ptr(pf_last_error_message()) }.to_string_lossy().into_owned()
}

#[test]
fn c_abi_sample_log_prob_and_predict_equal_the_rust_api() {
    let model = load("affine_cls");
    let rust = common::open("affine_cls");
    let d = rust.weight_dim();
    let mut o = sample_options();
    o.seed = 42;
    o.trace = pf_trace::PF_TRACE_HUTCHINSON as u32;
    o.probes = 4;
    let n = 6;
    let (mut theta, mut logd, mut se) = (vec![0f32; n * d], vec![0f32; n], vec![0f32; n]);
    // SAFETY: buffers of the stated lengths.
    let st =
        unsafe { pf_sample(model, &o, n, theta.as_mut_ptr(), theta.len(), logd.as_mut_ptr(), n, se.as_mut_ptr(), n) };
    assert_eq!(st, pf_status::PF_OK, "{}", last_error());
    let hutch4 = TraceMode::Hutchinson { probes: 4, noise: ProbeNoise::Rademacher };
    let r = rust.sample(n, &rust_opts(42, None, None, hutch4)).unwrap();
    assert_eq!(theta, r.theta.as_slice().unwrap());
    assert_eq!(&logd, r.log_density.as_ref().unwrap());
    assert_eq!(&se, r.log_density_stderr.as_ref().unwrap());

    o.trace = pf_trace::PF_TRACE_EXACT as u32;
    let mut lp = vec![0f32; n];
    // SAFETY: as above.
    let st = unsafe { pf_log_prob(model, &o, theta.as_ptr(), n, theta.len(), lp.as_mut_ptr(), n, null_mut(), 0) };
    assert_eq!(st, pf_status::PF_OK, "{}", last_error());
    let view = Array2::from_shape_vec((n, d), theta.clone()).unwrap();
    let rl = rust.log_prob(view.view(), &rust_opts(42, None, None, TraceMode::Exact)).unwrap();
    assert_eq!(lp, rl.log_density);

    let (mut mean, mut total, mut ale, mut epi) = (vec![0f32; 8], vec![0f32; 4], vec![0f32; 4], vec![0f32; 4]);
    let mut pred = pf_prediction {
        struct_size: std::mem::size_of::<pf_prediction>() as u32,
        mean: mean.as_mut_ptr(),
        mean_len: 8,
        total: total.as_mut_ptr(),
        total_len: 4,
        aleatoric: ale.as_mut_ptr(),
        aleatoric_len: 4,
        epistemic: epi.as_mut_ptr(),
        epistemic_len: 4,
        ess: 0.0,
    };
    // SAFETY: as above.
    let st =
        unsafe { pf_predict(model, CLS_X.as_ptr(), 4, 8, theta.as_ptr(), n, theta.len(), logd.as_ptr(), &mut pred) };
    assert_eq!(st, pf_status::PF_OK, "{}", last_error());
    let x = ArrayView2::from_shape((4, 2), &CLS_X[..]).unwrap();
    let rp = rust.predict(x, view.view(), Some(&logd), &PredictOptions::default()).unwrap();
    let as_f32 = |a: Array2<f64>| a.iter().map(|v| *v as f32).collect::<Vec<_>>();
    let (t, a, e) = rp.decomposition();
    assert_eq!(mean, as_f32(rp.mean()));
    assert_eq!(total, as_f32(t));
    assert_eq!(ale, as_f32(a));
    assert_eq!(epi, as_f32(e));
    assert_eq!(pred.ess, rp.ess());
    // SAFETY: frees the handle once.
    unsafe { pf_model_free(model) };
}

/// Defaults for this library's whole `pf_sample_options`, through the layout-safe init.
fn sample_options() -> pf_sample_options {
    let mut o = std::mem::MaybeUninit::<pf_sample_options>::uninit();
    let size = std::mem::size_of::<pf_sample_options>() as u32;
    // SAFETY: `o` has `size` writable bytes; init writes all of them.
    let st = unsafe { pf_sample_options_init(o.as_mut_ptr(), size) };
    assert_eq!(st, pf_status::PF_OK, "{}", last_error());
    // SAFETY: initialised by the call above.
    unsafe { o.assume_init() }
}

/// The bytes of a `T` filled with 0xAB and then passed to an exported `*_default` symbol.
fn bytes_after_default<T>(call: unsafe extern "C" fn(*mut T)) -> Vec<u8> {
    let size = std::mem::size_of::<T>();
    let mut v = std::mem::MaybeUninit::<T>::uninit();
    // SAFETY: every byte is written before it is read; `call` writes at most `size` bytes.
    unsafe {
        std::ptr::write_bytes(v.as_mut_ptr().cast::<u8>(), 0xAB, size);
        call(v.as_mut_ptr());
        std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), size).to_vec()
    }
}

#[test]
fn exported_default_symbols_write_only_the_first_published_layout() {
    for (bytes, first) in
        [(bytes_after_default(pf_sample_options_default), 48), (bytes_after_default(pf_model_options_default), 24)]
    {
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), first, "struct_size of the first layout");
        assert!(bytes[first as usize..].iter().all(|b| *b == 0xAB), "bytes past the first layout stay untouched");
    }
}

#[test]
fn c_abi_start_time_default_explicit_and_refused() {
    let model = load("affine_anchored");
    let rust = common::open("affine_anchored");
    let d = rust.weight_dim();
    let n = 3;
    let mut theta = vec![0f32; n * d];
    let run = |o: &pf_sample_options, theta: &mut Vec<f32>| -> pf_status {
        // SAFETY: buffers of the stated lengths; options valid.
        unsafe { pf_sample(model, o, n, theta.as_mut_ptr(), theta.len(), null_mut(), 0, null_mut(), 0) }
    };
    let mut o = sample_options();
    assert_eq!(o.start_time, PF_START_TIME_BUNDLE);
    o.seed = 3;
    assert_eq!(run(&o, &mut theta), pf_status::PF_OK, "{}", last_error());
    let want = rust.sample(n, &rust_opts(3, None, None, TraceMode::None)).unwrap();
    assert_eq!(theta, want.theta.as_slice().unwrap(), "PF_START_TIME_BUNDLE is the bundle's default");
    // A caller whose struct stops before start_time gets the bundle's default too.
    // SAFETY: pf_sample_options is plain old data (integers and floats).
    let mut short = unsafe { std::ptr::read(&o) };
    short.struct_size = std::mem::offset_of!(pf_sample_options, start_time) as u32;
    short.start_time = 0.9; // beyond struct_size: never read
    assert_eq!(run(&short, &mut theta), pf_status::PF_OK, "{}", last_error());
    assert_eq!(theta, want.theta.as_slice().unwrap());
    o.start_time = 0.8;
    assert_eq!(run(&o, &mut theta), pf_status::PF_OK, "{}", last_error());
    let want =
        rust.sample(n, &SampleOptions { start_time: Some(0.8), ..rust_opts(3, None, None, TraceMode::None) }).unwrap();
    assert_eq!(theta, want.theta.as_slice().unwrap());
    for bad in [1.5, -0.5, f64::NAN] {
        o.start_time = bad;
        assert_eq!(run(&o, &mut theta), pf_status::PF_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("options->start_time"), "{}", last_error());
    }
    o.start_time = 1.0;
    o.trace = pf_trace::PF_TRACE_EXACT as u32;
    let mut logd = vec![0f32; n];
    // SAFETY: as above.
    let st = unsafe { pf_sample(model, &o, n, theta.as_mut_ptr(), theta.len(), logd.as_mut_ptr(), n, null_mut(), 0) };
    assert_eq!(st, pf_status::PF_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("no density"), "{}", last_error());
    // SAFETY: frees once.
    unsafe { pf_model_free(model) };
}

/// `pf_log_prob` on a sphere_product bundle: off-slice rows are refused unless
/// `project_to_slice` is 1; a caller whose struct ends before the field gets 0.
#[test]
fn c_abi_project_to_slice() {
    let model = load("sphere_tanh");
    let rust = common::open("sphere_tanh");
    let d = rust.weight_dim();
    let n = 2;
    let s = rust.sample(n, &rust_opts(6, None, None, TraceMode::None)).unwrap();
    let mut theta = s.theta.as_slice().unwrap().to_vec();
    for (i, v) in theta[..d].iter_mut().enumerate() {
        if rust.geometry().on_sphere(i) {
            *v *= 1.5; // every unit of row 0 off its sphere; the last layer unchanged
        }
    }
    let mut lp = vec![0f32; n];
    let run = |o: &pf_sample_options, lp: &mut Vec<f32>| -> pf_status {
        // SAFETY: buffers of the stated lengths; options valid.
        unsafe { pf_log_prob(model, o, theta.as_ptr(), n, theta.len(), lp.as_mut_ptr(), n, null_mut(), 0) }
    };
    let mut o = sample_options();
    assert_eq!(o.project_to_slice, 0);
    o.trace = pf_trace::PF_TRACE_EXACT as u32;
    assert_eq!(run(&o, &mut lp), pf_status::PF_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("pf_log_prob: theta row 0 is off the slice"), "{}", last_error());
    // A caller whose struct stops before project_to_slice: the field is never read.
    // SAFETY: pf_sample_options is plain old data.
    let mut short = unsafe { std::ptr::read(&o) };
    short.struct_size = std::mem::offset_of!(pf_sample_options, project_to_slice) as u32;
    short.project_to_slice = 1;
    assert_eq!(run(&short, &mut lp), pf_status::PF_ERR_INVALID_ARGUMENT);
    o.project_to_slice = 1;
    assert_eq!(run(&o, &mut lp), pf_status::PF_OK, "{}", last_error());
    let want = rust.log_prob(s.theta.view(), &rust_opts(0, None, None, TraceMode::Exact)).unwrap();
    for (a, b) in lp.iter().zip(&want.log_density) {
        assert!((a - b).abs() < 1e-4, "projected {a} vs on the slice {b}");
    }
    o.project_to_slice = 2;
    assert_eq!(run(&o, &mut lp), pf_status::PF_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("options->project_to_slice is 2"), "{}", last_error());
    // SAFETY: frees once.
    unsafe { pf_model_free(model) };
}

#[test]
fn c_abi_errors_set_status_and_message() {
    let model = load("affine_reg");
    let mut theta = vec![0f32; 13];
    // SAFETY: NULL options (defaults) and a 13-float buffer, too small for 2 samples.
    let st = unsafe { pf_sample(model, null(), 2, theta.as_mut_ptr(), 13, null_mut(), 0, null_mut(), 0) };
    assert_eq!(st, pf_status::PF_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("theta_out_len is 13, too small"), "{}", last_error());
    assert!(last_error().contains("needs 26"), "{}", last_error());
    // SAFETY: NULL model is checked.
    let st = unsafe { pf_sample(null(), null(), 1, theta.as_mut_ptr(), 13, null_mut(), 0, null_mut(), 0) };
    assert_eq!(st, pf_status::PF_ERR_INVALID_ARGUMENT);
    assert_eq!(last_error(), "pf_sample: model is NULL");
    // SAFETY: frees once.
    unsafe { pf_model_free(model) };
}

/// Requests that used to abort the host (absurd session counts) or slip through with
/// PF_OK (non-finite weights in pf_predict, results beyond f32) get a status instead.
#[test]
fn c_abi_refuses_requests_that_would_abort_or_overflow() {
    let dir = CString::new(common::fixture("affine_reg").to_str().unwrap()).unwrap();
    for (field, expect) in
        [("max_sessions", "max_sessions is 4294967295, at most 1024"), ("threads", "intra_op_threads")]
    {
        let mut mo = std::mem::MaybeUninit::<pf_model_options>::uninit();
        // SAFETY: `mo` has sizeof bytes; init writes all of them.
        let st = unsafe { pf_model_options_init(mo.as_mut_ptr(), std::mem::size_of::<pf_model_options>() as u32) };
        assert_eq!(st, pf_status::PF_OK);
        // SAFETY: initialised above.
        let mut mo = unsafe { mo.assume_init() };
        if field == "max_sessions" {
            mo.max_sessions = u32::MAX;
        } else {
            mo.intra_op_threads = u32::MAX;
        }
        let mut m = null_mut();
        // SAFETY: valid string, options and out pointer.
        let st = unsafe { pf_model_load(dir.as_ptr(), &mo, &mut m) };
        assert_eq!(st, pf_status::PF_ERR_INVALID_ARGUMENT, "{field}");
        assert!(m.is_null() && last_error().contains(expect), "{}", last_error());
    }

    let model = load("affine_reg"); // D = 13, one output; weight 12 is the output bias
    let x = [0.5f32];
    let (mut mean, mut total, mut ale, mut epi) = (vec![7f32; 1], vec![7f32; 1], vec![7f32; 1], vec![7f32; 1]);
    let mut pred = pf_prediction {
        struct_size: std::mem::size_of::<pf_prediction>() as u32,
        mean: mean.as_mut_ptr(),
        mean_len: 1,
        total: total.as_mut_ptr(),
        total_len: 1,
        aleatoric: ale.as_mut_ptr(),
        aleatoric_len: 1,
        epistemic: epi.as_mut_ptr(),
        epistemic_len: 1,
        ess: 0.0,
    };
    let mut theta = [0f32; 26];
    theta[5] = f32::INFINITY;
    // SAFETY: buffers of the stated lengths.
    let st = unsafe { pf_predict(model, x.as_ptr(), 1, 1, theta.as_ptr(), 2, 26, null(), &mut pred) };
    assert_eq!(st, pf_status::PF_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("weight sample 0 has a NaN or Inf weight"), "{}", last_error());
    // Two nets whose outputs are ±1e20: the epistemic variance 1e40 exceeds f32.
    theta[5] = 0.0;
    theta[12] = 1e20;
    theta[25] = -1e20;
    // SAFETY: as above.
    let st = unsafe { pf_predict(model, x.as_ptr(), 1, 1, theta.as_ptr(), 2, 26, null(), &mut pred) };
    assert_eq!(st, pf_status::PF_ERR_NUMERIC, "{}", last_error());
    assert!(last_error().contains("does not fit in a float"), "{}", last_error());
    assert!([&mean, &total, &ale, &epi].iter().all(|b| b[0] == 7.0), "outputs were written on failure");
    // 1e19: variance 1e38 fits, and is written.
    theta[12] = 1e19;
    theta[25] = -1e19;
    // SAFETY: as above.
    let st = unsafe { pf_predict(model, x.as_ptr(), 1, 1, theta.as_ptr(), 2, 26, null(), &mut pred) };
    assert_eq!(st, pf_status::PF_OK, "{}", last_error());
    assert!(epi[0].is_finite() && epi[0] > 1e37, "{}", epi[0]);

    // pf_sample_predict checks the probe count it then does not use, as pf_sample would.
    let mut o = sample_options();
    o.trace = pf_trace::PF_TRACE_HUTCHINSON as u32;
    o.probes = 100_000;
    // SAFETY: as above.
    let st = unsafe { pf_sample_predict(model, &o, 4, x.as_ptr(), 1, 1, &mut pred) };
    assert_eq!(st, pf_status::PF_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("probes must be in [1, 4096]"), "{}", last_error());

    // The largest legal probe count with an unbounded batch size: the batch is made to fit
    // in memory, and the samples are those of one-sample batches.
    let n = 6;
    let run = |batch: u32| {
        let mut o = sample_options();
        o.trace = pf_trace::PF_TRACE_HUTCHINSON as u32;
        o.probes = 4096;
        o.solver = pf_solver::PF_SOLVER_EULER as u32;
        o.steps = 1;
        o.batch_size = batch;
        let (mut th, mut lq) = (vec![0f32; n * 13], vec![0f32; n]);
        // SAFETY: buffers of the stated lengths.
        let st = unsafe { pf_sample(model, &o, n, th.as_mut_ptr(), th.len(), lq.as_mut_ptr(), n, null_mut(), 0) };
        assert_eq!(st, pf_status::PF_OK, "{}", last_error());
        (th, lq)
    };
    assert_eq!(run(u32::MAX), run(1));
    // SAFETY: frees once.
    unsafe { pf_model_free(model) };
}

/// `refine_transitions` (0.5): `PF_REFINE_BUNDLE` is the bundle's default, a caller whose
/// struct stops before the field gets it too, explicit counts equal the Rust API's, and
/// out-of-range values are refused; `pf_model_info` reports the default.
#[test]
fn c_abi_refine_transitions_default_explicit_and_refused() {
    let model = load("affine_refine");
    let rust = common::open("affine_refine");
    let d = rust.weight_dim();
    let n = 4;
    let mut theta = vec![0f32; n * d];
    let run = |o: &pf_sample_options, theta: &mut Vec<f32>| -> pf_status {
        // SAFETY: buffers of the stated lengths; options valid.
        unsafe { pf_sample(model, o, n, theta.as_mut_ptr(), theta.len(), null_mut(), 0, null_mut(), 0) }
    };
    let mut o = sample_options();
    assert_eq!(o.refine_transitions, PF_REFINE_BUNDLE);
    o.seed = 8;
    assert_eq!(run(&o, &mut theta), pf_status::PF_OK, "{}", last_error());
    let want = rust.sample(n, &rust_opts(8, None, None, TraceMode::None)).unwrap();
    assert_eq!(want.refine.unwrap().transitions, 3);
    assert_eq!(theta, want.theta.as_slice().unwrap(), "PF_REFINE_BUNDLE is the bundle's default");
    // SAFETY: pf_sample_options is plain old data (integers and floats).
    let mut short = unsafe { std::ptr::read(&o) };
    short.struct_size = std::mem::offset_of!(pf_sample_options, refine_transitions) as u32;
    short.refine_transitions = 0; // beyond struct_size: never read
    assert_eq!(run(&short, &mut theta), pf_status::PF_OK, "{}", last_error());
    assert_eq!(theta, want.theta.as_slice().unwrap());
    o.refine_transitions = 7;
    assert_eq!(run(&o, &mut theta), pf_status::PF_OK, "{}", last_error());
    let want = rust
        .sample(n, &SampleOptions { refine_transitions: Some(7), ..rust_opts(8, None, None, TraceMode::None) })
        .unwrap();
    assert_eq!(theta, want.theta.as_slice().unwrap());
    for bad in [-2i64, 10_001, i64::MAX] {
        o.refine_transitions = bad;
        assert_eq!(run(&o, &mut theta), pf_status::PF_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("options->refine_transitions"), "{}", last_error());
    }
    let mut info: pf_model_info = unsafe { std::mem::zeroed() };
    info.struct_size = std::mem::size_of::<pf_model_info>() as u32;
    // SAFETY: a live handle and a full-size struct.
    assert_eq!(unsafe { pf_model_get_info(model, &mut info) }, pf_status::PF_OK);
    assert_eq!(info.default_refine_transitions, 3);
    // No refine.start_time in the fixture: refined draws start at flow.default_start_time.
    assert_eq!(info.default_refine_start_time, 0.5);
    // A 0.5 caller's struct (72 bytes) gets every field but the 0.6 one.
    let mut old: pf_model_info = unsafe { std::mem::zeroed() };
    old.struct_size = std::mem::offset_of!(pf_model_info, default_refine_start_time) as u32;
    old.default_refine_start_time = -7.0;
    // SAFETY: a live handle; the struct is larger than the struct_size it declares.
    assert_eq!(unsafe { pf_model_get_info(model, &mut old) }, pf_status::PF_OK);
    assert_eq!((old.default_refine_transitions, old.default_refine_start_time), (3, -7.0));
    // SAFETY: frees once.
    unsafe { pf_model_free(model) };
}

/// `default_refine_start_time` (0.6) reports the bundle's `refine.start_time`, and
/// `PF_START_TIME_BUNDLE` with the default refinement starts there (the stored draws), as
/// `start_time = 1` does; unrefined draws keep `default_start_time`.
#[test]
fn c_abi_refined_draws_start_at_the_refinement_start_time() {
    let (_dir, path) = common::refine_from_stored_draws();
    let model = load_path(&path);
    let mut info: pf_model_info = unsafe { std::mem::zeroed() };
    info.struct_size = std::mem::size_of::<pf_model_info>() as u32;
    // SAFETY: a live handle and a full-size struct.
    assert_eq!(unsafe { pf_model_get_info(model, &mut info) }, pf_status::PF_OK);
    assert_eq!((info.default_start_time, info.default_refine_start_time), (0.5, 1.0));
    let (n, d) = (5, 17);
    // seed 3 with the given start time and refinement count (PF_START_TIME_BUNDLE / PF_REFINE_BUNDLE: defaults)
    let draw = |start_time: f64, refine_transitions: i64| -> Vec<f32> {
        let mut o = sample_options();
        o.seed = 3;
        o.start_time = start_time;
        o.refine_transitions = refine_transitions;
        let mut theta = vec![0f32; n * d];
        // SAFETY: buffers of the stated lengths; options valid.
        let st = unsafe { pf_sample(model, &o, n, theta.as_mut_ptr(), theta.len(), null_mut(), 0, null_mut(), 0) };
        assert_eq!(st, pf_status::PF_OK, "{}", last_error());
        theta
    };
    let refined = draw(PF_START_TIME_BUNDLE, PF_REFINE_BUNDLE);
    assert_eq!(refined, draw(1.0, PF_REFINE_BUNDLE), "refined draws start at refine.start_time");
    assert_eq!(refined, draw(1.0, 3), "the bundle's default: 3 transitions");
    assert_ne!(refined, draw(0.5, PF_REFINE_BUNDLE));
    assert_eq!(draw(PF_START_TIME_BUNDLE, 0), draw(0.5, 0), "unrefined draws keep default_start_time");
    // SAFETY: frees once.
    unsafe { pf_model_free(model) };
}

/// `first_index` (0.7): calls over consecutive index ranges split on a batch boundary give
/// bitwise what one call over their union gives (the flow's draws with their Hutchinson
/// estimates, the stored draws' seeded order, refined draws), `pf_log_prob` uses the probes of
/// the matching samples, a caller whose struct stops before the field gets 0, and a range past
/// u64 is refused.
#[test]
fn c_abi_first_index_continues_the_same_draws() {
    type Draw = (Vec<f32>, Vec<f32>);
    let draw = |model: *mut pf_model, o: &pf_sample_options, n: usize, d: usize, density: bool| -> Draw {
        let mut theta = vec![0f32; n * d];
        let mut logd = vec![0f32; if density { n } else { 0 }];
        let logd_ptr = if density { logd.as_mut_ptr() } else { null_mut() };
        // SAFETY: buffers of the stated lengths; options valid.
        let st =
            unsafe { pf_sample(model, o, n, theta.as_mut_ptr(), theta.len(), logd_ptr, logd.len(), null_mut(), 0) };
        assert_eq!(st, pf_status::PF_OK, "{}", last_error());
        (theta, logd)
    };
    let cases = [
        ("affine_cls", PF_START_TIME_BUNDLE, pf_trace::PF_TRACE_HUTCHINSON as u32, PF_REFINE_BUNDLE),
        ("affine_anchored", 1.0, pf_trace::PF_TRACE_NONE as u32, PF_REFINE_BUNDLE), // the stored draws, cycled
        ("affine_refine", PF_START_TIME_BUNDLE, pf_trace::PF_TRACE_NONE as u32, 2),
    ];
    for (name, start_time, trace, refine) in cases {
        let model = load(name);
        let d = common::open(name).weight_dim();
        let density = trace != pf_trace::PF_TRACE_NONE as u32;
        let mut o = sample_options();
        assert_eq!(o.first_index, 0);
        (o.seed, o.start_time, o.trace, o.refine_transitions, o.batch_size) = (13, start_time, trace, refine, 8);
        let whole = draw(model, &o, 30, d, density); // past the 24 stored draws of affine_anchored
        let head = draw(model, &o, 16, d, density);
        o.first_index = 16;
        let tail = draw(model, &o, 14, d, density);
        assert_eq!([head.0, tail.0].concat(), whole.0, "{name}: theta");
        assert_eq!([head.1, tail.1].concat(), whole.1, "{name}: log-densities");
        assert_ne!(whole.0[..d], whole.0[16 * d..17 * d], "{name}: another sample at index 16");
        // A 0.6 caller's struct stops before first_index: it is 0 whatever the bytes there hold.
        // SAFETY: pf_sample_options is plain old data (integers and floats).
        let mut short = unsafe { std::ptr::read(&o) };
        short.struct_size = std::mem::offset_of!(pf_sample_options, first_index) as u32;
        assert_eq!(draw(model, &short, 30, d, density), whole, "{name}: an older caller");
        if density {
            // pf_log_prob of samples 16.. with first_index 16 uses their probes: their own estimates
            let mut logd = vec![0f32; 14];
            let rows = &whole.0[16 * d..];
            // SAFETY: buffers of the stated lengths; options valid.
            let st =
                unsafe { pf_log_prob(model, &o, rows.as_ptr(), 14, rows.len(), logd.as_mut_ptr(), 14, null_mut(), 0) };
            assert_eq!(st, pf_status::PF_OK, "{}", last_error());
            for (got, want) in logd.iter().zip(&whole.1[16..]) {
                assert!((got - want).abs() < 1e-3, "{name}: log_prob {got} against the sample's {want}");
            }
        }
        o.first_index = u64::MAX - 3;
        let mut theta = vec![0f32; 4 * d];
        // SAFETY: buffers of the stated lengths; options valid.
        let st = unsafe { pf_sample(model, &o, 4, theta.as_mut_ptr(), theta.len(), null_mut(), 0, null_mut(), 0) };
        assert_eq!(st, pf_status::PF_ERR_INVALID_ARGUMENT, "{name}");
        assert!(last_error().contains("first_index"), "{}", last_error());
        // SAFETY: frees once.
        unsafe { pf_model_free(model) };
    }
}

/// `refine_kernel` and `refine_leapfrog` (0.8): the defaults are the bundle's kernel (the
/// endpoint kernel) and its `refine.leapfrog_steps`; `PF_REFINE_KERNEL_MULTINOMIAL` and an explicit leapfrog
/// count equal the Rust API's `RefineKernel::Multinomial` and `refine_leapfrog`; a 0.7
/// caller's struct (88 bytes) gets the defaults whatever the bytes past it hold; an unknown
/// kernel and a leapfrog count past 1000 are refused.
#[test]
fn c_abi_refine_kernel_and_leapfrog_equal_the_rust_api() {
    use postflow::refine::RefineKernel;
    let model = load("affine_refine");
    let rust = common::open("affine_refine");
    let d = rust.weight_dim();
    let n = 8;
    let run = |o: &pf_sample_options| -> (pf_status, Vec<f32>) {
        let mut theta = vec![0f32; n * d];
        // SAFETY: buffers of the stated lengths; options valid.
        let st = unsafe { pf_sample(model, o, n, theta.as_mut_ptr(), theta.len(), null_mut(), 0, null_mut(), 0) };
        (st, theta)
    };
    let ok = |o: &pf_sample_options| -> Vec<f32> {
        let (st, theta) = run(o);
        assert_eq!(st, pf_status::PF_OK, "{}", last_error());
        theta
    };
    // One transition from the stored draws (start time 1), seed 8.
    let base = SampleOptions {
        start_time: Some(1.0),
        refine_transitions: Some(1),
        ..rust_opts(8, None, None, TraceMode::None)
    };
    let rust_draw = |kernel: RefineKernel, leapfrog: Option<u32>| {
        let s =
            rust.sample(n, &SampleOptions { refine_kernel: Some(kernel), refine_leapfrog: leapfrog, ..base.clone() });
        let s = s.unwrap();
        (s.theta.as_slice().unwrap().to_vec(), s.refine.unwrap())
    };
    let mut o = sample_options();
    assert_eq!((o.refine_kernel, o.refine_leapfrog), (pf_refine_kernel::PF_REFINE_KERNEL_BUNDLE as u32, 0));
    (o.seed, o.start_time, o.refine_transitions) = (8, 1.0, 1);
    let (endpoint, stats) = rust_draw(RefineKernel::Endpoint, None);
    assert_eq!(stats.leapfrog, 5, "the bundle's refine.leapfrog_steps");
    assert_eq!(ok(&o), endpoint, "the defaults: the bundle's kernel (endpoint) and leapfrog steps");
    let default = rust.sample(n, &base).unwrap();
    assert_eq!(default.theta.as_slice().unwrap(), endpoint, "Rust: None is the bundle's kernel, endpoint");
    o.refine_kernel = pf_refine_kernel::PF_REFINE_KERNEL_ENDPOINT as u32;
    assert_eq!(ok(&o), endpoint, "PF_REFINE_KERNEL_ENDPOINT");

    o.refine_kernel = pf_refine_kernel::PF_REFINE_KERNEL_MULTINOMIAL as u32;
    let (multinomial, stats) = rust_draw(RefineKernel::Multinomial, None);
    assert_eq!((stats.samples, stats.leapfrog), (n as u64, 7), "2^3 - 1 >= 5 leapfrog steps");
    assert_eq!(ok(&o), multinomial, "PF_REFINE_KERNEL_MULTINOMIAL");
    assert_ne!(multinomial, endpoint);

    for (c_kernel, kernel, steps) in [
        (pf_refine_kernel::PF_REFINE_KERNEL_ENDPOINT, RefineKernel::Endpoint, 9),
        (pf_refine_kernel::PF_REFINE_KERNEL_MULTINOMIAL, RefineKernel::Multinomial, 15),
    ] {
        (o.refine_kernel, o.refine_leapfrog) = (c_kernel as u32, 9);
        let (want, stats) = rust_draw(kernel, Some(9));
        assert_eq!(stats.leapfrog, steps, "{kernel:?}");
        assert_eq!(ok(&o), want, "{kernel:?} with refine_leapfrog 9");
        assert_ne!(want, rust_draw(kernel, None).0, "{kernel:?}: 9 leapfrog steps change the draws");
    }

    // A 0.7 caller's struct stops before both fields: the defaults, whatever the bytes there hold.
    // SAFETY: pf_sample_options is plain old data (integers and floats).
    let mut short = unsafe { std::ptr::read(&o) };
    short.struct_size = std::mem::offset_of!(pf_sample_options, refine_kernel) as u32;
    assert_eq!(short.struct_size, 88);
    (short.refine_kernel, short.refine_leapfrog) = (7, 5000); // beyond struct_size: never read
    assert_eq!(ok(&short), endpoint, "an older caller");

    (o.refine_kernel, o.refine_leapfrog) = (3, 0);
    assert_eq!(run(&o).0, pf_status::PF_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("options->refine_kernel"), "{}", last_error());
    (o.refine_kernel, o.refine_leapfrog) = (pf_refine_kernel::PF_REFINE_KERNEL_ENDPOINT as u32, 1001);
    assert_eq!(run(&o).0, pf_status::PF_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("refine_leapfrog 1001"), "{}", last_error());
    o.refine_leapfrog = 1000;
    ok(&o);
    // SAFETY: frees once.
    unsafe { pf_model_free(model) };
}
