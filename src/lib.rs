//! postflow: draw posterior weight samples from a flow-matching bundle through
//! ONNX Runtime, with log-densities, and average the network's predictions.
//!
//! Start with [`Model::open`], then [`Model::sample`] or [`Model::log_prob`].
mod alloc;
pub mod bma;
pub mod bundle;
pub mod cli;
pub mod engine;
pub mod error;
pub mod ffi;
#[doc(hidden)]
pub mod fuzzing;
pub mod geometry;
pub mod metrics;
pub mod model;
pub mod ode;
pub mod predict;
pub mod refine;
pub mod rng;
pub mod runtime;
pub mod sampler;
pub mod spread;
pub mod trace;

pub use bundle::Limits;
pub use engine::Device;
pub use error::{Error, ErrorKind, Result};
pub use model::{Model, ModelOptions};
pub use ode::{OdeStats, SolverKind};
pub use predict::{PredictOptions, Prediction};
pub use sampler::{LogDensities, SampleOptions, Samples};
pub use trace::{ProbeNoise, TraceMode};
