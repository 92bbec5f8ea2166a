//! `systemctl reload kvcrypt-agent` (SIGHUP): re-read the configuration file and apply it to the
//! running agent without dropping any served device.
//!
//! The file is parsed, validated and its `[vault]` provider built *before* anything changes;
//! any failure leaves the running configuration as it was. Then [`plan`] compares volume by
//! volume (by name): new entries get a task, changed ones get their new settings over their
//! task's watch channel (applied from the next check, worker untouched), removed ones are
//! marked "removed from config" — still served and checked until closed, never yanked — and an
//! entry whose device selector changed is a removal plus an addition (the new one starts once
//! the old one is no longer served: both would use the same name in /run/kvcrypt).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

use super::config::{Config, ConfigError, VolumeSettings};
use super::ports::Platform;
use super::volume::{Desired, VolumeHandle, spawn_managed};

/// Why a reload was refused (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("config file {path}: [vault]: {message}")]
    Vault { path: String, message: String },
}

/// What a reload changes, by volume name.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// New names.
    pub add: Vec<VolumeSettings>,
    /// Same device, other settings (or back in the configuration after a removal).
    pub update: Vec<VolumeSettings>,
    /// Configured now, absent from the new file.
    pub remove: Vec<String>,
    /// Same name, another device: the old one is removed, the new one added after it.
    pub replace: Vec<VolumeSettings>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }
}

/// The running volumes as the planner sees them: settings and whether still configured.
pub type Current = BTreeMap<String, (VolumeSettings, bool)>;

/// Compares the running volumes with the new file's. Pure: no side effects.
pub fn plan(current: &Current, new: &[VolumeSettings]) -> Plan {
    let mut p = Plan::default();
    for s in new {
        match current.get(&s.name) {
            None => p.add.push(s.clone()),
            Some((old, _)) if old.selector != s.selector => p.replace.push(s.clone()),
            Some((old, configured)) if old != s || !configured => p.update.push(s.clone()),
            Some(_) => {}
        }
    }
    for (name, (_, configured)) in current {
        if *configured && !new.iter().any(|s| &s.name == name) {
            p.remove.push(name.clone());
        }
    }
    p
}

struct Entry {
    handle: VolumeHandle,
    desired: watch::Sender<Desired>,
}

/// The volume tasks of a running agent, and the registry the control socket reads.
pub struct VolumeSet<P: Platform> {
    p: Arc<P>,
    entries: BTreeMap<String, Entry>,
    /// Replacements (changed device) waiting for the old volume of that name to be closed.
    pending: BTreeMap<String, VolumeSettings>,
    registry: watch::Sender<BTreeMap<String, VolumeHandle>>,
}

impl<P: Platform> VolumeSet<P> {
    /// Starts a task per volume.
    pub fn start(p: Arc<P>, settings: &[VolumeSettings]) -> Self {
        let mut set = Self {
            p,
            entries: BTreeMap::new(),
            pending: BTreeMap::new(),
            registry: watch::Sender::new(BTreeMap::new()),
        };
        for s in settings {
            set.spawn(s.clone());
        }
        set.publish();
        set
    }

    fn spawn(&mut self, s: VolumeSettings) {
        let (handle, desired) = spawn_managed(s.clone(), self.p.clone());
        self.entries.insert(s.name, Entry { handle, desired });
    }

    fn publish(&self) {
        self.registry.send_replace(self.handles());
    }

    /// Every volume task (configured or still serving after removal).
    pub fn handles(&self) -> BTreeMap<String, VolumeHandle> {
        self.entries
            .iter()
            .map(|(n, e)| (n.clone(), e.handle.clone()))
            .collect()
    }

    /// What the control socket serves; follows reloads.
    pub fn registry(&self) -> watch::Receiver<BTreeMap<String, VolumeHandle>> {
        self.registry.subscribe()
    }

    fn current(&self) -> Current {
        self.entries
            .iter()
            .map(|(n, e)| {
                let d = e.desired.borrow();
                (n.clone(), (d.settings.clone(), d.configured))
            })
            .collect()
    }

    /// Reads `path` and applies it; on error nothing changes. Returns a one-line summary.
    pub fn reload(&mut self, path: &Path) -> Result<String, ReloadError> {
        let cfg = Config::load(path)?;
        let vault = cfg.vault.as_ref().ok_or_else(|| ReloadError::Vault {
            path: path.display().to_string(),
            message: "missing: the agent needs a [vault] table (credentials) to unwrap keys".into(),
        })?;
        // The last step that can fail: after it, applying the volumes cannot.
        self.p
            .reload_vault(vault)
            .map_err(|message| ReloadError::Vault {
                path: path.display().to_string(),
                message,
            })?;
        let plan = self.apply(&cfg.volume_settings());
        Ok(describe(path, &plan))
    }

