//! `postflow eval`: the flow's BMA (drawn now), the HMC BMA stored in the bundle and
//! the MAP net, side by side on the bundle's eval split, with the manifest's
//! `reference_metrics` beside them.
//!
//! Formulas are the ones of `metrics` and `bma` for every method: HMC from
//! `eval.hmc_probs` (or `eval.hmc_mean`/`eval.hmc_var`), MAP as a BMA over the single
//! sample `reference.theta` (its NLL from the log-softmax of the logits, which stays
//! finite where a probability underflows), the flow as a BMA over its samples.
//! The flow's sampling noise is estimated by a delete-a-group jackknife over
//! [`JACKKNIFE_GROUPS`] contiguous groups of samples.
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use ndarray::{Array2, ArrayView2, Axis};
use serde_json::{json, Map, Value};

use super::predict::{draw, sample_count};
use super::{output, plot, ModelArgs, RefineKernelArgs, SolverArg};
use crate::bundle::{EvalTargets, Task};
use crate::metrics::{nll_from_logits, ClassificationMetrics, RegressionMetrics};
use crate::{spread, Error, Model, PredictOptions, Prediction, Result, SampleOptions, SolverKind};

/// Groups of the delete-a-group jackknife for the flow metrics' standard errors.
pub const JACKKNIFE_GROUPS: usize = 10;

/// Start times of `--sweep` for a bundle whose manifest records no sweep of its own.
pub const SWEEP_START_TIMES: [f64; 7] = [0.0, 0.5, 0.8, 0.85, 0.9, 0.95, 1.0];
/// Most rows `--sweep` takes from a manifest's sweep (each row draws `n` samples).
const MAX_SWEEP_ROWS: usize = 32;
/// Refinement transitions of `--sweep` for a bundle with refinement whose manifest records
/// no refinement sweep of its own.
pub const SWEEP_TRANSITIONS: [u32; 5] = [0, 1, 2, 5, 10];

/// The spread columns (keys of `spread_of`) and their table headers.
const SPREAD_COLUMNS: [(&str, &str); 3] =
    [("memorization_ratio", "mem.ratio"), ("epistemic_ratio_eval", "epi.eval"), ("epistemic_ratio_ood", "epi.ood")];

