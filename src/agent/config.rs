//! The configuration file `/etc/kvcrypt/kvcrypt.toml`: `[vault]`, `[agent]`, `[[volume]]`.
//!
//! Parsing is strict (`deny_unknown_fields`) so a typo fails at start instead of silently
//! falling back to a default — a misspelt `hold` would otherwise change what revocation does.
//! Durations are humantime strings ("30s", "5m", "1h 30m"); `"off"` disables optional ones.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use kvcrypt_datapath::transport::TransportKind;
use kvcrypt_exit::{Exit, ExitClass};

/// The `[vault]` table: owned by the Key Vault provider.
pub type VaultConfig = kvcrypt_keyvault::VaultConfig;

/// A configuration error, naming the file and the field so the operator can fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

impl ExitClass for ConfigError {
    fn exit_class(&self) -> Exit {
        Exit::Config
    }
}

/// Default interval between access checks.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// Default time a revoked volume stays suspended (resumable in place) before it is removed.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(300);

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub vault: Option<VaultConfig>,
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
}

/// What to do when access to the key is denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RevokePolicy {
    /// Freeze, suspend and wipe the key; resume in place if access returns within `hold`.
    Suspend,
    /// Freeze, suspend and wipe the key, then run the hook and remove the device at once.
    Remove,
}

/// Retry schedule for volumes that cannot be unlocked (vault down at boot, access denied…).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// First delay.
    #[serde(default = "d_retry_initial", deserialize_with = "de_duration")]
    pub initial: Duration,
    /// Cap of the delay.
    #[serde(default = "d_retry_max", deserialize_with = "de_duration")]
    pub max: Duration,
    /// Growth factor per failed attempt.
    #[serde(default = "d_retry_multiplier")]
    pub multiplier: f64,
    /// Random spread, as a fraction of the delay (0.2 = ±20%).
    #[serde(default = "d_jitter")]
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial: d_retry_initial(),
            max: d_retry_max(),
            multiplier: d_retry_multiplier(),
            jitter: d_jitter(),
        }
    }
}

/// A hook command: a string (run by `/bin/sh -c`) or an argv list (run directly).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum HookCommand {
    Shell(String),
    Argv(Vec<String>),
}

/// The `[agent]` table: defaults for every volume.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Interval between access checks (unwrapKey) of a served volume.
    #[serde(default = "d_check_interval", deserialize_with = "de_duration")]
    pub check_interval: Duration,
    /// Random spread of the interval (fraction), so many hosts do not hit the vault in step.
    #[serde(default = "d_jitter")]
    pub check_jitter: f64,
    /// Deadline of one Key Vault call; a call that takes longer counts as a transient failure.
    #[serde(default = "d_check_timeout", deserialize_with = "de_duration")]
    pub check_timeout: Duration,
    /// How long a revoked volume stays suspended (resumable in place) before removal.
    #[serde(default = "d_hold", deserialize_with = "de_duration")]
    pub hold: Duration,
    #[serde(default = "d_policy")]
    pub revoke_policy: RevokePolicy,
    /// Lock after this long without a successful check even if the vault only failed
    /// transiently. `"off"` (default) never locks on outages.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub offline_lock_after: Option<Duration>,
    #[serde(default)]
    pub unlock_retry: RetryConfig,
    /// Command run before a revoked device is removed (env KVCRYPT_NAME, KVCRYPT_DEVICE).
    #[serde(default)]
    pub hook: Option<HookCommand>,
    #[serde(default = "d_hook_timeout", deserialize_with = "de_duration")]
    pub hook_timeout: Duration,
    /// Follow Key Vault key rotation: when a pinned key gets a new version, the volume gains a
    /// verified slot for it (and loses the older versions' slots after `rotation_grace`).
    #[serde(default = "d_true")]
    pub follow_rotation: bool,
    /// How often a serving volume looks up its keys' current versions (jittered like
    /// `check_interval`); the first lookup is at the first access check after unlock.
    #[serde(default = "d_rotation_check", deserialize_with = "de_duration")]
    pub rotation_check: Duration,
    /// How long the slots of older key versions are kept after a slot of the current version
    /// was added (the customer may roll a rotation back by re-enabling the old version).
    #[serde(default = "d_rotation_grace", deserialize_with = "de_duration")]
    pub rotation_grace: Duration,
    /// A pinned key whose current version expires within this is warned about (journal,
    /// `kvcrypt status`).
    #[serde(default = "d_expiry_warning", deserialize_with = "de_duration")]
    pub expiry_warning: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            check_interval: d_check_interval(),
            check_jitter: d_jitter(),
            check_timeout: d_check_timeout(),
            hold: d_hold(),
            revoke_policy: d_policy(),
            offline_lock_after: None,
            unlock_retry: RetryConfig::default(),
            hook: None,
            hook_timeout: d_hook_timeout(),
            follow_rotation: true,
            rotation_check: d_rotation_check(),
            rotation_grace: d_rotation_grace(),
            expiry_warning: d_expiry_warning(),
        }
    }
}

