//! The `postflow` command line: `info`, `sample`, `log-prob`, `predict`, `eval`.
//! Errors print one `error: …` line on stderr and exit with status 1; usage errors (clap's
//! message, condensed to one line) exit with status 2, and no command at all shows the help.
//! Numeric options take a value that starts with '-' (`allow_negative_numbers`; for floats
//! `allow_hyphen_values`, as clap does not see `-1e-3` as a number), so `--start-time -0.5`
//! gets its range error instead of clap reading `-0` as a flag.
mod arrays;
mod eval;
mod info;
mod input;
mod output;
mod plot;
mod predict;
mod progress;
mod sample;

use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::refine::RefineKernel;
use crate::{Model, ModelOptions, ProbeNoise, Result, SampleOptions, SolverKind, TraceMode};

#[derive(Parser)]
#[command(
    name = "postflow",
    version,
    about = "Posterior weight samples and calibrated predictions from a postflow bundle"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a bundle: task, dimensions, graphs, solver, provenance, reference metrics.
    Info(info::InfoArgs),
    /// Draw posterior weight samples (and log-densities) from a bundle.
    Sample(sample::SampleArgs),
    /// Log-densities of given weight samples under a bundle's flow.
    LogProb(sample::LogProbArgs),
    /// Predictions with their uncertainty decomposition for inputs from CSV or .npy.
    Predict(predict::PredictArgs),
    /// Flow BMA vs HMC BMA vs MAP on the bundle's eval split.
    Eval(eval::EvalArgs),
}

