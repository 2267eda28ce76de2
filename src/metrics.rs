//! Metrics that judge a predictive distribution against labels or targets, and
//! against a reference predictive (HMC). All sums run in f64; inputs may be f32 or
//! f64 arrays (anything `Into<f64>`), labels any integer type.
//!
//! Conventions, shared with the pipeline's `reference_metrics`: means are over
//! inputs (classification) or over all cells `N·k` (regression); logarithms are
//! natural (nats); argmax ties go to the lowest class index.
use std::fmt;

use ndarray::{ArrayView1, ArrayView2, ArrayView3, AsArray, Ix1, Ix2, Ix3};
use serde::Serialize;

use crate::bma::SampleWeights;
use crate::{Error, Result};

/// Number of equal-width confidence bins used for the reported ECE.
pub const ECE_BINS: usize = 15;

/// A real array element: f32, f64, or anything else that widens losslessly to f64.
pub trait Real: Copy + Into<f64> {}
impl<T: Copy + Into<f64>> Real for T {}

/// A class label: any integer convertible to `usize` (i64 as stored in bundles, usize, …).
pub trait Label: Copy + TryInto<usize> + fmt::Display {}
impl<T: Copy + TryInto<usize> + fmt::Display> Label for T {}

// ---------------------------------------------------------------- classification

/// Fraction of inputs whose top class (lowest index on ties) is the label:
/// `(1/N) Σ_n 1[argmax_c p[n,c] = y_n]`.
pub fn accuracy<'a, P: Real + 'a, L: Label + 'a>(
    probs: impl AsArray<'a, P, Ix2>,
    labels: impl AsArray<'a, L, Ix1>,
) -> Result<f64> {
    let (probs, labels) = check_classification(probs.into(), labels.into())?;
    let correct = probs.rows().into_iter().zip(&labels).filter(|(row, &y)| argmax(*row).0 == y).count();
    Ok(correct as f64 / labels.len() as f64)
}

/// Negative log-likelihood of the labels: `(1/N) Σ_n −ln p[n, y_n]`.
///
/// Not clipped: a probability of exactly 0 on a true label gives `+inf`, which is
/// the honest score of such a prediction (and serializes to JSON `null`).
pub fn nll<'a, P: Real + 'a, L: Label + 'a>(
    probs: impl AsArray<'a, P, Ix2>,
    labels: impl AsArray<'a, L, Ix1>,
) -> Result<f64> {
    let (probs, labels) = check_classification(probs.into(), labels.into())?;
    let sum: f64 = labels.iter().enumerate().map(|(n, &y)| -probs[[n, y]].into().ln()).sum();
    Ok(sum / labels.len() as f64)
}

/// Negative log-likelihood of one net from its logits `[N,C]`:
/// `(1/N) Σ_n −log_softmax(z_n)[y_n]`, with `log_softmax(z)_c = z_c − m − ln Σ_j exp(z_j − m)`,
/// `m = max_j z_j` (finite for any finite logits).
pub fn nll_from_logits<'a, P: Real + 'a, L: Label + 'a>(
    logits: impl AsArray<'a, P, Ix2>,
    labels: impl AsArray<'a, L, Ix1>,
) -> Result<f64> {
    let (logits, labels) = (logits.into(), labels.into());
    let labels = check_labels(labels, logits.nrows(), logits.ncols())?;
    let mut sum = 0.0;
    for (n, (row, &y)) in logits.rows().into_iter().zip(&labels).enumerate() {
        let z: Vec<f64> = row.iter().map(|&v| v.into()).collect();
        if z.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid(format!("logits of input {n} contain NaN or Inf")));
        }
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let log_sum = z.iter().map(|&v| (v - max).exp()).sum::<f64>().ln();
        sum -= z[y] - max - log_sum;
    }
    Ok(sum / labels.len() as f64)
}

/// Brier score: `(1/N) Σ_n Σ_c (p[n,c] − 1[y_n = c])²`, in `[0, 2]`.
pub fn brier<'a, P: Real + 'a, L: Label + 'a>(
    probs: impl AsArray<'a, P, Ix2>,
    labels: impl AsArray<'a, L, Ix1>,
) -> Result<f64> {
    let (probs, labels) = check_classification(probs.into(), labels.into())?;
    let mut sum = 0.0;
    for (row, &y) in probs.rows().into_iter().zip(&labels) {
        for (c, &p) in row.iter().enumerate() {
            let d = p.into() - if c == y { 1.0 } else { 0.0 };
            sum += d * d;
        }
    }
    Ok(sum / labels.len() as f64)
}