/// One `[[volume]]` entry. Exactly one of `uuid`, `label`, `path` selects the device.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Name of the served device (`/dev/disk/by-kvcrypt/NAME`).
    pub name: String,
    #[serde(default)]
    pub uuid: Option<uuid::Uuid>,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default = "d_transport")]
    pub transport: TransportKind,
    #[serde(default)]
    pub queues: Option<u16>,
    #[serde(default = "d_queue_depth")]
    pub queue_depth: u16,
    #[serde(default)]
    pub allow_discards: bool,
    #[serde(default)]
    pub read_only: bool,
    /// The keys allowed to unlock this volume (versionless key ids, any version matches);
    /// replaces `[vault] keys` for this volume. See `Pins`: a header slot naming another key is
    /// never tried, and requests go to the host named here.
    #[serde(default)]
    pub keys: Vec<kvcrypt_keyvault::KeyPin>,
    // Per-volume overrides of [agent].
    #[serde(default, deserialize_with = "de_some_duration")]
    pub check_interval: Option<Duration>,
    #[serde(default, deserialize_with = "de_some_duration")]
    pub hold: Option<Duration>,
    #[serde(default)]
    pub revoke_policy: Option<RevokePolicy>,
    #[serde(default, deserialize_with = "de_override_duration")]
    pub offline_lock_after: Option<Option<Duration>>,
    #[serde(default)]
    pub hook: Option<HookCommand>,
    #[serde(default, deserialize_with = "de_some_duration")]
    pub hook_timeout: Option<Duration>,
    #[serde(default)]
    pub follow_rotation: Option<bool>,
    #[serde(default, deserialize_with = "de_some_duration")]
    pub rotation_check: Option<Duration>,
    #[serde(default, deserialize_with = "de_some_duration")]
    pub rotation_grace: Option<Duration>,
}

/// How a volume's device is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Uuid(uuid::Uuid),
    Label(String),
    Path(PathBuf),
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Uuid(u) => write!(f, "uuid {u}"),
            Selector::Label(l) => write!(f, "label {l:?}"),
            Selector::Path(p) => write!(f, "path {}", p.display()),
        }
    }
}

/// The effective settings of one volume: its entry merged over `[agent]`.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeSettings {
    pub name: String,
    pub selector: Selector,
    pub transport: TransportKind,
    pub queues: Option<u16>,
    pub queue_depth: u16,
    pub allow_discards: bool,
    pub read_only: bool,
    /// The keys that may unlock the volume: its own `keys`, else `[vault] keys`.
    pub pins: kvcrypt_keyvault::Pins,
    pub check_interval: Duration,
    pub check_jitter: f64,
    pub check_timeout: Duration,
    pub hold: Duration,
    pub revoke_policy: RevokePolicy,
    pub offline_lock_after: Option<Duration>,
    pub unlock_retry: RetryConfig,
    pub hook: Option<HookCommand>,
    pub hook_timeout: Duration,
    pub follow_rotation: bool,
    pub rotation_check: Duration,
    pub rotation_grace: Duration,
    pub expiry_warning: Duration,
}

