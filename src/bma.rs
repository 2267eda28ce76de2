//! Bayesian model averaging (BMA) of network outputs over weight samples.
//!
//! The runtime evaluates `net.onnx` on blocks of (samples × inputs) that fit its
//! memory budget and hands each block to an accumulator, in any order. The
//! accumulators keep weighted sums in f64, check that every (sample, input) cell
//! arrives exactly once, and refuse to average NaN or Inf: a sample with any
//! non-finite output is recorded and reported by `finish`, never mixed in.
//!
//! Classification (logits `[S,N,C]`): mean class probabilities, and the entropy
//! decomposition total = aleatoric + epistemic, in nats. Regression (mean `[S,N,k]`,
//! or mean then log-variance `[S,N,2k]`): predictive mean, and variance split into
//! aleatoric (noise) and epistemic (spread of the per-sample means).
use std::collections::BTreeSet;
use std::ops::Range;

use ndarray::{Array1, Array2, ArrayView1, ArrayView3};

use crate::{Error, Result};

/// How many sample indices an error message lists before eliding the rest.
const LISTED: usize = 10;

/// Normalized per-sample weights `w_s ≥ 0`, `Σ w_s = 1`, and their effective sample size.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleWeights {
    weights: Vec<f64>,
    ess: f64,
}

impl SampleWeights {
    /// Equal weights `1/S`; the ESS is exactly `S`.
    pub fn uniform(samples: usize) -> Result<Self> {
        if samples == 0 {
            return Err(Error::invalid("BMA needs at least one weight sample, got 0"));
        }
        Ok(SampleWeights { weights: vec![1.0 / samples as f64; samples], ess: samples as f64 })
    }

    /// Self-normalized importance weights from log-weights (any additive constant):
    /// `w_s = exp(l_s − max l) / Σ_t exp(l_t − max l)`, which cannot overflow and whose
    /// denominator is at least 1. The ESS is `1 / Σ w_s²`, between 1 and S.
    /// NaN or ±Inf log-weights are refused, naming their indices.
    pub fn from_log_weights(log_weights: &[f64]) -> Result<Self> {
        if log_weights.is_empty() {
            return Err(Error::invalid("BMA needs at least one weight sample, got 0 log-weights"));
        }
        let bad: Vec<usize> = (0..log_weights.len()).filter(|&i| !log_weights[i].is_finite()).collect();
        if !bad.is_empty() {
            return Err(Error::invalid(format!(
                "{} of {} log-weights are NaN or infinite, at sample indices {}",
                bad.len(),
                log_weights.len(),
                list_indices(&bad)
            )));
        }
        let max = log_weights.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut weights: Vec<f64> = log_weights.iter().map(|&l| (l - max).exp()).collect();
        let sum: f64 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= sum);
        let ess = 1.0 / weights.iter().map(|w| w * w).sum::<f64>();
        Ok(SampleWeights { weights, ess })
    }

    /// Uniform weights when `log_weights` is `None`, else [`Self::from_log_weights`],
    /// checking there is one log-weight per sample.
    pub fn new(samples: usize, log_weights: Option<&[f64]>) -> Result<Self> {
        match log_weights {
            None => Self::uniform(samples),
            Some(lw) if lw.len() != samples => {
                Err(Error::invalid(format!("expected {samples} log-weights (one per sample), got {}", lw.len())))
            }
            Some(lw) => Self::from_log_weights(lw),
        }
    }

    /// Number of samples S.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// Always false: construction refuses zero samples.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// The normalized weights, one per sample.
    pub fn as_slice(&self) -> &[f64] {
        &self.weights
    }

    /// Effective sample size `1 / Σ w_s²`.
    pub fn ess(&self) -> f64 {
        self.ess
    }
}

