//! The geometry of the flow's state space: Euclidean, or a product of unit spheres
//! (one per hidden unit) times Euclidean coordinates (`flow.geometry = "sphere_product"`).
//!
//! Canonicalization scales every hidden unit's incoming weights and bias `(w, b)` onto
//! the unit sphere `S^{k−1}` (`k = in + 1`), so canonical weights live on the *slice*
//! `M = S^{k₁−1} × … × S^{k_S−1} × R^E`, E being the last layer's weights and biases.
//! On a sphere block `x` (unit norm) with ambient field `u` from the flow graph:
//!
//! - velocity: `v = P u`, `P = I − x xᵀ` (the tangent projection);
//! - divergence on the sphere, for a tangent basis `e_i` (`i < k`):
//!   `div_M v = Σ_i e_iᵀ ∂v e_i`, and for a tangent `ε` (`xᵀε = 0`)
//!   `εᵀ ∂v ε = εᵀ J_u ε − |ε|² (x·u)` (differentiate `u − (x·u) x`; the `x`-parallel
//!   terms vanish against `ε`), so `div_M v = tr(P J_u P) − (k − 1)(x·u)`;
//! - base: the uniform law, `log p₀ = −log |S^{k−1}|`, `|S^{k−1}| = 2 π^{k/2} / Γ(k/2)`;
//! - log-densities are relative to the product of the spheres' surface measures times
//!   Lebesgue measure on the Euclidean coordinates; along the flow `d/dt log p = −div_M v`.
//!
//! Solvers step on the manifold by retraction: every stage is evaluated at the
//! renormalized stage point and every step ends renormalized (`ode::VectorField::retract`).
use rand::RngCore;

use crate::bundle::Manifest;
use crate::rng;
use crate::{Error, Result};

/// The manifest's name for the Euclidean geometry.
pub const EUCLIDEAN: &str = "euclidean";
/// The manifest's name for the product of unit spheres.
pub const SPHERE_PRODUCT: &str = "sphere_product";
/// How far `‖(w, b)‖` of canonical f32 weights may be from 1 (`log_prob`'s input, stored draws).
pub const SLICE_TOLERANCE: f64 = 1e-4;
/// The same for f16 anchors: f16 rounds each entry by up to 2⁻¹¹ ≈ 4.9e-4 relative, and a
/// unit vector's norm by as much.
pub const SLICE_TOLERANCE_F16: f64 = 1e-3;

/// One hidden unit's sphere: weights `[weights, weights + len)` (a row of the layer's
/// row-major `[out, in]` matrix) and the bias at `bias`; `k = len + 1` coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sphere {
    pub layer: usize,
    pub unit: usize,
    pub weights: usize,
    pub len: usize,
    pub bias: usize,
}

impl Sphere {
    /// Ambient dimension `k` (the sphere is `S^{k−1}`).
    pub fn k(&self) -> usize {
        self.len + 1
    }

    fn dot(&self, a: &[f32], b: &[f32]) -> f64 {
        let w = self.weights..self.weights + self.len;
        let s: f64 = a[w.clone()].iter().zip(&b[w]).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
        s + f64::from(a[self.bias]) * f64::from(b[self.bias])
    }

    /// `(cos, sin)` of the angle between this block of unit vectors `x` and `a`, from the
    /// parts of `x` along and across `a` (accurate at small angles, unlike `acos`).
    fn cos_sin(&self, x: &[f32], a: &[f32]) -> (f64, f64) {
        let along = self.dot(x, a);
        let mut across = 0.0;
        for i in (self.weights..self.weights + self.len).chain([self.bias]) {
            let r = f64::from(x[i]) - along * f64::from(a[i]);
            across += r * r;
        }
        (along, across.sqrt())
    }

    fn norm(&self, a: &[f32]) -> f64 {
        self.dot(a, a).sqrt()
    }

    /// `out ← out − c·x` on this block.
    fn axpy(&self, c: f64, x: &[f32], out: &mut [f32]) {
        for i in self.weights..self.weights + self.len {
            out[i] = (f64::from(out[i]) - c * f64::from(x[i])) as f32;
        }
        out[self.bias] = (f64::from(out[self.bias]) - c * f64::from(x[self.bias])) as f32;
    }

    fn scale(&self, c: f64, x: &mut [f32]) {
        for i in self.weights..self.weights + self.len {
            x[i] = (f64::from(x[i]) * c) as f32;
        }
        x[self.bias] = (f64::from(x[self.bias]) * c) as f32;
    }
}

