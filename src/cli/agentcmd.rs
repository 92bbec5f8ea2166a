//! Agent commands: agent, lock, unlock, status, attach, udev-name, demo.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kvcrypt_exit::{Context, Exit, Failure};

use crate::agent::config::Config;
use crate::agent::control::{self, Request, Response};
use crate::agent::status::{VolumeStatus, unix_now};

use super::{AgentArgs, AttachArgs, CliError, NameArgs, StatusArgs, UdevNameArgs};

/// Lock/unlock can wait for a Key Vault round trip and a worker; status is quick.
const SLOW_REQUEST: Duration = Duration::from_secs(120);

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn agent(config: &Path, a: AgentArgs) -> Result<(), Failure> {
    super::harden();
    let cfg = Config::load(config)?;
    if cfg.volumes.is_empty() {
        tracing::warn!(config = %config.display(), "no [[volume]] configured in {}; the agent only answers the control socket", config.display());
    }
    let opts = crate::agent::daemon::Options {
        once: a.once,
        config: Some(config.to_owned()),
    };
    run_daemon(config, cfg, opts)
}

fn run_daemon(
    path: &Path,
    cfg: Config,
    opts: crate::agent::daemon::Options,
) -> Result<(), Failure> {
    let vault = cfg
        .vault
        .clone()
        .ok_or_else(|| crate::agent::config::ConfigError::Invalid {
            path: path.to_owned(),
            field: "vault".into(),
            message: "missing: the agent needs a [vault] table (credentials) to unwrap keys".into(),
        })?;
    let rt = runtime()?;
    rt.block_on(async move {
        let p = Arc::new(
            crate::agent::host_platform::HostPlatform::new(&vault).with_context(|| {
                format!("setting up the Key Vault client from {}", path.display())
            })?,
        );
        crate::agent::daemon::run(cfg, p, opts).await?;
        Ok::<(), Failure>(())
    })
}

fn call(req: Request, timeout: Duration) -> Result<Response, Failure> {
    Ok(control::request(&control::socket_path(), &req, timeout)?)
}

pub fn lock(a: NameArgs) -> Result<(), Failure> {
    let r = call(Request::Lock { name: a.name }, SLOW_REQUEST)?;
    println!("{}", r.message.unwrap_or_default());
    Ok(())
}

pub fn unlock(a: NameArgs) -> Result<(), Failure> {
    let r = call(Request::Unlock { name: a.name }, SLOW_REQUEST)?;
    println!("{}", r.message.unwrap_or_default());
    Ok(())
}

pub fn status(a: StatusArgs) -> Result<(), Failure> {
    let r = call(Request::Status { name: a.name }, Duration::from_secs(10))?;
    if a.json {
        // Serialising plain status structs does not fail in practice; nothing to tell apart.
        let json = serde_json::to_string_pretty(&r.volumes)
            .map_err(|e| Failure::wrap(Exit::Failure, e))?;
        println!("{json}");
    } else {
        print!("{}", render_status(&r.volumes, unix_now()));
    }
    Ok(())
}

fn ago(t: Option<f64>, now: f64) -> String {
    match t {
        None => "never".into(),
        Some(t) => {
            let s = (now - t).max(0.0).round() as u64;
            format!("{} ago", humantime::format_duration(Duration::from_secs(s)))
        }
    }
}

/// "in 3h 20m" (or "3h ago" once past) of a Unix time.
fn until(t: f64, now: f64) -> String {
    if t < now {
        return ago(Some(t), now);
    }
    let s = (t - now).round() as u64;
    format!("in {}", humantime::format_duration(Duration::from_secs(s)))
}

/// RFC 3339 (UTC, seconds) and "in …" of an expiry.
fn expiry(exp: i64, now: f64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(exp.max(0) as u64);
    let word = if (exp as f64) < now {
        "expired"
    } else {
        "expires"
    };
    format!(
        "{word} {} ({})",
        humantime::format_rfc3339_seconds(at),
        until(exp as f64, now)
    )
}

