//! The production [`Platform`]: Key Vault via `keys`, headers via `header`, workers via the
//! worker process contract, FIFREEZE via `freeze`. Blocking calls run on tokio's blocking pool.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_format::LoadedHeader;
use kvcrypt_keyvault::{KeyError, KeyProvider, KeyVaultProvider};

use super::access;
use super::config::{Selector, VaultConfig, VolumeSettings};
use super::control::run_dir;
use super::discover::{self, Identity};
use super::fdstore::{self, FdStore};
use super::freeze::{self, FrozenSet};
use super::ports::{
    AccessClass, AccessError, CloseFailed, HostPort, KeyPort, PlatformError, PlatformFailure,
    Rotation, Served, SlotRef, WorkerExit, WorkerPort,
};
use super::reap::{self, PidWatch};
use super::rotation;
use super::status::unix_now;
use crate::worker::{self, FuseTakeover, WorkerClient, WorkerSpec};
use kvcrypt_datapath::transport::fuse::FuseInit;

/// How long a worker may take to come up (FUSE mount + loop device, or ublk add).
const WORKER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one control request to a worker (and on waiting for it to exit after `close`):
/// a hung worker must not stall its volume's task for long.
const WORKER_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGKILLed worker may take to be gone (in-flight direct I/O must complete first).
const KILL_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

pub struct HostPlatform {
    /// The current key provider; a reload replaces it (calls in flight keep the old one).
    provider: tokio::sync::watch::Sender<Arc<dyn KeyProvider>>,
    exe: PathBuf,
    fuse: FuseHolder,
    /// Claims on the backing store of volumes whose worker the agent killed (a failed or hung
    /// suspend), held until a new worker serves it or the volume is closed: in between no
    /// process serves it, yet the agent will resume it, so it must not be formatted or have
    /// another header restored onto it (crates/kvcrypt-host/src/inuse.rs).
    stand_in: Arc<Mutex<HashMap<String, std::fs::File>>>,
}

/// The FUSE connections the agent holds (cheap to clone: shared with blocking tasks).
#[derive(Clone)]
struct FuseHolder {
    /// The FUSE connections held, by volume (see [`HeldFuse`]).
    held: Arc<Mutex<HashMap<String, HeldFuse>>>,
    /// Descriptors systemd's store handed back at start (`fuse-CONN-NAME`), until a volume
    /// claims them.
    handed_back: Arc<Mutex<Vec<(String, OwnedFd)>>>,
    fdstore: FdStore,
}

/// A FUSE worker's connection, held by the agent: duplicates of the same open /dev/fuse files
/// the worker reads (also pushed into systemd's store), so the worker's death ends nothing
/// and a new worker can take the device over in place (`transport::fuse::FuseDevice::recover`).
struct HeldFuse {
    init: FuseInit,
    block_device: PathBuf,
    fds: Vec<Arc<OwnedFd>>,
}

/// The agent's own shared claim on a backing store (see [`HostPlatform::stand_in`]).
fn stand_in_claim(device: &Path) -> Result<std::fs::File, kvcrypt_host::inuse::InUseError> {
    let f = std::fs::File::open(device).map_err(|source| kvcrypt_host::inuse::InUseError::Io {
        path: device.to_owned(),
        op: "opening to claim",
        source,
    })?;
    kvcrypt_host::inuse::claim_served(&f, device)?;
    Ok(f)
}

