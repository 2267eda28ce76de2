//! `flow.geometry = "sphere_product"`: sampling and log-densities on the product of the
//! hidden units' unit spheres times the Euclidean last layer, against closed forms.
//!
//! `sphere_linear` (3 × S², 4 × S³, R¹⁰): on each sphere the ambient field is `u = a + β x`,
//! whose projection `a − (a·x) x` is the gradient flow of `a·x`: along the great circle to
//! `â = a/|a|`, `tan(φ₁/2) = tan(φ₀/2) e^{−|a|}`, and with `div_M v = −(k−1)(a·x)`
//! `log p₁(x₁) = −log |S^{k−1}| + (k−1)[|a| + 2 log(cos(φ₀/2)/cos(φ₁/2))]` (zero field where
//! `a = 0`: the uniform law, unchanged). Its last layer has an affine field (a Gaussian).
//! `sphere_tanh` (3 × S⁵, R⁸): a nonlinear field; densities from an independent float64
//! integration in the fixture generator. `sphere_anchored`: `sphere_linear`'s network with
//! a zero field on the spheres and three stored draws, so samples from start time `t₀` are the
//! geodesic start mixture itself on the spheres.
mod common;

use std::f64::consts::PI;

use common::{fixture, open};
use ndarray::Array2;
use postflow::{ErrorKind, Model, ProbeNoise, SampleOptions, SolverKind, TraceMode};
use serde_json::Value;

fn expected(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixture(&format!("{name}.expected.json"))).unwrap()).unwrap()
}

fn vec_f64(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn vec_usize(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

/// |S^{k−1}| from the textbook values (independent of the runtime's Γ(k/2)).
fn sphere_area(k: usize) -> f64 {
    match k {
        3 => 4.0 * PI,
        4 => 2.0 * PI * PI,
        6 => PI.powi(3),
        _ => panic!("no textbook area for k = {k} here"),
    }
}

/// The spheres' index sets as the generator wrote them.
fn spheres(e: &Value) -> Vec<Vec<usize>> {
    e["spheres"].as_array().unwrap().iter().map(|s| vec_usize(&s["indices"])).collect()
}

/// max over units of |‖(w, b)‖ − 1| over all rows.
fn slice_deviation(theta: &Array2<f32>, spheres: &[Vec<usize>]) -> f64 {
    let mut worst: f64 = 0.0;
    for row in theta.rows() {
        for s in spheres {
            let n = s.iter().map(|&i| f64::from(row[i]).powi(2)).sum::<f64>().sqrt();
            worst = worst.max((n - 1.0).abs());
        }
    }
    worst
}

/// The closed-form law of `sphere_linear`.
struct Linear {
    spheres: Vec<Vec<usize>>,
    a: Vec<Vec<f64>>,
    euclid: Vec<usize>,
    mean_e: Vec<f64>,
    scale_e: Vec<f64>,
    m: Vec<f64>,
    expm_neg_a: Vec<Vec<f64>>,
    trace_a: f64,
    sum_log_scale: f64,
}

impl Linear {
    fn load() -> Linear {
        let e = expected("sphere_linear");
        Linear {
            spheres: spheres(&e),
            a: e["a"].as_array().unwrap().iter().map(vec_f64).collect(),
            euclid: vec_usize(&e["euclidean"]),
            mean_e: vec_f64(&e["whiten_mean_euclidean"]),
            scale_e: vec_f64(&e["whiten_scale_euclidean"]),
            m: vec_f64(&e["m"]),
            expm_neg_a: e["expm_neg_A"].as_array().unwrap().iter().map(vec_f64).collect(),
            trace_a: e["trace_A"].as_f64().unwrap(),
            sum_log_scale: e["sum_log_scale"].as_f64().unwrap(),
        }
    }

    /// The angle φ₁ of sphere `s`'s block of θ to `â`, and φ₀ it came from.
    fn angles(&self, s: usize, theta: &[f32]) -> (f64, f64) {
        let a = &self.a[s];
        let c = a.iter().map(|v| v * v).sum::<f64>().sqrt();
        let idx = &self.spheres[s];
        // atan2 of the parts along and across â: acos of a cosine near 1 would lose half the digits.
        let along = idx.iter().zip(a).map(|(&i, av)| f64::from(theta[i]) * av).sum::<f64>() / c;
        let across =
            idx.iter().zip(a).map(|(&i, av)| (f64::from(theta[i]) - along * av / c).powi(2)).sum::<f64>().sqrt();
        let phi1 = across.atan2(along);
        (phi1, 2.0 * ((phi1 / 2.0).tan() * c.exp()).atan())
    }

    /// The Euclidean block's base point `x₀ = e^{−A}((θ − mean)/scale − m)`.
    fn euclidean_x0(&self, theta: &[f32]) -> Vec<f64> {
        let x1: Vec<f64> = self
            .euclid
            .iter()
            .enumerate()
            .map(|(j, &i)| (f64::from(theta[i]) - self.mean_e[j]) / self.scale_e[j] - self.m[j])
            .collect();
        self.expm_neg_a.iter().map(|row| row.iter().zip(&x1).map(|(r, x)| r * x).sum()).collect()
    }

    fn log_density(&self, theta: &[f32]) -> f64 {
        let mut lp = 0.0;
        for (s, idx) in self.spheres.iter().enumerate() {
            let k = idx.len();
            lp -= sphere_area(k).ln();
            let c = self.a[s].iter().map(|v| v * v).sum::<f64>().sqrt();
            if c > 0.0 {
                let (phi1, phi0) = self.angles(s, theta);
                lp += (k - 1) as f64 * (c + 2.0 * ((phi0 / 2.0).cos() / (phi1 / 2.0).cos()).ln());
            }
        }
        let x0 = self.euclidean_x0(theta);
        let e = x0.len() as f64;
        lp - 0.5 * x0.iter().map(|v| v * v).sum::<f64>() - 0.5 * e * (2.0 * PI).ln() - self.trace_a - self.sum_log_scale
    }
}

fn opts(seed: u64, trace: TraceMode) -> SampleOptions {
    SampleOptions { seed, trace, ..SampleOptions::default() }
}

fn solver(kind: SolverKind, steps: u32) -> SampleOptions {
    SampleOptions {
        solver: Some(kind),
        steps: Some(steps),
        rtol: Some(1e-6),
        atol: Some(1e-6),
        ..opts(1, TraceMode::Exact)
    }
}

/// Kolmogorov–Smirnov distance of `samples` to the continuous CDF `cdf`.
fn ks_distance(mut samples: Vec<f64>, cdf: impl Fn(f64) -> f64) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = samples.len() as f64;
    samples
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let f = cdf(*x);
            (f - i as f64 / n).abs().max(((i + 1) as f64 / n - f).abs())
        })
        .fold(0.0, f64::max)
}

