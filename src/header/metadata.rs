//! The JSON metadata area: serde schema and validation. Unknown members are refused
//! (`deny_unknown_fields`): anything a v1 reader cannot interpret needs a new format version,
//! so no unauthenticated data can hide in the metadata.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use super::KeySlot;

pub const KEY_CHECK_ALGORITHM: &str = "hkdf-sha256/hmac-sha256";
pub const MAC_ALGORITHM: &str = "hmac-sha256";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub keyslots: Vec<JsonSlot>,
    pub key_check: JsonDigest,
    pub mac: JsonDigest,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSlot {
    pub id: u32,
    pub provider: String,
    pub key_id: String,
    pub algorithm: String,
    /// Base64 (RFC 4648 standard alphabet, with padding).
    pub wrapped: String,
    /// RFC 3339 timestamp.
    pub created_at: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonDigest {
    pub algorithm: String,
    /// Base64 of the 32-byte value.
    pub value: String,
}

/// The decoded, validated content of the metadata area.
pub struct Decoded {
    pub slots: Vec<KeySlot>,
    pub key_check: [u8; 32],
    pub mac: [u8; 32],
}

fn digest(d: &JsonDigest, want_alg: &str, what: &str) -> Result<[u8; 32], String> {
    if d.algorithm != want_alg {
        return Err(format!("{what}: unknown algorithm {:?}", d.algorithm));
    }
    let v = B64
        .decode(&d.value)
        .map_err(|e| format!("{what}: bad base64: {e}"))?;
    v.try_into()
        .map_err(|_| format!("{what}: value is not 32 bytes"))
}

pub fn encode(slots: &[KeySlot], key_check: &[u8; 32], mac: &[u8; 32]) -> Vec<u8> {
    let md = Metadata {
        keyslots: slots
            .iter()
            .map(|s| JsonSlot {
                id: s.id,
                provider: s.provider.clone(),
                key_id: s.key_id.clone(),
                algorithm: s.algorithm.clone(),
                wrapped: B64.encode(&s.wrapped),
                created_at: s.created_at.clone(),
            })
            .collect(),
        key_check: JsonDigest {
            algorithm: KEY_CHECK_ALGORITHM.into(),
            value: B64.encode(key_check),
        },
        mac: JsonDigest {
            algorithm: MAC_ALGORITHM.into(),
            value: B64.encode(mac),
        },
    };
    // Serializing plain strings and integers cannot fail; fall back to an empty object rather
    // than panic (the checksum/validation on read would then refuse it loudly).
    serde_json::to_vec_pretty(&md).unwrap_or_else(|_| b"{}".to_vec())
}

pub fn decode(bytes: &[u8]) -> Result<Decoded, String> {
    let md: Metadata = serde_json::from_slice(bytes).map_err(|e| format!("metadata JSON: {e}"))?;
    let mut slots = Vec::with_capacity(md.keyslots.len());
    for s in md.keyslots {
        if slots.iter().any(|o: &KeySlot| o.id == s.id) {
            return Err(format!("duplicate key slot id {}", s.id));
        }
        let wrapped = B64
            .decode(&s.wrapped)
            .map_err(|e| format!("key slot {}: wrapped key is not base64: {e}", s.id))?;
        if wrapped.is_empty() {
            return Err(format!("key slot {}: empty wrapped key", s.id));
        }
        slots.push(KeySlot {
            id: s.id,
            provider: s.provider,
            key_id: s.key_id,
            algorithm: s.algorithm,
            wrapped,
            created_at: s.created_at,
        });
    }
    Ok(Decoded {
        slots,
        key_check: digest(&md.key_check, KEY_CHECK_ALGORITHM, "key_check")?,
        mac: digest(&md.mac, MAC_ALGORITHM, "mac")?,
    })
}