/// Radians: the f32 rounding of a state's angle to its anchor stays below this.
const CAP_EDGE: f64 = 1e-5;

/// Log-density on `S^{k−1}` (surface measure) of `slerp(z, a; t₀)`, `z` uniform, at a point
/// at angle `φ` from `a` (see `Geometry::mixture_log_density`).
pub fn cap_log_density(k: usize, phi: f64, t0: f64) -> f64 {
    let c = 1.0 - t0;
    // The cap's edge φ = cπ, widened by CAP_EDGE for the f32 rounding of stored states: on S¹
    // (k = 2) the density is flat up to the edge, where a start point from a near-antipodal z sits.
    if phi.is_nan() || phi >= c * std::f64::consts::PI + CAP_EDGE {
        return f64::NEG_INFINITY;
    }
    let theta = (phi / c).min(std::f64::consts::PI);
    // log(sin(φ/c) / sin φ); where θ = φ/c (the larger angle) is small, its series
    // −log c − φ²(1/c² − 1)/6 avoids 0/0 (the series is in θ, so φ alone being small is not enough).
    let log_ratio = if theta < 1e-4 {
        -c.ln() - phi * phi * (1.0 / (c * c) - 1.0) / 6.0
    } else {
        theta.sin().ln() - phi.sin().ln()
    };
    let jac = if k > 2 { (k - 2) as f64 * log_ratio } else { 0.0 };
    jac - c.ln() - log_sphere_area(k)
}

/// `log |S^{k−1}| = log(2 π^{k/2} / Γ(k/2))`, the surface area of the unit sphere in `R^k`.
/// `Γ(k/2)` is exact for integer `k`: `(m − 1)!` for `k = 2m`, `√π Π_{j ≤ m} (j − ½)` for `k = 2m + 1`.
pub fn log_sphere_area(k: usize) -> f64 {
    assert!(k >= 1, "S^(k-1) needs k >= 1");
    let pi = std::f64::consts::PI;
    let log_gamma_half_k = if k % 2 == 0 {
        (1..k / 2).map(|j| (j as f64).ln()).sum::<f64>()
    } else {
        0.5 * pi.ln() + (1..=k / 2).map(|j| (j as f64 - 0.5).ln()).sum::<f64>()
    };
    2f64.ln() + 0.5 * k as f64 * pi.ln() - log_gamma_half_k
}

/// A bundle's geometry: which coordinates form unit spheres.
#[derive(Debug, Clone)]
pub struct Geometry {
    spheres: Vec<Sphere>,
    /// Per coordinate, the index of its sphere (`NONE` for Euclidean); empty when Euclidean.
    owner: Vec<u32>,
    dim: usize,
    /// `Σ_s log |S^{k_s−1}|`.
    log_area: f64,
}

const NONE: u32 = u32::MAX;

/// Where a point is farthest from the slice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SliceError {
    /// `|‖(w, b)‖ − 1|` of the worst unit.
    pub deviation: f64,
    pub norm: f64,
    pub sphere: Sphere,
}

impl Geometry {
    /// The plain Euclidean geometry on `R^dim`.
    pub fn euclidean(dim: usize) -> Geometry {
        Geometry { spheres: Vec::new(), owner: Vec::new(), dim, log_area: 0.0 }
    }

    /// Check the manifest's geometry without building it (no allocation sized by the
    /// manifest, whose dimensions the tensors file has not confirmed yet).
    pub fn check_manifest(m: &Manifest) -> Result<()> {
        match m.flow.geometry.as_str() {
            EUCLIDEAN => Ok(()),
            SPHERE_PRODUCT => {
                let layers = &m.network.layers;
                if layers.len() < 2 {
                    return Err(Error::bundle(format!(
                        "manifest field flow.geometry: \"{SPHERE_PRODUCT}\" puts each hidden unit's (w, b) on a sphere, \
                         but network.layers has no hidden layer (only {} layer)",
                        layers.len()
                    )));
                }
                let units = layers[..layers.len() - 1].iter().try_fold(0usize, |n, l| n.checked_add(l.outputs));
                if units.is_none_or(|n| n >= NONE as usize) {
                    return Err(Error::bundle("manifest field flow.geometry: too many hidden units"));
                }
                Ok(())
            }
            other => Err(Error::bundle(format!(
                "manifest field flow.geometry: {other:?} is not supported (\"{EUCLIDEAN}\" or \"{SPHERE_PRODUCT}\")"
            ))),
        }
    }

