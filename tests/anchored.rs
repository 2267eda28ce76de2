//! Sampling from a start time t₀ around stored anchor draws (format version 2),
//! against the closed form of the `affine_anchored` fixture: its affine flow maps the
//! start mixture (1/n) Σ N(t₀ aᵢ, (1 − t₀)² I) exactly, so log q(θ) is known.
mod common;

use common::{fixture, open, Expected};
use ndarray::Array2;
use postflow::{ErrorKind, ProbeNoise, SampleOptions, TraceMode};

const T0: f64 = 0.5; // the fixture's default start time

/// The exact density of the anchored fixture at its default start time.
struct Anchored {
    t0: f64,
    anchors: Array2<f32>,
    mean: Vec<f32>,
    scale: Vec<f32>,
    sum_log_scale: f64,
    trace_a: f64,
    m_t0: Vec<f64>,
    e_inv: Vec<Vec<f64>>,
}

impl Anchored {
    fn load(model: &postflow::Model) -> Anchored {
        let path = fixture("affine_anchored.expected.json");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let vec =
            |x: &serde_json::Value| -> Vec<f64> { x.as_array().unwrap().iter().map(|a| a.as_f64().unwrap()).collect() };
        let t = model.tensors();
        Anchored {
            t0: v["start_time"].as_f64().unwrap(),
            anchors: t.anchors.clone().unwrap(),
            mean: t.whiten_mean.clone(),
            scale: t.whiten_scale.clone(),
            sum_log_scale: v["sum_log_scale"].as_f64().unwrap(),
            trace_a: v["trace_A"].as_f64().unwrap(),
            m_t0: vec(&v["m_t0"]),
            e_inv: v["expm_neg_A_t0"].as_array().unwrap().iter().map(vec).collect(),
        }
    }

    /// log q(θ) = log p_t₀(e^{−A(1−t₀)}(x₁ − m_t₀)) − (1 − t₀) tr A − Σ log scale.
    fn log_density(&self, theta: &[f32]) -> f64 {
        let d = theta.len();
        let r: Vec<f64> = (0..d)
            .map(|i| (f64::from(theta[i]) - f64::from(self.mean[i])) / f64::from(self.scale[i]) - self.m_t0[i])
            .collect();
        let xs: Vec<f64> = (0..d).map(|i| (0..d).map(|j| self.e_inv[i][j] * r[j]).sum()).collect();
        let sig = 1.0 - self.t0;
        let terms: Vec<f64> = self
            .anchors
            .rows()
            .into_iter()
            .map(|a| -0.5 * (0..d).map(|i| (xs[i] - self.t0 * f64::from(a[i])).powi(2)).sum::<f64>() / (sig * sig))
            .collect();
        let top = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = top + terms.iter().map(|t| (t - top).exp()).sum::<f64>().ln();
        let log_p =
            lse - (self.anchors.nrows() as f64).ln() - 0.5 * d as f64 * (2.0 * std::f64::consts::PI * sig * sig).ln();
        log_p - (1.0 - self.t0) * self.trace_a - self.sum_log_scale
    }
}

fn opts(seed: u64, trace: TraceMode, start_time: Option<f64>) -> SampleOptions {
    SampleOptions { seed, trace, start_time, ..SampleOptions::default() }
}

#[test]
fn the_bundle_declares_its_anchors_and_default_start_time() {
    let model = open("affine_anchored");
    assert_eq!(model.manifest().format_version, 2);
    assert_eq!(model.anchor_count(), 24);
    assert_eq!(model.default_start_time(), T0);
    assert!(model.tensors().ood_x.is_some());
    assert_eq!(open("affine_cls").anchor_count(), 0);
    assert_eq!(open("affine_cls").default_start_time(), 0.0);
}

#[test]
fn exact_trace_matches_the_closed_form_mixture_density() {
    let model = open("affine_anchored");
    let exact = Anchored::load(&model);
    assert_eq!(exact.t0, T0);
    // None takes the bundle's default start time, 0.5.
    let s = model.sample(64, &opts(3, TraceMode::Exact, None)).unwrap();
    let logd = s.log_density.unwrap();
    let mut worst: f64 = 0.0;
    for (i, row) in s.theta.rows().into_iter().enumerate() {
        worst = worst.max((f64::from(logd[i]) - exact.log_density(row.as_slice().unwrap())).abs());
    }
    println!("anchored exact trace: max abs error {worst:e}");
    assert!(worst < 1e-4, "worst |log q − exact| = {worst:e}");
}

#[test]
fn log_prob_of_closed_form_points() {
    let model = open("affine_anchored");
    let exp = Expected::load("affine_anchored");
    let theta =
        Array2::from_shape_vec((exp.points.len(), exp.d), exp.points.iter().flat_map(|p| p.0.clone()).collect())
            .unwrap();
    let lp = model.log_prob(theta.view(), &opts(0, TraceMode::Exact, None)).unwrap();
    for (i, (_, want)) in exp.points.iter().enumerate() {
        let got = f64::from(lp.log_density[i]);
        assert!((got - want).abs() < 1e-4, "point {i}: {got} vs {want}");
    }
}

#[test]
fn hutchinson_is_unbiased_within_its_standard_error() {
    let model = open("affine_anchored");
    let exact = Anchored::load(&model);
    let n = 400;
    let trace = TraceMode::Hutchinson { probes: 4, noise: ProbeNoise::Rademacher };
    let s = model.sample(n, &opts(11, trace, Some(T0))).unwrap();
    let logd = s.log_density.unwrap();
    let errs: Vec<f64> = s
        .theta
        .rows()
        .into_iter()
        .enumerate()
        .map(|(i, row)| f64::from(logd[i]) - exact.log_density(row.as_slice().unwrap()))
        .collect();
    let mean = errs.iter().sum::<f64>() / n as f64;
    let sd = (errs.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0)).sqrt();
    assert!(sd > 1e-3, "Hutchinson estimates should scatter (sd {sd})");
    assert!(mean.abs() < 4.0 * sd / (n as f64).sqrt(), "bias {mean} vs standard error {}", sd / (n as f64).sqrt());
}

