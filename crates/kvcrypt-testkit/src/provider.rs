//! A stand-in [`KeyProvider`] for unit tests of the code above the provider (the CLI's slot
//! logic, the agent's access checks). It "wraps" by XOR with a pad derived from the versioned
//! key id, so it proves nothing about Key Vault; the emulator tests do that.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_keyvault::{
    AccessSecret, BlockingProvider, ErrorClass, Failure, KeyError, KeyProvider, KeyVersionInfo,
    Operation, WrappedKey,
};
use sha2::{Digest, Sha512};
use zeroize::Zeroizing;

/// The fake vault. Keys it was not given are denied; [`XorVault::refuse`] makes every call
/// fail with one class; [`XorVault::garble`] makes its wraps not unwrap to what was wrapped.
#[derive(Default)]
pub struct XorVault {
    /// versionless key id → versioned id of its latest version.
    latest: Mutex<HashMap<String, String>>,
    refuse: Mutex<Option<ErrorClass>>,
    garble: Mutex<bool>,
    /// Versioned ids disabled: every operation with them is denied (as Key Vault does).
    disabled: Mutex<std::collections::HashSet<String>>,
    /// Versioned id → `exp` (Unix seconds) that `current_version` reports.
    expires: Mutex<HashMap<String, i64>>,
}

/// `https://VAULT/keys/NAME/VERSION` → `https://VAULT/keys/NAME` (unchanged if versionless).
fn versionless(key_id: &str) -> String {
    let trimmed = key_id.trim_end_matches('/');
    match trimmed.match_indices('/').nth(4) {
        Some((i, _)) if trimmed.split('/').nth(3) == Some("keys") => trimmed[..i].to_owned(),
        _ => trimmed.to_owned(),
    }
}

impl XorVault {
    /// A vault holding the versioned keys `keys` (each the latest version of its key).
    pub fn new(keys: &[&str]) -> Arc<XorVault> {
        let v = XorVault::default();
        for k in keys {
            v.rotate(k, k);
        }
        Arc::new(v)
    }

    /// `new_version` becomes the latest version of `key_id`'s key, as after a rotation.
    pub fn rotate(&self, key_id: &str, new_version: &str) {
        self.latest
            .lock()
            .unwrap()
            .insert(versionless(key_id), new_version.to_owned());
    }

    /// Disables the versioned key `key_id`: wraps and unwraps with it are denied.
    pub fn disable(&self, key_id: &str) {
        self.disabled.lock().unwrap().insert(key_id.to_owned());
    }

    /// `current_version` reports `exp = at` for the versioned key `key_id`.
    pub fn expire_at(&self, key_id: &str, at: i64) {
        self.expires.lock().unwrap().insert(key_id.to_owned(), at);
    }

    /// From now on every call fails with `class` (`None`: answers again).
    pub fn refuse(&self, class: Option<ErrorClass>) {
        *self.refuse.lock().unwrap() = class;
    }

    /// From now on wraps return bytes that unwrap to something else.
    pub fn garble(&self) {
        *self.garble.lock().unwrap() = true;
    }

    /// This vault served synchronously, as the CLI uses a provider.
    pub fn blocking(self: &Arc<Self>) -> BlockingProvider {
        BlockingProvider::over(self.clone()).expect("a runtime for the blocking provider")
    }

    fn failure(&self, key_id: &str, op: Operation) -> Option<KeyError> {
        let refused = *self.refuse.lock().unwrap();
        let answer = |message: &str| Failure::answer("fake-vault", key_id, op, message);
        match refused {
            Some(ErrorClass::Denied) => Some(KeyError::Denied(answer("refused"))),
            Some(ErrorClass::Transient) => Some(KeyError::Transient(answer("unavailable"))),
            Some(ErrorClass::Misconfigured) => Some(KeyError::Misconfigured(answer("malformed"))),
            None => None,
        }
    }

    /// The versioned key `key_id` names (its latest version if versionless).
    fn resolve(&self, key_id: &str, op: Operation) -> Result<String, KeyError> {
        if let Some(e) = self.failure(key_id, op) {
            return Err(e);
        }
        let base = versionless(key_id);
        let latest = self.latest.lock().unwrap().get(&base).cloned();
        let latest = latest.ok_or_else(|| {
            KeyError::Denied(Failure::answer(
                "fake-vault",
                key_id,
                op,
                format!("denied: {key_id}"),
            ))
        })?;
        let kid = if base == key_id.trim_end_matches('/') {
            latest
        } else {
            key_id.to_owned()
        };
        if op != Operation::GetKey && self.disabled.lock().unwrap().contains(&kid) {
            return Err(KeyError::Denied(Failure::answer(
                "fake-vault",
                key_id,
                op,
                format!("{kid} is disabled"),
            )));
        }
        Ok(kid)
    }

