//! Criterion benches of the runtime's entry points on one bundle:
//! `POSTFLOW_BENCH_BUNDLE` (default: models/digits if present, else the affine fixture).
//!
//! Run: `cargo bench --bench runtime` (add `-- sample/` etc. to filter).
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use postflow::{Model, ModelOptions, PredictOptions, ProbeNoise, SampleOptions, SolverKind, TraceMode};

const SAMPLES: usize = 64;

fn bundle() -> PathBuf {
    if let Some(p) = std::env::var_os("POSTFLOW_BENCH_BUNDLE") {
        return p.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let digits = root.join("models/digits");
    if digits.join("postflow.json").exists() {
        digits
    } else {
        root.join("tests/fixtures/bundles/affine_cls")
    }
}

fn model() -> Model {
    let path = bundle();
    eprintln!("bench bundle: {}", path.display());
    Model::open(&path, &ModelOptions { intra_op_threads: 1, ..ModelOptions::default() }).expect("open bench bundle")
}

fn hutchinson(probes: u32) -> TraceMode {
    TraceMode::Hutchinson { probes, noise: ProbeNoise::Rademacher }
}

fn sample(c: &mut Criterion) {
    let model = model();
    let mut g = c.benchmark_group("sample");
    g.throughput(Throughput::Elements(SAMPLES as u64));
    for solver in [SolverKind::Euler, SolverKind::Heun, SolverKind::Rk4, SolverKind::Dopri5] {
        let o = SampleOptions { solver: Some(solver), ..SampleOptions::default() };
        g.bench_function(BenchmarkId::new("trace_none", solver.name()), |b| {
            b.iter(|| model.sample(SAMPLES, &o).unwrap())
        });
    }
    for (name, trace) in [("hutchinson_k1", hutchinson(1)), ("hutchinson_k4", hutchinson(4))] {
        let o = SampleOptions { trace, ..SampleOptions::default() };
        g.bench_function(BenchmarkId::new(name, "rk4"), |b| b.iter(|| model.sample(SAMPLES, &o).unwrap()));
    }
    // The exact trace costs D tangents per evaluation: a few samples only.
    let exact_n = if model.weight_dim() > 500 { 2 } else { SAMPLES };
    g.throughput(Throughput::Elements(exact_n as u64));
    let o = SampleOptions { trace: TraceMode::Exact, ..SampleOptions::default() };
    g.bench_function(BenchmarkId::new("exact", "rk4"), |b| b.iter(|| model.sample(exact_n, &o).unwrap()));
    g.finish();
}

fn log_prob(c: &mut Criterion) {
    let model = model();
    let o = SampleOptions { trace: hutchinson(1), ..SampleOptions::default() };
    let theta = model.sample(SAMPLES, &SampleOptions::default()).unwrap().theta;
    let mut g = c.benchmark_group("log_prob");
    g.throughput(Throughput::Elements(SAMPLES as u64));
    g.bench_function("hutchinson_k1/rk4", |b| b.iter(|| model.log_prob(theta.view(), &o).unwrap()));
    g.finish();
}

fn predict(c: &mut Criterion) {
    let model = model();
    let x_all = model.tensors().eval_x.clone();
    let mut g = c.benchmark_group("predict");
    for s in [16usize, 128] {
        let theta = model.sample(s, &SampleOptions::default()).unwrap().theta;
        for n in [16usize, 256] {
            let rows: Vec<usize> = (0..n).map(|i| i % x_all.nrows()).collect();
            let x = x_all.select(ndarray::Axis(0), &rows);
            g.throughput(Throughput::Elements((s * n) as u64));
            g.bench_function(BenchmarkId::new(format!("S{s}"), format!("N{n}")), |b| {
                b.iter(|| model.predict(x.view(), theta.view(), None, &PredictOptions::default()).unwrap())
            });
        }
    }
    g.finish();
}

fn sample_predict(c: &mut Criterion) {
    let model = model();
    let x = model.tensors().eval_x.clone();
    let mut g = c.benchmark_group("sample_predict");
    g.throughput(Throughput::Elements(SAMPLES as u64));
    g.bench_function("rk4", |b| {
        b.iter(|| {
            model.sample_predict(SAMPLES, &SampleOptions::default(), x.view(), &PredictOptions::default()).unwrap()
        })
    });
    g.finish();
}

/// One small call through the C ABI (`pf_sample`, 1 sample, Euler × 1 step on the affine fixture)
/// next to the same call through the Rust API: the difference is what the boundary costs
/// (argument checks, the panic guard, the error slot, the copy into the caller's buffers).
fn c_abi(c: &mut Criterion) {
    use postflow::ffi::*;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::ffi::CString::new(root.join("tests/fixtures/bundles/affine_cls").to_str().unwrap()).unwrap();
    let mut handle: *mut pf_model = std::ptr::null_mut();
    let mut mo = std::mem::MaybeUninit::<pf_model_options>::uninit();
    let mut so = std::mem::MaybeUninit::<pf_sample_options>::uninit();
    // SAFETY: the out-pointers are valid; the handle is freed below and used only in between.
    let (mo, mut so) = unsafe {
        pf_model_options_default(mo.as_mut_ptr());
        pf_sample_options_default(so.as_mut_ptr());
        (mo.assume_init(), so.assume_init())
    };
    // SAFETY: as above.
    assert_eq!(unsafe { pf_model_load(dir.as_ptr(), &mo, &mut handle) }, pf_status::PF_OK);
    so.solver = pf_solver::PF_SOLVER_EULER as u32;
    so.steps = 1;
    let model = Model::open(root.join("tests/fixtures/bundles/affine_cls"), &ModelOptions::default()).unwrap();
    let o = SampleOptions { solver: Some(SolverKind::Euler), steps: Some(1), ..SampleOptions::default() };
    let d = model.weight_dim();
    let mut theta = vec![0f32; d];
    let mut g = c.benchmark_group("c_abi");
    g.bench_function("pf_sample/1", |b| {
        b.iter(|| {
            // SAFETY: valid handle and options; `theta` holds exactly D floats; NULL outputs are allowed.
            let st = unsafe {
                pf_sample(handle, &so, 1, theta.as_mut_ptr(), d, std::ptr::null_mut(), 0, std::ptr::null_mut(), 0)
            };
            assert_eq!(st, pf_status::PF_OK);
        })
    });
    g.bench_function("rust_sample/1", |b| b.iter(|| model.sample(1, &o).unwrap()));
    g.finish();
    // SAFETY: loaded above, freed once.
    unsafe { pf_model_free(handle) };
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! { name = benches; config = config(); targets = sample, log_prob, predict, sample_predict, c_abi }
criterion_main!(benches);
