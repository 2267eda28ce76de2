//! Concurrency and load: 8 threads × a few hundred calls of every Rust entry point
//! (`sample` in each trace mode and with an adaptive solver, `log_prob`, `predict`
//! with and without log-weights, `sample_predict`, `net_outputs`) on one shared
//! `Model`, while two more threads keep loading, using and dropping other models.
//! Every result must equal, bit for bit, the sequential result for the same seed and
//! batch size, computed before the threads start.
//!
//! `POSTFLOW_STRESS_CALLS` sets the calls per thread (default 200); the whole test
//! takes a few seconds in `--release` on 2 cores.
mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ndarray::{s, Array2};
use postflow::{Model, ModelOptions, PredictOptions, Prediction, ProbeNoise, SampleOptions, SolverKind, TraceMode};

const THREADS: usize = 8;
const SEEDS: u64 = 4;

#[derive(Debug, Clone, Copy)]
enum Op {
    Sample(TraceMode),
    SampleDopri5,
    LogProb(TraceMode),
    Predict,
    PredictWeighted,
    SamplePredict,
    NetOutputs,
}

const OPS: [Op; 11] = [
    Op::Sample(TraceMode::None),
    Op::Sample(TraceMode::Hutchinson { probes: 1, noise: ProbeNoise::Rademacher }),
    Op::Sample(TraceMode::Hutchinson { probes: 3, noise: ProbeNoise::Gaussian }),
    Op::Sample(TraceMode::Exact),
    Op::SampleDopri5,
    Op::LogProb(TraceMode::Hutchinson { probes: 2, noise: ProbeNoise::Rademacher }),
    Op::LogProb(TraceMode::Exact),
    Op::Predict,
    Op::PredictWeighted,
    Op::SamplePredict,
    Op::NetOutputs,
];

fn options(seed: u64, trace: TraceMode) -> SampleOptions {
    SampleOptions { seed, trace, batch_size: 8, ..SampleOptions::default() }
}

fn bits32<'a>(out: &mut Vec<u64>, v: impl IntoIterator<Item = &'a f32>) {
    out.extend(v.into_iter().map(|x| u64::from(x.to_bits())));
}

fn bits64<'a>(out: &mut Vec<u64>, v: impl IntoIterator<Item = &'a f64>) {
    out.extend(v.into_iter().map(|x| x.to_bits()));
}

fn prediction_bits(p: &Prediction) -> Vec<u64> {
    let mut out = Vec::new();
    let (t, a, e) = p.decomposition();
    for arr in [p.mean(), t, a, e] {
        bits64(&mut out, arr.iter());
    }
    bits64(&mut out, [p.ess()].iter());
    out
}

/// The inputs every call uses: rows of the bundle's own eval and posterior tensors.
struct Inputs {
    x: Array2<f32>,
    theta: Array2<f32>,
}

impl Inputs {
    fn of(model: &Model) -> Inputs {
        Inputs { x: model.tensors().eval_x.clone(), theta: model.tensors().posterior_theta.clone() }
    }
    /// `theta` rotated by `seed` rows, so each seed predicts on a different sample order.
    fn theta_for(&self, seed: u64) -> Array2<f32> {
        let m = self.theta.nrows();
        let k = seed as usize % m;
        ndarray::concatenate![ndarray::Axis(0), self.theta.slice(s![k.., ..]), self.theta.slice(s![..k, ..])]
    }
}

fn run(model: &Model, inputs: &Inputs, op: Op, seed: u64) -> Vec<u64> {
    let mut out = Vec::new();
    match op {
        Op::Sample(trace) => {
            let s = model.sample(20, &options(seed, trace)).unwrap();
            bits32(&mut out, s.theta.iter());
            bits32(&mut out, s.log_density.iter().flatten());
            bits32(&mut out, s.log_density_stderr.iter().flatten());
        }
        Op::SampleDopri5 => {
            let o = SampleOptions {
                solver: Some(SolverKind::Dopri5),
                rtol: Some(1e-5),
                atol: Some(1e-6),
                ..options(seed, TraceMode::Exact)
            };
            let s = model.sample(12, &o).unwrap();
            bits32(&mut out, s.theta.iter());
            bits32(&mut out, s.log_density.iter().flatten());
        }
        Op::LogProb(trace) => {
            let lp = model.log_prob(inputs.theta_for(seed).view(), &options(seed, trace)).unwrap();
            bits32(&mut out, lp.log_density.iter());
            bits32(&mut out, lp.log_density_stderr.iter().flatten());
        }
        Op::Predict => {
            let p = model.predict(inputs.x.view(), inputs.theta_for(seed).view(), None, &PredictOptions::default());
            out = prediction_bits(&p.unwrap());
        }
        Op::PredictWeighted => {
            // A small chunk budget: many net calls per prediction.
            let lw: Vec<f32> = (0..inputs.theta.nrows()).map(|i| ((i as u64 * 7 + seed) % 5) as f32 * 0.3).collect();
            let o = PredictOptions { max_chunk_bytes: 1024 };
            let p = model.predict(inputs.x.view(), inputs.theta_for(seed).view(), Some(&lw), &o).unwrap();
            out = prediction_bits(&p);
        }
        Op::SamplePredict => {
            let o = options(seed, TraceMode::None);
            let p = model.sample_predict(16, &o, inputs.x.view(), &PredictOptions::default()).unwrap();
            out = prediction_bits(&p);
        }
        Op::NetOutputs => {
            let o = model.net_outputs(inputs.x.slice(s![..7, ..]), inputs.theta_for(seed).view()).unwrap();
            bits32(&mut out, o.iter());
        }
    }
    out
}

