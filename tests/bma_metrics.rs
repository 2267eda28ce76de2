//! BMA accumulators and metrics: properties, hand-computed values, and an
//! independent numpy computation (tests/fixtures/metrics/cases.json).
use ndarray::{array, s, Array1, Array2, Array3, ArrayView3, Axis};
use postflow::bma::{
    bma_classification, bma_regression, ClassificationAccumulator, ClassificationPrediction, Noise,
    RegressionAccumulator, RegressionPrediction, SampleWeights,
};
use postflow::metrics::{
    accuracy, agreement, brier, ece, gaussian_mixture_nll, gaussian_nll, interval_coverage, nll, nll_from_logits,
    normal_quantile, reliability_bins, rmse, total_variation, ClassificationMetrics, RegressionMetrics, ECE_BINS,
};
use postflow::ErrorKind;
use serde_json::Value;

// ------------------------------------------------------------------ helpers

/// Deterministic pseudo-random values in [-scale, scale) (xorshift64*), enough for test data.
fn pseudo(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let u = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * u - 1.0) * scale
        })
        .collect()
}

fn random3(shape: (usize, usize, usize), seed: u64, scale: f32) -> Array3<f32> {
    Array3::from_shape_vec(shape, pseudo(shape.0 * shape.1 * shape.2, seed, scale)).unwrap()
}

/// Softmax of one net's logits `[N,C]`, in f64.
fn softmax(logits: ndarray::ArrayView2<f32>) -> Array2<f64> {
    let mut p = logits.mapv(f64::from);
    for mut row in p.rows_mut() {
        let max = row.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        row /= sum;
    }
    p
}

