//! Refinement: exact HMC transitions on the posterior itself, applied to drawn samples.
//!
//! A bundle of format version 3 or 4 carries the posterior's log-density `log p(θ)` (up to a
//! constant) and its gradient as a graph, a diagonal inverse mass `m` (`refine.inverse_mass`),
//! a step size `ε` and a leapfrog count `L`. Each drawn sample is moved by `K` transitions of
//! Hamiltonian Monte Carlo, a kernel that leaves the posterior invariant: started at stored
//! posterior draws it returns posterior draws that are no longer copies of them.
//!
//! One transition from `θ`:
//!
//! ```text
//! p ~ N(0, diag(1/m))                            momentum
//! H(θ, p) = −log p(θ) + ½ Σ_i m_i p_i²           energy
//! L leapfrog steps:  p ← p + ½ε ∇log p(θ);  θ ← θ + ε m ⊙ p;  p ← p + ½ε ∇log p(θ)
//! accept (θ', p') with probability min(1, exp(H(θ, p) − H(θ', p'))); a non-finite H' rejects
//! ```
//!
//! That is the `endpoint` kernel (the default): a rejected transition keeps its start, so
//! with one transition from the stored draws a share `1 − acceptance` of the samples are those
//! draws unchanged. The `multinomial` kernel (NUTS's trajectory sampling with a fixed depth
//! instead of the no-U-turn rule) nearly never keeps the start:
//!
//! ```text
//! p ~ N(0, diag(1/m));  tree T = {(θ, p)};  W(T) = 1;  choice c = (θ, p)
//! for level = 0 .. d − 1  (d doublings, 2^d − 1 ≥ L leapfrog steps in all):
//!     a uniformly random direction; extend T's end on that side by 2^level leapfrog steps
//!     (step −ε backwards): the new states S, each weighing w = exp(H(θ, p) − H(state))
//!     (0 when not finite); s ∈ S drawn with probability w(s) / W(S)
//!     c ← s with probability min(1, W(S) / W(T))      biased progressive sampling
//!     T ← T ∪ S
//! the transition returns c
//! ```
//!
//! The trajectory holds the start at a uniformly random place whatever the directions, and
//! the draw favours the newest half, far from the start; the choice is reversible for the
//! trajectory, so the kernel leaves the posterior invariant (Hoffman and Gelman's NUTS with
//! Betancourt's multinomial sampling, the U-turn check left out so every batch row runs the
//! same number of gradients).
//!
//! Canonical bundles (`refine.anchor_unit_norms` present) store weights with every hidden
//! unit's `(w, b)` scaled to norm 1, while the posterior is a density over the weights at the
//! scale they were sampled at. A sample is therefore first given back the unit norms `n` of its
//! anchor (the stored draw its start was drawn around; at start time 0 a uniformly chosen
//! one), a function-preserving rescaling
//!
//! ```text
//! W_l[j, :] ← n_{l,j} W_l[j, :],   b_l[j] ← n_{l,j} b_l[j],   W_{l+1}[:, j] ← W_{l+1}[:, j] / n_{l,j}
//! ```
//!
//! and after the transitions it is canonicalized again, layer by layer: `n_{l,j} = ‖(W_l[j, :],
//! b_l[j])‖` (after layer `l − 1` was canonicalized), the inverse of the map above; an exactly
//! zero unit becomes `(0, …, 0, −1)`, which computes the same `relu(·) = 0`. Refined samples have
//! no density. Each sample's randomness comes from its own stream (`rng::refine_stream`), so
//! results never depend on batching.
use ndarray::Array2;
use rand::RngCore;

use crate::bundle::manifest::{Layer, RefineSpec};
use crate::bundle::tensors::RefineTensors;
use crate::engine::Engine;
use crate::{alloc, rng, Error, Result};

/// Where a hidden layer's units live in θ: incoming rows `W[j, :]` (`inputs` wide), biases,
/// and the next layer's columns `W_next[:, j]` (`next_outputs` rows of `units` entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HiddenLayer {
    pub weight: usize,
    pub bias: usize,
    pub inputs: usize,
    pub units: usize,
    pub next_weight: usize,
    pub next_outputs: usize,
}

/// The hidden layers of a validated manifest's network, in order.
pub fn hidden_layers(layers: &[Layer]) -> Vec<HiddenLayer> {
    layers
        .windows(2)
        .map(|w| HiddenLayer {
            weight: w[0].weight.offset,
            bias: w[0].bias.offset,
            inputs: w[0].inputs,
            units: w[0].outputs,
            next_weight: w[1].weight.offset,
            next_outputs: w[1].outputs,
        })
        .collect()
}

