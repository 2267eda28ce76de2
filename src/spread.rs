//! The spread of a set of weight samples, judged against the bundle's held-out
//! posterior chain (`posterior.theta`). TV and NLL judge only the averaged
//! prediction, and a collapsed sample set passes them (one MAP net has TV 0.01 on
//! moons); these two ratios judge what they miss.
//!
//! - **Memorization ratio**: the median over samples of the nearest-neighbour
//!   distance, in whitened coordinates `x = (θ − mean) / scale`, from each sample
//!   to the stored anchors, divided by the same median for the held-out chain's
//!   draws. About 1: as far from the training draws as fresh HMC draws are; far
//!   below 1: near-copies of them.
//! - **Epistemic ratio**: the mean epistemic uncertainty of the samples' model
//!   average (mutual information for classification, the variance of the predicted
//!   means for regression), divided by that of the held-out chain, on given inputs.
use ndarray::{Array2, ArrayView2, Axis};

use crate::{Error, Model, PredictOptions, Result};

/// Whitened copies of weight rows: `(θ − mean) / scale`.
pub fn whiten(model: &Model, theta: ArrayView2<f32>) -> Array2<f32> {
    let t = model.tensors();
    let mut x = theta.to_owned();
    for mut row in x.rows_mut() {
        for (i, v) in row.iter_mut().enumerate() {
            *v = (*v - t.whiten_mean[i]) / t.whiten_scale[i];
        }
    }
    x
}

/// For each row of `points`, the Euclidean distance to its nearest row of `anchors`,
/// by `|p|² + |a|² − 2 p·a` with one matrix product per block of points.
pub fn nearest_distances(points: ArrayView2<f32>, anchors: ArrayView2<f32>) -> Vec<f64> {
    let anchor_sq: Vec<f64> =
        anchors.rows().into_iter().map(|a| a.iter().map(|v| f64::from(*v).powi(2)).sum()).collect();
    let mut out = Vec::with_capacity(points.nrows());
    for block in points.axis_chunks_iter(Axis(0), 256) {
        let dots = block.dot(&anchors.t());
        for (p, row) in block.rows().into_iter().zip(dots.rows()) {
            let p_sq: f64 = p.iter().map(|v| f64::from(*v).powi(2)).sum();
            let best = row
                .iter()
                .zip(&anchor_sq)
                .map(|(d, a_sq)| p_sq + a_sq - 2.0 * f64::from(*d))
                .fold(f64::INFINITY, f64::min);
            out.push(best.max(0.0).sqrt());
        }
    }
    out
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// The held-out chain's side of both ratios, computed once per model and reused for
/// every sample set judged against it.
pub struct HeldOut {
    /// Median nearest-anchor distance of the held-out draws; `None` without anchors.
    nearest_anchor_median: Option<f64>,
    /// The held-out chain's mean epistemic uncertainty; `None` where it has none to compare
    /// with (one draw, or identical draws), which leaves the ratio undefined.
    epistemic_eval: Option<f64>,
    epistemic_ood: Option<f64>,
}

/// Below this the held-out chain's epistemic uncertainty is taken as zero (a ratio
/// against it would be rounding noise blown up, e.g. 3e16).
const NO_EPISTEMIC: f64 = 1e-12;

fn positive(v: f64) -> Option<f64> {
    (v > NO_EPISTEMIC).then_some(v)
}

impl HeldOut {
    pub fn new(model: &Model) -> Result<HeldOut> {
        let t = model.tensors();
        let held = t.posterior_theta.view();
        let nearest_anchor_median =
            t.anchors.as_ref().map(|anchors| median(&nearest_distances(whiten(model, held).view(), anchors.view())));
        let epistemic_ood = t.ood_x.as_ref().map(|ood| mean_epistemic(model, ood.view(), held)).transpose()?;
        Ok(HeldOut {
            nearest_anchor_median,
            epistemic_eval: positive(mean_epistemic(model, t.eval_x.view(), held)?),
            epistemic_ood: epistemic_ood.and_then(positive),
        })
    }

    /// The memorization ratio of weight samples `theta` `[n, D]`, or `None` without anchors.
    pub fn memorization_ratio(&self, model: &Model, theta: ArrayView2<f32>) -> Option<f64> {
        let anchors = model.tensors().anchors.as_ref()?;
        let samples = median(&nearest_distances(whiten(model, theta).view(), anchors.view()));
        Some(samples / self.nearest_anchor_median?)
    }

    /// The epistemic ratio of `theta` on the eval inputs, or `None` when the held-out chain
    /// has no epistemic uncertainty to compare with.
    pub fn epistemic_ratio_eval(&self, model: &Model, theta: ArrayView2<f32>) -> Result<Option<f64>> {
        match self.epistemic_eval {
            Some(held) => Ok(Some(mean_epistemic(model, model.tensors().eval_x.view(), theta)? / held)),
            None => Ok(None),
        }
    }

    /// The epistemic ratio of `theta` on `eval.ood_x`, or `None` when the bundle has none
    /// (or the held-out chain has no epistemic uncertainty there).
    pub fn epistemic_ratio_ood(&self, model: &Model, theta: ArrayView2<f32>) -> Result<Option<f64>> {
        match (&model.tensors().ood_x, self.epistemic_ood) {
            (Some(ood), Some(held)) => Ok(Some(mean_epistemic(model, ood.view(), theta)? / held)),
            _ => Ok(None),
        }
    }
}

/// Mean epistemic uncertainty of the model average of `theta` at inputs `x`.
pub fn mean_epistemic(model: &Model, x: ArrayView2<f32>, theta: ArrayView2<f32>) -> Result<f64> {
    let p = model.predict(x, theta, None, &PredictOptions::default())?;
    let (_, _, epistemic) = p.decomposition();
    epistemic.mean().ok_or_else(|| Error::invalid("no inputs for the epistemic ratio"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn nearest_distances_match_brute_force() {
        let anchors = array![[0.0f32, 0.0, 0.0], [3.0, 4.0, 0.0], [1.0, 1.0, 1.0]];
        let points = array![[3.0f32, 4.0, 0.0], [0.1, 0.0, 0.0], [2.0, 2.0, 2.0], [-3.0, -4.0, 0.0]];
        let got = nearest_distances(points.view(), anchors.view());
        let want = [0.0, 0.1, 3f64.sqrt(), 5.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
