//! The bundle's tensors (`tensors.safetensors`), checked against the manifest.
use ndarray::Array2;
use safetensors::{Dtype, SafeTensors};

use super::manifest::{Manifest, Task};
use crate::geometry::{Geometry, SLICE_TOLERANCE, SLICE_TOLERANCE_F16};
use crate::{Error, Result};

/// Eval-split targets and the HMC predictive on them.
#[derive(Debug, Clone)]
pub enum EvalTargets {
    Classification { labels: Vec<i64>, hmc_probs: Array2<f32> },
    Regression { y: Array2<f32>, hmc_mean: Array2<f32>, hmc_var: Array2<f32> },
}

/// Everything `tensors.safetensors` holds that the runtime uses, owned and validated.
#[derive(Debug, Clone)]
pub struct BundleTensors {
    pub whiten_mean: Vec<f32>,
    pub whiten_scale: Vec<f32>,
    /// `Σ log scale`, the whitening's contribution to every log-density.
    pub sum_log_scale: f64,
    pub reference_theta: Vec<f32>,
    pub posterior_theta: Array2<f32>,
    pub eval_x: Array2<f32>,
    pub eval: EvalTargets,
    /// Out-of-distribution inputs for the epistemic checks (`eval.ood_x`, optional).
    pub ood_x: Option<Array2<f32>>,
    /// The flow's training draws in whitened coordinates `[n, D]` (`flow.anchors`), as f32.
    pub anchors: Option<Array2<f32>>,
    /// Refinement's tensors (format version 3).
    pub refine: Option<RefineTensors>,
}

/// `refine.inverse_mass` `[D]` (HMC's diagonal inverse mass) and, for canonical bundles,
/// `refine.anchor_unit_norms` `[n_anchors, H]`: the norm of every hidden unit that
/// canonicalization divided out of each stored anchor, so refinement runs at the scale
/// the posterior was sampled at.
#[derive(Debug, Clone)]
pub struct RefineTensors {
    pub inverse_mass: Vec<f32>,
    pub anchor_unit_norms: Option<Array2<f32>>,
}

pub const INVERSE_MASS_TENSOR: &str = "refine.inverse_mass";
pub const UNIT_NORMS_TENSOR: &str = "refine.anchor_unit_norms";

/// Name of the anchors tensor the pipeline writes; present without a manifest entry it is refused.
pub const ANCHORS_TENSOR: &str = "flow.anchors";

struct Table<'a>(SafeTensors<'a>);

impl<'a> Table<'a> {
    fn raw(&self, name: &str, dtype: Dtype, ndim: usize) -> Result<(Vec<usize>, &'a [u8])> {
        let view =
            self.0.tensor(name).map_err(|_| Error::bundle(format!("tensor {name}: missing from the tensors file")))?;
        if view.dtype() != dtype {
            return Err(Error::bundle(format!("tensor {name}: dtype is {:?}, expected {dtype:?}", view.dtype())));
        }
        if view.shape().len() != ndim {
            return Err(Error::bundle(format!(
                "tensor {name}: shape {:?} has rank {}, expected rank {ndim}",
                view.shape(),
                view.shape().len()
            )));
        }
        Ok((view.shape().to_vec(), view.data()))
    }

    fn f32s(&self, name: &str, ndim: usize) -> Result<(Vec<usize>, Vec<f32>)> {
        let (shape, data) = self.raw(name, Dtype::F32, ndim)?;
        let values = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Ok((shape, values))
    }

    /// A matrix stored as f16 or f32, returned as f32 (f16 converts exactly).
    fn matrix_f16_or_f32(&self, name: &str, dtype: &str, rows: usize, cols: usize) -> Result<Array2<f32>> {
        if dtype == "f32" {
            return self.matrix(name, Some(rows), cols);
        }
        let (shape, data) = self.raw(name, Dtype::F16, 2)?;
        expect_shape(name, &shape, &[rows, cols])?;
        let values = data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
        Array2::from_shape_vec((rows, cols), values).map_err(|e| Error::bundle(format!("tensor {name}: {e}")))
    }

    fn has(&self, name: &str) -> bool {
        self.0.tensor(name).is_ok()
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (shape, v) = self.f32s(name, 1)?;
        expect_shape(name, &shape, &[len])?;
        Ok(v)
    }

    fn matrix(&self, name: &str, rows: Option<usize>, cols: usize) -> Result<Array2<f32>> {
        let (shape, v) = self.f32s(name, 2)?;
        let want_rows = rows.unwrap_or(shape[0]);
        expect_shape(name, &shape, &[want_rows, cols])?;
        Array2::from_shape_vec((shape[0], shape[1]), v).map_err(|e| Error::bundle(format!("tensor {name}: {e}")))
    }
}