/// The classification BMA: all arrays in f64, entropies in nats.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassificationPrediction {
    /// `[N,C]`: `p̄[n,c] = Σ_s w_s softmax(z_s[n])_c` (averaged in probability space).
    pub probs: Array2<f64>,
    /// `[N]`: predictive entropy `H[p̄] = −Σ_c p̄_c ln p̄_c`.
    pub total: Array1<f64>,
    /// `[N]`: expected entropy `Σ_s w_s H[p_s]`.
    pub aleatoric: Array1<f64>,
    /// `[N]`: mutual information `total − aleatoric` (≥ 0, see [`ClassificationAccumulator::finish`]).
    pub epistemic: Array1<f64>,
    /// Effective sample size of the weights.
    pub ess: f64,
}

/// The regression BMA: all arrays `[N,k]` in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct RegressionPrediction {
    /// `μ̄ = Σ_s w_s μ_s`.
    pub mean: Array2<f64>,
    /// The noise: `σ²` (homoscedastic) or `Σ_s w_s exp(log σ²_s)` (heteroscedastic).
    pub aleatoric: Array2<f64>,
    /// Spread of the per-sample means: `Σ_s w_s (μ_s − μ̄)²`.
    pub epistemic: Array2<f64>,
    /// `aleatoric + epistemic`, the variance of the predictive mixture.
    pub total: Array2<f64>,
    /// Effective sample size of the weights.
    pub ess: f64,
}

/// Observation noise of a regression net.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Noise {
    /// A fixed σ; the net outputs the mean only (`k` columns).
    Homoscedastic { sigma: f64 },
    /// The net outputs the mean then log σ² (`2k` columns).
    Heteroscedastic,
}

/// Streaming classification BMA over logit chunks `[s_chunk, n_chunk, C]`.
#[derive(Debug, Clone)]
pub struct ClassificationAccumulator {
    classes: usize,
    weights: SampleWeights,
    /// `Σ_s w_s p_s[n,c]` over the samples added so far.
    prob_sum: Array2<f64>,
    /// `Σ_s w_s H[p_s[n]]` over the samples added so far.
    entropy_sum: Array1<f64>,
    coverage: Coverage,
    non_finite: BTreeSet<usize>,
}

impl ClassificationAccumulator {
    /// An accumulator for `n_inputs` inputs, `classes` classes and one sample per weight.
    pub fn new(n_inputs: usize, classes: usize, weights: SampleWeights) -> Result<Self> {
        if classes == 0 {
            return Err(Error::invalid("classification needs at least one class, got 0"));
        }
        Ok(ClassificationAccumulator {
            classes,
            prob_sum: Array2::zeros((n_inputs, classes)),
            entropy_sum: Array1::zeros(n_inputs),
            coverage: Coverage::new(weights.len(), n_inputs),
            non_finite: BTreeSet::new(),
            weights,
        })
    }

    /// Add the logits of samples `sample_offset..+s_chunk` on inputs `input_offset..+n_chunk`.
    ///
    /// Shape errors and cells added twice are refused before anything changes. A
    /// sample with a NaN or Inf logit in this chunk is recorded, skipped, and
    /// reported by [`Self::finish`]; see [`Self::non_finite_samples`] to stop early.
    pub fn add(&mut self, sample_offset: usize, input_offset: usize, logits: ArrayView3<'_, f32>) -> Result<()> {
        let (samples, inputs) = check_chunk(
            "logits",
            logits.dim(),
            (sample_offset, input_offset),
            (self.weights.len(), self.coverage.inputs, self.classes),
        )?;
        self.coverage.check_fresh(samples.clone(), inputs.clone())?;
        // One softmax row at a time: exp(z − max) and the shifted logits.
        let mut shifted = vec![0.0f64; self.classes];
        let mut exps = vec![0.0f64; self.classes];
        for (s, sample) in samples.zip(logits.outer_iter()) {
            self.coverage.insert(s, inputs.clone());
            if sample.iter().any(|v| !v.is_finite()) {
                self.non_finite.insert(s);
                continue;
            }
            let w = self.weights.weights[s];
            for (n, z) in inputs.clone().zip(sample.outer_iter()) {
                let sum = shifted_exps(z, &mut shifted, &mut exps);
                let (inv, log_sum) = (1.0 / sum, sum.ln());
                // H[p] = −Σ p_c (z_c − max − ln Σ) = ln Σ − Σ p_c (z_c − max): log-softmax
                // form, finite even where p_c underflows to 0.
                let mut mean_shifted = 0.0;
                for ((acc, &e), &x) in self.prob_sum.row_mut(n).iter_mut().zip(&exps).zip(&shifted) {
                    let p = e * inv;
                    *acc += w * p;
                    mean_shifted += p * x;
                }
                self.entropy_sum[n] += w * (log_sum - mean_shifted);
            }
        }
        Ok(())
    }

