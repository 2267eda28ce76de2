//! Drawing weight samples (forward in time) and evaluating log-densities of
//! given weights (backward in time) by integrating the flow ODE.
//!
//! Work is split into batches of `batch_size` samples so memory stays bounded
//! for any number of samples; each sample's randomness comes from its own
//! stream (`rng::sample_stream`), so batching never changes which sample is drawn.
use std::f64::consts::PI;

use ndarray::{Array2, ArrayView2};

use crate::engine::Engine;
use crate::geometry::{Geometry, SLICE_TOLERANCE};
use crate::ode::{self, OdeStats, SolverConfig, SolverKind, VectorField, Workspace};
use crate::refine::{RefineKernel, RefineRun, RefineStats, Refiner};
use crate::trace::TraceMode;
use crate::{alloc, rng};
use crate::{Error, Result};

/// Options for `sample` and `log_prob`. `None` fields take the bundle's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleOptions {
    pub seed: u64,
    /// Index of the first sample: sample `i` of a call is stream `first_index + i`, so a
    /// long run split into calls gives the same samples as one call.
    pub first_index: u64,
    pub solver: Option<SolverKind>,
    pub steps: Option<u32>,
    pub rtol: Option<f64>,
    pub atol: Option<f64>,
    /// Cap on attempted steps for `dopri5`.
    pub max_steps: u32,
    pub trace: TraceMode,
    /// Samples integrated together per ONNX Runtime call; 0 picks a default.
    pub batch_size: usize,
    /// Memory bound for the basis vectors of one exact-trace call.
    pub exact_chunk_bytes: usize,
    /// Start time `t₀ ∈ [0, 1]`; `None` takes the bundle's default (0 without anchors), and
    /// for refined samples its refinement start time (`Model::default_refine_start_time`).
    /// 0 integrates from `N(0, I)`; `0 < t₀ < 1` starts at `t₀·a + (1 − t₀)·z` around a
    /// stored anchor `a` (on a `sphere_product` bundle, `slerp(z, a; t₀)` on each sphere);
    /// 1 returns the anchors themselves (no density).
    pub start_time: Option<f64>,
    /// `log_prob` on a `sphere_product` bundle: put rows whose units are off the slice
    /// (`|‖(w, b)‖ − 1| > 1e-4`) onto it by renormalizing each unit, instead of refusing them.
    pub project_to_slice: bool,
    /// HMC transitions on the posterior after drawing (bundles with `refine`, format versions 3 and 4);
    /// `None` takes the bundle's `refine.default_transitions` when no log-density is asked for
    /// and none otherwise (refined samples have no density). See `crate::refine`.
    pub refine_transitions: Option<u32>,
    /// The HMC transition refinement runs (see `crate::refine`); `None` takes the bundle's,
    /// the endpoint kernel for every format so far.
    pub refine_kernel: Option<RefineKernel>,
    /// Leapfrog steps per refinement trajectory; `None` takes the bundle's.
    pub refine_leapfrog: Option<u32>,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            seed: 0,
            first_index: 0,
            solver: None,
            steps: None,
            rtol: None,
            atol: None,
            max_steps: 10_000,
            trace: TraceMode::None,
            batch_size: 0,
            exact_chunk_bytes: 64 << 20,
            start_time: None,
            project_to_slice: false,
            refine_transitions: None,
            refine_kernel: None,
            refine_leapfrog: None,
        }
    }
}

/// Largest accepted `steps`, probe count and batch size: beyond these a request is a mistake.
pub const MAX_STEPS: u32 = 1_000_000;
pub const MAX_PROBES: u32 = 4_096;
pub const DEFAULT_BATCH: usize = 128;
/// Working memory one batch may hold (states, solver stages, Hutchinson probes): a larger
/// `batch_size` is reduced to fit, so no accepted request exhausts memory. Only the
/// adaptive solver's shared step size depends on the batch; fixed-step results do not.
pub const BATCH_BYTES: usize = 256 << 20;
/// f32 copies of a sample's state one batch holds: x, seven Dormand–Prince stages, the
/// stage input and the error estimate, and the JVP's velocity scratch.
const STATE_COPIES: usize = 11;

