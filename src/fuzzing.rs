//! Entry points shared by the fuzz targets in `fuzz/` and by the corpus replay in
//! `tests/fuzz_corpus.rs`, so both run exactly the same code. Not a stable API.
//!
//! Every function takes arbitrary bytes, returns `Ok`/`Err` for accepted and refused
//! input, and panics only when a validated result breaks an invariant that the
//! validation promises (which is then a bug).
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::bundle::{parse_manifest, Bundle, BundleTensors, EvalTargets, Limits, Manifest, MANIFEST_FILE};
use crate::Result;

/// The fixture bundles whose manifests the `tensors` target checks tensors against.
pub const FIXTURES: [&str; 3] = ["affine_cls", "affine_reg", "affine_hetero"];

/// Fixed manifests and a scratch bundle folder.
pub struct Harness {
    manifests: Vec<Manifest>,
    dir: PathBuf,
    limits: Limits,
}

/// The fixture bundle folder `name` of this source tree.
pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bundles").join(name)
}

impl Harness {
    /// Parse the fixtures' manifests and create a scratch folder holding stand-in graph
    /// files (`Bundle::open` reads graphs but does not parse them).
    pub fn new() -> Harness {
        let limits = Limits::default();
        let manifests = FIXTURES
            .iter()
            .map(|name| {
                let bytes = std::fs::read(fixture_dir(name).join(MANIFEST_FILE)).expect("fixture manifest");
                parse_manifest(&bytes, &limits).expect("fixture manifests are valid")
            })
            .collect();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "postflow-fuzz-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        for graph in ["flow.onnx", "flow_jvp.onnx", "net.onnx"] {
            std::fs::write(dir.join(graph), b"stand-in graph").expect("scratch graph");
        }
        Harness { manifests, dir, limits }
    }

    /// `postflow.json` bytes: parse and validate.
    pub fn manifest(&self, data: &[u8]) -> Result<()> {
        let m = parse_manifest(data, &self.limits)?;
        check_manifest(&m, &self.limits);
        Ok(())
    }

    /// `tensors.safetensors` bytes against a fixed valid manifest: the first byte picks
    /// the fixture (`FIXTURES[data[0] % 3]`), the rest is the file.
    pub fn tensors(&self, data: &[u8]) -> Result<()> {
        let (pick, file) = data.split_first().map_or((0, &[][..]), |(p, f)| (*p as usize, f));
        let m = &self.manifests[pick % self.manifests.len()];
        let t = BundleTensors::parse(file, m)?;
        check_tensors(&t, m);
        Ok(())
    }

    /// A whole bundle folder from one input (see [`split_bundle_input`]): the manifest and
    /// tensors file are written into the scratch folder, then `Bundle::open` runs on it.
    pub fn bundle(&self, data: &[u8]) -> Result<()> {
        let (manifest, tensors) = split_bundle_input(data);
        std::fs::write(self.dir.join(MANIFEST_FILE), manifest).expect("write scratch manifest");
        std::fs::write(self.dir.join("tensors.safetensors"), tensors).expect("write scratch tensors");
        let b = Bundle::open(&self.dir, &self.limits)?;
        check_manifest(&b.manifest, &self.limits);
        check_tensors(&b.tensors, &b.manifest);
        Ok(())
    }
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `bundle` input is `[manifest length: u32 little-endian][manifest][tensors file]`;
/// a length past the end takes everything as the manifest.
pub fn split_bundle_input(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 4 {
        return (data, &[]);
    }
    let n = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let rest = &data[4..];
    rest.split_at(n.min(rest.len()))
}

/// The inverse of [`split_bundle_input`] (to seed a corpus from real bundles).
pub fn join_bundle_input(manifest: &[u8], tensors: &[u8]) -> Vec<u8> {
    let mut out = (manifest.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(manifest);
    out.extend_from_slice(tensors);
    out
}

/// What a validated manifest guarantees to the rest of the runtime.
fn check_manifest(m: &Manifest, limits: &Limits) {
    let d = m.network.dim;
    assert!(d >= 1 && d <= limits.max_weight_dim && m.flow.dim == d);
    assert!(m.input.dim >= 1 && m.input.dim <= limits.max_input_dim);
    assert!(!m.network.layers.is_empty() && m.network.layers.len() <= limits.max_layers);
    assert_eq!(m.network.layers[0].inputs, m.input.dim);
    assert_eq!(m.network.layers.last().map(|l| l.outputs), Some(m.task.net_outputs()));
    let covered: usize = m.network.layers.iter().map(|l| l.outputs * l.inputs + l.outputs).sum();
    assert_eq!(covered, d, "layers tile [0, D)");
    assert!(m.flow.default_solver.steps >= 1 && m.flow.hutchinson.probes >= 1);
    assert_eq!(m.graphs.flow.inputs.len(), 2);
    assert_eq!(m.graphs.flow_jvp.inputs.len(), 3);
    assert_eq!(m.graphs.flow_jvp.outputs.len(), 2);
    assert_eq!(m.graphs.net.inputs.len(), 2);
}

/// What validated tensors guarantee: shapes from the manifest, finite values, scale > 0.
fn check_tensors(t: &BundleTensors, m: &Manifest) {
    let d = m.network.dim;
    assert_eq!(t.whiten_mean.len(), d);
    assert_eq!(t.whiten_scale.len(), d);
    assert_eq!(t.reference_theta.len(), d);
    assert!(t.whiten_scale.iter().all(|s| s.is_finite() && *s > 0.0));
    assert!(t.whiten_mean.iter().chain(&t.reference_theta).all(|v| v.is_finite()));
    assert!(t.posterior_theta.nrows() >= 1 && t.posterior_theta.ncols() == d);
    assert!(t.posterior_theta.iter().all(|v| v.is_finite()));
    let n = t.eval_x.nrows();
    assert!(n >= 1 && t.eval_x.ncols() == m.input.dim);
    match &t.eval {
        EvalTargets::Classification { labels, hmc_probs } => {
            let c = m.task.net_outputs();
            assert_eq!(labels.len(), n);
            assert!(labels.iter().all(|y| *y >= 0 && (*y as usize) < c));
            assert_eq!(hmc_probs.dim(), (n, c));
        }
        EvalTargets::Regression { y, hmc_mean, hmc_var } => {
            let k = m.task.prediction_outputs();
            assert_eq!(y.dim(), (n, k));
            assert_eq!(hmc_mean.dim(), (n, k));
            assert!(hmc_var.dim() == (n, k) && hmc_var.iter().all(|v| *v > 0.0));
        }
    }
}