/// Put every hidden unit of `theta` on its unit sphere, layer by layer (see the module docs).
pub fn canonicalize(theta: &mut [f32], layers: &[HiddenLayer]) {
    for l in layers {
        for j in 0..l.units {
            let row = l.weight + j * l.inputs..l.weight + (j + 1) * l.inputs;
            let sq: f64 = theta[row.clone()].iter().map(|w| f64::from(*w).powi(2)).sum::<f64>()
                + f64::from(theta[l.bias + j]).powi(2);
            let norm = sq.sqrt();
            if norm == 0.0 {
                theta[l.bias + j] = -1.0; // a dead unit: (0, …, 0, −1) also computes relu(·) = 0
                continue;
            }
            for w in &mut theta[row] {
                *w = (f64::from(*w) / norm) as f32;
            }
            theta[l.bias + j] = (f64::from(theta[l.bias + j]) / norm) as f32;
            for o in 0..l.next_outputs {
                let i = l.next_weight + o * l.units + j;
                theta[i] = (f64::from(theta[i]) * norm) as f32;
            }
        }
    }
}

/// Give every hidden unit of canonical `theta` the norm `norms[k]` (units numbered through the
/// layers in order), the inverse of `canonicalize` for the draw the norms came from.
pub fn decanonicalize(theta: &mut [f32], norms: &[f32], layers: &[HiddenLayer]) {
    let mut k = 0;
    for l in layers {
        for j in 0..l.units {
            let n = f64::from(norms[k]);
            k += 1;
            for w in &mut theta[l.weight + j * l.inputs..l.weight + (j + 1) * l.inputs] {
                *w = (f64::from(*w) * n) as f32;
            }
            theta[l.bias + j] = (f64::from(theta[l.bias + j]) * n) as f32;
            for o in 0..l.next_outputs {
                let i = l.next_weight + o * l.units + j;
                theta[i] = (f64::from(theta[i]) / n) as f32;
            }
        }
    }
}

/// Which HMC transition refinement runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RefineKernel {
    /// `L` leapfrog steps, then the end point or, when Metropolis rejects it, the start.
    #[default]
    Endpoint,
    /// A trajectory of `2^d` states built by `d` doublings in random directions
    /// (`2^d − 1 ≥ L` leapfrog steps), and one of its states drawn by weight `exp(−H)`,
    /// biased toward the newest doubling: nearly never the start.
    Multinomial,
}

impl RefineKernel {
    pub fn name(self) -> &'static str {
        match self {
            RefineKernel::Endpoint => "endpoint",
            RefineKernel::Multinomial => "multinomial",
        }
    }
}

/// What one refinement call runs on each sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefineRun {
    pub transitions: u32,
    pub kernel: RefineKernel,
    /// Leapfrog steps per trajectory; `None` takes the bundle's `refine.leapfrog_steps`.
    pub leapfrog: Option<u32>,
}

/// Transitions run and accepted, over all samples of a call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefineStats {
    /// Transitions per sample.
    pub transitions: u32,
    pub proposed: u64,
    /// Transitions that moved their sample (endpoint: accepted; multinomial: drew a state
    /// other than the start).
    pub accepted: u64,
    /// Samples that at least one transition moved; the others are their start unchanged.
    pub moved: u64,
    /// Samples refined.
    pub samples: u64,
    /// Leapfrog steps per trajectory (the multinomial kernel's `2^d − 1`).
    pub leapfrog: u32,
    /// The kernel that ran.
    pub kernel: RefineKernel,
}

impl std::ops::AddAssign for RefineStats {
    /// Counts of calls with the same transitions per sample, combined.
    fn add_assign(&mut self, other: RefineStats) {
        self.transitions = self.transitions.max(other.transitions);
        self.leapfrog = self.leapfrog.max(other.leapfrog);
        if other.samples > 0 {
            self.kernel = other.kernel;
        }
        self.proposed += other.proposed;
        self.accepted += other.accepted;
        self.moved += other.moved;
        self.samples += other.samples;
    }
}

impl RefineStats {
    pub fn acceptance_rate(&self) -> f64 {
        if self.proposed == 0 {
            return f64::NAN;
        }
        self.accepted as f64 / self.proposed as f64
    }

    /// The share of samples that refinement moved off their start.
    pub fn moved_fraction(&self) -> f64 {
        if self.samples == 0 {
            return f64::NAN;
        }
        self.moved as f64 / self.samples as f64
    }
}

/// The log-density of the posterior and its gradient for `s` rows of `theta` (`s·D`): the
/// bundle's posterior graph, or in tests a closed form.
pub trait LogPosterior: Sync {
    fn log_posterior(&self, theta: &[f32], s: usize, logp_out: &mut [f32], grad_out: &mut [f32]) -> Result<()>;
}

