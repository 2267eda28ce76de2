//! Times `Model::sample` against the raw ONNX Runtime floor: the same number of
//! `Session::run` calls with the same shapes on a bare session, inputs prepared in
//! advance. Repeats interleave postflow and the floor (so a load spike on a shared
//! machine hits both) and each keeps its best. Each is timed twice: wall clock (`*_s`) and
//! the process's CPU time (`*_cpu_s`, CLOCK_PROCESS_CPUTIME_ID), which does not count the time
//! the process waits for a core on a loaded machine (with intra-op threads 1, ONNX Runtime runs
//! on the calling thread, so the CPU time is the cost). Prints one JSON object;
//! `benches/compare.py` runs it.
//!
//! cargo run --release --example time_sample -- BUNDLE [--n 256] [--batch 64] [--steps 20]
//!     [--solver rk4|heun|euler] [--trace none|hutchinson] [--probes 1] [--repeats 5] [--intra 1] [--threads 0]
//!     [--probe-sweep 1,4]
//!
//! `--threads T` (T ≥ 2) adds a throughput test: T threads sharing one `Model`
//! (`max_sessions = T`), each drawing `n` samples, against one thread drawing `n`;
//! it reports samples per second for both and their ratio (`thread_scaling`).
//! `--probe-sweep K1,K2,..` instead times trace none and Hutchinson with each K, interleaved.
use std::time::Instant;

use ort::session::Session;
use ort::value::Tensor;
use postflow::{Model, ModelOptions, ProbeNoise, SampleOptions, SolverKind, TraceMode};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// CPU seconds used by this process so far (all threads).
fn cpu_now() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid pointer we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// One pass of the floor: `nfe` runs of the bare session over the same batches as the sampler.
#[allow(clippy::too_many_arguments)]
fn floor_pass(
    session: &mut Session,
    names: &[String],
    jvp: bool,
    n: usize,
    batch: usize,
    d: usize,
    k: usize,
    evals_per_batch: usize,
) -> Res<(f64, f64, usize)> {
    let mut total = 0.0;
    let mut total_cpu = 0.0;
    let mut left = n;
    let mut calls = 0usize;
    while left > 0 {
        let b = batch.min(left);
        let t = Tensor::from_array(([b], vec![0.5f32; b]))?;
        let x = Tensor::from_array(([b, d], vec![0.1f32; b * d]))?;
        let eps = Tensor::from_array(([b, k, d], vec![1.0f32; b * k * d]))?;
        for _ in 0..evals_per_batch {
            let start = Instant::now();
            let c0 = cpu_now();
            let out = if jvp {
                session
                    .run(ort::inputs![names[0].as_str() => &t, names[1].as_str() => &x, names[2].as_str() => &eps])?
            } else {
                session.run(ort::inputs![names[0].as_str() => &t, names[1].as_str() => &x])?
            };
            drop(out);
            total_cpu += cpu_now() - c0;
            total += start.elapsed().as_secs_f64();
            calls += 1;
        }
        left -= b;
    }
    Ok((total, total_cpu, calls))
}

