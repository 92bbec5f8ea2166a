//! Helpers shared by the crypto integration tests.
#![allow(dead_code)]

use kvcrypt::secmem::VolumeKey;

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
