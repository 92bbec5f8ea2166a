//! Keys derived from the volume master key (VMK), so the VMK itself never keys anything but
//! the data area. HKDF-SHA256 (RFC 5869, crate `hkdf`):
//!
//! * PRK = HMAC-SHA256(salt = [`HKDF_SALT`], VMK)
//! * key-check key  = HKDF-Expand(PRK, [`KEY_CHECK_INFO`], 32)
//! * header-MAC key = HKDF-Expand(PRK, [`HEADER_MAC_INFO`], 32)
//! * key-check digest = HMAC-SHA256(key-check key, [`KEY_CHECK_LABEL`]) — stored in the header;
//!   proves an unwrapped key is the volume's key without revealing anything about it.
//! * header MAC = HMAC-SHA256(header-MAC key, header bytes) — detects tampering once unlocked.
//!
//! * access-check secret = HKDF-Expand(PRK, [`ACCESS_SECRET_INFO`], 32) — format v2: wrapped by
//!   each key slot's key, it is what periodic access checks unwrap instead of the VMK;
//!   access-check digest = HMAC-SHA256(access-check secret, [`ACCESS_CHECK_LABEL`]) — stored
//!   in the header so an unwrapped secret can be verified without the VMK.
//!
//! These constants are part of the on-disk format (docs/FORMAT.md): never change them.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::secmem::{SecretBytes, VolumeKey, scrub_stack};

/// HKDF salt (fixed; the VMK is already uniformly random).
pub const HKDF_SALT: &[u8] = b"kvcrypt-v1-kdf";
/// HKDF info for the key-check key.
pub const KEY_CHECK_INFO: &[u8] = b"kvcrypt v1 key-check key";
/// HKDF info for the header-MAC key.
pub const HEADER_MAC_INFO: &[u8] = b"kvcrypt v1 header-mac key";
/// Message authenticated by the key-check key to form the key-check digest.
pub const KEY_CHECK_LABEL: &[u8] = b"kvcrypt v1 key check";

/// HKDF info for the access-check secret (format v2).
pub const ACCESS_SECRET_INFO: &[u8] = b"kvcrypt v2 access-check secret";
/// Message authenticated by the access-check secret to form the access-check digest.
pub const ACCESS_CHECK_LABEL: &[u8] = b"kvcrypt v2 access check";
/// Length of the access-check secret.
pub const ACCESS_SECRET_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

fn derive(vmk: &VolumeKey, info: &[u8]) -> SecretBytes<32> {
    let mut out = SecretBytes::<32>::zeroed();
    {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(HKDF_SALT), vmk.expose());
        // 32 bytes is far below HKDF's 255 × 32 limit, so expand cannot fail.
        if hk.expand(info, out.expose_mut()).is_err() {
            unreachable!("HKDF-SHA256 output of 32 bytes is always valid");
        }
    }
    // The HKDF/HMAC states (PRK-derived pads) lived on the stack: overwrite them.
    scrub_stack();
    out
}

/// The key-check key: HKDF-SHA256(VMK, info = [`KEY_CHECK_INFO`]).
pub fn key_check_key(vmk: &VolumeKey) -> SecretBytes<32> {
    derive(vmk, KEY_CHECK_INFO)
}

/// The header-MAC key: HKDF-SHA256(VMK, info = [`HEADER_MAC_INFO`]).
pub fn header_mac_key(vmk: &VolumeKey) -> SecretBytes<32> {
    derive(vmk, HEADER_MAC_INFO)
}

