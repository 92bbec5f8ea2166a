//! The JSON metadata area: serde schema and validation. Unknown members are refused
//! (`deny_unknown_fields`): anything a reader cannot interpret needs a new format version, so
//! no unauthenticated data can hide in the metadata. The v2 members (`access_check`, a slot's
//! `check`) are refused in a v1 header and `access_check` is required in a v2 one.

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
    /// Format v2 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_check: Option<JsonDigest>,
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
    /// Format v2 only: base64 of the wrapped access-check secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
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
    pub access_check: Option<[u8; 32]>,
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

pub fn encode(
    slots: &[KeySlot],
    key_check: &[u8; 32],
    access_check: Option<&[u8; 32]>,
    mac: &[u8; 32],
) -> Vec<u8> {
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
                check: s.check.as_ref().map(|c| B64.encode(c)),
            })
            .collect(),
        key_check: JsonDigest {
            algorithm: KEY_CHECK_ALGORITHM.into(),
            value: B64.encode(key_check),
        },
        access_check: access_check.map(|d| JsonDigest {
            algorithm: KEY_CHECK_ALGORITHM.into(),
            value: B64.encode(d),
        }),
        mac: JsonDigest {
            algorithm: MAC_ALGORITHM.into(),
            value: B64.encode(mac),
        },
    };
    // Serializing plain strings and integers cannot fail; fall back to an empty object rather
    // than panic (the checksum/validation on read would then refuse it loudly).
    serde_json::to_vec_pretty(&md).unwrap_or_else(|_| b"{}".to_vec())
}

pub fn decode(bytes: &[u8], version: u16) -> Result<Decoded, String> {
    let md: Metadata = serde_json::from_slice(bytes).map_err(|e| format!("metadata JSON: {e}"))?;
    let v2 = version >= super::layout::VERSION_2;
    if !v2 && (md.access_check.is_some() || md.keyslots.iter().any(|s| s.check.is_some())) {
        return Err("format v1 header with v2 members (access_check / check)".into());
    }
    if v2 && md.access_check.is_none() {
        return Err("format v2 header without access_check".into());
    }
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
        let check = match &s.check {
            None => None,
            Some(c) => {
                let c = B64
                    .decode(c)
                    .map_err(|e| format!("key slot {}: check is not base64: {e}", s.id))?;
                if c.is_empty() {
                    return Err(format!("key slot {}: empty check", s.id));
                }
                Some(c)
            }
        };
        slots.push(KeySlot {
            id: s.id,
            provider: s.provider,
            key_id: s.key_id,
            algorithm: s.algorithm,
            wrapped,
            created_at: s.created_at,
            check,
        });
    }
    let access_check = match &md.access_check {
        None => None,
        Some(d) => Some(digest(d, KEY_CHECK_ALGORITHM, "access_check")?),
    };
    Ok(Decoded {
        slots,
        access_check,
        key_check: digest(&md.key_check, KEY_CHECK_ALGORITHM, "key_check")?,
        mac: digest(&md.mac, MAC_ALGORITHM, "mac")?,
    })
}