/// Drawn samples: `theta` `[n, D]`, and log-densities when a trace mode was set.
#[derive(Debug, Clone)]
pub struct Samples {
    pub theta: Array2<f32>,
    pub log_density: Option<Vec<f32>>,
    /// Standard error of each Hutchinson estimate (only with more than one probe).
    pub log_density_stderr: Option<Vec<f32>>,
    pub stats: OdeStats,
    /// The start time the samples were drawn from (the caller's, else the bundle's default
    /// for this kind of draw: refinement's own start time when they were refined).
    pub start_time: f64,
    /// Refinement's transitions and acceptance, when samples were refined.
    pub refine: Option<RefineStats>,
}

/// Log-densities of given weights.
#[derive(Debug, Clone)]
pub struct LogDensities {
    pub log_density: Vec<f32>,
    pub log_density_stderr: Option<Vec<f32>>,
    pub stats: OdeStats,
}

/// What the sampler needs from a model: its engine and whitening.
pub struct FlowContext<'a> {
    pub engine: &'a Engine,
    pub dim: usize,
    pub whiten_mean: &'a [f32],
    pub whiten_scale: &'a [f32],
    pub sum_log_scale: f64,
    pub default_solver: SolverConfig,
    /// Stored training draws in whitened coordinates, when the bundle has them.
    pub anchors: Option<&'a Array2<f32>>,
    pub default_start_time: f64,
    /// The start time of refined sampling (transitions > 0) when the options leave it unset.
    pub default_refine_start_time: f64,
    /// Which coordinates form unit spheres; whitening is the identity on them.
    pub geometry: &'a Geometry,
    /// The bundle's HMC refinement and its default transitions (format versions 3 and 4).
    pub refiner: Option<(Refiner<'a>, u32)>,
}