/// One line per key slot: what it is, whether it is the one in use and when it last worked.
fn slot_lines(v: &VolumeStatus, now: f64, out: &mut String) {
    for s in &v.slots {
        let mut notes = Vec::new();
        if let Some(x) = s.share {
            notes.push(format!("share {x}"));
        }
        if s.in_use {
            notes.push("in use".to_owned());
        }
        if s.current {
            notes.push("current version".to_owned());
        }
        notes.push(match s.verified_at {
            Some(t) => format!("verified {}", ago(Some(t), now)),
            None => "not verified by this agent".to_owned(),
        });
        if let Some(exp) = s.expires {
            notes.push(expiry(exp, now));
        }
        out.push_str(&format!(
            "  slot:        {} {} ({})\n",
            s.key_id,
            s.algorithm,
            notes.join(", ")
        ));
    }
    for k in &v.keys {
        if let Some(t) = k.next_rotation {
            let at = std::time::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
            out.push_str(&format!(
                "  key:         {} is rotated by its Key Vault rotation policy next at {} ({})\n",
                k.key,
                humantime::format_rfc3339_seconds(at),
                until(t as f64, now)
            ));
        }
        if !k.enabled {
            out.push_str(&format!(
                "  key:         {} current version {} is DISABLED (no slot is added for it)\n",
                k.key, k.current
            ));
        }
    }
    if let Some(t) = v.rotation_next {
        out.push_str(&format!(
            "  rotation:    followed; next lookup of the keys' current versions {}\n",
            until(t, now)
        ));
    }
}

/// "fuse (io_uring)", "fuse (dev_fuse)" or "ublk", from a worker's status JSON.
fn transport_line(worker: &serde_json::Value) -> Option<String> {
    let t = worker.get("transport")?.as_str()?;
    Some(match worker.get("fuse_mode").and_then(|m| m.as_str()) {
        Some(mode) => format!("{t} ({mode})"),
        None => t.to_string(),
    })
}

/// Human-readable `kvcrypt status`.
pub fn render_status(vols: &[VolumeStatus], now: f64) -> String {
    let mut out = String::new();
    if vols.is_empty() {
        out.push_str("no volumes configured\n");
    }
    for v in vols {
        out.push_str(&format!("{}: {}", v.name, v.state));
        if v.manual {
            out.push_str(" (locked by kvcrypt lock)");
        }
        if v.opened {
            out.push_str(" (opened by kvcrypt open: served and checked until kvcrypt close)");
        }
        if v.removed_from_config {
            out.push_str(" (REMOVED from the configuration: still served and checked until closed with `kvcrypt close`)");
        }
        out.push('\n');
        if let Some(r) = &v.reason {
            out.push_str(&format!("  reason:      {r}\n"));
        }
        if let Some(d) = &v.device {
            out.push_str(&format!("  device:      {d}\n"));
        }
        if let Some(b) = &v.block_device {
            out.push_str(&format!(
                "  plaintext:   {b} (/dev/disk/by-kvcrypt/{})\n",
                v.name
            ));
        }
        if let Some(t) = v.worker.as_ref().and_then(transport_line) {
            out.push_str(&format!("  transport:   {t}\n"));
        }
        if let Some(k) = &v.key_id {
            out.push_str(&format!("  key:         {k}\n"));
        }
        slot_lines(v, now, &mut out);
        if let Some(p) = &v.policy {
            let policy = match p.revoke_policy {
                crate::agent::config::RevokePolicy::Suspend => "suspend",
                crate::agent::config::RevokePolicy::Remove => "remove",
            };
            out.push_str(&format!(
                "  policy:      check every {}, revoke_policy {policy}, hold {}, offline_lock_after {}\n",
                p.check_interval, p.hold, p.offline_lock_after
            ));
            let keys = if p.keys.is_empty() {
                "none (nothing can unlock this volume: add keys = [...])".to_owned()
            } else {
                p.keys.join(", ")
            };
            out.push_str(&format!("  pinned keys: {keys}\n"));
        }
        out.push_str(&format!("  last check:  {}\n", ago(v.last_ok, now)));
        if let Some(s) = v.suspended_at {
            out.push_str(&format!("  suspended:   {}\n", ago(Some(s), now)));
        }
        if v.restarts > 0 {
            out.push_str(&format!(
                "  restarts:    {} (workers that died while serving)\n",
                v.restarts
            ));
        }
        if let Some(e) = &v.last_error {
            out.push_str(&format!(
                "  last error:  {} ({}): {}\n",
                e.class,
                ago(Some(e.at as f64), now),
                e.message
            ));
        }
        if let Some(w) = &v.worker {
            let counters: Vec<String> = [
                "reads",
                "writes",
                "read_bytes",
                "written_bytes",
                "flushes",
                "discards",
                "errors",
                "parked",
            ]
            .iter()
            .filter_map(|k| w.get(*k).map(|x| format!("{k}={x}")))
            .collect();
            if !counters.is_empty() {
                out.push_str(&format!("  I/O:         {}\n", counters.join(" ")));
            }
        }
    }
    out
}

