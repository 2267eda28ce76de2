//! `Model::predict` through ONNX Runtime on the fixture bundles: BMA of identical
//! samples, chunking, log-weights, and NaN outputs.
mod common;

use ndarray::{s, Array2, Axis};
use postflow::{ErrorKind, PredictOptions, Prediction, SampleOptions};

fn reference(model: &postflow::Model) -> Array2<f32> {
    Array2::from_shape_vec((1, model.weight_dim()), model.tensors().reference_theta.clone()).unwrap()
}

fn predict(model: &postflow::Model, theta: &Array2<f32>, lw: Option<&[f32]>, budget: usize) -> Prediction {
    let x = model.tensors().eval_x.view();
    model.predict(x, theta.view(), lw, &PredictOptions { max_chunk_bytes: budget }).unwrap()
}

/// Largest difference, relative to the magnitude where that exceeds 1.
fn max_diff(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
    assert_eq!(a.dim(), b.dim());
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0.0, f64::max)
}

/// ONNX Runtime's float32 kernels round differently for different batch shapes (another
/// GEMM blocking), so the same net on a block of 1 × 1 and on 16 × 32 (sample × input)
/// gives logits a few f32 ulps apart (seen: 5e-9 in probabilities). Chunked results agree
/// with unchunked ones to f32 precision, not bit for bit.
const F32_TOL: f64 = 1e-6;

/// All arrays of two predictions agree to `tol` (relative above magnitude 1).
fn assert_same(a: &Prediction, b: &Prediction, tol: f64, what: &str) {
    assert!(max_diff(&a.mean(), &b.mean()) <= tol, "{what}: means differ by {:e}", max_diff(&a.mean(), &b.mean()));
    let (ta, aa, ea) = a.decomposition();
    let (tb, ab, eb) = b.decomposition();
    assert!(max_diff(&ta, &tb) <= tol, "{what}: total differs by {:e}", max_diff(&ta, &tb));
    assert!(max_diff(&aa, &ab) <= tol, "{what}: aleatoric differs by {:e}", max_diff(&aa, &ab));
    assert!(max_diff(&ea, &eb) <= tol, "{what}: epistemic differs by {:e}", max_diff(&ea, &eb));
}

#[test]
fn identical_samples_equal_the_single_net() {
    for name in ["affine_cls", "affine_reg", "affine_hetero"] {
        let model = common::open(name);
        let one = reference(&model);
        let five = one.broadcast((5, model.weight_dim())).unwrap().to_owned();
        let single = predict(&model, &one, None, 64 << 20);
        let many = predict(&model, &five, None, 64 << 20);
        assert_same(&single, &many, F32_TOL, name);
        let (total, aleatoric, epistemic) = many.decomposition();
        assert!(epistemic.iter().all(|e| e.abs() <= 1e-12), "{name}: no epistemic part for identical samples");
        assert!(max_diff(&total, &aleatoric) <= 1e-12, "{name}");

        // The single net's prediction is its raw output, transformed by hand.
        let out = model.net_outputs(model.tensors().eval_x.view(), one.view()).unwrap();
        let out = out.index_axis(Axis(0), 0);
        match (&single, name) {
            (Prediction::Classification(p), _) => {
                for (n, z) in out.rows().into_iter().enumerate() {
                    let z: Vec<f64> = z.iter().map(|v| f64::from(*v)).collect();
                    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = z.iter().map(|v| (v - m).exp()).sum();
                    let probs: Vec<f64> = z.iter().map(|v| (v - m).exp() / sum).collect();
                    let h: f64 = -probs.iter().map(|p| p * p.ln()).sum::<f64>();
                    for (c, q) in probs.iter().enumerate() {
                        assert!((p.probs[[n, c]] - q).abs() < 1e-12);
                    }
                    assert!((p.total[n] - h).abs() < 1e-12 && (p.aleatoric[n] - h).abs() < 1e-12);
                }
            }
            (Prediction::Regression(p), "affine_reg") => {
                for (n, row) in out.rows().into_iter().enumerate() {
                    assert_eq!(p.mean[[n, 0]], f64::from(row[0]));
                    assert!((p.aleatoric[[n, 0]] - 0.09).abs() < 1e-12, "σ² = 0.3²");
                }
            }
            (Prediction::Regression(p), _) => {
                for (n, row) in out.rows().into_iter().enumerate() {
                    assert_eq!(p.mean[[n, 0]], f64::from(row[0]));
                    let var = f64::from(row[1]).exp();
                    assert!((p.aleatoric[[n, 0]] - var).abs() <= 1e-12 * var, "exp(log σ²)");
                }
            }
        }
    }
}

