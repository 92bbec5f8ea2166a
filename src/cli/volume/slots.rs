//! Key-slot logic of `format`, `rewrap`, `header dump --dump-master-key` and `open
//! --foreground`, over any [`kvcrypt_keyvault::KeyProvider`] (served synchronously by a
//! [`BlockingProvider`]): the real one is Key Vault (`vault_provider` in `volume.rs`), the
//! unit tests use a local stand-in.

use crate::keyslots;
use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_exit::{Context, Failure};
use kvcrypt_format::{HeaderError, KeySlot, VolumeHeader};
use kvcrypt_keyvault::{BlockingProvider, PinError, Pins};

use super::recovery_key::RecoveryPublicKey;
use crate::cli::CliError;

/// Wraps the volume's access-check secret for the slot `key_id`/`algorithm` and proves it
/// unwraps again ([`crate::keyslots::make_check`], synchronously).
pub fn make_check(
    w: &BlockingProvider,
    key_id: &str,
    algorithm: &str,
    vmk: &VolumeKey,
) -> Result<Vec<u8>, Failure> {
    Ok(w.block_on(keyslots::make_check(w.provider(), key_id, algorithm, vmk))?)
}

/// `https://VAULT/keys/NAME/VERSION` → `https://VAULT/keys/NAME` (unchanged if versionless).
pub fn versionless(key_id: &str) -> String {
    let trimmed = key_id.trim_end_matches('/');
    let parts: Vec<&str> = trimmed.split('/').collect();
    // ["https:", "", host, "keys", name, version]
    if parts.len() == 6 && parts[3] == "keys" {
        parts[..5].join("/")
    } else {
        trimmed.to_string()
    }
}

/// Wraps `vmk` into a new slot proved to unwrap again ([`crate::keyslots::make_slot`],
/// synchronously).
pub fn make_slot(
    w: &BlockingProvider,
    key_id: &str,
    algorithm: Option<&str>,
    vmk: &VolumeKey,
) -> Result<KeySlot, Failure> {
    Ok(w.block_on(keyslots::make_slot(w.provider(), key_id, algorithm, vmk))?)
}

/// For each slot of `h`, the key id to unwrap it with (`None`: not pinned, never tried).
/// Refuses, before any request, a header none of whose slots names a pinned key. Only Key
/// Vault slots take part: the customer-held recovery slot is never sent to a vault (its key
/// id is a fingerprint), even with `--allow-unpinned-key`.
pub fn pinned_ids(h: &VolumeHeader, pins: &Pins) -> Result<Vec<Option<String>>, PinError> {
    let vault = |s: &KeySlot| s.provider == kvcrypt_format::PROVIDER_AZURE;
    let ids: Vec<&str> = h
        .slots
        .iter()
        .filter(|s| vault(s))
        .map(|s| s.key_id.as_str())
        .collect();
    let mut selected = pins.select(&ids)?.into_iter();
    let chosen: Vec<Option<String>> = h
        .slots
        .iter()
        .map(|s| {
            if vault(s) {
                selected.next().flatten()
            } else {
                None
            }
        })
        .collect();
    for (s, id) in h.slots.iter().zip(&chosen) {
        if id.is_some() && pins.pin_for(&s.key_id).is_none() {
            eprintln!(
                "kvcrypt: warning: key slot {} names {}, which the configuration does not pin; \
                 trying it anyway (--allow-unpinned-key)",
                s.id, s.key_id
            );
        }
    }
    Ok(chosen)
}

/// Unwraps the VMK from the first pinned slot that works and passes the key check and MAC.
/// Returns the key and the slot id. Slots naming an unpinned key are never tried; a header
/// with no pinned slot is refused before any request. A MAC failure aborts at once (the
/// header is not to be trusted); otherwise the error of the last slot tried is returned, with
/// all slots' reasons.
pub fn unlock(
    h: &VolumeHeader,
    w: &BlockingProvider,
    pins: &Pins,
) -> Result<(VolumeKey, u32), Failure> {
    let chosen = pinned_ids(h, pins)?;
    unlock_with(h, w, chosen)
}

