//! Making a key slot that is proved to work: wrap the volume key (and its access-check secret)
//! with a key, then unwrap both again and compare. Shared by the CLI (`format`, `rewrap`, over
//! a `BlockingProvider`) and the agent (rotation following), so both refuse to store a slot
//! that would only be found broken when the volume is needed.

use kvcrypt_crypto::kdf;
use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_exit::{Exit, ExitClass};
use kvcrypt_format::KeySlot;
use kvcrypt_keyvault::{KeyError, KeyProvider};

/// Why a slot was not made. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The provider refused or failed `doing` (e.g. "wrapping the volume key with K").
    #[error("{doing}: {source}")]
    Provider {
        doing: String,
        #[source]
        source: KeyError,
    },
    /// The provider answered, but what it wrapped does not unwrap to what was wrapped.
    #[error("{0}")]
    Inconsistent(String),
}

impl SlotError {
    /// The provider's error, when it was one (its class tells denied from transient).
    pub fn key_error(&self) -> Option<&KeyError> {
        match self {
            SlotError::Provider { source, .. } => Some(source),
            SlotError::Inconsistent(_) => None,
        }
    }
}

impl ExitClass for SlotError {
    fn exit_class(&self) -> Exit {
        match self {
            SlotError::Provider { source, .. } => source.exit_class(),
            // An inconsistent vault answer has no specific class.
            SlotError::Inconsistent(_) => Exit::Failure,
        }
    }
}

fn provider(doing: String) -> impl FnOnce(KeyError) -> SlotError {
    move |source| SlotError::Provider { doing, source }
}

/// Wraps the volume's access-check secret for the slot `key_id`/`algorithm` and proves it
/// unwraps again (a check that fails would make the agent see a healthy volume as revoked).
pub async fn make_check(
    p: &dyn KeyProvider,
    key_id: &str,
    algorithm: &str,
    vmk: &VolumeKey,
) -> Result<Vec<u8>, SlotError> {
    let secret = kdf::access_secret(vmk);
    let check = p
        .wrap_access_secret(key_id, algorithm, &secret)
        .await
        .map_err(provider(format!(
            "wrapping the access-check secret with {key_id}"
        )))?
        .wrapped;
    let back = p
        .unwrap_access_secret(key_id, algorithm, &check)
        .await
        .map_err(provider(format!(
            "unwrapping the new access check with {key_id} to verify it"
        )))?;
    if back.expose() != secret.expose() {
        return Err(SlotError::Inconsistent(format!(
            "key {key_id} returned a wrapped access check that does not unwrap to what was \
             wrapped; refusing to store it"
        )));
    }
    Ok(check)
}

/// Wraps `vmk` into a new slot (id assigned when added to a header) and proves the slot works
/// by unwrapping it again, then adds its proved access check.
pub async fn make_slot(
    p: &dyn KeyProvider,
    key_id: &str,
    algorithm: Option<&str>,
    vmk: &VolumeKey,
) -> Result<KeySlot, SlotError> {
    let wr = p
        .wrap(key_id, algorithm, vmk)
        .await
        .map_err(provider(format!("wrapping the volume key with {key_id}")))?;
    let back = p
        .unwrap(&wr.key_id, &wr.algorithm, &wr.wrapped)
        .await
        .map_err(provider(format!(
            "unwrapping the new key slot with {} to verify it",
            wr.key_id
        )))?;
    if back.expose() != vmk.expose() {
        return Err(SlotError::Inconsistent(format!(
            "key {} returned a wrapped key that does not unwrap to the volume key; refusing to \
             store it",
            wr.key_id
        )));
    }
    let check = make_check(p, &wr.key_id, &wr.algorithm, vmk).await?;
    Ok(KeySlot {
        id: 0,
        provider: kvcrypt_format::PROVIDER_AZURE.into(),
        key_id: wr.key_id,
        algorithm: wr.algorithm,
        wrapped: wr.wrapped,
        created_at: kvcrypt_format::now_rfc3339(),
        check: Some(check),
        share: None,
    })
}
