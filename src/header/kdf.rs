//! TEMPORARY stand-in for `crate::crypto::kdf` (owned by the XTS work) until that branch is
//! merged; same function names and shapes. Remove this file and point `auth.rs` at
//! `crate::crypto::kdf` once it exists.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::secmem::VolumeKey;

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let Ok(mut m) = HmacSha256::new_from_slice(key) else {
        return [0u8; 32];
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// HKDF-SHA256 (RFC 5869) with a 32-byte output: extract then one expand block.
fn hkdf32(ikm: &[u8], salt: &[u8], info: &[u8]) -> zeroize::Zeroizing<[u8; 32]> {
    let prk = zeroize::Zeroizing::new(hmac(salt, &[ikm]));
    zeroize::Zeroizing::new(hmac(&prk[..], &[info, &[1u8]]))
}

pub fn key_check_digest(vmk: &VolumeKey, uuid: &[u8; 16]) -> [u8; 32] {
    let k = hkdf32(vmk.expose(), uuid, b"kvcrypt v1 key-check");
    hmac(&k[..], &[b"kvcrypt key check", uuid])
}

pub fn header_mac(vmk: &VolumeKey, data: &[u8]) -> [u8; 32] {
    let k = hkdf32(vmk.expose(), b"", b"kvcrypt v1 header-mac");
    hmac(&k[..], &[data])
}
