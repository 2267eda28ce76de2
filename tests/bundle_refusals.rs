//! Every refusal of `docs/bundle-format.md`, each fed by a broken copy of a good
//! fixture bundle, each with its message checked; and the process stays healthy.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use postflow::{ErrorKind, Limits, Model, ModelOptions, SampleOptions};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// A temporary copy of a fixture bundle.
struct Copy {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn copy_of(name: &str) -> Copy {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::create_dir(&path).unwrap();
    for entry in std::fs::read_dir(common::fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), path.join(entry.file_name())).unwrap();
    }
    Copy { _dir: dir, path }
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join("postflow.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn edit_tensors(dir: &Path, f: impl FnOnce(&mut Tensors)) {
    let p = dir.join("tensors.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let table = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Tensors = table
        .tensors()
        .into_iter()
        .map(|(n, v)| (n.to_string(), v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    f(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, dt, sh, data)| (n.clone(), safetensors::tensor::TensorView::new(*dt, sh.clone(), data).unwrap()))
        .collect();
    std::fs::write(&p, safetensors::serialize(views, None::<HashMap<String, String>>).unwrap()).unwrap();
}

fn set_f32(tensors: &mut Tensors, name: &str, index: usize, value: f32) {
    let t = tensors.iter_mut().find(|t| t.0 == name).unwrap();
    t.3[index * 4..index * 4 + 4].copy_from_slice(&value.to_le_bytes());
}

fn open_err(dir: &Path) -> postflow::Error {
    match Model::open(dir, &ModelOptions::default()) {
        Ok(_) => panic!("{} opened but should have been refused", dir.display()),
        Err(e) => e,
    }
}

/// Refused with `kind`, and a message containing every fragment.
fn assert_refused(dir: &Path, kind: ErrorKind, fragments: &[&str]) {
    let e = open_err(dir);
    assert_eq!(e.kind(), kind, "kind of: {}", e.message());
    for f in fragments {
        assert!(e.message().contains(f), "message {:?} lacks {f:?}", e.message());
    }
    // The process is still healthy: a good bundle loads and samples.
    let good = common::open("affine_cls");
    good.sample(2, &SampleOptions::default()).unwrap();
}

fn manifest_case(f: impl FnOnce(&mut Value), kind: ErrorKind, fragments: &[&str]) {
    let c = copy_of("affine_cls");
    edit_manifest(&c.path, f);
    assert_refused(&c.path, kind, fragments);
}

#[test]
fn unknown_format_and_version() {
    manifest_case(|m| m["format"] = "onnx-bundle".into(), ErrorKind::Bundle, &["format", "onnx-bundle"]);
    manifest_case(
        |m| m["format_version"] = 5.into(),
        ErrorKind::Bundle,
        &["format_version", "unsupported version 5", "versions 1 to 4"],
    );
    manifest_case(
        |m| m["format_version"] = "1".into(),
        ErrorKind::Bundle,
        &["format_version", "missing or not an integer"],
    );
}

#[test]
fn file_names_must_stay_inside_the_bundle() {
    manifest_case(
        |m| m["graphs"]["flow"]["file"] = "/etc/passwd".into(),
        ErrorKind::Bundle,
        &["graphs.flow.file", "absolute"],
    );
    manifest_case(
        |m| m["graphs"]["net"]["file"] = "../net.onnx".into(),
        ErrorKind::Bundle,
        &["graphs.net.file", "'..'"],
    );
    manifest_case(|m| m["tensors"] = "sub/../../x".into(), ErrorKind::Bundle, &["tensors", "'..'"]);
    manifest_case(
        |m| m["graphs"]["flow_jvp"]["file"] = "missing.onnx".into(),
        ErrorKind::Bundle,
        &["graphs.flow_jvp.file", "does not exist"],
    );
}

#[cfg(unix)]
#[test]
fn symlink_leaving_the_bundle_is_refused() {
    let c = copy_of("affine_cls");
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("flow.onnx");
    std::fs::copy(c.path.join("flow.onnx"), &target).unwrap();
    std::fs::remove_file(c.path.join("flow.onnx")).unwrap();
    std::os::unix::fs::symlink(&target, c.path.join("flow.onnx")).unwrap();
    assert_refused(&c.path, ErrorKind::Bundle, &["graphs.flow.file", "outside the bundle folder"]);
}

#[test]
fn non_finite_and_non_positive_whitening() {
    for (name, value, fragment) in [
        ("flow.whiten.mean", f32::NAN, "non-finite"),
        ("flow.whiten.scale", f32::INFINITY, "non-finite"),
        ("flow.whiten.scale", 0.0, "must be > 0"),
        ("flow.whiten.scale", -1.0, "must be > 0"),
        ("posterior.theta", f32::NAN, "non-finite"),
        ("reference.theta", f32::NEG_INFINITY, "non-finite"),
    ] {
        let c = copy_of("affine_cls");
        edit_tensors(&c.path, |t| set_f32(t, name, 3, value));
        assert_refused(&c.path, ErrorKind::Bundle, &[name, fragment]);
    }
}

#[test]
fn dimensions_that_disagree() {
    manifest_case(|m| m["flow"]["dim"] = 18.into(), ErrorKind::Bundle, &["flow.dim", "disagrees with network.dim 17"]);
    manifest_case(|m| m["input"]["dim"] = 3.into(), ErrorKind::Bundle, &["input.feature_names", "input.dim 3"]);
    manifest_case(
        |m| {
            m["input"]["dim"] = 3.into();
            m["input"]["feature_names"] = Value::Null;
        },
        ErrorKind::Bundle,
        &["network.layers[0].in"],
    );
    manifest_case(|m| m["task"]["classes"] = 3.into(), ErrorKind::Bundle, &["task"]);
    manifest_case(|m| m["network"]["layers"][1]["bias"]["offset"] = 16.into(), ErrorKind::Bundle, &["offset"]);
    manifest_case(|m| m["network"]["dim"] = 20.into(), ErrorKind::Bundle, &["disagrees"]);
    manifest_case(
        |m| m["network"]["layers"][0]["activation"] = "identity".into(),
        ErrorKind::Bundle,
        &["network.layers[0].activation"],
    );
    manifest_case(
        |m| m["flow"]["default_solver"]["method"] = "rk45".into(),
        ErrorKind::Bundle,
        &["flow.default_solver.method"],
    );
    manifest_case(|m| m["flow"]["hutchinson"]["probes"] = 0.into(), ErrorKind::Bundle, &["flow.hutchinson.probes"]);
    manifest_case(
        |m| m["graphs"]["flow"]["inputs"] = serde_json::json!(["t"]),
        ErrorKind::Bundle,
        &["graphs.flow.inputs"],
    );
}

#[test]
fn tensors_of_wrong_shape_dtype_or_missing() {
    let c = copy_of("affine_cls");
    edit_tensors(&c.path, |t| {
        let w = t.iter_mut().find(|t| t.0 == "flow.whiten.mean").unwrap();
        w.2 = vec![16];
        w.3.truncate(16 * 4);
    });
    assert_refused(&c.path, ErrorKind::Bundle, &["flow.whiten.mean", "[16]", "[17]"]);

    let c = copy_of("affine_cls");
    edit_tensors(&c.path, |t| {
        let w = t.iter_mut().find(|t| t.0 == "reference.theta").unwrap();
        w.1 = Dtype::I32;
    });
    assert_refused(&c.path, ErrorKind::Bundle, &["reference.theta", "dtype"]);

    let c = copy_of("affine_cls");
    edit_tensors(&c.path, |t| t.retain(|t| t.0 != "eval.hmc_probs"));
    assert_refused(&c.path, ErrorKind::Bundle, &["eval.hmc_probs", "missing"]);

    let c = copy_of("affine_cls");
    edit_tensors(&c.path, |t| {
        let y = t.iter_mut().find(|t| t.0 == "eval.y").unwrap();
        y.3[0..8].copy_from_slice(&7i64.to_le_bytes());
    });
    assert_refused(&c.path, ErrorKind::Bundle, &["eval.y", "outside [0, 2)"]);

    let c = copy_of("affine_cls");
    std::fs::write(c.path.join("tensors.safetensors"), b"not safetensors at all").unwrap();
    assert_refused(&c.path, ErrorKind::Bundle, &["not valid safetensors"]);
}

fn anchored_case(edit: impl FnOnce(&mut Value), edit_t: impl FnOnce(&mut Tensors), fragments: &[&str]) {
    let c = copy_of("affine_anchored");
    edit_manifest(&c.path, edit);
    edit_tensors(&c.path, edit_t);
    assert_refused(&c.path, ErrorKind::Bundle, fragments);
}

/// Hostile anchors (format version 2): each is refused at open, naming what is wrong.
#[test]
fn anchors_of_wrong_shape_dtype_values_or_without_a_manifest_entry() {
    let anchors = |t: &mut Tensors| -> usize { t.iter().position(|t| t.0 == "flow.anchors").unwrap() };
    // Wrong shape: one anchor row short of the declared count.
    anchored_case(
        |_| {},
        |t| {
            let i = anchors(t);
            t[i].2 = vec![23, 17];
            t[i].3.truncate(23 * 17 * 2);
        },
        &["flow.anchors", "[23, 17]", "[24, 17]"],
    );
    // A declared count that disagrees with the tensor.
    anchored_case(|m| m["flow"]["anchors"]["count"] = 12.into(), |_| {}, &["flow.anchors", "[12, 17]"]);
    // Dtype other than the manifest says (f32 bytes under an f16 declaration).
    anchored_case(
        |_| {},
        |t| {
            let i = anchors(t);
            t[i].1 = Dtype::F32;
            t[i].2 = vec![12, 17];
        },
        &["flow.anchors", "dtype"],
    );
    anchored_case(|m| m["flow"]["anchors"]["dtype"] = "bf16".into(), |_| {}, &["flow.anchors.dtype", "bf16"]);
    // NaN (f16 0x7E00) and Inf (0x7C00).
    for bits in [0x7E00u16, 0x7C00] {
        anchored_case(
            |_| {},
            |t| {
                let i = anchors(t);
                t[i].3[2 * 40..2 * 40 + 2].copy_from_slice(&bits.to_le_bytes());
            },
            &["flow.anchors", "non-finite", "flat index 40"],
        );
    }
    // Anchors in the tensors with no manifest entry, or declared but missing.
    anchored_case(
        |m| {
            let flow = m["flow"].as_object_mut().unwrap();
            flow.remove("anchors");
            flow.remove("default_start_time");
        },
        |_| {},
        &["flow.anchors", "no flow.anchors entry"],
    );
    anchored_case(|_| {}, |t| t.retain(|t| t.0 != "flow.anchors"), &["flow.anchors", "missing"]);
    // Version-1 manifests cannot carry anchors (a version-1 runtime would ignore them).
    anchored_case(|m| m["format_version"] = 1.into(), |_| {}, &["flow.anchors", "format_version 2"]);
    // Default start time out of range, or above 0 without anchors.
    anchored_case(|m| m["flow"]["default_start_time"] = 1.5.into(), |_| {}, &["default_start_time", "outside [0, 1]"]);
    anchored_case(
        |m| {
            m["flow"].as_object_mut().unwrap().remove("anchors");
        },
        |t| t.retain(|t| t.0 != "flow.anchors"),
        &["default_start_time", "needs flow.anchors"],
    );
    anchored_case(|m| m["flow"]["anchors"]["count"] = 0.into(), |_| {}, &["flow.anchors.count", ">= 1"]);
    // eval.ood_x of the wrong width.
    anchored_case(
        |_| {},
        |t| {
            let i = t.iter().position(|t| t.0 == "eval.ood_x").unwrap();
            let rows = t[i].2[0];
            t[i].2 = vec![rows * 2, 1];
        },
        &["eval.ood_x", "[64, 1]"],
    );
}

#[test]
fn declared_sizes_over_the_limits_are_refused_before_allocating() {
    manifest_case(
        |m| m["network"]["dim"] = 1_000_000_000_000u64.into(),
        ErrorKind::Bundle,
        &["network.dim", "max_weight_dim"],
    );
    let c = copy_of("affine_cls");
    let limits = Limits { max_tensors_bytes: 100, ..Limits::default() };
    let e = Model::open(&c.path, &ModelOptions { limits, ..ModelOptions::default() }).err().unwrap();
    assert!(e.message().contains("over the limit of 100 bytes"), "{}", e.message());
}

#[test]
fn graphs_that_disagree_with_the_manifest() {
    // Wrong input name declared in the manifest.
    manifest_case(
        |m| m["graphs"]["flow"]["inputs"] = serde_json::json!(["time", "x"]),
        ErrorKind::Bundle,
        &["graph flow", "no input named \"time\""],
    );
    // A graph for another D (the regression fixture's net has D = 13).
    let c = copy_of("affine_cls");
    std::fs::copy(common::fixture("affine_reg").join("net.onnx"), c.path.join("net.onnx")).unwrap();
    assert_refused(&c.path, ErrorKind::Bundle, &["graph net", "axis 1"]);
    // flow.onnx where flow_jvp.onnx belongs: wrong number of inputs.
    let c = copy_of("affine_cls");
    std::fs::copy(c.path.join("flow.onnx"), c.path.join("flow_jvp.onnx")).unwrap();
    assert_refused(&c.path, ErrorKind::Bundle, &["graph flow_jvp", "inputs"]);
    // A truncated ONNX file.
    let c = copy_of("affine_cls");
    let bytes = std::fs::read(c.path.join("flow.onnx")).unwrap();
    std::fs::write(c.path.join("flow.onnx"), &bytes[..bytes.len() / 2]).unwrap();
    assert_refused(&c.path, ErrorKind::Runtime, &["graph flow", "could not load the ONNX graph"]);
}

#[test]
fn not_a_bundle() {
    let e = open_err(Path::new("/definitely/not/here"));
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.message().contains("/definitely/not/here"));
    let c = copy_of("affine_cls");
    std::fs::remove_file(c.path.join("postflow.json")).unwrap();
    assert_refused(&c.path, ErrorKind::Bundle, &["manifest", "does not exist"]);
    let c = copy_of("affine_cls");
    std::fs::write(c.path.join("postflow.json"), b"{ not json").unwrap();
    assert_refused(&c.path, ErrorKind::Bundle, &["not valid JSON"]);
    let file = c.path.join("flow.onnx");
    assert_refused(&file, ErrorKind::Bundle, &["not a bundle folder"]);
}

#[test]
fn a_loaded_model_survives_its_files_being_removed() {
    let c = copy_of("affine_cls");
    let model = Model::open(&c.path, &ModelOptions::default()).unwrap();
    let before = model.sample(4, &SampleOptions::default()).unwrap();
    std::fs::remove_dir_all(&c.path).unwrap();
    let after = model.sample(4, &SampleOptions::default()).unwrap();
    assert_eq!(before.theta, after.theta);
}

#[test]
fn cuda_without_support_is_a_clear_error() {
    let options = ModelOptions { device: postflow::Device::Cuda(0), ..ModelOptions::default() };
    match Model::open(common::fixture("affine_cls"), &options) {
        Ok(_) => {
            // Only possible on a CUDA build with a GPU: then CUDA must really work.
            assert!(cfg!(feature = "cuda"));
        }
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{}", e.message());
            assert!(e.message().contains("CUDA"), "{}", e.message());
        }
    }
}

