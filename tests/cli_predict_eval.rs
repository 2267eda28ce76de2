//! `postflow info`, `predict` and `eval` end to end.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use postflow::{PredictOptions, Prediction, SampleOptions};
use serde_json::Value;

fn postflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_postflow")).args(args).output().expect("run postflow")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(args: &[&str]) -> String {
    let o = postflow(args);
    assert!(o.status.success(), "postflow {args:?} failed: {}", stderr(&o));
    stdout(&o)
}

fn json(args: &[&str]) -> Value {
    serde_json::from_str(&ok(args)).unwrap_or_else(|e| panic!("postflow {args:?}: not JSON: {e}"))
}

/// A failed run: non-zero exit and exactly one line starting with `error:`, containing every fragment.
fn assert_one_line_error(o: &Output, fragments: &[&str]) {
    assert!(!o.status.success(), "expected failure, stdout: {}", stdout(o));
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "stderr should be one line: {err:?}");
    assert!(lines[0].starts_with("error: "), "{err:?}");
    for f in fragments {
        assert!(err.contains(f), "{err:?} lacks {f:?}");
    }
}

/// Equal up to JSON parsing: serde_json's default float parser may be one ulp off.
fn same(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-15 * a.abs().max(b.abs())
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A `.npy` (version 1.0) file with a 2-D array.
fn write_npy(path: &Path, descr: &str, shape: (usize, usize), data: &[u8]) {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({}, {}), }}", shape.0, shape.1);
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// A copy of fixture `name` under `dir` with its manifest changed by `edit`.
fn copy_fixture(name: &str, dir: &Path, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let bundle = dir.join(name);
    std::fs::create_dir(&bundle).unwrap();
    for entry in std::fs::read_dir(common::fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), bundle.join(entry.file_name())).unwrap();
    }
    let manifest = bundle.join("postflow.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&manifest, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    bundle
}

const INPUTS: [[f32; 2]; 4] = [[0.5, 1.0], [-1.25, 2.0], [3.0, -0.75], [0.0, 0.0]];

// ------------------------------------------------------------------------ info

#[test]
fn info_text_and_json() {
    let bundle = common::fixture("affine_cls");
    let v = json(&["info", path_str(&bundle), "--json"]);
    assert_eq!(v["name"], "affine_cls");
    assert_eq!(v["task"]["kind"], "classification");
    assert_eq!(v["task"]["classes"], 2);
    assert_eq!(v["dimensions"]["d_in"], 2);
    assert_eq!(v["dimensions"]["D"], 17);
    assert_eq!(v["dimensions"]["C"], 2);
    assert_eq!(v["graphs"]["net"]["file"], "net.onnx");
    assert_eq!(v["graphs"]["flow_jvp"]["inputs"], serde_json::json!(["t", "x", "eps"]));
    assert_eq!(v["default_solver"]["method"], "rk4");
    assert_eq!(v["default_solver"]["steps"], 32);
    assert_eq!(v["hutchinson"]["probes"], 1);
    assert_eq!(v["tensors"]["posterior_samples"], 16);
    assert_eq!(v["tensors"]["eval_inputs"], 32);
    assert_eq!(v["tensors"]["anchors"], 0);
    assert_eq!(v["default_start_time"], 0.0);
    assert_eq!(v["provenance"]["seed"], 1001);
    assert_eq!(v["reference_metrics"]["methods"]["hmc"]["accuracy"], 0.4375);

    let text = ok(&["info", path_str(&bundle)]);
    for fragment in [
        "affine_cls",
        "classification, 2 classes",
        "d_in = 2, D = 17 weights, C = 2 net outputs",
        "2 → 3 (relu) → 2 (identity)",
        "net.onnx",
        "rk4, 32 steps",
        "1 probe(s), rademacher",
        "seed: 1001",
        "reference metrics",
        "0.4375",
        "0 anchor draws",
        "start time   0 by default",
    ] {
        assert!(text.contains(fragment), "info lacks {fragment:?}:\n{text}");
    }
    // An anchored bundle: its anchor count and default start time (flow.default_start_time).
    let anchored = common::fixture("affine_anchored");
    let model = common::open("affine_anchored");
    let v = json(&["info", path_str(&anchored), "--json"]);
    assert_eq!(v["tensors"]["anchors"], model.anchor_count());
    assert_eq!(v["default_start_time"], 0.5);
    let text = ok(&["info", path_str(&anchored)]);
    let anchors = format!("{} anchor draws", model.anchor_count());
    assert!(text.contains(&anchors) && text.contains("start time   0.5 by default"), "{text}");

    let reg = json(&["info", path_str(&common::fixture("affine_hetero")), "--json"]);
    assert_eq!(reg["task"]["noise"]["kind"], "heteroscedastic");
    assert_eq!(reg["dimensions"]["C"], 2);
    let text = ok(&["info", path_str(&common::fixture("affine_reg"))]);
    assert!(text.contains("homoscedastic noise σ = 0.3"), "{text}");

    assert_one_line_error(&postflow(&["info", "/no/such/bundle"]), &["/no/such/bundle"]);
}

// --------------------------------------------------------------------- predict

/// CSV output parsed into a header and rows of numbers.
fn parse_csv(text: &str) -> (Vec<String>, Vec<Vec<f64>>) {
    let mut lines = text.lines();
    let header = lines.next().unwrap().split(',').map(String::from).collect();
    let rows = lines.map(|l| l.split(',').map(|c| c.parse::<f64>().unwrap()).collect()).collect();
    (header, rows)
}

