//! Sessions per graph under concurrent callers: a single session behind a lock
//! (`max_sessions = 1`) against a pool (`max_sessions = threads`).
//!
//! Run: `cargo bench --bench session_pool -- [BUNDLE] [THREADS] [SAMPLES_PER_THREAD]`.
//! Prints samples per second for each setting; it measures, it asserts nothing.
use std::time::Instant;

use postflow::{Model, ModelOptions, ProbeNoise, SampleOptions, TraceMode};

fn throughput(bundle: &str, max_sessions: usize, threads: usize, per_thread: usize, trace: TraceMode) -> f64 {
    let options = ModelOptions { intra_op_threads: 1, max_sessions, ..ModelOptions::default() };
    let model = Model::open(bundle, &options).expect("open bundle");
    let sample = |seed: u64| {
        let o = SampleOptions { seed, trace, batch_size: 32, ..SampleOptions::default() };
        model.sample(per_thread, &o).expect("sample");
    };
    sample(0); // warm-up: first runs allocate
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let sample = &sample;
            s.spawn(move || sample(t as u64 + 1));
        }
    });
    (threads * per_thread) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let bundle = args.first().cloned().unwrap_or_else(|| "tests/fixtures/bundles/affine_cls".into());
    let threads: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(4);
    let per_thread: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(512);
    println!("bundle {bundle}, {threads} threads x {per_thread} samples, intra-op threads 1");
    println!("{:<22} {:>14} {:>14}", "trace", "1 session/s", "pool/s");
    for (name, trace) in [
        ("none", TraceMode::None),
        ("hutchinson K=1", TraceMode::Hutchinson { probes: 1, noise: ProbeNoise::Rademacher }),
    ] {
        let locked = throughput(&bundle, 1, threads, per_thread, trace);
        let pooled = throughput(&bundle, threads, threads, per_thread, trace);
        println!("{name:<22} {locked:>14.0} {pooled:>14.0}   (pool/lock = {:.2})", pooled / locked);
    }
}