    /// The geometry a manifest declares, with the spheres located from `network.layers`
    /// (the layout must already be validated, and `network.dim` confirmed by the tensors:
    /// this allocates per hidden unit and per weight).
    pub fn from_manifest(m: &Manifest) -> Result<Geometry> {
        Geometry::check_manifest(m)?;
        let d = m.network.dim;
        match m.flow.geometry.as_str() {
            SPHERE_PRODUCT => {
                let layers = &m.network.layers;
                let mut spheres = Vec::new();
                for (l, layer) in layers[..layers.len() - 1].iter().enumerate() {
                    for j in 0..layer.outputs {
                        spheres.push(Sphere {
                            layer: l,
                            unit: j,
                            weights: layer.weight.offset + j * layer.inputs,
                            len: layer.inputs,
                            bias: layer.bias.offset + j,
                        });
                    }
                }
                let mut owner = vec![NONE; d];
                for (s, sp) in spheres.iter().enumerate() {
                    for i in (sp.weights..sp.weights + sp.len).chain([sp.bias]) {
                        owner[i] = s as u32;
                    }
                }
                let log_area = spheres.iter().map(|s| log_sphere_area(s.k())).sum();
                Ok(Geometry { spheres, owner, dim: d, log_area })
            }
            _ => Ok(Geometry::euclidean(d)), // check_manifest refused every other name
        }
    }

    pub fn is_euclidean(&self) -> bool {
        self.spheres.is_empty()
    }
    pub fn name(&self) -> &'static str {
        if self.is_euclidean() {
            EUCLIDEAN
        } else {
            SPHERE_PRODUCT
        }
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn spheres(&self) -> &[Sphere] {
        &self.spheres
    }
    /// Coordinates on spheres (`Σ_s k_s`).
    pub fn sphere_coordinates(&self) -> usize {
        self.spheres.iter().map(Sphere::k).sum()
    }
    pub fn euclidean_coordinates(&self) -> usize {
        self.dim - self.sphere_coordinates()
    }
    /// Whether coordinate `i` lies on a sphere.
    pub fn on_sphere(&self, i: usize) -> bool {
        !self.owner.is_empty() && self.owner[i] != NONE
    }

    /// Renormalize every sphere block of each state in `x` (`B·D` values): the retraction.
    /// A block of norm 0 (or non-finite) is left as is; the solver reports the NaN/Inf it leads to.
    pub fn retract(&self, x: &mut [f32]) {
        if self.is_euclidean() {
            return;
        }
        for state in x.chunks_exact_mut(self.dim) {
            for s in &self.spheres {
                let n = s.norm(state);
                if n > 0.0 && n.is_finite() {
                    s.scale(1.0 / n, state);
                }
            }
        }
    }

    /// Project the ambient velocities `u` onto the tangent spaces at `x` in place
    /// (`u ← u − (x·u) x` per sphere block; both `B·D`), and return per state
    /// `Σ_s (k_s − 1)(x_s·u_s)`, the part of `div_M v` that `tr(P J_u P)` lacks.
    pub fn project_velocity(&self, x: &[f32], u: &mut [f32], correction: &mut [f64]) {
        for ((xs, us), c) in x.chunks_exact(self.dim).zip(u.chunks_exact_mut(self.dim)).zip(correction.iter_mut()) {
            *c = 0.0;
            for s in &self.spheres {
                let xu = s.dot(xs, us);
                s.axpy(xu, xs, us);
                *c += (s.k() - 1) as f64 * xu;
            }
        }
    }

    /// `out = P(x) r` for one state `x` (length D) and `m` vectors `r` (`m·D`): sphere
    /// blocks of each vector lose their component along the block of `x`; Euclidean
    /// coordinates are copied.
    pub fn project_tangent(&self, x: &[f32], r: &[f32], out: &mut [f32]) {
        out.copy_from_slice(r);
        for v in out.chunks_exact_mut(self.dim) {
            for s in &self.spheres {
                let xr = s.dot(x, v);
                s.axpy(xr, x, v);
            }
        }
    }

