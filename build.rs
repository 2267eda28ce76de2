//! Generates the C header `postflow.h` from `src/ffi/` with cbindgen into
//! `$OUT_DIR` (tests/header.rs compares it with the checked-in
//! `include/postflow.h`; `make header` copies it there).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=src/ffi");

    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let generated = out_dir.join("postflow.h");
    let _ = std::fs::remove_file(&generated);

    let mut config = match cbindgen::Config::from_file(root.join("cbindgen.toml")) {
        Ok(c) => c,
        Err(e) => {
            // Never break the library build over the header; tests/header.rs reports it.
            println!("cargo:warning=cbindgen.toml: {e}");
            return;
        }
    };
    let version = |part: &str| std::env::var(format!("CARGO_PKG_VERSION_{part}")).unwrap_or_else(|_| "0".into());
    config.after_includes = Some(format!(
        "\n/** Version of this header (the library's run-time version is pf_version()). */\n\
         #define PF_VERSION_MAJOR {}\n#define PF_VERSION_MINOR {}\n#define PF_VERSION_PATCH {}\n\
         #define PF_VERSION_STRING \"{}\"",
        version("MAJOR"),
        version("MINOR"),
        version("PATCH"),
        std::env::var("CARGO_PKG_VERSION").unwrap_or_default()
    ));

    let bindings = cbindgen::Builder::new().with_config(config).with_src(root.join("src/ffi/mod.rs")).generate();
    match bindings {
        Ok(b) => {
            b.write_to_file(&generated);
        }
        Err(e) => println!("cargo:warning=cbindgen could not generate postflow.h: {e}"),
    }
}
