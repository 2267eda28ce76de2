//! Opening a bundle folder: manifest, tensors and graph bytes, all validated
//! against `docs/bundle-format.md` before anything else touches them.
mod files;
pub mod manifest;
pub mod tensors;

use std::path::{Path, PathBuf};

pub use manifest::{Activation, Manifest, Noise, Task};
pub use tensors::{BundleTensors, EvalTargets};

use crate::geometry::Geometry;
use crate::{Error, Result};

/// Size limits checked before any allocation that a bundle's declarations drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_weight_dim: usize,
    pub max_input_dim: usize,
    pub max_outputs: usize,
    pub max_layers: usize,
    pub max_manifest_bytes: u64,
    pub max_tensors_bytes: u64,
    pub max_graph_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_weight_dim: 50_000_000,
            max_input_dim: 1_000_000,
            max_outputs: 1_000_000,
            max_layers: 1_000,
            max_manifest_bytes: 16 << 20,
            max_tensors_bytes: 4 << 30,
            max_graph_bytes: 2 << 30,
        }
    }
}

/// The ONNX graph files of a bundle, read into memory at open so a loaded
/// model does not depend on the folder afterwards.
#[derive(Debug, Clone)]
pub struct GraphBytes {
    pub flow: Vec<u8>,
    pub flow_jvp: Vec<u8>,
    pub net: Vec<u8>,
    /// The posterior's log-density and gradient (`refine.graph`, format version 3).
    pub posterior: Option<Vec<u8>>,
}

/// A validated bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub tensors: BundleTensors,
    pub graphs: GraphBytes,
    /// Which coordinates form unit spheres (`flow.geometry`).
    pub geometry: Geometry,
}

pub const MANIFEST_FILE: &str = "postflow.json";

impl Bundle {
    pub fn open(dir: impl AsRef<Path>, limits: &Limits) -> Result<Bundle> {
        let dir = dir.as_ref();
        let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, &e))?;
        if !meta.is_dir() {
            return Err(Error::bundle(format!("{} is not a bundle folder", dir.display())));
        }
        let manifest_path = files::resolve_in_bundle(dir, MANIFEST_FILE, "manifest")
            .map_err(|e| e.context(format!("bundle {}", dir.display())))?;
        let bytes = files::read_limited(&manifest_path, limits.max_manifest_bytes, "manifest")?;
        let manifest = parse_manifest(&bytes, limits)?;

        let tensors_path = files::resolve_in_bundle(dir, &manifest.tensors, "tensors")?;
        let tensor_bytes = files::read_limited(&tensors_path, limits.max_tensors_bytes, "tensors")?;
        // The geometry comes out of the tensors' checks, built once they have confirmed D.
        let (tensors, geometry) = BundleTensors::parse_with_geometry(&tensor_bytes, &manifest)?;
        drop(tensor_bytes);

        let read_graph = |field: &str, file: &str| -> Result<Vec<u8>> {
            let path = files::resolve_in_bundle(dir, file, field)?;
            files::read_limited(&path, limits.max_graph_bytes, field)
        };
        let graphs = GraphBytes {
            flow: read_graph("graphs.flow.file", &manifest.graphs.flow.file)?,
            flow_jvp: read_graph("graphs.flow_jvp.file", &manifest.graphs.flow_jvp.file)?,
            net: read_graph("graphs.net.file", &manifest.graphs.net.file)?,
            posterior: match &manifest.refine {
                Some(r) => Some(read_graph("refine.graph", &r.graph)?),
                None => None,
            },
        };
        Ok(Bundle { dir: dir.to_path_buf(), manifest, tensors, graphs, geometry })
    }
}

