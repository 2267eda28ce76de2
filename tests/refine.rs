//! Refinement (format version 3): HMC transitions on the bundle's posterior graph, against
//! the `affine_refine` fixture, whose posterior is the closed-form Gaussian N(μ, diag σ²)
//! (`affine_refine.expected.json`), unrelated to the law of the flow's own samples.
mod common;

use common::{fixture, open};
use postflow::refine::RefineKernel;
use postflow::{ErrorKind, SampleOptions, TraceMode};

struct Target {
    mean: Vec<f64>,
    var: Vec<f64>,
    default_transitions: u32,
}

fn target() -> Target {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("affine_refine.expected.json")).unwrap()).unwrap();
    let vec =
        |x: &serde_json::Value| -> Vec<f64> { x.as_array().unwrap().iter().map(|a| a.as_f64().unwrap()).collect() };
    Target {
        mean: vec(&v["target_mean"]),
        var: vec(&v["target_var"]),
        default_transitions: v["default_transitions"].as_u64().unwrap() as u32,
    }
}

fn moments(theta: &ndarray::Array2<f32>) -> (Vec<f64>, Vec<f64>) {
    let n = theta.nrows() as f64;
    let mean: Vec<f64> =
        theta.columns().into_iter().map(|c| c.iter().map(|v| f64::from(*v)).sum::<f64>() / n).collect();
    let var = theta
        .columns()
        .into_iter()
        .zip(&mean)
        .map(|(c, m)| c.iter().map(|v| (f64::from(*v) - m).powi(2)).sum::<f64>() / (n - 1.0))
        .collect();
    (mean, var)
}

/// Coordinates whose sample mean is more than 5 standard errors from the target's, or whose
/// variance ratio is off by more than 5 of its standard errors (√(2/n)).
fn misfits(theta: &ndarray::Array2<f32>, t: &Target) -> Vec<String> {
    let n = theta.nrows() as f64;
    let (mean, var) = moments(theta);
    let mut bad = Vec::new();
    for i in 0..t.mean.len() {
        let z_mean = (mean[i] - t.mean[i]) / (t.var[i] / n).sqrt();
        let z_var = (var[i] / t.var[i] - 1.0) / (2.0 / n).sqrt();
        if z_mean.abs() > 5.0 || z_var.abs() > 5.0 {
            bad.push(format!(
                "coordinate {i}: mean {:.4} vs {:.4} (z {z_mean:.1}), var ratio {:.4} (z {z_var:.1})",
                mean[i],
                t.mean[i],
                var[i] / t.var[i]
            ));
        }
    }
    bad
}

#[test]
fn transitions_carry_the_flows_samples_to_the_posterior_graphs_law() {
    let model = open("affine_refine");
    let t = target();
    let n = 4000;
    // The flow's own samples (start time 0) are far from N(μ, σ²) ...
    let plain = model
        .sample(n, &SampleOptions { seed: 5, start_time: Some(0.0), refine_transitions: Some(0), ..Default::default() })
        .unwrap();
    assert!(misfits(&plain.theta, &t).len() > 10, "the fixture's flow should not already sample the target");
    // ... and 40 transitions bring them there, coordinate by coordinate.
    let o = SampleOptions { seed: 5, start_time: Some(0.0), refine_transitions: Some(40), ..Default::default() };
    let refined = model.sample(n, &o).unwrap();
    let bad = misfits(&refined.theta, &t);
    assert!(bad.is_empty(), "refined samples do not match the posterior graph's Gaussian:\n{}", bad.join("\n"));
    let stats = refined.refine.unwrap();
    assert_eq!((stats.transitions, stats.proposed), (40, 40 * n as u64));
    // Step 0.4 with the exact inverse mass: most proposals are accepted, not all.
    assert!((0.8..1.0).contains(&stats.acceptance_rate()), "acceptance {}", stats.acceptance_rate());
}