/// One bin of a reliability diagram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ReliabilityBin {
    /// The bin is `(lower, upper]` (the first bin also holds confidence 0).
    pub lower: f64,
    pub upper: f64,
    /// Inputs whose top-label confidence falls in the bin.
    pub count: usize,
    /// Mean top-label confidence in the bin (0 when empty).
    pub confidence: f64,
    /// Fraction of the bin's inputs whose top label is correct (0 when empty).
    pub accuracy: f64,
}

/// Top-label reliability over `bins` equal-width bins of `[0, 1]`.
///
/// Confidence is `max_c p[n,c]` (top label = lowest argmax index). Bin `i` holds
/// confidences in `(i/B, (i+1)/B]` with the edges computed as `i as f64 / B as f64`;
/// confidence 0 goes into bin 0 and anything above 1 (rounding) into the last bin.
pub fn reliability_bins<'a, P: Real + 'a, L: Label + 'a>(
    probs: impl AsArray<'a, P, Ix2>,
    labels: impl AsArray<'a, L, Ix1>,
    bins: usize,
) -> Result<Vec<ReliabilityBin>> {
    if bins == 0 {
        return Err(Error::invalid("reliability needs at least one bin, got 0"));
    }
    let (probs, labels) = check_classification(probs.into(), labels.into())?;
    let edges: Vec<f64> = (0..=bins).map(|i| i as f64 / bins as f64).collect();
    let mut count = vec![0usize; bins];
    let mut conf_sum = vec![0.0f64; bins];
    let mut correct = vec![0usize; bins];
    for (row, &y) in probs.rows().into_iter().zip(&labels) {
        let (top, conf) = argmax(row);
        // Number of inner edges strictly below conf = index of the bin (i/B, (i+1)/B].
        let b = edges[1..bins].partition_point(|&e| e < conf);
        count[b] += 1;
        conf_sum[b] += conf;
        correct[b] += usize::from(top == y);
    }
    Ok((0..bins)
        .map(|b| {
            let n = count[b];
            let mean = |x: f64| if n == 0 { 0.0 } else { x / n as f64 };
            ReliabilityBin {
                lower: edges[b],
                upper: edges[b + 1],
                count: n,
                confidence: mean(conf_sum[b]),
                accuracy: mean(correct[b] as f64),
            }
        })
        .collect())
}

/// Expected calibration error over `bins` top-label bins (see [`reliability_bins`]):
/// `ECE = Σ_b (n_b / N) |acc_b − conf_b|`. The reported metric uses [`ECE_BINS`] = 15.
pub fn ece<'a, P: Real + 'a, L: Label + 'a>(
    probs: impl AsArray<'a, P, Ix2>,
    labels: impl AsArray<'a, L, Ix1>,
    bins: usize,
) -> Result<f64> {
    let labels = labels.into();
    let table = reliability_bins(probs, labels, bins)?;
    let n = labels.len() as f64;
    Ok(table.iter().map(|b| b.count as f64 / n * (b.accuracy - b.confidence).abs()).sum())
}

/// Fraction of inputs whose top class agrees with the reference's top class
/// (lowest index on ties, both sides): `(1/N) Σ_n 1[argmax p_n = argmax q_n]`.
pub fn agreement<'a, 'b, P: Real + 'a, Q: Real + 'b>(
    probs: impl AsArray<'a, P, Ix2>,
    reference_probs: impl AsArray<'b, Q, Ix2>,
) -> Result<f64> {
    let (p, q) = check_pair(probs.into(), reference_probs.into())?;
    let agree = p.rows().into_iter().zip(q.rows()).filter(|(a, b)| argmax(*a).0 == argmax(*b).0).count();
    Ok(agree as f64 / p.nrows() as f64)
}

/// Mean total-variation distance to the reference: `(1/N) Σ_n ½ Σ_c |p[n,c] − q[n,c]|`, in `[0, 1]`.
pub fn total_variation<'a, 'b, P: Real + 'a, Q: Real + 'b>(
    probs: impl AsArray<'a, P, Ix2>,
    reference_probs: impl AsArray<'b, Q, Ix2>,
) -> Result<f64> {
    let (p, q) = check_pair(probs.into(), reference_probs.into())?;
    let sum: f64 = p.iter().zip(q.iter()).map(|(&a, &b)| (a.into() - b.into()).abs()).sum();
    Ok(0.5 * sum / p.nrows() as f64)
}

