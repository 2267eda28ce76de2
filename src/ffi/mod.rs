//! The stable C ABI, declared in `include/postflow.h` (generated from this module
//! by cbindgen in `build.rs`). See `docs/c-api.md` for the conventions.
//!
//! Rules kept by every entry point: no panic unwinds into C (each body runs under
//! `catch_unwind` and a panic returns `PF_ERR_PANIC`); every pointer is checked
//! for NULL and alignment; caller structs are read field by field, only within
//! their `struct_size`; enum values arrive as plain `uint32_t` and are validated
//! before use, so no invalid Rust enum is ever created; outputs are written only
//! after the whole computation succeeded.
#![allow(non_camel_case_types)]

mod boundary;

use std::ffi::{c_char, CStr};
use std::path::PathBuf;

use ndarray::ArrayView2;

use self::boundary::{get_field, guard, input, mul, non_null, output_len, put_field, struct_size, write_out};
use crate::bundle::Task;
use crate::{
    Device, Error, Model, ModelOptions, PredictOptions, Prediction, ProbeNoise, Result, SampleOptions, SolverKind,
    TraceMode,
};

/// Status of a call: `PF_OK` (0) or the category of the failure. Its storage is a
/// `uint32_t`; `pf_last_error_message()` gives the details of a failure.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum pf_status {
    /// Success.
    PF_OK = 0,
    /// A caller mistake: NULL pointer, wrong length, out-of-range option, bad struct_size.
    PF_ERR_INVALID_ARGUMENT = 1,
    /// A file could not be read (e.g. a missing bundle directory).
    PF_ERR_IO = 2,
    /// The bundle is malformed or inconsistent.
    PF_ERR_BUNDLE = 3,
    /// ONNX Runtime failed (library not found, session error).
    PF_ERR_RUNTIME = 4,
    /// A computation produced NaN or Inf.
    PF_ERR_NUMERIC = 5,
    /// The request cannot be served by this build or machine (e.g. CUDA).
    PF_ERR_UNSUPPORTED = 6,
    /// A bug in postflow was caught at the boundary; the model handle stays usable.
    PF_ERR_PANIC = 7,
}

/// Where ONNX Runtime runs the graphs (`pf_model_options.device`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum pf_device {
    PF_DEVICE_CPU = 0,
    /// The CUDA execution provider on GPU `device_id` (needs a CUDA build of postflow and ONNX Runtime).
    PF_DEVICE_CUDA = 1,
}

/// ODE solver (`pf_sample_options.solver`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum pf_solver {
    /// The bundle's default solver and step count.
    PF_SOLVER_DEFAULT = 0,
    PF_SOLVER_EULER = 1,
    PF_SOLVER_HEUN = 2,
    PF_SOLVER_RK4 = 3,
    /// Adaptive Dormand–Prince 5(4), controlled by `rtol`/`atol`.
    PF_SOLVER_DOPRI5 = 4,
}

/// How log-densities are computed (`pf_sample_options.trace`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum pf_trace {
    /// No log-density (fastest); `pf_log_prob` refuses it.
    PF_TRACE_NONE = 0,
    /// Hutchinson's estimator with `probes` Rademacher probes.
    PF_TRACE_HUTCHINSON = 1,
    /// Hutchinson's estimator with `probes` Gaussian probes.
    PF_TRACE_HUTCHINSON_GAUSSIAN = 2,
    /// The exact trace (D Jacobian-vector products per step).
    PF_TRACE_EXACT = 3,
}

/// The bundle's task (`pf_model_info.task`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum pf_task {
    PF_TASK_CLASSIFICATION = 0,
    PF_TASK_REGRESSION = 1,
}

// Enum-typed struct fields and parameters are declared as these plain `u32`
// aliases on the Rust side, so an out-of-range value from C is just a number that
// gets rejected; cbindgen.toml renames them to the enum names in the header.
pub type pf_status_u32 = u32;
pub type pf_device_u32 = u32;
pub type pf_solver_u32 = u32;
pub type pf_trace_u32 = u32;
pub type pf_task_u32 = u32;

/// A loaded bundle with its ONNX Runtime sessions. Opaque; created by
/// `pf_model_load`, released by `pf_model_free`. One handle may be used from
/// any number of threads at the same time.
pub struct pf_model {
    model: Model,
}

/// Options for `pf_model_load`. Initialise with `pf_model_options_default()` (or
/// `pf_model_options_init()`), then change fields.
#[repr(C)]
pub struct pf_model_options {
    /// `sizeof(pf_model_options)` as the caller knows it (set by the init functions).
    pub struct_size: u32,
    /// `PF_DEVICE_CPU` (default) or `PF_DEVICE_CUDA`.
    pub device: pf_device_u32,
    /// GPU ordinal for `PF_DEVICE_CUDA` (>= 0); ignored on CPU.
    pub device_id: i32,
    /// Intra-op threads per ONNX Runtime session; 0 lets ONNX Runtime choose.
    pub intra_op_threads: u32,
    /// Path of `libonnxruntime.so`, or NULL to search (`POSTFLOW_ORT_LIB`, `ORT_DYLIB_PATH`, the system loader).
    /// ONNX Runtime is loaded once per process: the first successful load wins.
    pub onnxruntime_path: *const c_char,
    /// Most ONNX Runtime sessions per graph, i.e. concurrent calls served in parallel;
    /// 0 means the number of CPU cores. (Added in 0.1; older callers get 0.)
    pub max_sessions: u32,
    /// Bit set of `PF_MODEL_FLAG_*`; 0 is the default. Unknown bits are refused.
    /// (Added in 0.2, after the padding that ends the 0.1 struct; older callers get 0.)
    pub flags: u64,
}