impl LogPosterior for Engine {
    fn log_posterior(&self, theta: &[f32], s: usize, logp_out: &mut [f32], grad_out: &mut [f32]) -> Result<()> {
        Engine::log_posterior(self, theta, s, logp_out, grad_out)
    }
}

/// The HMC kernel of a bundle (see the module docs).
pub struct Refiner<'a> {
    posterior: &'a dyn LogPosterior,
    dim: usize,
    inverse_mass: &'a [f32],
    step: f64,
    leapfrog: u32,
    layers: Vec<HiddenLayer>,
    /// Per anchor, its unit norms (canonical bundles only).
    norms: Option<&'a Array2<f32>>,
}

/// Buffers for one batch, reused across batches.
#[derive(Default)]
struct Work {
    x: Vec<f32>,
    grad: Vec<f32>,
    logp: Vec<f32>,
    x_new: Vec<f32>,
    grad_new: Vec<f32>,
    logp_new: Vec<f32>,
    momentum: Vec<f32>,
    energy: Vec<f64>,
    /// Per row: whether any transition moved it.
    moved: Vec<bool>,
    tree: Tree,
}

/// One state per batch row: position, momentum, gradient and log-density.
#[derive(Default)]
struct States {
    x: Vec<f32>,
    p: Vec<f32>,
    grad: Vec<f32>,
    logp: Vec<f32>,
}

/// The multinomial kernel's trajectory: its two ends, the newest subtree's candidate, and
/// per row the log total weight of the trajectory so far and of the newest subtree.
#[derive(Default)]
struct Tree {
    left: States,
    right: States,
    candidate: States,
    log_tree: Vec<f64>,
    log_subtree: Vec<f64>,
    /// Per row, the energy weights are taken relative to: the start's, or 0 when that is not
    /// finite (a start outside the support weighs nothing).
    reference: Vec<f64>,
    /// Per row, whether the newest subtree has drawn a candidate (some state of finite weight).
    drawn: Vec<bool>,
    forward: Vec<bool>,
}

impl<'a> Refiner<'a> {
    pub fn new(engine: &'a Engine, spec: &RefineSpec, tensors: &'a RefineTensors, layers: &[Layer]) -> Self {
        Refiner {
            posterior: engine,
            dim: tensors.inverse_mass.len(),
            inverse_mass: &tensors.inverse_mass,
            step: spec.step_size,
            leapfrog: spec.leapfrog_steps,
            layers: hidden_layers(layers),
            norms: tensors.anchor_unit_norms.as_ref(),
        }
    }

    /// Run `run.transitions` HMC transitions on every row of `theta` (`n·D`, changed in place).
    /// `anchor_of[j]` is the anchor row `j` was drawn around (`None`: start time 0, an anchor
    /// is chosen from the row's stream). Row `j` uses stream `first_index + j` of `seed`.
    pub fn refine(
        &self,
        theta: &mut [f32],
        anchor_of: &[Option<usize>],
        run: &RefineRun,
        seed: u64,
        first_index: u64,
        batch: usize,
    ) -> Result<RefineStats> {
        let d = self.dim;
        let n = theta.len() / d;
        debug_assert_eq!(anchor_of.len(), n);
        let transitions = run.transitions;
        let mut stats = RefineStats { transitions, kernel: run.kernel, ..Default::default() };
        if transitions == 0 || n == 0 {
            return Ok(stats);
        }
        let leapfrog = run.leapfrog.unwrap_or(self.leapfrog);
        let depth = doublings(leapfrog);
        stats.leapfrog = match run.kernel {
            RefineKernel::Endpoint => leapfrog,
            RefineKernel::Multinomial => (1u32 << depth) - 1,
        };
        let mut work = Work::default();
        let mut start = 0;
        while start < n {
            let b = batch.max(1).min(n - start);
            let rows = &mut theta[start * d..(start + b) * d];
            let mut streams: Vec<_> =
                (0..b).map(|j| rng::refine_stream(seed, first_index + (start + j) as u64)).collect();
            let mut anchors = Vec::with_capacity(b);
            for (j, stream) in streams.iter_mut().enumerate() {
                anchors.push(match (anchor_of[start + j], self.norms) {
                    (Some(a), _) => Some(a),
                    (None, Some(norms)) => Some(rng::index(stream, norms.nrows())),
                    (None, None) => None,
                });
            }
            if let Some(norms) = self.norms {
                for (row, a) in rows.chunks_exact_mut(d).zip(&anchors) {
                    let a = a.expect("an anchor is chosen for every row of a canonical bundle");
                    decanonicalize(row, norms.row(a).as_slice().expect("standard layout"), &self.layers);
                }
            }
            let accepted = match run.kernel {
                RefineKernel::Endpoint => self.transitions(rows, b, transitions, leapfrog, &mut streams, &mut work)?,
                RefineKernel::Multinomial => self.multinomial(rows, b, transitions, depth, &mut streams, &mut work)?,
            };
            stats.proposed += b as u64 * u64::from(transitions);
            stats.accepted += accepted;
            stats.moved += work.moved.iter().filter(|m| **m).count() as u64;
            stats.samples += b as u64;
            if self.norms.is_some() {
                for row in rows.chunks_exact_mut(d) {
                    canonicalize(row, &self.layers);
                }
            }
            start += b;
        }
        Ok(stats)
    }

