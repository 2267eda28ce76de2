//! One error type for the whole crate. Its [`ErrorKind`] maps one-to-one onto the
//! C API's `pf_status` codes, so every failure keeps its category across the boundary.
use std::fmt;

/// The category of a failure (mirrors `pf_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A caller passed something unusable: wrong shape, bad option, NULL.
    InvalidArgument,
    /// A file could not be read.
    Io,
    /// A bundle is malformed or inconsistent.
    Bundle,
    /// ONNX Runtime failed (library missing, session error).
    Runtime,
    /// A computation produced NaN or Inf.
    Numeric,
    /// A request this build or machine cannot serve (e.g. CUDA without a GPU).
    Unsupported,
}

/// A failure with its category and a message that names what went wrong.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into() }
    }
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn bundle(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Bundle, message)
    }
    pub fn runtime(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Runtime, message)
    }
    pub fn numeric(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Numeric, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    pub fn io(path: &std::path::Path, err: &std::io::Error) -> Self {
        Self::new(ErrorKind::Io, format!("{}: {err}", path.display()))
    }
    /// Prefix the message with context, keeping the kind.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl From<ort::Error> for Error {
    fn from(err: ort::Error) -> Self {
        Error::runtime(format!("ONNX Runtime: {err}"))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