/// `pf_model_options.flags`: let ONNX Runtime's worker threads spin (busy-wait) between runs.
/// Off by default, so that idle pools do not take the host application's cores; turn it on
/// in a process that does nothing but sample.
pub const PF_MODEL_FLAG_ALLOW_SPINNING: u64 = 1;

/// What a model is (`pf_model_get_info`). Set `struct_size = sizeof(pf_model_info)` before the call.
#[repr(C)]
pub struct pf_model_info {
    pub struct_size: u32,
    /// `PF_TASK_CLASSIFICATION` or `PF_TASK_REGRESSION`.
    pub task: pf_task_u32,
    /// Features per input row (`d_in`).
    pub input_dim: usize,
    /// Width of a prediction's mean: classes, or regression outputs.
    pub output_dim: usize,
    /// Number of network weights `D` (the length of one sample).
    pub weight_dim: usize,
    /// Columns `U` of the uncertainty outputs of `pf_prediction`: 1 (entropies) for
    /// classification, `output_dim` (variances) for regression.
    pub uncertainty_dim: usize,
}

/// Options for `pf_sample`, `pf_log_prob` and `pf_sample_predict`. Initialise with
/// `pf_sample_options_default()` (or `pf_sample_options_init()`), then change fields.
#[repr(C)]
pub struct pf_sample_options {
    /// `sizeof(pf_sample_options)` as the caller knows it (set by the init functions).
    pub struct_size: u32,
    /// Seed; sample `i` depends only on `(seed, i)`, never on batching or threads.
    pub seed: u64,
    /// `PF_SOLVER_DEFAULT` takes the bundle's solver and step count.
    pub solver: pf_solver_u32,
    /// Fixed steps for Euler/Heun/RK4; 0 = the bundle's default; at most 1000000.
    pub steps: u32,
    /// Tolerances for `PF_SOLVER_DOPRI5`; <= 0 = the bundle's default.
    pub rtol: f64,
    pub atol: f64,
    /// Log-density mode; `PF_TRACE_NONE` draws weights only.
    pub trace: pf_trace_u32,
    /// Hutchinson probes per sample, in [1, 4096]; 0 = the bundle's default. Ignored by other modes.
    pub probes: u32,
    /// Cap on attempted `PF_SOLVER_DOPRI5` steps; 0 = 10000. (Added in 0.1; older callers get 0.)
    pub max_steps: u32,
    /// Samples integrated together per ONNX Runtime call (memory vs speed; never changes results);
    /// 0 = 128. (Added in 0.1; older callers get 0.)
    pub batch_size: u32,
    /// Start time t0 in [0, 1], or `PF_START_TIME_BUNDLE` (-1, the default) for the bundle's
    /// default. 0: the plain flow from N(0, I); between: from t0·a + (1 − t0)·z around a stored
    /// anchor draw a; 1: the stored draws themselves (no log-density: trace must be none).
    /// (Added in 0.2; older callers get the bundle's default.)
    pub start_time: f64,
}

/// `pf_sample_options.start_time` value that selects the bundle's default start time.
pub const PF_START_TIME_BUNDLE: f64 = -1.0;

/// Outputs of `pf_predict` and `pf_sample_predict`: caller-owned buffers, each
/// followed by its length in elements; a NULL buffer is not computed into. Set
/// `struct_size = sizeof(pf_prediction)`. `N` is the number of inputs, `U` is
/// `pf_model_info.uncertainty_dim`.
#[repr(C)]
pub struct pf_prediction {
    pub struct_size: u32,
    /// `N x output_dim`: class probabilities or the predictive mean.
    pub mean: *mut f32,
    pub mean_len: usize,
    /// `N x U`: predictive entropy (classification, U = 1) or variance (regression, U = outputs).
    pub total: *mut f32,
    pub total_len: usize,
    /// `N x U`: expected entropy / mean of the noise variance.
    pub aleatoric: *mut f32,
    pub aleatoric_len: usize,
    /// `N x U`: mutual information / variance of the means (total - aleatoric).
    pub epistemic: *mut f32,
    pub epistemic_len: usize,
    /// Output: effective sample size of the sample weights (written when struct_size covers it).
    pub ess: f64,
}

// Oldest layouts a caller may pass (the fields of the contract); fields
// after these are optional and take their defaults when struct_size stops short.
const MODEL_OPTIONS_MIN: usize = std::mem::offset_of!(pf_model_options, onnxruntime_path) + 8;
const MODEL_INFO_MIN: usize = std::mem::offset_of!(pf_model_info, weight_dim) + std::mem::size_of::<usize>();
const SAMPLE_OPTIONS_MIN: usize = std::mem::offset_of!(pf_sample_options, probes) + 4;
const PREDICTION_MIN: usize = std::mem::offset_of!(pf_prediction, epistemic_len) + std::mem::size_of::<usize>();

static VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// The library's version, e.g. "0.2.0" (static storage; never free it). Compare
/// with the header's `PF_VERSION_MAJOR/MINOR/PATCH` to detect a mismatch.
#[no_mangle]
pub extern "C" fn pf_version() -> *const c_char {
    VERSION.as_ptr().cast()
}

/// A static, human-readable name for a status ("PF_OK", "PF_ERR_IO", ...);
/// "PF_UNKNOWN_STATUS" for a value outside the enum. Never NULL, never free it.
#[no_mangle]
pub extern "C" fn pf_status_string(status: pf_status_u32) -> *const c_char {
    let s: &'static str = match status {
        0 => "PF_OK\0",
        1 => "PF_ERR_INVALID_ARGUMENT\0",
        2 => "PF_ERR_IO\0",
        3 => "PF_ERR_BUNDLE\0",
        4 => "PF_ERR_RUNTIME\0",
        5 => "PF_ERR_NUMERIC\0",
        6 => "PF_ERR_UNSUPPORTED\0",
        7 => "PF_ERR_PANIC\0",
        _ => "PF_UNKNOWN_STATUS\0",
    };
    s.as_ptr().cast()
}