/// Kernel name or path → /dev path.
fn dev_path(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        Path::new("/dev").join(p)
    }
}

pub fn attach(config: &Path, a: AttachArgs) -> Result<(), Failure> {
    let dev = dev_path(&a.device);
    let req = Request::Attach {
        device: dev.display().to_string(),
    };
    match control::request(&control::socket_path(), &req, Duration::from_secs(10)) {
        Ok(r) => {
            println!("{}", r.message.unwrap_or_default());
            Ok(())
        }
        Err(control::ClientError::NotRunning(_)) if agent_coming_back() => {
            // The agent is between a crash and its automatic restart (or starting): it attaches
            // the device itself once up. Acting now would race it — seen in the system test:
            // after `systemctl kill`, this unit started a second worker on a new loop device
            // while the restarting agent was about to recover the dead one in place.
            println!(
                "{}: the kvcrypt agent is (re)starting; it attaches the device itself",
                dev.display()
            );
            Ok(())
        }
        Err(control::ClientError::NotRunning(_)) => {
            // No agent (early boot, or not enabled): unlock the matching volumes ourselves and
            // leave their workers running; the agent adopts them when it starts.
            let cfg = Config::load(config)?;
            let id = probe(&dev);
            let mut cfg2 = cfg.clone();
            cfg2.volumes.retain(|v| {
                let s = cfg.volume_settings().into_iter().find(|s| s.name == v.name);
                s.is_some_and(|s| match &s.selector {
                    crate::agent::config::Selector::Path(p) => {
                        p.canonicalize().ok() == dev.canonicalize().ok()
                    }
                    sel => id
                        .as_ref()
                        .is_some_and(|id| crate::agent::discover::matches(sel, id)),
                })
            });
            if cfg2.volumes.is_empty() {
                println!(
                    "{}: no configured volume matches this device",
                    dev.display()
                );
                return Ok(());
            }
            super::harden();
            run_daemon(
                config,
                cfg2,
                crate::agent::daemon::Options {
                    once: true,
                    config: None,
                },
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether systemd is about to (re)start kvcrypt-agent.service: activating (a start job, or
/// `auto-restart` after a crash) or reloading. Not booted with systemd: no.
fn agent_coming_back() -> bool {
    if !Path::new("/run/systemd/system").exists() {
        return false;
    }
    let out = std::process::Command::new("systemctl")
        .args([
            "show",
            "--property=ActiveState",
            "--value",
            "kvcrypt-agent.service",
        ])
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    let state = out
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    unit_coming_back(&state)
}

/// `ActiveState` values of a unit that will be running shortly.
fn unit_coming_back(active_state: &str) -> bool {
    matches!(active_state, "activating" | "reloading")
}

fn probe(dev: &Path) -> Option<crate::agent::discover::Identity> {
    crate::agent::host_platform::probe_identity(dev)
}

pub fn udev_name(a: UdevNameArgs) -> Result<(), Failure> {
    let dev = dev_path(&a.device);
    match crate::worker::name_of_block_device(&dev) {
        Some(n) => {
            println!("{n}");
            Ok(())
        }
        None => Err(CliError::NotFound(format!(
            "{} is not a served kvcrypt device",
            dev.display()
        ))
        .into()),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_agent_in_auto_restart_counts_as_coming_back() {
        // systemctl show -p ActiveState of a crashed unit with Restart=: "activating"
        // (SubState auto-restart); of a stopped one: "inactive" / "failed".
        assert!(unit_coming_back("activating"));
        assert!(unit_coming_back("reloading"));
        for s in ["inactive", "failed", "active", "deactivating", ""] {
            assert!(!unit_coming_back(s), "{s}");
        }
    }

    use super::*;
    use crate::agent::ports::AccessClass;
    use crate::agent::status::{LastError, VolumeState};

    #[test]
    fn status_rendering_shows_what_operators_need() {
        let mut v = VolumeStatus::new("data");
        v.state = VolumeState::Suspended;
        v.reason = Some("access denied: ForbiddenByRbac".into());
        v.device = Some("/dev/sdb".into());
        v.block_device = Some("/dev/loop3".into());
        v.key_id = Some("https://v.vault.azure.net/keys/k/1".into());
        v.last_ok = Some(1000.0);
        v.last_error = Some(LastError {
            class: AccessClass::Denied,
            message: "403 ForbiddenByRbac".into(),
            at: 1030,
        });
        v.worker = Some(serde_json::json!({
            "reads": 5, "writes": 7, "transport": "fuse", "fuse_mode": "io_uring"
        }));
        let s = render_status(&[v], 1040.0);
        assert!(s.starts_with("data: suspended\n"), "{s}");
        assert!(
            s.contains("plaintext:   /dev/loop3 (/dev/disk/by-kvcrypt/data)"),
            "{s}"
        );
        assert!(s.contains("last check:  40s ago"), "{s}");
        assert!(
            s.contains("last error:  denied (10s ago): 403 ForbiddenByRbac"),
            "{s}"
        );
        assert!(s.contains("I/O:         reads=5 writes=7"), "{s}");
        assert!(s.contains("transport:   fuse (io_uring)"), "{s}");
        assert!(
            s.contains("key:         https://v.vault.azure.net/keys/k/1"),
            "{s}"
        );
    }

    #[test]
    fn status_shows_each_slot_its_expiry_and_the_next_rotation_round() {
        let mut v = VolumeStatus::new("data");
        v.state = VolumeState::Serving;
        v.slots = vec![
            crate::agent::status::SlotStatus {
                key_id: "https://v.vault.azure.net/keys/k/1".into(),
                algorithm: "RSA-OAEP-256".into(),
                verified_at: Some(1000.0),
                in_use: false,
                current: false,
                expires: None,
                share: None,
            },
            crate::agent::status::SlotStatus {
                key_id: "https://v.vault.azure.net/keys/k/2".into(),
                algorithm: "RSA-OAEP-256".into(),
                verified_at: Some(1030.0),
                in_use: true,
                current: true,
                expires: Some(1040 + 3 * 86_400),
                share: None,
            },
        ];
        v.rotation_next = Some(1040.0 + 3600.0);
        v.keys = vec![crate::agent::ports::KeyView {
            key: "https://v.vault.azure.net/keys/k".into(),
            current: "https://v.vault.azure.net/keys/k/2".into(),
            enabled: true,
            expires: Some(1040 + 3 * 86_400),
            next_rotation: Some(1040 + 86_400),
        }];
        let s = render_status(&[v], 1040.0);
        assert!(
            s.contains(
                "slot:        https://v.vault.azure.net/keys/k/1 RSA-OAEP-256 (verified 40s ago)"
            ),
            "{s}"
        );
        assert!(
            s.contains(
                "slot:        https://v.vault.azure.net/keys/k/2 RSA-OAEP-256 (in use, current \
                 version, verified 10s ago, expires 1970-01-04T00:17:20Z (in 3days))"
            ),
            "{s}"
        );
        assert!(
            s.contains("rotation:    followed; next lookup of the keys' current versions in 1h"),
            "{s}"
        );
        assert!(
            s.contains(
                "key:         https://v.vault.azure.net/keys/k is rotated by its Key Vault \
                 rotation policy next at 1970-01-02T00:17:20Z (in 1day)"
            ),
            "{s}"
        );
    }

    #[test]
    fn status_shows_policy_and_removal_from_the_configuration() {
        let mut v = VolumeStatus::new("old");
        v.state = VolumeState::Serving;
        v.removed_from_config = true;
        v.policy = Some(crate::agent::status::PolicyView {
            check_interval: "2s".into(),
            hold: "5m".into(),
            revoke_policy: crate::agent::config::RevokePolicy::Remove,
            offline_lock_after: "off".into(),
            keys: vec!["https://v.vault.azure.net/keys/k".into()],
        });
        let s = render_status(&[v], 1040.0);
        assert!(
            s.contains("  pinned keys: https://v.vault.azure.net/keys/k\n"),
            "{s}"
        );
        assert!(
            s.starts_with("old: serving (REMOVED from the configuration: still served"),
            "{s}"
        );
        assert!(
            s.contains(
                "policy:      check every 2s, revoke_policy remove, hold 5m, offline_lock_after off"
            ),
            "{s}"
        );
    }
}