fn model_options() -> ModelOptions {
    ModelOptions { intra_op_threads: 1, max_sessions: 4, ..ModelOptions::default() }
}

#[test]
fn every_entry_point_under_eight_threads_matches_the_sequential_results() {
    let calls: usize = std::env::var("POSTFLOW_STRESS_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let shared = Arc::new(Model::open(common::fixture("affine_cls"), &model_options()).unwrap());
    let inputs = Arc::new(Inputs::of(&shared));
    let cases: Vec<(Op, u64)> = OPS.iter().flat_map(|op| (0..SEEDS).map(move |s| (*op, s))).collect();
    let expected: Arc<Vec<Vec<u64>>> =
        Arc::new(cases.iter().map(|(op, seed)| run(&shared, &inputs, *op, *seed)).collect());
    let cases = Arc::new(cases);

    // The other models the churn threads load and drop, with their own sequential answers.
    let others = ["affine_reg", "affine_hetero"];
    let churn_expected: Arc<Vec<(Vec<u64>, Vec<u64>)>> = Arc::new(
        others
            .iter()
            .map(|name| {
                let m = Model::open(common::fixture(name), &model_options()).unwrap();
                let i = Inputs::of(&m);
                (run(&m, &i, Op::Sample(TraceMode::Exact), 1), run(&m, &i, Op::SamplePredict, 2))
            })
            .collect(),
    );

    let start = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let loads = Arc::new(AtomicUsize::new(0));
    let churn: Vec<_> = (0..2)
        .map(|t| {
            let (done, loads, churn_expected) = (done.clone(), loads.clone(), churn_expected.clone());
            std::thread::spawn(move || {
                let mut k = t;
                while !done.load(Ordering::Relaxed) {
                    let which = k % others.len();
                    let m = Model::open(common::fixture(others[which]), &model_options()).unwrap();
                    let i = Inputs::of(&m);
                    assert_eq!(run(&m, &i, Op::Sample(TraceMode::Exact), 1), churn_expected[which].0);
                    assert_eq!(run(&m, &i, Op::SamplePredict, 2), churn_expected[which].1);
                    drop(m);
                    loads.fetch_add(1, Ordering::Relaxed);
                    k += 1;
                }
            })
        })
        .collect();

    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (shared, inputs, cases, expected) = (shared.clone(), inputs.clone(), cases.clone(), expected.clone());
            std::thread::spawn(move || {
                for j in 0..calls {
                    let k = (t * 7919 + j * 31 + j / cases.len()) % cases.len();
                    let (op, seed) = cases[k];
                    let got = run(&shared, &inputs, op, seed);
                    assert!(got == expected[k], "thread {t} call {j}: {op:?} seed {seed} differs from sequential");
                }
            })
        })
        .collect();
    let mut failed = Vec::new();
    for (t, w) in workers.into_iter().enumerate() {
        if w.join().is_err() {
            failed.push(t);
        }
    }
    done.store(true, Ordering::Relaxed);
    for c in churn {
        c.join().expect("a loading thread failed");
    }
    assert!(failed.is_empty(), "worker threads {failed:?} failed");
    let (flow, jvp, net) = shared.engine().live_sessions();
    eprintln!(
        "stress: {THREADS} threads x {calls} calls over {} cases in {:.1} s; {} models loaded and dropped \
         meanwhile; sessions (flow, flow_jvp, net) = ({flow}, {jvp}, {net})",
        cases.len(),
        start.elapsed().as_secs_f64(),
        loads.load(Ordering::Relaxed)
    );
    assert!(loads.load(Ordering::Relaxed) >= 1);
    // Still the same answers afterwards, sequentially.
    for (k, (op, seed)) in cases.iter().enumerate() {
        assert!(run(&shared, &inputs, *op, *seed) == expected[k], "{op:?} seed {seed} after the stress");
    }
}