impl HostPlatform {
    fn release_stand_in(&self, name: &str) {
        self.stand_in
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    pub fn new(vault: &VaultConfig) -> Result<Self, KeyError> {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/sbin/kvcrypt"));
        let fdstore = FdStore::from_env();
        let mut handed_back = Vec::new();
        for (name, fd) in fdstore::take_listen_fds() {
            if fdstore::parse_fd_name(&name).is_some() {
                handed_back.push((name, fd));
            } else {
                tracing::warn!(
                    name,
                    "ignoring a descriptor named {name:?} from the service manager"
                );
            }
        }
        if !handed_back.is_empty() {
            tracing::info!(
                count = handed_back.len(),
                "{} FUSE descriptors came back from systemd's file descriptor store",
                handed_back.len()
            );
        }
        Ok(Self {
            provider: tokio::sync::watch::Sender::new(
                Arc::new(KeyVaultProvider::new(vault)?) as Arc<dyn KeyProvider>
            ),
            exe,
            fuse: FuseHolder {
                held: Arc::default(),
                handed_back: Arc::new(Mutex::new(handed_back)),
                fdstore,
            },
            stand_in: Arc::default(),
        })
    }
}

impl FuseHolder {
    /// Holds the connection of the FUSE worker now serving `name`: its descriptors, asked of
    /// the worker itself (they are the same open files as any copy from systemd's store), are
    /// kept here and in the store. A worker that cannot be taken over (io_uring mode, a kernel
    /// without FUSE_NOTIFY_RESEND) refuses: nothing is held then, and its death fails its I/O
    /// as before.
    fn hold(&self, name: &str, st: &worker::WorkerState) {
        if st.transport != "fuse" {
            return;
        }
        let got = client(name).and_then(|mut c| c.fuse_fds());
        let (fds, init) = match got {
            Ok(v) => v,
            Err(e) => {
                tracing::info!(volume = name, reason = %e,
                    "volume {name}: its FUSE connection is not held ({e}); if its worker dies, {} is detached and the volume opened again", st.block_device.display());
                self.let_go(name);
                return;
            }
        };
        let fdname = fdstore::fd_name(name, init.conn);
        let old = self.held.lock().unwrap_or_else(|p| p.into_inner()).insert(
            name.to_owned(),
            HeldFuse {
                init,
                block_device: st.block_device.clone(),
                fds: fds.into_iter().map(Arc::new).collect(),
            },
        );
        // Copies systemd handed back for this connection are the same files: drop ours.
        self.claim_handed_back(name, Some(init.conn));
        let same = old.as_ref().is_some_and(|o| o.init.conn == init.conn);
        if let Some(o) = old.filter(|o| o.init.conn != init.conn) {
            self.store_remove(&fdstore::fd_name(name, o.init.conn));
        }
        // A connection already stored under this name is not stored twice (systemd would
        // skip duplicates of the same files anyway).
        if !same && self.fdstore.enabled() {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(h) = held.get(name)
                && let Err(e) = self.fdstore.store(&fdname, &h.fds)
            {
                tracing::warn!(volume = name, error = %e,
                    "volume {name}: cannot put its FUSE descriptors into systemd's store ({e}); if agent and worker die together, {} is opened anew", st.block_device.display());
            }
        }
        tracing::info!(volume = name, conn = init.conn, block_device = %st.block_device.display(),
            "volume {name}: holding its FUSE connection {} ({}), so a dead worker is replaced on the same device", init.conn, st.block_device.display());
    }

    /// Takes (and returns) systemd's handed-back descriptors of `name`: those of connection
    /// `conn`, or of any connection with `None`. Descriptors of other connections of the volume
    /// are stale: removed from the store.
    fn claim_handed_back(&self, name: &str, conn: Option<u64>) -> Vec<OwnedFd> {
        let mut hb = self.handed_back.lock().unwrap_or_else(|p| p.into_inner());
        let mut mine = Vec::new();
        let mut stale = Vec::new();
        let mut rest = Vec::new();
        for (n, fd) in hb.drain(..) {
            match fdstore::parse_fd_name(&n) {
                Some((v, c)) if v == name && conn.is_none_or(|want| want == c) => mine.push(fd),
                Some((v, _)) if v == name => stale.push(n),
                _ => rest.push((n, fd)),
            }
        }
        *hb = rest;
        drop(hb);
        stale.dedup();
        for n in stale {
            self.store_remove(&n);
        }
        mine
    }

    fn store_remove(&self, fdname: &str) {
        if let Err(e) = self.fdstore.remove(fdname) {
            tracing::warn!(fdname, error = %e, "cannot remove {fdname} from systemd's file descriptor store: {e}");
        }
    }

