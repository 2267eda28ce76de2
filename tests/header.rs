//! The checked-in C header must equal the one build.rs generates from src/ffi/.
use std::path::Path;

#[test]
fn checked_in_header_matches_the_generated_one() {
    let generated_path = Path::new(env!("OUT_DIR")).join("postflow.h");
    let checked_in_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/postflow.h");
    let generated = std::fs::read_to_string(&generated_path).unwrap_or_else(|e| {
        panic!("{}: {e}; cbindgen failed in build.rs (see the cargo warnings of the build)", generated_path.display())
    });
    let checked_in = std::fs::read_to_string(&checked_in_path).unwrap_or_default();
    if generated != checked_in && std::env::var("POSTFLOW_BLESS_HEADER").as_deref() == Ok("1") {
        std::fs::write(&checked_in_path, &generated).unwrap();
        return;
    }
    if generated != checked_in {
        let line = generated.lines().zip(checked_in.lines()).position(|(a, b)| a != b).map_or_else(
            || {
                format!(
                    "the files differ in length ({} vs {} lines)",
                    generated.lines().count(),
                    checked_in.lines().count()
                )
            },
            |i| format!("first difference at line {}", i + 1),
        );
        panic!(
            "include/postflow.h is stale ({line}): regenerate it with `make header` \
             (or `POSTFLOW_BLESS_HEADER=1 cargo test --release --test header`, or `cp {} include/postflow.h`)",
            generated_path.display()
        );
    }
}

#[test]
fn header_version_macros_follow_cargo_toml() {
    // The generated copy (the checked-in one equals it, see above; reading it here could race with blessing).
    let header = std::fs::read_to_string(Path::new(env!("OUT_DIR")).join("postflow.h")).unwrap();
    for (name, value) in [
        ("PF_VERSION_MAJOR", env!("CARGO_PKG_VERSION_MAJOR")),
        ("PF_VERSION_MINOR", env!("CARGO_PKG_VERSION_MINOR")),
        ("PF_VERSION_PATCH", env!("CARGO_PKG_VERSION_PATCH")),
    ] {
        assert!(
            header.contains(&format!("#define {name} {value}\n")),
            "{name} is not {value} in the generated postflow.h"
        );
    }
}