#[test]
fn disagreeing_samples_have_epistemic_uncertainty_and_add_up() {
    for name in ["affine_cls", "affine_reg", "affine_hetero"] {
        let model = common::open(name);
        let theta = model.tensors().posterior_theta.clone();
        let p = predict(&model, &theta, None, 64 << 20);
        let (total, aleatoric, epistemic) = p.decomposition();
        assert!(epistemic.iter().all(|e| *e >= 0.0), "{name}");
        assert!(epistemic.iter().any(|e| *e > 1e-6), "{name}: some input has epistemic uncertainty");
        let sum = &aleatoric + &epistemic;
        for (t, s) in total.iter().zip(&sum) {
            assert!((t - s).abs() <= 1e-12 * t.abs().max(1.0), "{name}: total = aleatoric + epistemic");
        }
        assert_eq!(p.ess(), theta.nrows() as f64);
    }
}

#[test]
fn chunked_and_unchunked_agree() {
    for name in ["affine_cls", "affine_reg", "affine_hetero"] {
        let model = common::open(name);
        let theta = model.tensors().posterior_theta.clone();
        let whole = predict(&model, &theta, None, 64 << 20);
        // 1 byte: one sample and one input per call; 700 bytes: uneven blocks of both.
        for budget in [1usize, 700, 4096] {
            let chunked = predict(&model, &theta, None, budget);
            assert_same(&whole, &chunked, F32_TOL, &format!("{name}, budget {budget}"));
        }
    }
    let (s, n) = postflow::predict::block_sizes(16, 32, 17, 2, 2, 700);
    assert!(s < 16 || n < 32, "the 700-byte budget really chunks ({s}, {n})");
    // Counts whose byte estimate would wrap in usize still chunk (to one sample per block here).
    let huge = 1usize << 62;
    assert_eq!(postflow::predict::block_sizes(huge, huge, 17, 2, 10, 64 << 20).0, 1);
}

#[test]
fn log_weights() {
    let model = common::open("affine_cls");
    let theta = model.tensors().posterior_theta.clone();
    let s_count = theta.nrows();
    let uniform = predict(&model, &theta, None, 64 << 20);
    // Equal log-weights (any constant) are the uniform BMA.
    let equal = predict(&model, &theta, Some(&vec![123.0; s_count]), 64 << 20);
    assert_same(&uniform, &equal, 1e-12, "equal log-weights");
    assert!((equal.ess() - s_count as f64).abs() < 1e-9);

    // One dominant sample: exp(−1e4) is 0 in f64, so this is sample 3 alone.
    let mut lw = vec![-1e4f32; s_count];
    lw[3] = 0.0;
    let dominant = predict(&model, &theta, Some(&lw), 64 << 20);
    let alone = predict(&model, &theta.slice(s![3..4, ..]).to_owned(), None, 64 << 20);
    assert_same(&dominant, &alone, 1e-12, "dominant sample");
    assert_eq!(dominant.ess(), 1.0);

    // General weights: the self-normalized weighted mean of per-sample softmaxes, chunked too.
    let lw: Vec<f32> = (0..s_count).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
    let weighted = predict(&model, &theta, Some(&lw), 64 << 20);
    assert_same(&weighted, &predict(&model, &theta, Some(&lw), 1), F32_TOL, "weighted, chunked");
    let max = lw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f64> = lw.iter().map(|l| (f64::from(*l) - f64::from(max)).exp()).collect();
    let wsum: f64 = w.iter().sum();
    let out = model.net_outputs(model.tensors().eval_x.view(), theta.view()).unwrap();
    let probs = weighted.mean();
    for n in 0..probs.nrows() {
        let mut want = [0.0f64; 2];
        for (s, ws) in w.iter().enumerate() {
            let z = out.slice(s![s, n, ..]);
            let m = f64::from(z[0].max(z[1]));
            let e = [f64::from(z[0]) - m, f64::from(z[1]) - m].map(f64::exp);
            for c in 0..2 {
                want[c] += ws / wsum * e[c] / (e[0] + e[1]);
            }
        }
        for c in 0..2 {
            assert!((probs[[n, c]] - want[c]).abs() < 1e-12, "weighted BMA at input {n}");
        }
    }
    let ess = wsum * wsum / w.iter().map(|x| x * x).sum::<f64>();
    assert!((weighted.ess() - ess).abs() < 1e-9 * ess);

    // Wrong count and non-finite log-weights are refused.
    let x = model.tensors().eval_x.view();
    let err = model.predict(x, theta.view(), Some(&[0.0; 3]), &PredictOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let mut bad = vec![0.0f32; s_count];
    bad[5] = f32::NAN;
    let err = model.predict(x, theta.view(), Some(&bad), &PredictOptions::default()).unwrap_err();
    assert!(err.message().contains("[5]"), "{}", err.message());
}

#[test]
fn nan_outputs_name_the_sample() {
    for name in ["affine_cls", "affine_reg", "affine_hetero"] {
        let model = common::open(name);
        let mut theta = model.tensors().posterior_theta.clone();
        // Weights of 1e30: the hidden layer reaches ~1e30, the output ~1e60, which is
        // +-inf in f32, and inf − inf in the sum gives NaN.
        theta.row_mut(2).fill(1e30);
        theta.row_mut(9).fill(-1e30);
        for budget in [64 << 20, 1] {
            let x = model.tensors().eval_x.view();
            let err = model.predict(x, theta.view(), None, &PredictOptions { max_chunk_bytes: budget }).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Numeric, "{name}: {}", err.message());
            assert!(err.message().contains("2 of 16 samples"), "{name}: {}", err.message());
            assert!(err.message().contains("[2, 9]"), "{name}: {}", err.message());
        }
    }
}

