//! Key fixtures: fixed (not secret) and random volume keys, and key slots for header tests.

use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_format::KeySlot;

/// A volume key from 128 hex digits (published test vectors).
pub fn vmk(hex_key: &str) -> VolumeKey {
    VolumeKey::from_slice(&crate::data::hex(hex_key)).expect("64-byte key")
}

/// A fixed test key for the data-path tests: byte `i` is `7·i + seed`.
pub fn test_key(seed: u8) -> VolumeKey {
    let bytes: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(7).wrapping_add(seed))
        .collect();
    VolumeKey::from_slice(&bytes).expect("64-byte key")
}

/// A fixed test key for the header tests: byte `i` is `7·i XOR b` (a family distinct from
/// [`test_key`], so a header sealed with one never verifies with the other).
pub fn header_key(b: u8) -> VolumeKey {
    let bytes: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(7) ^ b).collect();
    VolumeKey::from_slice(&bytes).expect("64 bytes")
}

/// A fresh random volume key (what `kvcrypt format` would make).
pub fn random_vmk() -> VolumeKey {
    let mut b = [0u8; 64];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    VolumeKey::from_slice(&b).expect("64 bytes")
}

/// An Azure key slot whose key id and wrapped bytes are derived from `n` (never unwrapped).
pub fn slot(n: u8) -> KeySlot {
    KeySlot {
        id: 0,
        provider: kvcrypt_format::PROVIDER_AZURE.into(),
        key_id: format!("https://example.vault.azure.net/keys/vol/{n:032x}"),
        algorithm: "RSA-OAEP-256".into(),
        wrapped: vec![n; 256],
        created_at: "2026-11-29T08:00:00Z".into(),
        check: None,
        share: None,
    }
}
