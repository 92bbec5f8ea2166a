//! Following Key Vault key rotation: when a pinned key has a newer enabled version than any
//! slot of the volume, wrap the volume key with it (a slot proved by unwrapping it again), and
//! once that slot has worked for `rotation_grace`, drop the slots of the older versions.
//!
//! [`plan`] decides from facts alone (table-tested); [`follow`] asks the provider for the
//! facts and the key, carries the plan out on a copy of the header and seals it. Writing the
//! copies (the not-currently-valid one first, `kvcrypt_header_io::write`) is the caller's: a
//! power cut at any point leaves a header that unlocks, because every slot that unlocked
//! before is still in whichever copy wins (pruning happens in a later write than adding).
//!
//! Nothing here revokes: a failed lookup, a refused wrap or an unreachable vault is reported
//! as a problem and the volume keeps serving; only the periodic access check locks.

use std::collections::BTreeMap;
use std::time::Duration;

use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_format::{KeySlot, VolumeHeader};
use kvcrypt_keyvault::{KeyId, KeyProvider, KeyVersionInfo, Pins};

use crate::agent::ports::{KeyView, RotationReport};
use crate::keyslots;

/// A pinned Key Vault slot of the header, as rotation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotFacts {
    pub id: u32,
    /// The versionless pinned key (`https://VAULT/keys/NAME`).
    pub key: String,
    /// The versioned key id requests use (the pin's host).
    pub key_id: String,
    pub algorithm: String,
    /// `created_at` in Unix seconds (`None`: unreadable, never old enough to prune by).
    pub created: Option<i64>,
    /// Split policies: the share the slot wraps.
    pub share: Option<u8>,
}

/// What to change in the header.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// New slots: (versioned key id of the current version, algorithm).
    pub add: Vec<(String, String)>,
    /// Slots of older versions to remove, each with the id of the current-version slot that
    /// replaced it (which must be verified first).
    pub prune: Vec<(u32, u32)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.prune.is_empty()
    }
}

/// The plan for `slots` given each key's current version (`current`, by versionless key) at
/// Unix time `now`:
/// - a key whose current version can be used (enabled, inside nbf..exp) and has no slot gets
///   one, with the algorithm of that key's newest slot;
/// - once a slot of the current version is `grace` old, the slots of that key's other
///   versions go (never the current version's own slot, so a key always keeps one).
///
/// Keys whose current version is unknown (lookup failed) are left alone.
pub fn plan(
    slots: &[SlotFacts],
    current: &BTreeMap<String, KeyVersionInfo>,
    now: i64,
    grace: Duration,
) -> Plan {
    let mut out = Plan::default();
    for (key, info) in current {
        let of_key: Vec<&SlotFacts> = slots.iter().filter(|s| &s.key == key).collect();
        let Some(newest) = of_key.iter().max_by_key(|s| (s.created, s.id)) else {
            continue;
        };
        match of_key.iter().find(|s| s.key_id == info.key_id) {
            None if info.usable_at(now) => out
                .add
                .push((info.key_id.clone(), newest.algorithm.clone())),
            None => {}
            Some(cur) => {
                let old_enough = cur
                    .created
                    .is_some_and(|c| now.saturating_sub(c) >= grace.as_secs() as i64);
                if old_enough {
                    out.prune.extend(
                        of_key
                            .iter()
                            .filter(|s| s.key_id != info.key_id)
                            .map(|s| (s.id, cur.id)),
                    );
                }
            }
        }
    }
    out
}

/// The header's pinned Key Vault slots (unpinned and non-Key-Vault slots are never touched
/// and never asked).
pub fn facts(h: &VolumeHeader, pins: &Pins) -> Vec<SlotFacts> {
    let ids: Vec<&str> = h.slots.iter().map(|s| s.key_id.as_str()).collect();
    let Ok(chosen) = pins.select(&ids) else {
        return Vec::new();
    };
    h.slots
        .iter()
        .zip(chosen)
        .filter(|(s, _)| s.provider == kvcrypt_format::PROVIDER_AZURE)
        .filter_map(|(s, id)| {
            let id = id?;
            let key = KeyId::parse(&id).ok()?.versionless();
            Some(SlotFacts {
                id: s.id,
                key,
                key_id: id,
                algorithm: s.algorithm.clone(),
                created: created_unix(&s.created_at),
                share: s.share,
            })
        })
        .collect()
}

fn created_unix(rfc3339: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339(rfc3339).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_secs()).ok()
}

/// What [`follow`] did: the sealed header to write (`None`: nothing changed) and the report.
pub struct Followed {
    pub header: Option<VolumeHeader>,
    pub report: RotationReport,
}

