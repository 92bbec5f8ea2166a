//! The production [`Platform`]: Key Vault via `keys`, headers via `header`, workers via the
//! worker process contract, FIFREEZE via `freeze`. Blocking calls run on tokio's blocking pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::header::{self, LoadedHeader};
use crate::keys::{ErrorClass, KeyError, KeyVaultProvider};
use crate::secmem::VolumeKey;

use super::config::{Selector, VaultConfig, VolumeSettings};
use super::control::run_dir;
use super::discover::{self, Identity};
use super::freeze::{self, FrozenSet};
use super::ports::{AccessClass, AccessError, CloseFailed, Platform, Served, SlotRef, WorkerExit};
use super::reap::{self, PidWatch};
use crate::worker::{self, WorkerClient, WorkerSpec};

/// How long a worker may take to come up (FUSE mount + loop device, or ublk add).
const WORKER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one control request to a worker (and on waiting for it to exit after `close`):
/// a hung worker must not stall its volume's task for long.
const WORKER_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct RealPlatform {
    /// The current key provider; a reload replaces it (calls in flight keep the old one).
    provider: tokio::sync::watch::Sender<Arc<KeyVaultProvider>>,
    exe: PathBuf,
}

impl RealPlatform {
    pub fn new(vault: &VaultConfig) -> Result<Self, KeyError> {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/sbin/kvcrypt"));
        Ok(Self {
            provider: tokio::sync::watch::Sender::new(Arc::new(KeyVaultProvider::new(vault)?)),
            exe,
        })
    }
}

pub fn access_error(e: &KeyError) -> AccessError {
    let class = match e.class() {
        ErrorClass::Denied => AccessClass::Denied,
        ErrorClass::Transient => AccessClass::Transient,
        ErrorClass::Misconfigured => AccessClass::Misconfigured,
    };
    AccessError::new(class, e.to_string())
}

pub fn probe_identity(p: &Path) -> Option<Identity> {
    header::probe(p).map(|i| Identity {
        uuid: i.uuid,
        label: i.label,
    })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("internal task failed: {e}"))
}

impl Platform for RealPlatform {
    type Header = LoadedHeader;
    type Frozen = FrozenSet;

    fn reload_vault(&self, vault: &VaultConfig) -> Result<(), String> {
        let new = KeyVaultProvider::new(vault).map_err(|e| e.to_string())?;
        self.provider.send_replace(Arc::new(new));
        Ok(())
    }

    async fn locate(&self, sel: &Selector) -> Option<PathBuf> {
        let sel = sel.clone();
        let rd = run_dir();
        let fut = blocking(move || discover::locate(&sel, &rd, &probe_identity));
        // A dead disk can block a probe for minutes: give up on this round, retry later.
        match tokio::time::timeout(Duration::from_secs(30), fut).await {
            Ok(Ok(p)) => p,
            _ => None,
        }
    }

    async fn read_header(&self, dev: &Path) -> Result<LoadedHeader, AccessError> {
        let d = dev.to_owned();
        blocking(move || header::read(&d))
            .await
            .map_err(|e| AccessError::new(AccessClass::Transient, e))?
            .map_err(|e| AccessError::new(AccessClass::Misconfigured, e.to_string()))
    }

    fn slots(&self, h: &LoadedHeader) -> Vec<SlotRef> {
        h.slots
            .iter()
            .map(|s| SlotRef {
                key_id: s.key_id.clone(),
                algorithm: s.algorithm.clone(),
                wrapped: s.wrapped.clone(),
            })
            .collect()
    }

    fn verify_key(&self, h: &LoadedHeader, key: &VolumeKey) -> Result<(), AccessError> {
        h.verify_key(key)
            .map_err(|e| AccessError::new(AccessClass::Misconfigured, e.to_string()))
    }