#[test]
fn geometry_is_located_from_the_network_layout() {
    let model = open("sphere_linear");
    let g = model.geometry();
    assert_eq!(g.name(), "sphere_product");
    let e = expected("sphere_linear");
    let want = spheres(&e);
    assert_eq!(g.spheres().len(), want.len());
    for (s, idx) in g.spheres().iter().zip(&want) {
        let mut got: Vec<usize> = (s.weights..s.weights + s.len).collect();
        got.push(s.bias);
        assert_eq!(&got, idx, "layer {} unit {}", s.layer, s.unit);
    }
    assert_eq!(g.sphere_coordinates(), 3 * 3 + 4 * 4);
    assert_eq!(g.euclidean_coordinates(), 10);
    assert!(open("affine_cls").geometry().is_euclidean());
}

#[test]
fn samples_stay_on_the_slice_for_every_solver() {
    for name in ["sphere_linear", "sphere_tanh"] {
        let model = open(name);
        let sp = spheres(&expected(name));
        for (kind, steps) in [
            (SolverKind::Euler, 3),
            (SolverKind::Euler, 40),
            (SolverKind::Heun, 8),
            (SolverKind::Rk4, 16),
            (SolverKind::Dopri5, 0),
        ] {
            let s =
                model.sample(64, &SampleOptions { steps: (steps > 0).then_some(steps), ..solver(kind, 1) }).unwrap();
            let dev = slice_deviation(&s.theta, &sp);
            println!("{name} {kind:?} {steps} steps: max |‖(w, b)‖ − 1| = {dev:e}");
            assert!(dev <= 1e-5, "{name} {kind:?}: {dev:e}");
            assert!(s.log_density.unwrap().iter().all(|v| v.is_finite()));
        }
    }
}