    /// Global indices of the samples that produced NaN or Inf so far (sorted).
    pub fn non_finite_samples(&self) -> Vec<usize> {
        self.non_finite.iter().copied().collect()
    }

    /// The averaged prediction, once every (sample, input) cell was added.
    ///
    /// Errors: [`Error::numeric`] if any sample produced NaN or Inf (naming how many
    /// and which); [`Error::invalid`] if some cells were never added.
    ///
    /// The mutual information `Σ_s w_s KL(p_s ‖ p̄)` is ≥ 0 exactly; computed as a
    /// difference of two f64 sums it can come out a few ulps below zero. Values in
    /// `[−1e-9·max(1, total), 0)` are set to 0; anything more negative means the
    /// sums are inconsistent and is reported as a numeric error, not hidden.
    pub fn finish(self) -> Result<ClassificationPrediction> {
        report_non_finite(&self.non_finite, self.weights.len())?;
        self.coverage.ensure_complete()?;
        let probs = self.prob_sum;
        let total: Array1<f64> = probs
            .rows()
            .into_iter()
            .map(|row| -row.iter().filter(|&&p| p > 0.0).map(|&p| p * p.ln()).sum::<f64>())
            .collect();
        let aleatoric = self.entropy_sum;
        let mut epistemic = &total - &aleatoric;
        for (n, mi) in epistemic.iter_mut().enumerate() {
            if *mi < 0.0 {
                if *mi < -1e-9 * total[n].max(1.0) {
                    return Err(Error::numeric(format!(
                        "mutual information for input {n} came out at {mi:e} (total {}, aleatoric {})",
                        total[n], aleatoric[n]
                    )));
                }
                *mi = 0.0;
            }
        }
        Ok(ClassificationPrediction { probs, total, aleatoric, epistemic, ess: self.weights.ess })
    }
}

/// Streaming regression BMA over output chunks `[s_chunk, n_chunk, k or 2k]`.
#[derive(Debug, Clone)]
pub struct RegressionAccumulator {
    outputs: usize,
    noise: Noise,
    weights: SampleWeights,
    /// Weighted Welford state per cell: weight so far (per input), running mean, and
    /// `Σ w (μ − mean)²`; stable where a two-sum `E[μ²] − E[μ]²` would cancel.
    weight_sum: Array1<f64>,
    mean: Array2<f64>,
    m2: Array2<f64>,
    /// `Σ_s w_s exp(log σ²_s)` (heteroscedastic only).
    var_sum: Array2<f64>,
    coverage: Coverage,
    non_finite: BTreeSet<usize>,
}

impl RegressionAccumulator {
    /// An accumulator for `n_inputs` inputs with `outputs` (k) regression targets.
    pub fn new(n_inputs: usize, outputs: usize, noise: Noise, weights: SampleWeights) -> Result<Self> {
        if outputs == 0 {
            return Err(Error::invalid("regression needs at least one output, got 0"));
        }
        if let Noise::Homoscedastic { sigma } = noise {
            if !(sigma.is_finite() && sigma > 0.0) {
                return Err(Error::invalid(format!("homoscedastic noise sigma must be finite and > 0, got {sigma}")));
            }
        }
        Ok(RegressionAccumulator {
            outputs,
            noise,
            weight_sum: Array1::zeros(n_inputs),
            mean: Array2::zeros((n_inputs, outputs)),
            m2: Array2::zeros((n_inputs, outputs)),
            var_sum: Array2::zeros((n_inputs, outputs)),
            coverage: Coverage::new(weights.len(), n_inputs),
            non_finite: BTreeSet::new(),
            weights,
        })
    }

