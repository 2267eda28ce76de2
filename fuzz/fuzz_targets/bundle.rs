//! `cargo fuzz run bundle`: see `postflow::fuzzing::Harness::bundle` and docs/reliability.md.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use postflow::fuzzing::Harness;

static HARNESS: LazyLock<Harness> = LazyLock::new(Harness::new);

fuzz_target!(|data: &[u8]| {
    let _ = HARNESS.bundle(data);
});
