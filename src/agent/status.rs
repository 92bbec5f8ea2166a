//! Published per-volume status: what `kvcrypt status` shows and the control protocol carries.

use serde::{Deserialize, Serialize};

use super::config::{RevokePolicy, VolumeSettings};
use super::ports::{AccessClass, KeyView};

/// `locked → unlocking → serving → suspended → serving` / `→ removed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    /// Not served: device absent, or not unlocked yet (retrying).
    Locked,
    /// Unwrapping the key / starting the worker.
    Unlocking,
    /// Plaintext device up, access checked periodically.
    Serving,
    /// Key wiped, filesystems frozen, I/O held; resumes in place when access returns.
    Suspended,
    /// Device removed after revocation (hold expired or policy `remove`); re-attached when
    /// access returns.
    Removed,
}

impl std::fmt::Display for VolumeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VolumeState::Locked => "locked",
            VolumeState::Unlocking => "unlocking",
            VolumeState::Serving => "serving",
            VolumeState::Suspended => "suspended",
            VolumeState::Removed => "removed",
        })
    }
}

/// Last failure seen for a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    pub class: AccessClass,
    pub message: String,
    /// Unix time (seconds).
    pub at: u64,
}

/// Status of one configured volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub state: VolumeState,
    /// Why the volume is in this state (e.g. "access denied", "kvcrypt lock", "offline 5m").
    #[serde(default)]
    pub reason: Option<String>,
    /// Encrypted backing device.
    #[serde(default)]
    pub device: Option<String>,
    /// Plaintext device.
    #[serde(default)]
    pub block_device: Option<String>,
    /// Versioned key id of the slot in use.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Unix time (seconds, fractional) of the last successful access check / unlock.
    #[serde(default)]
    pub last_ok: Option<f64>,
    #[serde(default)]
    pub last_error: Option<LastError>,
    /// Unix time (fractional) the volume was suspended.
    #[serde(default)]
    pub suspended_at: Option<f64>,
    /// Locked by `kvcrypt lock` (does not resume by itself).
    #[serde(default)]
    pub manual: bool,
    /// Worker status (I/O counters), when serving.
    #[serde(default)]
    pub worker: Option<serde_json::Value>,
    /// Workers restarted by the agent after they died while serving.
    #[serde(default)]
    pub restarts: u32,
    /// The volume was removed from the configuration file by a reload. Its device keeps being
    /// served and access-checked (revocation still applies) until it is closed; it is never
    /// unlocked or re-attached again.
    #[serde(default)]
    pub removed_from_config: bool,
    /// Handed to the agent by `kvcrypt open` (not in the configuration file): served and
    /// access-checked like a configured volume until `kvcrypt close`, which forgets it.
    #[serde(default)]
    pub opened: bool,
    /// The policy in effect (after the last reload).
    #[serde(default)]
    pub policy: Option<PolicyView>,
    /// The header's pinned key slots, in the order they are tried.
    #[serde(default)]
    pub slots: Vec<SlotStatus>,
    /// Every pinned key's current version, as rotation following last saw it.
    #[serde(default)]
    pub keys: Vec<KeyView>,
    /// Unix time of the next round of rotation following (serving volumes that follow it).
    #[serde(default)]
    pub rotation_next: Option<f64>,
    /// What the agent did to this volume since it started (the Prometheus counters).
    #[serde(default)]
    pub counters: Counters,
}

/// Upper bounds (seconds) of the access check latency histogram: a Key Vault `unwrapKey`
/// takes tens of milliseconds when healthy, up to `check_timeout` (10 s) when it is not.
pub const CHECK_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Monotonic counts kept by the volume's state machine since the agent started (they restart
/// at zero with the agent, as Prometheus counters may).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Access checks (unlock, periodic, resume) by result.
    #[serde(default)]
    pub checks: CheckCounts,
    /// Latency of the access checks that asked Key Vault (unwrapKey).
    #[serde(default)]
    pub check_seconds: Histogram,
    /// serving → suspended (revocation, `offline_lock_after`, `kvcrypt lock`).
    #[serde(default)]
    pub suspensions: u64,
    /// suspended → serving in place.
    #[serde(default)]
    pub resumes: u64,
    /// → removed (revocation past `hold`, or policy `remove`).
    #[serde(default)]
    pub removals: u64,
}

