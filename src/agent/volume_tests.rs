//! State-machine tests with a fake platform and tokio's paused clock (no root, no vault).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvcrypt_crypto::secmem::VolumeKey;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::config::{RetryConfig, RevokePolicy, Selector, VolumeSettings};
use super::ports::{
    AccessClass, AccessError, CloseFailed, Platform, PlatformError, PlatformFailure, Served,
    SlotRef, WorkerExit,
};
use super::status::VolumeState;
use super::volume::{CloseRefused, Command, VolumeHandle, spawn_volume};

// --- the fake platform ---

/// What the fake vault answers, for unwrapKey and the access check alike.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Vault {
    Ok,
    Denied,
    Transient,
    Hang,
    /// Unwraps a key that fails the header's key check; the access check is denied.
    WrongKey,
}

/// Everything the fake platform is; the events it records are what the checks look at.
#[derive(Default)]
struct World {
    vault: Option<Vault>,
    present: bool,
    worker: Option<WorkerSim>,
    events: Vec<String>,
    frozen: bool,
    /// Workers serve over ublk (kernel without UBLK_F_QUIESCE): suspend ends the worker and
    /// leaves the device QUIESCED; only a new worker recovering it brings it back.
    ublk: bool,
    quiesced: Option<u32>,
    /// Exit watches on the current worker (what a pidfd is to the real agent).
    watchers: Vec<oneshot::Sender<String>>,
    /// The next this many workers die right after they report ready.
    doomed: u32,
    /// When each worker (new or recovering) was started, on tokio's clock.
    starts: Vec<Instant>,
    /// The next this many new workers fail to start (after the "spawn" event).
    spawn_fails: u32,
    /// The served device is mounted: a close without force is refused.
    mounted: bool,
    /// The whole system is shutting down (poweroff/reboot), not just the agent.
    system_stopping: bool,
    /// What the agent recorded of an operator's lock (what /run/kvcrypt keeps for the next
    /// agent).
    manual: Option<String>,
    /// FUSE: the platform keeps each worker's connection (its /dev/fuse descriptors).
    hold_fuse: bool,
    /// FUSE: a connection is held now (of the live worker, or of a dead one awaiting takeover).
    fuse_held: bool,
    /// The worker does not confirm a suspend: `Some(false)` answers an error, `Some(true)`
    /// never answers (wedged). Its key stays until it is killed.
    suspend_fault: Option<bool>,
    /// One header copy is damaged: repaired (rewritten) at the next unlock.
    header_damaged: bool,
    /// A second key slot (a newer key version, as after `kvcrypt rewrap`).
    rotated: bool,
    /// Key ids whose version is disabled: Denied for them whatever `vault` says.
    disabled: Vec<String>,
    /// The header's slot key ids instead of SLOT_OLD (/ SLOT_NEW): what an attacker who can
    /// write the disk put there.
    header_ids: Option<Vec<String>>,
    /// Key ids the fake vault was asked about (unwrapKey or access check), in order.
    asked: Vec<String>,
}

const SLOT_OLD: &str = "https://v.vault.azure.net/keys/k/1";
const SLOT_NEW: &str = "https://v.vault.azure.net/keys/k/2";
/// The key the tests' configuration pins (both slots are versions of it).
const PINNED: &str = "https://v.vault.azure.net/keys/k";

const UBLK_ID: u32 = 3;
const GOOD: u8 = 0x42;

#[derive(Debug, Clone)]
struct WorkerSim {
    key: Option<[u8; 64]>,
}

struct Fake(Mutex<World>);

impl Fake {
    fn new() -> Arc<Fake> {
        Arc::new(Fake(Mutex::new(World {
            vault: Some(Vault::Ok),
            present: true,
            ..Default::default()
        })))
    }
    fn w(&self) -> std::sync::MutexGuard<'_, World> {
        self.0.lock().unwrap()
    }
    fn set_vault(&self, v: Vault) {
        self.w().vault = Some(v);
    }
    fn ev(&self, e: impl Into<String>) {
        self.w().events.push(e.into());
    }
    fn events(&self) -> Vec<String> {
        self.w().events.clone()
    }
    fn worker_key(&self) -> Option<Option<[u8; 64]>> {
        self.w().worker.as_ref().map(|w| w.key)
    }
    fn count(&self, ev: &str) -> usize {
        self.events().iter().filter(|e| *e == ev).count()
    }
    /// SIGKILL the worker: its key dies with it; a ublk device goes QUIESCED, I/O held.
    fn crash(&self) {
        let mut w = self.w();
        assert!(w.worker.take().is_some(), "no worker to kill");
        if w.ublk {
            w.quiesced = Some(UBLK_ID);
        }
        w.events.push("crash".into());
        end_worker(&mut w, "killed by signal 9");
    }
    /// A request to the vault about `slot` (event `what:answer`): `Ok` with `Vault::Ok` or
    /// `Vault::WrongKey`, the caller's to interpret.
    async fn ask(&self, what: &str, slot: &SlotRef) -> Result<Vault, AccessError> {
        let (v, disabled) = {
            let mut w = self.w();
            w.asked.push(slot.key_id.clone());
            (w.vault, w.disabled.contains(&slot.key_id))
        };
        self.ev(format!("{what}:{v:?}"));
        let class = |c, m| Err(AccessError::new(c, m));
        match v {
            _ if disabled => class(AccessClass::Denied, "KeyDisabled"),
            Some(v @ (Vault::Ok | Vault::WrongKey)) => Ok(v),
            Some(Vault::Denied) => class(AccessClass::Denied, "ForbiddenByRbac"),
            Some(Vault::Transient) | None => class(AccessClass::Transient, "503"),
            Some(Vault::Hang) => std::future::pending().await,
        }
    }
}

/// The worker process is gone: every exit watch fires (as a pidfd would, even when the agent
/// asked for the exit; the state machine must stop watching before it asks).
fn end_worker(w: &mut World, how: &str) {
    for tx in w.watchers.drain(..) {
        let _ = tx.send(how.to_owned());
    }
}

fn no_worker() -> PlatformError {
    PlatformError::new(PlatformFailure::WorkerControl, "no worker")
}

impl Platform for Fake {
    type Header = ();
    type Frozen = String;