impl Config {
    /// Reads and validates the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates `text` (`path` only names the file in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |field: String, message: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            message: message.to_owned(),
        };
        let a = &self.agent;
        if a.check_interval < Duration::from_millis(100) {
            return Err(bad("agent.check_interval".into(), "must be at least 100ms"));
        }
        if a.rotation_check < Duration::from_secs(1) {
            return Err(bad("agent.rotation_check".into(), "must be at least 1s"));
        }
        if a.check_timeout.is_zero() {
            return Err(bad("agent.check_timeout".into(), "must be greater than 0"));
        }
        if !(0.0..=0.5).contains(&a.check_jitter) {
            return Err(bad(
                "agent.check_jitter".into(),
                "must be between 0.0 and 0.5",
            ));
        }
        let r = &a.unlock_retry;
        if r.initial.is_zero() || r.max < r.initial {
            return Err(bad(
                "agent.unlock_retry".into(),
                "initial must be > 0 and max must be >= initial",
            ));
        }
        if !(r.multiplier >= 1.0 && r.multiplier <= 100.0) {
            return Err(bad(
                "agent.unlock_retry.multiplier".into(),
                "must be between 1.0 and 100.0",
            ));
        }
        if !(0.0..=1.0).contains(&r.jitter) {
            return Err(bad(
                "agent.unlock_retry.jitter".into(),
                "must be between 0.0 and 1.0",
            ));
        }
        if let Some(h) = &a.hook {
            check_hook(h).map_err(|m| bad("agent.hook".into(), m))?;
        }
        let mut names = std::collections::HashSet::new();
        for (i, v) in self.volumes.iter().enumerate() {
            let at = |f: &str| format!("volume[{i}] ({}).{f}", v.name);
            if !valid_name(&v.name) {
                return Err(bad(
                    format!("volume[{i}].name"),
                    "must be 1-64 characters of A-Z a-z 0-9 . _ - and not start with '.' or '-'",
                ));
            }
            if !names.insert(v.name.as_str()) {
                return Err(bad(at("name"), "duplicate volume name"));
            }
            let n = [v.uuid.is_some(), v.label.is_some(), v.path.is_some()]
                .iter()
                .filter(|b| **b)
                .count();
            if n != 1 {
                return Err(bad(
                    at("uuid/label/path"),
                    "exactly one of uuid, label or path must be set",
                ));
            }
            if let Some(p) = &v.path
                && !p.is_absolute()
            {
                return Err(bad(at("path"), "must be an absolute path"));
            }
            if let Some(l) = &v.label
                && (l.is_empty() || l.len() > 47)
            {
                return Err(bad(at("label"), "must be 1-47 bytes"));
            }
            if v.queues == Some(0) || v.queue_depth == 0 {
                return Err(bad(at("queues"), "queues and queue_depth must be > 0"));
            }
            if let Some(ci) = v.check_interval
                && ci < Duration::from_millis(100)
            {
                return Err(bad(at("check_interval"), "must be at least 100ms"));
            }
            if let Some(h) = &v.hook {
                check_hook(h).map_err(|m| bad(at("hook"), m))?;
            }
            if v.rotation_check.is_some_and(|r| r < Duration::from_secs(1)) {
                return Err(bad(at("rotation_check"), "must be at least 1s"));
            }
        }
        Ok(())
    }

    /// Effective settings of every configured volume.
    pub fn volume_settings(&self) -> Vec<VolumeSettings> {
        self.volumes.iter().map(|v| self.settings_for(v)).collect()
    }

    fn settings_for(&self, v: &VolumeConfig) -> VolumeSettings {
        let a = &self.agent;
        let selector = match (&v.uuid, &v.label, &v.path) {
            (Some(u), _, _) => Selector::Uuid(*u),
            (_, Some(l), _) => Selector::Label(l.clone()),
            (_, _, Some(p)) => Selector::Path(p.clone()),
            // validate() guarantees exactly one; a path of "" never matches anything.
            _ => Selector::Path(PathBuf::new()),
        };
        VolumeSettings {
            name: v.name.clone(),
            selector,
            transport: v.transport,
            queues: v.queues,
            queue_depth: v.queue_depth,
            allow_discards: v.allow_discards,
            read_only: v.read_only,
            pins: self.pins_for(v),
            check_interval: v.check_interval.unwrap_or(a.check_interval),
            check_jitter: a.check_jitter,
            check_timeout: a.check_timeout,
            hold: v.hold.unwrap_or(a.hold),
            revoke_policy: v.revoke_policy.unwrap_or(a.revoke_policy),
            offline_lock_after: v.offline_lock_after.unwrap_or(a.offline_lock_after),
            unlock_retry: a.unlock_retry.clone(),
            hook: v.hook.clone().or_else(|| a.hook.clone()),
            hook_timeout: v.hook_timeout.unwrap_or(a.hook_timeout),
            follow_rotation: v.follow_rotation.unwrap_or(a.follow_rotation),
            rotation_check: v.rotation_check.unwrap_or(a.rotation_check),
            rotation_grace: v.rotation_grace.unwrap_or(a.rotation_grace),
            expiry_warning: a.expiry_warning,
        }
    }
}

