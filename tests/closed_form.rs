//! Sampling and log-densities against the closed form: the affine fixtures'
//! flows v(t, x) = A x + b + t c push N(0, I) to an exactly known Gaussian.
mod common;

use common::{open, Expected};
use ndarray::Array2;
use postflow::{ProbeNoise, SampleOptions, SolverKind, TraceMode};

fn opts(seed: u64, trace: TraceMode) -> SampleOptions {
    SampleOptions { seed, trace, ..SampleOptions::default() }
}

#[test]
fn exact_trace_log_density_matches_closed_form() {
    for name in ["affine_cls", "affine_reg", "affine_hetero"] {
        let model = open(name);
        let exp = Expected::load(name);
        let s = model.sample(64, &opts(1, TraceMode::Exact)).unwrap();
        let logd = s.log_density.as_ref().unwrap();
        let mut worst: f64 = 0.0;
        for (i, row) in s.theta.rows().into_iter().enumerate() {
            let exact = exp.log_density(row.as_slice().unwrap());
            worst = worst.max((f64::from(logd[i]) - exact).abs());
        }
        assert!(worst < 1e-4, "{name}: worst |log q − exact| = {worst:e}");
        println!("{name}: exact-trace max abs error {worst:e}");
    }
}

#[test]
fn log_prob_of_closed_form_points() {
    let model = open("affine_cls");
    let exp = Expected::load("affine_cls");
    let d = exp.d;
    let theta =
        Array2::from_shape_vec((exp.points.len(), d), exp.points.iter().flat_map(|p| p.0.clone()).collect()).unwrap();
    let lp = model.log_prob(theta.view(), &opts(0, TraceMode::Exact)).unwrap();
    for (i, (_, want)) in exp.points.iter().enumerate() {
        let got = f64::from(lp.log_density[i]);
        assert!((got - want).abs() < 1e-4, "point {i}: {got} vs {want}");
    }
}

#[test]
fn sample_mean_and_covariance_match_closed_form() {
    let model = open("affine_cls");
    let exp = Expected::load("affine_cls");
    let n = 4000;
    let s = model.sample(n, &opts(7, TraceMode::None)).unwrap();
    let d = exp.d;
    let theta = s.theta.mapv(f64::from);
    let mean = theta.mean_axis(ndarray::Axis(0)).unwrap();
    for i in 0..d {
        let se = (exp.cov[i][i] / n as f64).sqrt();
        assert!((mean[i] - exp.mean[i]).abs() < 4.5 * se, "mean[{i}] {} vs {} (se {se})", mean[i], exp.mean[i]);
    }
    let centered = &theta - &mean;
    let cov = centered.t().dot(&centered) / (n as f64 - 1.0);
    // Each covariance entry's sampling sd is sqrt((Σii Σjj + Σij²)/n).
    for i in 0..d {
        for j in 0..d {
            let sd = ((exp.cov[i][i] * exp.cov[j][j] + exp.cov[i][j].powi(2)) / n as f64).sqrt();
            assert!(
                (cov[[i, j]] - exp.cov[i][j]).abs() < 5.0 * sd,
                "cov[{i},{j}] {} vs {} (sd {sd})",
                cov[[i, j]],
                exp.cov[i][j]
            );
        }
    }
}

/// Errors of Hutchinson estimates against the exact log-density: (mean, sd, mean reported stderr).
fn hutchinson_errors(probes: u32, noise: ProbeNoise, n: usize) -> (f64, f64, f64) {
    let model = open("affine_cls");
    let exp = Expected::load("affine_cls");
    let s = model.sample(n, &opts(11, TraceMode::Hutchinson { probes, noise })).unwrap();
    let logd = s.log_density.unwrap();
    let errs: Vec<f64> = s
        .theta
        .rows()
        .into_iter()
        .zip(&logd)
        .map(|(r, l)| f64::from(*l) - exp.log_density(r.as_slice().unwrap()))
        .collect();
    let mean = errs.iter().sum::<f64>() / n as f64;
    let sd = (errs.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0)).sqrt();
    let reported =
        s.log_density_stderr.map(|se| se.iter().map(|v| f64::from(*v)).sum::<f64>() / n as f64).unwrap_or(0.0);
    (mean, sd, reported)
}

