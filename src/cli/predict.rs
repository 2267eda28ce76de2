//! `postflow predict`: BMA predictions with their uncertainty decomposition for
//! inputs read from CSV or `.npy`.
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use ndarray::{s, Array2, ArrayView1};
use serde_json::{json, Value};

use super::{arrays, input, output, progress, ModelArgs, SolverArgs};
use crate::bundle::Task;
use crate::refine::RefineStats;
use crate::{Error, Model, OdeStats, PredictOptions, Prediction, Result, SampleOptions, TraceMode};

/// Flow samples when neither `-n` nor the manifest's `reference_metrics.flow_samples` says.
pub const DEFAULT_SAMPLES: usize = 400;

#[derive(Args)]
pub struct PredictArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Inputs [N, d_in]: CSV (header row optional) or .npy (float32/float64, 2-D).
    #[arg(short, long, value_name = "FILE")]
    input: PathBuf,
    /// Flow samples to draw (default: the manifest's reference_metrics.flow_samples, else 400).
    #[arg(short = 'n', long = "num-samples", conflicts_with = "samples", allow_negative_numbers = true)]
    n: Option<usize>,
    /// Use these weight samples [S, D] (safetensors) instead of drawing.
    #[arg(long, value_name = "FILE")]
    samples: Option<PathBuf>,
    /// Tensor name in --samples (default: "theta", or the only tensor).
    #[arg(long, requires = "samples")]
    tensor: Option<String>,
    #[command(flatten)]
    solver: SolverArgs,
    /// JSON instead of CSV.
    #[arg(long)]
    json: bool,
    /// Output file (default: stdout).
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
}

/// Flow samples drawn by the CLI, with the time it took.
pub(super) struct Drawn {
    pub theta: Array2<f32>,
    pub seconds: f64,
    pub stats: OdeStats,
    /// The start time the samples were drawn from (`Samples::start_time`).
    pub start_time: f64,
    pub refine: RefineStats,
}

/// Draw `n` samples in whole batches (so the result equals one `Model::sample` call),
/// with a progress bar.
pub(super) fn draw(model: &Model, n: usize, base: &SampleOptions, quiet: bool) -> Result<Drawn> {
    if n == 0 {
        return Err(Error::invalid("-n must be at least 1"));
    }
    let step = if base.batch_size > 0 { base.batch_size } else { crate::sampler::DEFAULT_BATCH };
    let mut theta = crate::sampler::zeroed_samples(n, model.weight_dim())?;
    let mut stats = OdeStats::default();
    let mut refine = RefineStats::default();
    let mut start_time = f64::NAN;
    let bar = progress::bar(n as u64, "sampling", quiet);
    let started = std::time::Instant::now();
    for first in (0..n).step_by(step) {
        let count = step.min(n - first);
        let options = SampleOptions { first_index: first as u64, trace: TraceMode::None, ..base.clone() };
        let samples = model.sample(count, &options)?;
        theta.slice_mut(s![first..first + count, ..]).assign(&samples.theta);
        stats += samples.stats;
        refine += samples.refine.unwrap_or_default();
        start_time = samples.start_time; // the same for every batch: one set of options
        bar.inc(count as u64);
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok(Drawn { theta, seconds, stats, start_time, refine })
}

/// Most flow samples a manifest's `reference_metrics.flow_samples` may ask for by default.
pub const MAX_RECORDED_SAMPLES: usize = 1_000_000;

/// Flow samples to draw: `-n` when given, else the manifest's
/// `reference_metrics.flow_samples`, else [`DEFAULT_SAMPLES`].
pub(super) fn sample_count(model: &Model, n: Option<usize>) -> Result<usize> {
    if let Some(n) = n {
        return Ok(n);
    }
    // The manifest is input like any other: an absurd or malformed count is refused with
    // its field named (the user passed no -n to blame).
    match model.manifest().reference_metrics.get("flow_samples") {
        None => Ok(DEFAULT_SAMPLES),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| (1..=MAX_RECORDED_SAMPLES).contains(n))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "manifest reference_metrics.flow_samples = {v}: must be an integer in 1..={MAX_RECORDED_SAMPLES} \
                     (or choose with -n)"
                ))
            }),
    }
}

/// Class names from the manifest, or "0" … "C-1".
pub(super) fn class_names(model: &Model) -> Vec<String> {
    match &model.manifest().task {
        Task::Classification { classes, class_names } => {
            class_names.clone().unwrap_or_else(|| (0..*classes).map(|c| c.to_string()).collect())
        }
        Task::Regression { .. } => Vec::new(),
    }
}

