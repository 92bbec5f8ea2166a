//! Slot policies (format v4, docs/FORMAT.md §3.3): how many key slots it takes to unlock.
//!
//! `any` (v1–v3) — every Key Vault slot wraps the whole VMK and any one unlocks. `all` and
//! `k-of-n` are *split* policies: the VMK is split into n Shamir shares (x = 1..=n,
//! `kvcrypt_crypto::shamir`), each Key Vault slot wraps one share and names its x in `share`,
//! and `threshold` distinct shares rebuild the VMK (`all`: every share). Several slots may carry
//! the same x (one share wrapped by two versions of a key after a rotation). The recovery slot
//! always wraps the whole VMK and has no `share`.
//!
//! Why a new version: a v3 reader would take a share for the VMK and fail its key check —
//! harmless, but docs/FORMAT.md §6 requires a new version for new members, and v3 readers must
//! refuse the header by name rather than call it a wrong key.

use super::KeySlot;
use super::layout::{VERSION, VERSION_3, VERSION_4};
use super::metadata::JsonPolicy;

/// The JSON `kind` of the `all` policy.
pub const KIND_ALL: &str = "all";
/// The JSON `kind` of the `k-of-n` policy.
pub const KIND_K_OF_N: &str = "k-of-n";

/// How many key slots it takes to unlock the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlotPolicy {
    /// Every Key Vault slot wraps the whole VMK; any one unlocks (format v1–v3).
    #[default]
    Any,
    /// The VMK is split into n shares; all n are needed (n-of-n).
    All,
    /// The VMK is split into n shares; any `k` rebuild it.
    KOfN { k: u8 },
}

impl SlotPolicy {
    /// Shares (or, for `Any`, slots) needed to unlock a header that has `shares` distinct
    /// shares: `Any` → 1, `All` → `shares`, `KOfN { k }` → `k`.
    pub fn threshold(&self, shares: usize) -> usize {
        match self {
            SlotPolicy::Any => 1,
            SlotPolicy::All => shares,
            SlotPolicy::KOfN { k } => usize::from(*k),
        }
    }

    /// Whether the VMK is split (every Key Vault slot wraps a share, not the VMK).
    pub fn is_split(&self) -> bool {
        !matches!(self, SlotPolicy::Any)
    }

    /// Code of the policy kind in the v4 MAC input (docs/FORMAT.md §4): 0 any, 1 all, 2 k-of-n.
    pub(crate) fn mac_code(&self) -> u8 {
        match self {
            SlotPolicy::Any => 0,
            SlotPolicy::All => 1,
            SlotPolicy::KOfN { .. } => 2,
        }
    }

    /// What `header dump` prints: `any: 1 slot needed`, `all: 3 of 3 shares needed`,
    /// `k-of-n: 2 of 3 shares needed`.
    pub fn describe(&self, shares: usize) -> String {
        match self {
            SlotPolicy::Any => "any: any one key slot unlocks".into(),
            _ => format!(
                "{self}: {} of {shares} shares needed",
                self.threshold(shares)
            ),
        }
    }
}

/// `any`, `all`, or `k-of-n`; the threshold of `k-of-n` needs the number of shares, which only
/// the header knows, so it is not part of `Display` (see [`SlotPolicy::describe`]).
impl std::fmt::Display for SlotPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SlotPolicy::Any => "any",
            SlotPolicy::All => KIND_ALL,
            SlotPolicy::KOfN { .. } => KIND_K_OF_N,
        })
    }
}

/// The distinct share x-coordinates of `slots`, ascending.
pub(crate) fn share_xs(slots: &[KeySlot]) -> Vec<u8> {
    let mut xs: Vec<u8> = slots.iter().filter_map(|s| s.share).collect();
    xs.sort_unstable();
    xs.dedup();
    xs
}

/// The JSON `policy` member of a header (absent for `Any`).
pub(crate) fn to_json(policy: SlotPolicy, slots: &[KeySlot]) -> Option<JsonPolicy> {
    let shares = u8::try_from(share_xs(slots).len()).unwrap_or(u8::MAX);
    let threshold = u8::try_from(policy.threshold(usize::from(shares))).unwrap_or(u8::MAX);
    policy.is_split().then(|| JsonPolicy {
        kind: policy.to_string(),
        threshold,
        shares,
    })
}

/// The version a sealing write gives a header: v4 for a split policy, else v3 with a recovery
/// slot, else v2.
pub fn version_for(policy: SlotPolicy, slots: &[KeySlot]) -> u16 {
    if policy.is_split() {
        VERSION_4
    } else if slots.iter().any(KeySlot::is_recovery) {
        VERSION_3
    } else {
        VERSION
    }
}