    fn xor(key_id: &str, bytes: &[u8]) -> Zeroizing<Vec<u8>> {
        let pad: [u8; 64] = Sha512::digest(key_id.as_bytes()).into();
        Zeroizing::new(bytes.iter().zip(pad.iter()).map(|(a, b)| a ^ b).collect())
    }

    fn wrapped(&self, kid: String, algorithm: &str, secret: &[u8]) -> WrappedKey {
        let mut wrapped = Self::xor(&kid, secret).to_vec();
        if *self.garble.lock().unwrap() {
            wrapped[0] ^= 1;
        }
        WrappedKey {
            key_id: kid,
            algorithm: algorithm.into(),
            wrapped,
        }
    }
}

fn bad_length(key_id: &str) -> KeyError {
    KeyError::Misconfigured(Failure::answer(
        "fake-vault",
        key_id,
        Operation::UnwrapKey,
        "wrapped bytes of the wrong length",
    ))
}

#[async_trait::async_trait]
impl KeyProvider for XorVault {
    async fn wrap(
        &self,
        key_id: &str,
        algorithm: Option<&str>,
        vmk: &VolumeKey,
    ) -> Result<WrappedKey, KeyError> {
        let kid = self.resolve(key_id, Operation::WrapKey)?;
        Ok(self.wrapped(kid, algorithm.unwrap_or("RSA-OAEP-256"), vmk.expose()))
    }

    async fn unwrap(
        &self,
        key_id: &str,
        _algorithm: &str,
        wrapped: &[u8],
    ) -> Result<VolumeKey, KeyError> {
        let kid = self.resolve(key_id, Operation::UnwrapKey)?;
        VolumeKey::from_slice(&Self::xor(&kid, wrapped)).ok_or_else(|| bad_length(key_id))
    }

    async fn wrap_access_secret(
        &self,
        key_id: &str,
        algorithm: &str,
        secret: &AccessSecret,
    ) -> Result<WrappedKey, KeyError> {
        let kid = self.resolve(key_id, Operation::WrapKey)?;
        Ok(self.wrapped(kid, algorithm, secret.expose()))
    }

    async fn unwrap_access_secret(
        &self,
        key_id: &str,
        _algorithm: &str,
        wrapped: &[u8],
    ) -> Result<AccessSecret, KeyError> {
        let kid = self.resolve(key_id, Operation::UnwrapKey)?;
        AccessSecret::from_slice(&Self::xor(&kid, wrapped)).ok_or_else(|| bad_length(key_id))
    }

    async fn current_version(&self, key_id: &str) -> Result<KeyVersionInfo, KeyError> {
        let kid = self.resolve(&versionless(key_id), Operation::GetKey)?;
        Ok(KeyVersionInfo {
            enabled: !self.disabled.lock().unwrap().contains(&kid),
            expires: self.expires.lock().unwrap().get(&kid).copied(),
            not_before: None,
            created: None,
            key_id: kid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versionless_drops_only_a_version() {
        let rows = [
            (
                "https://a.vault.azure.net/keys/k/1",
                "https://a.vault.azure.net/keys/k",
            ),
            (
                "https://a.vault.azure.net/keys/k",
                "https://a.vault.azure.net/keys/k",
            ),
            (
                "https://a.vault.azure.net/keys/k/",
                "https://a.vault.azure.net/keys/k",
            ),
            (
                "https://a.vault.azure.net/secrets/k/1",
                "https://a.vault.azure.net/secrets/k/1",
            ),
        ];
        for (id, want) in rows {
            assert_eq!(versionless(id), want, "{id}");
        }
    }

    #[test]
    fn wraps_round_trip_unless_garbled_and_unknown_keys_are_denied() {
        let k1 = "https://a.vault.azure.net/keys/k/1";
        let v = XorVault::new(&[k1]);
        let p = v.blocking();
        let key = VolumeKey::from_slice(&[5; 64]).unwrap();
        let w = p
            .wrap("https://a.vault.azure.net/keys/k", None, &key)
            .unwrap();
        assert_eq!(w.key_id, k1, "versionless wraps with the latest version");
        let back = p.unwrap(&w.key_id, &w.algorithm, &w.wrapped).unwrap();
        assert_eq!(back.expose(), key.expose());
        let other = p.unwrap(
            "https://b.vault.azure.net/keys/x/1",
            "RSA-OAEP-256",
            &w.wrapped,
        );
        assert_eq!(other.err().map(|e| e.class()), Some(ErrorClass::Denied));
        v.garble();
        let g = p.wrap(k1, None, &key).unwrap();
        let back = p.unwrap(&g.key_id, &g.algorithm, &g.wrapped).unwrap();
        assert_ne!(back.expose(), key.expose());
        v.refuse(Some(ErrorClass::Transient));
        let e = p.unwrap(k1, "RSA-OAEP-256", &w.wrapped).err().unwrap();
        assert_eq!(e.class(), ErrorClass::Transient);
    }
}