/// The message of the last call that failed on the calling thread, naming the
/// function and what went wrong; "" if none has failed. Successful calls leave it
/// unchanged. The string is owned by the library and stays valid until the next
/// failing call on the same thread; copy it to keep it. Never NULL.
#[no_mangle]
pub extern "C" fn pf_last_error_message() -> *const c_char {
    boundary::last_error_ptr()
}

fn model_options_defaults() -> pf_model_options {
    pf_model_options {
        struct_size: std::mem::size_of::<pf_model_options>() as u32,
        device: pf_device::PF_DEVICE_CPU as u32,
        device_id: 0,
        intra_op_threads: 0,
        onnxruntime_path: std::ptr::null(),
        max_sessions: 0,
        flags: 0,
    }
}

fn sample_options_defaults() -> pf_sample_options {
    pf_sample_options {
        struct_size: std::mem::size_of::<pf_sample_options>() as u32,
        seed: 0,
        solver: pf_solver::PF_SOLVER_DEFAULT as u32,
        steps: 0,
        rtol: 0.0,
        atol: 0.0,
        trace: pf_trace::PF_TRACE_NONE as u32,
        probes: 0,
        max_steps: 0,
        batch_size: 0,
        start_time: PF_START_TIME_BUNDLE,
    }
}

/// Copy the first `size` bytes of `value` to `out`.
///
/// # Safety
/// `out` is aligned for T with `size <= size_of::<T>()` writable bytes.
unsafe fn write_prefix<T>(out: *mut T, value: &T, size: usize) {
    // SAFETY: `value` has size_of::<T>() >= size readable bytes; `out` has `size` writable bytes (caller
    // contract) and the two cannot overlap since `value` is a local of the caller.
    unsafe { std::ptr::copy_nonoverlapping((value as *const T).cast::<u8>(), out.cast::<u8>(), size) };
}

/// Fill the first published layout of `*out` (the fields up to `onnxruntime_path`;
/// 24 bytes on 64-bit targets) with the defaults and set `struct_size` to that
/// size, so a binary compiled against any header is never written past its struct;
/// later fields are left alone and take their defaults. NULL is ignored.
/// Thread-safe. The header maps calls of this name to `pf_model_options_init(out,
/// sizeof *out)`, which covers every field the caller's header knows: new code gets that.
///
/// # Safety
/// `out` is NULL or points to at least the first layout's writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pf_model_options_default(out: *mut pf_model_options) {
    // Infallible but still under the guard: nothing may unwind into C.
    let _ = guard("pf_model_options_default", || {
        if non_null(out, "out").is_ok() {
            let mut d = model_options_defaults();
            d.struct_size = MODEL_OPTIONS_MIN as u32;
            // SAFETY: `out` is non-NULL, aligned, and has the first layout's bytes (caller contract).
            unsafe { write_prefix(out, &d, MODEL_OPTIONS_MIN) };
        }
        Ok(())
    });
}

/// Fill the first `struct_size` bytes of `*out` with the defaults and set
/// `out->struct_size = struct_size`: the layout-safe form of
/// `pf_model_options_default` (call it as `pf_model_options_init(&o, sizeof o)`).
/// Errors: NULL `out`, or `struct_size` smaller than the oldest layout or larger
/// than this library's (PF_ERR_INVALID_ARGUMENT). Thread-safe.
///
/// # Safety
/// `out` is NULL or points to `struct_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pf_model_options_init(out: *mut pf_model_options, struct_size: u32) -> pf_status {
    guard("pf_model_options_init", || {
        non_null(out, "out")?;
        let size = check_init_size::<pf_model_options>(struct_size, MODEL_OPTIONS_MIN, "pf_model_options")?;
        let mut d = model_options_defaults();
        d.struct_size = struct_size;
        // SAFETY: `out` has `size` writable bytes (caller contract), size <= size_of.
        unsafe { write_prefix(out, &d, size) };
        Ok(())
    })
}

/// Fill the first published layout of `*out` (the fields up to `probes`; 48 bytes
/// on 64-bit targets) with the defaults (seed 0, the bundle's solver and steps, no
/// log-density, the bundle's probe count) and set `struct_size` to that size; later
/// fields are left alone and take their defaults (the bundle's start time among them).
/// NULL is ignored. Thread-safe. The header maps calls of this name to
/// `pf_sample_options_init(out, sizeof *out)`: new code gets every field it knows.
///
/// # Safety
/// `out` is NULL or points to at least the first layout's writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pf_sample_options_default(out: *mut pf_sample_options) {
    let _ = guard("pf_sample_options_default", || {
        if non_null(out, "out").is_ok() {
            let mut d = sample_options_defaults();
            d.struct_size = SAMPLE_OPTIONS_MIN as u32;
            // SAFETY: `out` is non-NULL, aligned, and has the first layout's bytes (caller contract).
            unsafe { write_prefix(out, &d, SAMPLE_OPTIONS_MIN) };
        }
        Ok(())
    });
}

/// Fill the first `struct_size` bytes of `*out` with the defaults and set
/// `out->struct_size = struct_size` (call it as `pf_sample_options_init(&o, sizeof o)`).
/// Errors as `pf_model_options_init`. Thread-safe.
///
/// # Safety
/// `out` is NULL or points to `struct_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pf_sample_options_init(out: *mut pf_sample_options, struct_size: u32) -> pf_status {
    guard("pf_sample_options_init", || {
        non_null(out, "out")?;
        let size = check_init_size::<pf_sample_options>(struct_size, SAMPLE_OPTIONS_MIN, "pf_sample_options")?;
        let mut d = sample_options_defaults();
        d.struct_size = struct_size;
        // SAFETY: `out` has `size` writable bytes (caller contract), size <= size_of.
        unsafe { write_prefix(out, &d, size) };
        Ok(())
    })
}