#[test]
fn the_multinomial_kernel_carries_samples_to_the_posterior_graphs_law_and_moves_every_one() {
    let model = open("affine_refine");
    let t = target();
    let n = 4000;
    let o = SampleOptions {
        seed: 5,
        start_time: Some(0.0),
        refine_transitions: Some(40),
        refine_kernel: Some(RefineKernel::Multinomial),
        ..Default::default()
    };
    let refined = model.sample(n, &o).unwrap();
    let bad = misfits(&refined.theta, &t);
    assert!(bad.is_empty(), "multinomial draws do not match the posterior graph's Gaussian:\n{}", bad.join("\n"));
    let stats = refined.refine.unwrap();
    // The fixture's L = 5 leapfrog steps become 3 doublings: 2^3 - 1 = 7 steps.
    assert_eq!((stats.transitions, stats.leapfrog, stats.samples), (40, 7, n as u64));
    // A transition keeps its start only if every doubling's draw fails; the endpoint kernel
    // with the same step keeps it in 10-20 % of transitions (the test above).
    assert!(stats.acceptance_rate() > 0.99, "moved in {} of transitions", stats.acceptance_rate());
    assert_eq!(stats.moved, n as u64);
    // From the stored draws, one transition moves every draw, and `moved` counts the rows that
    // differ from their start (for the endpoint kernel at K = 1: its accepted transitions).
    let stored = SampleOptions { start_time: Some(1.0), refine_transitions: Some(1), ..o };
    let copies = model.sample(200, &SampleOptions { refine_transitions: Some(0), ..stored.clone() }).unwrap().theta;
    let multinomial = model.sample(200, &stored).unwrap();
    let endpoint = model.sample(200, &SampleOptions { refine_kernel: Some(RefineKernel::Endpoint), ..stored }).unwrap();
    let unchanged = |theta: &ndarray::Array2<f32>| {
        theta.rows().into_iter().zip(copies.rows()).filter(|(a, b)| a == b).count() as u64
    };
    assert_eq!(unchanged(&multinomial.theta), 0);
    let e = endpoint.refine.unwrap();
    assert_eq!(unchanged(&endpoint.theta), 200 - e.moved);
    assert_eq!(e.moved, e.accepted);
}

#[test]
fn the_trajectory_length_can_be_chosen_per_call() {
    let model = open("affine_refine");
    let o = SampleOptions { seed: 2, refine_transitions: Some(2), ..Default::default() };
    let bundle = model.sample(8, &o).unwrap();
    assert_eq!(bundle.refine.unwrap().leapfrog, 5);
    let same = model.sample(8, &SampleOptions { refine_leapfrog: Some(5), ..o.clone() }).unwrap();
    assert_eq!(same.theta, bundle.theta);
    let longer = model.sample(8, &SampleOptions { refine_leapfrog: Some(9), ..o.clone() }).unwrap();
    assert_eq!(longer.refine.unwrap().leapfrog, 9);
    assert_ne!(longer.theta, bundle.theta);
    let multinomial =
        SampleOptions { refine_leapfrog: Some(8), refine_kernel: Some(RefineKernel::Multinomial), ..o.clone() };
    assert_eq!(model.sample(8, &multinomial).unwrap().refine.unwrap().leapfrog, 15);
    for bad in [0, 1001] {
        let e = model.sample(8, &SampleOptions { refine_leapfrog: Some(bad), ..o.clone() }).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.message().contains(&format!("refine_leapfrog {bad} is outside [1, 1000]")), "{}", e.message());
    }
}

#[test]
fn the_bundles_default_applies_to_draws_without_a_density_only() {
    let model = open("affine_refine");
    let t = target();
    assert_eq!(model.default_refine_transitions(), t.default_transitions);
    let draws = model.sample(16, &SampleOptions { seed: 1, ..Default::default() }).unwrap();
    assert_eq!(draws.refine.unwrap().transitions, t.default_transitions);
    let explicit = SampleOptions { seed: 1, refine_transitions: Some(t.default_transitions), ..Default::default() };
    assert_eq!(model.sample(16, &explicit).unwrap().theta, draws.theta);
    // Asking for log-densities takes the flow's own samples, the same as refine_transitions 0.
    let with_density =
        model.sample(16, &SampleOptions { seed: 1, trace: TraceMode::Exact, ..Default::default() }).unwrap();
    assert!(with_density.refine.is_none() && with_density.log_density.is_some());
    let unrefined =
        model.sample(16, &SampleOptions { seed: 1, refine_transitions: Some(0), ..Default::default() }).unwrap();
    assert_eq!(with_density.theta, unrefined.theta);
    assert_ne!(unrefined.theta, draws.theta);
}

#[test]
fn refined_samples_do_not_depend_on_batching_or_splitting() {
    for kernel in [RefineKernel::Endpoint, RefineKernel::Multinomial] {
        same_samples_whatever_the_batching(kernel);
    }
}