    /// Stops holding `name`'s connection (here and in systemd's store).
    fn let_go(&self, name: &str) -> bool {
        let old = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        match old {
            Some(h) => {
                self.store_remove(&fdstore::fd_name(name, h.init.conn));
                true
            }
            None => false,
        }
    }

    /// The takeover for a new worker of `name`, if the agent holds a dead worker's connection.
    fn takeover(&self, name: &str) -> Option<FuseTakeover> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let h = held.get(name)?;
        Some(FuseTakeover {
            loop_dev: h.block_device.clone(),
            init: h.init,
            fds: h.fds.clone(),
        })
    }
}

pub fn probe_identity(p: &Path) -> Option<Identity> {
    kvcrypt_header_io::probe(p).map(|i| Identity {
        uuid: i.uuid,
        label: i.label,
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, PlatformError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        PlatformError::new(
            PlatformFailure::Internal,
            format!("internal task failed: {e}"),
        )
    })
}

/// The copy of the key handed to a blocking task (zeroized when that task drops it).
fn key_copy(key: &VolumeKey) -> Result<VolumeKey, PlatformError> {
    VolumeKey::from_slice(key.expose())
        .ok_or_else(|| PlatformError::new(PlatformFailure::Internal, "key length"))
}

impl KeyPort for HostPlatform {
    /// Shared, so a check or a rotation round spawned off the volume task takes a reference,
    /// not a copy of every slot.
    type Header = Arc<LoadedHeader>;

    fn reload_vault(&self, vault: &VaultConfig) -> Result<(), PlatformError> {
        let new = KeyVaultProvider::new(vault)
            .map_err(|e| PlatformError::new(PlatformFailure::VaultConfig, e.to_string()))?;
        self.provider.send_replace(Arc::new(new));
        Ok(())
    }

    async fn read_header(&self, dev: &Path) -> Result<Arc<LoadedHeader>, AccessError> {
        let d = dev.to_owned();
        blocking(move || kvcrypt_header_io::read(&d))
            .await
            .map_err(|e| AccessError::new(AccessClass::Transient, e.message))?
            .map_err(|e| AccessError::new(AccessClass::Misconfigured, e.to_string()))
            .map(Arc::new)
    }

    fn slots(&self, h: &Arc<LoadedHeader>) -> Vec<SlotRef> {
        h.slots
            .iter()
            // Only Key Vault slots: the customer-held recovery slot (format v3) is for
            // `kvcrypt recover` with the customer's private key, never for the agent.
            .filter(|s| {
                let vault = s.provider == kvcrypt_format::PROVIDER_AZURE;
                if !vault {
                    tracing::debug!(slot = s.id, provider = %s.provider,
                        "key slot {} ({}) is not a Key Vault slot; not tried", s.id, s.provider);
                }
                vault
            })
            .map(|s| SlotRef {
                key_id: s.key_id.clone(),
                algorithm: s.algorithm.clone(),
                wrapped: s.wrapped.clone(),
                check: s.check.clone(),
                share: s.share,
            })
            .collect()
    }

    fn verify_key(&self, h: &Arc<LoadedHeader>, key: &VolumeKey) -> Result<(), AccessError> {
        access::verify_key(h, key)
    }

    fn threshold(&self, h: &Arc<LoadedHeader>) -> usize {
        let h = &h.header;
        if h.policy.is_split() {
            h.policy.threshold(h.share_count())
        } else {
            1
        }
    }

    fn combine_shares(
        &self,
        h: &Arc<LoadedHeader>,
        shares: &[(u8, VolumeKey)],
    ) -> Result<VolumeKey, AccessError> {
        let refs: Vec<(u8, &VolumeKey)> = shares.iter().map(|(x, k)| (*x, k)).collect();
        crate::keyslots::combine_shares(&h.header, &refs)
            .map_err(|e| AccessError::new(AccessClass::Misconfigured, e.to_string()))
    }