#[test]
fn predict_csv_npy_and_samples_agree_with_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = common::fixture("affine_cls");
    let b = path_str(&bundle);
    let with_header = dir.path().join("with_header.csv");
    let no_header = dir.path().join("no_header.csv");
    let body: String = INPUTS.iter().map(|r| format!("{},{}\n", r[0], r[1])).collect();
    std::fs::write(&with_header, format!("x0,x1\n{body}")).unwrap();
    std::fs::write(&no_header, format!("\n{}", body.replace('\n', "\r\n"))).unwrap();
    let npy32 = dir.path().join("x32.npy");
    let npy64 = dir.path().join("x64.npy");
    let flat: Vec<f32> = INPUTS.iter().flatten().copied().collect();
    write_npy(&npy32, "<f4", (4, 2), &flat.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    write_npy(&npy64, "<f8", (4, 2), &flat.iter().flat_map(|v| f64::from(*v).to_le_bytes()).collect::<Vec<u8>>());

    let base = ["predict", b, "-n", "64", "--seed", "3", "-q"];
    let run = |input: &Path, extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(["--input", path_str(input)]);
        args.extend(extra);
        ok(&args)
    };
    let csv = run(&with_header, &[]);
    assert_eq!(csv, run(&no_header, &[]));
    assert_eq!(csv, run(&npy32, &[]));
    assert_eq!(csv, run(&npy64, &[]));

    let (header, rows) = parse_csv(&csv);
    assert_eq!(
        header,
        ["p_0", "p_1", "predicted", "total_entropy", "aleatoric_entropy", "epistemic_entropy"].map(String::from)
    );
    assert_eq!(rows.len(), INPUTS.len());

    // The library with the same seed gives the same numbers.
    let model = common::open("affine_cls");
    let x = ndarray::Array2::from_shape_vec((4, 2), flat.clone()).unwrap();
    let lib = model
        .sample_predict(64, &SampleOptions { seed: 3, ..Default::default() }, x.view(), &PredictOptions::default())
        .unwrap();
    let Prediction::Classification(p) = &lib else { panic!("classification") };
    for (n, row) in rows.iter().enumerate() {
        assert_eq!(row[0], p.probs[[n, 0]]);
        assert_eq!(row[1], p.probs[[n, 1]]);
        assert_eq!(row[2] as usize, usize::from(p.probs[[n, 1]] > p.probs[[n, 0]]));
        assert_eq!(row[3], p.total[n]);
        assert_eq!(row[4], p.aleatoric[n]);
        assert_eq!(row[5], p.epistemic[n]);
        assert!((row[3] - row[4] - row[5]).abs() < 1e-12);
    }

    // JSON has the same numbers.
    let v: Value = serde_json::from_str(&run(&npy32, &["--json"])).unwrap();
    assert_eq!(v["task"], "classification");
    assert_eq!(v["samples"], 64);
    assert_eq!(v["classes"], serde_json::json!(["0", "1"]));
    let preds = v["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 4);
    for (n, pr) in preds.iter().enumerate() {
        assert!(same(pr["probs"][1].as_f64().unwrap(), p.probs[[n, 1]]));
        assert!(same(pr["entropy"]["epistemic"].as_f64().unwrap(), p.epistemic[n]));
        assert_eq!(pr["predicted"].as_u64().unwrap() as f64, rows[n][2]);
        assert_eq!(pr["predicted_class"], format!("{}", rows[n][2])); // affine_cls's classes are "0", "1"
    }

    // --samples with the weights `postflow sample` wrote gives the same prediction; -o writes a file.
    let samples = dir.path().join("s.safetensors");
    ok(&["sample", b, "-n", "64", "--seed", "3", "-q", "-o", path_str(&samples)]);
    let out = dir.path().join("pred.csv");
    ok(&["predict", b, "-i", path_str(&with_header), "--samples", path_str(&samples), "-q", "-o", path_str(&out)]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), csv);
}

#[test]
fn predict_regression_columns() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.csv");
    std::fs::write(&input, "x0\n-1\n0.5\n2\n").unwrap();
    for (name, sigma2) in [("affine_reg", Some(0.09)), ("affine_hetero", None)] {
        let bundle = common::fixture(name);
        let csv = ok(&["predict", path_str(&bundle), "-i", path_str(&input), "-n", "40", "-q"]);
        let (header, rows) = parse_csv(&csv);
        assert_eq!(header, ["mean", "total_var", "aleatoric_var", "epistemic_var"].map(String::from));
        assert_eq!(rows.len(), 3);
        for r in &rows {
            assert!((r[1] - r[2] - r[3]).abs() <= 1e-12 * r[1], "{name}: total = aleatoric + epistemic: {r:?}");
            assert!(r[3] > 0.0, "{name}: epistemic variance of disagreeing samples");
            if let Some(s2) = sigma2 {
                assert!((r[2] - s2).abs() < 1e-12, "{name}: aleatoric = σ² ({r:?})");
            }
        }
        let v = json(&["predict", path_str(&bundle), "-i", path_str(&input), "-n", "40", "-q", "--json"]);
        assert_eq!(v["task"], "regression");
        assert!(same(v["predictions"][2]["mean"][0].as_f64().unwrap(), rows[2][0]));
        assert!(same(v["predictions"][2]["variance"]["epistemic"][0].as_f64().unwrap(), rows[2][3]));
    }
}

