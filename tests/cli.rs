//! The `postflow` binary end to end: outputs, defaults and one-line errors.
mod common;

use std::process::{Command, Output};

use safetensors::SafeTensors;

fn postflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_postflow")).args(args).output().expect("run postflow")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failed run: non-zero exit and exactly one line starting with `error:`.
fn assert_one_line_error(o: &Output, fragment: &str) {
    assert!(!o.status.success(), "expected failure, stderr: {}", stderr(o));
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "stderr should be one line: {err:?}");
    assert!(lines[0].starts_with("error: "), "{err:?}");
    assert!(err.contains(fragment), "{err:?} lacks {fragment:?}");
}

fn shapes(path: &std::path::Path) -> Vec<(String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let t = SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<usize>)> = t.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec())).collect();
    v.sort();
    v
}

#[test]
fn sample_then_log_prob() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = common::fixture("affine_cls");
    let samples = dir.path().join("s.safetensors");
    let o = postflow(&[
        "sample",
        bundle.to_str().unwrap(),
        "-n",
        "50",
        "--trace",
        "hutchinson",
        "--probes",
        "3",
        "--seed",
        "9",
        "-q",
        "-o",
        samples.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        shapes(&samples),
        vec![("log_density".into(), vec![50]), ("log_density_stderr".into(), vec![50]), ("theta".into(), vec![50, 17])]
    );
    // Same samples as the library with the same seed.
    let model = common::open("affine_cls");
    let lib = model
        .sample(
            50,
            &postflow::SampleOptions {
                seed: 9,
                trace: postflow::TraceMode::Hutchinson { probes: 3, noise: postflow::ProbeNoise::Rademacher },
                ..Default::default()
            },
        )
        .unwrap();
    let bytes = std::fs::read(&samples).unwrap();
    let table = SafeTensors::deserialize(&bytes).unwrap();
    let theta: Vec<f32> = table
        .tensor("theta")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(theta, lib.theta.as_slice().unwrap());

    let lp = dir.path().join("lp.safetensors");
    let o = postflow(&[
        "log-prob",
        bundle.to_str().unwrap(),
        "--theta",
        samples.to_str().unwrap(),
        "--trace",
        "exact",
        "-o",
        lp.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(shapes(&lp), vec![("log_density".into(), vec![50])]);

    // Without a trace only theta is written.
    let plain = dir.path().join("plain.safetensors");
    let o = postflow(&["sample", bundle.to_str().unwrap(), "-n", "5", "-q", "-o", plain.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(shapes(&plain), vec![("theta".into(), vec![5, 17])]);
}

#[test]
fn errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let out = out.to_str().unwrap();
    let bundle = common::fixture("affine_cls");
    let bundle = bundle.to_str().unwrap();
    assert_one_line_error(&postflow(&["sample", "/no/such/bundle", "-n", "2", "-o", out]), "/no/such/bundle");
    assert_one_line_error(&postflow(&["sample", bundle, "-n", "0", "-o", out]), "-n must be at least 1");
    assert_one_line_error(
        &postflow(&["sample", bundle, "-n", "2", "--onnxruntime", "/no/libonnxruntime.so", "-o", out]),
        "tried: /no/libonnxruntime.so: not found",
    );
    assert_one_line_error(
        &postflow(&["sample", bundle, "-n", "2", "--solver", "dopri5", "--rtol=-1", "-o", out]),
        "rtol must be finite and > 0",
    );
    assert_one_line_error(&postflow(&["sample", bundle, "-n", "2", "--steps", "0", "-o", out]), "steps must be >= 1");
    assert_one_line_error(
        &postflow(&["sample", bundle, "-n", "2", "--trace", "hutchinson", "--probes", "100000", "-o", out]),
        "probes must be in",
    );
    assert_one_line_error(
        &postflow(&["log-prob", bundle, "--theta", "/no/theta.safetensors", "-o", out]),
        "/no/theta.safetensors",
    );
    // Weights of the wrong width.
    let other = dir.path().join("reg.safetensors");
    let reg = common::fixture("affine_reg");
    assert!(postflow(&["sample", reg.to_str().unwrap(), "-n", "3", "-q", "-o", other.to_str().unwrap()])
        .status
        .success());
    assert_one_line_error(
        &postflow(&["log-prob", bundle, "--theta", other.to_str().unwrap(), "-o", out]),
        "theta has 13 columns, the model has D = 17",
    );
    let own = dir.path().join("own.safetensors");
    assert!(postflow(&["sample", bundle, "-n", "3", "-q", "-o", own.to_str().unwrap()]).status.success());
    // log-prob always computes a log-density: `--trace none` is no accepted value.
    let o = postflow(&["log-prob", bundle, "--theta", own.to_str().unwrap(), "--trace", "none", "-o", out]);
    assert_eq!(o.status.code(), Some(2));
    assert_one_line_error(&o, "invalid value 'none' for '--trace <TRACE>' [possible values: hutchinson,");
    let help = String::from_utf8_lossy(&postflow(&["log-prob", "--help"]).stdout).into_owned();
    let trace_line = help.lines().find(|l| l.contains("--trace <TRACE>")).expect("--trace in the help");
    assert!(!trace_line.contains("none"), "{trace_line}");
}

#[test]
fn a_missing_onnxruntime_names_every_path_tried() {
    let o = Command::new(env!("CARGO_BIN_EXE_postflow"))
        .args(["sample", common::fixture("affine_cls").to_str().unwrap(), "-n", "1", "-o", "/tmp/never"])
        .env("POSTFLOW_ORT_LIB", "/nowhere/a.so")
        .env("ORT_DYLIB_PATH", "/nowhere/b.so")
        .output()
        .unwrap();
    // The repository's .ort/ may still provide the library; if it does, sampling works.
    if !o.status.success() {
        let err = stderr(&o);
        assert!(err.contains("/nowhere/a.so") && err.contains("/nowhere/b.so"), "{err}");
    } else {
        assert!(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".ort/libonnxruntime.so").exists());
    }
}

#[test]
fn usage_errors_are_one_line_too() {
    let o = postflow(&["sample", "x", "-n", "2", "--solver", "rk5", "-o", "y"]);
    assert_eq!(o.status.code(), Some(2));
    assert_one_line_error(&o, "rk5");
    let o = postflow(&["bogus-command"]);
    assert_one_line_error(&o, "bogus-command");
}

/// The one line keeps clap's whole message: which arguments are missing, the possible
/// values; with no command at all the help is shown.
#[test]
fn usage_errors_keep_their_details() {
    let o = postflow(&["sample", "x"]);
    assert_eq!(o.status.code(), Some(2));
    assert_one_line_error(&o, "not provided: --num-samples <N>, --output <OUTPUT> (see --help)");
    let o = postflow(&["sample", "x", "-n", "2", "--solver", "rk5", "-o", "y"]);
    assert_one_line_error(&o, "[possible values: euler, heun, rk4, dopri5]");
    assert!(stderr(&o).contains("tip: a similar value exists: 'rk4'"), "{}", stderr(&o));
    let o = postflow(&["sample", "x", "-n", "2", "-o", "y", "--sover", "rk4"]);
    assert_one_line_error(&o, "a similar argument exists: '--solver'");
    let o = postflow(&[]);
    assert_eq!(o.status.code(), Some(2));
    let help = stderr(&o);
    assert!(!help.contains("error"), "{help}");
    for fragment in ["Usage: postflow <COMMAND>", "sample", "log-prob", "predict", "eval", "info"] {
        assert!(help.contains(fragment), "{help}");
    }
}

/// ONNX Runtime's own log lines stay off the host's stderr: a failing run reports one
/// postflow error (which carries ONNX Runtime's message); `POSTFLOW_ORT_LOG` brings them back.
#[test]
fn onnxruntime_log_lines_only_with_postflow_ort_log() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let bundle = root.join("tests/fixtures/hostile/lying_flow");
    let out = std::env::temp_dir().join(format!("postflow-cli-ortlog-{}.safetensors", std::process::id()));
    let args = ["sample", bundle.to_str().unwrap(), "-q", "-n", "3", "-o", out.to_str().unwrap()];
    let quiet =
        Command::new(env!("CARGO_BIN_EXE_postflow")).args(args).env_remove("POSTFLOW_ORT_LOG").output().unwrap();
    assert_one_line_error(&quiet, "graph flow: ONNX Runtime");
    assert!(!stderr(&quiet).contains("onnxruntime ["), "{}", stderr(&quiet));
    let loud = Command::new(env!("CARGO_BIN_EXE_postflow")).args(args).env("POSTFLOW_ORT_LOG", "1").output().unwrap();
    assert!(!loud.status.success());
    assert!(stderr(&loud).contains("onnxruntime [Error]"), "{}", stderr(&loud));
}

/// An absurd `-n` is a one-line error (exit 1), not a panic or an allocator abort.
#[test]
fn a_huge_sample_count_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let bundle = common::fixture("affine_cls");
    for n in ["18446744073709551615", "4611686018427387904", "1000000000000000"] {
        let o = postflow(&["sample", bundle.to_str().unwrap(), "-n", n, "-q", "-o", out.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert_one_line_error(&o, "do not fit in memory");
        assert!(!out.exists());
    }
}

fn file_names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// A write that fails half-way (here past a file-size limit, `ulimit -f`, with SIGXFSZ
/// ignored so the write returns EFBIG) leaves an existing output as it was and no
/// temporary file; a successful one replaces it whole, again leaving no temporary file.
#[cfg(unix)]
#[test]
fn a_failed_write_keeps_the_existing_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let out_s = out.to_str().unwrap();
    std::fs::write(&out, "precious").unwrap();
    let bundle = common::fixture("affine_cls");
    let args = ["sample", bundle.to_str().unwrap(), "-n", "1000", "-q", "-o", out_s];
    let limited = Command::new("sh")
        .args(["-c", "trap '' XFSZ; ulimit -f 4 && exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_postflow")])
        .args(args)
        .output()
        .unwrap();
    assert_eq!(limited.status.code(), Some(1), "{}", stderr(&limited));
    assert_one_line_error(&limited, out_s);
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    assert_eq!(file_names(dir.path()), ["o.safetensors"]);

    // A run that fails before writing leaves it too.
    assert_one_line_error(
        &postflow(&["sample", bundle.to_str().unwrap(), "-n", "2", "--steps", "0", "-o", out_s]),
        "steps",
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");

    let o = postflow(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(shapes(&out), vec![("theta".into(), vec![1000, 17])]);
    assert_eq!(file_names(dir.path()), ["o.safetensors"]);
}

/// A negative number is a value, not a flag: its range error is shown (not
/// "unexpected argument '-0'").
#[test]
fn negative_numbers_are_values() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let out = out.to_str().unwrap();
    let bundle = common::fixture("affine_anchored");
    let b = bundle.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["sample", b, "-n", "2", "-q", "-o", out];
        args.extend(extra);
        postflow(&args)
    };
    assert_one_line_error(&run(&["--start-time", "-0.5"]), "start_time must be in [0, 1], got -0.5");
    assert_one_line_error(&run(&["--solver", "dopri5", "--rtol", "-1"]), "rtol must be finite and > 0, got -1");
    assert_one_line_error(&run(&["--solver", "dopri5", "--atol", "-1e-3"]), "atol must be finite and > 0, got -0.001");
    for (flag, value) in [("--steps", "-3"), ("--seed", "-1"), ("--batch", "-2"), ("--probes", "-1")] {
        let o = run(&[flag, value]);
        assert_eq!(o.status.code(), Some(2));
        assert_one_line_error(&o, &format!("invalid value '{value}'"));
    }
    let o = postflow(&["eval", b, "-q", "--start-time", "-0.5"]);
    assert_one_line_error(&o, "start_time must be in [0, 1], got -0.5");
}