/// The classification metrics of one predictive, as the CLI and `reference_metrics` report them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClassificationMetrics {
    pub accuracy: f64,
    pub nll: f64,
    /// With [`ECE_BINS`] bins.
    pub ece: f64,
    pub brier: f64,
    /// Against the reference predictive, when one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    /// Mean total variation to the reference, when one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tv: Option<f64>,
}

impl ClassificationMetrics {
    /// All metrics of `probs [N,C]` against `labels [N]`, plus agreement and TV when a
    /// reference `[N,C]` is given.
    pub fn compute<'a, 'b, P: Real + 'a, L: Label + 'a, Q: Real + 'b>(
        probs: impl AsArray<'a, P, Ix2>,
        labels: impl AsArray<'a, L, Ix1>,
        reference_probs: Option<ArrayView2<'b, Q>>,
    ) -> Result<Self> {
        let (probs, labels) = (probs.into(), labels.into());
        Ok(ClassificationMetrics {
            accuracy: accuracy(probs, labels)?,
            nll: nll(probs, labels)?,
            ece: ece(probs, labels, ECE_BINS)?,
            brier: brier(probs, labels)?,
            agreement: reference_probs.map(|q| agreement(probs, q)).transpose()?,
            tv: reference_probs.map(|q| total_variation(probs, q)).transpose()?,
        })
    }
}

// -------------------------------------------------------------------- regression

/// Root mean squared error over all cells: `sqrt((1/(N·k)) Σ (μ − y)²)`.
pub fn rmse<'a, 'b, M: Real + 'a, Y: Real + 'b>(
    mean: impl AsArray<'a, M, Ix2>,
    y: impl AsArray<'b, Y, Ix2>,
) -> Result<f64> {
    let (mean, y) = check_pair(mean.into(), y.into())?;
    let sum: f64 = mean.iter().zip(y.iter()).map(|(&m, &t)| (m.into() - t.into()).powi(2)).sum();
    Ok((sum / mean.len() as f64).sqrt())
}

/// Gaussian negative log-likelihood, mean over all cells:
/// `(1/(N·k)) Σ [½ ln(2π σ²) + (y − μ)² / (2σ²)]`. Variances must be finite and > 0.
pub fn gaussian_nll<'a, 'b, 'c, M: Real + 'a, V: Real + 'b, Y: Real + 'c>(
    mean: impl AsArray<'a, M, Ix2>,
    var: impl AsArray<'b, V, Ix2>,
    y: impl AsArray<'c, Y, Ix2>,
) -> Result<f64> {
    let (mean, var, y) = check_regression(mean.into(), var.into(), y.into())?;
    let mut sum = 0.0;
    for ((&m, &v), &t) in mean.iter().zip(var.iter()).zip(y.iter()) {
        sum += normal_log_pdf(t.into(), m.into(), v.into());
    }
    Ok(-sum / mean.len() as f64)
}

/// Negative log-likelihood of the BMA mixture `p(y_n) = Σ_s w_s Π_j N(y_nj; μ_snj, σ²_snj)`,
/// per cell: `−(1/(N·k)) Σ_n ln p(y_n)`, so that one sample gives [`gaussian_nll`].
///
/// The mixture is over the whole output vector of an input (the predictive joint, with
/// outputs independent given the weights). `ln p` is a log-sum-exp over samples of
/// `ln w_s + Σ_j ln N(…)`, shifted by its max so it neither under- nor overflows; samples
/// with weight 0 drop out. Shapes: `sample_means`, `sample_vars` `[S,N,k]` (broadcast a
/// homoscedastic σ² with `ndarray`'s `broadcast`), `y` `[N,k]`.
pub fn gaussian_mixture_nll<'a, 'b, 'c, M: Real + 'a, V: Real + 'b, Y: Real + 'c>(
    sample_means: impl AsArray<'a, M, Ix3>,
    sample_vars: impl AsArray<'b, V, Ix3>,
    weights: &SampleWeights,
    y: impl AsArray<'c, Y, Ix2>,
) -> Result<f64> {
    let (means, vars, y): (ArrayView3<M>, ArrayView3<V>, ArrayView2<Y>) =
        (sample_means.into(), sample_vars.into(), y.into());
    let (s, n, k) = means.dim();
    if vars.dim() != (s, n, k) || y.dim() != (n, k) || weights.len() != s {
        return Err(Error::invalid(format!(
            "mixture NLL shapes disagree: means {:?}, variances {:?} (expected the same), \
             targets {:?} (expected [{n}, {k}]), {} weights (expected {s})",
            means.shape(),
            vars.shape(),
            y.shape(),
            weights.len()
        )));
    }
    check_not_empty("mixture NLL", n * k)?;
    check_variances(vars.iter().map(|&v| v.into()))?;
    let mut log_terms = Vec::with_capacity(s);
    let mut sum = 0.0;
    for i in 0..n {
        log_terms.clear();
        for (sample, &w) in weights.as_slice().iter().enumerate() {
            if w == 0.0 {
                continue;
            }
            let mut log_pdf = w.ln();
            for j in 0..k {
                let (m, v) = (means[[sample, i, j]].into(), vars[[sample, i, j]].into());
                log_pdf += normal_log_pdf(y[[i, j]].into(), m, v);
            }
            log_terms.push(log_pdf);
        }
        sum += log_sum_exp(&log_terms);
    }
    Ok(-sum / (n * k) as f64)
}