fn max_abs_diff<D: ndarray::Dimension>(a: &ndarray::Array<f64, D>, b: &ndarray::Array<f64, D>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// A tiling of `[0,S) × [0,N)` into blocks `(samples, inputs)`.
type Blocks = Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>;

fn split(len: usize, sizes: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for &size in sizes.iter().cycle() {
        if start >= len {
            break;
        }
        let end = (start + size).min(len);
        out.push(start..end);
        start = end;
    }
    out
}

fn grid(s: usize, n: usize, s_sizes: &[usize], n_sizes: &[usize]) -> Blocks {
    let mut blocks = Vec::new();
    for rs in split(s, s_sizes) {
        for rn in split(n, n_sizes) {
            blocks.push((rs.clone(), rn));
        }
    }
    blocks
}

/// Not a grid: sample `i` is cut at input `(3i + 1) mod N`, so no two rows share a split.
fn ragged(s: usize, n: usize) -> Blocks {
    let mut blocks = Vec::new();
    for i in 0..s {
        let cut = (3 * i + 1) % n;
        blocks.push((i..i + 1, cut..n));
        if cut > 0 {
            blocks.push((i..i + 1, 0..cut));
        }
    }
    blocks
}

/// The same blocks in forward, reversed, and a strided order.
fn orders(blocks: &Blocks) -> Vec<Blocks> {
    let forward = blocks.clone();
    let reversed: Blocks = blocks.iter().rev().cloned().collect();
    let len = blocks.len();
    let stride = (1..len.max(2)).rev().find(|k| gcd(*k, len) == 1).unwrap_or(1);
    let strided: Blocks = (0..len).map(|i| blocks[(i * stride) % len].clone()).collect();
    vec![forward, reversed, strided]
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn tilings(s: usize, n: usize) -> Vec<Blocks> {
    let mut all = Vec::new();
    for blocks in [
        grid(s, n, &[s], &[n]),
        grid(s, n, &[1], &[1]),
        grid(s, n, &[2, 3], &[4]),
        grid(s, n, &[s], &[1, 5]),
        grid(s, n, &[3], &[n]),
        ragged(s, n),
    ] {
        all.extend(orders(&blocks));
    }
    all
}

fn classify_chunked(logits: ArrayView3<f32>, weights: &SampleWeights, blocks: &Blocks) -> ClassificationPrediction {
    let (_, n, c) = logits.dim();
    let mut acc = ClassificationAccumulator::new(n, c, weights.clone()).unwrap();
    for (rs, rn) in blocks {
        acc.add(rs.start, rn.start, logits.slice(s![rs.clone(), rn.clone(), ..])).unwrap();
    }
    acc.finish().unwrap()
}

fn regress_chunked(
    out: ArrayView3<f32>,
    k: usize,
    noise: Noise,
    weights: &SampleWeights,
    blocks: &Blocks,
) -> RegressionPrediction {
    let n = out.dim().1;
    let mut acc = RegressionAccumulator::new(n, k, noise, weights.clone()).unwrap();
    for (rs, rn) in blocks {
        acc.add(rs.start, rn.start, out.slice(s![rs.clone(), rn.clone(), ..])).unwrap();
    }
    acc.finish().unwrap()
}

// --------------------------------------------------------- BMA: classification

#[test]
fn identical_samples_equal_the_single_net() {
    let net = random3((1, 9, 4), 1, 4.0);
    let logits = net.broadcast((6, 9, 4)).unwrap().to_owned();
    let p = bma_classification(logits.view(), SampleWeights::uniform(6).unwrap()).unwrap();
    let single = softmax(net.index_axis(Axis(0), 0));
    assert!(max_abs_diff(&p.probs, &single) < 1e-12);
    assert!(p.epistemic.iter().all(|&mi| (0.0..=1e-6).contains(&mi)), "{:?}", p.epistemic);
    // Entropy of the single net's softmax, computed directly.
    let h: Array1<f64> = single.rows().into_iter().map(|r| -r.iter().map(|&q| q * q.ln()).sum::<f64>()).collect();
    assert!(max_abs_diff(&p.total, &h) < 1e-12);
    assert!(max_abs_diff(&p.aleatoric, &h) < 1e-12);
}

#[test]
fn disagreeing_samples_have_positive_mutual_information() {
    // Two confident nets that disagree: p ≈ [1,0] and [0,1], so p̄ = [½,½],
    // total ≈ ln 2, aleatoric ≈ 0, and the mutual information ≈ ln 2.
    let logits = array![[[20.0f32, 0.0]], [[0.0, 20.0]]];
    let p = bma_classification(logits.view(), SampleWeights::uniform(2).unwrap()).unwrap();
    assert!((p.epistemic[0] - 2f64.ln()).abs() < 1e-6, "{}", p.epistemic[0]);
    // And on random nets: MI > 0 on every input.
    let logits = random3((5, 12, 3), 2, 3.0);
    let p = bma_classification(logits.view(), SampleWeights::uniform(5).unwrap()).unwrap();
    assert!(p.epistemic.iter().all(|&mi| mi > 1e-4), "{:?}", p.epistemic);
}

#[test]
fn entropy_decomposition_adds_up() {
    let logits = random3((7, 30, 5), 3, 6.0);
    let weights =
        SampleWeights::from_log_weights(&pseudo(7, 4, 2.0).iter().map(|&v| v as f64).collect::<Vec<_>>()).unwrap();
    let p = bma_classification(logits.view(), weights).unwrap();
    let sum = &p.aleatoric + &p.epistemic;
    assert!(max_abs_diff(&p.total, &sum) < 1e-12);
    // Rows of p̄ are distributions.
    assert!(p.probs.rows().into_iter().all(|r| (r.sum() - 1.0).abs() < 1e-12));
}

#[test]
fn chunked_classification_matches_unchunked() {
    let (s, n, c) = (7, 11, 4);
    let logits = random3((s, n, c), 5, 5.0);
    let lw: Vec<f64> = pseudo(s, 6, 1.0).iter().map(|&v| f64::from(v)).collect();
    let weights = SampleWeights::from_log_weights(&lw).unwrap();
    let whole = bma_classification(logits.view(), weights.clone()).unwrap();
    for blocks in tilings(s, n) {
        let p = classify_chunked(logits.view(), &weights, &blocks);
        // Only the summation order differs (f64): far below the 1e-6 the issue asks for.
        assert!(max_abs_diff(&p.probs, &whole.probs) < 1e-12, "{blocks:?}");
        for (a, b) in [(&p.total, &whole.total), (&p.aleatoric, &whole.aleatoric), (&p.epistemic, &whole.epistemic)] {
            assert!(max_abs_diff(a, b) < 1e-12, "{blocks:?}");
        }
    }
}

#[test]
fn concentrated_weights_reproduce_one_sample() {
    let logits = random3((4, 6, 3), 7, 4.0);
    for (lw, exact) in [([-1000.0, -1000.0, 0.0, -1000.0], true), ([-60.0, -60.0, 0.0, -60.0], false)] {
        let w = SampleWeights::from_log_weights(&lw).unwrap();
        let p = bma_classification(logits.view(), w.clone()).unwrap();
        let single = softmax(logits.index_axis(Axis(0), 2));
        // e^-60 ≈ 9e-27 of weight elsewhere moves nothing visible in f64.
        assert!(max_abs_diff(&p.probs, &single) < 1e-12);
        assert!(p.epistemic.iter().all(|&mi| mi <= 1e-12));
        if exact {
            assert_eq!(w.as_slice(), &[0.0, 0.0, 1.0, 0.0]);
            assert_eq!(p.ess, 1.0);
        }
        assert!((p.ess - 1.0).abs() < 1e-12);
    }
}

#[test]
fn ess_of_uniform_weights_is_s() {
    assert_eq!(SampleWeights::uniform(37).unwrap().ess(), 37.0);
    let w = SampleWeights::from_log_weights(&[-3.5; 37]).unwrap();
    assert!((w.ess() - 37.0).abs() < 1e-9, "{}", w.ess());
    assert!(w.as_slice().iter().all(|&x| (x - 1.0 / 37.0).abs() < 1e-15));
    // Two samples with weights ⅓, ⅔: ESS = 1 / (1/9 + 4/9) = 9/5.
    let w = SampleWeights::from_log_weights(&[0.0, 2f64.ln()]).unwrap();
    assert!((w.ess() - 1.8).abs() < 1e-12);
}

#[test]
fn non_finite_logits_name_the_samples() {
    let mut logits = random3((15, 4, 3), 8, 2.0);
    // 12 bad samples: every one except 0, 7 and 14, with NaN, +Inf or -Inf.
    let bad: Vec<usize> = (0..15).filter(|i| ![0, 7, 14].contains(i)).collect();
    for (j, &i) in bad.iter().enumerate() {
        logits[[i, j % 4, j % 3]] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][j % 3];
    }
    let mut acc = ClassificationAccumulator::new(4, 3, SampleWeights::uniform(15).unwrap()).unwrap();
    for (rs, rn) in grid(15, 4, &[4], &[3]) {
        acc.add(rs.start, rn.start, logits.slice(s![rs, rn, ..])).unwrap();
    }
    assert_eq!(acc.non_finite_samples(), bad);
    let err = acc.finish().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Numeric);
    let msg = err.message();
    assert!(msg.contains("12 of 15 samples"), "{msg}");
    assert!(msg.contains("[1, 2, 3, 4, 5, 6, 8, 9, 10, 11, … (2 more)]"), "{msg}");
}

