//! The customer-held recovery slot (format v3, docs/FORMAT.md §3.2): the VMK wrapped locally
//! with the customer's RSA public key (RSA-OAEP-256), so the customer can recover the volume
//! with the private key alone — offline, without Key Vault or any kvcrypt configuration.
//!
//! This module holds only the rules a header must follow (which members such a slot has, which
//! version a header with one carries); the RSA operations themselves are the CLI's, which is
//! the only place that wraps or unwraps with a recovery key. The agent never uses this slot.
//!
//! Why a new format version: a v2 reader takes any `provider` string and skips slots it cannot
//! use, but docs/FORMAT.md §6 requires a new version for a new provider name — a second
//! implementation written from the v2 document may treat every slot as a Key Vault slot and
//! send `sha256:…` to a vault as a key id. So a header with a recovery slot is v3 (which v2
//! readers refuse by name), and a header without one stays v2, readable by the previous release.

use sha2::{Digest, Sha256};

use super::KeySlot;
use super::layout::VERSION_3;

/// The provider name of the recovery slot.
pub const PROVIDER_RECOVERY: &str = "recovery-rsa";
/// Its only wrap algorithm: RSA-OAEP, SHA-256 as hash and MGF1 hash, empty label.
pub const RECOVERY_ALGORITHM: &str = "RSA-OAEP-256";
/// Prefix of its `key_id`, the public key's fingerprint.
pub const FINGERPRINT_PREFIX: &str = "sha256:";
/// The accepted RSA modulus sizes in bits. Smaller keys are too weak to guard a volume key for
/// the lifetime of a disk; larger ones are not needed and slow to generate and use.
pub const RECOVERY_KEY_BITS: [u32; 2] = [3072, 4096];

/// The recovery slot's `key_id` for a public key: `sha256:` + lowercase hex of SHA-256 over the
/// DER encoding of its SubjectPublicKeyInfo (what `openssl pkey -pubin -outform DER` writes),
/// so the customer can compute it from the public key file with standard tools.
pub fn fingerprint(spki_der: &[u8]) -> String {
    let digest = Sha256::digest(spki_der);
    let mut s = String::with_capacity(FINGERPRINT_PREFIX.len() + 64);
    s.push_str(FINGERPRINT_PREFIX);
    for b in digest {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    s
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl KeySlot {
    /// Whether this is the customer-held recovery slot (never unwrapped by the agent or the
    /// vault-backed commands).
    pub fn is_recovery(&self) -> bool {
        self.provider == PROVIDER_RECOVERY
    }

    /// The RSA key size of a recovery slot, from the ciphertext length (an RSA-OAEP
    /// ciphertext is exactly as long as the modulus); `None` for other slots.
    pub fn recovery_bits(&self) -> Option<u32> {
        if !self.is_recovery() {
            return None;
        }
        u32::try_from(self.wrapped.len())
            .ok()
            .and_then(|n| n.checked_mul(8))
            .filter(|b| RECOVERY_KEY_BITS.contains(b))
    }
}

/// The version a sealing write gives a header with these slots and policy `any`: v3 exactly
/// when a recovery slot is present, otherwise the current v2 (split headers: v4,
/// `policy::version_for`).
pub fn version_for(slots: &[KeySlot]) -> u16 {
    crate::policy::version_for(crate::SlotPolicy::Any, slots)
}

fn is_fingerprint(key_id: &str) -> bool {
    key_id.strip_prefix(FINGERPRINT_PREFIX).is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    })
}

/// The rules of docs/FORMAT.md §3.2 for a decoded header of `version`: no recovery slot before
/// v3; in v3 exactly one, in v4 (split policy) at most one, with exactly the members and values
/// the document gives. The message names the offending slot.
pub(crate) fn check(version: u16, slots: &[KeySlot]) -> Result<(), String> {
    let recovery: Vec<&KeySlot> = slots.iter().filter(|s| s.is_recovery()).collect();
    if version < VERSION_3 {
        return match recovery.first() {
            Some(s) => Err(format!(
                "key slot {}: a {PROVIDER_RECOVERY} slot in a format v{version} header (needs v3)",
                s.id
            )),
            None => Ok(()),
        };
    }
    match recovery.as_slice() {
        [] if version == VERSION_3 => {
            return Err("format v3 header without a recovery slot".into());
        }
        [] => return Ok(()),
        [_] => {}
        [_, second, ..] => {
            return Err(format!(
                "key slot {}: a second {PROVIDER_RECOVERY} slot (at most one per header)",
                second.id
            ));
        }
    }
    let s = recovery[0];
    if !is_fingerprint(&s.key_id) {
        return Err(format!(
            "key slot {}: recovery key id {:?} is not sha256: and 64 lowercase hex digits",
            s.id, s.key_id
        ));
    }
    if s.algorithm != RECOVERY_ALGORITHM {
        return Err(format!(
            "key slot {}: recovery slot algorithm {:?} (must be {RECOVERY_ALGORITHM})",
            s.id, s.algorithm
        ));
    }
    if s.recovery_bits().is_none() {
        return Err(format!(
            "key slot {}: recovery slot's wrapped key is {} bytes (must be 384 or 512: the \
             modulus of a 3072- or 4096-bit key)",
            s.id,
            s.wrapped.len()
        ));
    }
    if s.check.is_some() {
        return Err(format!(
            "key slot {}: a recovery slot has no access check",
            s.id
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::VERSION_2;

    fn recovery(bytes: usize) -> KeySlot {
        KeySlot {
            id: 1,
            provider: PROVIDER_RECOVERY.into(),
            key_id: fingerprint(b"spki"),
            algorithm: RECOVERY_ALGORITHM.into(),
            wrapped: vec![7; bytes],
            created_at: "2026-01-01T00:00:00Z".into(),
            check: None,
            share: None,
        }
    }

    #[test]
    fn fingerprint_is_sha256_hex_of_the_der() {
        // SHA-256("abc") (FIPS 180-2 test vector).
        assert_eq!(
            fingerprint(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn slot_rules() {
        assert_eq!(recovery(384).recovery_bits(), Some(3072));
        assert_eq!(recovery(512).recovery_bits(), Some(4096));
        assert_eq!(recovery(256).recovery_bits(), None);
        check(VERSION_3, &[recovery(384)]).unwrap();
        assert!(check(VERSION_2, &[recovery(384)]).is_err());
        assert!(check(VERSION_3, &[]).is_err(), "v3 needs its recovery slot");
        assert!(check(VERSION_3, &[recovery(384), recovery(512)]).is_err());
        assert!(check(VERSION_3, &[recovery(256)]).is_err(), "2048-bit");
        let mut s = recovery(384);
        s.key_id = s.key_id.to_uppercase().replace("SHA256", "sha256");
        assert!(check(VERSION_3, &[s]).is_err(), "upper-case hex");
        let mut s = recovery(384);
        s.algorithm = "RSA-OAEP".into();
        assert!(check(VERSION_3, &[s]).is_err());
        let mut s = recovery(384);
        s.check = Some(vec![1; 32]);
        assert!(check(VERSION_3, &[s]).is_err());
        assert_eq!(version_for(&[recovery(384)]), VERSION_3);
        assert_eq!(version_for(&[]), VERSION_2);
    }
}