    /// Basis vector `i` as seen by the exact trace: `e_i` on a Euclidean coordinate,
    /// `P e_i = e_i − x_i x_s` on sphere `s` (so `Σ_i (P e_i)ᵀ J (P e_i) = tr(P J P)`),
    /// written into `out` (length D, zero on entry).
    pub fn basis_vector(&self, x: &[f32], i: usize, out: &mut [f32]) {
        out[i] = 1.0;
        if self.on_sphere(i) {
            let s = &self.spheres[self.owner[i] as usize];
            s.axpy(f64::from(x[i]), x, out);
        }
    }

    /// Draw a base point from `stream`: D standard normals (the same draws as the
    /// Euclidean base), each sphere block then normalized, which makes it uniform.
    pub fn draw_base<R: RngCore>(&self, stream: &mut R, x: &mut [f32]) {
        rng::fill_standard_normal(stream, x);
        self.retract(x);
    }

    /// `log p₀(x)`: the standard normal on Euclidean coordinates, `−Σ_s log |S^{k_s−1}|` on the spheres.
    pub fn base_log_density(&self, x: &[f32]) -> f64 {
        let mut sq = 0.0;
        let mut e = 0usize;
        for (i, v) in x.iter().enumerate() {
            if !self.on_sphere(i) {
                sq += f64::from(*v) * f64::from(*v);
                e += 1;
            }
        }
        -0.5 * sq - 0.5 * e as f64 * (2.0 * std::f64::consts::PI).ln() - self.log_area
    }

    /// The start point at `0 < t₀ < 1` around anchor `a` (one state, on the slice): `x` holds a
    /// base draw `z` on entry. Each sphere block moves along the great circle from `z` to `a`,
    /// `slerp(z, a; t₀) = (sin((1 − t₀)θ) z + sin(t₀θ) a) / sin θ` with `θ = ∠(z, a)` (the
    /// point at angle `(1 − t₀)θ` from `a`, the geodesic interpolant's conditional law given
    /// `x₁ = a`); Euclidean coordinates take `t₀·a + (1 − t₀)·z` as in the Euclidean geometry.
    pub fn geodesic_start(&self, x: &mut [f32], a: &[f32], t0: f64) {
        let sphere_coord = |i: usize| self.on_sphere(i);
        for (i, (xv, av)) in x.iter_mut().zip(a).enumerate() {
            if !sphere_coord(i) {
                *xv = (t0 as f32) * av + ((1.0 - t0) as f32) * *xv;
            }
        }
        for s in &self.spheres {
            let (cos, sin) = s.cos_sin(x, a);
            let theta = sin.atan2(cos);
            // z = a (θ = 0) stays; z = −a (θ = π, probability 0) has no unique geodesic: keep z.
            if sin > 1e-12 {
                let (wz, wa) = (((1.0 - t0) * theta).sin() / sin, (t0 * theta).sin() / sin);
                for i in (s.weights..s.weights + s.len).chain([s.bias]) {
                    x[i] = (wz * f64::from(x[i]) + wa * f64::from(a[i])) as f32;
                }
            }
        }
        self.retract(x);
    }

    /// `log p_{t₀}(x)` of the start mixture `(1/n) Σ_i q(x; a_i)`: per anchor, on each sphere
    /// the law of `slerp(z, a; t₀)` with `z` uniform, `log q_s = (k − 2)·log(sin(φ/(1 − t₀)) /
    /// sin φ) − log(1 − t₀) − log |S^{k−1}|` for `φ = ∠(x_s, a_s) < (1 − t₀)π` (−∞ beyond: the
    /// angle to `a` shrinks by `1 − t₀`, and in geodesic polar coordinates around `a` the
    /// surface element is `sin^{k−2}φ dφ dω`), times `N(x_E; t₀ a_E, (1 − t₀)² I)`.
    pub fn mixture_log_density(&self, x: &[f32], anchors: &ndarray::Array2<f32>, t0: f64) -> f64 {
        let c = 1.0 - t0;
        let e = self.euclidean_coordinates() as f64;
        let mut terms: Vec<f64> = Vec::with_capacity(anchors.nrows());
        for a in anchors.rows() {
            let a = a.as_slice().expect("anchors are in standard layout");
            let mut sq = 0.0;
            for (i, (xv, av)) in x.iter().zip(a).enumerate() {
                if !self.on_sphere(i) {
                    let r = f64::from(*xv) - t0 * f64::from(*av);
                    sq += r * r;
                }
            }
            let mut lp = -0.5 * sq / (c * c) - 0.5 * e * (2.0 * std::f64::consts::PI * c * c).ln();
            for s in &self.spheres {
                let (cos, sin) = s.cos_sin(x, a);
                lp += cap_log_density(s.k(), sin.atan2(cos), t0);
            }
            terms.push(lp);
        }
        let top = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if top == f64::NEG_INFINITY {
            return top; // outside every anchor's support
        }
        top + terms.iter().map(|v| (v - top).exp()).sum::<f64>().ln() - (anchors.nrows() as f64).ln()
    }