#[test]
fn coverage_must_be_exact() {
    let logits = random3((3, 5, 2), 9, 1.0);
    let weights = SampleWeights::uniform(3).unwrap();
    // A missing block: finish refuses, naming the gap.
    let mut acc = ClassificationAccumulator::new(5, 2, weights.clone()).unwrap();
    acc.add(0, 0, logits.slice(s![.., ..2, ..])).unwrap();
    acc.add(0, 2, logits.slice(s![..2, 2.., ..])).unwrap();
    let err = acc.finish().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.message().contains("3 of 15"), "{}", err.message());
    assert!(err.message().contains("sample 2, inputs 2..5"), "{}", err.message());
    // A cell added twice: refused at once, and the accumulator is unchanged.
    let mut acc = ClassificationAccumulator::new(5, 2, weights.clone()).unwrap();
    acc.add(0, 0, logits.slice(s![.., ..3, ..])).unwrap();
    let err = acc.add(1, 2, logits.slice(s![1..2, 2..4, ..])).unwrap_err();
    assert!(err.message().contains("added twice"), "{}", err.message());
    acc.add(0, 3, logits.slice(s![.., 3.., ..])).unwrap();
    let p = acc.finish().unwrap();
    let whole = bma_classification(logits.view(), weights).unwrap();
    assert!(max_abs_diff(&p.probs, &whole.probs) < 1e-12);
}

#[test]
fn shape_mismatches_name_expected_and_got() {
    let mut acc = ClassificationAccumulator::new(5, 3, SampleWeights::uniform(2).unwrap()).unwrap();
    let err = acc.add(0, 0, Array3::<f32>::zeros((2, 5, 4)).view()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.message().contains("4, expected 3"), "{}", err.message());
    let err = acc.add(1, 0, Array3::<f32>::zeros((2, 5, 3)).view()).unwrap_err();
    assert!(err.message().contains("samples 1..3 but there are 2"), "{}", err.message());
    let err = acc.add(0, 4, Array3::<f32>::zeros((2, 2, 3)).view()).unwrap_err();
    assert!(err.message().contains("inputs 4..6 but there are 5"), "{}", err.message());
    let mut acc = RegressionAccumulator::new(5, 2, Noise::Heteroscedastic, SampleWeights::uniform(2).unwrap()).unwrap();
    let err = acc.add(0, 0, Array3::<f32>::zeros((2, 5, 2)).view()).unwrap_err();
    assert!(err.message().contains("2, expected 4"), "{}", err.message());
}

