//! Issue 15's measurement, in one process: a bundle opened on the CPU and on CUDA device 0,
//! the time each takes to open, samples per second at each batch size with trace none and
//! Hutchinson K = 1 (the same seeds on both, so the draws must agree), and the largest
//! difference between the CPU's and CUDA's θ and log-densities. Prints one JSON object; when
//! CUDA cannot be opened (no `cuda` feature, a CPU-only ONNX Runtime, no GPU) the object says
//! why and holds the CPU rows alone. `scripts/device/cuda.sh measure` runs it on the GPU machine.
//!
//! cargo run --release --features cuda --example cuda_check -- BUNDLE [--n 1024]
//!     [--batches 64,256,1024] [--repeats 3] [--start-time 0]
use std::time::Instant;

use postflow::{Device, Model, ModelOptions, ProbeNoise, SampleOptions, TraceMode};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

struct Run {
    seconds: f64,
    theta: Vec<f32>,
    log_density: Option<Vec<f32>>,
}

/// Best wall time of `repeats` draws of `n` samples (after one warm-up), with the last draw.
fn time_sample(model: &Model, n: usize, options: &SampleOptions, repeats: usize) -> Res<Run> {
    model.sample(options.batch_size.min(n), options)?; // warm-up: first-run allocations, CUDA kernels
    let mut best = f64::INFINITY;
    let mut last = None;
    for _ in 0..repeats {
        let started = Instant::now();
        let s = model.sample(n, options)?;
        best = best.min(started.elapsed().as_secs_f64());
        last = Some(s);
    }
    let s = last.ok_or("no repeats")?;
    Ok(Run { seconds: best, theta: s.theta.iter().copied().collect(), log_density: s.log_density })
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| f64::from((x - y).abs())).fold(0.0, f64::max)
}

fn open(bundle: &str, device: Device) -> (Result<Model, String>, f64) {
    let started = Instant::now();
    let model = Model::open(bundle, &ModelOptions { device, ..Default::default() }).map_err(|e| e.to_string());
    (model, started.elapsed().as_secs_f64())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let bundle = args.get(1).ok_or("usage: cuda_check BUNDLE [--n N] [--batches B1,B2] [--repeats R]")?.clone();
    let n: usize = arg(&args, "--n", "1024").parse()?;
    let repeats: usize = arg(&args, "--repeats", "3").parse::<usize>()?.max(1);
    let start_time: f64 = arg(&args, "--start-time", "0").parse()?;
    let batches: Vec<usize> =
        arg(&args, "--batches", "64,256,1024").split(',').map(str::parse).collect::<Result<_, _>>()?;
    let (cpu, cpu_open_s) = open(&bundle, Device::Cpu);
    let cpu = cpu?;
    let (cuda, cuda_open_s) = open(&bundle, Device::Cuda(0));
    let mut rows = Vec::new();
    for &batch in &batches {
        for (name, trace) in [
            ("none", TraceMode::None),
            ("hutchinson", TraceMode::Hutchinson { probes: 1, noise: ProbeNoise::Rademacher }),
        ] {
            let options =
                SampleOptions { seed: 7, trace, batch_size: batch, start_time: Some(start_time), ..Default::default() };
            let on_cpu = time_sample(&cpu, n, &options, repeats)?;
            let mut row = format!(
                "{{\"batch\": {batch}, \"trace\": \"{name}\", \"cpu_samples_per_s\": {:.1}",
                n as f64 / on_cpu.seconds
            );
            if let Ok(gpu) = &cuda {
                let on_gpu = time_sample(gpu, n, &options, repeats)?;
                let logq = match (&on_cpu.log_density, &on_gpu.log_density) {
                    (Some(a), Some(b)) => format!("{:e}", max_abs_diff(a, b)),
                    _ => "null".to_string(),
                };
                row += &format!(
                    ", \"cuda_samples_per_s\": {:.1}, \"speedup\": {:.2}, \"max_abs_theta_diff\": {:e}, \"max_abs_log_density_diff\": {logq}",
                    n as f64 / on_gpu.seconds,
                    on_cpu.seconds / on_gpu.seconds,
                    max_abs_diff(&on_cpu.theta, &on_gpu.theta)
                );
            }
            rows.push(row + "}");
        }
    }
    let cuda_status = match &cuda {
        Ok(_) => format!("{{\"opened\": true, \"open_s\": {cuda_open_s:.3}}}"),
        Err(e) => format!("{{\"opened\": false, \"open_s\": {cuda_open_s:.3}, \"error\": {e:?}}}"),
    };
    println!(
        "{{\"bundle\": {bundle:?}, \"n\": {n}, \"repeats\": {repeats}, \"start_time\": {start_time}, \"cpu_open_s\": {cpu_open_s:.3}, \"cuda\": {cuda_status}, \"rows\": [{}]}}",
        rows.join(", ")
    );
    Ok(())
}
