//! Soak run: repeat sample / log_prob / predict / sample_predict on one model (and
//! open and drop a second model now and then) for a bounded time, printing the
//! process's resident memory (VmRSS from /proc/self/status) every few seconds.
//!
//! Usage: `soak [SECONDS] [BUNDLE]` (defaults: 120 s, tests/fixtures/bundles/affine_cls);
//! `scripts/soak.sh` builds and runs it. The last line is a summary: RSS after warm-up
//! (the first 10% of the run, at least one report), at the end, the peak, and growth.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use postflow::{Model, ModelOptions, PredictOptions, ProbeNoise, SampleOptions, TraceMode};

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: f64 = args.next().map(|s| s.parse().expect("SECONDS must be a number")).unwrap_or(120.0);
    let bundle = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bundles/affine_cls"));
    let other = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bundles/affine_hetero");
    let options = ModelOptions { intra_op_threads: 1, ..ModelOptions::default() };
    let model = Model::open(&bundle, &options).unwrap_or_else(|e| panic!("{}: {e}", bundle.display()));
    let x = model.tensors().eval_x.clone();
    let hutch = TraceMode::Hutchinson { probes: 2, noise: ProbeNoise::Rademacher };

    let total = Duration::from_secs_f64(seconds);
    let report_every = Duration::from_secs_f64((seconds / 24.0).clamp(1.0, 10.0));
    let warmup = Duration::from_secs_f64(seconds * 0.1);
    let start = Instant::now();
    let mut next_report = start;
    let (mut iters, mut samples, mut loads) = (0u64, 0u64, 0u64);
    let mut warm_rss: Option<u64> = None;
    let mut peak = 0u64;
    println!("soak: {} for {seconds} s, pid {}", bundle.display(), std::process::id());
    println!("{:>8} {:>10} {:>10} {:>10}", "t_s", "iters", "samples", "rss_kib");
    while start.elapsed() < total {
        let seed = iters;
        let o = SampleOptions { seed, trace: hutch, ..SampleOptions::default() };
        let s = model.sample(256, &o).expect("sample");
        let lp = model.log_prob(s.theta.view(), &o).expect("log_prob");
        let w: Vec<f32> = lp.log_density.iter().zip(s.log_density.as_deref().unwrap()).map(|(a, b)| a - b).collect();
        model.predict(x.view(), s.theta.view(), Some(&w), &PredictOptions::default()).expect("predict");
        let exact = SampleOptions { seed, trace: TraceMode::Exact, ..SampleOptions::default() };
        model.sample_predict(64, &exact, x.view(), &PredictOptions { max_chunk_bytes: 4096 }).expect("sample_predict");
        if iters % 20 == 0 {
            // Loading and dropping a model must give its memory back too.
            let m = Model::open(&other, &options).expect("open second model");
            m.sample(16, &SampleOptions::default()).expect("sample second model");
            loads += 1;
        }
        iters += 1;
        samples += 256 + 64;
        let now = Instant::now();
        if now >= next_report {
            let rss = status_kib("VmRSS:");
            peak = peak.max(rss);
            if warm_rss.is_none() && now - start >= warmup && iters > 1 {
                warm_rss = Some(rss);
            }
            println!("{:>8.1} {:>10} {:>10} {:>10}", (now - start).as_secs_f64(), iters, samples, rss);
            next_report = now + report_every;
        }
    }
    let end = status_kib("VmRSS:");
    peak = peak.max(end).max(status_kib("VmHWM:"));
    let warm = warm_rss.unwrap_or(end);
    let growth = end as i64 - warm as i64;
    println!(
        "summary: {:.0} s, {iters} iterations, {samples} samples, {loads} extra model loads; \
         rss after warm-up {warm} KiB, at end {end} KiB, peak {peak} KiB, growth {growth:+} KiB ({:+.2}%)",
        start.elapsed().as_secs_f64(),
        100.0 * growth as f64 / warm.max(1) as f64
    );
}