// ------------------------------------------------------------- BMA: regression

#[test]
fn identical_regression_samples_have_no_epistemic_variance() {
    let net = random3((1, 8, 4), 10, 3.0); // heteroscedastic, k = 2: mean then log σ²
    let out = net.broadcast((5, 8, 4)).unwrap().to_owned();
    let p = bma_regression(out.view(), Noise::Heteroscedastic, SampleWeights::uniform(5).unwrap()).unwrap();
    let mean = net.slice(s![0, .., ..2]).mapv(f64::from);
    let var = net.slice(s![0, .., 2..]).mapv(|v| f64::from(v).exp());
    assert!(max_abs_diff(&p.mean, &mean) < 1e-12);
    assert!(p.epistemic.iter().all(|&v| v.abs() < 1e-12), "{:?}", p.epistemic);
    assert!(max_abs_diff(&p.aleatoric, &var) < 1e-12);
    let p = bma_regression(
        net.slice(s![.., .., ..2]),
        Noise::Homoscedastic { sigma: 0.5 },
        SampleWeights::uniform(1).unwrap(),
    )
    .unwrap();
    assert!(p.aleatoric.iter().all(|&v| v == 0.25));
}

#[test]
fn heteroscedastic_aleatoric_is_mean_exp_log_variance() {
    // Two samples, one input, k = 1: means 1, 3; log σ² = ln 2, ln 4.
    // mean = 2, aleatoric = (2 + 4)/2 = 3, epistemic = ((1−2)² + (3−2)²)/2 = 1, total = 4.
    let out = array![[[1.0f32, 2f32.ln()]], [[3.0, 4f32.ln()]]];
    let p = bma_regression(out.view(), Noise::Heteroscedastic, SampleWeights::uniform(2).unwrap()).unwrap();
    assert!((p.mean[[0, 0]] - 2.0).abs() < 1e-12);
    assert!((p.aleatoric[[0, 0]] - 3.0).abs() < 1e-6); // ln 2, ln 4 rounded to f32
    assert!((p.epistemic[[0, 0]] - 1.0).abs() < 1e-12);
    assert!((p.total[[0, 0]] - p.aleatoric[[0, 0]] - 1.0).abs() < 1e-12);
    // Weighted: w = (¼, ¾) → mean 2.5, aleatoric ½ + 3 = 3.5, epistemic ¼·2.25 + ¾·0.25 = 0.75.
    let w = SampleWeights::from_log_weights(&[0.0, 3f64.ln()]).unwrap();
    let p = bma_regression(out.view(), Noise::Heteroscedastic, w).unwrap();
    assert!((p.mean[[0, 0]] - 2.5).abs() < 1e-12);
    assert!((p.aleatoric[[0, 0]] - 3.5).abs() < 1e-6);
    assert!((p.epistemic[[0, 0]] - 0.75).abs() < 1e-12);
}

#[test]
fn chunked_regression_matches_unchunked() {
    let (s, n, k) = (6, 9, 2);
    let out = random3((s, n, 2 * k), 11, 2.0);
    let lw: Vec<f64> = pseudo(s, 12, 1.0).iter().map(|&v| f64::from(v)).collect();
    let weights = SampleWeights::from_log_weights(&lw).unwrap();
    let whole = bma_regression(out.view(), Noise::Heteroscedastic, weights.clone()).unwrap();
    for blocks in tilings(s, n) {
        let p = regress_chunked(out.view(), k, Noise::Heteroscedastic, &weights, &blocks);
        for (a, b) in [
            (&p.mean, &whole.mean),
            (&p.aleatoric, &whole.aleatoric),
            (&p.epistemic, &whole.epistemic),
            (&p.total, &whole.total),
        ] {
            assert!(max_abs_diff(a, b) < 1e-12, "{blocks:?}");
        }
    }
}

