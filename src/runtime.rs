//! The one ONNX Runtime environment of the process.
//!
//! ONNX Runtime allows a single environment per process, and `ort` loads the
//! shared library once. Both are created lazily on the first model load and
//! shared by every model afterwards; the first successful library path wins.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ort::environment::Environment;

use crate::{Error, Result};

/// Environment variable naming the ONNX Runtime library (checked first).
pub const ENV_LIBRARY: &str = "POSTFLOW_ORT_LIB";
/// The variable `ort` itself understands (checked second).
pub const ENV_ORT_DYLIB: &str = "ORT_DYLIB_PATH";

struct Loaded {
    env: Environment,
    path: PathBuf,
}

static LOADED: OnceLock<Loaded> = OnceLock::new();
static LOADING: Mutex<()> = Mutex::new(());

/// Where the library is looked for, in order: an explicit path (then nothing else:
/// a caller who names a library gets that one or an error), `POSTFLOW_ORT_LIB`,
/// `ORT_DYLIB_PATH`, the repository's set-up folder (`.ort/`), then the system loader.
pub fn library_candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = explicit {
        return vec![p.to_path_buf()];
    }
    let mut paths = Vec::new();
    for var in [ENV_LIBRARY, ENV_ORT_DYLIB] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            paths.push(PathBuf::from(v));
        }
    }
    paths.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".ort").join("libonnxruntime.so"));
    paths.push(PathBuf::from("libonnxruntime.so"));
    paths
}

/// The shared environment, loading ONNX Runtime on first use.
pub fn environment(explicit: Option<&Path>) -> Result<&'static Environment> {
    if let Some(loaded) = LOADED.get() {
        return Ok(&loaded.env);
    }
    let _guard = LOADING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(loaded) = LOADED.get() {
        return Ok(&loaded.env);
    }
    let mut tried = Vec::new();
    for path in library_candidates(explicit) {
        // A bare file name goes to the system loader; anything with a directory must exist.
        let is_bare = path.components().count() == 1;
        if !is_bare && !path.exists() {
            tried.push(format!("{}: not found", path.display()));
            continue;
        }
        let attempt = std::panic::catch_unwind(|| ort::init_from(&path));
        match attempt {
            Ok(Ok(builder)) => {
                let env = builder.with_name("postflow").with_logger(Arc::new(forward_log)).build().map_err(|e| {
                    Error::runtime(format!(
                        "ONNX Runtime loaded from {} but its environment failed: {e}",
                        path.display()
                    ))
                })?;
                let loaded = LOADED.get_or_init(|| Loaded { env, path });
                return Ok(&loaded.env);
            }
            Ok(Err(e)) => tried.push(format!("{}: {e}", path.display())),
            Err(_) => tried.push(format!("{}: loading panicked", path.display())),
        }
    }
    Err(Error::runtime(format!(
        "could not load the ONNX Runtime library (need version >= 1.{}); tried: {}",
        ort::MINOR_VERSION,
        tried.join("; ")
    )))
}

/// The library path in use, once loaded.
pub fn loaded_library() -> Option<&'static Path> {
    LOADED.get().map(|l| l.path.as_path())
}

/// ONNX Runtime's own log lines. A library must not write to its host's stderr: every
/// failure of a run already comes back as an `Error` carrying ONNX Runtime's message, so
/// the lines are dropped unless `POSTFLOW_ORT_LOG` is set (to anything), which prints
/// warnings and errors to stderr for debugging.
fn forward_log(level: ort::logging::LogLevel, category: &str, _id: &str, location: &str, message: &str) {
    use ort::logging::LogLevel;
    if !matches!(level, LogLevel::Warning | LogLevel::Error | LogLevel::Fatal) {
        return;
    }
    static PRINT: OnceLock<bool> = OnceLock::new();
    if *PRINT.get_or_init(|| std::env::var_os("POSTFLOW_ORT_LOG").is_some()) {
        // Called from ONNX Runtime's C code, where a panic cannot unwind: eprintln! panics
        // when stderr fails (a closed pipe), so the write's error is dropped instead.
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "onnxruntime [{level:?}] {category} {location}: {message}");
    }
}