    async fn unwrap_key(&self, slot: &SlotRef) -> Result<VolumeKey, AccessError> {
        let p = self.provider.borrow().clone();
        let slot = slot.clone();
        // Spawned so a slow vault call is isolated from the volume task's own select loop.
        let r =
            tokio::spawn(
                async move { p.unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped).await },
            )
            .await
            .map_err(|e| AccessError::new(AccessClass::Transient, format!("internal: {e}")))?;
        r.map_err(|e| access_error(&e))
    }

    async fn spawn(
        &self,
        s: &VolumeSettings,
        dev: &Path,
        key: &VolumeKey,
        recover_dev_id: Option<u32>,
    ) -> Result<Served, String> {
        let spec = worker_spec(&self.exe, s, dev, recover_dev_id);
        // The key copy moves into the blocking task and is zeroized when it is dropped there.
        let k = VolumeKey::from_slice(key.expose()).ok_or("key length")?;
        let (bd, ublk_dev_id) = blocking(move || {
            let info = worker::spawn_worker(&spec, &k)?;
            drop(k);
            // Served means usable by name: not before udev made /dev/disk/by-kvcrypt/NAME.
            worker::wait_until_named(&info.name, &info.block_device);
            // The worker wrote its state file before its ready line.
            let id = worker::read_state(&info.name).and_then(|st| st.ublk_dev_id);
            Ok::<_, worker::WorkerError>((info.block_device, id))
        })
        .await?
        .map_err(|e| e.to_string())?;
        Ok(Served {
            backing: dev.to_owned(),
            block_device: bd,
            suspended: false,
            ublk_dev_id,
        })
    }

    async fn adopt(&self, name: &str) -> Option<Served> {
        let n = name.to_owned();
        blocking(move || {
            let st = worker::read_state(&n)?;
            let Ok(status) = client(&n).and_then(|mut c| c.status()) else {
                return suspended_ublk(st);
            };
            Some(Served {
                backing: st.device,
                block_device: st.block_device,
                suspended: status.is_suspended(),
                ublk_dev_id: st.ublk_dev_id,
            })
        })
        .await
        .ok()
        .flatten()
    }

    async fn worker_status(&self, name: &str) -> Result<serde_json::Value, String> {
        let n = name.to_owned();
        blocking(move || client(&n).and_then(|mut c| c.status_json()))
            .await?
            .map_err(|e| e.to_string())
    }

    fn watch_worker(&self, name: &str) -> WorkerExit {
        // Opened now, not when first polled: the pid in the state file is the worker just
        // started or adopted, and a pidfd pins that process (no pid reuse from here on).
        let Some(st) = worker::read_state(name) else {
            return Box::pin(async { "its state file is gone".to_owned() });
        };
        let pid = st.pid;
        let n = name.to_owned();
        match PidWatch::open(pid) {
            Ok(w) => Box::pin(async move {
                match w.exited().await {
                    Ok(()) => format!("worker pid {pid} exited"),
                    Err(e) => {
                        tracing::warn!(volume = %n, pid, error = %e, "volume {n}: cannot wait on the pidfd of worker {pid}: {e}; relying on status checks");
                        std::future::pending().await
                    }
                }
            }),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                Box::pin(async move { format!("worker pid {pid} is gone") })
            }
            Err(e) => {
                tracing::warn!(volume = name, pid, error = %e, "volume {name}: cannot watch worker {pid} (pidfd_open: {e}); relying on status checks");
                Box::pin(std::future::pending())
            }
        }
    }

    async fn ublk_recoverable(&self, dev_id: u32) -> bool {
        blocking(move || crate::transport::ublk::is_recoverable(dev_id))
            .await
            .unwrap_or(false)
    }

    async fn clean_dead_worker(&self, name: &str, served: &Served) -> String {
        let n = name.to_owned();
        let sv = served.clone();
        blocking(move || {
            // ublk: the state file names the device to recover (a restarted agent adopts it
            // from there); the new worker's own start replaces it.
            if sv.ublk_dev_id.is_some() {
                return "nothing to clean: the ublk device keeps its I/O for recovery".to_owned();
            }
            // The stale state file and socket would make a new worker refuse to start.
            if let Some(st) = worker::reap_stale(&n) {
                return format!("worker pid {} of '{n}' is alive again", st.pid);
            }
            reap::detach_dead_fuse_loop(&sv.block_device, &n)
        })
        .await
        .unwrap_or_else(|e| e)
    }

    async fn suspend(&self, name: &str) -> Result<(), String> {
        let n = name.to_owned();
        blocking(move || client(&n).and_then(|mut c| c.suspend()))
            .await?
            .map_err(|e| e.to_string())
    }

    async fn resume(&self, name: &str, key: &VolumeKey) -> Result<(), String> {
        let n = name.to_owned();
        let k = VolumeKey::from_slice(key.expose()).ok_or("key length")?;
        blocking(move || client(&n).and_then(|mut c| c.resume(&k)))
            .await?
            .map_err(|e| e.to_string())
    }

    async fn close(&self, name: &str, force: bool) -> Result<(), CloseFailed> {
        let n = name.to_owned();
        blocking(move || worker::close_and_wait(&n, force, WORKER_REQUEST_TIMEOUT))
            .await?
            .map_err(|e| CloseFailed {
                busy: matches!(e, worker::WorkerError::Refused { busy: true, .. }),
                message: e.to_string(),
            })
    }

    async fn delete_ublk_device(&self, name: &str, dev_id: u32) -> Result<(), String> {
        let n = name.to_owned();
        blocking(move || {
            crate::transport::ublk::delete_device(dev_id)?;
            // The exited worker's state file named the device for recovery: drop it.
            worker::reap_stale(&n);
            Ok::<_, crate::transport::ublk::UblkTransportError>(())
        })
        .await?
        .map_err(|e| e.to_string())
    }

    async fn freeze(&self, block_device: &Path) -> FrozenSet {
        let bd = block_device.to_owned();
        blocking(move || freeze::freeze(&bd))
            .await
            .unwrap_or_default()
    }

    async fn thaw(&self, block_device: &Path, frozen: Option<FrozenSet>) {
        let bd = block_device.to_owned();
        let _ = blocking(move || freeze::thaw(&bd, frozen)).await;
    }

    fn remember_manual(&self, name: &str, reason: Option<&str>) {
        let path = worker::manual_lock_path(name);
        let res = match reason {
            Some(r) => worker::ensure_dirs().and_then(|()| std::fs::write(&path, r)),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r,
            },
        };
        if let Err(e) = res {
            tracing::warn!(volume = name, error = %e, "volume {name}: cannot record the operator's lock in {}: {e} (a restarted agent would not keep it)", path.display());
        }
    }

    fn manual_lock(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(worker::manual_lock_path(name)).ok()
    }

    async fn system_stopping(&self) -> bool {
        // systemd's manager state is "stopping" from the moment a shutdown job is queued.
        // Not booted with systemd: nobody shuts us down but an operator.
        if !Path::new("/run/systemd/system").exists() {
            return false;
        }
        let out = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::process::Command::new("systemctl")
                .arg("is-system-running")
                .env_remove("NOTIFY_SOCKET")
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .output(),
        )
        .await;
        let state = match out {
            Ok(Ok(o)) => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            _ => String::new(),
        };
        tracing::debug!("system state: {state:?}");
        state == "stopping"
    }

    async fn run_hook(
        &self,
        s: &VolumeSettings,
        block_device: &Path,
        reason: &str,
    ) -> Result<(), String> {
        match &s.hook {
            None => Ok(()),
            Some(h) => {
                super::hook::run_hook(h, s.hook_timeout, &s.name, block_device, None, reason).await
            }
        }
    }
}