    async fn unwrap_key(&self, slot: &SlotRef) -> Result<VolumeKey, AccessError> {
        let p = self.provider.borrow().clone();
        let slot = slot.clone();
        // Spawned so a slow vault call is isolated from the volume task's own select loop.
        tokio::spawn(async move { access::unwrap_slot(p.as_ref(), &slot).await })
            .await
            .map_err(|e| AccessError::new(AccessClass::Transient, format!("internal: {e}")))?
    }

    async fn check_slot(&self, h: &Arc<LoadedHeader>, slot: &SlotRef) -> Result<(), AccessError> {
        let p = self.provider.borrow().clone();
        let (h, slot) = (Arc::clone(h), slot.clone());
        tokio::spawn(async move { access::check_slot(p.as_ref(), &h.header, &slot).await })
            .await
            .map_err(|e| AccessError::new(AccessClass::Transient, format!("internal: {e}")))?
    }

    async fn follow_rotation(
        &self,
        dev: &Path,
        h: &Arc<LoadedHeader>,
        s: &VolumeSettings,
    ) -> Result<Rotation<Arc<LoadedHeader>>, PlatformError> {
        let p = self.provider.borrow().clone();
        let (h, pins, grace) = (Arc::clone(h), s.pins.clone(), s.rotation_grace);
        let now = unix_now() as i64;
        // Spawned like the access checks: slow vault calls stay off the volume task's loop.
        let followed = tokio::spawn(async move {
            rotation::follow(p.as_ref(), &h.header, &pins, grace, now).await
        })
        .await
        .map_err(|e| PlatformError::new(PlatformFailure::Internal, format!("internal: {e}")))?;
        let Some(mut new) = followed.header else {
            return Ok(Rotation {
                header: None,
                report: followed.report,
            });
        };
        let d = dev.to_owned();
        // Both copies, the one not currently valid first, each synced before the next
        // (`kvcrypt_header_io::write`); then read back what a later unlock will read.
        let written = blocking(move || {
            kvcrypt_header_io::write(&d, &mut new)?;
            kvcrypt_header_io::read(&d)
        })
        .await?
        .map_err(|e| {
            PlatformError::new(
                PlatformFailure::HeaderWrite,
                format!("writing the rotated header to {}: {e}", dev.display()),
            )
        })?;
        Ok(Rotation {
            header: Some(Arc::new(written)),
            report: followed.report,
        })
    }

    async fn repair_header(
        &self,
        dev: &Path,
        h: &Arc<LoadedHeader>,
    ) -> Result<Option<String>, PlatformError> {
        if h.damaged.is_empty() {
            return Ok(None);
        }
        let what = h
            .damaged
            .iter()
            .map(|d| format!("{}: {}", d.copy, d.reason))
            .collect::<Vec<_>>()
            .join("; ");
        let d = dev.to_owned();
        let mut hdr = h.header.clone();
        blocking(move || kvcrypt_header_io::write(&d, &mut hdr))
            .await?
            .map_err(|e| {
                PlatformError::new(
                    PlatformFailure::HeaderWrite,
                    format!("{what}; rewriting it failed: {e}"),
                )
            })?;
        Ok(Some(what))
    }
}