/// Where sampling starts: the base `N(0, I)` at 0, a Gaussian mixture around the
/// anchors in between, or the anchors themselves at 1.
#[derive(Debug, Clone, Copy)]
enum Start<'a> {
    Base,
    Mixture { t0: f64, anchors: &'a Array2<f32> },
    Anchors(&'a Array2<f32>),
}

impl FlowContext<'_> {
    fn solver(&self, o: &SampleOptions) -> Result<SolverConfig> {
        let mut cfg = self.default_solver;
        if let Some(kind) = o.solver {
            cfg.kind = kind;
        }
        if let Some(steps) = o.steps {
            cfg.steps = steps;
        }
        if let Some(r) = o.rtol {
            cfg.rtol = r;
        }
        if let Some(a) = o.atol {
            cfg.atol = a;
        }
        cfg.max_steps = o.max_steps;
        for (name, v) in [("steps", cfg.steps), ("max_steps", cfg.max_steps)] {
            if v > MAX_STEPS {
                return Err(Error::invalid(format!("{name} {v} exceeds the limit of {MAX_STEPS}")));
            }
        }
        check_probes(o.trace)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The start time the options ask for (or the bundle's default), checked.
    fn start(&self, o: &SampleOptions) -> Result<Start<'_>> {
        self.start_at(o.start_time.unwrap_or(self.default_start_time))
    }

    /// `t0` checked: the base distribution, a mixture around the anchors, or the anchors.
    fn start_at(&self, t0: f64) -> Result<Start<'_>> {
        if !(0.0..=1.0).contains(&t0) {
            return Err(Error::invalid(format!("start_time must be in [0, 1], got {t0}")));
        }
        if t0 == 0.0 {
            return Ok(Start::Base);
        }
        let anchors = self.anchors.ok_or_else(|| {
            Error::invalid(format!(
                "start_time {t0} > 0 needs stored anchor draws (flow.anchors), and this bundle has none"
            ))
        })?;
        Ok(if t0 == 1.0 { Start::Anchors(anchors) } else { Start::Mixture { t0, anchors } })
    }

    /// The refinement transitions a `sample` call runs: the request, or the bundle's default
    /// when no log-density is asked for; refined samples have no density.
    fn refine_transitions(&self, o: &SampleOptions) -> Result<u32> {
        let default = self.refiner.as_ref().map_or(0, |(_, k)| *k);
        match o.refine_transitions {
            None if o.trace == TraceMode::None => Ok(default),
            None | Some(0) => Ok(0),
            Some(k) if k > crate::bundle::MAX_TRANSITIONS => Err(Error::invalid(format!(
                "refine_transitions {k} exceeds the limit of {}",
                crate::bundle::MAX_TRANSITIONS
            ))),
            Some(_) if self.refiner.is_none() => Err(Error::invalid(
                "refine_transitions > 0 needs a bundle with refinement (format version 3 or 4, a refine table), \
                 and this bundle has none",
            )),
            Some(_) if o.trace != TraceMode::None => Err(Error::invalid(
                "refined samples have no density: use trace none with refine_transitions > 0, or refine_transitions 0",
            )),
            Some(k) => Ok(k),
        }
    }

    fn batch_size(&self, o: &SampleOptions) -> usize {
        batch_len(o.batch_size, self.dim, o.trace)
    }

    /// Draw `n` samples, then refine them when asked (or by the bundle's default). Refined
    /// sampling without a start time starts at the bundle's refinement start time.
    pub fn sample(&self, n: usize, o: &SampleOptions) -> Result<Samples> {
        check_index_range("first_index", o.first_index, n)?;
        let transitions = self.refine_transitions(o)?;
        if let Some(l) = o.refine_leapfrog {
            if !(1..=crate::bundle::MAX_LEAPFROG_STEPS).contains(&l) {
                return Err(Error::invalid(format!(
                    "refine_leapfrog {l} is outside [1, {}]; leave it unset for the bundle's refine.leapfrog_steps",
                    crate::bundle::MAX_LEAPFROG_STEPS
                )));
            }
        }
        let default_t0 = if transitions > 0 { self.default_refine_start_time } else { self.default_start_time };
        let start_at = self.start_at(o.start_time.unwrap_or(default_t0))?;
        let solver = self.solver(o)?; // checked at t₀ = 1 too: a bad request is refused whatever the start
        let mut anchor_of = Vec::new();
        let mut samples = match start_at {
            Start::Anchors(anchors) => self.stored_draws(anchors, n, o, &mut anchor_of)?,
            _ => self.flow_samples(start_at, &solver, n, o, &mut anchor_of)?,
        };
        if let (Some((refiner, _)), true) = (&self.refiner, transitions > 0) {
            let rows = samples.theta.as_slice_mut().expect("standard layout");
            let batch = self.batch_size(o);
            let kernel = o.refine_kernel.unwrap_or_default();
            let run = RefineRun { transitions, kernel, leapfrog: o.refine_leapfrog };
            samples.refine = Some(refiner.refine(rows, &anchor_of, &run, o.seed, o.first_index, batch)?);
            check_finite_rows(samples.theta.view(), None, o.first_index, "refined weights")?;
        }
        Ok(samples)
    }

    /// `n` samples of the flow from `start_at`; `anchor_of` receives each one's anchor.
    fn flow_samples(
        &self,
        start_at: Start<'_>,
        solver: &SolverConfig,
        n: usize,
        o: &SampleOptions,
        anchor_of: &mut Vec<Option<usize>>,
    ) -> Result<Samples> {
        let d = self.dim;
        let t_start = start_at.time();
        let accs = o.trace.accumulators();
        let mut theta = zeroed_samples(n, d)?;
        let mut logd = vec![0f32; if accs > 0 { n } else { 0 }];
        let mut stderr = vec![0f32; if accs > 1 { n } else { 0 }];
        let mut stats = OdeStats::default();
        let mut work = BatchWork::default();
        let bs = self.batch_size(o);
        let mut start = 0;
        while start < n {
            let b = bs.min(n - start);
            work.prepare(b, d, accs, o.trace)?;
            for j in 0..b {
                let mut stream = rng::sample_stream(o.seed, o.first_index + (start + j) as u64);
                let x0 = &mut work.x[j * d..(j + 1) * d];
                anchor_of.push(start_at.draw(self.geometry, &mut stream, x0));
                if accs > 0 {
                    work.base_logp[j] = start_at.log_density(self.geometry, x0);
                }
                draw_probes(&mut stream, o.trace, &mut work.eps, j, d);
            }
            stats += self.integrate(solver, o, &mut work, b, t_start, 1.0)?;
            // θ = mean + scale ⊙ x₁; log q = log p_{t₀}(x_{t₀}) − ∫ tr J − Σ log scale.
            let rows = theta.as_slice_mut().expect("standard layout");
            for j in 0..b {
                let x1 = &work.x[j * d..(j + 1) * d];
                let out = &mut rows[(start + j) * d..(start + j + 1) * d];
                for i in 0..d {
                    out[i] = self.whiten_mean[i] + self.whiten_scale[i] * x1[i];
                }
                if accs > 0 {
                    let est =
                        work.acc[j * accs..(j + 1) * accs].iter().map(|a| work.base_logp[j] - a - self.sum_log_scale);
                    record_estimate(est, start + j, &mut logd, &mut stderr);
                }
            }
            start += b;
        }
        check_finite_rows(theta.view(), if accs > 0 { Some(&logd) } else { None }, o.first_index, "sampled weights")?;
        Ok(Samples {
            theta,
            log_density: (accs > 0).then_some(logd),
            log_density_stderr: (accs > 1).then_some(stderr),
            stats,
            start_time: t_start,
            refine: None,
        })
    }

    /// Log-densities of the rows of `theta` (`[n, D]`), integrating from t = 1 back to 0.
    /// Hutchinson probes for row `i` are those `sample` would use for sample `i` with the same seed.
    pub fn log_prob(&self, theta: ArrayView2<f32>, o: &SampleOptions) -> Result<LogDensities> {
        let d = self.dim;
        if theta.ncols() != d {
            return Err(Error::invalid(format!("theta has {} columns, the model has D = {d} weights", theta.ncols())));
        }
        if o.trace == TraceMode::None {
            return Err(Error::invalid(
                "log_prob needs a trace mode (hutchinson, hutchinson-gaussian or exact), not none",
            ));
        }
        check_index_range("first_index", o.first_index, theta.nrows())?;
        check_finite_rows(theta, None, o.first_index, "theta")?;
        let start_at = self.start(o)?;
        if let Start::Anchors(_) = start_at {
            return Err(Error::invalid(
                "log_prob at start_time 1 is undefined: stored draws have no density (use a start_time below 1)",
            ));
        }
        let t_start = start_at.time();
        let solver = self.solver(o)?;
        let n = theta.nrows();
        let accs = o.trace.accumulators();
        let mut logd = vec![0f32; n];
        let mut stderr = vec![0f32; if accs > 1 { n } else { 0 }];
        let mut stats = OdeStats::default();
        let mut work = BatchWork::default();
        let mut scratch = vec![0f32; d];
        let bs = self.batch_size(o);
        let mut start = 0;
        while start < n {
            let b = bs.min(n - start);
            work.prepare(b, d, accs, o.trace)?;
            for j in 0..b {
                let row = theta.row(start + j);
                let x1 = &mut work.x[j * d..(j + 1) * d];
                for (i, (xv, tv)) in x1.iter_mut().zip(row.iter()).enumerate() {
                    *xv = (tv - self.whiten_mean[i]) / self.whiten_scale[i];
                }
                self.onto_slice(x1, o.first_index + (start + j) as u64, o.project_to_slice)?;
                if let TraceMode::Hutchinson { .. } = o.trace {
                    let mut stream = rng::sample_stream(o.seed, o.first_index + (start + j) as u64);
                    let _ = start_at.draw(self.geometry, &mut stream, &mut scratch); // the start point's draws
                    draw_probes(&mut stream, o.trace, &mut work.eps, j, d);
                }
            }
            stats += self.integrate(&solver, o, &mut work, b, 1.0, t_start)?;
            // Integrating backwards leaves acc = −∫_{t₀}¹ tr J, so log q = log p_{t₀}(x_{t₀}) + acc − Σ log scale.
            for j in 0..b {
                let base = start_at.log_density(self.geometry, &work.x[j * d..(j + 1) * d]);
                let est = work.acc[j * accs..(j + 1) * accs].iter().map(|a| base + a - self.sum_log_scale);
                record_estimate(est, start + j, &mut logd, &mut stderr);
            }
            start += b;
        }
        let bad: Vec<usize> = logd.iter().enumerate().filter(|(_, v)| !v.is_finite()).map(|(i, _)| i).collect();
        if !bad.is_empty() {
            return Err(non_finite_error("log-densities", &bad, o.first_index));
        }
        Ok(LogDensities { log_density: logd, log_density_stderr: (accs > 1).then_some(stderr), stats })
    }

    /// On a sphere bundle, check that the whitened row `x` (sphere coordinates are canonical
    /// weights, the whitening being the identity there) lies on the slice, or project it
    /// when asked; either way it leaves renormalized, so the flow starts on the manifold.
    fn onto_slice(&self, x: &mut [f32], row: u64, project: bool) -> Result<()> {
        let Some(err) = self.geometry.slice_error(x) else { return Ok(()) };
        if err.deviation > SLICE_TOLERANCE && !project {
            return Err(Error::invalid(format!(
                "theta row {row} is off the slice of geometry {}: hidden layer {} unit {} has ‖(w, b)‖ = {}, not 1 \
                 within {SLICE_TOLERANCE:e} (log_prob takes canonical weights; set project_to_slice, or --project \
                 on the command line, to renormalize each unit first)",
                self.geometry.name(),
                err.sphere.layer,
                err.sphere.unit,
                err.norm
            )));
        }
        self.geometry.project_rows(x, &format!("theta row {row}"))
    }

    /// The anchors themselves, un-whitened, in a seeded order: a permutation drawn from
    /// `seed`, read from position `first_index` and cycled when more are asked than stored.
    fn stored_draws(
        &self,
        anchors: &Array2<f32>,
        n: usize,
        o: &SampleOptions,
        anchor_of: &mut Vec<Option<usize>>,
    ) -> Result<Samples> {
        if o.trace != TraceMode::None {
            return Err(Error::invalid(
                "start_time 1 returns the stored draws, which have no density: use trace none, or a start_time below 1",
            ));
        }
        let d = self.dim;
        let count = anchors.nrows();
        let order = rng::permutation(o.seed, count);
        let mut theta = zeroed_samples(n, d)?;
        let rows = theta.as_slice_mut().expect("standard layout");
        for j in 0..n {
            let pick = order[((o.first_index + j as u64) % count as u64) as usize];
            anchor_of.push(Some(pick));
            let a = anchors.row(pick);
            for (i, (out, x)) in rows[j * d..(j + 1) * d].iter_mut().zip(a.iter()).enumerate() {
                *out = self.whiten_mean[i] + self.whiten_scale[i] * x;
            }
        }
        let stats = OdeStats::default();
        Ok(Samples { theta, log_density: None, log_density_stderr: None, stats, start_time: 1.0, refine: None })
    }

    fn integrate(
        &self,
        solver: &SolverConfig,
        o: &SampleOptions,
        work: &mut BatchWork,
        b: usize,
        t0: f64,
        t1: f64,
    ) -> Result<OdeStats> {
        let d = self.dim;
        let chunk = (o.exact_chunk_bytes / (4 * d * b).max(1)).clamp(1, d);
        let mut field = FlowField {
            engine: self.engine,
            geometry: self.geometry,
            eps_tangent: &mut work.eps_tangent,
            correction: &mut work.correction,
            trace: o.trace,
            dim: d,
            t: vec![0.0; b],
            eps: &work.eps,
            quad: &mut work.quad,
            basis: &mut work.basis,
            v_scratch: &mut work.v_scratch,
            exact_chunk: chunk,
        };
        ode::integrate(&mut field, solver, t0, t1, &mut work.x, &mut work.acc, b, &mut work.ws)
    }
}

