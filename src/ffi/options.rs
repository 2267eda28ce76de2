//! `pf_model_options` and `pf_sample_options`: their defaults, the layout-safe
//! initialisers, and reading a caller's struct (within its `struct_size`) into the
//! Rust options.
use super::*;

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

/// Options for `pf_sample`, `pf_log_prob` and `pf_sample_predict`. Initialise with
/// `pf_sample_options_default()` (or `pf_sample_options_init()`), then change fields.
#[repr(C)]
pub struct pf_sample_options {
    /// `sizeof(pf_sample_options)` as the caller knows it (set by the init functions).
    pub struct_size: u32,
    /// Seed; sample `i` depends only on `(seed, first_index + i)`, not on threads, and on
    /// batching only through float rounding (`PF_SOLVER_DOPRI5`: the solver's tolerance, since
    /// a batch shares its adaptive steps).
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
    /// Samples integrated together per ONNX Runtime call (memory vs speed; see `seed` for what
    /// it changes); 0 = 128, lowered when a batch's working memory would pass 256 MiB.
    /// (Added in 0.1; older callers get 0.)
    pub batch_size: u32,
    /// Start time t0 in [0, 1], or `PF_START_TIME_BUNDLE` (-1, the default) for the bundle's
    /// default (for refined samples its refinement start time, `pf_model_info.default_refine_start_time`). 0: the plain flow from N(0, I); between: from t0·a + (1 − t0)·z around a stored
    /// anchor draw a (on the spheres of a `sphere_product` bundle, slerp(z, a; t0)); 1: the stored
    /// draws themselves (no log-density: trace must be none).
    /// (Added in 0.2; older callers get the bundle's default.)
    pub start_time: f64,
    /// `pf_log_prob` on a bundle whose `flow.geometry` is `sphere_product`: 1 renormalizes each
    /// hidden unit's (w, b) of `theta` onto its unit sphere first; 0 (the default) refuses rows
    /// with a unit off the slice (|‖(w, b)‖ − 1| > 1e-4). Other values are refused; ignored by
    /// `pf_sample`. (Added in 0.3; older callers get 0.)
    pub project_to_slice: u32,
    /// HMC transitions on the posterior after drawing, for bundles with refinement (format
    /// version 3): in [0, 10000], or `PF_REFINE_BUNDLE` (-1, the default) for the bundle's
    /// default when `trace` is `PF_TRACE_NONE` and none otherwise. Refined samples have no
    /// log-density (trace must be none). (Added in 0.5; older callers get `PF_REFINE_BUNDLE`.)
    pub refine_transitions: i64,
    /// Index of the call's first sample: sample `i` of the call is sample `first_index + i` of
    /// `seed` (its noise, its stored draw at start time 1, its refinement stream, its Hutchinson
    /// probes in `pf_log_prob`), so calls over consecutive ranges give what one call over their
    /// union gives: bitwise when each split falls on a multiple of the batch actually used
    /// (`batch_size`, 0 = 128, after the memory cap), else as `seed` says.
    /// `first_index + n` must not overflow. (Added in 0.7; older callers get 0.)
    pub first_index: u64,
    /// The HMC transition refinement runs: `PF_REFINE_KERNEL_BUNDLE` (0, the default) is the
    /// bundle's, so far always the endpoint kernel; `PF_REFINE_KERNEL_ENDPOINT` (1) is
    /// Metropolis on the end of the trajectory, a rejected transition keeping its start;
    /// `PF_REFINE_KERNEL_MULTINOMIAL` draws one state of a trajectory of 2^d − 1 ≥ L leapfrog
    /// steps built by doublings in random directions, by weight exp(−H) biased toward the newest
    /// doubling (NUTS's trajectory sampling without the U-turn rule): nearly never the start.
    /// Other values are refused; unrefined draws do not depend on it. (Added in 0.8; older
    /// callers get 0.)
    pub refine_kernel: pf_refine_kernel_u32,
    /// Leapfrog steps L per refinement trajectory, in [1, 1000] (others are refused); 0 = the
    /// bundle's `refine.leapfrog_steps`. Unrefined draws do not depend on it. (Added in 0.8;
    /// older callers get 0.)
    pub refine_leapfrog: u32,
}

/// `pf_sample_options.start_time` value that selects the bundle's default start time.
pub const PF_START_TIME_BUNDLE: f64 = -1.0;

/// `pf_sample_options.refine_transitions` value that selects the bundle's default refinement.
pub const PF_REFINE_BUNDLE: i64 = -1;