    /// `transitions` HMC transitions of the `b` rows of `x`; returns how many were accepted
    /// and marks the rows any of them moved.
    fn transitions<R: RngCore>(
        &self,
        x: &mut [f32],
        b: usize,
        transitions: u32,
        leapfrog: u32,
        streams: &mut [R],
        w: &mut Work,
    ) -> Result<u64> {
        let d = self.dim;
        self.start(x, b, w)?;
        let eps = self.step as f32;
        let mut accepted = 0;
        for _ in 0..transitions {
            self.draw_momenta(streams, w);
            w.x_new.copy_from_slice(&w.x);
            w.grad_new.copy_from_slice(&w.grad);
            for _ in 0..leapfrog {
                self.leapfrog_step(w, b, |_| eps)?;
            }
            for (j, stream) in streams.iter_mut().enumerate() {
                let p = &w.momentum[j * d..(j + 1) * d];
                let energy_new = -f64::from(w.logp_new[j]) + self.kinetic(p);
                let u = uniform(stream);
                // ln u < H − H': a NaN on either side compares false and rejects.
                if energy_new.is_finite() && u.ln() < w.energy[j] - energy_new {
                    let r = j * d..(j + 1) * d;
                    w.x[r.clone()].copy_from_slice(&w.x_new[r.clone()]);
                    w.grad[r.clone()].copy_from_slice(&w.grad_new[r]);
                    w.logp[j] = w.logp_new[j];
                    accepted += 1;
                    w.moved[j] = true;
                }
            }
        }
        x.copy_from_slice(&w.x);
        Self::check_final_log_densities(w, b)?;
        Ok(accepted)
    }

    /// Loads the batch's current states and their log-densities and gradients.
    fn start(&self, x: &[f32], b: usize, w: &mut Work) -> Result<()> {
        let d = self.dim;
        let oom = || Error::invalid(format!("refinement: cannot allocate buffers for {b} samples of D = {d}"));
        for buf in [&mut w.x, &mut w.grad, &mut w.x_new, &mut w.grad_new, &mut w.momentum] {
            alloc::resize(buf, b * d, oom)?;
        }
        alloc::resize(&mut w.logp, b, oom)?;
        alloc::resize(&mut w.logp_new, b, oom)?;
        w.energy.clear();
        w.energy.resize(b, 0.0);
        w.moved.clear();
        w.moved.resize(b, false);
        w.x.copy_from_slice(x);
        self.posterior.log_posterior(&w.x, b, &mut w.logp, &mut w.grad)
    }

    fn check_final_log_densities(w: &Work, b: usize) -> Result<()> {
        if let Some(j) = (0..b).find(|j| !w.logp[*j].is_finite()) {
            return Err(Error::numeric(format!(
                "refinement: the posterior graph gives log-density {} for a sample that no transition could move \
                 (batch row {j}); its start is outside the posterior's support",
                w.logp[j]
            )));
        }
        Ok(())
    }