    async fn locate(&self, sel: &Selector) -> Option<PathBuf> {
        // One fake device, /dev/fake (the reload tests add volumes that never appear).
        let fake = *sel == Selector::Path("/dev/fake".into());
        (fake && self.w().present).then(|| PathBuf::from("/dev/fake"))
    }
    async fn read_header(&self, _dev: &Path) -> Result<(), AccessError> {
        Ok(())
    }
    fn slots(&self, _h: &()) -> Vec<SlotRef> {
        let slot = |k: &str| SlotRef {
            key_id: k.into(),
            algorithm: "RSA-OAEP-256".into(),
            wrapped: vec![1, 2, 3],
            check: Some(vec![4, 5, 6]),
        };
        let w = self.w();
        match (&w.header_ids, w.rotated) {
            (Some(ids), _) => ids.iter().map(|k| slot(k)).collect(),
            (None, true) => vec![slot(SLOT_OLD), slot(SLOT_NEW)],
            (None, false) => vec![slot(SLOT_OLD)],
        }
    }
    async fn check_slot(&self, _h: &(), slot: &SlotRef) -> Result<(), AccessError> {
        match self.ask("check", slot).await? {
            Vault::WrongKey => Err(AccessError::new(
                AccessClass::Denied,
                "access check mismatch",
            )),
            _ => Ok(()),
        }
    }
    fn verify_key(&self, _h: &(), key: &VolumeKey) -> Result<(), AccessError> {
        if key.expose().iter().all(|b| *b == GOOD) {
            Ok(())
        } else {
            Err(AccessError::new(
                AccessClass::Misconfigured,
                "key check mismatch",
            ))
        }
    }
    async fn unwrap_key(&self, slot: &SlotRef) -> Result<VolumeKey, AccessError> {
        let byte = match self.ask("unwrap", slot).await? {
            Vault::WrongKey => 7,
            _ => GOOD,
        };
        Ok(VolumeKey::from_slice(&[byte; 64]).unwrap())
    }
    async fn spawn(
        &self,
        _s: &VolumeSettings,
        dev: &Path,
        key: &VolumeKey,
        recover_dev_id: Option<u32>,
    ) -> Result<Served, PlatformError> {
        let mut w = self.w();
        let takeover = !w.ublk && w.fuse_held && recover_dev_id.is_none();
        let failed = |m: String| Err(PlatformError::new(PlatformFailure::WorkerStart, m));
        match recover_dev_id {
            None if takeover => w.events.push("takeover".into()),
            None => {
                w.events.push("spawn".into());
                if w.spawn_fails > 0 {
                    w.spawn_fails -= 1;
                    return failed("the worker failed before it was ready".into());
                }
            }
            Some(id) => {
                w.events.push(format!("recover:{id}"));
                if w.quiesced.take() != Some(id) {
                    return failed(format!("ublk device {id} is not QUIESCED"));
                }
            }
        }
        w.starts.push(Instant::now());
        w.worker = Some(WorkerSim {
            key: Some(*key.expose()),
        });
        let ublk = w.ublk;
        w.fuse_held = !ublk && w.hold_fuse;
        if w.doomed > 0 {
            // Dies right after its ready line (e.g. a crash on the first I/O).
            w.doomed -= 1;
            w.worker = None;
            if ublk {
                w.quiesced = Some(UBLK_ID);
            }
        }
        let block_device = if ublk {
            format!("/dev/ublkb{UBLK_ID}")
        } else {
            "/dev/loop9".into()
        };
        Ok(Served {
            ublk_dev_id: ublk.then_some(UBLK_ID),
            in_place: takeover,
            ..Served::new(dev.to_owned(), block_device.into())
        })
    }
    async fn adopt(&self, name: &str) -> Option<Served> {
        let w = self.w();
        let fuse = Served::new("/dev/fake".into(), "/dev/loop9".into());
        match (&w.worker, w.ublk, w.quiesced) {
            _ if name != "data" => None,
            // What a previous agent's ublk suspend left: no worker, a QUIESCED device.
            (None, true, Some(id)) => Some(Served {
                suspended: true,
                ublk_dev_id: Some(id),
                ..Served::new("/dev/fake".into(), format!("/dev/ublkb{id}").into())
            }),
            // What a previous agent's held FUSE connection left when agent and worker died
            // together (the descriptors came back from systemd's store).
            (None, false, _) if w.fuse_held => Some(Served {
                worker_dead: true,
                ..fuse
            }),
            (worker, ..) => worker.as_ref().map(|worker| Served {
                suspended: worker.key.is_none(),
                ..fuse
            }),
        }
    }
    fn fuse_held(&self, _name: &str) -> bool {
        let w = self.w();
        !w.ublk && w.fuse_held
    }
    async fn release_fuse(&self, _name: &str, served: &Served) -> String {
        let mut w = self.w();
        w.fuse_held = false;
        w.events
            .push(format!("release:{}", served.block_device.display()));
        "released".into()
    }
    async fn worker_status(&self, _name: &str) -> Result<serde_json::Value, PlatformError> {
        let w = self.w();
        w.worker
            .as_ref()
            .map(|_| serde_json::json!({"reads": 1}))
            .ok_or_else(no_worker)
    }
    fn watch_worker(&self, _name: &str) -> WorkerExit {
        let mut w = self.w();
        if w.worker.is_none() {
            return Box::pin(async { "no worker process".to_owned() });
        }
        let (tx, rx) = oneshot::channel();
        w.watchers.push(tx);
        Box::pin(async move {
            match rx.await {
                Ok(how) => how,
                Err(_) => std::future::pending().await,
            }
        })
    }
    async fn ublk_recoverable(&self, id: u32) -> bool {
        self.w().quiesced == Some(id)
    }
    async fn clean_dead_worker(&self, _name: &str, served: &Served) -> String {
        self.ev(format!("clean:{}", served.block_device.display()));
        "cleaned".into()
    }
    async fn repair_header(&self, _dev: &Path, _h: &()) -> Result<Option<String>, PlatformError> {
        let mut w = self.w();
        if !std::mem::take(&mut w.header_damaged) {
            return Ok(None);
        }
        w.events.push("repair".into());
        Ok(Some("secondary header: checksum mismatch".into()))
    }
    async fn kill_worker(&self, _name: &str) -> Result<String, PlatformError> {
        self.ev("kill");
        let mut w = self.w();
        if w.worker.take().is_none() {
            return Ok("no worker".into());
        }
        if w.ublk {
            w.quiesced = Some(UBLK_ID);
        }
        end_worker(&mut w, "killed by signal 9");
        Ok("worker killed (SIGKILL)".into())
    }
    async fn suspend(&self, _name: &str) -> Result<(), PlatformError> {
        self.ev("suspend");
        let fault = self.w().suspend_fault;
        match fault {
            Some(true) => std::future::pending::<()>().await,
            Some(false) => {
                let e = "worker refused: internal error";
                return Err(PlatformError::new(PlatformFailure::WorkerControl, e));
            }
            None => {}
        }
        let mut w = self.w();
        if w.ublk && w.worker.is_some() {
            // The worker process exits; the device stays, QUIESCED.
            w.worker = None;
            w.quiesced = Some(UBLK_ID);
            end_worker(&mut w, "exited after suspend");
            return Ok(());
        }
        let worker = w.worker.as_mut().ok_or_else(no_worker)?;
        worker.key = None;
        Ok(())
    }
    async fn resume(&self, _name: &str, key: &VolumeKey) -> Result<(), PlatformError> {
        self.ev("resume");
        let mut w = self.w();
        let worker = w.worker.as_mut().ok_or_else(no_worker)?;
        worker.key = Some(*key.expose());
        Ok(())
    }
    async fn close(&self, _name: &str, force: bool) -> Result<(), CloseFailed> {
        self.ev("close");
        let mut w = self.w();
        if w.ublk && w.worker.is_none() {
            return Err("no worker".into());
        }
        if w.mounted && !force {
            let message = "/dev/loop9 is in use (mounted or held open)".into();
            return Err(CloseFailed {
                busy: true,
                message,
            });
        }
        w.worker = None;
        end_worker(&mut w, "exited after close");
        Ok(())
    }
    async fn delete_ublk_device(&self, _name: &str, id: u32) -> Result<(), PlatformError> {
        let mut w = self.w();
        w.events.push(format!("delete:{id}"));
        match w.quiesced.take() {
            Some(q) if q == id => Ok(()),
            _ => Err(PlatformError::new(
                PlatformFailure::Device,
                format!("no QUIESCED ublk device {id}"),
            )),
        }
    }
    async fn freeze(&self, bd: &Path) -> String {
        self.ev("freeze");
        self.w().frozen = true;
        bd.display().to_string()
    }
    async fn thaw(&self, _bd: &Path, _f: Option<String>) {
        let mut w = self.w();
        // Thaw before the key is back would block on the superblock write.
        if w.worker.as_ref().is_some_and(|w| w.key.is_none()) {
            w.events.push("thaw-while-suspended".into());
        }
        w.frozen = false;
        w.events.push("thaw".into());
    }
    fn remember_manual(&self, _name: &str, reason: Option<&str>) {
        self.w().manual = reason.map(str::to_owned);
    }
    fn manual_lock(&self, _name: &str) -> Option<String> {
        self.w().manual.clone()
    }
    async fn system_stopping(&self) -> bool {
        self.w().system_stopping
    }
    async fn run_hook(
        &self,
        _s: &VolumeSettings,
        bd: &Path,
        _r: &str,
    ) -> Result<(), PlatformError> {
        self.ev(format!("hook:{}", bd.display()));
        Ok(())
    }
}

/// Settings of the volume `data` on `/dev/fake`, pinned to `PINNED`, no jitter (shared with the
/// core's table tests).
pub(super) fn settings() -> VolumeSettings {
    VolumeSettings {
        name: "data".into(),
        selector: Selector::Path("/dev/fake".into()),
        transport: kvcrypt_datapath::transport::TransportKind::Fuse,
        queues: None,
        queue_depth: 128,
        allow_discards: false,
        read_only: false,
        pins: kvcrypt_keyvault::Pins::new(
            vec![kvcrypt_keyvault::KeyPin::parse(PINNED).unwrap()],
            "keys of [vault]",
        ),
        check_interval: Duration::from_secs(1),
        check_jitter: 0.0,
        check_timeout: Duration::from_secs(5),
        hold: Duration::from_secs(10),
        revoke_policy: RevokePolicy::Suspend,
        offline_lock_after: None,
        unlock_retry: RetryConfig {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(4),
            multiplier: 2.0,
            jitter: 0.0,
        },
        hook: None,
        hook_timeout: Duration::from_secs(5),
    }
}

async fn wait_state(h: &VolumeHandle, want: VolumeState, within: Duration) {
    let mut rx = h.status.clone();
    tokio::time::timeout(within, rx.wait_for(|s| s.state == want))
        .await
        .unwrap_or_else(|_| panic!("state {want} not reached; now {:?}", h.status.borrow()))
        .unwrap();
}

async fn send(
    h: &VolumeHandle,
    f: fn(tokio::sync::oneshot::Sender<Result<String, String>>) -> Command,
) -> Result<String, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    h.tx.send(f(tx)).await.unwrap();
    rx.await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn unlocks_then_denied_suspends_and_restore_resumes() {
    let f = Fake::new();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    assert_eq!(f.worker_key(), Some(Some([GOOD; 64])));
    let st = h.status.borrow().clone();
    assert_eq!(st.block_device.as_deref(), Some("/dev/loop9"));
    assert_eq!(
        st.key_id.as_deref(),
        Some("https://v.vault.azure.net/keys/k/1")
    );

    f.set_vault(Vault::Denied);
    wait_state(&h, VolumeState::Suspended, Duration::from_secs(2)).await;
    assert_eq!(f.worker_key(), Some(None), "key wiped in the worker");
    assert!(f.0.lock().unwrap().frozen);
    assert_eq!(
        h.status.borrow().last_error.as_ref().unwrap().class,
        AccessClass::Denied
    );

    f.set_vault(Vault::Ok);
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    assert_eq!(f.worker_key(), Some(Some([GOOD; 64])));
    assert!(!f.0.lock().unwrap().frozen);
    let ev = f.events();
    assert!(!ev.contains(&"thaw-while-suspended".to_string()), "{ev:?}");
    let order: Vec<&str> = ev
        .iter()
        .map(|s| s.as_str())
        .filter(|e| ["freeze", "suspend", "resume", "thaw"].contains(e))
        .collect();
    assert_eq!(order, vec!["freeze", "suspend", "resume", "thaw"]);
    assert_eq!(
        ev.iter().filter(|e| *e == "spawn").count(),
        1,
        "resumed in place"
    );
}