fn check_init_size<T>(struct_size: u32, min: usize, type_name: &str) -> Result<usize> {
    let size = struct_size as usize;
    let full = std::mem::size_of::<T>();
    if size < min || size > full {
        return Err(Error::invalid(format!(
            "struct_size {size} is not a known {type_name} size (between {min} and {full} bytes)"
        )));
    }
    Ok(size)
}

/// Read the caller's model options (NULL = defaults).
///
/// # Safety
/// `p` is NULL or points to `p->struct_size` readable bytes.
unsafe fn read_model_options(p: *const pf_model_options) -> Result<ModelOptions> {
    let mut opts = ModelOptions::default();
    if p.is_null() {
        return Ok(opts);
    }
    // SAFETY: forwarded caller contract.
    let size = unsafe { struct_size(p, "options", "pf_model_options", MODEL_OPTIONS_MIN)? };
    let device = get_field!(p, size, pf_model_options, device: u32).unwrap_or(0);
    let device_id = get_field!(p, size, pf_model_options, device_id: i32).unwrap_or(0);
    opts.device = match device {
        0 => Device::Cpu,
        1 if device_id < 0 => {
            return Err(Error::invalid(format!("options->device_id is {device_id}, must be >= 0 for PF_DEVICE_CUDA")))
        }
        1 => Device::Cuda(device_id),
        other => {
            return Err(Error::invalid(format!(
                "options->device is {other}, not a pf_device (PF_DEVICE_CPU = 0, PF_DEVICE_CUDA = 1)"
            )))
        }
    };
    opts.intra_op_threads = get_field!(p, size, pf_model_options, intra_op_threads: u32).unwrap_or(0) as usize;
    let path = get_field!(p, size, pf_model_options, onnxruntime_path: *const c_char).unwrap_or(std::ptr::null());
    if !path.is_null() {
        // SAFETY: a non-NULL onnxruntime_path is a NUL-terminated string (documented contract).
        opts.onnxruntime_path = Some(path_from_c(unsafe { CStr::from_ptr(path) }));
    }
    opts.max_sessions = get_field!(p, size, pf_model_options, max_sessions: u32).unwrap_or(0) as usize;
    let flags = get_field!(p, size, pf_model_options, flags: u64).unwrap_or(0);
    if flags & !PF_MODEL_FLAG_ALLOW_SPINNING != 0 {
        return Err(Error::invalid(format!(
            "options->flags is {flags:#x}: unknown bits (this library knows PF_MODEL_FLAG_ALLOW_SPINNING = 1)"
        )));
    }
    opts.allow_spinning = flags & PF_MODEL_FLAG_ALLOW_SPINNING != 0;
    Ok(opts)
}

#[cfg(unix)]
fn path_from_c(s: &CStr) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(s.to_bytes()))
}

#[cfg(not(unix))]
fn path_from_c(s: &CStr) -> PathBuf {
    PathBuf::from(s.to_string_lossy().into_owned())
}

