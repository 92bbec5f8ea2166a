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