/// [`unlock`] with the key ids [`pinned_ids`] chose.
fn unlock_with(
    h: &VolumeHeader,
    w: &BlockingProvider,
    chosen: Vec<Option<String>>,
) -> Result<(VolumeKey, u32), Failure> {
    let mut reasons = Vec::new();
    let mut last: Option<Failure> = None;
    for (s, id) in h.slots.iter().zip(chosen) {
        if s.is_recovery() {
            reasons.push(format!(
                "slot {}: the customer-held recovery slot (only `kvcrypt recover` uses it)",
                s.id
            ));
            continue;
        }
        if s.provider != kvcrypt_format::PROVIDER_AZURE {
            reasons.push(format!("slot {}: unknown provider {:?}", s.id, s.provider));
            continue;
        }
        let Some(key_id) = id else {
            reasons.push(format!(
                "slot {} ({}): not pinned, not tried",
                s.id, s.key_id
            ));
            continue;
        };
        match w.unwrap(&key_id, &s.algorithm, &s.wrapped) {
            Ok(vmk) => match h.verify_key(&vmk) {
                Ok(()) => return Ok((vmk, s.id)),
                Err(HeaderError::Tampered) => return Err(HeaderError::Tampered.into()),
                Err(e) => {
                    reasons.push(format!("slot {} ({}): {e}", s.id, s.key_id));
                    last = Some(e.into());
                }
            },
            Err(e) => {
                reasons.push(format!("slot {} ({}): {e:#}", s.id, s.key_id));
                last = Some(e.into());
            }
        }
    }
    let summary = reasons.join("; ");
    Err(match last {
        Some(e) => e.context(format!("no key slot could be unlocked ({summary})")),
        None => {
            HeaderError::Invalid(format!("the volume has no usable key slot ({summary})")).into()
        }
    })
}

