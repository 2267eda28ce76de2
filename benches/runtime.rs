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

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! { name = benches; config = config(); targets = sample, log_prob, predict, sample_predict }
criterion_main!(benches);