pub fn run_predict(args: &PredictArgs) -> Result<()> {
    if let Some(path) = &args.output {
        output::check_path(path)?;
    }
    let model = args.model.open()?;
    let x = input::read_inputs(&args.input, model.input_dim())?;
    let (theta, source) = match &args.samples {
        Some(path) => {
            let theta = arrays::read_matrix(path, args.tensor.as_deref())?;
            if theta.nrows() == 0 {
                return Err(Error::invalid(format!("{}: no weight samples", path.display())));
            }
            if theta.ncols() != model.weight_dim() {
                return Err(Error::invalid(format!(
                    "{}: weights have {} columns, the model has D = {}",
                    path.display(),
                    theta.ncols(),
                    model.weight_dim()
                )));
            }
            (theta, json!({"file": path.display().to_string()}))
        }
        None => {
            let n = sample_count(&model, args.n)?;
            let options = args.solver.options(TraceMode::None);
            let drawn = draw(&model, n, &options, args.model.quiet)?;
            (drawn.theta, json!({"flow": {"seed": args.solver.seed}}))
        }
    };
    let prediction = model.predict(x.view(), theta.view(), None, &PredictOptions::default())?;
    let text = if args.json {
        let mut v = to_json(&model, &prediction);
        v["samples"] = json!(theta.nrows());
        v["source"] = source;
        let mut s = serde_json::to_string_pretty(&v).map_err(|e| Error::invalid(e.to_string()))?;
        s.push('\n');
        s
    } else {
        to_csv(&model, &prediction)
    };
    match &args.output {
        Some(path) => {
            output::write_file(path, text.as_bytes())?;
            if !args.model.quiet {
                eprintln!("wrote {} predictions ({} weight samples) to {}", x.nrows(), theta.nrows(), path.display());
            }
        }
        None => output::print_stdout(&text)?,
    }
    Ok(())
}

/// Index of the largest probability, the lowest on ties.
fn top_class(row: ArrayView1<'_, f64>) -> usize {
    let mut best = 0;
    for (c, &p) in row.iter().enumerate() {
        if p > row[best] {
            best = c;
        }
    }
    best
}

/// A CSV cell: quoted when it holds a comma, quote or line break.
fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Per input: classification `p_<class>…, predicted (the class name), total/aleatoric/epistemic entropy`;
/// regression `mean, total_var, aleatoric_var, epistemic_var` (suffixed `_j` when k > 1).
pub fn to_csv(model: &Model, prediction: &Prediction) -> String {
    let mut out = String::new();
    match prediction {
        Prediction::Classification(p) => {
            let names = class_names(model);
            let header: Vec<String> = names.iter().map(|n| csv_cell(&format!("p_{n}"))).collect();
            let _ = writeln!(out, "{},predicted,total_entropy,aleatoric_entropy,epistemic_entropy", header.join(","));
            for (n, row) in p.probs.rows().into_iter().enumerate() {
                let probs: Vec<String> = row.iter().map(|v| v.to_string()).collect();
                let _ = writeln!(
                    out,
                    "{},{},{},{},{}",
                    probs.join(","),
                    csv_cell(&names[top_class(row)]), // the class's name, as in the p_<class> header
                    p.total[n],
                    p.aleatoric[n],
                    p.epistemic[n]
                );
            }
        }
        Prediction::Regression(p) => {
            let k = p.mean.ncols();
            let suffix = |j: usize| if k == 1 { String::new() } else { format!("_{j}") };
            let header: Vec<String> = (0..k)
                .flat_map(|j| {
                    let sfx = suffix(j);
                    [
                        format!("mean{sfx}"),
                        format!("total_var{sfx}"),
                        format!("aleatoric_var{sfx}"),
                        format!("epistemic_var{sfx}"),
                    ]
                })
                .collect();
            let _ = writeln!(out, "{}", header.join(","));
            for n in 0..p.mean.nrows() {
                let cells: Vec<String> = (0..k)
                    .flat_map(|j| {
                        [p.mean[[n, j]], p.total[[n, j]], p.aleatoric[[n, j]], p.epistemic[[n, j]]]
                            .map(|v| v.to_string())
                    })
                    .collect();
                let _ = writeln!(out, "{}", cells.join(","));
            }
        }
    }
    out
}

/// `{"task", "classes"?, "ess", "predictions": [...]}`; see `to_csv` for the fields.
pub fn to_json(model: &Model, prediction: &Prediction) -> Value {
    match prediction {
        Prediction::Classification(p) => {
            let names = class_names(model);
            let predictions: Vec<Value> = (0..p.probs.nrows())
                .map(|n| {
                    let row = p.probs.row(n);
                    json!({
                        "probs": row.to_vec(),
                        "predicted": top_class(row),
                        "predicted_class": names[top_class(row)],
                        "entropy": {"total": p.total[n], "aleatoric": p.aleatoric[n], "epistemic": p.epistemic[n]},
                    })
                })
                .collect();
            json!({"task": "classification", "classes": class_names(model), "ess": p.ess, "predictions": predictions})
        }
        Prediction::Regression(p) => {
            let predictions: Vec<Value> = (0..p.mean.nrows())
                .map(|n| {
                    json!({
                        "mean": p.mean.row(n).to_vec(),
                        "variance": {
                            "total": p.total.row(n).to_vec(),
                            "aleatoric": p.aleatoric.row(n).to_vec(),
                            "epistemic": p.epistemic.row(n).to_vec(),
                        },
                    })
                })
                .collect();
            json!({"task": "regression", "ess": p.ess, "predictions": predictions})
        }
    }
}