/// What `kvcrypt rewrap` should do.
#[derive(Debug, Default)]
pub struct RewrapPlan {
    /// Key for the new slot; `None` = latest version of the key of the first slot.
    pub key_id: Option<String>,
    pub algorithm: Option<String>,
    pub add: bool,
    pub remove: Vec<u32>,
    /// Add a recovery slot for this public key (wrapped locally, no vault call).
    pub recovery: Option<RecoveryPublicKey>,
    /// Replace an existing recovery slot of another key (without it, such a rewrap is refused).
    pub replace_recovery: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub struct RewrapOutcome {
    pub unlocked_with: u32,
    pub added: Option<u32>,
    /// Set when no slot was added because one already used the target key version.
    pub already_present: Option<u32>,
    pub removed: Vec<u32>,
    /// Existing slots that gained an access check (format v2).
    pub checks_added: Vec<u32>,
    /// Existing slots whose access check could not be made, and why.
    pub checks_failed: Vec<(u32, String)>,
    /// The recovery slot added.
    pub recovery_added: Option<u32>,
    /// Set when no recovery slot was added because this one already holds that public key.
    pub recovery_present: Option<u32>,
}

/// Adds/removes slots in `h` and re-seals it. The caller writes it (only if something changed).
pub fn rewrap(
    h: &mut VolumeHeader,
    w: &BlockingProvider,
    plan: &RewrapPlan,
    pins: &Pins,
) -> Result<RewrapOutcome, Failure> {
    if !plan.add && plan.remove.is_empty() && plan.recovery.is_none() {
        return Err(
            HeaderError::Invalid("nothing to do: --no-add without --remove-slot".into()).into(),
        );
    }
    let mut remove = plan.remove.clone();
    remove.sort_unstable();
    remove.dedup();
    for id in &remove {
        if !h.slots.iter().any(|s| s.id == *id) {
            return Err(HeaderError::Invalid(format!("no key slot {id} on this volume")).into());
        }
    }
    // With an add, a slot for the target key always remains (added, or present and kept).
    // The recovery slot does not count: the agent never unlocks with it.
    let vault_left = h
        .slots
        .iter()
        .filter(|s| !s.is_recovery() && !remove.contains(&s.id))
        .count();
    if !plan.add && vault_left == 0 {
        return Err(HeaderError::Invalid(
            "refusing to remove every Key Vault slot: the volume could never be opened again \
             (except by hand with the recovery key)"
                .into(),
        )
        .into());
    }
    // The recovery slot: same key → nothing to do; another key → only with --replace-recovery.
    // Decided before any request, so a refusal costs no vault call.
    let recovery = match (&plan.recovery, h.recovery_slot()) {
        (None, _) => None,
        (Some(r), Some(old)) if old.key_id == r.fingerprint => {
            if plan.replace_recovery && !remove.contains(&old.id) {
                remove.push(old.id);
                Some(r)
            } else {
                None
            }
        }
        (Some(r), Some(old)) => {
            if !plan.replace_recovery && !remove.contains(&old.id) {
                return Err(CliError::Busy(format!(
                    "the volume already has a recovery slot (slot {}, {}); pass \
                     --replace-recovery to replace it with {}, or remove it first \
                     (--remove-slot {})",
                    old.id, old.key_id, r.fingerprint, old.id
                ))
                .into());
            }
            if !remove.contains(&old.id) {
                remove.push(old.id);
            }
            Some(r)
        }
        (Some(r), None) => Some(r),
    };
    let recovery_present = match (&plan.recovery, recovery) {
        (Some(_), None) => h.recovery_slot().map(|s| s.id),
        _ => None,
    };
    // Before any request: the new slot's key must be pinned too (an explicit one is checked
    // here; the default, the latest version of the first pinned slot's key, is pinned).
    let explicit = plan
        .key_id
        .as_deref()
        .map(|k| {
            kvcrypt_keyvault::KeyId::parse(k)?;
            let id = pins.check_target(k)?;
            if pins.pin_for(k).is_none() {
                eprintln!(
                    "kvcrypt: warning: wrapping with {k}, which the configuration does not pin \
                     (--allow-unpinned-key): the agent will not use this slot until it is pinned"
                );
            }
            Ok::<_, Failure>(id)
        })
        .transpose()?;
    let chosen = pinned_ids(h, pins)?;
    // Slot id → the key id its requests use (`None`: not pinned), from before any change.
    let pinned: Vec<(u32, Option<String>)> = h
        .slots
        .iter()
        .map(|s| s.id)
        .zip(chosen.iter().cloned())
        .collect();
    let (vmk, unlocked_with) = unlock_with(h, w, chosen)?;
    let mut out = RewrapOutcome {
        unlocked_with,
        added: None,
        already_present: None,
        removed: Vec::new(),
        checks_added: Vec::new(),
        checks_failed: Vec::new(),
        recovery_added: None,
        recovery_present,
    };
    if let Some(r) = recovery {
        out.recovery_added = Some(h.add_slot(r.make_slot(&vmk)?));
    }
    if plan.add {
        let target = match explicit {
            Some(k) => k,
            None => {
                let first = pinned
                    .iter()
                    .find_map(|(_, k)| k.as_ref())
                    .ok_or_else(|| HeaderError::Invalid("no key slots".into()))?;
                w.latest_version(&versionless(first))
                    .with_context(|| format!("looking up the latest version of {first}"))?
            }
        };
        let algorithm = plan.algorithm.as_deref();
        let present = h.slots.iter().find(|s| {
            let id = pinned
                .iter()
                .find(|(i, _)| *i == s.id)
                .and_then(|(_, k)| k.as_ref());
            id == Some(&target)
                && algorithm.is_none_or(|a| a == s.algorithm)
                && !remove.contains(&s.id)
        });
        if let Some(s) = present {
            out.already_present = Some(s.id);
        } else {
            let slot = make_slot(w, &target, algorithm, &vmk)?;
            out.added = Some(h.add_slot(slot));
        }
    }
    for id in &remove {
        h.remove_slot(*id)?;
        out.removed.push(*id);
    }
    // Slots from before format v2 gain their access check here, so the agent's periodic
    // checks stop unwrapping the VMK. A key that cannot wrap now (wrapKey not permitted,
    // version disabled) keeps its slot as it was: it still unlocks, checks fall back to it.
    for s in h
        .slots
        .iter_mut()
        .filter(|s| s.check.is_none() && !s.is_recovery())
    {
        let id = pinned
            .iter()
            .find(|(i, _)| *i == s.id)
            .and_then(|(_, k)| k.as_ref());
        let Some(key_id) = id else {
            out.checks_failed.push((
                s.id,
                format!(
                    "{} is not pinned; no request is made to its vault",
                    s.key_id
                ),
            ));
            continue;
        };
        match make_check(w, key_id, &s.algorithm, &vmk) {
            Ok(c) => {
                s.check = Some(c);
                out.checks_added.push(s.id);
            }
            Err(e) => out.checks_failed.push((s.id, format!("{e:#}"))),
        }
    }
    h.seal(&vmk);
    h.verify_key(&vmk)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvcrypt_crypto::kdf;
    use kvcrypt_exit::Exit;
    use kvcrypt_testkit::provider::XorVault;

    const K1: &str = "https://a.vault.azure.net/keys/vol/v1";
    const K2: &str = "https://a.vault.azure.net/keys/vol/v2";
    const OTHER: &str = "https://b.vault.azure.net/keys/recovery/r1";

    /// The configuration's pins: both test keys (versionless).
    fn pins() -> Pins {
        Pins::new(
            [K1, OTHER]
                .iter()
                .map(|k| kvcrypt_keyvault::KeyPin::parse(&versionless(k)).unwrap())
                .collect(),
            "keys of [vault]",
        )
    }

    fn vmk(b: u8) -> VolumeKey {
        VolumeKey::from_slice(&[b; 64]).unwrap()
    }

    fn volume(w: &BlockingProvider) -> (VolumeHeader, VolumeKey) {
        let k = vmk(7);
        let mut h = VolumeHeader::new_for_device(16 << 20, 4096, "t", &k).unwrap();
        h.add_slot(make_slot(w, K1, None, &k).unwrap());
        h.seal(&k);
        (h, k)
    }

    #[test]
    fn versionless_ids() {
        assert_eq!(versionless(K1), "https://a.vault.azure.net/keys/vol");
        assert_eq!(
            versionless("https://a.vault.azure.net/keys/vol"),
            "https://a.vault.azure.net/keys/vol"
        );
        assert_eq!(
            versionless("https://a.vault.azure.net/keys/vol/"),
            "https://a.vault.azure.net/keys/vol"
        );
    }

    #[test]
    fn unlock_finds_the_working_slot() {
        let w = XorVault::new(&[K1, OTHER]).blocking();
        let (mut h, k) = volume(&w);
        let (got, id) = unlock(&h, &w, &pins()).unwrap();
        assert_eq!((got.expose(), id), (k.expose(), 0));
        // A slot of a wrong key placed first is skipped; the good one still unlocks.
        let bad = make_slot(&w, OTHER, None, &vmk(9)).unwrap();
        let bad_id = h.add_slot(bad);
        let good = h.slots.remove(0);
        h.slots.push(good);
        h.seal(&k);
        let (_, id) = unlock(&h, &w, &pins()).unwrap();
        assert_eq!(id, 0);
        assert_ne!(id, bad_id);
        // Only the wrong-key slot left: WrongKey.
        h.slots.retain(|s| s.id == bad_id);
        h.seal(&k);
        let e = unlock(&h, &w, &pins()).unwrap_err();
        assert!(
            matches!(
                e.error().downcast_ref::<HeaderError>(),
                Some(HeaderError::WrongKey)
            ),
            "{e:#}"
        );
    }

    #[test]
    fn unlock_stops_on_tampering_and_reports_denied_slots() {
        let w = XorVault::new(&[K1]).blocking();
        let (mut h, _) = volume(&w);
        h.label = "changed".into();
        let e = unlock(&h, &w, &pins()).unwrap_err();
        assert!(matches!(
            e.error().downcast_ref::<HeaderError>(),
            Some(HeaderError::Tampered)
        ));
        let (h, _) = volume(&w);
        let denied = XorVault::new(&[OTHER]).blocking();
        let e = unlock(&h, &denied, &pins()).unwrap_err();
        assert!(format!("{e:#}").contains("denied"), "{e:#}");
    }

    #[test]
    fn rewrap_to_latest_version_then_remove_old_slot() {
        let vault = XorVault::new(&[K1]);
        let w = vault.blocking();
        let (mut h, k) = volume(&w);
        // Same key, no new version yet: nothing added.
        let plan = RewrapPlan {
            add: true,
            ..Default::default()
        };
        let out = rewrap(&mut h, &w, &plan, &pins()).unwrap();
        assert_eq!(out.already_present, Some(0));
        assert_eq!(out.added, None);
        // The key is rotated to v2: a new slot for v2, and slot 0 removed.
        vault.rotate(K1, K2);
        let plan = RewrapPlan {
            add: true,
            remove: vec![0],
            ..Default::default()
        };
        let out = rewrap(&mut h, &w, &plan, &pins()).unwrap();
        assert_eq!(out.added, Some(1));
        assert_eq!(out.removed, vec![0]);
        assert_eq!(h.slots.len(), 1);
        assert_eq!(h.slots[0].key_id, K2);
        h.verify_key(&k).unwrap();
        let (got, id) = unlock(&h, &w, &pins()).unwrap();
        assert_eq!((got.expose(), id), (k.expose(), 1));
    }

    #[test]
    fn rewrap_adds_a_second_vault_and_refuses_bad_removals() {
        let w = XorVault::new(&[K1, OTHER]).blocking();
        let (mut h, k) = volume(&w);
        let plan = RewrapPlan {
            add: true,
            key_id: Some(OTHER.into()),
            algorithm: Some("RSA-OAEP".into()),
            remove: vec![],
            ..Default::default()
        };
        let out = rewrap(&mut h, &w, &plan, &pins()).unwrap();
        assert_eq!(out.added, Some(1));
        assert_eq!(h.slots[1].algorithm, "RSA-OAEP");
        h.verify_key(&k).unwrap();
        let bad = RewrapPlan {
            add: false,
            remove: vec![5],
            ..Default::default()
        };
        assert!(rewrap(&mut h, &w, &bad, &pins()).is_err());
        let all = RewrapPlan {
            add: false,
            remove: vec![0, 1],
            ..Default::default()
        };
        assert!(
            rewrap(&mut h, &w, &all, &pins()).is_err(),
            "removing every slot must fail"
        );
        assert_eq!(h.slots.len(), 2, "a refused rewrap changes nothing");
        let none = RewrapPlan::default();
        assert!(rewrap(&mut h, &w, &none, &pins()).is_err());
    }

    #[test]
    fn slots_get_access_checks_and_rewrap_adds_missing_ones() {
        let w = XorVault::new(&[K1]).blocking();
        let (mut h, k) = volume(&w);
        let secret = kdf::access_secret(&k);
        let check = h.slots[0].check.clone().expect("new slots have a check");
        assert_eq!(
            w.unwrap_access_secret(K1, "RSA-OAEP-256", &check)
                .unwrap()
                .expose(),
            secret.expose()
        );
        // A slot from before format v2 (no check): rewrap adds it even with nothing else to do.
        h.slots[0].check = None;
        h.seal(&k);
        let out = rewrap(
            &mut h,
            &w,
            &RewrapPlan {
                add: true,
                ..Default::default()
            },
            &pins(),
        )
        .unwrap();
        assert_eq!(out.already_present, Some(0));
        assert_eq!(out.checks_added, vec![0]);
        assert!(h.slots[0].check.is_some());
        h.verify_key(&k).unwrap();
        h.verify_access_secret(secret.expose()).unwrap();
    }

    /// A recovery public key file for a fresh 3072-bit key pair; the private key with it.
    fn recovery_key(dir: &std::path::Path, name: &str) -> (RecoveryPublicKey, rsa::RsaPrivateKey) {
        use rsa::pkcs8::{EncodePublicKey, LineEnding};
        let sk = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 3072).unwrap();
        let p = dir.join(name);
        let pem = sk
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        std::fs::write(&p, pem).unwrap();
        (RecoveryPublicKey::read(&p).unwrap(), sk)
    }

