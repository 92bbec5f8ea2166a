//! Test data: hex and base64url decoding of constants, reproducible byte patterns, checksums.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Decodes a hex string (test data only; panics on malformed test constants).
pub fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd-length hex constant");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex constant"))
        .collect()
}

/// Base64url without padding, as Key Vault's JSON carries bytes.
pub fn b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// The inverse of [`b64`] (panics on malformed input: it comes from the service under test).
pub fn unb64(s: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(s).expect("base64url")
}

/// Deterministic pseudo-random bytes (xorshift), so failures are reproducible.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// True if any `chunk`-sized aligned piece of `needle` occurs anywhere in `haystack` (at any
/// multiple of `step`). Pieces are indexed by their first 8 bytes so the scan is linear.
pub fn contains_any_chunk(haystack: &[u8], needle: &[u8], chunk: usize, step: usize) -> bool {
    let mut index = std::collections::HashMap::new();
    for c in needle.chunks_exact(chunk) {
        index
            .entry(u64::from_le_bytes(c[..8].try_into().unwrap()))
            .or_insert_with(Vec::new)
            .push(c);
    }
    if haystack.len() < chunk {
        return false;
    }
    (0..=haystack.len() - chunk).step_by(step).any(|i| {
        let key = u64::from_le_bytes(haystack[i..i + 8].try_into().unwrap());
        index
            .get(&key)
            .is_some_and(|cs| cs.iter().any(|c| &haystack[i..i + chunk] == *c))
    })
}

/// Hex sha256 of a file's contents.
pub fn sha256_file(path: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    let data = std::fs::read(path).expect("read file for checksum");
    format!("{:x}", Sha256::digest(&data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_base64url_round_trip() {
        assert_eq!(hex("00ff10"), vec![0, 0xff, 0x10]);
        assert_eq!(unb64(&b64(&[1, 2, 250])), vec![1, 2, 250]);
        assert_eq!(pattern(20, 7), pattern(20, 7));
        assert_ne!(pattern(20, 7), pattern(20, 8));
    }
}