/// Load and validate the bundle in directory `bundle_dir` and create its ONNX
/// Runtime sessions. `options` may be NULL (defaults). On success `*out` receives
/// a new handle owned by the caller, to be released with `pf_model_free`; on
/// failure `*out` is left untouched. Errors: NULL `bundle_dir`/`out` or bad options
/// (PF_ERR_INVALID_ARGUMENT), unreadable files (PF_ERR_IO), an invalid bundle
/// (PF_ERR_BUNDLE), ONNX Runtime missing or failing (PF_ERR_RUNTIME), CUDA not
/// available (PF_ERR_UNSUPPORTED). Thread-safe; loading is slow, do it once.
///
/// # Safety
/// `bundle_dir` is NULL or a NUL-terminated path; `options` is NULL or a valid
/// `pf_model_options` (see struct_size); `out` is NULL or a writable `pf_model *`.
#[no_mangle]
pub unsafe extern "C" fn pf_model_load(
    bundle_dir: *const c_char,
    options: *const pf_model_options,
    out: *mut *mut pf_model,
) -> pf_status {
    guard("pf_model_load", || {
        non_null(bundle_dir, "bundle_dir")?;
        non_null(out, "out")?;
        // SAFETY: caller contract (see above).
        let opts = unsafe { read_model_options(options)? };
        // SAFETY: non-NULL and NUL-terminated (caller contract).
        let dir = path_from_c(unsafe { CStr::from_ptr(bundle_dir) });
        if dir.as_os_str().is_empty() {
            return Err(Error::invalid("bundle_dir is an empty string"));
        }
        let model = Model::open(&dir, &opts)?;
        let handle = Box::into_raw(Box::new(pf_model { model }));
        // SAFETY: `out` is non-NULL, aligned and writable (checked, caller contract).
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Release a model handle and everything it owns. NULL is ignored. The handle
/// must not be in use by another thread, and must not be used afterwards.
///
/// # Safety
/// `model` is NULL or a handle from `pf_model_load` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn pf_model_free(model: *mut pf_model) {
    let _ = guard("pf_model_free", || {
        if !model.is_null() {
            // SAFETY: the handle came from Box::into_raw in pf_model_load and is freed exactly once (caller contract).
            drop(unsafe { Box::from_raw(model) });
        }
        Ok(())
    });
}

/// The model behind a handle.
///
/// # Safety
/// `p` is NULL or a live handle.
unsafe fn model_ref<'a>(p: *const pf_model) -> Result<&'a Model> {
    non_null(p, "model")?;
    // SAFETY: a live handle from pf_model_load (caller contract); shared access is fine (Model is Sync).
    Ok(unsafe { &(*p).model })
}

/// Describe a model: task and dimensions. Set `out->struct_size = sizeof(pf_model_info)`
/// first; fields beyond `struct_size` are not written. Errors: NULL `model`/`out`
/// or a bad struct_size (PF_ERR_INVALID_ARGUMENT). Thread-safe.
///
/// # Safety
/// `model` is NULL or a live handle; `out` is NULL or points to `out->struct_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pf_model_get_info(model: *const pf_model, out: *mut pf_model_info) -> pf_status {
    guard("pf_model_get_info", || {
        // SAFETY: caller contract.
        let m = unsafe { model_ref(model)? };
        // SAFETY: caller contract.
        let size = unsafe { struct_size(out.cast_const(), "out", "pf_model_info", MODEL_INFO_MIN)? };
        let task = &m.manifest().task;
        let (kind, u) = match task {
            Task::Classification { .. } => (pf_task::PF_TASK_CLASSIFICATION, 1),
            Task::Regression { outputs, .. } => (pf_task::PF_TASK_REGRESSION, *outputs),
        };
        put_field!(out, size, pf_model_info, task: u32 = kind as u32);
        put_field!(out, size, pf_model_info, input_dim: usize = m.input_dim());
        put_field!(out, size, pf_model_info, output_dim: usize = task.prediction_outputs());
        put_field!(out, size, pf_model_info, weight_dim: usize = m.weight_dim());
        put_field!(out, size, pf_model_info, uncertainty_dim: usize = u);
        Ok(())
    })
}

/// Sample options as read from C, before the bundle's defaults are applied.
struct RawSampleOptions {
    seed: u64,
    solver: u32,
    steps: u32,
    rtol: f64,
    atol: f64,
    trace: u32,
    probes: u32,
    max_steps: u32,
    batch_size: u32,
    start_time: f64,
}

/// Read the caller's sample options (NULL = defaults) and turn them into `SampleOptions`.
///
/// # Safety
/// `p` is NULL or points to `p->struct_size` readable bytes.
unsafe fn read_sample_options(p: *const pf_sample_options, model: &Model) -> Result<SampleOptions> {
    let d = sample_options_defaults();
    let raw = if p.is_null() {
        RawSampleOptions {
            seed: d.seed,
            solver: d.solver,
            steps: d.steps,
            rtol: d.rtol,
            atol: d.atol,
            trace: d.trace,
            probes: d.probes,
            max_steps: d.max_steps,
            batch_size: d.batch_size,
            start_time: d.start_time,
        }
    } else {
        // SAFETY: forwarded caller contract.
        let size = unsafe { struct_size(p, "options", "pf_sample_options", SAMPLE_OPTIONS_MIN)? };
        RawSampleOptions {
            seed: get_field!(p, size, pf_sample_options, seed: u64).unwrap_or(d.seed),
            solver: get_field!(p, size, pf_sample_options, solver: u32).unwrap_or(d.solver),
            steps: get_field!(p, size, pf_sample_options, steps: u32).unwrap_or(d.steps),
            rtol: get_field!(p, size, pf_sample_options, rtol: f64).unwrap_or(d.rtol),
            atol: get_field!(p, size, pf_sample_options, atol: f64).unwrap_or(d.atol),
            trace: get_field!(p, size, pf_sample_options, trace: u32).unwrap_or(d.trace),
            probes: get_field!(p, size, pf_sample_options, probes: u32).unwrap_or(d.probes),
            max_steps: get_field!(p, size, pf_sample_options, max_steps: u32).unwrap_or(d.max_steps),
            batch_size: get_field!(p, size, pf_sample_options, batch_size: u32).unwrap_or(d.batch_size),
            start_time: get_field!(p, size, pf_sample_options, start_time: f64).unwrap_or(d.start_time),
        }
    };
    convert_sample_options(&raw, model)
}

fn convert_sample_options(raw: &RawSampleOptions, model: &Model) -> Result<SampleOptions> {
    let mut o = SampleOptions { seed: raw.seed, ..SampleOptions::default() };
    o.solver = match raw.solver {
        0 => None,
        1 => Some(SolverKind::Euler),
        2 => Some(SolverKind::Heun),
        3 => Some(SolverKind::Rk4),
        4 => Some(SolverKind::Dopri5),
        other => {
            return Err(Error::invalid(format!(
                "options->solver is {other}, not a pf_solver (PF_SOLVER_DEFAULT = 0 ... PF_SOLVER_DOPRI5 = 4)"
            )))
        }
    };
    o.steps = (raw.steps > 0).then_some(raw.steps);
    let tol = |name: &str, v: f64| -> Result<Option<f64>> {
        if v.is_nan() || v.is_infinite() {
            return Err(Error::invalid(format!("options->{name} is {v}, must be finite (<= 0 for the default)")));
        }
        Ok((v > 0.0).then_some(v))
    };
    o.rtol = tol("rtol", raw.rtol)?;
    o.atol = tol("atol", raw.atol)?;
    let probes = if raw.probes == 0 {
        match model.default_hutchinson() {
            TraceMode::Hutchinson { probes, .. } => probes,
            _ => 1,
        }
    } else {
        raw.probes
    };
    o.trace = match raw.trace {
        0 => TraceMode::None,
        1 => TraceMode::Hutchinson { probes, noise: ProbeNoise::Rademacher },
        2 => TraceMode::Hutchinson { probes, noise: ProbeNoise::Gaussian },
        3 => TraceMode::Exact,
        other => {
            return Err(Error::invalid(format!(
                "options->trace is {other}, not a pf_trace (PF_TRACE_NONE = 0 ... PF_TRACE_EXACT = 3)"
            )))
        }
    };
    if raw.max_steps > 0 {
        o.max_steps = raw.max_steps;
    }
    o.batch_size = raw.batch_size as usize;
    o.start_time = if raw.start_time == PF_START_TIME_BUNDLE {
        None
    } else if (0.0..=1.0).contains(&raw.start_time) {
        Some(raw.start_time)
    } else {
        return Err(Error::invalid(format!(
            "options->start_time is {}, must be in [0, 1] or PF_START_TIME_BUNDLE (-1)",
            raw.start_time
        )));
    };
    Ok(o)
}

/// Draw `n_samples` posterior weight samples. Writes `theta_out` (`n_samples x
/// weight_dim` floats, row-major) and, when wanted, `log_density_out` (`n_samples`
/// log q(θ)) and `stderr_out` (`n_samples` standard errors of the Hutchinson
/// estimates; zeros with one probe or the exact trace). `options` may be NULL
/// (defaults: no log-density). `log_density_out`/`stderr_out` may be NULL, and
/// must be NULL when `options->trace` is `PF_TRACE_NONE`. Lengths are in elements
/// and may exceed what is needed. Sample `i` depends only on `(seed, i)`.
/// Outputs are written only on success. Errors: NULL `model`/`theta_out`,
/// `n_samples` = 0, a too-small length (the message gives the length needed),
/// out-of-range options (PF_ERR_INVALID_ARGUMENT); non-finite results
/// (PF_ERR_NUMERIC); ONNX Runtime failures (PF_ERR_RUNTIME). Thread-safe: any
/// number of threads may call this on one model at once.
///
/// # Safety
/// `model` is NULL or a live handle; `options` is NULL or valid; each non-NULL
/// output points to at least its length of writable floats.
#[no_mangle]
pub unsafe extern "C" fn pf_sample(
    model: *const pf_model,
    options: *const pf_sample_options,
    n_samples: usize,
    theta_out: *mut f32,
    theta_out_len: usize,
    log_density_out: *mut f32,
    log_density_out_len: usize,
    stderr_out: *mut f32,
    stderr_out_len: usize,
) -> pf_status {
    guard("pf_sample", || {
        // SAFETY: caller contract.
        let m = unsafe { model_ref(model)? };
        // SAFETY: caller contract.
        let o = unsafe { read_sample_options(options, m)? };
        if n_samples == 0 {
            return Err(Error::invalid("n_samples is 0, need at least 1"));
        }
        non_null(theta_out.cast_const(), "theta_out")?;
        let d = m.weight_dim();
        let need = mul(n_samples, d, "n_samples x weight_dim")?;
        output_len(
            theta_out,
            theta_out_len,
            need,
            "theta_out",
            &format!("n_samples x weight_dim = {n_samples} x {d}"),
        )?;
        if o.trace == TraceMode::None {
            for (p, name) in [(log_density_out, "log_density_out"), (stderr_out, "stderr_out")] {
                if !p.is_null() {
                    return Err(Error::invalid(format!(
                        "{name} is not NULL but options->trace is PF_TRACE_NONE: set a trace mode or pass NULL"
                    )));
                }
            }
        }
        let n_shape = format!("n_samples = {n_samples}");
        output_len(log_density_out, log_density_out_len, n_samples, "log_density_out", &n_shape)?;
        output_len(stderr_out, stderr_out_len, n_samples, "stderr_out", &n_shape)?;
        let s = m.sample(n_samples, &o)?;
        let theta = s.theta.as_standard_layout();
        let theta = theta.as_slice().expect("standard layout");
        // SAFETY: each buffer was checked to be NULL or to have room for what is written.
        unsafe {
            write_out(theta_out, need, theta.iter().copied());
            if let Some(ld) = &s.log_density {
                write_out(log_density_out, n_samples, ld.iter().copied());
            }
            write_out(stderr_out, n_samples, stderr_values(s.log_density_stderr.as_deref(), n_samples));
        }
        Ok(())
    })
}

/// The standard errors, or zeros when the mode gives none (one probe, exact).
fn stderr_values(se: Option<&[f32]>, n: usize) -> impl Iterator<Item = f32> + '_ {
    let zeros = if se.is_none() { n } else { 0 };
    se.unwrap_or(&[]).iter().copied().chain(std::iter::repeat_n(0.0, zeros))
}