impl Start<'_> {
    fn time(&self) -> f64 {
        match self {
            Start::Base => 0.0,
            Start::Mixture { t0, .. } => *t0,
            Start::Anchors(_) => 1.0,
        }
    }

    /// Draw a start point from the sample's stream: `z` (D normals) from the base; at
    /// `0 < t₀ < 1` first an anchor index, then `z`, giving `t₀·a + (1 − t₀)·z`.
    /// On a sphere bundle the base normalizes each sphere block of `z` (uniform on the sphere),
    /// and between 0 and 1 each sphere block moves along the great circle from `z` toward `a`.
    /// Returns the anchor drawn around (`None` from the base).
    fn draw<R: rand::RngCore>(&self, geometry: &Geometry, stream: &mut R, x: &mut [f32]) -> Option<usize> {
        match self {
            Start::Base | Start::Anchors(_) if !geometry.is_euclidean() => geometry.draw_base(stream, x),
            Start::Base | Start::Anchors(_) => rng::fill_standard_normal(stream, x),
            Start::Mixture { t0, anchors } if !geometry.is_euclidean() => {
                let pick = rng::index(stream, anchors.nrows());
                geometry.draw_base(stream, x);
                geometry.geodesic_start(x, anchors.row(pick).as_slice().expect("standard layout"), *t0);
                return Some(pick);
            }
            Start::Mixture { t0, anchors } => {
                let pick = rng::index(stream, anchors.nrows());
                rng::fill_standard_normal(stream, x);
                let (t0, s) = (*t0 as f32, (1.0 - *t0) as f32);
                for (xv, av) in x.iter_mut().zip(anchors.row(pick).iter()) {
                    *xv = t0 * av + s * *xv;
                }
                return Some(pick);
            }
        }
        None
    }

    /// Log-density of the start distribution at `x`: `log N(x; 0, I)`, or the mixture
    /// `(1/n) Σ_i N(x; t₀ a_i, (1 − t₀)² I)` by log-sum-exp (on a sphere bundle, uniform ×
    /// normal, or the geodesic mixture of `Geometry::mixture_log_density`).
    fn log_density(&self, geometry: &Geometry, x: &[f32]) -> f64 {
        match self {
            Start::Base | Start::Anchors(_) if !geometry.is_euclidean() => geometry.base_log_density(x),
            Start::Base | Start::Anchors(_) => std_normal_logpdf(x),
            Start::Mixture { t0, anchors } if !geometry.is_euclidean() => geometry.mixture_log_density(x, anchors, *t0),
            Start::Mixture { t0, anchors } => mixture_logpdf(x, anchors, *t0),
        }
    }
}