    /// Width of the net's output: `k`, or `2k` when heteroscedastic.
    fn width(&self) -> usize {
        match self.noise {
            Noise::Homoscedastic { .. } => self.outputs,
            Noise::Heteroscedastic => 2 * self.outputs,
        }
    }

    /// Add the outputs of samples `sample_offset..+s_chunk` on inputs `input_offset..+n_chunk`.
    ///
    /// Same contract as [`ClassificationAccumulator::add`]; a log-variance whose
    /// `exp` overflows f64 counts as non-finite.
    pub fn add(&mut self, sample_offset: usize, input_offset: usize, out: ArrayView3<'_, f32>) -> Result<()> {
        let k = self.outputs;
        let hetero = self.noise == Noise::Heteroscedastic;
        let (samples, inputs) = check_chunk(
            "regression output",
            out.dim(),
            (sample_offset, input_offset),
            (self.weights.len(), self.coverage.inputs, self.width()),
        )?;
        self.coverage.check_fresh(samples.clone(), inputs.clone())?;
        for (s, sample) in samples.zip(out.outer_iter()) {
            self.coverage.insert(s, inputs.clone());
            // The log-variance columns (after the k means) must also exponentiate.
            let finite = sample.iter().all(|v| v.is_finite())
                && (!hetero
                    || sample.outer_iter().all(|row| row.iter().skip(k).all(|&v| (v as f64).exp().is_finite())));
            if !finite {
                self.non_finite.insert(s);
                continue;
            }
            let w = self.weights.weights[s];
            if w == 0.0 {
                continue; // no effect on any weighted sum; avoids 0/0 in Welford
            }
            for (n, row) in inputs.clone().zip(sample.outer_iter()) {
                let total_w = self.weight_sum[n] + w;
                let frac = w / total_w;
                for j in 0..k {
                    let x = row[j] as f64;
                    let mean = &mut self.mean[[n, j]];
                    let delta = x - *mean;
                    *mean += frac * delta;
                    self.m2[[n, j]] += w * delta * (x - *mean);
                    if hetero {
                        self.var_sum[[n, j]] += w * (row[k + j] as f64).exp();
                    }
                }
                self.weight_sum[n] = total_w;
            }
        }
        Ok(())
    }

    /// Global indices of the samples that produced NaN or Inf so far (sorted).
    pub fn non_finite_samples(&self) -> Vec<usize> {
        self.non_finite.iter().copied().collect()
    }

    /// The averaged prediction; errors as [`ClassificationAccumulator::finish`].
    pub fn finish(self) -> Result<RegressionPrediction> {
        report_non_finite(&self.non_finite, self.weights.len())?;
        self.coverage.ensure_complete()?;
        // Weights sum to 1 up to rounding; dividing by the sum actually seen keeps
        // the variance a proper weighted variance.
        let mut epistemic = self.m2;
        for (mut row, &w) in epistemic.rows_mut().into_iter().zip(&self.weight_sum) {
            row.mapv_inplace(|m2| m2 / w);
        }
        let aleatoric = match self.noise {
            Noise::Homoscedastic { sigma } => Array2::from_elem(self.mean.raw_dim(), sigma * sigma),
            Noise::Heteroscedastic => self.var_sum,
        };
        let total = &aleatoric + &epistemic;
        Ok(RegressionPrediction { mean: self.mean, aleatoric, epistemic, total, ess: self.weights.ess })
    }
}

/// One-shot classification BMA over all logits `[S,N,C]`.
pub fn bma_classification(logits: ArrayView3<'_, f32>, weights: SampleWeights) -> Result<ClassificationPrediction> {
    let (_, n, c) = logits.dim();
    let mut acc = ClassificationAccumulator::new(n, c, weights)?;
    acc.add(0, 0, logits)?;
    acc.finish()
}