#[test]
fn hutchinson_is_unbiased_and_its_error_shrinks_like_one_over_sqrt_k() {
    let n = 2000;
    let (m1, sd1, _) = hutchinson_errors(1, ProbeNoise::Rademacher, n);
    assert!(sd1 > 0.05, "Hutchinson with K = 1 should be noisy here, sd {sd1}");
    assert!(m1.abs() < 3.0 * sd1 / (n as f64).sqrt(), "bias {m1} vs se {}", sd1 / (n as f64).sqrt());
    let (m16, sd16, reported16) = hutchinson_errors(16, ProbeNoise::Rademacher, n);
    assert!(m16.abs() < 3.0 * sd16 / (n as f64).sqrt(), "K=16 bias {m16}");
    let ratio = sd1 / sd16;
    assert!((3.2..4.8).contains(&ratio), "sd ratio K=1/K=16 is {ratio}, expected about 4");
    // The reported standard error estimates the actual spread (on average).
    assert!((reported16 / sd16 - 1.0).abs() < 0.3, "reported se {reported16} vs empirical {sd16}");
    let (mg, sdg, _) = hutchinson_errors(1, ProbeNoise::Gaussian, n);
    assert!(mg.abs() < 3.0 * sdg / (n as f64).sqrt(), "gaussian-probe bias {mg}");
}

#[test]
fn log_prob_of_a_sample_equals_its_reported_log_density() {
    let model = open("affine_reg");
    for trace in [TraceMode::Exact, TraceMode::Hutchinson { probes: 3, noise: ProbeNoise::Rademacher }] {
        let o = opts(5, trace);
        let s = model.sample(20, &o).unwrap();
        let lp = model.log_prob(s.theta.view(), &o).unwrap();
        for (i, (a, b)) in s.log_density.unwrap().iter().zip(&lp.log_density).enumerate() {
            assert!((a - b).abs() < 1e-3, "{trace:?} sample {i}: drawn {a} vs log_prob {b}");
        }
    }
}

#[test]
fn same_seed_same_samples_and_batch_size_does_not_matter() {
    let model = open("affine_cls");
    let trace = TraceMode::Hutchinson { probes: 2, noise: ProbeNoise::Rademacher };
    let a = model.sample(37, &SampleOptions { batch_size: 8, ..opts(3, trace) }).unwrap();
    let b = model.sample(37, &SampleOptions { batch_size: 8, ..opts(3, trace) }).unwrap();
    assert_eq!(a.theta, b.theta, "same seed and batch size must be bitwise identical");
    assert_eq!(a.log_density, b.log_density);
    for bs in [1, 5, 128] {
        let c = model.sample(37, &SampleOptions { batch_size: bs, ..opts(3, trace) }).unwrap();
        let diff = (&a.theta - &c.theta).iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(diff < 1e-5, "batch {bs}: max theta difference {diff}");
        for (x, y) in a.log_density.as_ref().unwrap().iter().zip(c.log_density.as_ref().unwrap()) {
            assert!((x - y).abs() < 1e-4 * x.abs().max(1.0), "batch {bs}: {x} vs {y}");
        }
    }
    // A longer run starts with the same samples: sample i depends only on (seed, i).
    let longer = model.sample(50, &SampleOptions { batch_size: 8, ..opts(3, trace) }).unwrap();
    assert_eq!(longer.theta.slice(ndarray::s![..37, ..]), a.theta);
    let other = model.sample(37, &SampleOptions { batch_size: 8, ..opts(4, trace) }).unwrap();
    assert_ne!(other.theta, a.theta);
}

#[test]
fn every_solver_reaches_the_closed_form() {
    let model = open("affine_cls");
    let exp = Expected::load("affine_cls");
    for (kind, steps, tol) in [
        (SolverKind::Euler, 400, 0.2),
        (SolverKind::Heun, 64, 2e-2),
        (SolverKind::Rk4, 32, 1e-4),
        (SolverKind::Dopri5, 0, 1e-3),
    ] {
        let o = SampleOptions {
            solver: Some(kind),
            steps: (steps > 0).then_some(steps),
            rtol: Some(1e-6),
            atol: Some(1e-6),
            ..opts(2, TraceMode::Exact)
        };
        let s = model.sample(16, &o).unwrap();
        assert!(s.stats.nfe > 0);
        let logd = s.log_density.unwrap();
        let worst = s
            .theta
            .rows()
            .into_iter()
            .zip(&logd)
            .map(|(r, l)| (f64::from(*l) - exp.log_density(r.as_slice().unwrap())).abs())
            .fold(0.0, f64::max);
        assert!(worst < tol, "{kind:?}: worst error {worst:e} (nfe {})", s.stats.nfe);
    }
}