/// `log (1/n) Σ_i N(x; t₀ a_i, σ² I)` with `σ = 1 − t₀`, stable by log-sum-exp.
fn mixture_logpdf(x: &[f32], anchors: &Array2<f32>, t0: f64) -> f64 {
    let sigma = 1.0 - t0;
    let d = x.len() as f64;
    let mut sq: Vec<f64> = Vec::with_capacity(anchors.nrows());
    for a in anchors.rows() {
        let dist: f64 = x
            .iter()
            .zip(a.iter())
            .map(|(xv, av)| {
                let r = f64::from(*xv) - t0 * f64::from(*av);
                r * r
            })
            .sum();
        sq.push(-0.5 * dist / (sigma * sigma));
    }
    let top = sq.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = top + sq.iter().map(|v| (v - top).exp()).sum::<f64>().ln();
    lse - (anchors.nrows() as f64).ln() - 0.5 * d * (2.0 * PI * sigma * sigma).ln()
}

/// A Hutchinson request's probe count is within `[1, MAX_PROBES]`.
pub(crate) fn check_probes(trace: TraceMode) -> Result<()> {
    match trace {
        TraceMode::Hutchinson { probes, .. } if probes == 0 || probes > MAX_PROBES => {
            Err(Error::invalid(format!("probes must be in [1, {MAX_PROBES}], got {probes}")))
        }
        _ => Ok(()),
    }
}