#[test]
fn exact_log_density_matches_the_closed_form() {
    let model = open("sphere_linear");
    let law = Linear::load();
    for (kind, steps, tol) in
        [(SolverKind::Rk4, 32, 1e-4), (SolverKind::Dopri5, 0, 1e-4), (SolverKind::Heun, 400, 1e-3)]
    {
        let o = SampleOptions { steps: (steps > 0).then_some(steps), ..solver(kind, 1) };
        let s = model.sample(64, &o).unwrap();
        let logd = s.log_density.unwrap();
        let mut worst: f64 = 0.0;
        for (i, row) in s.theta.rows().into_iter().enumerate() {
            worst = worst.max((f64::from(logd[i]) - law.log_density(row.as_slice().unwrap())).abs());
        }
        println!("sphere_linear {kind:?}: max |log q − closed form| = {worst:e}");
        assert!(worst < tol, "{kind:?}: {worst:e}");
    }
}

#[test]
fn log_prob_of_closed_form_and_independently_integrated_points() {
    for name in ["sphere_linear", "sphere_tanh"] {
        let model = open(name);
        let e = expected(name);
        let points = e["points"].as_array().unwrap();
        let d = model.weight_dim();
        let theta: Vec<f32> = points.iter().flat_map(|p| vec_f64(&p["theta"])).map(|v| v as f32).collect();
        let theta = Array2::from_shape_vec((points.len(), d), theta).unwrap();
        let o = SampleOptions { steps: Some(128), ..opts(0, TraceMode::Exact) };
        let lp = model.log_prob(theta.view(), &o).unwrap();
        for (i, p) in points.iter().enumerate() {
            let want = p["log_density"].as_f64().unwrap();
            let got = f64::from(lp.log_density[i]);
            assert!((got - want).abs() < 1e-4, "{name} point {i}: {got} vs {want}");
        }
        if name == "sphere_linear" {
            let law = Linear::load();
            for (i, row) in theta.rows().into_iter().enumerate() {
                let closed = law.log_density(row.as_slice().unwrap());
                let want = points[i]["log_density"].as_f64().unwrap();
                assert!((closed - want).abs() < 1e-5, "the test's closed form agrees with the generator's");
            }
        }
    }
}

#[test]
fn a_zero_field_leaves_the_sphere_uniform() {
    // Layer 0 unit 1 (S²) has a = 0: its u = β x projects to 0, so x₁ = x₀ is uniform,
    // and by Archimedes each coordinate of a uniform point on S² is uniform on [−1, 1].
    let model = open("sphere_linear");
    let law = Linear::load();
    assert!(law.a[1].iter().all(|v| *v == 0.0));
    let n = 4000;
    let s = model.sample(n, &opts(17, TraceMode::None)).unwrap();
    for &i in &law.spheres[1] {
        let xs: Vec<f64> = s.theta.column(i).iter().map(|v| f64::from(*v)).collect();
        let ks = ks_distance(xs, |x| ((x + 1.0) / 2.0).clamp(0.0, 1.0));
        assert!(ks < 1.95 / (n as f64).sqrt(), "coordinate {i}: KS {ks}");
    }
    // Its density is the uniform one: the exact log q of a sample is the closed form,
    // whose share from this sphere is exactly −log 4π whatever the point.
    let s = model.sample(8, &opts(3, TraceMode::Exact)).unwrap();
    for (i, row) in s.theta.rows().into_iter().enumerate() {
        let got = f64::from(s.log_density.as_ref().unwrap()[i]);
        assert!((got - law.log_density(row.as_slice().unwrap())).abs() < 1e-4);
    }
}