#[test]
fn non_finite_regression_outputs_are_refused() {
    let mut out = random3((4, 3, 1), 13, 1.0);
    out[[2, 1, 0]] = f32::NAN;
    let err = bma_regression(out.view(), Noise::Homoscedastic { sigma: 1.0 }, SampleWeights::uniform(4).unwrap())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Numeric);
    assert!(err.message().contains("1 of 4 samples") && err.message().contains("[2]"), "{}", err.message());
}

// ------------------------------------------------------- metrics: by hand

/// Four inputs, three classes. Top labels (lowest index on ties): 0, 1, 2, 0.
fn hand_probs() -> (Array2<f64>, Vec<i64>, Array2<f64>) {
    let p = array![[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5], [0.4, 0.4, 0.2]];
    let y = vec![0i64, 2, 2, 1];
    let q = array![[0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.5, 0.3, 0.2]];
    (p, y, q)
}

#[test]
fn classification_metrics_by_hand() {
    let (p, y, q) = hand_probs();
    // Correct: inputs 0 and 2 (input 3's tie 0.4/0.4 goes to class 0, label 1) → 2/4.
    assert_eq!(accuracy(&p, &y).unwrap(), 0.5);
    // −(ln .7 + ln .3 + ln .5 + ln .4)/4 = (0.356675 + 1.203973 + 0.693147 + 0.916291)/4 = 0.792521.
    assert!((nll(&p, &y).unwrap() - 0.792_521_4).abs() < 1e-6);
    // Σ_c (p − onehot)²: 0.09+0.04+0.01 = 0.14; 0.01+0.36+0.49 = 0.86; 0.0625+0.0625+0.25 = 0.375;
    // 0.16+0.36+0.04 = 0.56; mean = 1.935/4 = 0.48375.
    assert!((brier(&p, &y).unwrap() - 0.48375).abs() < 1e-12);
    // Top labels 0,1,2,0 vs reference 1,1,2,0 → 3/4.
    assert_eq!(agreement(&p, &q).unwrap(), 0.75);
    // ½ Σ|p−q| per row: ½(.6+.6+0) = .6; ½(.1+.1+0) = .1; ½(.05+.05+.1) = .1; ½(.1+.1+0) = .1 → 0.9/4.
    assert!((total_variation(&p, &q).unwrap() - 0.225).abs() < 1e-12);
    // A zero probability on the true label is +inf, not clipped.
    assert_eq!(nll(&array![[1.0, 0.0]], &[1i64]).unwrap(), f64::INFINITY);
}

#[test]
fn ece_bins_by_hand() {
    let (p, y, _) = hand_probs();
    // Confidences .7 (correct), .6 (wrong), .5 (correct), .4 (wrong). Bins are (i/15, (i+1)/15]:
    // .7 ∈ (10/15, 11/15] → bin 10; .6 = 9/15 exactly → bin 8 (right-closed);
    // .5 ∈ (7/15, 8/15] → bin 7; .4 = 6/15 exactly → bin 5.
    // ECE = (|1−.7| + |0−.6| + |1−.5| + |0−.4|)/4 = 1.8/4 = 0.45.
    assert!((ece(&p, &y, ECE_BINS).unwrap() - 0.45).abs() < 1e-12);
    let bins = reliability_bins(&p, &y, ECE_BINS).unwrap();
    let occupied: Vec<(usize, usize, f64, f64)> = bins
        .iter()
        .enumerate()
        .filter(|(_, b)| b.count > 0)
        .map(|(i, b)| (i, b.count, b.confidence, b.accuracy))
        .collect();
    assert_eq!(occupied, vec![(5, 1, 0.4, 0.0), (7, 1, 0.5, 1.0), (8, 1, 0.6, 0.0), (10, 1, 0.7, 1.0)]);
    assert_eq!((bins[0].lower, bins[14].upper), (0.0, 1.0));

    // Shared bins, and the ends: confidences 0.95 (correct), 0.99 (wrong), 1.0 (correct) all in
    // bin 14 (14/15 = 0.9333…): acc 2/3, conf 0.98 → |2/3 − 0.98| = 0.313333…, weight 3/4;
    // an all-zero row has confidence 0 → bin 0, top label 0, correct: |1 − 0| weight 1/4.
    // ECE = 0.75·0.3133333 + 0.25·1 = 0.485.
    let p = array![[0.95, 0.05], [0.01, 0.99], [1.0, 0.0], [0.0, 0.0]];
    let y = [0usize, 0, 0, 0];
    let bins = reliability_bins(&p, &y, ECE_BINS).unwrap();
    assert_eq!((bins[14].count, bins[0].count), (3, 1));
    assert!((bins[14].confidence - 0.98).abs() < 1e-12 && (bins[14].accuracy - 2.0 / 3.0).abs() < 1e-12);
    assert!((ece(&p, &y, ECE_BINS).unwrap() - 0.485).abs() < 1e-12);
}