/// Samples per batch: `asked` (0: `DEFAULT_BATCH`), made smaller when a batch's working
/// memory would exceed `BATCH_BYTES` (never below one sample).
fn batch_len(asked: usize, dim: usize, trace: TraceMode) -> usize {
    let asked = if asked > 0 { asked } else { DEFAULT_BATCH };
    // Each probe is held raw and (on spheres) projected onto the tangent spaces.
    let probes = match trace {
        TraceMode::Hutchinson { probes, .. } => 2 * probes as usize,
        _ => 0,
    };
    let per_sample = 4usize.saturating_mul(dim).saturating_mul(STATE_COPIES + probes);
    asked.min((BATCH_BYTES / per_sample.max(1)).max(1))
}

/// Buffers for one batch, reused across batches.
#[derive(Default)]
struct BatchWork {
    x: Vec<f32>,
    acc: Vec<f64>,
    eps: Vec<f32>,
    quad: Vec<f32>,
    basis: Vec<f32>,
    v_scratch: Vec<f32>,
    base_logp: Vec<f64>,
    /// Sphere bundles: the probes projected onto the tangent spaces, and per state
    /// `Σ_s (k_s − 1)(x_s·u_s)`.
    eps_tangent: Vec<f32>,
    correction: Vec<f64>,
    ws: Workspace,
}

impl BatchWork {
    /// Size the buffers for a batch of `b`; an error, not an abort, when memory runs out.
    fn prepare(&mut self, b: usize, d: usize, accs: usize, trace: TraceMode) -> Result<()> {
        let too_big = || Error::invalid(format!("a batch of {b} samples of D = {d} weights does not fit in memory"));
        alloc::resize(&mut self.x, b * d, too_big)?;
        self.acc.clear();
        alloc::resize(&mut self.acc, b * accs, too_big)?;
        self.base_logp.resize(b, 0.0);
        if let TraceMode::Hutchinson { probes, .. } = trace {
            let len = (b * d).checked_mul(probes as usize).ok_or_else(too_big)?;
            alloc::resize(&mut self.eps, len, too_big)?;
        }
        Ok(())
    }
}