#[test]
fn bad_input_files_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = common::fixture("affine_cls");
    let b = path_str(&bundle);
    let check = |name: &str, content: &[u8], fragments: &[&str]| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        let o = postflow(&["predict", b, "-i", path_str(&path), "-n", "4", "-q"]);
        let mut all = vec![name];
        all.extend(fragments);
        assert_one_line_error(&o, &all);
        assert_eq!(o.status.code(), Some(1));
        assert!(o.stdout.is_empty(), "{name}: nothing on stdout");
    };
    check("ragged.csv", b"x0,x1\n1,2\n3,4,5\n", &["line 3", "3 columns, expected 2", "ragged"]);
    check("ragged2.csv", b"1,2\n3\n", &["line 2", "1 columns, expected 2"]);
    check("wide.csv", b"1,2,3\n4,5,6\n", &["line 1", "3 columns", "takes 2 features"]);
    check("narrow_header.csv", b"a\n1\n", &["line 1", "header has 1 columns", "takes 2 features"]);
    check("text.csv", b"x0,x1\n1,2\n3,abc\n", &["line 3, column 2", "\"abc\" is not a number"]);
    check("half_text.csv", b"1,x\n", &["line 1, column 2", "\"x\" is not a number"]);
    check("empty.csv", b"", &["no input rows"]);
    check("blank.csv", b"\n\n  \n", &["no input rows"]);
    check("header_only.csv", b"x0,x1\n", &["no input rows"]);
    check("nan.csv", b"1,2\nNaN,3\n", &["line 2, column 1", "not finite"]);
    check("inf.csv", b"1,inf\n", &["line 1, column 2", "not finite"]);
    check("overflow.csv", b"1,1e39\n", &["line 1, column 2", "not finite"]);

    let npy = |name: &str, descr: &str, shape: (usize, usize), data: &[u8], fragments: &[&str]| {
        let path = dir.path().join(name);
        write_npy(&path, descr, shape, data);
        let mut all = vec![name];
        all.extend(fragments);
        assert_one_line_error(&postflow(&["predict", b, "-i", path_str(&path), "-n", "4", "-q"]), &all);
    };
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    npy("nan.npy", "<f4", (2, 2), &f32s(&[1.0, 2.0, 3.0, f32::NAN]), &["row 2, column 2", "not finite"]);
    npy("wide.npy", "<f4", (1, 3), &f32s(&[1.0, 2.0, 3.0]), &["3 columns", "takes 2 features"]);
    npy("empty.npy", "<f4", (0, 2), &[], &["no inputs"]);
    npy("int.npy", "<i8", (1, 2), &[0; 16], &["\"<i8\" is not supported"]);
    npy("short.npy", "<f8", (2, 2), &[0; 16], &["needs 32"]);
    // A crafted shape whose byte count wraps around 2^64 (to 0, or to the 8 bytes present).
    npy("wrap0.npy", "<f4", (1 << 61, 2), &[], &["needs more than 2^64"]);
    npy("wrap8.npy", "<f8", ((1 << 61) + 1, 1), &[0; 8], &["needs more than 2^64"]);
    let garbage = dir.path().join("garbage.npy");
    std::fs::write(&garbage, b"not an npy file at all").unwrap();
    assert_one_line_error(&postflow(&["predict", b, "-i", path_str(&garbage), "-q"]), &["garbage.npy", "magic"]);
    assert_one_line_error(&postflow(&["predict", b, "-i", "/no/such/input.csv", "-q"]), &["/no/such/input.csv"]);

    // Weights of the wrong width in --samples.
    let good = dir.path().join("good.csv");
    std::fs::write(&good, "1,2\n").unwrap();
    let reg_samples = dir.path().join("reg.safetensors");
    ok(&["sample", path_str(&common::fixture("affine_reg")), "-n", "3", "-q", "-o", path_str(&reg_samples)]);
    assert_one_line_error(
        &postflow(&["predict", b, "-i", path_str(&good), "--samples", path_str(&reg_samples), "-q"]),
        &["reg.safetensors", "13 columns", "D = 17"],
    );
    // -n and --samples together is a usage error.
    let o = postflow(&["predict", b, "-i", path_str(&good), "-n", "3", "--samples", path_str(&reg_samples)]);
    assert_eq!(o.status.code(), Some(2));
    assert_one_line_error(&o, &["--samples"]);
}

/// An absurd `-n` is a one-line error (exit 1) in `predict` and `eval`, not a panic or an abort.
#[test]
fn a_huge_sample_count_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.csv");
    std::fs::write(&input, "1,2\n").unwrap();
    let bundle = common::fixture("affine_cls");
    let b = path_str(&bundle);
    let huge = "18446744073709551615";
    for args in [vec!["predict", b, "-i", path_str(&input), "-n", huge, "-q"], vec!["eval", b, "-n", huge, "-q"]] {
        let o = postflow(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert_one_line_error(&o, &["do not fit in memory"]);
    }
}

/// Without -n, `predict` and `eval` draw the manifest's `reference_metrics.flow_samples`; a
/// count that is not an integer in 1..=1e6 is refused naming that field (not "-n").
#[test]
fn a_bad_recorded_flow_samples_names_the_manifest_field() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.csv");
    std::fs::write(&input, "1,2\n").unwrap();
    let bad = [
        serde_json::json!(0),
        serde_json::json!(1_000_000_000_000_000_000u64),
        serde_json::json!(1_000_001),
        serde_json::json!(-3),
        serde_json::json!(2.5),
        serde_json::json!("400"),
    ];
    for (i, count) in bad.into_iter().enumerate() {
        let sub = dir.path().join(i.to_string());
        std::fs::create_dir(&sub).unwrap();
        let bundle = copy_fixture("affine_cls", &sub, |v| v["reference_metrics"]["flow_samples"] = count.clone());
        let b = path_str(&bundle);
        for args in [vec!["predict", b, "-i", path_str(&input), "-q"], vec!["eval", b, "-q"]] {
            let o = postflow(&args);
            assert_eq!(o.status.code(), Some(1), "{count}: {}", stderr(&o));
            assert_one_line_error(&o, &["manifest reference_metrics.flow_samples", &format!("= {count}:")]);
            assert!(!stderr(&o).contains("-n must be"), "{}", stderr(&o));
        }
        // An explicit -n does not need the manifest's count.
        ok(&["predict", b, "-i", path_str(&input), "-n", "4", "-q"]);
    }
    let bundle = copy_fixture("affine_cls", dir.path(), |v| v["reference_metrics"]["flow_samples"] = 7.into());
    let r = json(&["eval", path_str(&bundle), "--json", "-q"]);
    assert_eq!(r["flow"]["samples"], 7);
}

