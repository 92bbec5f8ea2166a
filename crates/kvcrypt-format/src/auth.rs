//! Key check and header MAC: what proves an unwrapped key is the volume's key and that the
//! header was written by someone holding it.
//!
//! The MAC input is a canonical byte string built from the logical header fields (not from the
//! JSON text), so a second implementation does not have to reproduce our JSON formatting. The
//! sequence number, copy index and checksum are deliberately *not* covered: rewriting or
//! repairing the header copies must not need the volume key (docs/FORMAT.md §MAC).

use super::VolumeHeader;
use kvcrypt_crypto::kdf;
use kvcrypt_crypto::secmem::VolumeKey;

const MAC_DOMAIN: &[u8] = b"kvcrypt-header-mac-v1";

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Lengths are bounded by the 508 KiB metadata area, so u32 always suffices; saturate
    // rather than panic if a caller ever builds something larger (it could not be written).
    let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(b);
}

/// The canonical MAC input (docs/FORMAT.md §MAC input).
pub fn mac_input(h: &VolumeHeader, key_check: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + h.slots.len() * 640);
    out.extend_from_slice(MAC_DOMAIN);
    // v1 input for v1 headers (so they still verify), v2 adds the access-check members.
    let v2 = h.version >= super::layout::VERSION_2;
    out.extend_from_slice(&h.version.to_le_bytes());
    out.extend_from_slice(h.uuid.as_bytes());
    put_bytes(&mut out, h.label.as_bytes());
    put_bytes(&mut out, h.cipher.as_bytes());
    out.extend_from_slice(&h.key_bits.to_le_bytes());
    out.extend_from_slice(&h.sector_size.to_le_bytes());
    out.extend_from_slice(&h.data_offset.to_le_bytes());
    out.extend_from_slice(&h.data_length.to_le_bytes());
    out.extend_from_slice(key_check);
    if v2 {
        // A v2 header always has the digest (decode and seal guarantee it); zeros would only
        // make the MAC fail, never pass.
        out.extend_from_slice(h.access_check_digest().unwrap_or(&[0; 32]));
    }
    // v4: the split policy (kind code, threshold, number of shares), so nobody without the
    // key can lower the threshold or turn a share slot into a whole-key slot.
    let v4 = h.version >= super::layout::VERSION_4;
    if v4 {
        let shares = h.share_count();
        out.push(h.policy.mac_code());
        out.push(u8::try_from(h.policy.threshold(shares)).unwrap_or(u8::MAX));
        out.push(u8::try_from(shares).unwrap_or(u8::MAX));
    }
    let count = u32::try_from(h.slots.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_le_bytes());
    for s in &h.slots {
        out.extend_from_slice(&s.id.to_le_bytes());
        put_bytes(&mut out, s.provider.as_bytes());
        put_bytes(&mut out, s.key_id.as_bytes());
        put_bytes(&mut out, s.algorithm.as_bytes());
        put_bytes(&mut out, &s.wrapped);
        put_bytes(&mut out, s.created_at.as_bytes());
        if v2 {
            put_bytes(&mut out, s.check.as_deref().unwrap_or(&[]));
        }
        if v4 {
            // 0 = no share (the recovery slot).
            out.push(s.share.unwrap_or(0));
        }
    }
    out
}

/// Key-check digest of `vmk`.
pub fn key_check(vmk: &VolumeKey) -> [u8; 32] {
    kdf::key_check_digest(vmk)
}

/// Header MAC of `h` under `vmk`, given the key-check digest that will be stored with it.
pub fn mac(vmk: &VolumeKey, h: &VolumeHeader, key_check: &[u8; 32]) -> [u8; 32] {
    kdf::header_mac(vmk, &mac_input(h, key_check))
}

/// Constant-time check of a stored key-check digest.
pub fn verify_key_check(vmk: &VolumeKey, stored: &[u8; 32]) -> bool {
    kdf::verify_key_check(vmk, stored)
}

/// Constant-time check of a stored MAC over `h` (with its key-check digest), so a forger cannot
/// learn how many leading MAC bytes were right.
pub fn verify_mac(
    vmk: &VolumeKey,
    h: &VolumeHeader,
    key_check: &[u8; 32],
    stored: &[u8; 32],
) -> bool {
    kdf::verify_header_mac(vmk, &mac_input(h, key_check), stored)
}