/// Hold expiry: the hook runs on the served device before it is removed (`removed_by`), and
/// restored access attaches a new device.
async fn hold_expiry_case(ublk: bool, block_device: &str, removed_by: &str) {
    let f = Fake::new();
    f.0.lock().unwrap().ublk = ublk;
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    f.set_vault(Vault::Denied);
    wait_state(&h, VolumeState::Suspended, Duration::from_secs(2)).await;
    wait_state(&h, VolumeState::Removed, Duration::from_secs(12)).await;
    let ev = f.events();
    let hook = ev
        .iter()
        .position(|e| *e == format!("hook:{block_device}"))
        .expect("hook ran");
    let close = ev.iter().position(|e| e == removed_by).expect("closed");
    assert!(hook < close, "{ev:?}");
    assert!(f.worker_key().is_none());
    assert_eq!(
        f.0.lock().unwrap().quiesced,
        None,
        "no QUIESCED device left"
    );
    f.set_vault(Vault::Ok);
    wait_state(&h, VolumeState::Serving, Duration::from_secs(3)).await;
    assert_eq!(f.events().iter().filter(|e| *e == "spawn").count(), 2);
}

#[tokio::test(start_paused = true)]
async fn hold_expiry_runs_hook_removes_and_restore_reattaches() {
    hold_expiry_case(false, "/dev/loop9", "close").await;
}

/// ublk: no worker after suspend; the QUIESCED device itself is deleted.
#[tokio::test(start_paused = true)]
async fn ublk_hold_expiry_deletes_the_quiesced_device() {
    hold_expiry_case(true, "/dev/ublkb3", "delete:3").await;
}