/// The flow's velocity plus, per trace mode, the integrands of the log-density.
struct FlowField<'a> {
    engine: &'a Engine,
    geometry: &'a Geometry,
    eps_tangent: &'a mut Vec<f32>,
    correction: &'a mut Vec<f64>,
    trace: TraceMode,
    dim: usize,
    t: Vec<f32>,
    eps: &'a [f32],
    quad: &'a mut Vec<f32>,
    basis: &'a mut Vec<f32>,
    v_scratch: &'a mut Vec<f32>,
    exact_chunk: usize,
}

impl VectorField for FlowField<'_> {
    fn eval(&mut self, t: f64, x: &[f32], _acc: &[f64], dx: &mut [f32], dacc: &mut [f64]) -> Result<()> {
        self.t.iter_mut().for_each(|v| *v = t as f32);
        let b = self.t.len();
        let d = self.dim;
        let spheres = !self.geometry.is_euclidean();
        match self.trace {
            TraceMode::None => self.engine.velocity(&self.t, x, dx)?,
            TraceMode::Hutchinson { probes, .. } => {
                let k = probes as usize;
                self.quad.resize(b * k, 0.0);
                // On spheres the fixed raw probe r becomes P(x_t) r at every evaluation, so
                // E[εεᵀ] = P on each sphere block: εᵀ J ε then estimates tr(P J P).
                let eps: &[f32] = if spheres {
                    self.eps_tangent.resize(b * k * d, 0.0);
                    for j in 0..b {
                        let block = j * k * d..(j + 1) * k * d;
                        self.geometry.project_tangent(
                            &x[j * d..(j + 1) * d],
                            &self.eps[block.clone()],
                            &mut self.eps_tangent[block],
                        );
                    }
                    self.eps_tangent
                } else {
                    self.eps
                };
                self.engine.velocity_jvp(&self.t, x, eps, k, dx, self.quad)?;
                for (a, q) in dacc.iter_mut().zip(self.quad.iter()) {
                    *a = f64::from(*q);
                }
            }
            TraceMode::Exact => {
                // tr J = Σ_i e_iᵀ J e_i, a chunk of basis vectors per call (on spheres the
                // projected P e_i, whose sum gives tr(P J P)).
                dacc.iter_mut().for_each(|a| *a = 0.0);
                self.v_scratch.resize(b * d, 0.0);
                let mut first = 0;
                while first < d {
                    let kc = self.exact_chunk.min(d - first);
                    self.basis.clear();
                    self.basis.resize(b * kc * d, 0.0);
                    for j in 0..b {
                        for k in 0..kc {
                            let e = &mut self.basis[(j * kc + k) * d..(j * kc + k + 1) * d];
                            if spheres {
                                self.geometry.basis_vector(&x[j * d..(j + 1) * d], first + k, e);
                            } else {
                                e[first + k] = 1.0;
                            }
                        }
                    }
                    self.quad.resize(b * kc, 0.0);
                    let v_out: &mut [f32] = if first == 0 { &mut *dx } else { &mut self.v_scratch[..] };
                    self.engine.velocity_jvp(&self.t, x, self.basis, kc, v_out, self.quad)?;
                    for j in 0..b {
                        dacc[j] += self.quad[j * kc..(j + 1) * kc].iter().map(|q| f64::from(*q)).sum::<f64>();
                    }
                    first += kc;
                }
            }
        }
        if spheres {
            // v = P u on each sphere; div_M v = tr(P J_u P) − Σ_s (k_s − 1)(x_s·u_s).
            self.correction.resize(b, 0.0);
            self.geometry.project_velocity(x, dx, self.correction);
            let per = if b == 0 { 0 } else { dacc.len() / b };
            for (j, c) in self.correction.iter().enumerate() {
                dacc[j * per..(j + 1) * per].iter_mut().for_each(|a| *a -= c);
            }
        }
        Ok(())
    }

    fn retract(&self, x: &mut [f32]) {
        self.geometry.retract(x);
    }
}

/// `[n, D]` zeros, or an error when `n·D` overflows or cannot be allocated (instead of
/// the allocator aborting the process on an absurd `n`).
pub(crate) fn zeroed_samples(n: usize, d: usize) -> Result<Array2<f32>> {
    let buf =
        alloc::zeroed(&[n, d], || Error::invalid(format!("{n} samples of D = {d} weights do not fit in memory")))?;
    Ok(Array2::from_shape_vec((n, d), buf).expect("n·D elements"))
}