    /// The unit farthest from the slice in `theta` (length D), or `None` when Euclidean.
    pub fn slice_error(&self, theta: &[f32]) -> Option<SliceError> {
        let mut worst: Option<SliceError> = None;
        for s in &self.spheres {
            let norm = s.norm(theta);
            let deviation = if norm.is_finite() { (norm - 1.0).abs() } else { f64::INFINITY };
            if worst.is_none_or(|w| deviation > w.deviation) {
                worst = Some(SliceError { deviation, norm, sphere: *s });
            }
        }
        worst
    }

    /// Check that every row of `rows` (`n·D`) lies on the slice within `tol`; the error
    /// names `what`, the row and the unit.
    pub fn check_on_slice(&self, rows: &[f32], tol: f64, what: &str) -> Result<()> {
        if self.is_euclidean() {
            return Ok(());
        }
        for (r, row) in rows.chunks_exact(self.dim).enumerate() {
            if let Some(e) = self.slice_error(row) {
                if e.deviation > tol {
                    return Err(Error::invalid(format!(
                        "{what} row {r} is off the slice of geometry {SPHERE_PRODUCT}: hidden layer {} unit {} has \
                         ‖(w, b)‖ = {}, not 1 within {tol:e}",
                        e.sphere.layer, e.sphere.unit, e.norm
                    )));
                }
            }
        }
        Ok(())
    }

