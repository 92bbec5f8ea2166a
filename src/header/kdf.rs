//! TEMPORARY stand-in for `crate::crypto::kdf` (owned by the XTS work) until that module is
//! merged; same names, signatures and constants as that module (docs/FORMAT.md §3–4). Remove
//! this file and point `auth.rs` at `crate::crypto::kdf` once it exists.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::secmem::VolumeKey;

const HKDF_SALT: &[u8] = b"kvcrypt-v1-kdf";
const KEY_CHECK_INFO: &[u8] = b"kvcrypt v1 key-check key";
const HEADER_MAC_INFO: &[u8] = b"kvcrypt v1 header-mac key";
const KEY_CHECK_LABEL: &[u8] = b"kvcrypt v1 key check";

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

/// HKDF-SHA256 (RFC 5869) with a 32-byte output: extract, then one expand block.
fn derive(vmk: &VolumeKey, info: &[u8]) -> zeroize::Zeroizing<[u8; 32]> {
    let prk = zeroize::Zeroizing::new(hmac(HKDF_SALT, &[vmk.expose()]));
    zeroize::Zeroizing::new(hmac(&prk[..], &[info, &[1u8]]))
}

pub fn key_check_digest(vmk: &VolumeKey) -> [u8; 32] {
    hmac(&derive(vmk, KEY_CHECK_INFO)[..], &[KEY_CHECK_LABEL])
}

pub fn header_mac(vmk: &VolumeKey, bytes: &[u8]) -> [u8; 32] {
    hmac(&derive(vmk, HEADER_MAC_INFO)[..], &[bytes])
}
