//! Making a key slot that is proved to work: wrap the volume key (and its access-check secret)
//! with a key, then unwrap both again and compare. Shared by the CLI (`format`, `rewrap`, over
//! a `BlockingProvider`) and the agent (rotation following), so both refuse to store a slot
//! that would only be found broken when the volume is needed.
//!
//! Split volumes (format v4, policy `all` / `k-of-n`): [`make_share_slot`] wraps one Shamir share
//! of the VMK the same proved way, and [`combine_shares`] rebuilds the VMK from unwrapped shares
//! (trying subsets until one passes the key check), for the CLI's unlock and the agent's.

use kvcrypt_crypto::kdf;
use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_exit::{Exit, ExitClass};
use kvcrypt_format::{HeaderError, KeySlot, VolumeHeader};
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
    proved_slot(p, key_id, algorithm, vmk, None, vmk).await
}

/// Wraps one Shamir share of the VMK (split policies, format v4) into a new slot for share
/// index `x`, and proves it: the share unwraps again to the same bytes, and the slot's access
/// check (the access-check secret of the *VMK*, so the agent's checks work on split volumes as
/// on any other) is made and verified as for [`make_slot`].
pub async fn make_share_slot(
    p: &dyn KeyProvider,
    key_id: &str,
    algorithm: Option<&str>,
    x: u8,
    share: &VolumeKey,
    vmk: &VolumeKey,
) -> Result<KeySlot, SlotError> {
    proved_slot(p, key_id, algorithm, share, Some(x), vmk).await
}