#[test]
fn log_prob_reproduces_sampled_densities() {
    let model = open("affine_anchored");
    for t0 in [0.2, T0, 0.9] {
        let o = opts(5, TraceMode::Exact, Some(t0));
        let s = model.sample(16, &o).unwrap();
        let back = model.log_prob(s.theta.view(), &o).unwrap();
        for (a, b) in s.log_density.unwrap().iter().zip(&back.log_density) {
            assert!((a - b).abs() < 1e-3, "t0 {t0}: sampled {a} vs log_prob {b}");
        }
        // Hutchinson with the same seed uses the same probes forward and backward.
        let h = opts(5, TraceMode::Hutchinson { probes: 2, noise: ProbeNoise::Gaussian }, Some(t0));
        let s = model.sample(8, &h).unwrap();
        let back = model.log_prob(s.theta.view(), &h).unwrap();
        for (a, b) in s.log_density.unwrap().iter().zip(&back.log_density) {
            assert!((a - b).abs() < 1e-3, "t0 {t0} hutchinson: sampled {a} vs log_prob {b}");
        }
    }
}

#[test]
fn start_time_one_returns_the_anchors_bitwise_in_a_seeded_order() {
    let model = open("affine_anchored");
    let t = model.tensors();
    let anchors = t.anchors.as_ref().unwrap();
    let d = model.weight_dim();
    let unwhitened: Vec<Vec<f32>> = anchors
        .rows()
        .into_iter()
        .map(|a| (0..d).map(|i| t.whiten_mean[i] + t.whiten_scale[i] * a[i]).collect())
        .collect();
    let n = anchors.nrows();
    let order_of = |seed: u64, first: u64, count: usize| -> Vec<usize> {
        let o = SampleOptions { first_index: first, ..opts(seed, TraceMode::None, Some(1.0)) };
        let s = model.sample(count, &o).unwrap();
        s.theta
            .rows()
            .into_iter()
            .map(|row| {
                let row = row.to_vec();
                unwhitened
                    .iter()
                    .position(|a| a.iter().zip(&row).all(|(x, y)| x.to_bits() == y.to_bits()))
                    .expect("every sample is one stored anchor, bit for bit")
            })
            .collect()
    };
    let first = order_of(7, 0, n);
    let mut sorted = first.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "the first n samples are each anchor once");
    assert_ne!(first, (0..n).collect::<Vec<_>>(), "a seeded order, not storage order");
    assert_eq!(order_of(7, 0, n), first, "same seed, same order");
    assert_ne!(order_of(8, 0, n), first, "another seed, another order");
    // Calls split by first_index continue the same order, and it cycles after n.
    let tail = order_of(7, 5, n + 3);
    assert_eq!(&tail[..n - 5], &first[5..]);
    assert_eq!(&tail[n - 5..], &first[..8]);
}

#[test]
fn start_time_zero_is_the_plain_flow() {
    // On a bundle without anchors the default is 0, and an explicit 0 is bitwise the same.
    let model = open("affine_cls");
    let a = model.sample(8, &opts(2, TraceMode::Exact, None)).unwrap();
    let b = model.sample(8, &opts(2, TraceMode::Exact, Some(0.0))).unwrap();
    assert_eq!(a.theta, b.theta);
    assert_eq!(a.log_density, b.log_density);
    // On the anchored bundle an explicit 0 overrides the default 0.5.
    let model = open("affine_anchored");
    let s = model.sample(4, &opts(2, TraceMode::Exact, Some(0.0))).unwrap();
    let mid = model.sample(4, &opts(2, TraceMode::Exact, Some(T0))).unwrap();
    assert_ne!(s.theta, mid.theta, "t0 = 0 and t0 = 0.5 start from different laws");
}

#[test]
fn start_times_out_of_bounds_or_without_anchors_are_clear_errors() {
    let anchored = open("affine_anchored");
    let plain = open("affine_cls");
    let cases: Vec<(&postflow::Model, SampleOptions, &str)> = vec![
        (&anchored, opts(0, TraceMode::None, Some(1.5)), "start_time must be in [0, 1]"),
        (&anchored, opts(0, TraceMode::None, Some(-0.1)), "start_time must be in [0, 1]"),
        (&anchored, opts(0, TraceMode::None, Some(f64::NAN)), "start_time must be in [0, 1]"),
        (&anchored, opts(0, TraceMode::Exact, Some(1.0)), "no density"),
        (&plain, opts(0, TraceMode::None, Some(0.5)), "has none"),
        // Solver limits hold at every start time, 1 (no integration) included.
        (&anchored, SampleOptions { steps: Some(5_000_000), ..opts(0, TraceMode::None, Some(1.0)) }, "steps 5000000"),
        (
            &anchored,
            SampleOptions { max_steps: 4_000_000_000, ..opts(0, TraceMode::None, Some(1.0)) },
            "max_steps 4000000000 exceeds",
        ),
    ];
    for (model, o, fragment) in cases {
        let e = model.sample(2, &o).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.message().contains(fragment), "{:?} lacks {fragment:?}", e.message());
    }
    let theta = anchored.sample(2, &opts(0, TraceMode::None, Some(1.0))).unwrap().theta;
    let e = anchored.log_prob(theta.view(), &opts(0, TraceMode::Exact, Some(1.0))).unwrap_err();
    assert!(e.message().contains("no density"), "{}", e.message());
}