/// Looks up every pinned key's current version, and carries out [`plan`] on a copy of `h`.
/// The volume key is unwrapped only when there is something to change (preferring the
/// current version's slot, which proves that slot before any older one is pruned), and is
/// dropped (zeroized) before this returns.
pub async fn follow(
    p: &dyn KeyProvider,
    h: &VolumeHeader,
    pins: &Pins,
    grace: Duration,
    now: i64,
) -> Followed {
    let slots = facts(h, pins);
    let mut report = RotationReport::default();
    let mut current = BTreeMap::new();
    let keys: std::collections::BTreeSet<&str> = slots.iter().map(|s| s.key.as_str()).collect();
    for key in keys {
        match p.current_version(key).await {
            Ok(info) => {
                let mut view = KeyView::of(key, &info);
                // Read when permitted: a refusal only means the status cannot say when.
                match p.next_rotation(&info).await {
                    Ok(at) => view.next_rotation = at,
                    Err(e) => tracing::debug!(key = %key, error = %e,
                        "the rotation policy of {key} could not be read: {e}"),
                }
                report.keys.push(view);
                current.insert(key.to_owned(), info);
            }
            Err(e) => report
                .problems
                .push(format!("looking up the current version of {key}: {e}")),
        }
    }
    let mut plan = plan(&slots, &current, now, grace);
    if plan.is_empty() {
        return Followed {
            header: None,
            report,
        };
    }
    if h.policy.is_split() {
        return follow_split(p, h, &slots, &current, plan, report).await;
    }
    // The key, from the slot to be proved first: a current-version slot that unwraps and
    // passes the key check is verified.
    let is_current = |s: &SlotFacts| current.values().any(|c| c.key_id == s.key_id);
    let mut order: Vec<&SlotFacts> = slots.iter().collect();
    order.sort_by_key(|s| !is_current(s));
    let mut vmk: Option<VolumeKey> = None;
    for s in &order {
        match unwrap_verified(p, h, s).await {
            Ok(k) => {
                report.verified.push(s.key_id.clone());
                if vmk.is_none() {
                    vmk = Some(k);
                }
                // The other current-version slots are proved below, only if a prune needs them.
                break;
            }
            Err(e) => report.problems.push(e),
        }
    }
    let Some(vmk) = vmk else {
        report
            .problems
            .push("no key slot unwrapped the volume key; nothing changed".into());
        return Followed {
            header: None,
            report,
        };
    };
    // A prune waits until its replacement has worked in this very procedure.
    let mut keep = Vec::new();
    for (old, new) in std::mem::take(&mut plan.prune) {
        let Some(n) = slots.iter().find(|s| s.id == new) else {
            continue;
        };
        if !report.verified.contains(&n.key_id) {
            match unwrap_verified(p, h, n).await {
                Ok(_) => report.verified.push(n.key_id.clone()),
                Err(e) => {
                    report.problems.push(format!(
                        "not pruning the older slots of {}: its current slot {} did not verify: {e}",
                        n.key, n.id
                    ));
                    continue;
                }
            }
        }
        keep.push((old, new));
    }
    plan.prune = keep;
    let mut new = h.clone();
    for (key_id, algorithm) in &plan.add {
        match keyslots::make_slot(p, key_id, Some(algorithm), &vmk).await {
            Ok(slot) => {
                let id = new.add_slot(slot);
                report.verified.push(key_id.clone());
                report.added.push((id, key_id.clone()));
            }
            Err(e) => report
                .problems
                .push(format!("adding a slot for {key_id}: {e}")),
        }
    }
    for (old, _) in &plan.prune {
        if let Ok(KeySlot { id, key_id, .. }) = new.remove_slot(*old) {
            report.pruned.push((id, key_id));
        }
    }
    sealed(new, &vmk, report)
}