/// One-shot regression BMA over all outputs `[S,N,k]` (or `[S,N,2k]` when heteroscedastic).
pub fn bma_regression(out: ArrayView3<'_, f32>, noise: Noise, weights: SampleWeights) -> Result<RegressionPrediction> {
    let (_, n, width) = out.dim();
    let k = match noise {
        Noise::Homoscedastic { .. } => width,
        Noise::Heteroscedastic if width % 2 == 0 => width / 2,
        Noise::Heteroscedastic => {
            return Err(Error::invalid(format!(
                "heteroscedastic regression output needs an even width (mean then log-variance), got {width}"
            )))
        }
    };
    let mut acc = RegressionAccumulator::new(n, k, noise, weights)?;
    acc.add(0, 0, out)?;
    acc.finish()
}

/// Fill `shifted[c] = z_c − max z` and `exps[c] = exp(shifted[c])`; return `Σ exps` (≥ 1).
fn shifted_exps(z: ArrayView1<'_, f32>, shifted: &mut [f64], exps: &mut [f64]) -> f64 {
    let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let mut sum = 0.0;
    for ((x, e), &v) in shifted.iter_mut().zip(exps.iter_mut()).zip(z) {
        *x = v as f64 - max;
        *e = x.exp();
        sum += *e;
    }
    sum
}

/// Check a chunk's shape `(s_chunk, n_chunk, width)` against the accumulator's
/// `(S, N, width)` at the given offsets; return its sample and input ranges.
fn check_chunk(
    what: &str,
    (s_chunk, n_chunk, width): (usize, usize, usize),
    (sample_offset, input_offset): (usize, usize),
    (samples, inputs, expected_width): (usize, usize, usize),
) -> Result<(Range<usize>, Range<usize>)> {
    if width != expected_width {
        return Err(Error::invalid(format!(
            "{what} chunk has last dimension {width}, expected {expected_width} (shape [{s_chunk}, {n_chunk}, {width}])"
        )));
    }
    let fits = |offset: usize, len: usize, max: usize| offset.checked_add(len).is_some_and(|end| end <= max);
    if !fits(sample_offset, s_chunk, samples) {
        return Err(Error::invalid(format!(
            "{what} chunk covers samples {sample_offset}..{} but there are {samples} samples",
            sample_offset.saturating_add(s_chunk)
        )));
    }
    if !fits(input_offset, n_chunk, inputs) {
        return Err(Error::invalid(format!(
            "{what} chunk covers inputs {input_offset}..{} but there are {inputs} inputs",
            input_offset.saturating_add(n_chunk)
        )));
    }
    Ok((sample_offset..sample_offset + s_chunk, input_offset..input_offset + n_chunk))
}

/// `Err(numeric)` naming the non-finite samples, if there are any.
fn report_non_finite(non_finite: &BTreeSet<usize>, samples: usize) -> Result<()> {
    if non_finite.is_empty() {
        return Ok(());
    }
    let idx: Vec<usize> = non_finite.iter().copied().collect();
    Err(Error::numeric(format!(
        "network output is NaN or Inf for {} of {samples} samples, at sample indices {}; \
         they were not averaged",
        idx.len(),
        list_indices(&idx)
    )))
}

/// `[3, 7, 12]`, or the first ten then `… (N more)`.
fn list_indices(idx: &[usize]) -> String {
    let shown: Vec<String> = idx.iter().take(LISTED).map(|i| i.to_string()).collect();
    let more = idx.len().saturating_sub(LISTED);
    if more == 0 {
        format!("[{}]", shown.join(", "))
    } else {
        format!("[{}, … ({more} more)]", shown.join(", "))
    }
}

/// Which (sample, input) cells have been added: per sample, sorted, disjoint input
/// ranges, merged when they touch. A grid of chunks fed in order keeps one range per
/// sample, so memory stays O(S) however large N is.
#[derive(Debug, Clone)]
struct Coverage {
    inputs: usize,
    ranges: Vec<Vec<Range<usize>>>,
}

