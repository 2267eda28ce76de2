//! Drawing weight samples (`pf_sample`) and log-densities of given weights (`pf_log_prob`).
use super::*;

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
/// `n_samples` = 0, wrong lengths, trace = NONE (PF_ERR_INVALID_ARGUMENT);
/// non-finite `theta` rows or results (PF_ERR_NUMERIC, naming the rows). Thread-safe.
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
