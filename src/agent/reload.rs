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
use super::opened::{self, OpenSpec};
use super::ports::Platform;
use super::volume::{Command, Desired, VolumeHandle, spawn_managed, spawn_runtime};

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
    /// A runtime volume (`kvcrypt open`): not part of the configuration, so a reload neither
    /// removes nor replaces it (it only takes the new `[agent]` policy); forgotten once
    /// closed.
    runtime: Option<OpenSpec>,
}

/// Why the agent refused to adopt a `kvcrypt open` volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenRefused {
    /// The name is taken (a configured volume, or another open one).
    Busy(String),
    /// The device does not exist.
    NotFound(String),
    Failed(String),
}

/// The volume tasks of a running agent, and the registry the control socket reads.
pub struct VolumeSet<P: Platform> {
    p: Arc<P>,
    entries: BTreeMap<String, Entry>,
    /// Replacements (changed device) waiting for the old volume of that name to be closed.
    pending: BTreeMap<String, VolumeSettings>,
    registry: watch::Sender<BTreeMap<String, VolumeHandle>>,
    /// The configuration in effect: runtime volumes take their policy from its `[agent]`.
    cfg: Config,
}

impl<P: Platform> VolumeSet<P> {
    /// Starts a task per volume.
    pub fn start(p: Arc<P>, settings: &[VolumeSettings]) -> Self {
        Self::start_with(p, Config::default(), settings, vec![])
    }

    /// Starts a task per configured volume of `cfg` (`settings`), and one per runtime volume
    /// recorded by an earlier agent (`runtime`; those whose name is now configured are
    /// skipped: the configuration wins, the record is dropped).
    pub fn start_with(
        p: Arc<P>,
        cfg: Config,
        settings: &[VolumeSettings],
        runtime: Vec<OpenSpec>,
    ) -> Self {
        let mut set = Self {
            p,
            entries: BTreeMap::new(),
            pending: BTreeMap::new(),
            registry: watch::Sender::new(BTreeMap::new()),
            cfg,
        };
        for s in settings {
            set.spawn(s.clone());
        }
        for spec in runtime {
            if set.entries.contains_key(&spec.name) {
                tracing::warn!(volume = %spec.name, "volume {}: opened by kvcrypt open before the agent restarted, but now a configured volume has that name; serving the configured one", spec.name);
                opened::remove(&spec.name);
                continue;
            }
            tracing::info!(volume = %spec.name, device = %spec.device.display(), "volume {}: taking over the volume opened by kvcrypt open ({})", spec.name, spec.device.display());
            set.spawn_opened(spec);
        }
        set.publish();
        set
    }

    fn spawn(&mut self, s: VolumeSettings) {
        let (handle, desired) = spawn_managed(s.clone(), self.p.clone());
        self.entries.insert(
            s.name,
            Entry {
                handle,
                desired,
                runtime: None,
            },
        );
    }

    fn spawn_opened(&mut self, spec: OpenSpec) -> VolumeHandle {
        let (handle, desired) = spawn_runtime(spec.settings(&self.cfg), self.p.clone());
        self.entries.insert(
            spec.name.clone(),
            Entry {
                handle: handle.clone(),
                desired,
                runtime: Some(spec),
            },
        );
        handle
    }

    /// `kvcrypt open` with the agent running: records the volume (so a restarted agent takes
    /// it over) and starts its task. The caller waits for its first unlock and calls
    /// [`forget`](Self::forget) if that fails.
    pub fn open(&mut self, spec: OpenSpec) -> Result<VolumeHandle, OpenRefused> {
        let name = spec.name.clone();
        match self.entries.get(&name) {
            Some(e) if e.runtime.is_some() => {
                return Err(OpenRefused::Busy(format!(
                    "volume {name} is already open (kvcrypt status {name}; kvcrypt close {name} first)"
                )));
            }
            Some(_) => {
                return Err(OpenRefused::Busy(format!(
                    "{name} is the name of a volume in the agent's configuration; the agent serves it (kvcrypt unlock {name}), or choose another name"
                )));
            }
            None => {}
        }
        if self.pending.contains_key(&name) {
            return Err(OpenRefused::Busy(format!(
                "{name} is the name of a volume in the agent's configuration; choose another name"
            )));
        }
        if !spec.device.exists() {
            return Err(OpenRefused::NotFound(format!(
                "{}: no such device or file",
                spec.device.display()
            )));
        }
        opened::save(&spec).map_err(|e| {
            OpenRefused::Failed(format!(
                "cannot record volume {name} in {}: {e}",
                opened::dir().display()
            ))
        })?;
        let h = self.spawn_opened(spec);
        self.publish();
        Ok(h)
    }

    /// Forgets the runtime volume `name`: its record is deleted and its task ended (one that
    /// still serves is closed first by the task's shutdown). Configured volumes are not
    /// touched.
    pub fn forget(&mut self, name: &str) {
        if self.entries.get(name).is_none_or(|e| e.runtime.is_none()) {
            return;
        }
        if let Some(e) = self.entries.remove(name) {
            opened::remove(name);
            let (tx, _rx) = tokio::sync::oneshot::channel();
            let _ = e.handle.tx.try_send(Command::Shutdown(tx));
        }
        self.start_pending(name);
        self.publish();
    }

    /// A configured volume that waited for a runtime or removed one of the same name.
    fn start_pending(&mut self, name: &str) {
        if let Some(s) = self.pending.remove(name) {
            tracing::info!(volume = %name, device = %s.selector, "volume {name}: the old volume of that name is closed; attaching {}", s.selector);
            self.spawn(s);
        }
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
            .filter(|(_, e)| e.runtime.is_none())
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
        self.p.reload_vault(vault).map_err(|e| ReloadError::Vault {
            path: path.display().to_string(),
            message: e.message,
        })?;
        let plan = self.apply(&cfg.volume_settings());
        // Runtime volumes stay; they follow the new `[agent]` policy.
        self.cfg = cfg;
        for e in self.entries.values() {
            if let Some(spec) = &e.runtime {
                e.desired.send_replace(Desired {
                    settings: spec.settings(&self.cfg),
                    configured: true,
                });
            }
        }
        Ok(describe(path, &plan))
    }

    /// Applies the volume part of a validated configuration.
    pub fn apply(&mut self, new: &[VolumeSettings]) -> Plan {
        // A replacement still waiting is re-planned from the new file.
        self.pending.clear();
        let plan = plan(&self.current(), new);
        for s in &plan.add {
            if self.entries.contains_key(&s.name) {
                // A runtime volume (kvcrypt open) has the name: it stays until closed.
                tracing::warn!(volume = %s.name, device = %s.selector, "reload: new volume {} ({}) has the name of a volume opened by kvcrypt open; it is attached once that one is closed", s.name, s.selector);
                self.pending.insert(s.name.clone(), s.clone());
                continue;
            }
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
            .filter(|(_, e)| {
                e.handle.tx.is_closed() && (e.runtime.is_some() || !e.desired.borrow().configured)
            })
            .map(|(n, _)| n.clone())
            .collect();
        if done.is_empty() {
            return;
        }
        for n in done {
            if self.entries.remove(&n).is_some_and(|e| e.runtime.is_some()) {
                opened::remove(&n);
            }
            self.start_pending(&n);
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