/// Without --seed, `eval` takes the manifest's `reference_metrics.seed`; one that is not a
/// non-negative integer is refused naming that field instead of silently becoming seed 0.
#[test]
fn a_bad_recorded_seed_names_the_manifest_field() {
    let dir = tempfile::tempdir().unwrap();
    for (i, seed) in [serde_json::json!("7"), serde_json::json!(-1), serde_json::json!(2.5)].into_iter().enumerate() {
        let sub = dir.path().join(i.to_string());
        std::fs::create_dir(&sub).unwrap();
        let bundle = copy_fixture("affine_cls", &sub, |v| v["reference_metrics"]["seed"] = seed.clone());
        let b = path_str(&bundle);
        assert_one_line_error(&postflow(&["eval", b, "-n", "8", "-q"]), &["manifest reference_metrics.seed", "--seed"]);
        let r = json(&["eval", b, "-n", "8", "--seed", "3", "--json", "-q"]);
        assert_eq!(r["flow"]["seed"], 3);
    }
    let bundle = copy_fixture("affine_cls", dir.path(), |v| v["reference_metrics"]["seed"] = 11.into());
    assert_eq!(json(&["eval", path_str(&bundle), "-n", "8", "--json", "-q"])["flow"]["seed"], 11);
}

/// Run postflow with stdout a pipe whose reader is already gone (`postflow … | true`).
#[cfg(unix)]
fn postflow_into_closed_pipe(args: &[&str]) -> Output {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Command::new(env!("CARGO_BIN_EXE_postflow"))
        .args(args)
        .stdout(std::process::Stdio::from(write))
        .output()
        .expect("run postflow")
}

/// A reader that stops early (`| head`, `| true`) is no error: exit 0, nothing on stderr;
/// a stdout that cannot be written (`> /dev/full`) is a one-line error.
#[cfg(unix)]
#[test]
fn a_closed_stdout_pipe_is_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.csv");
    std::fs::write(&input, "1,2\n").unwrap();
    let bundle = common::fixture("affine_cls");
    let b = path_str(&bundle);
    let runs: [&[&str]; 5] = [
        &["info", b],
        &["info", b, "--json"],
        &["eval", b, "-n", "20", "-q"],
        &["eval", b, "-n", "20", "-q", "--json"],
        &["predict", b, "-i", path_str(&input), "-n", "4", "-q"],
    ];
    for args in runs {
        let o = postflow_into_closed_pipe(args);
        assert!(o.status.success() && o.stderr.is_empty(), "{args:?}: {:?} {}", o.status, stderr(&o));
    }
    if Path::new("/dev/full").exists() {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_postflow")).args(["info", b]).stdout(full).output().unwrap();
        assert_eq!(o.status.code(), Some(1));
        assert_one_line_error(&o, &["stdout"]);
    }
}

// ------------------------------------------------------------------------ eval

/// Tolerance for HMC and MAP against `reference_metrics`: relative 1e-5 (absolute below 1).
/// Both sides apply the same formulas to the same float32 arrays (the HMC predictive
/// stored in the bundle; the MAP net's outputs), summing in float64; what differs is
/// summation order, numpy's float64 vs our f64 `exp`/`ln`, and for MAP that the pipeline's
/// net outputs may come from another float32 evaluation of the same graph (a few ulps of
/// f32, ~1e-7 relative), which moves NLL and Brier by about that relative amount. 1e-5
/// leaves two orders of margin and still catches any formula difference (a changed bin
/// edge, a missing ½, a log base) which shows at 1e-3 or more.
const EXACT_TOL: f64 = 1e-5;

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

/// Bundles to check: the fixtures, every `models/*/` folder holding a bundle, and any
/// extra bundle folders listed in `POSTFLOW_EVAL_BUNDLES` (separated by `:`).
fn eval_bundles() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> =
        ["affine_cls", "affine_reg", "affine_hetero", "affine_anchored"].iter().map(|n| common::fixture(n)).collect();
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    if let Ok(entries) = std::fs::read_dir(&models) {
        let mut found: Vec<PathBuf> =
            entries.flatten().map(|e| e.path()).filter(|p| p.join("postflow.json").is_file()).collect();
        found.sort();
        out.extend(found);
    }
    if let Some(extra) = std::env::var_os("POSTFLOW_EVAL_BUNDLES") {
        out.extend(std::env::split_paths(&extra).filter(|p| !p.as_os_str().is_empty()));
    }
    out
}

/// Flow metrics against the manifest's: both are Monte Carlo estimates with the same number
/// of samples (the pipeline's from its own JAX sampler, ours from postflow's, so never the
/// same draws), so their difference has standard deviation about √2 × the jackknife standard
/// error `eval` reports. Allowed: 4 × √2 × SE (a z-score of 4 on the difference), with a
/// floor of 3/N for the counting metrics (accuracy, agreement, coverage: a few inputs near a
/// tie may flip with other draws, which a jackknife over our own draws cannot see) and
/// 0.01 × max(1, |value|) for the others (solver round-off between float32 JAX and ONNX
/// Runtime, and the jackknife's own noise).
fn flow_tolerance(metric: &str, se: f64, n_eval: f64, reference: f64) -> f64 {
    let floor = match metric {
        "accuracy" | "agreement" | "coverage90" => 3.0 / n_eval,
        _ => 0.01 * reference.abs().max(1.0),
    };
    (4.0 * std::f64::consts::SQRT_2 * se).max(floor)
}

