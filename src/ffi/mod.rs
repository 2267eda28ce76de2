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
mod model;
mod options;
mod prediction;
mod sampling;

pub use model::*;
pub use options::*;
pub use prediction::*;
pub use sampling::*;

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

/// The HMC transition that refinement runs (`pf_sample_options.refine_kernel`, added in 0.8).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum pf_refine_kernel {
    /// The bundle's kernel (the default): `PF_REFINE_KERNEL_ENDPOINT` for every bundle format
    /// so far (3 and 4), whose step and trajectory length were tuned for it.
    PF_REFINE_KERNEL_BUNDLE = 0,
    /// Metropolis on the end of an `L`-step leapfrog trajectory; a rejected transition keeps
    /// its start.
    PF_REFINE_KERNEL_ENDPOINT = 1,
    /// One state of a trajectory of `2^d − 1 ≥ L` leapfrog steps built by doublings in random
    /// directions, drawn by weight `exp(−H)` biased toward the newest doubling (NUTS's
    /// trajectory sampling without the U-turn rule): nearly never the start.
    PF_REFINE_KERNEL_MULTINOMIAL = 2,
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
pub type pf_refine_kernel_u32 = u32;
pub type pf_task_u32 = u32;

static VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// The library's version, e.g. "0.4.0" (static storage; never free it). Compare
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
        assert_eq!(size_of::<pf_model_info>(), 80);
        assert_eq!(offset_of!(pf_model_info, default_start_time), 40);
        assert_eq!(offset_of!(pf_model_info, hutchinson_probes), 60);
        assert_eq!(offset_of!(pf_model_info, default_refine_transitions), 64);
        // 0.6's field starts past 0.5's whole struct (72 bytes with padding), never in its padding.
        assert_eq!(offset_of!(pf_model_info, default_refine_start_time), 72);
        assert_eq!(offset_of!(pf_sample_options, seed), 8);
        assert_eq!(SAMPLE_OPTIONS_MIN, 48);
        assert_eq!(size_of::<pf_sample_options>(), 96);
        assert_eq!(offset_of!(pf_sample_options, start_time), 56);
        assert_eq!(offset_of!(pf_sample_options, project_to_slice), 64);
        // 0.5's field starts past 0.4's whole struct (72 bytes with padding), never in its padding.
        assert_eq!(offset_of!(pf_sample_options, refine_transitions), 72);
        // 0.7's field follows 0.6's whole struct (80 bytes, no padding at its end).
        assert_eq!(offset_of!(pf_sample_options, first_index), 80);
        // 0.8's fields follow 0.7's whole struct (88 bytes, no padding at its end).
        assert_eq!(offset_of!(pf_sample_options, refine_kernel), 88);
        assert_eq!(offset_of!(pf_sample_options, refine_leapfrog), 92);
        assert_eq!(PREDICTION_MIN, 72);
        assert_eq!(size_of::<pf_prediction>(), 80);
    }
}