/// Options shared by every command that loads a model.
#[derive(Args, Clone)]
pub(crate) struct ModelArgs {
    /// Bundle folder.
    pub bundle: PathBuf,
    /// Path to libonnxruntime.so (default: POSTFLOW_ORT_LIB, ORT_DYLIB_PATH, the repo's .ort/, the system).
    #[arg(long, value_name = "PATH")]
    pub onnxruntime: Option<PathBuf>,
    /// Run on CUDA device ID (needs the `cuda` feature and a CUDA build of ONNX Runtime).
    #[arg(long, value_name = "ID", allow_negative_numbers = true)]
    pub cuda: Option<i32>,
    /// Intra-op threads per ONNX Runtime session (0: ONNX Runtime's default).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub threads: usize,
    /// Let ONNX Runtime's worker threads spin between runs (faster in a process that only
    /// samples; off by default so idle pools leave the cores to other work).
    #[arg(long)]
    pub allow_spinning: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

impl ModelArgs {
    pub fn open(&self) -> Result<Model> {
        let options = ModelOptions {
            device: self.cuda.map_or(crate::Device::Cpu, crate::Device::Cuda),
            intra_op_threads: self.threads,
            onnxruntime_path: self.onnxruntime.clone(),
            allow_spinning: self.allow_spinning,
            ..ModelOptions::default()
        };
        Model::open(&self.bundle, &options)
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum SolverArg {
    Euler,
    Heun,
    Rk4,
    Dopri5,
}

/// Log-density modes of `sample`.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum TraceArg {
    /// No log-densities.
    None,
    /// Hutchinson estimate with the bundle's probe noise (flow.hutchinson.noise).
    Hutchinson,
    /// Hutchinson estimate with Rademacher (±1) probes.
    HutchinsonRademacher,
    /// Hutchinson estimate with Gaussian probes.
    HutchinsonGaussian,
    /// Exact trace of the Jacobian.
    Exact,
}

/// Log-density modes of `log-prob`: the log-density is what it computes, so no `none`.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum LogProbTraceArg {
    /// Hutchinson estimate with the bundle's probe noise (flow.hutchinson.noise).
    Hutchinson,
    /// Hutchinson estimate with Rademacher (±1) probes.
    HutchinsonRademacher,
    /// Hutchinson estimate with Gaussian probes.
    HutchinsonGaussian,
    /// Exact trace of the Jacobian.
    Exact,
}

impl From<LogProbTraceArg> for TraceArg {
    fn from(t: LogProbTraceArg) -> TraceArg {
        match t {
            LogProbTraceArg::Hutchinson => TraceArg::Hutchinson,
            LogProbTraceArg::HutchinsonRademacher => TraceArg::HutchinsonRademacher,
            LogProbTraceArg::HutchinsonGaussian => TraceArg::HutchinsonGaussian,
            LogProbTraceArg::Exact => TraceArg::Exact,
        }
    }
}

/// Solver and trace flags; unset ones take the bundle's defaults.
#[derive(Args, Clone)]
pub(crate) struct SolverArgs {
    /// Random seed.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// ODE solver (default: the bundle's).
    #[arg(long, value_enum)]
    pub solver: Option<SolverArg>,
    /// Steps of a fixed-step solver (default: the bundle's).
    #[arg(long, allow_negative_numbers = true)]
    pub steps: Option<u32>,
    /// Relative tolerance (dopri5).
    #[arg(long, allow_hyphen_values = true)]
    pub rtol: Option<f64>,
    /// Absolute tolerance (dopri5).
    #[arg(long, allow_hyphen_values = true)]
    pub atol: Option<f64>,
    /// Samples per ONNX Runtime call (0: default).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub batch: usize,
    /// Start time t0 in [0, 1] (default: the bundle's; for refined draws its refinement start
    /// time). 0 integrates the flow from N(0, I);
    /// between 0 and 1 it starts at t0·a + (1 − t0)·z around a stored draw a (on the spheres
    /// of a sphere_product bundle, slerp(z, a; t0)); 1 returns the stored posterior draws
    /// themselves (close to 1: near-copies of them).
    #[arg(long, value_name = "T0", allow_hyphen_values = true)]
    pub start_time: Option<f64>,
    /// HMC transitions on the posterior after drawing (bundles with refinement; default: the
    /// bundle's refine.default_transitions without log-densities, 0 with them). Refined
    /// samples are fresh posterior draws and have no log-density.
    #[arg(long, value_name = "K", allow_negative_numbers = true)]
    pub refine: Option<u32>,
    #[command(flatten)]
    pub kernel: RefineKernelArgs,
}

/// Refinement kernel flags (sample, predict, eval).
#[derive(Args, Clone)]
pub(crate) struct RefineKernelArgs {
    /// The HMC transition of refinement (default: the bundle's, endpoint for every format so
    /// far): endpoint (Metropolis on the trajectory's end: a rejected transition keeps its
    /// start) or multinomial (one state of a trajectory built by doublings, drawn by weight:
    /// nearly never the start).
    #[arg(long, value_enum)]
    pub refine_kernel: Option<RefineKernelArg>,
    /// Leapfrog steps per refinement trajectory (default: the bundle's refine.leapfrog_steps;
    /// the multinomial kernel runs 2^d − 1 ≥ L of them).
    #[arg(long, value_name = "L", allow_negative_numbers = true)]
    pub refine_leapfrog: Option<u32>,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum RefineKernelArg {
    Endpoint,
    Multinomial,
}

impl RefineKernelArgs {
    pub fn apply(&self, o: SampleOptions) -> SampleOptions {
        SampleOptions {
            refine_kernel: self.refine_kernel.map(|k| match k {
                RefineKernelArg::Endpoint => RefineKernel::Endpoint,
                RefineKernelArg::Multinomial => RefineKernel::Multinomial,
            }),
            refine_leapfrog: self.refine_leapfrog,
            ..o
        }
    }
}

impl SolverArgs {
    pub fn options(&self, trace: TraceMode) -> SampleOptions {
        SampleOptions {
            seed: self.seed,
            solver: self.solver.map(|s| match s {
                SolverArg::Euler => SolverKind::Euler,
                SolverArg::Heun => SolverKind::Heun,
                SolverArg::Rk4 => SolverKind::Rk4,
                SolverArg::Dopri5 => SolverKind::Dopri5,
            }),
            steps: self.steps,
            rtol: self.rtol,
            atol: self.atol,
            trace,
            batch_size: self.batch,
            start_time: self.start_time,
            refine_transitions: self.refine,
            ..self.kernel.apply(SampleOptions::default())
        }
    }
}

/// The trace mode from flags; `probes`, and the noise of plain `hutchinson`, default to
/// the bundle's (flow.hutchinson).
pub(crate) fn trace_mode(model: &Model, trace: TraceArg, probes: Option<u32>) -> TraceMode {
    let (default_probes, default_noise) = match model.default_hutchinson() {
        TraceMode::Hutchinson { probes, noise } => (probes, noise),
        _ => (1, ProbeNoise::Rademacher),
    };
    let probes = probes.unwrap_or(default_probes);
    match trace {
        TraceArg::None => TraceMode::None,
        TraceArg::Hutchinson => TraceMode::Hutchinson { probes, noise: default_noise },
        TraceArg::HutchinsonRademacher => TraceMode::Hutchinson { probes, noise: ProbeNoise::Rademacher },
        TraceArg::HutchinsonGaussian => TraceMode::Hutchinson { probes, noise: ProbeNoise::Gaussian },
        TraceArg::Exact => TraceMode::Exact,
    }
}

/// Clap's usage error as one line, all of its content kept (which arguments are missing,
/// the possible values, the tips) but the usage synopsis and the pointer to --help.
fn usage_error_line(rendered: &str) -> String {
    let mut paragraphs: Vec<String> = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in rendered.lines().map(str::trim) {
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if line.is_empty() {
            paragraphs.extend(join_paragraph(&current));
            current.clear();
        } else {
            current.push(line);
        }
    }
    paragraphs.extend(join_paragraph(&current));
    let text = paragraphs.join("; ");
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    if text.is_empty() {
        "invalid arguments".to_string()
    } else {
        text.to_string()
    }
}

/// "head:" followed by items as "head: a, b"; other lines joined by spaces.
fn join_paragraph(lines: &[&str]) -> Option<String> {
    let (head, items) = lines.split_first()?;
    if items.is_empty() {
        Some(head.to_string())
    } else if head.ends_with(':') {
        Some(format!("{head} {}", items.join(", ")))
    } else {
        Some(format!("{head} {}", items.join(" ")))
    }
}

/// Run the CLI; returns the process exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            eprintln!("error: {} (see --help)", usage_error_line(&e.render().to_string()));
            return 2;
        }
    };
    let result = match cli.command {
        Command::Sample(args) => sample::run_sample(&args),
        Command::LogProb(args) => sample::run_log_prob(&args),
        Command::Info(args) => info::run_info(&args),
        Command::Predict(args) => predict::run_predict(&args),
        Command::Eval(args) => eval::run_eval(&args),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", e.message().replace('\n', " "));
            1
        }
    }
}
