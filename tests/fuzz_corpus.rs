//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`, and any
//! `fuzz/regressions/<target>/`) through the same functions the fuzz targets call
//! (`postflow::fuzzing::Harness`): no input may panic; errors are fine. The seeds
//! (`seed_*`, the fixture bundles' own files) must be accepted, which shows the
//! harness reaches the code past the parsers.
use std::path::{Path, PathBuf};

use postflow::fuzzing::Harness;

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in [root.join("corpus").join(target), root.join("regressions").join(target)] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            files.extend(entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()));
        }
    }
    files.sort();
    files
}

fn replay(target: &str, run: impl Fn(&Harness, &[u8]) -> postflow::Result<()>) {
    let harness = Harness::new();
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for fuzz target {target}");
    let (mut accepted, mut refused) = (0, 0);
    for path in &files {
        let data = std::fs::read(path).unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&harness, &data)));
        match result {
            Err(_) => panic!("{target}: {} panicked", path.display()),
            Ok(Ok(())) => accepted += 1,
            Ok(Err(e)) => {
                let name = path.file_name().unwrap().to_string_lossy();
                assert!(!name.starts_with("seed_"), "{target}: seed {name} refused: {}", e.message());
                assert!(!e.message().is_empty());
                refused += 1;
            }
        }
    }
    eprintln!("fuzz corpus {target}: {} inputs, {accepted} accepted, {refused} refused", files.len());
}

#[test]
fn manifest_corpus() {
    replay("manifest", |h, d| h.manifest(d));
}

#[test]
fn tensors_corpus() {
    replay("tensors", |h, d| h.tensors(d));
}

#[test]
fn bundle_corpus() {
    replay("bundle", |h, d| h.bundle(d));
}