    /// `transitions` multinomial HMC transitions of the `b` rows of `x` with `depth` doublings
    /// (see the module docs); returns how many moved their row and marks the rows moved.
    fn multinomial<R: RngCore>(
        &self,
        x: &mut [f32],
        b: usize,
        transitions: u32,
        depth: u32,
        streams: &mut [R],
        w: &mut Work,
    ) -> Result<u64> {
        let d = self.dim;
        self.start(x, b, w)?;
        let oom = || Error::invalid(format!("refinement: cannot allocate buffers for {b} samples of D = {d}"));
        // The tree's buffers leave `w` for the call, so `w`'s own can be lent alongside them.
        let mut tree = std::mem::take(&mut w.tree);
        let t = &mut tree;
        for buf in [&mut t.left, &mut t.right, &mut t.candidate] {
            for part in [&mut buf.x, &mut buf.p, &mut buf.grad] {
                alloc::resize(part, b * d, oom)?;
            }
            alloc::resize(&mut buf.logp, b, oom)?;
        }
        for v in [&mut t.log_tree, &mut t.log_subtree, &mut t.reference] {
            v.clear();
            v.resize(b, 0.0);
        }
        for v in [&mut t.forward, &mut t.drawn] {
            v.clear();
            v.resize(b, false);
        }
        let eps = self.step as f32;
        let mut moves = 0;
        for _ in 0..transitions {
            let mut moved_now = vec![false; b];
            self.draw_momenta(streams, w);
            for j in 0..b {
                // The start's weight: 1 (log 0) when its energy is finite, 0 when it is +∞
                // (outside the support: any state of finite weight replaces it); with a NaN
                // log-density nothing moves and the final check reports the row.
                t.reference[j] = if w.energy[j].is_finite() { w.energy[j] } else { 0.0 };
                t.log_tree[j] = t.reference[j] - w.energy[j];
            }
            for side in [&mut t.left, &mut t.right] {
                side.x.copy_from_slice(&w.x);
                side.p.copy_from_slice(&w.momentum);
                side.grad.copy_from_slice(&w.grad);
                side.logp.copy_from_slice(&w.logp);
            }
            for level in 0..depth {
                for (j, stream) in streams.iter_mut().enumerate() {
                    t.forward[j] = stream.next_u64() >> 63 == 1;
                    let side = if t.forward[j] { &t.right } else { &t.left };
                    let r = j * d..(j + 1) * d;
                    w.x_new[r.clone()].copy_from_slice(&side.x[r.clone()]);
                    w.momentum[r.clone()].copy_from_slice(&side.p[r.clone()]);
                    w.grad_new[r.clone()].copy_from_slice(&side.grad[r]);
                }
                t.log_subtree.fill(f64::NEG_INFINITY);
                t.drawn.fill(false);
                for _ in 0..1u64 << level {
                    let forward = &t.forward;
                    self.leapfrog_step(w, b, |j| if forward[j] { eps } else { -eps })?;
                    for (j, stream) in streams.iter_mut().enumerate() {
                        let r = j * d..(j + 1) * d;
                        let energy = -f64::from(w.logp_new[j]) + self.kinetic(&w.momentum[r.clone()]);
                        // A state's weight is exp(H₀ − H); a non-finite energy weighs nothing.
                        let log_weight = if energy.is_finite() { t.reference[j] - energy } else { f64::NEG_INFINITY };
                        let total = log_add_exp(t.log_subtree[j], log_weight);
                        // Weighted reservoir sampling: the subtree's candidate is each state
                        // with probability its share of the subtree's weight.
                        let u = uniform(stream);
                        if log_weight > f64::NEG_INFINITY && u < (log_weight - total).exp() {
                            t.candidate.x[r.clone()].copy_from_slice(&w.x_new[r.clone()]);
                            t.candidate.grad[r.clone()].copy_from_slice(&w.grad_new[r]);
                            t.candidate.logp[j] = w.logp_new[j];
                            t.drawn[j] = true;
                        }
                        t.log_subtree[j] = total;
                    }
                }
                for (j, stream) in streams.iter_mut().enumerate() {
                    let r = j * d..(j + 1) * d;
                    let side = if t.forward[j] { &mut t.right } else { &mut t.left };
                    side.x[r.clone()].copy_from_slice(&w.x_new[r.clone()]);
                    side.p[r.clone()].copy_from_slice(&w.momentum[r.clone()]);
                    side.grad[r.clone()].copy_from_slice(&w.grad_new[r.clone()]);
                    // Biased progressive sampling: the new subtree's candidate replaces the
                    // current choice with probability min(1, W_new / W_old).
                    let u = uniform(stream);
                    if t.drawn[j] && u.ln() < t.log_subtree[j] - t.log_tree[j] {
                        w.x[r.clone()].copy_from_slice(&t.candidate.x[r.clone()]);
                        w.grad[r.clone()].copy_from_slice(&t.candidate.grad[r]);
                        w.logp[j] = t.candidate.logp[j];
                        moved_now[j] = true;
                    }
                    t.log_tree[j] = log_add_exp(t.log_tree[j], t.log_subtree[j]);
                }
            }
            for (m, now) in w.moved.iter_mut().zip(&moved_now) {
                *m |= *now;
            }
            moves += moved_now.iter().filter(|m| **m).count() as u64;
        }
        w.tree = tree;
        x.copy_from_slice(&w.x);
        Self::check_final_log_densities(w, b)?;
        Ok(moves)
    }

    /// Fresh momenta `p ~ N(0, diag(1/m))` for every row, and each row's energy.
    fn draw_momenta<R: RngCore>(&self, streams: &mut [R], w: &mut Work) {
        let d = self.dim;
        for (j, stream) in streams.iter_mut().enumerate() {
            let p = &mut w.momentum[j * d..(j + 1) * d];
            rng::fill_standard_normal(stream, p);
            for (pi, mi) in p.iter_mut().zip(self.inverse_mass) {
                *pi /= mi.sqrt();
            }
            w.energy[j] = -f64::from(w.logp[j]) + self.kinetic(p);
        }
    }