#[test]
fn nll_from_logits_by_hand() {
    // softmax([0, ln 3]) = [¼, ¾]: −ln ¾ = 0.287682; uniform over 3: ln 3 = 1.098612;
    // [1000, 0] with label 1: −(0 − 1000 − ln(1 + e^-1000)) = 1000 (a naive exp overflows).
    let logits = array![[0.0, 3f64.ln(), -1e300], [0.0, 0.0, 0.0], [1000.0, 0.0, 0.0]];
    let want = (-(0.75f64.ln()) + 3f64.ln() + (1000.0 + (1.0 + 2.0 * (-1000f64).exp()).ln())) / 3.0;
    let got = nll_from_logits(&logits, &[1u32, 2, 1]).unwrap();
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    assert!((got - (0.287_682_1 + 1.098_612_3 + 1000.0) / 3.0).abs() < 1e-6);
}

#[test]
fn classification_metric_errors() {
    let (p, _, _) = hand_probs();
    let err = accuracy(&p, &[0i64, 1, 3, 0]).unwrap_err();
    assert!(err.message().contains("label 3 of input 2"), "{}", err.message());
    assert!(nll(&p, &[0i64, -1, 0, 0]).unwrap_err().message().contains("label -1"));
    assert!(brier(&p, &[0i64, 1]).unwrap_err().message().contains("expected 4 labels"));
    let err = agreement(&p, &Array2::<f64>::zeros((4, 2))).unwrap_err();
    assert!(err.message().contains("[4, 2]") && err.message().contains("[4, 3]"), "{}", err.message());
    assert!(ece(&array![[f64::NAN, 0.5]], &[0i64], 15).is_err());
    assert!(accuracy(&Array2::<f32>::zeros((0, 3)), &Vec::<i64>::new()).is_err());
}

#[test]
fn classification_metrics_struct_serializes() {
    let (p, y, q) = hand_probs();
    let m = ClassificationMetrics::compute(&p, &y, Some(q.view())).unwrap();
    assert_eq!((m.accuracy, m.agreement), (0.5, Some(0.75)));
    assert!((m.ece - 0.45).abs() < 1e-12 && (m.tv.unwrap() - 0.225).abs() < 1e-12);
    let json = serde_json::to_value(m).unwrap();
    for key in ["accuracy", "nll", "ece", "brier", "agreement", "tv"] {
        assert!(json.get(key).is_some_and(Value::is_f64), "{key} in {json}");
    }
    let m = ClassificationMetrics::compute(&p.mapv(|v| v as f32), &y, None::<ndarray::ArrayView2<f32>>).unwrap();
    let json = serde_json::to_value(m).unwrap();
    assert!(json.get("agreement").is_none() && json.get("tv").is_none(), "{json}");
}

#[test]
fn regression_metrics_by_hand() {
    let mean = array![[1.0], [2.0], [3.0]];
    let y = array![[1.5], [2.0], [1.0]];
    let var = array![[1.0], [4.0], [0.25]];
    // Residuals .5, 0, −2: rmse = sqrt((0.25 + 0 + 4)/3) = sqrt(1.416667) = 1.190238.
    assert!((rmse(&mean, &y).unwrap() - 1.190_238_1).abs() < 1e-6);
    // ½ln(2π·1) + .25/2 = 1.043939; ½ln(2π·4) + 0 = 1.612086; ½ln(2π·.25) + 4/.5 = 8.225791;
    // mean = 10.881816/3 = 3.627272.
    assert!((gaussian_nll(&mean, &var, &y).unwrap() - 3.627_272).abs() < 1e-6);
    // |r| vs zσ: z(0.9) = 1.644854 → .5 ≤ 1.64, 0 ≤ 3.29, 2 > 0.82 → 2/3;
    // z(0.3) = 0.385320 → .5 > 0.385, 0 ≤ 0.77, 2 > 0.19 → 1/3.
    assert!((interval_coverage(&mean, &var, &y, 0.9).unwrap() - 2.0 / 3.0).abs() < 1e-15);
    assert!((interval_coverage(&mean, &var, &y, 0.3).unwrap() - 1.0 / 3.0).abs() < 1e-15);
    assert!(interval_coverage(&mean, &var, &y, 1.0).is_err());
    assert!(gaussian_nll(&mean, &array![[1.0], [0.0], [1.0]], &y).is_err());
    let err = rmse(&mean, &array![[1.0, 2.0]]).unwrap_err();
    assert!(err.message().contains("[1, 2]") && err.message().contains("[3, 1]"), "{}", err.message());

    let m = RegressionMetrics::compute(&mean, &var, &y).unwrap();
    assert_eq!(m.coverage90, 2.0 / 3.0);
    let json = serde_json::to_value(m).unwrap();
    assert!(["rmse", "nll", "coverage90"].iter().all(|k| json.get(*k).is_some()), "{json}");
}

