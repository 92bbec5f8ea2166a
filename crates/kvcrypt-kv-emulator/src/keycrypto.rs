//! Key material held by the emulator and the real cryptography behind wrapKey/unwrapKey.
//!
//! RSA uses the RustCrypto `rsa` crate (OAEP with SHA-1 or SHA-256, as Key Vault's
//! `RSA-OAEP` / `RSA-OAEP-256`); AES key wrap uses `aes-kw` (RFC 3394, and RFC 5649 for the
//! `_PAD` variant). Nothing here is hand-rolled.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, Oaep, RsaPrivateKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Why a crypto operation was refused; the message becomes a `BadParameter` body.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("{0}")]
    BadParameter(String),
    #[error("internal crypto failure: {0}")]
    Internal(String),
}

/// Private key material of one key version. Never serialised into a REST response.
#[derive(Clone)]
pub enum Material {
    Rsa(Box<RsaPrivateKey>),
    Oct(Zeroizing<Vec<u8>>),
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Material::Rsa(k) => write!(f, "Material::Rsa({} bits)", k.size() * 8),
            Material::Oct(k) => write!(f, "Material::Oct({} bits)", k.len() * 8),
        }
    }
}

/// How material is kept in the state file: PKCS#8 DER (RSA) or raw bytes (oct), base64.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StoredMaterial {
    RsaPkcs8 { der: String },
    Oct { k: String },
}

impl Serialize for Material {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let stored = match self {
            Material::Rsa(k) => {
                let der = k.to_pkcs8_der().map_err(serde::ser::Error::custom)?;
                StoredMaterial::RsaPkcs8 {
                    der: STANDARD.encode(der.as_bytes()),
                }
            }
            Material::Oct(k) => StoredMaterial::Oct {
                k: STANDARD.encode(k.as_slice()),
            },
        };
        stored.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Material {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match StoredMaterial::deserialize(d)? {
            StoredMaterial::RsaPkcs8 { der } => {
                let der = Zeroizing::new(STANDARD.decode(der).map_err(D::Error::custom)?);
                let key = RsaPrivateKey::from_pkcs8_der(&der).map_err(D::Error::custom)?;
                Ok(Material::Rsa(Box::new(key)))
            }
            StoredMaterial::Oct { k } => Ok(Material::Oct(Zeroizing::new(
                STANDARD.decode(k).map_err(D::Error::custom)?,
            ))),
        }
    }
}

pub fn b64url(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// Decodes base64url as the service does: padding optional; standard-alphabet input is
/// tolerated too (some clients send it).
pub fn b64url_decode(s: &str) -> Result<Vec<u8>, CryptoError> {
    let trimmed = s.trim_end_matches('=');
    URL_SAFE_NO_PAD
        .decode(trimmed)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed))
        .map_err(|_| CryptoError::BadParameter("The value is not valid base64url.".into()))
}

impl Material {
    /// Generates an RSA key; slow (prime search), so callers run it off the async threads.
    pub fn generate_rsa(bits: usize) -> Result<Self, CryptoError> {
        let key = RsaPrivateKey::new(&mut rand::rngs::OsRng, bits)
            .map_err(|e| CryptoError::Internal(e.to_string()))?;
        Ok(Material::Rsa(Box::new(key)))
    }

    pub fn generate_oct(bits: usize) -> Self {
        let mut k = Zeroizing::new(vec![0u8; bits / 8]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, k.as_mut_slice());
        Material::Oct(k)
    }