/// Access check results, one count per [`AccessClass`] and one for success.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckCounts {
    pub ok: u64,
    pub denied: u64,
    pub transient: u64,
    pub misconfigured: u64,
    pub not_pinned: u64,
}

impl CheckCounts {
    /// Counts one result (`None`: granted).
    pub fn record(&mut self, failed: Option<AccessClass>) {
        let n = match failed {
            None => &mut self.ok,
            Some(AccessClass::Denied) => &mut self.denied,
            Some(AccessClass::Transient) => &mut self.transient,
            Some(AccessClass::Misconfigured) => &mut self.misconfigured,
            Some(AccessClass::NotPinned) => &mut self.not_pinned,
        };
        *n = n.saturating_add(1);
    }

    /// `(result label, count)`, in a fixed order.
    pub fn by_result(&self) -> [(&'static str, u64); 5] {
        [
            ("ok", self.ok),
            ("denied", self.denied),
            ("transient", self.transient),
            ("misconfigured", self.misconfigured),
            ("not_pinned", self.not_pinned),
        ]
    }
}

/// A latency histogram over [`CHECK_BUCKETS`] (per-bucket counts, not cumulative).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// `buckets[i]`: observations in `(CHECK_BUCKETS[i-1], CHECK_BUCKETS[i]]`; the last entry
    /// counts those above every bound.
    pub buckets: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: vec![0; CHECK_BUCKETS.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        let i = CHECK_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(CHECK_BUCKETS.len());
        if self.buckets.len() != CHECK_BUCKETS.len() + 1 {
            self.buckets.resize(CHECK_BUCKETS.len() + 1, 0);
        }
        self.buckets[i] += 1;
        self.sum += seconds;
        self.count += 1;
    }

    /// Cumulative counts for each bound of [`CHECK_BUCKETS`], then `+Inf` (= `count`).
    pub fn cumulative(&self) -> Vec<u64> {
        let mut acc = 0;
        (0..=CHECK_BUCKETS.len())
            .map(|i| {
                acc += self.buckets.get(i).copied().unwrap_or(0);
                acc
            })
            .collect()
    }
}

/// One key slot as `kvcrypt status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotStatus {
    /// Versioned key id (the pin's host).
    pub key_id: String,
    pub algorithm: String,
    /// Unix time this slot last unwrapped or passed an access check in this agent.
    #[serde(default)]
    pub verified_at: Option<f64>,
    /// The slot the access checks use.
    #[serde(default)]
    pub in_use: bool,
    /// Its version is its key's current version.
    #[serde(default)]
    pub current: bool,
    /// `exp` of its key version, when it is the current one (Unix seconds).
    #[serde(default)]
    pub expires: Option<i64>,
    /// Split policies: the share it wraps.
    #[serde(default)]
    pub share: Option<u8>,
}

/// The effective policy of a volume, as `kvcrypt status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    /// Humantime, e.g. "30s".
    pub check_interval: String,
    pub hold: String,
    pub revoke_policy: RevokePolicy,
    /// "off" or a duration.
    pub offline_lock_after: String,
    /// The keys pinned for the volume (versionless ids); empty: nothing pinned.
    #[serde(default)]
    pub keys: Vec<String>,
}

impl PolicyView {
    pub fn of(s: &VolumeSettings) -> Self {
        let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
        Self {
            check_interval: d(s.check_interval),
            hold: d(s.hold),
            revoke_policy: s.revoke_policy,
            offline_lock_after: s.offline_lock_after.map(d).unwrap_or_else(|| "off".into()),
            keys: s.pins.keys.iter().map(|k| k.to_string()).collect(),
        }
    }
}

impl VolumeStatus {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            state: VolumeState::Locked,
            reason: None,
            device: None,
            block_device: None,
            key_id: None,
            last_ok: None,
            last_error: None,
            suspended_at: None,
            manual: false,
            worker: None,
            restarts: 0,
            removed_from_config: false,
            opened: false,
            policy: None,
            slots: Vec::new(),
            keys: Vec::new(),
            rotation_next: None,
            counters: Counters::default(),
        }
    }
}

/// Now as Unix seconds (fractional).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
