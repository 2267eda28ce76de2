//! postflow: draw posterior weight samples from a flow-matching bundle through
//! ONNX Runtime, with log-densities, and average the network's predictions.
pub mod error;

pub use error::{Error, ErrorKind, Result};