fn hmac(key: &SecretBytes<32>) -> HmacSha256 {
    match HmacSha256::new_from_slice(key.expose()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

/// Key-check digest stored in the header: HMAC-SHA256(key-check key, [`KEY_CHECK_LABEL`]).
pub fn key_check_digest(vmk: &VolumeKey) -> [u8; 32] {
    let mut m = hmac(&key_check_key(vmk));
    m.update(KEY_CHECK_LABEL);
    let d = m.finalize().into_bytes().into();
    scrub_stack();
    d
}

/// Constant-time check of a stored key-check digest against `vmk`.
pub fn verify_key_check(vmk: &VolumeKey, stored: &[u8]) -> bool {
    let mut m = hmac(&key_check_key(vmk));
    m.update(KEY_CHECK_LABEL);
    let ok = m.verify_slice(stored).is_ok();
    scrub_stack();
    ok
}

/// Header MAC: HMAC-SHA256(header-MAC key, `bytes`).
pub fn header_mac(vmk: &VolumeKey, bytes: &[u8]) -> [u8; 32] {
    let mut m = hmac(&header_mac_key(vmk));
    m.update(bytes);
    let d = m.finalize().into_bytes().into();
    scrub_stack();
    d
}

/// Constant-time check of a stored header MAC over `bytes`.
pub fn verify_header_mac(vmk: &VolumeKey, bytes: &[u8], stored: &[u8]) -> bool {
    let mut m = hmac(&header_mac_key(vmk));
    m.update(bytes);
    let ok = m.verify_slice(stored).is_ok();
    scrub_stack();
    ok
}

/// The access-check secret: HKDF-SHA256(VMK, info = [`ACCESS_SECRET_INFO`]). One-way: knowing
/// it (the agent holds it in ordinary memory after each check) reveals nothing of the VMK.
pub fn access_secret(vmk: &VolumeKey) -> SecretBytes<ACCESS_SECRET_LEN> {
    derive(vmk, ACCESS_SECRET_INFO)
}

/// Access-check digest stored in a v2 header: HMAC-SHA256(secret, [`ACCESS_CHECK_LABEL`]).
pub fn access_check_digest(secret: &[u8]) -> [u8; 32] {
    access_check_mac(secret).finalize().into_bytes().into()
}

/// Constant-time check of an unwrapped access-check secret against the stored digest.
pub fn verify_access_check(secret: &[u8], stored: &[u8; 32]) -> bool {
    access_check_mac(secret).verify_slice(stored).is_ok()
}

/// HMAC-SHA256 keyed by the access-check secret over [`ACCESS_CHECK_LABEL`].
fn access_check_mac(secret: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    m.update(ACCESS_CHECK_LABEL);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn key(b: u8) -> VolumeKey {
        VolumeKey::from_slice(&[b; 64]).unwrap()
    }

    /// Independent recomputation with the plain RFC 5869 / RFC 2104 definitions on top of
    /// `sha2` only (no `hkdf`/`hmac` crates), so a wrong salt/info wiring is caught.
    fn hmac_sha256(k: &[u8], m: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        let mut kb = [0u8; 64];
        kb[..k.len()].copy_from_slice(k);
        let ipad: Vec<u8> = kb.iter().map(|b| b ^ 0x36).collect();
        let opad: Vec<u8> = kb.iter().map(|b| b ^ 0x5c).collect();
        let inner = sha2::Sha256::new()
            .chain_update(&ipad)
            .chain_update(m)
            .finalize();
        sha2::Sha256::new()
            .chain_update(&opad)
            .chain_update(inner)
            .finalize()
            .into()
    }

    #[test]
    fn derivation_matches_rfc5869_by_hand() {
        let vmk = VolumeKey::from_slice(&(0u8..64).collect::<Vec<_>>()).unwrap();
        let prk = hmac_sha256(HKDF_SALT, vmk.expose());
        let mut t1 = KEY_CHECK_INFO.to_vec();
        t1.push(1);
        let kck = hmac_sha256(&prk, &t1);
        assert_eq!(key_check_key(&vmk).expose(), &kck);
        assert_eq!(key_check_digest(&vmk), hmac_sha256(&kck, KEY_CHECK_LABEL));
        let mut t1 = HEADER_MAC_INFO.to_vec();
        t1.push(1);
        let hmk = hmac_sha256(&prk, &t1);
        assert_eq!(header_mac_key(&vmk).expose(), &hmk);
        assert_eq!(
            header_mac(&vmk, b"header bytes"),
            hmac_sha256(&hmk, b"header bytes")
        );
    }

    #[test]
    fn access_secret_matches_rfc5869_by_hand() {
        let vmk = VolumeKey::from_slice(&(0u8..64).collect::<Vec<_>>()).unwrap();
        let prk = hmac_sha256(HKDF_SALT, vmk.expose());
        let mut t1 = ACCESS_SECRET_INFO.to_vec();
        t1.push(1);
        let secret = hmac_sha256(&prk, &t1);
        assert_eq!(access_secret(&vmk).expose(), &secret);
        let d = hmac_sha256(&secret, ACCESS_CHECK_LABEL);
        assert_eq!(access_check_digest(&secret), d);
        assert!(verify_access_check(&secret, &d));
        let mut other = secret;
        other[0] ^= 1;
        assert!(!verify_access_check(&other, &d));
        assert_ne!(access_secret(&vmk).expose(), key_check_key(&vmk).expose());
    }

    #[test]
    fn rfc5869_test_case_1_via_hkdf_crate() {
        // Sanity check of the crate itself (RFC 5869 A.1).
        let ikm = hex("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b");
        let hk = hkdf::Hkdf::<Sha256>::new(Some(&hex("000102030405060708090a0b0c")), &ikm);
        let mut okm = [0u8; 42];
        hk.expand(&hex("f0f1f2f3f4f5f6f7f8f9"), &mut okm).unwrap();
        assert_eq!(
            okm.to_vec(),
            hex(
                "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
            )
        );
    }

    #[test]
    fn keys_are_distinct_and_key_dependent() {
        let a = key(1);
        let b = key(2);
        assert_ne!(key_check_key(&a).expose(), header_mac_key(&a).expose());
        assert_ne!(key_check_key(&a).expose(), &a.expose()[..32]);
        assert_ne!(key_check_digest(&a), key_check_digest(&b));
        assert_ne!(header_mac(&a, b"x"), header_mac(&a, b"y"));
        assert_ne!(header_mac(&a, b"x"), header_mac(&b, b"x"));
    }

    #[test]
    fn verify_functions_accept_right_and_reject_wrong() {
        let a = key(1);
        let b = key(2);
        let d = key_check_digest(&a);
        assert!(verify_key_check(&a, &d));
        assert!(!verify_key_check(&b, &d));
        assert!(!verify_key_check(&a, &d[..31]));
        let m = header_mac(&a, b"hdr");
        assert!(verify_header_mac(&a, b"hdr", &m));
        assert!(!verify_header_mac(&a, b"hdr!", &m));
        assert!(!verify_header_mac(&b, b"hdr", &m));
    }
}