fn tensor(path: &std::path::Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let table = SafeTensors::deserialize(&bytes).unwrap();
    let data = table.tensor(name).unwrap().data().to_vec();
    data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// `--trace hutchinson` uses the bundle's probe noise (flow.hutchinson.noise);
/// `hutchinson-rademacher` and `hutchinson-gaussian` choose one.
#[test]
fn hutchinson_takes_the_bundles_noise() {
    let dir = tempfile::tempdir().unwrap();
    // affine_cls with Gaussian probes.
    let gaussian = dir.path().join("gaussian");
    std::fs::create_dir(&gaussian).unwrap();
    for entry in std::fs::read_dir(common::fixture("affine_cls")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), gaussian.join(entry.file_name())).unwrap();
    }
    let manifest = gaussian.join("postflow.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(v["flow"]["hutchinson"]["noise"], "rademacher");
    v["flow"]["hutchinson"]["noise"] = "gaussian".into();
    std::fs::write(&manifest, serde_json::to_vec_pretty(&v).unwrap()).unwrap();

    let log_density = |bundle: &std::path::Path, trace: &str| {
        let out = dir.path().join(format!("{}-{trace}.safetensors", bundle.file_name().unwrap().to_str().unwrap()));
        let args =
            ["sample", bundle.to_str().unwrap(), "-n", "20", "--trace", trace, "-q", "-o", out.to_str().unwrap()];
        let o = postflow(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        tensor(&out, "log_density")
    };
    let g = log_density(&gaussian, "hutchinson");
    assert_eq!(g, log_density(&gaussian, "hutchinson-gaussian"));
    assert_ne!(g, log_density(&gaussian, "hutchinson-rademacher"));
    let original = common::fixture("affine_cls");
    let r = log_density(&original, "hutchinson");
    assert_eq!(r, log_density(&original, "hutchinson-rademacher"));
    assert_ne!(r, g);

    // log-prob's default trace is hutchinson: the bundle's noise too.
    let theta = dir.path().join("gaussian-hutchinson.safetensors");
    let lp = |extra: &[&str]| {
        let out = dir.path().join("lp.safetensors");
        let mut args = vec!["log-prob", gaussian.to_str().unwrap(), "--theta", theta.to_str().unwrap()];
        args.extend(extra);
        args.extend(["-q", "-o", out.to_str().unwrap()]);
        let o = postflow(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        tensor(&out, "log_density")
    };
    assert_eq!(lp(&[]), lp(&["--trace", "hutchinson-gaussian"]));
    assert_ne!(lp(&[]), lp(&["--trace", "hutchinson-rademacher"]));
}

/// `--first-index K`: runs over consecutive ranges (split on a batch boundary) write what one
/// run writes, `log-prob --first-index` uses those samples' probes, and an index range past
/// u64 is a one-line error.
#[test]
fn first_index_continues_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = common::fixture("affine_cls");
    let bundle = bundle.to_str().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec!["sample", bundle, "--trace", "hutchinson", "--seed", "5", "--batch", "4", "-q"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-o", out.to_str().unwrap()]);
        let o = postflow(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        out
    };
    let whole = run("whole.safetensors", &["-n", "12"]);
    let head = run("head.safetensors", &["-n", "8"]);
    let tail = run("tail.safetensors", &["-n", "4", "--first-index", "8"]);
    for name in ["theta", "log_density"] {
        assert_eq!([tensor(&head, name), tensor(&tail, name)].concat(), tensor(&whole, name), "{name}");
    }
    assert_ne!(tensor(&tail, "theta"), tensor(&head, "theta")[..4 * 17], "index 8 is not index 0");

    let lp = dir.path().join("lp.safetensors");
    let args = ["log-prob", bundle, "--theta", tail.to_str().unwrap(), "--trace", "hutchinson", "--seed", "5"];
    let o = postflow(&[&args[..], &["--batch", "4", "--first-index", "8", "-q", "-o", lp.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    for (got, want) in tensor(&lp, "log_density").iter().zip(tensor(&tail, "log_density")) {
        assert!((got - want).abs() < 1e-3, "log-prob {got} against the sample's own {want}");
    }
    let out = dir.path().join("never.safetensors");
    let o =
        postflow(&["sample", bundle, "-n", "2", "--first-index", "18446744073709551615", "-o", out.to_str().unwrap()]);
    assert_one_line_error(&o, "--first-index 18446744073709551615 + 2 samples overflows");
    assert!(!out.exists());
}