    #[test]
    fn rewrap_adds_replaces_and_never_unlocks_with_the_recovery_slot() {
        let dir = tempfile::tempdir().unwrap();
        let w = XorVault::new(&[K1]).blocking();
        let (mut h, k) = volume(&w);
        let (r1, sk1) = recovery_key(dir.path(), "r1.pem");
        let r1_again = RecoveryPublicKey::read(&dir.path().join("r1.pem")).unwrap();
        let (r2, _) = recovery_key(dir.path(), "r2.pem");
        let plan = |r, replace| RewrapPlan {
            recovery: Some(r),
            replace_recovery: replace,
            ..Default::default()
        };
        let out = rewrap(&mut h, &w, &plan(r1, false), &pins()).unwrap();
        assert_eq!(out.recovery_added, Some(1));
        assert_eq!(
            out.added, None,
            "no Key Vault slot added with the recovery slot"
        );
        assert_eq!(h.version, kvcrypt_format::layout::VERSION_3);
        h.verify_key(&k).unwrap();
        let slot = h.recovery_slot().unwrap().clone();
        let vmk =
            rsa::RsaPrivateKey::decrypt(&sk1, rsa::Oaep::new::<sha2::Sha256>(), &slot.wrapped)
                .unwrap();
        assert_eq!(&vmk[..], &k.expose()[..], "RSA-OAEP-256 of the VMK");
        // The same public key again: nothing to do.
        let out = rewrap(&mut h, &w, &plan(r1_again, false), &pins()).unwrap();
        assert_eq!((out.recovery_added, out.recovery_present), (None, Some(1)));
        // Another key: refused (exit 10) unless replacing; a refusal changes nothing.
        let r2b = RecoveryPublicKey::read(&dir.path().join("r2.pem")).unwrap();
        let e = rewrap(&mut h, &w, &plan(r2b, false), &pins()).unwrap_err();
        assert_eq!(e.exit(), Exit::Busy, "{e:#}");
        assert!(format!("{e:#}").contains("--replace-recovery"), "{e:#}");
        let out = rewrap(&mut h, &w, &plan(r2, true), &pins()).unwrap();
        assert_eq!(out.recovery_added, Some(2));
        assert_eq!(out.removed, vec![1]);
        assert_eq!(h.slots.iter().filter(|s| s.is_recovery()).count(), 1);
        // Unlock (even trusting unpinned ids) never sends the recovery slot to a vault.
        let mut open = pins();
        open.allow_unpinned = true;
        assert_eq!(pinned_ids(&h, &open).unwrap()[1], None);
        let (_, id) = unlock(&h, &w, &pins()).unwrap();
        assert_eq!(id, 0);
        // Only the recovery slot would be left: refused.
        let only = RewrapPlan {
            remove: vec![0],
            ..Default::default()
        };
        assert!(rewrap(&mut h, &w, &only, &pins()).is_err());
        // Removing the recovery slot makes the header v2 again.
        let drop_it = RewrapPlan {
            remove: vec![2],
            ..Default::default()
        };
        rewrap(&mut h, &w, &drop_it, &pins()).unwrap();
        assert!(h.recovery_slot().is_none());
        assert_eq!(h.version, kvcrypt_format::layout::VERSION_2);
    }

    #[test]
    fn make_slot_rejects_a_wrap_that_does_not_round_trip() {
        let vault = XorVault::new(&[K1]);
        vault.garble();
        let broken = vault.blocking();
        assert!(make_slot(&broken, K1, None, &vmk(3)).is_err());
        assert!(make_check(&broken, K1, "A256KW", &vmk(3)).is_err());
    }
}