    /// Put each row onto the slice (renormalize every unit's `(w, b)`); a unit of norm 0
    /// has no nearest point on its sphere and is an error.
    pub fn project_rows(&self, rows: &mut [f32], what: &str) -> Result<()> {
        let single = rows.len() == self.dim; // a single row: `what` already names it
        for (r, row) in rows.chunks_exact_mut(self.dim).enumerate() {
            for s in &self.spheres {
                let n = s.norm(row);
                if !(n > 0.0 && n.is_finite()) {
                    let which = if single { what.to_string() } else { format!("{what} row {r}") };
                    return Err(Error::invalid(format!(
                        "{which}: hidden layer {} unit {} has ‖(w, b)‖ = {n}, which cannot be projected onto the sphere",
                        s.layer, s.unit
                    )));
                }
                s.scale(1.0 / n, row);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sphere_geometry(k: usize) -> Geometry {
        let s = Sphere { layer: 0, unit: 0, weights: 0, len: k - 1, bias: k - 1 };
        Geometry { spheres: vec![s], owner: vec![0; k], dim: k, log_area: log_sphere_area(k) }
    }

    #[test]
    fn sphere_areas() {
        let pi = std::f64::consts::PI;
        // |S^0| = 2 (two points), |S^1| = 2π, |S^2| = 4π, |S^3| = 2π², |S^4| = 8π²/3.
        for (k, area) in [(1, 2.0), (2, 2.0 * pi), (3, 4.0 * pi), (4, 2.0 * pi * pi), (5, 8.0 * pi * pi / 3.0)] {
            assert!((log_sphere_area(k) - f64::ln(area)).abs() < 1e-13, "k = {k}");
        }
        // The recursion |S^{k+1}| = 2π/k · |S^{k−1}|, far out.
        for k in 1..200 {
            let lhs = log_sphere_area(k + 2);
            let rhs = (2.0 * pi / k as f64).ln() + log_sphere_area(k);
            assert!((lhs - rhs).abs() < 1e-9, "k = {k}");
        }
    }

    /// Random unit x, tangent ε and a linear ambient field u(x) = W x + c: the quadratic
    /// form of the projected field's Jacobian along ε, by central differences, equals
    /// εᵀ W ε − |ε|² (x·u); summing it over a tangent basis gives tr(P W P) − (k−1)(x·u).
    #[test]
    fn tangent_quadratic_form_of_the_projected_field() {
        use rand::SeedableRng;
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(5);
        for k in [2usize, 3, 5, 8] {
            let g = sphere_geometry(k);
            let mut x = vec![0f32; k];
            g.draw_base(&mut rng, &mut x);
            let xd: Vec<f64> = x.iter().map(|v| f64::from(*v)).collect();
            let mut w = vec![0f32; k * k];
            let mut c = vec![0f32; k];
            rng::fill_standard_normal(&mut rng, &mut w);
            rng::fill_standard_normal(&mut rng, &mut c);
            let u = |y: &[f64]| -> Vec<f64> {
                (0..k).map(|i| (0..k).map(|j| f64::from(w[i * k + j]) * y[j]).sum::<f64>() + f64::from(c[i])).collect()
            };
            let v = |y: &[f64]| -> Vec<f64> {
                let uy = u(y);
                let yu: f64 = y.iter().zip(&uy).map(|(a, b)| a * b).sum();
                uy.iter().zip(y).map(|(ui, yi)| ui - yu * yi).collect()
            };
            let ux = u(&xd);
            let xu: f64 = xd.iter().zip(&ux).map(|(a, b)| a * b).sum();
            let quad_w = |e: &[f64]| -> f64 {
                (0..k).map(|i| e[i] * (0..k).map(|j| f64::from(w[i * k + j]) * e[j]).sum::<f64>()).sum()
            };
            // Projected unit vectors P e_i, as the exact trace uses them.
            let mut div_fd = 0.0;
            let mut div_formula = 0.0;
            for i in 0..k {
                let mut e = vec![0f32; k];
                g.basis_vector(&x, i, &mut e);
                let e: Vec<f64> = e.iter().map(|v| f64::from(*v)).collect();
                assert!(e.iter().zip(&xd).map(|(a, b)| a * b).sum::<f64>().abs() < 1e-6, "P e_i is tangent");
                let h = 1e-5;
                let plus: Vec<f64> = xd.iter().zip(&e).map(|(a, b)| a + h * b).collect();
                let minus: Vec<f64> = xd.iter().zip(&e).map(|(a, b)| a - h * b).collect();
                let dv: Vec<f64> = v(&plus).iter().zip(v(&minus)).map(|(a, b)| (a - b) / (2.0 * h)).collect();
                let fd: f64 = e.iter().zip(&dv).map(|(a, b)| a * b).sum();
                let norm2: f64 = e.iter().map(|a| a * a).sum();
                let formula = quad_w(&e) - norm2 * xu;
                assert!((fd - formula).abs() < 1e-6 * (1.0 + formula.abs()), "k {k}: {fd} vs {formula}");
                div_fd += fd;
                div_formula += quad_w(&e);
            }
            // Σ_i (P e_i)ᵀ W (P e_i) = tr(P W P) = tr(W) − xᵀ W x; then the correction.
            let trw: f64 = (0..k).map(|i| f64::from(w[i * k + i])).sum();
            assert!((div_formula - (trw - quad_w(&xd))).abs() < 1e-5);
            let mut uf: Vec<f32> = ux.iter().map(|v| *v as f32).collect();
            let mut corr = [0.0];
            g.project_velocity(&x, &mut uf, &mut corr);
            assert!((corr[0] - (k - 1) as f64 * xu).abs() < 1e-5);
            assert!((div_fd - (div_formula - corr[0])).abs() < 1e-5, "k {k}");
            // The projected velocity is tangent and equals v(x).
            let vx = v(&xd);
            for i in 0..k {
                assert!((f64::from(uf[i]) - vx[i]).abs() < 1e-5);
            }
        }
    }

    /// The gradient of f(x) = a·x on the sphere, P a, has divergence −(k−1)(a·x): linear
    /// functions are spherical harmonics of degree 1 (Δ f = −(k−1) f). With J_u = 0 the
    /// projected-field formula must give exactly the correction term.
    #[test]
    fn divergence_of_a_linear_gradient() {
        use rand::SeedableRng;
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(9);
        for k in [2usize, 3, 4, 10] {
            let g = sphere_geometry(k);
            let mut x = vec![0f32; k];
            g.draw_base(&mut rng, &mut x);
            let mut a = vec![0f32; k];
            rng::fill_standard_normal(&mut rng, &mut a);
            let ax: f64 = a.iter().zip(&x).map(|(p, q)| f64::from(*p) * f64::from(*q)).sum();
            let mut u = a.clone();
            let mut corr = [0.0];
            g.project_velocity(&x, &mut u, &mut corr);
            assert!((-corr[0] - (-(k as f64 - 1.0) * ax)).abs() < 1e-6);
        }
    }

    /// The start law on one sphere integrates to 1: ∫ q(φ) |S^{k−2}| sin^{k−2}φ dφ over
    /// [0, (1 − t₀)π] (Simpson's rule), for several k and t₀.
    #[test]
    fn the_geodesic_start_density_is_normalized() {
        for k in [2usize, 3, 4, 6, 9] {
            // Up to start times whose whole cap is below the series' switch (1 − t₀)π < 1e-4.
            for t0 in [0.1, 0.5, 0.9, 0.9999, 0.99995] {
                let end = (1.0 - t0) * std::f64::consts::PI;
                let n = 20_000;
                let h = end / n as f64;
                let f = |phi: f64| {
                    let q = cap_log_density(k, phi, t0).exp();
                    let shell = if k == 2 { 2.0 } else { log_sphere_area(k - 1).exp() * phi.sin().powi(k as i32 - 2) };
                    q * shell
                };
                let mut sum = f(0.0) + f(end - 1e-12);
                for i in 1..n {
                    sum += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
                }
                let total = sum * h / 3.0;
                assert!((total - 1.0).abs() < 1e-6, "k {k}, t0 {t0}: {total}");
            }
        }
        assert_eq!(cap_log_density(3, 2.0, 0.5), f64::NEG_INFINITY, "beyond the cap (1 − t₀)π");
        // Continuous at the switch to the series near 0.
        let (a, b) = (cap_log_density(5, 0.7 * 0.999e-4, 0.3), cap_log_density(5, 0.7 * 1.001e-4, 0.3));
        assert!((a - b).abs() < 1e-9);
    }

    /// On S¹ the start law is flat up to the cap's edge (1 − t₀)π: a state rounded to just past
    /// the edge (a near-antipodal z, stored in f32) keeps the flat density instead of −∞.
    #[test]
    fn the_circle_cap_is_flat_up_to_its_rounded_edge() {
        let t0 = 0.9;
        let edge = (1.0 - t0) * std::f64::consts::PI;
        let flat = -(1.0f64 - t0).ln() - (2.0 * std::f64::consts::PI).ln();
        for phi in [0.0, 0.5 * edge, edge - 1e-7, edge + 1e-7, edge + 5e-6] {
            assert!((cap_log_density(2, phi, t0) - flat).abs() < 1e-12, "φ = {phi}");
        }
        assert_eq!(cap_log_density(2, edge + 1e-3, t0), f64::NEG_INFINITY);
        assert!(cap_log_density(4, edge + 5e-6, t0) < -20.0, "k > 2: the density vanishes at the edge");
    }

    /// A start drawn from z lies on the great circle through z and a, at angle (1 − t₀)θ from a.
    #[test]
    fn geodesic_start_moves_along_the_great_circle() {
        use rand::SeedableRng;
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(4);
        let g = sphere_geometry(5);
        let (mut z, mut a) = (vec![0f32; 5], vec![0f32; 5]);
        g.draw_base(&mut rng, &mut z);
        g.draw_base(&mut rng, &mut a);
        let s = g.spheres[0];
        let (cz, sz) = s.cos_sin(&z, &a);
        let theta = sz.atan2(cz);
        let mut x = z.clone();
        g.geodesic_start(&mut x, &a, 0.3);
        let (cx, sx) = s.cos_sin(&x, &a);
        assert!((sx.atan2(cx) - 0.7 * theta).abs() < 1e-6);
        // In the plane of z and a: x = α z + β a.
        let zz: Vec<f64> = z.iter().map(|v| f64::from(*v)).collect();
        let aa: Vec<f64> = a.iter().map(|v| f64::from(*v)).collect();
        let (alpha, beta) = (((0.7 * theta).sin()) / theta.sin(), (0.3 * theta).sin() / theta.sin());
        for i in 0..5 {
            assert!((f64::from(x[i]) - alpha * zz[i] - beta * aa[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn base_draws_are_on_the_sphere_and_retraction_is_idempotent() {
        use rand::SeedableRng;
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(1);
        let g = sphere_geometry(6);
        let mut x = vec![0f32; 6];
        g.draw_base(&mut rng, &mut x);
        assert!(g.slice_error(&x).unwrap().deviation < 1e-6);
        let before = x.clone();
        g.retract(&mut x);
        assert!(x.iter().zip(&before).all(|(a, b)| (a - b).abs() < 1e-7));
        assert!((g.base_log_density(&x) + log_sphere_area(6)).abs() < 1e-12);
    }
}
