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

/// Wraps share `x` of `vmk` into a new slot proved to unwrap again
/// ([`crate::keyslots::make_share_slot`], synchronously).
pub fn make_share_slot(
    w: &BlockingProvider,
    key_id: &str,
    algorithm: Option<&str>,
    x: u8,
    share: &VolumeKey,
    vmk: &VolumeKey,
) -> Result<KeySlot, Failure> {
    Ok(w.block_on(keyslots::make_share_slot(
        w.provider(),
        key_id,
        algorithm,
        x,
        share,
        vmk,
    ))?)
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
    if h.policy.is_split() {
        return unlock_split(h, w, &chosen).map(|u| (u.vmk, u.first_slot));
    }
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

/// A split volume unlocked: the VMK, the slot of the first share used, and the shares that
/// combined to it (x → share), which `rewrap` wraps again without unwrapping them twice.
pub struct SplitUnlock {
    pub vmk: VolumeKey,
    pub first_slot: u32,
    pub shares: Vec<(u8, VolumeKey)>,
}

/// One share slot's unwrap that failed, for the error message and the exit code.
struct ShareFailure {
    x: u8,
    what: String,
    error: Failure,
    class: Option<kvcrypt_keyvault::ErrorClass>,
}

/// Unlocks a split (format v4) header: unwraps pinned share slots, one per share index, until
/// `threshold` distinct shares are in hand, then [`keyslots::combine_subsets`]; if no subset
/// passes the key check, unwraps the remaining slots too and tries again with everything.
///
/// Too few shares: the error names every slot that failed and says how many shares were
/// obtained of how many needed. Its exit code is *vault unavailable* when the shares that
/// failed transiently (network, throttling, 5xx) could still make up the difference — retrying
/// may work — and otherwise that of the denials (*access denied*), or of the last failure.
pub fn unlock_split(
    h: &VolumeHeader,
    w: &BlockingProvider,
    chosen: &[Option<String>],
) -> Result<SplitUnlock, Failure> {
    let total = h.share_count();
    let need = h.policy.threshold(total);
    let policy = h.policy.describe(total);
    // (x, share, slot id) in the order obtained.
    let mut got: Vec<(u8, VolumeKey, u32)> = Vec::new();
    let mut failures: Vec<ShareFailure> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut attempted: Vec<u32> = Vec::new();
    let distinct = |got: &[(u8, VolumeKey, u32)]| {
        let mut xs: Vec<u8> = got.iter().map(|g| g.0).collect();
        xs.sort_unstable();
        xs.dedup();
        xs.len()
    };
    // Pass 1: one slot per share index until `need`; pass 2 (only after a wrong combination):
    // every remaining pinned slot, so another candidate for a bad share can be tried.
    for pass in 0..2 {
        for (s, id) in h.slots.iter().zip(chosen) {
            if pass == 0 && distinct(&got) >= need {
                break;
            }
            if s.is_recovery() || attempted.contains(&s.id) {
                continue;
            }
            let Some(x) = s.share else { continue };
            if pass == 0 && got.iter().any(|g| g.0 == x) {
                continue;
            }
            if s.provider != kvcrypt_format::PROVIDER_AZURE {
                notes.push(format!("slot {}: unknown provider {:?}", s.id, s.provider));
                continue;
            }
            let Some(key_id) = id else {
                if pass == 0 {
                    notes.push(format!(
                        "slot {} (share {x}, {}): not pinned, not tried",
                        s.id, s.key_id
                    ));
                }
                continue;
            };
            attempted.push(s.id);
            match w.unwrap(key_id, &s.algorithm, &s.wrapped) {
                Ok(share) => got.push((x, share, s.id)),
                Err(e) => failures.push(ShareFailure {
                    x,
                    what: format!("slot {} (share {x}, {}): {e:#}", s.id, s.key_id),
                    class: Some(e.class()),
                    error: e.into(),
                }),
            }
        }
        let have = distinct(&got);
        if have < need {
            break;
        }
        let refs: Vec<(u8, &VolumeKey)> = got.iter().map(|(x, k, _)| (*x, k)).collect();
        match keyslots::combine_subsets(h, &refs) {
            Ok((vmk, used)) => {
                let first_slot = used.iter().map(|&i| got[i].2).min().unwrap_or_default();
                let mut shares = Vec::with_capacity(used.len());
                for &i in &used {
                    shares.push((got[i].0, got[i].1.clone()));
                }
                return Ok(SplitUnlock {
                    vmk,
                    first_slot,
                    shares,
                });
            }
            Err(HeaderError::WrongKey) if pass == 0 => {
                notes.push(format!(
                    "the first {need} shares did not combine to the volume key; trying the \
                     other slots"
                ));
            }
            Err(HeaderError::WrongKey) => {
                let all: Vec<String> = failures.iter().map(|f| f.what.clone()).collect();
                return Err(Failure::from(HeaderError::WrongKey).context(format!(
                    "split volume ({policy}): no {need} of the {have} shares obtained combine \
                     to the volume key{}",
                    if all.is_empty() {
                        String::new()
                    } else {
                        format!(" (failed: {})", all.join("; "))
                    }
                )));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let have = distinct(&got);
    // Share indexes not obtained that failed only transiently could still come back.
    let mut could_come: Vec<u8> = failures
        .iter()
        .filter(|f| f.class == Some(kvcrypt_keyvault::ErrorClass::Transient))
        .map(|f| f.x)
        .filter(|x| !got.iter().any(|g| g.0 == *x))
        .collect();
    could_come.sort_unstable();
    could_come.dedup();
    let missing = need.saturating_sub(have);
    let pick = |class| failures.iter().rposition(|f| f.class == Some(class));
    let representative = if could_come.len() >= missing {
        pick(kvcrypt_keyvault::ErrorClass::Transient)
    } else {
        pick(kvcrypt_keyvault::ErrorClass::Denied)
    }
    .or_else(|| failures.len().checked_sub(1));
    let mut reasons: Vec<String> = failures.iter().map(|f| f.what.clone()).collect();
    reasons.extend(notes);
    let summary = format!(
        "split volume ({policy}): obtained {have} of the {need} shares needed ({})",
        reasons.join("; ")
    );
    Err(match representative {
        Some(i) => failures.swap_remove(i).error.context(summary),
        // Nothing failed, yet too few: the other shares' slots name keys that are not pinned.
        None => Failure::new(kvcrypt_exit::Exit::NotPinned, summary),
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
    /// Split volumes: (share index, new slot) for each share rewrapped to its key's latest
    /// version.
    pub shares_added: Vec<(u8, u32)>,
    /// Split volumes: (share index, slot) for each share already wrapped by that version.
    pub shares_present: Vec<(u8, u32)>,
    /// Split volumes: shares that could not be rewrapped, and why (their slots stay as they are).
    pub shares_failed: Vec<(u8, String)>,
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
    if h.policy.is_split() {
        return rewrap_split(h, w, plan, pins);
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
        shares_added: Vec::new(),
        shares_present: Vec::new(),
        shares_failed: Vec::new(),
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

/// The access checks a split volume's slots may lack (the same as for any volume: the check
/// wraps the VMK's access-check secret, whatever the slot wraps).
fn add_missing_checks(
    h: &mut VolumeHeader,
    w: &BlockingProvider,
    pinned: &[(u32, Option<String>)],
    vmk: &VolumeKey,
    out: &mut RewrapOutcome,
) {
    for s in h
        .slots
        .iter_mut()
        .filter(|s| s.check.is_none() && !s.is_recovery())
    {
        let Some(key_id) = pinned
            .iter()
            .find(|(i, _)| *i == s.id)
            .and_then(|(_, k)| k.as_ref())
        else {
            out.checks_failed.push((
                s.id,
                format!(
                    "{} is not pinned; no request is made to its vault",
                    s.key_id
                ),
            ));
            continue;
        };
        match make_check(w, key_id, &s.algorithm, vmk) {
            Ok(c) => {
                s.check = Some(c);
                out.checks_added.push(s.id);
            }
            Err(e) => out.checks_failed.push((s.id, format!("{e:#}"))),
        }
    }
}

/// `rewrap` of a split (format v4) volume: each share is rewrapped to the latest version of
/// the key that wraps it now (a new slot with the same share index), `--remove-slot` removes
/// old slots while another slot of the same share remains, and missing access checks are
/// added. Changing a split volume's keys, threshold or recovery slot is refused: the shares
/// would have to be made anew, which is what `kvcrypt format` does.
fn rewrap_split(
    h: &mut VolumeHeader,
    w: &BlockingProvider,
    plan: &RewrapPlan,
    pins: &Pins,
) -> Result<RewrapOutcome, Failure> {
    let refuse = |what: &str| -> Failure {
        CliError::Usage(format!(
            "{what} is not supported on a split volume ({}): its volume key is split into \
             shares, one per key; to change its keys, threshold or recovery slot, copy the data \
             to a volume formatted anew (`kvcrypt format --key-id ... --policy ...`). `kvcrypt \
             rewrap DEVICE` (without --key-id) rewraps every share to the latest version of its \
             key",
            h.policy.describe(h.share_count())
        ))
        .into()
    };
    if plan.key_id.is_some() {
        return Err(refuse("rewrap --key-id (another key for a share)"));
    }
    if plan.recovery.is_some() {
        return Err(refuse("adding a recovery slot with rewrap"));
    }
    let mut remove = plan.remove.clone();
    remove.sort_unstable();
    remove.dedup();
    for id in &remove {
        if !h.slots.iter().any(|s| s.id == *id) {
            return Err(HeaderError::Invalid(format!("no key slot {id} on this volume")).into());
        }
    }
    let chosen = pinned_ids(h, pins)?;
    let pinned: Vec<(u32, Option<String>)> = h
        .slots
        .iter()
        .map(|s| s.id)
        .zip(chosen.iter().cloned())
        .collect();
    let unlocked = unlock_split(h, w, &chosen)?;
    let vmk = unlocked.vmk;
    // Shares unwrapped below are proved against the header as it was sealed (the slots added
    // on the way change its MAC until it is sealed again).
    let sealed = h.clone();
    let mut out = RewrapOutcome {
        unlocked_with: unlocked.first_slot,
        added: None,
        already_present: None,
        removed: Vec::new(),
        checks_added: Vec::new(),
        checks_failed: Vec::new(),
        recovery_added: None,
        recovery_present: None,
        shares_added: Vec::new(),
        shares_present: Vec::new(),
        shares_failed: Vec::new(),
    };
    let need = h.policy.threshold(h.share_count());
    let mut xs: Vec<u8> = h.slots.iter().filter_map(|s| s.share).collect();
    xs.sort_unstable();
    xs.dedup();
    let pinned_of = |id: u32| {
        pinned
            .iter()
            .find(|(i, _)| *i == id)
            .and_then(|(_, k)| k.clone())
    };
    if plan.add {
        for x in xs {
            let slots_of_x: Vec<(u32, String, Vec<u8>, Option<String>)> = h
                .slots
                .iter()
                .filter(|s| s.share == Some(x))
                .map(|s| {
                    (
                        s.id,
                        s.algorithm.clone(),
                        s.wrapped.clone(),
                        pinned_of(s.id),
                    )
                })
                .collect();
            let Some((_, _, _, Some(current))) = slots_of_x.iter().find(|s| s.3.is_some()) else {
                out.shares_failed
                    .push((x, "no slot of this share names a pinned key".into()));
                continue;
            };
            let target = match w.latest_version(&versionless(current)) {
                Ok(t) => t,
                Err(e) => {
                    out.shares_failed.push((
                        x,
                        format!("looking up the latest version of {current}: {e:#}"),
                    ));
                    continue;
                }
            };
            let algorithm = plan.algorithm.as_deref();
            if let Some(s) = h.slots.iter().find(|s| {
                s.share == Some(x)
                    && pinned_of(s.id).as_ref() == Some(&target)
                    && algorithm.is_none_or(|a| a == s.algorithm)
                    && !remove.contains(&s.id)
            }) {
                out.shares_present.push((x, s.id));
                continue;
            }
            // The share itself: from the unlock, or unwrapped now and proved by combining it
            // with threshold − 1 of the unlock's shares to the volume key.
            let share = match unlocked.shares.iter().find(|(ux, _)| *ux == x) {
                Some((_, s)) => s.clone(),
                None => {
                    let mut found = None;
                    let mut why = String::from("no pinned slot of it could be unwrapped");
                    for (_, alg, wrapped, key) in &slots_of_x {
                        let Some(key) = key else { continue };
                        match w.unwrap(key, alg, wrapped) {
                            Ok(candidate) => {
                                let mut refs: Vec<(u8, &VolumeKey)> = unlocked
                                    .shares
                                    .iter()
                                    .take(need.saturating_sub(1))
                                    .map(|(ux, s)| (*ux, s))
                                    .collect();
                                refs.push((x, &candidate));
                                match keyslots::combine_shares(&sealed, &refs) {
                                    Ok(_) => {
                                        found = Some(candidate);
                                        break;
                                    }
                                    Err(e) => why = format!("unwrapped with {key}: {e}"),
                                }
                            }
                            Err(e) => why = format!("{key}: {e:#}"),
                        }
                    }
                    match found {
                        Some(s) => s,
                        None => {
                            out.shares_failed.push((x, why));
                            continue;
                        }
                    }
                }
            };
            match w.block_on(keyslots::make_share_slot(
                w.provider(),
                &target,
                algorithm,
                x,
                &share,
                &vmk,
            )) {
                Ok(slot) => out.shares_added.push((x, h.add_slot(slot))),
                Err(e) => out.shares_failed.push((x, format!("{e:#}"))),
            }
        }
    }
    for id in &remove {
        h.remove_slot(*id)?;
        out.removed.push(*id);
    }
    add_missing_checks(h, w, &pinned, &vmk, &mut out);
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

    const SA: &str = "https://a.vault.azure.net/keys/share/a1";
    const SB: &str = "https://b.vault.azure.net/keys/share/b1";
    const SC: &str = "https://c.vault.azure.net/keys/share/c1";

    fn split_pins() -> Pins {
        Pins::new(
            [SA, SB, SC]
                .iter()
                .map(|k| kvcrypt_keyvault::KeyPin::parse(&versionless(k)).unwrap())
                .collect(),
            "keys of [vault]",
        )
    }

    /// A 2-of-3 (or 3-of-3) volume over the three vaults, as `format --policy` makes it.
    fn split_volume(
        w: &BlockingProvider,
        policy: kvcrypt_format::SlotPolicy,
    ) -> (VolumeHeader, VolumeKey) {
        let k = vmk(8);
        let mut h = VolumeHeader::new_for_device(16 << 20, 4096, "s", &k).unwrap();
        let t = policy.threshold(3) as u8;
        let shares = kvcrypt_crypto::shamir::split(&k, t, 3).unwrap();
        for (key, (x, share)) in [SA, SB, SC].iter().zip(&shares) {
            h.add_slot(make_share_slot(w, key, None, *x, share, &k).unwrap());
        }
        h.policy = policy;
        h.seal(&k);
        (h, k)
    }

    #[test]
    fn split_unlock_needs_threshold_shares_and_names_what_failed() {
        let vault = XorVault::new(&[SA, SB, SC]);
        let w = vault.blocking();
        let (h, k) = split_volume(&w, kvcrypt_format::SlotPolicy::KOfN { k: 2 });
        assert_eq!(h.version, kvcrypt_format::layout::VERSION_4);
        assert_eq!(
            h.slots.iter().map(|s| s.share).collect::<Vec<_>>(),
            [Some(1), Some(2), Some(3)]
        );
        let (got, first) = unlock(&h, &w, &split_pins()).unwrap();
        assert_eq!((got.expose(), first), (k.expose(), 0));
        // The share slots' access checks are the VMK's, as on any volume.
        let check = h.slots[2].check.clone().unwrap();
        let secret = w.unwrap_access_secret(SC, "RSA-OAEP-256", &check).unwrap();
        h.verify_access_secret(secret.expose()).unwrap();
        // One vault's key disabled: the other two unlock.
        vault.disable(SA);
        let (got, first) = unlock(&h, &w, &split_pins()).unwrap();
        assert_eq!((got.expose(), first), (k.expose(), 1));
        // Two disabled: denied, named, counted.
        vault.disable(SB);
        let e = unlock(&h, &w, &split_pins()).unwrap_err();
        assert_eq!(e.exit(), Exit::AccessDenied, "{e:#}");
        let msg = format!("{e:#}");
        assert!(msg.contains("obtained 1 of the 2 shares needed"), "{msg}");
        assert!(msg.contains(SA) && msg.contains(SB), "{msg}");
        // Every vault failing transiently: could still come back, so "unavailable".
        let flaky = XorVault::new(&[SA, SB, SC]);
        let fw = flaky.blocking();
        let (h2, _) = split_volume(&fw, kvcrypt_format::SlotPolicy::KOfN { k: 2 });
        flaky.refuse(Some(kvcrypt_keyvault::ErrorClass::Transient));
        let e = unlock(&h2, &fw, &split_pins()).unwrap_err();
        assert_eq!(e.exit(), Exit::VaultUnavailable, "{e:#}");
        assert!(format!("{e:#}").contains("obtained 0 of the 2"), "{e:#}");
    }

    #[test]
    fn split_all_locks_when_any_key_denies_and_a_wrong_share_is_worked_around() {
        let vault = XorVault::new(&[SA, SB, SC]);
        let w = vault.blocking();
        let (h, k) = split_volume(&w, kvcrypt_format::SlotPolicy::All);
        assert_eq!(
            unlock(&h, &w, &split_pins()).unwrap().0.expose(),
            k.expose()
        );
        vault.disable(SC);
        let e = unlock(&h, &w, &split_pins()).unwrap_err();
        assert_eq!(e.exit(), Exit::AccessDenied, "{e:#}");
        assert!(
            format!("{e:#}").contains("obtained 2 of the 3 shares needed"),
            "{e:#}"
        );
        // 2-of-3 where share 1's first slot holds garbage (another split's share), followed by
        // a good slot of share 1: the first combination fails the key check, the others work.
        let w = XorVault::new(&[SA, SB, SC]).blocking();
        let (mut h, k) = split_volume(&w, kvcrypt_format::SlotPolicy::KOfN { k: 2 });
        let other = kvcrypt_crypto::shamir::split(&vmk(1), 2, 3).unwrap();
        let bad = make_share_slot(&w, SA, None, 1, &other[0].1, &k).unwrap();
        h.add_slot(bad);
        // Put the bad slot first and make slot B's key unpinned-free... simply reorder.
        let bad = h.slots.pop().unwrap();
        h.slots.insert(0, bad);
        h.slots.remove(2); // drop share 2: shares 1 (bad, good) and 3 remain
        h.seal(&k);
        let (got, _) = unlock(&h, &w, &split_pins()).unwrap();
        assert_eq!(got.expose(), k.expose());
    }

    #[test]
    fn split_rewrap_moves_each_share_to_its_latest_version_and_refuses_key_changes() {
        let vault = XorVault::new(&[SA, SB, SC]);
        let w = vault.blocking();
        let (mut h, k) = split_volume(&w, kvcrypt_format::SlotPolicy::KOfN { k: 2 });
        let add = RewrapPlan {
            add: true,
            ..Default::default()
        };
        let out = rewrap(&mut h, &w, &add, &split_pins()).unwrap();
        assert!(out.shares_added.is_empty());
        assert_eq!(out.shares_present.len(), 3);
        // Key B and C rotate; A is disabled (its share comes from the unlock, not rewrapped).
        let sb2 = "https://b.vault.azure.net/keys/share/b2";
        let sc2 = "https://c.vault.azure.net/keys/share/c2";
        vault.rotate(SB, sb2);
        vault.rotate(SC, sc2);
        let out = rewrap(&mut h, &w, &add, &split_pins()).unwrap();
        assert_eq!(
            out.shares_added,
            vec![(2, 3), (3, 4)],
            "{:?}",
            out.shares_failed
        );
        assert_eq!(h.slots[3].key_id, sb2);
        assert_eq!(h.slots[3].share, Some(2));
        assert_eq!(h.share_count(), 3);
        h.verify_key(&k).unwrap();
        // The old slots of shares 2 and 3 can go now; share 1's only slot cannot.
        let rm = RewrapPlan {
            remove: vec![1, 2],
            ..Default::default()
        };
        rewrap(&mut h, &w, &rm, &split_pins()).unwrap();
        let rm0 = RewrapPlan {
            remove: vec![0],
            ..Default::default()
        };
        let e = rewrap(&mut h, &w, &rm0, &split_pins()).unwrap_err();
        assert!(
            format!("{e:#}").contains("only slot holding share 1"),
            "{e:#}"
        );
        vault.disable(SA);
        let (got, _) = unlock(&h, &w, &split_pins()).unwrap();
        assert_eq!(got.expose(), k.expose(), "the new versions unlock");
        // Another key for a share, or a recovery slot: refused, pointing at format.
        let e = rewrap(
            &mut h,
            &w,
            &RewrapPlan {
                add: true,
                key_id: Some(SA.into()),
                ..Default::default()
            },
            &split_pins(),
        )
        .unwrap_err();
        assert_eq!(e.exit(), Exit::Usage);
        assert!(format!("{e:#}").contains("kvcrypt format"), "{e:#}");
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
