//! What the agent asks of the key provider, and how it reads the answers: unwrapping a key
//! slot (unlock, resume) and the periodic access check, each classified the way the volume
//! state machine acts on it (only the vault's own refusal is a revocation).
//!
//! Any [`KeyProvider`] will do; the host platform passes Key Vault, the tests below a fake.

use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_format::{HeaderError, VolumeHeader};
use kvcrypt_keyvault::{KeyError, KeyProvider};

use super::ports::{AccessClass, AccessError, SlotRef};

/// A provider's failure as the agent acts on it (the message never holds key material).
pub fn access_error(e: &KeyError) -> AccessError {
    AccessError::new(e.class().into(), e.to_string())
}

/// Unwraps the volume key of `slot`. The key check against the header is the caller's (the
/// state machine tells a wrong key from a refusal).
pub async fn unwrap_slot(p: &dyn KeyProvider, slot: &SlotRef) -> Result<VolumeKey, AccessError> {
    p.unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .map_err(|e| access_error(&e))
}

/// One access check of a serving volume with `slot`. Format v2 slots carry a wrapped
/// access-check secret: that is what is unwrapped, so the volume key does not pass through the
/// agent's HTTP stack every interval. Older slots unwrap the volume key and check it.
pub async fn check_slot(
    p: &dyn KeyProvider,
    h: &VolumeHeader,
    slot: &SlotRef,
) -> Result<(), AccessError> {
    let Some(check) = &slot.check else {
        let key = unwrap_slot(p, slot).await?;
        return verify_key(h, &key);
    };
    let secret = p
        .unwrap_access_secret(&slot.key_id, &slot.algorithm, check)
        .await
        .map_err(|e| access_error(&e))?;
    // A secret that unwraps but fails the check is not this volume's (as with a volume key
    // that fails the key check): treated like a denial, never as access.
    h.verify_access_secret(secret.expose()).map_err(|e| {
        let class = match e {
            HeaderError::WrongKey => AccessClass::Denied,
            _ => AccessClass::Misconfigured,
        };
        AccessError::new(class, format!("access check with {}: {e}", slot.key_id))
    })
}