impl WorkerPort for HostPlatform {
    async fn spawn(
        &self,
        s: &VolumeSettings,
        dev: &Path,
        key: &VolumeKey,
        recover_dev_id: Option<u32>,
    ) -> Result<Served, PlatformError> {
        let mut spec = worker_spec(&self.exe, s, dev, recover_dev_id);
        // A dead FUSE worker's connection we hold: the new worker takes it over in place.
        let takeover = if recover_dev_id.is_none() {
            self.fuse
                .takeover(&s.name)
                .filter(|_| worker::read_state(&s.name).is_none_or(|st| !worker::pid_alive(st.pid)))
        } else {
            None
        };
        let name = s.name.clone();
        let in_place = takeover.is_some();
        if let Some(t) = takeover {
            spec.fuse_takeover = Some(t.clone());
            let k = key_copy(key)?;
            let sp = spec.clone();
            let res = blocking(move || {
                let info = worker::spawn_worker(&sp, &k)?;
                drop(k);
                worker::wait_until_named(&info.name, &info.block_device);
                Ok::<_, worker::WorkerError>(info.block_device)
            })
            .await?;
            match res {
                Ok(bd) => {
                    let me = self.fuse.clone();
                    let n = name.clone();
                    let _ = blocking(move || {
                        if let Some(st) = worker::read_state(&n) {
                            me.hold(&n, &st);
                        }
                    })
                    .await;
                    self.release_stand_in(&name);
                    return Ok(Served {
                        in_place,
                        ..Served::new(dev.to_owned(), bd)
                    });
                }
                Err(e) => {
                    // Today's path: the connection is let go of (its held I/O fails) and the
                    // volume is opened on a new loop device.
                    self.fuse.let_go(&name);
                    let loop_dev = t.loop_dev.clone();
                    drop(t);
                    spec.fuse_takeover = None;
                    let n = name.clone();
                    let note = blocking(move || {
                        worker::reap_stale(&n);
                        reap::detach_dead_fuse_loop(&loop_dev, &n)
                    })
                    .await
                    .unwrap_or_else(|e| e.message);
                    tracing::warn!(volume = %name, error = %e, cleanup = %note,
                        "volume {name}: taking over the dead worker's FUSE connection failed ({e}); opening the volume on a new loop device ({note})");
                }
            }
        }
        // The key copy moves into the blocking task and is zeroized when it is dropped there.
        let k = key_copy(key)?;
        let me = self.fuse.clone();
        let (bd, ublk_dev_id) = blocking(move || {
            let info = worker::spawn_worker(&spec, &k)?;
            drop(k);
            // Served means usable by name: not before udev made /dev/disk/by-kvcrypt/NAME.
            worker::wait_until_named(&info.name, &info.block_device);
            // The worker wrote its state file before its ready line.
            let st = worker::read_state(&info.name);
            if let Some(st) = &st {
                me.hold(&info.name, st);
            }
            let id = st.and_then(|st| st.ublk_dev_id);
            Ok::<_, worker::WorkerError>((info.block_device, id))
        })
        .await?
        .map_err(|e| PlatformError::new(PlatformFailure::WorkerStart, e.to_string()))?;
        self.release_stand_in(&s.name);
        Ok(Served {
            ublk_dev_id,
            ..Served::new(dev.to_owned(), bd)
        })
    }

    async fn adopt(&self, name: &str) -> Option<Served> {
        let n = name.to_owned();
        let me = self.fuse.clone();
        blocking(move || {
            let st = worker::read_state(&n)?;
            let Ok(status) = client(&n).and_then(|mut c| c.status()) else {
                return suspended_ublk(st.clone()).or_else(|| me.dead_fuse(&n, st));
            };
            // A live FUSE worker (a previous agent's, or `kvcrypt attach`'s): hold its
            // connection too, so its death is recovered in place.
            if !me.held_now(&n) {
                me.hold(&n, &st);
            }
            Some(Served {
                suspended: status.is_suspended(),
                ublk_dev_id: st.ublk_dev_id,
                ..Served::new(st.device, st.block_device)
            })
        })
        .await
        .ok()
        .flatten()
    }

    fn fuse_held(&self, name: &str) -> bool {
        self.fuse.held_now(name)
    }

    async fn release_fuse(&self, name: &str, served: &Served) -> String {
        self.release_stand_in(name);
        let held = self.fuse.let_go(name);
        let n = name.to_owned();
        let bd = served.block_device.clone();
        let note = blocking(move || {
            worker::reap_stale(&n);
            reap::detach_dead_fuse_loop(&bd, &n)
        })
        .await
        .unwrap_or_else(|e| e.message);
        if held {
            format!("let go of its FUSE connection (held I/O fails); {note}")
        } else {
            note
        }
    }