#[test]
fn mixture_nll_by_hand() {
    // ½N(0; −1, 1) + ½N(0; 1, 1) = N(1; 0, 1) = e^{−½}/√(2π): NLL = ½ ln 2π + ½ = 1.418939.
    let means = array![[[-1.0f32]], [[1.0]]];
    let vars = array![[[1.0f32]], [[1.0]]];
    let y = array![[0.0f32]];
    let got = gaussian_mixture_nll(&means, &vars, &SampleWeights::uniform(2).unwrap(), &y).unwrap();
    assert!((got - 1.418_938_5).abs() < 1e-6, "{got}");
    // One sample: the mixture is that Gaussian, per cell (k = 2 here).
    let (mean, var, y) = (array![[0.5, -1.0]], array![[2.0, 0.5]], array![[0.0, 0.0]]);
    let one = gaussian_mixture_nll(
        &mean.clone().insert_axis(Axis(0)),
        &var.clone().insert_axis(Axis(0)),
        &SampleWeights::uniform(1).unwrap(),
        &y,
    )
    .unwrap();
    assert!((one - gaussian_nll(&mean, &var, &y).unwrap()).abs() < 1e-12);
}

// ------------------------------------------------ independent numpy computation

fn load_cases() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/metrics/cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        other => vec![other.as_f64().unwrap()],
    }
}

fn shape(v: &Value) -> Vec<usize> {
    match v {
        Value::Array(items) => std::iter::once(items.len()).chain(shape(&items[0])).collect(),
        _ => vec![],
    }
}

fn array<D: ndarray::Dimension>(v: &Value) -> ndarray::Array<f64, D> {
    ndarray::ArrayD::from_shape_vec(shape(v), floats(v)).unwrap().into_dimensionality().unwrap()
}

/// numpy and Rust both compute in f64 from bit-identical inputs (f32-rounded outputs), so
/// they differ only through summation order and algebraically equal forms: ~1e-14 relative.
/// 1e-6 leaves eight orders of margin for that and still catches any formula slip (a missing
/// ½, a wrong bin, a variance normalized by S−1), each of which moves results by ≥ 1e-3.
fn close(what: &str, got: f64, want: f64) {
    assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{what}: rust {got}, numpy {want}");
}

fn close_all<D: ndarray::Dimension>(what: &str, got: &ndarray::Array<f64, D>, want: &Value) {
    let want: ndarray::Array<f64, D> = array(want);
    assert_eq!(got.shape(), want.shape(), "{what}");
    for (g, w) in got.iter().zip(&want) {
        close(what, *g, *w);
    }
}

fn weights_of(case: &Value, s: usize) -> SampleWeights {
    let lw: Option<Vec<f64>> = case["log_weights"].as_array().map(|_| floats(&case["log_weights"]));
    SampleWeights::new(s, lw.as_deref()).unwrap()
}