fn same_samples_whatever_the_batching(kernel: RefineKernel) {
    let model = open("affine_refine");
    let o = SampleOptions { seed: 9, refine_transitions: Some(7), refine_kernel: Some(kernel), ..Default::default() };
    let whole = model.sample(10, &o).unwrap().theta;
    let one_by_one = model.sample(10, &SampleOptions { batch_size: 1, ..o.clone() }).unwrap().theta;
    assert_eq!(whole, one_by_one);
    let tail = model.sample(4, &SampleOptions { first_index: 6, batch_size: 3, ..o.clone() }).unwrap().theta;
    assert_eq!(whole.slice(ndarray::s![6.., ..]), tail);
    // From the stored draws (start time 1) too: each row is refined from its own anchor.
    let stored = SampleOptions { start_time: Some(1.0), ..o };
    let a = model.sample(10, &stored).unwrap().theta;
    let b = model.sample(10, &SampleOptions { batch_size: 4, ..stored.clone() }).unwrap().theta;
    assert_eq!(a, b);
    let copies = model.sample(10, &SampleOptions { refine_transitions: Some(0), ..stored }).unwrap().theta;
    assert_ne!(a, copies);
}

#[test]
fn requests_refinement_cannot_serve_are_refused() {
    let model = open("affine_refine");
    let e = model
        .sample(4, &SampleOptions { refine_transitions: Some(2), trace: TraceMode::Exact, ..Default::default() })
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().contains("no density"), "{}", e.message());
    let e = model.sample(4, &SampleOptions { refine_transitions: Some(10_001), ..Default::default() }).unwrap_err();
    assert!(e.message().contains("refine_transitions 10001"), "{}", e.message());
    // A bundle without refinement: 0 is fine (nothing to do), more is refused.
    let plain = open("affine_anchored");
    assert_eq!(plain.default_refine_transitions(), 0);
    plain.sample(2, &SampleOptions { refine_transitions: Some(0), ..Default::default() }).unwrap();
    let e = plain.sample(2, &SampleOptions { refine_transitions: Some(1), ..Default::default() }).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().contains("needs a bundle with refinement"), "{}", e.message());
}

/// `refine.start_time` (format version 4): refined draws without a start time start there,
/// unrefined ones and draws with a density at `flow.default_start_time`; an explicit start
/// time wins over both.
#[test]
fn refined_sampling_starts_at_the_bundles_refinement_start_time() {
    let (_dir, path) = common::refine_from_stored_draws();
    let model = postflow::Model::open(&path, &postflow::ModelOptions::default()).unwrap();
    let plain = open("affine_refine"); // the same bundle without refine.start_time
    assert_eq!((model.default_start_time(), model.default_refine_start_time()), (0.5, 1.0));
    assert_eq!(plain.default_refine_start_time(), plain.default_start_time());
    let k = model.default_refine_transitions();
    assert!(k > 0);

    let o = SampleOptions { seed: 4, ..Default::default() };
    let refined = model.sample(12, &o).unwrap();
    assert_eq!(refined.refine.as_ref().unwrap().transitions, k);
    assert_eq!(refined.start_time, 1.0, "Samples report the start time they were drawn from");
    let from_stored = SampleOptions { start_time: Some(1.0), refine_transitions: Some(k), ..o.clone() };
    assert_eq!(refined.theta, model.sample(12, &from_stored).unwrap().theta);
    assert_eq!(refined.theta, plain.sample(12, &from_stored).unwrap().theta);
    assert_ne!(refined.theta, plain.sample(12, &o).unwrap().theta, "the plain bundle refines from t0 = 0.5");
    // Explicit start time: the same as the plain bundle's.
    let at_half = SampleOptions { start_time: Some(0.5), ..o.clone() };
    let explicit = model.sample(12, &at_half).unwrap();
    assert_eq!(explicit.theta, plain.sample(12, &o).unwrap().theta);
    assert_eq!((explicit.start_time, plain.sample(12, &o).unwrap().start_time), (0.5, 0.5));
    // Unrefined and density draws keep flow.default_start_time (0.5: not the stored copies).
    let unrefined = model.sample(12, &SampleOptions { refine_transitions: Some(0), ..o.clone() }).unwrap();
    assert_eq!(unrefined.start_time, 0.5);
    let unrefined = unrefined.theta;
    assert_eq!(unrefined, plain.sample(12, &SampleOptions { refine_transitions: Some(0), ..o.clone() }).unwrap().theta);
    let with_density = model.sample(12, &SampleOptions { trace: TraceMode::Exact, ..o }).unwrap();
    assert!(with_density.log_density.is_some());
    assert_eq!((&with_density.theta, with_density.start_time), (&unrefined, 0.5));
}