impl Config {
    /// The pins of a volume the configuration does not list (`kvcrypt open`): those of
    /// `[vault]`, named for messages.
    pub fn vault_pins(&self, name: &str) -> kvcrypt_keyvault::Pins {
        self.vault_pins_or(format!(
            "keys of [vault] (volume \"{name}\" was opened by kvcrypt open)"
        ))
    }

    /// A volume's pins: its own `keys`, else those of `[vault]`, named for messages.
    fn pins_for(&self, v: &VolumeConfig) -> kvcrypt_keyvault::Pins {
        if !v.keys.is_empty() {
            return kvcrypt_keyvault::Pins::new(
                v.keys.clone(),
                format!("keys of [[volume]] \"{}\"", v.name),
            );
        }
        self.vault_pins_or(format!("keys of [[volume]] \"{}\" and of [vault]", v.name))
    }

    /// The `[vault]` pins, named "keys of [vault]"; `when_empty` names where pins were looked
    /// for when there are none (the refusal tells the operator where to add them).
    fn vault_pins_or(&self, when_empty: String) -> kvcrypt_keyvault::Pins {
        let vault = self
            .vault
            .as_ref()
            .map(|c| c.keys.clone())
            .unwrap_or_default();
        let source = if vault.is_empty() {
            when_empty
        } else {
            "keys of [vault]".to_owned()
        };
        kvcrypt_keyvault::Pins::new(vault, source)
    }
}

fn check_hook(h: &HookCommand) -> Result<(), &'static str> {
    match h {
        HookCommand::Shell(s) if s.trim().is_empty() => Err("must not be empty"),
        HookCommand::Argv(v) if v.is_empty() || v[0].is_empty() => {
            Err("argv list must not be empty")
        }
        HookCommand::Argv(v) if !Path::new(&v[0]).is_absolute() => {
            Err("argv[0] must be an absolute path")
        }
        _ => Ok(()),
    }
}

/// Volume names become file names under /run/kvcrypt and udev symlinks: the worker's rule.
pub fn valid_name(name: &str) -> bool {
    crate::worker::validate_name(name).is_ok()
}