#[test]
fn histogram_of_the_gradient_flow_matches_its_law() {
    // φ₁ ≤ ψ iff φ₀ ≤ g(ψ) = 2 atan(tan(ψ/2) e^{|a|}), and under the uniform law
    // P(φ₀ ≤ g) = (1 − cos g)/2 on S² and (g − sin g cos g)/π on S³.
    let model = open("sphere_linear");
    let law = Linear::load();
    let n = 4000;
    let s = model.sample(n, &opts(23, TraceMode::None)).unwrap();
    for sphere in [0usize, 3, 4, 6] {
        let k = law.spheres[sphere].len();
        let c = law.a[sphere].iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!(c > 0.5);
        let phis: Vec<f64> = s.theta.rows().into_iter().map(|r| law.angles(sphere, r.as_slice().unwrap()).0).collect();
        let cdf = |psi: f64| {
            let g = 2.0 * ((psi / 2.0).tan() * c.exp()).atan();
            if k == 3 {
                (1.0 - g.cos()) / 2.0
            } else {
                (g - g.sin() * g.cos()) / PI
            }
        };
        let ks = ks_distance(phis.clone(), cdf);
        println!("sphere {sphere} (S^{}): KS {ks:.4}", k - 1);
        assert!(ks < 1.95 / (n as f64).sqrt(), "sphere {sphere}: KS {ks}");
        // And the flow really moved it: the uniform law is far off.
        let uniform = ks_distance(phis, |psi| cdf(2.0 * ((psi / 2.0).tan() * (-c).exp()).atan()).min(1.0));
        assert!(uniform > 0.1 || c < 0.2, "sphere {sphere}: samples look uniform (KS {uniform})");
    }
}

#[test]
fn the_euclidean_part_of_a_mixed_bundle_is_the_gaussian() {
    // The last layer's field is affine and independent of the spheres, so
    // x₀ = e^{−A}((θ_E − mean)/scale − m) must be standard normal.
    let model = open("sphere_linear");
    let law = Linear::load();
    let n = 4000;
    let s = model.sample(n, &opts(29, TraceMode::None)).unwrap();
    let e = law.euclid.len();
    let mut sum = vec![0.0; e];
    let mut sq = vec![0.0; e];
    for row in s.theta.rows() {
        for (j, v) in law.euclidean_x0(row.as_slice().unwrap()).iter().enumerate() {
            sum[j] += v;
            sq[j] += v * v;
        }
    }
    for j in 0..e {
        let mean = sum[j] / n as f64;
        let var = sq[j] / n as f64 - mean * mean;
        assert!(mean.abs() < 4.0 / (n as f64).sqrt(), "coordinate {j}: mean {mean}");
        assert!((var - 1.0).abs() < 4.0 * (2.0 / n as f64).sqrt(), "coordinate {j}: variance {var}");
    }
}

#[test]
fn hutchinson_with_tangent_probes_is_unbiased() {
    let model = open("sphere_tanh");
    let n = 300;
    let exact = model.sample(n, &opts(11, TraceMode::Exact)).unwrap();
    let exact_logd = exact.log_density.unwrap();
    for noise in [ProbeNoise::Rademacher, ProbeNoise::Gaussian] {
        let h = model.sample(n, &opts(11, TraceMode::Hutchinson { probes: 16, noise })).unwrap();
        // Same seed, same start points and trajectories: only the trace differs.
        assert!(h.theta.iter().zip(exact.theta.iter()).all(|(a, b)| (a - b).abs() < 1e-5));
        let errs: Vec<f64> =
            h.log_density.unwrap().iter().zip(&exact_logd).map(|(a, b)| f64::from(*a) - f64::from(*b)).collect();
        let mean = errs.iter().sum::<f64>() / n as f64;
        let sd = (errs.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0)).sqrt();
        let se = sd / (n as f64).sqrt();
        println!("{noise:?}: bias {mean:.4} ± {se:.4} (sd {sd:.3})");
        assert!(sd > 1e-3, "Hutchinson estimates should scatter (sd {sd})");
        assert!(mean.abs() < 4.0 * se, "{noise:?}: bias {mean} vs standard error {se}");
    }
}