impl Coverage {
    fn new(samples: usize, inputs: usize) -> Self {
        Coverage { inputs, ranges: vec![Vec::new(); samples] }
    }

    /// Refuse a chunk that overlaps cells already added.
    fn check_fresh(&self, samples: Range<usize>, inputs: Range<usize>) -> Result<()> {
        if inputs.is_empty() {
            return Ok(());
        }
        for s in samples {
            let list = &self.ranges[s];
            let i = list.partition_point(|r| r.end <= inputs.start);
            if let Some(r) = list.get(i).filter(|r| r.start < inputs.end) {
                return Err(Error::invalid(format!(
                    "cells added twice: sample {s}, inputs {}..{} overlap inputs {}..{} already added",
                    inputs.start, inputs.end, r.start, r.end
                )));
            }
        }
        Ok(())
    }

    /// Record a range already checked by `check_fresh`.
    fn insert(&mut self, sample: usize, inputs: Range<usize>) {
        if inputs.is_empty() {
            return;
        }
        let list = &mut self.ranges[sample];
        let first = list.partition_point(|r| r.end < inputs.start);
        let mut merged = inputs;
        let mut last = first;
        while last < list.len() && list[last].start <= merged.end {
            merged.start = merged.start.min(list[last].start);
            merged.end = merged.end.max(list[last].end);
            last += 1;
        }
        list.splice(first..last, [merged]);
    }