#[test]
fn eval_reproduces_reference_metrics() {
    let mut report = Vec::new();
    for bundle in eval_bundles() {
        let name = bundle.file_name().unwrap().to_string_lossy().into_owned();
        // The manifest's flow row is the plain flow (start time 0, unrefined); its sweeps cover the others.
        let v = json(&["eval", path_str(&bundle), "--json", "-q", "--start-time", "0", "--refine", "0", "--sweep"]);
        let rm = &v["reference_metrics"];
        let recorded = rm["methods"].as_object().unwrap_or_else(|| panic!("{name}: no reference_metrics.methods"));
        assert_eq!(rm["n"].as_u64(), v["n_eval"].as_u64(), "{name}: eval split size");
        for method in ["hmc", "map"] {
            let want = recorded.get(method).unwrap_or_else(|| panic!("{name}: no reference_metrics for {method}"));
            for (metric, w) in want.as_object().unwrap() {
                let Some(w) = w.as_f64() else { continue };
                let got = v["methods"][method][metric]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{name}: eval reports no {method}.{metric}"));
                assert!(
                    close(got, w, EXACT_TOL),
                    "{name}: {method}.{metric} = {got}, manifest {w} (diff {:e}){}",
                    got - w,
                    if metric == "ece" { " — check the ECE bin rule (Rust: (i/15, (i+1)/15])" } else { "" }
                );
                report.push(format!("{name} {method}.{metric}: {got} vs {w}"));
            }
        }
        // The flow, when the manifest records its metrics and the settings they came from.
        let settings = ["flow_samples", "seed", "solver"].iter().all(|k| !rm[k].is_null());
        if let (Some(want), true) = (recorded.get("flow"), settings) {
            assert_eq!(v["flow"]["samples"], rm["flow_samples"], "{name}: eval uses the recorded sample count");
            assert_eq!(v["flow"]["seed"], rm["seed"], "{name}: eval uses the recorded seed");
            assert_eq!(v["flow"]["solver"]["method"], rm["solver"]["method"], "{name}: recorded solver");
            let n_eval = v["n_eval"].as_f64().unwrap();
            for (metric, w) in want.as_object().unwrap() {
                let Some(w) = w.as_f64() else { continue };
                let got = v["methods"]["flow"][metric].as_f64().unwrap();
                let se = v["flow_stderr"][metric].as_f64().unwrap_or(0.0);
                let tol = flow_tolerance(metric, se, n_eval, w);
                assert!(
                    (got - w).abs() <= tol,
                    "{name}: flow.{metric} = {got}, manifest {w}: off by {:e}, more than sampling noise allows ({tol:e}, SE {se:e})",
                    got - w
                );
                report.push(format!("{name} flow.{metric}: {got} vs {w} (tol {tol:e})"));
            }
        }
        if let Some(rows) = rm.get("start_time_sweep").and_then(Value::as_array) {
            report.extend(compare_sweeps(&name, "start_time", rows, v["sweep"].as_array().unwrap()));
        }
        // Refinement rows start from refinement's start time (K = 0 included), whatever the main row's.
        if let Some(rows) = rm.get("refine_sweep").and_then(Value::as_array) {
            report.extend(compare_sweeps(&name, "transitions", rows, v["refine_sweep"].as_array().unwrap()));
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// The runtime's start-time sweep against the manifest's, row by row. Each row is a Monte
/// Carlo estimate from other draws (JAX there, ONNX Runtime here) with no standard error
/// recorded, so the tolerances are generous: 0.03 + 5 % for TV, ECE, agreement and coverage;
/// 0.05 + 25 % for NLL and RMSE (a few far-off samples move a regression NLL at mid start
/// times); a factor e^0.35 ≈ 1.4 for the spread ratios (the epistemic ratio of a poor flow is a
/// ratio of heavy-tailed means: regression1d's is 16 000–20 000 at t₀ = 0.5), or 0.05 absolute
/// where the ratio is near 0.
fn compare_sweeps(name: &str, key: &str, recorded: &[Value], ours: &[Value]) -> Vec<String> {
    let mut report = Vec::new();
    for want in recorded {
        let t0 = want[key].as_f64().unwrap();
        let got = ours
            .iter()
            .find(|r| (r[key].as_f64().unwrap() - t0).abs() < 1e-9)
            .unwrap_or_else(|| panic!("{name}: eval --sweep has no {key} {t0}"));
        for (metric, w) in want.as_object().unwrap() {
            let (Some(w), Some(g)) = (w.as_f64(), got.get(metric).and_then(Value::as_f64)) else { continue };
            if metric == key || metric == "acceptance" {
                continue;
            }
            let ok = if metric.ends_with("_ratio") || metric.contains("_ratio_") {
                if w.abs() < 0.05 {
                    (g - w).abs() <= 0.05
                } else {
                    g > 0.0 && (g / w).ln().abs() <= 0.35
                }
            } else if metric == "nll" || metric == "rmse" {
                (g - w).abs() <= 0.05 + 0.25 * w.abs()
            } else {
                (g - w).abs() <= 0.03 + 0.05 * w.abs()
            };
            assert!(ok, "{name}: {key} {t0}: {metric} = {g}, manifest {w}: further apart than sampling noise allows");
            report.push(format!("{name} {key} {t0} {metric}: {g} vs {w}"));
        }
    }
    report
}

#[test]
fn eval_settings_table_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = common::fixture("affine_cls");
    let b = path_str(&bundle);
    let v = json(&["eval", b, "-n", "40", "--seed", "5", "--solver", "heun", "--steps", "8", "--json", "-q"]);
    assert_eq!(v["flow"]["samples"], 40);
    assert_eq!(v["flow"]["seed"], 5);
    assert_eq!(v["flow"]["solver"], serde_json::json!({"method": "heun", "steps": 8}));
    assert!(v["flow"]["samples_per_second"].as_f64().unwrap() > 0.0);
    for key in ["accuracy", "nll", "ece", "brier", "agreement", "tv"] {
        assert!(v["methods"]["flow"][key].is_number(), "flow.{key}");
        assert!(v["flow_stderr"][key].is_number(), "flow_stderr.{key}");
    }
    assert!(v["methods"]["hmc"].get("agreement").is_none());

    // The flow numbers are those of the library with the same settings.
    let model = common::open("affine_cls");
    let opts =
        SampleOptions { seed: 5, solver: Some(postflow::SolverKind::Heun), steps: Some(8), ..Default::default() };
    let x = model.tensors().eval_x.clone();
    let p = model.sample_predict(40, &opts, x.view(), &PredictOptions::default()).unwrap();
    let postflow::bundle::EvalTargets::Classification { labels, hmc_probs } = &model.tensors().eval else { panic!() };
    let m = postflow::metrics::ClassificationMetrics::compute(&p.mean(), labels.as_slice(), Some(hmc_probs.view()))
        .unwrap();
    assert!(same(v["methods"]["flow"]["nll"].as_f64().unwrap(), m.nll));
    assert!(same(v["methods"]["flow"]["tv"].as_f64().unwrap(), m.tv.unwrap()));

    let svg = dir.path().join("rel.svg");
    let text = ok(&["eval", b, "-n", "40", "-q", "--plot", path_str(&svg)]);
    for fragment in ["flow BMA", "HMC BMA", "MAP", "manifest", "jackknife", "posterior samples/s", "accuracy"] {
        assert!(text.contains(fragment), "table lacks {fragment:?}:\n{text}");
    }
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.trim_end().ends_with("</svg>"));
    for label in ["reliability", "confidence", "flow BMA", "HMC BMA", "MAP", "<polyline"] {
        assert!(plot.contains(label), "plot lacks {label:?}");
    }

    let svg = dir.path().join("cov.svg");
    let text = ok(&["eval", path_str(&common::fixture("affine_hetero")), "-n", "40", "-q", "--plot", path_str(&svg)]);
    assert!(text.contains("coverage90") && text.contains("rmse"), "{text}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.contains("coverage") && plot.contains("flow BMA"), "coverage plot");

    assert_one_line_error(&postflow(&["eval", b, "-n", "0", "-q"]), &["-n must be at least 1"]);
    assert_one_line_error(
        &postflow(&["eval", b, "-n", "4", "-q", "--plot", "/no/such/dir/p.svg"]),
        &["/no/such/dir/p.svg"],
    );
}

/// Output paths are checked before any sampling: a missing directory or a directory as
/// the output is reported first (here ahead of the flow's refusal of --start-time 0.5).
#[test]
fn output_paths_are_checked_before_sampling() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.csv");
    std::fs::write(&input, "1,2\n").unwrap();
    let theta = dir.path().join("theta.safetensors");
    let bundle = common::fixture("affine_cls");
    let b = path_str(&bundle);
    ok(&["sample", b, "-n", "3", "-q", "-o", path_str(&theta)]);
    let missing = "/no/such/dir/out";
    let here = path_str(dir.path());
    let late = ["--start-time", "0.5"]; // refused by the flow (no anchors), after the path check
    for (out, fragment) in [(missing, "/no/such/dir: No such file"), (here, "is a directory")] {
        let runs: [Vec<&str>; 4] = [
            vec!["sample", b, "-n", "3", "-q", "-o", out],
            vec!["log-prob", b, "--theta", path_str(&theta), "-q", "-o", out],
            vec!["predict", b, "-i", path_str(&input), "-n", "3", "-q", "-o", out],
            vec!["eval", b, "-n", "3", "-q", "--plot", out],
        ];
        for mut args in runs {
            args.extend(late);
            let o = postflow(&args);
            assert_one_line_error(&o, &[&format!("output {out}"), fragment]);
            assert!(o.stdout.is_empty(), "{args:?}");
        }
    }
}

/// A plot that cannot be written (here past a file-size limit, `ulimit -f`) fails the run
/// only after the report is printed.
#[cfg(unix)]
#[test]
fn eval_prints_the_report_when_the_plot_fails() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("p.svg");
    let bundle = common::fixture("affine_cls");
    let o = Command::new("sh")
        .args(["-c", "trap '' XFSZ; ulimit -f 1 && exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_postflow")])
        .args(["eval", path_str(&bundle), "-n", "40", "-q", "--plot", path_str(&svg)])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_one_line_error(&o, &["p.svg", "File too large"]);
    assert!(stdout(&o).contains("flow BMA") && stdout(&o).contains("accuracy"), "report: {}", stdout(&o));
    assert!(!svg.exists());
}

