//! Model-averaged predictions (`pf_predict`, `pf_sample_predict`) into a caller's `pf_prediction`.
use super::*;

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

// The oldest layout a caller may pass; later fields are not written when struct_size stops short.
pub(super) const PREDICTION_MIN: usize =
    std::mem::offset_of!(pf_prediction, epistemic_len) + std::mem::size_of::<usize>();

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
    unsafe fn write(&self, pred: &Prediction) -> Result<()> {
        let (total, aleatoric, epistemic) = pred.decomposition();
        let arrays = [pred.mean(), total, aleatoric, epistemic];
        // The results are f64; one beyond f32's range would arrive as ±inf: refuse before writing anything.
        let names = ["mean", "total", "aleatoric", "epistemic"];
        for (a, name) in arrays.iter().zip(names) {
            if let Some(v) = a.iter().find(|v| !v.is_finite() || v.abs() > f64::from(f32::MAX)) {
                return Err(Error::numeric(format!("prediction {name} value {v:e} does not fit in a float")));
            }
        }
        for ((buf, count), a) in self.bufs.iter().zip(self.counts).zip(arrays.iter()) {
            let a = a.as_standard_layout();
            // SAFETY: checked to be NULL or to have room for `count` floats.
            unsafe { write_out(*buf, count, a.iter().map(|v| *v as f32)) };
        }
        put_field!(self.p, self.size, pf_prediction, ess: f64 = pred.ess());
        Ok(())
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
/// zero counts, wrong or too-small lengths, NaN/Inf in `x`, `theta` or `log_weights`
/// (PF_ERR_INVALID_ARGUMENT); non-finite network outputs, or results beyond the float
/// range (PF_ERR_NUMERIC). `log_weights` has no length argument: it must hold
/// `n_samples` floats. Thread-safe.
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
        unsafe { dst.write(&pred) }
    })
}

/// Draw `n_samples` weights (as `pf_sample` with `options`, NULL = defaults) and
/// average their predictions at `x` (`n_inputs x input_dim`, `x_len` equal to
/// that) into `*out` (as `pf_predict` with uniform weights). The result equals
/// `pf_sample` followed by `pf_predict` with the same seed. `options->trace` is
/// checked but not used (uniform weights need no log-density). Errors as those two
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
        // Model::sample_predict checks the trace request and computes no log-density.
        let o = unsafe { read_sample_options(options, m)? };
        if n_samples == 0 {
            return Err(Error::invalid("n_samples is 0, need at least 1"));
        }
        // SAFETY: caller contract.
        let xv = unsafe { read_inputs(x, n_inputs, x_len, m)? };
        // SAFETY: caller contract.
        let dst = unsafe { read_prediction(out, m, n_inputs)? };
        let pred = m.sample_predict(n_samples, &o, xv, &PredictOptions::default())?;
        // SAFETY: buffers checked by read_prediction for these shapes.
        unsafe { dst.write(&pred) }
    })
}