/// A ublk volume suspended under a previous agent: its worker exited on suspend and left the
/// device QUIESCED (and its state file, with the device id). Adopted as suspended; resume
/// recovers the device with a new worker, hold expiry deletes it.
fn suspended_ublk(st: worker::WorkerState) -> Option<Served> {
    let id = st.ublk_dev_id.filter(|_| st.transport == "ublk")?;
    if worker::pid_alive(st.pid) || !crate::transport::ublk::is_recoverable(id) {
        return None;
    }
    Some(Served {
        backing: st.device,
        block_device: st.block_device,
        suspended: true,
        ublk_dev_id: Some(id),
    })
}

fn client(name: &str) -> Result<WorkerClient, worker::WorkerError> {
    WorkerClient::connect_timeout(name, WORKER_REQUEST_TIMEOUT)
}

/// The worker command line for a configured volume (`recover_dev_id`: re-attach that
/// quiesced ublk device instead of adding one).
fn worker_spec(
    exe: &Path,
    s: &VolumeSettings,
    dev: &Path,
    recover_dev_id: Option<u32>,
) -> WorkerSpec {
    let mut spec = WorkerSpec::new(dev, &s.name);
    spec.transport = s.transport;
    spec.queues = s.queues;
    spec.queue_depth = s.queue_depth;
    spec.allow_discards = s.allow_discards;
    spec.read_only = s.read_only;
    spec.recover_dev_id = recover_dev_id;
    spec.exe = Some(exe.to_owned());
    spec.ready_timeout = WORKER_READY_TIMEOUT;
    spec
}