/// Fraction of cells inside the central Gaussian interval of probability `level`:
/// `|y − μ| ≤ z σ` with `z = Φ⁻¹((1 + level)/2)` ([`normal_quantile`]); `level` in (0, 1).
pub fn interval_coverage<'a, 'b, 'c, M: Real + 'a, V: Real + 'b, Y: Real + 'c>(
    mean: impl AsArray<'a, M, Ix2>,
    var: impl AsArray<'b, V, Ix2>,
    y: impl AsArray<'c, Y, Ix2>,
    level: f64,
) -> Result<f64> {
    if !(level > 0.0 && level < 1.0) {
        return Err(Error::invalid(format!("interval level must be in (0, 1), got {level}")));
    }
    let (mean, var, y) = check_regression(mean.into(), var.into(), y.into())?;
    let z = normal_quantile(0.5 + 0.5 * level);
    let inside = mean
        .iter()
        .zip(var.iter())
        .zip(y.iter())
        .filter(|((&m, &v), &t)| (t.into() - m.into()).abs() <= z * v.into().sqrt())
        .count();
    Ok(inside as f64 / mean.len() as f64)
}

/// The regression metrics of one predictive (mean and total variance), as reported.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RegressionMetrics {
    pub rmse: f64,
    /// [`gaussian_nll`] with the predictive mean and total variance.
    pub nll: f64,
    /// [`interval_coverage`] at level 0.9.
    pub coverage90: f64,
}

impl RegressionMetrics {
    /// All metrics of a Gaussian predictive `mean`, `var` (`[N,k]`) against targets `y`.
    pub fn compute<'a, 'b, 'c, M: Real + 'a, V: Real + 'b, Y: Real + 'c>(
        mean: impl AsArray<'a, M, Ix2>,
        var: impl AsArray<'b, V, Ix2>,
        y: impl AsArray<'c, Y, Ix2>,
    ) -> Result<Self> {
        let (mean, var, y) = (mean.into(), var.into(), y.into());
        Ok(RegressionMetrics {
            rmse: rmse(mean, y)?,
            nll: gaussian_nll(mean, var, y)?,
            coverage90: interval_coverage(mean, var, y, 0.9)?,
        })
    }
}

// ------------------------------------------------------------- normal quantile

/// The standard normal quantile `Φ⁻¹(p)`: `NaN` outside `[0, 1]`, `∓inf` at 0 and 1.
///
/// Acklam's rational approximation (relative error < 1.15e-9), refined by one Halley
/// step on `Φ(x) − p` (Φ from [`normal_cdf_lower`], accurate to ~1e-13 relative in the
/// lower tail), which brings it to about double precision. Computed in the lower tail
/// and mirrored, `Φ⁻¹(p) = −Φ⁻¹(1 − p)`, so small tail probabilities keep their digits.
pub fn normal_quantile(p: f64) -> f64 {
    if p.is_nan() || !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    if p == 0.0 {
        return f64::NEG_INFINITY;
    }
    if p == 1.0 {
        return f64::INFINITY;
    }
    if p > 0.5 {
        return -normal_quantile(1.0 - p);
    }
    let x = acklam(p);
    // Halley: with e = Φ(x) − p and u = e/φ(x), x ← x − u / (1 + x u / 2).
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    if pdf == 0.0 {
        return x; // deep tail (p < ~1e-300): no room to refine
    }
    let u = (normal_cdf_lower(x) - p) / pdf;
    x - u / (1.0 + 0.5 * x * u)
}