/// `--probe-sweep 1,4`: trace none and Hutchinson with each K, interleaved in one process
/// (per repeat: every configuration, postflow then its floor), so their ratios are comparable
/// on a loaded machine. Prints `{"bundle", "sweep": [{trace, probes, postflow_s, floor_s, ...}]}`.
#[allow(clippy::too_many_arguments)]
fn probe_sweep(
    model: &Model,
    bundle: &str,
    sweep: &str,
    options: &SampleOptions,
    n: usize,
    batch: usize,
    intra: usize,
    repeats: usize,
) -> Res<()> {
    let d = model.weight_dim();
    let env = postflow::runtime::environment(None)?;
    let open = |file: &str| -> Res<Session> {
        Ok(Session::builder(env)?
            .with_intra_threads(intra)
            .map_err(|e| e.to_string())?
            .commit_from_file(model.dir().join(file))?)
    };
    let g = &model.manifest().graphs;
    let mut flow = open(&g.flow.file)?;
    let mut flow_jvp = open(&g.flow_jvp.file)?;
    let mut configs = vec![(TraceMode::None, 0usize)];
    for k in sweep.split(',') {
        let k: u32 = k.trim().parse()?;
        configs.push((TraceMode::Hutchinson { probes: k, noise: ProbeNoise::Rademacher }, k as usize));
    }
    // [postflow wall, postflow cpu, floor wall, floor cpu] per configuration
    let mut best = vec![[f64::INFINITY; 4]; configs.len()];
    let mut nfe = 0;
    for r in 0..=repeats {
        for (c, (trace, k)) in configs.iter().enumerate() {
            let o = SampleOptions { seed: r as u64, trace: *trace, ..options.clone() };
            let m = if r == 0 { batch.min(n) } else { n }; // r = 0: warm-up
            let start = Instant::now();
            let c0 = cpu_now();
            let s = model.sample(m, &o)?;
            let (wall, cpu) = (start.elapsed().as_secs_f64(), cpu_now() - c0);
            let per_batch = s.stats.nfe / m.div_ceil(batch);
            let (sess, names, jvp) =
                if *k == 0 { (&mut flow, &g.flow.inputs, false) } else { (&mut flow_jvp, &g.flow_jvp.inputs, true) };
            let (fw, fc, calls) = floor_pass(sess, names, jvp, m, batch, d, (*k).max(1), per_batch)?;
            assert_eq!(calls, s.stats.nfe, "floor must make as many runs as the sampler");
            nfe = s.stats.nfe;
            if r > 0 {
                let b = &mut best[c];
                b[0] = b[0].min(wall);
                b[1] = b[1].min(cpu);
                b[2] = b[2].min(fw);
                b[3] = b[3].min(fc);
            }
        }
    }
    let rows: Vec<String> = configs
        .iter()
        .zip(&best)
        .map(|((_, k), b)| {
            format!(
                "{{\"trace\": {:?}, \"probes\": {k}, \"postflow_s\": {}, \"postflow_cpu_s\": {}, \"floor_s\": {}, \"floor_cpu_s\": {}}}",
                if *k == 0 { "none" } else { "hutchinson" },
                b[0],
                b[1],
                b[2],
                b[3]
            )
        })
        .collect();
    println!(
        "{{\"bundle\": {bundle:?}, \"D\": {d}, \"n\": {n}, \"batch\": {batch}, \"intra_op_threads\": {intra}, \"repeats\": {repeats}, \"nfe\": {nfe}, \"sweep\": [{}]}}",
        rows.join(", ")
    );
    Ok(())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let bundle = args.get(1).ok_or("usage: time_sample BUNDLE [options]")?.clone();
    let n: usize = arg(&args, "--n", 256);
    let batch: usize = arg(&args, "--batch", 64);
    let steps: u32 = arg(&args, "--steps", 20);
    let probes: u32 = arg(&args, "--probes", 1);
    let repeats: usize = arg(&args, "--repeats", 5).max(1);
    let intra: usize = arg(&args, "--intra", 1);
    let threads: usize = arg(&args, "--threads", 0);
    let trace_name: String = arg(&args, "--trace", "none".to_string());
    let trace = match trace_name.as_str() {
        "none" => TraceMode::None,
        "hutchinson" => TraceMode::Hutchinson { probes, noise: ProbeNoise::Rademacher },
        other => return Err(format!("unknown trace {other}").into()),
    };
    let model = Model::open(
        &bundle,
        &ModelOptions { intra_op_threads: intra, max_sessions: threads.max(1), ..Default::default() },
    )?;
    let options = SampleOptions {
        solver: Some(SolverKind::parse(&arg(&args, "--solver", "rk4".to_string()))?),
        steps: Some(steps),
        trace,
        batch_size: batch,
        ..Default::default()
    };

    let sweep: String = arg(&args, "--probe-sweep", String::new());
    if !sweep.is_empty() {
        return probe_sweep(&model, &bundle, &sweep, &options, n, batch, intra, repeats);
    }

    // The floor: a bare session of the same graph, the same calls, nothing else.
    let d = model.weight_dim();
    let jvp = trace != TraceMode::None;
    let spec = if jvp { &model.manifest().graphs.flow_jvp } else { &model.manifest().graphs.flow };
    let env = postflow::runtime::environment(None)?;
    let mut session = Session::builder(env)?
        .with_intra_threads(intra)
        .map_err(|e| e.to_string())?
        .commit_from_file(model.dir().join(&spec.file))?;
    let k = probes as usize;

    // Warm-up both (first runs allocate arenas and pick kernels).
    let w = model.sample(batch.min(n), &options)?;
    let evals_per_batch = w.stats.nfe;
    floor_pass(&mut session, &spec.inputs, jvp, batch.min(n), batch, d, k, evals_per_batch)?;

    let (mut best, mut best_cpu) = (f64::INFINITY, f64::INFINITY);
    let (mut floor, mut floor_cpu) = (f64::INFINITY, f64::INFINITY);
    let mut nfe = 0;
    for r in 0..repeats {
        let start = Instant::now();
        let c0 = cpu_now();
        let s = model.sample(n, &SampleOptions { seed: r as u64, ..options.clone() })?;
        best_cpu = best_cpu.min(cpu_now() - c0);
        best = best.min(start.elapsed().as_secs_f64());
        nfe = s.stats.nfe;
        let (total, total_cpu, calls) = floor_pass(&mut session, &spec.inputs, jvp, n, batch, d, k, evals_per_batch)?;
        assert_eq!(calls, nfe, "floor must make as many runs as the sampler");
        floor = floor.min(total);
        floor_cpu = floor_cpu.min(total_cpu);
    }

    let mut extra = String::new();
    if threads >= 2 {
        // Throughput: T threads sharing `model` vs one thread, interleaved, best of `repeats` each.
        let one = |seed: u64| model.sample(n, &SampleOptions { seed, ..options.clone() }).map(|_| ());
        let (mut best1, mut best_t) = (f64::INFINITY, f64::INFINITY);
        for r in 0..repeats {
            let start = Instant::now();
            one(r as u64)?;
            best1 = best1.min(start.elapsed().as_secs_f64());
            let start = Instant::now();
            std::thread::scope(|s| -> Res<()> {
                let hs: Vec<_> = (0..threads)
                    .map(|i| s.spawn(move || one((r * threads + i) as u64).map_err(|e| e.to_string())))
                    .collect();
                for h in hs {
                    h.join().map_err(|_| "sampling thread panicked")??;
                }
                Ok(())
            })?;
            best_t = best_t.min(start.elapsed().as_secs_f64());
        }
        let sps1 = n as f64 / best1;
        let sps_t = (threads * n) as f64 / best_t;
        extra = format!(
            ", \"threads\": {threads}, \"samples_per_s_1thread\": {sps1}, \"samples_per_s_threads\": {sps_t}, \"thread_scaling\": {}",
            sps_t / sps1
        );
    }

    println!(
        "{{\"bundle\": {:?}, \"D\": {d}, \"n\": {n}, \"batch\": {batch}, \"steps\": {steps}, \"trace\": {:?}, \"probes\": {probes}, \"intra_op_threads\": {intra}, \"repeats\": {repeats}, \"nfe\": {nfe}, \"postflow_s\": {best}, \"floor_s\": {floor}, \"ratio\": {}, \"postflow_cpu_s\": {best_cpu}, \"floor_cpu_s\": {floor_cpu}, \"ratio_cpu\": {}{extra}}}",
        bundle,
        trace_name,
        best / floor,
        best_cpu / floor_cpu
    );
    Ok(())
}