/// `eval` at start time 1 with as many samples as anchors is the model average of the
/// stored draws themselves; `--sweep` reports every start time; bad start times are errors.
#[test]
fn eval_start_times_and_sweep() {
    let bundle = common::fixture("affine_anchored");
    let b = path_str(&bundle);
    let model = common::open("affine_anchored");
    let n = model.anchor_count();
    let r = json(&["eval", b, "--json", "-q", "--start-time", "1", "-n", &n.to_string()]);
    assert_eq!(r["flow"]["start_time"], 1.0);
    let t = model.tensors();
    let d = model.weight_dim();
    let anchors = t.anchors.as_ref().unwrap();
    let theta = ndarray::Array2::from_shape_fn((n, d), |(i, j)| t.whiten_mean[j] + t.whiten_scale[j] * anchors[[i, j]]);
    let p = model.predict(t.eval_x.view(), theta.view(), None, &PredictOptions::default()).unwrap();
    let Prediction::Classification(c) = p else { panic!("classification fixture") };
    let labels = match &t.eval {
        postflow::bundle::EvalTargets::Classification { labels, .. } => labels.clone(),
        _ => unreachable!(),
    };
    let nll = c.probs.rows().into_iter().zip(&labels).map(|(row, y)| -row[*y as usize].ln()).sum::<f64>()
        / labels.len() as f64;
    let got = r["methods"]["flow"]["nll"].as_f64().unwrap();
    assert!(close(got, nll, 1e-9), "eval at t0 = 1: nll {got} vs the anchors' average {nll}");
    let mem = r["methods"]["flow"]["memorization_ratio"].as_f64().unwrap();
    assert!(mem < 1e-3, "stored draws are at distance 0 from themselves: {mem}");
    let map_epi = r["methods"]["map"]["epistemic_ratio_eval"].as_f64().unwrap();
    assert!(map_epi.abs() < 1e-9, "one net has no epistemic spread: {map_epi}");

    // The default start time is the bundle's; --sweep adds one row per start time.
    let r = json(&["eval", b, "--json", "-q", "-n", "40", "--sweep"]);
    assert_eq!(r["flow"]["start_time"], model.default_start_time());
    let rows = r["sweep"].as_array().unwrap();
    let times: Vec<f64> = rows.iter().map(|row| row["start_time"].as_f64().unwrap()).collect();
    assert_eq!(times, [0.0, 0.5, 0.8, 0.85, 0.9, 0.95, 1.0]);
    for row in rows {
        for key in
            ["tv", "nll", "ece", "agreement", "memorization_ratio", "epistemic_ratio_eval", "epistemic_ratio_ood"]
        {
            assert!(row[key].as_f64().is_some_and(f64::is_finite), "{key} in {row}");
        }
    }
    // The default row of the sweep is the main result (same seed and options).
    assert_eq!(rows[1]["tv"], r["methods"]["flow"]["tv"]);
    let text = ok(&["eval", b, "-q", "-n", "40", "--sweep"]);
    assert!(text.contains("t0 = 0.5 *") && text.contains("mem.ratio") && text.contains("epi.ood"), "{text}");
    assert!(text.contains("* the start time used above"), "{text}");
    // A start time off the sweep marks no row, and then has no legend either.
    let text = ok(&["eval", b, "-q", "-n", "20", "--sweep", "--start-time", "0.3"]);
    assert!(text.contains("start-time sweep"), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("t0 = ") && l.contains(" *")), "{text}");
    assert!(!text.contains("the start time used above"), "{text}");

    // Without anchors the sweep has the plain flow only, and t0 > 0 is refused.
    let plain = common::fixture("affine_cls");
    let r = json(&["eval", path_str(&plain), "--json", "-q", "-n", "20", "--sweep"]);
    assert_eq!(r["sweep"].as_array().unwrap().len(), 1);
    assert!(r["methods"]["flow"].get("memorization_ratio").is_none());
    assert_one_line_error(&postflow(&["eval", path_str(&plain), "-q", "--start-time", "0.5"]), &["flow.anchors"]);
    assert_one_line_error(&postflow(&["eval", b, "-q", "--start-time", "1.5"]), &["start_time must be in [0, 1]"]);
    assert_one_line_error(
        &postflow(&[
            "sample",
            b,
            "-q",
            "--start-time",
            "1",
            "--trace",
            "exact",
            "-n",
            "2",
            "-o",
            "/tmp/never.safetensors",
        ]),
        &["no density"],
    );
}

