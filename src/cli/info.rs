//! `postflow info`: what a bundle holds, without starting ONNX Runtime.
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use serde_json::{json, Value};

use super::eval::metrics_table;
use crate::bundle::{Bundle, Limits, Manifest, Noise, Task};
use crate::geometry::Geometry;
use crate::{Error, Result};

#[derive(Args)]
pub struct InfoArgs {
    /// Bundle folder.
    bundle: PathBuf,
    /// Machine-readable JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run_info(args: &InfoArgs) -> Result<()> {
    let bundle = Bundle::open(&args.bundle, &Limits::default())?;
    let v = info_json(&bundle);
    let text = if args.json {
        serde_json::to_string_pretty(&v).map_err(|e| Error::invalid(e.to_string()))? + "\n"
    } else {
        info_text(&bundle, &v)
    };
    super::output::print_stdout(&text)
}

fn task_json(task: &Task) -> Value {
    match task {
        Task::Classification { classes, class_names } => json!({
            "kind": "classification",
            "classes": classes,
            "class_names": class_names.clone().unwrap_or_else(|| (0..*classes).map(|c| c.to_string()).collect()),
        }),
        Task::Regression { outputs, noise } => json!({
            "kind": "regression",
            "outputs": outputs,
            "noise": match noise {
                Noise::Homoscedastic { sigma } => json!({"kind": "homoscedastic", "sigma": sigma}),
                Noise::Heteroscedastic => json!({"kind": "heteroscedastic"}),
            },
        }),
    }
}

fn info_json(bundle: &Bundle) -> Value {
    let m: &Manifest = &bundle.manifest;
    let graph = |spec: &crate::bundle::manifest::GraphSpec, bytes: usize| json!({"file": spec.file, "inputs": spec.inputs, "outputs": spec.outputs, "bytes": bytes});
    let layers: Vec<Value> = m
        .network
        .layers
        .iter()
        .map(|l| json!({"in": l.inputs, "out": l.outputs, "activation": l.activation}))
        .collect();
    json!({
        "bundle": bundle.dir.display().to_string(),
        "name": m.name,
        "description": m.description,
        "format_version": m.format_version,
        "task": task_json(&m.task),
        "dimensions": {
            "d_in": m.input.dim,
            "D": m.network.dim,
            "C": m.task.net_outputs(),
        },
        "feature_names": m.input.feature_names,
        "network": layers,
        "geometry": geometry_json(&bundle.geometry),
        "graphs": {
            "flow": graph(&m.graphs.flow, bundle.graphs.flow.len()),
            "flow_jvp": graph(&m.graphs.flow_jvp, bundle.graphs.flow_jvp.len()),
            "net": graph(&m.graphs.net, bundle.graphs.net.len()),
        },
        "tensors": {
            "file": m.tensors,
            "posterior_samples": bundle.tensors.posterior_theta.nrows(),
            "anchors": anchor_count(bundle),
            "eval_inputs": bundle.tensors.eval_x.nrows(),
        },
        "default_start_time": m.default_start_time(),
        "refine": m.refine.as_ref().map(|r| json!({
            "graph": {"file": r.graph, "bytes": bundle.graphs.posterior.as_ref().map_or(0, Vec::len)},
            "leapfrog_steps": r.leapfrog_steps,
            "step_size": r.step_size,
            "default_transitions": r.default_transitions,
            "start_time": m.default_refine_start_time(),
            "canonical": bundle.tensors.refine.as_ref().is_some_and(|t| t.anchor_unit_norms.is_some()),
        })),
        "default_solver": m.flow.default_solver,
        "hutchinson": m.flow.hutchinson,
        "provenance": m.provenance,
        "reference_metrics": m.reference_metrics,
    })
}

/// Stored anchor draws (`flow.anchors`), 0 without.
fn anchor_count(bundle: &Bundle) -> usize {
    bundle.tensors.anchors.as_ref().map_or(0, |a| a.nrows())
}