/// Memorization ratio (with anchors) and epistemic ratios on the eval inputs and,
/// when the bundle has them, on `eval.ood_x`, of weight samples `theta`.
fn spread_of(model: &Model, held: &spread::HeldOut, theta: ArrayView2<f32>) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    if let Some(r) = held.memorization_ratio(model, theta) {
        m.insert("memorization_ratio".into(), json!(r));
    }
    // A held-out chain without spread (one draw) leaves the epistemic ratios undefined: "—".
    if let Some(r) = held.epistemic_ratio_eval(model, theta)? {
        m.insert("epistemic_ratio_eval".into(), json!(r));
    }
    if let Some(r) = held.epistemic_ratio_ood(model, theta)? {
        m.insert("epistemic_ratio_ood".into(), json!(r));
    }
    Ok(m)
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Flow samples (default: the manifest's reference_metrics.flow_samples, else 400).
    #[arg(short = 'n', long = "num-samples", allow_negative_numbers = true)]
    n: Option<usize>,
    /// Random seed (default: the manifest's reference_metrics.seed, else 0).
    #[arg(long, allow_negative_numbers = true)]
    seed: Option<u64>,
    /// ODE solver (default: reference_metrics.solver.method, else the bundle's).
    #[arg(long, value_enum)]
    solver: Option<SolverArg>,
    /// Steps of a fixed-step solver (default: reference_metrics.solver.steps, else the bundle's).
    #[arg(long, allow_negative_numbers = true)]
    steps: Option<u32>,
    /// Relative tolerance (dopri5).
    #[arg(long, allow_hyphen_values = true)]
    rtol: Option<f64>,
    /// Absolute tolerance (dopri5).
    #[arg(long, allow_hyphen_values = true)]
    atol: Option<f64>,
    /// Samples per ONNX Runtime call (0: default).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    batch: usize,
    /// Start time t0 in [0, 1] (default: the bundle's flow.default_start_time, else 0; refined
    /// samples: its refine.start_time when it has one).
    #[arg(long, value_name = "T0", allow_hyphen_values = true)]
    start_time: Option<f64>,
    /// HMC transitions on the posterior after drawing (default: the bundle's
    /// refine.default_transitions; 0 without refinement).
    #[arg(long, value_name = "K", allow_negative_numbers = true)]
    refine: Option<u32>,
    #[command(flatten)]
    kernel: RefineKernelArgs,
    /// Also evaluate every start time of the manifest's reference_metrics.start_time_sweep
    /// (without one: 0, 0.5, 0.8, 0.85, 0.9, 0.95, 1; only 0 without anchors), unrefined, beside
    /// its rows; and, for a bundle with refinement, every transition count of its
    /// reference_metrics.refine_sweep (without one: 0, 1, 2, 5, 10) at refinement's start time.
    #[arg(long)]
    sweep: bool,
    /// Machine-readable JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Write a reliability diagram (classification) or coverage plot (regression) as SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

/// A predictive on the eval split, in f64.
enum Predictive {
    Classification(Array2<f64>),
    Regression { mean: Array2<f64>, var: Array2<f64> },
}

fn predictive(p: &Prediction) -> Predictive {
    match p {
        Prediction::Classification(c) => Predictive::Classification(c.probs.clone()),
        Prediction::Regression(r) => Predictive::Regression { mean: r.mean.clone(), var: r.total.clone() },
    }
}

/// The metrics of one predictive as JSON; agreement and TV against HMC when `vs_hmc`.
fn metrics_of(p: &Predictive, targets: &EvalTargets, vs_hmc: bool) -> Result<Value> {
    let v = match (p, targets) {
        (Predictive::Classification(probs), EvalTargets::Classification { labels, hmc_probs }) => {
            let reference = vs_hmc.then(|| hmc_probs.view());
            serde_json::to_value(ClassificationMetrics::compute(probs, labels.as_slice(), reference)?)
        }
        (Predictive::Regression { mean, var }, EvalTargets::Regression { y, .. }) => {
            serde_json::to_value(RegressionMetrics::compute(mean, var, y)?)
        }
        _ => return Err(Error::invalid("predictive and eval targets are of different tasks")),
    };
    v.map_err(|e| Error::invalid(e.to_string()))
}

fn hmc_predictive(targets: &EvalTargets) -> Predictive {
    match targets {
        EvalTargets::Classification { hmc_probs, .. } => Predictive::Classification(hmc_probs.mapv(f64::from)),
        EvalTargets::Regression { hmc_mean, hmc_var, .. } => {
            Predictive::Regression { mean: hmc_mean.mapv(f64::from), var: hmc_var.mapv(f64::from) }
        }
    }
}

/// Delete-a-group jackknife standard errors of the flow metrics, or `None` with
/// fewer than two samples per group.
fn jackknife(
    model: &Model,
    x: ArrayView2<f32>,
    theta: ArrayView2<f32>,
    targets: &EvalTargets,
) -> Result<Option<Value>> {
    let s = theta.nrows();
    let g = JACKKNIFE_GROUPS;
    if s < 2 * g {
        return Ok(None);
    }
    let mut estimates: Vec<Map<String, Value>> = Vec::with_capacity(g);
    for k in 0..g {
        let (lo, hi) = (k * s / g, (k + 1) * s / g);
        let keep: Vec<usize> = (0..s).filter(|i| *i < lo || *i >= hi).collect();
        let sub = theta.select(Axis(0), &keep);
        let p = model.predict(x, sub.view(), None, &PredictOptions::default())?;
        match metrics_of(&predictive(&p), targets, true)? {
            Value::Object(m) => estimates.push(m),
            _ => unreachable!("metrics serialize to objects"),
        }
    }
    let mut se = Map::new();
    for key in estimates[0].keys() {
        let vals: Vec<f64> = estimates.iter().filter_map(|m| m.get(key).and_then(Value::as_f64)).collect();
        if vals.len() != g {
            continue;
        }
        let mean = vals.iter().sum::<f64>() / g as f64;
        let var = (g as f64 - 1.0) / g as f64 * vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>();
        se.insert(key.clone(), json!(var.sqrt()));
    }
    Ok(Some(Value::Object(se)))
}

fn extend(metrics: &mut Value, more: Map<String, Value>) {
    if let Value::Object(m) = metrics {
        m.extend(more);
    }
}

/// A sweep's rows: for each `(options, key)`, `key` extended by the averaged-prediction metrics
/// against HMC and the spread of `n` samples drawn with those options (`sweep_entry`).
fn run_rows(
    model: &Model,
    held: &spread::HeldOut,
    rows: impl IntoIterator<Item = (SampleOptions, Value)>,
    n: usize,
    targets: &EvalTargets,
    quiet: bool,
) -> Result<Value> {
    let rows: Result<Vec<Value>> =
        rows.into_iter().map(|(o, key)| sweep_entry(model, held, &o, n, targets, quiet, key)).collect();
    Ok(Value::Array(rows?))
}

/// The start-time sweep: every start time of `sweep_start_times` (only 0 without anchors),
/// unrefined, as the manifest's `start_time_sweep`.
fn start_time_rows(model: &Model, base: &SampleOptions) -> Vec<(SampleOptions, Value)> {
    sweep_start_times(model)
        .into_iter()
        .map(|t0| {
            let o = SampleOptions { start_time: Some(t0), refine_transitions: Some(0), ..base.clone() };
            (o, json!({"start_time": t0}))
        })
        .collect()
}

/// The refinement sweep: every transition count of `refine_sweep_transitions`, from samples at
/// refinement's start time (K = 0 included), as the manifest's `refine_sweep`.
fn refine_rows(model: &Model, base: &SampleOptions) -> Vec<(SampleOptions, Value)> {
    let t0 = model.default_refine_start_time();
    refine_sweep_transitions(model)
        .into_iter()
        .map(|k| {
            let o = SampleOptions { start_time: Some(t0), refine_transitions: Some(k), ..base.clone() };
            (o, json!({"transitions": k}))
        })
        .collect()
}

/// One sweep row: `key` plus the metrics against HMC and the spread of `n` samples.
fn sweep_entry(
    model: &Model,
    held: &spread::HeldOut,
    options: &SampleOptions,
    n: usize,
    targets: &EvalTargets,
    quiet: bool,
    mut row: Value,
) -> Result<Value> {
    let drawn = draw(model, n, options, quiet)?;
    let p = model.predict(model.tensors().eval_x.view(), drawn.theta.view(), None, &PredictOptions::default())?;
    extend(&mut row, metrics_of(&predictive(&p), targets, true)?.as_object().cloned().unwrap_or_default());
    extend(&mut row, spread_of(model, held, drawn.theta.view())?);
    if drawn.refine.transitions > 0 {
        extend(
            &mut row,
            Map::from_iter([
                ("acceptance".to_string(), json!(drawn.refine.acceptance_rate())),
                ("moved".to_string(), json!(drawn.refine.moved_fraction())),
            ]),
        );
    }
    Ok(row)
}

pub fn run_eval(args: &EvalArgs) -> Result<()> {
    if let Some(path) = &args.plot {
        output::check_path(path)?;
    }
    let model = args.model.open()?;
    let rm = model.manifest().reference_metrics.clone();
    let n = sample_count(&model, args.n)?;
    let seed = match (args.seed, rm.get("seed")) {
        (Some(seed), _) => seed,
        (None, None) => 0,
        // As flow_samples: a malformed recorded seed is named, not silently replaced by 0.
        (None, Some(v)) => v.as_u64().ok_or_else(|| {
            Error::invalid(format!(
                "manifest reference_metrics.seed = {v}: must be a non-negative integer (or choose with --seed)"
            ))
        })?,
    };
    let recorded_solver = rm.get("solver");
    let solver = match args.solver {
        Some(s) => Some(match s {
            SolverArg::Euler => SolverKind::Euler,
            SolverArg::Heun => SolverKind::Heun,
            SolverArg::Rk4 => SolverKind::Rk4,
            SolverArg::Dopri5 => SolverKind::Dopri5,
        }),
        None => match recorded_solver.and_then(|s| s.get("method")).and_then(Value::as_str) {
            Some(name) => Some(SolverKind::parse(name).map_err(|e| e.context("manifest reference_metrics.solver"))?),
            None => None,
        },
    };
    let steps = args.steps.or_else(|| {
        recorded_solver.and_then(|s| s.get("steps")).and_then(Value::as_u64).and_then(|s| u32::try_from(s).ok())
    });
    let options = SampleOptions {
        seed,
        solver,
        steps,
        rtol: args.rtol,
        atol: args.atol,
        batch_size: args.batch,
        start_time: args.start_time,
        refine_transitions: args.refine,
        ..args.kernel.apply(SampleOptions::default())
    };
    let default = model.default_solver();
    let kind = solver.unwrap_or(default.kind);
    let solver_json = if kind == SolverKind::Dopri5 {
        json!({"method": kind.name(), "rtol": args.rtol.unwrap_or(default.rtol), "atol": args.atol.unwrap_or(default.atol)})
    } else {
        json!({"method": kind.name(), "steps": steps.unwrap_or(default.steps)})
    };

    let drawn = draw(&model, n, &options, args.model.quiet)?;
    let start_time = drawn.start_time;
    let x = model.tensors().eval_x.view();
    let targets = model.tensors().eval.clone();
    let flow_pred = model.predict(x, drawn.theta.view(), None, &PredictOptions::default())?;
    let flow = predictive(&flow_pred);
    let hmc = hmc_predictive(&targets);
    let d = model.weight_dim();
    let reference = Array2::from_shape_vec((1, d), model.tensors().reference_theta.clone()).expect("[1, D]");
    let map = predictive(&model.predict(x, reference.view(), None, &PredictOptions::default())?);

    let held = spread::HeldOut::new(&model)?;
    let mut flow_metrics = metrics_of(&flow, &targets, true)?;
    extend(&mut flow_metrics, spread_of(&model, &held, drawn.theta.view())?);
    let hmc_metrics = metrics_of(&hmc, &targets, false)?;
    let mut map_metrics = metrics_of(&map, &targets, true)?;
    extend(&mut map_metrics, spread_of(&model, &held, reference.view())?);
    if let EvalTargets::Classification { labels, .. } = &targets {
        let logits = model.net_outputs(x, reference.view())?;
        map_metrics["nll"] = json!(nll_from_logits(logits.index_axis(Axis(0), 0), labels.as_slice())?);
    }
    let stderr = jackknife(&model, x, drawn.theta.view(), &targets)?;
    let quiet = args.model.quiet;
    let sweep = match args.sweep {
        true => Some(run_rows(&model, &held, start_time_rows(&model, &options), n, &targets, quiet)?),
        false => None,
    };
    let refine_sweep = match args.sweep && model.manifest().refine.is_some() {
        true => Some(run_rows(&model, &held, refine_rows(&model, &options), n, &targets, quiet)?),
        false => None,
    };

    let task_name = match model.manifest().task {
        Task::Classification { .. } => "classification",
        Task::Regression { .. } => "regression",
    };
    let report = json!({
        "bundle": model.dir().display().to_string(),
        "name": model.manifest().name,
        "task": task_name,
        "n_eval": x.nrows(),
        "flow": {
            "samples": n,
            "seed": seed,
            "start_time": start_time,
            "anchors": model.anchor_count(),
            "geometry": model.geometry().name(),
            "solver": solver_json,
            "seconds": drawn.seconds,
            "samples_per_second": n as f64 / drawn.seconds,
            "function_evaluations": drawn.stats.nfe,
            "refine_transitions": drawn.refine.transitions,
            "refine_acceptance": (drawn.refine.transitions > 0).then(|| drawn.refine.acceptance_rate()),
            "refine_moved": (drawn.refine.transitions > 0).then(|| drawn.refine.moved_fraction()),
            "refine_kernel": (drawn.refine.transitions > 0).then(|| drawn.refine.kernel.name()),
            "refine_leapfrog": (drawn.refine.transitions > 0).then_some(drawn.refine.leapfrog),
        },
        "methods": {"flow": flow_metrics, "hmc": hmc_metrics, "map": map_metrics},
        "flow_stderr": stderr,
        "sweep": sweep,
        "refine_sweep": refine_sweep,
        "reference_metrics": rm,
    });

    // The report first: a plot that cannot be written must not discard minutes of work.
    let text = if args.json {
        serde_json::to_string_pretty(&report).map_err(|e| Error::invalid(e.to_string()))? + "\n"
    } else {
        eval_text(&model, &report)
    };
    output::print_stdout(&text)?;
    if let Some(path) = &args.plot {
        let name = &model.manifest().name;
        let series = [("flow BMA", &flow), ("HMC BMA", &hmc), ("MAP", &map)];
        match &targets {
            EvalTargets::Classification { labels, .. } => {
                let probs: Vec<(&str, &Array2<f64>)> = series
                    .iter()
                    .filter_map(|&(label, p)| match p {
                        Predictive::Classification(probs) => Some((label, probs)),
                        Predictive::Regression { .. } => None,
                    })
                    .collect();
                plot::reliability(path, name, labels, &probs)?;
            }
            EvalTargets::Regression { y, .. } => {
                let mean_var: Vec<(&str, &Array2<f64>, &Array2<f64>)> = series
                    .iter()
                    .filter_map(|&(label, p)| match p {
                        Predictive::Regression { mean, var } => Some((label, mean, var)),
                        Predictive::Classification(_) => None,
                    })
                    .collect();
                plot::coverage(path, name, y, &mean_var)?;
            }
        }
        if !args.model.quiet {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

fn eval_text(model: &Model, r: &Value) -> String {
    let mut o = String::new();
    let task = &model.manifest().task;
    let what = match task {
        Task::Classification { classes, .. } => format!("classification, {classes} classes"),
        Task::Regression { outputs, .. } => format!("regression, {outputs} output(s)"),
    };
    let _ = writeln!(o, "{} ({what}): {} eval inputs", r["name"].as_str().unwrap_or(""), r["n_eval"]);
    let f = &r["flow"];
    let solver = &f["solver"];
    let solver_text = match solver.get("steps") {
        Some(steps) => format!("{} {steps} steps", solver["method"].as_str().unwrap_or("")),
        None => format!("{} rtol {} atol {}", solver["method"].as_str().unwrap_or(""), solver["rtol"], solver["atol"]),
    };
    let t0 = f["start_time"].as_f64().unwrap_or(0.0);
    let _ = writeln!(
        o,
        "flow: {} samples (seed {}, {solver_text}, start time {t0}) in {:.2} s: {:.0} posterior samples/s",
        f["samples"],
        f["seed"],
        f["seconds"].as_f64().unwrap_or(0.0),
        f["samples_per_second"].as_f64().unwrap_or(0.0)
    );
    let sphere = f["geometry"].as_str() == Some("sphere_product");
    let k = f["refine_transitions"].as_u64().unwrap_or(0);
    let anchors = f["anchors"].as_u64().unwrap_or(0);
    let at_refine_start = t0 == model.default_refine_start_time();
    if k > 0 && t0 == 1.0 {
        let _ = writeln!(o, "start time 1: from the {anchors} stored posterior draws themselves");
    } else {
        let _ = writeln!(o, "{}", start_time_note(t0, anchors, sphere));
    }
    if k > 0 {
        let _ = writeln!(
            o,
            "refined: {k} HMC transitions per sample ({} kernel, {} leapfrog steps each) on the bundle's posterior \
             graph (acceptance {:.3}): fresh posterior draws started from these samples\nmoved: {:.1} % of the \
             samples; the others are their start unchanged (every transition rejected)",
            f["refine_kernel"].as_str().unwrap_or("endpoint"),
            f["refine_leapfrog"].as_u64().unwrap_or(0),
            f["refine_acceptance"].as_f64().unwrap_or(f64::NAN),
            100.0 * f["refine_moved"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let _ = writeln!(o);
    let recorded = r["reference_metrics"].get("methods").and_then(Value::as_object);
    let manifest_sweep = r["reference_metrics"].get("start_time_sweep").and_then(Value::as_array);
    let manifest_refine_sweep = r["reference_metrics"].get("refine_sweep").and_then(Value::as_array);
    let mut rows: Vec<(String, Value)> = Vec::new();
    let labels = [("flow", "flow BMA"), ("hmc", "HMC BMA"), ("map", "MAP")];
    for (key, label) in labels {
        rows.push((label.to_string(), r["methods"][key].clone()));
        if key == "flow" {
            if let Some(se) = r["flow_stderr"].as_object() {
                let se: Map<String, Value> = se
                    .iter()
                    .map(|(k, v)| (k.clone(), json!(format!("±{}", fmt_num(v.as_f64().unwrap_or(0.0))))))
                    .collect();
                rows.push(("  ± jackknife SE".to_string(), Value::Object(se)));
            }
        }
        // The manifest's flow row is for start time 0 unrefined; at another start time its sweep
        // row is the match, and refined samples match its refinement sweep (recorded at
        // refinement's start time only).
        let manifest_row = match key {
            "flow" if k > 0 && !at_refine_start => None,
            "flow" if k > 0 => manifest_refine_sweep.and_then(|rows| refine_row(rows, k)),
            "flow" if t0 != 0.0 => manifest_sweep.and_then(|rows| sweep_row(rows, t0)),
            _ => recorded.and_then(|m| m.get(key)),
        };
        if let Some(m) = manifest_row {
            rows.push(("  manifest".to_string(), m.clone()));
        }
    }
    if let Some(m) = recorded {
        for (key, v) in m.iter().filter(|(k, _)| !matches!(k.as_str(), "flow" | "hmc" | "map")) {
            rows.push((format!("{key} (manifest)"), v.clone()));
        }
    }
    o.push_str(&metrics_table(task, &rows));
    let _ = writeln!(o);
    let recorded_spread = if k > 0 {
        manifest_refine_sweep.filter(|_| at_refine_start).and_then(|rows| refine_row(rows, k))
    } else {
        manifest_sweep.and_then(|rows| sweep_row(rows, t0))
    };
    let mut spread_rows = vec![("flow BMA".to_string(), r["methods"]["flow"].clone())];
    if let Some(m) = recorded_spread {
        spread_rows.push(("  manifest".to_string(), m.clone()));
    }
    spread_rows.push((
        "HMC (held-out chain)".to_string(),
        json!({"epistemic_ratio_eval": 1.0, "epistemic_ratio_ood": 1.0, "memorization_ratio": 1.0}),
    ));
    spread_rows.push(("MAP".to_string(), r["methods"]["map"].clone()));
    o.push_str(&table(&SPREAD_COLUMNS, &spread_rows));
    let _ = writeln!(
        o,
        "spread: mem.ratio = median distance (whitened) from samples to the nearest stored draw, over the same for \
         the held-out HMC chain; epi.eval/epi.ood = mean epistemic uncertainty (classification: mutual \
         information; regression: variance of the means) over the held-out chain's, on the eval and OOD inputs"
    );
    if let Some(rows) = r["sweep"].as_array() {
        let _ =
            writeln!(o, "\nstart-time sweep (this runtime; manifest rows from reference_metrics.start_time_sweep):");
        let mut sweep_rows = Vec::new();
        let mut marked = false;
        for row in rows {
            let t = row["start_time"].as_f64().unwrap_or(f64::NAN);
            let is_t0 = (t - t0).abs() < 1e-12;
            marked |= is_t0;
            let mark = if is_t0 { " *" } else { "" };
            sweep_rows.push((format!("t0 = {t}{mark}"), row.clone()));
            if let Some(m) = manifest_sweep.and_then(|rows| sweep_row(rows, t)) {
                sweep_rows.push(("  manifest".to_string(), m.clone()));
            }
        }
        o.push_str(&table(&sweep_columns(task), &sweep_rows));
        // A start time off the sweep marks no row, so there is nothing to explain.
        if marked {
            let _ = writeln!(o, "* the start time used above");
        }
    }
    if let Some(rows) = r["refine_sweep"].as_array() {
        let t0 = model.default_refine_start_time();
        let _ = writeln!(
            o,
            "\nrefinement sweep at refinement's start time {t0} (HMC transitions on the posterior; this runtime; \
             manifest rows from reference_metrics.refine_sweep):"
        );
        let mut sweep_rows = Vec::new();
        for row in rows {
            let transitions = row["transitions"].as_u64().unwrap_or(0);
            let mark = if transitions == k { " *" } else { "" };
            sweep_rows.push((format!("K = {transitions}{mark}"), row.clone()));
            if let Some(m) = manifest_refine_sweep.and_then(|rows| refine_row(rows, transitions)) {
                sweep_rows.push(("  manifest".to_string(), m.clone()));
            }
        }
        let columns: Vec<(&str, &str)> =
            sweep_columns(task).into_iter().chain([("acceptance", "acceptance")]).collect();
        o.push_str(&table(&columns, &sweep_rows));
        let _ = writeln!(o, "* the transitions used above");
    }
    let rm = &r["reference_metrics"];
    if let (Some(_), Some(fs)) = (recorded, rm.get("flow_samples")) {
        let mut note = format!("\nmanifest flow metrics: {fs} samples");
        if let Some(seed) = rm.get("seed") {
            let _ = write!(note, ", seed {seed}");
        }
        if let Some(s) = rm.get("solver") {
            let _ = write!(note, ", {}", s["method"].as_str().unwrap_or("?"));
            if let Some(steps) = s.get("steps") {
                let _ = write!(note, " {steps} steps");
            }
        }
        let _ = writeln!(o, "{note} (the pipeline's own sampler: expect agreement within sampling noise)");
    }
    o
}

fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    if x.abs() >= 1000.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.4}")
    }
}

/// The start times `--sweep` evaluates: those of the manifest's own sweep
/// (`reference_metrics.start_time_sweep`, so every recorded row gets the runtime's beside it),
/// else `SWEEP_START_TIMES`; only 0 without anchors. The manifest is input like any other:
/// values outside [0, 1] or not numbers are skipped, and at most `MAX_SWEEP_ROWS` are taken.
fn sweep_start_times(model: &Model) -> Vec<f64> {
    if model.anchor_count() == 0 {
        return vec![0.0];
    }
    let mut times: Vec<f64> = model
        .manifest()
        .reference_metrics
        .get("start_time_sweep")
        .and_then(Value::as_array)
        .map(|rows| {
            rows.iter()
                .filter_map(|r| r.get("start_time").and_then(Value::as_f64))
                .filter(|t| (0.0..=1.0).contains(t))
                .take(MAX_SWEEP_ROWS)
                .collect()
        })
        .unwrap_or_default();
    times.sort_by(f64::total_cmp);
    times.dedup();
    if times.is_empty() {
        times = SWEEP_START_TIMES.to_vec();
    }
    times
}

/// The columns of a sweep table: the averaged prediction against HMC, then the spread.
fn sweep_columns(task: &Task) -> Vec<(&'static str, &'static str)> {
    let metrics = match task {
        Task::Classification { .. } => vec![("tv", "tv"), ("nll", "nll"), ("ece", "ece"), ("agreement", "agreement")],
        Task::Regression { .. } => vec![("nll", "nll"), ("rmse", "rmse"), ("coverage90", "coverage90")],
    };
    metrics.into_iter().chain(SPREAD_COLUMNS).collect()
}

/// The transition counts of the refinement sweep: the manifest's own
/// (`reference_metrics.refine_sweep`), else `SWEEP_TRANSITIONS`, at most `MAX_SWEEP_ROWS`, each
/// within the sampler's limit.
fn refine_sweep_transitions(model: &Model) -> Vec<u32> {
    let mut ks: Vec<u32> = model
        .manifest()
        .reference_metrics
        .get("refine_sweep")
        .and_then(Value::as_array)
        .map(|rows| {
            rows.iter()
                .filter_map(|r| r.get("transitions").and_then(Value::as_u64))
                .filter_map(|k| u32::try_from(k).ok())
                .filter(|k| *k <= crate::bundle::MAX_TRANSITIONS)
                .take(MAX_SWEEP_ROWS)
                .collect()
        })
        .unwrap_or_default();
    ks.sort_unstable();
    ks.dedup();
    if ks.is_empty() {
        ks = SWEEP_TRANSITIONS.to_vec();
    }
    ks
}

/// The row of a manifest refinement sweep with `k` transitions.
fn refine_row(rows: &[Value], k: u64) -> Option<&Value> {
    rows.iter().find(|r| r.get("transitions").and_then(Value::as_u64) == Some(k))
}

/// The row of a manifest sweep (`reference_metrics.start_time_sweep`) at start time `t0`.
fn sweep_row(rows: &[Value], t0: f64) -> Option<&Value> {
    rows.iter().find(|r| r.get("start_time").and_then(Value::as_f64).is_some_and(|t| (t - t0).abs() < 1e-9))
}

/// One line on what the start time means for the samples.
fn start_time_note(t0: f64, anchors: u64, sphere: bool) -> String {
    if t0 == 0.0 {
        let base = if sphere { "the uniform base on the unit spheres (N(0, I) elsewhere)" } else { "N(0, I)" };
        format!("start time 0: fresh flow samples from {base} ({anchors} stored draws in the bundle)")
    } else if t0 == 1.0 {
        format!("start time 1: the {anchors} stored posterior draws themselves (the exact HMC average of those draws)")
    } else if sphere {
        format!(
            "start time {t0}: each sample starts at slerp(z, a; {t0}) on every unit sphere ({t0}·a + {:.2}·z \
             elsewhere) around one of the {anchors} stored draws a; near 1 the samples are close copies of stored \
             draws (see mem.ratio)",
            1.0 - t0
        )
    } else {
        format!(
            "start time {t0}: each sample starts at {t0}·a + {:.2}·z around one of the {anchors} stored draws a; \
             near 1 the samples are close copies of stored draws (see mem.ratio)",
            1.0 - t0
        )
    }
}

/// A text table of metrics: one row per (label, JSON object of metric → number or text).
pub(super) fn metrics_table(task: &Task, rows: &[(String, Value)]) -> String {
    let columns: &[(&str, &str)] = match task {
        Task::Classification { .. } => &[
            ("accuracy", "accuracy"),
            ("nll", "nll"),
            ("ece", "ece"),
            ("brier", "brier"),
            ("agreement", "agreement"),
            ("tv", "tv"),
        ],
        Task::Regression { .. } => &[("rmse", "rmse"), ("nll", "nll"), ("coverage90", "coverage90")],
    };
    table(columns, rows)
}

/// A text table: `columns` are (JSON key, header) pairs; one row per (label, JSON object).
fn table(columns: &[(&str, &str)], rows: &[(String, Value)]) -> String {
    let label_width = rows.iter().map(|(l, _)| l.chars().count()).max().unwrap_or(6).max(6);
    let mut o = String::new();
    let _ = write!(o, "{:<label_width$}", "method");
    for (_, header) in columns {
        let _ = write!(o, " {header:>10}");
    }
    o.push('\n');
    for (label, values) in rows {
        let _ = write!(o, "{label:<label_width$}");
        for (c, _) in columns {
            let cell = match values.get(*c) {
                Some(Value::Number(n)) => fmt_num(n.as_f64().unwrap_or(f64::NAN)),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) => "inf/nan".to_string(),
                _ => "—".to_string(),
            };
            let _ = write!(o, " {cell:>10}");
        }
        o.push('\n');
    }
    o
}