fn d_check_interval() -> Duration {
    DEFAULT_CHECK_INTERVAL
}
fn d_check_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_jitter() -> f64 {
    0.1
}
fn d_hold() -> Duration {
    DEFAULT_HOLD
}
fn d_policy() -> RevokePolicy {
    RevokePolicy::Suspend
}
fn d_retry_initial() -> Duration {
    Duration::from_secs(1)
}
fn d_retry_max() -> Duration {
    Duration::from_secs(300)
}
fn d_retry_multiplier() -> f64 {
    2.0
}
fn d_true() -> bool {
    true
}
fn d_rotation_check() -> Duration {
    Duration::from_secs(3600)
}
fn d_rotation_grace() -> Duration {
    Duration::from_secs(30 * 86_400)
}
fn d_expiry_warning() -> Duration {
    Duration::from_secs(30 * 86_400)
}
fn d_hook_timeout() -> Duration {
    Duration::from_secs(30)
}
fn d_transport() -> TransportKind {
    TransportKind::Auto
}
fn d_queue_depth() -> u16 {
    128
}

/// Parses "30s", "5m", "1h 30m", "250ms"; `off`/`never`/`none` give `None`.
pub fn parse_duration_opt(s: &str) -> Result<Option<Duration>, String> {
    let t = s.trim();
    if matches!(t, "off" | "never" | "none") {
        return Ok(None);
    }
    humantime::parse_duration(t)
        .map(Some)
        .map_err(|e| format!("invalid duration {s:?} ({e}); use e.g. \"30s\", \"5m\", \"1h\""))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    match parse_duration_opt(&s).map_err(serde::de::Error::custom)? {
        Some(v) => Ok(v),
        None => Err(serde::de::Error::custom(format!(
            "{s:?} is not allowed here; give a duration such as \"30s\""
        ))),
    }
}

fn de_some_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration_opt(&s).map_err(serde::de::Error::custom)
}

