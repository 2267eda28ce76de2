//! The manifest (`postflow.json`) as Rust types. Parsing checks types and
//! required fields; cross-field rules live in `bundle::validate`.
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "postflow-bundle";
/// Newest format version this runtime reads. Version 2 adds stored anchor draws
/// (`flow.anchors`) and a default start time; version 3 adds refinement (`refine`: the
/// posterior's log-density graph for HMC transitions); version 4 adds refinement's own
/// default start time (`refine.start_time`). Older versions are read unchanged.
pub const FORMAT_VERSION: u64 = 4;
/// Oldest format version this runtime reads.
pub const MIN_FORMAT_VERSION: u64 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)] // a misspelt field is an error, not a silent default
pub struct Manifest {
    pub format: String,
    pub format_version: u64,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub task: Task,
    pub input: Input,
    pub network: Network,
    pub flow: FlowSpec,
    pub graphs: Graphs,
    /// HMC refinement of drawn samples on the posterior itself (format version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine: Option<RefineSpec>,
    #[serde(default = "default_tensors_file")]
    pub tensors: String,
    #[serde(default)]
    pub provenance: serde_json::Value,
    #[serde(default)]
    pub reference_metrics: serde_json::Value,
}

impl Manifest {
    /// The start time of unrefined draws and draws with log-densities when the caller gives
    /// none: `flow.default_start_time`, else 0.
    pub fn default_start_time(&self) -> f64 {
        self.flow.default_start_time.unwrap_or(0.0)
    }

    /// The start time of refined draws when the caller gives none: `refine.start_time`
    /// (format version 4), else `default_start_time`.
    pub fn default_refine_start_time(&self) -> f64 {
        self.refine.as_ref().and_then(|r| r.start_time).unwrap_or_else(|| self.default_start_time())
    }
}

fn default_tensors_file() -> String {
    "tensors.safetensors".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Task {
    Classification {
        classes: usize,
        #[serde(default)]
        class_names: Option<Vec<String>>,
    },
    Regression {
        outputs: usize,
        noise: Noise,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Noise {
    Homoscedastic { sigma: f64 },
    Heteroscedastic,
}

impl Task {
    /// Width of the network's output `C`: classes, `k`, or `2k` for heteroscedastic regression.
    pub fn net_outputs(&self) -> usize {
        match self {
            Task::Classification { classes, .. } => *classes,
            Task::Regression { outputs, noise: Noise::Homoscedastic { .. } } => *outputs,
            Task::Regression { outputs, noise: Noise::Heteroscedastic } => 2 * outputs,
        }
    }
    /// Width of a prediction's mean: classes, or regression outputs.
    pub fn prediction_outputs(&self) -> usize {
        match self {
            Task::Classification { classes, .. } => *classes,
            Task::Regression { outputs, .. } => *outputs,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    pub dim: usize,
    #[serde(default)]
    pub feature_names: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub dim: usize,
    pub layers: Vec<Layer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub kind: LayerKind,
    #[serde(rename = "in")]
    pub inputs: usize,
    #[serde(rename = "out")]
    pub outputs: usize,
    pub activation: Activation,
    pub weight: Block,
    pub bias: Block,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    Dense,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    Identity,
}

/// A contiguous block of θ: `offset` and a row-major `shape`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Block {
    pub offset: usize,
    pub shape: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowSpec {
    pub dim: usize,
    pub base: String,
    pub time: [f64; 2],
    pub geometry: String,
    pub default_solver: DefaultSolver,
    pub hutchinson: HutchinsonSpec,
    /// Stored training draws of the flow, in whitened coordinates (format version 2).
    #[serde(default)]
    pub anchors: Option<AnchorsSpec>,
    /// Start time `t₀` that sampling uses when the caller does not choose one
    /// (format version 2; absent means 0, the plain flow).
    #[serde(default)]
    pub default_start_time: Option<f64>,
}

/// Where the anchors are and what they hold: `count` rows of `D` whitened weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnchorsSpec {
    pub tensor: String,
    pub count: usize,
    /// `"f16"` or `"f32"`, the tensor's dtype.
    pub dtype: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultSolver {
    pub method: String,
    pub steps: u32,
    #[serde(default)]
    pub rtol: Option<f64>,
    #[serde(default)]
    pub atol: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HutchinsonSpec {
    pub probes: u32,
    pub noise: String,
}

/// Refinement (format version 3): `graph` maps original-scale weights `theta [S, D]` to the
/// posterior's `log_density [S]` (up to a constant) and its `grad [S, D]`; each transition is
/// one HMC step of `leapfrog_steps` leapfrog steps of size `step_size`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefineSpec {
    pub graph: String,
    pub leapfrog_steps: u32,
    pub step_size: f64,
    /// Transitions that sampling without log-densities runs when the caller does not choose.
    pub default_transitions: u32,
    /// Where refined sampling starts when the caller gives no start time (format version 4):
    /// 1 refines the stored draws themselves. Absent: `flow.default_start_time`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Graphs {
    pub flow: GraphSpec,
    pub flow_jvp: GraphSpec,
    pub net: GraphSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphSpec {
    pub file: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}