    /// Applies the volume part of a validated configuration.
    pub fn apply(&mut self, new: &[VolumeSettings]) -> Plan {
        // A replacement still waiting is re-planned from the new file.
        self.pending.clear();
        let plan = plan(&self.current(), new);
        for s in &plan.add {
            tracing::info!(volume = %s.name, device = %s.selector, "reload: new volume {} ({})", s.name, s.selector);
            self.spawn(s.clone());
        }
        for s in &plan.update {
            if let Some(e) = self.entries.get(&s.name) {
                e.desired.send_replace(Desired {
                    settings: s.clone(),
                    configured: true,
                });
            }
        }
        for name in &plan.remove {
            if let Some(e) = self.entries.get(name) {
                tracing::warn!(volume = %name, "reload: volume {name} removed from the configuration; a served device stays served and checked until it is closed (kvcrypt close), then is forgotten");
                e.desired.send_modify(|d| d.configured = false);
            }
        }
        for s in &plan.replace {
            if let Some(e) = self.entries.get(&s.name) {
                tracing::warn!(volume = %s.name, device = %s.selector, "reload: device of volume {} changed to {}; the old device stays served until it is closed, then the new one is attached", s.name, s.selector);
                e.desired.send_modify(|d| d.configured = false);
            }
            self.pending.insert(s.name.clone(), s.clone());
        }
        self.publish();
        self.prune();
        plan
    }

    /// Forgets tasks that ended (removed from the configuration and closed) and starts the
    /// replacements waiting for them. Called periodically.
    pub fn prune(&mut self) {
        let done: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.handle.tx.is_closed() && !e.desired.borrow().configured)
            .map(|(n, _)| n.clone())
            .collect();
        if done.is_empty() {
            return;
        }
        for n in done {
            self.entries.remove(&n);
            if let Some(s) = self.pending.remove(&n) {
                tracing::info!(volume = %n, device = %s.selector, "volume {n}: old device closed; attaching its new device {}", s.selector);
                self.spawn(s);
            }
        }
        self.publish();
    }
}

fn describe(path: &Path, p: &Plan) -> String {
    let names = |v: &[VolumeSettings]| {
        v.iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut parts = Vec::new();
    if !p.add.is_empty() {
        parts.push(format!("added {}", names(&p.add)));
    }
    if !p.update.is_empty() {
        parts.push(format!("updated {}", names(&p.update)));
    }
    if !p.remove.is_empty() {
        parts.push(format!("removed {}", p.remove.join(",")));
    }
    if !p.replace.is_empty() {
        parts.push(format!("device changed {}", names(&p.replace)));
    }
    if parts.is_empty() {
        parts.push("no volume changes".into());
    }
    format!("reloaded {}: {}", path.display(), parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::agent::config::{RevokePolicy, Selector};

    fn parse(text: &str) -> Vec<VolumeSettings> {
        Config::parse(Path::new("/etc/kvcrypt/kvcrypt.toml"), text)
            .unwrap()
            .volume_settings()
    }

    fn current(v: &[VolumeSettings]) -> Current {
        v.iter()
            .map(|s| (s.name.clone(), (s.clone(), true)))
            .collect()
    }

    const A: &str = "[[volume]]\nname = \"a\"\npath = \"/dev/sda\"\n";
    const B: &str = "[[volume]]\nname = \"b\"\nlabel = \"backup\"\n";

    #[test]
    fn same_file_changes_nothing() {
        let old = parse(&format!("{A}{B}"));
        assert!(plan(&current(&old), &old).is_empty());
    }

    #[test]
    fn added_and_removed_volumes() {
        let old = parse(A);
        let new = parse(B);
        let p = plan(&current(&old), &new);
        assert_eq!(p.add.len(), 1);
        assert_eq!(p.add[0].name, "b");
        assert_eq!(p.remove, vec!["a".to_owned()]);
        assert!(p.update.is_empty() && p.replace.is_empty());
    }

    #[test]
    fn policy_change_is_an_update_of_the_same_volume() {
        let old = parse(A);
        let new = parse(&format!(
            "[agent]\ncheck_interval = \"2s\"\nrevoke_policy = \"remove\"\n{A}hold = \"1m\"\n"
        ));
        let p = plan(&current(&old), &new);
        assert_eq!(p.update.len(), 1, "{p:?}");
        let s = &p.update[0];
        assert_eq!(s.check_interval, Duration::from_secs(2));
        assert_eq!(s.revoke_policy, RevokePolicy::Remove);
        assert_eq!(s.hold, Duration::from_secs(60));
        assert!(p.add.is_empty() && p.remove.is_empty() && p.replace.is_empty());
    }

    #[test]
    fn changed_device_is_remove_plus_add() {
        let old = parse(A);
        let new =
            parse("[[volume]]\nname = \"a\"\nuuid = \"0b5c3a3e-3c6f-4c1e-9a51-6a0f1d3b9c11\"\n");
        let p = plan(&current(&old), &new);
        assert_eq!(p.replace.len(), 1);
        assert!(matches!(p.replace[0].selector, Selector::Uuid(_)));
        assert!(p.add.is_empty() && p.update.is_empty() && p.remove.is_empty());
    }

    #[test]
    fn removed_volume_back_in_the_file_is_configured_again() {
        let old = parse(A);
        let mut cur = current(&old);
        if let Some(e) = cur.get_mut("a") {
            e.1 = false;
        }
        let p = plan(&cur, &old);
        assert_eq!(p.update.len(), 1);
        // Removed already: not removed twice.
        assert!(plan(&cur, &[]).remove.is_empty());
    }
}