/// Log-densities log q(θ) of given weights `theta` (`n_samples x weight_dim`
/// floats, row-major; `theta_len` must equal that product) under the flow,
/// integrating backwards from t = 1. `options->trace` must not be `PF_TRACE_NONE`;
/// with Hutchinson, row `i` uses the probes `pf_sample` would use for sample `i`
/// with the same seed. Writes `log_density_out` (required, `n_samples`) and, when
/// non-NULL, `stderr_out` (`n_samples`; zeros with one probe or exact). Outputs are
/// written only on success. Errors: NULL `model`/`options`/`theta`/`log_density_out`,
/// `n_samples` = 0, wrong lengths, trace = NONE, non-finite `theta`
/// (PF_ERR_INVALID_ARGUMENT); non-finite results (PF_ERR_NUMERIC). Thread-safe.
///
/// # Safety
/// `model` is NULL or a live handle; `options` is NULL or valid; `theta` points to
/// `theta_len` readable floats; each non-NULL output has its length of writable floats.
#[no_mangle]
pub unsafe extern "C" fn pf_log_prob(
    model: *const pf_model,
    options: *const pf_sample_options,
    theta: *const f32,
    n_samples: usize,
    theta_len: usize,
    log_density_out: *mut f32,
    log_density_out_len: usize,
    stderr_out: *mut f32,
    stderr_out_len: usize,
) -> pf_status {
    guard("pf_log_prob", || {
        // SAFETY: caller contract.
        let m = unsafe { model_ref(model)? };
        non_null(options, "options")?;
        // SAFETY: caller contract.
        let o = unsafe { read_sample_options(options, m)? };
        if o.trace == TraceMode::None {
            return Err(Error::invalid(
                "options->trace is PF_TRACE_NONE: log_prob needs PF_TRACE_HUTCHINSON, PF_TRACE_HUTCHINSON_GAUSSIAN or PF_TRACE_EXACT",
            ));
        }
        non_null(theta, "theta")?;
        non_null(log_density_out.cast_const(), "log_density_out")?;
        if n_samples == 0 {
            return Err(Error::invalid("n_samples is 0, need at least 1"));
        }
        let d = m.weight_dim();
        let need = mul(n_samples, d, "n_samples x weight_dim")?;
        // SAFETY: `theta` points to `theta_len` floats (caller contract); `input` checks len == need.
        let theta =
            unsafe { input(theta, theta_len, need, "theta", &format!("n_samples x weight_dim = {n_samples} x {d}"))? };
        let n_shape = format!("n_samples = {n_samples}");
        output_len(log_density_out, log_density_out_len, n_samples, "log_density_out", &n_shape)?;
        output_len(stderr_out, stderr_out_len, n_samples, "stderr_out", &n_shape)?;
        let view = ArrayView2::from_shape((n_samples, d), theta).expect("length checked");
        let r = m.log_prob(view, &o)?;
        // SAFETY: each buffer was checked to be NULL or to have room for `n_samples` floats.
        unsafe {
            write_out(log_density_out, n_samples, r.log_density.iter().copied());
            write_out(stderr_out, n_samples, stderr_values(r.log_density_stderr.as_deref(), n_samples));
        }
        Ok(())
    })
}