    /// Err naming how many cells are missing and the first gap.
    fn ensure_complete(&self) -> Result<()> {
        let n = self.inputs;
        let covered: usize = self.ranges.iter().flatten().map(|r| r.len()).sum();
        let total = self.ranges.len() * n;
        if covered == total {
            return Ok(());
        }
        let (s, list) = self
            .ranges
            .iter()
            .enumerate()
            .find(|(_, l)| l.iter().map(|r| r.len()).sum::<usize>() != n)
            .expect("some sample is incomplete");
        let gap = match list.first() {
            None => 0..n,
            Some(r) if r.start > 0 => 0..r.start,
            Some(r) => r.end..list.get(1).map_or(n, |next| next.start),
        };
        Err(Error::invalid(format!(
            "BMA incomplete: {} of {total} (sample, input) cells were never added; first gap: sample {s}, inputs {}..{}",
            total - covered,
            gap.start,
            gap.end
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, s, Array3};

    #[test]
    fn log_weights_normalize_stably() {
        // exp(1000) overflows; after subtracting the max the weights are 1/(1+e^-1), e^-1/(1+e^-1).
        let w = SampleWeights::from_log_weights(&[1000.0, 999.0]).unwrap();
        let e = (-1.0f64).exp();
        assert!((w.as_slice()[0] - 1.0 / (1.0 + e)).abs() < 1e-15);
        assert!((w.as_slice()[1] - e / (1.0 + e)).abs() < 1e-15);
        let ess = 1.0 / (w.as_slice()[0].powi(2) + w.as_slice()[1].powi(2));
        assert!((w.ess() - ess).abs() < 1e-12);
    }

    #[test]
    fn bad_log_weights_are_named() {
        let err = SampleWeights::from_log_weights(&[0.0, f64::NAN, 1.0, f64::NEG_INFINITY]).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        assert!(err.message().contains("2 of 4"), "{}", err.message());
        assert!(err.message().contains("[1, 3]"), "{}", err.message());
        assert!(SampleWeights::new(3, Some(&[0.0, 0.0])).is_err());
        assert!(SampleWeights::uniform(0).is_err());
    }

    #[test]
    fn list_indices_elides_after_ten() {
        let idx: Vec<usize> = (0..13).collect();
        assert_eq!(list_indices(&idx), "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, … (3 more)]");
        assert_eq!(list_indices(&[4]), "[4]");
    }

    #[test]
    fn coverage_merges_and_detects_overlap_and_gaps() {
        let mut c = Coverage::new(1, 10);
        c.check_fresh(0..1, 5..8).unwrap();
        c.insert(0, 5..8);
        c.insert(0, 0..2);
        assert!(c.check_fresh(0..1, 7..9).is_err());
        assert!(c.check_fresh(0..1, 1..3).is_err());
        let err = c.ensure_complete().unwrap_err();
        assert!(err.message().contains("5 of 10"), "{}", err.message());
        assert!(err.message().contains("inputs 2..5"), "{}", err.message());
        c.insert(0, 2..5);
        c.insert(0, 8..10);
        assert_eq!(c.ranges[0], vec![0..10]);
        c.ensure_complete().unwrap();
    }

    #[test]
    fn one_sample_is_its_softmax() {
        // softmax([0, ln 3]) = [1/4, 3/4]; H = −(¼ ln ¼ + ¾ ln ¾).
        let logits = array![[[0.0f32, 3f32.ln()]]];
        let p = bma_classification(logits.view(), SampleWeights::uniform(1).unwrap()).unwrap();
        assert!((p.probs[[0, 0]] - 0.25).abs() < 1e-7);
        let h = -(0.25f64 * 0.25f64.ln() + 0.75 * 0.75f64.ln());
        assert!((p.total[0] - h).abs() < 1e-7);
        assert!((p.aleatoric[0] - h).abs() < 1e-7);
        assert!(p.epistemic[0].abs() < 1e-12);
    }

    #[test]
    fn extreme_logits_stay_finite() {
        // A naive exp(z) overflows f32 and f64 alike; log-softmax does not.
        let logits = array![[[1e30f32, 0.0, -1e30]], [[0.0, 1e30, 0.0]]];
        let p = bma_classification(logits.view(), SampleWeights::uniform(2).unwrap()).unwrap();
        assert!((p.probs[[0, 0]] - 0.5).abs() < 1e-12 && (p.probs[[0, 1]] - 0.5).abs() < 1e-12);
        assert!(p.aleatoric[0].abs() < 1e-12);
        assert!((p.epistemic[0] - 2f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn non_finite_samples_are_reported_not_averaged() {
        let mut logits = Array3::<f32>::zeros((4, 3, 2));
        logits[[1, 2, 0]] = f32::NAN;
        logits[[3, 0, 1]] = f32::INFINITY;
        let mut acc = ClassificationAccumulator::new(3, 2, SampleWeights::uniform(4).unwrap()).unwrap();
        acc.add(0, 0, logits.slice(s![..2, .., ..])).unwrap();
        acc.add(2, 0, logits.slice(s![2.., .., ..])).unwrap();
        assert_eq!(acc.non_finite_samples(), vec![1, 3]);
        let err = acc.finish().unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Numeric);
        assert!(err.message().contains("2 of 4 samples"), "{}", err.message());
        assert!(err.message().contains("[1, 3]"), "{}", err.message());
    }

    #[test]
    fn regression_welford_matches_two_pass() {
        // Means 1e8 + {1, 2, 4} (exact in f32 up to 8): a naive E[x²] − E[x]² loses all digits.
        let out = array![[[1e8f32 + 8.0]], [[1e8 + 16.0]], [[1e8 + 32.0]]];
        let p = bma_regression(out.view(), Noise::Homoscedastic { sigma: 0.5 }, SampleWeights::uniform(3).unwrap())
            .unwrap();
        // mean offset 56/3; variance ((8−56/3)² + (16−56/3)² + (32−56/3)²)/3 = 896/9.
        assert!((p.mean[[0, 0]] - (1e8 + 56.0 / 3.0)).abs() < 1e-6);
        assert!((p.epistemic[[0, 0]] - 896.0 / 9.0).abs() < 1e-6);
        assert_eq!(p.aleatoric[[0, 0]], 0.25);
    }

    #[test]
    fn overflowing_log_variance_is_non_finite() {
        let out = array![[[0.0f32, 1000.0]], [[0.0, 0.0]]];
        let err = bma_regression(out.view(), Noise::Heteroscedastic, SampleWeights::uniform(2).unwrap()).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Numeric);
        assert!(err.message().contains("[0]"), "{}", err.message());
    }
}