fn std_normal_logpdf(x: &[f32]) -> f64 {
    let sq: f64 = x.iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
    -0.5 * sq - 0.5 * x.len() as f64 * (2.0 * PI).ln()
}

/// Sample `j`'s Hutchinson probes (K·D values after its base point in its stream).
fn draw_probes<R: rand::RngCore>(stream: &mut R, trace: TraceMode, eps: &mut [f32], j: usize, d: usize) {
    if let TraceMode::Hutchinson { probes, noise } = trace {
        let k = probes as usize;
        rng::fill_probes(stream, noise, &mut eps[j * k * d..(j + 1) * k * d]);
    }
}

/// Store the mean of sample `index`'s per-probe estimates, and its standard error when
/// there is more than one probe (`stderr` is empty otherwise).
fn record_estimate(est: impl Iterator<Item = f64>, index: usize, logd: &mut [f32], stderr: &mut [f32]) {
    let est: Vec<f64> = est.collect();
    let (mean, se) = mean_and_stderr(&est);
    logd[index] = mean as f32;
    if est.len() > 1 {
        stderr[index] = se as f32;
    }
}

/// Mean of per-probe estimates and its standard error (sample sd / √K; 0 for K = 1).
fn mean_and_stderr(est: &[f64]) -> (f64, f64) {
    let k = est.len() as f64;
    let mean = est.iter().sum::<f64>() / k;
    if est.len() < 2 {
        return (mean, 0.0);
    }
    let var = est.iter().map(|e| (e - mean) * (e - mean)).sum::<f64>() / (k - 1.0);
    (mean, (var / k).sqrt())
}

/// Sample indices `first_index .. first_index + n` must fit a u64 (they name random streams);
/// `name` is what the caller calls the first index.
pub(crate) fn check_index_range(name: &str, first_index: u64, n: usize) -> Result<()> {
    match first_index.checked_add(n as u64) {
        Some(_) => Ok(()),
        None => Err(Error::invalid(format!("{name} {first_index} + {n} samples overflows the sample index (u64)"))),
    }
}

/// `bad` are indices within the call; `first_index` makes them the caller's sample indices.
fn non_finite_error(what: &str, bad: &[usize], first_index: u64) -> Error {
    let shown: Vec<String> = bad.iter().take(10).map(|i| (first_index + *i as u64).to_string()).collect();
    let more = if bad.len() > 10 { format!(" and {} more", bad.len() - 10) } else { String::new() };
    Error::numeric(format!("{what}: {} sample(s) are NaN or Inf: {}{more}", bad.len(), shown.join(", ")))
}

fn check_finite_rows(theta: ArrayView2<f32>, logd: Option<&[f32]>, first_index: u64, what: &str) -> Result<()> {
    let bad: Vec<usize> = (0..theta.nrows())
        .filter(|&i| theta.row(i).iter().any(|v| !v.is_finite()) || logd.is_some_and(|l| !l[i].is_finite()))
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(non_finite_error(what, &bad, first_index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::ProbeNoise;

    #[test]
    fn a_batch_is_made_smaller_only_when_its_memory_would_exceed_the_budget() {
        let hutch = |probes| TraceMode::Hutchinson { probes, noise: ProbeNoise::Rademacher };
        assert_eq!(batch_len(0, 2410, TraceMode::None), DEFAULT_BATCH);
        assert_eq!(batch_len(1000, 17, hutch(4)), 1000);
        for (asked, dim, trace) in [
            (usize::MAX, 17, hutch(4096)),
            (4096, 2410, hutch(4096)),
            (u32::MAX as usize, 2410, TraceMode::Exact),
            (usize::MAX, usize::MAX / 2, hutch(1)),
        ] {
            let b = batch_len(asked, dim, trace);
            let probes = if let TraceMode::Hutchinson { probes, .. } = trace { probes as usize } else { 0 };
            let bytes = (b as u128) * 4 * (dim as u128) * (STATE_COPIES + 2 * probes) as u128;
            assert!(b >= 1 && b < asked, "{asked} {dim}: {b}");
            assert!(b == 1 || bytes <= BATCH_BYTES as u128, "{asked} {dim}: {b} samples take {bytes} bytes");
        }
        // The budget is used, not wasted: one more sample would exceed it.
        let b = batch_len(usize::MAX, 2410, hutch(64)) as u128;
        assert!((b + 1) * 4 * 2410 * (STATE_COPIES as u128 + 128) > BATCH_BYTES as u128);
    }
}