/// Acklam's approximation to `Φ⁻¹(p)`, `0 < p < 1` (relative error < 1.15e-9).
fn acklam(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e+01,
        2.209460984245205e+02,
        -2.759285104469687e+02,
        1.38357751867269e+02,
        -3.066479806614716e+01,
        2.506628277459239e+00,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e+01,
        1.615858368580409e+02,
        -1.556989798598866e+02,
        6.680131188771972e+01,
        -1.328068155288572e+01,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e+00,
        -2.549732539343734e+00,
        4.374664141464968e+00,
        2.938163982698783e+00,
    ];
    const D: [f64; 4] = [7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00];
    const P_LOW: f64 = 0.02425;
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - P_LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    }
}

/// `Φ(x)` for `x ≤ 0`, with small relative error (the Halley step needs it in the tail).
/// For `|x| ≤ 3` Marsaglia's series `Φ(x) = ½ + φ(x) Σ_n x^(2n+1) / (2n+1)!!` (rel. error
/// ≲ 1e-13 there); beyond, the Laplace continued fraction for the Mills ratio,
/// `Φ(x) = φ(x) / (t + 1/(t + 2/(t + 3/(t + …))))`, `t = −x`, 60 levels deep (converged
/// to ~1e-15 for `t ≥ 3`).
fn normal_cdf_lower(x: f64) -> f64 {
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    if x >= -3.0 {
        let (mut term, mut sum, mut n) = (x, x, 1.0);
        while term.abs() > 1e-17 * sum.abs() {
            term *= x * x / (2.0 * n + 1.0);
            sum += term;
            n += 1.0;
        }
        0.5 + pdf * sum
    } else {
        let t = -x;
        let mut r = t;
        for k in (1..=60).rev() {
            r = t + k as f64 / r;
        }
        pdf / r
    }
}

// ---------------------------------------------------------------------- helpers

/// `ln N(y; μ, σ²) = −½ ln(2π σ²) − (y − μ)² / (2σ²)`.
fn normal_log_pdf(y: f64, mean: f64, var: f64) -> f64 {
    let d = y - mean;
    -0.5 * (2.0 * std::f64::consts::PI * var).ln() - d * d / (2.0 * var)
}

/// `ln Σ exp(t_i)`, shifted by the max; `-inf` for no terms.
fn log_sum_exp(terms: &[f64]) -> f64 {
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    max + terms.iter().map(|&t| (t - max).exp()).sum::<f64>().ln()
}

/// Index and value of the largest entry, the first one on ties.
fn argmax<P: Real>(row: ArrayView1<'_, P>) -> (usize, f64) {
    let mut best = (0, f64::NEG_INFINITY);
    for (c, &p) in row.iter().enumerate() {
        let p = p.into();
        if p > best.1 {
            best = (c, p);
        }
    }
    best
}

fn check_not_empty(what: &str, cells: usize) -> Result<()> {
    if cells == 0 {
        return Err(Error::invalid(format!("{what}: no inputs to average over")));
    }
    Ok(())
}

/// Probabilities `[N,C]`, N ≥ 1, C ≥ 1, finite and ≥ 0; labels `[N]` in `[0, C)`.
fn check_classification<'a, P: Real, L: Label>(
    probs: ArrayView2<'a, P>,
    labels: ArrayView1<'_, L>,
) -> Result<(ArrayView2<'a, P>, Vec<usize>)> {
    check_probs(probs)?;
    let labels = check_labels(labels, probs.nrows(), probs.ncols())?;
    Ok((probs, labels))
}

fn check_probs<P: Real>(probs: ArrayView2<'_, P>) -> Result<()> {
    check_not_empty("classification metric", probs.nrows())?;
    if probs.ncols() == 0 {
        return Err(Error::invalid("probabilities have 0 classes"));
    }
    for (n, row) in probs.rows().into_iter().enumerate() {
        if let Some(&p) = row.iter().find(|&&p| !(p.into().is_finite() && p.into() >= 0.0)) {
            return Err(Error::invalid(format!(
                "probabilities of input {n} must be finite and ≥ 0, found {}",
                p.into()
            )));
        }
    }
    Ok(())
}