#[test]
fn log_prob_reproduces_sampled_densities() {
    let model = open("sphere_tanh");
    for (kind, steps) in
        [(SolverKind::Rk4, 32), (SolverKind::Dopri5, 0), (SolverKind::Heun, 64), (SolverKind::Euler, 3200)]
    {
        let o = SampleOptions { steps: (steps > 0).then_some(steps), ..solver(kind, 1) };
        let s = model.sample(16, &o).unwrap();
        let back = model.log_prob(s.theta.view(), &o).unwrap();
        let worst =
            s.log_density.unwrap().iter().zip(&back.log_density).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        println!("{kind:?}: max |sampled − log_prob| = {worst:e}");
        // Euler is first order: forward and backward paths differ by O(h) (0.64 at 200 steps here).
        let tol = if kind == SolverKind::Euler { 5e-2 } else { 1e-3 };
        assert!(worst < tol, "{kind:?}: {worst}");
    }
    // Hutchinson with the same seed uses the same raw probes forward and backward.
    let h = opts(5, TraceMode::Hutchinson { probes: 3, noise: ProbeNoise::Gaussian });
    let s = model.sample(8, &h).unwrap();
    let back = model.log_prob(s.theta.view(), &h).unwrap();
    for (a, b) in s.log_density.unwrap().iter().zip(&back.log_density) {
        assert!((a - b).abs() < 1e-3, "hutchinson: sampled {a} vs log_prob {b}");
    }
}

/// Retraction keeps each method's order: the error in θ and log q against a fine RK4
/// solve falls by 2, 4 and 16 when the steps double (Euler, Heun, RK4).
#[test]
fn solvers_keep_their_order_on_the_manifold() {
    let model = open("sphere_tanh");
    let fine = model.sample(16, &solver(SolverKind::Rk4, 400)).unwrap();
    let fine_logd = fine.log_density.unwrap();
    let error = |kind: SolverKind, steps: u32| -> (f64, f64) {
        let s = model.sample(16, &solver(kind, steps)).unwrap();
        let th = s.theta.iter().zip(fine.theta.iter()).map(|(a, b)| f64::from((a - b).abs())).fold(0.0, f64::max);
        let ld =
            s.log_density.unwrap().iter().zip(&fine_logd).map(|(a, b)| f64::from((a - b).abs())).fold(0.0, f64::max);
        (th, ld)
    };
    for (kind, steps, order) in [(SolverKind::Euler, 200, 1), (SolverKind::Heun, 20, 2), (SolverKind::Rk4, 4, 4)] {
        let (t1, l1) = error(kind, steps);
        let (t2, l2) = error(kind, 2 * steps);
        let want = f64::from(1u32 << order);
        println!("{kind:?}: θ error ratio {:.2}, log q error ratio {:.2} (want {want})", t1 / t2, l1 / l2);
        for ratio in [t1 / t2, l1 / l2] {
            assert!(ratio > 0.8 * want && ratio < 1.3 * want, "{kind:?}: ratio {ratio}, order {order}");
        }
    }
}

#[test]
fn weights_off_the_slice_are_refused_unless_projected() {
    let model = open("sphere_tanh");
    let sp = spheres(&expected("sphere_tanh"));
    let o = opts(2, TraceMode::Exact);
    let s = model.sample(4, &o).unwrap();
    let on = model.log_prob(s.theta.view(), &o).unwrap();
    // Scale unit 1 of row 2 by 1.01: it is the same canonical net, off the slice.
    let mut off = s.theta.clone();
    for &i in &sp[1] {
        off[[2, i]] *= 1.01;
    }
    let e = model.log_prob(off.view(), &o).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    for f in ["theta row 2", "off the slice", "hidden layer 0 unit 1", "project_to_slice"] {
        assert!(e.message().contains(f), "{:?} lacks {f:?}", e.message());
    }
    // Within the tolerance (1e-4) it is accepted as is.
    let mut near = s.theta.clone();
    for &i in &sp[0] {
        near[[0, i]] *= 1.0 + 5e-5;
    }
    model.log_prob(near.view(), &o).unwrap();
    // Projected, it is the original point again.
    let projected = model.log_prob(off.view(), &SampleOptions { project_to_slice: true, ..o.clone() }).unwrap();
    for (a, b) in on.log_density.iter().zip(&projected.log_density) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    // A unit of norm 0 has no projection.
    let mut zero = s.theta.clone();
    for &i in &sp[2] {
        zero[[1, i]] = 0.0;
    }
    let e = model.log_prob(zero.view(), &SampleOptions { project_to_slice: true, ..o.clone() }).unwrap_err();
    assert!(e.message().contains("cannot be projected"), "{}", e.message());
    // Euclidean bundles ignore the option.
    let cls = open("affine_cls");
    let t = cls.sample(2, &o).unwrap().theta;
    let a = cls.log_prob(t.view(), &o).unwrap();
    let b = cls.log_prob(t.view(), &SampleOptions { project_to_slice: true, ..o }).unwrap();
    assert_eq!(a.log_density, b.log_density);
}