#[tokio::test(start_paused = true)]
async fn policy_remove_removes_at_once() {
    let f = Fake::new();
    let mut s = settings();
    s.revoke_policy = RevokePolicy::Remove;
    let h = spawn_volume(s, f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    f.set_vault(Vault::Denied);
    wait_state(&h, VolumeState::Removed, Duration::from_secs(2)).await;
    assert!(f.events().contains(&"hook:/dev/loop9".to_string()));
}

#[tokio::test(start_paused = true)]
async fn transient_and_hangs_never_lock_without_offline_policy() {
    let f = Fake::new();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    f.set_vault(Vault::Transient);
    tokio::time::sleep(Duration::from_secs(60)).await;
    f.set_vault(Vault::Hang);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(h.status.borrow().state, VolumeState::Serving);
    assert_eq!(
        h.status.borrow().last_error.as_ref().unwrap().class,
        AccessClass::Transient
    );
    assert!(!f.events().contains(&"suspend".to_string()));
}

#[tokio::test(start_paused = true)]
async fn offline_lock_after_locks_on_time() {
    let f = Fake::new();
    let mut s = settings();
    s.offline_lock_after = Some(Duration::from_secs(5));
    let h = spawn_volume(s, f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    f.set_vault(Vault::Transient);
    let t0 = tokio::time::Instant::now();
    wait_state(&h, VolumeState::Suspended, Duration::from_secs(10)).await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took <= Duration::from_secs(7),
        "{took:?}"
    );
    assert!(
        h.status
            .borrow()
            .reason
            .as_ref()
            .unwrap()
            .contains("offline_lock_after")
    );
    f.set_vault(Vault::Ok);
    wait_state(&h, VolumeState::Serving, Duration::from_secs(3)).await;
}

#[tokio::test(start_paused = true)]
async fn wrong_key_from_vault_locks() {
    let f = Fake::new();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    f.set_vault(Vault::WrongKey);
    wait_state(&h, VolumeState::Suspended, Duration::from_secs(3)).await;
    assert_eq!(f.worker_key(), Some(None));
}

#[tokio::test(start_paused = true)]
async fn boot_with_vault_down_retries_with_backoff() {
    let f = Fake::new();
    f.set_vault(Vault::Transient);
    let h = spawn_volume(settings(), f.clone());
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(h.status.borrow().state, VolumeState::Locked);
    let tries = f
        .events()
        .iter()
        .filter(|e| e.starts_with("unwrap"))
        .count();
    // 0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5 s: capped exponential, not a tight loop.
    assert!((6..=9).contains(&tries), "{tries} attempts");
    f.set_vault(Vault::Ok);
    wait_state(&h, VolumeState::Serving, Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn absent_device_waits_and_wake_attaches() {
    let f = Fake::new();
    f.0.lock().unwrap().present = false;
    let h = spawn_volume(settings(), f.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.status.borrow().state, VolumeState::Locked);
    assert!(
        h.status
            .borrow()
            .reason
            .as_ref()
            .unwrap()
            .contains("not present")
    );
    f.0.lock().unwrap().present = true;
    h.tx.send(Command::Wake).await.unwrap();
    wait_state(&h, VolumeState::Serving, Duration::from_millis(10)).await;
}

/// The udev storm seen under systemd: each failed worker start closes the backing disk (opened
/// O_RDWR), udev's inotify watch turns that into a `change` event, `kvcrypt-attach@` runs
/// again and the agent gets a wake. A wake after a failure that was not "device absent" brings
/// no news: the scheduled backoff stands (here 0.5 s, then 1 s).
#[tokio::test(start_paused = true)]
async fn wakes_after_a_failed_worker_start_keep_the_backoff() {
    let f = Fake::new();
    f.0.lock().unwrap().spawn_fails = u32::MAX;
    let t0 = tokio::time::Instant::now();
    let h = spawn_volume(settings(), f.clone());
    wait_events(&f, "spawn", 1, Duration::from_millis(10)).await;
    assert_eq!(h.status.borrow().state, VolumeState::Locked);
    // Five wakes within the first 0.5 s backoff.
    for _ in 0..5 {
        h.tx.send(Command::Wake).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    assert_eq!(f.count("spawn"), 1, "a wake bypassed the backoff");
    // The backoff itself still runs: second attempt at 0.5 s, third at 1.5 s (not reset to
    // 0.5 s by the wakes in between).
    wait_events(&f, "spawn", 2, Duration::from_secs(1)).await;
    let second = t0.elapsed();
    assert!(second >= Duration::from_millis(500), "{second:?}");
    for _ in 0..5 {
        h.tx.send(Command::Wake).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(f.count("spawn"), 2, "a wake bypassed the backoff");
    wait_events(&f, "spawn", 3, Duration::from_secs(2)).await;
    let third = t0.elapsed();
    assert!(third >= Duration::from_millis(1500), "{third:?}");
    // `kvcrypt unlock` still means "retry now".
    f.0.lock().unwrap().spawn_fails = 0;
    assert_eq!(send(&h, Command::Unlock).await.unwrap(), "unlocked");
    assert_eq!(f.count("spawn"), 4);
}

/// A wake after "device not present" is news (udev saw a device): the volume retries at once,
/// however long the backoff had grown; a failure on that attempt restores the backoff rule.
#[tokio::test(start_paused = true)]
async fn wake_after_device_absent_retries_at_once() {
    let f = Fake::new();
    f.0.lock().unwrap().present = false;
    let h = spawn_volume(settings(), f.clone());
    // Attempts at 0, 0.5, 1.5, 3.5, 7.5 s: the next one is 4 s (the cap) away.
    tokio::time::sleep(Duration::from_millis(7600)).await;
    assert!(
        h.status
            .borrow()
            .reason
            .as_ref()
            .unwrap()
            .contains("not present")
    );
    {
        let mut w = f.0.lock().unwrap();
        w.present = true;
        w.spawn_fails = 1;
    }
    h.tx.send(Command::Wake).await.unwrap();
    wait_events(&f, "spawn", 1, Duration::from_millis(10)).await;
    assert_eq!(h.status.borrow().state, VolumeState::Locked);
    // That attempt failed to start the worker: wakes no longer bypass the backoff …
    h.tx.send(Command::Wake).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(f.count("spawn"), 1, "a wake bypassed the backoff");
    // … which was reset by the wake that brought the device (0.5 s from the failure).
    wait_state(&h, VolumeState::Serving, Duration::from_millis(600)).await;
    assert_eq!(f.count("spawn"), 2);
}

#[tokio::test(start_paused = true)]
async fn manual_lock_holds_until_unlock() {
    let f = Fake::new();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    assert_eq!(send(&h, Command::Lock).await.unwrap(), "locked");
    assert_eq!(h.status.borrow().state, VolumeState::Suspended);
    assert_eq!(f.worker_key(), Some(None));
    // Neither restored access nor hold expiry changes a manual lock.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(h.status.borrow().state, VolumeState::Suspended);
    f.set_vault(Vault::Denied);
    assert!(send(&h, Command::Unlock).await.is_err());
    assert_eq!(h.status.borrow().state, VolumeState::Suspended);
    f.set_vault(Vault::Ok);
    assert_eq!(send(&h, Command::Unlock).await.unwrap(), "resumed");
    assert_eq!(h.status.borrow().state, VolumeState::Serving);
    assert_eq!(f.worker_key(), Some(Some([GOOD; 64])));
}

#[tokio::test(start_paused = true)]
async fn adopts_running_worker_and_dead_worker_is_reattached() {
    let f = Fake::new();
    f.0.lock().unwrap().worker = Some(WorkerSim {
        key: Some([GOOD; 64]),
    });
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_millis(10)).await;
    assert!(
        !f.events().contains(&"spawn".to_string()),
        "adopted, not respawned"
    );
    f.0.lock().unwrap().worker = None;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(h.status.borrow().state, VolumeState::Serving);
    assert_eq!(f.events().iter().filter(|e| *e == "spawn").count(), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_closes_the_device() {
    let f = Fake::new();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    h.tx.send(Command::Shutdown(tx)).await.unwrap();
    rx.await.unwrap();
    assert!(f.worker_key().is_none());
    assert_eq!(h.status.borrow().state, VolumeState::Locked);
}

#[tokio::test(start_paused = true)]
async fn ublk_resume_recovers_the_quiesced_device_with_a_new_worker() {
    let f = Fake::new();
    f.0.lock().unwrap().ublk = true;
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    assert_eq!(
        h.status.borrow().block_device.as_deref(),
        Some("/dev/ublkb3")
    );

    f.set_vault(Vault::Denied);
    wait_state(&h, VolumeState::Suspended, Duration::from_secs(2)).await;
    assert!(
        f.worker_key().is_none(),
        "the ublk worker exited on suspend"
    );
    assert_eq!(f.0.lock().unwrap().quiesced, Some(UBLK_ID));

    f.set_vault(Vault::Ok);
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    assert_eq!(f.worker_key(), Some(Some([GOOD; 64])));
    assert_eq!(f.0.lock().unwrap().quiesced, None, "device recovered");
    assert_eq!(
        h.status.borrow().block_device.as_deref(),
        Some("/dev/ublkb3")
    );
    let ev = f.events();
    let order: Vec<&str> = ev
        .iter()
        .map(|s| s.as_str())
        .filter(|e| !e.starts_with("unwrap") && !e.starts_with("check"))
        .collect();
    assert_eq!(
        order,
        vec!["spawn", "freeze", "suspend", "recover:3", "thaw"],
        "no resume op, no close, no second device"
    );

    // A manual lock / unlock takes the same path.
    assert_eq!(send(&h, Command::Lock).await.unwrap(), "locked");
    assert_eq!(f.0.lock().unwrap().quiesced, Some(UBLK_ID));
    assert_eq!(send(&h, Command::Unlock).await.unwrap(), "resumed");
    assert_eq!(f.worker_key(), Some(Some([GOOD; 64])));
    assert_eq!(f.events().iter().filter(|e| *e == "recover:3").count(), 2);
}

#[tokio::test(start_paused = true)]
async fn ublk_failed_recovery_deletes_the_old_device_and_reattaches() {
    let f = Fake::new();
    f.0.lock().unwrap().ublk = true;
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    assert_eq!(send(&h, Command::Lock).await.unwrap(), "locked");
    // The device vanished from under the agent (e.g. deleted by an operator).
    f.0.lock().unwrap().quiesced = None;
    assert!(send(&h, Command::Unlock).await.is_err());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    let ev = f.events();
    assert!(ev.contains(&"recover:3".to_string()), "{ev:?}");
    assert!(ev.contains(&"delete:3".to_string()), "{ev:?}");
    assert_eq!(ev.iter().filter(|e| *e == "spawn").count(), 2, "{ev:?}");
    assert_eq!(f.worker_key(), Some(Some([GOOD; 64])));
}

#[tokio::test(start_paused = true)]
async fn ublk_device_suspended_under_a_previous_agent_is_adopted_and_recovered() {
    let f = Fake::new();
    {
        let mut w = f.0.lock().unwrap();
        w.ublk = true;
        w.quiesced = Some(UBLK_ID);
    }
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    let ev = f.events();
    assert!(ev.contains(&"recover:3".to_string()), "{ev:?}");
    assert!(
        !ev.contains(&"spawn".to_string()),
        "no second device: {ev:?}"
    );
    assert_eq!(f.worker_key(), Some(Some([GOOD; 64])));
    assert_eq!(
        h.status.borrow().block_device.as_deref(),
        Some("/dev/ublkb3")
    );
}

fn ublk_fake() -> Arc<Fake> {
    let f = Fake::new();
    f.0.lock().unwrap().ublk = true;
    f
}

/// Waits (on the paused clock) until the fake has seen `n` events `ev`.
async fn wait_events(f: &Fake, ev: &str, n: usize, within: Duration) {
    let t0 = tokio::time::Instant::now();
    while f.count(ev) < n {
        assert!(
            t0.elapsed() < within,
            "{n}× {ev} not seen within {within:?}: {:?}",
            f.events()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn ublk_worker_death_recovers_the_same_device_at_once() {
    let f = ublk_fake();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    let t_crash = tokio::time::Instant::now();
    f.crash();
    wait_events(&f, "recover:3", 1, Duration::from_secs(5)).await;
    wait_state(&h, VolumeState::Serving, Duration::from_secs(1)).await;
    // Noticed through the exit watch, not at the next check (1 s later).
    let started = f.0.lock().unwrap().starts[1];
    assert!(started - t_crash < Duration::from_millis(100));
    assert_eq!(
        f.worker_key(),
        Some(Some([GOOD; 64])),
        "key unwrapped again"
    );
    assert_eq!(f.0.lock().unwrap().quiesced, None, "device recovered");
    let st = h.status.borrow().clone();
    assert_eq!(st.block_device.as_deref(), Some("/dev/ublkb3"));
    assert_eq!(st.restarts, 1);
    assert!(
        st.reason.as_deref().unwrap().contains("recovered"),
        "{st:?}"
    );
    let ev = f.events();
    let after: Vec<&str> = ev
        .iter()
        .skip_while(|e| *e != "crash")
        .map(|s| s.as_str())
        .collect();
    assert_eq!(
        after,
        vec!["crash", "unwrap:Some(Ok)", "recover:3"],
        "{ev:?}"
    );
    assert_eq!(f.count("spawn"), 1, "no second device");

    // A later ublk suspend ends the worker on purpose: not taken for a crash.
    assert_eq!(send(&h, Command::Lock).await.unwrap(), "locked");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(h.status.borrow().state, VolumeState::Suspended);
    assert_eq!(f.count("recover:3"), 1);
    assert_eq!(h.status.borrow().restarts, 1);
}

#[tokio::test(start_paused = true)]
async fn fuse_worker_death_detaches_the_old_device_and_opens_again() {
    let f = Fake::new();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    f.crash();
    wait_events(&f, "spawn", 2, Duration::from_secs(5)).await;
    wait_state(&h, VolumeState::Serving, Duration::from_secs(1)).await;
    let ev = f.events();
    let clean = ev
        .iter()
        .position(|e| e == "clean:/dev/loop9")
        .expect("cleaned");
    let respawn = ev.iter().rposition(|e| e == "spawn").unwrap();
    assert!(clean < respawn, "old loop device detached first: {ev:?}");
    assert_eq!(f.worker_key(), Some(Some([GOOD; 64])));
    let st = h.status.borrow().clone();
    assert_eq!(st.restarts, 1);
    assert!(
        st.reason.as_deref().unwrap().contains("re-opened"),
        "{st:?}"
    );
}

/// A fake whose FUSE connections are held by the platform (the agent keeps the workers'
/// /dev/fuse descriptors).
fn held_fuse_fake() -> Arc<Fake> {
    let f = Fake::new();
    f.0.lock().unwrap().hold_fuse = true;
    f
}

#[tokio::test(start_paused = true)]
async fn fuse_worker_death_with_its_connection_held_is_recovered_in_place() {
    let f = held_fuse_fake();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    f.crash();
    wait_events(&f, "takeover", 1, Duration::from_secs(5)).await;
    wait_state(&h, VolumeState::Serving, Duration::from_secs(1)).await;
    let ev = f.events();
    assert_eq!(f.count("spawn"), 1, "no new device: {ev:?}");
    assert!(
        !ev.iter().any(|e| e.starts_with("release:")),
        "the held connection is not let go: {ev:?}"
    );
    let st = h.status.borrow().clone();
    assert_eq!(st.restarts, 1);
    assert_eq!(st.block_device.as_deref(), Some("/dev/loop9"));
    let reason = st.reason.unwrap();
    assert!(reason.contains("recovered /dev/loop9 in place"), "{reason}");
    assert_eq!(f.worker_key(), Some(Some([GOOD; 64])));
}

#[tokio::test(start_paused = true)]
async fn fuse_revoked_while_worker_dead_lets_go_of_the_held_connection() {
    let f = held_fuse_fake();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    f.set_vault(Vault::Denied);
    f.crash();
    wait_state(&h, VolumeState::Locked, Duration::from_secs(2)).await;
    // Nobody will take it over: its held I/O must fail, not hang.
    assert!(f.events().contains(&"release:/dev/loop9".to_string()));
    assert!(!f.fuse_held("data"));
    f.set_vault(Vault::Ok);
    wait_state(&h, VolumeState::Serving, Duration::from_secs(5)).await;
    assert_eq!(f.count("spawn"), 2, "{:?}", f.events());
    assert_eq!(f.count("takeover"), 0);
}

#[tokio::test(start_paused = true)]
async fn agent_start_with_a_dead_fuse_worker_and_its_held_connection_recovers_it_in_place() {
    let f = held_fuse_fake();
    f.0.lock().unwrap().fuse_held = true;
    let h = spawn_volume(settings(), f.clone());
    wait_events(&f, "takeover", 1, Duration::from_secs(5)).await;
    wait_state(&h, VolumeState::Serving, Duration::from_secs(1)).await;
    assert_eq!(f.count("spawn"), 0, "{:?}", f.events());
    let st = h.status.borrow().clone();
    assert_eq!(st.restarts, 1);
    assert!(st.reason.as_deref().unwrap().contains("in place"), "{st:?}");
}

#[tokio::test(start_paused = true)]
async fn repeated_worker_deaths_back_off_then_a_stable_run_resets() {
    let f = ublk_fake();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    f.0.lock().unwrap().doomed = 5;
    let t_crash = tokio::time::Instant::now();
    f.crash();
    // Six recoveries: at once, then unlock_retry's 0.5 s ×2 up to its 4 s cap.
    wait_events(&f, "recover:3", 6, Duration::from_secs(20)).await;
    wait_state(&h, VolumeState::Serving, Duration::from_secs(1)).await;
    let starts = f.0.lock().unwrap().starts.clone();
    assert_eq!(starts.len(), 7, "first spawn + 6 recoveries");
    let mut gaps = vec![(starts[1] - t_crash).as_millis()];
    gaps.extend(starts.windows(2).skip(1).map(|w| (w[1] - w[0]).as_millis()));
    assert_eq!(
        gaps,
        vec![0, 500, 1000, 2000, 4000, 4000],
        "backoff, not a spin"
    );
    assert_eq!(f.count("spawn"), 1, "always the same device");
    assert_eq!(h.status.borrow().restarts, 6);

    // After a stable run the next death is restarted at once again.
    tokio::time::sleep(Duration::from_secs(61)).await;
    let t2 = tokio::time::Instant::now();
    f.crash();
    wait_events(&f, "recover:3", 7, Duration::from_secs(5)).await;
    let last = *f.0.lock().unwrap().starts.last().unwrap();
    assert!(last - t2 < Duration::from_millis(100));
    wait_state(&h, VolumeState::Serving, Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn removed_ublk_device_falls_back_to_a_new_device() {
    let f = ublk_fake();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    f.crash();
    // Deleted before the agent got to it (e.g. `ublk del` by an operator).
    f.0.lock().unwrap().quiesced = None;
    wait_events(&f, "spawn", 2, Duration::from_secs(5)).await;
    wait_state(&h, VolumeState::Serving, Duration::from_secs(1)).await;
    assert_eq!(f.count("recover:3"), 0, "{:?}", f.events());
    assert_eq!(f.worker_key(), Some(Some([GOOD; 64])));
    let st = h.status.borrow().clone();
    assert!(
        st.reason
            .as_deref()
            .unwrap()
            .contains("opened a new device"),
        "{st:?}"
    );
    assert_eq!(st.restarts, 1);
}

#[tokio::test(start_paused = true)]
async fn ublk_revoked_while_worker_dead_suspends_without_a_new_worker() {
    let f = ublk_fake();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    f.set_vault(Vault::Denied);
    f.crash();
    wait_state(&h, VolumeState::Suspended, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(h.status.borrow().state, VolumeState::Suspended);
    assert!(f.worker_key().is_none(), "no worker resurrected");
    assert_eq!(
        f.0.lock().unwrap().quiesced,
        Some(UBLK_ID),
        "I/O still held"
    );
    assert_eq!(
        f.count("recover:3") + f.count("spawn"),
        1,
        "{:?}",
        f.events()
    );
    assert_eq!(
        h.status.borrow().block_device.as_deref(),
        Some("/dev/ublkb3")
    );
    // Access back within hold: the same device is recovered.
    f.set_vault(Vault::Ok);
    wait_state(&h, VolumeState::Serving, Duration::from_secs(3)).await;
    assert_eq!(f.count("recover:3"), 1);
    assert_eq!(f.count("spawn"), 1);
    assert_eq!(f.worker_key(), Some(Some([GOOD; 64])));
}

#[tokio::test(start_paused = true)]
async fn fuse_revoked_while_worker_dead_stays_locked() {
    let f = Fake::new();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    f.set_vault(Vault::Denied);
    f.crash();
    wait_state(&h, VolumeState::Locked, Duration::from_secs(2)).await;
    let reason = h.status.borrow().reason.clone().unwrap();
    assert!(reason.contains("access denied"), "{reason}");
    // Locked like any volume whose key is denied: retried, never served.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.status.borrow().state, VolumeState::Locked);
    assert!(f.worker_key().is_none(), "no worker resurrected");
    assert_eq!(f.count("spawn"), 1);
    assert!(f.events().contains(&"clean:/dev/loop9".to_string()));
    f.set_vault(Vault::Ok);
    wait_state(&h, VolumeState::Serving, Duration::from_secs(5)).await;
    assert_eq!(f.count("spawn"), 2);
}

#[tokio::test(start_paused = true)]
async fn lock_while_worker_dead_holds_until_unlock() {
    let f = ublk_fake();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    // The vault is down: the dead worker cannot be replaced yet.
    f.set_vault(Vault::Transient);
    f.crash();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.status.borrow().state, VolumeState::Unlocking);
    let msg = send(&h, Command::Lock).await.unwrap();
    assert!(msg.starts_with("locked"), "{msg}");
    assert_eq!(h.status.borrow().state, VolumeState::Suspended);
    assert!(h.status.borrow().manual);
    f.set_vault(Vault::Ok);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(h.status.borrow().state, VolumeState::Suspended);
    assert!(f.worker_key().is_none(), "no worker resurrected");
    assert_eq!(f.count("recover:3"), 0);
    assert_eq!(send(&h, Command::Unlock).await.unwrap(), "resumed");
    assert_eq!(h.status.borrow().state, VolumeState::Serving);
    assert_eq!(f.count("recover:3"), 1);
    assert_eq!(f.count("spawn"), 1);
}

// --- reload (SIGHUP): settings over the watch channel, removal, VolumeSet ---

use super::reload::VolumeSet;
use super::volume::{Desired, spawn_managed};

/// Waits (paused clock) until the task has ended: its command channel is closed.
async fn wait_task_end(h: &VolumeHandle, within: Duration) {
    let t0 = tokio::time::Instant::now();
    while !h.tx.is_closed() {
        assert!(
            t0.elapsed() < within,
            "task still running: {:?}",
            h.status.borrow()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn reload_policy_applies_from_the_next_check_without_a_new_worker() {
    let f = Fake::new();
    let mut s = settings();
    s.check_interval = Duration::from_secs(60);
    let (h, desired) = spawn_managed(s.clone(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    let checks = f.count("check:Some(Ok)");
    // Reload: check every second instead of every minute, and remove on revocation.
    s.check_interval = Duration::from_secs(1);
    s.revoke_policy = RevokePolicy::Remove;
    desired.send_replace(Desired {
        settings: s,
        configured: true,
    });
    wait_events(&f, "check:Some(Ok)", checks + 1, Duration::from_secs(3)).await;
    let st = h.status.borrow().clone();
    let p = st.policy.expect("policy shown");
    assert_eq!(p.check_interval, "1s");
    assert_eq!(p.revoke_policy, RevokePolicy::Remove);
    assert!(!st.removed_from_config);
    f.set_vault(Vault::Denied);
    // With `remove` the device goes at once (no hold); the worker was never restarted.
    wait_state(&h, VolumeState::Removed, Duration::from_secs(3)).await;
    assert_eq!(f.count("spawn"), 1, "{:?}", f.events());
    assert_eq!(f.count("close"), 1, "{:?}", f.events());
}

#[tokio::test(start_paused = true)]
async fn removed_volume_keeps_serving_and_checking_until_its_worker_ends() {
    let f = Fake::new();
    let (h, desired) = spawn_managed(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    desired.send_modify(|d| d.configured = false);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let st = h.status.borrow().clone();
    assert!(st.removed_from_config, "{st:?}");
    assert_eq!(st.state, VolumeState::Serving);
    assert_eq!(
        f.count("close"),
        0,
        "a reload must not close a served device"
    );
    // Revocation still applies to it.
    f.set_vault(Vault::Denied);
    wait_state(&h, VolumeState::Suspended, Duration::from_secs(3)).await;
    assert_eq!(f.worker_key(), Some(None), "key wiped");
    f.set_vault(Vault::Ok);
    wait_state(&h, VolumeState::Serving, Duration::from_secs(3)).await;
    // Its worker ends (kvcrypt close / crash): not opened again, the task ends.
    f.crash();
    wait_task_end(&h, Duration::from_secs(5)).await;
    assert_eq!(f.count("spawn"), 1, "{:?}", f.events());
    assert_eq!(h.status.borrow().state, VolumeState::Locked);
}

#[tokio::test(start_paused = true)]
async fn removed_volume_that_is_not_served_is_forgotten_at_once() {
    let f = Fake::new();
    f.0.lock().unwrap().present = false;
    let (h, desired) = spawn_managed(settings(), f.clone());
    wait_state(&h, VolumeState::Locked, Duration::from_secs(2)).await;
    desired.send_modify(|d| d.configured = false);
    wait_task_end(&h, Duration::from_secs(2)).await;
    // The device appearing later does not bring it back.
    f.0.lock().unwrap().present = true;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(f.count("spawn"), 0);
}

const VAULT: &str = "[vault]\nkeys = [\"https://v.vault.azure.net/keys/k\"]\n[vault.credential]\nkind = \"managed-identity\"\n";

#[tokio::test(start_paused = true)]
async fn invalid_reload_keeps_the_old_configuration_and_a_valid_one_applies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvcrypt.toml");
    let good = format!(
        "{VAULT}[agent]\ncheck_interval = \"1s\"\ncheck_jitter = 0.0\n[[volume]]\nname = \"data\"\npath = \"/dev/fake\"\n"
    );
    std::fs::write(&path, &good).unwrap();
    let cfg = super::config::Config::load(&path).unwrap();
    let f = Fake::new();
    let mut set = VolumeSet::start(f.clone(), &cfg.volume_settings());
    let h = set.handles()["data"].clone();
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;

    // A bad value, a parse error, a missing [vault]: refused, named, nothing changes.
    for (bad, what) in [
        (good.replace("\"1s\"", "\"1 parsec\""), "check_interval"),
        (
            format!("{good}[[volume]]\nname = \"x\"\n"),
            "uuid/label/path",
        ),
        (good.replace(VAULT, ""), "[vault]"),
        ("[[volume]\n".to_owned(), "kvcrypt.toml"),
    ] {
        std::fs::write(&path, &bad).unwrap();
        let e = set.reload(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains(what), "{e}");
        assert_eq!(set.handles().len(), 1);
        let st = h.status.borrow().clone();
        assert_eq!(st.state, VolumeState::Serving);
        assert_eq!(st.policy.unwrap().check_interval, "1s");
    }
    let e = set
        .reload(&dir.path().join("missing.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.toml"), "{e}");

    // Valid: a second volume (absent device), new policy for the first, registry follows.
    let reg = set.registry();
    std::fs::write(
        &path,
        format!("{VAULT}[agent]\ncheck_interval = \"5s\"\nhold = \"1m\"\n[[volume]]\nname = \"data\"\npath = \"/dev/fake\"\n[[volume]]\nname = \"more\"\nlabel = \"more\"\n"),
    )
    .unwrap();
    let msg = set.reload(&path).unwrap();
    assert!(
        msg.contains("added more") && msg.contains("updated data"),
        "{msg}"
    );
    assert_eq!(
        reg.borrow().keys().cloned().collect::<Vec<_>>(),
        vec!["data".to_owned(), "more".to_owned()]
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let p = h.status.borrow().policy.clone().unwrap();
    assert_eq!((p.check_interval.as_str(), p.hold.as_str()), ("5s", "1m"));
    assert_eq!(f.count("spawn"), 1, "the serving worker is not restarted");

    // Removing `more` (not served) forgets it; `data` stays.
    std::fs::write(&path, &good).unwrap();
    let msg = set.reload(&path).unwrap();
    assert!(msg.contains("removed more"), "{msg}");
    let more = set.handles()["more"].clone();
    wait_task_end(&more, Duration::from_secs(2)).await;
    set.prune();
    assert_eq!(
        reg.borrow().keys().cloned().collect::<Vec<_>>(),
        vec!["data".to_owned()]
    );
    assert_eq!(h.status.borrow().state, VolumeState::Serving);
}

#[tokio::test(start_paused = true)]
async fn changed_device_keeps_the_old_one_until_closed_then_attaches_the_new_one() {
    let f = Fake::new();
    let mut set = VolumeSet::start(f.clone(), &[settings()]);
    let old = set.handles()["data"].clone();
    wait_state(&old, VolumeState::Serving, Duration::from_secs(2)).await;
    let mut moved = settings();
    moved.selector = Selector::Label("elsewhere".into());
    let plan = set.apply(std::slice::from_ref(&moved));
    assert_eq!(plan.replace, vec![moved.clone()]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The old device is still served (and shown as removed); the new entry waits for it.
    let st = old.status.borrow().clone();
    assert!(
        st.removed_from_config && st.state == VolumeState::Serving,
        "{st:?}"
    );
    set.prune();
    assert!(set.handles()["data"].tx.same_channel(&old.tx));
    // Closed (its worker ends): forgotten, and the new device's volume starts.
    f.crash();
    wait_task_end(&old, Duration::from_secs(5)).await;
    set.prune();
    let new = set.handles()["data"].clone();
    assert!(!new.tx.same_channel(&old.tx));
    // The label is not present in the fake: locked, waiting for its device, configured.
    let mut rx = new.status.clone();
    let st = tokio::time::timeout(
        Duration::from_secs(2),
        rx.wait_for(|s| s.state == VolumeState::Locked && s.reason.is_some()),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert!(!st.removed_from_config, "{st:?}");
    assert!(st.reason.unwrap().contains("elsewhere"));
    assert_eq!(f.count("spawn"), 1, "{:?}", f.events());
}

/// Messages of INFO-and-above events, as journald's MESSAGE shows them (tracing-journald puts
/// only the `message` field there; `journalctl -u kvcrypt-agent` shows nothing else).
#[derive(Clone, Default)]
struct Messages(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Messages {
    fn on_event(&self, ev: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Msg(String);
        impl tracing::field::Visit for Msg {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        if *ev.metadata().level() > tracing::Level::INFO {
            return;
        }
        let mut m = Msg(String::new());
        ev.record(&mut m);
        self.0.lock().unwrap().push(m.0);
    }
}

impl Messages {
    /// Captures the events of this thread (the paused-clock tests run their tasks on it).
    fn capture() -> (Messages, tracing::subscriber::DefaultGuard) {
        use tracing_subscriber::layer::SubscriberExt;
        let m = Messages::default();
        let guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(m.clone()));
        (m, guard)
    }
    fn find(&self, all: &[&str]) -> Option<String> {
        let v = self.0.lock().unwrap();
        v.iter()
            .find(|m| all.iter().all(|p| m.contains(p)))
            .cloned()
    }
    fn assert_has(&self, all: &[&str]) {
        assert!(
            self.find(all).is_some(),
            "no message with {all:?} in {:?}",
            self.0.lock().unwrap()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn state_change_message_names_volume_states_and_reason() {
    let (log, _guard) = Messages::capture();
    let f = Fake::new();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    log.assert_has(&["volume data: unlocking -> serving (unlocked)"]);
    f.set_vault(Vault::Denied);
    wait_state(&h, VolumeState::Suspended, Duration::from_secs(2)).await;
    log.assert_has(&[
        "volume data",
        "serving -> suspended",
        "access denied: ForbiddenByRbac",
    ]);
}

/// Events other than state changes name the volume and what happened in their text too.
#[tokio::test(start_paused = true)]
async fn agent_event_messages_name_the_volume() {
    let (log, _guard) = Messages::capture();
    let f = Fake::new();
    f.0.lock().unwrap().worker = Some(WorkerSim {
        key: Some([GOOD; 64]),
    });
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_millis(10)).await;
    log.assert_has(&["volume data", "adopting", "/dev/loop9"]);
    f.crash();
    wait_events(&f, "spawn", 1, Duration::from_secs(2)).await;
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    log.assert_has(&["volume data", "worker died", "killed by signal 9"]);
    log.assert_has(&["volume data", "worker restarted"]);
}

async fn close_req(h: &VolumeHandle) -> Result<String, CloseRefused> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    h.tx.send(Command::Close(tx)).await.unwrap();
    rx.await.unwrap()
}

/// `kvcrypt close` of a volume the agent serves: closed through the agent and kept closed (no
/// restart as if the worker had crashed) until `kvcrypt unlock`; refused while mounted, with
/// the same worker still served and watched.
#[tokio::test(start_paused = true)]
async fn close_through_the_agent_keeps_the_volume_closed_until_unlock() {
    let f = Fake::new();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;

    f.0.lock().unwrap().mounted = true;
    let r = close_req(&h).await;
    assert!(
        matches!(r, Err(CloseRefused::Busy(ref m)) if m.contains("in use")),
        "{r:?}"
    );
    assert_eq!(h.status.borrow().state, VolumeState::Serving);
    // Still watched: a crash after the refused close is recovered as before.
    f.crash();
    wait_events(&f, "spawn", 2, Duration::from_secs(2)).await;
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;

    f.0.lock().unwrap().mounted = false;
    let r = close_req(&h).await;
    assert!(r.is_ok(), "{r:?}");
    let st = h.status.borrow().clone();
    assert_eq!(st.state, VolumeState::Locked);
    assert!(st.manual, "stays closed");
    assert!(st.block_device.is_none());
    assert!(f.worker_key().is_none(), "worker gone");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        f.count("spawn"),
        2,
        "the agent did not serve it again by itself"
    );
    // A wake (udev change event on the closed backing device) does not reopen it either.
    h.tx.send(Command::Wake).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(f.count("spawn"), 2);
    assert!(matches!(close_req(&h).await, Err(CloseRefused::NotOpen(_))));

    assert!(send(&h, Command::Unlock).await.is_ok());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    assert_eq!(f.count("spawn"), 3);
}

/// The backing disk was hot-removed: the worker closed its device and exited. The agent does
/// not try to restart it on a disk that is gone; it waits for the device as at boot, and the
/// wake from udev when the disk is back serves it at once.
#[tokio::test(start_paused = true)]
async fn backing_disk_removed_waits_for_the_device_and_serves_it_when_back() {
    let f = Fake::new();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    {
        let mut w = f.0.lock().unwrap();
        w.present = false;
        w.worker = None;
        end_worker(&mut w, "exited: backing device removed");
    }
    wait_state(&h, VolumeState::Locked, Duration::from_secs(2)).await;
    let st = h.status.borrow().clone();
    assert!(
        st.reason
            .as_deref()
            .is_some_and(|r| r.contains("device not present")),
        "{st:?}"
    );
    assert!(st.block_device.is_none(), "{st:?}");
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(f.count("spawn"), 1, "no worker started on a missing disk");
    let unwraps = || {
        f.events()
            .iter()
            .filter(|e| e.starts_with("unwrap"))
            .count()
    };
    let before = unwraps();

    f.0.lock().unwrap().present = true;
    h.tx.send(Command::Wake).await.unwrap();
    wait_state(&h, VolumeState::Serving, Duration::from_millis(100)).await;
    assert_eq!(f.count("spawn"), 2);
    assert!(unwraps() > before);
}

/// The same for ublk when the worker died without deleting its device (killed, then the disk
/// went away): the QUIESCED device would hold its I/O forever, so it is deleted.
#[tokio::test(start_paused = true)]
async fn ublk_backing_disk_removed_deletes_the_held_device() {
    let f = ublk_fake();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    f.0.lock().unwrap().present = false;
    f.crash();
    wait_state(&h, VolumeState::Locked, Duration::from_secs(2)).await;
    assert!(
        f.events().contains(&format!("delete:{UBLK_ID}")),
        "{:?}",
        f.events()
    );
    assert_eq!(f.0.lock().unwrap().quiesced, None);
}

/// A volume (ublk or FUSE) served, then suspended by a revocation.
async fn revoked(ublk: bool) -> (Arc<Fake>, VolumeHandle) {
    let f = if ublk { ublk_fake() } else { Fake::new() };
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    f.set_vault(Vault::Denied);
    wait_state(&h, VolumeState::Suspended, Duration::from_secs(2)).await;
    (f, h)
}

async fn shutdown_task(h: &VolumeHandle) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    h.tx.send(Command::Shutdown(tx)).await.unwrap();
    rx.await.unwrap();
}

/// The agent alone stops (`systemctl restart`) while a volume is suspended: nothing is
/// closed, deleted or thawed (thawing would write into the held device and hang the stop);
/// the next agent adopts it as suspended.
#[tokio::test(start_paused = true)]
async fn agent_stop_while_suspended_leaves_the_volume_suspended() {
    for ublk in [false, true] {
        let (f, h) = revoked(ublk).await;
        let before = f.events().len();
        shutdown_task(&h).await;
        let after: Vec<String> = f.events()[before..].to_vec();
        assert!(
            !after
                .iter()
                .any(|e| e == "close" || e == "thaw" || e.starts_with("delete:")),
            "ublk={ublk}: {after:?}"
        );
        assert!(f.0.lock().unwrap().frozen, "still frozen");
    }
}

/// Poweroff/reboot while a volume is suspended: nothing will resume it, and its held I/O would
/// hang the shutdown (seen in the system test: the agent blocked in FITHAW, the final sync on
/// the held device). The device is removed first, then the filesystem thawed.
#[tokio::test(start_paused = true)]
async fn system_shutdown_while_suspended_removes_the_device_then_thaws() {
    for ublk in [false, true] {
        let (f, h) = revoked(ublk).await;
        f.0.lock().unwrap().system_stopping = true;
        let before = f.events().len();
        shutdown_task(&h).await;
        let after: Vec<String> = f.events()[before..].to_vec();
        let removed = if ublk {
            format!("delete:{UBLK_ID}")
        } else {
            "close".into()
        };
        let r = after.iter().position(|e| *e == removed);
        let t = after.iter().position(|e| e == "thaw");
        assert!(
            r.is_some() && t.is_some() && r < t,
            "ublk={ublk}: removed then thawed: {after:?}"
        );
        assert!(
            !after.contains(&"thaw-while-suspended".to_string()),
            "{after:?}"
        );
        assert_eq!(f.0.lock().unwrap().quiesced, None);
    }
}

/// `kvcrypt lock` holds across an agent restart (seen in the system test: the restarted agent
/// adopted the locked volume as revoked-and-suspended and resumed it at its first check).
#[tokio::test(start_paused = true)]
async fn an_operators_lock_survives_an_agent_restart() {
    for ublk in [false, true] {
        let f = if ublk { ublk_fake() } else { Fake::new() };
        let h = spawn_volume(settings(), f.clone());
        wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
        assert!(send(&h, Command::Lock).await.is_ok());
        wait_state(&h, VolumeState::Suspended, Duration::from_secs(2)).await;
        assert!(
            f.0.lock().unwrap().manual.is_some(),
            "ublk={ublk}: lock not recorded"
        );
        shutdown_task(&h).await;

        // The next agent adopts it suspended and leaves it so, whatever the vault says.
        let h = spawn_volume(settings(), f.clone());
        wait_state(&h, VolumeState::Suspended, Duration::from_secs(2)).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        let st = h.status.borrow().clone();
        assert_eq!(st.state, VolumeState::Suspended, "ublk={ublk}: {st:?}");
        assert!(st.manual, "ublk={ublk}");

        assert!(send(&h, Command::Unlock).await.is_ok());
        wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
        assert!(
            f.0.lock().unwrap().manual.is_none(),
            "ublk={ublk}: record not cleared"
        );
        shutdown_task(&h).await;
    }
}

/// The same for `kvcrypt close`: a restarted agent does not open it again by itself.
#[tokio::test(start_paused = true)]
async fn a_closed_volume_stays_closed_across_an_agent_restart() {
    let f = Fake::new();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    assert!(close_req(&h).await.is_ok());
    shutdown_task(&h).await;
    let h = spawn_volume(settings(), f.clone());
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(f.count("spawn"), 1, "opened again by the restarted agent");
    assert!(h.status.borrow().manual);
    assert!(send(&h, Command::Unlock).await.is_ok());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
}

/// Issue: every periodic check unwrapped the VMK, so each left the key in the agent's HTTP
/// buffers. A serving volume is checked with the access-check secret only; the VMK is
/// unwrapped once to unlock and once per resume.
#[tokio::test(start_paused = true)]
async fn serving_checks_never_unwrap_the_volume_key() {
    let f = Fake::new();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    assert_eq!(f.count("unwrap:Some(Ok)"), 1, "one unwrap to unlock");
    wait_events(&f, "check:Some(Ok)", 20, Duration::from_secs(120)).await;
    assert_eq!(f.count("unwrap:Some(Ok)"), 1, "{:?}", f.events());
    f.set_vault(Vault::Denied);
    wait_state(&h, VolumeState::Suspended, Duration::from_secs(10)).await;
    f.set_vault(Vault::Ok);
    wait_state(&h, VolumeState::Serving, Duration::from_secs(10)).await;
    assert_eq!(f.count("unwrap:Some(Ok)"), 2, "one more to resume");
    assert_eq!(f.worker_key(), Some(Some([GOOD; 64])));
}

/// Issue: after a rotation (`kvcrypt rewrap` added a slot for the new key version),
/// disabling the old version made the cached slot fail as Denied and locked a healthy volume.
/// The other slots are tried before anything is locked.
#[tokio::test(start_paused = true)]
async fn rotation_disabling_the_old_version_keeps_serving() {
    let f = Fake::new();
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    assert_eq!(h.status.borrow().key_id.as_deref(), Some(SLOT_OLD));
    {
        let mut w = f.0.lock().unwrap();
        w.rotated = true;
        w.disabled.push(SLOT_OLD.into());
    }
    let before = f.count("check:Some(Ok)");
    wait_events(&f, "check:Some(Ok)", before + 10, Duration::from_secs(60)).await;
    let st = h.status.borrow().clone();
    assert_eq!(st.state, VolumeState::Serving, "{st:?}");
    assert_eq!(st.key_id.as_deref(), Some(SLOT_NEW));
    // A lock + unlock (resume) unwraps with the slot that works.
    assert_eq!(send(&h, Command::Lock).await.unwrap(), "locked");
    assert_eq!(send(&h, Command::Unlock).await.unwrap(), "resumed");
    assert_eq!(f.worker_key(), Some(Some([GOOD; 64])));
    // Both versions disabled: now it is a revocation.
    f.0.lock().unwrap().disabled.push(SLOT_NEW.into());
    wait_state(&h, VolumeState::Suspended, Duration::from_secs(10)).await;
}

/// Issue: a failed suspend was only logged; the state said suspended while a wedged worker
/// kept its key for the whole `hold`. A suspend that fails or never answers ends the worker
/// (the key goes with it), the status says so, and unlock starts a new worker.
#[tokio::test(start_paused = true)]
async fn a_failed_or_hung_suspend_kills_the_worker() {
    for hang in [false, true] {
        let f = Fake::new();
        let h = spawn_volume(settings(), f.clone());
        wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
        f.0.lock().unwrap().suspend_fault = Some(hang);
        assert_eq!(send(&h, Command::Lock).await.unwrap(), "locked");
        assert_eq!(
            f.worker_key(),
            None,
            "hang={hang}: the worker (and key) is gone"
        );
        assert_eq!(f.count("kill"), 1);
        let st = h.status.borrow().clone();
        assert_eq!(st.state, VolumeState::Suspended);
        let reason = st.reason.clone().unwrap_or_default();
        assert!(
            reason.contains("suspend failed") && reason.contains("killed"),
            "{reason}"
        );
        f.0.lock().unwrap().suspend_fault = None;
        assert_eq!(send(&h, Command::Unlock).await.unwrap(), "resumed");
        assert_eq!(f.worker_key(), Some(Some([GOOD; 64])));
        assert_eq!(f.count("spawn"), 2, "a new worker took over");
        assert_eq!(h.status.borrow().state, VolumeState::Serving);
    }
}

/// Issue: a damaged header copy was never reported by the agent (only `header dump` noticed),
/// so a volume could lose its last good copy unnoticed. It is rewritten at unlock, once the
/// header proved authentic and before the worker opens the device.
#[tokio::test(start_paused = true)]
async fn a_damaged_header_copy_is_repaired_at_unlock() {
    let f = Fake::new();
    f.0.lock().unwrap().header_damaged = true;
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    let ev = f.events();
    let pos = |e: &str| ev.iter().position(|x| x == e);
    assert!(
        pos("repair").is_some() && pos("repair") < pos("spawn"),
        "{ev:?}"
    );
    assert!(
        pos("unwrap:Some(Ok)") < pos("repair"),
        "only after the key check: {ev:?}"
    );
}

// --- pinning: the configuration, not the header, names the keys and the vault ---

fn pinned_to(keys: &[&str]) -> kvcrypt_keyvault::Pins {
    kvcrypt_keyvault::Pins::new(
        keys.iter()
            .map(|k| kvcrypt_keyvault::KeyPin::parse(k).unwrap())
            .collect(),
        "keys of [vault]",
    )
}

#[tokio::test(start_paused = true)]
async fn a_header_naming_an_unpinned_key_is_never_tried() {
    let f = Fake::new();
    f.0.lock().unwrap().header_ids = Some(vec![
        "https://attacker.vault.azure.net/keys/k/1".into(),
        "https://v.vault.azure.net/keys/other/1".into(),
    ]);
    let h = spawn_volume(settings(), f.clone());
    let mut rx = h.status.clone();
    tokio::time::timeout(
        Duration::from_secs(3),
        rx.wait_for(|s| s.last_error.is_some()),
    )
    .await
    .unwrap()
    .unwrap();
    // Retries (backoff) meet the same refusal; nothing is ever asked of any vault.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let st = h.status.borrow().clone();
    assert_eq!(st.state, VolumeState::Locked);
    let e = st.last_error.clone().expect("error recorded");
    assert_eq!(e.class, AccessClass::NotPinned);
    assert!(
        e.message
            .contains("https://attacker.vault.azure.net/keys/k/1")
            && e.message.contains(PINNED),
        "names the header's ids and the pins: {}",
        e.message
    );
    assert!(
        st.reason
            .as_deref()
            .unwrap_or("")
            .contains("key not pinned"),
        "{st:?}"
    );
    assert!(f.0.lock().unwrap().asked.is_empty(), "{:?}", f.events());
    assert_eq!(f.count("spawn"), 0);
}

#[tokio::test(start_paused = true)]
async fn only_pinned_slots_are_tried_with_the_pins_host() {
    let f = Fake::new();
    f.0.lock().unwrap().header_ids = Some(vec![
        "https://attacker.vault.azure.net/keys/k/1".into(),
        "https://V.Vault.Azure.Net/keys/K/2".into(),
    ]);
    let h = spawn_volume(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    let asked = f.0.lock().unwrap().asked.clone();
    assert_eq!(asked, vec!["https://v.vault.azure.net/keys/k/2".to_owned()]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        f.0.lock()
            .unwrap()
            .asked
            .iter()
            .all(|k| k == "https://v.vault.azure.net/keys/k/2"),
        "access checks too use only the pinned slot"
    );
}

#[tokio::test(start_paused = true)]
async fn nothing_pinned_refuses_and_says_how_to_pin() {
    let f = Fake::new();
    let mut s = settings();
    s.pins = kvcrypt_keyvault::Pins::new(vec![], "keys of [[volume]] \"data\" and of [vault]");
    let h = spawn_volume(s, f.clone());
    let mut rx = h.status.clone();
    tokio::time::timeout(
        Duration::from_secs(3),
        rx.wait_for(|s| s.last_error.is_some()),
    )
    .await
    .unwrap()
    .unwrap();
    let st = h.status.borrow().clone();
    assert_eq!(st.state, VolumeState::Locked);
    let reason = st.reason.unwrap_or_default();
    assert!(
        reason.contains("no key is pinned") && reason.contains("keys = ["),
        "{reason}"
    );
    assert!(f.0.lock().unwrap().asked.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_pin_removed_while_serving_is_a_configuration_error_not_a_revocation() {
    let f = Fake::new();
    let (h, desired) = spawn_managed(settings(), f.clone());
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    let asked = f.0.lock().unwrap().asked.len();
    desired.send_modify(|d| d.settings.pins = pinned_to(&["https://v.vault.azure.net/keys/new"]));
    tokio::time::sleep(Duration::from_secs(20)).await;
    let st = h.status.borrow().clone();
    assert_eq!(st.state, VolumeState::Serving, "{st:?}");
    assert_eq!(
        st.last_error.as_ref().map(|e| e.class),
        Some(AccessClass::NotPinned)
    );
    assert_eq!(f.worker_key(), Some(Some([GOOD; 64])), "key not wiped");
    assert!(!f.0.lock().unwrap().frozen, "not frozen");
    assert_eq!(f.count("suspend"), 0, "{:?}", f.events());
    assert_eq!(
        f.0.lock().unwrap().asked.len(),
        asked,
        "no request for the unpinned key"
    );
    // Pinned again: checks resume.
    desired.send_modify(|d| d.settings.pins = pinned_to(&[PINNED]));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(f.0.lock().unwrap().asked.len() > asked);
    assert_eq!(h.status.borrow().state, VolumeState::Serving);
}

/// A runtime volume (`kvcrypt open` handed to the agent) is served and checked like a
/// configured one, survives a reload that does not name it, blocks a configured volume of
/// the same name until it is closed, and `close` ends it for good (no manual lock kept).
#[tokio::test(start_paused = true)]
async fn runtime_volume_survives_reload_and_close_forgets_it() {
    use super::opened::OpenSpec;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvcrypt.toml");
    let head = format!("{VAULT}[agent]\ncheck_interval = \"1s\"\ncheck_jitter = 0.0\n");
    std::fs::write(&path, &head).unwrap();
    let cfg = super::config::Config::load(&path).unwrap();
    let f = Fake::new();
    let spec = OpenSpec {
        name: "rt".into(),
        device: "/dev/fake".into(),
        transport: kvcrypt_datapath::transport::TransportKind::Fuse,
        queues: None,
        queue_depth: 128,
        allow_discards: false,
        read_only: false,
    };
    let mut set = VolumeSet::start_with(f.clone(), cfg, &[], vec![spec]);
    let h = set.handles()["rt"].clone();
    wait_state(&h, VolumeState::Serving, Duration::from_secs(2)).await;
    assert!(h.status.borrow().opened);
    assert!(!h.status.borrow().removed_from_config);

    // Checked like a configured volume: a denial suspends it.
    f.set_vault(Vault::Denied);
    wait_state(&h, VolumeState::Suspended, Duration::from_secs(5)).await;
    f.set_vault(Vault::Ok);
    wait_state(&h, VolumeState::Serving, Duration::from_secs(5)).await;

    // A reload that does not name it keeps it; one that configures its name waits for it.
    std::fs::write(
        &path,
        format!("{head}[[volume]]\nname = \"rt\"\nlabel = \"other\"\n"),
    )
    .unwrap();
    set.reload(&path).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let st = h.status.borrow().clone();
    assert_eq!(st.state, VolumeState::Serving, "{st:?}");
    assert!(st.opened && !st.removed_from_config, "{st:?}");
    assert!(!h.tx.is_closed());

    // Close: closed, not kept as a manual lock, and the task ends; the configured volume of
    // that name takes its place.
    assert!(close_req(&h).await.unwrap().starts_with("closed"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(h.tx.is_closed(), "task ended");
    assert!(!h.status.borrow().manual);
    assert_eq!(f.count("crash"), 0);
    set.prune();
    let now = set.handles()["rt"].clone();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!now.status.borrow().opened);
}