/// [`follow`] for a split header (`all`, `k-of-n`): each slot wraps a share, not the key. The
/// shares are unwrapped (current versions first, one slot per share) and rebuilt into the key
/// — which proves every share that took part; a new version's slot wraps its key's share
/// (same x) with the share proved to unwrap to exactly those bytes; a prune waits until the
/// current version's slot unwrapped to its proved share.
async fn follow_split(
    p: &dyn KeyProvider,
    h: &VolumeHeader,
    slots: &[SlotFacts],
    current: &BTreeMap<String, KeyVersionInfo>,
    mut plan: Plan,
    mut report: RotationReport,
) -> Followed {
    let unchanged = |report| Followed {
        header: None,
        report,
    };
    let is_current = |s: &SlotFacts| current.values().any(|c| c.key_id == s.key_id);
    let mut order: Vec<&SlotFacts> = slots.iter().filter(|s| s.share.is_some()).collect();
    order.sort_by_key(|s| !is_current(s));
    // x → (the share, the slot it came from).
    let mut shares: BTreeMap<u8, (VolumeKey, &SlotFacts)> = BTreeMap::new();
    for s in order {
        let Some(x) = s.share else { continue };
        if shares.contains_key(&x) {
            continue;
        }
        match unwrap_slot_bytes(p, h, s).await {
            Ok(share) => {
                shares.insert(x, (share, s));
            }
            Err(e) => report.problems.push(e),
        }
    }
    let given: Vec<(u8, &VolumeKey)> = shares.iter().map(|(x, (k, _))| (*x, k)).collect();
    let (vmk, used) = match keyslots::combine_subsets(h, &given) {
        Ok(r) => r,
        Err(e) => {
            report.problems.push(format!(
                "the key shares unwrapped ({} of {}) do not rebuild the volume key: {e}; nothing \
                 changed",
                given.len(),
                h.share_count()
            ));
            return unchanged(report);
        }
    };
    let proved: Vec<u8> = used.iter().map(|i| given[*i].0).collect();
    for x in &proved {
        report.verified.push(shares[x].1.key_id.clone());
    }
    // A share outside the subset that rebuilt the key is proved by rebuilding it again with
    // that share in place of one of the proved ones.
    let mut good: Vec<u8> = proved.clone();
    for (x, (share, from)) in &shares {
        if good.contains(x) {
            continue;
        }
        let mut trial: Vec<(u8, &VolumeKey)> =
            proved.iter().skip(1).map(|y| (*y, &shares[y].0)).collect();
        trial.push((*x, share));
        if keyslots::combine_shares(h, &trial).is_ok() {
            good.push(*x);
            report.verified.push(from.key_id.clone());
        } else {
            report.problems.push(format!(
                "slot {} ({}) unwraps to a share that does not rebuild the volume key; not used",
                from.id, from.key_id
            ));
        }
    }
    let share_of_key = |key_id: &str| {
        let key = KeyId::parse(key_id).ok()?.versionless();
        slots.iter().find(|s| s.key == key).and_then(|s| s.share)
    };
    let mut new = h.clone();
    for (key_id, algorithm) in std::mem::take(&mut plan.add) {
        let Some(x) = share_of_key(&key_id).filter(|x| good.contains(x)) else {
            report.problems.push(format!(
                "not adding a slot for {key_id}: its key's share could not be unwrapped and proved"
            ));
            continue;
        };
        match keyslots::make_share_slot(p, &key_id, Some(&algorithm), x, &shares[&x].0, &vmk).await
        {
            Ok(slot) => {
                let id = new.add_slot(slot);
                report.verified.push(key_id.clone());
                report.added.push((id, key_id));
            }
            Err(e) => report
                .problems
                .push(format!("adding a slot for {key_id}: {e}")),
        }
    }
    for (old, cur) in std::mem::take(&mut plan.prune) {
        let Some(n) = slots.iter().find(|s| s.id == cur) else {
            continue;
        };
        let proved_here = n.share.is_some_and(|x| {
            good.contains(&x) && shares.get(&x).is_some_and(|(_, from)| from.id == n.id)
        });
        if !proved_here {
            let same = match (
                n.share.and_then(|x| shares.get(&x)),
                unwrap_slot_bytes(p, h, n).await,
            ) {
                (Some((want, _)), Ok(got)) => got.expose() == want.expose(),
                _ => false,
            };
            if !same {
                report.problems.push(format!(
                    "not pruning the older slots of {}: its current slot {} did not unwrap to its \
                     proved share",
                    n.key, n.id
                ));
                continue;
            }
            report.verified.push(n.key_id.clone());
        }
        if let Ok(KeySlot { id, key_id, .. }) = new.remove_slot(old) {
            report.pruned.push((id, key_id));
        }
    }
    sealed(new, &vmk, report)
}

/// The end of a round: `new` re-sealed with `vmk` when the round changed a slot (and it
/// verifies), otherwise nothing to write.
fn sealed(mut new: VolumeHeader, vmk: &VolumeKey, mut report: RotationReport) -> Followed {
    if report.added.is_empty() && report.pruned.is_empty() {
        return Followed {
            header: None,
            report,
        };
    }
    new.seal(vmk);
    if let Err(e) = new.verify_key(vmk) {
        report.problems.push(format!(
            "the re-sealed header does not verify ({e}); nothing written"
        ));
        report.added.clear();
        report.pruned.clear();
        return Followed {
            header: None,
            report,
        };
    }
    Followed {
        header: Some(new),
        report,
    }
}