#[test]
fn classification_matches_numpy() {
    let cases = load_cases();
    for case in cases["classification"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let e = &case["expected"];
        let logits: Array3<f64> = array(&case["logits"]);
        let logits = logits.mapv(|v| v as f32);
        let labels: Vec<i64> = floats(&case["labels"]).iter().map(|&v| v as i64).collect();
        let reference: Array2<f64> = array(&case["reference"]);
        let weights = weights_of(case, logits.dim().0);
        close_all(&format!("{name} weights"), &Array1::from(weights.as_slice().to_vec()), &e["weights"]);

        // Chunked, in an irregular order, to exercise the streaming path too.
        let (s, n, _) = logits.dim();
        let blocks = orders(&grid(s, n, &[3, 2], &[7])).pop().unwrap();
        let p = classify_chunked(logits.view(), &weights, &blocks);
        close(&format!("{name} ess"), p.ess, e["ess"].as_f64().unwrap());
        close_all(&format!("{name} probs"), &p.probs, &e["probs"]);
        close_all(&format!("{name} total"), &p.total, &e["total"]);
        close_all(&format!("{name} aleatoric"), &p.aleatoric, &e["aleatoric"]);
        // numpy computes MI as Σ_s w_s KL(p_s ‖ p̄), not as a difference.
        close_all(&format!("{name} epistemic"), &p.epistemic, &e["epistemic"]);

        let m = ClassificationMetrics::compute(&p.probs, &labels, Some(reference.view())).unwrap();
        for (key, got) in [
            ("accuracy", m.accuracy),
            ("nll", m.nll),
            ("brier", m.brier),
            ("ece", m.ece),
            ("agreement", m.agreement.unwrap()),
            ("tv", m.tv.unwrap()),
        ] {
            close(&format!("{name} {key}"), got, e[key].as_f64().unwrap());
        }
        let bins = reliability_bins(&p.probs, &labels, ECE_BINS).unwrap();
        for (b, want) in bins.iter().zip(e["bins"].as_array().unwrap()) {
            assert_eq!(b.count as u64, want["count"].as_u64().unwrap(), "{name} bin counts");
            close(&format!("{name} bin confidence"), b.confidence, want["confidence"].as_f64().unwrap());
            close(&format!("{name} bin accuracy"), b.accuracy, want["accuracy"].as_f64().unwrap());
        }
        let first = logits.index_axis(Axis(0), 0);
        close(
            &format!("{name} nll_from_logits"),
            nll_from_logits(first, &labels).unwrap(),
            e["nll_from_logits_sample0"].as_f64().unwrap(),
        );
    }
}

#[test]
fn regression_matches_numpy() {
    let cases = load_cases();
    for case in cases["regression"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let e = &case["expected"];
        let out: Array3<f64> = array(&case["outputs"]);
        let out = out.mapv(|v| v as f32);
        let k = case["k"].as_u64().unwrap() as usize;
        let y: Array2<f64> = array(&case["y"]);
        let noise = match case["sigma"].as_f64() {
            Some(sigma) => Noise::Homoscedastic { sigma },
            None => Noise::Heteroscedastic,
        };
        let (s, n, _) = out.dim();
        let weights = weights_of(case, s);
        let blocks = orders(&ragged(s, n)).pop().unwrap();
        let p = regress_chunked(out.view(), k, noise, &weights, &blocks);
        close(&format!("{name} ess"), p.ess, e["ess"].as_f64().unwrap());
        for (key, got) in
            [("mean", &p.mean), ("aleatoric", &p.aleatoric), ("epistemic", &p.epistemic), ("total", &p.total)]
        {
            close_all(&format!("{name} {key}"), got, &e[key]);
        }

        let m = RegressionMetrics::compute(&p.mean, &p.total, &y).unwrap();
        close(&format!("{name} rmse"), m.rmse, e["rmse"].as_f64().unwrap());
        close(&format!("{name} nll"), m.nll, e["nll"].as_f64().unwrap());
        close(&format!("{name} coverage90"), m.coverage90, e["coverage"]["0.9"].as_f64().unwrap());
        for level in [0.5, 0.95] {
            let got = interval_coverage(&p.mean, &p.total, &y, level).unwrap();
            close(&format!("{name} coverage {level}"), got, e["coverage"][level.to_string()].as_f64().unwrap());
        }

        let means = out.slice(s![.., .., ..k]);
        let vars = match noise {
            Noise::Homoscedastic { sigma } => Array3::from_elem((s, n, k), sigma * sigma),
            Noise::Heteroscedastic => out.slice(s![.., .., k..]).mapv(|v| f64::from(v).exp()),
        };
        let got = gaussian_mixture_nll(means, &vars, &weights, &y).unwrap();
        close(&format!("{name} mixture nll"), got, e["mixture_nll"].as_f64().unwrap());
    }
}

#[test]
fn quantiles_match_python() {
    for case in load_cases()["quantiles"].as_array().unwrap() {
        let (p, z) = (case["p"].as_f64().unwrap(), case["z"].as_f64().unwrap());
        // Both sides are near double precision (AS241 vs Acklam + Halley): 1e-12 is tight.
        let got = normal_quantile(p);
        assert!((got - z).abs() <= 1e-12 * z.abs().max(1.0), "Φ⁻¹({p}): rust {got}, python {z}");
    }
}