fn refine_tensors(table: &Table<'_>, manifest: &Manifest, anchors: Option<&Array2<f32>>) -> Result<RefineTensors> {
    let positive = |name: &str, values: &[f32]| -> Result<()> {
        require_finite(name, values)?;
        match values.iter().enumerate().find(|(_, v)| **v <= 0.0) {
            Some((i, v)) => Err(Error::bundle(format!("tensor {name}: entries must be > 0, found {v} at index {i}"))),
            None => Ok(()),
        }
    };
    let inverse_mass = table.vector(INVERSE_MASS_TENSOR, manifest.network.dim)?;
    positive(INVERSE_MASS_TENSOR, &inverse_mass)?;
    let anchor_unit_norms = if table.has(UNIT_NORMS_TENSOR) {
        let anchors = anchors.ok_or_else(|| {
            Error::bundle(format!("tensor {UNIT_NORMS_TENSOR}: present, but the bundle has no flow.anchors to rescale"))
        })?;
        let layers = &manifest.network.layers;
        let hidden: usize = layers[..layers.len() - 1].iter().map(|l| l.outputs).sum();
        let norms = table.matrix(UNIT_NORMS_TENSOR, Some(anchors.nrows()), hidden)?;
        positive(UNIT_NORMS_TENSOR, norms.as_slice().unwrap_or(&[]))?;
        Some(norms)
    } else {
        None
    };
    Ok(RefineTensors { inverse_mass, anchor_unit_norms })
}

fn expect_shape(name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(Error::bundle(format!(
            "tensor {name}: shape {got:?} disagrees with the manifest, expected {want:?}"
        )));
    }
    Ok(())
}

fn require_finite(name: &str, values: &[f32]) -> Result<()> {
    let bad: Vec<usize> = values.iter().enumerate().filter(|(_, v)| !v.is_finite()).map(|(i, _)| i).collect();
    if let Some(first) = bad.first() {
        return Err(Error::bundle(format!(
            "tensor {name}: {} non-finite value(s) (NaN or Inf), first at flat index {first}",
            bad.len()
        )));
    }
    Ok(())
}

fn as_bundle(e: Error) -> Error {
    Error::bundle(e.message())
}

/// The flow works in whitened coordinates; on a sphere the whitening must be the
/// identity (mean 0, scale 1, exactly), or whitened points would leave the sphere.
fn check_sphere_whitening(geometry: &Geometry, mean: &[f32], scale: &[f32]) -> Result<()> {
    for i in (0..mean.len()).filter(|i| geometry.on_sphere(*i)) {
        for (name, v, want) in [("flow.whiten.mean", mean[i], 0.0), ("flow.whiten.scale", scale[i], 1.0)] {
            if v != want {
                return Err(Error::bundle(format!(
                    "tensor {name}: {v} at index {i}, a sphere coordinate of geometry {}; it must be {want} there \
                     (whitening applies to Euclidean coordinates only)",
                    geometry.name()
                )));
            }
        }
    }
    Ok(())
}

impl BundleTensors {
    /// Parse and check the tensors file against a (validated) manifest.
    pub fn parse(bytes: &[u8], manifest: &Manifest) -> Result<Self> {
        Ok(Self::parse_with_geometry(bytes, manifest)?.0)
    }