/// Parse `postflow.json` and check every rule that involves only the manifest.
pub fn parse_manifest(bytes: &[u8], limits: &Limits) -> Result<Manifest> {
    // Check the format tag first so a foreign JSON file gets the clearest message.
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| Error::bundle(format!("manifest: not valid JSON: {e}")))?;
    match value.get("format").and_then(|f| f.as_str()) {
        Some(manifest::FORMAT) => {}
        Some(other) => {
            return Err(Error::bundle(format!(
                "manifest field format: unknown format {other:?}, expected {:?}",
                manifest::FORMAT
            )))
        }
        None => return Err(Error::bundle("manifest field format: missing or not a string")),
    }
    match value.get("format_version").and_then(|v| v.as_u64()) {
        Some(v) if (manifest::MIN_FORMAT_VERSION..=manifest::FORMAT_VERSION).contains(&v) => {}
        Some(v) => {
            return Err(Error::bundle(format!(
                "manifest field format_version: unsupported version {v}, this runtime reads versions {} to {}",
                manifest::MIN_FORMAT_VERSION,
                manifest::FORMAT_VERSION
            )))
        }
        None => return Err(Error::bundle("manifest field format_version: missing or not an integer")),
    }
    let manifest: Manifest = serde_json::from_value(value).map_err(|e| Error::bundle(format!("manifest: {e}")))?;
    validate_manifest(&manifest, limits)?;
    Ok(manifest)
}

fn field_err(field: &str, msg: impl std::fmt::Display) -> Error {
    Error::bundle(format!("manifest field {field}: {msg}"))
}