/// The rules of docs/FORMAT.md §3.3 for a decoded header of `version`: the policy member only
/// in v4 and always there; `share` exactly on every non-recovery slot of a split header; x
/// non-zero; `shares` = the number of distinct x (at least 2); `threshold` in 1..=shares
/// (`all`: = shares). Returns the policy.
pub(crate) fn decode(
    version: u16,
    json: Option<&JsonPolicy>,
    slots: &[KeySlot],
) -> Result<SlotPolicy, String> {
    if version < VERSION_4 {
        if json.is_some() {
            return Err(format!(
                "a policy member in a format v{version} header (split policies need v4)"
            ));
        }
        if let Some(s) = slots.iter().find(|s| s.share.is_some()) {
            return Err(format!(
                "key slot {}: a share index in a format v{version} header (only split \
                 headers, v4, have shares)",
                s.id
            ));
        }
        return Ok(SlotPolicy::Any);
    }
    let Some(p) = json else {
        return Err("format v4 header without a policy member".into());
    };
    for s in slots {
        match (s.is_recovery(), s.share) {
            (true, Some(_)) => {
                return Err(format!(
                    "key slot {}: the recovery slot wraps the whole volume key and has no share",
                    s.id
                ));
            }
            (false, None) => {
                return Err(format!(
                    "key slot {}: a slot of a split ({}) header without a share index",
                    s.id, p.kind
                ));
            }
            (false, Some(0)) => {
                return Err(format!(
                    "key slot {}: share index 0 (x = 0 would be the volume key itself)",
                    s.id
                ));
            }
            _ => {}
        }
    }
    let distinct = share_xs(slots).len();
    if usize::from(p.shares) != distinct {
        return Err(format!(
            "policy says {} shares, the key slots carry {distinct} distinct share indexes",
            p.shares
        ));
    }
    if p.shares < 2 {
        return Err(format!(
            "policy with {} share(s): a split needs at least 2",
            p.shares
        ));
    }
    if !(1..=p.shares).contains(&p.threshold) {
        return Err(format!(
            "policy threshold {} outside 1..={}",
            p.threshold, p.shares
        ));
    }
    match p.kind.as_str() {
        KIND_ALL if p.threshold == p.shares => Ok(SlotPolicy::All),
        KIND_ALL => Err(format!(
            "policy all with threshold {} of {} shares (all needs every share)",
            p.threshold, p.shares
        )),
        KIND_K_OF_N => Ok(SlotPolicy::KOfN { k: p.threshold }),
        other => Err(format!("unknown policy kind {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::VERSION_2;

    fn slot(id: u32, share: Option<u8>) -> KeySlot {
        KeySlot {
            id,
            provider: crate::PROVIDER_AZURE.into(),
            key_id: format!("https://v{id}.vault.azure.net/keys/k/1"),
            algorithm: "RSA-OAEP-256".into(),
            wrapped: vec![1; 256],
            created_at: "2026-01-01T00:00:00Z".into(),
            check: None,
            share,
        }
    }

    fn json(kind: &str, threshold: u8, shares: u8) -> JsonPolicy {
        JsonPolicy {
            kind: kind.into(),
            threshold,
            shares,
        }
    }

    #[test]
    fn thresholds_and_names() {
        assert_eq!(SlotPolicy::Any.threshold(3), 1);
        assert_eq!(SlotPolicy::All.threshold(3), 3);
        assert_eq!(SlotPolicy::KOfN { k: 2 }.threshold(3), 2);
        assert_eq!(SlotPolicy::KOfN { k: 2 }.to_string(), "k-of-n");
        assert_eq!(
            SlotPolicy::KOfN { k: 2 }.describe(3),
            "k-of-n: 2 of 3 shares needed"
        );
        assert_eq!(SlotPolicy::All.describe(2), "all: 2 of 2 shares needed");
    }

    #[test]
    fn decode_rules() {
        let split = [slot(0, Some(1)), slot(1, Some(2)), slot(2, Some(2))];
        assert_eq!(
            decode(VERSION_4, Some(&json("k-of-n", 2, 2)), &split),
            Ok(SlotPolicy::KOfN { k: 2 })
        );
        assert_eq!(
            decode(VERSION_4, Some(&json("all", 2, 2)), &split),
            Ok(SlotPolicy::All)
        );
        let refused = |v, p: Option<JsonPolicy>, s: &[KeySlot], why: &str| {
            let e = decode(v, p.as_ref(), s).unwrap_err();
            assert!(e.contains(why), "{e}");
        };
        refused(VERSION_4, None, &split, "without a policy");
        refused(VERSION_3, Some(json("all", 2, 2)), &split, "need v4");
        refused(VERSION_2, None, &split[..1], "share index in a format v2");
        refused(
            VERSION_4,
            Some(json("all", 2, 2)),
            &[slot(0, Some(1)), slot(1, None)],
            "without a share index",
        );
        refused(
            VERSION_4,
            Some(json("all", 2, 2)),
            &[slot(0, Some(0)), slot(1, Some(1))],
            "share index 0",
        );
        refused(VERSION_4, Some(json("k-of-n", 0, 2)), &split, "outside");
        refused(VERSION_4, Some(json("k-of-n", 3, 2)), &split, "outside");
        refused(VERSION_4, Some(json("k-of-n", 2, 3)), &split, "distinct");
        refused(VERSION_4, Some(json("all", 1, 2)), &split, "every share");
        refused(VERSION_4, Some(json("some", 1, 2)), &split, "unknown");
        refused(
            VERSION_4,
            Some(json("all", 1, 1)),
            &[slot(0, Some(1))],
            "at least 2",
        );
        assert_eq!(version_for(SlotPolicy::All, &split), VERSION_4);
        assert_eq!(version_for(SlotPolicy::Any, &split[..1]), VERSION_2);
    }
}