// The oldest layout a caller may pass; later fields take their defaults when struct_size stops short.
pub(super) const MODEL_OPTIONS_MIN: usize =
    std::mem::offset_of!(pf_model_options, onnxruntime_path) + std::mem::size_of::<*const c_char>();

// The oldest layout a caller may pass; later fields take their defaults when struct_size stops short.
pub(super) const SAMPLE_OPTIONS_MIN: usize = std::mem::offset_of!(pf_sample_options, probes) + 4;

pub(super) fn model_options_defaults() -> pf_model_options {
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

pub(super) fn sample_options_defaults() -> pf_sample_options {
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
        project_to_slice: 0,
        refine_transitions: PF_REFINE_BUNDLE,
        first_index: 0,
        refine_kernel: pf_refine_kernel::PF_REFINE_KERNEL_BUNDLE as u32,
        refine_leapfrog: 0,
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
pub(super) unsafe fn read_model_options(p: *const pf_model_options) -> Result<ModelOptions> {
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
pub(super) fn path_from_c(s: &CStr) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(s.to_bytes()))
}

#[cfg(not(unix))]
pub(super) fn path_from_c(s: &CStr) -> PathBuf {
    PathBuf::from(s.to_string_lossy().into_owned())
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
    project_to_slice: u32,
    refine_transitions: i64,
    first_index: u64,
    refine_kernel: u32,
    refine_leapfrog: u32,
}

/// Read the caller's sample options (NULL = defaults) and turn them into `SampleOptions`.
///
/// # Safety
/// `p` is NULL or points to `p->struct_size` readable bytes.
pub(super) unsafe fn read_sample_options(p: *const pf_sample_options, model: &Model) -> Result<SampleOptions> {
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
            project_to_slice: d.project_to_slice,
            refine_transitions: d.refine_transitions,
            first_index: d.first_index,
            refine_kernel: d.refine_kernel,
            refine_leapfrog: d.refine_leapfrog,
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
            project_to_slice: get_field!(p, size, pf_sample_options, project_to_slice: u32)
                .unwrap_or(d.project_to_slice),
            refine_transitions: get_field!(p, size, pf_sample_options, refine_transitions: i64)
                .unwrap_or(d.refine_transitions),
            first_index: get_field!(p, size, pf_sample_options, first_index: u64).unwrap_or(d.first_index),
            refine_kernel: get_field!(p, size, pf_sample_options, refine_kernel: u32).unwrap_or(d.refine_kernel),
            refine_leapfrog: get_field!(p, size, pf_sample_options, refine_leapfrog: u32).unwrap_or(d.refine_leapfrog),
        }
    };
    convert_sample_options(&raw, model)
}

fn convert_sample_options(raw: &RawSampleOptions, model: &Model) -> Result<SampleOptions> {
    let mut o = SampleOptions { seed: raw.seed, first_index: raw.first_index, ..SampleOptions::default() };
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
    o.project_to_slice = match raw.project_to_slice {
        0 => false,
        1 => true,
        other => {
            return Err(Error::invalid(format!("options->project_to_slice is {other}, must be 0 or 1")));
        }
    };
    o.refine_transitions = match raw.refine_transitions {
        PF_REFINE_BUNDLE => None,
        k if (0..=i64::from(crate::bundle::MAX_TRANSITIONS)).contains(&k) => Some(k as u32),
        other => {
            return Err(Error::invalid(format!(
                "options->refine_transitions is {other}, must be in [0, {}] or PF_REFINE_BUNDLE (-1)",
                crate::bundle::MAX_TRANSITIONS
            )))
        }
    };
    o.refine_kernel = match raw.refine_kernel {
        0 => None,
        1 => Some(crate::refine::RefineKernel::Endpoint),
        2 => Some(crate::refine::RefineKernel::Multinomial),
        other => {
            return Err(Error::invalid(format!(
                "options->refine_kernel is {other}, not a pf_refine_kernel \
                 (PF_REFINE_KERNEL_BUNDLE = 0, PF_REFINE_KERNEL_ENDPOINT = 1, PF_REFINE_KERNEL_MULTINOMIAL = 2)"
            )))
        }
    };
    // The sampler refuses steps outside [1, MAX_LEAPFROG_STEPS], naming refine_leapfrog.
    o.refine_leapfrog = (raw.refine_leapfrog > 0).then_some(raw.refine_leapfrog);
    Ok(o)
}
