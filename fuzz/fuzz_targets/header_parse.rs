//! cargo-fuzz target for the volume header parser. Input encoding and the properties checked
//! are in `kvcrypt_format::fuzzing` (shared with `examples/fuzz_header.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = kvcrypt_format::fuzzing::check_input(data) {
        panic!("header parser property violated: {e}");
    }
});