/// `--sweep` evaluates the start times the manifest's own sweep recorded (so each recorded row
/// gets the runtime's beside it), skipping values that are not start times.
#[test]
fn eval_sweep_follows_the_manifest_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = copy_fixture("affine_anchored", dir.path(), |v| {
        v["reference_metrics"]["start_time_sweep"] = serde_json::json!([
            {"start_time": 0.85}, {"start_time": 0.0}, {"start_time": "0.3"}, {"start_time": 2.0},
            {"start_time": -0.5}, {"nll": 1.0}, {"start_time": 0.85}
        ]);
    });
    let r = json(&["eval", path_str(&bundle), "--json", "-q", "-n", "20", "--sweep"]);
    let times: Vec<f64> =
        r["sweep"].as_array().unwrap().iter().map(|row| row["start_time"].as_f64().unwrap()).collect();
    assert_eq!(times, [0.0, 0.85]);
}

/// Manifest strings reach the terminal as plain text: a bundle cannot forge `info` lines
/// or send escape sequences.
#[test]
fn info_shows_control_characters_in_manifest_strings_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = copy_fixture("affine_cls", dir.path(), |v| {
        v["name"] = "evil\u{1b}[2J\nsolver       forged".into();
        v["provenance"] = serde_json::json!({"note": "a\rb"});
    });
    let text = ok(&["info", bundle.to_str().unwrap()]);
    assert!(!text.contains('\u{1b}') && !text.contains('\r'), "{text:?}");
    assert!(text.contains("name         evil\\u{1b}[2J\\nsolver       forged"), "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("solver")).count(), 1, "{text}");
}

