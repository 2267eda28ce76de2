//! Shared helpers for integration tests: fixture paths and the closed-form
//! Gaussian of the affine fixtures.
#![allow(dead_code)]
use std::path::PathBuf;

use postflow::{Model, ModelOptions};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bundles").join(name)
}

/// A temporary format-4 copy of the `affine_refine` fixture whose refined draws start at the
/// stored draws (`refine.start_time` 1; its `flow.default_start_time` stays 0.5). Keep the
/// `TempDir` alive while the copy is used.
pub fn refine_from_stored_draws() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("affine_refine_v4");
    std::fs::create_dir(&path).unwrap();
    for entry in std::fs::read_dir(fixture("affine_refine")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), path.join(entry.file_name())).unwrap();
    }
    let manifest = path.join("postflow.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    m["format_version"] = 4.into();
    m["refine"]["start_time"] = 1.0.into();
    std::fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    (dir, path)
}

pub fn open(name: &str) -> Model {
    Model::open(fixture(name), &ModelOptions::default()).unwrap_or_else(|e| panic!("open {name}: {e}"))
}

/// The exact Gaussian law of θ for an affine fixture (`NAME.expected.json`).
pub struct Expected {
    pub d: usize,
    pub mean: Vec<f64>,
    pub cov: Vec<Vec<f64>>,
    pub precision: Vec<Vec<f64>>,
    pub logdet_cov: f64,
    pub points: Vec<(Vec<f32>, f64)>,
}

impl Expected {
    pub fn load(name: &str) -> Expected {
        let path = fixture(&format!("{name}.expected.json"));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let vec =
            |x: &serde_json::Value| -> Vec<f64> { x.as_array().unwrap().iter().map(|a| a.as_f64().unwrap()).collect() };
        let mat = |x: &serde_json::Value| -> Vec<Vec<f64>> { x.as_array().unwrap().iter().map(vec).collect() };
        let points = v["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (vec(&p["theta"]).iter().map(|t| *t as f32).collect(), p["log_density"].as_f64().unwrap()))
            .collect();
        Expected {
            d: v["D"].as_u64().unwrap() as usize,
            mean: vec(&v["theta_mean"]),
            cov: mat(&v["theta_cov"]),
            precision: mat(&v["theta_precision"]),
            logdet_cov: v["theta_logdet_cov"].as_f64().unwrap(),
            points,
        }
    }

    /// Exact log N(θ; μ, Σ).
    pub fn log_density(&self, theta: &[f32]) -> f64 {
        let r: Vec<f64> = theta.iter().zip(&self.mean).map(|(t, m)| f64::from(*t) - m).collect();
        let mut quad = 0.0;
        for i in 0..self.d {
            for j in 0..self.d {
                quad += r[i] * self.precision[i][j] * r[j];
            }
        }
        -0.5 * quad - 0.5 * self.logdet_cov - 0.5 * self.d as f64 * (2.0 * std::f64::consts::PI).ln()
    }
}