/// `flow.geometry` and what it makes of the weights: how many unit spheres (one per
/// hidden unit, `S^{in}` each) and how many Euclidean coordinates remain.
fn geometry_json(g: &Geometry) -> Value {
    let mut dims: Vec<(usize, usize)> = Vec::new(); // (sphere dimension k − 1, count), in layout order
    for s in g.spheres() {
        match dims.last_mut() {
            Some((k, n)) if *k == s.k() - 1 => *n += 1,
            _ => dims.push((s.k() - 1, 1)),
        }
    }
    json!({
        "kind": g.name(),
        "spheres": g.spheres().len(),
        "sphere_factors": dims.iter().map(|(k, n)| json!({"sphere": format!("S^{k}"), "count": n})).collect::<Vec<_>>(),
        "sphere_coordinates": g.sphere_coordinates(),
        "euclidean_coordinates": g.euclidean_coordinates(),
    })
}

/// `key.sub: value` lines for a JSON object, arrays of scalars inline.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        Value::Array(items) if items.iter().any(|i| i.is_object() || i.is_array()) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// A manifest string as one line of plain text: control characters (newlines, terminal
/// escape sequences) are shown escaped, so a bundle cannot forge lines or drive the terminal.
fn plain(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

fn info_text(bundle: &Bundle, v: &Value) -> String {
    let m = &bundle.manifest;
    let mut o = String::new();
    let _ = writeln!(o, "bundle       {}", bundle.dir.display());
    let _ = writeln!(o, "name         {}", plain(&m.name));
    if !m.description.is_empty() {
        let _ = writeln!(o, "description  {}", plain(&m.description));
    }
    let task = match &m.task {
        Task::Classification { classes, .. } => {
            let names: Vec<String> = v["task"]["class_names"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| plain(n.as_str().unwrap_or("")))
                .collect();
            format!("classification, {classes} classes ({})", names.join(", "))
        }
        Task::Regression { outputs, noise } => match noise {
            Noise::Homoscedastic { sigma } => {
                format!("regression, {outputs} output(s), homoscedastic noise σ = {sigma}")
            }
            Noise::Heteroscedastic => {
                format!("regression, {outputs} output(s), heteroscedastic noise (net predicts log σ²)")
            }
        },
    };
    let _ = writeln!(o, "task         {task}");
    let _ = writeln!(
        o,
        "dimensions   d_in = {}, D = {} weights, C = {} net outputs",
        m.input.dim,
        m.network.dim,
        m.task.net_outputs()
    );
    if let Some(names) = &m.input.feature_names {
        let shown: Vec<String> = names.iter().take(8).map(|n| plain(n)).collect();
        let more = if names.len() > 8 { format!(", … ({} more)", names.len() - 8) } else { String::new() };
        let _ = writeln!(o, "features     {}{more}", shown.join(", "));
    }
    let mut arch = m.input.dim.to_string();
    for l in &m.network.layers {
        let act = match l.activation {
            crate::bundle::Activation::Relu => "relu",
            crate::bundle::Activation::Identity => "identity",
        };
        let _ = write!(arch, " → {} ({act})", l.outputs);
    }
    let _ = writeln!(o, "network      {arch}");
    let g = &bundle.geometry;
    if g.is_euclidean() {
        let _ = writeln!(o, "geometry     {} (R^{})", g.name(), g.dim());
    } else {
        let factors: Vec<String> = v["geometry"]["sphere_factors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| format!("{} × {}", f["count"], f["sphere"].as_str().unwrap_or("?")))
            .collect();
        let _ = writeln!(
            o,
            "geometry     {}: {} unit spheres ({}) and R^{}; each hidden unit's (w, b) on its sphere",
            g.name(),
            g.spheres().len(),
            factors.join(", "),
            g.euclidean_coordinates()
        );
    }
    let graphs = [
        ("flow", &m.graphs.flow, bundle.graphs.flow.len()),
        ("flow_jvp", &m.graphs.flow_jvp, bundle.graphs.flow_jvp.len()),
        ("net", &m.graphs.net, bundle.graphs.net.len()),
    ];
    for (i, (name, spec, bytes)) in graphs.iter().enumerate() {
        let _ = writeln!(
            o,
            "{}{name:<9} {} ({}): ({}) → ({})",
            if i == 0 { "graphs       " } else { "             " },
            spec.file,
            human_bytes(*bytes),
            spec.inputs.join(", "),
            spec.outputs.join(", ")
        );
    }
    let anchors = anchor_count(bundle);
    let _ = writeln!(
        o,
        "tensors      {}: posterior.theta {} samples, {anchors} anchor draws, eval split {} inputs",
        plain(&m.tensors),
        bundle.tensors.posterior_theta.nrows(),
        bundle.tensors.eval_x.nrows()
    );
    let t0 = m.default_start_time();
    let what = if anchors == 0 {
        "fresh flow samples (no anchor draws to start from)".to_string()
    } else if t0 == 0.0 {
        "fresh flow samples; --start-time in (0, 1] starts around the anchor draws".to_string()
    } else if t0 == 1.0 {
        format!("the {anchors} stored anchor draws themselves")
    } else {
        format!("flow samples started around the {anchors} anchor draws")
    };
    let _ = writeln!(o, "start time   {t0} by default: {what}");
    if let Some(r) = &m.refine {
        let refine_t0 = m.default_refine_start_time();
        let _ = writeln!(
            o,
            "refinement   {} HMC transitions by default (draws without log-densities; --refine K), {} leapfrog steps \
             of {} on the posterior graph {}, from start time {}{}",
            r.default_transitions,
            r.leapfrog_steps,
            r.step_size,
            plain(&r.graph),
            refine_t0,
            if refine_t0 == 1.0 { " (the stored draws)" } else { "" }
        );
    }
    let s = &m.flow.default_solver;
    let mut solver = format!("{}, {} steps", s.method, s.steps);
    if let Some(r) = s.rtol {
        let _ = write!(solver, ", rtol {r}");
    }
    if let Some(a) = s.atol {
        let _ = write!(solver, ", atol {a}");
    }
    let _ = writeln!(o, "solver       {solver}");
    let _ = writeln!(o, "hutchinson   {} probe(s), {} noise", m.flow.hutchinson.probes, m.flow.hutchinson.noise);
    let mut prov = Vec::new();
    flatten("", &m.provenance, &mut prov);
    if !prov.is_empty() {
        let _ = writeln!(o, "provenance");
        for (k, v) in prov {
            let _ = writeln!(o, "  {}: {}", plain(&k), plain(&v));
        }
    }
    if let Some(methods) = m.reference_metrics.get("methods").and_then(Value::as_object) {
        let rm = &m.reference_metrics;
        let mut head = String::from("reference metrics");
        if let Some(split) = rm.get("split").and_then(Value::as_str) {
            let _ = write!(head, " on the {split} split");
        }
        if let Some(n) = rm.get("n") {
            let _ = write!(head, " (n = {n})");
        }
        if let Some(fs) = rm.get("flow_samples") {
            let _ = write!(head, "; flow: {fs} samples");
            if let Some(seed) = rm.get("seed") {
                let _ = write!(head, ", seed {seed}");
            }
            if let Some(sv) = rm.get("solver") {
                let method = sv.get("method").and_then(Value::as_str).unwrap_or("?");
                let _ = write!(head, ", {method}");
                if let Some(steps) = sv.get("steps") {
                    let _ = write!(head, " {steps} steps");
                }
            }
        }
        let _ = writeln!(o, "{head}");
        let rows: Vec<(String, Value)> = methods.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        o.push_str(&metrics_table(&m.task, &rows));
    }
    o
}

fn human_bytes(n: usize) -> String {
    if n < 1 << 10 {
        format!("{n} B")
    } else if n < 1 << 20 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    }
}