#[test]
fn sample_predict_is_sample_then_predict() {
    let model = common::open("affine_hetero");
    let opts = SampleOptions { seed: 11, ..Default::default() };
    let x = model.tensors().eval_x.view();
    let a = model.sample_predict(30, &opts, x, &PredictOptions::default()).unwrap();
    let theta = model.sample(30, &opts).unwrap().theta;
    let b = model.predict(x, theta.view(), None, &PredictOptions::default()).unwrap();
    assert_eq!(a, b);
    let err = model.sample_predict(0, &opts, x, &PredictOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

/// `Model::sample_predict` computes no log-density, as `pf_sample_predict`: a trace request is
/// checked, then ignored, so it neither fails at start time 1 nor changes dopri5's steps.
#[test]
fn sample_predict_ignores_a_valid_trace_request() {
    let model = common::open("affine_anchored");
    let x = model.tensors().eval_x.clone();
    let hutch = postflow::TraceMode::Hutchinson { probes: 1, noise: postflow::ProbeNoise::Rademacher };
    let stored = SampleOptions { seed: 3, start_time: Some(1.0), trace: hutch, ..Default::default() };
    let with_trace = model.sample_predict(8, &stored, x.view(), &PredictOptions::default()).unwrap();
    let plain = SampleOptions { trace: postflow::TraceMode::None, ..stored };
    let without = model.sample_predict(8, &plain, x.view(), &PredictOptions::default()).unwrap();
    assert_eq!(with_trace.mean(), without.mean());
    let adaptive = SampleOptions {
        seed: 3,
        solver: Some(postflow::SolverKind::Dopri5),
        rtol: Some(1e-3),
        atol: Some(1e-3),
        trace: postflow::TraceMode::Exact,
        ..Default::default()
    };
    let a = model.sample_predict(8, &adaptive, x.view(), &PredictOptions::default()).unwrap();
    let plain = SampleOptions { trace: postflow::TraceMode::None, ..adaptive };
    let b = model.sample_predict(8, &plain, x.view(), &PredictOptions::default()).unwrap();
    assert_eq!(a.mean(), b.mean());
    let bad = SampleOptions {
        trace: postflow::TraceMode::Hutchinson { probes: 0, noise: postflow::ProbeNoise::Gaussian },
        ..plain
    };
    assert!(model.sample_predict(8, &bad, x.view(), &PredictOptions::default()).is_err());
}