fn de_override_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<Duration>>, D::Error> {
    de_opt_duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/kvcrypt/kvcrypt.toml"), s)
    }

    #[test]
    fn volume_names_follow_the_workers_rule() {
        assert!(!valid_name("-rf"));
        assert!(valid_name("data-1"));
    }

    #[test]
    fn defaults_apply() {
        let c = parse("[[volume]]\nname = \"data\"\npath = \"/dev/sdb\"\n").unwrap();
        let v = &c.volume_settings()[0];
        assert_eq!(v.check_interval, Duration::from_secs(30));
        assert_eq!(v.hold, Duration::from_secs(300));
        assert_eq!(v.revoke_policy, RevokePolicy::Suspend);
        assert_eq!(v.offline_lock_after, None);
        assert_eq!(v.selector, Selector::Path("/dev/sdb".into()));
        assert_eq!(v.transport, TransportKind::Auto);
    }

    #[test]
    fn overrides_and_durations() {
        let c = parse(
            r#"
[agent]
check_interval = "1s"
hold = "2m"
offline_lock_after = "1h 30m"
revoke_policy = "remove"
hook = ["/usr/local/bin/h", "x"]
[agent.unlock_retry]
initial = "250ms"
max = "10s"
[[volume]]
name = "a"
uuid = "0b5c3a3e-3c6f-4c1e-9a51-6a0f1d3b9c11"
hold = "5s"
offline_lock_after = "off"
revoke_policy = "suspend"
[[volume]]
name = "b"
label = "backup"
transport = "fuse"
"#,
        )
        .unwrap();
        let s = c.volume_settings();
        assert_eq!(s[0].hold, Duration::from_secs(5));
        assert_eq!(s[0].offline_lock_after, None);
        assert_eq!(s[0].revoke_policy, RevokePolicy::Suspend);
        assert_eq!(s[0].check_interval, Duration::from_secs(1));
        assert_eq!(s[1].hold, Duration::from_secs(120));
        assert_eq!(s[1].offline_lock_after, Some(Duration::from_secs(5400)));
        assert_eq!(s[1].revoke_policy, RevokePolicy::Remove);
        assert_eq!(s[1].transport, TransportKind::Fuse);
        assert_eq!(s[1].selector, Selector::Label("backup".into()));
        assert_eq!(s[1].unlock_retry.initial, Duration::from_millis(250));
        assert_eq!(
            s[1].hook,
            Some(HookCommand::Argv(vec![
                "/usr/local/bin/h".into(),
                "x".into()
            ]))
        );
    }

    #[test]
    fn unknown_field_is_named() {
        let e = parse("[agent]\nhodl = \"5m\"\n").unwrap_err().to_string();
        assert!(e.contains("/etc/kvcrypt/kvcrypt.toml"), "{e}");
        assert!(e.contains("hodl"), "{e}");
        assert_eq!(
            parse("[agent]\nhodl = \"5m\"\n").unwrap_err().exit_class(),
            Exit::Config
        );
    }

    #[test]
    fn bad_duration_is_named() {
        let e = parse("[agent]\ncheck_interval = \"30 parsecs\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("check_interval"), "{e}");
        assert!(e.contains("30 parsecs"), "{e}");
        let e = parse("[agent]\nhold = \"off\"\n").unwrap_err().to_string();
        assert!(e.contains("hold"), "{e}");
    }

    #[test]
    fn selector_must_be_unique() {
        let e = parse("[[volume]]\nname = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("volume[0] (x).uuid/label/path"), "{e}");
        let e = parse("[[volume]]\nname = \"x\"\npath = \"/a\"\nlabel = \"l\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("exactly one"), "{e}");
    }

    #[test]
    fn names_validated_and_unique() {
        let e = parse("[[volume]]\nname = \"../x\"\npath = \"/a\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("volume[0].name"), "{e}");
        let e = parse(
            "[[volume]]\nname = \"x\"\npath = \"/a\"\n[[volume]]\nname = \"x\"\npath = \"/b\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("duplicate"), "{e}");
    }

    #[test]
    fn relative_path_and_tiny_interval_rejected() {
        assert!(parse("[[volume]]\nname = \"x\"\npath = \"dev/sdb\"\n").is_err());
        let e = parse("[agent]\ncheck_interval = \"1ms\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent.check_interval"), "{e}");
    }

    #[test]
    fn pins_come_from_the_volume_else_from_vault_and_bad_ones_are_named() {
        let c = parse(
            r#"
[vault]
keys = ["https://a.vault.azure.net/keys/k"]
[vault.credential]
kind = "managed-identity"
[[volume]]
name = "own"
path = "/dev/a"
keys = ["https://b.vault.azure.net/keys/other", "https://c.managedhsm.azure.net/keys/h"]
[[volume]]
name = "inherits"
path = "/dev/b"
"#,
        )
        .unwrap();
        let s = c.volume_settings();
        let ids = |i: usize| {
            s[i].pins
                .keys
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ids(0),
            vec![
                "https://b.vault.azure.net/keys/other",
                "https://c.managedhsm.azure.net/keys/h"
            ]
        );
        assert_eq!(ids(1), vec!["https://a.vault.azure.net/keys/k"]);
        assert!(s[1].pins.source.contains("[vault]"));
        for bad in [
            "https://a.vault.azure.net/keys/k/0123456789abcdef",
            "http://a.vault.azure.net/keys/k",
            "https://a.vault.azure.net/secrets/k",
        ] {
            for text in [
                format!("[[volume]]\nname = \"x\"\npath = \"/a\"\nkeys = [\"{bad}\"]\n"),
                format!(
                    "[vault]\nkeys = [\"{bad}\"]\n[vault.credential]\nkind = \"managed-identity\"\n"
                ),
            ] {
                let e = parse(&text).unwrap_err();
                assert_eq!(e.exit_class(), Exit::Config);
                let m = e.to_string();
                assert!(m.contains(&format!("keys entry '{bad}'")), "{m}");
            }
        }
    }

    #[test]
    fn example_file_parses() {
        let text = include_str!("../../examples/kvcrypt.toml");
        let c = parse(text).unwrap();
        assert!(!c.volumes.is_empty());
    }
}