    /// One leapfrog step of every row of `w.x_new`, `w.momentum`, `w.grad_new` (and
    /// `w.logp_new`), row `j` with step `eps_of(j)` (negative: backwards in time).
    fn leapfrog_step(&self, w: &mut Work, b: usize, eps_of: impl Fn(usize) -> f32) -> Result<()> {
        let d = self.dim;
        for j in 0..b {
            let (eps, r) = (eps_of(j), j * d..(j + 1) * d);
            let (p, g, x) = (&mut w.momentum[r.clone()], &w.grad_new[r.clone()], &mut w.x_new[r]);
            for (((p, g), x), m) in p.iter_mut().zip(g).zip(x.iter_mut()).zip(self.inverse_mass) {
                *p += 0.5 * eps * g;
                *x += eps * m * *p;
            }
        }
        self.posterior.log_posterior(&w.x_new, b, &mut w.logp_new, &mut w.grad_new)?;
        for j in 0..b {
            let (eps, r) = (eps_of(j), j * d..(j + 1) * d);
            for (p, g) in w.momentum[r.clone()].iter_mut().zip(&w.grad_new[r]) {
                *p += 0.5 * eps * g;
            }
        }
        Ok(())
    }

    fn kinetic(&self, p: &[f32]) -> f64 {
        0.5 * p.iter().zip(self.inverse_mass).map(|(p, m)| f64::from(*m) * f64::from(*p).powi(2)).sum::<f64>()
    }
}

/// The multinomial kernel's doublings for a trajectory of at least `leapfrog` steps:
/// the smallest `d` with `2^d − 1 ≥ leapfrog`.
pub fn doublings(leapfrog: u32) -> u32 {
    32 - leapfrog.leading_zeros()
}

