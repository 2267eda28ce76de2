//! Bayesian model averaging on a loaded model: run `net.onnx` over weight
//! samples and inputs in blocks that fit a byte budget, and feed each block to
//! the accumulators of `bma`.
use ndarray::{Array2, ArrayView2, ArrayView3};

use crate::bma::{
    ClassificationAccumulator, ClassificationPrediction, Noise, RegressionAccumulator, RegressionPrediction,
    SampleWeights,
};
use crate::bundle::{manifest, Task};
use crate::model::Model;
use crate::sampler::SampleOptions;
use crate::{Error, Result};

/// Options for `predict`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PredictOptions {
    /// Upper bound on the bytes of one `net.onnx` call (inputs, weights and outputs).
    pub max_chunk_bytes: usize,
}

impl Default for PredictOptions {
    fn default() -> Self {
        PredictOptions { max_chunk_bytes: 64 << 20 }
    }
}

/// A BMA prediction with its uncertainty decomposition.
#[derive(Debug, Clone, PartialEq)]
pub enum Prediction {
    Classification(ClassificationPrediction),
    Regression(RegressionPrediction),
}

impl Prediction {
    /// `[N, outputs]`: class probabilities or the predictive mean.
    pub fn mean(&self) -> Array2<f64> {
        match self {
            Prediction::Classification(p) => p.probs.clone(),
            Prediction::Regression(p) => p.mean.clone(),
        }
    }
    /// `[N, U]` arrays (total, aleatoric, epistemic): entropies (U = 1) or variances (U = outputs).
    pub fn decomposition(&self) -> (Array2<f64>, Array2<f64>, Array2<f64>) {
        match self {
            Prediction::Classification(p) => {
                let col = |a: &ndarray::Array1<f64>| a.clone().insert_axis(ndarray::Axis(1));
                (col(&p.total), col(&p.aleatoric), col(&p.epistemic))
            }
            Prediction::Regression(p) => (p.total.clone(), p.aleatoric.clone(), p.epistemic.clone()),
        }
    }
    /// Effective sample size of the sample weights.
    pub fn ess(&self) -> f64 {
        match self {
            Prediction::Classification(p) => p.ess,
            Prediction::Regression(p) => p.ess,
        }
    }
}

enum Accumulator {
    Classification(ClassificationAccumulator),
    Regression(RegressionAccumulator),
}

impl Accumulator {
    fn add(&mut self, s0: usize, n0: usize, out: ArrayView3<'_, f32>) -> Result<()> {
        match self {
            Accumulator::Classification(a) => a.add(s0, n0, out),
            Accumulator::Regression(a) => a.add(s0, n0, out),
        }
    }
    fn finish(self) -> Result<Prediction> {
        Ok(match self {
            Accumulator::Classification(a) => Prediction::Classification(a.finish()?),
            Accumulator::Regression(a) => Prediction::Regression(a.finish()?),
        })
    }
}

/// Block sizes `(samples, inputs)` for one call: start from everything, halve the
/// samples first, then the inputs, until the call fits the budget.
pub fn block_sizes(s: usize, n: usize, d: usize, d_in: usize, c: usize, budget: usize) -> (usize, usize) {
    // Saturating: counts from the caller must not wrap the estimate to a small number.
    let bytes = |sc: usize, nc: usize| {
        sc.saturating_mul(d)
            .saturating_add(nc.saturating_mul(d_in))
            .saturating_add(sc.saturating_mul(nc).saturating_mul(c))
            .saturating_mul(4)
    };
    let (mut sc, mut nc) = (s.max(1), n.max(1));
    while bytes(sc, nc) > budget && (sc > 1 || nc > 1) {
        if sc > 1 {
            sc = sc.div_ceil(2);
        } else {
            nc = nc.div_ceil(2);
        }
    }
    (sc, nc)
}

impl Model {
    /// Raw network outputs `[S, N, C]` for inputs `x` `[N, d_in]` and weights `theta` `[S, D]`.
    pub fn net_outputs(&self, x: ArrayView2<f32>, theta: ArrayView2<f32>) -> Result<ndarray::Array3<f32>> {
        let (s, n) = self.check_predict_shapes(x, theta)?;
        let c = self.manifest().task.net_outputs();
        let x = x.as_standard_layout();
        let theta = theta.as_standard_layout();
        let too_big = || Error::invalid(format!("outputs of {s} weight samples at {n} inputs do not fit in memory"));
        let buf = crate::alloc::zeroed(&[s, n, c], too_big)?;
        let mut out = ndarray::Array3::from_shape_vec((s, n, c), buf).expect("s·n·c elements");
        self.engine().net(x.as_slice().unwrap(), n, theta.as_slice().unwrap(), s, out.as_slice_mut().unwrap())?;
        Ok(out)
    }