fn validate_manifest(m: &Manifest, limits: &Limits) -> Result<()> {
    if m.name.trim().is_empty() {
        return Err(field_err("name", "must not be empty"));
    }
    let d = m.network.dim;
    if d == 0 || d > limits.max_weight_dim {
        return Err(field_err(
            "network.dim",
            format!("{d} is outside [1, {}] (Limits::max_weight_dim)", limits.max_weight_dim),
        ));
    }
    if m.flow.dim != d {
        return Err(field_err("flow.dim", format!("{} disagrees with network.dim {d}", m.flow.dim)));
    }
    let d_in = m.input.dim;
    if d_in == 0 || d_in > limits.max_input_dim {
        return Err(field_err(
            "input.dim",
            format!("{d_in} is outside [1, {}] (Limits::max_input_dim)", limits.max_input_dim),
        ));
    }
    if let Some(names) = &m.input.feature_names {
        if names.len() != d_in {
            return Err(field_err("input.feature_names", format!("has {} names for input.dim {d_in}", names.len())));
        }
    }
    match &m.task {
        Task::Classification { classes, class_names } => {
            if *classes < 2 || *classes > limits.max_outputs {
                return Err(field_err("task.classes", format!("{classes} is outside [2, {}]", limits.max_outputs)));
            }
            if let Some(names) = class_names {
                if names.len() != *classes {
                    return Err(field_err(
                        "task.class_names",
                        format!("has {} names for {classes} classes", names.len()),
                    ));
                }
            }
        }
        Task::Regression { outputs, noise } => {
            if *outputs == 0 || *outputs > limits.max_outputs {
                return Err(field_err("task.outputs", format!("{outputs} is outside [1, {}]", limits.max_outputs)));
            }
            if let Noise::Homoscedastic { sigma } = noise {
                if !(sigma.is_finite() && *sigma > 0.0) {
                    return Err(field_err("task.noise.sigma", format!("{sigma} must be finite and > 0")));
                }
            }
        }
    }
    validate_layers(m, limits)?;

    if m.flow.base != "standard_normal" {
        return Err(field_err("flow.base", format!("{:?} is not supported (only \"standard_normal\")", m.flow.base)));
    }
    if m.flow.time != [0.0, 1.0] {
        return Err(field_err("flow.time", format!("{:?} is not supported (only [0, 1])", m.flow.time)));
    }
    crate::geometry::Geometry::check_manifest(m)?;
    crate::ode::SolverKind::parse(&m.flow.default_solver.method)
        .map_err(|e| field_err("flow.default_solver.method", e.message()))?;
    let steps = m.flow.default_solver.steps;
    if steps == 0 || steps > crate::sampler::MAX_STEPS {
        return Err(field_err(
            "flow.default_solver.steps",
            format!("{steps} is outside [1, {}]", crate::sampler::MAX_STEPS),
        ));
    }
    for (name, tol) in [("rtol", m.flow.default_solver.rtol), ("atol", m.flow.default_solver.atol)] {
        if let Some(t) = tol {
            if !(t.is_finite() && t > 0.0) {
                return Err(field_err(&format!("flow.default_solver.{name}"), format!("{t} must be finite and > 0")));
            }
        }
    }
    let probes = m.flow.hutchinson.probes;
    if probes == 0 || probes > crate::sampler::MAX_PROBES {
        return Err(field_err(
            "flow.hutchinson.probes",
            format!("{probes} is outside [1, {}]", crate::sampler::MAX_PROBES),
        ));
    }
    crate::trace::ProbeNoise::parse(&m.flow.hutchinson.noise)
        .map_err(|e| field_err("flow.hutchinson.noise", e.message()))?;
    validate_anchors(m)?;
    validate_refine(m)?;

    let expected: [(&str, &manifest::GraphSpec, &[&str], &[&str]); 3] = [
        ("flow", &m.graphs.flow, &["t", "x"], &["v"]),
        ("flow_jvp", &m.graphs.flow_jvp, &["t", "x", "eps"], &["v", "quad"]),
        ("net", &m.graphs.net, &["x", "theta"], &["out"]),
    ];
    for (graph, spec, inputs, outputs) in expected {
        if spec.inputs.len() != inputs.len() {
            return Err(field_err(
                &format!("graphs.{graph}.inputs"),
                format!("lists {} names, the format needs {} ({})", spec.inputs.len(), inputs.len(), inputs.join(", ")),
            ));
        }
        if spec.outputs.len() != outputs.len() {
            return Err(field_err(
                &format!("graphs.{graph}.outputs"),
                format!(
                    "lists {} names, the format needs {} ({})",
                    spec.outputs.len(),
                    outputs.len(),
                    outputs.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Anchors and a default start time came with format version 2: a version-1 runtime
/// would ignore them and silently sample differently, so they must not appear in a
/// version-1 manifest (and version 2 makes older runtimes refuse the bundle).
fn validate_anchors(m: &Manifest) -> Result<()> {
    if m.format_version < 2 {
        for (present, field) in [
            (m.flow.anchors.is_some(), "flow.anchors"),
            (m.flow.default_start_time.is_some(), "flow.default_start_time"),
        ] {
            if present {
                return Err(field_err(field, "needs format_version 2 (older runtimes would ignore it)"));
            }
        }
    }
    if let Some(a) = &m.flow.anchors {
        if a.tensor.is_empty() {
            return Err(field_err("flow.anchors.tensor", "must name a tensor"));
        }
        if a.count == 0 {
            return Err(field_err("flow.anchors.count", "must be >= 1"));
        }
        if a.dtype != "f16" && a.dtype != "f32" {
            return Err(field_err(
                "flow.anchors.dtype",
                format!("{:?} is not supported (\"f16\" or \"f32\")", a.dtype),
            ));
        }
    }
    if let Some(t0) = m.flow.default_start_time {
        check_start_time(m, "flow.default_start_time", t0)?;
    }
    Ok(())
}

/// A default start time: in [0, 1], and above 0 only with stored draws to start around.
fn check_start_time(m: &Manifest, field: &str, t0: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&t0) {
        return Err(field_err(field, format!("{t0} is outside [0, 1]")));
    }
    if t0 > 0.0 && m.flow.anchors.is_none() {
        return Err(field_err(field, format!("{t0} > 0 needs flow.anchors")));
    }
    Ok(())
}

/// Largest accepted leapfrog steps per transition and transitions per sample.
pub const MAX_LEAPFROG_STEPS: u32 = 1_000;
pub const MAX_TRANSITIONS: u32 = 10_000;

/// `refine` is format version 3 (a runtime that ignored it would sample differently), and
/// version 3 means `refine`; its `start_time` is version 4.
fn validate_refine(m: &Manifest) -> Result<()> {
    let Some(r) = &m.refine else {
        if m.format_version >= 3 {
            return Err(field_err("refine", "missing: format_version 3 and later are bundles with refinement"));
        }
        return Ok(());
    };
    if m.format_version < 3 {
        return Err(field_err("refine", "needs format_version 3 (older runtimes would ignore it)"));
    }
    if r.graph.is_empty() {
        return Err(field_err("refine.graph", "empty file name"));
    }
    if !(1..=MAX_LEAPFROG_STEPS).contains(&r.leapfrog_steps) {
        return Err(field_err(
            "refine.leapfrog_steps",
            format!("{} is outside [1, {MAX_LEAPFROG_STEPS}]", r.leapfrog_steps),
        ));
    }
    if !(r.step_size.is_finite() && r.step_size > 0.0) {
        return Err(field_err("refine.step_size", format!("{} must be finite and > 0", r.step_size)));
    }
    if r.default_transitions > MAX_TRANSITIONS {
        return Err(field_err(
            "refine.default_transitions",
            format!("{} exceeds the limit of {MAX_TRANSITIONS}", r.default_transitions),
        ));
    }
    if let Some(t0) = r.start_time {
        if m.format_version < 4 {
            return Err(field_err("refine.start_time", "needs format_version 4 (older runtimes refuse the field)"));
        }
        check_start_time(m, "refine.start_time", t0)?;
    }
    Ok(())
}

fn validate_layers(m: &Manifest, limits: &Limits) -> Result<()> {
    let layers = &m.network.layers;
    if layers.is_empty() || layers.len() > limits.max_layers {
        return Err(field_err(
            "network.layers",
            format!("needs between 1 and {} layers, has {}", limits.max_layers, layers.len()),
        ));
    }
    let d = m.network.dim;
    let mut covered: Vec<(usize, usize, String)> = Vec::with_capacity(2 * layers.len());
    let mut width = m.input.dim;
    for (i, layer) in layers.iter().enumerate() {
        let f = |s: &str| format!("network.layers[{i}].{s}");
        if layer.inputs != width {
            return Err(field_err(&f("in"), format!("{} disagrees with the previous width {width}", layer.inputs)));
        }
        if layer.outputs == 0 || layer.outputs > limits.max_outputs {
            return Err(field_err(&f("out"), format!("{} is outside [1, {}]", layer.outputs, limits.max_outputs)));
        }
        let last = i + 1 == layers.len();
        let want_act = if last { Activation::Identity } else { Activation::Relu };
        if layer.activation != want_act {
            return Err(field_err(
                &f("activation"),
                format!(
                    "{:?} where the format needs {:?} ({} layer)",
                    layer.activation,
                    want_act,
                    if last { "last" } else { "hidden" }
                ),
            ));
        }
        if layer.weight.shape != [layer.outputs, layer.inputs] {
            return Err(field_err(
                &f("weight.shape"),
                format!("{:?}, expected [out, in] = [{}, {}]", layer.weight.shape, layer.outputs, layer.inputs),
            ));
        }
        if layer.bias.shape != [layer.outputs] {
            return Err(field_err(
                &f("bias.shape"),
                format!("{:?}, expected [out] = [{}]", layer.bias.shape, layer.outputs),
            ));
        }
        let wlen = layer.outputs.checked_mul(layer.inputs).ok_or_else(|| field_err(&f("weight.shape"), "overflows"))?;
        covered.push((layer.weight.offset, wlen, f("weight")));
        covered.push((layer.bias.offset, layer.outputs, f("bias")));
        width = layer.outputs;
    }
    let c = m.task.net_outputs();
    if width != c {
        return Err(field_err(
            &format!("network.layers[{}].out", layers.len() - 1),
            format!("{width} disagrees with the task's output width {c}"),
        ));
    }
    covered.sort_by_key(|b| b.0);
    let mut next = 0usize;
    for (offset, len, name) in &covered {
        if *offset != next {
            let what =
                if *offset < next { "overlaps the previous block" } else { "leaves a gap after the previous block" };
            return Err(field_err(&format!("{name}.offset"), format!("{offset} {what} (expected {next})")));
        }
        next = offset.checked_add(*len).ok_or_else(|| field_err(&format!("{name}.offset"), "overflows"))?;
    }
    if next != d {
        return Err(field_err("network.dim", format!("{d} but the layers cover [0, {next})")));
    }
    Ok(())
}