/// `ln(e^a + e^b)` without overflow; `−∞` is the empty sum.
fn log_add_exp(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// A uniform draw in `[0, 1)` with 53 random bits.
fn uniform<R: RngCore>(stream: &mut R) -> f64 {
    (stream.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3 → 4 → 2 → 2: two hidden layers.
    fn layers() -> Vec<HiddenLayer> {
        // layout: W0 [4,3] at 0, b0 at 12, W1 [2,4] at 16, b1 at 24, W2 [2,2] at 26, b2 at 30
        vec![
            HiddenLayer { weight: 0, bias: 12, inputs: 3, units: 4, next_weight: 16, next_outputs: 2 },
            HiddenLayer { weight: 16, bias: 24, inputs: 4, units: 2, next_weight: 26, next_outputs: 2 },
        ]
    }

    fn forward(theta: &[f32], x: &[f32; 3]) -> Vec<f64> {
        let dense = |w: usize, b: usize, inputs: usize, outputs: usize, h: &[f64], relu: bool| -> Vec<f64> {
            (0..outputs)
                .map(|o| {
                    let z = f64::from(theta[b + o])
                        + (0..inputs).map(|i| f64::from(theta[w + o * inputs + i]) * h[i]).sum::<f64>();
                    if relu {
                        z.max(0.0)
                    } else {
                        z
                    }
                })
                .collect()
        };
        let h0: Vec<f64> = x.iter().map(|v| f64::from(*v)).collect();
        let h1 = dense(0, 12, 3, 4, &h0, true);
        let h2 = dense(16, 24, 4, 2, &h1, true);
        dense(26, 30, 2, 2, &h2, false)
    }

    fn random_theta(seed: u64) -> Vec<f32> {
        let mut s = rng::sample_stream(seed, 0);
        let mut t = vec![0f32; 32];
        rng::fill_standard_normal(&mut s, &mut t);
        t
    }

    #[test]
    fn canonicalize_keeps_the_function_and_puts_units_on_spheres() {
        let theta = random_theta(1);
        let mut c = theta.clone();
        canonicalize(&mut c, &layers());
        for x in [[0.3f32, -1.2, 0.7], [2.0, 0.1, -0.4], [-1.0, -1.0, 1.5]] {
            let (a, b) = (forward(&theta, &x), forward(&c, &x));
            for (u, v) in a.iter().zip(&b) {
                assert!((u - v).abs() < 1e-5 * (1.0 + u.abs()), "{a:?} vs {b:?}");
            }
        }
        for l in layers() {
            for j in 0..l.units {
                let sq: f32 = c[l.weight + j * l.inputs..l.weight + (j + 1) * l.inputs].iter().map(|w| w * w).sum();
                assert!((sq + c[l.bias + j].powi(2) - 1.0).abs() < 1e-5);
            }
        }
        assert_ne!(theta, c);
    }

    #[test]
    fn decanonicalize_inverts_canonicalize_with_the_draws_own_norms() {
        let theta = random_theta(2);
        // The norms canonicalize divides out, computed as it walks the layers.
        let mut walk = theta.clone();
        let mut norms = Vec::new();
        for l in layers() {
            for j in 0..l.units {
                let sq: f64 = walk[l.weight + j * l.inputs..l.weight + (j + 1) * l.inputs]
                    .iter()
                    .map(|w| f64::from(*w).powi(2))
                    .sum::<f64>()
                    + f64::from(walk[l.bias + j]).powi(2);
                norms.push(sq.sqrt() as f32);
            }
            canonicalize(&mut walk, std::slice::from_ref(&l));
        }
        let mut c = theta.clone();
        canonicalize(&mut c, &layers());
        assert_eq!(walk, c);
        decanonicalize(&mut c, &norms, &layers());
        for (u, v) in theta.iter().zip(&c) {
            assert!((u - v).abs() < 1e-5 * (1.0 + u.abs()), "{u} vs {v}");
        }
    }

    #[test]
    fn a_dead_unit_becomes_the_unit_vector_minus_bias() {
        let mut theta = random_theta(3);
        theta[3..6].fill(0.0); // unit 1 of layer 0: zero weights and bias
        theta[13] = 0.0;
        let before = forward(&theta, &[0.5, 0.5, 0.5]);
        canonicalize(&mut theta, &layers());
        assert_eq!(&theta[3..6], &[0.0, 0.0, 0.0]);
        assert_eq!(theta[13], -1.0);
        let after = forward(&theta, &[0.5, 0.5, 0.5]);
        assert!((before[0] - after[0]).abs() < 1e-5);
    }

    #[test]
    fn doublings_give_the_shortest_trajectory_of_at_least_l_steps() {
        for (l, d) in [(1, 1), (2, 2), (3, 2), (4, 3), (7, 3), (8, 4), (200, 8), (255, 8), (256, 9), (1000, 10)] {
            assert_eq!(doublings(l), d, "L = {l}");
            assert!((1u32 << d) > l && (1u32 << (d - 1)) - 1 < l);
        }
    }

    #[test]
    fn log_add_exp_is_the_log_of_a_sum() {
        assert!((log_add_exp(0.0, 0.0) - 2f64.ln()).abs() < 1e-15);
        assert!((log_add_exp(1000.0, 999.0) - (1000.0 + (-1f64).exp().ln_1p())).abs() < 1e-12);
        assert_eq!(log_add_exp(f64::NEG_INFINITY, -3.0), -3.0);
        assert_eq!(log_add_exp(-3.0, f64::NEG_INFINITY), -3.0);
        assert_eq!(log_add_exp(f64::NEG_INFINITY, f64::NEG_INFINITY), f64::NEG_INFINITY);
    }

    /// N(μ, diag σ²) in closed form.
    struct Gaussian {
        mean: Vec<f32>,
        sd: Vec<f32>,
    }

    impl LogPosterior for Gaussian {
        fn log_posterior(&self, theta: &[f32], s: usize, logp: &mut [f32], grad: &mut [f32]) -> Result<()> {
            let d = self.mean.len();
            for j in 0..s {
                let mut l = 0.0f64;
                for i in 0..d {
                    let z = (theta[j * d + i] - self.mean[i]) / self.sd[i];
                    l -= 0.5 * f64::from(z) * f64::from(z);
                    grad[j * d + i] = -z / self.sd[i];
                }
                logp[j] = l as f32;
            }
            Ok(())
        }
    }

    /// Rows drawn exactly from the target, moved by one transition, must still be exact draws:
    /// the rows are independent, so their moments have i.i.d. standard errors. The unit inverse
    /// mass against sds from 0.3 to 2 and a step of 0.5 make the energy error matter.
    fn invariance_misfits(kernel: RefineKernel, leapfrog: u32) -> (Vec<String>, RefineStats) {
        let target = Gaussian { mean: vec![1.0, -2.0, 0.5, 0.0], sd: vec![0.3, 1.0, 2.0, 0.6] };
        let d = target.mean.len();
        let n = 20_000;
        let mut theta = vec![0.0f32; n * d];
        let mut rng = rng::sample_stream(77, 0);
        rng::fill_standard_normal(&mut rng, &mut theta);
        for row in theta.chunks_exact_mut(d) {
            for ((v, m), sd) in row.iter_mut().zip(&target.mean).zip(&target.sd) {
                *v = m + sd * *v;
            }
        }
        let start = theta.clone();
        let inverse_mass = vec![1.0f32; d];
        let refiner = Refiner {
            posterior: &target,
            dim: d,
            inverse_mass: &inverse_mass,
            step: 0.5,
            leapfrog,
            layers: vec![],
            norms: None,
        };
        let run = RefineRun { transitions: 1, kernel, leapfrog: None };
        let stats = refiner.refine(&mut theta, &vec![None; n], &run, 3, 0, 64).unwrap();
        assert_ne!(theta, start);
        let mut bad = Vec::new();
        for i in 0..d {
            let col: Vec<f64> = theta.iter().skip(i).step_by(d).map(|v| f64::from(*v)).collect();
            let mean = col.iter().sum::<f64>() / n as f64;
            let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            let (mu, sd) = (f64::from(target.mean[i]), f64::from(target.sd[i]));
            let z_mean = (mean - mu) / (sd / (n as f64).sqrt());
            let z_var = (var / (sd * sd) - 1.0) / (2.0 / n as f64).sqrt();
            if z_mean.abs() > 4.5 || z_var.abs() > 4.5 {
                bad.push(format!("coordinate {i}: mean z {z_mean:.1}, variance z {z_var:.1}"));
            }
        }
        (bad, stats)
    }

    #[test]
    fn one_multinomial_transition_keeps_exact_draws_exact() {
        let (bad, stats) = invariance_misfits(RefineKernel::Multinomial, 7);
        assert!(bad.is_empty(), "{}", bad.join("; "));
        assert_eq!(stats.leapfrog, 7);
        assert!(stats.moved_fraction() > 0.99, "moved {}", stats.moved_fraction());
    }

    #[test]
    fn one_endpoint_transition_keeps_exact_draws_exact() {
        let (bad, stats) = invariance_misfits(RefineKernel::Endpoint, 7);
        assert!(bad.is_empty(), "{}", bad.join("; "));
        let a = stats.acceptance_rate();
        assert!((0.3..0.98).contains(&a), "acceptance {a}: the test should reject some proposals");
        assert_eq!(stats.moved, stats.accepted);
    }

    /// N(0, I) cut to x₀ ≥ −1: log-density −∞ below.
    struct Truncated;

    impl LogPosterior for Truncated {
        fn log_posterior(&self, theta: &[f32], s: usize, logp: &mut [f32], grad: &mut [f32]) -> Result<()> {
            let d = theta.len() / s;
            for j in 0..s {
                let row = &theta[j * d..(j + 1) * d];
                let inside = row[0] >= -1.0;
                logp[j] = if inside { -0.5 * row.iter().map(|v| v * v).sum::<f32>() } else { f32::NEG_INFINITY };
                for (g, v) in grad[j * d..(j + 1) * d].iter_mut().zip(row) {
                    *g = -v;
                }
            }
            Ok(())
        }
    }

    /// A start outside the support (log-density −∞) weighs nothing: either kernel moves it to
    /// a state inside, never to a state of another row or of an earlier batch.
    #[test]
    fn a_start_outside_the_support_moves_inside() {
        let d = 3;
        let inverse_mass = vec![1.0f32; d];
        let refiner = Refiner {
            posterior: &Truncated,
            dim: d,
            inverse_mass: &inverse_mass,
            step: 0.3,
            leapfrog: 7,
            layers: vec![],
            norms: None,
        };
        // Batches of 2: the second batch reuses the first one's buffers.
        let mut theta = vec![0.5, 0.2, -0.1, -1.5, 0.3, 0.0, -1.2, -0.4, 0.8, 0.9, 0.1, 0.2];
        let n = theta.len() / d;
        for kernel in [RefineKernel::Multinomial, RefineKernel::Endpoint] {
            let mut rows = theta.clone();
            let run = RefineRun { transitions: 1, kernel, leapfrog: None };
            let stats = refiner.refine(&mut rows, &vec![None; n], &run, 11, 0, 2).unwrap();
            for (j, row) in rows.chunks_exact(d).enumerate() {
                assert!(row[0] >= -1.0, "{kernel:?} row {j} still outside: {row:?}");
                assert!(rows.chunks_exact(d).enumerate().all(|(k, other)| k == j || other != row), "{kernel:?}");
            }
            // the two starts outside moved; the endpoint kernel may keep a start inside
            let at_least = if kernel == RefineKernel::Multinomial { n } else { 2 };
            assert!(stats.moved >= at_least as u64, "{kernel:?} moved {}", stats.moved);
        }
        // A start with a NaN log-density cannot move, and the call says so.
        theta[0] = f32::NAN;
        let run = RefineRun { transitions: 1, kernel: RefineKernel::Multinomial, leapfrog: None };
        let e = refiner.refine(&mut theta, &vec![None; n], &run, 11, 0, 2).unwrap_err();
        assert!(e.message().contains("outside the posterior's support"), "{}", e.message());
    }
}