    async fn worker_status(&self, name: &str) -> Result<serde_json::Value, PlatformError> {
        let n = name.to_owned();
        let status = blocking(move || client(&n).and_then(|mut c| c.status()))
            .await?
            .map_err(worker_control)?;
        // Shown as is by `kvcrypt status` (the agent's status carries it as JSON).
        serde_json::to_value(status)
            .map_err(|e| PlatformError::new(PlatformFailure::Internal, e.to_string()))
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

    async fn kill_worker(&self, name: &str) -> Result<String, PlatformError> {
        let Some(st) = worker::read_state(name) else {
            return Ok("no worker state file: no worker to kill".into());
        };
        let pid = st.pid;
        // Taken while the worker still holds its own (shared claims coexist), so the volume is
        // never unclaimed.
        match stand_in_claim(&st.device) {
            Ok(f) => {
                self.stand_in
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.to_owned(), f);
            }
            Err(e) => tracing::warn!(volume = %name, error = %e,
                "volume {name}: cannot claim its backing store for the agent ({e}); it is unclaimed until the next worker starts"),
        }
        let w = match PidWatch::open(pid) {
            Ok(w) => w,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                return Ok(format!("worker pid {pid} had already exited"));
            }
            Err(e) => return Err(kill_failed(format!("pidfd_open({pid}): {e}"))),
        };
        w.kill()
            .map_err(|e| kill_failed(format!("SIGKILL to worker pid {pid}: {e}")))?;
        match tokio::time::timeout(KILL_CONFIRM_TIMEOUT, w.exited()).await {
            Ok(Ok(())) => Ok(format!(
                "worker pid {pid} killed (SIGKILL); its exit confirmed by its pidfd"
            )),
            Ok(Err(e)) => Err(kill_failed(format!(
                "waiting on the pidfd of worker {pid}: {e}"
            ))),
            Err(_) => Err(kill_failed(format!(
                "worker pid {pid} did not exit within {KILL_CONFIRM_TIMEOUT:?} of SIGKILL \
                 (stuck in the kernel, state D?)"
            ))),
        }
    }

    async fn ublk_recoverable(&self, dev_id: u32) -> bool {
        blocking(move || kvcrypt_datapath::transport::ublk::is_recoverable(dev_id))
            .await
            .unwrap_or(false)
    }

    async fn clean_dead_worker(&self, name: &str, served: &Served) -> String {
        let n = name.to_owned();
        let sv = served.clone();
        let me = self.fuse.clone();
        blocking(move || {
            // ublk: the state file names the device to recover (a restarted agent adopts it
            // from there); the new worker's own start replaces it.
            if sv.ublk_dev_id.is_some() {
                return "nothing to clean: the ublk device keeps its I/O for recovery".to_owned();
            }
            // A held FUSE connection: the loop device stays for the new worker, and so does
            // the state file (its INIT parameters, should this agent die before the takeover).
            if me.held_now(&n) {
                return format!(
                    "nothing to clean: {} stays, its FUSE connection held for a new worker",
                    sv.block_device.display()
                );
            }
            // The stale state file and socket would make a new worker refuse to start.
            if let Some(st) = worker::reap_stale(&n) {
                return format!("worker pid {} of '{n}' is alive again", st.pid);
            }
            reap::detach_dead_fuse_loop(&sv.block_device, &n)
        })
        .await
        .unwrap_or_else(|e| e.message)
    }

    async fn suspend(&self, name: &str) -> Result<(), PlatformError> {
        let n = name.to_owned();
        blocking(move || client(&n).and_then(|mut c| c.suspend()))
            .await?
            .map_err(worker_control)
    }

    async fn resume(&self, name: &str, key: &VolumeKey) -> Result<(), PlatformError> {
        let n = name.to_owned();
        let k = key_copy(key)?;
        blocking(move || client(&n).and_then(|mut c| c.resume(&k)))
            .await?
            .map_err(worker_control)
    }

    async fn close(&self, name: &str, force: bool) -> Result<(), CloseFailed> {
        let n = name.to_owned();
        let res = blocking(move || worker::close_and_wait(&n, force, WORKER_REQUEST_TIMEOUT))
            .await?
            .map_err(|e| CloseFailed {
                busy: matches!(e, worker::WorkerError::Refused { busy: true, .. }),
                message: e.to_string(),
            });
        // Closed on purpose: the connection must be able to end (a force-closed device still
        // mounted would otherwise keep its I/O hanging on our copies).
        if res.is_ok() || worker::read_state(name).is_none_or(|st| !worker::pid_alive(st.pid)) {
            self.fuse.let_go(name);
            self.release_stand_in(name);
        }
        res
    }

    async fn delete_ublk_device(&self, name: &str, dev_id: u32) -> Result<(), PlatformError> {
        self.release_stand_in(name);
        let n = name.to_owned();
        blocking(move || {
            kvcrypt_datapath::transport::ublk::delete_device(dev_id)?;
            // The exited worker's state file named the device for recovery: drop it.
            worker::reap_stale(&n);
            Ok::<_, kvcrypt_datapath::transport::ublk::UblkTransportError>(())
        })
        .await?
        .map_err(|e| PlatformError::new(PlatformFailure::Device, e.to_string()))
    }
}