/// The key check of an unwrapped volume key against the header.
pub fn verify_key(h: &VolumeHeader, key: &VolumeKey) -> Result<(), AccessError> {
    h.verify_key(key)
        .map_err(|e| AccessError::new(AccessClass::Misconfigured, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvcrypt_crypto::kdf;
    use kvcrypt_keyvault::{AccessSecret, Failure, Operation, WrappedKey};

    /// Answers unwraps with fixed outcomes: `Ok` gives `key` (or its access secret), else the
    /// error class asked for.
    struct Answers {
        key: VolumeKey,
        answer: Option<fn(Failure) -> KeyError>,
        /// The access secret is returned damaged (as from a different volume).
        foreign_secret: bool,
    }

    #[async_trait::async_trait]
    impl KeyProvider for Answers {
        async fn wrap(
            &self,
            _: &str,
            _: Option<&str>,
            _: &VolumeKey,
        ) -> Result<WrappedKey, KeyError> {
            unreachable!("the agent never wraps")
        }
        async fn unwrap(&self, kid: &str, _: &str, _: &[u8]) -> Result<VolumeKey, KeyError> {
            match self.answer {
                None => Ok(VolumeKey::from_slice(self.key.expose()).unwrap()),
                Some(class) => Err(class(Failure::answer("v", kid, Operation::UnwrapKey, "no"))),
            }
        }
        async fn wrap_access_secret(
            &self,
            _: &str,
            _: &str,
            _: &AccessSecret,
        ) -> Result<WrappedKey, KeyError> {
            unreachable!("the agent never wraps")
        }
        async fn unwrap_access_secret(
            &self,
            kid: &str,
            _: &str,
            _: &[u8],
        ) -> Result<AccessSecret, KeyError> {
            if let Some(class) = self.answer {
                return Err(class(Failure::answer("v", kid, Operation::UnwrapKey, "no")));
            }
            let secret = kdf::access_secret(&self.key);
            let mut bytes = *secret.expose();
            if self.foreign_secret {
                bytes[0] ^= 1;
            }
            Ok(AccessSecret::from_slice(&bytes).unwrap())
        }
        async fn latest_version(&self, kid: &str) -> Result<String, KeyError> {
            Ok(kid.into())
        }
    }

    fn header(key: &VolumeKey) -> VolumeHeader {
        let mut h = VolumeHeader::new_for_device(16 << 20, 4096, "t", key).unwrap();
        h.seal(key);
        h
    }

    fn slot(v2: bool) -> SlotRef {
        SlotRef {
            key_id: "https://v.vault.azure.net/keys/k/1".into(),
            algorithm: "RSA-OAEP-256".into(),
            wrapped: vec![1; 256],
            check: v2.then(|| vec![2; 256]),
        }
    }

    fn class(r: Result<(), AccessError>) -> Option<AccessClass> {
        r.err().map(|e| e.class)
    }

    #[tokio::test]
    async fn check_outcomes_are_classified_as_the_state_machine_acts_on_them() {
        let key = VolumeKey::from_slice(&[7; 64]).unwrap();
        let other = VolumeKey::from_slice(&[8; 64]).unwrap();
        let h = header(&key);
        let ok = |key: &VolumeKey| Answers {
            key: VolumeKey::from_slice(key.expose()).unwrap(),
            answer: None,
            foreign_secret: false,
        };
        let fails = |answer: fn(Failure) -> KeyError| Answers {
            answer: Some(answer),
            ..ok(&key)
        };
        let foreign = Answers {
            foreign_secret: true,
            ..ok(&key)
        };
        // (row, provider, v2 slot, expected class; None = access)
        let rows: Vec<(&str, Answers, bool, Option<AccessClass>)> = vec![
            ("v2: the access secret checks", ok(&key), true, None),
            ("v1: the volume key checks", ok(&key), false, None),
            (
                "v2: a secret of another volume is a denial",
                foreign,
                true,
                Some(AccessClass::Denied),
            ),
            (
                "v1: a key that fails the key check is misconfigured",
                ok(&other),
                false,
                Some(AccessClass::Misconfigured),
            ),
            (
                "the vault's refusal is a denial",
                fails(KeyError::Denied),
                true,
                Some(AccessClass::Denied),
            ),
            (
                "an outage is transient, not a revocation",
                fails(KeyError::Transient),
                true,
                Some(AccessClass::Transient),
            ),
            (
                "a refusal of v1's unwrap is a denial too",
                fails(KeyError::Denied),
                false,
                Some(AccessClass::Denied),
            ),
            (
                "a malformed request is misconfigured",
                fails(KeyError::Misconfigured),
                true,
                Some(AccessClass::Misconfigured),
            ),
        ];
        let mut failed = Vec::new();
        for (name, p, v2, want) in rows {
            let got = class(check_slot(&p, &h, &slot(v2)).await);
            if got != want {
                failed.push(format!("{name}: got {got:?}, want {want:?}"));
            }
        }
        assert!(failed.is_empty(), "{failed:#?}");
    }

    #[tokio::test]
    async fn an_unwrapped_slot_is_the_providers_key_and_a_refusal_keeps_its_class() {
        let key = VolumeKey::from_slice(&[7; 64]).unwrap();
        let p = Answers {
            key: VolumeKey::from_slice(key.expose()).unwrap(),
            answer: None,
            foreign_secret: false,
        };
        let got = unwrap_slot(&p, &slot(true)).await.unwrap();
        assert_eq!(got.expose(), key.expose());
        let refused = Answers {
            answer: Some(KeyError::Denied),
            ..p
        };
        let e = unwrap_slot(&refused, &slot(true)).await.err().unwrap();
        assert_eq!(e.class, AccessClass::Denied);
        assert!(e.message.contains("no"), "{}", e.message);
    }
}