/// Unwraps slot `s` (the whole key or, under a split policy, a share) without checking it.
async fn unwrap_slot_bytes(
    p: &dyn KeyProvider,
    h: &VolumeHeader,
    s: &SlotFacts,
) -> Result<VolumeKey, String> {
    let Some(slot) = h.slots.iter().find(|x| x.id == s.id) else {
        return Err(format!("slot {} vanished", s.id));
    };
    p.unwrap(&s.key_id, &s.algorithm, &slot.wrapped)
        .await
        .map_err(|e| format!("slot {} ({}): {e}", s.id, s.key_id))
}

/// Unwraps the volume key with slot `s` and checks it against the header's key check.
async fn unwrap_verified(
    p: &dyn KeyProvider,
    h: &VolumeHeader,
    s: &SlotFacts,
) -> Result<VolumeKey, String> {
    let vmk = unwrap_slot_bytes(p, h, s).await?;
    h.verify_key(&vmk)
        .map_err(|e| format!("slot {} ({}): {e}", s.id, s.key_id))?;
    Ok(vmk)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: &str = "https://a.vault.azure.net/keys/vol";

    fn slot(id: u32, version: &str, created: i64) -> SlotFacts {
        SlotFacts {
            id,
            key: K.into(),
            key_id: format!("{K}/{version}"),
            algorithm: "RSA-OAEP-256".into(),
            created: Some(created),
            share: None,
        }
    }

    fn current(
        version: &str,
        enabled: bool,
        expires: Option<i64>,
    ) -> BTreeMap<String, KeyVersionInfo> {
        BTreeMap::from([(
            K.to_owned(),
            KeyVersionInfo {
                key_id: format!("{K}/{version}"),
                enabled,
                expires,
                not_before: None,
                created: None,
            },
        )])
    }

    type Current = BTreeMap<String, KeyVersionInfo>;

    const DAY: i64 = 86_400;
    const GRACE: Duration = Duration::from_secs(30 * 86_400);

    #[test]
    fn plan_adds_the_current_version_and_prunes_only_after_the_grace_period() {
        let now = 100 * DAY;
        let add = |v: &str| (format!("{K}/{v}"), "RSA-OAEP-256".to_owned());
        #[rustfmt::skip]
        let rows: Vec<(&str, Vec<SlotFacts>, Current, Plan)> = vec![
            ("current version already has a slot: nothing",
             vec![slot(0, "v1", 0)], current("v1", true, None), Plan::default()),
            ("a newer version: add a slot for it",
             vec![slot(0, "v1", 0)], current("v2", true, None),
             Plan { add: vec![add("v2")], prune: vec![] }),
            ("a newer but disabled version: nothing",
             vec![slot(0, "v1", 0)], current("v2", false, None), Plan::default()),
            ("a newer but expired version: nothing",
             vec![slot(0, "v1", 0)], current("v2", true, Some(now - 1)), Plan::default()),
            ("the new slot is younger than the grace period: keep the old one",
             vec![slot(0, "v1", 0), slot(1, "v2", now - 29 * DAY)], current("v2", true, None),
             Plan::default()),
            ("the new slot is older than the grace period: prune the old one",
             vec![slot(0, "v1", 0), slot(1, "v2", now - 30 * DAY)], current("v2", true, None),
             Plan { add: vec![], prune: vec![(0, 1)] }),
            ("rotated twice: prune both old versions, keep the current",
             vec![slot(0, "v1", 0), slot(1, "v2", DAY), slot(2, "v3", now - 31 * DAY)],
             current("v3", true, None),
             Plan { add: vec![], prune: vec![(0, 2), (1, 2)] }),
            ("rotated again before the last grace ended: add, prune nothing",
             vec![slot(0, "v1", 0), slot(1, "v2", now - DAY)], current("v3", true, None),
             Plan { add: vec![add("v3")], prune: vec![] }),
            ("the current version's slot has an unreadable date: never prune by it",
             vec![slot(0, "v1", 0), SlotFacts { created: None, ..slot(1, "v2", 0) }],
             current("v2", true, None), Plan::default()),
            ("key lookup failed: nothing",
             vec![slot(0, "v1", 0)], BTreeMap::new(), Plan::default()),
        ];
        let table = rows
            .into_iter()
            .map(|(name, slots, cur, want)| (name, (slots, cur, want)));
        kvcrypt_testkit::table::rows(table, |name, (slots, cur, want)| {
            assert_eq!(plan(&slots, &cur, now, GRACE), want, "{name}");
        });
    }
}