    /// Builds material from an imported JWK (the customer's own key, private parts included).
    pub fn from_jwk(jwk: &serde_json::Value) -> Result<Self, CryptoError> {
        let field = |name: &str| -> Result<Option<Vec<u8>>, CryptoError> {
            match jwk.get(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => b64url_decode(s).map(Some),
                Some(_) => Err(CryptoError::BadParameter(format!(
                    "JSON Web Key: property '{name}' must be a base64url string."
                ))),
            }
        };
        let kty = jwk.get("kty").and_then(|v| v.as_str()).unwrap_or_default();
        match kty {
            "RSA" | "RSA-HSM" => {
                let (Some(n), Some(e), Some(d)) = (field("n")?, field("e")?, field("d")?) else {
                    return Err(CryptoError::BadParameter(
                        "JSON Web Key: an RSA key to import must contain n, e and d.".into(),
                    ));
                };
                let d = Zeroizing::new(d);
                let primes = match (field("p")?, field("q")?) {
                    (Some(p), Some(q)) => {
                        let (p, q) = (Zeroizing::new(p), Zeroizing::new(q));
                        vec![BigUint::from_bytes_be(&p), BigUint::from_bytes_be(&q)]
                    }
                    _ => Vec::new(),
                };
                let mut key = RsaPrivateKey::from_components(
                    BigUint::from_bytes_be(&n),
                    BigUint::from_bytes_be(&e),
                    BigUint::from_bytes_be(&d),
                    primes,
                )
                .map_err(|e| {
                    CryptoError::BadParameter(format!("JSON Web Key: invalid RSA key: {e}"))
                })?;
                key.validate().map_err(|e| {
                    CryptoError::BadParameter(format!("JSON Web Key: invalid RSA key: {e}"))
                })?;
                key.precompute()
                    .map_err(|e| CryptoError::Internal(e.to_string()))?;
                let bits = key.size() * 8;
                if ![2048, 3072, 4096].contains(&bits) {
                    return Err(CryptoError::BadParameter(format!(
                        "JSON Web Key: RSA key size {bits} is not supported (2048, 3072 or 4096)."
                    )));
                }
                Ok(Material::Rsa(Box::new(key)))
            }
            "oct" | "oct-HSM" => {
                let Some(k) = field("k")? else {
                    return Err(CryptoError::BadParameter(
                        "JSON Web Key: an oct key to import must contain k.".into(),
                    ));
                };
                let k = Zeroizing::new(k);
                if ![16, 24, 32].contains(&k.len()) {
                    return Err(CryptoError::BadParameter(format!(
                        "JSON Web Key: oct key size {} is not supported (128, 192 or 256 bits).",
                        k.len() * 8
                    )));
                }
                Ok(Material::Oct(k))
            }
            other => Err(CryptoError::BadParameter(format!(
                "JSON Web Key: key type '{other}' is not supported for import."
            ))),
        }
    }

    pub fn bits(&self) -> usize {
        match self {
            Material::Rsa(k) => k.size() * 8,
            Material::Oct(k) => k.len() * 8,
        }
    }

    pub fn is_rsa(&self) -> bool {
        matches!(self, Material::Rsa(_))
    }

    /// Public JWK fields (`n`, `e` for RSA; nothing for oct — the service never returns `k`).
    pub fn public_fields(&self, jwk: &mut serde_json::Map<String, serde_json::Value>) {
        if let Material::Rsa(k) = self {
            jwk.insert("n".into(), b64url(&k.n().to_bytes_be()).into());
            jwk.insert("e".into(), b64url(&k.e().to_bytes_be()).into());
        }
    }

    pub fn wrap(&self, alg: &str, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match (self, alg) {
            (Material::Rsa(k), "RSA-OAEP") => k
                .to_public_key()
                .encrypt(&mut rand::rngs::OsRng, Oaep::new::<sha1::Sha1>(), data)
                .map_err(|e| CryptoError::BadParameter(format!("Invalid plaintext: {e}"))),
            (Material::Rsa(k), "RSA-OAEP-256") => k
                .to_public_key()
                .encrypt(&mut rand::rngs::OsRng, Oaep::new::<sha2::Sha256>(), data)
                .map_err(|e| CryptoError::BadParameter(format!("Invalid plaintext: {e}"))),
            (Material::Oct(k), alg) => {
                let pad = aes_alg(alg, k.len())?;
                if !pad && (!data.len().is_multiple_of(8) || data.len() < 16) {
                    return Err(CryptoError::BadParameter(format!(
                        "The plaintext length must be a multiple of 8 bytes and at least 16 bytes for {alg}."
                    )));
                }
                aes_wrap(k, data, pad)
            }
            _ => Err(alg_mismatch(alg, self)),
        }
    }

    pub fn unwrap(&self, alg: &str, data: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let bad = || CryptoError::BadParameter("Invalid ciphertext: decryption failed.".into());
        match (self, alg) {
            (Material::Rsa(k), "RSA-OAEP") => k
                .decrypt(Oaep::new::<sha1::Sha1>(), data)
                .map(Zeroizing::new)
                .map_err(|_| bad()),
            (Material::Rsa(k), "RSA-OAEP-256") => k
                .decrypt(Oaep::new::<sha2::Sha256>(), data)
                .map(Zeroizing::new)
                .map_err(|_| bad()),
            (Material::Oct(k), alg) => {
                let pad = aes_alg(alg, k.len())?;
                aes_unwrap(k, data, pad).map_err(|_| bad())
            }
            _ => Err(alg_mismatch(alg, self)),
        }
    }
}