    /// `parse`, also returning the manifest's geometry, which the checks build once the
    /// whitening tensors have confirmed `D` (so the caller need not build it again).
    pub(crate) fn parse_with_geometry(bytes: &[u8], manifest: &Manifest) -> Result<(Self, Geometry)> {
        let table = Table(
            SafeTensors::deserialize(bytes)
                .map_err(|e| Error::bundle(format!("tensors file: not valid safetensors: {e}")))?,
        );
        let d = manifest.network.dim;
        let d_in = manifest.input.dim;

        let whiten_mean = table.vector("flow.whiten.mean", d)?;
        require_finite("flow.whiten.mean", &whiten_mean)?;
        let whiten_scale = table.vector("flow.whiten.scale", d)?;
        require_finite("flow.whiten.scale", &whiten_scale)?;
        if let Some((i, s)) = whiten_scale.iter().enumerate().find(|(_, s)| **s <= 0.0) {
            return Err(Error::bundle(format!("tensor flow.whiten.scale: scale must be > 0, found {s} at index {i}")));
        }
        let sum_log_scale = whiten_scale.iter().map(|s| f64::from(*s).ln()).sum();
        let geometry = Geometry::from_manifest(manifest)?;
        check_sphere_whitening(&geometry, &whiten_mean, &whiten_scale)?;

        let reference_theta = table.vector("reference.theta", d)?;
        require_finite("reference.theta", &reference_theta)?;
        let posterior_theta = table.matrix("posterior.theta", None, d)?;
        if posterior_theta.nrows() == 0 {
            return Err(Error::bundle("tensor posterior.theta: has no samples (M = 0)"));
        }
        require_finite("posterior.theta", posterior_theta.as_slice().unwrap_or(&[]))?;
        // Canonical draws lie on the slice; one that does not says the layout is not the one
        // the draws were canonicalized with.
        for (name, rows) in
            [("reference.theta", &reference_theta[..]), ("posterior.theta", posterior_theta.as_slice().unwrap_or(&[]))]
        {
            geometry.check_on_slice(rows, SLICE_TOLERANCE, &format!("tensor {name}:")).map_err(as_bundle)?;
        }

        let eval_x = table.matrix("eval.x", None, d_in)?;
        let n = eval_x.nrows();
        if n == 0 {
            return Err(Error::bundle("tensor eval.x: has no rows (N = 0)"));
        }
        require_finite("eval.x", eval_x.as_slice().unwrap_or(&[]))?;

        let eval = match &manifest.task {
            Task::Classification { classes, .. } => {
                let (shape, data) = table.raw("eval.y", Dtype::I64, 1)?;
                expect_shape("eval.y", &shape, &[n])?;
                let labels: Vec<i64> = data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                    .collect();
                if let Some((i, y)) = labels.iter().enumerate().find(|(_, y)| **y < 0 || **y >= *classes as i64) {
                    return Err(Error::bundle(format!(
                        "tensor eval.y: label {y} at index {i} is outside [0, {classes})"
                    )));
                }
                let hmc_probs = table.matrix("eval.hmc_probs", Some(n), *classes)?;
                require_finite("eval.hmc_probs", hmc_probs.as_slice().unwrap_or(&[]))?;
                // Each row is HMC's predictive distribution over the classes (f32 sums: 1e-3 slack).
                for (i, row) in hmc_probs.rows().into_iter().enumerate() {
                    let sum: f64 = row.iter().map(|p| f64::from(*p)).sum();
                    if row.iter().any(|p| *p < 0.0) || (sum - 1.0).abs() > 1e-3 {
                        return Err(Error::bundle(format!(
                            "tensor eval.hmc_probs: row {i} is not a probability distribution (entries >= 0 summing to 1; sum {sum})"
                        )));
                    }
                }
                EvalTargets::Classification { labels, hmc_probs }
            }
            Task::Regression { outputs, .. } => {
                let y = table.matrix("eval.y", Some(n), *outputs)?;
                let hmc_mean = table.matrix("eval.hmc_mean", Some(n), *outputs)?;
                let hmc_var = table.matrix("eval.hmc_var", Some(n), *outputs)?;
                for (name, a) in [("eval.y", &y), ("eval.hmc_mean", &hmc_mean), ("eval.hmc_var", &hmc_var)] {
                    require_finite(name, a.as_slice().unwrap_or(&[]))?;
                }
                if hmc_var.iter().any(|v| *v <= 0.0) {
                    return Err(Error::bundle("tensor eval.hmc_var: variances must be > 0"));
                }
                EvalTargets::Regression { y, hmc_mean, hmc_var }
            }
        };
        let ood_x = if table.has("eval.ood_x") {
            let m = table.matrix("eval.ood_x", None, d_in)?;
            if m.nrows() == 0 {
                return Err(Error::bundle("tensor eval.ood_x: has no rows (omit it, or give at least one input)"));
            }
            require_finite("eval.ood_x", m.as_slice().unwrap_or(&[]))?;
            Some(m)
        } else {
            None
        };
        let anchors = match &manifest.flow.anchors {
            Some(spec) => {
                let mut a = table.matrix_f16_or_f32(&spec.tensor, &spec.dtype, spec.count, d)?;
                require_finite(&spec.tensor, a.as_slice().unwrap_or(&[]))?;
                if !geometry.is_euclidean() {
                    let tol = if spec.dtype == "f16" { SLICE_TOLERANCE_F16 } else { SLICE_TOLERANCE };
                    let rows = a.as_slice_mut().expect("standard layout");
                    geometry.check_on_slice(rows, tol, &format!("tensor {}:", spec.tensor)).map_err(as_bundle)?;
                    // Within the storage's rounding of the slice: put them exactly on it, so
                    // stored draws and starts from them stay on the slice to f32 precision.
                    geometry.project_rows(rows, &spec.tensor).map_err(as_bundle)?;
                }
                Some(a)
            }
            None if table.has(ANCHORS_TENSOR) => {
                return Err(Error::bundle(format!(
                    "tensor {ANCHORS_TENSOR}: present, but the manifest has no flow.anchors entry describing it"
                )))
            }
            None => None,
        };
        let refine = match &manifest.refine {
            Some(_) => Some(refine_tensors(&table, manifest, anchors.as_ref())?),
            None => {
                if let Some(name) = [INVERSE_MASS_TENSOR, UNIT_NORMS_TENSOR].into_iter().find(|n| table.has(n)) {
                    return Err(Error::bundle(format!(
                        "tensor {name}: present, but the manifest has no refine entry describing it"
                    )));
                }
                None
            }
        };
        let tensors = BundleTensors {
            whiten_mean,
            whiten_scale,
            sum_log_scale,
            reference_theta,
            posterior_theta,
            eval_x,
            eval,
            ood_x,
            anchors,
            refine,
        };
        Ok((tensors, geometry))
    }
}