/// The slot wrapping `secret` (the VMK, or share `share` of it), proved by unwrapping it again,
/// with the VMK's proved access check.
async fn proved_slot(
    p: &dyn KeyProvider,
    key_id: &str,
    algorithm: Option<&str>,
    secret: &VolumeKey,
    share: Option<u8>,
    vmk: &VolumeKey,
) -> Result<KeySlot, SlotError> {
    let (what, back_what, mismatch) = match share {
        None => (
            "the volume key".to_owned(),
            "the new key slot".to_owned(),
            "a wrapped key that does not unwrap to the volume key",
        ),
        Some(x) => (
            format!("share {x} of the volume key"),
            format!("the new slot of share {x}"),
            "a wrapped share that does not unwrap to what was wrapped",
        ),
    };
    let wr = p
        .wrap(key_id, algorithm, secret)
        .await
        .map_err(provider(format!("wrapping {what} with {key_id}")))?;
    let back = p
        .unwrap(&wr.key_id, &wr.algorithm, &wr.wrapped)
        .await
        .map_err(provider(format!(
            "unwrapping {back_what} with {} to verify it",
            wr.key_id
        )))?;
    if back.expose() != secret.expose() {
        return Err(SlotError::Inconsistent(format!(
            "key {} returned {mismatch}; refusing to store it",
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
        share,
    })
}

/// Rebuilds the VMK of a split header from unwrapped shares: tries every subset of
/// `threshold` shares with distinct x (in the order given, so the first `threshold` distinct
/// shares are tried first) until one combines to a key that passes [`VolumeHeader::verify_key`].
/// A share that is wrong (another volume's, a slot swapped in) only makes its subsets fail the
/// key check; more shares than the threshold let the others still unlock.
///
/// Errors: [`HeaderError::Invalid`] for a header that is not split or fewer distinct shares than
/// the threshold (the caller counts first and reports why it has too few);
/// [`HeaderError::Tampered`] as soon as a combination passes the key check but not the MAC;
/// [`HeaderError::WrongKey`] when no subset gives the volume's key.
pub fn combine_shares(
    h: &VolumeHeader,
    shares: &[(u8, &VolumeKey)],
) -> Result<VolumeKey, HeaderError> {
    combine_subsets(h, shares).map(|(vmk, _)| vmk)
}

/// [`combine_shares`], also returning the indexes (into `shares`) of the subset that worked.
pub fn combine_subsets(
    h: &VolumeHeader,
    shares: &[(u8, &VolumeKey)],
) -> Result<(VolumeKey, Vec<usize>), HeaderError> {
    if !h.policy.is_split() {
        return Err(HeaderError::Invalid(
            "the volume key is not split (policy any): there are no shares to combine".into(),
        ));
    }
    let need = h.policy.threshold(h.share_count());
    let mut distinct: Vec<u8> = shares.iter().map(|(x, _)| *x).collect();
    distinct.sort_unstable();
    distinct.dedup();
    if need == 0 || distinct.len() < need {
        return Err(HeaderError::Invalid(format!(
            "{} distinct shares given, {need} needed ({})",
            distinct.len(),
            h.policy.describe(h.share_count())
        )));
    }
    // Depth-first over index subsets of size `need` with distinct x, lexicographic order.
    let mut pick: Vec<usize> = Vec::with_capacity(need);
    let mut tried = false;
    fn next(
        h: &VolumeHeader,
        shares: &[(u8, &VolumeKey)],
        need: usize,
        start: usize,
        pick: &mut Vec<usize>,
        tried: &mut bool,
    ) -> Option<Result<VolumeKey, HeaderError>> {
        if pick.len() == need {
            let subset: Vec<(u8, &VolumeKey)> = pick.iter().map(|&i| shares[i]).collect();
            *tried = true;
            let vmk = match kvcrypt_crypto::shamir::combine(&subset) {
                Ok(k) => k,
                Err(_) => return None,
            };
            return match h.verify_key(&vmk) {
                Ok(()) => Some(Ok(vmk)),
                Err(HeaderError::WrongKey) => None,
                Err(e) => Some(Err(e)),
            };
        }
        for i in start..shares.len() {
            if pick.iter().any(|&j| shares[j].0 == shares[i].0) {
                continue;
            }
            pick.push(i);
            if let Some(r) = next(h, shares, need, i + 1, pick, tried) {
                return Some(r);
            }
            pick.pop();
        }
        None
    }
    match next(h, shares, need, 0, &mut pick, &mut tried) {
        Some(Ok(vmk)) => Ok((vmk, pick)),
        Some(Err(e)) => Err(e),
        None => Err(HeaderError::WrongKey),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvcrypt_crypto::shamir;
    use kvcrypt_format::SlotPolicy;

    fn split_header(k: u8, n: u8) -> (VolumeHeader, VolumeKey, Vec<(u8, VolumeKey)>) {
        let vmk = VolumeKey::from_slice(&[0x42; 64]).unwrap();
        let mut h = VolumeHeader::new_for_device(16 << 20, 4096, "s", &vmk).unwrap();
        let shares = shamir::split(&vmk, k, n).unwrap();
        for (x, _) in &shares {
            h.add_slot(KeySlot {
                id: 0,
                provider: kvcrypt_format::PROVIDER_AZURE.into(),
                key_id: format!("https://v{x}.vault.azure.net/keys/k/1"),
                algorithm: "RSA-OAEP-256".into(),
                wrapped: vec![*x; 32],
                created_at: "2026-01-01T00:00:00Z".into(),
                check: None,
                share: Some(*x),
            });
        }
        h.policy = if k == n {
            SlotPolicy::All
        } else {
            SlotPolicy::KOfN { k }
        };
        h.seal(&vmk);
        (h, vmk, shares)
    }

    #[test]
    fn combine_shares_finds_the_subset_that_passes_the_key_check() {
        let (h, vmk, shares) = split_header(2, 3);
        let refs: Vec<(u8, &VolumeKey)> = shares.iter().map(|(x, s)| (*x, s)).collect();
        assert_eq!(
            combine_shares(&h, &refs[..2]).unwrap().expose(),
            vmk.expose()
        );
        // Share 1 is wrong (another value): with shares 2 and 3 also at hand, it still unlocks.
        let bad = VolumeKey::from_slice(&[9; 64]).unwrap();
        let with_bad = [(1, &bad), refs[1], refs[2]];
        let (got, used) = combine_subsets(&h, &with_bad).unwrap();
        assert_eq!(got.expose(), vmk.expose());
        assert_eq!(used, vec![1, 2]);
        // The wrong share and one good one: wrong key. Too few: refused before combining.
        assert!(matches!(
            combine_shares(&h, &with_bad[..2]),
            Err(HeaderError::WrongKey)
        ));
        assert!(matches!(
            combine_shares(&h, &refs[..1]),
            Err(HeaderError::Invalid(_))
        ));
        // Two candidates for the same x count once.
        assert!(matches!(
            combine_shares(&h, &[refs[0], (1, &bad)]),
            Err(HeaderError::Invalid(_))
        ));
        // A tampered header: the shares combine to the key, the MAC refuses.
        let mut t = h.clone();
        t.label = "changed".into();
        assert!(matches!(
            combine_shares(&t, &refs),
            Err(HeaderError::Tampered)
        ));
        let (h, vmk, shares) = split_header(3, 3);
        let refs: Vec<(u8, &VolumeKey)> = shares.iter().map(|(x, s)| (*x, s)).collect();
        assert_eq!(combine_shares(&h, &refs).unwrap().expose(), vmk.expose());
        assert!(combine_shares(&h, &refs[1..]).is_err());
    }
}
