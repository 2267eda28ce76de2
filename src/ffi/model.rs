//! Loading and freeing a model, and describing it (`pf_model_info`).
use super::options::path_from_c;
use super::*;

/// A loaded bundle with its ONNX Runtime sessions. Opaque; created by
/// `pf_model_load`, released by `pf_model_free`. One handle may be used from
/// any number of threads at the same time.
pub struct pf_model {
    model: Model,
}

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
    /// The start time that `PF_START_TIME_BUNDLE` selects for unrefined draws and draws with
    /// log-densities (refined ones: `default_refine_start_time`): 0 (fresh flow samples) when the
    /// bundle stores no draws; 1 returns the stored draws themselves, which have no
    /// log-density. (Added in 0.4.)
    pub default_start_time: f64,
    /// Stored draws (anchors) the bundle carries; start times above 0 need them. (Added in 0.4.)
    pub anchor_count: usize,
    /// The bundle's own Hutchinson estimator: `PF_TRACE_HUTCHINSON` (Rademacher probes) or
    /// `PF_TRACE_HUTCHINSON_GAUSSIAN`. (Added in 0.4.)
    pub hutchinson_trace: pf_trace_u32,
    /// Its probes per sample, what `probes = 0` takes. (Added in 0.4.)
    pub hutchinson_probes: u32,
    /// HMC transitions on the posterior that `PF_REFINE_BUNDLE` runs after drawing without a
    /// log-density; 0 when the bundle has no refinement (format version 3 or 4). (Added in 0.5.)
    pub default_refine_transitions: u32,
    /// The start time that `PF_START_TIME_BUNDLE` selects when samples are refined
    /// (transitions > 0): the bundle's `refine.start_time` (format version 4; 1 refines the
    /// stored draws themselves), else `default_start_time`. (Added in 0.6.)
    pub default_refine_start_time: f64,
}

// The oldest layout a caller may pass; later fields are not written when struct_size stops short.
pub(super) const MODEL_INFO_MIN: usize = std::mem::offset_of!(pf_model_info, weight_dim) + std::mem::size_of::<usize>();

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
pub(super) unsafe fn model_ref<'a>(p: *const pf_model) -> Result<&'a Model> {
    non_null(p, "model")?;
    // SAFETY: a live handle from pf_model_load (caller contract); shared access is fine (Model is Sync).
    Ok(unsafe { &(*p).model })
}

/// Describe a model: task, dimensions, and what sampling does by default (start time,
/// stored draws, Hutchinson estimator). Set `out->struct_size = sizeof(pf_model_info)`
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
        put_field!(out, size, pf_model_info, default_start_time: f64 = m.default_start_time());
        put_field!(out, size, pf_model_info, anchor_count: usize = m.anchor_count());
        let (trace, probes) = match m.default_hutchinson() {
            TraceMode::Hutchinson { probes, noise: ProbeNoise::Gaussian } => {
                (pf_trace::PF_TRACE_HUTCHINSON_GAUSSIAN, probes)
            }
            TraceMode::Hutchinson { probes, .. } => (pf_trace::PF_TRACE_HUTCHINSON, probes),
            _ => (pf_trace::PF_TRACE_HUTCHINSON, 1),
        };
        put_field!(out, size, pf_model_info, hutchinson_trace: u32 = trace as u32);
        put_field!(out, size, pf_model_info, hutchinson_probes: u32 = probes);
        put_field!(out, size, pf_model_info, default_refine_transitions: u32 = m.default_refine_transitions());
        put_field!(out, size, pf_model_info, default_refine_start_time: f64 = m.default_refine_start_time());
        Ok(())
    })
}
