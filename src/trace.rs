//! How the trace of the velocity's Jacobian is obtained for log-densities.
use crate::{Error, Result};

/// Distribution of Hutchinson probe vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeNoise {
    /// Entries ±1 with equal probability (lowest variance for this estimator).
    Rademacher,
    /// Standard normal entries.
    Gaussian,
}

impl ProbeNoise {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "rademacher" => Ok(ProbeNoise::Rademacher),
            "gaussian" => Ok(ProbeNoise::Gaussian),
            other => Err(Error::invalid(format!("unknown probe noise {other:?} (expected rademacher or gaussian)"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ProbeNoise::Rademacher => "rademacher",
            ProbeNoise::Gaussian => "gaussian",
        }
    }
}

/// Whether and how a log-density is computed alongside the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceMode {
    /// No log-density; only `flow.onnx` runs.
    None,
    /// Hutchinson's estimator with `probes` probe vectors per sample, each held
    /// fixed along its trajectory; one primal and `probes` tangents per call.
    Hutchinson { probes: u32, noise: ProbeNoise },
    /// The exact trace, as a sum over basis vectors through `flow_jvp.onnx`.
    Exact,
}

impl TraceMode {
    /// Parse a CLI-style name; `probes` applies to the Hutchinson modes.
    pub fn parse(name: &str, probes: u32) -> Result<Self> {
        match name {
            "none" => Ok(TraceMode::None),
            "hutchinson" => Ok(TraceMode::Hutchinson { probes, noise: ProbeNoise::Rademacher }),
            "hutchinson-gaussian" => Ok(TraceMode::Hutchinson { probes, noise: ProbeNoise::Gaussian }),
            "exact" => Ok(TraceMode::Exact),
            other => Err(Error::invalid(format!(
                "unknown trace mode {other:?} (expected none, hutchinson, hutchinson-gaussian or exact)"
            ))),
        }
    }
    /// Number of integrals carried per sample (one per probe; one for exact).
    pub fn accumulators(self) -> usize {
        match self {
            TraceMode::None => 0,
            TraceMode::Hutchinson { probes, .. } => probes as usize,
            TraceMode::Exact => 1,
        }
    }
}