impl HostPort for HostPlatform {
    type Frozen = FrozenSet;

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
    ) -> Result<(), PlatformError> {
        match &s.hook {
            None => Ok(()),
            Some(h) => {
                super::hook::run_hook(h, s.hook_timeout, &s.name, block_device, None, reason)
                    .await
                    .map_err(|e| PlatformError::new(PlatformFailure::Hook, e))
            }
        }
    }
}

/// A ublk volume suspended under a previous agent: its worker exited on suspend and left the
/// device QUIESCED (and its state file, with the device id). Adopted as suspended; resume
/// recovers the device with a new worker, hold expiry deletes it.
fn suspended_ublk(st: worker::WorkerState) -> Option<Served> {
    let id = st
        .ublk_dev_id
        .filter(|_| st.transport == kvcrypt_datapath::transport::TransportKind::Ublk.as_str())?;
    if worker::pid_alive(st.pid) || !kvcrypt_datapath::transport::ublk::is_recoverable(id) {
        return None;
    }
    Some(Served {
        suspended: true,
        ublk_dev_id: Some(id),
        ..Served::new(st.device, st.block_device)
    })
}

impl FuseHolder {
    fn held_now(&self, name: &str) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
    }

    /// A FUSE worker found dead (its state file left, its pid gone) whose connection this
    /// agent holds or systemd's store handed back: adopted as dead, for a new worker to take
    /// the same loop device over in place.
    fn dead_fuse(&self, name: &str, st: worker::WorkerState) -> Option<Served> {
        if st.transport != "fuse" || worker::pid_alive(st.pid) {
            return None;
        }
        let init = st.fuse?;
        if !self.held_now(name) {
            let fds = self.claim_handed_back(name, Some(init.conn));
            if fds.is_empty() {
                return None;
            }
            if let Some(why) = init.why_not_recoverable() {
                tracing::warn!(
                    volume = name,
                    "volume {name}: its dead worker's FUSE connection cannot be taken over ({why})"
                );
                self.store_remove(&fdstore::fd_name(name, init.conn));
                return None;
            }
            self.held.lock().unwrap_or_else(|p| p.into_inner()).insert(
                name.to_owned(),
                HeldFuse {
                    init,
                    block_device: st.block_device.clone(),
                    fds: fds.into_iter().map(Arc::new).collect(),
                },
            );
        }
        Some(Served {
            worker_dead: true,
            ..Served::new(st.device, st.block_device)
        })
    }
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

/// A worker that did not answer its control socket, or answered with an error.
fn worker_control(e: worker::WorkerError) -> PlatformError {
    PlatformError::new(PlatformFailure::WorkerControl, e.to_string())
}

fn kill_failed(message: String) -> PlatformError {
    PlatformError::new(PlatformFailure::WorkerKill, message)
}
