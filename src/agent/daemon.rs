//! Wiring of the daemon: volume tasks, control socket, sd_notify, signals.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

use super::config::Config;
use super::control::{self, Registry};
use super::notify::{Notifier, watchdog_period};
use super::ports::Platform;
use super::reload::VolumeSet;
use super::status::VolumeState;
use super::volume::{Command, VolumeHandle};

/// How the daemon runs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// One unlock pass, then exit leaving the workers running (they are adopted later).
    pub once: bool,
    /// The configuration file, re-read on SIGHUP (`systemctl reload`). `None`: no reload.
    pub config: Option<std::path::PathBuf>,
}

/// Errors that stop the daemon before it serves.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create the control socket {path}: {source}")]
    Socket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

impl kvcrypt_exit::ExitClass for DaemonError {
    fn exit_class(&self) -> kvcrypt_exit::Exit {
        match self {
            DaemonError::Socket { source, .. }
                if source.kind() == std::io::ErrorKind::AddrInUse =>
            {
                kvcrypt_exit::Exit::Busy
            }
            DaemonError::Socket { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                kvcrypt_exit::Exit::Permission
            }
            _ => kvcrypt_exit::Exit::Failure,
        }
    }
}

/// One line for `STATUS=` and the journal.
pub fn summary(handles: &BTreeMap<String, VolumeHandle>) -> String {
    let mut serving = 0;
    let mut other = Vec::new();
    for h in handles.values() {
        let s = h.status.borrow();
        if s.removed_from_config {
            other.push(format!("{} {} (removed from config)", s.name, s.state));
        } else if s.state == VolumeState::Serving {
            serving += 1;
        } else {
            other.push(format!("{} {}", s.name, s.state));
        }
    }
    let configured = handles
        .values()
        .filter(|h| !h.status.borrow().removed_from_config)
        .count();
    let mut out = format!("serving {serving}/{configured} volumes");
    if !other.is_empty() {
        out.push_str(" (");
        out.push_str(&other.join(", "));
        out.push(')');
    }
    out
}

/// Waits until every volume has finished its first unlock attempt (served, or failed and
/// waiting for a retry), bounded by `limit` so a hung vault cannot hold up boot.
async fn initial_pass(handles: &BTreeMap<String, VolumeHandle>, limit: Duration) {
    // Waiting for each in turn is waiting for all: the tasks run concurrently meanwhile.
    let all = async {
        for h in handles.values() {
            let mut rx = h.status.clone();
            let _ = rx
                .wait_for(|s| match s.state {
                    VolumeState::Unlocking => false,
                    VolumeState::Locked => s.reason.is_some(),
                    _ => true,
                })
                .await;
        }
    };
    let _ = tokio::time::timeout(limit, all).await;
}

/// Runs the agent until SIGTERM/SIGINT (or after one pass with `once`).
pub async fn run<P: Platform>(cfg: Config, p: Arc<P>, opts: Options) -> Result<(), DaemonError> {
    let notifier = Notifier::from_env();
    let sock = control::socket_path();
    // The socket comes first so `kvcrypt status` works while the vault is still unreachable.
    let listener = if opts.once {
        None
    } else {
        Some(control::bind(&sock).map_err(|source| DaemonError::Socket {
            path: sock.clone(),
            source,
        })?)
    };
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;

    let settings = cfg.volume_settings();
    // Volumes `kvcrypt open` handed to an earlier agent are taken over again (not by a
    // one-shot `--once` pass, which serves only the configured volumes it was given).
    let runtime = if opts.once {
        vec![]
    } else {
        super::opened::load_all()
    };
    let mut set = VolumeSet::start_with(p.clone(), cfg.clone(), &settings, runtime);
    let handles = set.handles();
    tracing::info!(
        volumes = handles.len(),
        "kvcrypt agent starting ({} volumes)",
        handles.len()
    );
    let limit = settings
        .iter()
        .map(|s| s.check_timeout * 2 + Duration::from_secs(5))
        .max()
        .unwrap_or(Duration::from_secs(5));
    initial_pass(&handles, limit).await;
    let text = summary(&handles);
    tracing::info!(status = %text, "initial unlock pass done: {text}");

    if opts.once {
        // Leave the workers running: stop the tasks without closing anything.
        drop(handles);
        drop(set);
        return Ok(());
    }
    notifier.ready(&text);

    let (set_tx, mut set_rx) = tokio::sync::mpsc::channel::<control::SetRequest>(16);
    let reg = Arc::new(Registry {
        volumes: set.registry(),
        platform: p.clone(),
        set: Some(set_tx),
    });
    let server = listener.map(|l| tokio::spawn(control::serve(l, reg)));

    let wd = watchdog_period();
    let mut wd_tick = tokio::time::interval(wd.unwrap_or(Duration::from_secs(3600)));
    let mut status_tick = tokio::time::interval(Duration::from_millis(500));
    let mut last_status = text;
    // Shown in STATUS= until a reload succeeds.
    let mut reload_failed: Option<String> = None;
    let status_text = |set: &VolumeSet<P>, failed: &Option<String>| {
        let mut t = summary(&set.handles());
        if let Some(f) = failed {
            t.push_str(&format!(
                "; last reload FAILED, previous configuration kept: {f}"
            ));
        }
        t
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                notifier.reloading();
                match &opts.config {
                    None => tracing::warn!("SIGHUP: no configuration file to reload"),
                    Some(path) => match set.reload(path) {
                        Ok(msg) => {
                            tracing::info!("{msg}");
                            reload_failed = None;
                        }
                        Err(e) => {
                            tracing::error!(config = %path.display(), error = %e, "reloading {} failed: {e}; keeping the previous configuration", path.display());
                            reload_failed = Some(e.to_string());
                        }
                    },
                }
                let t = status_text(&set, &reload_failed);
                notifier.ready(&t);
                last_status = t;
            }
            Some(req) = set_rx.recv() => match req {
                control::SetRequest::Open(spec, reply) => {
                    let _ = reply.send(set.open(spec));
                }
                control::SetRequest::Forget(name, done) => {
                    set.forget(&name);
                    let _ = done.send(());
                }
            },
            _ = wd_tick.tick(), if wd.is_some() => notifier.watchdog(),
            _ = status_tick.tick() => {
                set.prune();
                let t = status_text(&set, &reload_failed);
                if t != last_status {
                    notifier.status(&t);
                    last_status = t;
                }
            }
        }
    }

    tracing::info!("stopping: closing served volumes");
    notifier.stopping();
    if let Some(s) = server {
        s.abort();
    }
    let _ = std::fs::remove_file(&sock);
    let mut waits = Vec::new();
    for h in set.handles().values() {
        let (tx, rx) = oneshot::channel();
        if h.tx.send(Command::Shutdown(tx)).await.is_ok() {
            waits.push(rx);
        }
    }
    for rx in waits {
        let _ = tokio::time::timeout(Duration::from_secs(60), rx).await;
    }
    tracing::info!("kvcrypt agent stopped");
    Ok(())
}