#[test]
fn start_times_on_the_spheres() {
    let model = open("sphere_tanh");
    assert_eq!(model.default_start_time(), 0.0);
    assert_eq!(model.anchor_count(), 16);
    let sp = spheres(&expected("sphere_tanh"));
    // t₀ = 1: the stored draws, stored as f16 (off by up to 2⁻¹¹), come back on the slice.
    let s = model.sample(16, &SampleOptions { start_time: Some(1.0), ..opts(0, TraceMode::None) }).unwrap();
    let dev = slice_deviation(&s.theta, &sp);
    assert!(dev <= 1e-5, "stored draws: {dev:e}");
    assert!(expected("sphere_tanh")["anchors_max_norm_error"].as_f64().unwrap() > 1e-5, "f16 rounding was real");
    // Each is a stored (f16) anchor renormalized on every unit, read straight from the file.
    let bytes = std::fs::read(fixture("sphere_tanh").join("tensors.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let raw: Vec<f64> = st
        .tensor("flow.anchors")
        .unwrap()
        .data()
        .chunks_exact(2)
        .map(|c| f64::from(half::f16::from_le_bytes([c[0], c[1]]).to_f32()))
        .collect();
    let d = model.weight_dim();
    for row in s.theta.rows() {
        let hit = raw.chunks_exact(d).any(|a| {
            sp.iter().all(|idx| {
                let n = idx.iter().map(|&i| a[i] * a[i]).sum::<f64>().sqrt();
                idx.iter().all(|&i| (a[i] / n - f64::from(row[i])).abs() < 1e-6)
            })
        });
        assert!(hit, "a stored draw that is no renormalized anchor");
    }
    // t₀ = 0 explicitly equals the default.
    let a = model.sample(4, &opts(9, TraceMode::Exact)).unwrap();
    let b = model.sample(4, &SampleOptions { start_time: Some(0.0), ..opts(9, TraceMode::Exact) }).unwrap();
    assert_eq!(a.theta, b.theta);
    // In between: the geodesic start mixture, on the slice, and log_prob inverts it.
    for t0 in [0.3, 0.7] {
        for trace in [TraceMode::Exact, TraceMode::Hutchinson { probes: 2, noise: ProbeNoise::Rademacher }] {
            let o = SampleOptions { start_time: Some(t0), ..opts(12, trace) };
            let s = model.sample(12, &o).unwrap();
            assert!(slice_deviation(&s.theta, &sp) <= 1e-5);
            let back = model.log_prob(s.theta.view(), &o).unwrap();
            for (a, b) in s.log_density.unwrap().iter().zip(&back.log_density) {
                assert!((a - b).abs() < 1e-3, "t0 {t0} {trace:?}: sampled {a} vs log_prob {b}");
            }
        }
    }
}

/// The closed form of `sphere_anchored`: a zero field on the spheres, so a sample's sphere
/// blocks are its start point, drawn from the geodesic mixture; its last layer is affine.
struct Anchored {
    t0: f64,
    spheres: Vec<Vec<usize>>,
    euclid: Vec<usize>,
    anchors: Vec<Vec<f64>>,
    mean_e: Vec<f64>,
    scale_e: Vec<f64>,
    m_t0: Vec<f64>,
    e_inv: Vec<Vec<f64>>,
    trace_a: f64,
    sum_log_scale: f64,
}

impl Anchored {
    fn load() -> Anchored {
        let e = expected("sphere_anchored");
        Anchored {
            t0: e["start_time"].as_f64().unwrap(),
            spheres: spheres(&e),
            euclid: vec_usize(&e["euclidean"]),
            anchors: e["anchors"].as_array().unwrap().iter().map(vec_f64).collect(),
            mean_e: vec_f64(&e["whiten_mean_euclidean"]),
            scale_e: vec_f64(&e["whiten_scale_euclidean"]),
            m_t0: vec_f64(&e["m_t0"]),
            e_inv: e["expm_neg_A_t0"].as_array().unwrap().iter().map(vec_f64).collect(),
            trace_a: e["trace_A"].as_f64().unwrap(),
            sum_log_scale: e["sum_log_scale"].as_f64().unwrap(),
        }
    }

    /// Angle between θ's block `idx` and anchor `a`'s.
    fn angle(idx: &[usize], theta: &[f32], a: &[f64]) -> f64 {
        let along: f64 = idx.iter().map(|&i| f64::from(theta[i]) * a[i]).sum();
        let across = idx.iter().map(|&i| (f64::from(theta[i]) - along * a[i]).powi(2)).sum::<f64>().sqrt();
        across.atan2(along)
    }

    /// log q(θ) = log p_t₀(x_t₀) − (1 − t₀) tr A − Σ log scale, p_t₀ the mixture over anchors of
    /// Π_s sin^{k−2}(φ/c) / (c sin^{k−2}φ |S^{k−1}|) × N(x_E; t₀ a_E, c² I), c = 1 − t₀.
    fn log_density(&self, theta: &[f32]) -> f64 {
        let c = 1.0 - self.t0;
        let r: Vec<f64> = self
            .euclid
            .iter()
            .enumerate()
            .map(|(j, &i)| (f64::from(theta[i]) - self.mean_e[j]) / self.scale_e[j] - self.m_t0[j])
            .collect();
        let xe: Vec<f64> = self.e_inv.iter().map(|row| row.iter().zip(&r).map(|(a, b)| a * b).sum()).collect();
        let terms: Vec<f64> = self
            .anchors
            .iter()
            .map(|a| {
                let mut lp = 0.0;
                for (j, &i) in self.euclid.iter().enumerate() {
                    let z = (xe[j] - self.t0 * a[i]) / c;
                    lp += -0.5 * z * z - (c * (2.0 * PI).sqrt()).ln();
                }
                for idx in &self.spheres {
                    let k = idx.len() as i32;
                    let phi = Self::angle(idx, theta, a);
                    if phi >= c * PI {
                        return f64::NEG_INFINITY;
                    }
                    lp += ((phi / c).sin() / phi.sin()).powi(k - 2).ln() - c.ln() - sphere_area(idx.len()).ln();
                }
                lp
            })
            .collect();
        let top = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = top + terms.iter().map(|t| (t - top).exp()).sum::<f64>().ln() - (terms.len() as f64).ln();
        lse - (1.0 - self.t0) * self.trace_a - self.sum_log_scale
    }
}

#[test]
fn geodesic_start_mixture_matches_its_closed_form() {
    let model = open("sphere_anchored");
    let law = Anchored::load();
    assert_eq!(model.default_start_time(), law.t0);
    assert_eq!(model.manifest().format_version, 2);
    // Sampled log-densities (the bundle's default start time, 0.8) against the closed form.
    let s = model.sample(64, &opts(31, TraceMode::Exact)).unwrap();
    assert!(slice_deviation(&s.theta, &law.spheres) <= 1e-5);
    let logd = s.log_density.unwrap();
    let mut worst: f64 = 0.0;
    for (i, row) in s.theta.rows().into_iter().enumerate() {
        worst = worst.max((f64::from(logd[i]) - law.log_density(row.as_slice().unwrap())).abs());
    }
    println!("sphere_anchored exact trace: max |log q − closed form| = {worst:e}");
    assert!(worst < 1e-4, "{worst:e}");
    // log_prob of the generator's points (drawn and evaluated by its own numpy code).
    let e = expected("sphere_anchored");
    let points = e["points"].as_array().unwrap();
    let d = model.weight_dim();
    let theta: Vec<f32> = points.iter().flat_map(|p| vec_f64(&p["theta"])).map(|v| v as f32).collect();
    let theta = Array2::from_shape_vec((points.len(), d), theta).unwrap();
    let lp = model.log_prob(theta.view(), &opts(0, TraceMode::Exact)).unwrap();
    for (i, p) in points.iter().enumerate() {
        let want = p["log_density"].as_f64().unwrap();
        assert!((f64::from(lp.log_density[i]) - want).abs() < 1e-4, "point {i}: {} vs {want}", lp.log_density[i]);
        assert!((law.log_density(theta.row(i).as_slice().unwrap()) - want).abs() < 1e-5, "the two closed forms agree");
    }
}

#[test]
fn geodesic_start_histogram_matches_its_law() {
    // The anchors' sphere blocks are 90° apart and the caps (1 − t₀)π = 36° wide, so the
    // nearest anchor is the one drawn, and its angle is (1 − t₀)·θ with θ the uniform law's
    // angle: F(φ) = F_unif(φ/(1 − t₀)), (1 − cos θ)/2 on S², (θ − sin θ cos θ)/π on S³.
    let model = open("sphere_anchored");
    let law = Anchored::load();
    let c = 1.0 - law.t0;
    let n = 4000;
    let s = model.sample(n, &opts(37, TraceMode::None)).unwrap();
    for idx in &law.spheres {
        let k = idx.len();
        let phis: Vec<f64> = s
            .theta
            .rows()
            .into_iter()
            .map(|r| {
                let row = r.as_slice().unwrap();
                law.anchors.iter().map(|a| Anchored::angle(idx, row, a)).fold(f64::INFINITY, f64::min)
            })
            .collect();
        assert!(phis.iter().all(|p| *p < c * PI + 1e-6), "every sample within its anchor's cap");
        let ks = ks_distance(phis, |phi| {
            let th = (phi / c).min(PI);
            if k == 3 {
                (1.0 - th.cos()) / 2.0
            } else {
                (th - th.sin() * th.cos()) / PI
            }
        });
        println!("sphere {idx:?}: KS {ks:.4}");
        assert!(ks < 1.95 / (n as f64).sqrt(), "sphere {idx:?}: KS {ks}");
    }
}

fn postflow(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_postflow")).args(args).output().expect("run postflow")
}

#[test]
fn cli_info_shows_the_geometry_and_log_prob_projects_on_request() {
    let bundle = fixture("sphere_linear");
    let b = bundle.to_str().unwrap();
    let o = postflow(&["info", b]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("sphere_product: 7 unit spheres (3 × S^2, 4 × S^3) and R^10"), "{text}");
    let o = postflow(&["info", b, "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["geometry"]["kind"], "sphere_product");
    assert_eq!(v["geometry"]["spheres"], 7);
    assert_eq!(v["geometry"]["euclidean_coordinates"], 10);
    let o = postflow(&["info", fixture("affine_cls").to_str().unwrap(), "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["geometry"]["kind"], "euclidean");

    // log-prob: weights off the slice are one clear error line, and --project takes them.
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("s.safetensors");
    let out = dir.path().join("lp.safetensors");
    let o = postflow(&["sample", b, "-n", "3", "-q", "-o", samples.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&samples).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let theta: Vec<f32> =
        st.tensor("theta").unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let scaled: Vec<f32> = theta.iter().map(|v| v * 2.0).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3, 35], bytemuck_bytes(&scaled)).unwrap();
    let off = dir.path().join("off.safetensors");
    std::fs::write(&off, safetensors::serialize([("theta", view)], None).unwrap()).unwrap();
    let args = ["log-prob", b, "--theta", off.to_str().unwrap(), "--trace", "exact", "-q", "-o", out.to_str().unwrap()];
    let o = postflow(&args);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("off the slice") && err.contains("--project"), "{err}");
    let mut with = args.to_vec();
    with.push("--project");
    let o = postflow(&with);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn bytemuck_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte view of it is valid; the length is exact.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

#[test]
fn model_open_keeps_the_geometry_of_every_fixture() {
    for (name, euclid) in
        [("affine_cls", true), ("affine_anchored", true), ("sphere_linear", false), ("sphere_tanh", false)]
    {
        let m: Model = open(name);
        assert_eq!(m.geometry().is_euclidean(), euclid, "{name}");
        assert_eq!(m.manifest().flow.geometry, m.geometry().name());
    }
}

#[test]
fn eval_describes_the_geodesic_start_on_sphere_bundles() {
    let o = postflow(&["eval", fixture("sphere_anchored").to_str().unwrap(), "-n", "20"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("starts at slerp(z, a; 0.8) on every unit sphere (0.8·a + 0.20·z elsewhere)"), "{text}");
    let o = postflow(&["eval", fixture("sphere_anchored").to_str().unwrap(), "-n", "20", "--start-time", "0"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("fresh flow samples from the uniform base on the unit spheres"), "{text}");
    let o = postflow(&["eval", fixture("affine_anchored").to_str().unwrap(), "-n", "20", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["flow"]["geometry"], "euclidean");
}
