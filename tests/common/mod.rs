//! Helpers shared by the integration tests: test-data decoding, and whether this is CI.
#![allow(dead_code)]

use kvcrypt_crypto::secmem::VolumeKey;

/// Decodes a hex string (test data only; panics on malformed test constants).
pub fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd-length hex constant");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex constant"))
        .collect()
}

/// A volume key from 128 hex digits.
pub fn vmk(hex_key: &str) -> VolumeKey {
    VolumeKey::from_slice(&hex(hex_key)).expect("64-byte key")
}

/// True under CI (`CI=true`, as `.ci/run` sets it): a test that cannot run there must fail, not
/// skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
