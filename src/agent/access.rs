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
    use kvcrypt_keyvault::ErrorClass;
    use kvcrypt_testkit::provider::XorVault;

    const KID: &str = "https://v.vault.azure.net/keys/k/1";
    const ALG: &str = "RSA-OAEP-256";

    fn key(b: u8) -> VolumeKey {
        VolumeKey::from_slice(&[b; 64]).unwrap()
    }

    /// A slot as `kvcrypt format` makes it: `vmk` wrapped by the vault and, for v2, the
    /// access secret of `secret_of` (the volume's own key, unless the test says otherwise).
    async fn slot(vault: &XorVault, vmk: &VolumeKey, v2: bool, secret_of: &VolumeKey) -> SlotRef {
        let wrapped = vault.wrap(KID, Some(ALG), vmk).await.unwrap().wrapped;
        let check = if v2 {
            let secret = kdf::access_secret(secret_of);
            Some(
                vault
                    .wrap_access_secret(KID, ALG, &secret)
                    .await
                    .unwrap()
                    .wrapped,
            )
        } else {
            None
        };
        SlotRef {
            key_id: KID.into(),
            algorithm: ALG.into(),
            wrapped,
            check,
            share: None,
        }
    }

    #[tokio::test]
    async fn check_outcomes_are_classified_as_the_state_machine_acts_on_them() {
        let (own, other) = (key(7), key(8));
        let mut h = VolumeHeader::new_for_device(16 << 20, 4096, "t", &own).unwrap();
        h.seal(&own);
        // (row, v2 slot, key wrapped in the slot, key whose access secret the slot holds,
        // the vault's refusal, expected class; None = access)
        type Row<'a> = (
            &'a str,
            bool,
            &'a VolumeKey,
            &'a VolumeKey,
            Option<ErrorClass>,
            Option<AccessClass>,
        );
        let rows: [Row; 8] = [
            ("v2: the access secret checks", true, &own, &own, None, None),
            ("v1: the volume key checks", false, &own, &own, None, None),
            (
                "v2: the access secret of another volume is a denial",
                true,
                &own,
                &other,
                None,
                Some(AccessClass::Denied),
            ),
            (
                "v1: a key that fails the key check is misconfigured",
                false,
                &other,
                &other,
                None,
                Some(AccessClass::Misconfigured),
            ),
            (
                "the vault's refusal is a denial",
                true,
                &own,
                &own,
                Some(ErrorClass::Denied),
                Some(AccessClass::Denied),
            ),
            (
                "a refusal of v1's unwrap is a denial too",
                false,
                &own,
                &own,
                Some(ErrorClass::Denied),
                Some(AccessClass::Denied),
            ),
            (
                "an outage is transient, not a revocation",
                true,
                &own,
                &own,
                Some(ErrorClass::Transient),
                Some(AccessClass::Transient),
            ),
            (
                "a malformed request is misconfigured",
                true,
                &own,
                &own,
                Some(ErrorClass::Misconfigured),
                Some(AccessClass::Misconfigured),
            ),
        ];
        let mut failed = Vec::new();
        for (name, v2, wrapped, secret_of, refusal, want) in rows {
            let vault = XorVault::new(&[KID]);
            let s = slot(&vault, wrapped, v2, secret_of).await;
            vault.refuse(refusal);
            let got = check_slot(vault.as_ref(), &h, &s)
                .await
                .err()
                .map(|e| e.class);
            if got != want {
                failed.push(format!("{name}: got {got:?}, want {want:?}"));
            }
        }
        assert!(failed.is_empty(), "{failed:#?}");
    }

    #[tokio::test]
    async fn an_unwrapped_slot_is_the_vaults_key_and_a_refusal_keeps_its_class() {
        let vault = XorVault::new(&[KID]);
        let s = slot(&vault, &key(7), true, &key(7)).await;
        let got = unwrap_slot(vault.as_ref(), &s).await.unwrap();
        assert_eq!(got.expose(), key(7).expose());
        vault.refuse(Some(ErrorClass::Denied));
        let e = unwrap_slot(vault.as_ref(), &s).await.err().unwrap();
        assert_eq!(e.class, AccessClass::Denied);
        assert!(e.message.contains("refused"), "{}", e.message);
    }
}