fn check_labels<L: Label>(labels: ArrayView1<'_, L>, n: usize, classes: usize) -> Result<Vec<usize>> {
    if labels.len() != n {
        return Err(Error::invalid(format!("expected {n} labels (one per input), got {}", labels.len())));
    }
    check_not_empty("classification metric", n)?;
    labels
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            l.try_into()
                .ok()
                .filter(|&c| c < classes)
                .ok_or_else(|| Error::invalid(format!("label {l} of input {i} is outside [0, {classes})")))
        })
        .collect()
}

/// Two `[N,·]` arrays of the same shape with N ≥ 1 (probs vs reference, mean vs target).
fn check_pair<'a, 'b, P: Real, Q: Real>(
    a: ArrayView2<'a, P>,
    b: ArrayView2<'b, Q>,
) -> Result<(ArrayView2<'a, P>, ArrayView2<'b, Q>)> {
    if a.dim() != b.dim() {
        return Err(Error::invalid(format!("shapes disagree: expected {:?} to match {:?}", b.shape(), a.shape())));
    }
    check_not_empty("metric", a.len())?;
    Ok((a, b))
}

/// Mean, variance and targets `[N,k]` of one shape; variances finite and > 0.
#[allow(clippy::type_complexity)]
fn check_regression<'a, 'b, 'c, M: Real, V: Real, Y: Real>(
    mean: ArrayView2<'a, M>,
    var: ArrayView2<'b, V>,
    y: ArrayView2<'c, Y>,
) -> Result<(ArrayView2<'a, M>, ArrayView2<'b, V>, ArrayView2<'c, Y>)> {
    if var.dim() != mean.dim() || y.dim() != mean.dim() {
        return Err(Error::invalid(format!(
            "shapes disagree: mean {:?}, variance {:?}, targets {:?} (expected all equal)",
            mean.shape(),
            var.shape(),
            y.shape()
        )));
    }
    check_not_empty("regression metric", mean.len())?;
    check_variances(var.iter().map(|&v| v.into()))?;
    Ok((mean, var, y))
}

fn check_variances(vars: impl Iterator<Item = f64>) -> Result<()> {
    for (i, v) in vars.enumerate() {
        if !(v.is_finite() && v > 0.0) {
            return Err(Error::invalid(format!("variances must be finite and > 0, found {v} at flat index {i}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn quantiles_match_known_values() {
        // Reference values from Python's statistics.NormalDist().inv_cdf (Wichura AS241).
        let cases = [
            (0.975, 1.9599639845400536),
            (0.95, 1.6448536269514715),
            (0.995, 2.5758293035489),
            (0.75, 0.6744897501960817),
            (0.001, -3.090232306167813),
            (1e-10, -6.361340902404056),
            (0.5, 0.0),
        ];
        for (p, z) in cases {
            let got = normal_quantile(p);
            assert!((got - z).abs() <= 1e-13 * z.abs().max(1.0), "Φ⁻¹({p}) = {got}, expected {z}");
            // The raw approximation alone must already be within Acklam's bound, so a
            // wrong coefficient cannot hide behind the refinement step.
            assert!((acklam(p) - z).abs() <= 1.2e-9 * z.abs().max(1e-300) + 1e-15, "acklam({p})");
        }
        assert!(normal_quantile(1.5).is_nan() && normal_quantile(-0.1).is_nan());
        assert_eq!(normal_quantile(0.0), f64::NEG_INFINITY);
    }

    #[test]
    fn normal_cdf_lower_matches_erfc() {
        // 0.5·erfc(t/√2) from Python's math.erfc.
        for (x, want) in [
            (-1.0, 0.15865525393145707),
            (-3.0, 0.0013498980316300957),
            (-3.5, 0.00023262907903552504),
            (-8.0, 6.220960574271819e-16),
        ] {
            let got = normal_cdf_lower(x);
            assert!(((got - want) / want).abs() < 1e-12, "Φ({x}) = {got}, expected {want}");
        }
    }

    #[test]
    fn argmax_ties_go_to_lowest_index() {
        assert_eq!(argmax(array![0.4, 0.4, 0.2].view()), (0, 0.4));
        assert_eq!(argmax(array![0.1f32, 0.45, 0.45].view()).0, 1);
    }

    #[test]
    fn log_sum_exp_is_shifted() {
        // ln(e^1000 + e^1000) = 1000 + ln 2, where a naive sum overflows.
        assert!((log_sum_exp(&[1000.0, 1000.0]) - (1000.0 + 2f64.ln())).abs() < 1e-12);
        assert_eq!(log_sum_exp(&[]), f64::NEG_INFINITY);
    }
}