/// A held-out chain of one draw has no epistemic uncertainty: the ratios against it are
/// undefined and shown as "—", not as rounding noise blown up (3e16 before).
#[test]
fn epistemic_ratios_against_a_single_held_out_draw_are_undefined() {
    use safetensors::{tensor::TensorView, SafeTensors};
    let dir = tempfile::tempdir().unwrap();
    let bundle = copy_fixture("affine_cls", dir.path(), |_| {});
    let path = bundle.join("tensors.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let table = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, TensorView<'_>)> = Vec::new();
    for (name, view) in table.tensors() {
        let view = if name == "posterior.theta" {
            let d = view.shape()[1];
            TensorView::new(view.dtype(), vec![1, d], &view.data()[..4 * d]).unwrap()
        } else {
            view
        };
        tensors.push((name.to_string(), view));
    }
    let out = safetensors::serialize(tensors, None::<std::collections::HashMap<String, String>>).unwrap();
    std::fs::write(&path, out).unwrap();
    let text = ok(&["eval", bundle.to_str().unwrap(), "-n", "16", "-q"]);
    let flow_spread = text.lines().filter(|l| l.starts_with("flow BMA")).nth(1).expect("spread table row");
    // affine_cls has no anchors and no OOD inputs: mem.ratio and epi.ood are "—" anyway; epi.eval is now too.
    assert_eq!(flow_spread.matches('—').count(), 3, "{text}");
}

/// A bundle with `refine.start_time` 1 (format 4): `info` names it, `eval` refines from the
/// stored draws (and reports start time 1), its refinement sweep runs there for every K (K = 0:
/// the stored draws themselves, memorization ratio 0), and `--refine 0` keeps the flow's
/// default start time.
#[test]
fn refinement_from_the_stored_draws_on_the_command_line() {
    let (_dir, bundle) = common::refine_from_stored_draws();
    let b = path_str(&bundle);
    let info = ok(&["info", b]);
    assert!(info.contains("from start time 1 (the stored draws)"), "{info}");
    let v = json(&["eval", b, "-n", "40", "--json", "-q", "--sweep"]);
    assert_eq!((v["flow"]["start_time"].as_f64(), v["flow"]["refine_transitions"].as_u64()), (Some(1.0), Some(3)));
    let zero = &v["refine_sweep"][0];
    assert_eq!(zero["transitions"], 0);
    assert!(zero["memorization_ratio"].as_f64().unwrap() < 1e-3, "K = 0 is the stored draws: {zero}");
    assert!(v["refine_sweep"][1]["memorization_ratio"].as_f64().unwrap() > 0.05);
    let unrefined = json(&["eval", b, "-n", "40", "--json", "-q", "--refine", "0"]);
    assert_eq!(unrefined["flow"]["start_time"].as_f64(), Some(0.5));
    let text = ok(&["eval", b, "-n", "40", "-q", "--sweep"]);
    assert!(text.contains("refinement sweep at refinement's start time 1"), "{text}");
    assert!(text.contains("start time 1: from the 24 stored posterior draws themselves"), "{text}");
}

/// `--refine` on the command line: the bundle's default without it, the refinement sweep of
/// `eval --sweep`, and the requests refinement cannot serve as one-line errors.
#[test]
fn refinement_on_the_command_line() {
    let bundle = common::fixture("affine_refine");
    let b = path_str(&bundle);
    let v = json(&["eval", b, "-n", "40", "--json", "-q", "--sweep"]);
    assert_eq!(v["flow"]["refine_transitions"], 3, "the fixture's default_transitions");
    assert!(v["flow"]["refine_acceptance"].as_f64().unwrap() > 0.5);
    let ks: Vec<u64> =
        v["refine_sweep"].as_array().unwrap().iter().map(|r| r["transitions"].as_u64().unwrap()).collect();
    assert_eq!(ks, [0, 1, 2, 5, 10]);
    // The start-time sweep stays unrefined: its t0 = 0.5 row is the unrefined default.
    let unrefined = json(&["eval", b, "-n", "40", "--json", "-q", "--refine", "0"]);
    assert!(unrefined["flow"]["refine_acceptance"].is_null());
    let row = v["sweep"].as_array().unwrap().iter().find(|r| r["start_time"] == 0.5).unwrap();
    assert!(same(row["tv"].as_f64().unwrap(), unrefined["methods"]["flow"]["tv"].as_f64().unwrap()));
    let zero = &v["refine_sweep"][0];
    assert!(same(zero["tv"].as_f64().unwrap(), unrefined["methods"]["flow"]["tv"].as_f64().unwrap()));
    let text = ok(&["eval", b, "-n", "40", "-q", "--sweep"]);
    for fragment in
        ["refined: 3 HMC transitions", "endpoint kernel, 5 leapfrog steps", "refinement sweep", "K = 10", "acceptance"]
    {
        assert!(text.contains(fragment), "eval text lacks {fragment:?}:\n{text}");
    }
    // The multinomial kernel on request: 2^3 - 1 = 7 steps for the fixture's L = 5, every
    // sample moved; and a trajectory length of the caller's.
    let m = json(&["eval", b, "-n", "40", "--json", "-q", "--refine-kernel", "multinomial"]);
    assert_eq!(
        (m["flow"]["refine_kernel"].as_str(), m["flow"]["refine_leapfrog"].as_u64()),
        (Some("multinomial"), Some(7))
    );
    assert_eq!(m["flow"]["refine_moved"].as_f64(), Some(1.0));
    assert_eq!(v["flow"]["refine_kernel"].as_str(), Some("endpoint"));
    let l = json(&["eval", b, "-n", "40", "--json", "-q", "--refine-leapfrog", "12"]);
    assert_eq!(l["flow"]["refine_leapfrog"].as_u64(), Some(12));
    assert_one_line_error(
        &postflow(&["eval", b, "-n", "8", "--refine-leapfrog", "0"]),
        &["refine_leapfrog 0 is outside"],
    );

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s.safetensors");
    let o = postflow(&["sample", b, "-n", "8", "--refine", "5", "-o", path_str(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("refined by 5 HMC transitions"), "{}", stderr(&o));
    assert_one_line_error(
        &postflow(&["sample", b, "-n", "8", "--refine", "5", "--trace", "exact", "-o", path_str(&out)]),
        &["no density"],
    );
    assert_one_line_error(
        &postflow(&[
            "sample",
            path_str(&common::fixture("affine_cls")),
            "-n",
            "8",
            "--refine",
            "1",
            "-o",
            path_str(&out),
        ]),
        &["needs a bundle with refinement"],
    );
    assert_one_line_error(
        &postflow(&["log-prob", b, "--theta", path_str(&out), "--refine", "2", "-o", path_str(&dir.path().join("l"))]),
        &["--refine"],
    );
}
