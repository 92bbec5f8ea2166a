//! Runtime volumes: devices handed to the agent by `kvcrypt open` rather than listed in the
//! configuration file. The agent serves and access-checks them exactly like configured ones;
//! this module only holds what describes one (worker options, never key material) and its
//! record under the run directory (`RUN_DIR/opened/NAME.json`, 0600), so that a restarted
//! agent takes them over again. `kvcrypt close NAME` deletes the record.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::config::{Config, Selector, VolumeSettings};
use super::control::run_dir;
use kvcrypt_datapath::transport::TransportKind;

/// What `kvcrypt open DEVICE NAME` asks the agent to serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenSpec {
    pub name: String,
    /// Absolute path of the encrypted device or file.
    pub device: PathBuf,
    pub transport: TransportKind,
    #[serde(default)]
    pub queues: Option<u16>,
    pub queue_depth: u16,
    #[serde(default)]
    pub allow_discards: bool,
    #[serde(default)]
    pub read_only: bool,
}

impl OpenSpec {
    /// The settings its task runs with: the worker options given to `open`, the policy
    /// (check interval, hold, revoke policy, offline limit, hook) of the `[agent]` table, and
    /// the keys pinned in `[vault]` (the agent never trusts the key ids on the disk alone).
    pub fn settings(&self, cfg: &Config) -> VolumeSettings {
        let a = &cfg.agent;
        VolumeSettings {
            name: self.name.clone(),
            selector: Selector::Path(self.device.clone()),
            transport: self.transport,
            queues: self.queues,
            queue_depth: self.queue_depth,
            allow_discards: self.allow_discards,
            read_only: self.read_only,
            check_interval: a.check_interval,
            check_jitter: a.check_jitter,
            check_timeout: a.check_timeout,
            hold: a.hold,
            revoke_policy: a.revoke_policy,
            offline_lock_after: a.offline_lock_after,
            unlock_retry: a.unlock_retry.clone(),
            hook: a.hook.clone(),
            hook_timeout: a.hook_timeout,
            follow_rotation: a.follow_rotation,
            rotation_check: a.rotation_check,
            rotation_grace: a.rotation_grace,
            expiry_warning: a.expiry_warning,
            pins: cfg.vault_pins(&self.name),
        }
    }
}

/// `RUN_DIR/opened`.
pub fn dir() -> PathBuf {
    run_dir().join("opened")
}

fn record_path(name: &str) -> PathBuf {
    dir().join(format!("{name}.json"))
}

/// Writes the record of `spec` (directory 0700, file 0600, replaced atomically).
pub fn save(spec: &OpenSpec) -> std::io::Result<()> {
    let d = dir();
    std::fs::create_dir_all(&d)?;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
    let tmp = d.join(format!(".{}.json.tmp", spec.name));
    let text = serde_json::to_string_pretty(spec).map_err(std::io::Error::other)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, record_path(&spec.name))
}

/// Deletes the record of `name` (none is fine).
pub fn remove(name: &str) {
    let p = record_path(name);
    match std::fs::remove_file(&p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(volume = name, error = %e, "volume {name}: cannot delete {}: {e} (a restarted agent would serve it again)", p.display());
        }
        _ => {}
    }
}

/// Every readable record; a damaged one is logged and skipped.
pub fn load_all() -> Vec<OpenSpec> {
    load_from(&dir())
}

fn load_from(d: &Path) -> Vec<OpenSpec> {
    let Ok(entries) = std::fs::read_dir(d) else {
        return vec![];
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let parsed = std::fs::read(&p)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<OpenSpec>(&b).map_err(|e| e.to_string()));
        match parsed {
            Ok(s) if p.file_stem().is_some_and(|n| *n == *s.name) => out.push(s),
            Ok(s) => {
                tracing::warn!(record = %p.display(), "ignoring {}: it names volume {:?}", p.display(), s.name)
            }
            Err(e) => {
                tracing::warn!(record = %p.display(), error = %e, "ignoring the damaged runtime volume record {}: {e}", p.display())
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// How long the control socket waits for a runtime volume's first unlock (Key Vault round
/// trips with retries, a worker start and udev naming).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(100);

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> OpenSpec {
        OpenSpec {
            name: name.into(),
            device: "/tmp/x.img".into(),
            transport: TransportKind::Fuse,
            queues: None,
            queue_depth: 128,
            allow_discards: false,
            read_only: true,
        }
    }

    #[test]
    fn records_round_trip_private_and_without_strays() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("opened");
        std::fs::create_dir_all(&run).unwrap();
        let text = serde_json::to_string(&spec("a")).unwrap();
        std::fs::write(run.join("a.json"), &text).unwrap();
        std::fs::write(run.join("b.json"), &text).unwrap(); // names "a": ignored
        std::fs::write(run.join("c.json"), "{not json").unwrap();
        std::fs::write(run.join("d.txt"), &text).unwrap();
        assert_eq!(load_from(&run), vec![spec("a")]);
    }

    #[test]
    fn settings_take_the_agent_policy_and_the_open_options() {
        let cfg = Config::parse(
            Path::new("/etc/kvcrypt/kvcrypt.toml"),
            "[agent]\ncheck_interval = \"7s\"\nhold = \"1m\"\n",
        )
        .unwrap();
        let s = spec("a").settings(&cfg);
        assert_eq!(s.check_interval, Duration::from_secs(7));
        assert_eq!(s.hold, Duration::from_secs(60));
        assert!(s.read_only);
        assert_eq!(s.selector, Selector::Path("/tmp/x.img".into()));
    }
}