fn alg_mismatch(alg: &str, m: &Material) -> CryptoError {
    let kty = if m.is_rsa() { "RSA" } else { "oct" };
    CryptoError::BadParameter(format!(
        "Algorithm '{alg}' is not supported for key type '{kty}'."
    ))
}

/// Checks an AES key-wrap algorithm name against the key size; returns whether it pads.
fn aes_alg(alg: &str, key_len: usize) -> Result<bool, CryptoError> {
    let (pad, want) = match alg {
        "A128KW" => (false, Some(16)),
        "A192KW" => (false, Some(24)),
        "A256KW" => (false, Some(32)),
        "CKM_AES_KEY_WRAP" => (false, None),
        "CKM_AES_KEY_WRAP_PAD" => (true, None),
        _ => {
            return Err(CryptoError::BadParameter(format!(
                "Algorithm '{alg}' is not supported for key type 'oct'."
            )));
        }
    };
    if let Some(w) = want
        && w != key_len
    {
        return Err(CryptoError::BadParameter(format!(
            "Algorithm '{alg}' requires a {}-bit key; this key has {} bits.",
            w * 8,
            key_len * 8
        )));
    }
    Ok(pad)
}

fn aes_wrap(k: &[u8], data: &[u8], pad: bool) -> Result<Vec<u8>, CryptoError> {
    let err = |e: aes_kw::Error| CryptoError::BadParameter(format!("Key wrap failed: {e}"));
    match k.len() {
        16 => {
            let kek = aes_kw::KekAes128::new(k.into());
            if pad {
                kek.wrap_with_padding_vec(data)
            } else {
                kek.wrap_vec(data)
            }
            .map_err(err)
        }
        24 => {
            let kek = aes_kw::KekAes192::new(k.into());
            if pad {
                kek.wrap_with_padding_vec(data)
            } else {
                kek.wrap_vec(data)
            }
            .map_err(err)
        }
        32 => {
            let kek = aes_kw::KekAes256::new(k.into());
            if pad {
                kek.wrap_with_padding_vec(data)
            } else {
                kek.wrap_vec(data)
            }
            .map_err(err)
        }
        n => Err(CryptoError::Internal(format!(
            "unexpected AES key length {n}"
        ))),
    }
}

fn aes_unwrap(k: &[u8], data: &[u8], pad: bool) -> Result<Zeroizing<Vec<u8>>, aes_kw::Error> {
    let out = match k.len() {
        16 => {
            let kek = aes_kw::KekAes128::new(k.into());
            if pad {
                kek.unwrap_with_padding_vec(data)
            } else {
                kek.unwrap_vec(data)
            }
        }
        24 => {
            let kek = aes_kw::KekAes192::new(k.into());
            if pad {
                kek.unwrap_with_padding_vec(data)
            } else {
                kek.unwrap_vec(data)
            }
        }
        _ => {
            let kek = aes_kw::KekAes256::new(k.into());
            if pad {
                kek.unwrap_with_padding_vec(data)
            } else {
                kek.unwrap_vec(data)
            }
        }
    }?;
    Ok(Zeroizing::new(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 3394 §4.6: wrap 256 bits of key data with a 256-bit KEK.
    #[test]
    fn a256kw_matches_rfc3394_vector() {
        let kek: Vec<u8> = (0u8..32).collect();
        let data = [
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xAA, 0xBB, 0xCC, 0xDD,
            0xEE, 0xFF, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B,
            0x0C, 0x0D, 0x0E, 0x0F,
        ];
        let expected = [
            0x28, 0xC9, 0xF4, 0x04, 0xC4, 0xB8, 0x10, 0xF4, 0xCB, 0xCC, 0xB3, 0x5C, 0xFB, 0x87,
            0xF8, 0x26, 0x3F, 0x57, 0x86, 0xE2, 0xD8, 0x0E, 0xD3, 0x26, 0xCB, 0xC7, 0xF0, 0xE7,
            0x1A, 0x99, 0xF4, 0x3B, 0xFB, 0x98, 0x8B, 0x9B, 0x7A, 0x02, 0xDD, 0x21,
        ];
        let m = Material::Oct(Zeroizing::new(kek));
        assert_eq!(m.wrap("A256KW", &data).unwrap(), expected);
        assert_eq!(m.wrap("CKM_AES_KEY_WRAP", &data).unwrap(), expected);
        assert_eq!(m.unwrap("A256KW", &expected).unwrap().as_slice(), data);
        assert!(m.unwrap("A256KW", &expected[..32]).is_err());
        assert!(m.wrap("A128KW", &data).is_err());
        assert!(m.wrap("RSA-OAEP", &data).is_err());
    }
}