    fn check_predict_shapes(&self, x: ArrayView2<f32>, theta: ArrayView2<f32>) -> Result<(usize, usize)> {
        if x.ncols() != self.input_dim() {
            return Err(Error::invalid(format!(
                "inputs have {} features, the model takes {}",
                x.ncols(),
                self.input_dim()
            )));
        }
        if theta.ncols() != self.weight_dim() {
            return Err(Error::invalid(format!(
                "weights have {} columns, the model has D = {}",
                theta.ncols(),
                self.weight_dim()
            )));
        }
        if x.nrows() == 0 {
            return Err(Error::invalid("predict needs at least one input, got 0"));
        }
        if theta.nrows() == 0 {
            return Err(Error::invalid("predict needs at least one weight sample, got 0"));
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(format!("input row {} has a NaN or Inf feature", i / x.ncols())));
        }
        if let Some(i) = theta.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(format!("weight sample {} has a NaN or Inf weight", i / theta.ncols())));
        }
        Ok((theta.nrows(), x.nrows()))
    }

    /// BMA over the weight samples `theta` `[S, D]` at inputs `x` `[N, d_in]`, with
    /// optional per-sample log-weights (self-normalized; uniform when `None`).
    pub fn predict(
        &self,
        x: ArrayView2<f32>,
        theta: ArrayView2<f32>,
        log_weights: Option<&[f32]>,
        options: &PredictOptions,
    ) -> Result<Prediction> {
        let (s, n) = self.check_predict_shapes(x, theta)?;
        let lw: Option<Vec<f64>> = log_weights.map(|l| l.iter().map(|v| f64::from(*v)).collect());
        let weights = SampleWeights::new(s, lw.as_deref())?;
        let task = &self.manifest().task;
        let c = task.net_outputs();
        let mut acc = match task {
            Task::Classification { classes, .. } => {
                Accumulator::Classification(ClassificationAccumulator::new(n, *classes, weights)?)
            }
            Task::Regression { outputs, noise } => {
                let noise = match noise {
                    manifest::Noise::Homoscedastic { sigma } => Noise::Homoscedastic { sigma: *sigma },
                    manifest::Noise::Heteroscedastic => Noise::Heteroscedastic,
                };
                Accumulator::Regression(RegressionAccumulator::new(n, *outputs, noise, weights)?)
            }
        };
        let (sc, nc) = block_sizes(s, n, self.weight_dim(), self.input_dim(), c, options.max_chunk_bytes);
        let x = x.as_standard_layout();
        let theta = theta.as_standard_layout();
        let (d, d_in) = (self.weight_dim(), self.input_dim());
        let xs = x.as_slice().expect("standard layout");
        let ts = theta.as_slice().expect("standard layout");
        let mut out = vec![0f32; sc * nc * c];
        for s0 in (0..s).step_by(sc) {
            let s1 = (s0 + sc).min(s);
            for n0 in (0..n).step_by(nc) {
                let n1 = (n0 + nc).min(n);
                let block = &mut out[..(s1 - s0) * (n1 - n0) * c];
                self.engine().net(&xs[n0 * d_in..n1 * d_in], n1 - n0, &ts[s0 * d..s1 * d], s1 - s0, block)?;
                let view = ArrayView3::from_shape((s1 - s0, n1 - n0, c), &*block).expect("block shape");
                acc.add(s0, n0, view)?;
            }
        }
        acc.finish()
    }

    /// Draw `n_samples` weights and average their predictions at `x`: one call for
    /// users who never look at weights. The average has uniform weights, so no log-density is
    /// computed (`sample_options.trace` is checked, then ignored, as `pf_sample_predict` does);
    /// the draws are those of `sample` with trace none (refined by the bundle's default).
    pub fn sample_predict(
        &self,
        n_samples: usize,
        sample_options: &SampleOptions,
        x: ArrayView2<f32>,
        options: &PredictOptions,
    ) -> Result<Prediction> {
        if n_samples == 0 {
            return Err(Error::invalid("sample_predict needs at least one sample, got 0"));
        }
        crate::sampler::check_probes(sample_options.trace)?;
        let o = SampleOptions { trace: crate::TraceMode::None, ..sample_options.clone() };
        let samples = self.sample(n_samples, &o)?;
        self.predict(x, samples.theta.view(), None, options)
    }
}
