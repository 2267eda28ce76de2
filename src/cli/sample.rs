//! `postflow sample` and `postflow log-prob`.
use std::path::PathBuf;

use clap::Args;
use ndarray::s;

use super::{arrays, output, progress, trace_mode, LogProbTraceArg, ModelArgs, SolverArgs, TraceArg};
use crate::refine::RefineStats;
use crate::{Error, OdeStats, Result, SampleOptions, TraceMode};

#[derive(Args)]
pub struct SampleArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Number of samples.
    #[arg(short = 'n', long = "num-samples", allow_negative_numbers = true)]
    n: usize,
    #[command(flatten)]
    solver: SolverArgs,
    /// Log-density mode.
    #[arg(long, value_enum, default_value = "none")]
    trace: TraceArg,
    /// Hutchinson probes per sample (default: the bundle's).
    #[arg(long, allow_negative_numbers = true)]
    probes: Option<u32>,
    #[command(flatten)]
    first: FirstIndexArg,
    /// Output safetensors file: theta [N,D], log_density [N], log_density_stderr [N].
    #[arg(short, long)]
    output: PathBuf,
}

#[derive(Args)]
pub struct LogProbArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Safetensors file with the weights [N,D].
    #[arg(long)]
    theta: PathBuf,
    /// Tensor name in --theta (default: "theta", or the only tensor).
    #[arg(long)]
    tensor: Option<String>,
    #[command(flatten)]
    solver: SolverArgs,
    /// Log-density mode.
    #[arg(long, value_enum, default_value = "hutchinson")]
    trace: LogProbTraceArg,
    /// Hutchinson probes per sample (default: the bundle's).
    #[arg(long, allow_negative_numbers = true)]
    probes: Option<u32>,
    /// On a sphere_product bundle, renormalize each hidden unit's (w, b) onto its unit sphere
    /// first; without it, weights off the slice (|‖(w, b)‖ − 1| > 1e-4) are refused.
    #[arg(long)]
    project: bool,
    #[command(flatten)]
    first: FirstIndexArg,
    /// Output safetensors file: log_density [N] (and log_density_stderr [N]).
    #[arg(short, long)]
    output: PathBuf,
}

/// Where a run starts in the seed's sequence of samples.
#[derive(Args)]
struct FirstIndexArg {
    /// Index of the first sample: sample i of this run is the seed's sample K + i (its noise,
    /// stored draw, refinement and probes), so runs over consecutive ranges continue one run
    /// (bitwise when K is a multiple of the batch size).
    #[arg(long = "first-index", value_name = "K", default_value_t = 0, allow_negative_numbers = true)]
    index: u64,
}

impl FirstIndexArg {
    /// The run's first index, checked so that the `n` indices after it fit a u64.
    fn checked(&self, n: usize) -> Result<u64> {
        crate::sampler::check_index_range("--first-index", self.index, n)?;
        Ok(self.index)
    }
}

/// Samples per progress update: whole batches, so chunking does not change results.
fn chunk_len(options: &SampleOptions) -> usize {
    if options.batch_size > 0 {
        options.batch_size
    } else {
        crate::sampler::DEFAULT_BATCH
    }
}

pub fn run_sample(args: &SampleArgs) -> Result<()> {
    if args.n == 0 {
        return Err(Error::invalid("-n must be at least 1"));
    }
    output::check_path(&args.output)?;
    let first_index = args.first.checked(args.n)?;
    let model = args.model.open()?;
    let trace = trace_mode(&model, args.trace, args.probes);
    let base = args.solver.options(trace);
    let d = model.weight_dim();
    // An absurd -n is an error here, not an allocator abort; the log-densities (n values,
    // fewer than theta's n·D) grow as the batches come.
    let mut theta = crate::sampler::zeroed_samples(args.n, d)?;
    let mut logd = Vec::new();
    let mut stderr = Vec::new();
    let bar = progress::bar(args.n as u64, "sampling", args.model.quiet);
    let started = std::time::Instant::now();
    let mut stats = OdeStats::default();
    let mut refined = RefineStats::default();
    let step = chunk_len(&base);
    for first in (0..args.n).step_by(step) {
        let count = step.min(args.n - first);
        let options = SampleOptions { first_index: first_index + first as u64, ..base.clone() };
        let samples = model.sample(count, &options)?;
        theta.slice_mut(s![first..first + count, ..]).assign(&samples.theta);
        logd.extend(samples.log_density.unwrap_or_default());
        stderr.extend(samples.log_density_stderr.unwrap_or_default());
        stats += samples.stats;
        refined += samples.refine.unwrap_or_default();
        bar.inc(count as u64);
    }
    bar.finish_and_clear();
    let mut tensors: Vec<(&str, Vec<usize>, &[f32])> =
        vec![("theta", vec![args.n, d], theta.as_slice().expect("standard layout"))];
    if trace != TraceMode::None {
        tensors.push(("log_density", vec![args.n], &logd));
    }
    if !stderr.is_empty() {
        tensors.push(("log_density_stderr", vec![args.n], &stderr));
    }
    arrays::write_f32(&args.output, &tensors)?;
    let secs = started.elapsed().as_secs_f64();
    if !args.model.quiet {
        eprintln!(
            "wrote {} samples (D = {d}) to {} in {secs:.2} s ({:.0} samples/s, {} function evaluations)",
            args.n,
            args.output.display(),
            args.n as f64 / secs,
            stats.nfe
        );
        if refined.transitions > 0 {
            eprintln!(
                "refined by {} HMC transitions each on the posterior (acceptance {:.3}; {:.1} % of the samples moved, \
                 the rest are their start unchanged)",
                refined.transitions,
                refined.acceptance_rate(),
                100.0 * refined.moved_fraction()
            );
        }
    }
    Ok(())
}

pub fn run_log_prob(args: &LogProbArgs) -> Result<()> {
    output::check_path(&args.output)?;
    let theta = arrays::read_matrix(&args.theta, args.tensor.as_deref())?;
    if theta.nrows() == 0 {
        return Err(Error::invalid(format!("{}: no weight samples", args.theta.display())));
    }
    if args.solver.refine.is_some() {
        return Err(Error::invalid("--refine is for drawing samples; log-prob evaluates given weights"));
    }
    let n = theta.nrows();
    let first_index = args.first.checked(n)?;
    let model = args.model.open()?;
    let trace = trace_mode(&model, args.trace.into(), args.probes);
    let base = SampleOptions { project_to_slice: args.project, ..args.solver.options(trace) };
    let mut logd = Vec::with_capacity(n);
    let mut stderr = Vec::with_capacity(n);
    let bar = progress::bar(n as u64, "log-prob", args.model.quiet);
    let step = chunk_len(&base);
    for first in (0..n).step_by(step) {
        let count = step.min(n - first);
        let options = SampleOptions { first_index: first_index + first as u64, ..base.clone() };
        let lp = model.log_prob(theta.slice(s![first..first + count, ..]), &options)?;
        logd.extend(lp.log_density);
        stderr.extend(lp.log_density_stderr.unwrap_or_default());
        bar.inc(count as u64);
    }
    bar.finish_and_clear();
    let mut tensors: Vec<(&str, Vec<usize>, &[f32])> = vec![("log_density", vec![n], &logd)];
    if !stderr.is_empty() {
        tensors.push(("log_density_stderr", vec![n], &stderr));
    }
    arrays::write_f32(&args.output, &tensors)
}