fn sphere_case(name: &str, edit: impl FnOnce(&mut Value), edit_t: impl FnOnce(&mut Tensors), fragments: &[&str]) {
    let c = copy_of(name);
    edit_manifest(&c.path, edit);
    edit_tensors(&c.path, edit_t);
    assert_refused(&c.path, ErrorKind::Bundle, fragments);
}

/// `flow.geometry`: unknown names, and sphere_product bundles whose layout, whitening or
/// stored draws contradict the spheres.
#[test]
fn geometry_refusals() {
    // An unknown geometry name.
    manifest_case(|m| m["flow"]["geometry"] = "hyperbolic".into(), ErrorKind::Bundle, &["flow.geometry", "hyperbolic"]);
    // A Euclidean bundle relabelled sphere_product: its whitening is no identity on the
    // sphere coordinates (index 0 is layer 0 unit 0's first weight).
    manifest_case(
        |m| m["flow"]["geometry"] = "sphere_product".into(),
        ErrorKind::Bundle,
        &["flow.whiten.mean", "index 0", "sphere coordinate", "Euclidean coordinates only"],
    );
    // Whitening that is not the identity on one sphere coordinate (21: layer 1 unit 0's bias).
    for (name, value) in [("flow.whiten.mean", 0.25f32), ("flow.whiten.scale", 2.0)] {
        sphere_case(
            "sphere_linear",
            |_| {},
            |t| set_f32(t, name, 21, value),
            &[name, "index 21", "sphere coordinate of geometry sphere_product", "must be"],
        );
    }
    // A layout that contradicts the draws: bias before weights in layer 0 tiles [0, D) as
    // well, but then the canonical draws are no longer on the spheres it defines.
    sphere_case(
        "sphere_linear",
        |m| {
            m["network"]["layers"][0]["bias"]["offset"] = 0.into();
            m["network"]["layers"][0]["weight"]["offset"] = 3.into();
        },
        |_| {},
        &["reference.theta", "off the slice", "hidden layer 0 unit"],
    );
    // One held-out draw off the slice (its unit scaled by 1.5).
    sphere_case(
        "sphere_linear",
        |_| {},
        |t| {
            let p = t.iter_mut().find(|t| t.0 == "posterior.theta").unwrap();
            let d = p.2[1];
            for i in [3 * d + 9, 3 * d + 10, 3 * d + 11, 3 * d + 21] {
                let v = f32::from_le_bytes(p.3[i * 4..i * 4 + 4].try_into().unwrap()) * 1.5;
                p.3[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
            }
        },
        &["posterior.theta", "row 3", "hidden layer 1 unit 0", "off the slice"],
    );
    // Anchors off the slice: one anchor's unit scaled by 1.01 (beyond the f16 tolerance 1e-3).
    sphere_case(
        "sphere_tanh",
        |_| {},
        |t| {
            let a = t.iter_mut().find(|t| t.0 == "flow.anchors").unwrap();
            let d = a.2[1];
            for i in [5 * d + 10, 5 * d + 11, 5 * d + 12, 5 * d + 13, 5 * d + 14, 5 * d + 17] {
                let v = half::f16::from_le_bytes([a.3[2 * i], a.3[2 * i + 1]]).to_f32() * 1.01;
                a.3[2 * i..2 * i + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
        },
        &["flow.anchors", "row 5", "hidden layer 0 unit 2", "off the slice"],
    );
}

/// sphere_product needs hidden units: a network that is one dense layer has no sphere.
#[test]
fn sphere_product_without_hidden_layers_is_refused() {
    let bytes = std::fs::read(common::fixture("affine_cls").join("postflow.json")).unwrap();
    let mut m: Value = serde_json::from_slice(&bytes).unwrap();
    m["flow"]["geometry"] = "sphere_product".into();
    m["network"]["layers"] = serde_json::json!([{
        "kind": "dense", "in": 2, "out": 2, "activation": "identity",
        "weight": {"offset": 0, "shape": [2, 2]}, "bias": {"offset": 4, "shape": [2]}
    }]);
    m["network"]["dim"] = 6.into();
    m["flow"]["dim"] = 6.into();
    let e = postflow::bundle::parse_manifest(&serde_json::to_vec(&m).unwrap(), &Limits::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Bundle);
    for f in ["flow.geometry", "no hidden layer"] {
        assert!(e.message().contains(f), "{:?} lacks {f:?}", e.message());
    }
    m["flow"]["geometry"] = "euclidean".into();
    postflow::bundle::parse_manifest(&serde_json::to_vec(&m).unwrap(), &Limits::default()).unwrap();
}

/// Manifest defaults the sampler could never run, and eval tensors that are not what
/// their names promise, are refused at open (not at the first `sample`/`eval`).
#[test]
fn defaults_beyond_the_samplers_limits_and_malformed_eval_targets() {
    manifest_case(
        |m| m["flow"]["hutchinson"]["probes"] = 5000.into(),
        ErrorKind::Bundle,
        &["flow.hutchinson.probes", "5000 is outside [1, 4096]"],
    );
    manifest_case(
        |m| m["flow"]["default_solver"]["steps"] = 4_000_000_000u64.into(),
        ErrorKind::Bundle,
        &["flow.default_solver.steps", "outside [1, 1000000]"],
    );
    // A hidden layer wider than max_outputs (docs/reliability.md: it bounds layer widths).
    // affine_cls: 2 inputs, a hidden layer of 3, 2 classes.
    let c = copy_of("affine_cls");
    let limits = Limits { max_outputs: 2, ..Limits::default() };
    let e = Model::open(&c.path, &ModelOptions { limits, ..ModelOptions::default() }).err().unwrap();
    assert!(e.message().contains("network.layers[0].out: 3 is outside [1, 2]"), "{}", e.message());

    // HMC's class probabilities: each row a distribution.
    for (value, what) in [(0.0f32, "sum 0"), (-3.0, "entries >= 0")] {
        let c = copy_of("affine_cls");
        edit_tensors(&c.path, |t| {
            for i in 0..2 {
                set_f32(t, "eval.hmc_probs", 2 + i, value); // row 1, both classes
            }
        });
        assert_refused(&c.path, ErrorKind::Bundle, &["eval.hmc_probs", "row 1", what]);
    }
    // eval.ood_x with no rows.
    anchored_case(
        |_| {},
        |t| {
            let i = t.iter().position(|t| t.0 == "eval.ood_x").unwrap();
            t[i].2 = vec![0, 2];
            t[i].3.clear();
        },
        &["eval.ood_x", "no rows"],
    );
}

/// A misspelt manifest field is refused, naming it, instead of silently taking a default
/// (`default_start_tme` would sample at t₀ = 0 with no warning).
#[test]
fn misspelt_manifest_fields_are_refused() {
    manifest_case(
        |m| m["flow"]["default_start_tme"] = 0.5.into(),
        ErrorKind::Bundle,
        &["unknown field `default_start_tme`", "default_start_time"],
    );
    manifest_case(|m| m["descripton"] = "x".into(), ErrorKind::Bundle, &["unknown field `descripton`"]);
    manifest_case(|m| m["graphs"]["net"]["fille"] = "net.onnx".into(), ErrorKind::Bundle, &["unknown field `fille`"]);
    manifest_case(|m| m["task"]["class_nams"] = serde_json::json!(["a", "b"]), ErrorKind::Bundle, &["class_nams"]);
}

fn refine_case(edit: impl FnOnce(&mut Value), edit_t: impl FnOnce(&mut Tensors), fragments: &[&str]) {
    let c = copy_of("affine_refine");
    edit_manifest(&c.path, edit);
    edit_tensors(&c.path, edit_t);
    assert_refused(&c.path, ErrorKind::Bundle, fragments);
}

/// Hostile refinement tables and tensors (format version 3): each refused at open, by name.
#[test]
fn refinement_of_wrong_version_ranges_tensors_or_graph() {
    // `refine` and version 3 go together.
    refine_case(|m| m["format_version"] = 2.into(), |_| {}, &["refine", "format_version 3"]);
    refine_case(
        |m| {
            m.as_object_mut().unwrap().remove("refine");
        },
        |t| t.retain(|t| !t.0.starts_with("refine.")),
        &["refine", "missing"],
    );
    // Ranges.
    refine_case(|m| m["refine"]["leapfrog_steps"] = 0.into(), |_| {}, &["refine.leapfrog_steps", "[1, 1000]"]);
    refine_case(|m| m["refine"]["leapfrog_steps"] = 1001.into(), |_| {}, &["refine.leapfrog_steps"]);
    refine_case(|m| m["refine"]["step_size"] = (-0.1).into(), |_| {}, &["refine.step_size", "> 0"]);
    refine_case(|m| m["refine"]["step_size"] = 0.0.into(), |_| {}, &["refine.step_size"]);
    refine_case(|m| m["refine"]["default_transitions"] = 10_001.into(), |_| {}, &["refine.default_transitions"]);
    refine_case(|m| m["refine"]["steps"] = 3.into(), |_| {}, &["unknown field", "steps"]);
    // refine.start_time is format version 4, in [0, 1], and above 0 only with anchors.
    refine_case(|m| m["refine"]["start_time"] = 1.0.into(), |_| {}, &["refine.start_time", "format_version 4"]);
    refine_case(
        |m| {
            m["format_version"] = 4.into();
            m.as_object_mut().unwrap().remove("refine");
        },
        |t| t.retain(|t| !t.0.starts_with("refine.")),
        &["refine", "missing"],
    );
    refine_case(
        |m| {
            m["format_version"] = 4.into();
            m["refine"]["start_time"] = 0.5.into();
            let flow = m["flow"].as_object_mut().unwrap();
            flow.remove("anchors");
            flow.remove("default_start_time");
        },
        |t| t.retain(|t| t.0 != "flow.anchors" && t.0 != "refine.anchor_unit_norms"),
        &["refine.start_time", "needs flow.anchors"],
    );
    for bad in [1.5, -0.25] {
        refine_case(
            |m| {
                m["format_version"] = 4.into();
                m["refine"]["start_time"] = bad.into();
            },
            |_| {},
            &["refine.start_time", "outside [0, 1]"],
        );
    }
    // Tensors: missing, wrong shape, non-positive or non-finite, or present without the table.
    refine_case(|_| {}, |t| t.retain(|t| t.0 != "refine.inverse_mass"), &["refine.inverse_mass", "missing"]);
    refine_case(
        |_| {},
        |t| {
            let i = t.iter().position(|t| t.0 == "refine.inverse_mass").unwrap();
            t[i].2 = vec![16];
            t[i].3.truncate(16 * 4);
        },
        &["refine.inverse_mass", "[16]", "[17]"],
    );
    for v in [0.0f32, -1.0] {
        refine_case(|_| {}, |t| set_f32(t, "refine.inverse_mass", 5, v), &["refine.inverse_mass", "> 0", "index 5"]);
    }
    refine_case(|_| {}, |t| set_f32(t, "refine.inverse_mass", 2, f32::NAN), &["refine.inverse_mass", "non-finite"]);
    let c = copy_of("affine_anchored");
    let extra = std::fs::read(common::fixture("affine_refine").join("tensors.safetensors")).unwrap();
    std::fs::write(c.path.join("tensors.safetensors"), extra).unwrap();
    assert_refused(&c.path, ErrorKind::Bundle, &["refine.inverse_mass", "no refine entry"]);
    // Unit norms on a bundle without anchors to rescale, or of the wrong width.
    refine_case(
        |_| {},
        |t| t.push(("refine.anchor_unit_norms".into(), Dtype::F32, vec![24, 2], vec![0u8; 24 * 2 * 4])),
        &["refine.anchor_unit_norms", "[24, 2]", "[24, 3]"],
    );
    // The graph: missing file, or one whose outputs are not log_density and grad.
    refine_case(|m| m["refine"]["graph"] = "nowhere.onnx".into(), |_| {}, &["refine.graph"]);
    let c = copy_of("affine_refine");
    std::fs::copy(c.path.join("flow.onnx"), c.path.join("posterior.onnx")).unwrap();
    assert_refused(&c.path, ErrorKind::Bundle, &["graph posterior"]);
}