/// The caller's prediction buffers, checked against the shapes.
struct PredictionOut {
    p: *mut pf_prediction,
    size: usize,
    bufs: [*mut f32; 4],
    /// Elements each buffer receives (checked to fit).
    counts: [usize; 4],
}

/// Read and check `out` for `n` inputs before any work is done.
///
/// # Safety
/// `p` is NULL or points to `p->struct_size` readable and writable bytes.
unsafe fn read_prediction(p: *mut pf_prediction, model: &Model, n: usize) -> Result<PredictionOut> {
    // SAFETY: forwarded caller contract.
    let size = unsafe { struct_size(p.cast_const(), "out", "pf_prediction", PREDICTION_MIN)? };
    let (outputs, u) = match &model.manifest().task {
        Task::Classification { classes, .. } => (*classes, 1),
        Task::Regression { outputs, .. } => (*outputs, *outputs),
    };
    let need_mean = mul(n, outputs, "n_inputs x output_dim")?;
    let need_u = mul(n, u, "n_inputs x uncertainty_dim")?;
    let null = std::ptr::null_mut();
    let mean = get_field!(p, size, pf_prediction, mean: *mut f32).unwrap_or(null);
    let total = get_field!(p, size, pf_prediction, total: *mut f32).unwrap_or(null);
    let aleatoric = get_field!(p, size, pf_prediction, aleatoric: *mut f32).unwrap_or(null);
    let epistemic = get_field!(p, size, pf_prediction, epistemic: *mut f32).unwrap_or(null);
    let lens = [
        get_field!(p, size, pf_prediction, mean_len: usize).unwrap_or(0),
        get_field!(p, size, pf_prediction, total_len: usize).unwrap_or(0),
        get_field!(p, size, pf_prediction, aleatoric_len: usize).unwrap_or(0),
        get_field!(p, size, pf_prediction, epistemic_len: usize).unwrap_or(0),
    ];
    let shape_mean = format!("n_inputs x output_dim = {n} x {outputs}");
    let shape_u = format!("n_inputs x uncertainty_dim = {n} x {u}");
    output_len(mean, lens[0], need_mean, "out->mean", &shape_mean)?;
    output_len(total, lens[1], need_u, "out->total", &shape_u)?;
    output_len(aleatoric, lens[2], need_u, "out->aleatoric", &shape_u)?;
    output_len(epistemic, lens[3], need_u, "out->epistemic", &shape_u)?;
    Ok(PredictionOut {
        p,
        size,
        bufs: [mean, total, aleatoric, epistemic],
        counts: [need_mean, need_u, need_u, need_u],
    })
}

impl PredictionOut {
    /// Write a finished prediction.
    ///
    /// # Safety
    /// The buffers were checked by `read_prediction` for this prediction's shapes.
    unsafe fn write(&self, pred: &Prediction) {
        let (total, aleatoric, epistemic) = pred.decomposition();
        let arrays = [pred.mean(), total, aleatoric, epistemic];
        for ((buf, count), a) in self.bufs.iter().zip(self.counts).zip(arrays.iter()) {
            let a = a.as_standard_layout();
            // SAFETY: checked to be NULL or to have room for `count` floats.
            unsafe { write_out(*buf, count, a.iter().map(|v| *v as f32)) };
        }
        put_field!(self.p, self.size, pf_prediction, ess: f64 = pred.ess());
    }
}

/// Inputs `x` (`n_inputs x input_dim` floats, row-major, raw features; `x_len` must equal that product).
///
/// # Safety
/// `x` points to `x_len` readable floats.
unsafe fn read_inputs<'a>(x: *const f32, n_inputs: usize, x_len: usize, model: &Model) -> Result<ArrayView2<'a, f32>> {
    non_null(x, "x")?;
    if n_inputs == 0 {
        return Err(Error::invalid("n_inputs is 0, need at least 1"));
    }
    let d_in = model.input_dim();
    let need = mul(n_inputs, d_in, "n_inputs x input_dim")?;
    // SAFETY: forwarded caller contract; `input` checks the length.
    let xs = unsafe { input(x, x_len, need, "x", &format!("n_inputs x input_dim = {n_inputs} x {d_in}"))? };
    Ok(ArrayView2::from_shape((n_inputs, d_in), xs).expect("length checked"))
}

