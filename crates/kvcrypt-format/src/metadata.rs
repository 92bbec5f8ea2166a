//! The JSON metadata area: serde schema and validation. Unknown members are refused
//! (`deny_unknown_fields`): anything a reader cannot interpret needs a new format version, so
//! no unauthenticated data can hide in the metadata. The v2 members (`access_check`, a slot's
//! `check`) are refused in a v1 header and `access_check` is required in a v2 one.
//!
//! Each member also has exactly one JSON shape: an object is a JSON object (serde's derived
//! structs would also take the array of their field values) and an optional member is absent,
//! never `null` (serde would read `null` as absent). Otherwise one header would have several
//! encodings, and a v1 header could carry `"access_check": null`.

use std::fmt;
use std::marker::PhantomData;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::de::{MapAccess, Visitor, value::MapAccessDeserializer};
use serde::{Deserialize, Deserializer, Serialize};

use super::KeySlot;

pub const KEY_CHECK_ALGORITHM: &str = "hkdf-sha256/hmac-sha256";
pub const MAC_ALGORITHM: &str = "hmac-sha256";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    #[serde(deserialize_with = "objects")]
    pub keyslots: Vec<JsonSlot>,
    #[serde(deserialize_with = "object")]
    pub key_check: JsonDigest,
    /// Format v2 only.
    #[serde(
        default,
        deserialize_with = "some_object",
        skip_serializing_if = "Option::is_none"
    )]
    pub access_check: Option<JsonDigest>,
    #[serde(deserialize_with = "object")]
    pub mac: JsonDigest,
    /// Format v4 only: the split slot policy.
    #[serde(
        default,
        deserialize_with = "some_object",
        skip_serializing_if = "Option::is_none"
    )]
    pub policy: Option<JsonPolicy>,
}

/// Format v4: `{"kind": "all" | "k-of-n", "threshold": k, "shares": n}` (docs/FORMAT.md §3.3).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonPolicy {
    pub kind: String,
    pub threshold: u8,
    pub shares: u8,
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
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub check: Option<String>,
    /// Format v4 only: the x-coordinate of the Shamir share this slot wraps.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub share: Option<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonDigest {
    pub algorithm: String,
    /// Base64 of the 32-byte value.
    pub value: String,
}

/// `T` read only from a JSON object (see the module comment).
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct OnlyMap<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for OnlyMap<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                // The derived visitor does the rest (unknown and duplicate members included).
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(OnlyMap(PhantomData)).map(Object)
    }
}

fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Object::deserialize(d).map(|o| o.0)
}

fn objects<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Vec::<Object<T>>::deserialize(d).map(|v| v.into_iter().map(|o| o.0).collect())
}

/// A present optional object member (absent is `None` through `#[serde(default)]`).
fn some_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    object(d).map(Some)
}

/// A present optional member: `null` is refused like any other wrong type.
fn some<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// The decoded, validated content of the metadata area.
pub struct Decoded {
    pub slots: Vec<KeySlot>,
    pub key_check: [u8; 32],
    pub access_check: Option<[u8; 32]>,
    pub mac: [u8; 32],
    /// The v4 `policy` member as found; `policy::decode` checks it against the version.
    pub policy: Option<JsonPolicy>,
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
    policy: Option<JsonPolicy>,
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
                share: s.share,
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
        policy,
    };
    // Serializing plain strings and integers cannot fail; fall back to an empty object rather
    // than panic (the checksum/validation on read would then refuse it loudly).
    let pretty = serde_json::to_vec_pretty(&md).unwrap_or_else(|_| b"{}".to_vec());
    if pretty.len() as u64 <= super::layout::MAX_METADATA_LEN {
        return pretty;
    }
    // Too big pretty-printed: write it without whitespace. That is the shortest JSON text of
    // this content (serde_json escapes minimally), so every header a reader accepted — in any
    // formatting, docs/FORMAT.md §2.3 — can be written back (repair, rewrap).
    serde_json::to_vec(&md).unwrap_or(pretty)
}

pub fn decode(bytes: &[u8], version: u16) -> Result<Decoded, String> {
    let md: Metadata = serde_json::from_slice::<Object<Metadata>>(bytes)
        .map_err(|e| format!("metadata JSON: {e}"))?
        .0;
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
            share: s.share,
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
        policy: md.policy,
    })
}
