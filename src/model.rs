//! A loaded bundle: validated contents plus ONNX Runtime sessions. This is the
//! crate's main entry point; it is `Send + Sync` and meant to be shared.
use std::path::{Path, PathBuf};

use ndarray::ArrayView2;

use crate::bundle::{Bundle, BundleTensors, Limits, Manifest};
use crate::engine::{Device, Engine, SessionConfig};
use crate::geometry::Geometry;
use crate::ode::{SolverConfig, SolverKind};
use crate::refine::Refiner;
use crate::sampler::{FlowContext, LogDensities, SampleOptions, Samples};
use crate::trace::{ProbeNoise, TraceMode};
use crate::{Error, Result};

/// How to load a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelOptions {
    pub device: Device,
    /// Intra-op threads per ONNX Runtime session; 0 lets ONNX Runtime choose.
    pub intra_op_threads: usize,
    /// Path to `libonnxruntime.so`; `None` searches (see `runtime::library_candidates`).
    pub onnxruntime_path: Option<PathBuf>,
    /// Most concurrent sessions per graph; 0 means the number of CPU cores.
    pub max_sessions: usize,
    /// Let ONNX Runtime's worker threads spin (busy-wait) for work between runs. Off by
    /// default: postflow is a library inside someone else's process, and spinning pools
    /// take cores from the host's own threads (and from its own ONNX Runtime sessions)
    /// whenever postflow is idle. Turn it on for a process that does nothing but sample.
    pub allow_spinning: bool,
    pub limits: Limits,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            device: Device::Cpu,
            intra_op_threads: 0,
            onnxruntime_path: None,
            max_sessions: 0,
            allow_spinning: false,
            limits: Limits::default(),
        }
    }
}

pub struct Model {
    dir: PathBuf,
    manifest: Manifest,
    tensors: BundleTensors,
    engine: Engine,
    geometry: Geometry,
}

/// Largest accepted `max_sessions` and `intra_op_threads`: beyond these a request is a
/// mistake (each session slot is reserved up front; ONNX Runtime takes threads as a C `int`).
pub const MAX_SESSIONS: usize = 1024;
pub const MAX_INTRA_OP_THREADS: usize = 1024;

impl ModelOptions {
    fn check(&self) -> Result<()> {
        if self.max_sessions > MAX_SESSIONS {
            return Err(Error::invalid(format!(
                "max_sessions is {}, at most {MAX_SESSIONS} (0 = one per CPU core)",
                self.max_sessions
            )));
        }
        if self.intra_op_threads > MAX_INTRA_OP_THREADS {
            return Err(Error::invalid(format!(
                "intra_op_threads is {}, at most {MAX_INTRA_OP_THREADS} (0 = ONNX Runtime's choice)",
                self.intra_op_threads
            )));
        }
        Ok(())
    }
}

impl Model {
    /// Open and validate a bundle folder, then create its sessions.
    pub fn open(dir: impl AsRef<Path>, options: &ModelOptions) -> Result<Model> {
        options.check()?;
        let bundle = Bundle::open(dir.as_ref(), &options.limits)?;
        crate::runtime::environment(options.onnxruntime_path.as_deref())?;
        let max_sessions = if options.max_sessions > 0 {
            options.max_sessions
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        };
        let config = SessionConfig {
            device: options.device,
            intra_op_threads: options.intra_op_threads,
            max_sessions,
            allow_spinning: options.allow_spinning,
        };
        let Bundle { dir, manifest, tensors, graphs, geometry } = bundle;
        let engine = Engine::new(&manifest, graphs, config)?;
        Ok(Model { dir, manifest, tensors, engine, geometry })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    pub fn tensors(&self) -> &BundleTensors {
        &self.tensors
    }
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
    /// The state space's geometry (`flow.geometry`): which coordinates form unit spheres.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }
    /// Number of weights D.
    pub fn weight_dim(&self) -> usize {
        self.manifest.network.dim
    }
    pub fn input_dim(&self) -> usize {
        self.manifest.input.dim
    }

    /// The bundle's default solver (method, steps, tolerances).
    pub fn default_solver(&self) -> SolverConfig {
        let s = &self.manifest.flow.default_solver;
        let mut cfg = SolverConfig::fixed(SolverKind::parse(&s.method).unwrap_or(SolverKind::Rk4), s.steps);
        if let Some(r) = s.rtol {
            cfg.rtol = r;
        }
        if let Some(a) = s.atol {
            cfg.atol = a;
        }
        cfg
    }

    /// The bundle's default Hutchinson trace mode.
    pub fn default_hutchinson(&self) -> TraceMode {
        let h = &self.manifest.flow.hutchinson;
        TraceMode::Hutchinson { probes: h.probes, noise: ProbeNoise::parse(&h.noise).unwrap_or(ProbeNoise::Rademacher) }
    }

    /// The start time sampling uses when the options leave it unset (0 without anchors), for
    /// unrefined draws and draws with log-densities (refined ones: `default_refine_start_time`).
    pub fn default_start_time(&self) -> f64 {
        self.manifest.default_start_time()
    }

    /// Number of stored anchor draws (0 when the bundle has none).
    pub fn anchor_count(&self) -> usize {
        self.tensors.anchors.as_ref().map_or(0, |a| a.nrows())
    }

    fn flow(&self) -> FlowContext<'_> {
        FlowContext {
            engine: &self.engine,
            dim: self.weight_dim(),
            whiten_mean: &self.tensors.whiten_mean,
            whiten_scale: &self.tensors.whiten_scale,
            sum_log_scale: self.tensors.sum_log_scale,
            default_solver: self.default_solver(),
            anchors: self.tensors.anchors.as_ref(),
            default_start_time: self.default_start_time(),
            default_refine_start_time: self.default_refine_start_time(),
            geometry: &self.geometry,
            refiner: self.refiner(),
        }
    }

    /// The bundle's HMC refinement and its default transitions (format versions 3 and 4).
    fn refiner(&self) -> Option<(Refiner<'_>, u32)> {
        let (spec, tensors) = (self.manifest.refine.as_ref()?, self.tensors.refine.as_ref()?);
        Some((Refiner::new(&self.engine, spec, tensors, &self.manifest.network.layers), spec.default_transitions))
    }

    /// HMC transitions that sampling without log-densities runs by default (0 without refinement).
    pub fn default_refine_transitions(&self) -> u32 {
        self.manifest.refine.as_ref().map_or(0, |r| r.default_transitions)
    }

    /// The start time refined sampling uses when the options leave it unset: the bundle's
    /// `refine.start_time` (format version 4; 1 refines the stored draws themselves), else
    /// `default_start_time`.
    pub fn default_refine_start_time(&self) -> f64 {
        self.manifest.default_refine_start_time()
    }

    /// Draw `n` posterior weight samples (and their log-densities when `options.trace` asks).
    pub fn sample(&self, n: usize, options: &SampleOptions) -> Result<Samples> {
        self.flow().sample(n, options)
    }

    /// Log-densities of given weights `[n, D]`.
    pub fn log_prob(&self, theta: ArrayView2<f32>, options: &SampleOptions) -> Result<LogDensities> {
        self.flow().log_prob(theta, options)
    }
}