/// Bayesian model average of the network over weight samples `theta`
/// (`n_samples x weight_dim`, `theta_len` equal to that) at inputs `x`
/// (`n_inputs x input_dim`, `x_len` equal to that), with optional per-sample
/// `log_weights` (`n_samples` floats, self-normalised; NULL = uniform). Fills the
/// non-NULL buffers of `*out` (see `pf_prediction`) and `out->ess`; `out` itself is
/// required. Outputs are written only on success. Errors: NULL `model`/`x`/`theta`/`out`,
/// zero counts, wrong or too-small lengths, non-finite inputs (PF_ERR_INVALID_ARGUMENT);
/// non-finite network outputs (PF_ERR_NUMERIC). Thread-safe.
///
/// # Safety
/// `model` is NULL or a live handle; `x`, `theta` and a non-NULL `log_weights`
/// point to their lengths of readable floats; `out` is NULL or a valid
/// `pf_prediction` whose non-NULL buffers have their lengths of writable floats.
#[no_mangle]
pub unsafe extern "C" fn pf_predict(
    model: *const pf_model,
    x: *const f32,
    n_inputs: usize,
    x_len: usize,
    theta: *const f32,
    n_samples: usize,
    theta_len: usize,
    log_weights: *const f32,
    out: *mut pf_prediction,
) -> pf_status {
    guard("pf_predict", || {
        // SAFETY: caller contract.
        let m = unsafe { model_ref(model)? };
        // SAFETY: caller contract.
        let xv = unsafe { read_inputs(x, n_inputs, x_len, m)? };
        non_null(theta, "theta")?;
        if n_samples == 0 {
            return Err(Error::invalid("n_samples is 0, need at least 1"));
        }
        let d = m.weight_dim();
        let need = mul(n_samples, d, "n_samples x weight_dim")?;
        // SAFETY: caller contract; `input` checks the length.
        let ts =
            unsafe { input(theta, theta_len, need, "theta", &format!("n_samples x weight_dim = {n_samples} x {d}"))? };
        let lw = if log_weights.is_null() {
            None
        } else {
            non_null(log_weights, "log_weights")?;
            // SAFETY: a non-NULL `log_weights` holds `n_samples` floats (documented contract).
            Some(unsafe { std::slice::from_raw_parts(log_weights, n_samples) })
        };
        // SAFETY: caller contract.
        let dst = unsafe { read_prediction(out, m, n_inputs)? };
        let tv = ArrayView2::from_shape((n_samples, d), ts).expect("length checked");
        let pred = m.predict(xv, tv, lw, &PredictOptions::default())?;
        // SAFETY: buffers checked by read_prediction for these shapes.
        unsafe { dst.write(&pred) };
        Ok(())
    })
}

/// Draw `n_samples` weights (as `pf_sample` with `options`, NULL = defaults) and
/// average their predictions at `x` (`n_inputs x input_dim`, `x_len` equal to
/// that) into `*out` (as `pf_predict` with uniform weights). The result equals
/// `pf_sample` followed by `pf_predict` with the same seed. Errors as those two
/// functions. Thread-safe.
///
/// # Safety
/// As `pf_sample` and `pf_predict`.
#[no_mangle]
pub unsafe extern "C" fn pf_sample_predict(
    model: *const pf_model,
    options: *const pf_sample_options,
    n_samples: usize,
    x: *const f32,
    n_inputs: usize,
    x_len: usize,
    out: *mut pf_prediction,
) -> pf_status {
    guard("pf_sample_predict", || {
        // SAFETY: caller contract.
        let m = unsafe { model_ref(model)? };
        // SAFETY: caller contract.
        let mut o = unsafe { read_sample_options(options, m)? };
        // The average uses uniform weights, so log-densities would be wasted work.
        o.trace = TraceMode::None;
        if n_samples == 0 {
            return Err(Error::invalid("n_samples is 0, need at least 1"));
        }
        // SAFETY: caller contract.
        let xv = unsafe { read_inputs(x, n_inputs, x_len, m)? };
        // SAFETY: caller contract.
        let dst = unsafe { read_prediction(out, m, n_inputs)? };
        let pred = m.sample_predict(n_samples, &o, xv, &PredictOptions::default())?;
        // SAFETY: buffers checked by read_prediction for these shapes.
        unsafe { dst.write(&pred) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_pf_err_panic_with_a_message() {
        let status = guard("pf_test", || panic!("boom {}", 42));
        assert_eq!(status, pf_status::PF_ERR_PANIC);
        // SAFETY: the pointer is a NUL-terminated string owned by this thread's slot.
        let msg = unsafe { CStr::from_ptr(pf_last_error_message()) }.to_str().unwrap().to_string();
        assert!(msg.contains("pf_test") && msg.contains("boom 42"), "{msg}");
    }

    #[test]
    fn errors_keep_their_kind_and_success_keeps_the_message() {
        assert_eq!(guard("pf_a", || Err(Error::numeric("nan"))), pf_status::PF_ERR_NUMERIC);
        assert_eq!(guard("pf_b", || Ok(())), pf_status::PF_OK);
        // SAFETY: as above.
        let msg = unsafe { CStr::from_ptr(pf_last_error_message()) }.to_str().unwrap().to_string();
        assert_eq!(msg, "pf_a: nan");
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn layouts_match_the_contract() {
        use std::mem::{offset_of, size_of};
        assert_eq!(size_of::<pf_status>(), 4);
        assert_eq!(MODEL_OPTIONS_MIN, 24);
        assert_eq!(size_of::<pf_model_options>(), 40);
        assert_eq!(offset_of!(pf_model_options, flags), 32);
        assert_eq!(MODEL_INFO_MIN, 32);
        assert_eq!(size_of::<pf_model_info>(), 40);
        assert_eq!(offset_of!(pf_sample_options, seed), 8);
        assert_eq!(SAMPLE_OPTIONS_MIN, 48);
        assert_eq!(size_of::<pf_sample_options>(), 64);
        assert_eq!(offset_of!(pf_sample_options, start_time), 56);
        assert_eq!(PREDICTION_MIN, 72);
        assert_eq!(size_of::<pf_prediction>(), 80);
    }
}
